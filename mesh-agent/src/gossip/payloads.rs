//! Large values carried outside gossip: gossip holds a small manifest, the body travels over
//! the node-to-node channel on demand.
//!
//! chitchat sends a node's keys in version order, one datagram at a time: a 500 KB secret
//! written as chunk keys (see [`super::chunks`]) makes every key written after it wait until
//! all its chunks have spread — and every node republishes every object, so it did so on
//! every node. With a cluster key (the node-to-node channel exists only then) a value over
//! [`super::chunks::CHUNK_LEN`] is instead written as
//!
//! ```text
//!   obj:secret:big = <signed envelope of> "payload:<sha256 hex of the value>:<bytes>"
//! ```
//!
//! and the value itself, the body, is kept in this node's [`Store`]. The manifest is signed
//! and replicated like any value, so a relay stays verifiable; a node that reads a manifest
//! whose body it does not hold sees the key as not yet gossiped (as a chunked value behaves)
//! and fetches the body from a node whose keys carry the same manifest (writing a manifest
//! means holding its body), checking it against the manifest's digest before use. Bodies
//! are content-addressed, so the same object republished by every node is fetched once.
//!
//! Bodies live in memory only: a node's own values are in its state file in full and are
//! held again when it writes them at start; anything else is fetched again.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

use super::chunks::CHUNK_LEN;

pub const MANIFEST_PREFIX: &str = "payload:";
/// The largest body a manifest may name: the API's 500 KB object, base64-encoded, sealed
/// and wrapped in its JSON record, is about 690 KB. A hostile manifest can make a reader
/// fetch and hold no more than this per key.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Fetches underway at once on one node.
pub const MAX_FETCHES: usize = 4;
/// How long a body no manifest names any more is kept: a snapshot taken while this node
/// writes a manifest may not show it yet.
const KEEP_UNNAMED: Duration = Duration::from_secs(60);
const FIRST_RETRY: Duration = Duration::from_millis(500);
const LAST_RETRY: Duration = Duration::from_secs(30);

/// What a manifest says of its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub sha256: String,
    pub len: usize,
}

impl Manifest {
    pub fn of(body: &str) -> Self {
        Self {
            sha256: sha256_hex(body.as_bytes()),
            len: body.len(),
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        let (sha256, len) = value.strip_prefix(MANIFEST_PREFIX)?.split_once(':')?;
        let len: usize = len.parse().ok()?;
        let hex = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit());
        (hex && len > 0 && len <= MAX_PAYLOAD).then(|| Self {
            sha256: sha256.to_ascii_lowercase(),
            len,
        })
    }

    pub fn encode(&self) -> String {
        format!("{MANIFEST_PREFIX}{}:{}", self.sha256, self.len)
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why fetched bytes were not taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// More or fewer bytes than the manifest says.
    Size { want: usize, got: usize },
    /// The bytes do not hash to the manifest's digest: the peer served something else.
    Digest,
    /// Not UTF-8: no gossip value is.
    Text,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Size { want, got } => write!(f, "{got} bytes where the manifest says {want}"),
            Self::Digest => f.write_str("bytes that do not match the manifest's sha256"),
            Self::Text => f.write_str("bytes that are not text"),
        }
    }
}

/// Counters for `gossip stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PayloadReport {
    /// Bodies held (own and fetched).
    pub held: usize,
    /// Bodies named by a manifest and not held yet.
    pub wanted: usize,
    pub fetched: u64,
    /// Fetches that failed (peer unreachable, not holding it, channel error).
    pub failed: u64,
    /// Bodies refused: wrong size or digest.
    pub refused: u64,
}

/// A fetch to start: which body, how big, and from which node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    pub manifest: Manifest,
    pub node: String,
}

struct Held {
    body: Arc<str>,
    /// When a snapshot last found no manifest naming it.
    unnamed_since: Option<Instant>,
}

struct Wanted {
    len: usize,
    /// Nodes whose keys name it, as of the last snapshot.
    sources: Vec<String>,
    /// Fetches tried so far: picks the next source and the backoff.
    attempts: u32,
    next_try: Instant,
    in_flight: bool,
}

#[derive(Default)]
pub struct Store {
    held: HashMap<String, Held>,
    wanted: BTreeMap<String, Wanted>,
    /// Digests named since the last [`Store::end_snapshot`], and by which nodes.
    named: HashMap<String, (usize, Vec<String>)>,
    /// Bumped whenever a body arrives: the view can change with no gossip version moving.
    arrivals: u64,
    report: PayloadReport,
}

impl Store {
    /// The value to gossip for `value`: a manifest when it is large (the body is then held
    /// here), `None` when it goes into gossip as it is.
    pub fn carry(&mut self, value: &str) -> Option<String> {
        if value.len() <= CHUNK_LEN || value.len() > MAX_PAYLOAD {
            return None;
        }
        let manifest = Manifest::of(value);
        self.hold(&manifest.sha256, value.into());
        Some(manifest.encode())
    }

    fn hold(&mut self, sha256: &str, body: Arc<str>) {
        self.wanted.remove(sha256);
        self.held
            .entry(sha256.to_owned())
            .and_modify(|h| h.unnamed_since = None)
            .or_insert(Held {
                body,
                unnamed_since: None,
            });
    }

    /// Replaces every manifest among `node`'s values by its body; a manifest whose body is
    /// not held leaves its key out (as if not yet gossiped) and the body is wanted from
    /// `node`.
    pub fn resolve(&mut self, node: &str, kv: &mut BTreeMap<String, String>) {
        let mut missing = Vec::new();
        for (k, v) in kv.iter_mut() {
            if !v.starts_with(MANIFEST_PREFIX) {
                continue;
            }
            let Some(m) = Manifest::parse(v) else {
                missing.push(k.clone());
                continue;
            };
            let named = self
                .named
                .entry(m.sha256.clone())
                .or_insert_with(|| (m.len, Vec::new()));
            if !named.1.iter().any(|n| n == node) {
                named.1.push(node.to_owned());
            }
            match self.held.get(&m.sha256) {
                Some(h) if h.body.len() == m.len => *v = h.body.to_string(),
                _ => missing.push(k.clone()),
            }
        }
        for k in missing {
            kv.remove(&k);
        }
    }

    /// Called once a snapshot has resolved every node: what no manifest names any more is
    /// no longer wanted, and dropped once unnamed for a while.
    pub fn end_snapshot(&mut self, now: Instant) {
        let named = std::mem::take(&mut self.named);
        for (sha256, h) in &mut self.held {
            if named.contains_key(sha256) {
                h.unnamed_since = None;
            } else {
                h.unnamed_since.get_or_insert(now);
            }
        }
        self.held.retain(|_, h| {
            h.unnamed_since
                .is_none_or(|t| now.duration_since(t) < KEEP_UNNAMED)
        });
        self.wanted.retain(|sha256, _| named.contains_key(sha256));
        for (sha256, (len, sources)) in named {
            if self.held.contains_key(&sha256) {
                continue;
            }
            let w = self.wanted.entry(sha256).or_insert(Wanted {
                len,
                sources: Vec::new(),
                attempts: 0,
                next_try: now,
                in_flight: false,
            });
            // A manifest of another length under the same digest is a hostile one; the first
            // one seen is kept and the digest check settles which is true.
            w.sources = sources;
        }
    }

    /// Fetches to start now: bodies wanted, not underway and past their backoff, each from
    /// the next of its sources, while fewer than [`MAX_FETCHES`] are underway.
    pub fn due(&mut self, now: Instant) -> Vec<Due> {
        let underway = self.wanted.values().filter(|w| w.in_flight).count();
        let mut out = Vec::new();
        for (sha256, w) in &mut self.wanted {
            if underway + out.len() >= MAX_FETCHES {
                break;
            }
            if w.in_flight || w.next_try > now || w.sources.is_empty() {
                continue;
            }
            w.in_flight = true;
            out.push(Due {
                manifest: Manifest {
                    sha256: sha256.clone(),
                    len: w.len,
                },
                node: w.sources[w.attempts as usize % w.sources.len()].clone(),
            });
        }
        out
    }

    /// Takes fetched bytes if they are the manifest's body.
    pub fn arrived(&mut self, m: &Manifest, bytes: Vec<u8>, now: Instant) -> Result<(), Refusal> {
        let checked = if bytes.len() != m.len {
            Err(Refusal::Size {
                want: m.len,
                got: bytes.len(),
            })
        } else if sha256_hex(&bytes) != m.sha256 {
            Err(Refusal::Digest)
        } else {
            String::from_utf8(bytes).map_err(|_| Refusal::Text)
        };
        match checked {
            Ok(body) => {
                self.hold(&m.sha256, body.into());
                self.report.fetched += 1;
                self.arrivals += 1;
                Ok(())
            }
            Err(r) => {
                self.report.refused += 1;
                self.retry_later(&m.sha256, now);
                Err(r)
            }
        }
    }

    /// A fetch that got nothing: tried again later, from the next source.
    pub fn failed(&mut self, m: &Manifest, now: Instant) {
        self.report.failed += 1;
        self.retry_later(&m.sha256, now);
    }

    fn retry_later(&mut self, sha256: &str, now: Instant) {
        if let Some(w) = self.wanted.get_mut(sha256) {
            w.in_flight = false;
            w.attempts = w.attempts.saturating_add(1);
            let backoff = FIRST_RETRY
                .saturating_mul(1 << w.attempts.min(10).saturating_sub(1))
                .min(LAST_RETRY);
            w.next_try = now + backoff;
        }
    }

    /// The body with this digest, to serve a peer.
    pub fn body(&self, sha256: &str) -> Option<Arc<str>> {
        self.held.get(sha256).map(|h| h.body.clone())
    }

    pub fn arrivals(&self) -> u64 {
        self.arrivals
    }

    pub fn report(&self) -> PayloadReport {
        PayloadReport {
            held: self.held.len(),
            wanted: self.wanted.len(),
            ..self.report
        }
    }
}

/// Where a node keeps the bodies of its own large values, beside its state file: the state
/// file names them by manifest, so rewriting it (on every change of the node's keys) stays
/// small instead of carrying megabytes of objects through an fsync each time.
pub const BODIES_DIR: &str = "payloads";

/// `own` with every value over [`CHUNK_LEN`] replaced by its manifest, each body written to
/// `dir` under its digest first (once: the name is the content).
pub fn save_bodies(
    dir: &std::path::Path,
    own: &BTreeMap<String, String>,
) -> std::io::Result<BTreeMap<String, String>> {
    let bodies = dir.join(BODIES_DIR);
    let mut out = BTreeMap::new();
    for (k, v) in own {
        if v.len() <= CHUNK_LEN || v.len() > MAX_PAYLOAD {
            out.insert(k.clone(), v.clone());
            continue;
        }
        let m = Manifest::of(v);
        let file = bodies.join(&m.sha256);
        if !file.exists() {
            std::fs::create_dir_all(&bodies)?;
            crate::state_files::write_atomic(&file, v.as_bytes(), 0o600)?;
        }
        out.insert(k.clone(), m.encode());
    }
    Ok(out)
}

/// Removes the saved bodies `saved` (what the state file now holds) no longer names; called
/// once the state file is written, so a crash in between leaves every body it names.
pub fn prune_bodies(dir: &std::path::Path, saved: &BTreeMap<String, String>) {
    let named: std::collections::HashSet<String> = saved
        .values()
        .filter_map(|v| Some(Manifest::parse(v)?.sha256))
        .collect();
    let Ok(entries) = std::fs::read_dir(dir.join(BODIES_DIR)) else {
        return;
    };
    for e in entries.flatten() {
        if !named.contains(e.file_name().to_string_lossy().as_ref()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Puts back the bodies [`save_bodies`] set aside; a key whose body is missing or damaged
/// is left out (said): peers still hold the object and this node takes it back from them.
pub fn load_bodies(dir: &std::path::Path, keys: &mut BTreeMap<String, String>) {
    let bodies = dir.join(BODIES_DIR);
    keys.retain(|k, v| {
        let Some(m) = Manifest::parse(v) else {
            return !v.starts_with(MANIFEST_PREFIX);
        };
        let body = std::fs::read(bodies.join(&m.sha256))
            .ok()
            .filter(|b| b.len() == m.len && sha256_hex(b) == m.sha256)
            .and_then(|b| String::from_utf8(b).ok());
        match body {
            Some(b) => {
                *v = b;
                true
            }
            None => {
                tracing::warn!(
                    key = k,
                    sha256 = m.sha256,
                    "the saved body of this node's value is missing or damaged: left out, \
                     peers hold it"
                );
                false
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn big(n: usize, c: char) -> String {
        std::iter::repeat_n(c, n).collect()
    }

    fn kv(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn small_values_stay_in_gossip_and_large_ones_become_manifests() {
        let mut s = Store::default();
        assert_eq!(s.carry("{}"), None);
        let body = big(40_000, 'a');
        let m = s.carry(&body).unwrap();
        assert!(m.len() < 100, "{m}");
        assert_eq!(Manifest::parse(&m), Some(Manifest::of(&body)));
        // The writer reads its own value back whole.
        let mut own = kv(&[("obj:config:c", &m), ("node", "{}")]);
        s.resolve("a", &mut own);
        assert_eq!(own["obj:config:c"], body);
        assert_eq!(own["node"], "{}");
        // Over the size bound: not carried (the API refuses such objects before this).
        assert_eq!(s.carry(&big(MAX_PAYLOAD + 1, 'a')), None);
    }

    #[test]
    fn a_manifest_without_its_body_hides_the_key_and_wants_it_from_the_writer() {
        let body = big(40_000, 'b');
        let m = Manifest::of(&body);
        let mut s = Store::default();
        let mut theirs = kv(&[("obj:secret:s", &m.encode()), ("tsk:x", "{}")]);
        s.resolve("a", &mut theirs);
        assert!(!theirs.contains_key("obj:secret:s"), "not yet gossiped");
        assert!(theirs.contains_key("tsk:x"));
        let now = Instant::now();
        s.end_snapshot(now);
        assert_eq!(
            s.due(now),
            vec![Due {
                manifest: m.clone(),
                node: "a".into()
            }]
        );
        assert!(s.due(now).is_empty(), "one fetch of a body at a time");
        s.arrived(&m, body.clone().into_bytes(), now).unwrap();
        assert_eq!(s.arrivals(), 1);
        let mut theirs = kv(&[("obj:secret:s", &m.encode())]);
        s.resolve("a", &mut theirs);
        assert_eq!(theirs["obj:secret:s"], body);
        s.end_snapshot(now);
        assert!(s.due(now).is_empty());
        assert_eq!(s.report().held, 1);
        assert_eq!(s.report().wanted, 0);
    }

    #[test]
    fn wrong_bytes_are_refused_and_counted_and_the_next_source_is_tried_later() {
        let body = big(40_000, 'c');
        let m = Manifest::of(&body);
        let mut s = Store::default();
        s.resolve("a", &mut kv(&[("obj:config:c", &m.encode())]));
        s.resolve("b", &mut kv(&[("obj:config:c", &m.encode())]));
        let now = Instant::now();
        s.end_snapshot(now);
        assert_eq!(s.due(now)[0].node, "a");
        let mut forged = body.clone().into_bytes();
        forged[7] = b'x';
        assert_eq!(s.arrived(&m, forged, now), Err(Refusal::Digest));
        assert_eq!(
            s.arrived(&m, b"short".to_vec(), now),
            Err(Refusal::Size {
                want: 40_000,
                got: 5
            })
        );
        assert_eq!(s.report().refused, 2);
        assert!(s.body(&m.sha256).is_none());
        let mut still = kv(&[("obj:config:c", &m.encode())]);
        s.resolve("a", &mut still);
        assert!(still.is_empty(), "refused bytes are never shown");
        // Backed off, then asked of the next node.
        assert!(s.due(now).is_empty());
        let later = now + LAST_RETRY;
        assert_eq!(s.due(later)[0].node, "a", "two refusals: back to the first");
        s.failed(&m, later);
        assert_eq!(s.due(later + LAST_RETRY)[0].node, "b");
    }

    #[test]
    fn a_body_nobody_serves_is_retried_with_growing_backoff_not_in_a_loop() {
        let m = Manifest::of(&big(40_000, 'd'));
        let mut s = Store::default();
        s.resolve("a", &mut kv(&[("k", &m.encode())]));
        let mut now = Instant::now();
        s.end_snapshot(now);
        let mut waits = Vec::new();
        for _ in 0..12 {
            assert_eq!(s.due(now).len(), 1);
            s.failed(&m, now);
            assert!(s.due(now).is_empty(), "not again at once");
            let mut t = now;
            while s.due(t).is_empty() {
                t += Duration::from_millis(100);
            }
            s.failed(&m, t);
            waits.push(t - now);
            now = t + LAST_RETRY;
        }
        assert!(waits[0] >= FIRST_RETRY, "{waits:?}");
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), LAST_RETRY, "{waits:?}");
        assert_eq!(s.report().failed, 24);
    }

    #[test]
    fn fetches_are_bounded_and_a_body_nobody_names_is_not_fetched() {
        let mut s = Store::default();
        let manifests: Vec<Manifest> = (0..10)
            .map(|i| Manifest::of(&big(20_000 + i, 'e')))
            .collect();
        for (i, m) in manifests.iter().enumerate() {
            s.resolve("a", &mut kv(&[(&format!("k{i}"), &m.encode())]));
        }
        let now = Instant::now();
        s.end_snapshot(now);
        assert_eq!(s.due(now).len(), MAX_FETCHES);
        assert!(s.due(now).is_empty());
        // The next snapshot names none of them: nothing more is fetched.
        s.end_snapshot(now);
        assert_eq!(s.report().wanted, 0);
        assert!(s.due(now).is_empty());
    }

    #[test]
    fn hostile_manifests_are_left_out_and_never_fetched() {
        let mut s = Store::default();
        for bad in [
            "payload:abc:10".to_owned(),
            format!("payload:{}:0", "0".repeat(64)),
            format!("payload:{}:{}", "0".repeat(64), MAX_PAYLOAD + 1),
            format!("payload:{}", "0".repeat(64)),
            format!("payload:{}:12", "g".repeat(64)),
        ] {
            let mut theirs = kv(&[("k", &bad)]);
            s.resolve("a", &mut theirs);
            assert!(theirs.is_empty(), "{bad}");
        }
        s.end_snapshot(Instant::now());
        assert_eq!(s.report().wanted, 0);
    }

    #[test]
    fn a_body_no_manifest_names_is_dropped_after_a_while() {
        let mut s = Store::default();
        let body = big(30_000, 'f');
        let m = s.carry(&body).unwrap();
        let sha = Manifest::parse(&m).unwrap().sha256;
        let now = Instant::now();
        s.end_snapshot(now);
        assert!(s.body(&sha).is_some(), "kept a while");
        s.end_snapshot(now + KEEP_UNNAMED);
        assert!(s.body(&sha).is_none());
    }

    #[test]
    fn a_nodes_large_values_are_saved_beside_its_state_file_and_read_back() {
        let dir = std::env::temp_dir().join(format!("mesh-payloads-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let big = big(40_000, 'g');
        let other = big.replace('g', "h");
        let own = kv(&[
            ("obj:config:a", &big),
            ("obj:config:b", &other),
            ("tsk:t", "{}"),
        ]);
        let saved = save_bodies(&dir, &own).unwrap();
        assert_eq!(saved["tsk:t"], "{}");
        assert!(
            saved["obj:config:a"].len() < 100,
            "the state file names bodies"
        );
        let mut loaded = saved.clone();
        load_bodies(&dir, &mut loaded);
        assert_eq!(loaded, own);

        // A body no longer named is removed; a damaged one leaves its key out.
        let own = kv(&[("obj:config:a", &big)]);
        let saved = save_bodies(&dir, &own).unwrap();
        prune_bodies(&dir, &saved);
        assert_eq!(std::fs::read_dir(dir.join(BODIES_DIR)).unwrap().count(), 1);
        let file = dir.join(BODIES_DIR).join(Manifest::of(&big).sha256);
        std::fs::write(&file, big.replace('g', "x")).unwrap();
        let mut loaded = saved.clone();
        load_bodies(&dir, &mut loaded);
        assert!(loaded.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
