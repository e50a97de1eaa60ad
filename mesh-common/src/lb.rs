//! The load balancer's maps: services, backends, flows and counters.
//!
//! Conventions shared by both sides: IPv4 addresses are stored as their four octets in network
//! order (`Ipv4Addr::octets()`), ports as plain host-order numbers. Ids of services and
//! backends are dense indexes allocated by the agent (0 is never used, so a zeroed entry
//! means "none"); they index the per-CPU counter arrays directly.
//!
//! ```text
//! LB_SERVICES   (addr, port, proto) -> ServiceEntry    addr 0.0.0.0 = published on the node,
//!                                                      otherwise a VIP (port 0 = any port)
//! LB_SVC_STATE  [service]           -> ServiceState    active backend count, network
//! LB_SLOTS      (service, slot)     -> backend id      slots 0..count, swap-removed
//! LB_BACKENDS   [backend]           -> Backend         address, owner, active/draining
//! LB_NETWORKS   network id          -> Network         node address (SNAT), bridge ifindex
//! LB_RR         [service]           -> u64             round-robin cursor, shared by all CPUs
//! LB_FLOWS      FlowKey             -> Flow            both directions of established flows
//! LB_EMBRYOS    FlowKey             -> Embryo          both directions of flows not yet
//!                                                      established (a flood lands here only)
//! LB_SNAT_RESERVED reply FlowKey    -> u64             SNAT ports of closed flows, held
//!                                                      until the backend's TIME_WAIT is over
//! LB_SOCK_FWD   SockKey             -> SockTarget      unconnected UDP: socket's backend
//! LB_SOCK_REV   SockKey             -> SockTarget      backend -> address the app asked for
//! LB_NETNS      netns cookie        -> NetnsEntry      namespaces whose sockets this node steers
//! LB_TASK_PORTS host veth ifindex   -> TaskPort        a local task's port on a network
//! LB_RETURNS    reply 5-tuple       -> ReturnEntry     client-address flows of local tasks:
//!                                                      which node their replies go back to
//! ```
//!
//! Client-address publishing (`PUBLISH_INGRESS`): the ingress node only DNATs, so the task
//! sees the client's own address. Its replies would follow the task's routes out of the
//! gateway bridge and its masquerade; instead the backend's node learns, from the packets
//! that reach the task (`LB_RETURNS`, on the task's host veth), which node a connection came
//! through and sends the replies back into the overlay to that node, where the flow's reply
//! entry restores the published address.

/// Node-wide settings, one entry at index 0.
pub const CONFIG_MAP: &str = "LB_CONFIG";
pub const SERVICES_MAP: &str = "LB_SERVICES";
pub const SERVICE_STATE_MAP: &str = "LB_SVC_STATE";
pub const SLOTS_MAP: &str = "LB_SLOTS";
pub const BACKENDS_MAP: &str = "LB_BACKENDS";
pub const NETWORKS_MAP: &str = "LB_NETWORKS";
pub const RR_MAP: &str = "LB_RR";
pub const FLOWS_MAP: &str = "LB_FLOWS";
/// Flows whose client has not yet shown it hears the backend (see [`Embryo`]). Kept apart
/// from [`FLOWS_MAP`] so that a flood of new flows from spoofed sources evicts only other
/// embryonic flows, never an established one.
pub const EMBRYOS_MAP: &str = "LB_EMBRYOS";
/// Reply keys (backend, node address, target port, SNAT port) of closed TCP flows, with the
/// CLOCK_MONOTONIC time until which their SNAT port must not be given to a new flow to the
/// same backend: the backend holds the 4-tuple in TIME_WAIT (60 s on Linux) and would
/// answer a new SYN on it with an ACK of the old connection. Written by the agent's sweep.
pub const SNAT_RESERVED_MAP: &str = "LB_SNAT_RESERVED";
pub const SOCK_FWD_MAP: &str = "LB_SOCK_FWD";
pub const SOCK_REV_MAP: &str = "LB_SOCK_REV";
/// [`TrafficCounters`] per service id, a stripe per CPU (see [`counter_slot`]).
pub const SERVICE_COUNTERS_MAP: &str = "LB_SVC_COUNTERS";
/// [`TrafficCounters`] per backend id, a stripe per CPU (see [`counter_slot`]).
pub const BACKEND_COUNTERS_MAP: &str = "LB_BE_COUNTERS";
/// The read-only program global holding the stripe length (ids per CPU) of
/// [`SERVICE_COUNTERS_MAP`]; the agent sets it at load time from the map's size.
pub const SERVICE_COUNTER_STRIDE: &str = "LB_SVC_COUNTER_STRIDE";
/// As [`SERVICE_COUNTER_STRIDE`], for [`BACKEND_COUNTERS_MAP`].
pub const BACKEND_COUNTER_STRIDE: &str = "LB_BE_COUNTER_STRIDE";
/// Per-CPU packet counts indexed by [`Reason`].
pub const STATS_MAP: &str = "LB_STATS";
/// The network namespaces (by cookie, what `bpf_get_netns_cookie` returns) whose sockets
/// this node's socket hooks act on: its tasks' and its endpoints'. The hooks are attached at
/// the cgroup v2 root, so they see every process on the kernel whatever cgroup a runtime put
/// it in; this map is what keeps one node's hooks away from sockets that are not its own
/// (other agents sharing the kernel, the rest of the host). The node's own namespace
/// (`LbConfig::host_netns_cookie`) is always included.
pub const NETNS_MAP: &str = "LB_NETNS";
pub const TASK_PORTS_MAP: &str = "LB_TASK_PORTS";
/// This node's tasks by their address on a network ([`LocalTaskKey`]) → the ifindex of the
/// task's host veth there: a flow to a local task enters the task's namespace straight from
/// the interface it arrived on (bpf_redirect_peer), without the bridge.
pub const LOCAL_TASKS_MAP: &str = "LB_LOCAL_TASKS";
/// A network's VXLAN device on this node (ifindex) → the network's id: which network a
/// frame from another node belongs to, to find its task in [`LOCAL_TASKS_MAP`].
pub const OVERLAYS_MAP: &str = "LB_OVERLAYS";
pub const RETURNS_MAP: &str = "LB_RETURNS";
/// How many task ports (a task's attachment to an overlay network) one node can have.
pub const MAX_TASK_PORTS: u32 = 16_384;
/// How many task namespaces one node can steer.
pub const MAX_NETNS: u32 = 16_384;

/// Default sizes; the agent overrides them at load time.
pub const DEFAULT_MAX_SERVICES: u32 = 16_384;
pub const DEFAULT_MAX_BACKENDS: u32 = 65_536;
/// Entries of [`FLOWS_MAP`]: two per established flow.
pub const DEFAULT_MAX_FLOWS: u32 = 131_072;
/// Entries of [`EMBRYOS_MAP`]: two per embryonic flow. A flow stays embryonic for one
/// round trip to the backend and back, so this bounds the new flows per round trip a flood
/// can push through without evicting a legitimate one still in its handshake. Every
/// embryo holds a SNAT port towards its backend: at most half the default port range, so
/// the LRU evicts flood entries before they hold every port of a single backend.
pub const DEFAULT_MAX_EMBRYOS: u32 = 16_384;
/// Entries of [`SNAT_RESERVED_MAP`]: one per TCP flow closed within the reuse delay.
pub const DEFAULT_MAX_SNAT_RESERVATIONS: u32 = 65_536;
pub const DEFAULT_MAX_SOCKETS: u32 = 65_536;
/// Client-address flows whose backend runs on this node (one entry per connection).
pub const DEFAULT_MAX_RETURNS: u32 = 65_536;

/// Below the kernel's default ephemeral range (32768–60999), so a SNAT port never collides
/// with a port the node's own sockets picked.
pub const DEFAULT_SNAT_PORT_MIN: u16 = 1024;
pub const DEFAULT_SNAT_PORT_MAX: u16 = 32_767;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The UDP port of the overlay (IANA VXLAN), on every node's underlay address. It cannot be
/// published, so the routing mesh passes overlay packets without looking them up.
pub const VXLAN_PORT: u16 = 4789;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// The node's underlay address: the destination of published ports. 0.0.0.0 until the
    /// agent configures the node; the programs pass everything until then.
    pub node_ip: [u8; 4],
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Cookie of the node's own network namespace: only processes there reach published
    /// ports on 127.0.0.1 (inside a task, 127.0.0.1 is the task's own loopback).
    pub host_netns_cookie: u64,
}

/// What a namespace in [`NETNS_MAP`] is; only presence matters to the programs today.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsEntry {
    /// [`NETNS_TASK`] or [`NETNS_ENDPOINT`].
    pub kind: u32,
}

/// A task the agent started (any driver).
pub const NETNS_TASK: u32 = 1;
/// A container another runtime attached through the CNI plugin.
pub const NETNS_ENDPOINT: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// 0.0.0.0 for a port published on the node, otherwise the service's VIP.
    pub addr: [u8; 4],
    /// The published port, or 0 on a VIP: a VIP forwards every port, like Swarm's.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl ServiceKey {
    pub const fn published(proto: u8, port: u16) -> Self {
        Self {
            addr: [0; 4],
            port,
            proto,
            _pad: 0,
        }
    }

    pub const fn vip(addr: [u8; 4], proto: u8) -> Self {
        Self {
            addr,
            port: 0,
            proto,
            _pad: 0,
        }
    }

    pub const fn is_published(&self) -> bool {
        u32::from_ne_bytes(self.addr) == 0
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    pub service: u32,
    /// Port on the backend; 0 keeps the port the client asked for (VIP entries).
    pub target_port: u16,
    /// How a published port reaches its tasks: [`PUBLISH_SNAT`] or [`PUBLISH_INGRESS`]
    /// (0 on VIP entries, which the socket hooks balance without packets).
    pub mode: u16,
}

/// `ServiceEntry::mode`: the source becomes the node's address on the network (the task sees
/// the ingress node). 0, so entries pinned by agents that knew no modes keep their meaning.
pub const PUBLISH_SNAT: u16 = 0;
/// Destination translation only: the task sees the client's own address and port; replies
/// go back through the ingress node (see the module docs).
pub const PUBLISH_INGRESS: u16 = 1;

/// `ServiceState::flags`: the id is allocated (lets a restarted agent find its services).
pub const SERVICE_IN_USE: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceState {
    /// Number of active backends, i.e. valid slots `0..backends`.
    pub backends: u32,
    pub network: u32,
    pub flags: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotKey {
    pub service: u32,
    pub slot: u32,
}

/// `Backend::state`.
pub const BACKEND_FREE: u32 = 0;
/// Receives new flows.
pub const BACKEND_ACTIVE: u32 = 1;
/// Keeps its flows but receives no new ones.
pub const BACKEND_DRAINING: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u8; 4],
    pub service: u32,
    pub state: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Network {
    /// The node's own address on the network: the source address of routing-mesh flows.
    pub node_addr: [u8; 4],
    /// The network's bridge on this node: where routing-mesh flows are redirected when
    /// neither shorter path applies.
    pub ifindex: u32,
    /// The network's VXLAN device on this node (0: none): a flow to a task on another node
    /// is sent into it directly, with the task's MAC as its destination (the device's static
    /// FDB has the task's node), skipping the bridge and the neighbour lookup.
    pub vxlan_ifindex: u32,
}

/// A key of [`LOCAL_TASKS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LocalTaskKey {
    /// The network's id ([`NETWORKS_MAP`] key, [`Flow::network`]).
    pub network: u32,
    pub addr: [u8; 4],
}

/// A packet's 5-tuple as it arrives, before translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    // Two scalars rather than `[u8; 3]`: the BPF backend turns a store of a 3-byte array
    // into a call to its byte-loop memset, on every key built.
    pub _pad: u8,
    pub _pad2: u16,
}

/// `Flow::flags`: the entry translates replies (backend -> client).
pub const FLOW_REPLY: u32 = 1;
/// A FIN went through in this entry's direction.
pub const FLOW_FIN: u32 = 2;
/// A RST went through in this entry's direction.
pub const FLOW_RST: u32 = 4;
/// At least one packet used this entry after it was created (on a reply entry: the backend
/// answered).
pub const FLOW_SEEN: u32 = 8;

/// The entry is in [`EMBRYOS_MAP`]: the flow is not established yet.
pub const FLOW_EMBRYO: u32 = 16;
/// A forward entry whose backend was not one of this node's tasks ([`LOCAL_TASKS_MAP`])
/// when the flow began: its packets go into the network's VXLAN device with no lookup of
/// the local tasks. Without it (a local task, or an older agent's entry) they go into the
/// task directly when it is still here, else through the bridge: a task's MAC in the VXLAN
/// device would go to every other node.
pub const FLOW_REMOTE: u32 = 32;

/// What to do with a packet of a known flow: rewrite its 5-tuple to these values and
/// redirect it out of `ifindex`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub nat_src: [u8; 4],
    pub nat_dst: [u8; 4],
    pub nat_sport: u16,
    pub nat_dport: u16,
    pub ifindex: u32,
    pub service: u32,
    pub backend: u32,
    /// CLOCK_MONOTONIC (coarse) nanoseconds; refreshed at most about once a second.
    pub last_seen: u64,
    pub flags: u32,
    /// Forward entries: the network (LB_NETWORKS key) whose bridge the flow leaves by,
    /// looked up per packet so a re-created bridge (a new ifindex) keeps the flow going;
    /// `ifindex` is the fallback. Reply entries: 0 (they leave by `ifindex`, where the client
    /// came in).
    pub network: u32,
}

impl Flow {
    /// The key of the other direction's entry: what this entry's translated packets look
    /// like when they come back.
    pub const fn partner(&self, key: &FlowKey) -> FlowKey {
        FlowKey {
            src: self.nat_dst,
            dst: self.nat_src,
            sport: self.nat_dport,
            dport: self.nat_sport,
            proto: key.proto,
            _pad: 0,
            _pad2: 0,
        }
    }
}

/// A local task's host-side veth on an overlay network (the key is its ifindex).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskPort {
    /// The MAC of this node's bridge on the network: frames from it were routed by this node.
    pub node_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The network's VXLAN device on this node: where replies to other nodes are sent.
    pub vxlan_ifindex: u32,
}

/// `ReturnEntry::flags`: the connection came in through this node (its flow table holds the
/// reply translation); otherwise through the node whose bridge has `node_mac`.
pub const RETURN_LOCAL: u16 = 1;
/// A FIN went from the client to the task.
pub const RETURN_FIN_IN: u16 = 2;
/// A FIN went from the task to the client.
pub const RETURN_FIN_OUT: u16 = 4;
/// A RST went either way.
pub const RETURN_RST: u16 = 8;

/// Where the replies of one client-address connection to a local task go, keyed by the
/// replies' 5-tuple (task address and target port → client address and port). UDP entries
/// are keyed with source 0.0.0.0: a server bound to 0.0.0.0 answers from the address its
/// route to the client prefers (the gateway bridge's), and gets `task_addr` back as the
/// source. A TCP socket always answers from the address it was reached at.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReturnEntry {
    /// The ingress node's bridge MAC on the network: the replies' Ethernet destination.
    pub node_mac: [u8; 6],
    pub flags: u16,
    /// The task's address on the network the connection reached it by.
    pub task_addr: [u8; 4],
    /// The VXLAN device the replies leave by (0 for [`RETURN_LOCAL`]).
    pub ifindex: u32,
    /// CLOCK_MONOTONIC (coarse) nanoseconds; refreshed at most about once a second.
    pub last_seen: u64,
}

/// The return-table key of a reply: UDP replies are keyed without their source address.
pub const fn return_key(reply: &FlowKey) -> FlowKey {
    let mut k = *reply;
    if k.proto == IPPROTO_UDP {
        k.src = [0; 4];
    }
    k
}

/// The MAC mesh gives an address on an overlay network (tasks and node bridges alike):
/// 02:42 and the four octets, as Docker does. A frame whose source MAC is not the one of its
/// source address was routed onto the network by the node that owns that MAC.
pub const fn mac_for_ip(ip: [u8; 4]) -> [u8; 6] {
    [0x02, 0x42, ip[0], ip[1], ip[2], ip[3]]
}

/// An entry of [`EMBRYOS_MAP`]: a flow's translation and how far its handshake got.
///
/// A flow is promoted to [`FLOWS_MAP`] when its client proves it hears the backend: for
/// TCP, the client's ACK of the backend's SYN-ACK (acknowledging exactly `syn_ack_seq` + 1,
/// which a spoofed source never sees); for UDP, a client datagram after the backend's
/// first answer. A SYN-ACK alone proves nothing: a backend answers spoofed SYNs too.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Embryo {
    pub flow: Flow,
    /// On the reply entry: the sequence number of the backend's SYN-ACK.
    pub syn_ack_seq: u32,
    /// On the reply entry: 1 once the backend's SYN-ACK was seen (and `syn_ack_seq` set).
    pub answered: u32,
}

/// A socket and an address it talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SockKey {
    pub cookie: u64,
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockTarget {
    pub addr: [u8; 4],
    pub port: u16,
    pub _pad: u16,
    pub service: u32,
    pub backend: u32,
}

/// Per service and per backend, kept per CPU. Flows count new connections (routing mesh)
/// and balanced connects/sockets (socket load balancing); packets and bytes are counted on
/// the routing mesh only, since socket load balancing never sees packets.
///
/// The counters maps are plain arrays with a stripe of `stride` entries per CPU rather than
/// per-CPU arrays: a per-CPU array's entry is a pointer to a separate allocation, so with
/// many services a packet's two counters cost four cache misses instead of two. Each CPU
/// still writes only its own stripe (no atomics, no shared cache lines but at a stripe's
/// end), and the agent reads them through a shared mapping of the array (BPF_F_MMAPABLE)
/// without a syscall per entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub flows: u64,
    pub packets: u64,
    pub bytes: u64,
    pub dropped: u64,
}

/// Where CPU `cpu`'s counters of id `id` are in a counters map whose stripes are `stride`
/// entries long; None for an id outside the stripe, which must not land in another CPU's.
#[inline(always)]
pub const fn counter_slot(cpu: u32, stride: u32, id: u32) -> Option<u32> {
    if id >= stride {
        return None;
    }
    match cpu.checked_mul(stride) {
        Some(base) => base.checked_add(id),
        None => None,
    }
}

impl TrafficCounters {
    pub fn add(&mut self, other: &Self) {
        self.flows += other.flows;
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.dropped += other.dropped;
    }
}

/// Why a packet or socket call was translated, passed or dropped: the index into
/// [`STATS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Translated toward a backend and redirected.
    Forwarded = 0,
    /// A reply translated back to the client and redirected.
    Replied,
    /// A new routing-mesh flow was created.
    NewFlow,
    /// TCP without SYN to a published port and no flow: passed, the kernel answers RST.
    NotSyn,
    /// The service has no active backend: dropped.
    NoBackend,
    /// No free SNAT port for the backend after bounded retries: dropped.
    SnatExhausted,
    /// The flow table refused an entry: dropped.
    FlowTableFull,
    /// Shorter than its headers: passed to the kernel, which drops it.
    Truncated,
    /// Bad IPv4 version, header length, total length or TCP data offset: passed.
    BadHeader,
    /// IPv4 header checksum wrong on a packet that would create a flow: passed.
    BadIpChecksum,
    /// An IPv4 fragment addressed to the node: passed (no L4 header to balance on).
    Fragment,
    /// A rewrite helper failed half-way: dropped.
    RewriteFailed,
    /// A connect or sendmsg to a service was rewritten to a backend.
    SockBalanced,
    /// A connect or sendmsg to a service with no active backend was refused.
    SockNoBackend,
    /// A reply's source or a peer name was restored to the service address.
    SockRestored,
    /// A task's reply to a client-address flow was sent back to its ingress node.
    Returned,
    /// An embryonic flow became established (moved from LB_EMBRYOS to LB_FLOWS).
    Promoted,
    /// A task answered a new connection on the 5-tuple of a finished client-address flow
    /// that did not come through the routing mesh (the client dialled the task directly
    /// with a port it had used through the mesh): the finished flow's entries were removed
    /// and the packet passed untranslated.
    Superseded,
    /// An ICMP error about a routing-mesh flow (fragmentation needed, unreachable, time
    /// exceeded) translated like the flow's packets and redirected to the other end.
    IcmpTranslated,
    /// A packet the routing mesh would forward arrived with a TTL of 1 or 0: dropped, as a
    /// router drops it (traceroute's probes end here).
    TtlExceeded,
}

impl Reason {
    pub const ALL: [Reason; 20] = [
        Reason::Forwarded,
        Reason::Replied,
        Reason::NewFlow,
        Reason::NotSyn,
        Reason::NoBackend,
        Reason::SnatExhausted,
        Reason::FlowTableFull,
        Reason::Truncated,
        Reason::BadHeader,
        Reason::BadIpChecksum,
        Reason::Fragment,
        Reason::RewriteFailed,
        Reason::SockBalanced,
        Reason::SockNoBackend,
        Reason::SockRestored,
        Reason::Returned,
        Reason::Promoted,
        Reason::Superseded,
        Reason::IcmpTranslated,
        Reason::TtlExceeded,
    ];

    /// Stable names for counters shown to users.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Forwarded => "forwarded",
            Reason::Replied => "replied",
            Reason::NewFlow => "new_flow",
            Reason::NotSyn => "pass_not_syn",
            Reason::NoBackend => "drop_no_backend",
            Reason::SnatExhausted => "drop_snat_exhausted",
            Reason::FlowTableFull => "drop_flow_table_full",
            Reason::Truncated => "pass_truncated",
            Reason::BadHeader => "pass_bad_header",
            Reason::BadIpChecksum => "pass_bad_ip_checksum",
            Reason::Fragment => "pass_fragment",
            Reason::RewriteFailed => "drop_rewrite_failed",
            Reason::SockBalanced => "sock_balanced",
            Reason::SockNoBackend => "sock_refused_no_backend",
            Reason::SockRestored => "sock_restored",
            Reason::Returned => "returned",
            Reason::Promoted => "flow_established",
            Reason::Superseded => "pass_superseded",
            Reason::IcmpTranslated => "icmp_translated",
            Reason::TtlExceeded => "drop_ttl_exceeded",
        }
    }
}

pub const STATS_LEN: u32 = Reason::ALL.len() as u32;

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY (all): #[repr(C)] with explicit padding fields, so no implicit padding bytes,
    // and every bit pattern is a valid value.
    unsafe impl aya::Pod for NetnsEntry {}
    unsafe impl aya::Pod for LbConfig {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceEntry {}
    unsafe impl aya::Pod for ServiceState {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for Network {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for Embryo {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for SockTarget {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for TaskPort {}
    unsafe impl aya::Pod for LocalTaskKey {}
    unsafe impl aya::Pod for ReturnEntry {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    /// The layouts are an ABI between the eBPF object and the agent; a changed size means
    /// pinned maps from an older agent can no longer be adopted.
    #[test]
    fn map_layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<LbConfig>(), 16);
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceEntry>(), 8);
        assert_eq!(size_of::<ServiceState>(), 16);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<Backend>(), 12);
        assert_eq!(size_of::<Network>(), 12);
        assert_eq!(size_of::<LocalTaskKey>(), 8);
        assert_eq!(size_of::<FlowKey>(), 16);
        assert_eq!(size_of::<Flow>(), 40);
        assert_eq!(size_of::<Embryo>(), 48);
        assert_eq!(size_of::<SockKey>(), 16);
        assert_eq!(size_of::<SockTarget>(), 16);
        assert_eq!(size_of::<TrafficCounters>(), 32);
        assert_eq!(size_of::<NetnsEntry>(), 4);
        assert_eq!(size_of::<TaskPort>(), 12);
        assert_eq!(size_of::<ReturnEntry>(), 24);
    }

    #[test]
    fn each_cpu_counts_in_its_own_stripe_and_no_id_reaches_the_next() {
        assert_eq!(counter_slot(0, 5, 0), Some(0));
        assert_eq!(counter_slot(0, 5, 4), Some(4));
        assert_eq!(counter_slot(1, 5, 0), Some(5));
        assert_eq!(counter_slot(3, 5, 2), Some(17));
        // An id past the stripe would be another CPU's counters of another id.
        assert_eq!(counter_slot(0, 5, 5), None);
        assert_eq!(counter_slot(2, 5, u32::MAX), None);
        assert_eq!(counter_slot(u32::MAX, 5, 1), None);
        let mut seen = std::collections::BTreeSet::new();
        for cpu in 0..4 {
            for id in 0..5 {
                assert!(seen.insert(counter_slot(cpu, 5, id).unwrap()));
            }
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            (0..20).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_flow_partner_is_what_its_translated_packets_look_like_coming_back() {
        let client = FlowKey {
            src: [192, 0, 2, 100],
            dst: [192, 0, 2, 1],
            sport: 40000,
            dport: 8080,
            proto: IPPROTO_TCP,
            _pad: 0,
            _pad2: 0,
        };
        let forward = Flow {
            nat_src: [10, 0, 0, 1],
            nat_dst: [10, 0, 0, 11],
            nat_sport: 2000,
            nat_dport: 80,
            ..Default::default()
        };
        let reply = forward.partner(&client);
        assert_eq!(reply.src, [10, 0, 0, 11]);
        assert_eq!(reply.dst, [10, 0, 0, 1]);
        assert_eq!((reply.sport, reply.dport), (80, 2000));
    }

    #[test]
    fn reasons_index_the_stats_map_densely() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
