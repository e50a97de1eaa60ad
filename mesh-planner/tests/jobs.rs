//! Jobs: a replicated job runs until its completions are done, never more than
//! max-concurrent at a time; a global job completes once per eligible node; completed tasks
//! are never restarted, and a new run starts over.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use mesh_planner::{
    AfterExit, DesiredState, JobProgress, Node, RestartCondition, RestartPolicy, ServiceMode, Slot,
    SlotPlacement, Task, TaskState, after_exit, job,
};
use proptest::prelude::*;

/// A task that exited 0 and holds its slot, as its node records it.
fn complete(mut t: Task) -> Task {
    t.state = TaskState::Complete;
    t.desired = DesiredState::Shutdown;
    t.exit_code = Some(0);
    t.holds_slot = true;
    t
}

fn failed_for_good(mut t: Task) -> Task {
    t.state = TaskState::Failed;
    t.desired = DesiredState::Shutdown;
    t.exit_code = Some(1);
    t.holds_slot = true;
    t
}

#[test]
fn a_replicated_job_runs_its_completions_max_concurrent_at_a_time() {
    let spec = Spec::replicated_job(3, 1);
    let nodes = nodes(3);
    let plan = spec.plan(&nodes, &[]);
    let s = starts(&plan);
    assert_eq!(s.len(), 1, "one at a time: {plan:?}");
    assert_eq!(s[0].0, Slot::Replica(1), "the lowest slot first");
    assert_eq!(plan.slots.len(), 1, "waiting slots are not in the plan yet");

    // Slot 1 runs: nothing else starts.
    let mut tasks = vec![replica("a", 1, "n1", 10)];
    assert!(starts(&spec.plan(&nodes, &tasks)).is_empty());
    // It completes: slot 2 starts, slot 1 keeps its completed task.
    tasks[0] = complete(tasks[0].clone());
    let plan = spec.plan(&nodes, &tasks);
    assert_eq!(
        starts(&plan).iter().map(|s| &s.0).collect::<Vec<_>>(),
        [&Slot::Replica(2)]
    );
    assert_eq!(
        placements(&plan)[&Slot::Replica(1)],
        SlotPlacement::Kept {
            node: "n1".into(),
            task: "a".into()
        }
    );
    // All three complete: nothing starts, nothing stops, every slot is kept.
    tasks.push(complete(replica("b", 2, "n2", 20)));
    tasks.push(complete(replica("c", 3, "n3", 30)));
    let plan = spec.plan(&nodes, &tasks);
    assert!(starts(&plan).is_empty() && plan.stops.is_empty());
    assert_eq!(plan.slots.len(), 3);
    assert_eq!(
        job::progress(spec.mode, &plan, &tasks),
        Some(JobProgress {
            running: 0,
            desired: 1,
            completed: 3,
            total: 3
        }),
        "Docker's `0/1 (3/3 completed)`"
    );
}

#[test]
fn max_concurrent_starts_that_many_and_spreads_them() {
    let spec = Spec::replicated_job(5, 2);
    let plan = spec.plan(&nodes(3), &[]);
    let s = starts(&plan);
    assert_eq!(
        s.iter().map(|s| s.0.clone()).collect::<Vec<_>>(),
        [Slot::Replica(1), Slot::Replica(2)]
    );
    assert_ne!(s[0].1, s[1].1, "spread over nodes");
    // Fewer completions than max-concurrent: only what is needed starts.
    assert_eq!(
        starts(&Spec::replicated_job(2, 5).plan(&nodes(3), &[])).len(),
        2
    );
    // No completions: nothing to do.
    assert!(
        Spec::replicated_job(0, 1)
            .plan(&nodes(3), &[])
            .slots
            .is_empty()
    );
}

#[test]
fn views_that_differ_in_other_services_place_the_next_slot_alike() {
    // Two nodes saw slot 1 complete; one also sees another service's tasks that the other
    // does not yet. Were that load a criterion, each could pick itself and both would run
    // slot 2 at once.
    let spec = Spec::replicated_job(3, 1);
    let nodes = nodes(3);
    let done = complete(replica("a", 1, "n1", 10));
    let quiet = vec![done.clone()];
    let busy: Vec<Task> = std::iter::once(done)
        .chain(
            ["n1", "n2", "n3"]
                .into_iter()
                .enumerate()
                .flat_map(|(i, n)| {
                    (0..=i).map(move |k| {
                        let mut t = replica(&format!("o{i}{k}"), k as u32 + 1, n, 5);
                        t.service = "other".into();
                        t
                    })
                }),
        )
        .collect();
    for node_ok in [&nodes[..], &nodes[1..]] {
        let a = starts(&spec.plan(node_ok, &quiet));
        let b = starts(&spec.plan(node_ok, &busy));
        assert_eq!(a.len(), 1);
        assert_eq!(a, b);
    }
}

#[test]
fn a_completed_slot_stops_its_duplicates_and_never_restarts() {
    let spec = Spec::replicated_job(2, 2);
    let nodes = nodes(2);
    // Diverging views started slot 1 twice; one copy completed.
    let tasks = vec![
        complete(replica("done", 1, "n1", 10)),
        replica("dup", 1, "n2", 20),
        replica("two", 2, "n2", 20),
    ];
    let plan = spec.plan(&nodes, &tasks);
    assert_eq!(stopped(&plan), ["dup"]);
    assert!(plan.stops[0].reason.contains("already completed"));
    assert!(starts(&plan).is_empty());
}

#[test]
fn a_failure_the_restart_policy_gave_up_on_keeps_its_turn() {
    // As Swarm counts it: the slot stays active and never completes.
    let spec = Spec::replicated_job(3, 1);
    let tasks = vec![failed_for_good(replica("f", 1, "n1", 10))];
    let plan = spec.plan(&nodes(2), &tasks);
    assert!(starts(&plan).is_empty(), "{plan:?}");
    assert_eq!(
        placements(&plan)[&Slot::Replica(1)],
        SlotPlacement::Kept {
            node: "n1".into(),
            task: "f".into()
        }
    );
}

#[test]
fn completions_count_on_nodes_that_are_down_or_drained() {
    let spec = Spec::replicated_job(2, 2);
    let mut nodes = nodes(3);
    nodes[0].ready = false;
    nodes[1].active = false;
    let tasks = vec![
        complete(replica("a", 1, "n1", 10)),
        complete(replica("b", 2, "n2", 10)),
    ];
    let plan = spec.plan(&nodes, &tasks);
    assert!(starts(&plan).is_empty(), "{plan:?}");
    assert_eq!(plan.slots.len(), 2);
}

#[test]
fn a_new_run_stops_the_old_tasks_and_starts_over() {
    let mut spec = Spec::replicated_job(2, 1);
    let nodes = nodes(2);
    let tasks = vec![
        complete(replica("a", 1, "n1", 10)),
        replica("b", 2, "n2", 20),
    ];
    spec.template = 2;
    let plan = spec.plan(&nodes, &tasks);
    assert_eq!(stopped(&plan), ["b"], "the old run's task stops at once");
    assert!(plan.stops[0].reason.contains("runs again"));
    assert_eq!(
        starts(&plan).iter().map(|s| &s.0).collect::<Vec<_>>(),
        [&Slot::Replica(1)],
        "the old completion does not count"
    );
}

#[test]
fn a_running_task_on_a_drained_node_stops_and_its_slot_goes_elsewhere() {
    let spec = Spec::replicated_job(1, 1);
    let mut nodes = nodes(2);
    nodes[0].active = false;
    let plan = spec.plan(&nodes, &[replica("a", 1, "n1", 10)]);
    assert_eq!(stopped(&plan), ["a"]);
    assert_eq!(starts(&plan), [(Slot::Replica(1), "n2".to_owned())]);
}

#[test]
fn a_job_that_fits_nowhere_says_why_for_its_turn_only() {
    let spec = Spec::replicated_job(3, 1).constraint("node.labels.env==prod");
    let plan = spec.plan(&nodes(2), &[]);
    assert_eq!(plan.slots.len(), 1);
    assert!(
        plan.pending_reason()
            .is_some_and(|r| r.contains("no suitable node"))
    );
}

#[test]
fn a_global_job_completes_once_per_eligible_node_and_on_nodes_that_join() {
    let spec = Spec::global_job();
    let mut nodes = nodes(3);
    nodes[2].active = false;
    let plan = spec.plan(&nodes, &[]);
    assert_eq!(
        starts(&plan),
        [
            (Slot::Node("n1".into()), "n1".to_owned()),
            (Slot::Node("n2".into()), "n2".to_owned())
        ],
        "all at once, not on the drained node"
    );
    let mut tasks = vec![
        complete(task("a", Slot::Node("n1".into()), "n1", 10)),
        complete(task("b", Slot::Node("n2".into()), "n2", 10)),
    ];
    let plan = spec.plan(&nodes, &tasks);
    assert!(starts(&plan).is_empty() && plan.stops.is_empty());
    assert_eq!(
        job::progress(spec.mode, &plan, &tasks),
        Some(JobProgress {
            running: 0,
            desired: 0,
            completed: 2,
            total: 2
        })
    );
    // n3 becomes active and n4 joins: each gets its one task; n1 is drained, its
    // completion stands.
    nodes[2].active = true;
    nodes[0].active = false;
    nodes.push(node("n4"));
    let plan = spec.plan(&nodes, &tasks);
    assert_eq!(
        starts(&plan),
        [
            (Slot::Node("n3".into()), "n3".to_owned()),
            (Slot::Node("n4".into()), "n4".to_owned())
        ]
    );
    tasks.push(task("c", Slot::Node("n3".into()), "n3", 20));
    let plan = spec.plan(&nodes, &tasks);
    assert_eq!(
        job::progress(spec.mode, &plan, &tasks),
        Some(JobProgress {
            running: 1,
            desired: 2,
            completed: 2,
            total: 4
        }),
        "Docker's `1/2 (2/4 completed)`"
    );
}

#[test]
fn a_job_task_that_completed_is_not_restarted_whatever_the_condition() {
    let t = complete(replica("a", 1, "n1", 10));
    let any = RestartPolicy::default();
    assert_eq!(any.condition, RestartCondition::Any);
    let job = any.for_mode(ServiceMode::GlobalJob);
    assert_eq!(job.condition, RestartCondition::OnFailure);
    assert_eq!(
        after_exit(&job, &t, false, 100),
        AfterExit::Hold { why: None }
    );
    assert!(matches!(
        after_exit(&job, &t, true, 100),
        AfterExit::Restart { .. }
    ));
    // Services keep theirs.
    assert_eq!(any.for_mode(ServiceMode::Global), any);
}

#[test]
fn modes_keep_their_gossiped_encodings() {
    let enc = |m: ServiceMode| serde_json::to_string(&m).unwrap();
    assert_eq!(
        enc(ServiceMode::Replicated { replicas: 3 }),
        r#"{"replicated":{"replicas":3}}"#
    );
    assert_eq!(enc(ServiceMode::Global), r#""global""#);
    let job = ServiceMode::ReplicatedJob {
        completions: 3,
        max_concurrent: 1,
    };
    assert_eq!(
        enc(job),
        r#"{"replicated-job":{"completions":3,"max_concurrent":1}}"#
    );
    assert_eq!(enc(ServiceMode::GlobalJob), r#""global-job""#);
    for m in [job, ServiceMode::GlobalJob, ServiceMode::Global] {
        assert_eq!(serde_json::from_str::<ServiceMode>(&enc(m)).unwrap(), m);
    }
}

// Properties.

fn job_nodes() -> impl Strategy<Value = Vec<Node>> {
    (1usize..=6).prop_flat_map(|n| {
        prop::collection::vec((prop::bool::weighted(0.85), prop::bool::weighted(0.85)), n).prop_map(
            |flags| {
                flags
                    .into_iter()
                    .enumerate()
                    .map(|(i, (ready, active))| {
                        let mut n = node(&format!("n{i}"));
                        n.ready = ready;
                        n.active = active;
                        n
                    })
                    .collect()
            },
        )
    })
}

/// Task records as gossip may hold them for a job: duplicates, both templates, every state.
fn job_tasks() -> impl Strategy<Value = Vec<Task>> {
    prop::collection::vec(
        (
            0usize..7,
            1u32..=8,
            1u64..=2,
            prop::sample::select(vec![
                TaskState::New,
                TaskState::Running,
                TaskState::Complete,
                TaskState::Failed,
                TaskState::Shutdown,
            ]),
            any::<bool>(),
            0u64..50,
        ),
        0..=20,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (node, slot, template, state, holds, created))| {
                let mut t = replica(&format!("t{i}"), slot, &format!("n{node}"), created);
                t.template = template;
                t.state = state;
                if state.is_terminal() {
                    t.desired = DesiredState::Shutdown;
                    t.holds_slot = holds || state == TaskState::Complete;
                }
                t
            })
            .collect()
    })
}

proptest! {
    /// Whatever the view: a plan never starts a slot that completed, never starts more than
    /// max-concurrent minus the slots already active, names each slot once and only slots
    /// of the job.
    #[test]
    fn a_job_plan_never_exceeds_max_concurrent(
        nodes in job_nodes(),
        tasks in job_tasks(),
        completions in 0u32..=8,
        max in 1u32..=4,
    ) {
        let spec = Spec::replicated_job(completions, max);
        let plan = spec.plan(&nodes, &tasks);
        let done: BTreeSet<Slot> = tasks
            .iter()
            .filter(|t| t.state == TaskState::Complete && t.template == spec.template)
            .map(|t| t.slot.clone())
            .collect();
        let mut seen = BTreeSet::new();
        let mut active = 0;
        let mut new = 0;
        for s in &plan.slots {
            prop_assert!(seen.insert(s.slot.clone()), "slot {} twice", s.slot);
            prop_assert!(matches!(s.slot, Slot::Replica(n) if n >= 1 && n <= completions));
            match &s.placement {
                SlotPlacement::Start { .. } | SlotPlacement::Pending { .. } => {
                    prop_assert!(!done.contains(&s.slot), "completed slot {} again", s.slot);
                    new += 1;
                }
                SlotPlacement::Kept { .. } if !done.contains(&s.slot) => active += 1,
                SlotPlacement::Kept { .. } => {}
                SlotPlacement::Stopping { .. } => prop_assert!(false, "jobs do not roll"),
            }
        }
        prop_assert!(
            new == 0 || active + new <= max as usize,
            "{active} active + {new} new > {max}: {plan:?}"
        );
    }

    /// Whatever the view: a global job starts only on eligible nodes, each in its own slot,
    /// and never on a node whose slot completed in this run.
    #[test]
    fn a_global_job_plan_runs_once_per_node(
        nodes in job_nodes(),
        tasks in job_tasks(),
    ) {
        let spec = Spec::global_job();
        let tasks: Vec<Task> = tasks
            .into_iter()
            .map(|mut t| {
                t.slot = Slot::Node(t.node.clone());
                t
            })
            .collect();
        let plan = spec.plan(&nodes, &tasks);
        let done: BTreeSet<&str> = tasks
            .iter()
            .filter(|t| t.state == TaskState::Complete && t.template == spec.template)
            .map(|t| t.node.as_str())
            .collect();
        let mut seen = BTreeSet::new();
        for s in &plan.slots {
            prop_assert!(seen.insert(s.slot.clone()), "slot {} twice", s.slot);
            if let SlotPlacement::Start { node } = &s.placement {
                let n = nodes.iter().find(|n| n.name == *node).unwrap();
                prop_assert!(n.ready && n.active, "started on {node}, which cannot run it");
                prop_assert_eq!(&s.slot, &Slot::Node(node.clone()));
                prop_assert!(!done.contains(node.as_str()), "{node} completed already");
            }
        }
        // Every eligible node that has not completed has its slot in the plan.
        for n in nodes.iter().filter(|n| n.ready && n.active) {
            prop_assert!(
                seen.contains(&Slot::Node(n.name.clone())),
                "eligible node {} has no slot: {plan:?}",
                n.name
            );
        }
    }

    /// Carrying plans out while tasks complete or fail: at no point do more than
    /// max-concurrent tasks run, completions never exceed N, and with a node to run on the
    /// job ends with exactly N slots completed.
    #[test]
    fn a_job_carried_out_completes_exactly_its_completions(
        n_nodes in 1usize..=4,
        completions in 0u32..=7,
        max in 1u32..=3,
        fates in prop::collection::vec(0u8..4, 64),
    ) {
        let spec = Spec::replicated_job(completions, max);
        let nodes = nodes(n_nodes);
        let policy = RestartPolicy { delay_ms: 0, ..RestartPolicy::default() }
            .for_mode(spec.mode);
        let mut tasks: Vec<Task> = Vec::new();
        let mut fate = fates.iter().cycle();
        let mut next_id = 0u32;
        for round in 0..200u64 {
            let plan = spec.plan(&nodes, &tasks);
            prop_assert!(plan.stops.is_empty(), "one view: nothing to stop: {plan:?}");
            for (slot, node) in starts(&plan) {
                next_id += 1;
                let mut t = task(&format!("t{next_id}"), slot, &node, round);
                t.state = TaskState::Running;
                tasks.push(t);
            }
            let running = tasks.iter().filter(|t| t.is_live()).count();
            prop_assert!(running <= max as usize, "{running} running > {max}");
            let mut restarts = Vec::new();
            for t in tasks.iter_mut().filter(|t| t.is_live()) {
                match fate.next().unwrap() {
                    0 => {}
                    1 => {
                        // Fails; its node restarts it in the same slot.
                        t.state = TaskState::Failed;
                        t.desired = DesiredState::Shutdown;
                        if let AfterExit::Restart { attempt, .. } =
                            after_exit(&policy, t, true, round)
                        {
                            next_id += 1;
                            let mut r = t.clone();
                            r.id = format!("t{next_id}");
                            r.state = TaskState::Running;
                            r.desired = DesiredState::Running;
                            r.attempt = attempt;
                            r.created_ms = round;
                            restarts.push(r);
                        }
                    }
                    _ => {
                        prop_assert_eq!(
                            after_exit(&policy, t, false, round),
                            AfterExit::Hold { why: None }
                        );
                        *t = complete(t.clone());
                    }
                }
            }
            tasks.extend(restarts);
            let mut per_slot: BTreeMap<&Slot, usize> = BTreeMap::new();
            for t in tasks.iter().filter(|t| t.state == TaskState::Complete) {
                *per_slot.entry(&t.slot).or_default() += 1;
            }
            prop_assert!(per_slot.values().all(|&n| n == 1), "a slot completed twice");
            prop_assert!(per_slot.len() <= completions as usize);
        }
        let done = tasks.iter().filter(|t| t.state == TaskState::Complete).count();
        prop_assert_eq!(done, completions as usize);
        let plan = spec.plan(&nodes, &tasks);
        prop_assert_eq!(
            job::progress(spec.mode, &plan, &tasks).map(|p| (p.completed, p.total)),
            Some((completions as usize, completions as usize))
        );
    }
}
