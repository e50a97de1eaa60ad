//! `/tasks` and `/tasks/{id}`: the cluster's service tasks as Docker's. `docker service ps`
//! lists them by service; `docker service create` and `update` poll the up-to-date ones
//! until every slot runs.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    routing::get,
};
use serde_json::{Value, json};

use super::{
    DockerError, DockerResult, Filters, FiltersQuery, nodes::node_id, services::service_id,
    spec::from_mesh, timestamp,
};
use crate::{agent::Agent, cluster::View};
use mesh_api::spec::{NodeStatus, ServiceSpec};
use mesh_planner::{DesiredState, Slot, Task, TaskState};

pub fn routes() -> Router<Arc<Agent>> {
    Router::new()
        .route("/tasks", get(list))
        .route("/tasks/{id}", get(inspect))
}

fn node_ready(view: &View, node: &str) -> bool {
    view.nodes
        .get(node)
        .is_some_and(|n| n.status == NodeStatus::Ready)
}

/// The task's state in Docker's words; a task of a node that is down is orphaned, as Swarm
/// says.
fn state(view: &View, t: &Task) -> &'static str {
    if !node_ready(view, &t.node) && !t.state.is_terminal() {
        return "orphaned";
    }
    match t.state {
        TaskState::New => "new",
        TaskState::Assigned => "assigned",
        TaskState::Preparing => "preparing",
        TaskState::Starting => "starting",
        TaskState::Running => "running",
        TaskState::Complete => "complete",
        TaskState::Shutdown => "shutdown",
        TaskState::Failed => "failed",
        TaskState::Rejected => "rejected",
    }
}

fn desired(view: &View, spec: &ServiceSpec, t: &Task) -> &'static str {
    if !node_ready(view, &t.node) {
        return "shutdown";
    }
    match t.desired {
        // A job's task is meant to complete (Docker's desired state of job tasks).
        DesiredState::Running if spec.mode.is_job() => "complete",
        DesiredState::Running => "running",
        DesiredState::Shutdown => "shutdown",
    }
}

/// The spec a task was made from: the service's, or the one before its last update.
fn template_of(spec: &ServiceSpec, template: u64) -> Option<&ServiceSpec> {
    std::iter::successors(Some(spec), |s| s.previous.as_deref())
        .find(|s| s.template_id() == template)
}

/// A task as the Engine API shows it.
pub fn task(view: &View, t: &Task) -> Option<Value> {
    let service = view.services.get(&t.service)?;
    let spec = &service.spec;
    let task_spec = template_of(spec, t.template)
        .map(|s| from_mesh(s, view).task_template)
        .unwrap_or_default();
    let state = state(view, t);
    let message = match t.state {
        TaskState::Running => "started",
        TaskState::Complete => "finished",
        TaskState::Shutdown => "shutdown",
        TaskState::Failed => "task: non-zero exit",
        TaskState::Rejected => "rejected",
        TaskState::Preparing => "preparing",
        TaskState::Starting => "starting",
        TaskState::Assigned => "assigned",
        TaskState::New => "created",
    };
    let mut status = json!({
        "Timestamp": timestamp(t.since_ms),
        "State": state,
        "Message": message,
        "ContainerStatus": {
            "ContainerID": "",
            "PID": 0,
            "ExitCode": t.exit_code.unwrap_or(0),
        },
        "PortStatus": {},
    });
    let err = if state == "orphaned" {
        Some(format!("node {} is down", t.node))
    } else {
        t.error.clone()
    };
    if let Some(e) = err {
        status["Err"] = json!(e);
    }
    let ip = view
        .endpoints
        .iter()
        .chain(&view.down_endpoints)
        .find(|e| e.record.task == t.name())
        .map(|e| e.record.ip);
    let attachments: Vec<Value> = ip
        .and_then(|ip| {
            let net = view.networks.get(&spec.network)?;
            Some(json!({
                "Network": {
                    "ID": super::spec::NetworkNames::network_id(view, &spec.network),
                    "Spec": { "Name": spec.network, "Labels": net.spec.labels },
                },
                "Addresses": [format!("{ip}/{}", net.spec.subnet.prefix_len())],
            }))
        })
        .into_iter()
        .collect();
    Some(json!({
        "ID": t.id,
        "Version": { "Index": t.since_ms },
        "CreatedAt": timestamp(t.created_ms),
        "UpdatedAt": timestamp(t.since_ms),
        "Labels": {},
        "Spec": task_spec,
        "ServiceID": service_id(view, &t.service),
        "Slot": match &t.slot {
            Slot::Replica(n) => *n,
            Slot::Node(_) => 0,
        },
        "NodeID": node_id(&t.node),
        "Status": status,
        "DesiredState": desired(view, spec, t),
        "NetworksAttachments": attachments,
    }))
}

/// The service named by a filter value: its ID, an ID prefix or its name.
fn service_matches(view: &View, name: &str, v: &str) -> bool {
    name == v || service_id(view, name).starts_with(v)
}

async fn list(
    State(agent): State<Arc<Agent>>,
    Query(q): Query<FiltersQuery>,
) -> DockerResult<Vec<Value>> {
    let filters = Filters::parse(&q)?;
    filters.only(&[
        "service",
        "node",
        "desired-state",
        "id",
        "name",
        "label",
        "_up-to-date",
    ])?;
    let view = agent.refresh().await;
    let me = agent.node_name();
    let up_to_date = filters
        .values("_up-to-date")
        .is_some_and(|v| v.iter().any(|v| v == "true" || v == "1"));
    let tasks = view
        .tasks
        .iter()
        .filter(|t| {
            let Some(s) = view.services.get(&t.service) else {
                return false;
            };
            filters.matches("service", |v| service_matches(&view, &t.service, v))
                && filters.matches("node", |v| {
                    let v = if v == "self" { me } else { v };
                    t.node == v || node_id(&t.node).starts_with(v)
                })
                && filters.matches("desired-state", |v| {
                    let d = desired(&view, &s.spec, t);
                    // Docker's `accepted` names tasks that are meant to run too.
                    v == d || (v == "accepted" && d == "running")
                })
                && filters.matches("id", |v| t.id.starts_with(v))
                && filters.matches("name", |v| t.name().starts_with(v))
                // As swarmkit: a task carries its service's labels (`docker stack ps` asks
                // for com.docker.stack.namespace).
                && filters.labels_match(&s.spec.labels)
                && (!up_to_date || t.template == s.spec.template_id())
        })
        .filter_map(|t| task(&view, t))
        .collect();
    Ok(Json(tasks))
}

async fn inspect(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> DockerResult<Value> {
    let view = agent.refresh().await;
    let found: Vec<&Task> = view
        .tasks
        .iter()
        .filter(|t| t.id.starts_with(&id))
        .collect();
    match found.as_slice() {
        [t] => task(&view, t)
            .map(Json)
            .ok_or_else(|| DockerError::not_found(format!("task {id} not found"))),
        [] => Err(DockerError::not_found(format!("task {id} not found"))),
        _ => Err(DockerError::not_found(format!(
            "task {id} is ambiguous ({} matches)",
            found.len()
        ))),
    }
}
