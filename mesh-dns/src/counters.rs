//! What the server has done, for the agent's metrics and `meshctl` status.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use hickory_proto::{op::ResponseCode, rr::RecordType};

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
    /// Answers sent, by (query type, response code) as numbers: a map, not a fixed table,
    /// because clients ask for any type. One short uncontended lock per answer.
    answers: Mutex<BTreeMap<(u16, u16), u64>>,
}

/// How many answers of one query type went out with one response code, e.g. `A` /
/// `NXDOMAIN`. Names are the mnemonics of the IANA registries; unknown ones are numbers.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AnswerCount {
    pub qtype: String,
    pub rcode: String,
    pub count: u64,
}

/// The registry mnemonic of a response code (hickory's Display is prose: "No Error").
fn rcode_name(code: u16) -> String {
    match ResponseCode::from((code >> 4) as u8, (code & 0x0f) as u8) {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::BADVERS => "BADVERS".into(),
        _ => format!("RCODE{code}"),
    }
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

    /// An answer of type `qtype` left with `rcode`.
    pub(crate) fn answered(&self, qtype: RecordType, rcode: u16) {
        let mut answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
        *answers.entry((u16::from(qtype), rcode)).or_default() += 1;
    }

    pub(crate) fn answers(&self) -> Vec<AnswerCount> {
        let answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
        answers
            .iter()
            .map(|(&(qtype, rcode), &count)| AnswerCount {
                qtype: RecordType::from(qtype).to_string(),
                rcode: rcode_name(rcode),
                count,
            })
            .collect()
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
