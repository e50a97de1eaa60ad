//! Address allocation on this node, from blocks it owns (see `cluster::ipam`).
//!
//! Only this node hands out addresses of its blocks, so what it must not repeat is known
//! here: what the view says is in use, what its own tasks hold, and what it handed out
//! that the view does not show yet. An allocation reads the latest view rather than
//! recomputing it: a recomputation merges the whole gossip state, and under the allocation
//! lock it made every start of a placement wait for every other's (~10 ms each while
//! hundreds of records change).

use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Context;
use tracing::info;

use super::{Agent, Error, Result};
use crate::cluster::{BlockClaim, Clock, ipam, key};

/// Addresses handed out by this node that the view may not show yet.
#[derive(Default)]
pub(super) struct Reserved {
    /// By network and address: `None` while its user is being set up, else when it was
    /// released — after the record that uses it was written to gossip, so a view that
    /// covers the release shows it.
    by_address: BTreeMap<(String, Ipv4Addr), Option<Instant>>,
}

impl Reserved {
    /// Addresses of `network` the view may not show in use.
    fn unseen<'a>(&'a self, network: &'a str) -> impl Iterator<Item = Ipv4Addr> + 'a {
        self.by_address
            .keys()
            .filter(move |(n, _)| n == network)
            .map(|(_, ip)| *ip)
    }

    /// Forgets releases a view covering `covers` shows.
    fn forget_seen(&mut self, covers: Instant) {
        self.by_address
            .retain(|_, released| released.is_none_or(|at| at >= covers));
    }

    fn hold(&mut self, network: &str, ip: Ipv4Addr) {
        self.by_address.insert((network.to_owned(), ip), None);
    }

    fn release(&mut self, network: &str, ip: Ipv4Addr, at: Instant) {
        if let Some(released) = self.by_address.get_mut(&(network.to_owned(), ip)) {
            *released = Some(at);
        }
    }
}

impl Agent {
    // ---- addresses -----------------------------------------------------------------------

    /// Hands out a free address of `network` from a block this node owns, claiming a new block
    /// when needed. The address is reserved until [`Agent::release`] — by then the record
    /// that uses it is visible in gossip.
    pub async fn allocate(&self, network: &str) -> Result<Ipv4Addr> {
        let mut pending = self.ipam.lock().await;
        for attempt in 0..8 {
            // Read before the view: the view is the one covering that instant or a newer one.
            let covers = *self.view_covers.lock().expect("view lock");
            // The latest view first; a recomputed one only when that one has no room (it
            // may not show a block this node claimed since).
            let view = if attempt == 0 {
                self.view()
            } else {
                self.refresh().await
            };
            pending.forget_seen(covers);
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
            used.extend(pending.unseen(network));
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
                pending.hold(network, ip);
                return Ok(ip);
            }
            if attempt == 0 {
                continue;
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

    /// Ends a reservation once the address is published (or no longer needed); it is
    /// forgotten when a view shows the publication.
    pub async fn release(&self, network: &str, ip: Ipv4Addr) {
        let at = Instant::now();
        self.ipam.lock().await.release(network, ip, at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    #[test]
    fn a_released_address_stays_reserved_until_a_view_covers_its_release() {
        let mut r = Reserved::default();
        let before = Instant::now();
        r.hold("app", ip(2));
        r.hold("app", ip(3));
        r.hold("db", ip(2));
        let released = Instant::now();
        r.release("app", ip(2), released);

        // A view from before the release may not show the record that uses the address.
        r.forget_seen(before);
        r.forget_seen(released);
        let mut app: Vec<_> = r.unseen("app").collect();
        app.sort();
        assert_eq!(app, [ip(2), ip(3)]);

        // One read after it does; the addresses still being set up stay reserved whatever
        // the view.
        r.forget_seen(released + Duration::from_millis(1));
        assert_eq!(r.unseen("app").collect::<Vec<_>>(), [ip(3)]);
        assert_eq!(r.unseen("db").collect::<Vec<_>>(), [ip(2)]);
    }

    #[test]
    fn releasing_an_address_never_reserved_reserves_nothing() {
        let mut r = Reserved::default();
        r.release("app", ip(9), Instant::now());
        assert_eq!(r.unseen("app").count(), 0);
    }
}
