//! Cluster-wide objects: networks and node settings (services: see `services.rs`).

use std::{collections::HashSet, net::Ipv4Addr};

use ipnet::Ipv4Net;
use tracing::info;

use super::{Agent, Error, Result};
use crate::cluster::{
    NetworkSpec, NodeSpec, Replicated, View, ipam, key,
    record::{FIRST_VNI, MAX_VNI},
};

impl Agent {
    // ---- networks ------------------------------------------------------------------------

    pub async fn create_network(
        &self,
        name: &str,
        subnet: Option<&str>,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<Replicated<NetworkSpec>> {
        validate_name("network", name)?;
        let view = self.refresh().await;
        if view.networks.contains_key(name) {
            return Err(Error::Conflict(format!("network {name} already exists")));
        }
        let subnet = match subnet {
            Some(s) => {
                let net: Ipv4Net = s.parse().map_err(|_| {
                    Error::Invalid(format!(
                        "invalid subnet {s:?}: expected CIDR notation such as 10.10.0.0/24"
                    ))
                })?;
                ipam::validate_subnet(net).map_err(Error::Invalid)?;
                if let Some(other) = view
                    .networks
                    .values()
                    .find(|o| overlaps(o.spec.subnet, net))
                {
                    return Err(Error::Conflict(format!(
                        "subnet {net} overlaps {} of network {}: pick another --subnet",
                        other.spec.subnet, other.spec.name
                    )));
                }
                net
            }
            None => auto_subnet(&view).ok_or_else(|| {
                Error::Conflict(
                    "no free /24 left in 10.0.0.0/16 for a new network: pass --subnet".into(),
                )
            })?,
        };
        let used_vnis: HashSet<u32> = view
            .networks
            .values()
            .map(|n| n.spec.vni)
            .chain(view.network_conflicts.iter().map(|c| c.object.spec.vni))
            .collect();
        let vni = (FIRST_VNI..=MAX_VNI)
            .find(|v| !used_vnis.contains(v))
            .ok_or_else(|| Error::Conflict("every VXLAN network identifier is in use".into()))?;
        let spec = NetworkSpec {
            name: name.to_owned(),
            subnet,
            gateway: ipam::default_gateway(subnet),
            vni,
            labels: labels.clone(),
        };
        let stamp = self.tick();
        let record = Replicated::new(spec, stamp.clone());
        self.write_object(key::NETWORK, name, &record).await?;
        let view = self.settle().await;
        match view.networks.get(name) {
            Some(n) if n.created == stamp => {
                info!(network = name, %subnet, vni, "network created");
                Ok(n.clone())
            }
            Some(n) => Err(Error::Conflict(format!(
                "network {name} was created at the same time on node {}, whose create came first; \
                 it is the network {name} now (subnet {}). Use it, or pick another name.",
                n.created.node, n.spec.subnet
            ))),
            None => {
                let reason = view
                    .network_conflicts
                    .iter()
                    .find(|c| c.object.created == stamp)
                    .map(|c| c.reason.clone())
                    .unwrap_or_else(|| "it conflicted with a concurrent change".into());
                Err(Error::Conflict(format!(
                    "network {name} was not created: {reason}"
                )))
            }
        }
    }

    pub async fn remove_network(&self, name: &str) -> Result<()> {
        let view = self.refresh().await;
        let Some(net) = view.networks.get(name) else {
            return Err(Error::NotFound(format!(
                "network {name} not found (see `meshctl network ls`)"
            )));
        };
        let services: Vec<&str> = view
            .services
            .values()
            .filter(|s| s.spec.on_network(name))
            .map(|s| s.spec.name.as_str())
            .collect();
        if !services.is_empty() {
            return Err(Error::Conflict(format!(
                "network {name} is in use by service(s) {}: remove them first",
                services.join(", ")
            )));
        }
        let tasks: Vec<String> = view
            .endpoints
            .iter()
            .filter(|e| e.record.network == name)
            .map(|e| format!("{} on {}", e.record.task, e.node))
            .collect();
        if !tasks.is_empty() {
            return Err(Error::Conflict(format!(
                "network {name} has running task(s) {}: remove them first",
                tasks.join(", ")
            )));
        }
        let mut tomb = net.clone();
        tomb.deleted = Some(self.tick());
        self.write_object(key::NETWORK, name, &tomb).await?;
        self.refresh().await;
        info!(network = name, "network removed");
        Ok(())
    }

    // ---- nodes ---------------------------------------------------------------------------

    /// Changes a node's operator settings (from any node).
    pub async fn update_node(
        &self,
        node: &str,
        change: impl FnOnce(&mut NodeSpec),
    ) -> Result<NodeSpec> {
        let view = self.refresh().await;
        if !view.nodes.contains_key(node) {
            return Err(Error::NotFound(format!(
                "node {node} not found (see `meshctl node ls`)"
            )));
        }
        let stamp = self.tick();
        let current = self
            .gossip
            .snapshot()
            .await
            .nodes
            .iter()
            .filter_map(|n| n.kv.get(&format!("{}{node}", key::NODE_SPEC)))
            .filter_map(|v| serde_json::from_str::<Replicated<NodeSpec>>(v).ok())
            .max_by(|a, b| a.updated.cmp(&b.updated));
        let mut record =
            current.unwrap_or_else(|| Replicated::new(NodeSpec::default(), stamp.clone()));
        change(&mut record.spec);
        record.updated = stamp;
        record.deleted = None;
        self.write_object(key::NODE_SPEC, node, &record).await?;
        let view = self.refresh().await;
        Ok(view
            .nodes
            .get(node)
            .map(|n| n.spec.clone())
            .unwrap_or(record.spec))
    }
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The first 10.0.N.0/24 (N ≥ 1) that overlaps no existing network.
fn auto_subnet(view: &View) -> Option<Ipv4Net> {
    (1..=255u8)
        .map(|n| Ipv4Net::new(Ipv4Addr::new(10, 0, n, 0), 24).expect("valid prefix"))
        .find(|s| view.networks.values().all(|o| !overlaps(o.spec.subnet, *s)))
}

/// [`mesh_api::spec::validate_name`], as the agent's error.
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    mesh_api::spec::validate_name(kind, name).map_err(Error::Invalid)
}
