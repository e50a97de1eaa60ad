//! What a node's load balancer holds for a service, with its counters.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortStats {
    pub port: u16,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Active,
    Draining,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// New routing-mesh flows plus balanced sockets.
    pub flows: u64,
    pub packets: u64,
    pub bytes: u64,
    /// Packets or connects dropped because no backend was active.
    pub dropped: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStats {
    pub ip: Ipv4Addr,
    pub state: BackendState,
    /// Position in the round robin, for active backends.
    pub slot: Option<u32>,
    pub counters: Counters,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStats {
    pub id: String,
    pub name: String,
    /// The dataplane's index of the service (as in the maps).
    pub index: u32,
    pub counters: Counters,
    pub backends: Vec<BackendStats>,
}
