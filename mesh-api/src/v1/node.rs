//! Nodes: `GET /v1/nodes`, `POST /v1/nodes/{name}`.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::spec::{Availability, NodeStatus, Resources};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub name: String,
    pub hostname: String,
    pub address: Option<Ipv4Addr>,
    pub status: NodeStatus,
    pub availability: Availability,
    /// What placement constraints match: the node's own labels overlaid with the operator's.
    pub labels: BTreeMap<String, String>,
    /// The node's own labels (agent.toml `labels`, `--label`).
    #[serde(default)]
    pub engine_labels: BTreeMap<String, String>,
    /// Set with `meshctl node update --label-add`; they win over engine labels.
    #[serde(default)]
    pub operator_labels: BTreeMap<String, String>,
    pub agent_version: Option<String>,
    /// Task drivers the node runs (`process`, `podman`): placement only picks nodes that
    /// have a service's driver.
    #[serde(default)]
    pub drivers: Vec<String>,
    /// `admin` (Docker's manager: accepts commands) or `worker`.
    #[serde(default)]
    pub role: mesh_planner::Role,
    #[serde(default)]
    pub platform: mesh_planner::Platform,
    /// The node whose agent answered.
    #[serde(rename = "self")]
    pub is_self: bool,
    /// The node gossips without a cluster key (its agent runs with `--insecure`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// The node's public key (base64 Ed25519): every record it gossips is signed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// What it offers to tasks' reservations, what its tasks reserve, and what is left.
    #[serde(default)]
    pub resources: NodeResources,
}

/// A node's CPUs and memory as placement counts them. A zero capacity is "not advertised"
/// (an agent from before reservations): reservations do not limit it, and nothing is
/// available to show.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeResources {
    pub capacity: Resources,
    /// What the node's live tasks reserve, every service's together.
    pub reserved: Resources,
    /// Capacity less reserved (zero when reserved is more, after a capacity was lowered).
    pub available: Resources,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeUpdate {
    pub availability: Option<Availability>,
    /// `--role`, `node promote`/`demote`: a new role grant (admins only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<mesh_planner::Role>,
    /// `key=value` or `key`.
    #[serde(default)]
    pub label_add: Vec<String>,
    #[serde(default)]
    pub label_rm: Vec<String>,
}

impl NodeUpdate {
    /// `key=value` (or `key`, an empty value) pairs to set.
    pub fn labels_to_add(&self) -> Result<Vec<(String, String)>, String> {
        self.label_add
            .iter()
            .map(|l| crate::spec::parse_label(l))
            .collect()
    }
}
