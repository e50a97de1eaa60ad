//! Static forwarding state of the overlay: VXLAN FDB entries (MAC → remote VTEP, and
//! all-zeros flood entries per peer) and permanent neighbour entries (IP → MAC) on both the
//! VXLAN device and the bridge.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use anyhow::{Context, Result};
use futures_util::TryStreamExt;
use rtnetlink::{
    Handle,
    packet_core::{NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
        },
    },
};
use tracing::warn;

use super::{Change, DesiredOverlay, MacAddr, links::Plumbed};
use crate::netlink;

pub(super) async fn reconcile(
    handle: &Handle,
    desired: &DesiredOverlay,
    plumbed: &BTreeMap<u32, Plumbed>,
    changes: &mut Vec<Change>,
) -> Result<()> {
    reconcile_fdb(handle, desired, plumbed, changes).await?;
    reconcile_neighbours(handle, desired, plumbed, changes).await
}

/// (MAC, VTEP) pairs wanted on each VXLAN device, by ifindex.
fn wanted_fdb(
    desired: &DesiredOverlay,
    plumbed: &BTreeMap<u32, Plumbed>,
) -> BTreeMap<u32, BTreeSet<(MacAddr, Ipv4Addr)>> {
    let mut wanted: BTreeMap<u32, BTreeSet<(MacAddr, Ipv4Addr)>> = plumbed
        .values()
        .map(|p| (p.vxlan.index, BTreeSet::new()))
        .collect();
    // A unicast MAC maps to one VTEP; two endpoints claiming it is a bug upstream.
    let mut owner: BTreeMap<(u32, MacAddr), Ipv4Addr> = BTreeMap::new();
    for ep in &desired.remote_endpoints {
        let Some(p) = plumbed.get(&ep.vni) else {
            continue;
        };
        if let Some(other) = owner.insert((ep.vni, ep.mac), ep.vtep)
            && other != ep.vtep
        {
            warn!(
                mac = %ep.mac, first = %other, second = %ep.vtep, vni = ep.vni,
                "two remote endpoints share a MAC; keeping the first"
            );
            owner.insert((ep.vni, ep.mac), other);
            continue;
        }
        wanted
            .entry(p.vxlan.index)
            .or_default()
            .insert((ep.mac, ep.vtep));
    }
    for peer in &desired.peers {
        if let Some(p) = plumbed.get(&peer.vni) {
            wanted
                .entry(p.vxlan.index)
                .or_default()
                .insert((MacAddr::ZERO, peer.vtep));
        }
    }
    wanted
}

async fn reconcile_fdb(
    handle: &Handle,
    desired: &DesiredOverlay,
    plumbed: &BTreeMap<u32, Plumbed>,
    changes: &mut Vec<Change>,
) -> Result<()> {
    let wanted = wanted_fdb(desired, plumbed);
    let names: BTreeMap<u32, &str> = plumbed
        .values()
        .map(|p| (p.vxlan.index, p.vxlan.name.as_str()))
        .collect();

    let dump: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .context("listing FDB entries")?;
    let mut present: BTreeMap<u32, BTreeSet<(MacAddr, Ipv4Addr)>> = BTreeMap::new();
    for msg in dump {
        let index = msg.header.ifindex;
        // The bridge's own table (NTF_MASTER) lists the VXLAN port too; only the device's
        // own entries (NTF_SELF) are ours.
        if !names.contains_key(&index) || !msg.header.flags.contains(NeighbourFlags::Own) {
            continue;
        }
        let Some((mac, vtep)) = fdb_entry(&msg) else {
            continue;
        };
        let permanent = is_permanent(msg.header.state);
        if permanent && wanted.get(&index).is_some_and(|w| w.contains(&(mac, vtep))) {
            present.entry(index).or_default().insert((mac, vtep));
            continue;
        }
        send(
            handle,
            fdb_message(index, mac, vtep),
            NLM_F_REQUEST | NLM_F_ACK,
            false,
        )
        .await
        .with_context(|| format!("removing fdb {mac} → {vtep} from {}", names[&index]))?;
        changes.push(Change::FdbRemoved {
            link: names[&index].to_owned(),
            mac,
            vtep,
        });
    }

    for (index, entries) in &wanted {
        for &(mac, vtep) in entries {
            if present.get(index).is_some_and(|p| p.contains(&(mac, vtep))) {
                continue;
            }
            // Flood entries share the all-zeros key, one remote each: append, never replace.
            let mode = if mac == MacAddr::ZERO {
                NLM_F_APPEND
            } else {
                NLM_F_REPLACE
            };
            send(
                handle,
                fdb_message(*index, mac, vtep),
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | mode,
                true,
            )
            .await
            .with_context(|| format!("adding fdb {mac} → {vtep} to {}", names[index]))?;
            changes.push(Change::FdbAdded {
                link: names[index].to_owned(),
                mac,
                vtep,
            });
        }
    }
    Ok(())
}

/// NUD_PERMANENT may come with other bits (iproute2's `permanent` also sets NUD_NOARP).
fn is_permanent(state: NeighbourState) -> bool {
    u16::from(state) & u16::from(NeighbourState::Permanent) != 0
}

fn fdb_entry(msg: &NeighbourMessage) -> Option<(MacAddr, Ipv4Addr)> {
    let mut mac = None;
    let mut vtep = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::LinkLayerAddress(a) => {
                mac = <[u8; 6]>::try_from(a.as_slice()).ok().map(MacAddr)
            }
            // AF_BRIDGE messages carry the VTEP as raw bytes.
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                vtep = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => vtep = Some(*ip),
            _ => {}
        }
    }
    Some((mac?, vtep?))
}

fn fdb_message(index: u32, mac: MacAddr, vtep: Ipv4Addr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes = vec![
        NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()),
        NeighbourAttribute::Destination(NeighbourAddress::Inet(vtep)),
    ];
    msg
}

async fn reconcile_neighbours(
    handle: &Handle,
    desired: &DesiredOverlay,
    plumbed: &BTreeMap<u32, Plumbed>,
    changes: &mut Vec<Change>,
) -> Result<()> {
    let mut names: BTreeMap<u32, &str> = BTreeMap::new();
    for p in plumbed.values() {
        names.insert(p.bridge.index, &p.bridge.name);
        names.insert(p.vxlan.index, &p.vxlan.name);
    }
    let mut wanted: BTreeMap<(u32, Ipv4Addr), MacAddr> = BTreeMap::new();
    for ep in &desired.remote_endpoints {
        if let Some(p) = plumbed.get(&ep.vni) {
            wanted.entry((p.vxlan.index, ep.ip)).or_insert(ep.mac);
            wanted.entry((p.bridge.index, ep.ip)).or_insert(ep.mac);
        }
    }

    let dump: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute()
        .try_collect()
        .await
        .context("listing neighbour entries")?;
    let mut satisfied = BTreeSet::new();
    for msg in dump {
        let index = msg.header.ifindex;
        if !names.contains_key(&index) {
            continue;
        }
        let Some(ip) = msg.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
            _ => None,
        }) else {
            continue;
        };
        let mac = msg.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(l) => <[u8; 6]>::try_from(l.as_slice()).ok(),
            _ => None,
        });
        let permanent = is_permanent(msg.header.state);
        match wanted.get(&(index, ip)) {
            Some(want) if permanent && mac == Some(want.0) => {
                satisfied.insert((index, ip));
            }
            // Wanted but learned or outdated: the add below replaces it.
            Some(_) => {}
            // Entries the kernel learned for local tasks are not ours to judge.
            None if !permanent => {}
            None => {
                let mut del = NeighbourMessage::default();
                del.header = msg.header;
                del.attributes = vec![NeighbourAttribute::Destination(NeighbourAddress::Inet(ip))];
                send(handle, del, NLM_F_REQUEST | NLM_F_ACK, false)
                    .await
                    .with_context(|| format!("removing neighbour {ip} from {}", names[&index]))?;
                changes.push(Change::NeighbourRemoved {
                    link: names[&index].to_owned(),
                    ip,
                });
            }
        }
    }

    for (&(index, ip), &mac) in &wanted {
        if satisfied.contains(&(index, ip)) {
            continue;
        }
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)),
            NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()),
        ];
        send(
            handle,
            msg,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            true,
        )
        .await
        .with_context(|| format!("setting neighbour {ip} → {mac} on {}", names[&index]))?;
        changes.push(Change::NeighbourSet {
            link: names[&index].to_owned(),
            ip,
            mac,
        });
    }
    Ok(())
}

/// Sends one neighbour request (`add` = RTM_NEWNEIGH, else RTM_DELNEIGH) and waits for its
/// acknowledgement. Deleting something already gone is not an error.
async fn send(handle: &Handle, msg: NeighbourMessage, flags: u16, add: bool) -> Result<()> {
    let payload = if add {
        RouteNetlinkMessage::NewNeighbour(msg)
    } else {
        RouteNetlinkMessage::DelNeighbour(msg)
    };
    match netlink::request(handle, payload, flags).await {
        Err(e) if !add && netlink::errno(&e) == Some(netlink::ENOENT) => Ok(()),
        r => Ok(r?),
    }
}
