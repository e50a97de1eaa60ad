//! This node's part of every service's plan.
//!
//! There is no manager: every node computes the same plan from the view it has
//! (`mesh_planner::plan`) and carries out only what concerns itself — it starts the tasks the
//! plan puts on it, stops its own tasks the plan stops, and restarts its own tasks by the
//! service's restart policy. Each task is a `tsk:<id>` record this node alone writes, with
//! Swarm's states; other nodes read it to know a slot is taken. Diverging views (a gossip
//! round, a partition) can make two nodes fill one slot; once views agree the plan ranks the
//! copies the same way everywhere and the loser's node stops it.
//!
//! A pass is cheap and idempotent, run after every kernel convergence: it diffs the plan
//! against this node's task records and starts a job per change. Jobs (start, stop) run in
//! the background, one per task at a time, so a slow stop (the grace period) never holds up
//! the loop.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use mesh_planner::{AfterExit, DesiredState, FailureAction, Slot, SlotPlacement, Task, TaskState};
use tracing::{info, warn};

use super::{Agent, health, rollout, tasks::Launch};
use crate::{
    cluster::{Clock, Replicated, View, key},
    task::ProcessState,
};
use mesh_api::spec::{HealthCheck, ServiceSpec, UpdateState};

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
    },
    /// It could not be started, and why.
    Rejected(String),
    /// It ran but was ended for a reason other than its exit (failed health checks).
    Failed(String),
}

/// Task IDs with a start or stop underway on this node, and those whose health is watched.
#[derive(Default)]
pub(crate) struct Jobs {
    busy: std::sync::Mutex<BTreeSet<String>>,
    watched: std::sync::Mutex<BTreeSet<String>>,
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
    /// This node's service tasks as it publishes them.
    pub(crate) async fn own_tasks(&self) -> BTreeMap<String, Task> {
        self.gossip
            .own_keys()
            .await
            .into_iter()
            .filter(|(k, _)| k.starts_with(key::TASK))
            .filter_map(|(_, v)| serde_json::from_str::<Task>(&v).ok())
            .map(|t| (t.id.clone(), t))
            .collect()
    }

    async fn publish_task(&self, t: &Task) {
        self.publish_tasks(&[t]).await;
    }

    async fn publish_tasks(&self, tasks: &[&Task]) {
        let mut writes = Vec::new();
        for t in tasks {
            match serde_json::to_string(t) {
                Ok(json) => writes.push((format!("{}{}", key::TASK, t.id), Some(json))),
                Err(e) => warn!(task = t.id, "cannot encode task record: {e}"),
            }
        }
        self.gossip.write(writes).await;
    }

    /// One pass over every service (see the module docs); returns when the next restart
    /// delay of this node's tasks ends, if one is pending.
    pub(crate) async fn orchestrate(self: &Arc<Self>, view: &Arc<View>) -> Option<u64> {
        let local = self.local()?;
        let me = self.node_name().to_owned();
        let now = Clock::now_ms();

        // Tasks whose process ended (or vanished while the agent was away).
        for t in self.own_tasks().await.into_values() {
            if !t.is_live() || t.state < TaskState::Preparing || self.jobs.is_busy(&t.id) {
                continue;
            }
            let ending = match local.tasks.get(&process_name(&t)).map(|r| r.state) {
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
                        Some(check) => self.spawn_health(t, check),
                        // Started, but the agent stopped before it said so.
                        None if t.state < TaskState::Running => {
                            let mut t = t;
                            t.state = TaskState::Running;
                            t.since_ms = now;
                            t.running_ms = Some(now);
                            self.publish_task(&t).await;
                        }
                        None => {}
                    }
                    continue;
                }
                Some(ProcessState::Exited { code, signal }) => Ending::Exited { code, signal },
                None => Ending::Exited {
                    code: None,
                    signal: None,
                },
            };
            self.task_ended(view, t, ending).await;
        }

        // A node that just started has only its own (perhaps stale) records until gossip
        // has caught up: deciding from that would start duplicates that beat running tasks.
        if !self.caught_up(view) {
            return Some(now + 200);
        }
        let own = self.own_tasks().await;
        let nodes = view.planner_nodes();
        for (name, service) in &view.services {
            let Some(plan) = view.plan_with(&nodes, name) else {
                continue;
            };
            for stop in plan.stops_on(&me) {
                if let Some(t) = own.get(&stop.task).filter(|t| t.is_live()) {
                    info!(task = %process_name(t), reason = stop.reason, "stopping task");
                    self.spawn_stop(t.clone());
                }
            }
            for slot in plan.starts_on(&me) {
                let template = service.spec.template_id();
                let has_current = own.values().any(|t| {
                    t.service == *name && t.slot == *slot && t.is_live() && t.template == template
                });
                if has_current {
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
                };
                info!(task = %process_name(&task), "slot placed on this node; starting a task");
                self.publish_task(&task).await;
                self.spawn_start(task);
            }
            if service
                .spec
                .update_status
                .as_ref()
                .is_some_and(|s| s.state.in_progress())
                && mesh_planner::coordinator(name, &nodes) == Some(me.as_str())
            {
                self.follow_rollout(service, &plan, view, now).await;
            }
            // Restarts whose delay has passed.
            for s in &plan.slots {
                if let SlotPlacement::Kept { node, task } = &s.placement
                    && *node == me
                    && let Some(t) = own.get(task)
                    && t.is_live()
                    && t.state < TaskState::Preparing
                    && t.not_before_ms.is_none_or(|at| at <= now)
                {
                    self.spawn_start(t.clone());
                }
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
                self.spawn_stop(t.clone());
            }
        }
        self.prune_history(view, &own).await;
        own.values()
            .filter(|t| t.is_live() && t.state < TaskState::Preparing)
            .filter_map(|t| t.not_before_ms)
            .min()
    }

    /// As the service's coordinator: records the rollout's outcome once the view shows it —
    /// the failure action past the failure ratio, or completion.
    async fn follow_rollout(
        &self,
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
        record.updated = self.tick();
        if let Err(e) = self.write_object(key::SERVICE, &spec.name, &record).await {
            warn!(service = spec.name, "recording the rollout: {e}");
        }
    }

    /// Whether this node's view is complete enough to act on: a second after start, once a
    /// peer has been heard from, or after ten seconds alone (every peer may be gone).
    fn caught_up(&self, view: &View) -> bool {
        let up = self.started.elapsed();
        let heard_peer = view
            .nodes
            .values()
            .any(|n| n.name != self.node_name() && n.status == mesh_api::spec::NodeStatus::Ready);
        up >= Duration::from_secs(1)
            && (heard_peer || self.config.config.join.is_empty() || up >= Duration::from_secs(10))
    }

    /// Records the end of a task and carries out the restart policy.
    async fn task_ended(&self, view: &View, mut t: Task, ending: Ending) {
        let now = Clock::now_ms();
        let (code, signal) = match &ending {
            Ending::Exited { code, signal } => (*code, *signal),
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
            (_, Some(0), _) => None,
            (_, Some(c), _) => Some(format!("task: non-zero exit ({c})")),
            (_, None, Some(s)) => Some(format!("task: killed by signal {s}")),
            (_, None, None) => Some("task: its process was gone when the agent started".into()),
        };
        t.since_ms = now;
        t.desired = DesiredState::Shutdown;
        let name = process_name(&t);
        if let Some(local) = self.local()
            && local.tasks.get(&name).is_some()
            && let Err(e) = local.tasks.stop(&name).await
        {
            warn!(task = name, "forgetting an ended task: {e:#}");
        }
        let service = view.services.get(&t.service).map(|s| &s.spec);
        let Some(service) = service.filter(|s| s.task.is_some()) else {
            self.publish_task(&t).await;
            return;
        };
        match mesh_planner::after_exit(&service.restart, &t, failed, now) {
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
                    ..t.clone()
                };
                // One write: a view with the failure but not yet its replacement would show an
                // empty slot, and a rollout would move on to the next one.
                self.publish_tasks(&[&t, &next]).await;
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
                self.publish_task(&t).await;
            }
        }
    }

    fn spawn_start(self: &Arc<Self>, task: Task) {
        if !self.jobs.claim(&task.id) {
            return;
        }
        let agent = self.clone();
        tokio::spawn(async move {
            let id = task.id.clone();
            agent.start(task).await;
            agent.jobs.release(&id);
            agent.poke();
        });
    }

    async fn start(&self, mut t: Task) {
        let view = self.refresh().await;
        let Some(service) = view.services.get(&t.service).map(|s| s.spec.clone()) else {
            return;
        };
        let Some(template) = service.task.clone() else {
            return;
        };
        t.state = TaskState::Preparing;
        t.since_ms = Clock::now_ms();
        t.not_before_ms = None;
        self.publish_task(&t).await;
        let name = process_name(&t);
        let hostname = template
            .hostname
            .clone()
            .unwrap_or_else(|| default_hostname(&service, &t, template.image.is_some()));
        // What Swarm's templates ({{.Task.Name}}, …) give a task, as plain variables.
        let mut env = vec![
            ("MESH_SERVICE_NAME".to_owned(), service.name.clone()),
            ("MESH_TASK_NAME".to_owned(), name.clone()),
            ("MESH_TASK_SLOT".to_owned(), t.slot.to_string()),
            ("MESH_TASK_ID".to_owned(), t.id.clone()),
            ("MESH_NODE_NAME".to_owned(), t.node.clone()),
        ];
        env.extend(template.env.iter().cloned());
        // Without a health check, a task that listens on a TCP target port serves once it
        // accepts there: sending it connections before its process has bound the port would
        // fail them (Swarm does, and a rolling update then drops requests).
        let ready_port = service
            .ports
            .iter()
            .find(|p| p.protocol == mesh_api::spec::Protocol::Tcp)
            .map(|p| p.target)
            .filter(|_| template.health.is_none());
        // Opened here, for this start only: the bytes go to the task's tmpfs and nowhere else.
        let files = match self.task_files(&view, &template) {
            Ok(f) => f,
            Err(e) => {
                warn!(task = name, "task could not start: {e}");
                self.task_ended(&view, t, Ending::Rejected(e.to_string()))
                    .await;
                return;
            }
        };
        let launched = self
            .launch(
                &view,
                Launch {
                    name: &name,
                    network: &service.network,
                    service: Some(&service.name),
                    command: &template.command,
                    env: &env,
                    hostname: Some(&hostname),
                    publish: template.health.is_none() && ready_port.is_none(),
                    image: template.image.as_deref(),
                    files,
                },
            )
            .await;
        match launched {
            Ok(_) if template.health.is_some() => {
                // Not a backend until its health check passes (the monitor publishes it).
                t.state = TaskState::Starting;
                t.since_ms = Clock::now_ms();
                self.publish_task(&t).await;
                info!(task = name, "task started; waiting for its health check");
            }
            Ok(record) => {
                if let (Some(port), Some(ip)) = (
                    ready_port,
                    record.interfaces.first().map(|i| i.address.addr()),
                ) {
                    t.state = TaskState::Starting;
                    t.since_ms = Clock::now_ms();
                    self.publish_task(&t).await;
                    let local = self.local().expect("a launched task has a node");
                    if health::wait_listening(local, &name, ip, port, READY_WAIT).await
                        == health::Ready::Gone
                    {
                        // It never served; the next pass records its end.
                        return;
                    }
                    if let Err(e) = self
                        .publish_endpoint(&name, &service.network, Some(&service.name), ip)
                        .await
                    {
                        warn!(task = name, "publishing the task: {e}");
                    }
                }
                let now = Clock::now_ms();
                t.state = TaskState::Running;
                t.since_ms = now;
                t.running_ms = Some(now);
                self.publish_task(&t).await;
                info!(task = name, "task running");
            }
            Err(e) => {
                warn!(task = name, "task could not start: {e}");
                // A start that failed is a failure for the restart policy.
                self.task_ended(&view, t, Ending::Rejected(e.to_string()))
                    .await;
            }
        }
    }

    /// Watches a started task's health: the first pass makes it a backend (Running), and
    /// `retries` failures in a row take it out of every load balancer and end it, for the
    /// restart policy to replace. Ends when the task stops being live.
    fn spawn_health(self: &Arc<Self>, task: Task, check: HealthCheck) {
        if !self.jobs.watch(&task.id) {
            return;
        }
        let agent = self.clone();
        tokio::spawn(async move {
            let id = task.id.clone();
            agent.watch_health(task, check).await;
            agent.jobs.unwatch(&id);
            agent.poke();
        });
    }

    async fn watch_health(&self, task: Task, check: HealthCheck) {
        let name = process_name(&task);
        let Some(local) = self.local() else {
            return;
        };
        let Some(ip) = local
            .tasks
            .get(&name)
            .and_then(|r| r.interfaces.first().map(|i| i.address.addr()))
        else {
            return;
        };
        let started = std::time::Instant::now();
        let mut healthy = task.state == TaskState::Running;
        let mut failures = 0u32;
        // The first probe soon after the start, so a healthy task serves without waiting a
        // whole interval.
        let mut wait = Duration::from_millis(check.interval_ms.min(250));
        loop {
            tokio::time::sleep(wait).await;
            wait = Duration::from_millis(check.interval_ms);
            let Some(mut t) = self.own_tasks().await.remove(&task.id) else {
                return;
            };
            if !t.is_live() || self.jobs.is_busy(&t.id) {
                return;
            }
            match health::probe(local, &name, ip, &check).await {
                Ok(()) => {
                    failures = 0;
                    if !healthy {
                        healthy = true;
                        let Some(service) = self.view().services.get(&t.service).cloned() else {
                            return;
                        };
                        if let Err(e) = self
                            .publish_endpoint(&name, &service.spec.network, Some(&t.service), ip)
                            .await
                        {
                            warn!(task = name, "publishing a healthy task: {e}");
                            continue;
                        }
                        let now = Clock::now_ms();
                        t.state = TaskState::Running;
                        t.since_ms = now;
                        t.running_ms = Some(now);
                        self.publish_task(&t).await;
                        info!(task = name, "task healthy; serving");
                        self.poke();
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
                    if !self.jobs.claim(&t.id) {
                        return;
                    }
                    // Out of every load balancer before its process is touched.
                    let removal = self.leave_load_balancers(&name).await;
                    if healthy {
                        self.drained(&name, removal).await;
                    }
                    let view = self.view();
                    let reason = format!(
                        "task: unhealthy after {} failed check{} ({}): {last_error}",
                        check.retries,
                        if check.retries == 1 { "" } else { "s" },
                        check.probe
                    );
                    self.task_ended(&view, t, Ending::Failed(reason)).await;
                    self.forget_endpoint(&name).await;
                    self.jobs.release(&task.id);
                    return;
                }
            }
        }
    }

    fn spawn_stop(self: &Arc<Self>, task: Task) {
        if !self.jobs.claim(&task.id) {
            return;
        }
        let agent = self.clone();
        tokio::spawn(async move {
            let id = task.id.clone();
            agent.stop(task).await;
            agent.jobs.release(&id);
            agent.poke();
        });
    }

    /// Out of every load balancer first, then the process is asked to stop: connections
    /// already established finish within the stop grace period.
    async fn stop(&self, mut t: Task) {
        let was_serving = t.state == TaskState::Running;
        t.desired = DesiredState::Shutdown;
        self.publish_task(&t).await;
        let name = process_name(&t);
        let removal = self.leave_load_balancers(&name).await;
        self.stop_dns_for(&name).await;
        if was_serving {
            self.drained(&name, removal).await;
        }
        let grace = self
            .view()
            .services
            .get(&t.service)
            .and_then(|s| s.spec.task.as_ref())
            .map_or(Duration::from_secs(10), |tpl| {
                Duration::from_millis(tpl.stop_grace_ms)
            });
        if let Some(local) = self.local()
            && local.tasks.get(&name).is_some()
            && let Err(e) = local.tasks.stop_within(&name, grace).await
        {
            warn!(task = name, "stopping task: {e:#}");
        }
        self.forget_endpoint(&name).await;
        if !t.state.is_terminal() {
            t.state = TaskState::Shutdown;
            t.since_ms = Clock::now_ms();
        }
        self.publish_task(&t).await;
        info!(task = name, "task stopped");
    }

    /// Keeps the newest few finished tasks per slot; forgets those of services that are gone.
    async fn prune_history(&self, view: &View, own: &BTreeMap<String, Task>) {
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
                if old && !t.is_live() && !self.jobs.is_busy(&t.id) {
                    gone.push((format!("{}{}", key::TASK, t.id), None));
                }
            }
        }
        if !gone.is_empty() {
            self.gossip.write(gone).await;
        }
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
