//! The load balancer's control side: turns the desired service table into the eBPF maps the
//! routing mesh (mesh_lb_ingress) and socket load balancing (mesh_lb_connect & co.) read.
//!
//! `apply` diffs the desired table against what is programmed and issues only the map
//! operations the difference needs: adding or removing a backend touches O(1) entries
//! (backend slots are swap-removed), so 10,000 services never rewrite the world. A
//! restarted agent rebuilds its view from the pinned maps (`open`), so the first `apply`
//! after a restart changes nothing when nothing changed.
//!
//! Backend lifecycle: listed and not draining → receives new flows; listed as draining →
//! keeps its flows, gets no new ones; not listed → freed, and the next `sweep` removes its
//! flows (the client's next packet then gets a RST instead of a silent black hole).

mod maps;
mod sweep;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    ops::RangeInclusive,
    os::fd::AsRawFd,
    path::Path,
};

use anyhow::{Context, Result, bail};
use aya::{Ebpf, EbpfLoader};
use mesh_common::lb::{
    BACKEND_ACTIVE, BACKEND_COUNTERS_MAP, BACKEND_DRAINING, BACKEND_FREE, BACKENDS_MAP, Backend,
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_EMBRYOS, DEFAULT_MAX_FLOWS, DEFAULT_MAX_SERVICES,
    DEFAULT_MAX_SNAT_RESERVATIONS, DEFAULT_MAX_SOCKETS, DEFAULT_SNAT_PORT_MAX,
    DEFAULT_SNAT_PORT_MIN, EMBRYOS_MAP, FLOWS_MAP, Flow, FlowKey, IPPROTO_TCP, IPPROTO_UDP,
    LbConfig, Network, PUBLISH_INGRESS, PUBLISH_SNAT, RR_MAP, Reason, SERVICE_COUNTERS_MAP,
    SERVICE_IN_USE, SERVICE_STATE_MAP, SERVICES_MAP, SLOTS_MAP, SNAT_RESERVED_MAP, SOCK_FWD_MAP,
    SOCK_REV_MAP, ServiceEntry, ServiceKey, ServiceState, TrafficCounters,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

pub use maps::MapOps;
pub use sweep::{FlowTimeouts, SweepReport};

/// Bytes of kernel memory one entry costs, measured on Linux 6.18 x86_64 (the map's
/// `memlock` divided by its entries; LRU hash maps preallocate every entry at creation).
/// Documented in the README's `[dataplane]` section.
pub const BYTES_PER_FLOW_ENTRY: u64 = 120;
pub const BYTES_PER_EMBRYO_ENTRY: u64 = 128;
pub const BYTES_PER_SNAT_RESERVATION: u64 = 88;

use maps::Maps;

/// Map sizes, fixed when the maps are first created (pinned maps keep their size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbLimits {
    pub services: u32,
    pub backends: u32,
    /// Established flow table entries; each routing-mesh connection takes two.
    pub flows: u32,
    /// Embryonic flow table entries (flows whose client has not yet answered the backend),
    /// two per flow. What a flood of new flows can fill; it never touches `flows`.
    pub embryos: u32,
    /// SNAT ports held after their flow closed (one per closed TCP flow, for the reuse
    /// delay).
    pub snat_reservations: u32,
    /// Socket load-balancing entries (per socket and backend).
    pub sockets: u32,
}

impl Default for LbLimits {
    fn default() -> Self {
        Self {
            services: DEFAULT_MAX_SERVICES,
            backends: DEFAULT_MAX_BACKENDS,
            flows: DEFAULT_MAX_FLOWS,
            embryos: DEFAULT_MAX_EMBRYOS,
            snat_reservations: DEFAULT_MAX_SNAT_RESERVATIONS,
            sockets: DEFAULT_MAX_SOCKETS,
        }
    }
}

impl LbLimits {
    /// Kernel memory the flow tables of these sizes take (preallocated at creation).
    pub fn flow_table_bytes(&self) -> u64 {
        u64::from(self.flows) * BYTES_PER_FLOW_ENTRY
            + u64::from(self.embryos) * BYTES_PER_EMBRYO_ENTRY
            + u64::from(self.snat_reservations) * BYTES_PER_SNAT_RESERVATION
    }

    /// Sizes the maps in the object before it is loaded. A map already pinned in `pin_dir`
    /// keeps the size it was created with (its entries are what we adopt).
    pub(crate) fn size_maps(&self, loader: &mut EbpfLoader<'_>, pin_dir: &Path) {
        let wanted = [
            (SERVICES_MAP, 4 * self.services),
            (SERVICE_STATE_MAP, self.services + 1),
            (RR_MAP, self.services + 1),
            (SERVICE_COUNTERS_MAP, self.services + 1),
            (SLOTS_MAP, self.backends),
            (BACKENDS_MAP, self.backends + 1),
            (BACKEND_COUNTERS_MAP, self.backends + 1),
            (FLOWS_MAP, self.flows),
            (EMBRYOS_MAP, self.embryos),
            (SNAT_RESERVED_MAP, self.snat_reservations),
            (SOCK_FWD_MAP, self.sockets),
            (SOCK_REV_MAP, self.sockets),
        ];
        for (name, size) in wanted {
            let size = match aya::maps::MapInfo::from_pin(pin_dir.join(name)) {
                Ok(info) if info.max_entries() != size => {
                    warn!(
                        map = name,
                        pinned = info.max_entries(),
                        wanted = size,
                        "keeping the pinned map's size; remove the pins to resize"
                    );
                    info.max_entries()
                }
                _ => size,
            };
            loader.map_max_entries(name, size);
        }
    }
}

pub(crate) use maps::check_pinned_layouts;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }

    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// The node's own settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLb {
    /// Published ports are answered on this address (the underlay interface's).
    pub underlay_ip: Ipv4Addr,
    /// The node's own network namespace, whose processes reach published ports on
    /// 127.0.0.1. See [`current_netns_cookie`].
    pub host_netns_cookie: u64,
    /// Source ports for routing-mesh SNAT; keep them out of the kernel's ephemeral range
    /// (net.ipv4.ip_local_port_range) so they never collide with the node's own sockets.
    pub snat_ports: RangeInclusive<u16>,
}

impl NodeLb {
    /// Settings for a node whose host namespace is the caller's.
    pub fn new(underlay_ip: Ipv4Addr) -> Result<Self> {
        Ok(Self {
            underlay_ip,
            host_netns_cookie: current_netns_cookie()?,
            snat_ports: DEFAULT_SNAT_PORT_MIN..=DEFAULT_SNAT_PORT_MAX,
        })
    }
}

/// A network as the load balancer needs it on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkLb {
    /// Any id unique per network on the node (the VNI is a natural choice).
    pub id: u32,
    /// The node's own address on the network: the source of routing-mesh flows.
    pub node_addr: Ipv4Addr,
    /// The network's bridge on this node.
    pub bridge_ifindex: u32,
}

/// A published port: `published` on every node, forwarded to `target` on the tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublishedPort {
    pub proto: Protocol,
    pub published: u16,
    pub target: u16,
    #[serde(default)]
    pub mode: PublishMode,
}

/// What source address a task sees on a published port.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// The client's own address and port; replies return through the ingress node.
    #[default]
    Ingress,
    /// The ingress node's address on the service's network (Swarm's routing mesh).
    Snat,
}

impl PublishMode {
    const fn number(self) -> u16 {
        match self {
            PublishMode::Ingress => PUBLISH_INGRESS,
            PublishMode::Snat => PUBLISH_SNAT,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendLb {
    /// The task's address on the service's network.
    pub ip: Ipv4Addr,
    /// Keeps its established flows but gets no new ones.
    #[serde(default)]
    pub draining: bool,
}

impl BackendLb {
    pub fn active(ip: Ipv4Addr) -> Self {
        Self {
            ip,
            draining: false,
        }
    }
}

/// One service as it should be balanced on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceLb {
    /// The control plane's stable id.
    pub id: String,
    /// For messages and `inspect`.
    pub name: String,
    pub network: NetworkLb,
    /// Balances every port of this address from inside the cluster (like Swarm's VIP).
    pub vip: Option<Ipv4Addr>,
    #[serde(default)]
    pub ports: Vec<PublishedPort>,
    #[serde(default)]
    pub backends: Vec<BackendLb>,
}

impl ServiceLb {
    fn keys(&self) -> BTreeMap<ServiceKey, ServiceEntry> {
        let mut keys = BTreeMap::new();
        for p in &self.ports {
            keys.insert(
                ServiceKey::published(p.proto.number(), p.published),
                ServiceEntry {
                    service: 0,
                    target_port: p.target,
                    mode: p.mode.number(),
                },
            );
        }
        if let Some(vip) = self.vip {
            for proto in [IPPROTO_TCP, IPPROTO_UDP] {
                keys.insert(
                    ServiceKey::vip(vip.octets(), proto),
                    ServiceEntry::default(),
                );
            }
        }
        keys
    }
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

impl From<TrafficCounters> for Counters {
    fn from(c: TrafficCounters) -> Self {
        Self {
            flows: c.flows,
            packets: c.packets,
            bytes: c.bytes,
            dropped: c.dropped,
        }
    }
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

/// What is programmed for one service, mirrored from the maps.
#[derive(Clone, Debug, Default)]
struct Programmed {
    index: u32,
    name: String,
    network: u32,
    keys: BTreeMap<ServiceKey, ServiceEntry>,
    /// Active backends by slot: `slots[i]` is what LB_SLOTS holds at (index, i).
    slots: Vec<(Ipv4Addr, u32)>,
    draining: BTreeMap<Ipv4Addr, u32>,
}

impl Programmed {
    fn state(&self) -> ServiceState {
        ServiceState {
            backends: self.slots.len() as u32,
            network: self.network,
            flags: SERVICE_IN_USE,
            _pad: 0,
        }
    }
}

/// Dense ids from 1 to `max`, smallest free first.
#[derive(Debug)]
struct Ids {
    max: u32,
    next: u32,
    free: BTreeSet<u32>,
}

impl Ids {
    /// Rebuilds the allocator from the ids found in use.
    fn with_used(max: u32, used: impl IntoIterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = used.into_iter().collect();
        let next = used.last().map_or(1, |m| m + 1);
        let free = (1..next).filter(|i| !used.contains(i)).collect();
        Self { max, next, free }
    }

    fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        if self.next > self.max {
            return None;
        }
        self.next += 1;
        Some(self.next - 1)
    }

    fn release(&mut self, id: u32) {
        self.free.insert(id);
    }
}

pub struct LoadBalancer {
    maps: Maps,
    services: BTreeMap<String, Programmed>,
    /// Services found in the pinned maps and not yet matched to a desired service.
    adopted: BTreeMap<u32, Programmed>,
    networks: BTreeMap<u32, Network>,
    service_ids: Ids,
    backend_ids: Ids,
    /// Address of every allocated backend id (for the sweep).
    backend_addrs: BTreeMap<u32, Ipv4Addr>,
    /// Embryonic flows the sweep removed since this agent started (for the eviction
    /// estimate in [`FlowTableStats`]).
    embryos_swept: u64,
}

/// Occupancy of the flow tables (flows, not entries: a flow has two).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowTableStats {
    pub established: u64,
    pub embryonic: u64,
    /// SNAT ports held for closed flows until the backends' TIME_WAIT is over.
    pub snat_reserved: u64,
    /// Embryonic flows the embryo table's LRU pushed out (a flood's work), estimated from
    /// the counters: created − promoted − swept − still embryonic. Since this agent
    /// started; a restart over pinned maps counts the earlier agent's sweeps as evictions.
    pub embryonic_evicted: u64,
    /// Flows that became established.
    pub promoted: u64,
}

impl LoadBalancer {
    /// Takes the load balancer's maps out of a loaded object and reads what they hold.
    pub fn open(ebpf: &mut Ebpf) -> Result<Self> {
        let mut maps = Maps::take(ebpf)?;
        let (adopted, networks, backend_addrs) = adopt(&mut maps)?;
        let service_ids = Ids::with_used(maps.max_services(), adopted.keys().copied());
        let backend_ids = Ids::with_used(maps.max_backends(), backend_addrs.keys().copied());
        if !adopted.is_empty() {
            info!(
                services = adopted.len(),
                backends = backend_addrs.len(),
                "adopted the load balancer state left in the pinned maps"
            );
        }
        maps.ops = MapOps::default();
        Ok(Self {
            maps,
            services: BTreeMap::new(),
            adopted,
            networks,
            service_ids,
            backend_ids,
            backend_addrs,
            embryos_swept: 0,
        })
    }

    /// Sets the node's underlay address, host namespace and SNAT port range. Until this is
    /// called the programs pass every packet untouched.
    pub fn set_node(&mut self, node: &NodeLb) -> Result<()> {
        let (min, max) = (*node.snat_ports.start(), *node.snat_ports.end());
        if min == 0 || min > max {
            bail!("SNAT port range {min}-{max} is empty or starts at 0");
        }
        let cfg = LbConfig {
            node_ip: node.underlay_ip.octets(),
            snat_port_min: min,
            snat_port_max: max,
            host_netns_cookie: node.host_netns_cookie,
        };
        if self.maps.read_config()? != cfg {
            self.maps.set_config(cfg)?;
        }
        Ok(())
    }

    /// Makes the maps hold exactly `desired` (the whole table for this node), issuing only
    /// the operations the difference needs. Nothing is changed when the table is invalid.
    pub fn apply(&mut self, desired: &[ServiceLb]) -> Result<MapOps> {
        validate(desired, &self.maps)?;
        self.maps.ops = MapOps::default();
        self.claim_adopted(desired);

        // Shrink first, so a key moving from one service to another is freed before it is
        // taken, and ids are released before new ones are needed.
        let wanted: BTreeSet<&str> = desired.iter().map(|s| s.id.as_str()).collect();
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|id| !wanted.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            let p = self.services.remove(&id).expect("listed above");
            self.remove_service(p)?;
        }
        for (_, p) in std::mem::take(&mut self.adopted) {
            info!(
                index = p.index,
                "removing a service the pinned maps held but the table does not"
            );
            self.remove_service(p)?;
        }
        for s in desired {
            if let Some(p) = self.services.get(&s.id) {
                let keys = s.keys();
                let stale: Vec<ServiceKey> = p
                    .keys
                    .keys()
                    .filter(|k| !keys.contains_key(k))
                    .copied()
                    .collect();
                for k in stale {
                    self.maps.del_service_key(k)?;
                    self.services
                        .get_mut(&s.id)
                        .expect("present")
                        .keys
                        .remove(&k);
                }
            }
        }

        let networks: BTreeMap<u32, Network> = desired
            .iter()
            .map(|s| {
                (
                    s.network.id,
                    Network {
                        node_addr: s.network.node_addr.octets(),
                        ifindex: s.network.bridge_ifindex,
                    },
                )
            })
            .collect();
        for (id, net) in &networks {
            if self.networks.get(id) != Some(net) {
                self.maps.put_network(*id, *net)?;
                self.networks.insert(*id, *net);
            }
        }

        for s in desired {
            self.upsert_service(s)?;
        }

        let unused: Vec<u32> = self
            .networks
            .keys()
            .filter(|id| !networks.contains_key(id))
            .copied()
            .collect();
        for id in unused {
            self.maps.del_network(id)?;
            self.networks.remove(&id);
        }
        let ops = self.maps.ops;
        if ops.total() > 0 {
            debug!(
                updates = ops.updates,
                deletes = ops.deletes,
                "load balancer maps updated"
            );
        }
        Ok(ops)
    }

    /// Matches services found in the pinned maps to desired ones by the keys they hold, so a
    /// restarted agent keeps their ids, counters and backend slots.
    fn claim_adopted(&mut self, desired: &[ServiceLb]) {
        if self.adopted.is_empty() {
            return;
        }
        let mut owner: BTreeMap<ServiceKey, u32> = BTreeMap::new();
        for p in self.adopted.values() {
            for k in p.keys.keys() {
                owner.insert(*k, p.index);
            }
        }
        for s in desired {
            if self.services.contains_key(&s.id) {
                continue;
            }
            let mut votes: BTreeMap<u32, usize> = BTreeMap::new();
            for k in s.keys().keys() {
                if let Some(i) = owner.get(k) {
                    *votes.entry(*i).or_default() += 1;
                }
            }
            let best = votes
                .into_iter()
                .filter(|(i, _)| self.adopted.contains_key(i))
                .max_by_key(|(_, n)| *n);
            if let Some((index, _)) = best {
                let mut p = self.adopted.remove(&index).expect("filtered above");
                p.name = s.name.clone();
                self.services.insert(s.id.clone(), p);
            }
        }
    }

    fn upsert_service(&mut self, s: &ServiceLb) -> Result<()> {
        let mut p = match self.services.remove(&s.id) {
            Some(p) => p,
            None => {
                let index = self.service_ids.alloc().with_context(|| {
                    format!(
                        "cannot add service {}: all {} service slots are in use (raise the \
                         load balancer's service limit)",
                        s.name,
                        self.maps.max_services()
                    )
                })?;
                self.maps.reset_service_counters(index)?;
                Programmed {
                    index,
                    name: s.name.clone(),
                    network: s.network.id,
                    ..Default::default()
                }
            }
        };
        p.name = s.name.clone();
        let result = self.sync_service(&mut p, s);
        // Keep the mirror whatever happened: it describes what the maps now hold.
        self.services.insert(s.id.clone(), p);
        result
    }

    fn sync_service(&mut self, p: &mut Programmed, s: &ServiceLb) -> Result<()> {
        let mut state_dirty = false;
        if p.network != s.network.id {
            p.network = s.network.id;
            state_dirty = true;
        }

        let mut active: Vec<Ipv4Addr> = Vec::new();
        let mut draining: BTreeSet<Ipv4Addr> = BTreeSet::new();
        for b in &s.backends {
            if b.draining {
                draining.insert(b.ip);
            } else if !active.contains(&b.ip) {
                active.push(b.ip);
            }
        }
        draining.retain(|ip| !active.contains(ip));

        // Active backends that are no longer: out of the round robin, one swap each.
        let mut i = 0;
        while i < p.slots.len() {
            let (ip, id) = p.slots[i];
            if active.contains(&ip) {
                i += 1;
                continue;
            }
            self.remove_slot(p, i)?;
            if draining.contains(&ip) {
                self.set_backend(id, ip, p.index, BACKEND_DRAINING)?;
                p.draining.insert(ip, id);
            } else {
                self.free_backend(id)?;
            }
        }
        let gone: Vec<(Ipv4Addr, u32)> = p
            .draining
            .iter()
            .filter(|(ip, _)| !draining.contains(ip) && !active.contains(ip))
            .map(|(ip, id)| (*ip, *id))
            .collect();
        for (ip, id) in gone {
            p.draining.remove(&ip);
            self.free_backend(id)?;
        }
        // New active backends: a draining one comes back with its id and counters.
        for ip in &active {
            if p.slots.iter().any(|(a, _)| a == ip) {
                continue;
            }
            let id = match p.draining.remove(ip) {
                Some(id) => id,
                None => self.new_backend(&s.name, *ip)?,
            };
            self.set_backend(id, *ip, p.index, BACKEND_ACTIVE)?;
            let slot = p.slots.len() as u32;
            self.maps.put_slot(p.index, slot, id)?;
            p.slots.push((*ip, id));
            self.maps.put_state(p.index, p.state())?;
            state_dirty = false;
        }
        for ip in &draining {
            if p.draining.contains_key(ip) {
                continue;
            }
            let id = self.new_backend(&s.name, *ip)?;
            self.set_backend(id, *ip, p.index, BACKEND_DRAINING)?;
            p.draining.insert(*ip, id);
        }
        if state_dirty {
            self.maps.put_state(p.index, p.state())?;
        }

        // Keys last: a service becomes reachable once it has its backends.
        let mut keys = s.keys();
        for e in keys.values_mut() {
            e.service = p.index;
        }
        for (k, e) in keys {
            if p.keys.get(&k) != Some(&e) {
                self.maps.put_service_key(k, e)?;
                p.keys.insert(k, e);
            }
        }
        Ok(())
    }

    /// Removes slot `i`: the last slot moves into the hole, then the count drops, then the
    /// last slot goes. A program reading the old count may miss the last slot; it falls
    /// back to slot 0, which is never the hole while other slots exist.
    fn remove_slot(&mut self, p: &mut Programmed, i: usize) -> Result<()> {
        let last = p.slots.len() - 1;
        if i != last {
            let moved = p.slots[last];
            self.maps.put_slot(p.index, i as u32, moved.1)?;
            p.slots[i] = moved;
        }
        p.slots.pop();
        self.maps.put_state(p.index, p.state())?;
        self.maps.del_slot(p.index, last as u32)
    }

    fn new_backend(&mut self, service: &str, ip: Ipv4Addr) -> Result<u32> {
        let id = self.backend_ids.alloc().with_context(|| {
            format!(
                "cannot add backend {ip} to service {service}: all {} backend slots are in use \
                 (raise the load balancer's backend limit)",
                self.maps.max_backends()
            )
        })?;
        self.maps.reset_backend_counters(id)?;
        Ok(id)
    }

    fn set_backend(&mut self, id: u32, ip: Ipv4Addr, service: u32, state: u32) -> Result<()> {
        self.backend_addrs.insert(id, ip);
        self.maps.put_backend(
            id,
            Backend {
                addr: ip.octets(),
                service,
                state,
            },
        )
    }

    fn free_backend(&mut self, id: u32) -> Result<()> {
        self.maps.put_backend(
            id,
            Backend {
                addr: [0; 4],
                service: 0,
                state: BACKEND_FREE,
            },
        )?;
        self.backend_addrs.remove(&id);
        self.backend_ids.release(id);
        Ok(())
    }

    fn remove_service(&mut self, p: Programmed) -> Result<()> {
        for k in p.keys.keys() {
            self.maps.del_service_key(*k)?;
        }
        self.maps.put_state(p.index, ServiceState::default())?;
        for slot in (0..p.slots.len()).rev() {
            self.maps.del_slot(p.index, slot as u32)?;
        }
        let ids: Vec<u32> = p
            .slots
            .iter()
            .map(|(_, id)| *id)
            .chain(p.draining.values().copied())
            .collect();
        for id in ids {
            self.free_backend(id)?;
        }
        self.service_ids.release(p.index);
        Ok(())
    }

    /// Counters and backends of one service.
    /// The ids under which a service named `name` is programmed (its own, and its
    /// `mode=host` ports' when it has some).
    pub fn programmed_ids(&self, name: &str) -> Vec<String> {
        self.services
            .iter()
            .filter(|(_, p)| p.name == name)
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub fn service_stats(&self, id: &str) -> Result<Option<ServiceStats>> {
        self.services
            .get(id)
            .map(|p| self.stats_of(id, p))
            .transpose()
    }

    /// Counters of every programmed service.
    pub fn stats(&self) -> Result<Vec<ServiceStats>> {
        self.services
            .iter()
            .map(|(id, p)| self.stats_of(id, p))
            .collect()
    }

    fn stats_of(&self, id: &str, p: &Programmed) -> Result<ServiceStats> {
        let mut backends = Vec::new();
        for (slot, (ip, bid)) in p.slots.iter().enumerate() {
            backends.push(BackendStats {
                ip: *ip,
                state: BackendState::Active,
                slot: Some(slot as u32),
                counters: self.maps.backend_counters(*bid)?.into(),
            });
        }
        for (ip, bid) in &p.draining {
            backends.push(BackendStats {
                ip: *ip,
                state: BackendState::Draining,
                slot: None,
                counters: self.maps.backend_counters(*bid)?.into(),
            });
        }
        Ok(ServiceStats {
            id: id.to_owned(),
            name: p.name.clone(),
            index: p.index,
            counters: self.maps.service_counters(p.index)?.into(),
            backends,
        })
    }

    /// Packets and socket calls per reason (translated, passed, dropped), summed over CPUs.
    pub fn reasons(&self) -> Result<Vec<(Reason, u64)>> {
        self.maps.reasons()
    }

    /// Every entry of the flow tables (both directions of each flow), established ones and
    /// embryonic ones (flagged FLOW_EMBRYO).
    pub fn flows(&self) -> Result<Vec<(FlowKey, Flow)>> {
        let mut all = self.maps.read_flows()?;
        all.extend(
            self.maps
                .read_embryos()?
                .into_iter()
                .map(|(k, e)| (k, e.flow)),
        );
        Ok(all)
    }

    /// How full the flow tables are, and how many embryonic flows were pushed out of theirs.
    pub fn flow_table(&self) -> Result<FlowTableStats> {
        let count = |flows: &[(FlowKey, Flow)]| {
            flows
                .iter()
                .filter(|(_, f)| f.flags & mesh_common::lb::FLOW_REPLY == 0)
                .count() as u64
        };
        let established = count(&self.maps.read_flows()?);
        let embryos: Vec<(FlowKey, Flow)> = self
            .maps
            .read_embryos()?
            .into_iter()
            .map(|(k, e)| (k, e.flow))
            .collect();
        let embryonic = count(&embryos);
        let reasons = self.maps.reasons()?;
        let reason = |r: Reason| reasons.iter().find(|(x, _)| *x == r).map_or(0, |(_, n)| *n);
        // The kernel's LRU does not count what it evicts: every flow created left the
        // embryo table by promotion, by the sweep, by a reused client port, or by eviction.
        let embryonic_evicted = reason(Reason::NewFlow)
            .saturating_sub(reason(Reason::Promoted))
            .saturating_sub(self.embryos_swept)
            .saturating_sub(embryonic);
        Ok(FlowTableStats {
            established,
            embryonic,
            snat_reserved: self.maps.count_reservations()?,
            embryonic_evicted,
            promoted: reason(Reason::Promoted),
        })
    }

    /// Removes finished and idle flows, and flows of backends that are gone.
    pub fn sweep(&mut self, timeouts: &FlowTimeouts) -> Result<SweepReport> {
        let r = sweep::sweep(&mut self.maps, &self.backend_addrs, timeouts)?;
        self.embryos_swept += r.embryos_removed as u64;
        Ok(r)
    }
}

/// Rebuilds the mirror from the maps. Half-finished changes of a killed agent are repaired:
/// registry entries of active backends that lost their slot become draining, and slots
/// beyond a service's count are deleted.
#[allow(clippy::type_complexity)]
fn adopt(
    maps: &mut Maps,
) -> Result<(
    BTreeMap<u32, Programmed>,
    BTreeMap<u32, Network>,
    BTreeMap<u32, Ipv4Addr>,
)> {
    let states = maps.read_states()?;
    let counts: BTreeMap<u32, u32> = states.iter().map(|(i, s)| (*i, s.backends)).collect();
    let mut services: BTreeMap<u32, Programmed> = BTreeMap::new();
    for (index, state) in states {
        services.insert(
            index,
            Programmed {
                index,
                name: format!("#{index}"),
                network: state.network,
                ..Default::default()
            },
        );
    }
    for (key, entry) in maps.read_service_keys()? {
        match services.get_mut(&entry.service) {
            Some(p) => {
                p.keys.insert(key, entry);
            }
            None => maps.del_service_key(key)?,
        }
    }
    let registry: BTreeMap<u32, Backend> = maps.read_backends()?.into_iter().collect();
    let mut slotted: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
    for (key, id) in maps.read_slots()? {
        let count = counts.get(&key.service).copied().unwrap_or(0);
        if key.slot < count && registry.contains_key(&id) {
            slotted.entry(key.service).or_default().insert(key.slot, id);
        } else {
            maps.del_slot(key.service, key.slot)?;
        }
    }
    let mut backend_addrs = BTreeMap::new();
    for (index, p) in services.iter_mut() {
        let slots = slotted.remove(index).unwrap_or_default();
        let count = counts.get(index).copied().unwrap_or(0) as usize;
        let complete = slots.len() == count && slots.keys().copied().eq(0..count as u32);
        for id in slots.values() {
            p.slots.push((Ipv4Addr::from(registry[id].addr), *id));
        }
        if !complete {
            // A hole: rewrite this service's slots densely.
            warn!(
                index,
                "repairing the backend slots of a half-updated service"
            );
            for (i, (_, id)) in p.slots.iter().enumerate() {
                maps.put_slot(*index, i as u32, *id)?;
            }
            maps.put_state(*index, p.state())?;
            for i in p.slots.len()..count {
                maps.del_slot(*index, i as u32)?;
            }
        }
    }
    for (id, b) in &registry {
        let Some(p) = services.get_mut(&b.service) else {
            maps.put_backend(*id, Backend::default())?;
            continue;
        };
        let ip = Ipv4Addr::from(b.addr);
        backend_addrs.insert(*id, ip);
        if p.slots.iter().any(|(_, sid)| sid == id) {
            continue;
        }
        if b.state != BACKEND_DRAINING {
            maps.put_backend(
                *id,
                Backend {
                    state: BACKEND_DRAINING,
                    ..*b
                },
            )?;
        }
        p.draining.insert(ip, *id);
    }
    let networks = maps.read_networks()?.into_iter().collect();
    Ok((services, networks, backend_addrs))
}

/// Rejects a table the maps cannot represent, with the service names involved.
fn validate(desired: &[ServiceLb], maps: &Maps) -> Result<()> {
    let mut ids = BTreeSet::new();
    let mut owners: BTreeMap<ServiceKey, &str> = BTreeMap::new();
    let mut networks: BTreeMap<u32, &NetworkLb> = BTreeMap::new();
    for s in desired {
        if !ids.insert(s.id.as_str()) {
            bail!("service id {} appears twice in the service table", s.id);
        }
        if s.network.node_addr.is_unspecified() {
            bail!(
                "service {}: network {} has no node address on this node",
                s.name,
                s.network.id
            );
        }
        if s.network.bridge_ifindex == 0 {
            bail!(
                "service {}: network {} has no bridge on this node yet",
                s.name,
                s.network.id
            );
        }
        if let Some(other) = networks.insert(s.network.id, &s.network)
            && other != &s.network
        {
            bail!(
                "network {} is described two ways ({:?} and {:?})",
                s.network.id,
                other,
                s.network
            );
        }
        for p in &s.ports {
            if p.published == 0 || p.target == 0 {
                bail!(
                    "service {}: port mapping {}:{}/{} is out of range (1-65535)",
                    s.name,
                    p.published,
                    p.target,
                    p.proto
                );
            }
        }
        if s.backends.len() > maps.max_backends() as usize {
            bail!(
                "service {} has {} backends, more than the load balancer's limit of {}",
                s.name,
                s.backends.len(),
                maps.max_backends()
            );
        }
        for k in s.keys().keys() {
            if let Some(other) = owners.insert(*k, s.name.as_str()) {
                if k.is_published() {
                    bail!(
                        "port {}/{} is already published by service {other}, cannot publish it \
                         for {}",
                        k.port,
                        Protocol::from_number(k.proto).expect("tcp or udp"),
                        s.name
                    );
                }
                bail!(
                    "VIP {} is already used by service {other}, cannot use it for {}",
                    Ipv4Addr::from(k.addr),
                    s.name
                );
            }
        }
    }
    Ok(())
}

/// The cookie of the caller's network namespace, as bpf_get_netns_cookie reports it.
pub fn current_netns_cookie() -> Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))
        .context("opening a socket to read the network namespace cookie")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket, output buffer of the advertised length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("reading SO_NETNS_COOKIE (needs Linux 5.14 or later)");
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_dense_and_recycled_smallest_first() {
        let mut ids = Ids::with_used(3, []);
        assert_eq!(ids.alloc(), Some(1));
        assert_eq!(ids.alloc(), Some(2));
        assert_eq!(ids.alloc(), Some(3));
        assert_eq!(ids.alloc(), None);
        ids.release(2);
        assert_eq!(ids.alloc(), Some(2));
    }

    #[test]
    fn ids_rebuilt_from_pinned_state_skip_the_used_ones() {
        let mut ids = Ids::with_used(10, [1, 3, 4]);
        assert_eq!(ids.alloc(), Some(2));
        assert_eq!(ids.alloc(), Some(5));
    }

    #[test]
    fn a_vip_balances_every_port_of_both_protocols() {
        let s = ServiceLb {
            id: "a".into(),
            name: "web".into(),
            network: NetworkLb {
                id: 4096,
                node_addr: Ipv4Addr::new(10, 0, 0, 1),
                bridge_ifindex: 5,
            },
            vip: Some(Ipv4Addr::new(10, 0, 0, 2)),
            ports: vec![PublishedPort {
                proto: Protocol::Tcp,
                published: 8080,
                target: 80,
                mode: PublishMode::Snat,
            }],
            backends: vec![],
        };
        let keys = s.keys();
        assert_eq!(keys.len(), 3);
        assert_eq!(
            keys[&ServiceKey::published(IPPROTO_TCP, 8080)].target_port,
            80
        );
        assert_eq!(
            keys[&ServiceKey::vip([10, 0, 0, 2], IPPROTO_UDP)].target_port,
            0
        );
    }
}
