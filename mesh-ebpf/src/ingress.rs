//! The routing mesh: TC ingress on the underlay interface and on every network bridge.
//!
//! ```text
//! parse ─┬─ to <node ip>:<published port> ── flow? ─ yes ─────────────── rewrite ─ redirect
//!        │                                      └─ no ─ new flow (SNAT) ─┘
//!        ├─ to a SNAT port with a reply entry ───────────────────────── rewrite ─ redirect
//!        └─ anything else ── pass untouched
//! ```
//!
//! Redirects use bpf_redirect_neigh: the rewritten packet leaves the target device with
//! fresh L2 addresses, bypassing the local input path (whose martian-source check would
//! drop a packet whose new source is one of our own addresses).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_csum_diff, bpf_redirect_neigh, bpf_skb_load_bytes},
    programs::TcContext,
};
use mesh_common::lb::{FLOW_REPLY, Flow, FlowKey, LbConfig, Reason, ServiceEntry};

use crate::{
    flow, nat,
    packet::{
        ETH_HLEN, ETH_P_IP, IP_MF_AND_OFFSET, IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr, TCP_ACK, TCP_SYN,
        TcpHdr, UdpHdr,
    },
    programs::LB_CONFIG,
    service,
    stats::{self, Traffic},
};

enum Verdict {
    /// Not ours: untouched, uncounted.
    Pass,
    /// Passed to the kernel, counted under a reason.
    PassCounted(Reason),
    Drop(Reason),
    /// Rewritten; the action bpf_redirect_neigh returned.
    Redirect(i32, Reason),
}

pub fn run(ctx: &TcContext) -> i32 {
    match classify(ctx) {
        Verdict::Pass => TC_ACT_OK as i32,
        Verdict::PassCounted(r) => {
            stats::count(r);
            TC_ACT_OK as i32
        }
        Verdict::Drop(r) => {
            stats::count(r);
            TC_ACT_SHOT as i32
        }
        Verdict::Redirect(action, r) => {
            stats::count(r);
            action
        }
    }
}

/// A parsed TCP or UDP over IPv4 packet.
struct Packet {
    key: FlowKey,
    /// Offset of the TCP/UDP header.
    l4: usize,
    /// IPv4 header length in bytes.
    ihl: usize,
    tcp_flags: u8,
}

fn classify(ctx: &TcContext) -> Verdict {
    let Some(cfg) = LB_CONFIG.get(0) else {
        return Verdict::Pass;
    };
    if u32::from_ne_bytes(cfg.node_ip) == 0 {
        return Verdict::Pass;
    }
    let pkt = match parse(ctx, cfg) {
        Ok(Some(p)) => p,
        Ok(None) => return Verdict::Pass,
        Err(v) => return v,
    };
    if pkt.key.dst == cfg.node_ip {
        return match service::published(pkt.key.proto, pkt.key.dport) {
            Some(svc) => forward(ctx, &pkt, &svc, cfg),
            None => Verdict::Pass,
        };
    }
    // Replies are addressed to a SNAT port: everything else skips the flow lookup.
    if pkt.key.dport >= cfg.snat_port_min
        && pkt.key.dport <= cfg.snat_port_max
        && let Some(entry) = flow::lookup(&pkt.key)
        // SAFETY: pointer into the flow table.
        && unsafe { (*entry).flags } & FLOW_REPLY != 0
    {
        return translate(ctx, &pkt, entry, Reason::Replied, false);
    }
    Verdict::Pass
}

/// Reads the headers. `Ok(None)` for traffic that is not TCP/UDP over IPv4; `Err` for
/// packets that claim to be but are malformed.
#[inline(always)]
fn parse(ctx: &TcContext, cfg: &LbConfig) -> Result<Option<Packet>, Verdict> {
    let Ok(ether_type) = ctx.load::<[u8; 2]>(12) else {
        return Ok(None);
    };
    if u16::from_be_bytes(ether_type) != ETH_P_IP {
        return Ok(None);
    }
    let ip: Ipv4Hdr = ctx
        .load(ETH_HLEN)
        .map_err(|_| Verdict::PassCounted(Reason::Truncated))?;
    if ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP {
        return Ok(None);
    }
    let ihl = usize::from(ip.version_ihl & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be_bytes(ip.tot_len));
    // A total length beyond what arrived is as malformed as a header length below 20.
    if ip.version_ihl >> 4 != 4
        || ihl < 20
        || tot_len < ihl
        || ETH_HLEN + tot_len > ctx.len() as usize
    {
        return Err(Verdict::PassCounted(Reason::BadHeader));
    }
    if u16::from_be_bytes(ip.frag_off) & IP_MF_AND_OFFSET != 0 {
        // Only the first fragment has ports; rewriting it alone would orphan the rest, so
        // fragments go to the kernel. Large UDP datagrams need reassembly the routing mesh
        // does not do.
        return Err(if ip.daddr == cfg.node_ip {
            Verdict::PassCounted(Reason::Fragment)
        } else {
            Verdict::Pass
        });
    }
    let l4 = ETH_HLEN + ihl;
    let (sport, dport, tcp_flags) = if ip.protocol == IPPROTO_TCP {
        let tcp: TcpHdr = ctx
            .load(l4)
            .map_err(|_| Verdict::PassCounted(Reason::Truncated))?;
        let doff = usize::from(tcp.doff >> 4) * 4;
        if doff < 20 || ihl + doff > tot_len {
            return Err(Verdict::PassCounted(Reason::BadHeader));
        }
        (tcp.source, tcp.dest, tcp.flags)
    } else {
        let udp: UdpHdr = ctx
            .load(l4)
            .map_err(|_| Verdict::PassCounted(Reason::Truncated))?;
        let len = usize::from(u16::from_be_bytes(udp.len));
        if len < 8 || ihl + len > tot_len {
            return Err(Verdict::PassCounted(Reason::BadHeader));
        }
        (udp.source, udp.dest, 0)
    };
    Ok(Some(Packet {
        key: FlowKey {
            src: ip.saddr,
            dst: ip.daddr,
            sport: u16::from_be_bytes(sport),
            dport: u16::from_be_bytes(dport),
            proto: ip.protocol,
            _pad: [0; 3],
        },
        l4,
        ihl,
        tcp_flags,
    }))
}

/// A packet to a published port: an existing flow, or a new one.
#[inline(always)]
fn forward(ctx: &TcContext, pkt: &Packet, svc: &ServiceEntry, cfg: &LbConfig) -> Verdict {
    let tcp = pkt.key.proto == IPPROTO_TCP;
    let syn_only = tcp && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if let Some(entry) = flow::lookup(&pkt.key) {
        if !(syn_only && flow::is_closing(entry)) {
            return translate(ctx, pkt, entry, Reason::Forwarded, false);
        }
        // The client reuses the port of a finished connection: start over.
        flow::forget(&pkt.key);
    }
    if tcp && !syn_only {
        // Mid-connection packet with no flow (evicted, or never ours): the kernel has no
        // socket on the published port and answers RST, which tells the client quickly.
        return Verdict::PassCounted(Reason::NotSyn);
    }
    // Malformed packets must not create state.
    if !ip_checksum_ok(ctx, pkt.ihl) {
        return Verdict::PassCounted(Reason::BadIpChecksum);
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
            Verdict::Drop(r)
        }
    }
}

#[inline(always)]
fn translate(ctx: &TcContext, pkt: &Packet, entry: *mut Flow, r: Reason, new: bool) -> Verdict {
    flow::touch(entry, pkt.key.proto, pkt.tcp_flags, flow::now());
    // SAFETY: pointer into the flow table; copied so the rewrite works on a stable value.
    let f = unsafe { *entry };
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
    if nat::rewrite(ctx, pkt.l4, &pkt.key, f).is_err() {
        return Verdict::Drop(Reason::RewriteFailed);
    }
    stats::traffic(f.service, f.backend, Traffic::Packet { bytes, new_flow });
    // SAFETY: no neighbour parameters: the helper looks up the route and the neighbour of
    // the (rewritten) destination on the target device.
    let action = unsafe { bpf_redirect_neigh(f.ifindex, core::ptr::null_mut(), 0, 0) };
    Verdict::Redirect(action as i32, r)
}

/// Whether the IPv4 header (with options) sums to 0xffff.
#[inline(always)]
fn ip_checksum_ok(ctx: &TcContext, ihl: usize) -> bool {
    let mut words = [0u32; 15];
    let len = (ihl & 0x3c) as u32;
    if len < 20 {
        return false;
    }
    // SAFETY: `words` is 60 bytes and `len` at most 60.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            ETH_HLEN as u32,
            words.as_mut_ptr().cast(),
            len,
        )
    };
    if loaded != 0 {
        return false;
    }
    // SAFETY: as above.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, words.as_mut_ptr(), len, 0) };
    if sum < 0 {
        return false;
    }
    let mut s = sum as u64;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s == 0xffff
}
