//! The planner's rules over random clusters: constraints and per-node limits hold, a slot is
//! assigned once, spread is even, the same view gives the same plan in any order, a joining
//! node moves nothing, and carrying plans out converges.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use mesh_planner::{
    AfterExit, Cluster, DesiredState, Node, Placement, Plan, Resources, RestartCondition,
    RestartPolicy, ServiceMode, Slot, SlotPlacement, Task, TaskState, after_exit, plan_all,
    reserved_by_node,
};
use proptest::prelude::*;

/// Node names tasks may name: n0..n7 may be in the cluster, n8 and n9 never are (gone).
const NODE_NAMES: usize = 10;

fn node_strategy(i: usize) -> impl Strategy<Value = Node> {
    (
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.9),
        prop::option::of(prop::sample::select(vec!["a", "b", "c"])),
        prop::option::of(prop::sample::select(vec!["prod", "dev"])),
        capacity_strategy(),
    )
        .prop_map(move |(ready, active, driver, zone, env, capacity)| {
            let mut n = node(&format!("n{i}"));
            n.capacity = capacity;
            n.ready = ready;
            n.active = active;
            if !driver {
                n.drivers = vec!["podman".into()];
            }
            if let Some(z) = zone {
                n.labels.insert("zone".into(), z.into());
            }
            if let Some(e) = env {
                n.labels.insert("env".into(), e.into());
            }
            n
        })
}

/// Small numbers so that nodes fill up: CPUs in halves, memory in units; zero (not
/// advertised) in either now and then.
fn capacity_strategy() -> impl Strategy<Value = Resources> {
    (
        prop_oneof![1 => Just(0u64), 4 => 1u64..=8],
        prop_oneof![1 => Just(0u64), 4 => 1u64..=16],
    )
        .prop_map(|(halves, units)| Resources {
            nano_cpus: halves * 500_000_000,
            memory_bytes: units * UNIT,
        })
}

/// What a task reserves: often nothing, as most services.
fn reservation_strategy() -> impl Strategy<Value = Resources> {
    prop_oneof![
        2 => Just(Resources::default()),
        3 => (0u64..=4, 0u64..=6).prop_map(|(halves, units)| Resources {
            nano_cpus: halves * 500_000_000,
            memory_bytes: units * UNIT,
        }),
    ]
}

const UNIT: u64 = 64 << 20;

fn nodes_strategy() -> impl Strategy<Value = Vec<Node>> {
    (1usize..=8).prop_flat_map(|n| (0..n).map(node_strategy).collect::<Vec<_>>())
}

fn placement_strategy() -> impl Strategy<Value = Placement> {
    (
        prop::sample::subsequence(
            vec![
                "node.labels.env==prod",
                "node.labels.env!=dev",
                "node.labels.zone!=c",
                "node.hostname!=n1",
                "node.labels.zone==a",
            ],
            0..=2,
        ),
        prop::sample::subsequence(
            vec!["spread=node.labels.zone", "spread=node.labels.env"],
            0..=2,
        ),
        prop::option::of(0u32..=4),
    )
        .prop_map(|(constraints, prefs, max)| Placement {
            constraints: constraints.iter().map(|c| c.parse().unwrap()).collect(),
            preferences: prefs.iter().map(|p| p.parse().unwrap()).collect(),
            max_replicas_per_node: max,
        })
}

fn mode_strategy() -> impl Strategy<Value = ServiceMode> {
    prop_oneof![
        4 => (0u32..=30).prop_map(|replicas| ServiceMode::Replicated { replicas }),
        1 => Just(ServiceMode::Global),
    ]
}

fn state_strategy() -> impl Strategy<Value = TaskState> {
    prop::sample::select(vec![
        TaskState::New,
        TaskState::Assigned,
        TaskState::Preparing,
        TaskState::Starting,
        TaskState::Running,
        TaskState::Running,
        TaskState::Running,
        TaskState::Complete,
        TaskState::Shutdown,
        TaskState::Failed,
        TaskState::Rejected,
    ])
}

/// Task records as gossip may hold them: duplicates of a slot, tasks on gone or down nodes,
/// outdated templates, finished tasks holding their slot, other services' tasks.
fn tasks_strategy() -> impl Strategy<Value = Vec<Task>> {
    prop::collection::vec(
        (
            prop::bool::weighted(0.85),
            0..NODE_NAMES,
            prop_oneof![
                // Low slots often, so that slots collide and nodes fill up.
                3 => (1u32..=6).prop_map(Some),
                2 => (1u32..=34).prop_map(Some),
                1 => Just(None),
            ],
            prop::bool::weighted(0.8),
            1u64..=3,
            prop::bool::weighted(0.9),
            state_strategy(),
            0u64..50,
            prop::bool::weighted(0.2),
            reservation_strategy(),
        ),
        0..=40,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(
                |(
                    i,
                    (mine, node, replica, own_node, version, wants, state, created, holds, reserve),
                )| {
                    let node_name = format!("n{node}");
                    let slot = match replica {
                        Some(r) => Slot::Replica(r),
                        // A global slot, usually the task's own node.
                        None if own_node => Slot::Node(node_name.clone()),
                        None => Slot::Node(format!("n{}", (node + 1) % NODE_NAMES)),
                    };
                    let mut t = task(&format!("t{i}"), slot, &node_name, created);
                    if !mine {
                        t.service = "other".into();
                    }
                    t.template = version;
                    t.desired = if wants {
                        DesiredState::Running
                    } else {
                        DesiredState::Shutdown
                    };
                    t.state = state;
                    t.holds_slot = holds && state.is_terminal();
                    t.reservation = reserve;
                    t
                },
            )
            .collect()
    })
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    (
        mode_strategy(),
        placement_strategy(),
        1u64..=3,
        any::<bool>(),
        0u32..=3,
        reservation_strategy(),
    )
        .prop_map(
            |(mode, placement, v, start_first, parallelism, reservation)| Spec {
                name: SERVICE.into(),
                mode,
                placement,
                template: v,
                update: mesh_planner::UpdateConfig {
                    parallelism,
                    order: if start_first {
                        mesh_planner::UpdateOrder::StartFirst
                    } else {
                        mesh_planner::UpdateOrder::StopFirst
                    },
                    ..Default::default()
                },
                paused: false,
                reservation,
                now_ms: 1_000_000,
            },
        )
}

fn eligible(n: &Node, spec: &Spec) -> bool {
    n.ready
        && n.active
        && n.drivers.iter().any(|d| d == DRIVER)
        && spec.placement.constraints.iter().all(|c| c.holds(n))
}

fn limit(spec: &Spec) -> Option<usize> {
    // Swarm's 0 is "no limit".
    spec.placement
        .max_replicas_per_node
        .filter(|&m| m > 0)
        .map(|m| m as usize)
}

fn wanted(spec: &Spec, nodes: &[Node]) -> Vec<Slot> {
    match spec.mode {
        ServiceMode::Replicated { replicas } => (1..=replicas).map(Slot::Replica).collect(),
        ServiceMode::Global => {
            let names: BTreeSet<&str> = nodes
                .iter()
                .filter(|n| eligible(n, spec))
                .map(|n| n.name.as_str())
                .collect();
            names.into_iter().map(|n| Slot::Node(n.into())).collect()
        }
        // Jobs have their own properties (tests/jobs.rs).
        ServiceMode::ReplicatedJob { .. } | ServiceMode::GlobalJob => unreachable!(),
    }
}

/// Reorders `v` by `keys` (a random permutation, cycled when `v` is longer).
fn shuffled<T: Clone>(v: &[T], keys: &[u32]) -> Vec<T> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by_key(|&i| (keys[i % keys.len()], i));
    idx.into_iter().map(|i| v[i].clone()).collect()
}

/// The rules every plan must keep, whatever the view.
fn check_plan(
    spec: &Spec,
    nodes: &[Node],
    tasks: &[Task],
    plan: &Plan,
) -> Result<(), TestCaseError> {
    let by_name: BTreeMap<&str, &Node> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    // (a) Starts go only to nodes that can run the task.
    for s in &plan.slots {
        if let SlotPlacement::Start { node } = &s.placement {
            let n = by_name.get(node.as_str());
            prop_assert!(
                n.is_some_and(|n| eligible(n, spec)),
                "slot {} started on ineligible node {node}",
                s.slot
            );
            if let Slot::Node(owner) = &s.slot {
                prop_assert_eq!(owner, node, "a global slot runs on its own node");
            }
        }
    }
    // (b) The per-node limit holds over kept and started slots.
    if let Some(l) = limit(spec) {
        for (node, n) in per_node(plan) {
            prop_assert!(n <= l, "node {node} has {n} slots, limit {l}: {plan:?}");
        }
    }
    // (i) Reservations: no start takes a node past what it has.
    check_room(
        nodes,
        tasks,
        std::slice::from_ref(plan),
        &[spec.reservation],
    )?;
    // (c) Each slot once, and exactly the wanted ones, in slot order.
    let got: Vec<Slot> = plan.slots.iter().map(|s| s.slot.clone()).collect();
    prop_assert_eq!(got, wanted(spec, nodes));
    // (h) Stops name live tasks of this service on ready nodes, once each; kept tasks are
    // never stopped, and a kept task is the service's, in that slot, on that node.
    let mut stopped = BTreeSet::new();
    for stop in &plan.stops {
        let t = tasks.iter().find(|t| t.id == stop.task);
        prop_assert!(t.is_some(), "stop of unknown task {}", stop.task);
        let t = t.unwrap();
        prop_assert_eq!(&t.service, &spec.name, "stop of another service's task");
        prop_assert_eq!(&t.node, &stop.node);
        prop_assert!(
            by_name.get(t.node.as_str()).is_some_and(|n| n.ready),
            "stop on a node that is not ready"
        );
        prop_assert!(t.is_live(), "stop of a task that is not live: {t:?}");
        prop_assert!(
            stopped.insert(&stop.task),
            "task {} stopped twice",
            stop.task
        );
    }
    for s in &plan.slots {
        if let SlotPlacement::Kept { node, task } = &s.placement {
            prop_assert!(!stopped.contains(task), "kept task {task} is also stopped");
            let t = tasks.iter().find(|t| &t.id == task);
            prop_assert!(
                t.is_some_and(|t| t.service == spec.name && &t.node == node && t.slot == s.slot),
                "kept {task} is not this service's task of slot {} on {node}",
                s.slot
            );
            prop_assert!(
                by_name.get(node.as_str()).is_some_and(|n| n.ready),
                "kept on a node that is not ready"
            );
            if let Slot::Node(owner) = &s.slot {
                prop_assert_eq!(owner, node, "a global slot is kept on its own node");
            }
        }
    }
    Ok(())
}

/// On every node that plans start tasks on, what its live tasks reserve plus what the
/// starts reserve stays within its capacity, in each resource the starts reserve and the
/// node advertises.
fn check_room(
    nodes: &[Node],
    tasks: &[Task],
    plans: &[Plan],
    reservations: &[Resources],
) -> Result<(), TestCaseError> {
    let base = reserved_by_node(tasks);
    let mut starting: BTreeMap<&str, Resources> = BTreeMap::new();
    for (plan, want) in plans.iter().zip(reservations) {
        for (_, node) in starts(plan) {
            let n = nodes.iter().find(|n| n.name == node).unwrap();
            let r = starting.entry(n.name.as_str()).or_default();
            *r = r.saturating_add(*want);
        }
    }
    for (node, add) in starting {
        let cap = nodes.iter().find(|n| n.name == node).unwrap().capacity;
        let total = base
            .get(node)
            .copied()
            .unwrap_or_default()
            .saturating_add(add);
        prop_assert!(
            add.nano_cpus == 0 || cap.nano_cpus == 0 || total.nano_cpus <= cap.nano_cpus,
            "node {node}: CPUs reserved {} over {} ({plans:?})",
            total.nano_cpus,
            cap.nano_cpus
        );
        prop_assert!(
            add.memory_bytes == 0
                || cap.memory_bytes == 0
                || total.memory_bytes <= cap.memory_bytes,
            "node {node}: memory reserved {} over {} ({plans:?})",
            total.memory_bytes,
            cap.memory_bytes
        );
    }
    Ok(())
}

/// Live tasks of the service per slot, on nodes that are ready.
fn live_by_slot<'a>(
    spec: &Spec,
    nodes: &[Node],
    tasks: &'a [Task],
) -> BTreeMap<Slot, Vec<&'a Task>> {
    let ready: BTreeSet<&str> = nodes
        .iter()
        .filter(|n| n.ready)
        .map(|n| n.name.as_str())
        .collect();
    let mut m: BTreeMap<Slot, Vec<&Task>> = BTreeMap::new();
    for t in tasks {
        if t.service == spec.name && t.is_live() && ready.contains(t.node.as_str()) {
            m.entry(t.slot.clone()).or_default().push(t);
        }
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        // Shrunk failures are printed; no regression files next to the sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// (a) (b) (c) (h) on any view.
    #[test]
    fn every_plan_keeps_the_rules(nodes in nodes_strategy(), spec in spec_strategy(), tasks in tasks_strategy()) {
        let plan = spec.plan(&nodes, &tasks);
        check_plan(&spec, &nodes, &tasks, &plan)?;
    }

    /// (i') Services planned together in one pass never reserve more than a node has
    /// between them, and every node computes the same plans from the same view.
    #[test]
    fn services_planned_together_share_a_nodes_room(
        nodes in nodes_strategy(),
        a in spec_strategy(),
        b in spec_strategy(),
        c in spec_strategy(),
        tasks in tasks_strategy(),
        keys in prop::collection::vec(any::<u32>(), 1..64),
    ) {
        let mut specs = [a, b, c];
        for (s, name) in specs.iter_mut().zip(["web", "other", "api"]) {
            s.name = name.into();
        }
        let services: Vec<_> = specs.iter().map(Spec::service).collect();
        let cluster = Cluster { nodes: &nodes, tasks: &tasks, now_ms: 1_000_000 };
        let plans = plan_all(&cluster, &services);
        let wants: Vec<Resources> = specs.iter().map(|s| s.reservation).collect();
        check_room(&nodes, &tasks, &plans, &wants)?;
        for (spec, plan) in specs.iter().zip(&plans) {
            check_plan(spec, &nodes, &tasks, plan)?;
        }
        // Another node's view: the same records in another order, services listed otherwise.
        let shuffled_tasks = shuffled(&tasks, &keys);
        let reversed: Vec<_> = services.iter().rev().copied().collect();
        let again = plan_all(
            &Cluster { nodes: &shuffled(&nodes, &keys), tasks: &shuffled_tasks, now_ms: 1_000_000 },
            &reversed,
        );
        let again: Vec<Plan> = again.into_iter().rev().collect();
        prop_assert_eq!(plans, again);
    }

    /// (d) A fresh service without placement rules spreads evenly over the eligible nodes.
    #[test]
    fn a_fresh_service_spreads_within_one(nodes in nodes_strategy(), replicas in 0u32..=30, others in tasks_strategy()) {
        // It reserves nothing, so however full the nodes are it fits on each.
        let spec = Spec::replicated(replicas);
        // Other services' tasks may be there; they only break ties.
        let others: Vec<Task> = others.into_iter().filter(|t| t.service != spec.name).collect();
        let plan = spec.plan(&nodes, &others);
        let eligible: Vec<&str> = nodes.iter().filter(|n| eligible(n, &spec)).map(|n| n.name.as_str()).collect();
        let per = per_node(&plan);
        let counts: Vec<usize> = eligible.iter().map(|n| per.get(*n).copied().unwrap_or(0)).collect();
        if eligible.is_empty() {
            prop_assert!(plan.slots.iter().all(|s| matches!(s.placement, SlotPlacement::Pending { .. })), "no node: every slot pends");
        } else {
            prop_assert_eq!(starts(&plan).len(), replicas as usize);
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            prop_assert!(max - min <= 1, "uneven: {:?} over {:?}", counts, eligible);
        }
    }

    /// (d') With a spread preference, the values of the label (no label: one more value)
    /// that have an eligible node get counts within one of each other.
    #[test]
    fn spread_balances_label_values_within_one(nodes in nodes_strategy(), replicas in 0u32..=30) {
        let spec = Spec::replicated(replicas).spread("spread=node.labels.zone");
        let plan = spec.plan(&nodes, &[]);
        let mut by_zone: BTreeMap<&str, usize> = nodes
            .iter()
            .filter(|n| eligible(n, &spec))
            .map(|n| (n.labels.get("zone").map_or("", String::as_str), 0))
            .collect();
        for (_, node) in starts(&plan) {
            let n = nodes.iter().find(|n| n.name == node).unwrap();
            *by_zone.get_mut(n.labels.get("zone").map_or("", String::as_str)).unwrap() += 1;
        }
        if let (Some(min), Some(max)) = (by_zone.values().min(), by_zone.values().max()) {
            prop_assert!(max - min <= 1, "uneven zones: {:?}", by_zone);
        }
    }

    /// The restart policy never restarts past its attempts, nor before now.
    #[test]
    fn restarts_stay_within_the_policy(
        condition in prop::sample::select(vec![RestartCondition::None, RestartCondition::OnFailure, RestartCondition::Any]),
        delay_ms in prop_oneof![0u64..10_000, u64::MAX - 10..=u64::MAX],
        max_attempts in prop::option::of(0u32..5),
        window_ms in prop::option::of(0u64..10_000),
        attempt in 0u32..6,
        window_start_ms in 0u64..20_000,
        now_ms in 0u64..40_000,
        failed in any::<bool>(),
    ) {
        let policy = RestartPolicy { condition, delay_ms, max_attempts, window_ms };
        let mut t = task("t", Slot::Replica(1), "n1", 0);
        t.state = if failed { TaskState::Failed } else { TaskState::Complete };
        t.attempt = attempt;
        t.window_start_ms = window_start_ms;
        match after_exit(&policy, &t, failed, now_ms) {
            AfterExit::Restart { attempt: a, window_start_ms: w, not_before_ms } => {
                prop_assert!(condition == RestartCondition::Any || (condition == RestartCondition::OnFailure && failed));
                prop_assert!(not_before_ms >= now_ms, "restart before now");
                prop_assert!(w <= now_ms.max(window_start_ms));
                if let Some(max) = max_attempts {
                    prop_assert!(a <= max, "attempt {a} over max {max}");
                }
                prop_assert!(a >= 1);
            }
            AfterExit::Hold { .. } => {
                let restartable = condition == RestartCondition::Any || (condition == RestartCondition::OnFailure && failed);
                prop_assert!(!restartable || max_attempts.is_some(), "held without a reason to");
            }
        }
    }

    /// (e) The same view in another order gives the same plan.
    #[test]
    fn the_plan_does_not_depend_on_order(
        nodes in nodes_strategy(),
        spec in spec_strategy(),
        tasks in tasks_strategy(),
        keys in prop::collection::vec(any::<u32>(), 1..64),
        node_keys in prop::collection::vec(any::<u32>(), 1..16),
    ) {
        let plan = spec.plan(&nodes, &tasks);
        let again = spec.plan(&shuffled(&nodes, &node_keys), &shuffled(&tasks, &keys));
        prop_assert_eq!(plan, again);
    }

    /// (f) A node joining moves nothing that runs.
    #[test]
    fn a_joining_node_changes_no_kept_slot(
        nodes in nodes_strategy(),
        spec in spec_strategy(),
        tasks in tasks_strategy(),
        new in node_strategy(20),
    ) {
        let before = spec.plan(&nodes, &tasks);
        let mut more = nodes.clone();
        more.push(mesh_planner::Node { ready: true, ..new });
        let after = spec.plan(&more, &tasks);
        let after = placements(&after);
        for s in &before.slots {
            if let SlotPlacement::Kept { .. } = &s.placement {
                prop_assert_eq!(after.get(&s.slot), Some(&s.placement), "slot {} changed", s.slot);
            }
        }
    }

    /// (g) Carrying the plans out reaches a fixpoint: one live task per wanted slot (none if
    /// it is pending or held by a finished task), nothing live outside the wanted slots.
    #[test]
    fn carrying_plans_out_converges(nodes in nodes_strategy(), spec in spec_strategy(), tasks in tasks_strategy()) {
        let mut tasks = tasks;
        let slots = wanted(&spec, &nodes).len() as u64;
        let rounds = 3 * slots + 10;
        let mut settled = None;
        for round in 0..rounds {
            let plan = spec.plan(&nodes, &tasks);
            check_plan(&spec, &nodes, &tasks, &plan)?;
            if !apply(&spec, &plan, &mut tasks, round) {
                settled = Some(plan);
                break;
            }
        }
        let Some(plan) = settled else {
            return Err(TestCaseError::fail(format!("no fixpoint after {rounds} rounds: {:?}", spec.plan(&nodes, &tasks))));
        };
        prop_assert!(starts(&plan).is_empty() && plan.stops.is_empty(), "a fixpoint starts and stops nothing");
        let mut live = live_by_slot(&spec, &nodes, &tasks);
        for s in &plan.slots {
            let here = live.remove(&s.slot).unwrap_or_default();
            match &s.placement {
                SlotPlacement::Kept { task, .. } => {
                    let held = tasks.iter().any(|t| &t.id == task && !t.is_live());
                    let ids: Vec<&str> = here.iter().map(|t| t.id.as_str()).collect();
                    if held {
                        prop_assert!(ids.is_empty(), "slot {} held by {task} also runs {ids:?}", s.slot);
                    } else {
                        prop_assert_eq!(ids, vec![task.as_str()], "slot {}", s.slot);
                    }
                }
                SlotPlacement::Pending { .. } => {
                    prop_assert!(here.is_empty(), "pending slot {} runs {:?}", s.slot, here);
                }
                SlotPlacement::Start { .. } => unreachable!("no starts at the fixpoint"),
                SlotPlacement::Stopping { .. } => unreachable!("no stops at the fixpoint"),
            }
        }
        prop_assert!(live.is_empty(), "live tasks outside the wanted slots: {live:?}");
        // Converged means current: every live task runs the current template.
        for t in tasks.iter().filter(|t| t.service == spec.name && t.is_live()) {
            if nodes.iter().any(|n| n.name == t.node && n.ready) {
                prop_assert!(t.template >= spec.template, "outdated task left: {:?}", t);
            }
        }
    }
}
