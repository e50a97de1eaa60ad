//! Published ports the cluster picks: Docker's `--publish 80` (compose `ports: ["80"]`)
//! publishes the target on a free port of the dynamic range, chosen when the service is
//! written so every node programs the same one, and kept across updates and redeploys.

use std::collections::{BTreeMap, BTreeSet};

use mesh_api::spec::{DYNAMIC_PORTS, PortSpec, Protocol, ServiceSpec};

use super::{Error, Result};
use crate::cluster::View;

/// What is taken while one request's services get their ports.
pub(crate) struct PortAssigner {
    taken: BTreeSet<(Protocol, u16)>,
}

impl PortAssigner {
    /// Every port published by a service other than `rewritten` (whose ports this request
    /// decides again), or that a node's agent listens on.
    pub(crate) fn new(view: &View, rewritten: &BTreeSet<&str>) -> Self {
        let mut taken = BTreeSet::new();
        for s in view.services.values() {
            if rewritten.contains(s.spec.name.as_str()) {
                continue;
            }
            taken.extend(
                s.spec
                    .ports
                    .iter()
                    .filter_map(|p| Some((p.protocol, p.published?))),
            );
        }
        for n in view.nodes.values() {
            if let Some(r) = &n.record {
                taken.extend(r.reserved_ports.iter().map(|r| (r.protocol, r.port)));
            }
        }
        taken.insert((Protocol::Udp, crate::overlay::VXLAN_PORT));
        Self { taken }
    }

    /// Gives each of `spec`'s ports without a published side one: the port `current` (the
    /// service as it is) published for the same target, else the lowest free one.
    pub(crate) fn assign(
        &mut self,
        spec: &mut ServiceSpec,
        current: Option<&ServiceSpec>,
    ) -> Result<()> {
        self.taken.extend(
            spec.ports
                .iter()
                .filter_map(|p| Some((p.protocol, p.published?))),
        );
        let mut before: BTreeMap<(Protocol, u16), Vec<u16>> = BTreeMap::new();
        for p in current.map(|c| c.ports.as_slice()).unwrap_or_default() {
            if let Some(published) = p.published.filter(|p| DYNAMIC_PORTS.contains(p)) {
                before
                    .entry((p.protocol, p.target))
                    .or_default()
                    .push(published);
            }
        }
        for p in spec.ports.iter_mut().filter(|p| p.published.is_none()) {
            let kept = before.get_mut(&(p.protocol, p.target)).and_then(|ports| {
                let i = ports
                    .iter()
                    .position(|q| !self.taken.contains(&(p.protocol, *q)))?;
                Some(ports.remove(i))
            });
            let port = match kept {
                Some(port) => port,
                None => self.lowest_free(p)?,
            };
            self.taken.insert((p.protocol, port));
            p.published = Some(port);
        }
        Ok(())
    }

    fn lowest_free(&self, p: &PortSpec) -> Result<u16> {
        DYNAMIC_PORTS
            .clone()
            .find(|q| !self.taken.contains(&(p.protocol, *q)))
            .ok_or_else(|| {
                Error::Conflict(format!(
                    "no free port in {}-{} to publish {}/{} on: publish it on a port of your \
                     choice (PUBLISHED:{})",
                    DYNAMIC_PORTS.start(),
                    DYNAMIC_PORTS.end(),
                    p.target,
                    p.protocol,
                    p.target
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, ports: &[&str]) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            ports: ports.iter().map(|p| p.parse().unwrap()).collect(),
            ..Default::default()
        }
    }

    fn published(s: &ServiceSpec) -> Vec<Option<u16>> {
        s.ports.iter().map(|p| p.published).collect()
    }

    #[test]
    fn targets_alone_get_the_lowest_free_dynamic_ports() {
        let mut a = PortAssigner::new(&View::default(), &BTreeSet::new());
        let mut cache = spec("cache", &["6379", "30000:80", "53/udp"]);
        a.assign(&mut cache, None).unwrap();
        assert_eq!(
            published(&cache),
            vec![Some(30001), Some(30000), Some(30000)]
        );
        // Another service in the same request does not get the same ones.
        let mut web = spec("web", &["80"]);
        a.assign(&mut web, None).unwrap();
        assert_eq!(published(&web), vec![Some(30002)]);
    }

    #[test]
    fn an_update_keeps_the_port_it_was_given() {
        let mut a = PortAssigner::new(&View::default(), &BTreeSet::new());
        let current = spec("cache", &["30007:6379", "30009:80"]);
        let mut next = spec("cache", &["80", "6379", "8080"]);
        a.assign(&mut next, Some(&current)).unwrap();
        assert_eq!(
            published(&next),
            vec![Some(30009), Some(30007), Some(30000)]
        );
    }

    #[test]
    fn a_full_range_is_a_clear_conflict() {
        let mut a = PortAssigner::new(&View::default(), &BTreeSet::new());
        a.taken.extend(DYNAMIC_PORTS.map(|p| (Protocol::Tcp, p)));
        let mut s = spec("web", &["80"]);
        let e = a.assign(&mut s, None).unwrap_err().to_string();
        assert!(e.contains("no free port in 30000-32767"), "{e}");
        let mut u = spec("dns", &["53/udp"]);
        a.assign(&mut u, None).unwrap();
        assert_eq!(
            published(&u),
            vec![Some(30000)],
            "udp ports are counted apart"
        );
    }
}
