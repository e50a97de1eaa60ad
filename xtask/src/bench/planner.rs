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
//! With reservations each task reserves 0.1 CPU and 128 MiB; 3 nodes have 64 CPUs and 256
//! GiB each, the 1,000 nodes 4 CPUs and 8 GiB, so everything fits and both sides place
//! every task. Medians of many runs on a shared machine; the ratio is the number to read.

use std::time::Instant;

use anyhow::{Result, ensure};
use mesh_planner::{
    Cluster, DesiredState, Node, Placement, Plan, Resources, Service, ServiceMode, SlotPlacement,
    Task, TaskState, UpdateConfig, plan_all,
};

use super::report::{Report, Spread, Table};

const TASKS: u32 = 300;
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
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Self::Place => "place 300",
            Self::Steady => "steady 300",
            Self::TenServices => "10 services × 30",
        }
    }

    /// (service names, replicas each).
    fn services(self) -> (Vec<String>, u32) {
        match self {
            Self::Place | Self::Steady => (vec!["web".into()], TASKS),
            Self::TenServices => ((0..10).map(|i| format!("svc{i}")).collect(), TASKS / 10),
        }
    }
}

fn nodes(n: usize, reserve: bool) -> Vec<Node> {
    let capacity = match (reserve, n <= 3) {
        (false, _) => Resources::default(),
        (true, true) => Resources {
            nano_cpus: 64_000_000_000,
            memory_bytes: 256 * GIB,
        },
        (true, false) => Resources {
            nano_cpus: 4_000_000_000,
            memory_bytes: 8 * GIB,
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
    let nodes = nodes(n, reserve);
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
        Case::Steady => running(&fresh, &names, reserve),
        Case::Place | Case::TenServices => Vec::new(),
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
