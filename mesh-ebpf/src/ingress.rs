//! The routing mesh: TC ingress on the underlay interface and on every network bridge.
//!
//! ```text
//! parse ─┬─ to <node ip> ── flow? ─ yes ──────────────────────────────── rewrite ─ redirect
//!        │                    └─ no ─ published port? ─ yes ─ new flow ─┘
//!        │                                             └─ no ─ pass
//!        ├─ to a SNAT port, or routed through us, with a reply entry ── rewrite ─ redirect
//!        └─ anything else ── pass untouched
//! ```
//!
//! SNAT replies of this node's tasks and of other nodes' tasks are normally caught before
//! they reach the bridge (on the task's veth, task.rs; on the VXLAN device, overlay.rs); the
//! bridge's copy of this program is where the rest still meet their flow.
//!
//! A TCP SYN asks the service table first (it starts a connection: a retransmitted one finds
//! its flow there, a reused 5-tuple replaces a finished one); every other packet to the node
//! asks the flow table first, so an established flow costs one lookup.
//!
//! "Routed through us": the frame is addressed to this node's MAC but its IP destination is
//! another host's (overlay MACs are derived from addresses, so that takes no lookup). That is
//! how replies of client-address flows come back from the backends' nodes (see task.rs).
//!
//! Redirects bypass the local input path (whose martian-source check would drop a packet
//! whose new source is one of our own addresses) and take the shortest way out (path.rs).

use core::{mem::MaybeUninit, ptr::write_volatile};

use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_skb_load_bytes},
    programs::TcContext,
};
use mesh_common::lb::{
    FLOW_EMBRYO, FLOW_REPLY, Flow, FlowKey, LbConfig, Reason, ServiceEntry, VXLAN_PORT, mac_for_ip,
};

use crate::{
    flow, icmp, nat,
    packet::{
        ETH_HLEN, ETH_P_IP, EthHdr, IP_MF_AND_OFFSET, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
        Ipv4Hdr, TCP_ACK, TCP_SYN, TcpHdr, UdpHdr, pull_headers, read_mac, skb_ptr,
    },
    path,
    programs::LB_CONFIG,
    service,
    stats::{self, Traffic},
    verdict::{self, UNCOUNTED, Verdict},
};

/// `Verdict::action` while parsing: the packet is TCP/UDP over IPv4, go on.
pub(crate) const CONTINUE: i32 = -1;
const CONTINUE_VERDICT: Verdict = Verdict {
    action: CONTINUE,
    reason: UNCOUNTED,
};

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    verdict::finish(classify(ctx))
}

/// A parsed TCP or UDP over IPv4 packet.
pub(crate) struct Packet {
    pub key: FlowKey,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    /// IPv4 header length in bytes.
    pub ihl: usize,
    pub tcp_flags: u8,
    pub ttl: u8,
    _pad: u16,
    /// TCP sequence and acknowledgement numbers (host order): for handshakes of new flows.
    pub seq: u32,
    pub ack: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

impl Packet {
    /// A packet with every field zero, written in place in `slot` field by field with
    /// volatile stores: LLVM would merge the plain stores of a `Default` (or the copy of a
    /// returned value) into a memset, which the BPF backend turns into a call to a loop over
    /// bytes, on every packet.
    #[inline(always)]
    pub fn zeroed(slot: &mut MaybeUninit<Self>) -> &mut Self {
        let q = slot.as_mut_ptr();
        // SAFETY: every field is written before the reference is made; the struct has no
        // padding (checked below), so no byte of it stays uninitialized.
        unsafe {
            write_volatile(&raw mut (*q).key.src, [0; 4]);
            write_volatile(&raw mut (*q).key.dst, [0; 4]);
            write_volatile(&raw mut (*q).key.sport, 0);
            write_volatile(&raw mut (*q).key.dport, 0);
            write_volatile(&raw mut (*q).key.proto, 0);
            write_volatile(&raw mut (*q).key._pad, 0);
            write_volatile(&raw mut (*q).key._pad2, 0);
            write_volatile(&raw mut (*q).l4, 0);
            write_volatile(&raw mut (*q).ihl, 0);
            write_volatile(&raw mut (*q).tcp_flags, 0);
            write_volatile(&raw mut (*q).ttl, 0);
            write_volatile(&raw mut (*q)._pad, 0);
            write_volatile(&raw mut (*q).seq, 0);
            write_volatile(&raw mut (*q).ack, 0);
            // Arrays byte by byte: a volatile array store is a memset too.
            let src = (&raw mut (*q).src_mac).cast::<u8>();
            let dst = (&raw mut (*q).dst_mac).cast::<u8>();
            for i in 0..6 {
                write_volatile(src.add(i), 0);
                write_volatile(dst.add(i), 0);
            }
            slot.assume_init_mut()
        }
    }

    /// Whether the frame was sent to a router rather than to its IP destination: its
    /// Ethernet destination is not the overlay MAC of that address.
    #[inline(always)]
    pub fn routed_to(&self) -> bool {
        self.dst_mac != mac_for_ip(self.key.dst)
    }

    /// Whether a router put the frame on the network: its Ethernet source is not the
    /// overlay MAC of its source address.
    #[inline(always)]
    pub fn routed_from(&self) -> bool {
        self.src_mac != mac_for_ip(self.key.src)
    }

    /// A TCP SYN without ACK: the first packet of a connection.
    #[inline(always)]
    pub fn syn_only(&self) -> bool {
        self.key.proto == IPPROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

#[inline(always)]
fn classify(ctx: &TcContext) -> Verdict {
    let Some(cfg) = LB_CONFIG.get(0) else {
        return Verdict::PASS;
    };
    if u32::from_ne_bytes(cfg.node_ip) == 0 {
        return Verdict::PASS;
    }
    let mut slot = MaybeUninit::uninit();
    let pkt = Packet::zeroed(&mut slot);
    let v = parse(ctx, cfg, pkt);
    if v.action == ICMP {
        return icmp::relay(ctx, pkt.l4);
    }
    if v.action != CONTINUE {
        return v;
    }
    if pkt.key.dst == cfg.node_ip {
        if pkt.key.proto == IPPROTO_UDP && pkt.key.dport == VXLAN_PORT {
            // The overlay's own packets (the agent refuses to publish its port): most of
            // what the underlay carries between nodes, so they skip both lookups.
            return Verdict::PASS;
        }
        return to_node(ctx, pkt, cfg);
    }
    // Replies are addressed to a SNAT port (SNAT flows) or routed through this node
    // (client-address flows): everything else skips the flow lookup.
    if to_snat_port(pkt, cfg) || pkt.routed_to() {
        return reply(ctx, pkt);
    }
    Verdict::PASS
}

/// Whether the packet is addressed to a port of the SNAT range: it may be a backend's reply
/// to a SNAT flow (if its destination is this node's address on its network).
#[inline(always)]
pub(crate) fn to_snat_port(pkt: &Packet, cfg: &LbConfig) -> bool {
    pkt.key.dport >= cfg.snat_port_min && pkt.key.dport <= cfg.snat_port_max
}

/// A packet that may be a backend's reply: translated back if its flow has a reply entry,
/// else passed untouched.
#[inline(always)]
pub(crate) fn reply(ctx: &TcContext, pkt: &Packet) -> Verdict {
    let Some(entry) = flow::lookup(&pkt.key) else {
        return Verdict::PASS;
    };
    // SAFETY: pointer into the flow table.
    if unsafe { (*entry).flags } & FLOW_REPLY == 0 {
        return Verdict::PASS;
    }
    if superseded(pkt, entry) {
        flow::forget(&pkt.key, entry);
        return Verdict::pass(Reason::Superseded);
    }
    translate(ctx, pkt, entry, Reason::Replied, false)
}

/// A packet to the node's address. One that continues a flow is translated on its flow
/// entry alone, before the service table is read: the flow outlives what it was created
/// for (a removed port or service drains its established connections, as a task's removal
/// does), and an established packet then costs one lookup. Only a TCP SYN skips it: it starts
/// a new connection (a published port's flow or the node's own listener, which pays nothing
/// for the routing mesh). Without a flow, a published port starts one and anything else is
/// the kernel's: it has no socket at a published port's old number and refuses.
#[inline(always)]
fn to_node(ctx: &TcContext, pkt: &Packet, cfg: &LbConfig) -> Verdict {
    let mut svc = None;
    if let Some(entry) = node_flow(pkt, &mut svc) {
        return translate(ctx, pkt, entry, Reason::Forwarded, false);
    }
    match svc {
        Some(svc) => new_flow(ctx, pkt, &svc, cfg),
        None => Verdict::PASS,
    }
}

/// The flow a packet to the node continues, if any; else `svc` is the service of its
/// published port, if any (one place for both, so the program has one translation and one
/// flow creation on this path).
#[inline(always)]
fn node_flow(pkt: &Packet, svc: &mut Option<ServiceEntry>) -> Option<*mut Flow> {
    let syn_only = pkt.syn_only();
    if !syn_only {
        match flow::lookup(&pkt.key) {
            // SAFETY: pointer into the flow table.
            Some(entry) if unsafe { (*entry).flags } & FLOW_REPLY == 0 => return Some(entry),
            // A reply entry keyed to the node's own address is not one the routing mesh
            // makes (SNAT ports are on network addresses): the service decides, as for a
            // SYN.
            Some(_) => {}
            None => {
                *svc = service::published(pkt.key.proto, pkt.key.dport);
                return None;
            }
        }
    }
    *svc = service::published(pkt.key.proto, pkt.key.dport);
    svc.as_ref()?;
    let entry = flow::lookup(&pkt.key)?;
    if syn_only && flow::is_finished(&pkt.key, entry) {
        // The client reuses the port of a finished connection: start over.
        flow::forget(&pkt.key, entry);
        return None;
    }
    Some(entry)
}

/// Whether a task's packet routed through this node answers a new connection the routing
/// mesh never saw, on the 5-tuple of the finished client-address flow whose reply entry is
/// `entry`: a SYN-ACK on it. A new connection through the mesh would have replaced the
/// entry (`forward` forgets a finished flow on its SYN), so this one reached the task
/// another way (the client dialled it directly, or through another DNAT) and its replies
/// must keep their own addresses.
#[inline(always)]
fn superseded(pkt: &Packet, entry: *const Flow) -> bool {
    pkt.key.proto == IPPROTO_TCP
        && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
        // SAFETY: pointer into the flow table.
        && flow::keeps_client_address(&pkt.key, unsafe { &*entry })
        && flow::is_finished(&pkt.key, entry)
}

/// Fills `pkt` from the headers and returns `CONTINUE_VERDICT` for TCP/UDP over IPv4;
/// otherwise what to do with the packet (untouched when it is not ours, counted when it is
/// malformed).
#[inline(always)]
pub(crate) fn parse(ctx: &TcContext, cfg: &LbConfig, pkt: &mut Packet) -> Verdict {
    let v = parse_linear(ctx, cfg, pkt);
    if v.action == SHORT && pull_headers(ctx) {
        let v = parse_linear(ctx, cfg, pkt);
        if v.action != SHORT {
            return v;
        }
    } else if v.action != SHORT {
        return v;
    }
    Verdict::pass(Reason::Truncated)
}

// Packet::zeroed() writes every field: there must be no padding between them.
const _: () = assert!(
    core::mem::size_of::<Packet>()
        == core::mem::size_of::<FlowKey>() + 2 * core::mem::size_of::<usize>() + 4 + 8 + 12
);

/// `Verdict::action` from parse: an unfragmented ICMP packet (`Packet::l4` is its ICMP
/// header; no ports).
pub(crate) const ICMP: i32 = -3;
const ICMP_VERDICT: Verdict = Verdict {
    action: ICMP,
    reason: UNCOUNTED,
};

/// `Verdict::action` from parse_linear: a header did not fit in the skb's linear part.
const SHORT: i32 = -2;
const SHORT_VERDICT: Verdict = Verdict {
    action: SHORT,
    reason: UNCOUNTED,
};

#[inline(always)]
fn parse_linear(ctx: &TcContext, cfg: &LbConfig, pkt: &mut Packet) -> Verdict {
    let Some(eth) = skb_ptr::<EthHdr>(ctx, 0) else {
        return SHORT_VERDICT;
    };
    // SAFETY (all reads below): bounds-checked pointers into the packet.
    if u16::from_be_bytes(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Verdict::PASS;
    }
    // SAFETY: as above.
    unsafe {
        pkt.src_mac = read_mac(&(*eth).src);
        pkt.dst_mac = read_mac(&(*eth).dst);
    }
    let Some(ip) = skb_ptr::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return SHORT_VERDICT;
    };
    let ip: Ipv4Hdr = unsafe { *ip };
    let icmp = ip.protocol == IPPROTO_ICMP;
    if ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP && !icmp {
        return Verdict::PASS;
    }
    let ihl = usize::from(ip.version_ihl & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be_bytes(ip.tot_len));
    // A total length beyond what arrived is as malformed as a header length below 20.
    if ip.version_ihl >> 4 != 4
        || ihl < 20
        || tot_len < ihl
        || ETH_HLEN + tot_len > ctx.len() as usize
    {
        // Malformed ICMP is the kernel's to drop, not ours to count.
        return if icmp {
            Verdict::PASS
        } else {
            Verdict::pass(Reason::BadHeader)
        };
    }
    let l4 = ETH_HLEN + ihl;
    pkt.key.src = ip.saddr;
    pkt.key.dst = ip.daddr;
    pkt.key.proto = ip.protocol;
    pkt.ttl = ip.ttl;
    pkt.l4 = l4;
    pkt.ihl = ihl;
    let fragment = u16::from_be_bytes(ip.frag_off) & IP_MF_AND_OFFSET != 0;
    if icmp {
        return if fragment {
            Verdict::PASS
        } else {
            ICMP_VERDICT
        };
    }
    if fragment {
        // Only the first fragment has ports; rewriting it alone would orphan the rest, so
        // fragments go to the kernel. Large UDP datagrams need reassembly the routing mesh
        // does not do.
        return if ip.daddr == cfg.node_ip {
            Verdict::pass(Reason::Fragment)
        } else {
            Verdict::PASS
        };
    }
    if ip.protocol == IPPROTO_TCP {
        if ihl + 20 > tot_len {
            return Verdict::pass(Reason::Truncated);
        }
        let Some(tcp) = skb_ptr::<TcpHdr>(ctx, l4) else {
            return SHORT_VERDICT;
        };
        let tcp: TcpHdr = unsafe { *tcp };
        let doff = usize::from(tcp.doff >> 4) * 4;
        if doff < 20 || ihl + doff > tot_len {
            return Verdict::pass(Reason::BadHeader);
        }
        pkt.key.sport = u16::from_be_bytes(tcp.source);
        pkt.key.dport = u16::from_be_bytes(tcp.dest);
        pkt.tcp_flags = tcp.flags;
        pkt.seq = u32::from_be_bytes(tcp.seq);
        pkt.ack = u32::from_be_bytes(tcp.ack_seq);
    } else {
        if ihl + 8 > tot_len {
            return Verdict::pass(Reason::Truncated);
        }
        let Some(udp) = skb_ptr::<UdpHdr>(ctx, l4) else {
            return SHORT_VERDICT;
        };
        let udp: UdpHdr = unsafe { *udp };
        let len = usize::from(u16::from_be_bytes(udp.len));
        if len < 8 || ihl + len > tot_len {
            return Verdict::pass(Reason::BadHeader);
        }
        pkt.key.sport = u16::from_be_bytes(udp.source);
        pkt.key.dport = u16::from_be_bytes(udp.dest);
    }
    CONTINUE_VERDICT
}

/// A packet to a published port that no flow knows: the first of a new flow, or refused.
#[inline(always)]
fn new_flow(ctx: &TcContext, pkt: &Packet, svc: &ServiceEntry, cfg: &LbConfig) -> Verdict {
    if pkt.key.proto == IPPROTO_TCP && !pkt.syn_only() {
        // Mid-connection packet with no flow (evicted, or never ours): the kernel has no
        // socket on the published port and answers RST, which tells the client quickly.
        return Verdict::pass(Reason::NotSyn);
    }
    // Malformed packets must not create state.
    if !ip_checksum_ok(ctx, pkt.ihl) {
        return Verdict::pass(Reason::BadIpChecksum);
    }
    // SAFETY: reading the ifindex field of our own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let now = flow::now();
    match flow::create(&pkt.key, svc, ifindex, cfg, now) {
        Ok(created) => {
            stats::count(Reason::NewFlow);
            rewrite_and_redirect(ctx, pkt, &created, Reason::Forwarded, true)
        }
        Err(r) => {
            if r == Reason::NoBackend {
                stats::traffic(svc.service, 0, Traffic::Dropped);
            }
            Verdict::drop(r)
        }
    }
}

#[inline(always)]
pub(crate) fn translate(
    ctx: &TcContext,
    pkt: &Packet,
    entry: *mut Flow,
    r: Reason,
    new: bool,
) -> Verdict {
    flow::touch(entry, pkt.key.proto, pkt.tcp_flags, flow::now());
    // SAFETY: pointer into the flow table; copied so the rewrite works on a stable value
    // (and before a promotion deletes the embryo it points into).
    let f = unsafe { *entry };
    if f.flags & FLOW_EMBRYO != 0 {
        let seen = flow::Seen {
            tcp_flags: pkt.tcp_flags,
            seq: pkt.seq,
            ack: pkt.ack,
        };
        flow::handshake(&pkt.key, &seen);
    }
    rewrite_and_redirect(ctx, pkt, &f, r, new)
}

#[inline(always)]
fn rewrite_and_redirect(
    ctx: &TcContext,
    pkt: &Packet,
    f: &Flow,
    r: Reason,
    new_flow: bool,
) -> Verdict {
    let bytes = u64::from(ctx.len());
    if pkt.ttl <= 1 {
        return Verdict::drop(Reason::TtlExceeded);
    }
    if nat::forward(ctx, pkt.l4, &pkt.key, f, pkt.ttl).is_err() {
        return Verdict::drop(Reason::RewriteFailed);
    }
    stats::traffic(f.service, f.backend, Traffic::Packet { bytes, new_flow });
    let action = path::send(ctx, &pkt.key, f, pkt.tcp_flags);
    Verdict::redirect(action, r)
}

/// Whether the IPv4 header (with options) sums to 0xffff.
#[inline(always)]
fn ip_checksum_ok(ctx: &TcContext, ihl: usize) -> bool {
    // Uninitialized: the helper writes the `len` bytes the sum reads (a zeroed array would
    // cost a call to the BPF memset on every new flow).
    let mut words = MaybeUninit::<[u32; 15]>::uninit();
    let words = words.as_mut_ptr().cast::<u32>();
    let len = (ihl & 0x3c) as u32;
    if len < 20 {
        return false;
    }
    // SAFETY: `words` is 60 bytes and `len` at most 60.
    let loaded =
        unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), ETH_HLEN as u32, words.cast(), len) };
    if loaded != 0 {
        return false;
    }
    // SAFETY: as above.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, words, len, 0) };
    if sum < 0 {
        return false;
    }
    // The helper's sum is 32 bits wide: folded and complemented, a valid header gives 0.
    nat::fold(sum as u32) == 0
}
