//! Cluster-wide objects replicated by every node, and how copies merge.
//!
//! Each copy carries the stamp of the incarnation it belongs to (`created`), the stamp of its
//! last change (`updated`), whether it is a deletion, and `floor`: the newest deletion of the
//! name its writer knew about. The merge is deterministic:
//!
//! - the newest deletion known for a name (from any copy's `deleted` or `floor`) kills every
//!   incarnation created before it;
//! - among surviving incarnations the oldest wins (first creator wins a concurrent create);
//! - within the winning incarnation the newest update wins.
//!
//! `floor` is what keeps a deleted object from coming back when a node that missed the
//! deletion still holds an old copy after the tombstone itself was replaced by a newer
//! incarnation.

use std::collections::BTreeMap;

use mesh_api::id::Stamp;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Issues stamps that never go backwards on this node even if the wall clock does, and that
/// are later than any stamp seen from peers (a hybrid logical clock without the counter).
#[derive(Debug)]
pub struct Clock {
    node: String,
    last: u64,
}

impl Clock {
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            last: 0,
        }
    }

    pub fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// Moves the clock past a stamp seen from a peer.
    pub fn observe(&mut self, stamp: &Stamp) {
        self.last = self.last.max(stamp.ms);
    }

    pub fn tick(&mut self) -> Stamp {
        self.last = (self.last + 1).max(Self::now_ms());
        Stamp {
            ms: self.last,
            node: self.node.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replicated<T> {
    pub spec: T,
    pub created: Stamp,
    pub updated: Stamp,
    /// Set on the copy that records the deletion of this incarnation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<Stamp>,
    /// Newest deletion of this name known to the writer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<Stamp>,
}

impl<T> Replicated<T> {
    pub fn new(spec: T, stamp: Stamp) -> Self {
        Self {
            spec,
            created: stamp.clone(),
            updated: stamp,
            deleted: None,
            floor: None,
        }
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.is_some()
    }
}

/// The outcome of merging every copy of one name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Merged<T> {
    /// The live object, if any.
    pub live: Option<Replicated<T>>,
    /// Newest deletion of the name, if any: what to republish when nothing is live, and the
    /// floor carried by the live copy.
    pub floor: Option<Stamp>,
    /// Live incarnations that lost a concurrent create against `live`.
    pub losers: Vec<Replicated<T>>,
    /// A copy that carries the newest deletion, to republish as the tombstone.
    tombstone: Option<Replicated<T>>,
}

impl<T: Clone> Merged<T> {
    /// The copy this node republishes under the name: the live object (carrying the floor),
    /// or a tombstone while the deletion is recent enough to matter.
    pub fn republish(&self, tombstone_ttl_ms: u64, now_ms: u64) -> Option<Replicated<T>> {
        if let Some(live) = &self.live {
            let mut copy = live.clone();
            copy.floor = self.floor.clone();
            copy.deleted = None;
            return Some(copy);
        }
        let floor = self.floor.as_ref()?;
        if now_ms.saturating_sub(floor.ms) > tombstone_ttl_ms {
            return None;
        }
        let mut tomb = self.tombstone.clone()?;
        tomb.deleted = Some(floor.clone());
        tomb.floor = Some(floor.clone());
        Some(tomb)
    }
}

/// Merges every copy of one name (from every node's state).
pub fn merge<T: Clone>(copies: &[Replicated<T>]) -> Merged<T> {
    let floor = copies
        .iter()
        .flat_map(|c| [c.deleted.clone(), c.floor.clone()])
        .flatten()
        .max();
    let mut incarnations: BTreeMap<&Stamp, &Replicated<T>> = BTreeMap::new();
    for c in copies {
        if c.deleted.is_some() || floor.as_ref().is_some_and(|f| c.created <= *f) {
            continue;
        }
        incarnations
            .entry(&c.created)
            .and_modify(|best| {
                if c.updated > best.updated {
                    *best = c;
                }
            })
            .or_insert(c);
    }
    let mut live = incarnations.into_values().cloned();
    let winner = live.next();
    let tombstone = floor.as_ref().and_then(|f| {
        copies
            .iter()
            .find(|c| c.deleted.as_ref() == Some(f) || c.floor.as_ref() == Some(f))
            .cloned()
    });
    Merged {
        live: winner,
        floor,
        losers: live.collect(),
        tombstone,
    }
}

/// Decodes a replicated record, ignoring (and reporting) ones that do not parse: a peer
/// running a newer version, or garbage, must not stop this node from merging the rest.
pub fn decode<T: DeserializeOwned>(value: &str) -> Option<Replicated<T>> {
    serde_json::from_str(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(ms: u64, node: &str) -> Stamp {
        Stamp {
            ms,
            node: node.into(),
        }
    }

    fn rec(spec: &str, created: Stamp) -> Replicated<String> {
        Replicated::new(spec.to_owned(), created)
    }

    #[test]
    fn first_creator_wins_a_concurrent_create_on_every_node() {
        let a = rec("from-a", st(100, "a"));
        let b = rec("from-b", st(100, "b"));
        let c = rec("from-c", st(99, "c"));
        for order in [
            vec![a.clone(), b.clone(), c.clone()],
            vec![c.clone(), b.clone(), a.clone()],
        ] {
            let m = merge(&order);
            assert_eq!(m.live.unwrap().spec, "from-c");
            assert_eq!(m.losers.len(), 2);
        }
        let m = merge(&[a.clone(), b.clone()]);
        assert_eq!(
            m.live.unwrap().spec,
            "from-a",
            "equal times: node name breaks the tie"
        );
    }

    #[test]
    fn newest_update_of_the_winner_wins() {
        let a = rec("v1", st(100, "a"));
        let mut a2 = a.clone();
        a2.spec = "v2".into();
        a2.updated = st(200, "b");
        assert_eq!(merge(&[a2.clone(), a.clone()]).live.unwrap().spec, "v2");
        assert_eq!(merge(&[a, a2]).live.unwrap().spec, "v2");
    }

    #[test]
    fn a_deletion_beats_stale_copies_and_is_republished_as_a_tombstone() {
        let a = rec("v1", st(100, "a"));
        let mut tomb = a.clone();
        tomb.deleted = Some(st(300, "b"));
        let m = merge(&[a.clone(), tomb.clone()]);
        assert!(m.live.is_none());
        let out = m.republish(1000, 400).unwrap();
        assert_eq!(out.deleted, Some(st(300, "b")));
        // Past its time-to-live the tombstone is no longer republished.
        assert!(m.republish(50, 400).is_none());
    }

    #[test]
    fn a_recreated_object_survives_stale_copies_of_the_deleted_one() {
        let old = rec("old", st(100, "a"));
        let mut tomb = old.clone();
        tomb.deleted = Some(st(300, "b"));
        let new = rec("new", st(400, "c"));
        // Node c republishes the new incarnation carrying the floor; later the tombstone is
        // gone everywhere, but a node that missed everything still holds `old`.
        let m = merge(&[tomb, new.clone()]);
        let republished = m.republish(1000, 500).unwrap();
        assert_eq!(republished.floor, Some(st(300, "b")));
        let m = merge(&[old, republished]);
        assert_eq!(m.live.unwrap().spec, "new");
    }
}
