//! A node's own key pair: what its gossip records are signed with (see `gossip::signed`).
//!
//! The cluster key keeps outsiders off gossip, but every member holds it, so it cannot say
//! *which* member wrote a record. Each node therefore makes an Ed25519 key pair the first
//! time its agent starts (`init`, `join`, or a `run` of an agent older than this), keeps the
//! secret half in its state dir (mode 0600, never in gossip), and publishes the public half
//! in its node record. Peers bind the node's name to that key the first time they see it
//! (see `gossip::origin`) and refuse records of that name under any other key.

pub mod sealing;

use std::{
    fmt,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    str::FromStr,
};

use anyhow::{Context, Result, bail};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The key file's name in the state dir.
pub const KEY_FILE: &str = "node.key";
/// Bytes of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// A node's key pair. Its `Debug` form shows the public key only.
pub struct NodeIdentity {
    key: SigningKey,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeIdentity({})", self.public())
    }
}

impl NodeIdentity {
    /// A new key pair from the OS's randomness.
    pub fn generate() -> Result<Self> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
        Ok(Self {
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// The key pair in `path`, or a new one written there (mode 0600) when there is none.
    /// Returns whether it was made now. A file that exists but is damaged is an error, never
    /// replaced: peers know this node by the key it holds.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool)> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok((Self::parse(&text).with_context(|| {
                format!(
                    "{} is not a node key (a base64 Ed25519 seed): restore it from a backup, or \
                     remove it and `meshctl node rm` this node from another member before it \
                     joins again under a new key",
                    path.display()
                )
            })?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Self::generate()?;
                id.write(path)?;
                Ok((id, true))
            }
            Err(e) => Err(e).with_context(|| format!("reading the node key {}", path.display())),
        }
    }

    fn parse(text: &str) -> Result<Self> {
        let bytes = Zeroizing::new(B64.decode(text.trim())?);
        let seed: &[u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| anyhow::anyhow!("{} bytes, not 32", bytes.len()))?;
        Ok(Self {
            key: SigningKey::from_bytes(seed),
        })
    }

    fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = Zeroizing::new(B64.encode(self.key.to_bytes()));
        // Created 0600 (not chmod-ed after), so the secret is never readable by others.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating the node key {}", path.display()))?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        Ok(())
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.verifying_key().to_bytes())
    }

    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.key.sign(message).to_bytes()
    }
}

/// Where a state dir keeps the node key.
pub fn key_file(state_dir: &Path) -> PathBuf {
    state_dir.join(KEY_FILE)
}

/// Refuses a key file others can read: whoever reads it can speak for the node.
pub fn check_mode(path: &Path) -> Result<()> {
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        bail!(
            "the node key {} is readable by others (mode {:o}): `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    Ok(())
}

/// A node's public key, base64 in records and on screen.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Whether `signature` is this key's over `message` (strict: no malleable encodings, no
    /// weak keys).
    pub fn verify(&self, message: &[u8], signature: &[u8; SIGNATURE_LEN]) -> bool {
        VerifyingKey::from_bytes(&self.0).is_ok_and(|k| {
            k.verify_strict(message, &Signature::from_bytes(signature))
                .is_ok()
        })
    }

    /// A short form for messages and `node inspect`: the first 12 base64 characters.
    pub fn short(&self) -> String {
        self.to_string()[..12].to_owned()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&B64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let bytes = B64.decode(s)?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| anyhow::anyhow!("a public key of {} bytes, not 32", b.len()))?;
        VerifyingKey::from_bytes(&key).map_err(|_| anyhow::anyhow!("not an Ed25519 point"))?;
        Ok(Self(key))
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mesh-identity-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_key_is_made_once_kept_0600_and_read_back() {
        let dir = temp_dir("keep");
        let path = key_file(&dir);
        let (made, new) = NodeIdentity::load_or_create(&path).unwrap();
        assert!(new);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        check_mode(&path).unwrap();
        let (again, new) = NodeIdentity::load_or_create(&path).unwrap();
        assert!(!new);
        assert_eq!(made.public(), again.public());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            check_mode(&path)
                .unwrap_err()
                .to_string()
                .contains("chmod 600")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_key_file_is_an_error_and_is_left_alone() {
        let dir = temp_dir("damaged");
        std::fs::create_dir_all(&dir).unwrap();
        let path = key_file(&dir);
        std::fs::write(&path, "not base64!").unwrap();
        let e = NodeIdentity::load_or_create(&path).unwrap_err();
        assert!(format!("{e:#}").contains("node rm"), "{e:#}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not base64!");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn signatures_verify_only_under_their_key_and_message() {
        let a = NodeIdentity::generate().unwrap();
        let b = NodeIdentity::generate().unwrap();
        let sig = a.sign(b"hello");
        assert!(a.public().verify(b"hello", &sig));
        assert!(!a.public().verify(b"hellO", &sig));
        assert!(!b.public().verify(b"hello", &sig));
        let mut bad = sig;
        bad[3] ^= 1;
        assert!(!a.public().verify(b"hello", &bad));
    }

    #[test]
    fn public_keys_round_trip_as_text_and_bad_ones_are_refused() {
        let a = NodeIdentity::generate().unwrap().public();
        let text = a.to_string();
        assert_eq!(text.parse::<PublicKey>().unwrap(), a);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), a);
        assert!("AAAA".parse::<PublicKey>().is_err());
        assert!(format!("{:?}", NodeIdentity::generate().unwrap()).starts_with("NodeIdentity("));
    }
}
