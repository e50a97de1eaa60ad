//! The task side of routing-mesh flows: TC on a local task's host-side veths. Replies of
//! client-address flows are steered back to their ingress node; replies of SNAT flows (to
//! this node's address on the network) are translated here, without the bridge.
//!
//! ```text
//! to a task   (egress of its port on an overlay network)
//!   parse ─ routed onto the network by a node? ─ yes ─ learn which node (returns.rs) ─ pass
//!                                              └─ no (a task or a node address) ───── pass
//! from a task (ingress of each of its host veths)
//!   parse ─ addressed to a router? ─ yes ─ return entry? ─ this node: reply translation ─ underlay
//!         │                              │               └─ another node: into the overlay to it
//!         │                              └─ no ─ pass (the task's own routes)
//!         └─ no ─ to this node, a SNAT port, with a reply entry? ─ yes ─ reply translation ─ out
//!                                                               └─ no (to a task) ─ pass
//! ```
//!
//! The task's ICMP errors about a connection (keyed by the quoted packet) go the same way.
//!
//! A task's reply to a client-address connection is addressed to the client, so the task's
//! routes send it to the gateway bridge, whose masquerade would hide the service behind the
//! node's address. Sent back to the ingress node instead, it meets the flow's reply entry
//! there (ingress.rs), which restores the published address: the path is symmetric, so the
//! underlay never sees the task's or the client's address as a source it did not route.

use core::mem::MaybeUninit;

use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_redirect, programs::TcContext};
use mesh_common::lb::{FLOW_REPLY, Flow, RETURN_LOCAL, Reason, ReturnEntry, TaskPort, mac_for_ip};

use crate::{
    flow, icmp,
    ingress::{self, CONTINUE, ICMP, Packet},
    nat,
    packet::set_macs,
    programs::{LB_CONFIG, LB_TASK_PORTS},
    returns::{self, Origin},
    verdict::{self, Verdict},
};

/// Packets to the task are never changed or dropped: this only learns.
pub fn to_task(ctx: &TcContext) -> i32 {
    learn(ctx);
    TC_ACT_OK
}

pub fn from_task(ctx: &TcContext) -> i32 {
    verdict::finish(steer(ctx))
}

#[inline(always)]
fn learn(ctx: &TcContext) {
    let Some(cfg) = LB_CONFIG.get(0) else {
        return;
    };
    let mut slot = MaybeUninit::uninit();
    let pkt = Packet::zeroed(&mut slot);
    if ingress::parse(ctx, cfg, pkt).action != CONTINUE || !pkt.routed_from() {
        return;
    }
    // SAFETY: reading the ifindex field of our own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain data.
    if let Some(port) = unsafe { LB_TASK_PORTS.get(&ifindex) } {
        arrived(pkt, port);
    }
}

/// Learns the return of a packet routed onto the network by a node (`pkt.routed_from()`)
/// that is about to reach the local task behind `port`: here on its veth, or on the VXLAN
/// device when overlay.rs sends it straight in.
#[inline(always)]
pub(crate) fn arrived(pkt: &Packet, port: &TaskPort) {
    let origin = Origin {
        local: pkt.src_mac == port.node_mac,
        node_mac: pkt.src_mac,
        ifindex: port.vxlan_ifindex,
    };
    let k = pkt.key;
    let mut reply = k;
    reply.src = k.dst;
    reply.dst = k.src;
    reply.sport = k.dport;
    reply.dport = k.sport;
    returns::learn(&reply, &origin, pkt.tcp_flags);
}

#[inline(always)]
fn steer(ctx: &TcContext) -> Verdict {
    let Some(cfg) = LB_CONFIG.get(0) else {
        return Verdict::PASS;
    };
    let mut slot = MaybeUninit::uninit();
    let pkt = Packet::zeroed(&mut slot);
    let v = ingress::parse(ctx, cfg, pkt);
    if v.action == ICMP && pkt.routed_to() {
        return icmp_error(ctx, pkt);
    }
    if v.action != CONTINUE {
        // Fragments and malformed packets of the task are not ours to count.
        return Verdict::PASS;
    }
    if !pkt.routed_to() {
        if ingress::to_snat_port(pkt, cfg) && to_this_node(ctx, pkt) {
            // A reply to a SNAT flow: translated here rather than on the bridge.
            return ingress::reply(ctx, pkt);
        }
        return Verdict::PASS;
    }
    let Some(ret) = returns::lookup(&pkt.key, pkt.tcp_flags) else {
        return Verdict::PASS;
    };
    // The 5-tuple the connection's flow knows the reply by (a UDP server bound to 0.0.0.0
    // may answer from another of its addresses).
    let mut reply = pkt.key;
    reply.src = ret.task_addr;
    if ret.flags & RETURN_LOCAL != 0 {
        // The reply translation rewrites the source anyway: from whatever the task used.
        return match flow::lookup(&reply) {
            // SAFETY: pointer into the flow table.
            Some(f) if (unsafe { (*f).flags } & FLOW_REPLY) != 0 => {
                ingress::translate(ctx, pkt, f, Reason::Replied, false)
            }
            // The flow is gone (swept or evicted): the task's own routes decide.
            _ => Verdict::PASS,
        };
    }
    if reply.src != pkt.key.src {
        let back = Flow {
            nat_src: reply.src,
            nat_dst: reply.dst,
            nat_sport: reply.sport,
            nat_dport: reply.dport,
            ..Flow::default()
        };
        if nat::rewrite(ctx, pkt.l4, &pkt.key, &back).is_err() {
            return Verdict::drop(Reason::RewriteFailed);
        }
    }
    to_ingress_node(ctx, &ret, reply.src)
}

/// Whether the task's packet is addressed to this node's own address on the network (its
/// bridge MAC: overlay MACs are derived from addresses).
#[inline(always)]
fn to_this_node(ctx: &TcContext, pkt: &Packet) -> bool {
    // SAFETY: reading the ifindex field of our own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain data.
    (unsafe { LB_TASK_PORTS.get(&ifindex) }).is_some_and(|port| port.node_mac == pkt.dst_mac)
}

/// An ICMP error the task sends about a client-address connection (a UDP port it does not
/// serve, say), addressed to the client: it takes the connection's way back, so the ingress
/// node translates it like the connection's replies (icmp.rs).
#[inline(always)]
fn icmp_error(ctx: &TcContext, pkt: &Packet) -> Verdict {
    let Some((q, reply)) = icmp::quote(ctx, pkt.l4) else {
        return Verdict::PASS;
    };
    let Some(ret) = returns::lookup(&reply, 0) else {
        return Verdict::PASS;
    };
    if ret.flags & RETURN_LOCAL != 0 {
        return icmp::relay_quote(ctx, pkt.l4, q, &reply);
    }
    to_ingress_node(ctx, &ret, reply.src)
}

/// Sends the task's packet from `task_addr` into the overlay to the ingress node's bridge,
/// as if that node's router were the next hop; the source is the task's own overlay MAC,
/// where the ingress node's bridge expects it.
#[inline(always)]
fn to_ingress_node(ctx: &TcContext, ret: &ReturnEntry, task_addr: [u8; 4]) -> Verdict {
    if !set_macs(ctx, ret.node_mac, mac_for_ip(task_addr)) {
        return Verdict::PASS;
    }
    // SAFETY: a plain helper call.
    let action = unsafe { bpf_redirect(ret.ifindex, 0) };
    Verdict::redirect(action as i32, Reason::Returned)
}
