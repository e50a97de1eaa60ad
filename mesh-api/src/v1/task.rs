//! Tasks: endpoints as the cluster sees them, and a node's own tasks (`meshctl run`, `exec`,
//! `logs`).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::spec::EndpointState;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskInfo {
    pub name: String,
    pub service: Option<String>,
    pub network: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub node: String,
    pub state: EndpointState,
    /// False while its node is drained or the task is not running.
    pub active: bool,
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
