//! What the server has done, for the agent's metrics and `meshctl` status.

use std::sync::atomic::{AtomicU64, Ordering};

/// A point-in-time copy of the server's counters, summed over all its listeners.
///
/// Every well-formed query is counted in `queries` and then in exactly one of
/// `answered_locally` or `forwarded`; `malformed` messages are not queries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Well-formed queries received.
    pub queries: u64,
    /// Queries answered from the snapshot (records, NODATA, NXDOMAIN, NOTIMP).
    pub answered_locally: u64,
    /// Queries sent on to the upstream resolvers.
    pub forwarded: u64,
    /// Upstream attempts that failed: timeout, unreachable, garbage, SERVFAIL or REFUSED.
    pub upstream_failures: u64,
    /// Forwarded queries that no upstream answered; the client got SERVFAIL.
    pub unanswered: u64,
    /// Truncated UDP answers from an upstream that were asked again over TCP.
    pub tcp_fallbacks: u64,
    /// Messages dropped without an answer: not DNS, a response, or not exactly one question.
    pub malformed: u64,
}

/// The live counters behind [`Counters`].
#[derive(Debug, Default)]
pub(crate) struct Tally {
    queries: AtomicU64,
    answered_locally: AtomicU64,
    forwarded: AtomicU64,
    upstream_failures: AtomicU64,
    unanswered: AtomicU64,
    tcp_fallbacks: AtomicU64,
    malformed: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    // Counters are statistics; no other memory is published through them.
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Tally {
    pub(crate) fn query(&self) {
        bump(&self.queries);
    }
    pub(crate) fn answered_locally(&self) {
        bump(&self.answered_locally);
    }
    pub(crate) fn forwarded(&self) {
        bump(&self.forwarded);
    }
    pub(crate) fn upstream_failure(&self) {
        bump(&self.upstream_failures);
    }
    pub(crate) fn unanswered(&self) {
        bump(&self.unanswered);
    }
    pub(crate) fn tcp_fallback(&self) {
        bump(&self.tcp_fallbacks);
    }
    pub(crate) fn malformed(&self) {
        bump(&self.malformed);
    }

    pub(crate) fn snapshot(&self) -> Counters {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            queries: read(&self.queries),
            answered_locally: read(&self.answered_locally),
            forwarded: read(&self.forwarded),
            upstream_failures: read(&self.upstream_failures),
            unanswered: read(&self.unanswered),
            tcp_fallbacks: read(&self.tcp_fallbacks),
            malformed: read(&self.malformed),
        }
    }
}
