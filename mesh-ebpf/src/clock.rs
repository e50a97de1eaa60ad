//! The time flows and returns are stamped with: CLOCK_MONOTONIC coarse nanoseconds, the
//! clock the agent's sweep compares them with.
//!
//! The coarse clock only moves on a timer tick, so each CPU reads it once per tick and keeps
//! it in a per-CPU slot with the tick's jiffies. Both the slot and jiffies are plain loads
//! once the verifier has inlined them, so the packets between two ticks pay no helper call.
//! A reader racing the tick may keep the old time for that tick: at most a tick stale, far
//! below the second the stamps are kept to.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};

use crate::programs::LB_CLOCK;

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no arguments.
    let tick = unsafe { bpf_jiffies64() };
    let Some(slot) = LB_CLOCK.get_ptr_mut(0) else {
        // SAFETY: no arguments.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's slot; nothing else runs on it while this program does.
    let slot = unsafe { &mut *slot };
    if slot[0] != tick || slot[1] == 0 {
        // SAFETY: no arguments.
        slot[1] = unsafe { bpf_ktime_get_coarse_ns() };
        slot[0] = tick;
    }
    slot[1]
}
