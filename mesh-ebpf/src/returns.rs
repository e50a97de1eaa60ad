//! The return table: for each client-address connection to a local task, which node it came
//! in through, so the task's replies go back there and not out of the gateway bridge.
//!
//! Entries never time out here; the agent's sweep removes closed and idle ones, and the LRU
//! bounds the table under pressure.

use mesh_common::lb::{
    FLOW_REPLY, FlowKey, RETURN_FIN_IN, RETURN_FIN_OUT, RETURN_LOCAL, RETURN_RST, Reason,
    ReturnEntry, return_key,
};

use crate::{
    clock::now,
    flow,
    packet::{IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    programs::LB_RETURNS,
    stats,
};

/// As in flow.rs: a busy connection does not write its entry on every packet.
const TOUCH_INTERVAL_NS: u64 = 1_000_000_000;

/// Where a packet to a local task was routed from.
pub struct Origin {
    /// This node routed it (its own bridge MAC was the source).
    pub local: bool,
    /// The routing node's bridge MAC.
    pub node_mac: [u8; 6],
    /// The VXLAN device towards that node (unused when local).
    pub ifindex: u32,
}

/// Records that the connection whose replies have the 5-tuple `reply` reached the task from
/// `origin`. A connection this node routed is only recorded when its flow table has the
/// reply translation: a client that reached the task through this node without the routing
/// mesh keeps its usual path.
#[inline(always)]
pub fn learn(reply: &FlowKey, origin: &Origin, tcp_flags: u8) {
    record(reply, origin, tcp_flags, false);
}

/// [`learn`] for a packet this node's routing mesh translated itself and sends straight into
/// the task (path.rs), so the packet never meets the learning program on the task's veth:
/// the flow is known to be the routing mesh's and live.
#[inline(always)]
pub fn learn_forwarded(reply: &FlowKey, node_mac: [u8; 6], tcp_flags: u8) {
    let origin = Origin {
        local: true,
        node_mac,
        ifindex: 0,
    };
    record(reply, &origin, tcp_flags, true);
}

#[inline(always)]
fn record(reply: &FlowKey, origin: &Origin, tcp_flags: u8, forwarded: bool) {
    let now = now();
    let tcp = reply.proto == IPPROTO_TCP;
    let syn_only = tcp && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let mut flags = if origin.local { RETURN_LOCAL } else { 0 };
    let ifindex = if origin.local { 0 } else { origin.ifindex };
    let key = return_key(reply);
    if let Some(e) = LB_RETURNS.get_ptr_mut(key) {
        // SAFETY: a pointer into the table; racing writers at worst lose a flag or a
        // timestamp, which the next packet sets again.
        let e = unsafe { &mut *e };
        // A new SYN starts a new connection on the same 5-tuple: its flags start over.
        if !syn_only
            && e.flags & RETURN_LOCAL == flags
            && e.node_mac == origin.node_mac
            && e.ifindex == ifindex
            && e.task_addr == reply.src
        {
            touch(e, closing(tcp, tcp_flags, RETURN_FIN_IN), now);
            return;
        }
    }
    if origin.local && !forwarded {
        match flow::lookup(reply) {
            // SAFETY (both arms): a pointer into the flow table.
            Some(f) if unsafe { (*f).flags } & FLOW_REPLY != 0 => {
                if syn_only && flow::is_finished(reply, f) {
                    // A SYN through the routing mesh would have replaced a finished flow
                    // (ingress.rs forgets it on the client's SYN): this new connection on
                    // its 5-tuple reached the task another way, and the finished flow must
                    // not translate its replies.
                    flow::forget(reply, f);
                    let _ = LB_RETURNS.remove(key);
                    stats::count(Reason::Superseded);
                    return;
                }
            }
            // Routed by this node without the routing mesh: the task's usual path. An
            // entry left by an earlier connection on the 5-tuple goes with its SYN.
            _ => {
                if syn_only {
                    let _ = LB_RETURNS.remove(key);
                }
                return;
            }
        }
    }
    flags |= closing(tcp, tcp_flags, RETURN_FIN_IN);
    let entry = ReturnEntry {
        node_mac: origin.node_mac,
        flags,
        task_addr: reply.src,
        ifindex,
        last_seen: now,
    };
    let _ = LB_RETURNS.insert(key, &entry, 0);
}

/// The entry of a task's packet with 5-tuple `key`, if it answers a client-address
/// connection; notes its FIN/RST and the time.
#[inline(always)]
pub fn lookup(key: &FlowKey, tcp_flags: u8) -> Option<ReturnEntry> {
    let e = LB_RETURNS.get_ptr_mut(return_key(key))?;
    // SAFETY: as in learn().
    let e = unsafe { &mut *e };
    touch(
        e,
        closing(key.proto == IPPROTO_TCP, tcp_flags, RETURN_FIN_OUT),
        now(),
    );
    Some(*e)
}

/// The FIN (`fin` for this direction) and RST flags a TCP packet adds.
#[inline(always)]
fn closing(tcp: bool, tcp_flags: u8, fin: u16) -> u16 {
    if !tcp {
        return 0;
    }
    let mut f = 0;
    if tcp_flags & TCP_FIN != 0 {
        f |= fin;
    }
    if tcp_flags & TCP_RST != 0 {
        f |= RETURN_RST;
    }
    f
}

#[inline(always)]
fn touch(e: &mut ReturnEntry, flags: u16, now: u64) {
    if e.flags | flags != e.flags {
        e.flags |= flags;
    }
    if now.wrapping_sub(e.last_seen) > TOUCH_INTERVAL_NS {
        e.last_seen = now;
    }
}
