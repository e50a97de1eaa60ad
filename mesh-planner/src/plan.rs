//! `plan`: which node fills each slot of a service, and which tasks must stop — computed the
//! same way on every node from the same view, with no I/O and no clock.
//!
//! The rules, slot by slot:
//! - A slot keeps the task it has (no surprise rebalancing): the best live task of the slot
//!   on an eligible node, ranked by running the current template, then running at all, then
//!   age (newest first), then node and task ID. Ranking, not arrival order, resolves the
//!   duplicates that diverging views create: every node picks the same winner and the
//!   others stop, so once views agree exactly one task fills each slot. Newest first is
//!   Swarm's outcome: a node that was cut off or dead comes back to find its slots filled
//!   elsewhere, and its stale copies are the ones that stop (nothing moves back to it).
//! - A slot with no such task is placed on an eligible node where its reservation fits
//!   beside what the live tasks there (of every service) reserve: the one with the fewest
//!   tasks of the service (after the spread preferences' groups), then the most left of its
//!   scarcer resource (Swarm spreads, then takes the least loaded), then the fewest tasks
//!   overall, then by a hash of (service, slot, node) so that ties do not pile every
//!   service on one node. A slot that fits nowhere is pending, and says why.
//! - A task that is being replaced (its node was drained or stopped matching, or its
//!   template is outdated) keeps serving until its replacement runs: start first, then stop.
//! - Template changes roll out `parallelism` slots at a time, in slot order: a slot counts as
//!   in flight from when its old task is replaced until its new task has run for `delay`
//!   (Swarm's updater works the same way, one worker per unit of parallelism). Start-first
//!   places the new task beside the old one; stop-first stops the old one and places the
//!   new one once it is gone.

use std::{
    cell::Cell,
    cmp::{Ordering, Reverse},
    collections::{BTreeMap, BTreeSet},
    rc::Rc,
};

use crate::{
    index::Index,
    resources::{self, Short},
    spec::{Node, Placement, Resources, ServiceMode, UpdateConfig, UpdateOrder},
    task::{Slot, Task, TaskState},
};

/// What the planner needs of a service.
#[derive(Clone, Copy, Debug)]
pub struct Service<'a> {
    pub name: &'a str,
    pub mode: ServiceMode,
    pub placement: &'a Placement,
    /// The driver its tasks need (a node must advertise it).
    pub driver: &'a str,
    /// The task template in force (an opaque ID): tasks made from another are replaced.
    pub template: u64,
    /// How they are replaced: the update config, or the rollback config while rolling back.
    pub update: UpdateConfig,
    /// The update was paused (after failures): no further slot is replaced.
    pub paused: bool,
    /// What each task reserves of its node (Docker's `--reserve-cpu`, `--reserve-memory`).
    pub reservation: Resources,
}

/// The cluster as the planner sees it: every node and every task record in gossip.
#[derive(Clone, Copy, Debug)]
pub struct Cluster<'a> {
    pub nodes: &'a [Node],
    pub tasks: &'a [Task],
    /// Wall-clock ms of the view: an update's delay is measured against it.
    pub now_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Every slot the service should have, in slot order.
    pub slots: Vec<SlotPlan>,
    /// Live tasks to stop now.
    pub stops: Vec<Stop>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotPlan {
    pub slot: Slot,
    pub placement: SlotPlacement,
}

/// Where a slot stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotPlacement {
    /// Filled by `task` on `node` (live, or finished and holding its slot).
    Kept { node: String, task: String },
    /// `node` should start a new task for the slot.
    Start { node: String },
    /// No node can take it, and why.
    Pending { reason: String },
    /// A stop-first update: the slot's old task is stopping; its replacement is placed once
    /// it is gone.
    Stopping { node: String, task: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stop {
    pub task: String,
    pub node: String,
    pub reason: String,
}

impl Plan {
    /// Slots `node` should start a task for.
    pub fn starts_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Slot> + 'a {
        self.slots.iter().filter_map(move |s| match &s.placement {
            SlotPlacement::Start { node: n } if n == node => Some(&s.slot),
            _ => None,
        })
    }

    /// Tasks of `node` to stop.
    pub fn stops_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Stop> + 'a {
        self.stops.iter().filter(move |s| s.node == node)
    }

    /// The first reason a slot is pending, if any is.
    pub fn pending_reason(&self) -> Option<&str> {
        self.slots.iter().find_map(|s| match &s.placement {
            SlotPlacement::Pending { reason } => Some(reason.as_str()),
            _ => None,
        })
    }
}

/// Why a node cannot take a task of the service (None: it can).
pub(crate) fn unfit(node: &Node, service: &Service) -> Option<Unfit> {
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
pub(crate) enum Unfit {
    Down,
    Drained,
    Driver,
    Constraint(usize),
}

/// The nodes a task of a service may run on, by position in the index (ascending, so in
/// name order).
pub(crate) struct Eligible(pub(crate) Rc<Vec<usize>>);

impl Eligible {
    /// Services that need the same driver under the same constraints share the answer (most
    /// services of a cluster): one look at every node for them all.
    pub(crate) fn of(index: &Index, service: &Service) -> Self {
        let mut known = index.eligible.borrow_mut();
        if let Some((_, _, e)) = known.iter().find(|(driver, constraints, _)| {
            driver == service.driver && *constraints == service.placement.constraints
        }) {
            return Self(e.clone());
        }
        let e: Rc<Vec<usize>> = Rc::new(
            (0..index.nodes.len())
                .filter(|&i| unfit(index.nodes[i], service).is_none())
                .collect(),
        );
        known.push((
            service.driver.to_owned(),
            service.placement.constraints.clone(),
            e.clone(),
        ));
        Self(e)
    }

    /// The position of `name` if it is eligible.
    pub(crate) fn get(&self, index: &Index, name: &str) -> Option<usize> {
        index
            .position(name)
            .filter(|i| self.0.binary_search(i).is_ok())
    }

    pub(crate) fn contains(&self, index: &Index, name: &str) -> bool {
        self.get(index, name).is_some()
    }
}

/// What each node's live tasks reserve, with what this pass has started so far on top: one
/// for a whole pass, each service's starts added as they are placed (the next service is
/// placed beside them).
pub(crate) struct Usage {
    pub(crate) used: Vec<Resources>,
    /// A node's `left_ppm` for the last (used + want) it was asked with: two divisions per
    /// node and slot otherwise, and most services reserve the same or nothing.
    left: Vec<Cell<Option<(Resources, u64)>>>,
}

impl Usage {
    pub(crate) fn new(used: Vec<Resources>) -> Self {
        let left = vec![Cell::new(None); used.len()];
        Self { used, left }
    }

    /// `want` more on node `i`.
    pub(crate) fn add(&mut self, i: usize, want: Resources) {
        self.used[i] = self.used[i].saturating_add(want);
    }
}

/// The plan of a service (not a job), placed beside `usage`, which its starts are added to.
pub(crate) fn plan_service(
    cluster: &Cluster,
    index: &Index,
    service: &Service,
    usage: &mut Usage,
) -> Plan {
    let eligible = Eligible::of(index, service);
    let ready = |node: &str| index.ready(node);
    let room = Room {
        nodes: &index.nodes,
        want: service.reservation,
    };

    let mine: Vec<&Task> = index
        .tasks_of(service.name)
        .iter()
        .copied()
        .filter(|t| ready(&t.node))
        .collect();
    let wanted: Vec<Slot> = match service.mode {
        ServiceMode::Replicated { replicas } => (1..=replicas).map(Slot::Replica).collect(),
        ServiceMode::Global => eligible
            .0
            .iter()
            .map(|&i| Slot::Node(index.names[i].to_owned()))
            .collect(),
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
                (Slot::Node(_), ServiceMode::Global) => match index.node(&t.node) {
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
            && eligible.contains(index, &t.node)
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
    // Tasks of the service per node, by position.
    let mut count: Vec<usize> = vec![0; index.nodes.len()];
    // First pass: slots that keep a task. A winner on a node already at the per-node limit
    // (the limit was lowered) is treated like one on an ineligible node.
    let mut outcome: BTreeMap<&Slot, Outcome> = BTreeMap::new();
    for slot in &wanted {
        let mut tasks = live.remove(slot).unwrap_or_default();
        tasks.sort_by(|a, b| {
            let key = |t: &Task| {
                (
                    !eligible.contains(index, &t.node),
                    !current(t),
                    t.state != TaskState::Running,
                    Reverse(t.created_ms),
                    t.node.clone(),
                    t.id.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        // The best task on a node that may hold it. Taking the best task overall and giving
        // up when its node is full was a loop: the slot was started elsewhere, but the task
        // on the full node (ranked first) won again next round, and again a copy started.
        let winner = tasks.iter().copied().find_map(|w| {
            eligible
                .get(index, &w.node)
                .filter(|&i| limit.is_none_or(|l| count[i] < l))
                .map(|i| (w, i))
        });
        match winner {
            Some((w, i)) if current(w) => {
                count[i] += 1;
                outcome.insert(slot, Outcome::Kept(w, tasks));
            }
            Some((w, i)) => {
                // An outdated winner occupies its node like a current one: counted only
                // after the rolling pass below, later slots passed the limit check above on a
                // node it already filled, and more slots than the limit stayed on that node.
                count[i] += 1;
                outcome.insert(slot, Outcome::Outdated(w, tasks));
            }
            None => {
                let at = held.get(slot).and_then(|h| {
                    eligible
                        .get(index, &h.node)
                        .filter(|&i| limit.is_none_or(|l| count[i] < l))
                        .map(|i| (*h, i))
                });
                match at {
                    Some((h, i)) => {
                        count[i] += 1;
                        outcome.insert(slot, Outcome::Held(h, tasks));
                    }
                    None => {
                        outcome.insert(slot, Outcome::Place(tasks));
                    }
                }
            }
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
    let fits =
        |i: usize, count: &[usize]| limit.is_none_or(|l| count[i] < l) && room.fits(&usage.used, i);
    let placeable = |slot: &Slot, count: &[usize]| match slot {
        Slot::Node(n) => eligible.get(index, n).is_some_and(|i| fits(i, count)),
        Slot::Replica(_) => eligible.0.iter().any(|&i| fits(i, count)),
    };
    // A slot with no live task but a past is in flight too: the gap of stop-first, or a new
    // task that failed and awaits its restart (counting neither let the next slot go while
    // this one was down). Its past is looked at first: finding one is cheap, finding room
    // may look at every node.
    let newest_outdated =
        |slot: &Slot| mine.iter().any(|t| t.slot == *slot) && placeable(slot, &count);
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
                } else if let Some(i) = index.position(&w.node) {
                    count[i] -= 1;
                }
                outcome.insert(slot, Outcome::Place(tasks));
            } else {
                outcome.insert(slot, Outcome::Kept(w, tasks));
            }
        }
    }

    let mut slots = Vec::with_capacity(wanted.len());
    let mut tied = Tied::default();
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
                        .get(index, n)
                        .filter(|&i| room.fits(&usage.used, i)),
                    Slot::Replica(_) => Placer {
                        index,
                        eligible: &eligible,
                        count: &count,
                        load: &index.load,
                        limit,
                        service,
                        room: &room,
                        usage: &*usage,
                    }
                    .pick(slot, &mut tied),
                };
                match choice {
                    Some(i) => {
                        count[i] += 1;
                        usage.add(i, service.reservation);
                        tied.taken(i);
                        // Tasks being replaced keep serving until the new one runs.
                        SlotPlacement::Start {
                            node: index.names[i].to_owned(),
                        }
                    }
                    None => {
                        // Nowhere to go: a drained or no-longer-matching node's task stops
                        // anyway (drain means stop), as Swarm does.
                        // A global slot has one node to go to: the reason is about it.
                        let candidates: Vec<&Node> = match slot {
                            Slot::Node(n) => index.node(n).into_iter().collect(),
                            Slot::Replica(_) => cluster.nodes.iter().collect(),
                        };
                        let reason = no_suitable_node(
                            index,
                            &candidates,
                            service,
                            limit,
                            &count,
                            &room,
                            &usage.used,
                        );
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

enum Outcome<'a> {
    /// The winner and every live task of the slot (winner first).
    Kept(&'a Task, Vec<&'a Task>),
    Held(&'a Task, Vec<&'a Task>),
    Outdated(&'a Task, Vec<&'a Task>),
    /// Needs a new task; the slot's live tasks (on ineligible nodes, or outdated) wait.
    Place(Vec<&'a Task>),
}

/// The other live tasks of a kept slot: duplicates stop; one being replaced stops once the
/// winner runs.
pub(crate) fn retire(stops: &mut Vec<Stop>, winner: &Task, tasks: &[&Task], slot: &Slot) {
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

/// A service's reservation against the nodes' capacities (nodes by position).
pub(crate) struct Room<'a> {
    pub(crate) nodes: &'a [&'a Node],
    pub(crate) want: Resources,
}

impl Room<'_> {
    fn short(&self, used: &[Resources], i: usize) -> Option<Short> {
        resources::short(self.nodes[i].capacity, used[i], self.want)
    }
    pub(crate) fn fits(&self, used: &[Resources], i: usize) -> bool {
        self.short(used, i).is_none()
    }
    fn left_ppm(&self, usage: &Usage, i: usize) -> u64 {
        let capacity = self.nodes[i].capacity;
        if capacity.nano_cpus == 0 && capacity.memory_bytes == 0 {
            // Nothing advertised: everything left, whatever is used.
            return 1_000_000;
        }
        let after = usage.used[i].saturating_add(self.want);
        if let Some((at, left)) = usage.left[i].get()
            && at == after
        {
            return left;
        }
        let left = resources::left_ppm(capacity, usage.used[i], self.want);
        usage.left[i].set(Some((after, left)));
        left
    }
}

/// Where a new task of a replicated slot goes: the eligible node with room, ranked by the
/// spread preferences' groups, the service's tasks there, what it has left, its load, then
/// the slot's hash of it (see the module docs).
pub(crate) struct Placer<'x, 'a> {
    pub(crate) index: &'x Index<'a>,
    pub(crate) eligible: &'x Eligible,
    pub(crate) count: &'x [usize],
    /// Every service's live tasks by position; a job ranks without it (empty).
    pub(crate) load: &'x [usize],
    pub(crate) limit: Option<usize>,
    pub(crate) service: &'x Service<'x>,
    pub(crate) room: &'x Room<'x>,
    pub(crate) usage: &'x Usage,
}

/// A node's rank for a slot but the hash: the spread groups' counts (None without spread
/// preferences), the service's tasks there, what it has left, its load. Lower is better.
type Rank = (Option<Vec<usize>>, usize, Reverse<u64>, usize);

/// The nodes that tied on rank for the last slot placed, while they still tie for the next.
/// Placing a task changes only its node's rank — more of the service's tasks, less left —
/// and only for the worse, so the other tied nodes are still the best for the next slot of
/// the same service: its first slot ranks every node, the others only hash the tied ones.
/// Spread preferences rank by group, which the placed task changes for every node of its
/// group: with them, every slot ranks every node.
#[derive(Default)]
pub(crate) struct Tied {
    nodes: Vec<usize>,
    valid: bool,
}

impl Tied {
    /// Node `i` took the slot (its count and usage have been updated).
    pub(crate) fn taken(&mut self, i: usize) {
        self.nodes.retain(|&n| n != i);
        self.valid &= !self.nodes.is_empty();
    }
}

impl Placer<'_, '_> {
    /// The position of the node, or None. `tied` carries the ranking over from the
    /// service's previous slot (see [`Tied`]); nothing but [`Tied::taken`]'s node may have
    /// changed since.
    pub(crate) fn pick(&self, slot: &Slot, tied: &mut Tied) -> Option<usize> {
        if !tied.valid {
            self.rank(tied);
        }
        let tied = &tied.nodes;
        if tied.len() <= 1 {
            return tied.first().copied();
        }
        // The lowest hash; of equal ones the first by name, as a minimum over the nodes in
        // name order would give.
        let prefix = self.index.common_prefix;
        let seed = fnv(
            rendezvous_seed(self.service.name, slot),
            self.index.names[tied[0]].as_bytes()[..prefix]
                .iter()
                .copied(),
        );
        let rest = |i: usize| &self.index.names[i].as_bytes()[prefix..];
        let mut winner: Option<(u64, usize)> = None;
        let mut consider = |hash: u64, i: usize| {
            if winner.is_none_or(|(h, _)| hash < h) {
                winner = Some((hash, i));
            }
        };
        let mut chunks = tied.chunks_exact(4);
        for c in &mut chunks {
            let names = [c[0], c[1], c[2], c[3]].map(rest);
            for (hash, i) in fnv_of_four(seed, names).into_iter().zip(c) {
                consider(hash, *i);
            }
        }
        for &i in chunks.remainder() {
            consider(fnv(seed, rest(i).iter().copied()), i);
        }
        winner.map(|(_, i)| i)
    }

    /// The eligible nodes with room that share the best rank but the hash, in name order.
    fn rank(&self, out: &mut Tied) {
        let prefs = &self.service.placement.preferences;
        let index = self.index;
        // Per preference level, how many of the service's tasks each group (the values of
        // the labels down to that level) holds.
        let group = |i: usize, level: usize| -> Vec<&str> {
            prefs[..=level]
                .iter()
                .map(|p| {
                    index.nodes[i]
                        .labels
                        .get(&p.label)
                        .map_or("", String::as_str)
                })
                .collect()
        };
        let mut group_count: Vec<BTreeMap<Vec<&str>, usize>> = vec![BTreeMap::new(); prefs.len()];
        if !prefs.is_empty() {
            for (i, &n) in self.count.iter().enumerate().filter(|(_, n)| **n > 0) {
                for (level, counts) in group_count.iter_mut().enumerate() {
                    *counts.entry(group(i, level)).or_default() += n;
                }
            }
        }
        // The best rank but the hash, and every node that has it, in name order: most
        // nodes lose on the rank, and only the tied ones are worth a hash.
        let mut best: Option<Rank> = None;
        let mut tied: Vec<usize> = Vec::new();
        for &i in self.eligible.0.iter() {
            let count = self.count[i];
            if self.limit.is_some_and(|l| count >= l) || !self.room.fits(&self.usage.used, i) {
                continue;
            }
            // None without preferences: the same order, without a vector per node.
            let groups: Option<Vec<usize>> = (!prefs.is_empty()).then(|| {
                (0..prefs.len())
                    .map(|level| {
                        group_count[level]
                            .get(&group(i, level))
                            .copied()
                            .unwrap_or(0)
                    })
                    .collect()
            });
            let rank = (
                groups,
                count,
                Reverse(self.room.left_ppm(self.usage, i)),
                self.load.get(i).copied().unwrap_or(0),
            );
            match best.as_ref().map(|b| rank.cmp(b)) {
                Some(Ordering::Greater) => {}
                Some(Ordering::Equal) => tied.push(i),
                None | Some(Ordering::Less) => {
                    best = Some(rank);
                    tied.clear();
                    tied.push(i);
                }
            }
        }
        *out = Tied {
            valid: prefs.is_empty(),
            nodes: tied,
        };
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut h: u64, bytes: impl IntoIterator<Item = u8>) -> u64 {
    for b in bytes {
        h = (h ^ b as u64).wrapping_mul(FNV_PRIME);
    }
    h
}

/// FNV-1a over (service, slot, node) — stable across builds and platforms, so every node
/// breaks ties the same way, and different slots prefer different nodes — here over
/// (service, slot) alone, to go on from over each node's name.
fn rendezvous_seed(service: &str, slot: &Slot) -> u64 {
    let h = fnv(FNV_OFFSET, service.bytes().chain([0]));
    fnv(h, slot.to_string().into_bytes().into_iter().chain([0]))
}

/// [`fnv`] from `seed` over four names at once: four independent multiply chains keep the
/// CPU busy where one waits on each multiply (a fresh placement hashes every node for
/// every slot). Names of one length, as a cluster's usually are, go in lockstep.
fn fnv_of_four(seed: u64, names: [&[u8]; 4]) -> [u64; 4] {
    let len = names[0].len();
    if names.iter().any(|n| n.len() != len) {
        return names.map(|n| fnv(seed, n.iter().copied()));
    }
    let mut h = [seed; 4];
    for b in 0..len {
        for (h, n) in h.iter_mut().zip(names) {
            *h = (*h ^ n[b] as u64).wrapping_mul(FNV_PRIME);
        }
    }
    h
}

pub(crate) fn describe_unfit(node: &Node, service: &Service) -> String {
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
pub(crate) fn no_suitable_node(
    index: &Index,
    nodes: &[&Node],
    service: &Service,
    limit: Option<usize>,
    count: &[usize],
    room: &Room,
    used: &[Resources],
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
                let at = index.position(&n.name);
                let at_limit = limit.is_some_and(|l| at.map_or(0, |i| count[i]) >= l);
                match at.and_then(|i| room.short(used, i)) {
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
