//! Atomic read-modify-write on map values.
//!
//! The Rust BPF target declares no compare-and-swap, so `AtomicU64::fetch_add` does not
//! exist, and `core::intrinsics::atomic_xadd` with a used result fails in bpf-linker's
//! default `generic` CPU ("Invalid usage of the XADD return value"): only `-C target-cpu=v3`
//! selects the fetching form, and aya-build owns the nested build's RUSTFLAGS. The kernel
//! verifier accepts BPF_ATOMIC | BPF_FETCH (Linux 5.12+) whatever CPU the object was built
//! for, so the instruction is written directly.

use core::arch::asm;

/// Adds `value` to `*target` atomically across CPUs and returns the previous value.
///
/// # Safety
/// `target` must point to a live 8-byte-aligned u64 the verifier accepts for atomics (a map
/// value).
#[inline(always)]
pub unsafe fn fetch_add(target: *mut u64, value: u64) -> u64 {
    let mut v = value;
    // SAFETY: the caller guarantees `target`; the instruction only touches that word.
    unsafe {
        asm!(
            "{v} = atomic_fetch_add((u64 *)({p} + 0), {v})",
            p = in(reg) target,
            v = inout(reg) v,
            options(nostack),
        );
    }
    v
}
