//! This node's part of every service's plan.
//!
//! There is no manager: every node computes the same plans from the view it has
//! (`mesh_planner::plan_all`, every service in one pass) and carries out only what concerns
//! itself — it starts the tasks the plans put on it, stops its own tasks the plans stop, and
//! restarts its own tasks by the service's restart policy. Each task is a `tsk:<id>` record this node alone writes, with
//! Swarm's states; other nodes read it to know a slot is taken. Diverging views (a gossip
//! round, a partition) can make two nodes fill one slot; once views agree the plan ranks the
//! copies the same way everywhere and the loser's node stops it.
//!
//! A pass is cheap and idempotent, run after every kernel convergence: it diffs the plan
//! against this node's task records and starts a job per change. Jobs (start, stop) run in
//! the background, one per task at a time, so a slow stop (the grace period) never holds up
//! the loop.
//!
//! Everything here reaches the node through [`NodeRuntime`] (see `runtime.rs`): the agent in
//! production, a fake node in the unit tests below.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use mesh_planner::{AfterExit, DesiredState, FailureAction, Slot, SlotPlacement, Task, TaskState};
use tracing::{info, warn};

use super::{
    Agent, drain, health, rollout,
    runtime::{NodeRuntime, TaskStart},
};
use crate::{
    cluster::{Replicated, View},
    task::ProcessState,
};
use mesh_api::spec::{HealthCheck, NodeStatus, ServiceSpec, UpdateState};

/// How long a task without a health check may take to listen on its port before it is made a
/// backend anyway (it may serve only UDP, or another port).
const READY_WAIT: Duration = Duration::from_secs(10);

/// Terminal tasks kept per slot on this node for `service ps` (Swarm keeps 5 per slot,
/// the running one included).
const HISTORY_PER_SLOT: usize = 5;

/// How a task came to an end.
enum Ending {
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        /// OOM-killed over a memory limit of this many bytes.
        out_of_memory: Option<u64>,
    },
    /// It could not be started, and why.
    Rejected(String),
    /// It ran but was ended for a reason other than its exit (failed health checks).
    Failed(String),
}

/// How many task starts a node carries out at once. A start is mostly waiting — on the
/// kernel (namespaces, links, addresses), on the process to exec, on gossip — so one at a
/// time left the node idle while 100 tasks queued behind each other; an unbounded burst of
/// 300 would make each start wait on all the others for the same two CPUs and the same
/// netlink sockets. Pulling an image is not part of a start (see [`start`]).
pub(crate) const START_CONCURRENCY: usize = 8;

/// Task IDs with a start or stop underway on this node, and those whose health is watched.
pub(crate) struct Jobs {
    busy: std::sync::Mutex<BTreeSet<String>>,
    watched: std::sync::Mutex<BTreeSet<String>>,
    /// One permit per start underway (after its image is here).
    starts: tokio::sync::Semaphore,
    holds: std::sync::Mutex<Holds>,
}

impl Default for Jobs {
    fn default() -> Self {
        Self {
            busy: Default::default(),
            watched: Default::default(),
            starts: tokio::sync::Semaphore::new(START_CONCURRENCY),
            holds: Default::default(),
        }
    }
}

/// Slots that only just came to this node wait until every node could have seen what this
/// one sees.
///
/// A slot that was pending (no node had room) or placed on another node moved here because
/// this node's view changed: most often room freed as tasks stopped. Each node sees its own
/// tasks stop before it hears of the others', so for a gossip round two nodes can each find
/// room only on themselves and both start the slot; the plan stops one copy once views
/// agree, but a user has seen a slot run twice, which Swarm's single scheduler never shows.
/// Waiting until the slot has stayed here for the time a write takes to reach every node and
/// come back leaves each node the other's news before it starts: the node that waits sees a
/// copy already recorded, or a plan that now agrees on one node. Slots placed straight away
/// (a new service, a scale, a dead node's slots — decided alike on every node from records
/// every node has) do not wait.
#[derive(Default)]
struct Holds {
    /// When this node last planned the slot pending or on another node, by (service, slot).
    elsewhere_ms: BTreeMap<(String, Slot), u64>,
}

impl Holds {
    /// Notes where the plan puts each slot of `service`.
    fn note(&mut self, me: &str, service: &str, plan: &mesh_planner::Plan, now: u64) {
        for s in &plan.slots {
            let key = (service.to_owned(), s.slot.clone());
            match &s.placement {
                SlotPlacement::Pending { .. } => {
                    self.elsewhere_ms.insert(key, now);
                }
                SlotPlacement::Start { node } if node != me => {
                    self.elsewhere_ms.insert(key, now);
                }
                SlotPlacement::Kept { .. } => {
                    self.elsewhere_ms.remove(&key);
                }
                SlotPlacement::Start { .. } | SlotPlacement::Stopping { .. } => {}
            }
        }
    }

    /// Until when a start of the slot on this node waits, if it does.
    fn until(&self, service: &str, slot: &Slot, hold: Duration, now: u64) -> Option<u64> {
        let at = self.elsewhere_ms.get(&(service.to_owned(), slot.clone()))?;
        let until = at + hold.as_millis() as u64;
        (now < until).then_some(until)
    }

    /// Forgets slots long since settled (removed services, scaled-away slots).
    fn prune(&mut self, hold: Duration, now: u64) {
        let keep = hold.as_millis() as u64 * 10;
        self.elsewhere_ms
            .retain(|_, at| now.saturating_sub(*at) < keep);
    }
}

impl Jobs {
    fn watch(&self, id: &str) -> bool {
        self.watched
            .lock()
            .expect("jobs lock")
            .insert(id.to_owned())
    }
    fn unwatch(&self, id: &str) {
        self.watched.lock().expect("jobs lock").remove(id);
    }
    fn claim(&self, id: &str) -> bool {
        self.busy.lock().expect("jobs lock").insert(id.to_owned())
    }
    fn release(&self, id: &str) {
        self.busy.lock().expect("jobs lock").remove(id);
    }
    fn is_busy(&self, id: &str) -> bool {
        self.busy.lock().expect("jobs lock").contains(id)
    }
    /// Waits for a free start slot; the start holds it until its process is up.
    async fn start_slot(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.starts
            .acquire()
            .await
            .expect("the start semaphore is never closed")
    }
}

/// The local name of a service task: its namespace, its process, its endpoint and its DNS
/// name (`web.1.<id>`, as Swarm's task names).
pub fn process_name(t: &Task) -> String {
    format!("{}.{}.{}", t.service, t.slot, t.id)
}

fn new_id() -> String {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("OS randomness");
    b.iter().map(|x| format!("{x:02x}")).collect::<String>()[..12].to_owned()
}

impl Agent {
    /// One pass of [`pass`] with the agent as the runtime.
    pub(crate) async fn orchestrate(self: &Arc<Self>, view: &Arc<View>) -> Option<u64> {
        pass(self, view).await
    }
}

/// One pass over every service (see the module docs); returns when the next restart delay
/// of this node's tasks ends or a held start may go (see [`Holds`]), if one is pending.
pub(super) async fn pass<R: NodeRuntime>(rt: &Arc<R>, view: &Arc<View>) -> Option<u64> {
    if !rt.runs_tasks() {
        return None;
    }
    let me = rt.node_name().to_owned();
    let now = rt.now_ms();

    // Tasks whose process ended (or vanished while the agent was away).
    for t in rt.own_tasks().await.into_values() {
        if rt.jobs().is_busy(&t.id) {
            continue;
        }
        if stop_interrupted(&t) {
            // Its stop was underway when the agent stopped: nothing else would end it now
            // that its record no longer wants it running.
            info!(task = %process_name(&t), "finishing an interrupted stop");
            spawn_stop(rt, t);
            continue;
        }
        if !t.is_live() || t.state < TaskState::Preparing {
            continue;
        }
        let ending = match rt.process(&process_name(&t)).map(|p| p.state) {
            Some(ProcessState::Creating) => continue,
            Some(ProcessState::Running) => {
                let check = view
                    .services
                    .get(&t.service)
                    .and_then(|s| s.spec.task.as_ref())
                    .and_then(|tpl| tpl.health.clone());
                match check {
                    // Its monitor decides when it serves (and carries on after a restart
                    // of the agent).
                    Some(check) => spawn_health(rt, t, check),
                    // Started, but the agent stopped before it said so.
                    None if t.state < TaskState::Running => {
                        let mut t = t;
                        t.state = TaskState::Running;
                        t.since_ms = now;
                        t.running_ms = Some(now);
                        rt.publish_tasks(&[&t]).await;
                    }
                    None => {}
                }
                continue;
            }
            Some(ProcessState::Exited {
                code,
                signal,
                out_of_memory,
            }) => Ending::Exited {
                code,
                signal,
                out_of_memory,
            },
            None => Ending::Exited {
                code: None,
                signal: None,
                out_of_memory: None,
            },
        };
        task_ended(&**rt, view, t, ending).await;
    }

    // A node that just started has only its own (perhaps stale) records until gossip
    // has caught up: deciding from that would start duplicates that beat running tasks.
    if !caught_up(&**rt, view) {
        return Some(now + 200);
    }
    let own = rt.own_tasks().await;
    let nodes = view.planner_nodes();
    let plans = plans_at(view, &nodes, rt.now_ms());
    // New tasks are recorded in one gossip write after the loop, then started: a record
    // per write made every placement of 100 tasks 100 writes, each a new view to compute.
    let mut placed: Vec<Task> = Vec::new();
    let hold = rt.placement_hold();
    let mut held_until: Option<u64> = None;
    for (name, service) in &view.services {
        let Some(plan) = plans.get(name.as_str()) else {
            continue;
        };
        for stop in plan.stops_on(&me) {
            if let Some(t) = own.get(&stop.task).filter(|t| t.is_live()) {
                info!(task = %process_name(t), reason = stop.reason, "stopping task");
                spawn_stop(rt, t.clone());
            }
        }
        prefetch_update_image(&**rt, service, &own);
        for slot in plan.starts_on(&me) {
            let template = service.spec.template_id();
            let has_current = own.values().any(|t| {
                t.service == *name && t.slot == *slot && t.is_live() && t.template == template
            });
            if has_current {
                continue;
            }
            let held = rt
                .jobs()
                .holds
                .lock()
                .expect("jobs lock")
                .until(name, slot, hold, now);
            if let Some(until) = held {
                held_until = Some(held_until.map_or(until, |h| h.min(until)));
                continue;
            }
            let task = Task {
                id: new_id(),
                service: name.clone(),
                slot: slot.clone(),
                node: me.clone(),
                spec_version: service.spec.version,
                template,
                desired: DesiredState::Running,
                state: TaskState::New,
                created_ms: now,
                since_ms: now,
                error: None,
                exit_code: None,
                attempt: 0,
                window_start_ms: now,
                not_before_ms: None,
                holds_slot: false,
                running_ms: None,
                reservation: service.spec.reservation(),
            };
            info!(task = %process_name(&task), "slot placed on this node; starting a task");
            placed.push(task);
        }
        rt.jobs()
            .holds
            .lock()
            .expect("jobs lock")
            .note(&me, name, plan, now);
        if service
            .spec
            .update_status
            .as_ref()
            .is_some_and(|s| s.state.in_progress())
            && mesh_planner::coordinator(name, &nodes) == Some(me.as_str())
        {
            follow_rollout(&**rt, service, plan, view, now).await;
        }
        // Restarts whose delay has passed.
        for s in &plan.slots {
            if let SlotPlacement::Kept { node, task } = &s.placement
                && *node == me
                && let Some(t) = own.get(task)
                && t.is_live()
                && t.state < TaskState::Preparing
                && (t.not_before_ms.is_none_or(|at| at <= now) || secrets_arrived(&**rt, view, t))
            {
                spawn_start(rt, t.clone());
            }
        }
    }

    if !placed.is_empty() {
        rt.publish_tasks(&placed.iter().collect::<Vec<_>>()).await;
        for task in placed {
            spawn_start(rt, task);
        }
    }

    // Tasks of services that are gone, or no longer schedule tasks.
    for t in own.values().filter(|t| t.is_live()) {
        let scheduled = view
            .services
            .get(&t.service)
            .is_some_and(|s| s.spec.task.is_some());
        if !scheduled {
            info!(task = %process_name(t), "its service is gone; stopping it");
            spawn_stop(rt, t.clone());
        }
    }
    prune_history(&**rt, view, &own).await;
    rt.jobs().holds.lock().expect("jobs lock").prune(hold, now);
    own.values()
        .filter(|t| t.is_live() && t.state < TaskState::Preparing)
        .filter_map(|t| t.not_before_ms)
        .chain(held_until)
        .min()
}

/// A task of this node that was being stopped (its record says so) but did not end.
fn stop_interrupted(t: &Task) -> bool {
    t.desired == DesiredState::Shutdown && !t.state.is_terminal()
}

/// A node with tasks of an older template pulls the service's image now, while they still
/// serve: a stop-first update's gap is then its stop and start, not a registry's download.
fn prefetch_update_image<R: NodeRuntime>(
    rt: &R,
    service: &Replicated<ServiceSpec>,
    own: &BTreeMap<String, Task>,
) {
    let Some(image) = super::services::image_of(&service.spec) else {
        return;
    };
    let template = service.spec.template_id();
    let outdated = own
        .values()
        .any(|t| t.service == service.spec.name && t.is_live() && t.template != template);
    if outdated {
        rt.prefetch(image, &service.spec);
    }
}

/// Every scheduled service's plan at the runtime's time (an update's delay is measured
/// against it, and a fake node's clock is not the wall clock), planned together so that
/// services do not both take a node's last room (see `mesh_planner::plan_all`).
pub(super) fn plans_at<'v>(
    view: &'v View,
    nodes: &[mesh_planner::Node],
    now_ms: u64,
) -> BTreeMap<&'v str, mesh_planner::Plan> {
    let services: Vec<mesh_planner::Service> = view
        .services
        .values()
        .filter_map(|s| s.spec.planned())
        .collect();
    let plans = mesh_planner::plan_all(
        &mesh_planner::Cluster {
            nodes,
            tasks: &view.tasks,
            now_ms,
        },
        &services,
    );
    services.iter().map(|s| s.name).zip(plans).collect()
}

/// As the service's coordinator: records the rollout's outcome once the view shows it —
/// the failure action past the failure ratio, or completion.
async fn follow_rollout<R: NodeRuntime>(
    rt: &R,
    service: &Replicated<ServiceSpec>,
    plan: &mesh_planner::Plan,
    view: &View,
    now: u64,
) {
    let spec = &service.spec;
    let Some(status) = &spec.update_status else {
        return;
    };
    let rolling_back = status.state.is_rollback();
    let config = if rolling_back {
        spec.rollback
    } else {
        spec.update
    };
    let progress = mesh_planner::progress(
        plan,
        &view.tasks,
        &spec.name,
        spec.template_id(),
        &config,
        status.started_ms,
        now,
    );
    let mut next = spec.clone();
    if progress.over_ratio(&config) && config.failure_action != FailureAction::Continue {
        let f = &progress.failed[0];
        let what = format!("{} ({}): {}", f.name, f.task, f.error);
        let rollback = (config.failure_action == FailureAction::Rollback && !rolling_back)
            .then(|| {
                rollout::rolled_back(
                    spec,
                    &format!(
                        "update rolled back due to failure or early termination of task {what}"
                    ),
                    now,
                )
            })
            .flatten();
        match rollback {
            Some(back) => {
                next = back;
                next.version = spec.version + 1;
            }
            None => {
                let s = next.update_status.as_mut().expect("checked");
                s.state = if rolling_back {
                    UpdateState::RollbackPaused
                } else {
                    UpdateState::Paused
                };
                s.message = format!(
                    "{} paused due to failure or early termination of task {what}",
                    if rolling_back { "rollback" } else { "update" }
                );
            }
        }
    } else if progress.done {
        let s = next.update_status.as_mut().expect("checked");
        s.state = if rolling_back {
            UpdateState::RollbackCompleted
        } else {
            UpdateState::Completed
        };
        s.completed_ms = Some(now);
        s.message = if rolling_back {
            "rollback completed"
        } else {
            "update completed"
        }
        .into();
    } else {
        return;
    }
    info!(
        service = spec.name,
        state = %next.update_status.as_ref().map_or(String::new(), |s| s.state.to_string()),
        "rollout {}",
        next.update_status.as_ref().map_or("", |s| s.message.as_str())
    );
    let mut record = service.clone();
    record.spec = next;
    rt.record_service(record).await;
}

/// Whether this node's view is complete enough to act on: a second after start, once a
/// peer has been heard from, or after ten seconds alone (every peer may be gone).
fn caught_up<R: NodeRuntime>(rt: &R, view: &View) -> bool {
    let up = rt.uptime();
    let heard_peer = view
        .nodes
        .values()
        .any(|n| n.name != rt.node_name() && n.status == NodeStatus::Ready);
    up >= Duration::from_secs(1)
        && (heard_peer || !rt.expects_peers() || up >= Duration::from_secs(10))
}

/// Records the end of a task and carries out the restart policy.
async fn task_ended<R: NodeRuntime>(rt: &R, view: &View, mut t: Task, ending: Ending) {
    let now = rt.now_ms();
    let (code, signal) = match &ending {
        // Docker's exit code of a task the kernel killed: 128 + SIGKILL.
        Ending::Exited {
            out_of_memory: Some(_),
            code: None,
            signal,
        } => (Some(128 + signal.unwrap_or(libc::SIGKILL)), *signal),
        Ending::Exited { code, signal, .. } => (*code, *signal),
        Ending::Rejected(_) | Ending::Failed(_) => (None, None),
    };
    let failed = code != Some(0);
    t.state = match &ending {
        Ending::Rejected(_) => TaskState::Rejected,
        Ending::Failed(_) => TaskState::Failed,
        _ if failed => TaskState::Failed,
        _ => TaskState::Complete,
    };
    t.exit_code = code;
    t.error = match (ending, code, signal) {
        (Ending::Rejected(why) | Ending::Failed(why), _, _) => Some(why),
        (
            Ending::Exited {
                out_of_memory: Some(limit),
                ..
            },
            _,
            _,
        ) => Some(out_of_memory(limit)),
        (_, Some(0), _) => None,
        (_, Some(c), _) => Some(format!("task: non-zero exit ({c})")),
        (_, None, Some(s)) => Some(format!("task: killed by signal {s}")),
        (_, None, None) => Some("task: its process was gone when the agent started".into()),
    };
    t.since_ms = now;
    t.desired = DesiredState::Shutdown;
    let name = process_name(&t);
    if rt.process(&name).is_some()
        && let Err(e) = rt.forget_process(&name).await
    {
        warn!(task = name, "forgetting an ended task: {e:#}");
    }
    let service = view.services.get(&t.service).map(|s| &s.spec);
    let Some(service) = service.filter(|s| s.task.is_some()) else {
        rt.publish_tasks(&[&t]).await;
        return;
    };
    match mesh_planner::after_exit(&service.restart.for_mode(service.mode), &t, failed, now) {
        AfterExit::Restart {
            attempt,
            window_start_ms,
            not_before_ms,
        } => {
            info!(task = name, code = ?code, signal = ?signal, attempt, "task ended; restarting it");
            let next = Task {
                id: new_id(),
                spec_version: service.version,
                template: service.template_id(),
                desired: DesiredState::Running,
                state: TaskState::Assigned,
                created_ms: now,
                since_ms: now,
                error: None,
                exit_code: None,
                attempt,
                window_start_ms,
                not_before_ms: Some(not_before_ms),
                holds_slot: false,
                running_ms: None,
                // The restart runs the current template: it reserves what that one does.
                reservation: service.reservation(),
                ..t.clone()
            };
            // One write: a view with the failure but not yet its replacement would show an
            // empty slot, and a rollout would move on to the next one.
            rt.publish_tasks(&[&t, &next]).await;
        }
        AfterExit::Hold { why } => {
            info!(task = name, code = ?code, "task ended; the restart policy keeps it down");
            t.holds_slot = true;
            if let Some(why) = why {
                t.error = Some(match t.error.take() {
                    Some(e) => format!("{e}; {why}"),
                    None => why,
                });
            }
            rt.publish_tasks(&[&t]).await;
        }
    }
}

/// What `service ps` says of a task the kernel killed over its memory limit (Docker shows
/// `OOMKilled` and exit 137).
fn out_of_memory(limit: u64) -> String {
    if limit == 0 {
        "task: out of memory".into()
    } else {
        format!(
            "task: out of memory (limit {})",
            mesh_api::spec::bytes_size(limit)
        )
    }
}

fn spawn_start<R: NodeRuntime>(rt: &Arc<R>, task: Task) {
    if !rt.jobs().claim(&task.id) {
        return;
    }
    let rt = rt.clone();
    tokio::spawn(async move {
        let id = task.id.clone();
        start(&*rt, task).await;
        rt.jobs().release(&id);
        rt.poke();
    });
}

/// Preparing (Swarm's state for it): the image is pulled, concurrently with every other
/// task's pull and start — a registry's download takes as long as it takes and must not hold
/// the node's other tasks. Then the start proper, one of [`START_CONCURRENCY`] at a time.
async fn start<R: NodeRuntime>(rt: &R, mut t: Task) {
    // The view the pass placed the task from (recomputing it per start cost every start a
    // merge of the whole gossip state while hundreds of records change).
    let view = rt.view();
    let Some(service) = view.services.get(&t.service).map(|s| s.spec.clone()) else {
        return;
    };
    let Some(template) = service.task.clone() else {
        return;
    };
    if waits_for_secrets(rt, &view, &mut t, &template).await {
        return;
    }
    t.state = TaskState::Preparing;
    t.since_ms = rt.now_ms();
    t.not_before_ms = None;
    rt.publish_tasks(&[&t]).await;
    let name = process_name(&t);
    if let Some(image) = &template.image
        && let Err(why) = rt.pull(image, &service).await
    {
        warn!(task = name, image, "task could not start: {why}");
        task_ended(
            rt,
            &view,
            t,
            Ending::Rejected(format!("pull {image}: {why}")),
        )
        .await;
        return;
    }
    let slot = rt.jobs().start_slot().await;
    // Swarm's templates ({{.Service.Name}}-{{.Task.Slot}}, …) are expanded here, on the node
    // the task starts on; they were checked when the service was created.
    let expanded = match template.expanded(&template_context(&view, &t, &name)) {
        Ok(e) => e,
        Err(e) => {
            warn!(task = name, "task could not start: {e}");
            task_ended(rt, &view, t, Ending::Rejected(e)).await;
            return;
        }
    };
    let hostname = expanded
        .hostname
        .unwrap_or_else(|| default_hostname(&service, &t, template.image.is_some()));
    // What Swarm's templates ({{.Task.Name}}, …) give a task, as plain variables.
    let mut env = vec![
        ("MESH_SERVICE_NAME".to_owned(), service.name.clone()),
        ("MESH_TASK_NAME".to_owned(), name.clone()),
        ("MESH_TASK_SLOT".to_owned(), t.slot.to_string()),
        ("MESH_TASK_ID".to_owned(), t.id.clone()),
        ("MESH_NODE_NAME".to_owned(), t.node.clone()),
    ];
    env.extend(expanded.env);
    // Without a health check, a task that listens on a TCP target port serves once it
    // accepts there: sending it connections before its process has bound the port would
    // fail them (Swarm does, and a rolling update then drops requests).
    let ready_port = service
        .ports
        .iter()
        .find(|p| p.protocol == mesh_api::spec::Protocol::Tcp)
        .map(|p| p.target)
        .filter(|_| template.health.is_none());
    let launched = rt
        .start_process(
            &view,
            TaskStart {
                name: &name,
                networks: service.attachments_names().collect(),
                service: &service.name,
                template: &template,
                env: &env,
                hostname: &hostname,
                publish: template.health.is_none() && ready_port.is_none(),
            },
        )
        .await;
    // Waiting for it to listen, or for its health check, is not a start's work.
    drop(slot);
    match launched {
        Ok(_) if template.health.is_some() => {
            // Not a backend until its health check passes (the monitor publishes it).
            t.state = TaskState::Starting;
            t.since_ms = rt.now_ms();
            rt.publish_tasks(&[&t]).await;
            info!(task = name, "task started; waiting for its health check");
        }
        Ok(started) => {
            if let (Some(port), Some(ip)) = (ready_port, started.ip) {
                t.state = TaskState::Starting;
                t.since_ms = rt.now_ms();
                rt.publish_tasks(&[&t]).await;
                if rt.wait_listening(&name, ip, port, READY_WAIT).await == health::Ready::Gone {
                    // It never served; the next pass records its end.
                    return;
                }
                if let Err(e) = rt
                    .publish_endpoint(&name, &service.network, &service.name, ip)
                    .await
                {
                    warn!(task = name, "publishing the task: {e}");
                }
            }
            let now = rt.now_ms();
            t.state = TaskState::Running;
            t.since_ms = now;
            t.running_ms = Some(now);
            rt.publish_tasks(&[&t]).await;
            info!(task = name, "task running");
        }
        Err(e) => {
            warn!(task = name, "task could not start: {e}");
            // A start that failed is a failure for the restart policy.
            task_ended(rt, &view, t, Ending::Rejected(e)).await;
        }
    }
}

/// How often a task waiting for its copy of a secret looks again (a view change that brings
/// the copy starts it at once, see [`secrets_arrived`]).
const SECRET_RETRY_MS: u64 = 5_000;

/// A task granted a secret that its node has no copy of yet (an admin seals one to the node
/// when the plan places the task, see `secrets`) waits Assigned, saying so, instead of
/// failing into the restart policy. False when it may start.
async fn waits_for_secrets<R: NodeRuntime>(
    rt: &R,
    view: &View,
    t: &mut Task,
    template: &mesh_api::spec::TaskTemplate,
) -> bool {
    let Some(why) = rt.copies_waiting(view, &t.service, template) else {
        if t.error
            .as_deref()
            .is_some_and(super::secrets::is_waiting_message)
        {
            t.error = None;
        }
        return false;
    };
    let now = rt.now_ms();
    if t.error.as_deref() != Some(why.as_str()) {
        info!(task = %process_name(t), "{why}");
    }
    t.state = TaskState::Assigned;
    t.since_ms = now;
    t.error = Some(why);
    t.not_before_ms = Some(now + SECRET_RETRY_MS);
    rt.publish_tasks(&[t]).await;
    true
}

/// Whether a task waiting for a secret's copy can start now: the copy came.
fn secrets_arrived<R: NodeRuntime>(rt: &R, view: &View, t: &Task) -> bool {
    t.error
        .as_deref()
        .is_some_and(super::secrets::is_waiting_message)
        && view
            .services
            .get(&t.service)
            .and_then(|s| s.spec.task.as_ref())
            .is_some_and(|tpl| rt.copies_waiting(view, &t.service, tpl).is_none())
}

/// Watches a started task's health: the first pass makes it a backend (Running), and
/// `retries` failures in a row take it out of every load balancer and end it, for the
/// restart policy to replace. Ends when the task stops being live.
fn spawn_health<R: NodeRuntime>(rt: &Arc<R>, task: Task, check: HealthCheck) {
    if !rt.jobs().watch(&task.id) {
        return;
    }
    let rt = rt.clone();
    tokio::spawn(async move {
        let id = task.id.clone();
        watch_health(&*rt, task, check).await;
        rt.jobs().unwatch(&id);
        rt.poke();
    });
}

async fn watch_health<R: NodeRuntime>(rt: &R, task: Task, check: HealthCheck) {
    let name = process_name(&task);
    if !rt.runs_tasks() {
        return;
    }
    let Some(ip) = rt.process(&name).and_then(|p| p.ip) else {
        return;
    };
    let started = tokio::time::Instant::now();
    let mut healthy = task.state == TaskState::Running;
    let mut failures = 0u32;
    // The first probe soon after the start, so a healthy task serves without waiting a
    // whole interval.
    let mut wait = Duration::from_millis(check.interval_ms.min(250));
    loop {
        tokio::time::sleep(wait).await;
        wait = Duration::from_millis(check.interval_ms);
        let Some(mut t) = rt.own_tasks().await.remove(&task.id) else {
            return;
        };
        if !t.is_live() || rt.jobs().is_busy(&t.id) {
            return;
        }
        match rt.probe(&name, ip, &check).await {
            Ok(()) => {
                failures = 0;
                if !healthy {
                    healthy = true;
                    let Some(service) = rt.view().services.get(&t.service).cloned() else {
                        return;
                    };
                    if let Err(e) = rt
                        .publish_endpoint(&name, &service.spec.network, &t.service, ip)
                        .await
                    {
                        warn!(task = name, "publishing a healthy task: {e}");
                        continue;
                    }
                    let now = rt.now_ms();
                    t.state = TaskState::Running;
                    t.since_ms = now;
                    t.running_ms = Some(now);
                    rt.publish_tasks(&[&t]).await;
                    info!(task = name, "task healthy; serving");
                    rt.poke();
                }
            }
            Err(last_error) => {
                let grace = started.elapsed() < Duration::from_millis(check.start_period_ms);
                if grace && !healthy {
                    continue;
                }
                failures += 1;
                if failures < check.retries {
                    continue;
                }
                warn!(
                    task = name,
                    error = last_error,
                    "task unhealthy; replacing it"
                );
                if !rt.jobs().claim(&t.id) {
                    return;
                }
                // Out of every load balancer before its process is touched.
                let removal = rt.leave_load_balancers(&name).await;
                if healthy {
                    drain::wait_drained(rt, &name, removal).await;
                }
                let view = rt.view();
                let reason = format!(
                    "task: unhealthy after {} failed check{} ({}): {last_error}",
                    check.retries,
                    if check.retries == 1 { "" } else { "s" },
                    check.probe
                );
                task_ended(rt, &view, t, Ending::Failed(reason)).await;
                rt.forget_endpoint(&name).await;
                rt.jobs().release(&task.id);
                return;
            }
        }
    }
}

fn spawn_stop<R: NodeRuntime>(rt: &Arc<R>, task: Task) {
    if !rt.jobs().claim(&task.id) {
        return;
    }
    let rt = rt.clone();
    tokio::spawn(async move {
        let id = task.id.clone();
        stop(&*rt, task).await;
        rt.jobs().release(&id);
        rt.poke();
    });
}

/// Out of every load balancer first, then the process is asked to stop: connections
/// already established finish within the stop grace period.
async fn stop<R: NodeRuntime>(rt: &R, mut t: Task) {
    let was_serving = t.state == TaskState::Running;
    t.desired = DesiredState::Shutdown;
    rt.publish_tasks(&[&t]).await;
    let name = process_name(&t);
    let removal = rt.leave_load_balancers(&name).await;
    rt.stop_dns(&name).await;
    if was_serving {
        drain::wait_drained(rt, &name, removal).await;
    }
    let grace = rt
        .view()
        .services
        .get(&t.service)
        .and_then(|s| s.spec.task.as_ref())
        .map_or(Duration::from_secs(10), |tpl| {
            Duration::from_millis(tpl.stop_grace_ms)
        });
    if rt.process(&name).is_some()
        && let Err(e) = rt.stop_process(&name, grace).await
    {
        warn!(task = name, "stopping task: {e:#}");
    }
    rt.forget_endpoint(&name).await;
    if !t.state.is_terminal() {
        t.state = TaskState::Shutdown;
        t.since_ms = rt.now_ms();
    }
    rt.publish_tasks(&[&t]).await;
    info!(task = name, "task stopped");
}

/// Keeps the newest few finished tasks per slot; forgets those of services that are gone.
async fn prune_history<R: NodeRuntime>(rt: &R, view: &View, own: &BTreeMap<String, Task>) {
    let mut by_slot: BTreeMap<(&str, &Slot), Vec<&Task>> = BTreeMap::new();
    for t in own.values() {
        by_slot.entry((&t.service, &t.slot)).or_default().push(t);
    }
    let mut gone = Vec::new();
    for ((service, _), mut tasks) in by_slot {
        let exists = view.services.contains_key(service);
        tasks.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
        for (i, t) in tasks.iter().enumerate() {
            let old = i >= HISTORY_PER_SLOT || !exists;
            if old && !t.is_live() && !rt.jobs().is_busy(&t.id) {
                gone.push(t.id.clone());
            }
        }
    }
    if !gone.is_empty() {
        rt.forget_tasks(gone).await;
    }
}

/// What a template may name for task `t` (named `name` on its node).
fn template_context(view: &View, t: &Task, name: &str) -> mesh_api::spec::template::Context {
    let service = view.services.get(&t.service);
    let node = view.nodes.get(&t.node).and_then(|n| n.record.as_ref());
    mesh_api::spec::template::Context {
        service_id: service
            .map(|s| mesh_api::id::short_id(&t.service, &s.created))
            .unwrap_or_default(),
        service_name: t.service.clone(),
        service_labels: service.map(|s| s.spec.labels.clone()).unwrap_or_default(),
        node_id: mesh_api::id::node_id(&t.node),
        // Swarm's .Node.Hostname is the host's name; test clusters share one host, so a
        // node without a record (or a hostname) is named by its node name.
        node_hostname: node
            .map(|r| r.hostname.clone())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| t.node.clone()),
        node_os: node.map(|r| r.platform.os.clone()).unwrap_or_default(),
        node_arch: node.map(|r| r.platform.arch.clone()).unwrap_or_default(),
        task_id: t.id.clone(),
        task_name: name.to_owned(),
        task_slot: t.slot.to_string(),
    }
}

/// `web.1` (or `web.<node>`), cut to what a hostname may hold. Containers get `web-1`:
/// resolvers that derive a search domain from a dotted hostname (busybox's, used by many
/// small images) would look up `web.1` for `web` and stop at its NXDOMAIN.
fn default_hostname(service: &ServiceSpec, t: &Task, container: bool) -> String {
    let sep = if container { '-' } else { '.' };
    let mut h: String = format!("{}{sep}{}", service.name, t.slot)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    h.truncate(63);
    h
}

#[cfg(test)]
mod tests;
