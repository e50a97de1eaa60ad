//! Tasks as their nodes report them in gossip: one record per task, owned by the node that
//! runs it. A task is one attempt at filling a slot; a restart is a new task in the same slot.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::spec::Resources;

/// Which part of a service a task fills: replica `n` (1-based) of a replicated service, or
/// the one task of a global service on a node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    Replica(u32),
    Node(String),
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Replica(n) => write!(f, "{n}"),
            Self::Node(n) => f.write_str(n),
        }
    }
}

/// Swarm's task states, in the order a task moves through them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Slot taken by this node; nothing done yet.
    New,
    /// Waiting for its start time (a restart delay).
    Assigned,
    /// Network and namespaces are being set up.
    Preparing,
    /// The process runs; not yet counted as serving.
    Starting,
    /// Serving: a backend in every node's load balancer and in DNS.
    Running,
    /// Exited with status 0.
    Complete,
    /// Stopped because it was asked to.
    Shutdown,
    /// Exited with a non-zero status, or was killed.
    Failed,
    /// Could not be started at all.
    Rejected,
}

impl TaskState {
    /// No longer running and never will be again.
    pub fn is_terminal(self) -> bool {
        self >= Self::Complete
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::New => "New",
            Self::Assigned => "Assigned",
            Self::Preparing => "Preparing",
            Self::Starting => "Starting",
            Self::Running => "Running",
            Self::Complete => "Complete",
            Self::Shutdown => "Shutdown",
            Self::Failed => "Failed",
            Self::Rejected => "Rejected",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the task's node wants it to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    Running,
    Shutdown,
}

impl fmt::Display for DesiredState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Running => "Running",
            Self::Shutdown => "Shutdown",
        })
    }
}

/// One task as its node reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Unique in the cluster; a restart gets a new one.
    pub id: String,
    pub service: String,
    pub slot: Slot,
    /// The node that runs it (and alone writes this record).
    pub node: String,
    /// The service's spec version when the task was made (what `service ps` shows).
    pub spec_version: u64,
    /// Which task template it runs (an opaque ID): a task whose template differs from the
    /// service's is replaced. Not a version: a rollback brings an older template back, and
    /// the tasks that kept running it are left alone.
    #[serde(default)]
    pub template: u64,
    pub desired: DesiredState,
    pub state: TaskState,
    /// Wall-clock ms when the task was created, and when it entered `state`.
    pub created_ms: u64,
    pub since_ms: u64,
    /// Why it failed or could not be placed, in words a user can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Restarts of this slot on this node before this task (within the restart window).
    #[serde(default)]
    pub attempt: u32,
    /// When the attempts' window opened.
    #[serde(default)]
    pub window_start_ms: u64,
    /// Not started before this time (the restart delay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
    /// When it became Running (kept after it ends, to tell a task that failed within an
    /// update's monitor window from one that ran its course).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_ms: Option<u64>,
    /// A finished task the restart policy will not replace: it keeps its slot (no other node
    /// fills it) until the service changes.
    #[serde(default)]
    pub holds_slot: bool,
    /// What it reserves of its node (its template's reservations when it was made): while
    /// live, no other task is placed where it would not fit beside it.
    #[serde(default, skip_serializing_if = "Resources::is_zero")]
    pub reservation: Resources,
}

impl Task {
    /// `web.2` or, for global services, `web.<node>`: Swarm's task names without the ID.
    pub fn name(&self) -> String {
        format!("{}.{}", self.service, self.slot)
    }

    /// Wants to run and has not ended: it occupies its slot on its node.
    pub fn is_live(&self) -> bool {
        self.desired == DesiredState::Running && !self.state.is_terminal()
    }
}
