//! Builders shared by the planner's scenario and property tests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use mesh_planner::{
    Cluster, DesiredState, Placement, Plan, Service, ServiceMode, Slot, SlotPlacement, Task,
    TaskState, plan,
};

pub const DRIVER: &str = "process";
pub const SERVICE: &str = "web";

/// A ready, active node with the process driver.
pub fn node(name: &str) -> mesh_planner::Node {
    mesh_planner::Node {
        name: name.into(),
        id: format!("id-{name}"),
        hostname: name.into(),
        ready: true,
        active: true,
        labels: BTreeMap::new(),
        engine_labels: BTreeMap::new(),
        drivers: vec![DRIVER.into()],
        capacity: Default::default(),
        role: Default::default(),
        platform: Default::default(),
    }
}

pub fn labelled(name: &str, labels: &[(&str, &str)]) -> mesh_planner::Node {
    mesh_planner::Node {
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..node(name)
    }
}

pub fn nodes(n: usize) -> Vec<mesh_planner::Node> {
    (1..=n).map(|i| node(&format!("n{i}"))).collect()
}

/// A running task of `web` at template version 1.
pub fn task(id: &str, slot: Slot, node: &str, created_ms: u64) -> Task {
    Task {
        id: id.into(),
        service: SERVICE.into(),
        slot,
        node: node.into(),
        spec_version: 1,
        template: 1,
        desired: DesiredState::Running,
        state: TaskState::Running,
        created_ms,
        since_ms: created_ms,
        error: None,
        exit_code: None,
        attempt: 0,
        window_start_ms: 0,
        not_before_ms: None,
        holds_slot: false,
        running_ms: None,
        reservation: Default::default(),
    }
}

pub fn replica(id: &str, slot: u32, node: &str, created_ms: u64) -> Task {
    task(id, Slot::Replica(slot), node, created_ms)
}

/// The service under test; `placement` is borrowed by `Service`, so the spec owns it.
#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub mode: ServiceMode,
    pub placement: Placement,
    pub template: u64,
    pub update: mesh_planner::UpdateConfig,
    pub paused: bool,
    pub reservation: mesh_planner::Resources,
    /// The view's clock.
    pub now_ms: u64,
}

impl Spec {
    pub fn replicated(replicas: u32) -> Self {
        Self {
            name: SERVICE.into(),
            mode: ServiceMode::Replicated { replicas },
            placement: Placement::default(),
            template: 1,
            // Start-first, so a replaced slot keeps serving in the rolling tests.
            update: mesh_planner::UpdateConfig {
                order: mesh_planner::UpdateOrder::StartFirst,
                ..Default::default()
            },
            paused: false,
            reservation: Default::default(),
            now_ms: 1_000_000,
        }
    }

    pub fn global() -> Self {
        Self {
            mode: ServiceMode::Global,
            ..Self::replicated(1)
        }
    }

    pub fn replicated_job(completions: u32, max_concurrent: u32) -> Self {
        Self {
            mode: ServiceMode::ReplicatedJob {
                completions,
                max_concurrent,
            },
            ..Self::replicated(1)
        }
    }

    pub fn global_job() -> Self {
        Self {
            mode: ServiceMode::GlobalJob,
            ..Self::replicated(1)
        }
    }

    pub fn constraint(mut self, c: &str) -> Self {
        self.placement.constraints.push(c.parse().unwrap());
        self
    }

    pub fn spread(mut self, p: &str) -> Self {
        self.placement.preferences.push(p.parse().unwrap());
        self
    }

    /// Each task reserves this many CPUs (billionths) and bytes.
    pub fn reserve(mut self, nano_cpus: u64, memory_bytes: u64) -> Self {
        self.reservation = mesh_planner::Resources {
            nano_cpus,
            memory_bytes,
        };
        self
    }

    pub fn max_per_node(mut self, m: u32) -> Self {
        self.placement.max_replicas_per_node = Some(m);
        self
    }

    pub fn service(&self) -> Service<'_> {
        Service {
            name: &self.name,
            mode: self.mode,
            placement: &self.placement,
            driver: DRIVER,
            template: self.template,
            update: self.update,
            paused: self.paused,
            reservation: self.reservation,
        }
    }

    pub fn plan(&self, nodes: &[mesh_planner::Node], tasks: &[Task]) -> Plan {
        plan(
            &Cluster {
                nodes,
                tasks,
                now_ms: self.now_ms,
            },
            &self.service(),
        )
    }
}

/// Slot → where the plan puts it.
pub fn placements(plan: &Plan) -> BTreeMap<Slot, SlotPlacement> {
    plan.slots
        .iter()
        .map(|s| (s.slot.clone(), s.placement.clone()))
        .collect()
}

/// Nodes the plan starts a task on, one entry per start.
pub fn starts(plan: &Plan) -> Vec<(Slot, String)> {
    plan.slots
        .iter()
        .filter_map(|s| match &s.placement {
            SlotPlacement::Start { node } => Some((s.slot.clone(), node.clone())),
            _ => None,
        })
        .collect()
}

pub fn stopped(plan: &Plan) -> Vec<&str> {
    plan.stops.iter().map(|s| s.task.as_str()).collect()
}

/// Per node: slots kept there plus slots started there.
pub fn per_node(plan: &Plan) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in &plan.slots {
        match &s.placement {
            SlotPlacement::Kept { node, .. }
            | SlotPlacement::Start { node }
            | SlotPlacement::Stopping { node, .. } => *m.entry(node.clone()).or_default() += 1,
            SlotPlacement::Pending { .. } => {}
        }
    }
    m
}

/// Carries a plan out the way the nodes would: each stop removes its task, each start adds
/// a task of the current template on its node, and every live task of the service then
/// reaches Running (its node starts it). Returns whether anything changed.
pub fn apply(spec: &Spec, plan: &Plan, tasks: &mut Vec<Task>, round: u64) -> bool {
    let before = tasks.clone();
    tasks.retain(|t| !plan.stops.iter().any(|s| s.task == t.id));
    for (slot, node) in starts(plan) {
        let mut t = task(
            &format!("r{round}-{}-{slot}", node),
            slot,
            &node,
            10_000 + round,
        );
        t.service = spec.name.clone();
        t.template = spec.template;
        t.reservation = spec.reservation;
        t.state = TaskState::New;
        tasks.push(t);
    }
    for t in tasks.iter_mut() {
        if t.service == spec.name && t.is_live() {
            t.state = TaskState::Running;
        }
    }
    *tasks != before
}
