//! The flow table: both directions of every routing-mesh flow, so established connections
//! stay pinned to their backend whatever happens to the service afterwards.
//!
//! Entries never time out here. The agent's sweep removes closed TCP flows after a grace
//! period, idle UDP flows and flows whose backend was removed; the LRU evicts the least
//! recently used entries under pressure.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
};
use mesh_common::lb::{
    FLOW_FIN, FLOW_REPLY, FLOW_RST, FLOW_SEEN, Flow, FlowKey, LbConfig, Network, PUBLISH_INGRESS,
    Reason, ServiceEntry,
};

use crate::{
    packet::{IPPROTO_TCP, TCP_FIN, TCP_RST},
    programs::{LB_FLOWS, LB_NETWORKS},
    service,
};

/// How many random SNAT ports are tried before giving up on a new flow. With the default
/// range of 31744 ports per backend, 8 misses in a row means the range is nearly full.
const SNAT_ATTEMPTS: u32 = 8;

/// `last_seen` is refreshed only when it is this stale, so a busy flow does not write its
/// entry (and bounce its cache line between CPUs) on every packet.
const TOUCH_INTERVAL_NS: u64 = 1_000_000_000;

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<*mut Flow> {
    LB_FLOWS.get_ptr_mut(key)
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

#[inline(always)]
pub fn forget(key: &FlowKey) {
    let _ = LB_FLOWS.remove(key);
}

/// Creates both entries of a new flow for a packet `key` that arrived on `ifindex` for
/// `svc`: picks a backend, allocates a SNAT port on the network's node address (or keeps
/// the client's address and port, for client-address ports), and returns the forward
/// translation.
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
        flags: 0,
        _pad: 0,
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
        flags: FLOW_REPLY,
        _pad: 0,
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
        // NOEXIST makes the port ours atomically: another CPU cannot take it in between.
        if LB_FLOWS
            .insert(reply_key, reply, u64::from(BPF_NOEXIST))
            .is_err()
        {
            continue;
        }
        if LB_FLOWS
            .insert(key, forward, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Ok(forward);
        }
        // Another CPU created this flow first (a retransmitted SYN): use its entry.
        let _ = LB_FLOWS.remove(reply_key);
        // SAFETY: plain data copied out.
        return unsafe { LB_FLOWS.get(key).copied().ok_or(Reason::FlowTableFull) };
    }
    Err(Reason::SnatExhausted)
}

/// The entries of a client-address flow. The reply key (backend:target → client:port) is
/// fixed by the choice of backend, so there is no port to search for. The forward entry goes
/// first: a retransmitted SYN racing on another CPU then finds it and uses its backend, and
/// never removes a reply entry the winner wrote. The reply entry may replace one left by an
/// earlier connection of the same 5-tuple (the client reused its port).
#[inline(always)]
fn create_client_address(key: &FlowKey, forward: &Flow, reply: &Flow) -> Result<Flow, Reason> {
    if LB_FLOWS
        .insert(key, forward, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // SAFETY: plain data copied out.
        return unsafe { LB_FLOWS.get(key).copied().ok_or(Reason::FlowTableFull) };
    }
    if LB_FLOWS.insert(forward.partner(key), reply, 0).is_err() {
        let _ = LB_FLOWS.remove(key);
        return Err(Reason::FlowTableFull);
    }
    Ok(*forward)
}
