//! Join tokens: what `mesh-agent join` needs to become a member, in one line.
//!
//! ```text
//! MESH-1-<cluster key, 64 hex digits>-<key id, 8 hex digits>[-<cluster name>]
//! MESH-2-<cluster key>-<key id>-W<admin public key, 64 hex digits>[-<cluster name>]
//! MESH-2-<cluster key>-<key id>-A<admin secret key, 64 hex digits>[-<cluster name>]
//! ```
//!
//! Version 1 is a cluster without roles. Version 2 tokens are Swarm's worker and manager
//! tokens (see `crate::roles`): a worker token carries the admin key's public half, so the
//! joiner can check every role grant; an admin token carries its secret, so the joiner is an
//! admin that can grant roles. An admin token is as powerful as an admin's key files.
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
/// Tokens of clusters with roles.
pub const VERSION_ROLES: u32 = 2;

/// What a version-2 token makes the joiner.
pub enum TokenRole {
    /// A worker: the admin key's public half.
    Worker(crate::identity::PublicKey),
    /// An admin: the admin key's secret seed.
    Admin(Zeroizing<[u8; 32]>),
}
/// The cluster name a token leaves out.
pub const DEFAULT_CLUSTER: &str = "mesh";

pub struct JoinToken {
    pub key: Zeroizing<[u8; KEY_LEN]>,
    pub cluster: String,
    /// `None`: a cluster without roles.
    pub role: Option<TokenRole>,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let role = match &self.role {
            None => "none",
            Some(TokenRole::Worker(_)) => "worker",
            Some(TokenRole::Admin(_)) => "admin",
        };
        write!(
            f,
            "JoinToken(key {}, cluster {}, role {role})",
            self.id(),
            self.cluster
        )
    }
}

const GET_ONE: &str = "print the current one with `meshctl join-token` on a member";

impl JoinToken {
    pub fn new(key: &[u8; KEY_LEN], cluster: &str) -> Self {
        Self {
            key: Zeroizing::new(*key),
            cluster: cluster.to_owned(),
            role: None,
        }
    }

    /// The same token for a cluster with roles.
    pub fn with_role(mut self, role: TokenRole) -> Self {
        self.role = Some(role);
        self
    }

    /// The admin key the token hands on: its public half and, in an admin token, the secret.
    pub fn admin_key(&self) -> Option<crate::roles::AdminKey> {
        Some(match self.role.as_ref()? {
            TokenRole::Worker(public) => crate::roles::AdminKey::public_only(*public),
            TokenRole::Admin(seed) => {
                crate::roles::AdminKey::from_secret(crate::identity::NodeIdentity::from_seed(seed))
            }
        })
    }

    /// The key's id: what the token's fingerprint says and what a member's answer must be
    /// sealed with.
    pub fn id(&self) -> KeyId {
        key_id(&self.key)
    }

    pub fn encode(&self) -> Zeroizing<String> {
        let version = if self.role.is_some() {
            VERSION_ROLES
        } else {
            VERSION
        };
        let mut s = Zeroizing::new(format!("{PREFIX}{version}-"));
        for b in self.key.iter() {
            s.push_str(&format!("{b:02x}"));
        }
        s.push_str(&format!("-{}", self.id()));
        let role = match &self.role {
            None => None,
            Some(TokenRole::Worker(public)) => Some(('W', public.0)),
            Some(TokenRole::Admin(seed)) => Some(('A', **seed)),
        };
        if let Some((letter, bytes)) = role {
            s.push('-');
            s.push(letter);
            for b in bytes.iter() {
                s.push_str(&format!("{b:02x}"));
            }
        }
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
        let with_role = match version.parse::<u32>() {
            Ok(VERSION) => false,
            Ok(VERSION_ROLES) => true,
            Ok(v) => bail!(
                "the join token is version {v}; this mesh-agent reads versions {VERSION} and \
                 {VERSION_ROLES}: use a mesh-agent of the cluster's release, or {GET_ONE}"
            ),
            Err(_) => bail!("the join token is damaged (no version after {PREFIX}): {GET_ONE}"),
        };
        let mut fields = rest.splitn(if with_role { 4 } else { 3 }, '-');
        let key_hex = fields.next().unwrap_or_default();
        let id_hex = fields.next().unwrap_or_default();
        let role = if with_role {
            Some(decode_role(fields.next().unwrap_or_default())?)
        } else {
            None
        };
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
            role,
        })
    }
}

/// `W<public key>` or `A<secret seed>`, 64 hex digits each.
fn decode_role(field: &str) -> Result<TokenRole> {
    let damaged = || {
        anyhow::anyhow!(
            "the join token is truncated or damaged (its role part is not W or A and 64 hex \
             digits): {GET_ONE}"
        )
    };
    let (letter, hex) = field.split_at_checked(1).ok_or_else(damaged)?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(damaged());
    }
    let mut bytes = Zeroizing::new([0u8; 32]);
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex digits");
    }
    match letter {
        "W" => {
            let text = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, *bytes);
            let public = text
                .parse()
                .map_err(|_| anyhow::anyhow!("the join token's admin key is damaged: {GET_ONE}"))?;
            Ok(TokenRole::Worker(public))
        }
        "A" => Ok(TokenRole::Admin(bytes)),
        _ => Err(damaged()),
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
            (&good.replacen("MESH-1-", "MESH-3-", 1) as &str, "version 3"),
            (&good.replacen("MESH-1-", "MESH-2-", 1) as &str, "role part"),
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
    fn worker_and_admin_tokens_carry_the_admin_key_and_say_so_when_damaged() {
        let admin = crate::identity::NodeIdentity::generate().unwrap();
        for cluster in ["mesh", "prod-eu-1"] {
            let worker = token(cluster).with_role(TokenRole::Worker(admin.public()));
            let text = worker.encode();
            assert!(text.starts_with("MESH-2-"), "{}", text.as_str());
            let back = JoinToken::decode(&text).unwrap();
            assert_eq!(back.cluster, cluster);
            let key = back.admin_key().unwrap();
            assert_eq!(key.public, admin.public());
            assert!(key.secret().is_none(), "a worker token holds no secret");
            let adm = token(cluster).with_role(TokenRole::Admin(admin.seed()));
            let back = JoinToken::decode(&adm.encode()).unwrap();
            let key = back.admin_key().unwrap();
            assert_eq!(key.public, admin.public());
            assert!(key.secret().is_some());
            assert!(format!("{back:?}").contains("role admin"));
            assert!(!format!("{back:?}").contains(&adm.encode()[80..100]));
        }
        let good = token("mesh")
            .with_role(TokenRole::Worker(admin.public()))
            .encode()
            .to_string();
        let role_at = 7 + 64 + 1 + 8 + 1;
        for (bad, want) in [
            (
                format!("{}X{}", &good[..role_at], &good[role_at + 1..]),
                "role part",
            ),
            (good[..good.len() - 3].to_string(), "role part"),
            (format!("{}-", &good), "cluster name is damaged"),
        ] {
            let e = format!("{:#}", JoinToken::decode(&bad).unwrap_err());
            assert!(e.contains(want), "{bad}: {e}");
        }
        assert!(token("mesh").admin_key().is_none());
    }

    #[test]
    fn debug_output_shows_the_fingerprint_not_the_key() {
        let t = token("mesh");
        let shown = format!("{t:?}");
        assert!(shown.contains(&t.id().to_string()), "{shown}");
        assert!(!shown.contains(&t.encode()[7..20]), "{shown}");
    }
}
