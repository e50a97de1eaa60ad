//! The orchestrator against fake nodes (`agent/fake.rs`): what `service ps` would show and
//! what each node's runtime was asked to do, for the rules a user relies on — restart
//! policy, rolling updates, a dead node's slots, drains and partitions. Each test lives
//! through tens of seconds of cluster time on tokio's paused clock, in milliseconds.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use mesh_api::spec::{HealthCheck, Probe, ServiceSpec, TaskTemplate, UpdateState};
use mesh_planner::{
    DesiredState, FailureAction, RestartCondition, RestartPolicy, ServiceMode, Slot, SlotPlacement,
    Task, TaskState, UpdateConfig,
};

use crate::agent::{
    drain::CONFIRM_WITHIN,
    fake::{FakeCluster, Run, TICK, What},
    orchestrate::START_CONCURRENCY,
};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn command(version: &str) -> Vec<String> {
    vec!["app".into(), version.into()]
}

fn web(replicas: u32, version: &str) -> ServiceSpec {
    ServiceSpec {
        name: "web".into(),
        network: "app".into(),
        mode: ServiceMode::Replicated { replicas },
        task: Some(TaskTemplate {
            command: command(version),
            ..TaskTemplate::default()
        }),
        ..ServiceSpec::default()
    }
}

fn record(c: &FakeCluster, id: &str) -> Task {
    c.ps("web")
        .into_iter()
        .find(|t| t.id == id)
        .unwrap_or_else(|| panic!("no record of task {id}"))
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

// --- Restart policy ---------------------------------------------------------------------

/// One replica on one node whose first process exits with `code` 2 s after it starts
/// (any later one serves), run for 20 s.
async fn first_process_exits(restart: RestartPolicy, code: i32) -> FakeCluster {
    let c = FakeCluster::new(&["n1"]);
    let mut starts = 0;
    c.script(move |_, _, _| {
        starts += 1;
        if starts == 1 {
            Run::Exit {
                after: secs(2),
                code,
            }
        } else {
            Run::Serve
        }
    });
    c.create(ServiceSpec {
        restart,
        ..web(1, "v1")
    });
    c.run_for(secs(20)).await;
    c
}

#[tokio::test(start_paused = true)]
async fn the_restart_condition_decides_which_endings_are_restarted() {
    use RestartCondition::{Any, None, OnFailure};
    for (condition, code, restarted) in [
        (None, 0, false),
        (None, 1, false),
        (OnFailure, 0, false),
        (OnFailure, 1, true),
        (Any, 0, true),
        (Any, 1, true),
    ] {
        let case = format!("--restart-condition {condition}, exit {code}");
        let policy = RestartPolicy {
            condition,
            delay_ms: 1_000,
            ..RestartPolicy::default()
        };
        let c = first_process_exits(policy, code).await;
        let ps = c.ps("web");
        let ended = ps
            .iter()
            .find(|t| t.exit_code == Some(code))
            .unwrap_or_else(|| panic!("{case}: no ended task in {ps:#?}"));
        let (state, error) = match code {
            0 => (TaskState::Complete, Option::None),
            _ => (
                TaskState::Failed,
                Some("task: non-zero exit (1)".to_owned()),
            ),
        };
        assert_eq!(ended.state, state, "{case}");
        assert_eq!(ended.desired, DesiredState::Shutdown, "{case}");
        assert_eq!(ended.error, error, "{case}");
        let starts = c.starts("web").len();
        let live = c.live("web");
        if restarted {
            assert_eq!(starts, 2, "{case}: restarted once");
            assert_eq!(live.len(), 1, "{case}");
            assert_eq!(live[0].state, TaskState::Running, "{case}");
            assert_eq!(live[0].slot, Slot::Replica(1), "{case}");
            assert_eq!(live[0].attempt, 1, "{case}");
        } else {
            assert_eq!(starts, 1, "{case}: never restarted");
            assert!(live.is_empty(), "{case}: {live:#?}");
            assert_eq!(ps.len(), 1, "{case}: no replacement record");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_restart_waits_out_the_delay_as_an_assigned_task() {
    let delay = secs(3);
    let c = FakeCluster::new(&["n1"]);
    c.script(|_, _, _| Run::Exit {
        after: secs(2),
        code: 1,
    });
    c.create(ServiceSpec {
        restart: RestartPolicy {
            delay_ms: ms(delay),
            max_attempts: Some(1),
            ..RestartPolicy::default()
        },
        ..web(1, "v1")
    });
    // Started after a second (the node waits for its view), failed two seconds later.
    c.run_for(secs(4)).await;
    let failed = c
        .ps("web")
        .into_iter()
        .find(|t| t.state == TaskState::Failed)
        .expect("the first task failed");
    let waiting = c.live("web");
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].state, TaskState::Assigned, "{waiting:#?}");
    assert_eq!(waiting[0].not_before_ms, Some(failed.since_ms + ms(delay)));
    assert_eq!(c.starts("web").len(), 1, "not started during the delay");

    c.run_for(secs(10)).await;
    let starts = c.starts("web");
    assert_eq!(starts.len(), 2, "one restart (max attempts 1)");
    let waited = starts[1].at_ms - failed.since_ms;
    assert!(
        (ms(delay)..ms(delay) + 2 * ms(TICK)).contains(&waited),
        "restarted {waited} ms after the failure, with a {delay:?} delay"
    );
}

#[tokio::test(start_paused = true)]
async fn max_attempts_stop_restarts_within_the_window() {
    let c = FakeCluster::new(&["n1"]);
    c.script(|_, _, _| Run::Exit {
        after: secs(1),
        code: 1,
    });
    c.create(ServiceSpec {
        restart: RestartPolicy {
            condition: RestartCondition::OnFailure,
            delay_ms: 1_000,
            max_attempts: Some(2),
            window_ms: Some(10_000),
        },
        ..web(1, "v1")
    });
    c.run_for(secs(30)).await;

    assert_eq!(c.starts("web").len(), 3, "the first start and two restarts");
    let ps = c.ps("web");
    let attempts: Vec<u32> = ps.iter().map(|t| t.attempt).collect();
    assert_eq!(attempts, [2, 1, 0], "newest first: {ps:#?}");
    let last = &ps[0];
    assert_eq!(last.state, TaskState::Failed);
    assert_eq!(last.desired, DesiredState::Shutdown);
    assert_eq!(
        last.error.as_deref(),
        Some(
            "task: non-zero exit (1); not restarted: 2 restart attempts used \
             (--restart-max-attempts)"
        )
    );
    assert!(c.live("web").is_empty());
}

#[tokio::test(start_paused = true)]
async fn restarts_outside_the_window_do_not_count_towards_max_attempts() {
    // One attempt per 5 s window; each process runs 6 s, so every failure opens a new
    // window and the task is restarted for as long as it keeps running that long.
    let c = FakeCluster::new(&["n1"]);
    c.script(|_, _, _| Run::Exit {
        after: secs(6),
        code: 1,
    });
    c.create(ServiceSpec {
        restart: RestartPolicy {
            condition: RestartCondition::OnFailure,
            delay_ms: 1_000,
            max_attempts: Some(1),
            window_ms: Some(5_000),
        },
        ..web(1, "v1")
    });
    c.run_for(secs(40)).await;

    let starts = c.starts("web").len();
    assert!(starts >= 5, "restarted in every window: {starts} starts");
    assert_eq!(c.live("web").len(), 1, "still restarting");
    let ps = c.ps("web");
    assert!(ps.iter().all(|t| t.attempt <= 1), "{ps:#?}");
    assert!(
        ps.iter()
            .all(|t| !t.error.as_deref().unwrap_or("").contains("not restarted")),
        "{ps:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_task_that_cannot_start_is_rejected_and_counts_as_a_failure() {
    let c = FakeCluster::new(&["n1"]);
    let why = "secret db_password not found: create it with `meshctl secret create`";
    c.script(move |_, _, _| Run::Reject(why.into()));
    c.create(ServiceSpec {
        restart: RestartPolicy {
            condition: RestartCondition::OnFailure,
            delay_ms: 1_000,
            max_attempts: Some(1),
            window_ms: None,
        },
        ..web(1, "v1")
    });
    c.run_for(secs(10)).await;

    assert!(c.starts("web").is_empty(), "no process ever ran");
    let rejected = c
        .events()
        .into_iter()
        .filter(|e| matches!(e.what, What::Rejected(_)))
        .count();
    assert_eq!(rejected, 2, "tried, then retried once");
    let ps = c.ps("web");
    assert_eq!(ps.len(), 2, "{ps:#?}");
    assert!(
        ps.iter()
            .all(|t| t.state == TaskState::Rejected && t.desired == DesiredState::Shutdown)
    );
    let attempt = |n| {
        ps.iter()
            .find(|t| t.attempt == n)
            .expect("a record per attempt")
    };
    assert_eq!(attempt(0).error.as_deref(), Some(why));
    assert_eq!(
        attempt(1).error,
        Some(format!(
            "{why}; not restarted: 1 restart attempt used (--restart-max-attempts)"
        ))
    );
}

// --- Rolling updates --------------------------------------------------------------------

/// `web`, 4 replicas on two nodes, updated from v1 to v2 two slots at a time with 3 s
/// between waves; slot 1's v2 task exits 1 a second after each start. Returns the cluster
/// 40 s into the update and the v1 tasks from before it.
async fn update_with_a_failing_task(action: FailureAction) -> (FakeCluster, Vec<Task>) {
    let c = FakeCluster::new(&["n1", "n2"]);
    c.script(|_, task, template| {
        if template.command == command("v2") && task.starts_with("web.1.") {
            Run::Exit {
                after: secs(1),
                code: 1,
            }
        } else {
            Run::Serve
        }
    });
    c.create(ServiceSpec {
        restart: RestartPolicy {
            delay_ms: 1_000,
            ..RestartPolicy::default()
        },
        update: UpdateConfig {
            parallelism: 2,
            delay_ms: 3_000,
            failure_action: action,
            ..UpdateConfig::default()
        },
        ..web(4, "v1")
    });
    c.run_for(secs(5)).await;
    let before = c.live("web");
    assert_eq!(before.len(), 4);
    assert!(before.iter().all(|t| t.state == TaskState::Running));

    c.update("web", |s| {
        s.task.as_mut().expect("a template").command = command("v2");
    });
    c.run_for(secs(40)).await;
    (c, before)
}

/// Slots that had a v2 process started, in start order.
fn v2_starts(c: &FakeCluster) -> Vec<String> {
    c.starts("web")
        .into_iter()
        .filter(|e| matches!(&e.what, What::Started { command: cmd } if *cmd == command("v2")))
        .map(|e| e.slot().to_owned())
        .collect()
}

fn first_wave(c: &FakeCluster) -> BTreeSet<String> {
    v2_starts(c).into_iter().take(2).collect()
}

fn slots(of: &[&str]) -> BTreeSet<String> {
    of.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(start_paused = true)]
async fn a_failed_task_pauses_the_update_before_the_next_wave() {
    let (c, before) = update_with_a_failing_task(FailureAction::Pause).await;

    assert_eq!(first_wave(&c), slots(&["1", "2"]), "two slots at a time");
    let started: BTreeSet<String> = v2_starts(&c).into_iter().collect();
    assert_eq!(started, slots(&["1", "2"]), "slots 3 and 4 never get v2");
    let status = c.service("web").update_status.expect("a rollout");
    assert_eq!(status.state, UpdateState::Paused);
    assert!(
        status
            .message
            .starts_with("update paused due to failure or early termination of task web.1 (")
            && status.message.ends_with("): task: non-zero exit (1)"),
        "{}",
        status.message
    );
    // The slots the update did not reach still run the very tasks they ran before.
    for old in before.iter().filter(|t| t.slot >= Slot::Replica(3)) {
        let now = record(&c, &old.id);
        assert_eq!(now.state, TaskState::Running, "{now:#?}");
        assert_eq!(now.desired, DesiredState::Running);
    }
}

#[tokio::test(start_paused = true)]
async fn with_failure_action_continue_the_update_reaches_every_slot() {
    let (c, _) = update_with_a_failing_task(FailureAction::Continue).await;

    assert_eq!(first_wave(&c), slots(&["1", "2"]), "two slots at a time");
    let started: BTreeSet<String> = v2_starts(&c).into_iter().collect();
    assert_eq!(started, slots(&["1", "2", "3", "4"]));
    let status = c.service("web").update_status.expect("a rollout");
    // Not done either: slot 1 never runs for the monitor window.
    assert_eq!(status.state, UpdateState::Updating, "{}", status.message);
    let v2 = c.service("web").template_id();
    for slot in 2..=4 {
        let live: Vec<Task> = c
            .live("web")
            .into_iter()
            .filter(|t| t.slot == Slot::Replica(slot))
            .collect();
        assert_eq!(live.len(), 1, "slot {slot}: {live:#?}");
        assert_eq!(live[0].template, v2, "slot {slot} runs v2");
        assert_eq!(live[0].state, TaskState::Running);
    }
}

#[tokio::test(start_paused = true)]
async fn with_failure_action_rollback_every_slot_goes_back_to_the_old_template() {
    let (c, before) = update_with_a_failing_task(FailureAction::Rollback).await;

    assert_eq!(first_wave(&c), slots(&["1", "2"]), "two slots at a time");
    let started: BTreeSet<String> = v2_starts(&c).into_iter().collect();
    assert_eq!(started, slots(&["1", "2"]), "slots 3 and 4 never get v2");
    let spec = c.service("web");
    let status = spec.update_status.clone().expect("a rollout");
    assert_eq!(status.state, UpdateState::RollbackCompleted);
    assert_eq!(status.message, "rollback completed");
    assert_eq!(spec.task.as_ref().unwrap().command, command("v1"));
    let v1 = before[0].template;
    assert_eq!(spec.template_id(), v1);
    let live = c.live("web");
    assert_eq!(live.len(), 4, "{live:#?}");
    assert!(
        live.iter()
            .all(|t| t.template == v1 && t.state == TaskState::Running),
        "{live:#?}"
    );
    // Slots 1 and 2 got new v1 tasks; 3 and 4 kept theirs.
    let v1_restarts: BTreeSet<String> = c
        .starts("web")
        .into_iter()
        .skip(4)
        .filter(|e| matches!(&e.what, What::Started { command: cmd } if *cmd == command("v1")))
        .map(|e| e.slot().to_owned())
        .collect();
    assert_eq!(v1_restarts, slots(&["1", "2"]));
}

// --- Coordinator hand-over --------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_rollout_whose_coordinator_dies_is_finished_by_the_next_one() {
    let c = FakeCluster::new(&["n1", "n2", "n3"]);
    c.create(ServiceSpec {
        update: UpdateConfig {
            parallelism: 1,
            delay_ms: 3_000,
            ..UpdateConfig::default()
        },
        ..web(6, "v1")
    });
    c.run_for(secs(5)).await;
    let first = c.coordinator("web");
    c.update("web", |s| {
        s.task.as_mut().expect("a template").command = command("v2");
    });
    c.run_for(secs(6)).await;
    let before = v2_starts(&c).len();
    assert!(
        (1..6).contains(&before),
        "the rollout is under way when its coordinator dies: {before} slots on v2"
    );
    assert_eq!(
        c.service("web").update_status.expect("a rollout").state,
        UpdateState::Updating
    );

    c.kill(&first);
    c.run_for(secs(90)).await;
    let next = c.coordinator("web");
    assert_ne!(next, first, "a live node took over");
    let spec = c.service("web");
    let status = spec.update_status.clone().expect("a rollout");
    assert_eq!(status.state, UpdateState::Completed, "{}", status.message);
    assert_eq!(
        c.last_writer("web"),
        next,
        "the new coordinator recorded the outcome"
    );
    let v2 = spec.template_id();
    let on_live: Vec<Task> = c
        .live("web")
        .into_iter()
        .filter(|t| t.node != first)
        .collect();
    assert_eq!(
        on_live.len(),
        6,
        "every slot runs on a live node: {on_live:#?}"
    );
    assert!(
        on_live
            .iter()
            .all(|t| t.template == v2 && t.state == TaskState::Running),
        "{on_live:#?}"
    );
    let slots: BTreeSet<String> = on_live.iter().map(|t| t.slot.to_string()).collect();
    assert_eq!(slots.len(), 6, "one task per slot: {on_live:#?}");
}

// --- A dead node ------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_dead_nodes_slot_is_started_once_on_a_live_node_and_never_moves_back() {
    let c = FakeCluster::new(&["n1", "n2", "n3"]);
    c.create(web(3, "v1"));
    c.run_for(secs(5)).await;
    let before = c.live("web");
    let nodes: BTreeSet<&str> = before.iter().map(|t| t.node.as_str()).collect();
    assert_eq!(nodes.len(), 3, "one task per node: {before:#?}");
    let lost = before.iter().find(|t| t.node == "n3").unwrap().clone();

    c.kill("n3");
    let killed_at = c.now_ms();
    c.run_for(secs(5)).await;
    let after = c.live("web");
    let slots: BTreeSet<&Slot> = after.iter().map(|t| &t.slot).collect();
    assert_eq!(after.len(), 3, "{after:#?}");
    assert_eq!(slots.len(), 3, "one task per slot: {after:#?}");
    let moved = after.iter().find(|t| t.slot == lost.slot).unwrap().clone();
    assert_ne!(moved.node, "n3");
    assert_eq!(moved.state, TaskState::Running);
    let new_starts: Vec<_> = c
        .starts("web")
        .into_iter()
        .filter(|e| e.at_ms >= killed_at)
        .collect();
    assert_eq!(new_starts.len(), 1, "started once: {new_starts:#?}");
    assert_eq!(new_starts[0].task_id(), moved.id);
    for t in before.iter().filter(|t| t.node != "n3") {
        assert!(after.iter().any(|a| a.id == t.id), "{t:#?} kept running");
    }
    c.run_for(secs(10)).await;
    assert_eq!(c.starts("web").len(), 4, "nothing more starts");

    // The host comes back without its processes: its stale task ends there, and the slot
    // stays where it was moved.
    c.revive("n3");
    let revived_at = c.now_ms();
    c.run_for(secs(10)).await;
    let live = c.live("web");
    assert_eq!(live.len(), 3, "{live:#?}");
    assert!(live.iter().any(|t| t.id == moved.id), "{live:#?}");
    assert!(
        !c.starts("web")
            .iter()
            .any(|e| e.node == "n3" && e.at_ms >= revived_at),
        "nothing started on the returning node"
    );
    let stale = record(&c, &lost.id);
    assert_eq!(stale.state, TaskState::Failed);
    assert_eq!(
        stale.error.as_deref(),
        Some("task: its process was gone when the agent started")
    );
}

// --- Room freed -------------------------------------------------------------------------

/// Two nodes with room for 800 MiB of reservations each, both taken by `big`, and `small`'s
/// one slot pending for want of room.
async fn two_full_nodes() -> FakeCluster {
    let c = FakeCluster::new(&["n1", "n2"]);
    for n in ["n1", "n2"] {
        c.capacity(
            n,
            mesh_planner::Resources {
                nano_cpus: 0,
                memory_bytes: 1 << 30,
            },
        );
    }
    let reserving = |name: &str, replicas: u32, mib: u64| {
        let mut spec = web(replicas, "v1");
        spec.name = name.into();
        spec.task
            .as_mut()
            .unwrap()
            .resources
            .reservations
            .memory_bytes = mib << 20;
        spec
    };
    c.create(reserving("big", 2, 800));
    c.run_for(secs(3)).await;
    c.create(reserving("small", 1, 400));
    c.run_for(secs(3)).await;
    assert_eq!(c.live("big").len(), 2);
    assert!(c.live("small").is_empty(), "no room for small");
    c
}

#[tokio::test(start_paused = true)]
async fn a_slot_that_freed_room_brings_starts_once_though_each_node_sees_its_own_room_first() {
    let c = two_full_nodes().await;
    // big goes; each node hears of its own task's end a gossip round before the other's.
    c.lag();
    c.update("big", |s| s.mode = ServiceMode::Replicated { replicas: 0 });
    let mut freed = false;
    for _ in 0..100 {
        c.run_for(TICK).await;
        if c.live("big").is_empty() {
            freed = true;
            break;
        }
    }
    assert!(freed, "big stopped: {:#?}", c.live("big"));
    c.run_for(Duration::from_millis(200)).await;
    c.catch_up();
    c.run_for(secs(5)).await;

    let starts = c.starts("small");
    assert_eq!(starts.len(), 1, "small's slot started once: {starts:#?}");
    assert_eq!(c.live("small").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_new_slot_with_room_starts_on_the_next_pass() {
    let c = two_full_nodes().await;
    c.update("big", |s| s.mode = ServiceMode::Replicated { replicas: 0 });
    c.run_for(secs(15)).await;
    assert_eq!(c.live("small").len(), 1);
    let at = c.now_ms();
    c.update("small", |s| {
        s.mode = ServiceMode::Replicated { replicas: 2 }
    });
    c.run_for(secs(2)).await;
    let starts = c.starts("small");
    let new_slot = starts
        .iter()
        .find(|e| e.slot() == "2")
        .expect("slot 2 started");
    // No node planned it pending or elsewhere first: nothing to wait for.
    assert!(
        new_slot.at_ms - at <= TICK.as_millis() as u64,
        "slot 2 started {} ms after the scale",
        new_slot.at_ms - at
    );
}

// --- Drains -----------------------------------------------------------------------------

/// `web`, 3 replicas on 3 nodes, running; the task of slot 3 (which a scale to 2 stops) and
/// a node other than its own.
async fn three_replicas() -> (FakeCluster, Task, String) {
    let c = FakeCluster::new(&["n1", "n2", "n3"]);
    c.create(web(3, "v1"));
    c.run_for(secs(5)).await;
    let doomed = c
        .live("web")
        .into_iter()
        .find(|t| t.slot == Slot::Replica(3))
        .expect("slot 3 runs");
    let other = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| *n != doomed.node)
        .unwrap()
        .to_owned();
    (c, doomed, other)
}

fn scale(c: &FakeCluster, replicas: u32) {
    c.update("web", |s| s.mode = ServiceMode::Replicated { replicas });
}

/// When the runtime stopped the task's process, if it did.
fn stopped_at(c: &FakeCluster, t: &Task) -> Option<u64> {
    c.events()
        .iter()
        .find(|e| e.task_id() == t.id && matches!(e.what, What::Stopped { .. }))
        .map(|e| e.at_ms)
}

#[tokio::test(start_paused = true)]
async fn a_task_is_stopped_only_once_every_live_load_balancer_let_it_go() {
    let (c, doomed, lagging) = three_replicas().await;
    c.hold_load_balancer(&lagging);
    scale(&c, 2);
    c.run_for(secs(5)).await;

    // Out of the load balancers, but still running for the node that has not caught up.
    let t = record(&c, &doomed.id);
    assert_eq!(t.desired, DesiredState::Shutdown);
    assert_eq!(t.state, TaskState::Running);
    let left: Vec<_> = c
        .events()
        .into_iter()
        .filter(|e| e.task_id() == doomed.id)
        .filter(|e| matches!(e.what, What::LeftLoadBalancers { .. }))
        .collect();
    assert_eq!(left.len(), 1, "{left:#?}");
    assert_eq!(
        stopped_at(&c, &doomed),
        None,
        "stopped before {lagging} let it go"
    );

    let released_at = c.now_ms();
    c.release_load_balancer(&lagging);
    c.run_for(secs(2)).await;
    let at = stopped_at(&c, &doomed).expect("stopped once every node let it go");
    assert!(at >= released_at);
    let stop = c
        .events()
        .into_iter()
        .find(|e| e.task_id() == doomed.id && matches!(e.what, What::Stopped { .. }))
        .unwrap();
    assert_eq!(
        stop.what,
        What::Stopped { grace: secs(10) },
        "the task's stop grace period"
    );
    assert_eq!(record(&c, &doomed.id).state, TaskState::Shutdown);
    assert_eq!(c.live("web").len(), 2);
    let stops = c
        .events()
        .into_iter()
        .filter(|e| matches!(e.what, What::Stopped { .. }))
        .count();
    assert_eq!(stops, 1, "only the scaled-down task stopped");
}

#[tokio::test(start_paused = true)]
async fn a_stop_cut_short_by_an_agent_restart_is_finished_by_the_next_agent() {
    let (c, doomed, lagging) = three_replicas().await;
    c.hold_load_balancer(&lagging);
    scale(&c, 2);
    c.run_for(secs(2)).await;
    let t = record(&c, &doomed.id);
    assert_eq!(
        (t.desired, t.state),
        (DesiredState::Shutdown, TaskState::Running),
        "the stop is underway"
    );
    assert_eq!(stopped_at(&c, &doomed), None);

    // The agent dies mid-stop; the process driver's task runs on without it.
    c.restart_agent(&doomed.node);
    c.release_load_balancer(&lagging);
    c.run_for(secs(5)).await;
    let stop = c
        .events()
        .into_iter()
        .find(|e| e.task_id() == doomed.id && matches!(e.what, What::Stopped { .. }))
        .expect("the new agent stopped the task");
    assert_eq!(stop.node, doomed.node);
    assert_eq!(record(&c, &doomed.id).state, TaskState::Shutdown);
    assert_eq!(c.live("web").len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_silent_live_node_holds_a_stop_for_the_confirmation_limit_only() {
    let (c, doomed, lagging) = three_replicas().await;
    c.hold_load_balancer(&lagging);
    let scaled_at = c.now_ms();
    scale(&c, 2);
    c.run_for(secs(15)).await;
    let at = stopped_at(&c, &doomed).expect("stopped in the end");
    let waited = at - scaled_at;
    assert!(
        (ms(CONFIRM_WITHIN)..ms(CONFIRM_WITHIN) + 1_000).contains(&waited),
        "stopped {waited} ms after the scale-down"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dead_node_holds_a_stop_only_while_it_may_be_alive() {
    let (c, doomed, lagging) = three_replicas().await;
    c.hold_load_balancer(&lagging);
    c.kill(&lagging);
    let killed_at = c.now_ms();
    scale(&c, 2);
    c.run_for(secs(15)).await;
    let at = stopped_at(&c, &doomed).expect("stopped");
    let waited = at - killed_at;
    // Suspected for 3 s (it may only be overloaded), then taken for dead.
    assert!(
        (3_000..4_000).contains(&waited),
        "stopped {waited} ms after the node died"
    );
}

// --- Partitions -------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn two_copies_of_a_slot_after_a_partition_heal_to_the_same_one_everywhere() {
    let names = ["n1", "n2", "n3"];
    let c = FakeCluster::new(&names);
    c.create(web(1, "v1"));
    c.run_for(secs(5)).await;
    let first = c.live("web")[0].clone();
    for other in names.iter().filter(|n| **n != first.node) {
        c.cut(&first.node, other);
    }
    c.run_for(secs(5)).await;

    // Each side serves slot 1: the cut-off node keeps its task, the others start one.
    let copies = c.live("web");
    assert_eq!(copies.len(), 2, "{copies:#?}");
    assert!(copies.iter().all(|t| t.state == TaskState::Running));
    assert!(copies.iter().any(|t| t.id == first.id));
    let second = copies.iter().find(|t| t.id != first.id).unwrap().clone();
    assert_ne!(second.node, first.node);
    assert_eq!(c.starts("web").len(), 2);

    c.heal();
    let plans: Vec<mesh_planner::Plan> = names.iter().map(|n| c.plan_on(n, "web")).collect();
    assert!(plans.iter().all(|p| *p == plans[0]), "{plans:#?}");
    assert_eq!(
        plans[0].slots[0].placement,
        SlotPlacement::Kept {
            node: second.node.clone(),
            task: second.id.clone()
        },
        "the newer copy wins: nothing moves back to the node that was cut off"
    );
    let healed_at = c.now_ms();
    c.run_for(secs(3)).await;

    let live = c.live("web");
    assert_eq!(live.len(), 1, "{live:#?}");
    assert_eq!(live[0].id, second.id);
    let loser = record(&c, &first.id);
    assert_eq!(loser.desired, DesiredState::Shutdown);
    assert_eq!(loser.state, TaskState::Shutdown);
    let stops: Vec<_> = c
        .events()
        .into_iter()
        .filter(|e| matches!(e.what, What::Stopped { .. }))
        .collect();
    assert_eq!(stops.len(), 1, "{stops:#?}");
    assert_eq!(
        (stops[0].node.as_str(), stops[0].task_id()),
        (first.node.as_str(), first.id.as_str())
    );
    assert!(c.starts("web").iter().all(|e| e.at_ms < healed_at));
}

// --- Health checks ----------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_task_serves_once_healthy_and_is_replaced_when_its_checks_fail() {
    let c = FakeCluster::new(&["n1"]);
    let sick = Arc::new(AtomicBool::new(false));
    let probe_sick = sick.clone();
    c.probe(move |_, _| {
        if probe_sick.load(Ordering::SeqCst) {
            Err("exit 1: boom".into())
        } else {
            Ok(())
        }
    });
    let mut spec = web(1, "v1");
    spec.task.as_mut().unwrap().health = Some(HealthCheck {
        probe: Probe::Cmd(vec!["check".into()]),
        interval_ms: 1_000,
        timeout_ms: 500,
        retries: 3,
        start_period_ms: 0,
    });
    spec.restart.delay_ms = 1_000;
    c.create(spec);
    c.run_for(secs(5)).await;
    let first = c.live("web")[0].clone();
    assert_eq!(first.state, TaskState::Running);
    let serving = c
        .events()
        .into_iter()
        .filter(|e| e.task_id() == first.id && e.what == What::Serving)
        .count();
    assert_eq!(serving, 1, "a backend once its check passed");

    sick.store(true, Ordering::SeqCst);
    // Three failed checks a second apart, the drain, then a restart a second later.
    c.run_for(secs(6)).await;
    let failed = record(&c, &first.id);
    assert_eq!(failed.state, TaskState::Failed);
    assert_eq!(
        failed.error.as_deref(),
        Some("task: unhealthy after 3 failed checks (CMD check): exit 1: boom")
    );
    assert!(
        c.events()
            .iter()
            .any(|e| e.task_id() == first.id && matches!(e.what, What::LeftLoadBalancers { .. })),
        "taken out of the load balancers"
    );
    assert_eq!(c.starts("web").len(), 2, "replaced by the restart policy");
}

// --- Jobs -------------------------------------------------------------------------------

fn job(mode: ServiceMode) -> ServiceSpec {
    ServiceSpec {
        name: "migrate".into(),
        mode,
        restart: RestartPolicy {
            delay_ms: 1_000,
            ..RestartPolicy::default()
        },
        ..web(1, "v1")
    }
}

/// Runs the cluster in ticks for `d`, returning the most tasks of `service` live at once.
async fn most_live(c: &FakeCluster, service: &str, d: Duration) -> usize {
    let mut most = 0;
    let until = c.now_ms() + ms(d);
    while c.now_ms() < until {
        c.run_for(TICK).await;
        most = most.max(c.live(service).len());
    }
    most
}

fn completed(c: &FakeCluster, service: &str) -> BTreeSet<Slot> {
    c.ps(service)
        .into_iter()
        .filter(|t| t.state == TaskState::Complete)
        .map(|t| t.slot)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_replicated_job_completes_its_slots_one_at_a_time() {
    let c = FakeCluster::new(&["n1", "n2", "n3"]);
    c.script(|_, _, _| Run::Exit {
        after: secs(2),
        code: 0,
    });
    c.create(job(ServiceMode::ReplicatedJob {
        completions: 3,
        max_concurrent: 1,
    }));
    let most = most_live(&c, "migrate", secs(20)).await;
    assert_eq!(most, 1, "never more than --max-concurrent at once");
    assert_eq!(
        completed(&c, "migrate"),
        BTreeSet::from([Slot::Replica(1), Slot::Replica(2), Slot::Replica(3)])
    );
    assert_eq!(
        c.starts("migrate").len(),
        3,
        "a completed task is never restarted"
    );
    assert!(c.live("migrate").is_empty());
    for t in c.ps("migrate") {
        assert_eq!(
            (t.state, t.exit_code, t.holds_slot),
            (TaskState::Complete, Some(0), true)
        );
    }
    let plan = c.plan_on("n1", "migrate");
    assert!(plan.starts_on("n1").next().is_none() && plan.stops.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failed_job_task_is_retried_by_the_restart_policy_until_it_completes() {
    let c = FakeCluster::new(&["n1", "n2"]);
    let mut starts = 0;
    c.script(move |_, _, _| {
        starts += 1;
        Run::Exit {
            after: secs(1),
            code: if starts == 1 { 3 } else { 0 },
        }
    });
    c.create(job(ServiceMode::ReplicatedJob {
        completions: 2,
        max_concurrent: 2,
    }));
    c.run_for(secs(15)).await;
    let ps = c.ps("migrate");
    let failed: Vec<&Task> = ps.iter().filter(|t| t.state == TaskState::Failed).collect();
    assert_eq!(failed.len(), 1, "{ps:#?}");
    assert_eq!(failed[0].error.as_deref(), Some("task: non-zero exit (3)"));
    let retry = ps
        .iter()
        .find(|t| t.slot == failed[0].slot && t.state == TaskState::Complete)
        .expect("the failed slot completed on a retry");
    assert_eq!(retry.attempt, 1);
    assert_eq!(retry.node, failed[0].node, "restarted by its own node");
    assert_eq!(
        completed(&c, "migrate"),
        BTreeSet::from([Slot::Replica(1), Slot::Replica(2)])
    );
    assert_eq!(c.starts("migrate").len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_global_job_completes_once_per_node() {
    let c = FakeCluster::new(&["n1", "n2", "n3"]);
    c.script(|_, _, _| Run::Exit {
        after: secs(1),
        code: 0,
    });
    c.create(job(ServiceMode::GlobalJob));
    c.run_for(secs(15)).await;
    assert_eq!(
        completed(&c, "migrate"),
        ["n1", "n2", "n3"]
            .into_iter()
            .map(|n| Slot::Node(n.into()))
            .collect()
    );
    assert_eq!(c.starts("migrate").len(), 3);
    for t in c.ps("migrate") {
        assert_eq!(t.slot, Slot::Node(t.node.clone()));
    }
}

#[tokio::test(start_paused = true)]
async fn a_forced_update_runs_a_job_again() {
    let c = FakeCluster::new(&["n1", "n2"]);
    c.script(|_, _, _| Run::Exit {
        after: secs(1),
        code: 0,
    });
    c.create(job(ServiceMode::ReplicatedJob {
        completions: 2,
        max_concurrent: 1,
    }));
    c.run_for(secs(10)).await;
    assert_eq!(c.starts("migrate").len(), 2);
    let first_run = c.service("migrate").template_id();

    // What the agent's update of a job does: a new template, no rollout.
    c.update("migrate", |s| s.force_update += 1);
    let most = most_live(&c, "migrate", secs(10)).await;
    assert_eq!(most, 1);
    assert_eq!(c.starts("migrate").len(), 4, "both slots ran again");
    let template = c.service("migrate").template_id();
    assert_ne!(template, first_run);
    let now: BTreeSet<Slot> = c
        .ps("migrate")
        .into_iter()
        .filter(|t| t.state == TaskState::Complete && t.template == template)
        .map(|t| t.slot)
        .collect();
    assert_eq!(now, BTreeSet::from([Slot::Replica(1), Slot::Replica(2)]));
    assert!(c.service("migrate").update_status.is_none());
}

// --- Images ahead of an update -----------------------------------------------------------

/// `service update --image`: every node with an old task pulls the new image before it
/// stops one (stop-first), and a service whose tasks are current asks for no pull.
#[tokio::test(start_paused = true)]
async fn nodes_with_old_tasks_pull_the_new_image_before_they_stop_them() {
    let c = FakeCluster::new(&["n1", "n2"]);
    let mut spec = web(4, "v1");
    spec.task.as_mut().expect("a template").image = Some("shop/web:1".into());
    spec.update.delay_ms = 2_000;
    c.create(spec);
    c.run_for(secs(5)).await;
    assert_eq!(c.live("web").len(), 4);
    let prefetched = |c: &FakeCluster, node: &str| -> Vec<(u64, String)> {
        c.events()
            .into_iter()
            .filter(|e| e.node == node)
            .filter_map(|e| match e.what {
                What::Prefetched { image } => Some((e.at_ms, image)),
                _ => None,
            })
            .collect()
    };
    assert!(prefetched(&c, "n1").is_empty() && prefetched(&c, "n2").is_empty());

    c.update("web", |s| {
        s.task.as_mut().expect("a template").image = Some("shop/web:2".into());
    });
    c.run_for(secs(40)).await;
    let live = c.live("web");
    assert_eq!(live.len(), 4);
    assert!(
        live.iter()
            .all(|t| t.template == c.service("web").template_id())
    );
    for node in ["n1", "n2"] {
        let pulls = prefetched(&c, node);
        let (at, image) = pulls
            .first()
            .unwrap_or_else(|| panic!("{node} pulled nothing"));
        assert_eq!(image, "shop/web:2");
        assert!(pulls.iter().all(|(_, i)| i == "shop/web:2"), "{pulls:?}");
        let first_stop = c
            .events()
            .into_iter()
            .filter(|e| e.node == node && matches!(e.what, What::Stopped { .. }))
            .map(|e| e.at_ms)
            .min()
            .unwrap_or_else(|| panic!("{node} stopped no old task"));
        assert!(
            *at <= first_stop,
            "{node} pulled at {at}, stopped at {first_stop}"
        );
    }
}

// --- Starting tasks side by side --------------------------------------------------------

/// Starts by the time their process came up, grouped: the starts that ended together.
fn waves(c: &FakeCluster, service: &str) -> Vec<usize> {
    let mut at: BTreeMap<u64, usize> = BTreeMap::new();
    for e in c.starts(service) {
        *at.entry(e.at_ms).or_default() += 1;
    }
    at.into_values().collect()
}

/// 20 tasks placed on one node, each start taking a second: they start
/// `START_CONCURRENCY` at a time (one at a time took 20 s; all at once would make each wait
/// on all the others for the node's CPUs).
#[tokio::test(start_paused = true)]
async fn a_node_starts_its_tasks_side_by_side_up_to_the_bound() {
    let c = FakeCluster::new(&["n1"]);
    c.start_takes(|_, _, _| secs(1));
    c.create(web(20, "v1"));
    c.run_for(secs(6)).await;
    let live = c.live("web");
    assert_eq!(live.len(), 20);
    assert!(live.iter().all(|t| t.state == TaskState::Running));
    let s = START_CONCURRENCY;
    assert_eq!(waves(&c, "web"), vec![s, s, 20 - 2 * s]);
    assert_eq!(c.most_starts_at_once("n1"), s);
    // The waves are a second apart: each start began as soon as a slot was free.
    let at: BTreeSet<u64> = c.starts("web").iter().map(|e| e.at_ms).collect();
    let at: Vec<u64> = at.into_iter().collect();
    assert_eq!(
        at.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>(),
        vec![1_000, 1_000]
    );
}

/// A minute-long image pull for more tasks than there are start slots: another service's
/// tasks placed on the node at the same time start at once, and the image's tasks start
/// once it is there, all of them together (their pulls ran side by side).
#[tokio::test(start_paused = true)]
async fn a_slow_pull_holds_neither_other_tasks_nor_other_services() {
    let c = FakeCluster::new(&["n1"]);
    c.pull_takes(|_, _| secs(60));
    c.start_takes(|_, _, _| Duration::from_millis(100));
    let mut db = web(2 * START_CONCURRENCY as u32, "v1");
    db.name = "db".into();
    db.task.as_mut().expect("a template").image = Some("shop/db:1".into());
    c.create(db);
    c.create(web(3, "v1"));
    c.run_for(secs(3)).await;
    let web = c.live("web");
    assert_eq!(web.len(), 3);
    assert!(
        web.iter().all(|t| t.state == TaskState::Running),
        "{web:#?}"
    );
    let db = c.live("db");
    assert_eq!(db.len(), 2 * START_CONCURRENCY);
    assert!(
        db.iter().all(|t| t.state == TaskState::Preparing),
        "{db:#?}"
    );
    assert!(c.starts("db").is_empty());

    c.run_for(secs(60)).await;
    let db = c.live("db");
    assert!(db.iter().all(|t| t.state == TaskState::Running), "{db:#?}");
    assert_eq!(c.starts("db").len(), 2 * START_CONCURRENCY);
    let pulled = c
        .events()
        .into_iter()
        .filter(|e| matches!(&e.what, What::Pulled { image } if image == "shop/db:1"))
        .count();
    assert_eq!(pulled, 2 * START_CONCURRENCY);
    assert_eq!(
        waves(&c, "db").len(),
        2,
        "two waves of starts after the pull"
    );
}

// --- Secrets sealed per node --------------------------------------------------------------

/// A service whose registry credentials are sealed to the admins only: each task waits,
/// saying whose credentials, until an admin's copy for its node arrives, then pulls and
/// starts at once; a node whose copy never comes keeps waiting.
#[tokio::test(start_paused = true)]
async fn a_task_waits_for_its_copy_of_the_registry_credentials() {
    let c = FakeCluster::new(&["n1", "n2"]);
    let mut spec = web(2, "v1");
    spec.registry_auth = Some(mesh_api::spec::SealedRegistryAuth {
        registry: "registry.example:5000".into(),
        key: 0,
        data: String::new(),
        admins: Some("sealed".into()),
        sealed_at: Some(mesh_api::id::Stamp {
            ms: 1,
            node: "test".into(),
        }),
    });
    c.create(spec);
    c.run_for(secs(12)).await;
    let waiting = c.live("web");
    assert_eq!(waiting.len(), 2, "{waiting:#?}");
    for t in &waiting {
        assert_eq!(t.state, TaskState::Assigned, "{t:#?}");
        assert_eq!(
            t.error.as_deref(),
            Some(
                "waiting for the registry credentials of service web to be sealed for this \
                 node by an admin"
            )
        );
    }
    assert!(c.starts("web").is_empty());

    c.give_registry_auth_copy("web", "n1");
    let given = c.now_ms();
    c.run_for(secs(1)).await;
    let on_n1 = waiting
        .iter()
        .find(|t| t.node == "n1")
        .expect("a task on n1");
    let started = record(&c, &on_n1.id);
    assert_eq!(started.state, TaskState::Running, "{started:#?}");
    assert_eq!(started.error, None);
    let starts = c.starts("web");
    assert_eq!(starts.len(), 1, "{starts:#?}");
    assert!(starts[0].at_ms - given < 1_000, "{starts:#?}");
    let on_n2 = waiting
        .iter()
        .find(|t| t.node == "n2")
        .expect("a task on n2");
    assert_eq!(record(&c, &on_n2.id).state, TaskState::Assigned);
}

/// A service granted a secret sealed to the admins only: each task waits, Assigned and
/// saying why, until an admin's copy for its node arrives, then starts — the same task, at
/// once, without a rejection or a restart. A node whose copy never comes keeps waiting.
#[tokio::test(start_paused = true)]
async fn a_task_waits_for_its_copy_of_a_secret_and_starts_when_it_arrives() {
    let c = FakeCluster::new(&["n1", "n2"]);
    c.create_secret("db_password");
    let mut spec = web(2, "v1");
    spec.task.as_mut().expect("a template").secrets = vec![mesh_api::spec::FileRef {
        source: "db_password".into(),
        target: "db_password".into(),
        uid: 0,
        gid: 0,
        mode: 0o444,
    }];
    c.create(spec);
    c.run_for(secs(12)).await;
    let waiting = c.live("web");
    assert_eq!(waiting.len(), 2, "{waiting:#?}");
    for t in &waiting {
        assert_eq!(t.state, TaskState::Assigned, "{t:#?}");
        assert_eq!(
            t.error.as_deref(),
            Some("waiting for secret db_password to be sealed for this node by an admin")
        );
    }
    assert!(c.starts("web").is_empty());
    assert_eq!(c.ps("web").len(), 2, "no task was replaced while waiting");

    c.give_secret_copy("db_password", "n1");
    let given = c.now_ms();
    c.run_for(secs(1)).await;
    let on_n1 = waiting
        .iter()
        .find(|t| t.node == "n1")
        .expect("a task on n1");
    let started = record(&c, &on_n1.id);
    assert_eq!(started.state, TaskState::Running, "{started:#?}");
    assert_eq!(started.error, None);
    let starts = c.starts("web");
    assert_eq!(starts.len(), 1, "{starts:#?}");
    // The copy's view change started it, not the next retry 5 s on.
    assert!(starts[0].at_ms - given < 1_000, "{starts:#?}");
    assert!(
        c.events()
            .iter()
            .all(|e| !matches!(e.what, What::Rejected(_)))
    );
    let on_n2 = waiting
        .iter()
        .find(|t| t.node == "n2")
        .expect("a task on n2");
    assert_eq!(record(&c, &on_n2.id).state, TaskState::Assigned);
}
