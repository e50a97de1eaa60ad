//! The planner alone (no agents, no network): placing 300 tasks over 3 nodes and over 1,000
//! simulated nodes, with reservations beside the same without, so the cost of the
//! reservation filter and of ranking by what is left shows as a ratio.
//!
//! Three cases per cluster size, each timed as the orchestrator runs it (`plan_all` over
//! every service of the view, as one pass does):
//! - **place**: one service of 300 replicas, nothing running yet (300 starts);
//! - **steady**: the same 300 tasks running (what every pass costs once placed);
//! - **10 services**: ten services of 30 replicas each placed in one pass, each beside the
//!   reservations of the starts of those before it.
//!
//! And the scale goal: 10,000 services of 10 replicas (100,000 tasks) over 1,000 nodes,
//! placed from nothing and steady, in at most a second.
//!
//! With reservations each task reserves 0.1 CPU and 128 MiB; 3 nodes have 64 CPUs and 256
//! GiB each, the 1,000 nodes 4 CPUs and 8 GiB (16 CPUs and 64 GiB for 100,000 tasks), so
//! everything fits and both sides place every task. Medians of many runs on a shared
//! machine; the ratio is the number to read.

use std::time::Instant;

use anyhow::{Result, ensure};
use mesh_planner::{
    Cluster, DesiredState, Node, Placement, Plan, Resources, Service, ServiceMode, SlotPlacement,
    Task, TaskState, UpdateConfig, plan_all,
};

use super::report::{Report, Spread, Table};

const TASKS: u32 = 300;
const BIG_SERVICES: usize = 10_000;
const BIG_REPLICAS: u32 = 10;
const BIG_NODES: usize = 1_000;
const GIB: u64 = 1 << 30;

pub fn run(quick: bool) -> Result<Report> {
    let runs = if quick { 7 } else { 31 };
    let mut report = Report::new("Planner: placement with and without reservations");
    report.ran(format!(
        "mesh_planner::plan_all in this process, {runs} runs per cell (median, min–max), \
         {TASKS} tasks; reservations 0.1 CPU + 128 MiB a task"
    ));
    let mut table = Table::new(
        "Time to plan (ms): without reservations | with | ratio",
        &["case", "nodes", "without", "with", "with / without"],
    );
    for nodes in [3usize, 1000] {
        for case in [Case::Place, Case::Steady, Case::TenServices] {
            let without = measure(case, nodes, false, runs)?;
            let with = measure(case, nodes, true, runs)?;
            table.row(vec![
                case.name().into(),
                nodes.to_string(),
                without.show(2, ""),
                with.show(2, ""),
                format!("{:.2}", with.median / without.median),
            ]);
        }
    }
    report.tables.push(table);

    let big_runs = if quick { 1 } else { 3 };
    let mut table = Table::new(
        &format!(
            "{BIG_SERVICES} services × {BIG_REPLICAS} replicas on {BIG_NODES} nodes, time to \
             plan (ms, {big_runs} runs): goal ≤ 1,000 ms"
        ),
        &["case", "without", "with", "goal"],
    );
    for case in [Case::BigPlace, Case::BigSteady] {
        let without = measure(case, BIG_NODES, false, big_runs)?;
        let with = measure(case, BIG_NODES, true, big_runs)?;
        let worst = without.max.max(with.max);
        table.row(vec![
            case.name().into(),
            without.show(0, ""),
            with.show(0, ""),
            if worst <= 1000.0 { "met" } else { "NOT met" }.into(),
        ]);
    }
    report.tables.push(table);
    report.note(
        "Reservations add a fit check per node and a ranking by what is left; the cost is per \
         candidate node, so it grows with the cluster, not with what is reserved.",
    );
    Ok(report)
}

#[derive(Clone, Copy)]
enum Case {
    Place,
    Steady,
    TenServices,
    /// 10,000 services × 10, nothing running yet.
    BigPlace,
    /// The same, every task running.
    BigSteady,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Self::Place => "place 300",
            Self::Steady => "steady 300",
            Self::TenServices => "10 services × 30",
            Self::BigPlace => "place",
            Self::BigSteady => "steady",
        }
    }

    /// (service names, replicas each).
    fn services(self) -> (Vec<String>, u32) {
        match self {
            Self::Place | Self::Steady => (vec!["web".into()], TASKS),
            Self::TenServices => ((0..10).map(|i| format!("svc{i}")).collect(), TASKS / 10),
            Self::BigPlace | Self::BigSteady => (
                (0..BIG_SERVICES).map(|i| format!("svc{i:05}")).collect(),
                BIG_REPLICAS,
            ),
        }
    }
}

fn nodes(n: usize, reserve: bool, big: bool) -> Vec<Node> {
    let capacity = match (reserve, n <= 3, big) {
        (false, _, _) => Resources::default(),
        (true, true, _) => Resources {
            nano_cpus: 64_000_000_000,
            memory_bytes: 256 * GIB,
        },
        (true, false, false) => Resources {
            nano_cpus: 4_000_000_000,
            memory_bytes: 8 * GIB,
        },
        (true, false, true) => Resources {
            nano_cpus: 16_000_000_000,
            memory_bytes: 64 * GIB,
        },
    };
    (0..n)
        .map(|i| Node {
            name: format!("node{i:04}"),
            id: format!("id{i:04}"),
            hostname: format!("node{i:04}"),
            ready: true,
            active: true,
            drivers: vec!["process".into()],
            capacity,
            ..Default::default()
        })
        .collect()
}

fn reservation(reserve: bool) -> Resources {
    if reserve {
        Resources {
            nano_cpus: 100_000_000,
            memory_bytes: 128 << 20,
        }
    } else {
        Resources::default()
    }
}

/// The running tasks a plan's starts become (the steady case's view).
fn running(plans: &[Plan], names: &[String], reserve: bool) -> Vec<Task> {
    let mut tasks = Vec::new();
    for (plan, service) in plans.iter().zip(names) {
        for s in &plan.slots {
            if let SlotPlacement::Start { node } = &s.placement {
                tasks.push(Task {
                    id: format!("{service}-{}", s.slot),
                    service: service.clone(),
                    slot: s.slot.clone(),
                    node: node.clone(),
                    spec_version: 1,
                    template: 1,
                    desired: DesiredState::Running,
                    state: TaskState::Running,
                    created_ms: 1,
                    since_ms: 1,
                    error: None,
                    exit_code: None,
                    attempt: 0,
                    window_start_ms: 0,
                    not_before_ms: None,
                    running_ms: Some(1),
                    holds_slot: false,
                    reservation: reservation(reserve),
                });
            }
        }
    }
    tasks
}

fn measure(case: Case, n: usize, reserve: bool, runs: usize) -> Result<Spread> {
    let big = matches!(case, Case::BigPlace | Case::BigSteady);
    let nodes = nodes(n, reserve, big);
    let (names, replicas) = case.services();
    let placement = Placement::default();
    let services: Vec<Service> = names
        .iter()
        .map(|name| Service {
            name,
            mode: ServiceMode::Replicated { replicas },
            placement: &placement,
            driver: "process",
            template: 1,
            update: UpdateConfig::default(),
            paused: false,
            reservation: reservation(reserve),
        })
        .collect();
    let empty = Vec::new();
    let fresh = plan_all(
        &Cluster {
            nodes: &nodes,
            tasks: &empty,
            now_ms: 1_000,
        },
        &services,
    );
    let tasks = match case {
        Case::Steady | Case::BigSteady => running(&fresh, &names, reserve),
        Case::Place | Case::TenServices | Case::BigPlace => Vec::new(),
    };
    let cluster = Cluster {
        nodes: &nodes,
        tasks: &tasks,
        now_ms: 1_000,
    };
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let plans = std::hint::black_box(plan_all(&cluster, &services));
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
        // Both sides must do the same work: every slot placed (or kept), none pending.
        let placed = plans
            .iter()
            .flat_map(|p| &p.slots)
            .filter(|s| !matches!(s.placement, SlotPlacement::Pending { .. }))
            .count();
        ensure!(
            placed == (replicas as usize) * names.len(),
            "{}: {placed} of {} slots placed on {n} nodes",
            case.name(),
            replicas as usize * names.len()
        );
    }
    Spread::of(&ms).ok_or_else(|| anyhow::anyhow!("no runs"))
}
