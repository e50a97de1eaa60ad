//! The routing mesh and service VIPs on this node: which bridges carry the load balancer, and
//! what the load balancer's maps hold, derived from the merged view.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use tracing::{info, warn};

use super::{Agent, Local};
use crate::{
    api::short_id,
    cluster::{EndpointMode, Protocol, View},
    lb::{self, BackendLb, FlowTimeouts, NetworkLb, PublishedPort, ServiceLb},
    overlay::NetworkPlumbing,
};

impl Agent {
    /// Puts the load balancer on every plumbed network's bridge (replies from tasks arrive
    /// there) and programs every service of those networks.
    pub(crate) async fn converge_routing(
        &self,
        local: &Local,
        view: &View,
        plumbed: &[NetworkPlumbing],
    ) -> Result<()> {
        let mut dp = local.dataplane.lock().await;
        let mut bridges = local.lb_bridges.lock().await;
        let mut ifindex: BTreeMap<u32, u32> = BTreeMap::new();
        for n in plumbed {
            let name = n.bridge();
            let idx = nix::net::if_::if_nametoindex(name.as_str())
                .with_context(|| format!("looking up bridge {name}"))?;
            if bridges.get(&name) != Some(&idx) {
                // A re-created bridge has a new index; its old link died with it.
                dp.detach_tc(&name)?;
                dp.attach_network(idx)?;
                bridges.insert(name.clone(), idx);
            }
            ifindex.insert(n.vni, idx);
        }
        let gone: Vec<String> = bridges
            .keys()
            .filter(|b| !plumbed.iter().any(|n| n.bridge() == **b))
            .cloned()
            .collect();
        for b in gone {
            dp.detach_tc(&b)?;
            bridges.remove(&b);
        }

        let mut desired = Vec::new();
        for s in view.services.values() {
            let Some(net) = plumbed.iter().find(|n| n.name == s.spec.network) else {
                continue;
            };
            desired.push(ServiceLb {
                id: short_id(&s.spec.name, &s.created),
                name: s.spec.name.clone(),
                network: NetworkLb {
                    id: net.vni,
                    node_addr: net.node_address,
                    bridge_ifindex: ifindex[&net.vni],
                },
                vip: match s.spec.endpoint_mode {
                    EndpointMode::Vip => s.spec.vip,
                    EndpointMode::Dnsrr => None,
                },
                ports: s
                    .spec
                    .ports
                    .iter()
                    .filter_map(|p| {
                        Some(PublishedPort {
                            proto: match p.protocol {
                                Protocol::Tcp => lb::Protocol::Tcp,
                                Protocol::Udp => lb::Protocol::Udp,
                            },
                            published: p.published?,
                            target: p.target,
                        })
                    })
                    .collect(),
                // Tasks of drained nodes keep their connections but get no new ones.
                backends: view
                    .backends(&s.spec.name)
                    .map(|e| BackendLb {
                        ip: e.record.ip,
                        draining: !e.active,
                    })
                    .collect(),
            });
        }
        let ops = dp
            .lb_mut()
            .apply(&desired)
            .context("programming the load balancer")?;
        if ops.total() > 0 {
            info!(
                updates = ops.updates,
                deletes = ops.deletes,
                "load balancer programmed"
            );
        }
        Ok(())
    }

    /// Removes finished and orphaned flows, forever (every few seconds).
    pub async fn sweep_flows(self: std::sync::Arc<Self>) {
        let Some(local) = self.local() else {
            return;
        };
        let timeouts: FlowTimeouts = self.config.dataplane.flow_timeouts();
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            let mut dp = local.dataplane.lock().await;
            match dp.lb_mut().sweep(&timeouts) {
                Ok(r) if r.removed > 0 => {
                    tracing::debug!(removed = r.removed, scanned = r.scanned, "flow sweep")
                }
                Ok(_) => {}
                Err(e) => warn!("sweeping flows: {e:#}"),
            }
        }
    }
}
