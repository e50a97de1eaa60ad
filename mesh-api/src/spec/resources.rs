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

/// `service update --limit-cpu/--limit-memory/--limit-pids`: each set one replaces the
/// limit, and 0 removes it (as Docker's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nano_cpus: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

impl LimitsChange {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    pub fn apply(&self, limits: &mut Limits) {
        for (to, field) in [
            (self.nano_cpus, &mut limits.nano_cpus),
            (self.memory_bytes, &mut limits.memory_bytes),
            (self.pids, &mut limits.pids),
        ] {
            if let Some(v) = to {
                *field = v;
            }
        }
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

/// Sizes as Docker prints them (`64MiB`), the same everywhere mesh prints one.
pub use mesh_planner::bytes_size;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_as_dockers() {
        assert_eq!(bytes_size(64 << 20), "64MiB");
        assert_eq!(bytes_size(512 << 20), "512MiB");
        assert_eq!(bytes_size(3 << 29), "1.5GiB");
        assert_eq!(bytes_size(100), "100B");
        assert_eq!(bytes_size(1_000_000_000), "953.7MiB");
        assert_eq!(bytes_size(0), "0B");
    }
}
