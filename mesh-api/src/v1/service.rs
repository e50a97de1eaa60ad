//! Services: `GET/POST /v1/services`, updates, scale, `service ps`.

use std::{collections::BTreeMap, net::Ipv4Addr};

use mesh_planner::ServiceMode;
use serde::{Deserialize, Serialize};

use super::ServiceStats;
use crate::spec::{EndpointMode, PortSpec, ServiceSpec};

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
