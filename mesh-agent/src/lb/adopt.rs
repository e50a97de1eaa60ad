//! A restarted agent's view of the pinned maps: what an earlier agent left programmed.

use super::*;

/// Rebuilds the mirror from the maps. Half-finished changes of a killed agent are repaired:
/// registry entries of active backends that lost their slot become draining, and slots
/// beyond a service's count are deleted.
#[allow(clippy::type_complexity)]
pub(super) fn adopt(
    maps: &mut Maps,
) -> Result<(
    BTreeMap<u32, Programmed>,
    BTreeMap<u32, Network>,
    BTreeMap<u32, Ipv4Addr>,
)> {
    let states = maps.read_states()?;
    let counts: BTreeMap<u32, u32> = states.iter().map(|(i, s)| (*i, s.backends)).collect();
    let mut services: BTreeMap<u32, Programmed> = BTreeMap::new();
    for (index, state) in states {
        services.insert(
            index,
            Programmed {
                index,
                name: format!("#{index}"),
                network: state.network,
                ..Default::default()
            },
        );
    }
    for (key, entry) in maps.read_service_keys()? {
        match services.get_mut(&entry.service) {
            Some(p) => {
                p.keys.insert(key, entry);
            }
            None => maps.del_service_key(key)?,
        }
    }
    let registry: BTreeMap<u32, Backend> = maps.read_backends()?.into_iter().collect();
    let mut slotted: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
    for (key, id) in maps.read_slots()? {
        let count = counts.get(&key.service).copied().unwrap_or(0);
        if key.slot < count && registry.contains_key(&id) {
            slotted.entry(key.service).or_default().insert(key.slot, id);
        } else {
            maps.del_slot(key.service, key.slot)?;
        }
    }
    let mut backend_addrs = BTreeMap::new();
    for (index, p) in services.iter_mut() {
        let slots = slotted.remove(index).unwrap_or_default();
        let count = counts.get(index).copied().unwrap_or(0) as usize;
        let complete = slots.len() == count && slots.keys().copied().eq(0..count as u32);
        for id in slots.values() {
            p.slots.push((Ipv4Addr::from(registry[id].addr), *id));
        }
        if !complete {
            // A hole: rewrite this service's slots densely.
            warn!(
                index,
                "repairing the backend slots of a half-updated service"
            );
            for (i, (_, id)) in p.slots.iter().enumerate() {
                maps.put_slot(*index, i as u32, *id)?;
            }
            maps.put_state(*index, p.state())?;
            for i in p.slots.len()..count {
                maps.del_slot(*index, i as u32)?;
            }
        }
    }
    for (id, b) in &registry {
        let Some(p) = services.get_mut(&b.service) else {
            maps.put_backend(*id, Backend::default())?;
            continue;
        };
        let ip = Ipv4Addr::from(b.addr);
        backend_addrs.insert(*id, ip);
        if p.slots.iter().any(|(_, sid)| sid == id) {
            continue;
        }
        if b.state != BACKEND_DRAINING {
            maps.put_backend(
                *id,
                Backend {
                    state: BACKEND_DRAINING,
                    ..*b
                },
            )?;
        }
        p.draining.insert(ip, *id);
    }
    let networks: BTreeMap<u32, Network> = maps.read_networks()?.into_iter().collect();
    maps.sync_overlays(&networks)?;
    Ok((services, networks, backend_addrs))
}
