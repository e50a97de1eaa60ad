//! The planner as it was before it was indexed for 1,000-node clusters (plan.rs at
//! 2c14c36): the reference the indexed planner must agree with, plan for plan.
#![allow(clippy::all)]

use std::collections::{BTreeMap, BTreeSet};

use mesh_planner::{
    Cluster, Node, Plan, Resources, Service, ServiceMode, Slot, SlotPlacement, SlotPlan, Stop,
    Task, TaskState, UpdateOrder,
};

use super::resources::{self, Short};

/// Why a node cannot take a task of the service (None: it can).
pub fn unfit(node: &Node, service: &Service) -> Option<Unfit> {
    if !node.ready {
        return Some(Unfit::Down);
    }
    if !node.active {
        return Some(Unfit::Drained);
    }
    if !node.drivers.iter().any(|d| d == service.driver) {
        return Some(Unfit::Driver);
    }
    service
        .placement
        .constraints
        .iter()
        .position(|c| !c.holds(node))
        .map(Unfit::Constraint)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unfit {
    Down,
    Drained,
    Driver,
    Constraint(usize),
}

/// The cluster's nodes by name, and those a task of `service` may run on.
pub fn nodes_for<'a>(
    cluster: &Cluster<'a>,
    service: &Service,
) -> (BTreeMap<&'a str, &'a Node>, BTreeSet<&'a str>) {
    let nodes = cluster.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let eligible = cluster
        .nodes
        .iter()
        .filter(|n| unfit(n, service).is_none())
        .map(|n| n.name.as_str())
        .collect();
    (nodes, eligible)
}

/// What each node's live tasks reserve, with `starting` (what this pass already places)
/// on top.
pub fn reserved_with<'a>(
    cluster: &Cluster<'a>,
    starting: &'a BTreeMap<String, Resources>,
) -> BTreeMap<&'a str, Resources> {
    let mut used = mesh_planner::reserved_by_node(cluster.tasks);
    for (node, r) in starting {
        let u = used.entry(node.as_str()).or_default();
        *u = u.saturating_add(*r);
    }
    used
}

/// The plan of a service (not a job) with `starting` reserved on top of the view's live
/// tasks.
pub fn plan_service(
    cluster: &Cluster,
    service: &Service,
    starting: &BTreeMap<String, Resources>,
) -> Plan {
    let (nodes, eligible) = nodes_for(cluster, service);
    let ready = |node: &str| nodes.get(node).is_some_and(|n| n.ready);
    // Tasks of other services still count as load on a node (the last tie-breaker).
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    for t in cluster
        .tasks
        .iter()
        .filter(|t| t.is_live() && ready(&t.node))
    {
        *load.entry(t.node.as_str()).or_default() += 1;
    }
    // What each node's live tasks reserve, this service's included: a task being replaced
    // or stopped holds its reservation until it is gone.
    let mut used = reserved_with(cluster, starting);
    let room = Room {
        nodes: &nodes,
        want: service.reservation,
    };

    let mine: Vec<&Task> = cluster
        .tasks
        .iter()
        .filter(|t| t.service == service.name && ready(&t.node))
        .collect();
    let wanted: Vec<Slot> = match service.mode {
        ServiceMode::Replicated { replicas } => (1..=replicas).map(Slot::Replica).collect(),
        ServiceMode::Global => eligible.iter().map(|n| Slot::Node(n.to_string())).collect(),
        ServiceMode::ReplicatedJob { .. } | ServiceMode::GlobalJob => {
            unreachable!("jobs are planned by job::plan")
        }
    };
    let wanted_set: BTreeSet<&Slot> = wanted.iter().collect();

    let mut stops: Vec<Stop> = Vec::new();
    let stop = |stops: &mut Vec<Stop>, t: &Task, reason: String| {
        stops.push(Stop {
            task: t.id.clone(),
            node: t.node.clone(),
            reason,
        })
    };

    // Live tasks by slot; those of slots the service no longer has stop.
    let mut live: BTreeMap<&Slot, Vec<&Task>> = BTreeMap::new();
    for t in mine.iter().filter(|t| t.is_live()) {
        let misplaced = matches!(&t.slot, Slot::Node(n) if *n != t.node);
        if misplaced || !wanted_set.contains(&t.slot) {
            let reason = match (&t.slot, service.mode) {
                (Slot::Replica(n), ServiceMode::Replicated { replicas }) => {
                    format!("scaled down: slot {n} is above replicas={replicas}")
                }
                (Slot::Node(_), ServiceMode::Global) => match nodes.get(t.node.as_str()) {
                    Some(node) => format!(
                        "node {} is no longer eligible: {}",
                        t.node,
                        describe_unfit(node, service)
                    ),
                    None => format!("node {} is not in the cluster", t.node),
                },
                _ => "the service changed mode".to_owned(),
            };
            stop(&mut stops, t, reason);
            continue;
        }
        live.entry(&t.slot).or_default().push(t);
    }
    // Finished tasks the restart policy keeps in their slot (current template only: a new
    // template starts them again).
    let mut held: BTreeMap<&Slot, &Task> = BTreeMap::new();
    for t in mine.iter().filter(|t| {
        t.holds_slot
            && t.state.is_terminal()
            && t.template == service.template
            && eligible.contains(t.node.as_str())
            && wanted_set.contains(&t.slot)
            // As for live tasks above: a global slot is only ever filled on its own node (a
            // record naming another node's slot would have kept that slot here).
            && !matches!(&t.slot, Slot::Node(n) if *n != t.node)
    }) {
        let e = held.entry(&t.slot).or_insert(t);
        if (t.created_ms, &t.id) > (e.created_ms, &e.id) {
            *e = t;
        }
    }

    let current = |t: &Task| t.template == service.template;
    // Swarm's `--replicas-max-per-node 0` means no limit. Read as a limit of 0, it left every
    // replicated slot pending, and made every global slot a Start on each plan (the global
    // path does not check the limit), so a node would start a new copy every round.
    let limit = service
        .placement
        .max_replicas_per_node
        .filter(|&m| m > 0)
        .map(|m| m as usize);
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    // First pass: slots that keep a task. A winner on a node already at the per-node limit
    // (the limit was lowered) is treated like one on an ineligible node.
    let mut outcome: BTreeMap<&Slot, Outcome> = BTreeMap::new();
    for slot in &wanted {
        let mut tasks = live.remove(slot).unwrap_or_default();
        tasks.sort_by(|a, b| {
            let key = |t: &Task| {
                (
                    !eligible.contains(t.node.as_str()),
                    !current(t),
                    t.state != TaskState::Running,
                    std::cmp::Reverse(t.created_ms),
                    t.node.clone(),
                    t.id.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        // The best task on a node that may hold it. Taking the best task overall and giving
        // up when its node is full was a loop: the slot was started elsewhere, but the task
        // on the full node (ranked first) won again next round, and again a copy started.
        let winner = tasks.iter().copied().find(|w| {
            eligible.contains(w.node.as_str())
                && limit.is_none_or(|l| count.get(w.node.as_str()).copied().unwrap_or(0) < l)
        });
        match winner {
            Some(w) if current(w) => {
                *count.entry(w.node.as_str()).or_default() += 1;
                outcome.insert(slot, Outcome::Kept(w, tasks));
            }
            Some(w) => {
                // An outdated winner occupies its node like a current one: counted only
                // after the rolling pass below, later slots passed the limit check above on a
                // node it already filled, and more slots than the limit stayed on that node.
                *count.entry(w.node.as_str()).or_default() += 1;
                outcome.insert(slot, Outcome::Outdated(w, tasks));
            }
            None => match held.get(slot) {
                Some(h)
                    if limit
                        .is_none_or(|l| count.get(h.node.as_str()).copied().unwrap_or(0) < l) =>
                {
                    *count.entry(h.node.as_str()).or_default() += 1;
                    outcome.insert(slot, Outcome::Held(h, tasks));
                }
                _ => {
                    outcome.insert(slot, Outcome::Place(tasks));
                }
            },
        }
    }

    // Rolling replacement of outdated tasks, `parallelism` slots in flight at a time. In
    // flight: a current task not yet running for `delay`, or a slot whose newest task is an
    // old one that was stopped for the update (the gap of stop-first).
    let update = &service.update;
    let settled = |w: &Task| {
        w.state == TaskState::Running
            && cluster.now_ms
                >= w.running_ms
                    .unwrap_or(w.since_ms)
                    .saturating_add(update.delay_ms)
    };
    // A slot that cannot be placed is not in flight: counting it would stall the update
    // behind a slot that only says why it is pending. A global slot has one node to go to,
    // so it is placeable only there (another node's room says nothing about it).
    let fits = |n: &str| {
        limit.is_none_or(|l| count.get(n).copied().unwrap_or(0) < l) && room.fits(&used, n)
    };
    let placeable = |slot: &Slot| match slot {
        Slot::Node(n) => eligible.get(n.as_str()).is_some_and(|n| fits(n)),
        Slot::Replica(_) => eligible.iter().any(|n| fits(n)),
    };
    // A slot with no live task but a past is in flight too: the gap of stop-first, or a new
    // task that failed and awaits its restart (counting neither let the next slot go while
    // this one was down).
    let newest_outdated = |slot: &Slot| placeable(slot) && mine.iter().any(|t| t.slot == *slot);
    let any_outdated = outcome.values().any(|o| matches!(o, Outcome::Outdated(..)));
    let in_flight = outcome
        .iter()
        .filter(|(slot, o)| match o {
            Outcome::Kept(w, _) => any_outdated && !settled(w),
            Outcome::Place(_) => newest_outdated(slot),
            _ => false,
        })
        .count();
    let mut budget = match (service.paused, update.parallelism) {
        (true, _) => 0,
        (false, 0) => usize::MAX,
        (false, p) => (p as usize).saturating_sub(in_flight),
    };
    let mut stop_first: BTreeMap<&Slot, &Task> = BTreeMap::new();
    for slot in &wanted {
        if let Some(Outcome::Outdated(w, tasks)) = outcome.get(slot) {
            let (w, tasks) = (*w, tasks.clone());
            if budget > 0 {
                budget -= 1;
                // Being replaced start-first: the slot's new task is placed like any other.
                // Stop-first: the old task holds its node until it is gone.
                if update.order == UpdateOrder::StopFirst && w.state == TaskState::Running {
                    stop_first.insert(slot, w);
                } else if let Some(c) = count.get_mut(w.node.as_str()) {
                    *c -= 1;
                }
                outcome.insert(slot, Outcome::Place(tasks));
            } else {
                outcome.insert(slot, Outcome::Kept(w, tasks));
            }
        }
    }

    let mut slots = Vec::with_capacity(wanted.len());
    for slot in &wanted {
        let placement = match outcome
            .remove(slot)
            .expect("every wanted slot has an outcome")
        {
            Outcome::Kept(w, others) => {
                retire(&mut stops, w, &others, slot);
                SlotPlacement::Kept {
                    node: w.node.clone(),
                    task: w.id.clone(),
                }
            }
            Outcome::Held(h, others) => {
                for t in others {
                    stop(
                        &mut stops,
                        t,
                        format!("slot {slot} is held by task {}", h.id),
                    );
                }
                SlotPlacement::Kept {
                    node: h.node.clone(),
                    task: h.id.clone(),
                }
            }
            Outcome::Outdated(..) => unreachable!("resolved above"),
            Outcome::Place(others) if stop_first.contains_key(slot) => {
                // Stop-first: the old task goes now; the slot is placed once it is gone.
                let old = stop_first[slot];
                for t in others {
                    stop(
                        &mut stops,
                        t,
                        format!("updating slot {slot} (stop-first): replaced by a new task"),
                    );
                }
                SlotPlacement::Stopping {
                    node: old.node.clone(),
                    task: old.id.clone(),
                }
            }
            Outcome::Place(others) => {
                let choice = match slot {
                    Slot::Node(n) => eligible
                        .get(n.as_str())
                        .copied()
                        .filter(|n| room.fits(&used, n)),
                    Slot::Replica(_) => pick(
                        &eligible, &nodes, &count, &load, limit, service, slot, &room, &used,
                    ),
                };
                match choice {
                    Some(node) => {
                        *count.entry(node).or_default() += 1;
                        let u = used.entry(node).or_default();
                        *u = u.saturating_add(service.reservation);
                        // Tasks being replaced keep serving until the new one runs.
                        SlotPlacement::Start {
                            node: node.to_owned(),
                        }
                    }
                    None => {
                        // Nowhere to go: a drained or no-longer-matching node's task stops
                        // anyway (drain means stop), as Swarm does.
                        // A global slot has one node to go to: the reason is about it.
                        let candidates: Vec<&Node> = match slot {
                            Slot::Node(n) => nodes.get(n.as_str()).copied().into_iter().collect(),
                            Slot::Replica(_) => cluster.nodes.iter().collect(),
                        };
                        let reason =
                            no_suitable_node(&candidates, service, limit, &count, &room, &used);
                        for t in others {
                            stop(&mut stops, t, reason.clone());
                        }
                        SlotPlacement::Pending { reason }
                    }
                }
            }
        };
        slots.push(SlotPlan {
            slot: slot.clone(),
            placement,
        });
    }
    stops.sort_by(|a, b| (&a.node, &a.task).cmp(&(&b.node, &b.task)));
    Plan { slots, stops }
}

pub enum Outcome<'a> {
    /// The winner and every live task of the slot (winner first).
    Kept(&'a Task, Vec<&'a Task>),
    Held(&'a Task, Vec<&'a Task>),
    Outdated(&'a Task, Vec<&'a Task>),
    /// Needs a new task; the slot's live tasks (on ineligible nodes, or outdated) wait.
    Place(Vec<&'a Task>),
}

/// The other live tasks of a kept slot: duplicates stop; one being replaced stops once the
/// winner runs.
pub fn retire(stops: &mut Vec<Stop>, winner: &Task, tasks: &[&Task], slot: &Slot) {
    let winner_runs = winner.state == TaskState::Running;
    for t in tasks.iter().filter(|t| t.id != winner.id) {
        let serving = t.state == TaskState::Running;
        if serving && !winner_runs {
            continue;
        }
        let reason = if t.template != winner.template {
            format!("replaced by task {} (updated)", winner.id)
        } else if t.node != winner.node && winner_runs && serving {
            format!(
                "slot {slot} moved to node {} (task {})",
                winner.node, winner.id
            )
        } else {
            format!(
                "duplicate of slot {slot}: task {} on node {} runs it",
                winner.id, winner.node
            )
        };
        stops.push(Stop {
            task: t.id.clone(),
            node: t.node.clone(),
            reason,
        });
    }
}

/// A service's reservation against the nodes' capacities.
pub struct Room<'a> {
    pub nodes: &'a BTreeMap<&'a str, &'a Node>,
    pub want: Resources,
}

impl Room<'_> {
    fn capacity(&self, node: &str) -> Resources {
        self.nodes.get(node).map(|n| n.capacity).unwrap_or_default()
    }
    fn used(used: &BTreeMap<&str, Resources>, node: &str) -> Resources {
        used.get(node).copied().unwrap_or_default()
    }
    fn short(&self, used: &BTreeMap<&str, Resources>, node: &str) -> Option<Short> {
        resources::short(self.capacity(node), Self::used(used, node), self.want)
    }
    pub fn fits(&self, used: &BTreeMap<&str, Resources>, node: &str) -> bool {
        self.short(used, node).is_none()
    }
    fn left_ppm(&self, used: &BTreeMap<&str, Resources>, node: &str) -> u64 {
        resources::left_ppm(self.capacity(node), Self::used(used, node), self.want)
    }
}

/// The eligible node a new task of `slot` goes to, or None.
#[allow(clippy::too_many_arguments)]
pub fn pick<'a>(
    eligible: &BTreeSet<&'a str>,
    nodes: &BTreeMap<&str, &Node>,
    count: &BTreeMap<&str, usize>,
    load: &BTreeMap<&str, usize>,
    limit: Option<usize>,
    service: &Service,
    slot: &Slot,
    room: &Room,
    used: &BTreeMap<&str, Resources>,
) -> Option<&'a str> {
    let prefs = &service.placement.preferences;
    // Per preference level, how many of the service's tasks each group (the values of the
    // labels down to that level) holds.
    let group = |node: &str, level: usize| -> Vec<String> {
        prefs[..=level]
            .iter()
            .map(|p| {
                nodes
                    .get(node)
                    .and_then(|n| n.labels.get(&p.label))
                    .cloned()
                    .unwrap_or_default()
            })
            .collect()
    };
    let mut group_count: Vec<BTreeMap<Vec<String>, usize>> = vec![BTreeMap::new(); prefs.len()];
    for (node, n) in count {
        for (level, counts) in group_count.iter_mut().enumerate() {
            *counts.entry(group(node, level)).or_default() += n;
        }
    }
    eligible
        .iter()
        .copied()
        .filter(|n| limit.is_none_or(|l| count.get(n).copied().unwrap_or(0) < l))
        .filter(|n| room.fits(used, n))
        .min_by_key(|n| {
            let groups: Vec<usize> = (0..prefs.len())
                .map(|level| {
                    group_count[level]
                        .get(&group(n, level))
                        .copied()
                        .unwrap_or(0)
                })
                .collect();
            (
                groups,
                count.get(n).copied().unwrap_or(0),
                std::cmp::Reverse(room.left_ppm(used, n)),
                load.get(n).copied().unwrap_or(0),
                rendezvous(service.name, slot, n),
            )
        })
}

/// FNV-1a over (service, slot, node): stable across builds and platforms, so every node
/// breaks ties the same way, and different slots prefer different nodes.
pub fn rendezvous(service: &str, slot: &Slot, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in service
        .bytes()
        .chain([0])
        .chain(slot.to_string().into_bytes())
        .chain([0])
        .chain(node.bytes())
    {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub fn describe_unfit(node: &Node, service: &Service) -> String {
    match unfit(node, service) {
        None => "it is eligible".into(),
        Some(Unfit::Down) => "it is down".into(),
        Some(Unfit::Drained) => "it is drained".into(),
        Some(Unfit::Driver) => format!("it has no {} driver", service.driver),
        Some(Unfit::Constraint(i)) => {
            format!("it does not match {}", service.placement.constraints[i])
        }
    }
}

/// Swarm's "no suitable node" message, from which filter turned how many nodes away.
pub fn no_suitable_node(
    nodes: &[&Node],
    service: &Service,
    limit: Option<usize>,
    count: &BTreeMap<&str, usize>,
    room: &Room,
    used: &BTreeMap<&str, Resources>,
) -> String {
    let total = nodes.len();
    let mut by: BTreeMap<Unfit, usize> = BTreeMap::new();
    let mut full = 0;
    let mut short: BTreeMap<Short, usize> = BTreeMap::new();
    let mut fit: Vec<&Node> = Vec::new();
    for n in nodes {
        match unfit(n, service) {
            Some(u) => *by.entry(u).or_default() += 1,
            None => {
                fit.push(n);
                let at_limit =
                    limit.is_some_and(|l| count.get(n.name.as_str()).copied().unwrap_or(0) >= l);
                match room.short(used, &n.name) {
                    // The per-node limit is the first filter the node fails.
                    _ if at_limit => full += 1,
                    Some(s) => *short.entry(s).or_default() += 1,
                    None => full += 1,
                }
            }
        }
    }
    let plural = |n: usize| if n == 1 { "node" } else { "nodes" };
    if total == 0 {
        return "no suitable node: the cluster has no nodes".into();
    }
    let constraints_only = by.keys().all(|u| matches!(u, Unfit::Constraint(_)));
    if constraints_only && fit.is_empty() && !service.placement.constraints.is_empty() {
        let all: Vec<String> = service
            .placement
            .constraints
            .iter()
            .map(ToString::to_string)
            .collect();
        return format!(
            "no suitable node: 0 of {total} {} match {}",
            plural(total),
            all.join(" && ")
        );
    }
    let mut parts = Vec::new();
    for (u, n) in &by {
        parts.push(match u {
            Unfit::Down => format!("{n} {} down", if *n == 1 { "node is" } else { "nodes are" }),
            Unfit::Drained => format!(
                "{n} {} drained",
                if *n == 1 { "node is" } else { "nodes are" }
            ),
            Unfit::Driver => format!(
                "{n} {} no {} driver",
                if *n == 1 { "node has" } else { "nodes have" },
                service.driver
            ),
            Unfit::Constraint(i) => format!(
                "{n} {} not match {}",
                if *n == 1 { "node does" } else { "nodes do" },
                service.placement.constraints[*i]
            ),
        });
    }
    for (s, n) in &short {
        parts.push(format!("insufficient {} on {n} {}", s.what(), plural(*n)));
    }
    if full > 0 {
        let at = limit.unwrap_or(0);
        parts.push(format!(
            "{full} {} already {} {at} task{} of the service (max replicas per node)",
            plural(full),
            if full == 1 { "runs" } else { "run" },
            if at == 1 { "" } else { "s" }
        ));
    }
    let mut reason = format!("no suitable node: {}", parts.join("; "));
    if !short.is_empty()
        && let Some(why) = resources::larger_than_any(&fit, service.reservation)
    {
        reason.push_str(&format!(" ({why})"));
    }
    reason
}
