//! Address allocation on this node, from blocks it owns (see `cluster::ipam`).

use std::{collections::HashSet, net::Ipv4Addr, time::Duration};

use anyhow::Context;
use tracing::info;

use super::{Agent, Error, Result};
use crate::cluster::{BlockClaim, Clock, ipam, key};

impl Agent {
    // ---- addresses -----------------------------------------------------------------------

    /// Hands out a free address of `network` from a block this node owns, claiming a new block
    /// when needed. The address is reserved until [`Agent::release`] — by then the record
    /// that uses it is visible in gossip.
    pub async fn allocate(&self, network: &str) -> Result<Ipv4Addr> {
        let mut pending = self.ipam.lock().await;
        for _attempt in 0..8 {
            let view = self.refresh().await;
            let net = view
                .networks
                .get(network)
                .ok_or_else(|| Error::NotFound(format!("network {network} not found")))?;
            let (subnet, gateway) = (net.spec.subnet, net.spec.gateway);
            let claimed = view.blocks.get(network).cloned().unwrap_or_default();
            let settle_ms = self.settle_time().as_millis() as u64;
            let now = Clock::now_ms();
            let mine: Vec<u32> = claimed
                .iter()
                .filter(|(_, s)| {
                    s.node == self.config.node_name && now.saturating_sub(s.ms) >= settle_ms
                })
                .map(|(i, _)| *i)
                .collect();
            let mut used: HashSet<Ipv4Addr> = view.used_addresses(network).into_iter().collect();
            used.extend(
                pending
                    .iter()
                    .filter(|(n, _)| n == network)
                    .map(|(_, ip)| *ip),
            );
            // This node's tasks hold their addresses until their process is gone, even after
            // their endpoint left gossip: a stopping task drains for a while, and a new task
            // given its address meanwhile would answer its connections (or steal its ARP).
            if let Some(local) = self.local() {
                used.extend(
                    local
                        .tasks
                        .list()
                        .iter()
                        .filter(|t| !matches!(t.state, crate::task::ProcessState::Exited { .. }))
                        .flat_map(|t| &t.spec.attachments)
                        .filter(|a| a.network == network)
                        .map(|a| a.address.addr()),
                );
            }
            if let Some(ip) = ipam::allocate(subnet, gateway, &mine, &used) {
                pending.insert((network.to_owned(), ip));
                return Ok(ip);
            }
            // A claim of ours that has not settled yet: wait for it rather than claim more.
            if claimed
                .values()
                .any(|s| s.node == self.config.node_name && now.saturating_sub(s.ms) < settle_ms)
            {
                tokio::time::sleep(Duration::from_millis(settle_ms / 4 + 1)).await;
                continue;
            }
            let index =
                ipam::free_block(subnet, &self.config.node_name, &claimed).ok_or_else(|| {
                    Error::Conflict(format!(
                        "network {network} ({subnet}) has no free addresses left"
                    ))
                })?;
            let claim = BlockClaim {
                network: network.to_owned(),
                index,
                stamp: self.tick(),
            };
            info!(network, block = index, "claiming an address block");
            self.gossip
                .write([(
                    format!("{}{network}:{index}", key::BLOCK),
                    Some(serde_json::to_string(&claim).context("encoding block claim")?),
                )])
                .await;
            tokio::time::sleep(self.settle_time()).await;
        }
        Err(Error::Internal(anyhow::anyhow!(
            "could not allocate an address on network {network}: block claims kept conflicting"
        )))
    }

    /// Forgets a reservation once the address is published (or no longer needed).
    pub async fn release(&self, network: &str, ip: Ipv4Addr) {
        self.ipam.lock().await.remove(&(network.to_owned(), ip));
    }
}
