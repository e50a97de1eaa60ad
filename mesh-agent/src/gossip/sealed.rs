//! Secrets sealed under the cluster key: what `meshctl secret create` stores in gossip and
//! what therefore lands in every node's state file. Only a node holding the key can open one.
//!
//! In a cluster with roles a secret is sealed instead to the admin key, and each node that
//! runs a task granted it gets its own copy sealed to its node key (`identity::sealing`;
//! see `agent::secrets`): a worker holding the cluster key opens only its own copies. The
//! cluster-key form below stays for clusters without roles and for secrets made before
//! roles, until an admin reseals them.
//!
//! XChaCha20-Poly1305 under a key of the cluster keyring (the primary when sealing), a random
//! 192-bit nonce per seal, and associated data that binds the ciphertext to this use, this
//! cluster and the secret's name: `"mesh secret v1\0" cluster "\0" name`. A sealed secret can
//! therefore not be replayed as another secret, nor mistaken for a gossip datagram, whose
//! associated data starts with the datagram header (`'m' 1 …`) instead.
//!
//! The same keys as gossip rather than a separate key file: a second key to distribute,
//! rotate and back up would be one more thing that can be lost, and whoever has the cluster
//! key can already read every secret off the wire. After a key rotation every node reseals
//! the secrets it can open under the new primary (see `agent::secrets`), so retiring the old
//! key does not strand them.

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use chacha20poly1305::{AeadInOut, Tag, XNonce};
use zeroize::Zeroizing;

use super::{
    auth::{NONCE_LEN, TAG_LEN},
    keyring::Keyring,
};
use crate::identity::{NodeIdentity, PublicKey, sealing};
// The record is the table's (a secret's spec holds it); sealing and opening it are gossip's.
pub use crate::cluster::Sealed;

fn associated_data(cluster: &str, name: &str) -> Vec<u8> {
    let mut ad = b"mesh secret v1\0".to_vec();
    ad.extend_from_slice(cluster.as_bytes());
    ad.push(0);
    ad.extend_from_slice(name.as_bytes());
    ad
}

/// Seals `plaintext` as the secret `name` under the ring's primary key.
pub fn seal(ring: &Keyring, cluster: &str, name: &str, plaintext: &[u8]) -> Sealed {
    let key = ring.primary();
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).expect("OS randomness");
    let mut buf = Zeroizing::new(plaintext.to_vec());
    let tag = key
        .cipher
        .encrypt_inout_detached(
            &XNonce::from(nonce),
            &associated_data(cluster, name),
            buf.as_mut_slice().into(),
        )
        .expect("a secret is far below the cipher's length limit");
    let mut out = Vec::with_capacity(NONCE_LEN + buf.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&buf);
    out.extend_from_slice(&tag);
    Sealed {
        key: key.id,
        data: BASE64.encode(out),
    }
}

/// Opens a sealed secret. The error says which key is missing, never anything of the data.
pub fn open(
    ring: &Keyring,
    cluster: &str,
    name: &str,
    sealed: &Sealed,
) -> Result<Zeroizing<Vec<u8>>, String> {
    let key = ring.get(sealed.key).ok_or_else(|| {
        format!(
            "secret {name} is sealed with cluster key {} which this node does not hold (its \
             keys: {})",
            sealed.key,
            ring.ids()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let raw = Zeroizing::new(
        BASE64
            .decode(&sealed.data)
            .map_err(|_| format!("secret {name}: the sealed data is not base64"))?,
    );
    if raw.len() < NONCE_LEN + TAG_LEN {
        return Err(format!("secret {name}: the sealed data is truncated"));
    }
    let (nonce, rest) = raw.split_at(NONCE_LEN);
    let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
    let mut plain = Zeroizing::new(body.to_vec());
    let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at NONCE_LEN");
    let tag: [u8; TAG_LEN] = tag.try_into().expect("split at TAG_LEN");
    key.cipher
        .decrypt_inout_detached(
            &XNonce::from(nonce),
            &associated_data(cluster, name),
            plain.as_mut_slice().into(),
            &Tag::from(tag),
        )
        .map_err(|_| {
            format!(
                "secret {name} does not open under cluster key {}: it was altered or sealed \
                 for another cluster",
                sealed.key
            )
        })?;
    Ok(plain)
}

/// What a secret sealed to the admin key is for: this cluster, this secret's name.
fn admins_context(cluster: &str, name: &str) -> Vec<u8> {
    let mut c = b"mesh secret to admins v1\0".to_vec();
    c.extend_from_slice(cluster.as_bytes());
    c.push(0);
    c.extend_from_slice(name.as_bytes());
    c
}

/// What one node's copy of a secret is for: this cluster, this secret, this node. Binding the
/// node's name as well as its key keeps an admin's copy for one name from being presented
/// under another, and the secret's name keeps a copy from being renamed into another secret.
fn copy_context(cluster: &str, secret: &str, node: &str) -> Vec<u8> {
    let mut c = b"mesh secret copy v1\0".to_vec();
    c.extend_from_slice(cluster.as_bytes());
    c.push(0);
    c.extend_from_slice(secret.as_bytes());
    c.push(0);
    c.extend_from_slice(node.as_bytes());
    c
}

fn seal_box(to: &PublicKey, context: &[u8], plaintext: &[u8]) -> Result<String, String> {
    sealing::seal(to, context, plaintext)
        .map(|b| BASE64.encode(b))
        .map_err(|e| format!("{e:#}"))
}

fn open_box(me: &NodeIdentity, context: &[u8], sealed: &str) -> Option<Zeroizing<Vec<u8>>> {
    let raw = BASE64.decode(sealed).ok()?;
    sealing::open(me, context, &raw).ok()
}

/// Seals the secret `name` to the admin key: what `secret create` stores in a cluster with
/// roles, so that only holders of `admin.key` open it.
pub fn seal_for_admins(
    admin: &PublicKey,
    cluster: &str,
    name: &str,
    plaintext: &[u8],
) -> Result<String, String> {
    seal_box(admin, &admins_context(cluster, name), plaintext)
}

/// Opens a secret sealed to the admin key with its secret half.
pub fn open_for_admins(
    admin: &NodeIdentity,
    cluster: &str,
    name: &str,
    sealed: &str,
) -> Result<Zeroizing<Vec<u8>>, String> {
    open_box(admin, &admins_context(cluster, name), sealed).ok_or_else(|| {
        format!(
            "secret {name} does not open with this node's admin key: it was altered, or              sealed for another cluster or admin key"
        )
    })
}

/// Seals the secret `secret` to `node`'s key `to`: that node's copy.
pub fn seal_copy(
    to: &PublicKey,
    cluster: &str,
    secret: &str,
    node: &str,
    plaintext: &[u8],
) -> Result<String, String> {
    seal_box(to, &copy_context(cluster, secret, node), plaintext)
}

/// Opens this node's copy of `secret`; `None` when it is not sealed to `me` as `node` for
/// this secret and cluster, or was altered.
pub fn open_copy(
    me: &NodeIdentity,
    cluster: &str,
    secret: &str,
    node: &str,
    sealed: &str,
) -> Option<Zeroizing<Vec<u8>>> {
    open_box(me, &copy_context(cluster, secret, node), sealed)
}

/// What a rotated cluster key sealed to one node is for: this cluster, that node.
fn cluster_key_context(cluster: &str, node: &str) -> Vec<u8> {
    let mut c = b"mesh cluster key v1\0".to_vec();
    c.extend_from_slice(cluster.as_bytes());
    c.push(0);
    c.extend_from_slice(node.as_bytes());
    c
}

/// Seals a new cluster key to `node`'s key `to` (a rotation in a cluster with roles).
pub fn seal_cluster_key(
    to: &PublicKey,
    cluster: &str,
    node: &str,
    key: &[u8; 32],
) -> Result<String, String> {
    seal_box(to, &cluster_key_context(cluster, node), key)
}

/// Opens the new cluster key sealed to this node as `node`.
pub fn open_cluster_key(
    me: &NodeIdentity,
    cluster: &str,
    node: &str,
    sealed: &str,
) -> Option<Zeroizing<[u8; 32]>> {
    let opened = open_box(me, &cluster_key_context(cluster, node), sealed)?;
    let key: [u8; 32] = opened.as_slice().try_into().ok()?;
    Some(Zeroizing::new(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip::keyring::ClusterKey;

    #[test]
    fn a_copy_opens_only_for_its_node_secret_and_cluster() {
        let a = NodeIdentity::generate().unwrap();
        let b = NodeIdentity::generate().unwrap();
        let copy = seal_copy(&a.public(), "c1", "db_password", "a", b"1q2w3e4r").unwrap();
        assert!(!copy.contains("1q2w3e4r"));
        assert_eq!(
            &*open_copy(&a, "c1", "db_password", "a", &copy).unwrap(),
            b"1q2w3e4r"
        );
        // Another node's key, even under the copy's node name.
        assert!(open_copy(&b, "c1", "db_password", "a", &copy).is_none());
        assert!(open_copy(&b, "c1", "db_password", "b", &copy).is_none());
        // Renamed: to another node name, another secret, another cluster.
        assert!(open_copy(&a, "c1", "db_password", "b", &copy).is_none());
        assert!(open_copy(&a, "c1", "api_key", "a", &copy).is_none());
        assert!(open_copy(&a, "c2", "db_password", "a", &copy).is_none());
        assert!(open_copy(&a, "c1", "db_password", "a", "not base64!").is_none());
        // A copy is not a secret sealed to the admins, and the reverse.
        assert!(open_for_admins(&a, "c1", "db_password", &copy).is_err());
        let for_admins = seal_for_admins(&a.public(), "c1", "db_password", b"x").unwrap();
        assert!(open_copy(&a, "c1", "db_password", "a", &for_admins).is_none());
    }

    #[test]
    fn a_rotated_cluster_key_opens_only_for_its_node() {
        let a = NodeIdentity::generate().unwrap();
        let b = NodeIdentity::generate().unwrap();
        let key = [5u8; 32];
        let s = seal_cluster_key(&a.public(), "c1", "a", &key).unwrap();
        assert_eq!(*open_cluster_key(&a, "c1", "a", &s).unwrap(), key);
        assert!(open_cluster_key(&b, "c1", "a", &s).is_none());
        assert!(open_cluster_key(&b, "c1", "b", &s).is_none());
        assert!(open_cluster_key(&a, "c1", "b", &s).is_none());
        assert!(open_cluster_key(&a, "c2", "a", &s).is_none());
        // Not a secret's copy either.
        assert!(open_copy(&a, "c1", "a", "a", &s).is_none());
    }

    #[test]
    fn a_secret_sealed_to_the_admins_opens_only_with_the_admin_key() {
        let admin = NodeIdentity::generate().unwrap();
        let node = NodeIdentity::generate().unwrap();
        let s = seal_for_admins(&admin.public(), "c1", "db_password", b"1q2w3e4r").unwrap();
        assert_eq!(
            &*open_for_admins(&admin, "c1", "db_password", &s).unwrap(),
            b"1q2w3e4r"
        );
        let e = open_for_admins(&node, "c1", "db_password", &s).unwrap_err();
        assert!(!e.contains("1q2w3e4r"));
        assert!(open_for_admins(&admin, "c1", "other", &s).is_err());
        assert!(open_for_admins(&admin, "c2", "db_password", &s).is_err());
    }

    fn ring(keys: &[[u8; 32]]) -> Keyring {
        Keyring::new(keys.iter().map(ClusterKey::new).collect()).unwrap()
    }

    #[test]
    fn a_sealed_secret_opens_only_under_its_key_cluster_and_name() {
        let r = ring(&[[7; 32]]);
        let s = seal(&r, "c1", "db_password", b"1q2w3e4r");
        assert!(!s.data.contains("1q2w3e4r"));
        assert!(!format!("{s:?}").contains(&s.data));
        assert_eq!(&*open(&r, "c1", "db_password", &s).unwrap(), b"1q2w3e4r");
        assert!(open(&r, "c2", "db_password", &s).is_err());
        assert!(open(&r, "c1", "other", &s).is_err());
        let e = open(&ring(&[[8; 32]]), "c1", "db_password", &s).unwrap_err();
        assert!(e.contains("does not hold"), "{e}");
        assert!(!e.contains("1q2w3e4r"));
        // A secondary key still opens what the old primary sealed.
        let rotated = ring(&[[8; 32], [7; 32]]);
        assert_eq!(
            &*open(&rotated, "c1", "db_password", &s).unwrap(),
            b"1q2w3e4r"
        );
    }
}
