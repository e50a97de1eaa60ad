//! The agent's local API: HTTP/1.1 with JSON bodies over a unix socket, so only local users
//! allowed by the socket's permissions can reach it. `meshctl` is its client. The types here
//! are the wire format of both sides.

pub mod client;
mod events;
pub mod objects;
pub mod server;
pub mod stacks;

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use mesh_planner::ServiceMode;

use crate::{
    cluster::{Availability, EndpointMode, NodeStatus, PortSpec, ServiceSpec, Stamp, TaskState},
    gossip::auth::AuthReport,
};

/// Default path of the agent's socket.
pub const DEFAULT_SOCKET: &str = "/run/mesh/agent.sock";

/// An error as the API returns it: a message a user can act on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortStats {
    pub port: u16,
    pub packets: u64,
    pub bytes: u64,
}

/// A short stable identifier in Docker's style, derived from a name and its creation stamp
/// (so a re-created object gets a new one).
pub fn short_id(name: &str, created: &Stamp) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (name, created).hash(&mut h);
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// A node's ID: stable for its name.
pub fn node_id(name: &str) -> String {
    short_id(
        name,
        &Stamp {
            ms: 0,
            node: name.into(),
        },
    )
}

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
    /// The node whose agent answered.
    #[serde(rename = "self")]
    pub is_self: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkInfo {
    pub id: String,
    pub name: String,
    pub subnet: String,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    /// Nodes that have the network plumbed.
    pub nodes: Vec<String>,
    pub tasks: Vec<TaskInfo>,
    pub created_by: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkCreate {
    pub name: String,
    pub subnet: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskInfo {
    pub name: String,
    pub service: Option<String>,
    pub network: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub node: String,
    pub state: TaskState,
    /// False while its node is drained or the task is not running.
    pub active: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceInfo {
    pub id: String,
    pub name: String,
    pub network: String,
    pub mode: ServiceMode,
    pub endpoint_mode: EndpointMode,
    pub vip: Option<Ipv4Addr>,
    pub ports: Vec<PortSpec>,
    /// Slots with a running task, and how many the service wants (None: the service
    /// schedules nothing; its tasks are started by hand or by another runtime).
    pub running: usize,
    pub desired: Option<usize>,
    /// Why some slot has no node, if one has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
    /// The node that records the service's rollouts (any ready node can be it).
    #[serde(default)]
    pub coordinator: Option<String>,
    pub spec: ServiceSpec,
    /// The service's endpoints: its tasks as the load balancer and DNS see them.
    pub tasks: Vec<TaskInfo>,
    pub created_by: String,
    /// What this node's load balancer holds for the service, with its counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<crate::lb::ServiceStats>,
}

/// A row of `service ps`: a task of a slot, or a slot no node could take.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceTaskInfo {
    /// Empty for a pending slot (no task exists yet).
    pub id: String,
    /// `web.1` or `web.<node>`.
    pub name: String,
    pub slot: String,
    pub node: Option<String>,
    pub desired: String,
    pub state: String,
    /// Wall-clock ms when the task was made, and when it entered its state.
    #[serde(default)]
    pub created_ms: u64,
    pub since_ms: u64,
    pub error: Option<String>,
    pub spec_version: u64,
    /// Runs the service's current task template.
    #[serde(default)]
    pub updated: bool,
    /// An older task of the slot (Docker's `\_` rows).
    pub history: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceCreate {
    pub name: String,
    /// Default: the `ingress` network, created on first use.
    #[serde(default)]
    pub network: Option<String>,
    /// Docker's short (`8080:80`, `5353:53/udp`) or long (`published=8080,target=80`) syntax.
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub endpoint_mode: EndpointMode,
    /// `replicated` (default) or `global`.
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub replicas: Option<i64>,
    #[serde(default)]
    pub constraints: Vec<String>,
    #[serde(default)]
    pub placement_prefs: Vec<String>,
    #[serde(default)]
    pub replicas_max_per_node: Option<i64>,
    #[serde(flatten)]
    pub restart: RestartFlags,
    #[serde(flatten)]
    pub health: HealthFlags,
    #[serde(flatten)]
    pub rollout: RolloutFlags,
    /// Between SIGTERM and SIGKILL, e.g. `10s`.
    #[serde(default)]
    pub stop_grace_period: Option<String>,
    /// The task's command (with an image: the container's arguments); no command and no
    /// image: the service schedules nothing.
    #[serde(default)]
    pub command: Vec<String>,
    /// `KEY=VALUE`.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    /// An OCI image: tasks run as podman containers on nodes that have podman.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `--secret`: `NAME` or `source=NAME[,target=T][,uid=U][,gid=G][,mode=0400]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// `--config`: the same syntax; the target is an absolute path (default `/<name>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub configs: Vec<String>,
    /// Service labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// `meshctl secret create` / `config create`: the data travels base64 in the request (the
/// agent seals a secret before it is written anywhere).
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileObjectCreate {
    pub name: String,
    pub data: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl std::fmt::Debug for FileObjectCreate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileObjectCreate({})", self.name)
    }
}

/// A secret as `secret ls/inspect` show it: never its data.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecretInfo {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub size: usize,
    /// The cluster key it is sealed with.
    pub key: crate::gossip::keyring::KeyId,
    pub created_ms: u64,
    pub created_by: String,
    /// Services whose tasks get it.
    pub services: Vec<String>,
}

/// A config, with its data (base64) as `docker config inspect` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfigInfo {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub size: usize,
    pub data: String,
    pub created_ms: u64,
    pub created_by: String,
    pub services: Vec<String>,
}

/// `--restart-*` as typed (durations like `5s`, `1m30s`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RestartFlags {
    #[serde(default)]
    pub restart_condition: Option<String>,
    #[serde(default)]
    pub restart_delay: Option<String>,
    #[serde(default)]
    pub restart_max_attempts: Option<i64>,
    #[serde(default)]
    pub restart_window: Option<String>,
}

/// `--health-*` as typed.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HealthFlags {
    /// A command run inside the task (through `sh -c`).
    #[serde(default)]
    pub health_cmd: Option<String>,
    /// A path to GET on the task's first target port, or `PORT/PATH`.
    #[serde(default)]
    pub health_http: Option<String>,
    #[serde(default)]
    pub health_tcp: Option<u16>,
    #[serde(default)]
    pub health_interval: Option<String>,
    #[serde(default)]
    pub health_timeout: Option<String>,
    #[serde(default)]
    pub health_retries: Option<i64>,
    #[serde(default)]
    pub health_start_period: Option<String>,
    #[serde(default)]
    pub no_healthcheck: bool,
}

/// `--update-*` and `--rollback-*` as typed.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RolloutFlags {
    #[serde(default)]
    pub update_parallelism: Option<i64>,
    #[serde(default)]
    pub update_delay: Option<String>,
    #[serde(default)]
    pub update_order: Option<String>,
    #[serde(default)]
    pub update_failure_action: Option<String>,
    #[serde(default)]
    pub update_monitor: Option<String>,
    #[serde(default)]
    pub update_max_failure_ratio: Option<String>,
    #[serde(default)]
    pub rollback_parallelism: Option<i64>,
    #[serde(default)]
    pub rollback_delay: Option<String>,
    #[serde(default)]
    pub rollback_order: Option<String>,
    #[serde(default)]
    pub rollback_failure_action: Option<String>,
    #[serde(default)]
    pub rollback_monitor: Option<String>,
    #[serde(default)]
    pub rollback_max_failure_ratio: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceUpdate {
    #[serde(default)]
    pub replicas: Option<i64>,
    #[serde(default)]
    pub constraint_add: Vec<String>,
    #[serde(default)]
    pub constraint_rm: Vec<String>,
    #[serde(default)]
    pub placement_pref_add: Vec<String>,
    #[serde(default)]
    pub placement_pref_rm: Vec<String>,
    #[serde(default)]
    pub replicas_max_per_node: Option<i64>,
    /// `--publish-add` (the `--publish` syntax) and `--publish-rm PUBLISHED[/PROTOCOL]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish_add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish_rm: Vec<String>,
    #[serde(flatten)]
    pub restart: RestartFlags,
    /// The task's arguments (after its program), shell-quoted: `--args '-m http.server 80'`.
    #[serde(default)]
    pub args: Option<String>,
    /// `KEY=VALUE`.
    #[serde(default)]
    pub env_add: Vec<String>,
    /// `KEY`.
    #[serde(default)]
    pub env_rm: Vec<String>,
    #[serde(flatten)]
    pub health: HealthFlags,
    #[serde(flatten)]
    pub rollout: RolloutFlags,
    #[serde(default)]
    pub stop_grace_period: Option<String>,
    /// Replace every task even though nothing changed (re-spreads them).
    #[serde(default)]
    pub force: bool,
    /// Go back to the previous spec (`service rollback`).
    #[serde(default)]
    pub rollback: bool,
    /// `--secret-add` (the `--secret` syntax) and `--secret-rm NAME`; likewise configs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_rm: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_rm: Vec<String>,
}

/// `service scale web=5 api=2`: all or nothing.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceScale {
    pub replicas: BTreeMap<String, i64>,
}

/// Decodes a request body, or says what is wrong with it. Every API route goes through here,
/// so it is what the bad-input tests and the fuzz target feed.
pub fn decode_request<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("malformed request: {e}"))
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeUpdate {
    pub availability: Option<Availability>,
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
            .map(|l| crate::cluster::parse_label(l))
            .collect()
    }
}

/// `meshctl join-token`: how another host joins, through this node. As secret as the key
/// file; only root on a member gets it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JoinTokenInfo {
    pub token: String,
    /// The whole command to run on the joining host.
    pub command: String,
    /// The key the token carries (its fingerprint), safe to show.
    pub key: crate::gossip::keyring::KeyId,
    /// The latest key rotation, if one ran.
    pub rotation: Option<crate::agent::RotationStatus>,
}

impl std::fmt::Debug for JoinTokenInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JoinTokenInfo(key {})", self.key)
    }
}

/// `meshctl join-token --rotate`: the new key; the rotation goes on in the background.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RotateInfo {
    pub key: crate::gossip::keyring::KeyId,
}

/// How this node's gossip is protected (`GET /v1/gossip`): key ids and counters, never keys.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GossipInfo {
    pub node: String,
    pub cluster: String,
    /// False when the agent runs without a cluster key: anyone who reaches the gossip port
    /// can join, read and inject state.
    pub authenticated: bool,
    /// Keys, peers and drop counters of sealed gossip; absent when unauthenticated.
    pub auth: Option<AuthReport>,
}

/// `meshctl run`: start a task on this node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskRun {
    pub name: String,
    pub network: String,
    #[serde(default)]
    pub service: Option<String>,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
}

/// A task as this node knows it (running or exited).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LocalTaskInfo {
    pub name: String,
    pub service: Option<String>,
    pub network: String,
    pub ip: Option<Ipv4Addr>,
    pub node: String,
    pub state: String,
    pub exit_code: Option<i32>,
    pub pid: Option<u32>,
    pub netns: String,
    pub command: Vec<String>,
    pub log: String,
}

/// `meshctl exec`: run a command inside a task of this node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecRequest {
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Seconds before the command is killed.
    #[serde(default = "default_exec_timeout")]
    pub timeout_secs: u64,
}

fn default_exec_timeout() -> u64 {
    30
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecOutput {
    /// None when the command was ended by a signal.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// `POST /v1/cni/add`: what the CNI plugin asks for one container interface.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CniAdd {
    pub container_id: String,
    /// The namespace the runtime made (`CNI_NETNS`).
    pub netns: String,
    pub ifname: String,
    pub network: String,
    /// Make the container a backend of this service (`MESH_SERVICE=` in CNI_ARGS or
    /// `service` in the network config).
    #[serde(default)]
    pub service: Option<String>,
    /// Its name in the cluster (`K8S_POD_NAME` in CNI_ARGS; default `cni-<12 hex of id>`).
    #[serde(default)]
    pub task: Option<String>,
    /// The runtime's network aliases (podman's `--network-alias`): one that names a service
    /// of the network makes the container its backend, as Docker's aliases do.
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// `POST /v1/cni/del` and `/v1/cni/check`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CniRef {
    pub container_id: String,
    pub ifname: String,
}

/// One interface the agent put into a container's namespace.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CniInterface {
    /// Inside the namespace.
    pub name: String,
    pub host_veth: String,
    pub network: String,
    pub mac: String,
    /// Address with the network's prefix length.
    pub address: String,
    /// The node's address on that network or bridge.
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

/// What the agent plumbed for a CNI ADD (and what CHECK found).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CniInfo {
    pub task: String,
    pub network: String,
    pub service: Option<String>,
    pub netns: String,
    /// The overlay interface first, then the gateway-bridge egress if there is one.
    pub interfaces: Vec<CniInterface>,
    /// The default route's next hop (the node's gateway bridge), if the container got one.
    pub default_gateway: Option<Ipv4Addr>,
    pub nameservers: Vec<Ipv4Addr>,
}
