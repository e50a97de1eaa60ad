//! What the agent answers about the cluster: `mesh_api::v1` records built from a view. One
//! place, so the API, the UI's overview and the metrics describe a node, a service and its
//! tasks the same way.

use std::collections::BTreeMap;

use mesh_api::{
    id::short_id,
    v1::{NetworkInfo, NodeInfo, NodeResources, ServiceInfo, ServiceTaskInfo, TaskInfo},
};
use mesh_planner::SlotPlacement;

use crate::{
    agent::Agent,
    cluster::{EndpointView, View},
};

pub fn node_info(agent: &Agent, view: &View, name: &str) -> Option<NodeInfo> {
    let n = view.nodes.get(name)?;
    Some(NodeInfo {
        id: mesh_api::id::node_id(name),
        name: name.to_owned(),
        hostname: n
            .record
            .as_ref()
            .map(|r| r.hostname.clone())
            .unwrap_or_default(),
        address: n.record.as_ref().map(|r| r.address),
        status: n.status,
        availability: n.spec.availability,
        labels: n.labels(),
        engine_labels: n.engine_labels(),
        operator_labels: n.spec.labels.clone(),
        agent_version: n.record.as_ref().map(|r| r.agent_version.clone()),
        drivers: n
            .record
            .as_ref()
            .map(|r| r.drivers.clone())
            .unwrap_or_default(),
        role: n.role,
        platform: n
            .record
            .as_ref()
            .map(|r| r.platform.clone())
            .unwrap_or_default(),
        is_self: name == agent.node_name(),
        resources: node_resources(view, name),
        insecure: n.record.as_ref().is_some_and(|r| r.insecure),
        key: n.record.as_ref().and_then(|r| r.key).map(|k| k.to_string()),
    })
}

/// What placement counts on a node: its capacity, what its live tasks reserve, what is left.
fn node_resources(view: &View, name: &str) -> NodeResources {
    let capacity = view
        .nodes
        .get(name)
        .and_then(|n| n.record.as_ref())
        .map(|r| r.capacity)
        .unwrap_or_default();
    let reserved = mesh_planner::reserved_by_node(&view.tasks)
        .get(name)
        .copied()
        .unwrap_or_default();
    NodeResources {
        capacity,
        reserved,
        available: capacity.saturating_sub(reserved),
    }
}

pub fn task_info(e: &EndpointView) -> TaskInfo {
    TaskInfo {
        name: e.record.task.clone(),
        service: e.record.service.clone(),
        network: e.record.network.clone(),
        ip: e.record.ip,
        mac: e.record.mac.clone(),
        node: e.node.clone(),
        state: e.record.state,
        active: e.active,
    }
}

pub fn network_info(view: &View, name: &str) -> Option<NetworkInfo> {
    let n = view.networks.get(name)?;
    let mut nodes: Vec<String> = view
        .attachments
        .iter()
        .filter(|a| a.record.network == name)
        .map(|a| a.node.clone())
        .collect();
    nodes.sort();
    nodes.dedup();
    Some(NetworkInfo {
        id: short_id(name, &n.created),
        name: name.to_owned(),
        subnet: n.spec.subnet.to_string(),
        gateway: n.spec.gateway,
        vni: n.spec.vni,
        nodes,
        tasks: view
            .endpoints
            .iter()
            .filter(|e| e.record.network == name)
            .map(task_info)
            .collect(),
        created_by: n.created.node.clone(),
    })
}

pub fn service_info(view: &View, name: &str) -> Option<ServiceInfo> {
    let s = view.services.get(name)?;
    let plan = view.plan(name);
    let job = plan
        .as_ref()
        .and_then(|p| mesh_planner::job::progress(s.spec.mode, p, &view.tasks));
    let (running, desired, pending) = match &plan {
        Some(plan) if let Some(job) = job => (
            job.running,
            Some(job.desired),
            plan.pending_reason().map(str::to_owned),
        ),
        Some(plan) => {
            let running = plan
                .slots
                .iter()
                .filter(|slot| match &slot.placement {
                    SlotPlacement::Kept { task, .. } => view
                        .tasks
                        .iter()
                        .any(|t| t.id == *task && t.state == mesh_planner::TaskState::Running),
                    _ => false,
                })
                .count();
            (
                running,
                Some(plan.slots.len()),
                plan.pending_reason().map(str::to_owned),
            )
        }
        // A task on several networks has an endpoint on each, and one started by hand may
        // be on any of them: count tasks, not endpoints.
        None => (
            view.backends(name)
                .filter(|e| e.active)
                .map(|e| e.record.task.as_str())
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            None,
            None,
        ),
    };
    Some(ServiceInfo {
        id: short_id(name, &s.created),
        name: name.to_owned(),
        network: s.spec.network.clone(),
        mode: s.spec.mode,
        endpoint_mode: s.spec.endpoint_mode,
        vip: s.spec.vip,
        ports: s.spec.ports.clone(),
        running,
        desired,
        completed: job.map(|j| j.completed),
        pending,
        coordinator: mesh_planner::coordinator(name, &view.planner_nodes()).map(str::to_owned),
        spec: s.spec.clone(),
        tasks: view.backends(name).map(task_info).collect(),
        created_by: s.created.node.clone(),
        dataplane: None,
    })
}

/// `service ps`: per slot, its current task (or why it has none), then older tasks.
pub fn service_tasks(view: &View, name: &str) -> Vec<ServiceTaskInfo> {
    let Some(service) = view.services.get(name) else {
        return Vec::new();
    };
    let ready = |node: &str| {
        view.nodes
            .get(node)
            .is_some_and(|n| n.status == mesh_api::spec::NodeStatus::Ready)
    };
    let mut by_slot: BTreeMap<mesh_planner::Slot, Vec<&mesh_planner::Task>> = BTreeMap::new();
    for t in view.tasks.iter().filter(|t| t.service == name) {
        by_slot.entry(t.slot.clone()).or_default().push(t);
    }
    let plan = view.plan(name);
    let template = service.spec.template_id();
    let job = service.spec.mode.is_job();
    let mut order: Vec<mesh_planner::Slot> = plan
        .iter()
        .flat_map(|p| p.slots.iter().map(|s| s.slot.clone()))
        .collect();
    for slot in by_slot.keys() {
        if !order.contains(slot) {
            order.push(slot.clone());
        }
    }
    let mut rows = Vec::new();
    for slot in order {
        let mut tasks = by_slot.remove(&slot).unwrap_or_default();
        let kept = plan.as_ref().and_then(|p| {
            p.slots
                .iter()
                .find(|s| s.slot == slot)
                .map(|s| s.placement.clone())
        });
        let kept_id = match &kept {
            Some(SlotPlacement::Kept { task, .. }) => Some(task.clone()),
            _ => None,
        };
        // The task that fills the slot first, then other live ones, then the newest.
        tasks.sort_by_key(|t| {
            (
                Some(&t.id) != kept_id.as_ref(),
                !(t.is_live() && ready(&t.node)),
                std::cmp::Reverse(t.created_ms),
            )
        });
        let mut first = true;
        if let Some(SlotPlacement::Pending { reason }) = &kept
            && !tasks.iter().any(|t| t.is_live() && ready(&t.node))
        {
            rows.push(ServiceTaskInfo {
                id: String::new(),
                name: format!("{name}.{slot}"),
                slot: slot.to_string(),
                node: None,
                desired: "Running".into(),
                state: "Pending".into(),
                created_ms: 0,
                since_ms: 0,
                error: Some(reason.clone()),
                spec_version: service.spec.version,
                updated: true,
                history: false,
                image: image_of(&service.spec, service.spec.template_id()),
            });
            first = false;
        }
        for t in tasks {
            let down = !ready(&t.node);
            let current = first || (t.is_live() && !down);
            rows.push(ServiceTaskInfo {
                id: t.id.clone(),
                name: t.name(),
                slot: slot.to_string(),
                node: Some(t.node.clone()),
                desired: if down {
                    "Shutdown".into()
                } else if job
                    && (t.desired == mesh_planner::DesiredState::Running
                        || t.state == mesh_planner::TaskState::Complete)
                {
                    // Docker's desired state of a job's task: it is meant to complete.
                    "Complete".into()
                } else {
                    t.desired.to_string()
                },
                state: if down && !t.state.is_terminal() {
                    "Orphaned".into()
                } else {
                    t.state.to_string()
                },
                created_ms: t.created_ms,
                since_ms: t.since_ms,
                error: if down && !t.state.is_terminal() {
                    Some(format!("node {} is down", t.node))
                } else {
                    t.error.clone()
                },
                spec_version: t.spec_version,
                updated: t.template == template,
                history: !current,
                image: image_of(&service.spec, t.template),
            });
            first = false;
        }
    }
    rows
}

/// The image of the template a task was made from: the service's, or the one it had before
/// its last update (what `\_` rows of an update show).
fn image_of(spec: &mesh_api::spec::ServiceSpec, template: u64) -> Option<String> {
    std::iter::successors(Some(spec), |s| s.previous.as_deref())
        .find(|s| s.template_id() == template)
        .and_then(|s| s.task.as_ref()?.image.clone())
}
