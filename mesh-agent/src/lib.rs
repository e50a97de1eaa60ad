//! mesh-agent: the per-node daemon that programs the eBPF dataplane and kernel overlay from
//! the gossiped service table, and `meshctl`, the CLI that talks to it.

pub mod api;
pub mod cli;
pub mod dataplane;
pub mod logging;
pub mod netlink;
pub mod netns;
pub mod overlay;
pub mod task;
