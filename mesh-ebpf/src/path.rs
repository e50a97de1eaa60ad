//! Where a translated packet leaves by: the shortest way to its next hop.
//!
//! ```text
//! reply entry ─────────────────────────────────────────── redirect_neigh(where the client came in)
//! forward entry ─ FLOW_REMOTE? ─ yes ─ network's VXLAN device? ─ yes ─ MACs ─ redirect
//!                     │                        └─ no ──────────────────── redirect_neigh(bridge)
//!                     └─ no ─ still a task here? ─ yes ─ MACs ─ (client address: learn return) ─ redirect_peer
//!                                    └─ no ──────────────────────────── redirect_neigh(bridge)
//! ```
//!
//! Overlay MACs are derived from addresses (`mac_for_ip`), so a packet for a task gets its
//! Ethernet header without a neighbour lookup. A local task's packet enters its namespace
//! from the interface it arrived on (bpf_redirect_peer: TC ingress only, which is where the
//! routing mesh runs); it never crosses the bridge or the task's host veth, so the learning
//! program there (task.rs) does not see it and the return is learned here. A remote task's
//! packet goes straight into the network's VXLAN device, whose static FDB maps the task's
//! MAC to its node; it arrives there from this node's bridge MAC, as a bridged one would.
//! Whether the backend is remote was settled when the flow began (flow.rs), so remote
//! packets skip the local tasks' table.
//!
//! Everything is looked up per packet, so a re-created bridge, VXLAN device or veth (new
//! ifindex) never blackholes a flow; an entry of an older agent with no network keeps its
//! stored ifindex.

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use mesh_common::lb::{FLOW_REMOTE, Flow, FlowKey, LocalTaskKey, Network, mac_for_ip};

use crate::{
    flow,
    packet::set_macs,
    programs::{LB_LOCAL_TASKS, LB_NETWORKS},
    returns,
};

/// Sends the packet of `key` (as it arrived), already rewritten by the flow entry `f`, on
/// its way; returns the TC action.
#[inline(always)]
pub fn send(ctx: &TcContext, key: &FlowKey, f: &Flow, tcp_flags: u8) -> i32 {
    let Some(net) = network(f) else {
        return neigh(f.ifindex);
    };
    if f.flags & FLOW_REMOTE != 0 {
        if net.vxlan_ifindex != 0 && to_task_frame(ctx, f, &net) {
            // SAFETY: a plain helper call.
            return unsafe { bpf_redirect(net.vxlan_ifindex, 0) } as i32;
        }
        return neigh(net.ifindex);
    }
    let task = LocalTaskKey {
        network: f.network,
        addr: f.nat_dst,
    };
    // SAFETY: plain data copied out.
    let Some(veth) = (unsafe { LB_LOCAL_TASKS.get(&task) }).copied() else {
        return neigh(net.ifindex);
    };
    if !to_task_frame(ctx, f, &net) {
        return neigh(net.ifindex);
    }
    if flow::keeps_client_address(key, f) {
        returns::learn_forwarded(&f.partner(key), mac_for_ip(net.node_addr), tcp_flags);
    }
    // SAFETY: a plain helper call.
    unsafe { bpf_redirect_peer(veth, 0) as i32 }
}

/// The bridge a forward entry's packets take when they cannot take a shorter path (ICMP
/// errors relayed to a task, icmp.rs), else the entry's own interface.
#[inline(always)]
pub fn bridge(f: &Flow) -> u32 {
    network(f).map_or(f.ifindex, |n| n.ifindex)
}

/// A forward entry's network as it is now; None for reply entries (and an older agent's
/// entries), which leave by their own interface.
#[inline(always)]
fn network(f: &Flow) -> Option<Network> {
    if f.network == 0 {
        return None;
    }
    // SAFETY: plain data copied out.
    unsafe { LB_NETWORKS.get(&f.network) }.copied()
}

/// The frame of a packet to the task `f.nat_dst`, from this node's bridge on the network.
#[inline(always)]
fn to_task_frame(ctx: &TcContext, f: &Flow, net: &Network) -> bool {
    set_macs(ctx, mac_for_ip(f.nat_dst), mac_for_ip(net.node_addr))
}

/// `bpf_redirect_neigh` to `ifindex`: the fallback path, and the way of reply entries.
#[inline(always)]
pub fn neigh(ifindex: u32) -> i32 {
    // SAFETY: no neighbour parameters: the helper looks up the route and the neighbour of
    // the (rewritten) destination on the target device.
    (unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) }) as i32
}
