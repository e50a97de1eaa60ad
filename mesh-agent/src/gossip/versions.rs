//! Checks the gossip versions a delta carries before chitchat believes them.
//!
//! chitchat takes a delta's versions at their word: a member that relays node X's run with a
//! key-value at a version past X's real one (its value refused later for its signature or
//! not), a `SetMaxVersion` past it, or a last GC version past it, makes every receiver ignore
//! X's real later writes (their versions are lower) until X restarts. So every version a
//! delta tells about X must be one X itself signed:
//!
//! - each key-value is an envelope X signed at exactly that version (see [`super::signed`]):
//!   a value with chitchat's status "set", or a signed deletion with status "deleted after a
//!   grace" — mesh writes no other kind, so chitchat's unsigned tombstones are refused too;
//! - a `SetMaxVersion` (chitchat sends one when the keys above the receiver's version were
//!   deleted and forgotten) is at most the highest version X has proven to this node;
//! - a last GC version that would reset X's state here (a delta from version 0) is at most
//!   the highest version X has proven here or in that delta — except for a run this node
//!   has nothing of yet, see below.
//!
//! A datagram with one part that fails is dropped whole (counted as `invalid`); the sender's
//! next round offers the rest again.
//!
//! What honest relays send passes: their key-values are X's own envelopes; X rewrites
//! [`super::STAMP`] after deleting keys, so its newest version is a live signed value that a
//! relay holding it sends instead of a `SetMaxVersion`; and a reset (a relay forgot
//! tombstones the receiver never saw) carries X's live keys, the stamp last. One reset is
//! taken unproven: the first state of a run this node has nothing of. A relay sends a large
//! state over several datagrams, the first of them carrying the relay's GC version but not
//! yet the keys that prove it, and the relay resends from version 0 until the receiver
//! adopts that GC version: refusing it would keep a joining node from ever learning a node
//! whose state exceeds a datagram. What a member can do with it: make a node that has
//! nothing of X's run yet drop X's deletions at or below the forged version (the values it
//! sets still arrive).
//!
//! Each key-value costs a signature verification (tens of microseconds) the first time; the
//! same one relayed again by another peer in the same round (each answers the receiver's
//! digest) is recognised by its digest.
//!
//! The key X signs with is the one its node record in the delta proves (the record signs
//! itself), or the one learned from an earlier record of the same run, or else its name's
//! pin. A run none of these names yet (no record seen, name not pinned) is taken unchecked,
//! as `origin` takes the first key of a name.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

use super::origin::record_key;
use super::signed;
use super::validate::NodePart;
use crate::cluster::key;
use crate::identity::PublicKey;

/// Runs remembered at most; past it, those not heard of within [`RUN_TTL`] are forgotten.
const MAX_RUNS: usize = super::validate::MAX_KNOWN_NODES;
const RUN_TTL: Duration = super::validate::KNOWN_NODE_TTL;

/// What this node knows of one run of one node.
#[derive(Clone, Debug)]
struct Run {
    key: PublicKey,
    /// The highest version the run has proven (a key-value it signed at that version).
    proven: u64,
    last_seen: Instant,
    /// Per key, the version and envelope digest last verified.
    verified: HashMap<String, Verified>,
}

type Verified = (u64, [u8; 32]);

/// What a run's part of a delta proved: its key, highest version, and what it verified.
struct Proof {
    key: PublicKey,
    proven: u64,
    verified: Vec<(String, Verified)>,
}

fn digest(envelope: &str) -> [u8; 32] {
    Sha256::digest(envelope.as_bytes()).into()
}

/// chitchat's deletion statuses on the wire.
const SET: u8 = 0;
const DELETED_AFTER_GRACE: u8 = 2;

#[derive(Default)]
pub struct Versions {
    runs: HashMap<(String, u64), Run>,
}

impl Versions {
    /// Checks a delta's parts (none about this node itself: the transport refuses those
    /// first); on success, remembers what they proved. `pinned` gives a name's pinned key.
    pub fn admit(
        &mut self,
        parts: &[NodePart],
        pinned: impl Fn(&str) -> Option<PublicKey>,
        now: Instant,
    ) -> Result<(), String> {
        let mut learned = Vec::with_capacity(parts.len());
        for part in parts {
            if let Some(run) = self.check(part, &pinned)? {
                learned.push(((part.id.name.clone(), part.id.generation), run));
            }
        }
        if self.runs.len() + learned.len() > MAX_RUNS {
            self.runs
                .retain(|_, r| now.duration_since(r.last_seen) < RUN_TTL);
        }
        for (id, proof) in learned {
            if self.runs.len() >= MAX_RUNS && !self.runs.contains_key(&id) {
                // Full of runs heard of within the hour: this one stays new (checked by its
                // record or pin again next time).
                continue;
            }
            let run = self.runs.entry(id).or_insert(Run {
                key: proof.key,
                proven: 0,
                last_seen: now,
                verified: HashMap::new(),
            });
            run.proven = run.proven.max(proof.proven);
            run.last_seen = now;
            run.verified.extend(proof.verified);
        }
        Ok(())
    }

    /// One node's part: `Ok(None)` for a run whose key is not known yet (taken unchecked),
    /// else the key and the highest version it proves.
    fn check(
        &self,
        part: &NodePart,
        pinned: &impl Fn(&str) -> Option<PublicKey>,
    ) -> Result<Option<Proof>, String> {
        let name = part.id.name.as_str();
        let generation = part.id.generation;
        let known = self.runs.get(&(name.to_owned(), generation));
        let claimed = || {
            part.key_values
                .iter()
                .find(|kv| kv.key == key::NODE && kv.status == SET)
                .and_then(|kv| record_key(name, generation, kv.version, &kv.value))
        };
        let Some(signer) = known
            .map(|r| r.key)
            .or_else(claimed)
            .or_else(|| pinned(name))
        else {
            return Ok(None);
        };
        let mut proven = known.map_or(0, |r| r.proven);
        let mut verified = Vec::new();
        for kv in &part.key_values {
            let seen = (kv.version, digest(&kv.value));
            let again = known
                .and_then(|r| r.verified.get(&kv.key))
                .is_some_and(|v| *v == seen);
            let deletion = if again {
                signed::is_deletion(&kv.value)
            } else {
                signed::open(&signer, name, generation, &kv.key, kv.version, &kv.value)
                    .map_err(|why| {
                        format!(
                            "{name} (run {generation}): {} at version {} is not signed by the \
                             node at that version ({why:?})",
                            kv.key, kv.version
                        )
                    })?
                    .is_none()
            };
            let status_fits = if deletion {
                kv.status == DELETED_AFTER_GRACE
            } else {
                kv.status == SET
            };
            if !status_fits {
                return Err(format!(
                    "{name} (run {generation}): {} at version {} has deletion status {} for \
                     a signed {}",
                    kv.key,
                    kv.version,
                    kv.status,
                    if deletion { "deletion" } else { "value" }
                ));
            }
            proven = proven.max(kv.version);
            if !again {
                verified.push((kv.key.clone(), seen));
            }
        }
        if let Some(max) = part.set_max_version
            && max > proven
        {
            return Err(format!(
                "{name} (run {generation}): max version {max} past the {proven} it has signed"
            ));
        }
        let nothing_yet = known.is_none_or(|r| r.proven == 0);
        if part.from_version_excluded == 0 && part.last_gc_version > proven && !nothing_yet {
            return Err(format!(
                "{name} (run {generation}): a reset to GC version {} past the {proven} it has \
                 signed",
                part.last_gc_version
            ));
        }
        Ok(Some(Proof {
            key: signer,
            proven,
            verified,
        }))
    }

    /// The highest version a run has proven to this node (for tests and stats).
    pub fn proven(&self, name: &str, generation: u64) -> Option<u64> {
        self.runs
            .get(&(name.to_owned(), generation))
            .map(|r| r.proven)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip::validate::{KeyValueOp, NodeId};
    use crate::identity::NodeIdentity;

    const GEN: u64 = 7;

    fn id(name: &str) -> NodeId {
        NodeId {
            name: name.into(),
            generation: GEN,
            addr: "192.0.2.1:7946".parse().unwrap(),
        }
    }

    fn record(n: &NodeIdentity) -> String {
        format!(r#"{{"key":"{}"}}"#, n.public())
    }

    /// A key-value `n` signed as node "x" at `version` (`None`: a deletion).
    fn kv(n: &NodeIdentity, key: &str, version: u64, value: Option<&str>) -> KeyValueOp {
        let (value, status) = match value {
            Some(v) => (signed::seal(n, "x", GEN, key, version, v), SET),
            None => (
                signed::seal_deletion(n, "x", GEN, key, version),
                DELETED_AFTER_GRACE,
            ),
        };
        KeyValueOp {
            key: key.into(),
            value,
            version,
            status,
        }
    }

    fn part(from: u64, last_gc: u64, kvs: Vec<KeyValueOp>, max: Option<u64>) -> NodePart {
        NodePart {
            id: id("x"),
            last_gc_version: last_gc,
            from_version_excluded: from,
            key_values: kvs,
            set_max_version: max,
        }
    }

    fn no_pins(_: &str) -> Option<PublicKey> {
        None
    }

    /// A guard that has seen x's run up to version 4 (record, two values, a deletion).
    fn seen(n: &NodeIdentity) -> Versions {
        let mut v = Versions::default();
        let first = part(
            0,
            0,
            vec![
                kv(n, key::NODE, 1, Some(&record(n))),
                kv(n, "ep:a", 2, Some("a")),
                kv(n, "ep:b", 3, Some("b")),
                kv(n, "ep:b", 4, None),
            ],
            None,
        );
        v.admit(&[first], no_pins, Instant::now()).unwrap();
        assert_eq!(v.proven("x", GEN), Some(4));
        v
    }

    #[test]
    fn honest_deltas_pass_and_prove_their_versions() {
        let n = NodeIdentity::generate().unwrap();
        let mut v = seen(&n);
        // More values and deletions past what the receiver has.
        let next = part(
            4,
            0,
            vec![kv(&n, "ep:c", 5, Some("c")), kv(&n, "ep:a", 6, None)],
            None,
        );
        v.admit(&[next], no_pins, Instant::now()).unwrap();
        assert_eq!(v.proven("x", GEN), Some(6));
        // A relay that forgot the deletions above what the receiver holds tells the max
        // version instead: at most what the run proved.
        v.admit(&[part(5, 6, vec![], Some(6))], no_pins, Instant::now())
            .unwrap();
        // A reset (the relay forgot tombstones up to 6) carrying the live keys, the stamp
        // proving the GC version last.
        let reset = part(
            0,
            6,
            vec![
                kv(&n, key::NODE, 1, Some(&record(&n))),
                kv(&n, "ep:c", 5, Some("c")),
                kv(&n, super::super::STAMP, 7, Some("")),
            ],
            None,
        );
        v.admit(&[reset], no_pins, Instant::now()).unwrap();
        assert_eq!(v.proven("x", GEN), Some(7));
    }

    #[test]
    fn forged_versions_are_refused_and_prove_nothing() {
        let n = NodeIdentity::generate().unwrap();
        let mallory = NodeIdentity::generate().unwrap();
        let mut v = seen(&n);
        let real = kv(&n, "ep:a", 2, Some("a"));
        let raised = KeyValueOp {
            version: 1 << 40,
            ..real.clone()
        };
        let unsigned_tombstone = KeyValueOp {
            key: "ep:a".into(),
            value: String::new(),
            version: 5,
            status: 1,
        };
        let value_marked_deleted = KeyValueOp {
            status: DELETED_AFTER_GRACE,
            ..kv(&n, "ep:c", 5, Some("c"))
        };
        let deletion_marked_set = KeyValueOp {
            status: SET,
            ..kv(&n, "ep:c", 5, None)
        };
        let by_another_key = kv(&mallory, "ep:c", 5, Some("c"));
        let moved = KeyValueOp {
            key: "ep:moved".into(),
            version: 5,
            ..real.clone()
        };
        for (what, kvs) in [
            ("a value raised to a higher version", vec![raised]),
            ("an unsigned tombstone", vec![unsigned_tombstone]),
            ("a signed value marked deleted", vec![value_marked_deleted]),
            ("a signed deletion marked set", vec![deletion_marked_set]),
            ("signed by another key", vec![by_another_key]),
            ("moved to another key", vec![moved]),
        ] {
            let e = v
                .admit(&[part(4, 0, kvs, None)], no_pins, Instant::now())
                .unwrap_err();
            assert!(e.contains("x (run 7)"), "{what}: {e}");
        }
        let e = v
            .admit(
                &[part(4, 0, vec![], Some(1 << 40))],
                no_pins,
                Instant::now(),
            )
            .unwrap_err();
        assert!(e.contains("past the 4 it has signed"), "{e}");
        // A reset to a GC version past anything signed: refused; one from a delta that does
        // not start at 0 chitchat itself rejects (or ignores the GC version), so it passes.
        let e = v
            .admit(&[part(0, 1 << 40, vec![], None)], no_pins, Instant::now())
            .unwrap_err();
        assert!(e.contains("a reset to GC version"), "{e}");
        v.admit(&[part(4, 1 << 40, vec![], None)], no_pins, Instant::now())
            .unwrap();
        assert_eq!(v.proven("x", GEN), Some(4), "nothing forged was believed");
    }

    #[test]
    fn one_forged_part_refuses_the_datagram_and_records_nothing_of_it() {
        let n = NodeIdentity::generate().unwrap();
        let mut v = seen(&n);
        let good = part(4, 0, vec![kv(&n, "ep:c", 5, Some("c"))], None);
        let y = NodeIdentity::generate().unwrap();
        let mut bad = part(0, 0, vec![], None);
        bad.id = id("y");
        bad.key_values = vec![
            KeyValueOp {
                value: signed::seal(&y, "y", GEN, key::NODE, 1, &record(&y)),
                ..kv(&y, key::NODE, 1, Some(""))
            },
            KeyValueOp {
                value: "unsigned".into(),
                ..kv(&y, "ep:y", 2, Some(""))
            },
        ];
        assert!(
            v.admit(&[good, bad], no_pins, Instant::now())
                .unwrap_err()
                .contains("y (run 7): ep:y")
        );
        assert_eq!(v.proven("x", GEN), Some(4));
        assert_eq!(v.proven("y", GEN), None);
    }

    #[test]
    fn a_run_is_checked_with_its_record_or_its_names_pin_and_else_taken_unchecked() {
        let n = NodeIdentity::generate().unwrap();
        // No record yet and no pin: nothing to check against (the name's first key is
        // taken, as `origin` pins it).
        let mut v = Versions::default();
        let unsigned = KeyValueOp {
            key: "ep:a".into(),
            value: "v".into(),
            version: 1 << 40,
            status: SET,
        };
        v.admit(
            &[part(0, 0, vec![unsigned.clone()], None)],
            no_pins,
            Instant::now(),
        )
        .unwrap();
        assert_eq!(v.proven("x", GEN), None);
        // With the name pinned, the same is refused.
        let pin = n.public();
        assert!(
            v.admit(
                &[part(0, 0, vec![unsigned], None)],
                |name: &str| (name == "x").then_some(pin),
                Instant::now(),
            )
            .is_err()
        );
        v.admit(
            &[part(0, 0, vec![kv(&n, "ep:a", 3, Some("a"))], None)],
            |name: &str| (name == "x").then_some(pin),
            Instant::now(),
        )
        .unwrap();
        assert_eq!(v.proven("x", GEN), Some(3));
    }

    /// The one reset taken unproven: the first state of a run, which a relay sends over
    /// several datagrams with its GC version in the first (see the module's doc).
    #[test]
    fn the_first_state_of_a_run_may_carry_a_gc_version_it_proves_later() {
        let n = NodeIdentity::generate().unwrap();
        let mut v = Versions::default();
        let first = part(
            0,
            40,
            vec![
                kv(&n, key::NODE, 1, Some(&record(&n))),
                kv(&n, "chunk:obj:config:big#0", 2, Some("…")),
            ],
            None,
        );
        v.admit(&[first], no_pins, Instant::now()).unwrap();
        assert_eq!(v.proven("x", GEN), Some(2));
        let rest = part(2, 40, vec![kv(&n, super::super::STAMP, 41, Some(""))], None);
        v.admit(&[rest], no_pins, Instant::now()).unwrap();
        assert_eq!(v.proven("x", GEN), Some(41));
    }

    /// What the check costs per key-value of a delta (printed): one signature verification
    /// each. `cargo test --release -p mesh-agent version_check_cost -- --nocapture` for the
    /// optimised number.
    #[test]
    fn version_check_cost() {
        let n = NodeIdentity::generate().unwrap();
        let value = format!(
            r#"{{"task":"web.1","ip":"10.0.0.2","pad":"{}"}}"#,
            "x".repeat(200)
        );
        const N: u64 = 200;
        let mut kvs = vec![kv(&n, key::NODE, 1, Some(&record(&n)))];
        kvs.extend((2..=N).map(|i| kv(&n, &format!("ep:web.{i}"), i, Some(&value))));
        let delta = [part(0, 0, kvs, None)];
        let start = std::time::Instant::now();
        let mut v = Versions::default();
        v.admit(&delta, no_pins, Instant::now()).unwrap();
        let first = start.elapsed() / N as u32;
        // The same delta from another peer in the same round.
        let start = std::time::Instant::now();
        v.admit(&delta, no_pins, Instant::now()).unwrap();
        let again = start.elapsed() / N as u32;
        eprintln!(
            "version check per key-value of {} bytes ({N} in one delta): {first:?} new, \
             {again:?} relayed again",
            value.len()
        );
        assert_eq!(v.proven("x", GEN), Some(N));
    }
}
