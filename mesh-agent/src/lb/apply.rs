//! `apply`: the desired table diffed against what is programmed, and only the map operations
//! the difference needs.

use super::*;

impl LoadBalancer {
    /// Makes the maps hold exactly `desired` (the whole table for this node), issuing only
    /// the operations the difference needs. Nothing is changed when the table is invalid.
    pub fn apply(&mut self, desired: &[ServiceLb]) -> Result<MapOps> {
        validate(desired, &self.maps)?;
        self.maps.ops = MapOps::default();
        self.claim_adopted(desired);

        // Shrink first, so a key moving from one service to another is freed before it is
        // taken, and ids are released before new ones are needed.
        let wanted: BTreeSet<&str> = desired.iter().map(|s| s.id.as_str()).collect();
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|id| !wanted.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            let p = self.services.remove(&id).expect("listed above");
            self.remove_service(p)?;
        }
        for (_, p) in std::mem::take(&mut self.adopted) {
            info!(
                index = p.index,
                "removing a service the pinned maps held but the table does not"
            );
            self.remove_service(p)?;
        }
        for s in desired {
            if let Some(p) = self.services.get(&s.id) {
                let keys = s.keys();
                let stale: Vec<ServiceKey> = p
                    .keys
                    .keys()
                    .filter(|k| !keys.contains_key(k))
                    .copied()
                    .collect();
                for k in stale {
                    self.maps.del_service_key(k)?;
                    self.services
                        .get_mut(&s.id)
                        .expect("present")
                        .keys
                        .remove(&k);
                }
            }
        }

        let networks: BTreeMap<u32, Network> = desired
            .iter()
            .map(|s| {
                (
                    s.network.id,
                    Network {
                        node_addr: s.network.node_addr.octets(),
                        ifindex: s.network.bridge_ifindex,
                        vxlan_ifindex: s.network.vxlan_ifindex,
                    },
                )
            })
            .collect();
        let mut networks_changed = false;
        for (id, net) in &networks {
            if self.networks.get(id) != Some(net) {
                self.maps.put_network(*id, *net)?;
                self.networks.insert(*id, *net);
                networks_changed = true;
            }
        }

        for s in desired {
            self.upsert_service(s)?;
        }

        let unused: Vec<u32> = self
            .networks
            .keys()
            .filter(|id| !networks.contains_key(id))
            .copied()
            .collect();
        for id in unused {
            self.maps.del_network(id)?;
            self.networks.remove(&id);
            networks_changed = true;
        }
        if networks_changed {
            self.maps.sync_overlays(&self.networks)?;
        }
        let ops = self.maps.ops;
        if ops.total() > 0 {
            debug!(
                updates = ops.updates,
                deletes = ops.deletes,
                "load balancer maps updated"
            );
        }
        Ok(ops)
    }

    /// Matches services found in the pinned maps to desired ones by the keys they hold, so a
    /// restarted agent keeps their ids, counters and backend slots.
    fn claim_adopted(&mut self, desired: &[ServiceLb]) {
        if self.adopted.is_empty() {
            return;
        }
        let mut owner: BTreeMap<ServiceKey, u32> = BTreeMap::new();
        for p in self.adopted.values() {
            for k in p.keys.keys() {
                owner.insert(*k, p.index);
            }
        }
        for s in desired {
            if self.services.contains_key(&s.id) {
                continue;
            }
            let mut votes: BTreeMap<u32, usize> = BTreeMap::new();
            for k in s.keys().keys() {
                if let Some(i) = owner.get(k) {
                    *votes.entry(*i).or_default() += 1;
                }
            }
            let best = votes
                .into_iter()
                .filter(|(i, _)| self.adopted.contains_key(i))
                .max_by_key(|(_, n)| *n);
            if let Some((index, _)) = best {
                let mut p = self.adopted.remove(&index).expect("filtered above");
                p.name = s.name.clone();
                self.services.insert(s.id.clone(), p);
            }
        }
    }

    fn upsert_service(&mut self, s: &ServiceLb) -> Result<()> {
        let mut p = match self.services.remove(&s.id) {
            Some(p) => p,
            None => {
                let index = self.service_ids.alloc().with_context(|| {
                    format!(
                        "cannot add service {}: all {} service slots are in use (raise the \
                         load balancer's service limit)",
                        s.name,
                        self.maps.max_services()
                    )
                })?;
                self.maps.reset_service_counters(index)?;
                Programmed {
                    index,
                    name: s.name.clone(),
                    network: s.network.id,
                    ..Default::default()
                }
            }
        };
        p.name = s.name.clone();
        let result = self.sync_service(&mut p, s);
        // Keep the mirror whatever happened: it describes what the maps now hold.
        self.services.insert(s.id.clone(), p);
        result
    }

    fn sync_service(&mut self, p: &mut Programmed, s: &ServiceLb) -> Result<()> {
        let mut state_dirty = false;
        if p.network != s.network.id {
            p.network = s.network.id;
            state_dirty = true;
        }

        let mut active: Vec<Ipv4Addr> = Vec::new();
        let mut draining: BTreeSet<Ipv4Addr> = BTreeSet::new();
        for b in &s.backends {
            if b.draining {
                draining.insert(b.ip);
            } else if !active.contains(&b.ip) {
                active.push(b.ip);
            }
        }
        draining.retain(|ip| !active.contains(ip));

        // Active backends that are no longer: out of the round robin, one swap each.
        let mut i = 0;
        while i < p.slots.len() {
            let (ip, id) = p.slots[i];
            if active.contains(&ip) {
                i += 1;
                continue;
            }
            self.remove_slot(p, i)?;
            if draining.contains(&ip) {
                self.set_backend(id, ip, p.index, BACKEND_DRAINING)?;
                p.draining.insert(ip, id);
            } else {
                self.free_backend(id)?;
            }
        }
        let gone: Vec<(Ipv4Addr, u32)> = p
            .draining
            .iter()
            .filter(|(ip, _)| !draining.contains(ip) && !active.contains(ip))
            .map(|(ip, id)| (*ip, *id))
            .collect();
        for (ip, id) in gone {
            p.draining.remove(&ip);
            self.free_backend(id)?;
        }
        // New active backends: a draining one comes back with its id and counters.
        for ip in &active {
            if p.slots.iter().any(|(a, _)| a == ip) {
                continue;
            }
            let id = match p.draining.remove(ip) {
                Some(id) => id,
                None => self.new_backend(&s.name, *ip)?,
            };
            self.set_backend(id, *ip, p.index, BACKEND_ACTIVE)?;
            let slot = p.slots.len() as u32;
            self.maps.put_slot(p.index, slot, id)?;
            p.slots.push((*ip, id));
            self.maps.put_state(p.index, p.state())?;
            state_dirty = false;
        }
        for ip in &draining {
            if p.draining.contains_key(ip) {
                continue;
            }
            let id = self.new_backend(&s.name, *ip)?;
            self.set_backend(id, *ip, p.index, BACKEND_DRAINING)?;
            p.draining.insert(*ip, id);
        }
        if state_dirty {
            self.maps.put_state(p.index, p.state())?;
        }

        // Keys last: a service becomes reachable once it has its backends.
        let mut keys = s.keys();
        for e in keys.values_mut() {
            e.service = p.index;
        }
        for (k, e) in keys {
            if p.keys.get(&k) != Some(&e) {
                self.maps.put_service_key(k, e)?;
                p.keys.insert(k, e);
            }
        }
        Ok(())
    }

    /// Removes slot `i`: the last slot moves into the hole, then the count drops, then the
    /// last slot goes. A program reading the old count may miss the last slot; it falls
    /// back to slot 0, which is never the hole while other slots exist.
    fn remove_slot(&mut self, p: &mut Programmed, i: usize) -> Result<()> {
        let last = p.slots.len() - 1;
        if i != last {
            let moved = p.slots[last];
            self.maps.put_slot(p.index, i as u32, moved.1)?;
            p.slots[i] = moved;
        }
        p.slots.pop();
        self.maps.put_state(p.index, p.state())?;
        self.maps.del_slot(p.index, last as u32)
    }

    fn new_backend(&mut self, service: &str, ip: Ipv4Addr) -> Result<u32> {
        let id = self.backend_ids.alloc().with_context(|| {
            format!(
                "cannot add backend {ip} to service {service}: all {} backend slots are in use \
                 (raise the load balancer's backend limit)",
                self.maps.max_backends()
            )
        })?;
        self.maps.reset_backend_counters(id)?;
        Ok(id)
    }

    fn set_backend(&mut self, id: u32, ip: Ipv4Addr, service: u32, state: u32) -> Result<()> {
        self.backend_addrs.insert(id, ip);
        self.maps.put_backend(
            id,
            Backend {
                addr: ip.octets(),
                service,
                state,
            },
        )
    }

    fn free_backend(&mut self, id: u32) -> Result<()> {
        self.maps.put_backend(
            id,
            Backend {
                addr: [0; 4],
                service: 0,
                state: BACKEND_FREE,
            },
        )?;
        self.backend_addrs.remove(&id);
        self.backend_ids.release(id);
        Ok(())
    }

    fn remove_service(&mut self, p: Programmed) -> Result<()> {
        for k in p.keys.keys() {
            self.maps.del_service_key(*k)?;
        }
        self.maps.put_state(p.index, ServiceState::default())?;
        for slot in (0..p.slots.len()).rev() {
            self.maps.del_slot(p.index, slot as u32)?;
        }
        let ids: Vec<u32> = p
            .slots
            .iter()
            .map(|(_, id)| *id)
            .chain(p.draining.values().copied())
            .collect();
        for id in ids {
            self.free_backend(id)?;
        }
        self.service_ids.release(p.index);
        Ok(())
    }
}
