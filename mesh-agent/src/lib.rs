//! mesh-agent: the per-node daemon. It gossips the cluster's table, plans and runs its part
//! of every service, and programs the eBPF dataplane, the overlay and DNS from the table.
//! Its words (specs, requests, answers) are `mesh_api`'s; `meshctl` and `mesh-cni` are
//! crates of their own that talk to it over its socket.

pub mod agent;
pub mod answers;
pub mod bpf;
pub mod capacity;
pub mod cgroup;
pub mod cluster;
pub mod config;
pub mod dataplane;
pub mod docker;
pub mod events;
pub mod gossip;
pub mod http;
pub mod identity;
pub mod install;
pub mod lb;
pub mod logging;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod overlay;
pub mod overview;
pub mod roles;
pub mod serving;
pub mod state_files;
pub mod task;
pub mod ui;
