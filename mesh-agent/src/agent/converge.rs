//! Making this node's kernel match the merged view: which networks it plumbs, its own
//! address on each, and the overlay (bridges, VXLAN, FDB, neighbours, firewall).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use tracing::{info, warn};

use super::{Agent, Local};

/// Which networks task starts underway need (pinned), and which the last convergence left
/// plumbed (ready). A start pins its networks and, when they are ready, builds its task
/// without the convergence lock: tasks start side by side and beside a convergence pass.
/// Convergence keeps pinned networks and, before it unplumbs any network, takes it out of
/// ready under the same lock a start checks it under, so a start either sees it going (and
/// plumbs it again under the convergence lock) or has pinned it first (and it stays).
#[derive(Default)]
pub(crate) struct Plumbed {
    pinned: BTreeMap<String, usize>,
    ready: BTreeSet<String>,
}

/// A start's hold on its networks; released when dropped.
pub(crate) struct Pin<'a> {
    plumbed: &'a std::sync::Mutex<Plumbed>,
    networks: Vec<String>,
}

impl<'a> Pin<'a> {
    /// Pins `networks`; also says whether all of them are plumbed.
    pub(crate) fn new(plumbed: &'a std::sync::Mutex<Plumbed>, networks: &[&str]) -> (Self, bool) {
        let mut p = plumbed.lock().expect("plumbed lock");
        for n in networks {
            *p.pinned.entry((*n).to_owned()).or_default() += 1;
        }
        let ready = networks.iter().all(|n| p.ready.contains(*n));
        let pin = Self {
            plumbed,
            networks: networks.iter().map(|n| (*n).to_owned()).collect(),
        };
        (pin, ready)
    }
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        let mut p = self.plumbed.lock().expect("plumbed lock");
        for n in &self.networks {
            if let Some(c) = p.pinned.get_mut(n) {
                *c -= 1;
                if *c == 0 {
                    p.pinned.remove(n);
                }
            }
        }
    }
}
use crate::{
    cluster::{AttachmentRecord, View, key, mac_for_ip},
    overlay::{
        Change, DesiredOverlay, MacAddr, NetworkPlumbing, PeerVtep, RemoteEndpoint, network_mtu,
    },
    task::ProcessState,
};

impl Agent {
    /// Networks this node must plumb: those its tasks use, and every network with a service,
    /// since the routing mesh answers published ports (and VIPs) on every node.
    fn wanted_networks(&self, local: &Local, view: &View, extra: Option<&str>) -> BTreeSet<String> {
        let mut wanted: BTreeSet<String> = view
            .services
            .values()
            .flat_map(|s| s.spec.attachments_names().map(str::to_owned))
            .collect();
        wanted.extend(
            view.removed_service_endpoints()
                .map(|e| e.record.network.clone()),
        );
        for t in local.tasks.list() {
            if matches!(t.state, ProcessState::Running | ProcessState::Creating) {
                wanted.extend(
                    t.spec
                        .attachments
                        .iter()
                        .filter(|a| view.networks.contains_key(&a.network))
                        .map(|a| a.network.clone()),
                );
            }
        }
        wanted.extend(
            local
                .tasks
                .cni_list()
                .iter()
                .map(|c| c.network().to_owned()),
        );
        wanted.extend(extra.map(str::to_owned));
        wanted.retain(|n| view.networks.contains_key(n));
        wanted
    }

    /// This node's own addresses, per network, as published in gossip.
    pub(crate) async fn own_attachments(&self) -> BTreeMap<String, AttachmentRecord> {
        self.gossip
            .own_keys()
            .await
            .into_iter()
            .filter(|(k, _)| k.starts_with(key::ATTACHMENT))
            .filter_map(|(_, v)| serde_json::from_str::<AttachmentRecord>(&v).ok())
            .map(|a| (a.network.clone(), a))
            .collect()
    }

    pub(crate) async fn converge(&self, view: &View) -> Result<()> {
        let _one_at_a_time = self.converging.lock().await;
        self.converge_locked(view, None).await
    }

    /// The body of [`Agent::converge`], for callers that already hold the lock; `extra` is a
    /// network to plumb although nothing uses it yet (a task is about to).
    pub(crate) async fn converge_locked(&self, view: &View, extra: Option<&str>) -> Result<()> {
        // Without a dataplane this node plumbs nothing, so it claims no address either.
        let Some(local) = self.local() else {
            return Ok(());
        };
        let wanted = {
            let mut plumbed = local.plumbed.lock().expect("plumbed lock");
            let mut wanted = self.wanted_networks(local, view, extra);
            wanted.extend(
                plumbed
                    .pinned
                    .keys()
                    .filter(|n| view.networks.contains_key(*n))
                    .cloned(),
            );
            plumbed.ready.retain(|n| wanted.contains(n));
            wanted
        };
        let mut attachments = self.own_attachments().await;
        let mut changes: Vec<(String, Option<String>)> = Vec::new();
        for (net, att) in &attachments {
            if !wanted.contains(net) {
                info!(network = net, ip = %att.ip, "network no longer needed here; unplumbing it");
                changes.push((format!("{}{net}", key::ATTACHMENT), None));
            }
        }
        attachments.retain(|n, _| wanted.contains(n));
        // Released once written: until gossip has them, only the reservation keeps a task
        // starting beside this pass from being given the same address.
        let mut reserved = Vec::new();
        for net in &wanted {
            if attachments.contains_key(net) {
                continue;
            }
            match self.allocate(net).await {
                Ok(ip) => {
                    let att = AttachmentRecord {
                        network: net.clone(),
                        ip,
                        mac: mac_for_ip(ip),
                    };
                    info!(network = net, %ip, "plumbing network on this node");
                    changes.push((
                        format!("{}{net}", key::ATTACHMENT),
                        Some(serde_json::to_string(&att)?),
                    ));
                    attachments.insert(net.clone(), att);
                    reserved.push((net.clone(), ip));
                }
                Err(e) => warn!(
                    network = net,
                    "no address for this node on the network yet: {e}"
                ),
            }
        }
        if !changes.is_empty() {
            self.gossip.write(changes).await;
        }
        for (net, ip) in reserved {
            self.release(&net, ip).await;
        }

        let desired = self.desired_overlay(local, view, &attachments);
        let done = local
            .overlay
            .reconcile(&desired)
            .await
            .context("reconciling the overlay")?;
        local.plumbed.lock().expect("plumbed lock").ready =
            desired.networks.iter().map(|n| n.name.clone()).collect();
        // A re-created bridge lost its ports: put running tasks back on it.
        if done.iter().any(|c| matches!(c, Change::LinkCreated(_))) {
            let n = local.tasks.reattach_all().await?;
            if n > 0 {
                info!(
                    count = n,
                    "re-attached task interfaces to re-created bridges"
                );
            }
        }
        self.converge_routing(local, view, &desired.networks).await
    }

    fn desired_overlay(
        &self,
        local: &Local,
        view: &View,
        own: &BTreeMap<String, AttachmentRecord>,
    ) -> DesiredOverlay {
        let me = self.node_name();
        let mtu = network_mtu(local.underlay.mtu);
        let networks: Vec<NetworkPlumbing> = own
            .values()
            .filter_map(|att| {
                let n = view.networks.get(&att.network)?;
                Some(NetworkPlumbing {
                    name: n.spec.name.clone(),
                    vni: n.spec.vni,
                    subnet: n.spec.subnet,
                    node_address: att.ip,
                    mtu,
                })
            })
            .collect();
        let vni: BTreeMap<&str, u32> = networks.iter().map(|n| (n.name.as_str(), n.vni)).collect();
        let remote = |network: &str, ip, mac: &str, vtep| -> Option<RemoteEndpoint> {
            Some(RemoteEndpoint {
                vni: *vni.get(network)?,
                ip,
                mac: mac.parse::<MacAddr>().ok()?,
                vtep,
            })
        };
        // Down nodes included: see `View::down_endpoints`.
        let endpoints = view.endpoints.iter().chain(&view.down_endpoints);
        let attachments = || view.attachments.iter().chain(&view.down_attachments);
        let mut remote_endpoints: Vec<RemoteEndpoint> = endpoints
            .filter(|e| e.node != me)
            .filter_map(|e| remote(&e.record.network, e.record.ip, &e.record.mac, e.vtep))
            .collect();
        remote_endpoints.extend(
            attachments()
                .filter(|a| a.node != me)
                .filter_map(|a| remote(&a.record.network, a.record.ip, &a.record.mac, a.vtep)),
        );
        let peers: BTreeSet<PeerVtep> = attachments()
            .filter(|a| a.node != me)
            .filter_map(|a| {
                Some(PeerVtep {
                    vni: *vni.get(a.record.network.as_str())?,
                    vtep: a.vtep,
                })
            })
            .collect();
        DesiredOverlay {
            underlay: local.underlay.clone(),
            networks,
            remote_endpoints,
            peers: peers.into_iter().collect(),
            gateway: Some(local.gateway.clone()),
        }
    }

    /// The plumbing of a network this node has an address on.
    pub(crate) async fn plumbing(
        &self,
        local: &Local,
        view: &View,
        network: &str,
    ) -> Option<NetworkPlumbing> {
        let own = self.own_attachments().await;
        self.plumbing_of(local, view, &own, network)
    }

    /// [`Agent::plumbing`] from this node's attachments as already read.
    pub(crate) fn plumbing_of(
        &self,
        local: &Local,
        view: &View,
        own: &BTreeMap<String, AttachmentRecord>,
        network: &str,
    ) -> Option<NetworkPlumbing> {
        let att = own.get(network)?;
        let n = view.networks.get(network)?;
        Some(NetworkPlumbing {
            name: network.to_owned(),
            vni: n.spec.vni,
            subnet: n.spec.subnet,
            node_address: att.ip,
            mtu: network_mtu(local.underlay.mtu),
        })
    }
}
