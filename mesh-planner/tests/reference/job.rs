//! job.rs at 2c14c36 (see plan.rs).
#![allow(clippy::all)]

use std::collections::{BTreeMap, BTreeSet};

use mesh_planner::{
    Cluster, Node, Plan, Resources, Service, ServiceMode, Slot, SlotPlacement, SlotPlan, Stop,
    Task, TaskState,
};

use super::plan::{Room, describe_unfit, no_suitable_node, nodes_for, pick, reserved_with, retire};

pub fn plan(cluster: &Cluster, service: &Service, starting: &BTreeMap<String, Resources>) -> Plan {
    let (nodes, eligible) = nodes_for(cluster, service);
    let ready = |node: &str| nodes.get(node).is_some_and(|n| n.ready);
    // Unlike services, a job's next slot is placed without looking at the other services'
    // tasks: that load is what views disagree on most (every task start and end moves it),
    // and a node that saw slot 1 complete must pick the same node for slot 2 as the node
    // that did, or both start it — a job task running twice at once. With the job's own
    // tasks and the hash alone, nodes that agree on the job agree on the node.
    let load: BTreeMap<&str, usize> = BTreeMap::new();
    // Reservations are a hard limit all the same: what every node's tasks reserve.
    let mut used = reserved_with(cluster, starting);
    let room = Room {
        nodes: &nodes,
        want: service.reservation,
    };
    let mine: Vec<&Task> = cluster
        .tasks
        .iter()
        .filter(|t| t.service == service.name)
        .collect();
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
            let mut slots: BTreeSet<Slot> =
                eligible.iter().map(|n| Slot::Node(n.to_string())).collect();
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
        } else if !eligible.contains(t.node.as_str()) {
            Some(match nodes.get(t.node.as_str()) {
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
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
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
            *count.entry(w.node.as_str()).or_default() += 1;
            active += 1;
            placed.insert(slot, kept(w));
        } else if let Some(h) = held.get(slot) {
            *count.entry(h.node.as_str()).or_default() += 1;
            active += 1;
            placed.insert(slot, kept(h));
        } else {
            waiting.push(slot);
        }
    }
    for slot in waiting {
        if active >= max_concurrent {
            break;
        }
        active += 1;
        let choice = match slot {
            Slot::Node(n) => eligible
                .get(n.as_str())
                .copied()
                .filter(|n| room.fits(&used, n)),
            Slot::Replica(_) => pick(
                &eligible, &nodes, &count, &load, limit, service, slot, &room, &used,
            ),
        };
        let placement = match choice {
            Some(node) => {
                *count.entry(node).or_default() += 1;
                let u = used.entry(node).or_default();
                *u = u.saturating_add(service.reservation);
                SlotPlacement::Start {
                    node: node.to_owned(),
                }
            }
            None => {
                let candidates: Vec<&Node> = match slot {
                    Slot::Node(n) => nodes.get(n.as_str()).copied().into_iter().collect(),
                    Slot::Replica(_) => cluster.nodes.iter().collect(),
                };
                SlotPlacement::Pending {
                    reason: no_suitable_node(&candidates, service, limit, &count, &room, &used),
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
