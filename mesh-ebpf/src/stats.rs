//! Counters: per-reason packet counts and per-service / per-backend traffic. All per CPU
//! (the traffic counters in a stripe per CPU of one array, see mesh_common::lb), so plain
//! adds are race-free.

use core::ptr::read_volatile;

use aya_ebpf::helpers::bpf_get_smp_processor_id;
use mesh_common::lb::{Reason, TrafficCounters, counter_slot};

use crate::programs::{
    LB_BE_COUNTER_STRIDE, LB_BE_COUNTERS, LB_STATS, LB_SVC_COUNTER_STRIDE, LB_SVC_COUNTERS,
};

#[inline(always)]
pub fn count(reason: Reason) {
    count_index(reason as u32);
}

#[inline(always)]
pub fn count_index(reason: u32) {
    if let Some(c) = LB_STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, nobody else writes it while this program runs.
        unsafe { *c += 1 };
    }
}

/// What happened to one packet or socket call of a service, for its counters.
#[derive(Clone, Copy)]
pub enum Traffic {
    /// A packet of `bytes` bytes was translated.
    Packet { bytes: u64, new_flow: bool },
    /// A socket was balanced to a backend (no packets seen).
    Socket,
    /// A packet or connect was dropped for lack of a backend.
    Dropped,
}

#[inline(always)]
pub fn traffic(service: u32, backend: u32, what: Traffic) {
    // SAFETY: a plain helper call.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    // SAFETY: reads of read-only globals.
    let (service_stride, backend_stride) = unsafe {
        (
            read_volatile(&LB_SVC_COUNTER_STRIDE),
            read_volatile(&LB_BE_COUNTER_STRIDE),
        )
    };
    if let Some(c) = counter_slot(cpu, service_stride, service)
        .and_then(|slot| LB_SVC_COUNTERS.get_ptr_mut(slot))
    {
        // SAFETY: this CPU's stripe: nobody else writes it while this program runs.
        add(unsafe { &mut *c }, what);
    }
    if backend != 0
        && let Some(c) = counter_slot(cpu, backend_stride, backend)
            .and_then(|slot| LB_BE_COUNTERS.get_ptr_mut(slot))
    {
        // SAFETY: as above.
        add(unsafe { &mut *c }, what);
    }
}

#[inline(always)]
fn add(c: &mut TrafficCounters, what: Traffic) {
    match what {
        Traffic::Packet { bytes, new_flow } => {
            c.packets += 1;
            c.bytes += bytes;
            if new_flow {
                c.flows += 1;
            }
        }
        Traffic::Socket => c.flows += 1,
        Traffic::Dropped => c.dropped += 1,
    }
}
