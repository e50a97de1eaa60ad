//! Values larger than a gossip datagram, carried as several keys.
//!
//! chitchat puts a node's keys into a delta in version order and stops at the first one that
//! does not fit what is left of the datagram: a value near or over one datagram (~64 KB)
//! would never leave the node, and every key written after it would wait behind it for
//! ever. So a value over [`CHUNK_LEN`] is written as chunk keys plus a small manifest under
//! its own key:
//!
//! ```text
//!   obj:secret:big            = "chunked:<sha256 hex>:<chunks>:<bytes>"
//!   chunk:obj:secret:big#0    = "<sha256 hex, first 16>:<first CHUNK_LEN bytes>"
//!   chunk:obj:secret:big#1    = "<sha256 hex, first 16>:<next bytes>"
//! ```
//!
//! Chunks are written before the manifest in one write, so gossip (which delivers a node's
//! keys in version order) brings them first. A reader only sees the key once every chunk
//! named by the manifest is there with the manifest's version tag and the whole hashes to
//! the manifest's digest; until then the key is absent, as if not yet gossiped. Replacing
//! the value rewrites every chunk with the new tag; removing it removes every chunk.
//!
//! Chunks still make the keys written after a large value wait until its chunks have spread
//! (minutes behind a few MB of new objects). So with a cluster key large values travel
//! outside gossip instead (see [`super::payloads`]); chunks remain for clusters without one,
//! which have no node-to-node channel to fetch bodies over, and to read values an older
//! agent wrote as chunks.

use std::collections::{BTreeMap, HashMap, HashSet};

use sha2::{Digest, Sha256};

/// The most bytes of a value one chunk key carries: a quarter of a datagram, so a delta
/// holds several and a node's other keys are never stuck behind one.
pub const CHUNK_LEN: usize = 16 * 1024;
/// Where chunk keys live: no reader's prefix (`obj:`, `ep:`, `tsk:` …) matches it.
pub const CHUNK_PREFIX: &str = "chunk:";
const MANIFEST_PREFIX: &str = "chunked:";
/// Chunks a manifest may name: the API's 500 KB objects, base64-encoded and sealed, need
/// about 45; this bounds what a hostile manifest can make a reader look for.
const MAX_CHUNKS: usize = 256;

/// The manifest a chunked value leaves under its own key.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Manifest {
    sha256: String,
    chunks: usize,
    len: usize,
}

impl Manifest {
    fn parse(value: &str) -> Option<Self> {
        let rest = value.strip_prefix(MANIFEST_PREFIX)?;
        let mut parts = rest.split(':');
        let sha256 = parts.next()?;
        let chunks = parts.next()?.parse().ok()?;
        let len = parts.next()?.parse().ok()?;
        if parts.next().is_some() || sha256.len() != 64 || chunks == 0 || chunks > MAX_CHUNKS {
            return None;
        }
        Some(Self {
            sha256: sha256.to_owned(),
            chunks,
            len,
        })
    }

    fn encode(&self) -> String {
        format!(
            "{MANIFEST_PREFIX}{}:{}:{}",
            self.sha256, self.chunks, self.len
        )
    }

    /// The version tag every chunk of this value carries.
    fn tag(&self) -> &str {
        &self.sha256[..16]
    }
}

/// The key chunk `i` of `key` is stored under.
pub fn chunk_key(key: &str, i: usize) -> String {
    format!("{CHUNK_PREFIX}{key}#{i}")
}

/// Whether a raw gossip key is a chunk of another key's value.
pub fn is_chunk(key: &str) -> bool {
    key.starts_with(CHUNK_PREFIX)
}

/// Whether the chunk key belongs to `key`'s value.
pub fn is_chunk_of(chunk: &str, key: &str) -> bool {
    chunk
        .strip_prefix(CHUNK_PREFIX)
        .and_then(|rest| rest.strip_prefix(key))
        .and_then(|rest| rest.strip_prefix('#'))
        .is_some_and(|i| i.parse::<usize>().is_ok())
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The raw keys that carry `value` under `key`: itself when it is small, else its chunks
/// followed by the manifest (the order to write them in).
pub fn split(key: &str, value: &str) -> Vec<(String, String)> {
    if value.len() <= CHUNK_LEN {
        return vec![(key.to_owned(), value.to_owned())];
    }
    let mut pieces = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let cut = rest.floor_char_boundary(CHUNK_LEN.min(rest.len()));
        // A char is at most 4 bytes, so a cut of 0 only happens if CHUNK_LEN < 4.
        let (piece, tail) = rest.split_at(cut.max(1));
        pieces.push(piece);
        rest = tail;
    }
    let manifest = Manifest {
        sha256: sha256_hex(value.as_bytes()),
        chunks: pieces.len(),
        len: value.len(),
    };
    let tag = manifest.tag().to_owned();
    let mut out: Vec<(String, String)> = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (chunk_key(key, i), format!("{tag}:{p}")))
        .collect();
    out.push((key.to_owned(), manifest.encode()));
    out
}

/// One node's raw keys with every chunked value assembled and chunk keys left out. A
/// manifest whose chunks are missing, of another version, or do not hash to its digest
/// leaves its key out.
pub fn assemble<'a>(raw: impl IntoIterator<Item = (&'a str, &'a str)>) -> BTreeMap<String, String> {
    Assembler::default().node(raw)
}

/// Assembles many nodes' keys, remembering values already verified: every node republishes
/// every object, and hashing them all again on each snapshot would cost more than gossip
/// itself. A manifest names its content's digest, so a value verified once is the value of
/// every manifest equal to it.
#[derive(Default)]
pub struct Assembler {
    verified: HashMap<String, String>,
    seen: HashSet<String>,
}

impl Assembler {
    pub fn node<'a>(
        &mut self,
        raw: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> BTreeMap<String, String> {
        let raw: BTreeMap<&str, &str> = raw.into_iter().collect();
        let mut out = BTreeMap::new();
        for (&k, &v) in &raw {
            if is_chunk(k) {
                continue;
            }
            if !v.starts_with(MANIFEST_PREFIX) {
                out.insert(k.to_owned(), v.to_owned());
                continue;
            }
            if let Some(whole) = self.verified.get(v) {
                self.seen.insert(v.to_owned());
                out.insert(k.to_owned(), whole.clone());
                continue;
            }
            if let Some(whole) = Manifest::parse(v).and_then(|m| gather(&raw, k, &m)) {
                self.seen.insert(v.to_owned());
                self.verified.insert(v.to_owned(), whole.clone());
                out.insert(k.to_owned(), whole);
            }
        }
        out
    }

    /// Forgets values no node assembled since the last call.
    pub fn forget_unseen(&mut self) {
        let seen = std::mem::take(&mut self.seen);
        self.verified.retain(|m, _| seen.contains(m));
    }
}

fn gather(raw: &BTreeMap<&str, &str>, key: &str, m: &Manifest) -> Option<String> {
    let mut whole = String::with_capacity(m.len);
    for i in 0..m.chunks {
        let chunk = raw.get(chunk_key(key, i).as_str())?;
        let piece = chunk
            .strip_prefix(m.tag())
            .and_then(|c| c.strip_prefix(':'))?;
        if whole.len() + piece.len() > m.len {
            return None;
        }
        whole.push_str(piece);
    }
    (whole.len() == m.len && sha256_hex(whole.as_bytes()) == m.sha256).then_some(whole)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn big(n: usize) -> String {
        // Not only ASCII, so cuts must respect char boundaries.
        (0..n).map(|i| if i % 7 == 0 { 'é' } else { 'a' }).collect()
    }

    fn as_refs(v: &[(String, String)]) -> Vec<(&str, &str)> {
        v.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    #[test]
    fn small_values_stay_one_key() {
        assert_eq!(split("k", "v"), vec![("k".into(), "v".into())]);
        let got = assemble([("k", "v"), ("other", "{}")]);
        assert_eq!(got["k"], "v");
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn a_large_value_round_trips_through_chunks_that_fit_a_datagram() {
        let value = big(500 * 1024);
        let raw = split("obj:config:big", &value);
        assert!(raw.len() > 30, "{} keys", raw.len());
        for (k, v) in &raw {
            assert!(v.len() <= CHUNK_LEN + 17, "{k}: {} bytes", v.len());
        }
        assert_eq!(
            raw.last().unwrap().0,
            "obj:config:big",
            "the manifest comes last"
        );
        let mut with_others = as_refs(&raw);
        with_others.push(("ep:t1", "{}"));
        let got = assemble(with_others);
        assert_eq!(got.len(), 2, "chunk keys are not shown");
        assert_eq!(got["obj:config:big"], value);
    }

    #[test]
    fn a_missing_chunk_leaves_the_key_out() {
        let raw = split("k", &big(40_000));
        let mut refs = as_refs(&raw);
        refs.remove(1);
        assert!(!assemble(refs).contains_key("k"));
    }

    #[test]
    fn chunks_of_another_version_leave_the_key_out() {
        let old = split("k", &big(40_000));
        let mut new = split("k", &format!("{}b", big(40_000)));
        // The new manifest has arrived with one chunk still from the old value.
        new[0] = old[0].clone();
        assert!(!assemble(as_refs(&new)).contains_key("k"));
    }

    #[test]
    fn a_wrong_digest_leaves_the_key_out() {
        let raw = split("k", &big(40_000));
        let mut tampered = raw.clone();
        // Same version tag, different bytes.
        let (k, v) = &raw[1];
        let mut bytes = v.clone().into_bytes();
        let last = bytes.len() - 1;
        bytes[last] = b'z';
        tampered[1] = (k.clone(), String::from_utf8(bytes).unwrap());
        assert!(!assemble(as_refs(&tampered)).contains_key("k"));
    }

    #[test]
    fn hostile_manifests_are_ignored() {
        for m in [
            "chunked:abc:1:1",
            &format!("chunked:{}:0:0", "0".repeat(64)),
            &format!("chunked:{}:100000:1", "0".repeat(64)),
            &format!("chunked:{}:1", "0".repeat(64)),
        ] {
            assert!(assemble([("k", m)]).is_empty(), "{m}");
        }
    }

    #[test]
    fn chunk_keys_are_told_apart_from_keys_with_a_common_prefix() {
        assert!(is_chunk_of(&chunk_key("obj:secret:a", 3), "obj:secret:a"));
        assert!(!is_chunk_of(&chunk_key("obj:secret:ab", 3), "obj:secret:a"));
        assert!(!is_chunk_of("obj:secret:a#1", "obj:secret:a"));
    }
}
