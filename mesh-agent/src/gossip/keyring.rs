//! Cluster keys: the file format, key ids, and the ring of keys an agent holds.
//!
//! # Key file
//!
//! ```text
//! # comments and blank lines are ignored
//! 9Qm2...base64...=        <- primary: this node seals its gossip with it
//! R1xk...base64...=        <- secondary: still accepted from peers
//! ```
//!
//! One key per line: 32 random bytes in standard, padded base64 (`mesh-agent keygen` makes
//! one). The first key is the primary; every listed key is accepted. A key may be followed by
//! whitespace and a `#` comment. The file must not be readable by other users.
//!
//! # Key ids
//!
//! Each datagram names the key that sealed it, so a receiver picks the key directly instead of
//! trying each one. The id is derived from the key (the first 4 bytes of a domain-separated
//! SHA-256), so an operator cannot mislabel a key and ids are safe to show: they reveal nothing
//! usable about the key.
//!
//! # Rotation without downtime
//!
//! `meshctl join-token --rotate` does the steps below for every node at once (see
//! `agent::membership`): the new key travels in sealed gossip, each agent rewrites its own key
//! file and reloads. By hand:
//!
//! 1. On each node in turn, put the new key first and keep the old one after it, then reload
//!    (`systemctl reload mesh-agent`, i.e. SIGHUP) or restart the agent.
//! 2. Once every node has the new key, remove the old line on each node in turn and reload.
//!
//! Step 1 works node by node because each datagram also carries the sender's primary key id:
//! a node answers each peer with that peer's primary when it holds it, so nodes that already
//! switched and nodes that did not yet keep understanding each other (see `auth`). The
//! classic three steps (add as secondary everywhere, make primary, drop the old one) work too.

use std::{fmt, os::unix::fs::PermissionsExt, path::Path};

use anyhow::{Context, Result, bail};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305};
use mesh_api::v1::KeyId;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Bytes in a cluster key.
pub const KEY_LEN: usize = 32;

/// More keys than this is a mistake (a rotation needs two).
pub const MAX_KEYS: usize = 8;

/// A key's id: the first bytes of a hash of it, so showing the id reveals nothing.
pub fn key_id(key: &[u8; KEY_LEN]) -> KeyId {
    let mut h = Sha256::new();
    h.update(b"mesh gossip key id v1\0");
    h.update(key);
    let d = h.finalize();
    KeyId(u32::from_be_bytes([d[0], d[1], d[2], d[3]]))
}

/// One key, ready to seal and open. Its material is only inside the cipher, which wipes it on
/// drop.
#[derive(Clone)]
pub struct ClusterKey {
    pub id: KeyId,
    pub cipher: XChaCha20Poly1305,
}

impl ClusterKey {
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        Self {
            id: key_id(key),
            cipher: XChaCha20Poly1305::new(key.into()),
        }
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey({})", self.id)
    }
}

/// The keys of one node: the primary first, then the ones still accepted.
#[derive(Clone, Debug)]
pub struct Keyring {
    keys: Vec<ClusterKey>,
}

impl Keyring {
    pub fn new(keys: Vec<ClusterKey>) -> Result<Self> {
        if keys.is_empty() {
            bail!("a keyring needs at least one key");
        }
        for (i, k) in keys.iter().enumerate() {
            if keys[..i].iter().any(|o| o.id == k.id) {
                bail!(
                    "key {} is listed twice (or two keys share an id: generate a new one)",
                    k.id
                );
            }
        }
        Ok(Self { keys })
    }

    /// Parses a key file's text. Errors name the line, never the key.
    pub fn parse(text: &str) -> Result<Self> {
        Self::new(
            parse_material(text)?
                .iter()
                .map(|k| ClusterKey::new(k))
                .collect(),
        )
    }

    /// Reads a key file, refusing one that other users can read or write.
    pub fn load(path: &Path) -> Result<Self> {
        check_key_file(path)?;
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading cluster key file {}", path.display()))?,
        );
        Self::parse(&text).with_context(|| format!("cluster key file {}", path.display()))
    }

    pub fn primary(&self) -> &ClusterKey {
        &self.keys[0]
    }

    pub fn get(&self, id: KeyId) -> Option<&ClusterKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// Key ids, primary first.
    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|k| k.id).collect()
    }
}

/// The keys of a key file's text, primary first. Errors name the line, never the key.
pub fn parse_material(text: &str) -> Result<Vec<Zeroizing<[u8; KEY_LEN]>>> {
    let mut keys: Vec<Zeroizing<[u8; KEY_LEN]>> = Vec::new();
    let mut ids = Vec::new();
    let mut lines = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (encoded, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim_start();
        if !rest.is_empty() && !rest.starts_with('#') {
            bail!("line {n}: expected one base64 key, optionally followed by a # comment");
        }
        let bytes = Zeroizing::new(BASE64.decode(encoded).map_err(|_| {
            anyhow::anyhow!("line {n}: not a base64 key (make one with `mesh-agent keygen`)")
        })?);
        let key: &[u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
            anyhow::anyhow!(
                "line {n}: the key is {} bytes, a cluster key is {KEY_LEN} (make one with `mesh-agent keygen`)",
                bytes.len()
            )
        })?;
        let id = key_id(key);
        if let Some(i) = ids.iter().position(|k| *k == id) {
            bail!("line {n}: the same key as line {} (key {id})", lines[i]);
        }
        keys.push(Zeroizing::new(*key));
        ids.push(id);
        lines.push(n);
    }
    if keys.is_empty() {
        bail!("no key in the file (make one with `mesh-agent keygen`)");
    }
    if keys.len() > MAX_KEYS {
        bail!(
            "{} keys: at most {MAX_KEYS} are accepted (a rotation needs two)",
            keys.len()
        );
    }
    Ok(keys)
}

/// Checks a key file's type and mode before it is read.
fn check_key_file(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("reading cluster key file {}", path.display()))?;
    if !meta.is_file() {
        bail!("cluster key file {} is not a regular file", path.display());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        bail!(
            "cluster key file {} is accessible by other users (mode {mode:04o}): run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    if mode & 0o070 != 0 {
        tracing::warn!(
            "cluster key file {} is accessible by its group (mode {mode:04o}); 0600 is safer",
            path.display()
        );
    }
    Ok(())
}

/// The keys of a key file, primary first: for join tokens and rotations, which need the key
/// itself rather than a cipher.
pub fn read_material(path: &Path) -> Result<Vec<Zeroizing<[u8; KEY_LEN]>>> {
    check_key_file(path)?;
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("reading cluster key file {}", path.display()))?,
    );
    parse_material(&text).with_context(|| format!("cluster key file {}", path.display()))
}

/// Replaces a key file with these keys (primary first), owner-only, atomically: an agent
/// reloading meanwhile reads the old file or the new one, never half of one.
pub fn write_key_file(path: &Path, keys: &[&[u8; KEY_LEN]]) -> Result<()> {
    if keys.is_empty() {
        bail!("a key file needs at least one key");
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut text = Zeroizing::new(String::from(
        "# mesh cluster key file: authenticates and encrypts gossip. Written by mesh-agent\n\
         # (init, join, and `meshctl join-token --rotate`); the first key is the primary.\n",
    ));
    for k in keys {
        text.push_str(&format!("{}  # key {}\n", encode(k).as_str(), key_id(k)));
    }
    crate::state_files::write_atomic(path, text.as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))
}

/// A fresh key from the operating system's random source.
pub fn generate() -> Result<Zeroizing<[u8; KEY_LEN]>> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    getrandom::fill(key.as_mut_slice())
        .map_err(|e| anyhow::anyhow!("reading the system's random source: {e}"))?;
    Ok(key)
}

/// Creates a key file holding one new key, readable by its owner only. Never overwrites.
pub fn write_new_key_file(path: &Path) -> Result<KeyId> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let key = generate()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "creating {} (an existing key file is never overwritten)",
                path.display()
            )
        })?;
    file.write_all(key_file_text(&key).as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(key_id(&key))
}

/// A key as it appears on a line of a key file.
pub fn encode(key: &[u8; KEY_LEN]) -> Zeroizing<String> {
    Zeroizing::new(BASE64.encode(key))
}

/// The text of a new key file holding one key.
pub fn key_file_text(key: &[u8; KEY_LEN]) -> Zeroizing<String> {
    Zeroizing::new(format!(
        "# mesh cluster key file: authenticates and encrypts gossip.\n\
         # One base64 32-byte key per line. The first is the primary (gossip is sent with it);\n\
         # every key listed is accepted. To rotate, put a new key (`mesh-agent keygen`) first on\n\
         # each node in turn and reload, then remove the old line on each node and reload.\n\
         {}  # key {}\n",
        encode(key).as_str(),
        key_id(key)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> [u8; KEY_LEN] {
        [b; KEY_LEN]
    }

    #[test]
    fn a_generated_key_file_parses_back_to_its_key() {
        let k = generate().unwrap();
        let ring = Keyring::parse(&key_file_text(&k)).unwrap();
        assert_eq!(ring.ids(), vec![key_id(&k)]);
        assert_ne!(*k, [0u8; KEY_LEN], "the random source was read");
    }

    #[test]
    fn the_first_key_is_primary_and_comments_are_ignored() {
        let text = format!(
            "# rotation in progress\n\n  {}   # new\n{}\n",
            encode(&key(2)).as_str(),
            encode(&key(1)).as_str()
        );
        let ring = Keyring::parse(&text).unwrap();
        assert_eq!(ring.primary().id, key_id(&key(2)));
        assert_eq!(ring.ids(), vec![key_id(&key(2)), key_id(&key(1))]);
        assert!(ring.get(key_id(&key(1))).is_some());
        assert!(ring.get(key_id(&key(3))).is_none());
    }

    #[test]
    fn bad_files_are_rejected_with_the_line_and_without_the_key() {
        let short = BASE64.encode([7u8; 16]);
        let cases = [
            ("", "no key"),
            ("# only a comment\n", "no key"),
            ("not-base64!\n", "line 1: not a base64 key"),
            (
                &format!("# c\n{short}\n") as &str,
                "line 2: the key is 16 bytes",
            ),
            (
                &format!("{} trailing words\n", encode(&key(1)).as_str()),
                "line 1: expected one base64 key",
            ),
            (
                &format!(
                    "{}\n{}\n",
                    encode(&key(1)).as_str(),
                    encode(&key(1)).as_str()
                ),
                "line 2: the same key as line 1",
            ),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", Keyring::parse(text).unwrap_err());
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(!err.contains(&short), "the error leaks key material: {err}");
        }
        let many: String = (0..=MAX_KEYS as u8)
            .map(|i| format!("{}\n", encode(&key(i)).as_str()))
            .collect();
        assert!(Keyring::parse(&many).is_err());
    }

    #[test]
    fn key_ids_are_stable_and_distinct() {
        assert_eq!(key_id(&key(1)), key_id(&key(1)));
        assert_ne!(key_id(&key(1)), key_id(&key(2)));
        let id = key_id(&key(1));
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json.len(), 10, "8 hex digits in quotes: {json}");
        assert_eq!(serde_json::from_str::<KeyId>(&json).unwrap(), id);
    }

    #[test]
    fn keygen_writes_an_owner_only_file_and_never_overwrites() {
        let dir = std::env::temp_dir().join(format!("mesh-keygen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.key");
        let id = write_new_key_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(Keyring::load(&path).unwrap().primary().id, id);
        let err = format!("{:#}", write_new_key_file(&path).unwrap_err());
        assert!(err.contains("never overwritten"), "{err}");
        assert_eq!(Keyring::load(&path).unwrap().primary().id, id);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_written_key_file_keeps_its_order_and_is_owner_only() {
        let dir = std::env::temp_dir().join(format!("mesh-keywrite-{}", std::process::id()));
        let path = dir.join("sub").join("cluster.key");
        write_key_file(&path, &[&key(2), &key(1)]).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let ring = Keyring::load(&path).unwrap();
        assert_eq!(ring.ids(), vec![key_id(&key(2)), key_id(&key(1))]);
        let material = read_material(&path).unwrap();
        assert_eq!(*material[0], key(2));
        write_key_file(&path, &[&key(2)]).unwrap();
        assert_eq!(Keyring::load(&path).unwrap().ids().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_file_readable_by_others_is_refused() {
        let dir = std::env::temp_dir().join(format!("mesh-keyring-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.key");
        std::fs::write(&path, key_file_text(&key(9)).as_str()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = format!("{:#}", Keyring::load(&path).unwrap_err());
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Keyring::load(&path).unwrap().primary().id, key_id(&key(9)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
