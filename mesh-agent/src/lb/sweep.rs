//! Flow expiry. The programs never time flows out; this sweep does, with explicit rules:
//!
//! - TCP: gone `tcp_closed` after a RST, or after FINs from both sides; a SYN the backend
//!   never answered goes after `tcp_unreplied`; an established connection stays as long as
//!   it lives (no fixed idle cut like IPVS's 900 s) unless `tcp_idle` is set;
//! - UDP: gone after `udp_idle` without packets in either direction;
//! - an embryonic flow (either protocol; one whose client never answered the backend,
//!   such as a spoofed SYN the backend answered into the void) goes after `embryonic`
//!   without packets;
//! - a flow whose backend was removed (not merely draining) goes at once;
//! - a half whose partner is missing (evicted by the LRU) goes after `orphan`.
//!
//! A closed TCP flow leaves a reservation of its SNAT port towards its backend behind, for
//! `snat_reuse_delay` after its last packet: the backend keeps the 4-tuple in TIME_WAIT for
//! 60 s, and a new flow on it would have its SYN answered with an ACK of the old
//! connection (the client resets it and retries a second later).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    time::Duration,
};

use anyhow::Result;
use mesh_common::lb::{
    FLOW_EMBRYO, FLOW_FIN, FLOW_REPLY, FLOW_RST, FLOW_SEEN, Flow, FlowKey, IPPROTO_TCP, IPPROTO_UDP,
};
use serde::{Deserialize, Serialize};

use super::maps::Maps;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowTimeouts {
    pub udp_idle: Duration,
    pub tcp_closed: Duration,
    pub tcp_unreplied: Duration,
    /// None: established TCP flows never expire for idleness.
    pub tcp_idle: Option<Duration>,
    pub orphan: Duration,
    pub embryonic: Duration,
    /// How long a closed TCP flow's SNAT port stays reserved towards its backend after its
    /// last packet; zero reserves nothing. Longer than Linux's TIME_WAIT (60 s, fixed).
    pub snat_reuse_delay: Duration,
}

impl Default for FlowTimeouts {
    fn default() -> Self {
        Self {
            udp_idle: Duration::from_secs(120),
            tcp_closed: Duration::from_secs(10),
            tcp_unreplied: Duration::from_secs(30),
            tcp_idle: None,
            orphan: Duration::from_secs(10),
            embryonic: Duration::from_secs(30),
            snat_reuse_delay: Duration::from_secs(65),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepReport {
    /// Flow table entries looked at (two per flow).
    pub scanned: usize,
    /// Entries removed.
    pub removed: usize,
    /// Embryonic flows removed (flows, not entries).
    pub embryos_removed: usize,
    /// SNAT ports newly reserved for closed flows.
    pub reserved: usize,
}

/// What one sweep decided from one listing of the flow tables: the entries to remove (each
/// with the value it had then) and the SNAT ports to reserve. Planning only reads; removal
/// ([`finish`]) comes after, so a plan can be looked at, and tested, in between.
#[derive(Debug)]
pub struct SweepPlan {
    /// Flows to remove: one or both halves, whether they are embryonic.
    doomed: Vec<(Vec<(FlowKey, Flow)>, bool)>,
    reservations: Vec<(FlowKey, u64)>,
    scanned: usize,
    now: u64,
}

impl SweepPlan {
    /// Entries the plan would remove.
    pub fn entries(&self) -> usize {
        self.doomed.iter().map(|(halves, _)| halves.len()).sum()
    }
}

pub(super) fn plan(
    maps: &Maps,
    backends: &BTreeMap<u32, Ipv4Addr>,
    timeouts: &FlowTimeouts,
) -> Result<SweepPlan> {
    let now = monotonic_ns();
    let snat_ports = {
        let c = maps.read_config()?;
        c.snat_port_min..=c.snat_port_max
    };
    // Listing first and deleting after: deleting while walking a hash map with
    // get_next_key restarts the walk. Both tables in one list: an entry's FLOW_EMBRYO flag
    // says which table it is in, and both halves of a flow are always in the same one.
    let mut flows = maps.read_flows()?;
    flows.extend(maps.read_embryos()?.into_iter().map(|(k, e)| (k, e.flow)));
    let table: HashMap<FlowKey, Flow> = flows.iter().copied().collect();
    let mut seen: HashSet<FlowKey> = HashSet::new();
    let mut plan = SweepPlan {
        doomed: Vec::new(),
        reservations: Vec::new(),
        scanned: flows.len(),
        now,
    };
    for (key, flow) in &flows {
        if seen.contains(key) {
            continue;
        }
        let partner_key = flow.partner(key);
        let partner = table
            .get(&partner_key)
            .filter(|p| p.partner(&partner_key) == *key);
        // The backend is the reply's source, or the forward translation's destination.
        let backend_addr = if flow.flags & FLOW_REPLY != 0 {
            key.src
        } else {
            flow.nat_dst
        };
        let backend_alive = backends.get(&flow.backend) == Some(&Ipv4Addr::from(backend_addr));
        if !expired(key.proto, flow, partner, backend_alive, now, timeouts) {
            continue;
        }
        let embryo = flow.flags & FLOW_EMBRYO != 0;
        seen.insert(*key);
        let reservable =
            backend_alive && key.proto == IPPROTO_TCP && !timeouts.snat_reuse_delay.is_zero();
        let Some(partner) = partner else {
            plan.doomed.push((vec![(*key, *flow)], embryo));
            // A reply half whose forward half went first (the client reused its port for
            // a new connection) still names a 4-tuple the backend may hold in TIME_WAIT.
            if reservable
                && flow.flags & FLOW_REPLY != 0
                && flow.flags & (FLOW_FIN | FLOW_RST) != 0
                && snat_ports.contains(&key.dport)
            {
                let until = flow.last_seen + timeouts.snat_reuse_delay.as_nanos() as u64;
                if until > now {
                    plan.reservations.push((*key, until));
                }
            }
            continue;
        };
        seen.insert(partner_key);
        plan.doomed
            .push((vec![(*key, *flow), (partner_key, *partner)], embryo));
        let (reply_key, reply) = if flow.flags & FLOW_REPLY != 0 {
            (*key, flow)
        } else {
            (partner_key, partner)
        };
        if reservable && snat_ports.contains(&reply_key.dport) && closed(flow, partner) {
            let last = flow.last_seen.max(partner.last_seen).max(reply.last_seen);
            let until = last + timeouts.snat_reuse_delay.as_nanos() as u64;
            if until > now {
                plan.reservations.push((reply_key, until));
            }
        }
    }
    Ok(plan)
}

/// Carries out a plan. An entry is removed only if it still holds what the listing saw: a
/// client may have reused the 5-tuple for a new connection since (its SYN replaces a
/// finished flow), and that connection's entries are not the sweep's to remove. A map has
/// no compare-and-delete, so a window of one lookup remains, instead of the whole listing.
pub(super) fn finish(maps: &mut Maps, plan: SweepPlan) -> Result<SweepReport> {
    let mut report = SweepReport {
        scanned: plan.scanned,
        ..SweepReport::default()
    };
    for (key, until) in &plan.reservations {
        maps.reserve_snat_port(key, *until)?;
        report.reserved += 1;
    }
    for (halves, embryo) in &plan.doomed {
        let mut removed = 0;
        for (key, flow) in halves {
            let gone = if *embryo {
                maps.del_embryo_if(key, flow)?
            } else {
                maps.del_flow_if(key, flow)?
            };
            removed += usize::from(gone);
        }
        report.removed += removed;
        if *embryo && removed > 0 {
            report.embryos_removed += 1;
        }
    }
    // Reservations past their time would only be skipped; removing them keeps the count
    // meaningful and the LRU free for the ones that matter.
    for (key, until) in maps.read_reservations()? {
        if until <= plan.now {
            maps.del_reservation(&key)?;
        }
    }
    Ok(report)
}

/// Whether a TCP flow's two halves saw its end: a RST either way, or a FIN both ways.
fn closed(a: &Flow, b: &Flow) -> bool {
    (a.flags | b.flags) & FLOW_RST != 0 || (a.flags & FLOW_FIN != 0 && b.flags & FLOW_FIN != 0)
}

/// Whether the flow that `flow` (and its `partner`, when present) belong to is over.
pub(super) fn expired(
    proto: u8,
    flow: &Flow,
    partner: Option<&Flow>,
    backend_alive: bool,
    now: u64,
    t: &FlowTimeouts,
) -> bool {
    if !backend_alive {
        return true;
    }
    let age = |f: &Flow| Duration::from_nanos(now.saturating_sub(f.last_seen));
    let Some(partner) = partner else {
        return age(flow) > t.orphan;
    };
    let idle = age(flow).min(age(partner));
    let (forward, reply) = if flow.flags & FLOW_REPLY != 0 {
        (partner, flow)
    } else {
        (flow, partner)
    };
    if proto == IPPROTO_TCP && closed(forward, reply) {
        return idle > t.tcp_closed;
    }
    if (forward.flags | reply.flags) & FLOW_EMBRYO != 0 {
        return idle > t.embryonic;
    }
    match proto {
        IPPROTO_UDP => idle > t.udp_idle,
        IPPROTO_TCP => {
            // A reply entry nobody used still carries its creation time.
            if reply.flags & FLOW_SEEN == 0 {
                return age(reply) > t.tcp_unreplied;
            }
            t.tcp_idle.is_some_and(|limit| idle > limit)
        }
        _ => true,
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock bpf_ktime_get_coarse_ns reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and output pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const NOW: u64 = 10_000 * S;

    fn forward(last_seen: u64, flags: u32) -> Flow {
        Flow {
            last_seen,
            flags,
            ..Default::default()
        }
    }

    fn reply(last_seen: u64, flags: u32) -> Flow {
        Flow {
            last_seen,
            flags: flags | FLOW_REPLY,
            ..Default::default()
        }
    }

    fn tcp(f: &Flow, r: &Flow) -> bool {
        expired(IPPROTO_TCP, f, Some(r), true, NOW, &FlowTimeouts::default())
    }

    #[test]
    fn an_idle_established_tcp_connection_is_kept_far_beyond_ipvs_900_seconds() {
        let f = forward(NOW - 3600 * S, FLOW_SEEN);
        let r = reply(NOW - 3600 * S, FLOW_SEEN);
        assert!(!tcp(&f, &r));
        assert!(!tcp(&r, &f));
    }

    #[test]
    fn a_closed_tcp_connection_goes_after_the_grace_period() {
        let f = forward(NOW - 5 * S, FLOW_SEEN | FLOW_FIN);
        let r = reply(NOW - 5 * S, FLOW_SEEN | FLOW_FIN);
        assert!(!tcp(&f, &r), "still within the 10 s grace");
        let f = forward(NOW - 11 * S, FLOW_SEEN | FLOW_FIN);
        let r = reply(NOW - 11 * S, FLOW_SEEN | FLOW_FIN);
        assert!(tcp(&f, &r));
    }

    #[test]
    fn a_half_closed_tcp_connection_stays() {
        let f = forward(NOW - 60 * S, FLOW_SEEN | FLOW_FIN);
        let r = reply(NOW - 60 * S, FLOW_SEEN);
        assert!(!tcp(&f, &r));
    }

    #[test]
    fn a_reset_ends_the_connection_from_either_side() {
        let f = forward(NOW - 11 * S, FLOW_SEEN);
        let r = reply(NOW - 11 * S, FLOW_SEEN | FLOW_RST);
        assert!(tcp(&f, &r));
    }

    #[test]
    fn a_syn_the_backend_never_answered_expires() {
        let f = forward(NOW - 40 * S, 0);
        let r = reply(NOW - 40 * S, 0);
        assert!(tcp(&f, &r));
        let r = reply(NOW - 20 * S, 0);
        assert!(!tcp(&f, &r));
    }

    #[test]
    fn an_embryonic_flow_goes_when_idle_even_if_the_backend_answered() {
        // A spoofed SYN: the backend's SYN-ACK went into the void, no client ever ACKed.
        let f = forward(NOW - 31 * S, FLOW_EMBRYO);
        let r = reply(NOW - 31 * S, FLOW_EMBRYO | FLOW_SEEN);
        assert!(tcp(&f, &r));
        let r = reply(NOW - 5 * S, FLOW_EMBRYO | FLOW_SEEN);
        assert!(!tcp(&f, &r), "a handshake still moving stays");
        let t = FlowTimeouts::default();
        let f = forward(NOW - 31 * S, FLOW_EMBRYO | FLOW_SEEN);
        let r = reply(NOW - 31 * S, FLOW_EMBRYO | FLOW_SEEN);
        assert!(
            expired(IPPROTO_UDP, &f, Some(&r), true, NOW, &t),
            "a one-shot UDP exchange goes long before udp_idle"
        );
    }

    #[test]
    fn udp_flows_expire_when_idle_in_both_directions() {
        let t = FlowTimeouts::default();
        let f = forward(NOW - 200 * S, FLOW_SEEN);
        let r = reply(NOW - 5 * S, FLOW_SEEN);
        assert!(!expired(IPPROTO_UDP, &f, Some(&r), true, NOW, &t));
        let r = reply(NOW - 121 * S, FLOW_SEEN);
        assert!(expired(IPPROTO_UDP, &f, Some(&r), true, NOW, &t));
    }

    #[test]
    fn flows_of_a_removed_backend_go_at_once_and_orphans_after_a_while() {
        let t = FlowTimeouts::default();
        let f = forward(NOW, FLOW_SEEN);
        let r = reply(NOW, FLOW_SEEN);
        assert!(expired(IPPROTO_TCP, &f, Some(&r), false, NOW, &t));
        assert!(!expired(IPPROTO_TCP, &f, None, true, NOW, &t));
        let f = forward(NOW - 11 * S, FLOW_SEEN);
        assert!(expired(IPPROTO_TCP, &f, None, true, NOW, &t));
    }
}
