//! Typed handles on the load balancer's pinned maps. Every write goes through here so
//! `apply` can report exactly how many map operations a change cost (the traffic counters
//! through their own mapping, counters.rs).

use std::{collections::BTreeMap, fs, net::Ipv4Addr, path::Path};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, MapError, MapInfo, MapType, PerCpuArray},
};
use mesh_common::lb::{
    BACKEND_COUNTERS_MAP, BACKENDS_MAP, Backend, CONFIG_MAP, EMBRYOS_MAP, Embryo, FLOWS_MAP, Flow,
    FlowKey, LbConfig, NETWORKS_MAP, Network, OVERLAYS_MAP, RR_MAP, Reason, SERVICE_COUNTERS_MAP,
    SERVICE_STATE_MAP, SERVICES_MAP, SLOTS_MAP, SNAT_RESERVED_MAP, SOCK_FWD_MAP, SOCK_REV_MAP,
    STATS_MAP, ServiceEntry, ServiceKey, ServiceState, SlotKey, SockKey, SockTarget,
    TrafficCounters,
};
use tracing::warn;

use super::counters::{BPF_F_MMAPABLE, StripedCounters, possible_cpus};

/// Map operations issued by one `apply`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapOps {
    pub updates: usize,
    pub deletes: usize,
}

impl MapOps {
    pub fn total(&self) -> usize {
        self.updates + self.deletes
    }
}

pub(super) struct Maps {
    config: Array<MapData, LbConfig>,
    services: HashMap<MapData, ServiceKey, ServiceEntry>,
    state: Array<MapData, ServiceState>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: Array<MapData, Backend>,
    networks: HashMap<MapData, u32, Network>,
    /// VXLAN device → network: kept by the network writes below, so it always matches.
    overlays: HashMap<MapData, u32, u32>,
    rr: Array<MapData, u64>,
    pub(super) flows: HashMap<MapData, FlowKey, Flow>,
    embryos: HashMap<MapData, FlowKey, Embryo>,
    snat_reserved: HashMap<MapData, FlowKey, u64>,
    // Held so the socket maps stay open with the others; only the programs use them.
    _sock_fwd: HashMap<MapData, SockKey, SockTarget>,
    _sock_rev: HashMap<MapData, SockKey, SockTarget>,
    service_counters: StripedCounters,
    backend_counters: StripedCounters,
    stats: PerCpuArray<MapData, u64>,
    pub(super) ops: MapOps,
}

/// Checks that a map pinned by an earlier agent has the layout this build expects: aya
/// reuses a pinned map by name without comparing it, and a mismatch would make the
/// programs and the agent disagree about every entry.
pub(crate) fn check_pinned_layouts(pin_dir: &Path) -> Result<()> {
    use std::mem::size_of;
    let expected: [(&str, usize, usize); 16] = [
        (CONFIG_MAP, 4, size_of::<LbConfig>()),
        (
            SERVICES_MAP,
            size_of::<ServiceKey>(),
            size_of::<ServiceEntry>(),
        ),
        (SERVICE_STATE_MAP, 4, size_of::<ServiceState>()),
        (SLOTS_MAP, size_of::<SlotKey>(), 4),
        (BACKENDS_MAP, 4, size_of::<Backend>()),
        (NETWORKS_MAP, 4, size_of::<Network>()),
        (OVERLAYS_MAP, 4, 4),
        (RR_MAP, 4, 8),
        (FLOWS_MAP, size_of::<FlowKey>(), size_of::<Flow>()),
        (EMBRYOS_MAP, size_of::<FlowKey>(), size_of::<Embryo>()),
        (SNAT_RESERVED_MAP, size_of::<FlowKey>(), 8),
        (SOCK_FWD_MAP, size_of::<SockKey>(), size_of::<SockTarget>()),
        (SOCK_REV_MAP, size_of::<SockKey>(), size_of::<SockTarget>()),
        (SERVICE_COUNTERS_MAP, 4, size_of::<TrafficCounters>()),
        (BACKEND_COUNTERS_MAP, 4, size_of::<TrafficCounters>()),
        (STATS_MAP, 4, 8),
    ];
    for name in [SERVICE_COUNTERS_MAP, BACKEND_COUNTERS_MAP] {
        let pin = pin_dir.join(name);
        let Ok(info) = MapInfo::from_pin(&pin) else {
            continue;
        };
        let striped =
            matches!(info.map_type(), Ok(MapType::Array)) && info.map_flags() & BPF_F_MMAPABLE != 0;
        if !striped {
            // An older mesh kept these per CPU (a per-CPU array). Only counters: they
            // restart from zero, the flows and services they count are kept.
            warn!(
                pin = %pin.display(),
                "re-creating the traffic counters pinned by an older mesh version in another \
                 layout; they restart from zero"
            );
            fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        }
    }
    for (name, key, value) in expected {
        let pin = pin_dir.join(name);
        let info = match MapInfo::from_pin(&pin) {
            Ok(info) => info,
            // Not pinned yet: the loader creates it with our layout.
            Err(_) if !pin.exists() => continue,
            Err(e) => return Err(e).with_context(|| format!("inspecting {}", pin.display())),
        };
        if info.key_size() as usize != key || info.value_size() as usize != value {
            if name == NETWORKS_MAP {
                // Written whole from the table on every apply, and only a shortcut for the
                // flows: until it is, forward entries fall back to their stored bridge.
                warn!(
                    pin = %pin.display(),
                    "re-creating a map pinned by an older mesh version with another layout"
                );
                fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
                continue;
            }
            bail!(
                "the pinned map {} was created by an incompatible mesh version (key {} / value {} \
                 bytes, this version uses {key} / {value}); remove {} to start with empty tables \
                 (established routing-mesh connections will be reset)",
                pin.display(),
                info.key_size(),
                info.value_size(),
                pin_dir.display()
            );
        }
    }
    Ok(())
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Maps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let cpus = possible_cpus()?;
        Ok(Self {
            config: take(ebpf, CONFIG_MAP)?,
            services: take(ebpf, SERVICES_MAP)?,
            state: take(ebpf, SERVICE_STATE_MAP)?,
            slots: take(ebpf, SLOTS_MAP)?,
            backends: take(ebpf, BACKENDS_MAP)?,
            networks: take(ebpf, NETWORKS_MAP)?,
            overlays: take(ebpf, OVERLAYS_MAP)?,
            rr: take(ebpf, RR_MAP)?,
            flows: take(ebpf, FLOWS_MAP)?,
            embryos: take(ebpf, EMBRYOS_MAP)?,
            snat_reserved: take(ebpf, SNAT_RESERVED_MAP)?,
            _sock_fwd: take(ebpf, SOCK_FWD_MAP)?,
            _sock_rev: take(ebpf, SOCK_REV_MAP)?,
            service_counters: StripedCounters::take(ebpf, SERVICE_COUNTERS_MAP, cpus)?,
            backend_counters: StripedCounters::take(ebpf, BACKEND_COUNTERS_MAP, cpus)?,
            stats: take(ebpf, STATS_MAP)?,
            ops: MapOps::default(),
        })
    }

    /// Ids run from 1; each map indexed by id must hold them (pinned maps keep the sizes
    /// they were made with).
    pub(super) fn max_services(&self) -> u32 {
        self.state
            .len()
            .min(self.service_counters.stride())
            .saturating_sub(1)
    }

    pub(super) fn max_backends(&self) -> u32 {
        self.backends
            .len()
            .min(self.backend_counters.stride())
            .saturating_sub(1)
    }

    // --- writes (counted) ---

    pub(super) fn set_config(&mut self, cfg: LbConfig) -> Result<()> {
        self.ops.updates += 1;
        self.config
            .set(0, cfg, 0)
            .context("writing the node's load balancer settings")
    }

    pub(super) fn put_service_key(&mut self, key: ServiceKey, entry: ServiceEntry) -> Result<()> {
        self.ops.updates += 1;
        self.services
            .insert(key, entry, 0)
            .with_context(|| format!("adding {} to {SERVICES_MAP}", describe_key(&key)))
    }

    pub(super) fn del_service_key(&mut self, key: ServiceKey) -> Result<()> {
        self.ops.deletes += 1;
        ignore_missing(self.services.remove(&key))
            .with_context(|| format!("removing {} from {SERVICES_MAP}", describe_key(&key)))
    }

    pub(super) fn put_state(&mut self, service: u32, state: ServiceState) -> Result<()> {
        self.ops.updates += 1;
        self.state
            .set(service, state, 0)
            .with_context(|| format!("writing {SERVICE_STATE_MAP}[{service}]"))
    }

    pub(super) fn put_slot(&mut self, service: u32, slot: u32, backend: u32) -> Result<()> {
        self.ops.updates += 1;
        self.slots
            .insert(SlotKey { service, slot }, backend, 0)
            .with_context(|| format!("writing {SLOTS_MAP}[{service}/{slot}]"))
    }

    pub(super) fn del_slot(&mut self, service: u32, slot: u32) -> Result<()> {
        self.ops.deletes += 1;
        ignore_missing(self.slots.remove(&SlotKey { service, slot }))
            .with_context(|| format!("removing {SLOTS_MAP}[{service}/{slot}]"))
    }

    pub(super) fn put_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        self.ops.updates += 1;
        self.backends
            .set(id, backend, 0)
            .with_context(|| format!("writing {BACKENDS_MAP}[{id}]"))
    }

    pub(super) fn put_network(&mut self, id: u32, net: Network) -> Result<()> {
        self.ops.updates += 1;
        self.networks
            .insert(id, net, 0)
            .with_context(|| format!("writing network {id} to {NETWORKS_MAP}"))
    }

    pub(super) fn del_network(&mut self, id: u32) -> Result<()> {
        self.ops.deletes += 1;
        ignore_missing(self.networks.remove(&id))
            .with_context(|| format!("removing network {id} from {NETWORKS_MAP}"))
    }

    /// Makes LB_OVERLAYS the inverse of `networks` (each VXLAN device → its network): after
    /// every change of the networks, and on adopt (an agent killed between the two writes,
    /// or one from before the map existed, left entries behind or missing). Computed whole
    /// rather than per network, so devices that trade ifindexes cannot delete each other's
    /// fresh entries.
    pub(super) fn sync_overlays(&mut self, networks: &BTreeMap<u32, Network>) -> Result<()> {
        let want: BTreeMap<u32, u32> = networks
            .iter()
            .filter(|(_, n)| n.vxlan_ifindex != 0)
            .map(|(id, n)| (n.vxlan_ifindex, *id))
            .collect();
        let have: BTreeMap<u32, u32> = self.read_overlays()?.into_iter().collect();
        for vxlan in have.keys().filter(|v| !want.contains_key(v)) {
            self.ops.deletes += 1;
            ignore_missing(self.overlays.remove(vxlan))
                .with_context(|| format!("removing {OVERLAYS_MAP}[{vxlan}]"))?;
        }
        for (vxlan, id) in &want {
            if have.get(vxlan) != Some(id) {
                self.ops.updates += 1;
                self.overlays
                    .insert(vxlan, id, 0)
                    .with_context(|| format!("writing {OVERLAYS_MAP}[{vxlan}]"))?;
            }
        }
        Ok(())
    }

    /// A recycled id starts from zero counters and a fresh round-robin cursor.
    pub(super) fn reset_service_counters(&mut self, service: u32) -> Result<()> {
        self.ops.updates += 2;
        self.service_counters
            .reset(service)
            .with_context(|| format!("resetting {SERVICE_COUNTERS_MAP}[{service}]"))?;
        self.rr
            .set(service, 0, 0)
            .with_context(|| format!("resetting {RR_MAP}[{service}]"))
    }

    pub(super) fn reset_backend_counters(&mut self, backend: u32) -> Result<()> {
        self.ops.updates += 1;
        self.backend_counters
            .reset(backend)
            .with_context(|| format!("resetting {BACKEND_COUNTERS_MAP}[{backend}]"))
    }

    // --- reads ---

    pub(super) fn read_states(&self) -> Result<Vec<(u32, ServiceState)>> {
        let mut out = Vec::new();
        for (i, s) in self.state.iter().enumerate() {
            let s = s.with_context(|| format!("reading {SERVICE_STATE_MAP}"))?;
            if s.flags != 0 {
                out.push((i as u32, s));
            }
        }
        Ok(out)
    }

    pub(super) fn read_service_keys(&self) -> Result<Vec<(ServiceKey, ServiceEntry)>> {
        collect(self.services.iter()).with_context(|| format!("reading {SERVICES_MAP}"))
    }

    pub(super) fn read_slots(&self) -> Result<Vec<(SlotKey, u32)>> {
        collect(self.slots.iter()).with_context(|| format!("reading {SLOTS_MAP}"))
    }

    pub(super) fn read_backends(&self) -> Result<Vec<(u32, Backend)>> {
        let mut out = Vec::new();
        for (i, b) in self.backends.iter().enumerate() {
            let b = b.with_context(|| format!("reading {BACKENDS_MAP}"))?;
            if b.state != 0 {
                out.push((i as u32, b));
            }
        }
        Ok(out)
    }

    pub(super) fn read_networks(&self) -> Result<Vec<(u32, Network)>> {
        collect(self.networks.iter()).with_context(|| format!("reading {NETWORKS_MAP}"))
    }

    pub(super) fn read_overlays(&self) -> Result<Vec<(u32, u32)>> {
        collect(self.overlays.iter()).with_context(|| format!("reading {OVERLAYS_MAP}"))
    }

    pub(super) fn read_config(&self) -> Result<LbConfig> {
        self.config
            .get(&0, 0)
            .context("reading the node's settings")
    }

    pub(super) fn service_counters(&self, service: u32) -> Result<TrafficCounters> {
        self.service_counters
            .get(service)
            .with_context(|| format!("reading {SERVICE_COUNTERS_MAP}[{service}]"))
    }

    pub(super) fn backend_counters(&self, backend: u32) -> Result<TrafficCounters> {
        self.backend_counters
            .get(backend)
            .with_context(|| format!("reading {BACKEND_COUNTERS_MAP}[{backend}]"))
    }

    pub(super) fn reasons(&self) -> Result<Vec<(Reason, u64)>> {
        Reason::ALL
            .iter()
            .map(|r| {
                let per_cpu = self
                    .stats
                    .get(&(*r as u32), 0)
                    .with_context(|| format!("reading {STATS_MAP}"))?;
                Ok((*r, per_cpu.iter().sum()))
            })
            .collect()
    }

    pub(super) fn read_flows(&self) -> Result<Vec<(FlowKey, Flow)>> {
        // Entries can vanish (LRU, another sweep) between listing a key and reading it.
        let mut out = Vec::new();
        for item in self.flows.iter() {
            match item {
                Ok(kv) => out.push(kv),
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {FLOWS_MAP}")),
            }
        }
        Ok(out)
    }

    /// Removes the flow entry of `key` if it still is `seen`; whether it did.
    pub(super) fn del_flow_if(&mut self, key: &FlowKey, seen: &Flow) -> Result<bool> {
        remove_if(&mut self.flows, FLOWS_MAP, key, |now| now == seen)
    }

    pub(super) fn read_embryos(&self) -> Result<Vec<(FlowKey, Embryo)>> {
        let mut out = Vec::new();
        for item in self.embryos.iter() {
            match item {
                Ok(kv) => out.push(kv),
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {EMBRYOS_MAP}")),
            }
        }
        Ok(out)
    }

    /// As [`Self::del_flow_if`], for an embryonic entry (its flow part is compared: the
    /// handshake fields change as the handshake goes on).
    pub(super) fn del_embryo_if(&mut self, key: &FlowKey, seen: &Flow) -> Result<bool> {
        remove_if(&mut self.embryos, EMBRYOS_MAP, key, |now| now.flow == *seen)
    }

    /// Holds the SNAT port of `reply_key` (a closed flow's reply entry) until `until`
    /// (CLOCK_MONOTONIC ns).
    pub(super) fn reserve_snat_port(&mut self, reply_key: &FlowKey, until: u64) -> Result<()> {
        self.snat_reserved
            .insert(reply_key, until, 0)
            .with_context(|| format!("writing {SNAT_RESERVED_MAP}"))
    }

    pub(super) fn read_reservations(&self) -> Result<Vec<(FlowKey, u64)>> {
        collect(self.snat_reserved.iter()).with_context(|| format!("reading {SNAT_RESERVED_MAP}"))
    }

    pub(super) fn del_reservation(&mut self, key: &FlowKey) -> Result<()> {
        ignore_missing(self.snat_reserved.remove(key))
            .with_context(|| format!("removing a reservation from {SNAT_RESERVED_MAP}"))
    }

    pub(super) fn count_reservations(&self) -> Result<u64> {
        Ok(self.read_reservations()?.len() as u64)
    }
}

fn collect<K, V>(iter: impl Iterator<Item = Result<(K, V), MapError>>) -> Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    for item in iter {
        match item {
            Ok(kv) => out.push(kv),
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Removes the entry of `key` from the flow table `map` (named `name`) if `still` holds for
/// its value as it is now; whether it did. BPF maps have no compare-and-delete: a lookup,
/// then the delete.
fn remove_if<V: aya::Pod>(
    map: &mut HashMap<MapData, FlowKey, V>,
    name: &str,
    key: &FlowKey,
    still: impl FnOnce(&V) -> bool,
) -> Result<bool> {
    match map.get(key, 0) {
        Ok(now) if still(&now) => {}
        Ok(_) | Err(MapError::KeyNotFound) => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("reading {name}")),
    }
    ignore_missing(map.remove(key)).with_context(|| format!("removing a flow from {name}"))?;
    Ok(true)
}

fn describe_key(key: &ServiceKey) -> String {
    let proto = super::Protocol::from_number(key.proto)
        .map(|p| p.to_string())
        .unwrap_or_else(|| key.proto.to_string());
    if key.is_published() {
        format!("published port {}/{proto}", key.port)
    } else {
        format!("VIP {}/{proto}", Ipv4Addr::from(key.addr))
    }
}
