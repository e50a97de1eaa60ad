//! Tables the maps cannot represent are refused before anything is written.

use super::*;

/// Rejects a table the maps cannot represent, with the service names involved.
pub(super) fn validate(desired: &[ServiceLb], maps: &Maps) -> Result<()> {
    let mut ids = BTreeSet::new();
    let mut owners: BTreeMap<ServiceKey, &str> = BTreeMap::new();
    let mut networks: BTreeMap<u32, &NetworkLb> = BTreeMap::new();
    for s in desired {
        if !ids.insert(s.id.as_str()) {
            bail!("service id {} appears twice in the service table", s.id);
        }
        if s.network.node_addr.is_unspecified() {
            bail!(
                "service {}: network {} has no node address on this node",
                s.name,
                s.network.id
            );
        }
        if s.network.bridge_ifindex == 0 {
            bail!(
                "service {}: network {} has no bridge on this node yet",
                s.name,
                s.network.id
            );
        }
        if let Some(other) = networks.insert(s.network.id, &s.network)
            && other != &s.network
        {
            bail!(
                "network {} is described two ways ({:?} and {:?})",
                s.network.id,
                other,
                s.network
            );
        }
        for p in &s.ports {
            if p.published == 0 || p.target == 0 {
                bail!(
                    "service {}: port mapping {}:{}/{} is out of range (1-65535)",
                    s.name,
                    p.published,
                    p.target,
                    p.proto
                );
            }
        }
        if s.backends.len() > maps.max_backends() as usize {
            bail!(
                "service {} has {} backends, more than the load balancer's limit of {}",
                s.name,
                s.backends.len(),
                maps.max_backends()
            );
        }
        for k in s.keys().keys() {
            if let Some(other) = owners.insert(*k, s.name.as_str()) {
                if k.is_published() {
                    bail!(
                        "port {}/{} is already published by service {other}, cannot publish it \
                         for {}",
                        k.port,
                        Protocol::from_number(k.proto).expect("tcp or udp"),
                        s.name
                    );
                }
                bail!(
                    "VIP {} is already used by service {other}, cannot use it for {}",
                    Ipv4Addr::from(k.addr),
                    s.name
                );
            }
        }
    }
    Ok(())
}
