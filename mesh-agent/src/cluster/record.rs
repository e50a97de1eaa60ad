//! Records as they travel in gossip (JSON values under well-known key prefixes).

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use ipnet::Ipv4Net;
use mesh_api::spec::Availability;
use mesh_api::spec::DRIVER_PROCESS;
use mesh_api::spec::EndpointState;
use mesh_api::spec::Protocol;
use serde::{Deserialize, Serialize};

/// Gossip keys. One place so that readers and writers cannot disagree.
pub mod key {
    /// The node's own record.
    pub const NODE: &str = "node";
    /// Set by an agent that is stopping with its dataplane and tasks left running: until the
    /// time it names, the node counts as up (see [`super::Restarting`]).
    pub const RESTARTING: &str = "restarting";
    /// `ep:<task>`: a task of this node, on its first network; `ep:<task>@<network>` on each
    /// further one (a task name has no `@`).
    pub const ENDPOINT: &str = "ep:";

    /// The key of `task`'s endpoint on its `index`th network named `network`.
    pub fn endpoint(task: &str, network: &str, index: usize) -> String {
        if index == 0 {
            format!("{ENDPOINT}{task}")
        } else {
            format!("{ENDPOINT}{task}@{network}")
        }
    }

    /// The task (and the network, past the first) an endpoint key names.
    pub fn endpoint_task(key: &str) -> Option<(&str, Option<&str>)> {
        let rest = key.strip_prefix(ENDPOINT)?;
        Some(match rest.split_once('@') {
            Some((task, network)) => (task, Some(network)),
            None => (rest, None),
        })
    }
    /// Every replicated object's prefix: what only admins write (see `crate::roles`).
    pub const OBJECT: &str = "obj:";
    /// `role:<node>`: a role grant signed with the admin key, republished by admins (see
    /// `crate::roles`); it proves itself, whoever carries it.
    pub const ROLE_GRANT: &str = "role:";
    /// `adminkey:<node>`: the admin key's secret sealed to a promoted node's key by the admin
    /// that promoted it (see `crate::roles`); only that node can open it.
    pub const ADMIN_KEY_FOR: &str = "adminkey:";
    /// `att:<network>`: this node's own address on a network it plumbs.
    pub const ATTACHMENT: &str = "att:";
    /// `blk:<network>:<index>`: a claim on a block of a network's subnet.
    pub const BLOCK: &str = "blk:";
    /// `obj:net:<name>`, replicated.
    pub const NETWORK: &str = "obj:net:";
    /// `obj:svc:<name>`, replicated.
    pub const SERVICE: &str = "obj:svc:";
    /// `obj:nodespec:<node>`, replicated: what an operator set on a node (drain, labels).
    pub const NODE_SPEC: &str = "obj:nodespec:";
    /// Set by an agent that leaves the cluster for good (`mesh-agent leave`): peers drop the
    /// node at once instead of waiting for the failure detector (see [`super::Left`]).
    pub const LEFT: &str = "left";
    /// The cluster key ids this node holds (see [`super::KeyState`]): how a rotation knows
    /// every node switched before it retires the old key.
    pub const KEYS: &str = "keys";
    /// `obj:noderm:<node>`, replicated: `meshctl node rm` (see [`super::NodeRemoval`]).
    pub const NODE_REMOVAL: &str = "obj:noderm:";
    /// `obj:clusterkey:primary`, replicated: the key a rotation makes primary everywhere (see
    /// [`super::KeyRotation`]).
    pub const CLUSTER_KEY: &str = "obj:clusterkey:";
    /// `tsk:<id>`: a task of a service on this node, with its state (mesh_planner::Task).
    pub const TASK: &str = "tsk:";
    /// `obj:secret:<name>`, replicated: a secret, its data sealed to the admin key (or, in a
    /// cluster without roles, under the cluster key).
    pub const SECRET: &str = "obj:secret:";
    /// `obj:secretcopy:<secret>@<node>`, replicated: a secret sealed to one node's key, written
    /// by an admin while that node runs a task granted the secret (see [`super::SecretCopy`]);
    /// `<secret>` is `registry-auth:<service>` for a service's registry credentials.
    pub const SECRET_COPY: &str = "obj:secretcopy:";

    /// The name of `secret`'s copy for `node` under [`SECRET_COPY`] (a secret name has no `@`).
    pub fn secret_copy(secret: &str, node: &str) -> String {
        format!("{secret}@{node}")
    }
    /// `obj:config:<name>`, replicated: a config file's data.
    pub const CONFIG: &str = "obj:config:";
    /// How far this node's load balancer has caught up with every other node's task
    /// removals (see [`super::LbProgress`]): what lets a stopping task know that no node
    /// sends it new connections any more.
    pub const LB_PROGRESS: &str = "lb";
    /// This node's volumes (a list of `mesh_api::v1::Volume`): volumes are node-local, and
    /// `volume ls` on any node shows every node's.
    pub const VOLUMES: &str = "vols";
}

/// A secret: immutable once created (rotate by creating another and switching services).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Bytes of the plaintext, shown by `secret inspect` in place of the data.
    pub size: usize,
    /// Sealed under the cluster key (see `gossip::sealed`): secrets of clusters without
    /// roles, and of clusters made before roles until an admin reseals them to the admin key.
    /// Every member can open this form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<Sealed>,
    /// base64 of the data sealed to the admin key (`identity::sealing`): only holders of
    /// `admin.key` open it; other nodes get a [`SecretCopy`] of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admins: Option<String>,
}

/// One node's copy of a secret: the data sealed to that node's key, for the tasks it runs
/// that are granted the secret. Only that node opens it; an admin writes it while the node
/// runs (or is about to start) such a task and removes it afterwards.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretCopy {
    /// The secret's name, or `registry-auth:<service>` for a service's registry credentials
    /// (the name the seal is bound to).
    pub secret: String,
    pub node: String,
    /// The node key it is sealed to: a node that comes back under a new key needs a new copy.
    pub key: crate::identity::PublicKey,
    /// The creation stamp of the secret it copies: a secret removed and created again under
    /// the same name needs new copies.
    pub of: mesh_api::id::Stamp,
    /// base64 of the sealed box.
    pub data: String,
}

impl fmt::Debug for SecretCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SecretCopy({} for {}, {} bytes)",
            self.secret,
            self.node,
            self.data.len()
        )
    }
}

/// A secret's data as gossip carries it, sealed by `gossip::sealed`. Its Debug form shows
/// only the key id and the size.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// The key it was sealed with.
    pub key: mesh_api::v1::KeyId,
    /// base64 of nonce ‖ ciphertext ‖ tag.
    pub data: String,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealed(key {}, {} bytes)", self.key, self.data.len())
    }
}

/// A config: a file given to tasks, immutable once created; not secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// base64 of the file's bytes (a config need not be text).
    pub data: String,
}

/// The first VXLAN network identifier mesh hands out (Docker's overlay driver starts at 4096
/// too, leaving lower ones to hand-made tunnels).
pub const FIRST_VNI: u32 = 4096;
/// The largest VNI a VXLAN header can carry.
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// What a node says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub hostname: String,
    /// Underlay address: VXLAN tunnels end here and published ports answer here.
    pub address: Ipv4Addr,
    /// Underlay MTU; overlay networks use 50 bytes less.
    pub mtu: u32,
    pub agent_version: String,
    /// Task drivers this node runs; placement only picks nodes that have a task's driver.
    #[serde(default = "default_drivers")]
    pub drivers: Vec<String>,
    /// The node's own labels (agent.toml `labels`, `--label`): Swarm's engine labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Ports of the node's address the agent itself needs (gossip, VXLAN, its UI and metrics
    /// listeners): a published port answers on every node, so none may take one of these.
    #[serde(default)]
    pub reserved_ports: Vec<ReservedPort>,
    /// What the agent runs on (`node.platform.*` constraints); empty from older agents.
    #[serde(default)]
    pub platform: mesh_planner::Platform,
    /// CPUs and memory the node offers to tasks' reservations (from the kernel, or agent.toml
    /// `cpus`/`memory`). Missing from an older agent's record: zero, which placement reads as
    /// "not advertised" and does not limit.
    #[serde(default, skip_serializing_if = "mesh_api::spec::Resources::is_zero")]
    pub capacity: mesh_api::spec::Resources,
    /// The node gossips without a cluster key (`--insecure`): anyone who reaches its gossip
    /// port can join and inject records, so every member's `node ls` warns about it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// The node's public key: every value it gossips is signed with the matching secret key
    /// (see `gossip::signed`), and peers bind its name to this key (`gossip::origin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<crate::identity::PublicKey>,
    /// The newest role grant this node knows for itself (see `crate::roles`): what lets a
    /// node that never saw the grant's writer know the role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<crate::roles::Grant>,
}

/// A port a node's agent listens on, and what for (the error names it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservedPort {
    pub protocol: Protocol,
    pub port: u16,
    pub used_by: String,
}

/// A node that left for good: peers forget this generation of it at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Left {
    pub at_ms: u64,
}

/// `meshctl node rm`: every generation of `node` up to `generation` is forgotten (its records
/// leave every view, its address blocks are freed). A later generation (the node joined
/// again) is not affected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRemoval {
    pub node: String,
    pub generation: u64,
}

/// Key ids a node holds, primary first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    pub primary: mesh_api::v1::KeyId,
    pub accepted: Vec<mesh_api::v1::KeyId>,
}

/// A cluster key rotation (`meshctl join-token --rotate`): every node makes `key` its primary
/// and keeps the keys it had as secondaries until every Ready node uses `key`, then drops
/// them. Travels only in sealed gossip; its Debug form never shows the key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRotation {
    pub id: mesh_api::v1::KeyId,
    /// base64, as in a key file: in a cluster without roles only (it travels sealed under
    /// the old key, so whoever holds that holds the new one too).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// In a cluster with roles: the new key sealed to each node's own key, by node name
    /// (see `gossip::sealed::seal_cluster_key`), so an old cluster key read off a disk or the
    /// wire does not reveal the next one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sealed: BTreeMap<String, String>,
}

impl fmt::Debug for KeyRotation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyRotation({})", self.id)
    }
}

/// Every agent runs processes; records from before drivers were advertised mean that.
fn default_drivers() -> Vec<String> {
    vec![DRIVER_PROCESS.to_owned()]
}

/// An agent going down gracefully leaves its tasks and pinned dataplane serving; peers keep
/// counting the node (and its tasks) as up until `until_ms`, so a restart slower than the
/// failure detector does not evict tasks that never stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restarting {
    pub until_ms: u64,
}

/// A node's part in confirmed drains. A node that takes a task out of the load balancers
/// bumps `removal` in the same write as the endpoint's deletion (after it, so gossip, which
/// delivers a node's keys in version order, never carries the counter without the
/// deletion). Every node, once its load balancer is programmed from a view, records the
/// other nodes' counters it has applied in `applied`. The stopping node waits until every
/// live node's `applied` reaches its own counter: only then is no new connection headed for
/// the task (Swarm has no such step and routes to tasks that are shutting down, moby#38841).
///
/// Echoing counters cannot loop: a node's `applied` changes only when another node's
/// `removal` does, and `removal` changes only when a task stops.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbProgress {
    /// Milliseconds since the epoch of this node's newest removal, kept increasing across
    /// restarts without any state of its own.
    #[serde(default)]
    pub removal: u64,
    /// Other nodes' `removal`, as this node's load balancer has applied them.
    #[serde(default)]
    pub applied: BTreeMap<String, u64>,
}

/// Operator-set properties of a node, replicated so they can be changed from any node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub availability: Availability,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub name: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    /// Object labels (a stack's networks carry [`STACK_LABEL`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A task's attachment to a network, owned by the node the task runs on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub task: String,
    pub network: String,
    pub service: Option<String>,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub state: EndpointState,
}

/// A node's own address on a network (on its bridge): source of routing-mesh traffic to
/// tasks and of host-local connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub network: String,
    pub ip: Ipv4Addr,
    pub mac: String,
}

/// A claim on block `index` of a network's subnet; the oldest claim wins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockClaim {
    pub network: String,
    pub index: u32,
    pub stamp: mesh_api::id::Stamp,
}

/// Docker's habit for container MACs: a locally administered prefix followed by the IPv4
/// address, so the MAC is unique wherever the IP is.
pub fn mac_for_ip(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_rotation_never_shows_its_key_in_debug_output() {
        let r = KeyRotation {
            id: mesh_api::v1::KeyId(0xabcd),
            key: "c2VjcmV0".into(),
            sealed: BTreeMap::from([("n1".to_owned(), "c2VhbGVk".to_owned())]),
        };
        let shown = format!("{r:?}");
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
        assert!(!shown.contains("c2VhbGVk"), "{shown}");
        assert!(shown.contains("0000abcd"), "{shown}");
    }

    #[test]
    fn node_records_of_older_agents_have_no_labels() {
        let old = r#"{"name":"a","hostname":"a","address":"192.0.2.1","mtu":1500,"agent_version":"0.1.0"}"#;
        let r: NodeRecord = serde_json::from_str(old).unwrap();
        assert!(r.labels.is_empty());
    }

    #[test]
    fn mac_follows_ip() {
        assert_eq!(mac_for_ip(Ipv4Addr::new(10, 0, 1, 5)), "02:42:0a:00:01:05");
    }
}
