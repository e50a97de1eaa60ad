//! Networks: `GET/POST /v1/networks`.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::TaskInfo;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkInfo {
    pub id: String,
    pub name: String,
    pub subnet: String,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    /// Nodes that have the network plumbed.
    pub nodes: Vec<String>,
    pub tasks: Vec<TaskInfo>,
    pub created_by: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkCreate {
    pub name: String,
    pub subnet: Option<String>,
}
