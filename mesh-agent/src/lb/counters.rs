//! The traffic counters' maps: one array per kind (services, backends) with a stripe of ids
//! per CPU (`mesh_common::lb::counter_slot`), read and reset through a shared mapping of
//! the array rather than a syscall per entry and CPU, so `service ls` and a metrics scrape
//! of every service stay cheap on a host with many CPUs.

use std::{num::NonZeroUsize, ptr::NonNull, sync::atomic::AtomicU64, sync::atomic::Ordering};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{Map, MapData},
};
use mesh_common::lb::{TrafficCounters, counter_slot};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

/// The map flag that lets an array be mapped into a process (linux/bpf.h).
pub(crate) const BPF_F_MMAPABLE: u32 = 1 << 10;

/// TrafficCounters as the four 64-bit words the programs add to.
type Words = [AtomicU64; 4];
const _: () = assert!(size_of::<TrafficCounters>() == size_of::<Words>());

/// The CPUs the kernel may run a program on: how many stripes a counters map has.
pub(super) fn possible_cpus() -> Result<u32> {
    let cpus =
        aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("counting CPUs ({what}): {e}"))?;
    u32::try_from(cpus).context("counting CPUs")
}

pub(super) struct StripedCounters {
    name: &'static str,
    /// Keeps the map open for as long as it is mapped.
    _map: MapData,
    base: NonNull<Words>,
    /// Bytes mapped.
    len: NonZeroUsize,
    stride: u32,
    cpus: u32,
}

// SAFETY: the mapping belongs to this value alone and is only accessed through atomics
// (the programs write the same words from the kernel, each CPU its own stripe).
unsafe impl Send for StripedCounters {}
// SAFETY: as above; resets need `&mut self`.
unsafe impl Sync for StripedCounters {}

impl StripedCounters {
    /// Takes the counters map `name` out of the loaded object and maps it. Its stripes are
    /// its entries divided by the CPUs the kernel may run programs on.
    pub(super) fn take(ebpf: &mut Ebpf, name: &'static str, cpus: u32) -> Result<Self> {
        let map = ebpf
            .take_map(name)
            .with_context(|| format!("map {name} missing from the eBPF object"))?;
        let Map::Array(map) = map else {
            bail!("map {name} has an unexpected type (an array was expected)");
        };
        let info = map.info().with_context(|| format!("inspecting {name}"))?;
        ensure!(
            info.map_flags() & BPF_F_MMAPABLE != 0,
            "map {name} was created without BPF_F_MMAPABLE"
        );
        ensure!(
            info.value_size() as usize == size_of::<TrafficCounters>(),
            "map {name} holds {}-byte values, not counters",
            info.value_size()
        );
        let entries = info.max_entries();
        ensure!(
            cpus > 0 && entries >= cpus && entries % cpus == 0,
            "map {name} has {entries} entries, not a stripe for each of {cpus} CPUs"
        );
        let len = NonZeroUsize::new(entries as usize * size_of::<Words>())
            .context("an empty counters map")?;
        // SAFETY: a fresh shared mapping of the map's values (the kernel rounds the length
        // up to whole pages and checks it against the array); nothing else aliases it.
        let base = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                map.fd(),
                0,
            )
        }
        .with_context(|| format!("mapping {name} into memory"))?;
        Ok(Self {
            name,
            _map: map,
            base: base.cast(),
            len,
            stride: entries / cpus,
            cpus,
        })
    }

    /// Ids each CPU's stripe holds (the highest id plus one).
    pub(super) fn stride(&self) -> u32 {
        self.stride
    }

    fn words(&self, cpu: u32, id: u32) -> Result<&Words> {
        let Some(slot) = counter_slot(cpu, self.stride, id) else {
            bail!(
                "id {id} is outside {}, whose stripes hold {} ids",
                self.name,
                self.stride
            );
        };
        // SAFETY: slot < stride × cpus = the entries mapped; the mapping lives as long as
        // `self`.
        Ok(unsafe { &*self.base.as_ptr().add(slot as usize) })
    }

    /// The counters of `id`, summed over CPUs.
    pub(super) fn get(&self, id: u32) -> Result<TrafficCounters> {
        let mut sum = TrafficCounters::default();
        for cpu in 0..self.cpus {
            let [flows, packets, bytes, dropped] = self.words(cpu, id)?;
            sum.add(&TrafficCounters {
                flows: flows.load(Ordering::Relaxed),
                packets: packets.load(Ordering::Relaxed),
                bytes: bytes.load(Ordering::Relaxed),
                dropped: dropped.load(Ordering::Relaxed),
            });
        }
        Ok(sum)
    }

    /// Zeroes the counters of `id` on every CPU (a recycled id starts from zero).
    pub(super) fn reset(&mut self, id: u32) -> Result<()> {
        for cpu in 0..self.cpus {
            for word in self.words(cpu, id)? {
                word.store(0, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

impl Drop for StripedCounters {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `take`, with its length; no reference into it
        // outlives `self`.
        if let Err(e) = unsafe { munmap(self.base.cast(), self.len.get()) } {
            tracing::warn!(map = self.name, error = %e, "unmapping the counters");
        }
    }
}
