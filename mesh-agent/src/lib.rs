//! mesh-agent: the per-node daemon that programs the eBPF dataplane and kernel overlay from
//! the gossiped service table, and `meshctl`, the CLI that talks to it.

pub mod agent;
pub mod api;
pub mod bpf;
pub mod cgroup;
pub mod cli;
pub mod cluster;
pub mod cni;
pub mod compose;
pub mod config;
pub mod dataplane;
pub mod events;
pub mod gossip;
pub mod install;
pub mod lb;
pub mod logging;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod overlay;
pub mod overview;
pub mod task;
pub mod ui;
