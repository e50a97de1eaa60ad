//! What a task may use of its node (Docker's `Resources`) and what it may do on it (Docker's
//! capabilities, read-only root, sysctls, ulimits, init): the fields both drivers enforce.

use std::collections::BTreeMap;

pub use mesh_planner::Resources;
use serde::{Deserialize, Serialize};

/// Reservations decide placement; limits are enforced by the kernel on the task.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResources {
    #[serde(default, skip_serializing_if = "Resources::is_zero")]
    pub reservations: Resources,
    #[serde(default, skip_serializing_if = "Limits::is_empty")]
    pub limits: Limits,
}

impl TaskResources {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Zero: no limit, as Docker's zero values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    #[serde(default)]
    pub nano_cpus: u64,
    #[serde(default)]
    pub memory_bytes: u64,
    /// The most processes and threads the task may have (Docker's `--limit-pids`).
    #[serde(default)]
    pub pids: u64,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// What the task's processes may do: Docker's `--cap-add`, `--cap-drop`, `--read-only`,
/// `--sysctl`, `--ulimit` and `--init`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Security {
    /// Capability names as Docker spells them (`NET_BIND_SERVICE`, or `ALL`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// The task's root filesystem is mounted read-only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// Namespaced sysctls only (`net.*` of the task's network namespace, and the like).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sysctls: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ulimits: Vec<Ulimit>,
    /// An init process reaps zombies and forwards signals.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init: bool,
}

impl Security {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// `nofile=4096:8192` (soft:hard).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ulimit {
    pub name: String,
    pub soft: u64,
    pub hard: u64,
}
