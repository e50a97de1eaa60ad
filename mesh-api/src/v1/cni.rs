//! The CNI plugin's requests to its node's agent: `/v1/cni/{add,del,check}`.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The `type` of a mesh network's CNI config: the plugin's binary name.
pub const CNI_PLUGIN_TYPE: &str = "mesh-cni";

/// `POST /v1/cni/add`: what the CNI plugin asks for one container interface.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CniAdd {
    pub container_id: String,
    /// The namespace the runtime made (`CNI_NETNS`).
    pub netns: String,
    pub ifname: String,
    pub network: String,
    /// Make the container a backend of this service (`MESH_SERVICE=` in CNI_ARGS or
    /// `service` in the network config).
    #[serde(default)]
    pub service: Option<String>,
    /// Its name in the cluster (`K8S_POD_NAME` in CNI_ARGS; default `cni-<12 hex of id>`).
    #[serde(default)]
    pub task: Option<String>,
    /// The runtime's network aliases (podman's `--network-alias`): one that names a service
    /// of the network makes the container its backend, as Docker's aliases do.
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// `POST /v1/cni/del` and `/v1/cni/check`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CniRef {
    pub container_id: String,
    pub ifname: String,
}

/// One interface the agent put into a container's namespace.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CniInterface {
    /// Inside the namespace.
    pub name: String,
    pub host_veth: String,
    pub network: String,
    pub mac: String,
    /// Address with the network's prefix length.
    pub address: String,
    /// The node's address on that network or bridge.
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

/// What the agent plumbed for a CNI ADD (and what CHECK found).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CniInfo {
    pub task: String,
    pub network: String,
    pub service: Option<String>,
    pub netns: String,
    /// The overlay interface first, then the gateway-bridge egress if there is one.
    pub interfaces: Vec<CniInterface>,
    /// The default route's next hop (the node's gateway bridge), if the container got one.
    pub default_gateway: Option<Ipv4Addr>,
    pub nameservers: Vec<Ipv4Addr>,
}
