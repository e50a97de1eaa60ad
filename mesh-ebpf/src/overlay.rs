//! From the overlay: TC ingress on each network's VXLAN device, where other nodes send this
//! node's tasks the packets they routed onto the network (routing-mesh flows that came in
//! there), and send back the replies of client-address flows that came in here (task.rs
//! sends them to this node's bridge MAC, as to a router).
//!
//! ```text
//! parse ─┬─ routed to this node? ─ yes ─ TCP/UDP with a reply entry ─ rewrite ─ redirect to the client
//!        │                        │   └ ICMP error about a flow ──── translate ─ redirect (icmp.rs)
//!        │                        └ no ─ pass
//!        ├─ routed by another node, to a task here ─ learn the return ─ redirect_peer into the task
//!        ├─ to this node's address, a SNAT port, with a reply entry ─ rewrite ─ redirect to the client
//!        └─ anything else (tasks' own traffic; not IPv4 TCP/UDP/ICMP, or malformed) ─ pass, uncounted
//! ```
//!
//! Caught here, a reply leaves for the client before it reaches the bridge, instead of being
//! bridged up to this node and met again on the bridge's ingress; and a routed packet for a
//! local task enters its namespace without the bridge (nor, where br_netfilter is loaded,
//! the bridge's pass through netfilter), as on the node that routed it (path.rs). Its return
//! is learned here, as the task's veth would have (task.rs). Task-to-task traffic is
//! addressed from tasks' own MACs, keeps the bridge and costs one parse (and, to a port in
//! the SNAT range, two lookups in small tables). A SNAT reply is addressed to this node's
//! address on the network: it meets its flow here and leaves without the bridge too.

use core::mem::MaybeUninit;

use aya_ebpf::{helpers::bpf_redirect_peer, programs::TcContext};
use mesh_common::lb::LocalTaskKey;

use crate::{
    icmp,
    ingress::{self, CONTINUE, ICMP, Packet},
    programs::{LB_CONFIG, LB_LOCAL_TASKS, LB_NETWORKS, LB_OVERLAYS, LB_TASK_PORTS},
    task,
    verdict::{self, Verdict},
};

pub fn from_overlay(ctx: &TcContext) -> i32 {
    verdict::finish(classify(ctx))
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
        if v.action == CONTINUE {
            if pkt.routed_from() {
                return into_task(ctx, pkt);
            }
            if ingress::to_snat_port(pkt, cfg) && to_this_node(ctx, pkt) {
                return ingress::reply(ctx, pkt);
            }
        }
        return Verdict::PASS;
    }
    match v.action {
        ICMP => icmp::relay(ctx, pkt.l4),
        CONTINUE => ingress::reply(ctx, pkt),
        _ => Verdict::PASS,
    }
}

/// Whether the packet is addressed to this node's own address on the VXLAN device's
/// network: where another node's task sends its replies to SNAT flows.
#[inline(always)]
fn to_this_node(ctx: &TcContext, pkt: &Packet) -> bool {
    // SAFETY: reading the ifindex field of our own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY (both lookups): plain data copied out.
    let Some(network) = (unsafe { LB_OVERLAYS.get(&ifindex) }).copied() else {
        return false;
    };
    (unsafe { LB_NETWORKS.get(&network) }).is_some_and(|n| n.node_addr == pkt.key.dst)
}

/// A packet another node routed to one of this node's tasks: straight into the task, once
/// its return is learned. Anything this node does not know (the network, the task, its
/// port) takes the bridge, as before.
#[inline(always)]
fn into_task(ctx: &TcContext, pkt: &Packet) -> Verdict {
    // SAFETY: reading the ifindex field of our own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY (all three lookups): plain data copied out.
    let Some(network) = (unsafe { LB_OVERLAYS.get(&ifindex) }).copied() else {
        return Verdict::PASS;
    };
    let key = LocalTaskKey {
        network,
        addr: pkt.key.dst,
    };
    let Some(veth) = (unsafe { LB_LOCAL_TASKS.get(&key) }).copied() else {
        return Verdict::PASS;
    };
    let Some(port) = (unsafe { LB_TASK_PORTS.get(&veth) }) else {
        return Verdict::PASS;
    };
    task::arrived(pkt, port);
    // Uncounted, like the bridge's way in: the node that routed it counted the packet.
    Verdict {
        // SAFETY: a plain helper call.
        action: unsafe { bpf_redirect_peer(veth, 0) } as i32,
        reason: verdict::UNCOUNTED,
    }
}
