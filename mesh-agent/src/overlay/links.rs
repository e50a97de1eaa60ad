//! Bridges and VXLAN devices: one pair per network, nothing else with our prefixes.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVxlan,
    packet_route::link::{InfoBridge, InfoKind, InfoVxlan},
};

use super::{
    BRIDGE_PREFIX, Change, DesiredOverlay, GATEWAY_BRIDGE, MacAddr, NetworkPlumbing, VXLAN_PORT,
    VXLAN_PREFIX, vni_of,
};
use crate::netlink::{self, Link};

/// The devices of one network after reconciliation.
#[derive(Debug, Clone)]
pub(super) struct Plumbed {
    pub bridge: Link,
    pub vxlan: Link,
}

pub(super) async fn reconcile(
    handle: &Handle,
    desired: &DesiredOverlay,
    changes: &mut Vec<Change>,
) -> Result<BTreeMap<u32, Plumbed>> {
    let links = netlink::links(handle).await?;
    let underlay = links
        .iter()
        .find(|l| l.name == desired.underlay.interface)
        .with_context(|| {
            format!(
                "underlay interface {} does not exist on this node",
                desired.underlay.interface
            )
        })?
        .clone();
    let wanted: BTreeMap<u32, &NetworkPlumbing> =
        desired.networks.iter().map(|n| (n.vni, n)).collect();

    // Remove first: a stale device may hold the VNI/port a new one needs. VXLAN devices go
    // before bridges so no port is left dangling on a deleted bridge.
    let mut stale: Vec<(&Link, &'static str)> = Vec::new();
    for link in &links {
        if let Some(vni) = vni_of(&link.name, VXLAN_PREFIX) {
            match wanted.get(&vni) {
                None => stale.push((link, "network no longer on this node")),
                Some(n) if !vxlan_matches(link, n, desired, underlay.index) => {
                    stale.push((link, "settings differ from the network's"))
                }
                Some(_) => {}
            }
        }
    }
    for link in &links {
        if let Some(vni) = vni_of(&link.name, BRIDGE_PREFIX) {
            if !wanted.contains_key(&vni) {
                stale.push((link, "network no longer on this node"));
            } else if !link.is_kind(InfoKind::Bridge) {
                stale.push((link, "not a bridge"));
            }
        } else if link.name == GATEWAY_BRIDGE {
            if desired.gateway.is_none() {
                stale.push((link, "no gateway bridge wanted"));
            } else if !link.is_kind(InfoKind::Bridge) {
                stale.push((link, "not a bridge"));
            }
        }
    }
    for (link, why) in stale {
        delete(handle, link).await?;
        changes.push(Change::LinkDeleted {
            name: link.name.clone(),
            why,
        });
    }

    if let Some(gw) = &desired.gateway {
        let want = BridgeWanted {
            name: GATEWAY_BRIDGE.into(),
            mtu: gw.mtu,
            mac: MacAddr::for_ip(gw.address),
            address: gw.bridge_address(),
            purpose: "the gateway bridge".into(),
        };
        let bridge = ensure_bridge(handle, &want, changes).await?;
        ensure_bridge_address(handle, &want, &bridge, changes).await?;
    }

    let mut plumbed = BTreeMap::new();
    for network in &desired.networks {
        // The bridge's MAC follows its address like a task's, so other nodes can reach the
        // node address through the same static entries as any endpoint.
        let want = BridgeWanted {
            name: network.bridge(),
            mtu: network.mtu,
            mac: MacAddr::for_ip(network.node_address),
            address: network.bridge_address(),
            purpose: format!("network {}", network.name),
        };
        let bridge = ensure_bridge(handle, &want, changes).await?;
        ensure_bridge_address(handle, &want, &bridge, changes).await?;
        let vxlan = ensure_vxlan(handle, network, desired, &underlay, &bridge, changes).await?;
        plumbed.insert(network.vni, Plumbed { bridge, vxlan });
    }
    Ok(plumbed)
}

async fn delete(handle: &Handle, link: &Link) -> Result<()> {
    match handle.link().del(link.index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if netlink::errno(&e) == Some(netlink::ENODEV) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting {}", link.name)),
    }
}

/// A bridge of ours as it should be.
struct BridgeWanted {
    name: String,
    mtu: u32,
    mac: MacAddr,
    address: Ipv4Net,
    purpose: String,
}

async fn ensure_bridge(
    handle: &Handle,
    want: &BridgeWanted,
    changes: &mut Vec<Change>,
) -> Result<Link> {
    let name = &want.name;
    let mac = want.mac;
    let Some(bridge) = netlink::link_by_name(handle, name).await? else {
        handle
            .link()
            .add(
                LinkBridge::new(name)
                    .mtu(want.mtu)
                    .address(mac.0.to_vec())
                    .nf_call_iptables(false)
                    .build(),
            )
            .execute()
            .await
            .with_context(|| format!("creating bridge {name} for {}", want.purpose))?;
        changes.push(Change::LinkCreated(name.clone()));
        return existing(handle, name).await;
    };

    let mut what = Vec::new();
    let mut fix = LinkUnspec::new_with_index(bridge.index);
    if bridge.mtu != want.mtu {
        fix = fix.mtu(want.mtu);
        what.push(format!("mtu {} → {}", bridge.mtu, want.mtu));
    }
    if bridge.mac != Some(mac.0) {
        fix = fix.address(mac.0.to_vec());
        what.push(format!("address → {mac}"));
    }
    if !bridge.up {
        fix = fix.up();
        what.push("up".into());
    }
    if !what.is_empty() {
        handle
            .link()
            .set(fix.build())
            .execute()
            .await
            .with_context(|| format!("updating bridge {name}: {}", what.join(", ")))?;
    }
    // Only matters where the namespace-wide bridge-nf-call-iptables is 0 (the kernel ORs the
    // two): then bridged overlay traffic skips iptables, which costs ~10-15% throughput.
    if bridge.bridge.contains(&InfoBridge::NfCallIpTables(true)) {
        handle
            .link()
            .change(
                LinkMessageBuilder::<LinkBridge>::new(name)
                    .nf_call_iptables(false)
                    .build(),
            )
            .execute()
            .await
            .with_context(|| format!("turning nf_call_iptables off on {name}"))?;
        what.push("nf_call_iptables off".into());
    }
    if what.is_empty() {
        return Ok(bridge);
    }
    changes.push(Change::LinkUpdated {
        name: name.clone(),
        what: what.join(", "),
    });
    existing(handle, name).await
}

async fn ensure_bridge_address(
    handle: &Handle,
    wanted: &BridgeWanted,
    bridge: &Link,
    changes: &mut Vec<Change>,
) -> Result<()> {
    let want = wanted.address;
    let mut present = false;
    for (msg, ip) in netlink::ipv4_addresses(handle, bridge.index).await? {
        if ip == want.addr() && msg.header.prefix_len == want.prefix_len() {
            present = true;
            continue;
        }
        handle
            .address()
            .del(msg)
            .execute()
            .await
            .with_context(|| format!("removing {ip} from {}", bridge.name))?;
        changes.push(Change::AddressRemoved {
            link: bridge.name.clone(),
            address: ip,
        });
    }
    if !present {
        handle
            .address()
            .add(bridge.index, IpAddr::V4(want.addr()), want.prefix_len())
            .execute()
            .await
            .with_context(|| format!("adding {want} to {}", bridge.name))?;
        changes.push(Change::AddressAdded {
            link: bridge.name.clone(),
            address: want,
        });
    }
    Ok(())
}

/// Whether an existing VXLAN device has the settings that cannot be changed in place.
fn vxlan_matches(
    link: &Link,
    network: &NetworkPlumbing,
    desired: &DesiredOverlay,
    underlay_index: u32,
) -> bool {
    if !link.is_kind(InfoKind::Vxlan) {
        return false;
    }
    let has = |want: InfoVxlan| link.vxlan.contains(&want);
    let no_remote = !link
        .vxlan
        .iter()
        .any(|i| matches!(i, InfoVxlan::Group(_) | InfoVxlan::Group6(_)));
    has(InfoVxlan::Id(network.vni))
        && has(InfoVxlan::Local(desired.underlay.address))
        && has(InfoVxlan::Link(underlay_index))
        && has(InfoVxlan::Port(VXLAN_PORT))
        && has(InfoVxlan::Learning(false))
        && !has(InfoVxlan::Proxy(true))
        && !has(InfoVxlan::CollectMetadata(true))
        && no_remote
}

async fn ensure_vxlan(
    handle: &Handle,
    network: &NetworkPlumbing,
    desired: &DesiredOverlay,
    underlay: &Link,
    bridge: &Link,
    changes: &mut Vec<Change>,
) -> Result<Link> {
    let name = network.vxlan();
    let Some(vxlan) = netlink::link_by_name(handle, &name).await? else {
        let result = handle
            .link()
            .add(
                LinkVxlan::new(&name, network.vni)
                    .dev(underlay.index)
                    .local(desired.underlay.address)
                    .port(VXLAN_PORT)
                    .learning(false)
                    // No ARP proxy: it answers only from entries already programmed and
                    // drops every other request, so a task started a moment ago could not
                    // be resolved by a peer that had not heard of it yet (its first
                    // connections timed out). Requests flood to the peers instead and the
                    // task answers them itself.
                    .proxy(false)
                    .mtu(network.mtu)
                    .controller(bridge.index)
                    .up()
                    .build(),
            )
            .execute()
            .await;
        if let Err(e) = result {
            let hint = if netlink::errno(&e) == Some(netlink::EEXIST) {
                format!(
                    " — another VXLAN device on this node already uses VNI {} on port \
                     {VXLAN_PORT}; remove it or give the network another VNI",
                    network.vni
                )
            } else {
                String::new()
            };
            return Err(e).with_context(|| {
                format!(
                    "creating VXLAN device {name} (VNI {}, local {} on {}) for network {}{hint}",
                    network.vni, desired.underlay.address, underlay.name, network.name
                )
            });
        }
        changes.push(Change::LinkCreated(name.clone()));
        return existing(handle, &name).await;
    };

    let mut what = Vec::new();
    let mut fix = LinkUnspec::new_with_index(vxlan.index);
    if vxlan.mtu != network.mtu {
        fix = fix.mtu(network.mtu);
        what.push(format!("mtu {} → {}", vxlan.mtu, network.mtu));
    }
    if vxlan.controller != Some(bridge.index) {
        fix = fix.controller(bridge.index);
        what.push(format!("enslaved to {}", bridge.name));
    }
    if !vxlan.up {
        fix = fix.up();
        what.push("up".into());
    }
    if what.is_empty() {
        return Ok(vxlan);
    }
    handle
        .link()
        .set(fix.build())
        .execute()
        .await
        .with_context(|| format!("updating VXLAN device {name}: {}", what.join(", ")))?;
    changes.push(Change::LinkUpdated {
        name: name.clone(),
        what: what.join(", "),
    });
    existing(handle, &name).await
}

async fn existing(handle: &Handle, name: &str) -> Result<Link> {
    match netlink::link_by_name(handle, name).await? {
        Some(l) => Ok(l),
        None => bail!("{name} vanished right after it was configured"),
    }
}
