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
//! The key X signs with is the one its node record in the delta proves (the record signs
//! itself), or the one learned from an earlier record of the same run, or else its name's
//! pin. A run none of these names yet (no record seen, name not pinned) is taken unchecked,
//! as `origin` takes the first key of a name.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use super::origin::record_key;
use super::signed;
use super::validate::NodePart;
use crate::cluster::key;
use crate::identity::PublicKey;

/// Runs remembered at most; past it, those not heard of within [`RUN_TTL`] are forgotten.
const MAX_RUNS: usize = super::validate::MAX_KNOWN_NODES;
const RUN_TTL: Duration = super::validate::KNOWN_NODE_TTL;

/// What this node knows of one run of one node.
#[derive(Clone, Copy, Debug)]
struct Run {
    key: PublicKey,
    /// The highest version the run has proven (a key-value it signed at that version).
    proven: u64,
    last_seen: Instant,
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
        for (id, (key, proven)) in learned {
            if self.runs.len() >= MAX_RUNS && !self.runs.contains_key(&id) {
                // Full of runs heard of within the hour: this one stays unchecked-new.
                continue;
            }
            let run = self.runs.entry(id).or_insert(Run {
                key,
                proven: 0,
                last_seen: now,
            });
            run.proven = run.proven.max(proven);
            run.last_seen = now;
        }
        Ok(())
    }

    /// One node's part: `Ok(None)` for a run whose key is not known yet (taken unchecked),
    /// else the key and the highest version it proves.
    fn check(
        &self,
        part: &NodePart,
        pinned: &impl Fn(&str) -> Option<PublicKey>,
    ) -> Result<Option<(PublicKey, u64)>, String> {
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
        for kv in &part.key_values {
            let opened = signed::open(&signer, name, generation, &kv.key, kv.version, &kv.value)
                .map_err(|why| {
                    format!(
                        "{name} (run {generation}): {} at version {} is not signed by the node \
                         at that version ({why:?})",
                        kv.key, kv.version
                    )
                })?;
            let status_fits = match opened {
                Some(_) => kv.status == SET,
                None => kv.status == DELETED_AFTER_GRACE,
            };
            if !status_fits {
                return Err(format!(
                    "{name} (run {generation}): {} at version {} has deletion status {} for \
                     a signed {}",
                    kv.key,
                    kv.version,
                    kv.status,
                    if opened.is_some() {
                        "value"
                    } else {
                        "deletion"
                    }
                ));
            }
            proven = proven.max(kv.version);
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
        Ok(Some((signer, proven)))
    }

    /// The highest version a run has proven to this node (for tests and stats).
    pub fn proven(&self, name: &str, generation: u64) -> Option<u64> {
        self.runs
            .get(&(name.to_owned(), generation))
            .map(|r| r.proven)
    }
}
