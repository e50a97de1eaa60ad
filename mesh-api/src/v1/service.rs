//! Services: `GET/POST /v1/services`, updates, scale, `service ps`.

use std::{collections::BTreeMap, net::Ipv4Addr};

use mesh_planner::ServiceMode;
use serde::{Deserialize, Serialize};

use super::ServiceStats;
use mesh_planner::{Constraint, Spread};

use crate::spec::{
    EndpointMode, ExtraHost, FileRef, HealthChange, LimitsChange, LogDriver, NetworkAttachment,
    PortSpec, Protocol, RestartChange, ServiceSpec, UpdateConfigChange,
};

use super::TaskInfo;

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
    /// A job's completed slots in its current run (Docker's CompletedTasks); None for
    /// services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed: Option<usize>,
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
    pub dataplane: Option<ServiceStats>,
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
    /// The image the task runs (None: a process task, or a template this node no longer
    /// knows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// `service scale web=5 api=2`: all or nothing.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceScale {
    pub replicas: BTreeMap<String, u32>,
}

/// `service create`: the whole spec, parsed by the caller. The agent fills in what it owns
/// (versions, the VIP, rollout status) and checks the rest against the cluster.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceCreate {
    /// `network` empty: the default network (`ingress`, created on first use).
    pub spec: ServiceSpec,
    /// Docker's `--no-resolve-image`: do not look the image up before creating the service
    /// (each node pulls it when a task lands there).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_resolve_image: bool,
    /// Docker's `--with-registry-auth`: the caller's credentials for the image's registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<RegistryAuth>,
}

/// Credentials for one registry, as the caller's `podman login`/`docker login` stored them
/// (Docker's AuthConfig, which its X-Registry-Auth header carries). Debug hides the password.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
    /// The registry (`registry.example.com:5000`, `docker.io`).
    pub server_address: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RegistryAuth({}@{})", self.username, self.server_address)
    }
}

/// A published port as `--publish-rm` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    pub port: u16,
    pub protocol: Protocol,
}

/// `service update`: what changes; every field left empty keeps the service's value.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Docker's `--no-resolve-image` (see [`ServiceCreate`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_resolve_image: bool,
    /// Docker's `--with-registry-auth` (see [`ServiceCreate`]): replaces the credentials the
    /// service carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<RegistryAuth>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraint_add: Vec<Constraint>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraint_rm: Vec<Constraint>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement_pref_add: Vec<Spread>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement_pref_rm: Vec<Spread>,
    /// 0: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_max_per_node: Option<u32>,
    /// Publishing a port the service already publishes replaces it (a new target or mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish_add: Vec<PortSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish_rm: Vec<PublishedPort>,
    /// Join a network, or change the service's aliases on one it is on (Docker's
    /// `--network-add`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_add: Vec<NetworkAttachment>,
    /// Leave a network (Docker's `--network-rm`), by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_rm: Vec<String>,
    #[serde(default)]
    pub restart: RestartChange,
    /// The task's arguments after its program (replaces the old ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// The image the tasks run (a rolling update).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `--entrypoint` (an empty list resets the image's own), `--user`, `--workdir`,
    /// `--stop-signal` (an empty string resets each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// Capabilities granted (`--cap-add`) and taken away (`--cap-drop`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub container_label_add: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub container_label_rm: Vec<String>,
    /// Service labels (not the template: no rollout).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub label_add: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub label_rm: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_add: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_rm: Vec<String>,
    #[serde(default)]
    pub health: HealthChange,
    #[serde(default)]
    pub update_config: UpdateConfigChange,
    #[serde(default)]
    pub rollback_config: UpdateConfigChange,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_ms: Option<u64>,
    /// `--reserve-cpu` in billionths of a CPU (0 reserves none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserve_cpu: Option<u64>,
    /// `--reserve-memory` in bytes (0 reserves none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserve_memory: Option<u64>,
    /// Replace every task even though nothing changed (re-spreads them).
    #[serde(default)]
    pub force: bool,
    /// Go back to the previous spec (`service rollback`); takes no other change but the
    /// rollback config.
    #[serde(default)]
    pub rollback: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_add: Vec<FileRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_rm: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_add: Vec<FileRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_rm: Vec<String>,
    /// `--mount-add`: replaces a mount on the same target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_add: Vec<crate::spec::Mount>,
    /// `--mount-rm`: mounts removed by their target path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_rm: Vec<String>,
    /// `--limit-cpu`, `--limit-memory`, `--limit-pids`.
    #[serde(default, skip_serializing_if = "LimitsChange::is_empty")]
    pub limits: LimitsChange,
    /// `--hostname` ("" puts back the default, the task's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// `--host-add` (replaces an entry of the same host and address) and `--host-rm` (`host`
    /// removes every entry of that host, `host:ip` that one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_add: Vec<ExtraHost>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_rm: Vec<String>,
    /// `--dns-add/-rm`, `--dns-search-add/-rm`, `--dns-option-add/-rm`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_add: Vec<std::net::IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_rm: Vec<std::net::IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_search_add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_search_rm: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_option_add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_option_rm: Vec<String>,
    /// `--log-driver`/`--log-opt`: the task's log settings, replaced whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogDriver>,
}

impl ServiceUpdate {
    /// Changes that replace the tasks (their template), as opposed to placement, ports and
    /// policies.
    pub fn changes_template(&self) -> bool {
        self.args.is_some()
            || self.image.is_some()
            || self.entrypoint.is_some()
            || self.user.is_some()
            || self.workdir.is_some()
            || self.stop_signal.is_some()
            || !self.cap_add.is_empty()
            || !self.cap_drop.is_empty()
            || !self.container_label_add.is_empty()
            || !self.container_label_rm.is_empty()
            || !self.secret_add.is_empty()
            || !self.secret_rm.is_empty()
            || !self.config_add.is_empty()
            || !self.config_rm.is_empty()
            || !self.mount_add.is_empty()
            || !self.mount_rm.is_empty()
            || !self.env_add.is_empty()
            || !self.env_rm.is_empty()
            || !self.health.is_empty()
            || self.stop_grace_ms.is_some()
            || self.reserve_cpu.is_some()
            || self.reserve_memory.is_some()
            || !self.limits.is_empty()
            || self.hostname.is_some()
            || !self.host_add.is_empty()
            || !self.host_rm.is_empty()
            || !self.dns_add.is_empty()
            || !self.dns_rm.is_empty()
            || !self.dns_search_add.is_empty()
            || !self.dns_search_rm.is_empty()
            || !self.dns_option_add.is_empty()
            || !self.dns_option_rm.is_empty()
            || self.log.is_some()
    }
}
