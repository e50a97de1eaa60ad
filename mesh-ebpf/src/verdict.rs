//! What a TC program does with a packet, and the one place a verdict is counted: every
//! program's pipeline ends in a [`Verdict`], and its entry point hands it to [`finish`].

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use mesh_common::lb::Reason;

use crate::stats;

/// What happens to a packet: a TC action and the reason it is counted under. A plain struct
/// with every field always set: LLVM may move the undefined payload of a data-less enum
/// variant through a register, which the verifier rejects as reading an uninitialized one.
#[derive(Clone, Copy)]
pub(crate) struct Verdict {
    pub action: i32,
    pub reason: u32,
}

/// `Verdict::reason` of packets that are not ours: not counted.
pub(crate) const UNCOUNTED: u32 = u32::MAX;

impl Verdict {
    pub(crate) const PASS: Self = Self {
        action: TC_ACT_OK,
        reason: UNCOUNTED,
    };

    pub(crate) const fn pass(r: Reason) -> Self {
        Self {
            action: TC_ACT_OK,
            reason: r as u32,
        }
    }

    pub(crate) const fn drop(r: Reason) -> Self {
        Self {
            action: TC_ACT_SHOT,
            reason: r as u32,
        }
    }

    pub(crate) const fn redirect(action: i32, r: Reason) -> Self {
        Self {
            action,
            reason: r as u32,
        }
    }
}

/// Counts a verdict under its reason and returns its action.
#[inline(always)]
pub(crate) fn finish(v: Verdict) -> i32 {
    if v.reason != UNCOUNTED {
        stats::count_index(v.reason);
    }
    v.action
}
