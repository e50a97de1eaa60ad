//! Secrets sealed under the cluster key: what `meshctl secret create` stores in gossip and
//! what therefore lands in every node's state file. Only a node holding the key can open one.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip::keyring::ClusterKey;

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
