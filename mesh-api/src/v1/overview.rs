//! `GET /v1/overview`: the whole cluster at a glance, for the UI page and dashboards.

use serde::{Deserialize, Serialize};

use super::NodeInfo;
use crate::spec::UpdateState;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Overview {
    pub cluster: String,
    /// The node whose agent answered.
    pub node: String,
    pub time_ms: u64,
    pub nodes: Vec<NodeInfo>,
    pub services: Vec<ServiceSummary>,
    /// Current tasks (no history rows), by node; pending slots are in their service.
    pub tasks: Vec<TaskCard>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceSummary {
    pub name: String,
    pub id: String,
    /// `replicated` or `global`.
    pub mode: String,
    pub running: usize,
    /// None: the service schedules nothing (its tasks are started by hand).
    pub desired: Option<usize>,
    /// `*:8080->80/tcp`, as `service ls`.
    pub ports: Vec<String>,
    pub vip: Option<std::net::Ipv4Addr>,
    pub network: String,
    /// The template version tasks should run.
    pub spec_version: u64,
    pub update: Option<UpdateProgress>,
    /// Why some slot has no node.
    pub pending: Option<String>,
}

/// Where the service's last rollout stands (Swarm's UpdateStatus), with how many live tasks
/// run the current template.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpdateProgress {
    pub state: UpdateState,
    pub message: String,
    /// Live tasks that run the current template.
    pub updated: usize,
    /// Live tasks that still run another one.
    pub outdated: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskCard {
    /// Empty for a task started by hand (it has no task record).
    pub id: String,
    /// `web.1`, `web.<node>`, or a hand-started task's name.
    pub name: String,
    pub service: String,
    pub slot: String,
    pub node: String,
    /// As `service ps` says it: Running, Starting, Failed, Orphaned (node down), ...
    pub state: String,
    pub desired: String,
    pub since_ms: u64,
    pub spec_version: u64,
    pub error: Option<String>,
    /// Health check result; None until services have health checks.
    pub health: Option<String>,
    /// How the load balancers see it: `active`, `draining` (node drained), or None
    /// (not a backend: not running).
    pub backend: Option<String>,
}
