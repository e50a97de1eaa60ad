//! mesh-api: the typed model every side of mesh shares.
//!
//! - [`spec`]: what a user asks the cluster to run (services, ports, tasks, secrets' grants),
//!   already parsed: flags and compose keys become these types at the edge (`meshctl`), so
//!   the agent never parses a duration or a port string.
//! - [`v1`]: the agent's local API, requests and answers.
//! - [`events`]: cluster events and their filters.
//! - [`id`]: stamps and Docker-style short IDs.
//! - [`client`]: the unix-socket client of the agent's API.
//!
//! Nothing here touches the kernel or runs a daemon; the crate sits below everything else
//! (it imports only `mesh-planner`).

pub mod client;
pub mod events;
pub mod id;
pub mod spec;
pub mod v1;

pub use client::Client;
