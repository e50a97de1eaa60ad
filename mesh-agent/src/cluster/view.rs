//! The merged view of the cluster computed from every node's gossiped keys.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{
    AttachmentRecord, BlockClaim, ConfigSpec, EndpointRecord, KeyRotation, KeyState, NetworkSpec,
    NodeRecord, NodeRemoval, NodeSpec, SecretCopy, SecretSpec, ipam, key,
    replicated::{self, Replicated},
};
use mesh_api::id::Stamp;
use mesh_api::spec::NodeStatus;
use mesh_api::spec::{EndpointState, Protocol, ServiceSpec};

/// How long a deletion is remembered and republished. A node that was away longer than this
/// and comes back holding a deleted object brings it back; a day covers maintenance windows.
pub const TOMBSTONE_TTL_MS: u64 = 24 * 3600 * 1000;

/// The one name under [`key::CLUSTER_KEY`]: a cluster has one key rotation record.
pub const CLUSTER_KEY_NAME: &str = "primary";

/// One node's keys as gossip holds them.
#[derive(Clone, Debug, Default)]
pub struct SnapshotNode {
    pub name: String,
    /// Incremented on every agent start; the newest generation of a name speaks for it.
    pub generation: u64,
    /// Whether the failure detector considers this generation alive.
    pub live: bool,
    pub kv: BTreeMap<String, String>,
    /// What its role grant makes it (see `crate::roles`); an admin in a cluster without
    /// roles.
    pub role: mesh_planner::Role,
}

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub nodes: Vec<SnapshotNode>,
    pub now_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub record: Option<NodeRecord>,
    pub spec: NodeSpec,
    pub status: NodeStatus,
    pub role: mesh_planner::Role,
}

impl NodeView {
    /// The node's own labels, as its agent publishes them (agent.toml, `--label`).
    pub fn engine_labels(&self) -> BTreeMap<String, String> {
        self.record
            .as_ref()
            .map(|r| r.labels.clone())
            .unwrap_or_default()
    }

    /// What placement constraints match: engine labels overlaid with the operator's
    /// (`meshctl node update --label-add`), which win on conflict, as in Swarm.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.engine_labels();
        labels.extend(self.spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        labels
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointView {
    pub node: String,
    /// The node's underlay address: where this endpoint's VXLAN packets go.
    pub vtep: Ipv4Addr,
    #[serde(flatten)]
    pub record: EndpointRecord,
    /// False while its node is drained: it keeps its flows but gets no new ones.
    pub active: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentView {
    pub node: String,
    pub vtep: Ipv4Addr,
    #[serde(flatten)]
    pub record: AttachmentRecord,
}

/// An object that lost against an older one, with the reason, for the API to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict<T> {
    pub object: Replicated<T>,
    pub reason: String,
}

#[derive(Clone, Debug, Default)]
pub struct View {
    pub nodes: BTreeMap<String, NodeView>,
    pub networks: BTreeMap<String, Replicated<NetworkSpec>>,
    pub services: BTreeMap<String, Replicated<ServiceSpec>>,
    /// Secrets (sealed) and configs: merged like every replicated object; being immutable,
    /// a name has one content for the life of its incarnation.
    pub secrets: BTreeMap<String, Replicated<SecretSpec>>,
    pub configs: BTreeMap<String, Replicated<ConfigSpec>>,
    /// Secrets sealed to one node each, by `<secret>@<node>` (see [`SecretCopy`]).
    pub secret_copies: BTreeMap<String, Replicated<SecretCopy>>,
    pub network_conflicts: Vec<Conflict<NetworkSpec>>,
    pub service_conflicts: Vec<Conflict<ServiceSpec>>,
    /// Endpoints of live nodes only: a dead node's tasks leave every load balancer at once.
    pub endpoints: Vec<EndpointView>,
    /// Every service task record in gossip, dead nodes' included (`service ps` shows them;
    /// the planner skips them).
    pub tasks: Vec<mesh_planner::Task>,
    pub attachments: Vec<AttachmentView>,
    /// Endpoints and attachments of nodes the failure detector calls down. They are out of
    /// every load balancer, but the overlay keeps reaching them: a node that only stalled
    /// (an overloaded host misses heartbeats for a second) must not have its established
    /// connections cut, and keeping a dead node's entries costs nothing (its addresses are
    /// not reused while its blocks are claimed).
    pub down_endpoints: Vec<EndpointView>,
    pub down_attachments: Vec<AttachmentView>,
    /// Per network, the winning claim of every claimed block (dead nodes' claims included,
    /// so their addresses are not reused while they may come back).
    pub blocks: BTreeMap<String, BTreeMap<u32, Stamp>>,
    /// Replicated keys this node should hold, with their values; its other `obj:` keys go.
    pub republish: BTreeMap<String, String>,
    /// Stamps seen in replicated objects, to move the local clock past them.
    pub newest_stamp: Option<Stamp>,
    /// Nodes forgotten by `meshctl node rm`: the newest generation removed, by node.
    pub removed: BTreeMap<String, u64>,
    /// The key a rotation made primary, if one ever ran.
    pub cluster_key: Option<Replicated<KeyRotation>>,
    /// Key ids each node in `nodes` holds, as it publishes them.
    pub node_keys: BTreeMap<String, KeyState>,
    /// Each node's part in confirmed drains, as it publishes it.
    pub lb_progress: BTreeMap<String, super::LbProgress>,
    /// Every node's volumes, as each publishes its own.
    pub volumes: Vec<mesh_api::v1::Volume>,
    /// When the same gossip state next computes to a different view (a restarting node's
    /// grace ends, a tombstone expires): until then, an unchanged state needs no recompute.
    pub next_change_ms: Option<u64>,
}

impl View {
    /// Whether the gossip state this view came from would now compute to a different one.
    pub fn change_due(&self, now_ms: u64) -> bool {
        self.next_change_ms.is_some_and(|t| now_ms >= t)
    }

    fn change_at(&mut self, ms: u64) {
        self.next_change_ms = Some(self.next_change_ms.map_or(ms, |t| t.min(ms)));
    }

    /// The view of `snapshot`: who is in the cluster and up, the replicated objects merged,
    /// then what each node publishes of its own (tasks, endpoints, addresses, blocks).
    pub fn compute(snapshot: &Snapshot) -> Self {
        let mut view = View::default();
        view.merge_removals_and_key(snapshot);
        let present = present_generations(snapshot, &view.removed);
        let newest = newest_generations(&present);
        let up = view.names_up(&present, snapshot.now_ms);
        view.collect_nodes(snapshot, &newest, &up);
        view.merge_objects(snapshot);
        view.collect_node_keys(&newest);
        view
    }

    /// Node removals (`node rm`) and the cluster key's rotation record.
    fn merge_removals_and_key(&mut self, snapshot: &Snapshot) {
        let removals = merge_kind::<NodeRemoval>(snapshot, key::NODE_REMOVAL, self);
        self.removed = removals
            .values()
            .map(|r| (r.spec.node.clone(), r.spec.generation))
            .collect();
        self.cluster_key =
            merge_kind::<KeyRotation>(snapshot, key::CLUSTER_KEY, self).remove(CLUSTER_KEY_NAME);
    }

    /// Names of nodes that count as up under any present generation.
    fn names_up<'s>(&mut self, present: &[&'s SnapshotNode], now_ms: u64) -> BTreeSet<&'s str> {
        // A restarted agent is a new generation that chitchat calls live only from its second
        // heartbeat on; meanwhile the previous generation is still live, and the node never
        // went away.
        let mut up: BTreeSet<&str> = BTreeSet::new();
        for n in present.iter().filter(|n| n.live) {
            up.insert(&n.name);
        }
        // A generation that announced a graceful stop counts as up until its deadline (its
        // tasks and dataplane keep serving while its agent restarts).
        for n in present.iter().copied() {
            let until_ms =
                n.kv.get(key::RESTARTING)
                    .and_then(|v| decode::<super::Restarting>(v))
                    .map(|r| r.until_ms)
                    .filter(|&until| until > now_ms);
            if let Some(until) = until_ms {
                up.insert(&n.name);
                self.change_at(until);
            }
        }
        up
    }

    /// One entry per node name, from its newest generation's keys and its operator spec.
    fn collect_nodes(
        &mut self,
        snapshot: &Snapshot,
        newest: &BTreeMap<&str, &SnapshotNode>,
        up: &BTreeSet<&str>,
    ) {
        let node_specs = merge_kind::<NodeSpec>(snapshot, key::NODE_SPEC, self);
        for (name, n) in newest {
            let record: Option<NodeRecord> = n.kv.get(key::NODE).and_then(|v| decode(v));
            if let Some(keys) = n.kv.get(key::KEYS).and_then(|v| decode::<KeyState>(v)) {
                self.node_keys.insert(name.to_string(), keys);
            }
            if let Some(p) = n.kv.get(key::LB_PROGRESS).and_then(|v| decode(v)) {
                self.lb_progress.insert(name.to_string(), p);
            }
            if let Some(vols) =
                n.kv.get(key::VOLUMES)
                    .and_then(|v| decode::<Vec<mesh_api::v1::Volume>>(v))
            {
                // A node speaks only for its own volumes.
                self.volumes
                    .extend(vols.into_iter().filter(|v| v.node == **name));
            }
            let spec = node_specs
                .get(*name)
                .map(|r| r.spec.clone())
                .unwrap_or_default();
            self.nodes.insert(
                name.to_string(),
                NodeView {
                    name: name.to_string(),
                    record,
                    spec,
                    role: n.role,
                    status: if n.live || up.contains(name) {
                        NodeStatus::Ready
                    } else {
                        NodeStatus::Down
                    },
                },
            );
        }
    }

    /// Networks, services, secrets and configs; objects that lost a conflict are not
    /// republished: they fade from the cluster and their creator reports the error.
    fn merge_objects(&mut self, snapshot: &Snapshot) {
        let networks = merge_kind::<NetworkSpec>(snapshot, key::NETWORK, self);
        self.accept_networks(networks);
        let services = merge_kind::<ServiceSpec>(snapshot, key::SERVICE, self);
        self.accept_services(services);
        self.secrets = merge_kind::<SecretSpec>(snapshot, key::SECRET, self);
        self.configs = merge_kind::<ConfigSpec>(snapshot, key::CONFIG, self);
        self.secret_copies = merge_kind::<SecretCopy>(snapshot, key::SECRET_COPY, self);
        let rejected: BTreeSet<String> = self
            .network_conflicts
            .iter()
            .map(|c| format!("{}{}", key::NETWORK, c.object.spec.name))
            .chain(
                self.service_conflicts
                    .iter()
                    .map(|c| format!("{}{}", key::SERVICE, c.object.spec.name)),
            )
            .collect();
        self.republish.retain(|k, _| !rejected.contains(k));
    }

    /// What each listed node publishes of its own: task records, endpoints, its addresses on
    /// networks, block claims. Needs the nodes and networks already in the view.
    fn collect_node_keys(&mut self, newest: &BTreeMap<&str, &SnapshotNode>) {
        for (name, n) in newest {
            let node = &self.nodes[*name];
            let Some(vtep) = node.record.as_ref().map(|r| r.address) else {
                continue;
            };
            let owner = KeyOwner {
                node: name,
                vtep,
                // The newest generation's keys speak for a node that is up under any
                // generation: a restarting agent publishes its endpoints with its first
                // message, so its tasks never blink out of other nodes' load balancers.
                live: node.status == NodeStatus::Ready,
                active: node.spec.availability == mesh_api::spec::Availability::Active,
            };
            for (k, v) in &n.kv {
                if let Some(id) = k.strip_prefix(key::TASK) {
                    self.add_task(&owner, id, v);
                } else if let Some((task, network)) = key::endpoint_task(k) {
                    self.add_endpoint(&owner, task, network, v);
                } else if k.starts_with(key::ATTACHMENT) {
                    self.add_attachment(&owner, v);
                } else if k.starts_with(key::BLOCK) {
                    self.add_block_claim(v);
                }
            }
        }
    }

    fn add_task(&mut self, owner: &KeyOwner, id: &str, v: &str) {
        // A node speaks only for its own tasks.
        if let Some(t) = decode::<mesh_planner::Task>(v)
            && t.id == id
            && t.node == owner.node
        {
            self.tasks.push(t);
        }
    }

    fn add_endpoint(&mut self, owner: &KeyOwner, task: &str, network: Option<&str>, v: &str) {
        let Some(record) = decode::<EndpointRecord>(v) else {
            return;
        };
        if record.task != task
            || network.is_some_and(|n| n != record.network)
            || !self.networks.contains_key(&record.network)
        {
            return;
        }
        let e = EndpointView {
            node: owner.node.to_string(),
            vtep: owner.vtep,
            active: owner.live && owner.active && record.state == EndpointState::Running,
            record,
        };
        if owner.live {
            self.endpoints.push(e);
        } else {
            self.down_endpoints.push(e);
        }
    }

    fn add_attachment(&mut self, owner: &KeyOwner, v: &str) {
        let Some(record) = decode::<AttachmentRecord>(v) else {
            return;
        };
        if !self.networks.contains_key(&record.network) {
            return;
        }
        let a = AttachmentView {
            node: owner.node.to_string(),
            vtep: owner.vtep,
            record,
        };
        if owner.live {
            self.attachments.push(a);
        } else {
            self.down_attachments.push(a);
        }
    }

    /// The oldest claim of a block wins, whichever node's keys are read first.
    fn add_block_claim(&mut self, v: &str) {
        let Some(claim) = decode::<BlockClaim>(v) else {
            return;
        };
        self.blocks
            .entry(claim.network.clone())
            .or_default()
            .entry(claim.index)
            .and_modify(|s| {
                if claim.stamp < *s {
                    *s = claim.stamp.clone();
                }
            })
            .or_insert(claim.stamp);
    }

    fn accept_networks(&mut self, merged: BTreeMap<String, Replicated<NetworkSpec>>) {
        let mut by_age: Vec<_> = merged.into_values().collect();
        by_age.sort_by(|a, b| a.created.cmp(&b.created));
        for n in by_age {
            let reason = if ipam::validate_subnet(n.spec.subnet).is_err() {
                Some(format!("subnet {} is not valid", n.spec.subnet))
            } else if let Some(other) = self.networks.values().find(|o| {
                o.spec.subnet.contains(&n.spec.subnet.network())
                    || n.spec.subnet.contains(&o.spec.subnet.network())
            }) {
                Some(format!(
                    "subnet {} overlaps {} of network {}",
                    n.spec.subnet, other.spec.subnet, other.spec.name
                ))
            } else if let Some(other) = self.networks.values().find(|o| o.spec.vni == n.spec.vni) {
                Some(format!(
                    "VNI {} is used by network {}",
                    n.spec.vni, other.spec.name
                ))
            } else {
                None
            };
            match reason {
                Some(reason) => self.network_conflicts.push(Conflict { object: n, reason }),
                None => {
                    self.networks.insert(n.spec.name.clone(), n);
                }
            }
        }
    }

    fn accept_services(&mut self, merged: BTreeMap<String, Replicated<ServiceSpec>>) {
        let mut by_age: Vec<_> = merged.into_values().collect();
        by_age.sort_by(|a, b| a.created.cmp(&b.created));
        let mut published: BTreeMap<(Protocol, u16), String> = BTreeMap::new();
        for s in by_age {
            let taken = s.spec.ports.iter().find_map(|p| {
                let port = p.published?;
                published.get(&(p.protocol, port)).map(|owner| {
                    format!(
                        "port {port}/{} is already published by service {owner}",
                        p.protocol
                    )
                })
            });
            let reason = if !self.networks.contains_key(&s.spec.network) {
                Some(format!("network {} does not exist", s.spec.network))
            } else {
                taken
            };
            match reason {
                Some(reason) => self.service_conflicts.push(Conflict { object: s, reason }),
                None => {
                    for p in &s.spec.ports {
                        if let Some(port) = p.published {
                            published.insert((p.protocol, port), s.spec.name.clone());
                        }
                    }
                    self.services.insert(s.spec.name.clone(), s);
                }
            }
        }
    }

    /// The nodes as the planner sees them.
    pub fn planner_nodes(&self) -> Vec<mesh_planner::Node> {
        self.nodes
            .values()
            .filter_map(|n| {
                let record = n.record.as_ref()?;
                Some(mesh_planner::Node {
                    name: n.name.clone(),
                    id: mesh_api::id::node_id(&n.name),
                    hostname: record.hostname.clone(),
                    ready: n.status == NodeStatus::Ready,
                    active: n.spec.availability == mesh_api::spec::Availability::Active,
                    labels: n.labels(),
                    engine_labels: n.engine_labels(),
                    drivers: record.drivers.clone(),
                    role: n.role,
                    platform: record.platform.clone(),
                    capacity: record.capacity,
                })
            })
            .collect()
    }

    /// The plan for one service, if it schedules tasks. Planned alone: the orchestrator plans
    /// every service together (`mesh_planner::plan_all`), which differs only while another
    /// service's starts on a nearly full node are not yet in the view (a gossip round).
    pub fn plan(&self, service: &str) -> Option<mesh_planner::Plan> {
        self.services.get(service)?.spec.planned()?;
        self.plan_with(&self.planner_nodes(), service)
    }

    /// [`View::plan`] with the nodes computed once for many services.
    pub fn plan_with(
        &self,
        nodes: &[mesh_planner::Node],
        service: &str,
    ) -> Option<mesh_planner::Plan> {
        let spec = self.services.get(service)?.spec.planned()?;
        Some(mesh_planner::plan(
            &mesh_planner::Cluster {
                nodes,
                tasks: &self.tasks,
                // The view is reused while gossip is quiet; an update's delay runs on.
                now_ms: super::Clock::now_ms(),
            },
            &spec,
        ))
    }

    /// Tasks (endpoints) of a service that receive new connections.
    /// Endpoints of services removed while their tasks still run (they stop with a drain,
    /// or were started by hand), down nodes' included: their connections finish where they
    /// are, so their networks stay plumbed and their load balancing stays (draining).
    pub fn removed_service_endpoints(&self) -> impl Iterator<Item = &EndpointView> {
        self.endpoints
            .iter()
            .chain(&self.down_endpoints)
            .filter(|e| {
                e.record
                    .service
                    .as_deref()
                    .is_some_and(|s| !self.services.contains_key(s))
            })
    }

    pub fn backends<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a EndpointView> {
        self.endpoints
            .iter()
            .filter(move |e| e.record.service.as_deref() == Some(service))
    }

    /// The node whose own record says it has this name and is live.
    pub fn node_address(&self, node: &str) -> Option<Ipv4Addr> {
        self.nodes.get(node)?.record.as_ref().map(|r| r.address)
    }

    /// Every address in use on a network, cluster-wide: endpoints, node attachments, VIPs.
    pub fn used_addresses(&self, network: &str) -> BTreeSet<Ipv4Addr> {
        let mut used: BTreeSet<Ipv4Addr> = self
            .endpoints
            .iter()
            .filter(|e| e.record.network == network)
            .map(|e| e.record.ip)
            .collect();
        used.extend(
            self.attachments
                .iter()
                .filter(|a| a.record.network == network)
                .map(|a| a.record.ip),
        );
        // Services' VIPs on the network, whichever of their networks it is.
        used.extend(self.services.values().flat_map(|s| {
            s.spec
                .attachments()
                .into_iter()
                .filter(|a| a.target == network)
                .filter_map(|a| a.vip)
        }));
        used
    }
}

/// The node whose keys are being read, as its endpoints and attachments need it.
struct KeyOwner<'a> {
    node: &'a str,
    /// The node's underlay address.
    vtep: Ipv4Addr,
    /// Up under any generation: its endpoints are in the load balancers.
    live: bool,
    /// Not drained: its endpoints take new connections.
    active: bool,
}

/// Every generation in gossip that is not gone. Generations removed by `node rm`, or that
/// announced they left, are gone: not listed, their tasks in no table, their address blocks
/// free. A later generation (the node joined again) speaks for itself.
fn present_generations<'s>(
    snapshot: &'s Snapshot,
    removed: &BTreeMap<String, u64>,
) -> Vec<&'s SnapshotNode> {
    let mut gone_up_to: BTreeMap<&str, u64> = BTreeMap::new();
    for n in snapshot
        .nodes
        .iter()
        .filter(|n| n.kv.contains_key(key::LEFT))
    {
        let g = gone_up_to.entry(&n.name).or_default();
        *g = (*g).max(n.generation);
    }
    for (name, g) in removed {
        let e = gone_up_to.entry(name).or_default();
        *e = (*e).max(*g);
    }
    let gone = |n: &SnapshotNode| {
        gone_up_to
            .get(n.name.as_str())
            .is_some_and(|g| n.generation <= *g)
    };
    snapshot.nodes.iter().filter(|n| !gone(n)).collect()
}

/// The newest generation of each node name, which speaks for it.
fn newest_generations<'s>(present: &[&'s SnapshotNode]) -> BTreeMap<&'s str, &'s SnapshotNode> {
    let mut newest: BTreeMap<&str, &SnapshotNode> = BTreeMap::new();
    for n in present.iter().copied() {
        match newest.get(n.name.as_str()) {
            Some(prev) if prev.generation >= n.generation => {}
            _ => {
                newest.insert(&n.name, n);
            }
        }
    }
    newest
}

fn decode<T: DeserializeOwned>(v: &str) -> Option<T> {
    serde_json::from_str(v).ok()
}

/// Merges every copy of every name of one kind; records what to republish.
fn merge_kind<T: Clone + Serialize + DeserializeOwned>(
    snapshot: &Snapshot,
    prefix: &str,
    view: &mut View,
) -> BTreeMap<String, Replicated<T>> {
    let mut copies: BTreeMap<String, Vec<Replicated<T>>> = BTreeMap::new();
    // The text of each copy, beside it: what is republished unchanged need not be encoded
    // again (encoding 3.3 MB of objects costs a debug build ~0.1 s per view).
    let mut texts: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    // Every node republishes every object, so most copies are the same text: decode each
    // text once (a secret or config can be 700 KB of JSON). Ordered, not hashed: telling
    // two texts apart compares them only up to their first difference, where hashing reads
    // every byte of every copy (~0.1 s for 3.3 MB of objects on three nodes in a debug build).
    let mut decoded: BTreeMap<&str, Option<Replicated<T>>> = BTreeMap::new();
    for n in &snapshot.nodes {
        for (k, v) in n.kv.range(prefix.to_owned()..) {
            let Some(name) = k.strip_prefix(prefix) else {
                break;
            };
            let r = decoded
                .entry(v.as_str())
                .or_insert_with(|| replicated::decode::<T>(v));
            if let Some(r) = r {
                copies.entry(name.to_owned()).or_default().push(r.clone());
                texts.entry(name).or_default().push(v);
            }
        }
    }
    let mut live = BTreeMap::new();
    for (name, copies) in copies {
        for c in &copies {
            for s in [Some(&c.updated), c.deleted.as_ref()].into_iter().flatten() {
                if view.newest_stamp.as_ref().is_none_or(|n| s > n) {
                    view.newest_stamp = Some(s.clone());
                }
            }
        }
        let merged = replicated::merge(&copies);
        if let Some(copy) = merged.republish(TOMBSTONE_TTL_MS, snapshot.now_ms) {
            if copy.deleted.is_some()
                && let Some(floor) = &copy.floor
            {
                view.change_at(floor.ms.saturating_add(TOMBSTONE_TTL_MS + 1));
            }
            // A write's stamp is unique, so a copy with the same stamps, floor and no
            // deletion is this very record.
            let same = copies.iter().zip(&texts[name.as_str()]).find(|(c, _)| {
                c.created == copy.created
                    && c.updated == copy.updated
                    && c.floor == copy.floor
                    && c.deleted.is_none()
                    && copy.deleted.is_none()
            });
            let json = match same {
                Some((_, text)) => Ok((*text).to_owned()),
                None => serde_json::to_string(&copy),
            };
            if let Ok(json) = json {
                view.republish.insert(format!("{prefix}{name}"), json);
            }
        }
        if let Some(l) = merged.live {
            live.insert(name, l);
        }
    }
    live
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::spec::{EndpointMode, PortSpec};

    fn st(ms: u64, node: &str) -> Stamp {
        Stamp {
            ms,
            node: node.into(),
        }
    }

    fn node(name: &str, ip: &str, live: bool) -> SnapshotNode {
        let rec = NodeRecord {
            name: name.into(),
            hostname: name.into(),
            address: ip.parse().unwrap(),
            mtu: 1500,
            agent_version: "test".into(),
            drivers: vec!["process".into()],
            labels: BTreeMap::new(),
            reserved_ports: Vec::new(),
            platform: Default::default(),
            capacity: Default::default(),
            insecure: false,
            key: None,
            grant: None,
        };
        let mut kv = BTreeMap::new();
        kv.insert(key::NODE.into(), serde_json::to_string(&rec).unwrap());
        SnapshotNode {
            name: name.into(),
            generation: 1,
            live,
            kv,
            role: mesh_planner::Role::Admin,
        }
    }

    #[test]
    fn a_restarting_node_stays_ready_until_its_new_generation_is_live() {
        let old = node("b", "192.0.2.2", true);
        let mut new = node("b", "192.0.2.2", false);
        new.generation = 2;
        let v = View::compute(&Snapshot {
            nodes: vec![old.clone(), new.clone()],
            now_ms: 100,
        });
        assert_eq!(v.nodes["b"].status, NodeStatus::Ready);
        let mut dead_old = old;
        dead_old.live = false;
        let v = View::compute(&Snapshot {
            nodes: vec![dead_old, new],
            now_ms: 100,
        });
        assert_eq!(v.nodes["b"].status, NodeStatus::Down);
    }

    #[test]
    fn a_restarting_nodes_tasks_never_leave_the_table() {
        let mut a = node("a", "192.0.2.1", true);
        put(
            &mut a,
            format!("{}app", key::NETWORK),
            &network("app", "10.1.0.0/24", 4096, st(10, "a")),
        );
        let old = node("b", "192.0.2.2", true);
        // The new generation is not live yet, but arrived with its endpoint.
        let mut new = node("b", "192.0.2.2", false);
        new.generation = 2;
        let ep = EndpointRecord {
            task: "web1".into(),
            network: "app".into(),
            service: Some("web".into()),
            ip: "10.1.0.20".parse().unwrap(),
            mac: "02:42:0a:01:00:14".into(),
            state: EndpointState::Running,
        };
        put(&mut new, format!("{}web1", key::ENDPOINT), &ep);
        let v = View::compute(&Snapshot {
            nodes: vec![a, old, new],
            now_ms: 100,
        });
        assert_eq!(v.endpoints.len(), 1);
    }

    #[test]
    fn a_task_on_two_networks_holds_an_address_on_each() {
        let mut a = node("a", "192.0.2.1", true);
        for (name, subnet, vni) in [
            ("front", "10.1.0.0/24", 4096),
            ("back", "10.2.0.0/24", 4097),
        ] {
            put(
                &mut a,
                format!("{}{name}", key::NETWORK),
                &network(name, subnet, vni, st(10, "a")),
            );
        }
        let ep = |network: &str, ip: &str| EndpointRecord {
            task: "w1".into(),
            network: network.into(),
            service: Some("worker".into()),
            ip: ip.parse().unwrap(),
            mac: "02:42:0a:01:00:14".into(),
            state: EndpointState::Running,
        };
        put(
            &mut a,
            key::endpoint("w1", "front", 0),
            &ep("front", "10.1.0.20"),
        );
        put(
            &mut a,
            key::endpoint("w1", "back", 1),
            &ep("back", "10.2.0.30"),
        );
        // A key that names one network over a record of another is not believed.
        let forged = EndpointRecord {
            task: "w2".into(),
            ..ep("back", "10.2.0.40")
        };
        put(&mut a, "ep:w2@front".into(), &forged);
        let v = View::compute(&Snapshot {
            nodes: vec![a],
            now_ms: 100,
        });
        assert_eq!(v.endpoints.len(), 2);
        let used = |n: &str| v.used_addresses(n).into_iter().collect::<Vec<_>>();
        assert_eq!(used("front"), ["10.1.0.20".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(used("back"), ["10.2.0.30".parse::<Ipv4Addr>().unwrap()]);
    }

    #[test]
    fn a_gracefully_stopping_node_stays_up_until_its_deadline() {
        let mut b = node("b", "192.0.2.2", false);
        put(
            &mut b,
            key::RESTARTING.into(),
            &crate::cluster::Restarting { until_ms: 5_000 },
        );
        let at = |now_ms| {
            View::compute(&Snapshot {
                nodes: vec![b.clone()],
                now_ms,
            })
            .nodes["b"]
                .status
        };
        assert_eq!(at(4_000), NodeStatus::Ready);
        assert_eq!(at(6_000), NodeStatus::Down);
        // The agent's loop skips recomputing an unchanged state, but not past the deadline.
        let next = |now_ms| {
            View::compute(&Snapshot {
                nodes: vec![b.clone()],
                now_ms,
            })
            .next_change_ms
        };
        assert_eq!(next(4_000), Some(5_000));
        assert_eq!(next(6_000), None);
    }

    #[test]
    fn a_deleted_network_is_recomputed_when_its_tombstone_expires() {
        let mut a = node("a", "192.0.2.1", true);
        let mut gone = network("app", "10.1.0.0/24", 4096, st(10, "a"));
        gone.deleted = Some(st(20, "a"));
        gone.floor = Some(st(20, "a"));
        put(&mut a, format!("{}app", key::NETWORK), &gone);
        let at = |now_ms| {
            View::compute(&Snapshot {
                nodes: vec![a.clone()],
                now_ms,
            })
        };
        let v = at(100);
        assert!(v.networks.is_empty());
        assert!(v.republish.contains_key("obj:net:app"));
        assert_eq!(v.next_change_ms, Some(20 + TOMBSTONE_TTL_MS + 1));
        let later = at(20 + TOMBSTONE_TTL_MS + 1);
        assert!(!later.republish.contains_key("obj:net:app"));
        assert_eq!(later.next_change_ms, None);
    }

    fn put<T: Serialize>(n: &mut SnapshotNode, k: String, v: &T) {
        n.kv.insert(k, serde_json::to_string(v).unwrap());
    }

    fn network(name: &str, subnet: &str, vni: u32, at: Stamp) -> Replicated<NetworkSpec> {
        let subnet = subnet.parse().unwrap();
        Replicated::new(
            NetworkSpec {
                name: name.into(),
                subnet,
                gateway: ipam::default_gateway(subnet),
                vni,
                labels: BTreeMap::new(),
            },
            at,
        )
    }

    #[test]
    fn concurrent_network_creates_resolve_the_same_way_everywhere() {
        let mut a = node("a", "192.0.2.1", true);
        let mut b = node("b", "192.0.2.2", true);
        put(
            &mut a,
            format!("{}app", key::NETWORK),
            &network("app", "10.1.0.0/24", 4096, st(10, "a")),
        );
        put(
            &mut b,
            format!("{}app", key::NETWORK),
            &network("app", "10.2.0.0/24", 4096, st(11, "b")),
        );
        // Different name, overlapping subnet, later: rejected with a reason.
        put(
            &mut b,
            format!("{}db", key::NETWORK),
            &network("db", "10.1.0.0/16", 4097, st(12, "b")),
        );
        for nodes in [vec![a.clone(), b.clone()], vec![b.clone(), a.clone()]] {
            let v = View::compute(&Snapshot { nodes, now_ms: 100 });
            assert_eq!(v.networks.len(), 1);
            assert_eq!(v.networks["app"].spec.subnet.to_string(), "10.1.0.0/24");
            assert_eq!(v.network_conflicts.len(), 1);
            assert!(
                v.network_conflicts[0].reason.contains("overlaps"),
                "{:?}",
                v.network_conflicts
            );
            assert!(v.republish.contains_key("obj:net:app"));
            assert!(!v.republish.contains_key("obj:net:db"));
        }
    }

    #[test]
    fn a_dead_nodes_endpoints_leave_at_once_but_its_blocks_stay_claimed() {
        let mut a = node("a", "192.0.2.1", true);
        let mut b = node("b", "192.0.2.2", false);
        put(
            &mut a,
            format!("{}app", key::NETWORK),
            &network("app", "10.1.0.0/24", 4096, st(10, "a")),
        );
        let ep = EndpointRecord {
            task: "web1".into(),
            network: "app".into(),
            service: Some("web".into()),
            ip: "10.1.0.20".parse().unwrap(),
            mac: "02:42:0a:01:00:14".into(),
            state: EndpointState::Running,
        };
        put(&mut b, format!("{}web1", key::ENDPOINT), &ep);
        put(
            &mut b,
            format!("{}app:1", key::BLOCK),
            &BlockClaim {
                network: "app".into(),
                index: 1,
                stamp: st(5, "b"),
            },
        );
        let v = View::compute(&Snapshot {
            nodes: vec![a.clone(), b.clone()],
            now_ms: 100,
        });
        assert!(v.endpoints.is_empty());
        assert_eq!(v.nodes["b"].status, NodeStatus::Down);
        assert_eq!(v.blocks["app"][&1].node, "b");

        b.live = true;
        let v = View::compute(&Snapshot {
            nodes: vec![a, b],
            now_ms: 100,
        });
        assert_eq!(v.endpoints.len(), 1);
        assert_eq!(v.endpoints[0].vtep.to_string(), "192.0.2.2");
        assert!(v.endpoints[0].active);
    }

    #[test]
    fn a_port_published_twice_goes_to_the_older_service() {
        let mut a = node("a", "192.0.2.1", true);
        put(
            &mut a,
            format!("{}app", key::NETWORK),
            &network("app", "10.1.0.0/24", 4096, st(1, "a")),
        );
        let svc = |name: &str, at| {
            Replicated::new(
                ServiceSpec {
                    name: name.into(),
                    network: "app".into(),
                    endpoint_mode: EndpointMode::Vip,
                    vip: None,
                    ports: vec![PortSpec {
                        protocol: Protocol::Tcp,
                        published: Some(8080),
                        target: 80,
                        mode: Default::default(),
                    }],
                    ..ServiceSpec::default()
                },
                at,
            )
        };
        put(
            &mut a,
            format!("{}web", key::SERVICE),
            &svc("web", st(5, "a")),
        );
        put(
            &mut a,
            format!("{}api", key::SERVICE),
            &svc("api", st(6, "a")),
        );
        let v = View::compute(&Snapshot {
            nodes: vec![a],
            now_ms: 100,
        });
        assert!(v.services.contains_key("web"));
        assert_eq!(v.service_conflicts.len(), 1);
        assert_eq!(
            v.service_conflicts[0].reason,
            "port 8080/tcp is already published by service web"
        );
    }

    #[test]
    fn the_oldest_claim_of_a_block_wins_whatever_the_order() {
        let claim = |ms, node: &str| {
            serde_json::to_string(&BlockClaim {
                network: "app".into(),
                index: 1,
                stamp: st(ms, node),
            })
            .unwrap()
        };
        for order in [
            [claim(5, "b"), claim(3, "c")],
            [claim(3, "c"), claim(5, "b")],
        ] {
            let mut v = View::default();
            for c in &order {
                v.add_block_claim(c);
            }
            assert_eq!(v.blocks["app"][&1], st(3, "c"));
        }
    }

    #[test]
    fn operator_labels_win_over_engine_labels() {
        let mut b = node("b", "192.0.2.2", true);
        let mut rec: NodeRecord = serde_json::from_str(&b.kv[key::NODE]).unwrap();
        rec.labels = BTreeMap::from([
            ("type".to_owned(), "low-memory".to_owned()),
            ("zone".to_owned(), "a".to_owned()),
        ]);
        put(&mut b, key::NODE.into(), &rec);
        let mut spec = Replicated::new(NodeSpec::default(), st(5, "a"));
        spec.spec.labels.insert("zone".into(), "b".into());
        put(&mut b, format!("{}b", key::NODE_SPEC), &spec);
        let v = View::compute(&Snapshot {
            nodes: vec![b],
            now_ms: 100,
        });
        let n = &v.nodes["b"];
        assert_eq!(n.engine_labels()["zone"], "a");
        assert_eq!(n.labels()["zone"], "b");
        assert_eq!(n.labels()["type"], "low-memory");
    }

    #[test]
    fn a_node_that_left_is_gone_at_once_with_its_tasks_and_blocks() {
        let mut a = node("a", "192.0.2.1", true);
        put(
            &mut a,
            format!("{}app", key::NETWORK),
            &network("app", "10.1.0.0/24", 4096, st(10, "a")),
        );
        // An older generation of b is still in gossip (b restarted once, then left).
        let old = node("b", "192.0.2.2", false);
        let mut b = node("b", "192.0.2.2", true);
        b.generation = 2;
        put(
            &mut b,
            format!("{}app:1", key::BLOCK),
            &BlockClaim {
                network: "app".into(),
                index: 1,
                stamp: st(5, "b"),
            },
        );
        put(
            &mut b,
            key::LEFT.into(),
            &crate::cluster::Left { at_ms: 50 },
        );
        let v = View::compute(&Snapshot {
            nodes: vec![a.clone(), old, b],
            now_ms: 100,
        });
        assert!(!v.nodes.contains_key("b"), "{:?}", v.nodes.keys());
        assert!(v.blocks.get("app").is_none_or(|b| b.is_empty()));
        // Joining again is a new generation, which is listed.
        let mut back = node("b", "192.0.2.2", true);
        back.generation = 3;
        let v = View::compute(&Snapshot {
            nodes: vec![a, back],
            now_ms: 100,
        });
        assert_eq!(v.nodes["b"].status, NodeStatus::Ready);
    }

    #[test]
    fn a_removed_node_leaves_every_view_until_a_later_generation_joins() {
        let mut a = node("a", "192.0.2.1", true);
        let mut b = node("b", "192.0.2.2", false);
        b.generation = 7;
        let rm = Replicated::new(
            NodeRemoval {
                node: "b".into(),
                generation: 7,
            },
            st(20, "a"),
        );
        put(&mut a, format!("{}b", key::NODE_REMOVAL), &rm);
        let v = View::compute(&Snapshot {
            nodes: vec![a.clone(), b.clone()],
            now_ms: 100,
        });
        assert!(!v.nodes.contains_key("b"));
        assert_eq!(v.removed["b"], 7);
        assert!(
            v.republish.contains_key("obj:noderm:b"),
            "every node carries the removal"
        );
        b.generation = 8;
        b.live = true;
        let v = View::compute(&Snapshot {
            nodes: vec![a, b],
            now_ms: 100,
        });
        assert_eq!(v.nodes["b"].status, NodeStatus::Ready);
    }

    #[test]
    fn the_newest_generation_of_a_restarted_node_speaks_for_it() {
        let mut old = node("a", "192.0.2.1", false);
        old.generation = 1;
        let mut new = node("a", "192.0.2.9", true);
        new.generation = 2;
        let v = View::compute(&Snapshot {
            nodes: vec![new, old],
            now_ms: 0,
        });
        assert_eq!(v.nodes["a"].status, NodeStatus::Ready);
        assert_eq!(v.node_address("a").unwrap().to_string(), "192.0.2.9");
    }
}

#[cfg(test)]
mod republish_tests {
    use super::*;
    use crate::cluster::{Replicated, Snapshot, SnapshotNode};
    use mesh_api::id::Stamp;

    #[test]
    fn an_object_republished_unchanged_keeps_its_text_instead_of_being_encoded_again() {
        let spec = ConfigSpec {
            name: "big".into(),
            labels: Default::default(),
            data: "QUJD".repeat(50_000),
        };
        let r = Replicated::new(
            spec,
            Stamp {
                ms: 1,
                node: "a".into(),
            },
        );
        // Pretty-printed: the same record, but not the text an encoding would give.
        let text = serde_json::to_string_pretty(&r).unwrap();
        let node = |name: &str| SnapshotNode {
            name: name.into(),
            generation: 1,
            live: true,
            kv: [(format!("{}big", key::CONFIG), text.clone())].into(),
            role: crate::roles::Role::Admin,
        };
        let snap = Snapshot {
            nodes: vec![node("a"), node("b")],
            now_ms: 10,
        };
        let view = View::compute(&snap);
        assert_eq!(view.configs["big"], r);
        assert_eq!(view.republish[&format!("{}big", key::CONFIG)], text);
    }
}
