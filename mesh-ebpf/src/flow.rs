//! The flow table: both directions of every routing-mesh flow, so established connections
//! stay pinned to their backend whatever happens to the service afterwards.
//!
//! Two tables, so a flood of new flows cannot flush established ones:
//!
//! ```text
//! first packet ─ create ─> LB_EMBRYOS ─ client answers the backend ─ promote ─> LB_FLOWS
//!                          (small LRU: a flood evicts                 (an LRU only
//!                           only other embryos)                        promotions fill)
//! ```
//!
//! A flow is promoted when its client proves it receives the backend's packets (see
//! `mesh_common::lb::Embryo`): spoofed sources never do, so they never leave LB_EMBRYOS.
//! Lookups try LB_FLOWS first, so an established flow costs one lookup as before.
//!
//! Entries never time out here. The agent's sweep removes closed TCP flows after a grace
//! period (keeping their SNAT port reserved in LB_SNAT_RESERVED past the backend's
//! TIME_WAIT), idle UDP flows, stale embryos and flows whose backend was removed; the LRUs
//! evict the least recently used entries under pressure.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32};
use mesh_common::lb::{
    Embryo, FLOW_EMBRYO, FLOW_FIN, FLOW_REMOTE, FLOW_REPLY, FLOW_RST, FLOW_SEEN, Flow, FlowKey,
    LbConfig, LocalTaskKey, Network, PUBLISH_INGRESS, Reason, ServiceEntry,
};

use crate::{
    packet::{IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    programs::{LB_EMBRYOS, LB_FLOWS, LB_LOCAL_TASKS, LB_NETWORKS, LB_SNAT_RESERVED},
    service, stats,
};

/// How many random SNAT ports are tried before giving up on a new flow. With the default
/// range of 31744 ports per backend, 8 misses in a row means the range is nearly full.
const SNAT_ATTEMPTS: u32 = 8;

/// `last_seen` is refreshed only when it is this stale, so a busy flow does not write its
/// entry (and bounce its cache line between CPUs) on every packet.
const TOUCH_INTERVAL_NS: u64 = 1_000_000_000;

pub use crate::clock::now;

/// The entry of `key`, established or embryonic (then with FLOW_EMBRYO set: pass it to
/// [`handshake`] after translating the packet).
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<*mut Flow> {
    if let Some(f) = LB_FLOWS.get_ptr_mut(key) {
        return Some(f);
    }
    // `flow` is the first field of the #[repr(C)] Embryo: the same address.
    LB_EMBRYOS.get_ptr_mut(key).map(|e| e.cast::<Flow>())
}

/// What [`handshake`] needs of a packet of an embryonic flow.
pub struct Seen {
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
}

/// Moves the handshake of the embryonic flow `key` on with one of its packets (one whose
/// [`lookup`] entry had FLOW_EMBRYO): records the backend's SYN-ACK on the reply entry, and
/// promotes the flow when the client's packet shows it received the backend's answer. The
/// entry [`lookup`] returned must not be used afterwards (a promoted embryo is deleted).
#[inline(always)]
pub fn handshake(key: &FlowKey, seen: &Seen) {
    // Looked up again: the verifier cannot tell which table lookup()'s pointer came from,
    // and only embryonic packets (two or three per flow) pay for it.
    let Some(embryo) = LB_EMBRYOS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a pointer into LB_EMBRYOS; races with another CPU at worst write the same
    // values twice.
    let f = unsafe { (*embryo).flow };
    let tcp = key.proto == IPPROTO_TCP;
    if f.flags & FLOW_REPLY != 0 {
        if tcp && seen.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
            unsafe {
                (*embryo).syn_ack_seq = seen.seq;
                (*embryo).answered = 1;
            }
        }
        return;
    }
    if tcp && seen.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_ACK {
        return;
    }
    let reply_key = f.partner(key);
    let Some(reply) = LB_EMBRYOS.get_ptr_mut(&reply_key) else {
        return;
    };
    // SAFETY: pointer into LB_EMBRYOS, copied out.
    let reply = unsafe { *reply };
    let answered = if tcp {
        reply.answered != 0 && seen.ack == reply.syn_ack_seq.wrapping_add(1)
    } else {
        reply.flow.flags & FLOW_SEEN != 0
    };
    if answered {
        promote(key, f, &reply_key, reply.flow);
    }
}

/// Moves both entries of a flow from LB_EMBRYOS to LB_FLOWS. LB_FLOWS gets them first, so
/// the flow's SNAT port is held in one table or the other at every moment.
#[inline(always)]
fn promote(key: &FlowKey, mut forward: Flow, reply_key: &FlowKey, mut reply: Flow) {
    forward.flags &= !FLOW_EMBRYO;
    reply.flags &= !FLOW_EMBRYO;
    if LB_FLOWS.insert(reply_key, reply, 0).is_err() {
        return;
    }
    if LB_FLOWS.insert(key, forward, 0).is_err() {
        let _ = LB_FLOWS.remove(reply_key);
        return;
    }
    let _ = LB_EMBRYOS.remove(key);
    let _ = LB_EMBRYOS.remove(reply_key);
    stats::count(Reason::Promoted);
}

/// Whether the SNAT port in `reply_key` was closed towards the same backend so recently
/// that the backend may still hold the 4-tuple in TIME_WAIT.
#[inline(always)]
fn reserved(reply_key: &FlowKey, now: u64) -> bool {
    // SAFETY: plain data copied out.
    unsafe { LB_SNAT_RESERVED.get(reply_key) }.is_some_and(|until| now < *until)
}

/// Records that a packet used the entry: TCP FIN/RST for the sweep, and the time.
#[inline(always)]
pub fn touch(flow: *mut Flow, proto: u8, tcp_flags: u8, now: u64) {
    // SAFETY: a pointer into the flow table from lookup(); a racing update from another CPU
    // at worst loses a flag or timestamp, which the next packet sets again.
    let f = unsafe { &mut *flow };
    let mut flags = f.flags | FLOW_SEEN;
    if proto == IPPROTO_TCP {
        if tcp_flags & TCP_FIN != 0 {
            flags |= FLOW_FIN;
        }
        if tcp_flags & TCP_RST != 0 {
            flags |= FLOW_RST;
        }
    }
    if flags != f.flags {
        f.flags = flags;
    }
    if now.wrapping_sub(f.last_seen) > TOUCH_INTERVAL_NS {
        f.last_seen = now;
    }
}

/// Whether the entry belongs to a finished TCP connection, so a new SYN on the same 5-tuple
/// starts a new flow (new backend choice, fresh SNAT port) instead of reusing it.
#[inline(always)]
pub fn is_closing(flow: *const Flow) -> bool {
    // SAFETY: as in touch().
    unsafe { (*flow).flags & (FLOW_FIN | FLOW_RST) != 0 }
}

/// Whether the flow whose entry for `key` is `flow` saw its end in either direction: a FIN
/// or RST on this entry or on the other one. A RST is seen by one entry only: the client's
/// (it killed its socket) by the forward one, the task's by the reply one.
#[inline(always)]
pub fn is_finished(key: &FlowKey, flow: *const Flow) -> bool {
    if is_closing(flow) {
        return true;
    }
    // SAFETY: plain data copied out.
    let partner = unsafe { (*flow).partner(key) };
    lookup(&partner).is_some_and(|f| is_closing(f))
}

/// Removes the finished flow whose entry for `key` is `flow`, for a new connection on the
/// same 5-tuple. A client-address flow's other entry goes too: the new connection's entry
/// for it has the same key (when it picks the same backend) and [`lookup`] would find the
/// old one first. A SNAT flow's reply entry stays for the sweep, which keeps its port
/// reserved past the backend's TIME_WAIT.
#[inline(always)]
pub fn forget(key: &FlowKey, flow: *const Flow) {
    // SAFETY: plain data copied out before the entry is removed.
    let f = unsafe { *flow };
    let _ = LB_FLOWS.remove(key);
    let _ = LB_EMBRYOS.remove(key);
    if keeps_client_address(key, &f) {
        let partner = f.partner(key);
        let _ = LB_FLOWS.remove(&partner);
        let _ = LB_EMBRYOS.remove(&partner);
    }
}

/// Whether the flow whose entry for `key` is `flow` keeps the client's address: its reply
/// entry's key is its forward entry's key mirrored, rather than one with a SNAT port.
#[inline(always)]
pub fn keeps_client_address(key: &FlowKey, flow: &Flow) -> bool {
    let partner = flow.partner(key);
    if flow.flags & FLOW_REPLY != 0 {
        // key: backend → client; partner: client → node.
        partner.src == key.dst && partner.sport == key.dport
    } else {
        // key: client → node; partner: backend → client.
        partner.dst == key.src && partner.dport == key.sport
    }
}

/// Creates both entries of a new flow for a packet `key` that arrived on `ifindex` for
/// `svc`, embryonic: picks a backend, allocates a SNAT port on the network's node address
/// that no flow in either table uses and no recently closed flow to that backend reserves
/// (or keeps the client's address and port, for client-address ports), and returns the
/// forward translation.
#[inline(always)]
pub fn create(
    key: &FlowKey,
    svc: &ServiceEntry,
    ifindex: u32,
    cfg: &LbConfig,
    now: u64,
) -> Result<Flow, Reason> {
    let choice = service::pick(svc.service)?;
    // SAFETY: plain data copied out.
    let net: Network = unsafe { *LB_NETWORKS.get(choice.network).ok_or(Reason::NoBackend)? };
    let task = LocalTaskKey {
        network: choice.network,
        addr: choice.backend.addr,
    };
    // SAFETY: only presence is read.
    let remote = if unsafe { LB_LOCAL_TASKS.get(&task) }.is_some() {
        0
    } else {
        FLOW_REMOTE
    };
    let target_port = if svc.target_port == 0 {
        key.dport
    } else {
        svc.target_port
    };
    let mut forward = Flow {
        nat_src: net.node_addr,
        nat_dst: choice.backend.addr,
        nat_sport: 0,
        nat_dport: target_port,
        ifindex: net.ifindex,
        service: svc.service,
        backend: choice.id,
        last_seen: now,
        flags: FLOW_EMBRYO | remote,
        network: choice.network,
    };
    // Replies go back out of the interface the client's packet came in on.
    let reply = Flow {
        nat_src: key.dst,
        nat_dst: key.src,
        nat_sport: key.dport,
        nat_dport: key.sport,
        ifindex,
        service: svc.service,
        backend: choice.id,
        last_seen: now,
        flags: FLOW_REPLY | FLOW_EMBRYO,
        network: 0,
    };
    let reply = Embryo {
        flow: reply,
        ..Embryo::default()
    };
    if svc.mode == PUBLISH_INGRESS {
        forward.nat_src = key.src;
        forward.nat_sport = key.sport;
        return create_client_address(key, &forward, &reply);
    }
    let min = u32::from(cfg.snat_port_min);
    let span = u32::from(cfg.snat_port_max).saturating_sub(min) + 1;
    for _ in 0..SNAT_ATTEMPTS {
        // SAFETY: no arguments.
        let port = (min + unsafe { bpf_get_prandom_u32() } % span) as u16;
        forward.nat_sport = port;
        let reply_key = forward.partner(key);
        if reserved(&reply_key, now) {
            continue;
        }
        // NOEXIST makes the port ours atomically among embryos: another CPU cannot take it
        // in between. An established flow may hold it too: promotion inserts into LB_FLOWS
        // before it deletes the embryo, so checking LB_FLOWS after our insert sees it.
        if LB_EMBRYOS
            .insert(reply_key, reply, u64::from(BPF_NOEXIST))
            .is_err()
        {
            continue;
        }
        if LB_FLOWS.get_ptr(reply_key).is_some() {
            let _ = LB_EMBRYOS.remove(reply_key);
            continue;
        }
        let embryo = Embryo {
            flow: forward,
            ..Embryo::default()
        };
        if LB_EMBRYOS
            .insert(key, embryo, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Ok(forward);
        }
        // Another CPU created this flow first (a retransmitted SYN): use its entry.
        let _ = LB_EMBRYOS.remove(reply_key);
        // SAFETY: plain data copied out.
        return unsafe {
            LB_EMBRYOS
                .get(key)
                .map(|e| e.flow)
                .ok_or(Reason::FlowTableFull)
        };
    }
    Err(Reason::SnatExhausted)
}

/// The entries of a client-address flow, embryonic like every new flow (a flood of spoofed
/// SYNs must not push established flows out). The reply key (backend:target →
/// client:port) is fixed by the choice of backend, so there is no port to search for. The
/// forward entry goes first: a retransmitted SYN racing on another CPU then finds it and uses
/// its backend, and never removes a reply entry the winner wrote. The reply entry may replace
/// one left by an earlier connection of the same 5-tuple (the client reused its port).
#[inline(always)]
fn create_client_address(key: &FlowKey, forward: &Flow, reply: &Embryo) -> Result<Flow, Reason> {
    let embryo = Embryo {
        flow: *forward,
        ..Embryo::default()
    };
    if LB_EMBRYOS
        .insert(key, embryo, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // SAFETY: plain data copied out.
        return unsafe {
            LB_EMBRYOS
                .get(key)
                .map(|e| e.flow)
                .ok_or(Reason::FlowTableFull)
        };
    }
    let reply_key = forward.partner(key);
    // A finished flow's reply entry on this 4-tuple, left behind when its forward entry was
    // swept or evicted first, would be found before ours.
    let _ = LB_FLOWS.remove(&reply_key);
    if LB_EMBRYOS.insert(reply_key, reply, 0).is_err() {
        let _ = LB_EMBRYOS.remove(key);
        return Err(Reason::FlowTableFull);
    }
    Ok(*forward)
}
