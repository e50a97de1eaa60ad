//! mesh-agent: the per-node daemon that programs the eBPF dataplane and kernel overlay from
//! the gossiped service table, and `meshctl`, the CLI that talks to it.

pub mod api;
pub mod bpf;
pub mod cli;
pub mod dataplane;
pub mod lb;
pub mod logging;
