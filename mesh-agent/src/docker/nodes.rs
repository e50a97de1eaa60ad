//! `/nodes`, `/nodes/{id}`, `/nodes/{id}/update`: mesh's nodes as Docker's. Every mesh node
//! takes commands, so each shows as a reachable manager; none is a leader (there is no
//! quorum to lead).

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, State},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{DockerError, DockerResult, body, timestamp};
use crate::{agent::Agent, answers::node_info, cluster::View};
use mesh_api::spec::{Availability, NodeStatus};

pub fn routes() -> Router<Arc<Agent>> {
    Router::new()
        .route("/nodes", get(list))
        .route("/nodes/{id}", get(inspect).delete(remove))
        .route("/nodes/{id}/update", post(update))
}

pub fn node_id(name: &str) -> String {
    mesh_api::id::node_id(name)
}

/// A node named by its ID, a unique ID prefix, its name or its hostname.
pub fn resolve(agent: &Agent, view: &View, id: &str) -> Result<String, DockerError> {
    if id == "self" || id == node_id(agent.node_name()) {
        return Ok(agent.node_name().to_owned());
    }
    if view.nodes.contains_key(id) {
        return Ok(id.to_owned());
    }
    let matches: Vec<&String> = view
        .nodes
        .keys()
        .filter(|n| node_id(n).starts_with(id))
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => view
            .nodes
            .values()
            .find(|n| n.record.as_ref().is_some_and(|r| r.hostname == id))
            .map(|n| n.name.clone())
            .ok_or_else(|| DockerError::not_found(format!("node {id} not found"))),
        _ => Err(DockerError::not_found(format!(
            "node {id} is ambiguous ({} matches)",
            matches.len()
        ))),
    }
}

/// A node as the Engine API shows it.
pub fn node(agent: &Agent, view: &View, name: &str) -> Option<Value> {
    let n = node_info(agent, view, name)?;
    // Mesh keeps no index for a node's spec: a digest of it changes when the spec does
    // (what a client's read-modify-write needs), and `update` does not insist on it.
    let index = view.nodes.get(name).map_or(1, |v| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&v.spec.labels, v.spec.availability).hash(&mut h);
        h.finish() & 0xffff_ffff
    });
    let addr = n.address.map(|a| a.to_string()).unwrap_or_default();
    let arch = match n.platform.arch.as_str() {
        "" => std::env::consts::ARCH.to_owned(),
        a => a.to_owned(),
    };
    let mut v = json!({
        "ID": n.id,
        "Version": { "Index": index },
        "CreatedAt": timestamp(0),
        "UpdatedAt": timestamp(0),
        "Spec": {
            "Labels": n.operator_labels,
            "Role": n.role.docker_name(),
            "Availability": match n.availability {
                Availability::Active => "active",
                Availability::Drain => "drain",
            },
        },
        "Description": {
            "Hostname": if n.hostname.is_empty() { n.name.clone() } else { n.hostname.clone() },
            "Platform": {
                "Architecture": arch,
                "OS": if n.platform.os.is_empty() { "linux" } else { n.platform.os.as_str() },
            },
            "Resources": {
                "NanoCPUs": n.resources.capacity.nano_cpus,
                "MemoryBytes": n.resources.capacity.memory_bytes,
            },
            "Engine": {
                "EngineVersion": n.agent_version.unwrap_or_default(),
                "Labels": n.engine_labels,
                "Plugins": [{ "Type": "Network", "Name": "overlay" }],
            },
        },
        "Status": {
            "State": match n.status {
                NodeStatus::Ready => "ready",
                NodeStatus::Down => "down",
            },
            "Addr": addr,
        },
    });
    // Docker shows a manager status for managers only (an empty column for workers).
    if n.role == crate::roles::Role::Admin {
        v["ManagerStatus"] = json!({
            "Leader": false,
            "Reachability": match n.status {
                NodeStatus::Ready => "reachable",
                NodeStatus::Down => "unreachable",
            },
            "Addr": format!("{addr}:{}", agent.config.gossip_port),
        });
    }
    Some(v)
}

async fn list(State(agent): State<Arc<Agent>>) -> DockerResult<Vec<Value>> {
    let view = agent.refresh().await;
    Ok(Json(
        view.nodes
            .keys()
            .filter_map(|n| node(&agent, &view, n))
            .collect(),
    ))
}

async fn inspect(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> DockerResult<Value> {
    let view = agent.refresh().await;
    let name = resolve(&agent, &view, &id)?;
    node(&agent, &view, &name)
        .map(Json)
        .ok_or_else(|| DockerError::not_found(format!("node {id} not found")))
}

/// Docker's NodeSpec, as `docker node update` sends it back.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct NodeSpec {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    availability: Option<String>,
}

async fn update(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<(), DockerError> {
    let spec: NodeSpec = body(&bytes)?;
    if spec.name.as_ref().is_some_and(|n| !n.is_empty()) {
        return Err(DockerError::bad_request(
            "Spec.Name is not supported by mesh: a node is named by its agent (node_name)",
        ));
    }
    let role = match spec.role.as_deref() {
        None | Some("") => None,
        Some("manager") => Some(crate::roles::Role::Admin),
        Some("worker") => Some(crate::roles::Role::Worker),
        Some(other) => {
            return Err(DockerError::bad_request(format!(
                "invalid role {other:?}: use manager or worker"
            )));
        }
    };
    let availability = match spec.availability.as_deref() {
        None | Some("") => None,
        Some("active") => Some(Availability::Active),
        Some("drain") => Some(Availability::Drain),
        Some("pause") => {
            return Err(DockerError::bad_request(
                "availability pause is not supported by mesh: use active or drain",
            ));
        }
        Some(other) => {
            return Err(DockerError::bad_request(format!(
                "invalid availability {other:?}: use active or drain"
            )));
        }
    };
    let labels = spec.labels.unwrap_or_default();
    for k in labels.keys() {
        mesh_api::spec::parse_label(k).map_err(DockerError::bad_request)?;
    }
    let view = agent.refresh().await;
    let name = resolve(&agent, &view, &id)?;
    // Docker sends the whole spec back: a role equal to the node's changes nothing.
    if let Some(role) = role {
        agent.set_role(&name, role).await?;
    }
    agent
        .update_node(&name, |s| {
            if let Some(a) = availability {
                s.availability = a;
            }
            // Docker sends the node's whole label set: what is missing was removed.
            s.labels = labels;
        })
        .await?;
    Ok(())
}

#[derive(Deserialize)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

async fn remove(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Result<(), DockerError> {
    let view = agent.refresh().await;
    let name = resolve(&agent, &view, &id)?;
    agent.remove_node(&name, q.force).await?;
    Ok(())
}
