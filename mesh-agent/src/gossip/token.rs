//! Join tokens: what `mesh-agent join` needs to become a member, in one line.
//!
//! ```text
//! MESH-1-<cluster key, 64 hex digits>-<key id, 8 hex digits>[-<cluster name>]
//! ```
//!
//! Swarm's tokens carry a secret and a digest of the root CA so the joiner can tell it reached
//! the right swarm. Here the secret is the cluster key itself (gossip is sealed with it) and
//! the key id is the fingerprint: the joiner only accepts a peer whose answer is sealed under
//! that key (see `transport::probe`), and a token damaged in copying fails its own check
//! before anything is tried. The cluster name is left out when it is the default. Hex, not
//! base64, so the token survives double-clicks, shells and URLs, and `-` can separate fields.
//!
//! A token is as secret as the key file: it is printed only to root on a member and never
//! logged (its `Debug` shows the key id only).

use std::fmt;

use anyhow::{Result, bail};
use zeroize::Zeroizing;

use super::keyring::KEY_LEN;
use super::keyring::key_id;
use mesh_api::v1::KeyId;

pub const PREFIX: &str = "MESH-";
pub const VERSION: u32 = 1;
/// The cluster name a token leaves out.
pub const DEFAULT_CLUSTER: &str = "mesh";

pub struct JoinToken {
    pub key: Zeroizing<[u8; KEY_LEN]>,
    pub cluster: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken(key {}, cluster {})", self.id(), self.cluster)
    }
}

const GET_ONE: &str = "print the current one with `meshctl join-token` on a member";

impl JoinToken {
    pub fn new(key: &[u8; KEY_LEN], cluster: &str) -> Self {
        Self {
            key: Zeroizing::new(*key),
            cluster: cluster.to_owned(),
        }
    }

    /// The key's id: what the token's fingerprint says and what a member's answer must be
    /// sealed with.
    pub fn id(&self) -> KeyId {
        key_id(&self.key)
    }

    pub fn encode(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(format!("{PREFIX}{VERSION}-"));
        for b in self.key.iter() {
            s.push_str(&format!("{b:02x}"));
        }
        s.push_str(&format!("-{}", self.id()));
        if self.cluster != DEFAULT_CLUSTER {
            s.push('-');
            s.push_str(&self.cluster);
        }
        s
    }

    /// Parses a token; errors say what is wrong with it and never repeat it.
    pub fn decode(text: &str) -> Result<Self> {
        let text = text.trim();
        let Some(rest) = text.strip_prefix(PREFIX) else {
            bail!("this is not a mesh join token (those start with {PREFIX}{VERSION}-): {GET_ONE}");
        };
        let (version, rest) = rest.split_once('-').unwrap_or((rest, ""));
        match version.parse::<u32>() {
            Ok(VERSION) => {}
            Ok(v) => bail!(
                "the join token is version {v}; this mesh-agent reads version {VERSION}: \
                 use a mesh-agent of the cluster's release, or {GET_ONE}"
            ),
            Err(_) => bail!("the join token is damaged (no version after {PREFIX}): {GET_ONE}"),
        }
        let mut fields = rest.splitn(3, '-');
        let key_hex = fields.next().unwrap_or_default();
        let id_hex = fields.next().unwrap_or_default();
        let cluster = fields.next().unwrap_or(DEFAULT_CLUSTER);
        if key_hex.len() != 2 * KEY_LEN || !key_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!(
                "the join token is truncated or damaged (its key is not {} hex digits): {GET_ONE}",
                2 * KEY_LEN
            );
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&key_hex[2 * i..2 * i + 2], 16).expect("hex digits");
        }
        let Ok(id) = u32::from_str_radix(id_hex, 16).map(KeyId) else {
            bail!("the join token is truncated or damaged (no key fingerprint): {GET_ONE}");
        };
        if id_hex.len() != 8 || id != key_id(&key) {
            bail!(
                "the join token is damaged: its key does not match its fingerprint (a character \
                 was changed or lost in copying): {GET_ONE}"
            );
        }
        if cluster.is_empty() || cluster.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("the join token's cluster name is damaged: {GET_ONE}");
        }
        Ok(Self {
            key,
            cluster: cluster.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(cluster: &str) -> JoinToken {
        let mut key = [0u8; KEY_LEN];
        for (i, b) in key.iter_mut().enumerate() {
            *b = i as u8 * 7;
        }
        JoinToken::new(&key, cluster)
    }

    #[test]
    fn a_token_decodes_to_its_key_and_cluster() {
        for cluster in ["mesh", "prod-eu-1"] {
            let t = token(cluster);
            let text = t.encode();
            assert!(text.starts_with("MESH-1-"), "{}", text.as_str());
            let back = JoinToken::decode(&text).unwrap();
            assert_eq!(*back.key, *t.key);
            assert_eq!(back.cluster, cluster);
            assert_eq!(back.id(), t.id());
        }
        assert!(
            !token("mesh").encode().ends_with("-mesh"),
            "the default cluster name is left out"
        );
        // Whitespace around a pasted token is fine.
        let padded = format!("  {}\n", token("mesh").encode().as_str());
        assert!(JoinToken::decode(&padded).is_ok());
    }

    #[test]
    fn bad_tokens_say_what_is_wrong_without_repeating_the_key() {
        let good = token("mesh").encode().to_string();
        let key_hex = &good[7..7 + 64];
        let mut flipped = good.clone().into_bytes();
        // Change one key digit: the fingerprint no longer matches.
        flipped[10] = if flipped[10] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        let cases = [
            ("SWMTKN-1-abc-def", "not a mesh join token"),
            ("", "not a mesh join token"),
            (&good.replacen("MESH-1-", "MESH-2-", 1) as &str, "version 2"),
            ("MESH-x-00", "no version"),
            (&good[..40], "truncated or damaged"),
            (&good[..7 + 64], "no key fingerprint"),
            (&format!("{}-zz", &good[..7 + 64]), "no key fingerprint"),
            (&flipped, "does not match its fingerprint"),
            (&format!("{good}-"), "cluster name is damaged"),
        ];
        for (text, want) in cases {
            let e = format!("{:#}", JoinToken::decode(text).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.contains("meshctl join-token"), "says how to fix: {e}");
            assert!(!e.contains(key_hex), "leaks the key: {e}");
        }
    }

    #[test]
    fn debug_output_shows_the_fingerprint_not_the_key() {
        let t = token("mesh");
        let shown = format!("{t:?}");
        assert!(shown.contains(&t.id().to_string()), "{shown}");
        assert!(!shown.contains(&t.encode()[7..20]), "{shown}");
    }
}
