//! A task's endpoint as the load balancer and DNS see it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Whether an endpoint takes traffic (distinct from the Swarm task state of
/// `mesh_planner::TaskState`, and from the local process's state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointState {
    #[default]
    Running,
    /// Draining before its process is stopped: no load balancer sends it new connections and
    /// DNS no longer names it, but every node still reaches it (its overlay entries stay), so
    /// the connections it has finish.
    Stopping,
    Exited,
}

impl fmt::Display for EndpointState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Exited => "exited",
        })
    }
}
