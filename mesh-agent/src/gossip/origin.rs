//! Checks every gossiped value for its origin before it enters a snapshot (and so the view,
//! the planner, the dataplane and DNS).
//!
//! A node's values are signed by its key (see [`super::signed`]); the key is in its node
//! record, itself signed by that key. What binds the key to the node's *name* is a pin: the
//! first key this node sees for a name is kept (in the state dir, so a restart keeps it), and
//! a node of that name under any other key is an impostor — every value of it is dropped,
//! the refusal is logged, counted and reported as an event. A pin is let go only when the
//! name is removed with `meshctl node rm` (a host that lost its state dir joins again under
//! a new key that way).
//!
//! Values are read with the gossip version chitchat holds them at, which the signature covers
//! (see [`super::signed`]); a signed deletion leaves its key out.
//!
//! Verifying costs tens of microseconds per value and every node republishes every
//! replicated object, so verdicts are kept per (node, run, key) until the value changes.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use super::signed::{self, Refusal};
use crate::cluster::key;
use crate::identity::PublicKey;

/// The file in the state dir that keeps the pins.
pub const PINS_FILE: &str = "node-keys.json";

/// The key first seen for a name, and in which run of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub key: PublicKey,
    pub generation: u64,
}

/// A node refused because its name is bound to another key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Impostor {
    pub name: String,
    pub generation: u64,
    pub key: PublicKey,
    pub pinned: PublicKey,
}

/// Counters for metrics and `gossip stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginReport {
    /// Values dropped: unsigned, or not signed by their node's key.
    pub invalid_records: u64,
    /// Runs of nodes refused for claiming a name bound to another key.
    pub impostors: u64,
}

/// Verdicts on one run of one node.
#[derive(Default)]
struct NodeVerdicts {
    /// The node record (version, envelope) and the key it proved, if it did.
    record: Option<(Raw, Option<PublicKey>)>,
    /// Per key: the version and envelope seen, and its value if it verified (and is not a
    /// deletion).
    values: HashMap<String, (Raw, Option<String>)>,
}

#[derive(Default)]
pub struct Origins {
    pins: BTreeMap<String, Pin>,
    path: Option<PathBuf>,
    verdicts: HashMap<(String, u64), NodeVerdicts>,
    seen: HashSet<(String, u64)>,
    impostors_seen: HashSet<(String, u64, PublicKey)>,
    new_impostors: Vec<Impostor>,
    report: OriginReport,
}

impl Origins {
    /// Pins kept in `path` (none yet when it does not exist), with this node's own name
    /// pinned to its own key first, so no impostor can be the first this node sees.
    pub fn new(path: Option<PathBuf>, own: (&str, PublicKey, u64)) -> Self {
        let pins = path
            .as_deref()
            .and_then(|p| {
                crate::state_files::read_with_backup(p, |b| {
                    serde_json::from_slice::<BTreeMap<String, Pin>>(b)
                })
            })
            .unwrap_or_default();
        let mut origins = Self {
            pins,
            path,
            ..Default::default()
        };
        let (name, key, generation) = own;
        match origins.pins.get(name) {
            Some(pin) if pin.key != key => error!(
                node = name,
                pinned = %pin.key.short(),
                key = %key.short(),
                "this node's name is pinned to another key than its own: peers will refuse \
                 it too; `meshctl node rm {name}` on another member lets it join again"
            ),
            Some(_) => {}
            None => origins.pin(name, Pin { key, generation }),
        }
        origins
    }

    pub fn report(&self) -> OriginReport {
        self.report
    }

    pub fn pins(&self) -> &BTreeMap<String, Pin> {
        &self.pins
    }

    /// Impostors refused since the last call (each run of each once).
    pub fn take_impostors(&mut self) -> Vec<Impostor> {
        std::mem::take(&mut self.new_impostors)
    }

    /// `node rm` of `name` up to `generation`: its pin goes if it was made by a removed run.
    pub fn forget(&mut self, name: &str, generation: u64) {
        if self
            .pins
            .get(name)
            .is_some_and(|p| p.generation <= generation)
        {
            self.pins.remove(name);
            self.save();
        }
    }

    fn pin(&mut self, name: &str, pin: Pin) {
        self.pins.insert(name.to_owned(), pin);
        self.save();
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        let bytes = serde_json::to_vec_pretty(&self.pins).expect("plain map");
        if let Err(e) = crate::state_files::write_with_backup(path, &bytes, 0o600) {
            warn!("cannot save node key pins to {}: {e}", path.display());
        }
    }

    /// One run of one node's values (key to version and envelope, as chitchat holds them),
    /// verified: `None` when the run is refused as a whole (an impostor), or has no record
    /// yet, else the values that are signed by its key at their version, deletions left
    /// out. A run without a record is left out rather than shown empty: any member can name
    /// a newer run of a node in a digest, and the newest run of a name speaks for it in the
    /// view, so an empty one would hide the real node until its real record arrived.
    pub fn node(
        &mut self,
        name: &str,
        generation: u64,
        kv: BTreeMap<String, Raw>,
    ) -> Option<BTreeMap<String, String>> {
        let id = (name.to_owned(), generation);
        self.seen.insert(id.clone());
        let record = kv.get(key::NODE)?;
        let mut verdicts = self.verdicts.remove(&id).unwrap_or_default();
        let signer = match &verdicts.record {
            Some((seen, signer)) if seen == record => *signer,
            _ => {
                let signer = record_key(name, generation, record.0, &record.1);
                if signer.is_none() {
                    self.report.invalid_records += 1;
                    warn!(
                        node = name,
                        generation, "a node record not signed by the key it names: dropped"
                    );
                }
                verdicts.record = Some((record.clone(), signer));
                verdicts.values.clear();
                signer
            }
        };
        let out = signer.and_then(|signer| {
            self.bound(name, generation, signer)?;
            Some(self.values(name, generation, signer, kv, &mut verdicts))
        });
        self.verdicts.insert(id, verdicts);
        out
    }

    /// Whether `name` may speak with `key`: pins it when the name is new.
    fn bound(&mut self, name: &str, generation: u64, key: PublicKey) -> Option<()> {
        match self.pins.get(name) {
            None => {
                self.pin(name, Pin { key, generation });
                Some(())
            }
            Some(pin) if pin.key == key => Some(()),
            Some(pin) => {
                let pinned = pin.key;
                if self
                    .impostors_seen
                    .insert((name.to_owned(), generation, key))
                {
                    self.report.impostors += 1;
                    warn!(
                        node = name,
                        generation,
                        key = %key.short(),
                        pinned = %pinned.short(),
                        "refused a node claiming a name bound to another key"
                    );
                    self.new_impostors.push(Impostor {
                        name: name.to_owned(),
                        generation,
                        key,
                        pinned,
                    });
                }
                None
            }
        }
    }

    fn values(
        &mut self,
        name: &str,
        generation: u64,
        signer: PublicKey,
        kv: BTreeMap<String, Raw>,
        verdicts: &mut NodeVerdicts,
    ) -> BTreeMap<String, String> {
        verdicts.values.retain(|k, _| kv.contains_key(k));
        let mut out = BTreeMap::new();
        for (k, raw) in kv {
            let value = match verdicts.values.get(&k) {
                Some((seen, value)) if *seen == raw => value.clone(),
                _ => {
                    let (version, envelope) = &raw;
                    let opened = signed::open(&signer, name, generation, &k, *version, envelope);
                    let value = match opened {
                        Ok(v) => v.map(str::to_owned),
                        Err(why) => {
                            self.report.invalid_records += 1;
                            warn!(
                                node = name,
                                generation,
                                key = k,
                                ?why,
                                "dropped a gossip value not signed by its node"
                            );
                            None
                        }
                    };
                    verdicts.values.insert(k.clone(), (raw, value.clone()));
                    value
                }
            };
            if let Some(v) = value {
                out.insert(k, v);
            }
        }
        out
    }

    /// Forgets verdicts on runs no longer in gossip.
    pub fn forget_unseen(&mut self) {
        let seen = std::mem::take(&mut self.seen);
        self.verdicts.retain(|id, _| seen.contains(id));
    }
}

/// A raw gossip value: the version chitchat holds it at, and its envelope.
pub type Raw = (u64, String);

/// The key a node record (written at `version`) names, if the record is signed by it.
pub fn record_key(name: &str, generation: u64, version: u64, envelope: &str) -> Option<PublicKey> {
    #[derive(Deserialize)]
    struct KeyOnly {
        key: Option<PublicKey>,
    }
    let claimed = serde_json::from_str::<KeyOnly>(signed::unchecked(envelope)?)
        .ok()?
        .key?;
    match signed::open(&claimed, name, generation, key::NODE, version, envelope) {
        Ok(Some(_)) => Some(claimed),
        Ok(None) | Err(Refusal::Unsigned | Refusal::BadSignature) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeIdentity;

    fn record(id: &NodeIdentity) -> String {
        format!(r#"{{"name":"n","key":"{}"}}"#, id.public())
    }

    /// A node's signed keys as gossip carries them.
    fn node_kv(
        id: &NodeIdentity,
        name: &str,
        generation: u64,
        kv: &[(&str, &str)],
    ) -> BTreeMap<String, Raw> {
        let mut out: BTreeMap<String, Raw> = BTreeMap::new();
        out.insert(
            key::NODE.into(),
            (
                1,
                signed::seal(id, name, generation, key::NODE, 1, &record(id)),
            ),
        );
        for (i, (k, v)) in kv.iter().enumerate() {
            let version = i as u64 + 2;
            out.insert(
                k.to_string(),
                (version, signed::seal(id, name, generation, k, version, v)),
            );
        }
        out
    }

    fn origins(me: &NodeIdentity) -> Origins {
        Origins::new(None, ("me", me.public(), 1))
    }

    #[test]
    fn signed_values_pass_and_the_name_is_pinned_to_its_key() {
        let me = NodeIdentity::generate().unwrap();
        let n1 = NodeIdentity::generate().unwrap();
        let mut o = origins(&me);
        let got = o
            .node("n1", 5, node_kv(&n1, "n1", 5, &[("ep:web.1", "{}")]))
            .unwrap();
        assert_eq!(got["ep:web.1"], "{}");
        assert_eq!(got[key::NODE], record(&n1));
        assert_eq!(o.pins()["n1"].key, n1.public());
        assert_eq!(o.report(), OriginReport::default());
        // A restart (a new run) under the same key is the same node.
        assert!(o.node("n1", 6, node_kv(&n1, "n1", 6, &[])).is_some());
    }

    #[test]
    fn a_second_node_claiming_a_taken_name_is_refused_once_and_counted() {
        let me = NodeIdentity::generate().unwrap();
        let n1 = NodeIdentity::generate().unwrap();
        let mallory = NodeIdentity::generate().unwrap();
        let mut o = origins(&me);
        o.node("n1", 5, node_kv(&n1, "n1", 5, &[])).unwrap();
        for _ in 0..3 {
            assert!(
                o.node("n1", 9, node_kv(&mallory, "n1", 9, &[("ep:x", "{}")]))
                    .is_none()
            );
        }
        assert_eq!(o.report().impostors, 1);
        let refused = o.take_impostors();
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].pinned, n1.public());
        assert!(o.take_impostors().is_empty());
        // This node's own name is pinned before anything is seen.
        assert!(o.node("me", 9, node_kv(&mallory, "me", 9, &[])).is_none());
        // Once the name is removed (`node rm`), it may join again under a new key.
        o.forget("n1", 5);
        assert!(o.node("n1", 10, node_kv(&mallory, "n1", 10, &[])).is_some());
    }

    #[test]
    fn values_written_for_another_node_or_replayed_are_dropped_and_counted() {
        let me = NodeIdentity::generate().unwrap();
        let n1 = NodeIdentity::generate().unwrap();
        let mallory = NodeIdentity::generate().unwrap();
        let mut o = origins(&me);
        let mut kv = node_kv(&n1, "n1", 5, &[("ep:web.1", "{}")]);
        // Mallory relays a record of her own making under n1's id ...
        kv.insert(
            "ep:evil".into(),
            (3, signed::seal(&mallory, "n1", 5, "ep:evil", 3, "{}")),
        );
        // ... an unsigned one ...
        kv.insert("obj:svc:evil".into(), (4, "{}".into()));
        // ... one n1 signed in an earlier run, replayed into this one ...
        kv.insert(
            "ep:old".into(),
            (5, signed::seal(&n1, "n1", 4, "ep:old", 5, "{}")),
        );
        // ... one n1 signed for another of its keys, moved ...
        let moved = signed::seal(&n1, "n1", 5, "ep:web.1", 6, "{}");
        kv.insert("ep:web.2".into(), (6, moved));
        // ... and one n1 signed, at a version it was not written at.
        let raised = signed::seal(&n1, "n1", 5, "ep:up", 7, "{}");
        kv.insert("ep:up".into(), (1 << 40, raised));
        // A deletion n1 signed leaves its key out, and is no refusal.
        kv.insert(
            "ep:gone".into(),
            (8, signed::seal_deletion(&n1, "n1", 5, "ep:gone", 8)),
        );
        let got = o.node("n1", 5, kv.clone()).unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), ["ep:web.1", "node"]);
        assert_eq!(o.report().invalid_records, 5);
        // Verdicts are kept: the same state again counts nothing new.
        o.node("n1", 5, kv).unwrap();
        assert_eq!(o.report().invalid_records, 5);
    }

    #[test]
    fn a_record_naming_a_key_it_is_not_signed_by_drops_the_node() {
        let me = NodeIdentity::generate().unwrap();
        let n1 = NodeIdentity::generate().unwrap();
        let mallory = NodeIdentity::generate().unwrap();
        let mut o = origins(&me);
        // Mallory writes n1's record naming n1's key, signed by her.
        let mut kv = BTreeMap::new();
        kv.insert(
            key::NODE.to_owned(),
            (
                1,
                signed::seal(&mallory, "n1", 5, key::NODE, 1, &record(&n1)),
            ),
        );
        kv.insert(
            "ep:x".to_owned(),
            (2, signed::seal(&mallory, "n1", 5, "ep:x", 2, "{}")),
        );
        assert!(o.node("n1", 5, kv).is_none());
        assert_eq!(o.report().invalid_records, 1);
        assert!(
            o.pins().get("n1").is_none(),
            "nothing is pinned from a forged record"
        );
        // An unsigned record (an agent without identities) likewise.
        let mut kv = BTreeMap::new();
        kv.insert(key::NODE.to_owned(), (1, record(&n1)));
        assert!(o.node("n1", 5, kv).is_none());
    }

    #[test]
    fn a_run_without_a_record_is_left_out_not_shown_empty() {
        let me = NodeIdentity::generate().unwrap();
        let n1 = NodeIdentity::generate().unwrap();
        let mut o = origins(&me);
        o.node("n1", 5, node_kv(&n1, "n1", 5, &[])).unwrap();
        // A newer run of n1 a digest named, with nothing (or nothing but values) yet.
        assert!(o.node("n1", 6, BTreeMap::new()).is_none());
        let mut kv = node_kv(&n1, "n1", 6, &[("ep:a", "{}")]);
        kv.remove(key::NODE);
        assert!(o.node("n1", 6, kv).is_none());
        assert_eq!(o.report(), OriginReport::default());
    }

    #[test]
    fn pins_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("mesh-origin-pins-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(PINS_FILE);
        let me = NodeIdentity::generate().unwrap();
        let n1 = NodeIdentity::generate().unwrap();
        let mallory = NodeIdentity::generate().unwrap();
        let mut o = Origins::new(Some(path.clone()), ("me", me.public(), 1));
        o.node("n1", 5, node_kv(&n1, "n1", 5, &[])).unwrap();
        let mut again = Origins::new(Some(path), ("me", me.public(), 2));
        assert!(
            again
                .node("n1", 9, node_kv(&mallory, "n1", 9, &[]))
                .is_none()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
