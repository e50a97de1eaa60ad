//! Volumes: `/v1/volumes`. A volume is node-local (Swarm's `local` driver): each node lists
//! its own in gossip, and every node's agent answers `volume ls` for the whole cluster.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The only volume driver mesh has, named as Docker names it.
pub const VOLUME_DRIVER: &str = "local";

/// `meshctl volume create`: made on the node whose agent takes the request.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeCreate {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A volume as `volume ls` and `volume inspect` show it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Volume {
    pub name: String,
    pub driver: String,
    /// The node that holds it.
    pub node: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where its data lives on its node.
    pub mountpoint: String,
    pub created_ms: u64,
}
