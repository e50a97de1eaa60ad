//! From the overlay: TC ingress on each network's VXLAN device, where other nodes send the
//! replies of client-address flows that came in through this node (task.rs sends them to
//! this node's bridge MAC, as to a router).
//!
//! ```text
//! parse ─ routed to this node? ─ yes ─ TCP/UDP with a reply entry ─ rewrite ─ redirect to the client
//!       │                        │   └ ICMP error about a flow ──── translate ─ redirect (icmp.rs)
//!       │                        └ no ─ pass
//!       └ not IPv4 TCP/UDP/ICMP, or malformed ─ pass (the tasks' own traffic, not counted)
//! ```
//!
//! Caught here, a reply leaves for the client before it reaches the bridge, instead of being
//! bridged up to this node and met again on the bridge's ingress. Task-to-task traffic is
//! addressed to tasks' own MACs and costs one parse. SNAT replies (addressed to this node's
//! address on the network, so not routed) still take the bridge.

use core::mem::MaybeUninit;

use aya_ebpf::programs::TcContext;

use crate::{
    icmp,
    ingress::{self, CONTINUE, ICMP, Packet, Verdict},
    programs::LB_CONFIG,
};

pub fn from_overlay(ctx: &TcContext) -> i32 {
    ingress::finish(classify(ctx))
}

#[inline(always)]
fn classify(ctx: &TcContext) -> Verdict {
    let Some(cfg) = LB_CONFIG.get(0) else {
        return Verdict::PASS;
    };
    let mut slot = MaybeUninit::uninit();
    let pkt = Packet::zeroed(&mut slot);
    let v = ingress::parse(ctx, cfg, pkt);
    if !pkt.routed_to() {
        return Verdict::PASS;
    }
    match v.action {
        ICMP => icmp::relay(ctx, pkt.l4),
        CONTINUE => ingress::reply(ctx, pkt),
        _ => Verdict::PASS,
    }
}
