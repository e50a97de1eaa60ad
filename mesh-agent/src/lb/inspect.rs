//! What the maps hold, for `service inspect`, metrics and the flow sweep.

use super::*;
use mesh_api::v1::BackendState;
use mesh_api::v1::BackendStats;
use mesh_api::v1::ServiceStats;

impl LoadBalancer {
    /// The ids under which a service named `name` is programmed (its own, and its
    /// `mode=host` ports' when it has some).
    pub fn programmed_ids(&self, name: &str) -> Vec<String> {
        self.services
            .iter()
            .filter(|(_, p)| p.name == name)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Counters and backends of one service.
    pub fn service_stats(&self, id: &str) -> Result<Option<ServiceStats>> {
        self.services
            .get(id)
            .map(|p| self.stats_of(id, p))
            .transpose()
    }

    /// Counters of every programmed service.
    pub fn stats(&self) -> Result<Vec<ServiceStats>> {
        self.services
            .iter()
            .map(|(id, p)| self.stats_of(id, p))
            .collect()
    }

    fn stats_of(&self, id: &str, p: &Programmed) -> Result<ServiceStats> {
        let mut backends = Vec::new();
        for (slot, (ip, bid)) in p.slots.iter().enumerate() {
            backends.push(BackendStats {
                ip: *ip,
                state: BackendState::Active,
                slot: Some(slot as u32),
                counters: super::counters(self.maps.backend_counters(*bid)?),
            });
        }
        for (ip, bid) in &p.draining {
            backends.push(BackendStats {
                ip: *ip,
                state: BackendState::Draining,
                slot: None,
                counters: super::counters(self.maps.backend_counters(*bid)?),
            });
        }
        Ok(ServiceStats {
            id: id.to_owned(),
            name: p.name.clone(),
            index: p.index,
            counters: super::counters(self.maps.service_counters(p.index)?),
            backends,
        })
    }

    /// Packets and socket calls per reason (translated, passed, dropped), summed over CPUs.
    pub fn reasons(&self) -> Result<Vec<(Reason, u64)>> {
        self.maps.reasons()
    }

    /// LB_OVERLAYS: each network's VXLAN device on this node → the network.
    pub fn overlays(&self) -> Result<std::collections::BTreeMap<u32, u32>> {
        Ok(self.maps.read_overlays()?.into_iter().collect())
    }

    /// Every entry of the flow tables (both directions of each flow), established ones and
    /// embryonic ones (flagged FLOW_EMBRYO).
    pub fn flows(&self) -> Result<Vec<(FlowKey, Flow)>> {
        let mut all = self.maps.read_flows()?;
        all.extend(
            self.maps
                .read_embryos()?
                .into_iter()
                .map(|(k, e)| (k, e.flow)),
        );
        Ok(all)
    }

    /// How full the flow tables are, and how many embryonic flows were pushed out of theirs.
    pub fn flow_table(&self) -> Result<FlowTableStats> {
        let count = |flows: &[(FlowKey, Flow)]| {
            flows
                .iter()
                .filter(|(_, f)| f.flags & mesh_common::lb::FLOW_REPLY == 0)
                .count() as u64
        };
        let established = count(&self.maps.read_flows()?);
        let embryos: Vec<(FlowKey, Flow)> = self
            .maps
            .read_embryos()?
            .into_iter()
            .map(|(k, e)| (k, e.flow))
            .collect();
        let embryonic = count(&embryos);
        let reasons = self.maps.reasons()?;
        let reason = |r: Reason| reasons.iter().find(|(x, _)| *x == r).map_or(0, |(_, n)| *n);
        // The kernel's LRU does not count what it evicts: every flow created left the
        // embryo table by promotion, by the sweep, by a reused client port, or by eviction.
        let embryonic_evicted = reason(Reason::NewFlow)
            .saturating_sub(reason(Reason::Promoted))
            .saturating_sub(self.embryos_swept)
            .saturating_sub(embryonic);
        Ok(FlowTableStats {
            established,
            embryonic,
            snat_reserved: self.maps.count_reservations()?,
            embryonic_evicted,
            promoted: reason(Reason::Promoted),
        })
    }

    /// Removes finished and idle flows, and flows of backends that are gone.
    pub fn sweep(&mut self, timeouts: &FlowTimeouts) -> Result<SweepReport> {
        let plan = self.plan_sweep(timeouts)?;
        self.finish_sweep(plan)
    }

    /// The first half of [`Self::sweep`]: what it removes and reserves, decided from one
    /// listing of the flow tables; nothing is written.
    pub fn plan_sweep(&self, timeouts: &FlowTimeouts) -> Result<SweepPlan> {
        sweep::plan(&self.maps, &self.backend_addrs, timeouts)
    }

    /// The second half: removes each planned entry that still holds what the listing saw
    /// (a 5-tuple reused for a new connection meanwhile is that connection's), and writes
    /// the SNAT reservations.
    pub fn finish_sweep(&mut self, plan: SweepPlan) -> Result<SweepReport> {
        let r = sweep::finish(&mut self.maps, plan)?;
        self.embryos_swept += r.embryos_removed as u64;
        Ok(r)
    }
}
