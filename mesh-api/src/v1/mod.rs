//! The agent's local API, version 1: HTTP/1.1 with JSON bodies over a unix socket, so only
//! local users allowed by the socket's permissions can reach it. These types are the wire
//! format of both sides; `meshctl`, `mesh-cni` and the tests are its clients.

mod cluster;
mod cni;
mod dataplane;
mod logs;
mod network;
mod node;
mod object;
mod overview;
mod service;
mod stack;
mod task;
mod volume;

pub use cluster::*;
pub use cni::*;
pub use dataplane::*;
pub use logs::*;
pub use network::*;
pub use node::*;
pub use object::*;
pub use overview::*;
pub use service::*;
pub use stack::*;
pub use task::*;
pub use volume::*;

use serde::{Deserialize, Serialize};

/// Default path of the agent's socket.
pub const DEFAULT_SOCKET: &str = "/run/mesh/agent.sock";

/// An error as the API returns it: a message a user can act on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// Decodes a request body, or says what is wrong with it. Every API route goes through here,
/// so it is what the bad-input tests and the fuzz target feed.
pub fn decode_request<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("malformed request: {e}"))
}
