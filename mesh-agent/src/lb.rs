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
//!
//! Here: the table's types and opening the maps. `validate.rs` refuses what the maps cannot
//! hold, `apply.rs` programs the difference, `adopt.rs` reads what a previous agent left,
//! `inspect.rs` reports counters and flows, `sweep.rs` expires flows, `maps.rs` is the only
//! place that touches a map (`counters.rs` maps the traffic counters for it).

mod adopt;
mod apply;
mod counters;
mod inspect;
mod maps;
mod sweep;
mod validate;

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
    BACKEND_ACTIVE, BACKEND_COUNTER_STRIDE, BACKEND_COUNTERS_MAP, BACKEND_DRAINING, BACKEND_FREE,
    BACKENDS_MAP, Backend, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_EMBRYOS, DEFAULT_MAX_FLOWS,
    DEFAULT_MAX_RETURNS, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SNAT_RESERVATIONS, DEFAULT_MAX_SOCKETS,
    DEFAULT_SNAT_PORT_MAX, DEFAULT_SNAT_PORT_MIN, EMBRYOS_MAP, FLOWS_MAP, Flow, FlowKey,
    IPPROTO_TCP, IPPROTO_UDP, LbConfig, Network, PUBLISH_INGRESS, PUBLISH_SNAT, RETURNS_MAP,
    RR_MAP, Reason, SERVICE_COUNTER_STRIDE, SERVICE_COUNTERS_MAP, SERVICE_IN_USE,
    SERVICE_STATE_MAP, SERVICES_MAP, SLOTS_MAP, SNAT_RESERVED_MAP, SOCK_FWD_MAP, SOCK_REV_MAP,
    ServiceEntry, ServiceKey, ServiceState, TrafficCounters,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

pub use maps::MapOps;
pub use sweep::{FlowTimeouts, SweepPlan, SweepReport};

/// Bytes of kernel memory one entry costs, measured on Linux 6.18 x86_64 (the map's
/// `memlock` divided by its entries; LRU hash maps preallocate every entry at creation).
/// Documented in the README's `[dataplane]` section.
pub const BYTES_PER_FLOW_ENTRY: u64 = 120;
pub const BYTES_PER_EMBRYO_ENTRY: u64 = 128;
pub const BYTES_PER_SNAT_RESERVATION: u64 = 88;
pub const BYTES_PER_RETURN_PATH: u64 = 104;

use adopt::adopt;
use maps::Maps;
use validate::validate;

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
    /// Return paths: client-address connections to this node's own tasks, one entry each
    /// (which node each came in through, for its replies).
    pub returns: u32,
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
            returns: DEFAULT_MAX_RETURNS,
        }
    }
}

impl LbLimits {
    /// Kernel memory the flow tables of these sizes take (preallocated at creation).
    pub fn flow_table_bytes(&self) -> u64 {
        u64::from(self.flows) * BYTES_PER_FLOW_ENTRY
            + u64::from(self.embryos) * BYTES_PER_EMBRYO_ENTRY
            + u64::from(self.snat_reservations) * BYTES_PER_SNAT_RESERVATION
            + u64::from(self.returns) * BYTES_PER_RETURN_PATH
    }

    /// The sizes of the maps in the object, decided before it is loaded. A map already
    /// pinned in `pin_dir` keeps the size it was created with (its entries are what we
    /// adopt). The traffic counters have a stripe of ids per CPU the kernel may run a
    /// program on, and the programs learn the stripe length from a global.
    pub(crate) fn map_sizes(&self, pin_dir: &Path) -> Result<MapSizes> {
        let cpus = counters::possible_cpus()?;
        let striped = |ids: u32, what: &str| {
            ids.checked_add(1)
                .and_then(|n| n.checked_mul(cpus))
                .with_context(|| {
                    format!("{ids} {what} × {cpus} CPUs is more traffic counters than a map holds")
                })
        };
        let wanted = [
            (SERVICES_MAP, 4 * self.services),
            (SERVICE_STATE_MAP, self.services + 1),
            (RR_MAP, self.services + 1),
            (SERVICE_COUNTERS_MAP, striped(self.services, "services")?),
            (SLOTS_MAP, self.backends),
            (BACKENDS_MAP, self.backends + 1),
            (BACKEND_COUNTERS_MAP, striped(self.backends, "backends")?),
            (FLOWS_MAP, self.flows),
            (EMBRYOS_MAP, self.embryos),
            (SNAT_RESERVED_MAP, self.snat_reservations),
            (SOCK_FWD_MAP, self.sockets),
            (SOCK_REV_MAP, self.sockets),
            (RETURNS_MAP, self.returns),
        ];
        let mut sizes = MapSizes {
            entries: Vec::with_capacity(wanted.len()),
            service_stride: 0,
            backend_stride: 0,
        };
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
            if name == SERVICE_COUNTERS_MAP {
                sizes.service_stride = size / cpus;
            } else if name == BACKEND_COUNTERS_MAP {
                sizes.backend_stride = size / cpus;
            }
            sizes.entries.push((name, size));
        }
        Ok(sizes)
    }
}

/// What `LbLimits::map_sizes` decided: every sized map's entries, and the stripe lengths
/// of the counters maps for the programs' globals.
pub(crate) struct MapSizes {
    entries: Vec<(&'static str, u32)>,
    service_stride: u32,
    backend_stride: u32,
}

impl MapSizes {
    /// Sets the sizes and the stride globals on the loader (which borrows the values until
    /// it loads).
    pub(crate) fn apply<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        for (name, size) in &self.entries {
            loader.map_max_entries(name, *size);
        }
        loader.override_global(SERVICE_COUNTER_STRIDE, &self.service_stride, true);
        loader.override_global(BACKEND_COUNTER_STRIDE, &self.backend_stride, true);
    }
}

pub(crate) use maps::check_pinned_layouts;
use mesh_api::v1::Counters;

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
    /// The network's VXLAN device on this node; 0 sends flows to other nodes' tasks through
    /// the bridge.
    #[serde(default)]
    pub vxlan_ifindex: u32,
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

/// A service's or backend's traffic counters as the API reports them.
fn counters(c: TrafficCounters) -> Counters {
    Counters {
        flows: c.flows,
        packets: c.packets,
        bytes: c.bytes,
        dropped: c.dropped,
    }
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
                vxlan_ifindex: 6,
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
