//! Map declarations and program entry points. Each entry point hands the packet to a
//! pipeline in a domain module and turns its result into one verdict at the boundary.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// The BPF target has no stable inline assembly; the nested eBPF build already runs with
// RUSTC_BOOTSTRAP=1 (for -Z build-std), see atomic.rs for why it is needed.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod atomic;
#[cfg(target_arch = "bpf")]
mod clock;
#[cfg(target_arch = "bpf")]
mod flow;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod ingress;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod overlay;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod path;
#[cfg(target_arch = "bpf")]
mod returns;
#[cfg(target_arch = "bpf")]
mod service;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod stats;
#[cfg(target_arch = "bpf")]
mod task;
#[cfg(target_arch = "bpf")]
mod underlay;
#[cfg(target_arch = "bpf")]
mod verdict;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{BPF_F_MMAPABLE, xdp_action},
        macros::{cgroup_sock_addr, classifier, map, xdp},
        maps::{Array, HashMap, LruHashMap, PerCpuArray},
        programs::{SockAddrContext, TcContext, XdpContext},
    };
    use mesh_common::{
        lb::{
            Backend, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_EMBRYOS, DEFAULT_MAX_FLOWS,
            DEFAULT_MAX_RETURNS, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SNAT_RESERVATIONS,
            DEFAULT_MAX_SOCKETS, Embryo, Flow, FlowKey, LbConfig, LocalTaskKey, MAX_NETNS,
            MAX_TASK_PORTS, NetnsEntry, Network, ReturnEntry, STATS_LEN, ServiceEntry, ServiceKey,
            ServiceState, SlotKey, SockKey, SockTarget, TaskPort, TrafficCounters,
        },
        stats::{PORT_COUNTERS_LEN, PortCounter},
    };

    #[map(name = "PORT_COUNTERS")]
    pub static PORT_COUNTERS: PerCpuArray<PortCounter> = PerCpuArray::pinned(PORT_COUNTERS_LEN, 0);

    // Load balancer maps (layouts and roles in mesh_common::lb). Sizes here are defaults;
    // the agent sets them at load time. Id-indexed arrays have one extra entry: id 0 is
    // never allocated.
    #[map(name = "LB_CONFIG")]
    pub static LB_CONFIG: Array<LbConfig> = Array::pinned(1, 0);
    #[map(name = "LB_SERVICES")]
    pub static LB_SERVICES: HashMap<ServiceKey, ServiceEntry> =
        HashMap::pinned(4 * DEFAULT_MAX_SERVICES, 0);
    #[map(name = "LB_SVC_STATE")]
    pub static LB_SVC_STATE: Array<ServiceState> = Array::pinned(DEFAULT_MAX_SERVICES + 1, 0);
    #[map(name = "LB_SLOTS")]
    pub static LB_SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(DEFAULT_MAX_BACKENDS, 0);
    #[map(name = "LB_BACKENDS")]
    pub static LB_BACKENDS: Array<Backend> = Array::pinned(DEFAULT_MAX_BACKENDS + 1, 0);
    #[map(name = "LB_NETWORKS")]
    pub static LB_NETWORKS: HashMap<u32, Network> = HashMap::pinned(4096, 0);
    #[map(name = "LB_RR")]
    pub static LB_RR: Array<u64> = Array::pinned(DEFAULT_MAX_SERVICES + 1, 0);
    #[map(name = "LB_FLOWS")]
    pub static LB_FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(DEFAULT_MAX_FLOWS, 0);
    /// New flows until their client answers the backend (see flow.rs): a separate LRU, so
    /// what a flood evicts is other embryonic flows and never an established one.
    #[map(name = "LB_EMBRYOS")]
    pub static LB_EMBRYOS: LruHashMap<FlowKey, Embryo> = LruHashMap::pinned(DEFAULT_MAX_EMBRYOS, 0);
    /// SNAT ports of recently closed flows, per backend (see flow.rs).
    #[map(name = "LB_SNAT_RESERVED")]
    pub static LB_SNAT_RESERVED: LruHashMap<FlowKey, u64> =
        LruHashMap::pinned(DEFAULT_MAX_SNAT_RESERVATIONS, 0);
    #[map(name = "LB_SOCK_FWD")]
    pub static LB_SOCK_FWD: LruHashMap<SockKey, SockTarget> =
        LruHashMap::pinned(DEFAULT_MAX_SOCKETS, 0);
    #[map(name = "LB_SOCK_REV")]
    pub static LB_SOCK_REV: LruHashMap<SockKey, SockTarget> =
        LruHashMap::pinned(DEFAULT_MAX_SOCKETS, 0);
    /// Traffic counters: a stripe of ids per CPU (mesh_common::lb::counter_slot), sized by
    /// the agent to (ids + 1) × CPUs, the stripe length in the global below.
    #[map(name = "LB_SVC_COUNTERS")]
    pub static LB_SVC_COUNTERS: Array<TrafficCounters> =
        Array::pinned(DEFAULT_MAX_SERVICES + 1, BPF_F_MMAPABLE);
    #[map(name = "LB_BE_COUNTERS")]
    pub static LB_BE_COUNTERS: Array<TrafficCounters> =
        Array::pinned(DEFAULT_MAX_BACKENDS + 1, BPF_F_MMAPABLE);
    /// Read-only after load (the verifier then knows the value); read with read_volatile,
    /// or LLVM folds in this default.
    #[unsafe(no_mangle)]
    pub static LB_SVC_COUNTER_STRIDE: u32 = DEFAULT_MAX_SERVICES + 1;
    #[unsafe(no_mangle)]
    pub static LB_BE_COUNTER_STRIDE: u32 = DEFAULT_MAX_BACKENDS + 1;
    /// This CPU's coarse clock and the tick it was read at (see clock.rs): a cache, so not
    /// pinned.
    #[map(name = "LB_CLOCK")]
    pub static LB_CLOCK: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);
    #[map(name = "LB_STATS")]
    pub static LB_STATS: PerCpuArray<u64> = PerCpuArray::pinned(STATS_LEN, 0);

    /// Namespaces whose sockets this node's socket hooks act on (see mesh_common::lb).
    #[map(name = "LB_NETNS")]
    pub static LB_NETNS: HashMap<u64, NetnsEntry> = HashMap::pinned(MAX_NETNS, 0);

    /// A local task's host veth on an overlay network → what its programs need to know.
    #[map(name = "LB_TASK_PORTS")]
    pub static LB_TASK_PORTS: HashMap<u32, TaskPort> = HashMap::pinned(MAX_TASK_PORTS, 0);
    /// A local task's address on a network → its host veth there (the same ports).
    #[map(name = "LB_LOCAL_TASKS")]
    pub static LB_LOCAL_TASKS: HashMap<LocalTaskKey, u32> = HashMap::pinned(MAX_TASK_PORTS, 0);
    /// A network's VXLAN device → the network (the LB_NETWORKS key).
    #[map(name = "LB_OVERLAYS")]
    pub static LB_OVERLAYS: HashMap<u32, u32> = HashMap::pinned(4096, 0);
    /// Client-address connections of local tasks → the node their replies go back to.
    #[map(name = "LB_RETURNS")]
    pub static LB_RETURNS: LruHashMap<FlowKey, ReturnEntry> =
        LruHashMap::pinned(DEFAULT_MAX_RETURNS, 0);

    /// Task namespace → port of its resolver listener (see mesh_common::dns).
    #[map(name = "RESOLVERS")]
    pub static RESOLVERS: HashMap<u64, u16> = HashMap::pinned(mesh_common::dns::MAX_RESOLVERS, 0);

    /// XDP on a node's underlay interface.
    #[xdp]
    pub fn mesh_underlay(ctx: XdpContext) -> u32 {
        // Counting never decides a verdict: anything we cannot parse is passed to the stack.
        let _ = crate::underlay::count(&ctx);
        xdp_action::XDP_PASS
    }

    /// TC ingress on the underlay interface and on every network's bridge: published ports
    /// (routing mesh) toward backends, and their replies back to clients.
    #[classifier]
    pub fn mesh_lb_ingress(ctx: TcContext) -> i32 {
        crate::ingress::run(&ctx)
    }

    /// TC ingress on every network's VXLAN device: replies of client-address flows that
    /// came in through this node, sent back by the backends' nodes.
    #[classifier]
    pub fn mesh_from_overlay(ctx: TcContext) -> i32 {
        crate::overlay::from_overlay(&ctx)
    }

    /// TC egress on a local task's host veth on an overlay network: learns which node a
    /// client-address connection came through.
    #[classifier]
    pub fn mesh_to_task(ctx: TcContext) -> i32 {
        crate::task::to_task(&ctx)
    }

    /// TC ingress on a local task's host veths: replies of client-address connections go
    /// back through the node the connection came in by.
    #[classifier]
    pub fn mesh_from_task(ctx: TcContext) -> i32 {
        crate::task::from_task(&ctx)
    }

    /// connect() to a VIP or a published port: pick the backend before the socket exists.
    #[cgroup_sock_addr(connect4)]
    pub fn mesh_lb_connect(ctx: SockAddrContext) -> i32 {
        crate::sock::connect4(&ctx)
    }

    /// sendmsg() on unconnected UDP sockets.
    #[cgroup_sock_addr(sendmsg4)]
    pub fn mesh_lb_sendmsg(ctx: SockAddrContext) -> i32 {
        crate::sock::sendmsg4(&ctx)
    }

    /// recvmsg() on UDP: show the service address as the source, not the backend.
    #[cgroup_sock_addr(recvmsg4)]
    pub fn mesh_lb_recvmsg(ctx: SockAddrContext) -> i32 {
        crate::sock::restore(&ctx)
    }

    /// getpeername(): the peer is the service address the application connected to.
    #[cgroup_sock_addr(getpeername4)]
    pub fn mesh_lb_peer(ctx: SockAddrContext) -> i32 {
        crate::sock::restore(&ctx)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("mesh-ebpf holds eBPF programs; mesh-agent builds and loads them.");
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
