//! Scenarios a Swarm operator knows, held to the planner's rules.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use mesh_planner::{DesiredState, Slot, SlotPlacement, Task, TaskState};

fn kept(node: &str, task: &str) -> SlotPlacement {
    SlotPlacement::Kept {
        node: node.into(),
        task: task.into(),
    }
}

fn start(node: &str) -> SlotPlacement {
    SlotPlacement::Start { node: node.into() }
}

fn counts(it: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in it {
        *m.entry(n).or_default() += 1;
    }
    m
}

#[test]
fn three_replicas_on_three_nodes_run_one_per_node() {
    let plan = Spec::replicated(3).plan(&nodes(3), &[]);
    let s = starts(&plan);
    assert_eq!(
        s.iter().map(|(slot, _)| slot.clone()).collect::<Vec<_>>(),
        vec![Slot::Replica(1), Slot::Replica(2), Slot::Replica(3)]
    );
    let on: BTreeSet<&str> = s.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(on, BTreeSet::from(["n1", "n2", "n3"]));
    assert!(plan.stops.is_empty());
    assert_eq!(plan.pending_reason(), None);
}

#[test]
fn scaling_up_fills_the_emptiest_nodes_and_moves_nothing() {
    let tasks = vec![
        replica("a", 1, "n1", 1),
        replica("b", 2, "n2", 1),
        replica("c", 3, "n3", 1),
    ];
    let plan = Spec::replicated(5).plan(&nodes(3), &tasks);
    let p = placements(&plan);
    assert_eq!(p[&Slot::Replica(1)], kept("n1", "a"));
    assert_eq!(p[&Slot::Replica(2)], kept("n2", "b"));
    assert_eq!(p[&Slot::Replica(3)], kept("n3", "c"));
    let s = starts(&plan);
    assert_eq!(s.len(), 2);
    assert_ne!(s[0].1, s[1].1, "the two new slots go to different nodes");
    let mut per: Vec<usize> = per_node(&plan).into_values().collect();
    per.sort();
    assert_eq!(per, vec![1, 2, 2]);
    assert!(
        plan.stops.is_empty(),
        "nothing that runs stops: {:?}",
        plan.stops
    );
}

#[test]
fn scaling_down_stops_the_highest_slots() {
    let tasks = vec![
        replica("a", 1, "n1", 1),
        replica("b", 2, "n2", 1),
        replica("c", 3, "n3", 1),
        replica("d", 4, "n1", 2),
        replica("e", 5, "n2", 2),
    ];
    let plan = Spec::replicated(1).plan(&nodes(3), &tasks);
    assert_eq!(plan.slots.len(), 1);
    assert_eq!(placements(&plan)[&Slot::Replica(1)], kept("n1", "a"));
    let mut s = stopped(&plan);
    s.sort();
    assert_eq!(s, vec!["b", "c", "d", "e"]);
    for stop in &plan.stops {
        assert!(stop.reason.contains("scaled down"), "{}", stop.reason);
    }
}

#[test]
fn global_runs_one_task_per_eligible_node() {
    let mut ns: Vec<_> = (1..=4)
        .map(|i| labelled(&format!("n{i}"), &[("web", "yes")]))
        .collect();
    let spec = Spec::global().constraint("node.labels.web==yes");
    let plan = spec.plan(&ns, &[]);
    let s = starts(&plan);
    assert_eq!(s.len(), 4);
    for (slot, node) in &s {
        assert_eq!(*slot, Slot::Node(node.clone()), "the slot is the node's");
    }

    // They run; a fifth node joins: it alone gets a task.
    let mut tasks: Vec<_> = (1..=4)
        .map(|i| {
            let n = format!("n{i}");
            task(&format!("t{i}"), Slot::Node(n.clone()), &n, 1)
        })
        .collect();
    ns.push(labelled("n5", &[("web", "yes")]));
    let plan = spec.plan(&ns, &tasks);
    assert_eq!(starts(&plan), vec![(Slot::Node("n5".into()), "n5".into())]);
    assert_eq!(plan.slots.len(), 5);
    assert!(plan.stops.is_empty());
    tasks.push(task("t5", Slot::Node("n5".into()), "n5", 2));

    // n3 loses the label: its task stops, nothing replaces it.
    ns[2].labels.clear();
    let plan = spec.plan(&ns, &tasks);
    assert_eq!(plan.slots.len(), 4);
    assert!(!placements(&plan).contains_key(&Slot::Node("n3".into())));
    assert!(starts(&plan).is_empty());
    assert_eq!(stopped(&plan), vec!["t3"]);
    assert!(
        plan.stops[0].reason.contains("node.labels.web==yes"),
        "{}",
        plan.stops[0].reason
    );
}

#[test]
fn a_constraint_no_node_matches_leaves_every_slot_pending() {
    let spec = Spec::replicated(2).constraint("node.labels.env==production");
    let plan = spec.plan(&nodes(3), &[]);
    assert_eq!(plan.slots.len(), 2);
    for s in &plan.slots {
        assert_eq!(
            s.placement,
            SlotPlacement::Pending {
                reason: "no suitable node: 0 of 3 nodes match node.labels.env==production".into()
            }
        );
    }
    assert!(plan.stops.is_empty());
}

#[test]
fn a_drained_nodes_slot_moves_start_first() {
    let mut ns = nodes(3);
    let spec = Spec::replicated(3);
    let mut tasks = vec![
        replica("a", 1, "n1", 1),
        replica("b", 2, "n2", 1),
        replica("c", 3, "n3", 1),
    ];
    ns[0].active = false;
    // Round 1: slot 1 is started elsewhere; the drained task keeps serving.
    let plan = spec.plan(&ns, &tasks);
    let s = starts(&plan);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].0, Slot::Replica(1));
    assert_ne!(s[0].1, "n1");
    assert!(plan.stops.is_empty(), "start first: {:?}", plan.stops);
    let to = s[0].1.clone();

    // Round 2: the replacement is starting: still nothing stops.
    let mut new = replica("a2", 1, &to, 5);
    new.state = TaskState::Starting;
    tasks.push(new);
    let plan = spec.plan(&ns, &tasks);
    assert_eq!(placements(&plan)[&Slot::Replica(1)], kept(&to, "a2"));
    assert!(plan.stops.is_empty(), "{:?}", plan.stops);
    assert!(starts(&plan).is_empty());

    // Round 3: it runs: now the drained node's task stops.
    tasks[3].state = TaskState::Running;
    let plan = spec.plan(&ns, &tasks);
    assert_eq!(placements(&plan)[&Slot::Replica(1)], kept(&to, "a2"));
    assert_eq!(stopped(&plan), vec!["a"]);
    assert_eq!(plan.stops[0].node, "n1");
    assert!(starts(&plan).is_empty());
}

#[test]
fn a_drained_nodes_task_stops_at_once_when_no_node_can_take_it() {
    let mut ns = nodes(2);
    ns[0].active = false;
    let spec = Spec::replicated(2).max_per_node(1);
    let tasks = vec![replica("a", 1, "n1", 1), replica("b", 2, "n2", 1)];
    let plan = spec.plan(&ns, &tasks);
    let p = placements(&plan);
    assert_eq!(p[&Slot::Replica(2)], kept("n2", "b"));
    let SlotPlacement::Pending { reason } = &p[&Slot::Replica(1)] else {
        panic!("slot 1 should be pending: {:?}", p[&Slot::Replica(1)]);
    };
    assert!(reason.contains("1 node is drained"), "{reason}");
    assert!(reason.contains("max replicas per node"), "{reason}");
    assert_eq!(stopped(&plan), vec!["a"]);
}

#[test]
fn a_down_nodes_slot_is_placed_elsewhere_and_its_task_is_left_alone() {
    let mut ns = nodes(3);
    ns[1].ready = false;
    let tasks = vec![replica("a", 1, "n1", 1), replica("b", 2, "n2", 1)];
    let plan = Spec::replicated(2).plan(&ns, &tasks);
    let p = placements(&plan);
    assert_eq!(p[&Slot::Replica(1)], kept("n1", "a"));
    assert_eq!(p[&Slot::Replica(2)], start("n3"), "the emptiest live node");
    assert!(
        plan.stops.is_empty(),
        "a down node is not asked to stop anything"
    );
}

#[test]
fn max_replicas_per_node_holds_and_says_why_slots_wait() {
    let spec = Spec::replicated(5).max_per_node(2);
    let plan = spec.plan(&nodes(2), &[]);
    assert_eq!(
        per_node(&plan),
        BTreeMap::from([("n1".into(), 2), ("n2".into(), 2)])
    );
    assert_eq!(
        placements(&plan)[&Slot::Replica(5)],
        SlotPlacement::Pending {
            reason: "no suitable node: 2 nodes already run 2 tasks of the service (max replicas per node)".into()
        }
    );
}

#[test]
fn spread_balances_over_label_values_with_unlabelled_nodes_as_one_more() {
    let ns = vec![
        labelled("a1", &[("zone", "a")]),
        labelled("a2", &[("zone", "a")]),
        labelled("a3", &[("zone", "a")]),
        labelled("b1", &[("zone", "b")]),
        node("x1"),
    ];
    let plan = Spec::replicated(6)
        .spread("spread=node.labels.zone")
        .plan(&ns, &[]);
    let zone = |n: &str| n[..1].to_owned();
    let by_zone = counts(starts(&plan).into_iter().map(|(_, n)| zone(&n)));
    assert_eq!(
        by_zone,
        BTreeMap::from([("a".into(), 2), ("b".into(), 2), ("x".into(), 2)])
    );
    // Within zone a, the two go to different nodes.
    let in_a: BTreeSet<String> = starts(&plan)
        .into_iter()
        .map(|(_, n)| n)
        .filter(|n| n.starts_with('a'))
        .collect();
    assert_eq!(in_a.len(), 2);
}

#[test]
fn a_node_that_comes_back_gets_nothing_moved_to_it() {
    let mut ns = nodes(3);
    // n1 was down; its slot moved to n3, and n1's own task ended with it.
    let tasks = vec![
        replica("b", 2, "n2", 1),
        replica("c", 3, "n3", 1),
        replica("a2", 1, "n3", 5),
    ];
    ns[0].ready = false;
    let before = Spec::replicated(3).plan(&ns, &tasks);
    ns[0].ready = true;
    let after = Spec::replicated(3).plan(&ns, &tasks);
    assert_eq!(before, after);
    assert_eq!(placements(&after)[&Slot::Replica(1)], kept("n3", "a2"));
    assert_eq!(after.starts_on("n1").count(), 0);
    assert!(after.stops.is_empty());
}

#[test]
fn duplicates_of_a_slot_keep_one_and_the_same_one_in_any_order() {
    let spec = Spec::replicated(2);
    let mut tasks = vec![
        replica("x", 1, "n1", 3),
        replica("y", 1, "n2", 3),
        replica("z", 1, "n3", 4),
        replica("w", 2, "n2", 1),
    ];
    let mut seen = Vec::new();
    // Every rotation and its reverse.
    for r in 0..tasks.len() {
        for rev in [false, true] {
            let mut t = tasks.clone();
            t.rotate_left(r);
            if rev {
                t.reverse();
            }
            let plan = spec.plan(&nodes(3), &t);
            let SlotPlacement::Kept { task, .. } = &placements(&plan)[&Slot::Replica(1)] else {
                panic!("slot 1 is kept");
            };
            let mut s = stopped(&plan);
            s.sort();
            let mut expect: Vec<&str> = ["x", "y", "z"]
                .into_iter()
                .filter(|id| id != task)
                .collect();
            expect.sort();
            assert_eq!(s, expect, "the losers stop");
            seen.push(plan);
        }
    }
    assert!(
        seen.windows(2).all(|w| w[0] == w[1]),
        "the same plan from every order"
    );
    // Newest wins, as in Swarm (a node that comes back finds its slot taken): z on n3.
    let plan = spec.plan(&nodes(3), &tasks);
    assert_eq!(placements(&plan)[&Slot::Replica(1)], kept("n3", "z"));
    // A task running the current template beats a newer one still on the old template; equal
    // ages go by node name.
    tasks[2].template = 0;
    let plan = spec.plan(&nodes(3), &tasks);
    assert_eq!(placements(&plan)[&Slot::Replica(1)], kept("n1", "x"));
}

#[test]
fn a_finished_task_holding_its_slot_keeps_it_until_the_template_changes() {
    let mut done = replica("a", 1, "n1", 1);
    done.state = TaskState::Complete;
    done.holds_slot = true;
    let tasks = vec![done, replica("b", 2, "n2", 1)];
    let mut spec = Spec::replicated(2);
    let plan = spec.plan(&nodes(3), &tasks);
    assert_eq!(placements(&plan)[&Slot::Replica(1)], kept("n1", "a"));
    assert!(starts(&plan).is_empty());
    assert!(plan.stops.is_empty());

    spec.template = 2;
    let plan = spec.plan(&nodes(3), &tasks);
    assert!(
        matches!(
            placements(&plan)[&Slot::Replica(1)],
            SlotPlacement::Start { .. }
        ),
        "{plan:?}"
    );
}

#[test]
fn a_template_change_rolls_one_slot_at_a_time_start_first_in_slot_order() {
    let ns = nodes(3);
    let mut spec = Spec::replicated(3);
    let mut tasks = vec![
        replica("a", 1, "n1", 1),
        replica("b", 2, "n2", 1),
        replica("c", 3, "n3", 1),
    ];
    spec.template = 2;
    for (slot, old) in [(1, "a"), (2, "b"), (3, "c")] {
        // The slot's replacement starts; every other old task keeps its slot.
        let plan = spec.plan(&ns, &tasks);
        let s = starts(&plan);
        assert_eq!(s.len(), 1, "one slot at a time: {plan:?}");
        assert_eq!(s[0].0, Slot::Replica(slot), "in slot order");
        assert!(
            !stopped(&plan).contains(&old),
            "start first: {old} serves until its replacement runs"
        );
        let mut new = replica(&format!("{old}2"), slot, &s[0].1, 10 + slot as u64);
        new.template = 2;
        new.state = TaskState::Starting;
        tasks.push(new);
        tasks.retain(|t| !plan.stops.iter().any(|s| s.task == t.id));

        // Coming up: the next slot waits, the old task serves.
        let plan = spec.plan(&ns, &tasks);
        assert!(starts(&plan).is_empty(), "{plan:?}");
        assert!(plan.stops.is_empty(), "{:?}", plan.stops);

        // Running: the old task stops.
        tasks.last_mut().unwrap().state = TaskState::Running;
        let plan = spec.plan(&ns, &tasks);
        assert_eq!(stopped(&plan), vec![old]);
        assert!(
            plan.stops[0].reason.contains("updated"),
            "{}",
            plan.stops[0].reason
        );
        tasks.retain(|t| t.id != old);
    }
    let plan = spec.plan(&ns, &tasks);
    assert!(starts(&plan).is_empty() && plan.stops.is_empty());
    assert!(tasks.iter().all(|t| t.template == 2));
}

#[test]
fn tasks_of_other_services_only_break_ties() {
    let other = |id: &str, node: &str| {
        let mut t = replica(id, 1, node, 1);
        t.service = "db".into();
        t
    };
    // A tie among empty nodes: the one without other work wins.
    let tasks = vec![other("o1", "n1"), other("o2", "n2")];
    let plan = Spec::replicated(1).plan(&nodes(3), &tasks);
    assert_eq!(starts(&plan), vec![(Slot::Replica(1), "n3".into())]);
    assert!(
        plan.stops.is_empty(),
        "other services' tasks are never stopped"
    );

    // No tie: the service's own spread comes first, however busy n1 is.
    let mut tasks: Vec<_> = (0..10).map(|i| other(&format!("o{i}"), "n1")).collect();
    tasks.push(replica("a", 1, "n2", 1));
    let plan = Spec::replicated(2).plan(&nodes(2), &tasks);
    assert_eq!(starts(&plan), vec![(Slot::Replica(2), "n1".into())]);
}

#[test]
fn a_lowered_per_node_limit_moves_the_extra_task_once() {
    // Two tasks on n1, then max 1 per node: one slot moves to n2, start first, and the
    // plan settles instead of starting a new copy every round.
    let spec = Spec::replicated(2).max_per_node(1);
    let ns = nodes(2);
    let mut tasks = vec![replica("a", 1, "n1", 1), replica("b", 2, "n1", 1)];
    let plan = spec.plan(&ns, &tasks);
    assert_eq!(placements(&plan)[&Slot::Replica(1)], kept("n1", "a"));
    assert_eq!(placements(&plan)[&Slot::Replica(2)], start("n2"));
    assert!(plan.stops.is_empty(), "start first");
    tasks.push(replica("b2", 2, "n2", 5));
    let plan = spec.plan(&ns, &tasks);
    assert_eq!(placements(&plan)[&Slot::Replica(2)], kept("n2", "b2"));
    assert_eq!(stopped(&plan), vec!["b"]);
    assert!(starts(&plan).is_empty());
}

#[test]
fn a_per_node_limit_of_zero_means_no_limit_as_in_swarm() {
    for spec in [
        Spec::replicated(4).max_per_node(0),
        Spec::global().max_per_node(0),
    ] {
        let plan = spec.plan(&nodes(2), &[]);
        assert_eq!(plan.pending_reason(), None, "{plan:?}");
        let mut tasks = Vec::new();
        apply(&spec, &plan, &mut tasks, 1);
        let plan = spec.plan(&nodes(2), &tasks);
        assert!(starts(&plan).is_empty(), "running tasks are kept: {plan:?}");
        assert!(plan.stops.is_empty());
    }
}

#[test]
fn an_update_keeps_the_per_node_limit_while_old_tasks_wait() {
    // Three old tasks on n1 when the template changes and the limit becomes 1: slot 1 is
    // replaced first; the old tasks that wait keep no more slots on n1 than the limit.
    let mut spec = Spec::replicated(3).max_per_node(1);
    spec.template = 2;
    let tasks = vec![
        replica("a", 1, "n1", 1),
        replica("b", 2, "n1", 1),
        replica("c", 3, "n1", 1),
    ];
    let plan = spec.plan(&nodes(3), &tasks);
    for (node, n) in per_node(&plan) {
        assert!(n <= 1, "{node} holds {n} slots: {plan:?}");
    }
}

#[test]
fn a_global_slot_is_only_held_by_a_task_on_its_own_node() {
    // A finished record that names n2's slot but ran on n1 (a stale or mangled record) must
    // not keep n2's slot on n1.
    let mut odd = task("odd", Slot::Node("n2".into()), "n1", 1);
    odd.state = TaskState::Complete;
    odd.holds_slot = true;
    let plan = Spec::global().plan(&nodes(2), &[odd]);
    assert_eq!(placements(&plan)[&Slot::Node("n2".into())], start("n2"));
    assert_eq!(placements(&plan)[&Slot::Node("n1".into())], start("n1"));
}

#[test]
fn updates_go_in_waves_of_parallelism_with_the_delay_between() {
    let ns = nodes(4);
    let mut spec = Spec::replicated(4);
    spec.update.parallelism = 2;
    spec.update.delay_ms = 2_000;
    let mut tasks: Vec<mesh_planner::Task> = (1..=4)
        .map(|i| replica(&format!("old{i}"), i, &format!("n{i}"), 1))
        .collect();
    spec.template = 2;
    spec.now_ms = 10_000;
    let plan = spec.plan(&ns, &tasks);
    let first: Vec<Slot> = starts(&plan).into_iter().map(|(s, _)| s).collect();
    assert_eq!(first, vec![Slot::Replica(1), Slot::Replica(2)], "{plan:?}");
    for (slot, node) in starts(&plan) {
        let Slot::Replica(n) = slot else {
            unreachable!()
        };
        let mut t = replica(&format!("new{n}"), n, &node, 10_000);
        t.template = 2;
        t.state = TaskState::Running;
        t.running_ms = Some(10_500);
        tasks.push(t);
    }
    // Running, but not for the delay yet: the old tasks of slots 1 and 2 stop, 3 and 4 wait.
    spec.now_ms = 11_000;
    let plan = spec.plan(&ns, &tasks);
    assert!(starts(&plan).is_empty(), "{plan:?}");
    let mut s = stopped(&plan);
    s.sort();
    assert_eq!(s, vec!["old1", "old2"]);
    tasks.retain(|t| !plan.stops.iter().any(|s| s.task == t.id));
    // The delay has passed: the second wave.
    spec.now_ms = 12_600;
    let plan = spec.plan(&ns, &tasks);
    let second: Vec<Slot> = starts(&plan).into_iter().map(|(s, _)| s).collect();
    assert_eq!(second, vec![Slot::Replica(3), Slot::Replica(4)], "{plan:?}");
    // Paused: nothing more is replaced.
    spec.paused = true;
    assert!(starts(&spec.plan(&ns, &tasks)).is_empty());
}

#[test]
fn stop_first_stops_the_old_task_before_its_replacement_starts() {
    let ns = nodes(2);
    let mut spec = Spec::replicated(2);
    spec.update.order = mesh_planner::UpdateOrder::StopFirst;
    let mut tasks = vec![replica("a", 1, "n1", 1), replica("b", 2, "n2", 1)];
    spec.template = 2;
    let plan = spec.plan(&ns, &tasks);
    assert!(
        starts(&plan).is_empty(),
        "nothing starts beside the old task: {plan:?}"
    );
    assert_eq!(stopped(&plan), vec!["a"]);
    assert_eq!(
        placements(&plan)[&Slot::Replica(1)],
        SlotPlacement::Stopping {
            node: "n1".into(),
            task: "a".into()
        }
    );
    assert_eq!(
        plan.pending_reason(),
        None,
        "a stopping slot is not pending"
    );
    // Its node marks it shut down; the slot is placed, and slot 2 still waits.
    tasks[0].desired = mesh_planner::DesiredState::Shutdown;
    tasks[0].state = TaskState::Shutdown;
    let plan = spec.plan(&ns, &tasks);
    assert_eq!(starts(&plan).len(), 1, "{plan:?}");
    assert_eq!(starts(&plan)[0].0, Slot::Replica(1));
    assert!(plan.stops.is_empty(), "slot 2 waits its turn: {plan:?}");
}

#[test]
fn update_progress_counts_updated_slots_and_failures_in_the_monitor_window() {
    let ns = nodes(2);
    let mut spec = Spec::replicated(2);
    spec.template = 2;
    let mut new = replica("n1new", 1, "n1", 100);
    new.template = 2;
    new.running_ms = Some(200);
    let mut failed = replica("n2new", 2, "n2", 100);
    failed.template = 2;
    failed.state = TaskState::Failed;
    failed.desired = mesh_planner::DesiredState::Shutdown;
    failed.running_ms = Some(200);
    failed.since_ms = 1_000;
    failed.error = Some("task: non-zero exit (1)".into());
    let old = replica("old2", 2, "n2", 1);
    let tasks = vec![new, failed, old];
    spec.now_ms = 300;
    let plan = spec.plan(&ns, &tasks);
    let p = mesh_planner::progress(&plan, &tasks, "web", 2, &spec.update, 50, spec.now_ms);
    assert_eq!((p.total, p.updated), (2, 1));
    assert_eq!(p.failed.len(), 1);
    assert_eq!(p.failed[0].error, "task: non-zero exit (1)");
    assert!(p.over_ratio(&spec.update), "ratio 0 tolerates nothing");
    assert!(!p.done);
    let tolerant = mesh_planner::UpdateConfig {
        max_failure_ratio: "0.5".parse().unwrap(),
        ..spec.update
    };
    assert!(!p.over_ratio(&tolerant), "1 of 2 is not more than 0.5");
    // A failure from before the update started is not this update's.
    let p = mesh_planner::progress(&plan, &tasks, "web", 2, &spec.update, 150, spec.now_ms);
    assert!(p.failed.is_empty());
}

const MIB: u64 = 1 << 20;
const CPU: u64 = 1_000_000_000;

/// `n` ready nodes with `cpus` CPUs and `mib` MiB each.
fn sized(n: usize, cpus: u64, mib: u64) -> Vec<mesh_planner::Node> {
    nodes(n)
        .into_iter()
        .map(|mut node| {
            node.capacity = mesh_planner::Resources {
                nano_cpus: cpus * CPU,
                memory_bytes: mib * MIB,
            };
            node
        })
        .collect()
}

#[test]
fn reservations_fill_nodes_and_the_rest_pend_saying_why() {
    // 1 GiB nodes, 400 MiB a task: two fit on each of three nodes, the seventh waits.
    let spec = Spec::replicated(7).reserve(0, 400 * MIB);
    let plan = spec.plan(&sized(3, 4, 1024), &[]);
    assert_eq!(
        per_node(&plan).values().copied().collect::<Vec<_>>(),
        [2, 2, 2]
    );
    assert_eq!(
        placements(&plan)[&Slot::Replica(7)],
        SlotPlacement::Pending {
            reason: "no suitable node: insufficient memory on 3 nodes".into()
        }
    );
    // Other services' tasks hold their part: 800 MiB of n1 is taken, so n1 takes none.
    let mut db = replica("db1", 1, "n1", 1);
    db.service = "db".into();
    db.reservation.memory_bytes = 800 * MIB;
    let plan = Spec::replicated(4)
        .reserve(0, 400 * MIB)
        .plan(&sized(3, 4, 1024), &[db]);
    assert_eq!(per_node(&plan).get("n1"), None, "{plan:?}");
    assert_eq!(plan.pending_reason(), None);
}

#[test]
fn cpu_and_memory_each_limit_and_both_together_say_resources() {
    let mut busy = sized(3, 2, 1024);
    // n1 has no CPU left, n2 no memory, n3 neither.
    let tasks: Vec<_> = [
        ("a", "n1", 2 * CPU, 0),
        ("b", "n2", 0, 1024 * MIB),
        ("c", "n3", 2 * CPU, 1024 * MIB),
    ]
    .into_iter()
    .map(|(id, node, cpu, mem)| {
        let mut t = replica(id, 1, node, 1);
        t.service = "db".into();
        t.reservation = mesh_planner::Resources {
            nano_cpus: cpu,
            memory_bytes: mem,
        };
        t
    })
    .collect();
    let plan = Spec::replicated(1)
        .reserve(CPU / 2, MIB)
        .plan(&busy, &tasks);
    assert_eq!(
        plan.pending_reason(),
        Some(
            "no suitable node: insufficient CPU on 1 node; insufficient memory on 1 node; insufficient resources on 1 node"
        )
    );
    // A service that reserves nothing goes anywhere, full or not.
    let plan = Spec::replicated(3).plan(&busy, &tasks);
    assert_eq!(starts(&plan).len(), 3);
    // A node that advertises nothing (an older agent) is not limited.
    busy[2].capacity = Default::default();
    let plan = Spec::replicated(1)
        .reserve(CPU / 2, MIB)
        .plan(&busy, &tasks);
    assert_eq!(starts(&plan), vec![(Slot::Replica(1), "n3".into())]);
}

#[test]
fn a_reservation_larger_than_every_node_says_so() {
    let plan = Spec::replicated(1)
        .reserve(0, 64 << 30)
        .plan(&sized(3, 2, 2048), &[]);
    assert_eq!(
        plan.pending_reason(),
        Some(
            "no suitable node: insufficient memory on 3 nodes (no node has 64GiB of memory: \
             the largest has 2GiB)"
        )
    );
    let plan = Spec::replicated(1)
        .reserve(8 * CPU, 0)
        .plan(&sized(2, 2, 2048), &[]);
    assert_eq!(
        plan.pending_reason(),
        Some(
            "no suitable node: insufficient CPU on 2 nodes (no node has 8 CPUs: the largest has 2)"
        )
    );
}

#[test]
fn after_the_spread_the_node_with_the_most_left_wins() {
    // Both nodes run no task of web; n1's other work reserves half of it, n2's a quarter:
    // n2 has more left, although it runs more tasks.
    let other = |id: &str, node: &str, mib: u64| {
        let mut t = replica(id, 1, node, 1);
        t.service = format!("db-{id}");
        t.reservation.memory_bytes = mib * MIB;
        t
    };
    let tasks = vec![
        other("a", "n1", 512),
        other("b", "n2", 128),
        other("c", "n2", 128),
    ];
    let plan = Spec::replicated(1)
        .reserve(0, 100 * MIB)
        .plan(&sized(2, 2, 1024), &tasks);
    assert_eq!(starts(&plan), vec![(Slot::Replica(1), "n2".into())]);
    // The service's own spread still comes first.
    let mut tasks = tasks;
    let mut mine = replica("w", 1, "n2", 1);
    mine.reservation.memory_bytes = 100 * MIB;
    tasks.push(mine);
    let plan = Spec::replicated(2)
        .reserve(0, 100 * MIB)
        .plan(&sized(2, 2, 1024), &tasks);
    assert_eq!(starts(&plan), vec![(Slot::Replica(2), "n1".into())]);
}

#[test]
fn a_global_task_that_does_not_fit_its_node_pends() {
    let mut hosts = sized(2, 2, 1024);
    hosts[1].capacity.memory_bytes = 256 * MIB;
    let plan = Spec::global().reserve(0, 512 * MIB).plan(&hosts, &[]);
    let p = placements(&plan);
    assert_eq!(p[&Slot::Node("n1".into())], start("n1"));
    assert_eq!(
        p[&Slot::Node("n2".into())],
        SlotPlacement::Pending {
            reason: "no suitable node: insufficient memory on 1 node (no node has 512MiB of \
                     memory: the largest has 256MiB)"
                .into()
        }
    );
}

#[test]
fn services_planned_in_one_pass_do_not_share_the_last_room() {
    // One node with room for one 600 MiB task; api and web both want it. Planned alone
    // each would start there; planned together (as the orchestrator does), api, first by
    // name, gets it and web waits — on every node alike.
    let hosts = sized(1, 2, 1024);
    let web = Spec::replicated(1).reserve(0, 600 * MIB);
    let mut api = web.clone();
    api.name = "api".into();
    assert_eq!(starts(&web.plan(&hosts, &[])).len(), 1);
    let cluster = mesh_planner::Cluster {
        nodes: &hosts,
        tasks: &[],
        now_ms: web.now_ms,
    };
    let plans = mesh_planner::plan_all(&cluster, &[web.service(), api.service()]);
    assert_eq!(
        plans[0].pending_reason(),
        Some("no suitable node: insufficient memory on 1 node")
    );
    assert_eq!(starts(&plans[1]), vec![(Slot::Replica(1), "n1".into())]);
}

#[test]
fn scaling_down_frees_room_for_a_pending_task() {
    let hosts = sized(1, 2, 1024);
    let mut db = replica("db1", 1, "n1", 1);
    db.service = "db".into();
    db.reservation.memory_bytes = 800 * MIB;
    let spec = Spec::replicated(1).reserve(0, 400 * MIB);
    assert!(spec.plan(&hosts, &[db.clone()]).pending_reason().is_some());
    // db's task stopped (desired shutdown): its reservation is free at once.
    db.desired = mesh_planner::DesiredState::Shutdown;
    assert_eq!(
        starts(&spec.plan(&hosts, &[db])),
        vec![(Slot::Replica(1), "n1".into())]
    );
}

/// Found by the convergence property: a global service whose new template reserves more
/// memory than one node has. That node's slot is pending, and it once counted as an update
/// in flight because another node had room, so the update never reached the node that fits.
#[test]
fn a_global_update_is_not_held_by_a_node_too_small_for_the_new_template() {
    let mut small = node("n0");
    small.capacity.memory_bytes = 64 << 20;
    let nodes = vec![small, node("n6")];
    let mut spec = Spec::global().reserve(0, 128 << 20);
    spec.template = 2;
    spec.update = Default::default();
    let mut gone = task("t0", Slot::Node("n0".into()), "n0", 0);
    gone.desired = DesiredState::Shutdown;
    gone.state = TaskState::New;
    let mut tasks = vec![gone, task("t1", Slot::Node("n6".into()), "n6", 0)];
    for round in 0..5 {
        let plan = spec.plan(&nodes, &tasks);
        if !apply(&spec, &plan, &mut tasks, round) {
            break;
        }
    }
    let plan = spec.plan(&nodes, &tasks);
    let on_n6: Vec<&Task> = tasks.iter().filter(|t| t.node == "n6").collect();
    assert_eq!(on_n6.len(), 1, "{tasks:?}");
    assert_eq!(on_n6[0].template, 2, "n6 runs the new template: {tasks:?}");
    assert!(matches!(
        placements(&plan)[&Slot::Node("n0".into())],
        SlotPlacement::Pending { .. }
    ));
}
