//! Jobs (Swarm 20.10's `replicated-job` and `global-job`): services whose tasks run to
//! completion instead of being kept running, planned the same way on every node.
//!
//! The rules:
//! - A slot is done once a task of the current template completed in it (exited 0), on any
//!   node, ready or not: a completion is a fact that a node going down or being drained does
//!   not undo. A done slot keeps its completed task and never starts again, and its other
//!   copies (diverging views started two) stop.
//! - A replicated job has slots 1..=completions. A slot is active while it has a live task,
//!   or holds a failed one the restart policy gave up on (Swarm counts those as running: the
//!   slot never completes and keeps its turn). While fewer than `max_concurrent` slots are
//!   active, the lowest slots that are neither done nor active start; the others wait, and
//!   are not in the plan until their turn (Swarm creates their tasks only then).
//! - A global job has a slot for every eligible node (a node that joins later gets one), and
//!   keeps the done slots of nodes that no longer are; all of them run at once.
//! - A job runs again when its template changes (the agent changes it on every update of a
//!   job, as Swarm starts a new job iteration on every update): tasks of another template
//!   stop at once — a job has no rolling update — and the old run's completions no longer
//!   count.
//! - A failed task is restarted by its node, by the restart policy, in the same slot (see
//!   [`crate::restart`]; for a job `any` acts as `on-failure`).

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    index::Index,
    plan::{
        Cluster, Eligible, Placer, Plan, Room, Service, SlotPlacement, SlotPlan, Stop, Tied, Usage,
        describe_unfit, no_suitable_node, retire,
    },
    spec::{Node, ServiceMode},
    task::{Slot, Task, TaskState},
};

pub(crate) fn plan(cluster: &Cluster, index: &Index, service: &Service, usage: &mut Usage) -> Plan {
    let eligible = Eligible::of(index, service);
    let ready = |node: &str| index.ready(node);
    // Unlike services, a job's next slot is placed without looking at the other services'
    // tasks: that load is what views disagree on most (every task start and end moves it),
    // and a node that saw slot 1 complete must pick the same node for slot 2 as the node
    // that did, or both start it — a job task running twice at once. With the job's own
    // tasks and the hash alone, nodes that agree on the job agree on the node.
    let load: &[usize] = &[];
    // Reservations are a hard limit all the same: what every node's tasks reserve.
    let room = Room {
        nodes: &index.nodes,
        want: service.reservation,
    };
    let mine: &[&Task] = index.tasks_of(service.name);
    let current = |t: &Task| t.template == service.template;
    // A global slot is only ever filled on its own node.
    let own_slot = |t: &Task| !matches!(&t.slot, Slot::Node(n) if *n != t.node);

    let mut done: BTreeMap<&Slot, &Task> = BTreeMap::new();
    for t in mine
        .iter()
        .filter(|t| t.state == TaskState::Complete && current(t) && own_slot(t))
    {
        let e = done.entry(&t.slot).or_insert(t);
        if (t.created_ms, &t.id) > (e.created_ms, &e.id) {
            *e = t;
        }
    }

    let (wanted, max_concurrent): (Vec<Slot>, usize) = match service.mode {
        ServiceMode::ReplicatedJob {
            completions,
            max_concurrent,
        } => (
            (1..=completions).map(Slot::Replica).collect(),
            max_concurrent as usize,
        ),
        _ => {
            let mut slots: BTreeSet<Slot> = eligible
                .0
                .iter()
                .map(|&i| Slot::Node(index.names[i].to_owned()))
                .collect();
            slots.extend(done.keys().map(|s| (*s).clone()));
            (slots.into_iter().collect(), usize::MAX)
        }
    };
    let wanted_set: BTreeSet<&Slot> = wanted.iter().collect();

    let mut stops: Vec<Stop> = Vec::new();
    let mut live: BTreeMap<&Slot, Vec<&Task>> = BTreeMap::new();
    for t in mine.iter().filter(|t| t.is_live() && ready(&t.node)) {
        let reason = if !current(t) {
            Some("the job runs again (its spec changed): the previous run's tasks stop".into())
        } else if let Some(d) = done.get(&t.slot).filter(|_| own_slot(t)) {
            Some(format!(
                "slot {} already completed (task {} on node {})",
                t.slot, d.id, d.node
            ))
        } else if !own_slot(t) {
            Some(format!("slot {} belongs to another node", t.slot))
        } else if !eligible.contains(index, &t.node) {
            Some(match index.node(&t.node) {
                Some(node) => format!(
                    "node {} is no longer eligible: {}",
                    t.node,
                    describe_unfit(node, service)
                ),
                None => format!("node {} is not in the cluster", t.node),
            })
        } else if !wanted_set.contains(&t.slot) {
            Some(format!(
                "slot {} is above the job's {} completions",
                t.slot,
                wanted.len()
            ))
        } else {
            None
        };
        match reason {
            Some(reason) => stops.push(Stop {
                task: t.id.clone(),
                node: t.node.clone(),
                reason,
            }),
            None => live.entry(&t.slot).or_default().push(t),
        }
    }
    // Failed tasks the restart policy will not replace: their slot keeps its turn.
    let mut held: BTreeMap<&Slot, &Task> = BTreeMap::new();
    for t in mine.iter().filter(|t| {
        t.holds_slot
            && t.state.is_terminal()
            && t.state != TaskState::Complete
            && current(t)
            && own_slot(t)
            && ready(&t.node)
            && wanted_set.contains(&t.slot)
    }) {
        let e = held.entry(&t.slot).or_insert(t);
        if (t.created_ms, &t.id) > (e.created_ms, &e.id) {
            *e = t;
        }
    }

    let limit = service
        .placement
        .max_replicas_per_node
        .filter(|&m| m > 0)
        .map(|m| m as usize);
    let mut count: Vec<usize> = vec![0; index.nodes.len()];
    // A kept task's node takes one more of the job's tasks.
    let occupy = |count: &mut Vec<usize>, node: &str| {
        if let Some(i) = index.position(node) {
            count[i] += 1;
        }
    };
    let mut active = 0usize;
    let mut placed: BTreeMap<&Slot, SlotPlacement> = BTreeMap::new();
    let mut waiting: Vec<&Slot> = Vec::new();
    for slot in &wanted {
        let kept = |t: &Task| SlotPlacement::Kept {
            node: t.node.clone(),
            task: t.id.clone(),
        };
        if let Some(d) = done.get(slot) {
            placed.insert(slot, kept(d));
        } else if let Some(mut tasks) = live.remove(slot) {
            // As `plan` ranks duplicates: the running one, then the newest.
            tasks.sort_by(|a, b| {
                let key = |t: &Task| {
                    (
                        t.state != TaskState::Running,
                        std::cmp::Reverse(t.created_ms),
                        t.node.clone(),
                        t.id.clone(),
                    )
                };
                key(a).cmp(&key(b))
            });
            let w = tasks[0];
            retire(&mut stops, w, &tasks, slot);
            occupy(&mut count, &w.node);
            active += 1;
            placed.insert(slot, kept(w));
        } else if let Some(h) = held.get(slot) {
            occupy(&mut count, &h.node);
            active += 1;
            placed.insert(slot, kept(h));
        } else {
            waiting.push(slot);
        }
    }
    let mut tied = Tied::default();
    for slot in waiting {
        if active >= max_concurrent {
            break;
        }
        active += 1;
        let choice = match slot {
            Slot::Node(n) => eligible
                .get(index, n)
                .filter(|&i| room.fits(&usage.used, i)),
            Slot::Replica(_) => Placer {
                index,
                eligible: &eligible,
                count: &count,
                load,
                limit,
                service,
                room: &room,
                usage: &*usage,
            }
            .pick(slot, &mut tied),
        };
        let placement = match choice {
            Some(i) => {
                count[i] += 1;
                usage.add(i, service.reservation);
                tied.taken(i);
                SlotPlacement::Start {
                    node: index.names[i].to_owned(),
                }
            }
            None => {
                let candidates: Vec<&Node> = match slot {
                    Slot::Node(n) => index.node(n).into_iter().collect(),
                    Slot::Replica(_) => cluster.nodes.iter().collect(),
                };
                SlotPlacement::Pending {
                    reason: no_suitable_node(
                        index,
                        &candidates,
                        service,
                        limit,
                        &count,
                        &room,
                        &usage.used,
                    ),
                }
            }
        };
        placed.insert(slot, placement);
    }

    let slots = wanted
        .iter()
        .filter_map(|slot| {
            placed.remove(slot).map(|placement| SlotPlan {
                slot: slot.clone(),
                placement,
            })
        })
        .collect();
    stops.sort_by(|a, b| (&a.node, &a.task).cmp(&(&b.node, &b.task)));
    Plan { slots, stops }
}

/// How far a job has come, as Docker's `service ls` shows it: `running/desired
/// (completed/total completed)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobProgress {
    /// Slots whose task is running.
    pub running: usize,
    /// Swarm's DesiredTasks: a replicated job's `max_concurrent`; for a global job the slots
    /// that have not completed yet.
    pub desired: usize,
    pub completed: usize,
    /// Completions the run needs: a replicated job's `completions`; for a global job its
    /// slots (desired + completed).
    pub total: usize,
}

/// The progress of a job's current run from its plan; None for a service that is no job.
pub fn progress(mode: ServiceMode, plan: &Plan, tasks: &[Task]) -> Option<JobProgress> {
    let state = |id: &str| tasks.iter().find(|t| t.id == id).map(|t| t.state);
    let kept_in = |want: TaskState| {
        plan.slots
            .iter()
            .filter(|s| match &s.placement {
                SlotPlacement::Kept { task, .. } => state(task) == Some(want),
                _ => false,
            })
            .count()
    };
    let (running, completed) = (kept_in(TaskState::Running), kept_in(TaskState::Complete));
    match mode {
        ServiceMode::ReplicatedJob {
            completions,
            max_concurrent,
        } => Some(JobProgress {
            running,
            desired: max_concurrent as usize,
            completed,
            total: completions as usize,
        }),
        ServiceMode::GlobalJob => {
            let desired = plan.slots.len() - completed;
            Some(JobProgress {
                running,
                desired,
                completed,
                total: desired + completed,
            })
        }
        ServiceMode::Replicated { .. } | ServiceMode::Global => None,
    }
}
