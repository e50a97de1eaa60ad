//! Sealing to one node: bytes only the holder of a node's key pair can open (a "sealed box").
//!
//! ```text
//!  | 1 (version) | ephemeral X25519 public (32) | nonce (24) | ciphertext ... | tag (16) |
//! ```
//!
//! The recipient's Ed25519 public key (what its node record publishes and peers pin) is
//! mapped to its X25519 form (the birational map to Montgomery form), and the sender agrees
//! a key with it from a fresh ephemeral X25519 key pair: X25519 → SHA-256 over a domain tag,
//! both public keys and the shared secret → XChaCha20-Poly1305, random nonce. The caller's
//! `context` (the cluster name and what the bytes are for) and both public keys are the
//! associated data: a sealed box opens only for the node it was made for, for the purpose it
//! was made for.
//!
//! It says nothing about who sealed it (anyone with the public key can): a caller that needs
//! that signs the plaintext with its own node key. Using one Ed25519 key for signatures and,
//! mapped, for X25519 is what libsodium's `crypto_sign_ed25519_sk_to_curve25519` does; the
//! two uses never sign or agree on attacker-chosen data of the other kind.

use anyhow::{Result, bail};
use chacha20poly1305::{AeadInOut, KeyInit, Tag, XChaCha20Poly1305, XNonce};
use curve25519_dalek::montgomery::MontgomeryPoint;
use ed25519_dalek::VerifyingKey;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{NodeIdentity, PublicKey};

const VERSION: u8 = 1;
const POINT_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Bytes a sealed box adds to its plaintext.
pub const OVERHEAD: usize = 1 + POINT_LEN + NONCE_LEN + TAG_LEN;

/// Seals `plaintext` so that only the node whose public key is `to` can open it, for
/// `context` only.
pub fn seal(to: &PublicKey, context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let recipient = montgomery(to)?;
    let mut ephemeral = Zeroizing::new([0u8; 32]);
    getrandom::fill(ephemeral.as_mut()).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    let ephemeral_public = MontgomeryPoint::mul_base_clamped(*ephemeral);
    let shared = Zeroizing::new(recipient.mul_clamped(*ephemeral).to_bytes());
    let cipher = cipher(&ephemeral_public, &recipient, &shared)?;
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
    out.push(VERSION);
    out.extend_from_slice(ephemeral_public.as_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let ad = associated_data(context, &ephemeral_public, &recipient);
    let body = &mut out[1 + POINT_LEN + NONCE_LEN..];
    let tag = cipher
        .encrypt_inout_detached(&XNonce::from(nonce), &ad, body.into())
        .map_err(|_| anyhow::anyhow!("{} bytes are too many to seal", plaintext.len()))?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Opens a box sealed to `me` for `context`.
pub fn open(me: &NodeIdentity, context: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    if sealed.len() < OVERHEAD {
        bail!("a sealed box of {} bytes is cut short", sealed.len());
    }
    if sealed[0] != VERSION {
        bail!(
            "a sealed box of version {} (this agent reads {VERSION})",
            sealed[0]
        );
    }
    let ephemeral_public = MontgomeryPoint(sealed[1..1 + POINT_LEN].try_into().expect("32"));
    let nonce: [u8; NONCE_LEN] = sealed[1 + POINT_LEN..1 + POINT_LEN + NONCE_LEN]
        .try_into()
        .expect("24");
    let recipient = montgomery(&me.public())?;
    let secret = Zeroizing::new(me.key.to_scalar_bytes());
    let shared = Zeroizing::new(ephemeral_public.mul_clamped(*secret).to_bytes());
    let cipher = cipher(&ephemeral_public, &recipient, &shared)?;
    let (body, tag) = sealed[1 + POINT_LEN + NONCE_LEN..].split_at(sealed.len() - OVERHEAD);
    let tag = Tag::try_from(tag).map_err(|_| anyhow::anyhow!("a sealed box without its tag"))?;
    let mut plaintext = Zeroizing::new(body.to_vec());
    let ad = associated_data(context, &ephemeral_public, &recipient);
    cipher
        .decrypt_inout_detached(
            &XNonce::from(nonce),
            &ad,
            plaintext.as_mut_slice().into(),
            &tag,
        )
        .map_err(|_| {
            anyhow::anyhow!(
                "a sealed box that does not open: not sealed to this node's key, for this \
                 purpose, or altered"
            )
        })?;
    Ok(plaintext)
}

fn montgomery(key: &PublicKey) -> Result<MontgomeryPoint> {
    let vk = VerifyingKey::from_bytes(&key.0)
        .map_err(|_| anyhow::anyhow!("{key} is not an Ed25519 public key"))?;
    if vk.is_weak() {
        bail!("{key} is a weak (small-order) key: nothing can be sealed to it");
    }
    Ok(vk.to_montgomery())
}

fn cipher(
    ephemeral: &MontgomeryPoint,
    recipient: &MontgomeryPoint,
    shared: &[u8; 32],
) -> Result<XChaCha20Poly1305> {
    // A small-order ephemeral point forces the all-zero secret: refuse it rather than agree
    // on a key anyone knows.
    if shared.iter().all(|b| *b == 0) {
        bail!("a sealed box whose key agreement is degenerate (a small-order point)");
    }
    let mut h = Sha256::new();
    h.update(b"mesh sealed-to-node v1\0");
    h.update(ephemeral.as_bytes());
    h.update(recipient.as_bytes());
    h.update(shared);
    let key = Zeroizing::new(<[u8; 32]>::from(h.finalize()));
    Ok(XChaCha20Poly1305::new((&*key).into()))
}

fn associated_data(
    context: &[u8],
    ephemeral: &MontgomeryPoint,
    recipient: &MontgomeryPoint,
) -> Vec<u8> {
    let mut ad = Vec::with_capacity(context.len() + 2 * POINT_LEN);
    ad.extend_from_slice(ephemeral.as_bytes());
    ad.extend_from_slice(recipient.as_bytes());
    ad.extend_from_slice(context);
    ad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_box_opens_only_for_its_node_and_context() {
        let a = NodeIdentity::generate().unwrap();
        let b = NodeIdentity::generate().unwrap();
        let msg = b"cluster key 0123456789abcdef0123456789abcdef";
        let sealed = seal(&a.public(), b"prod\0rekey", msg).unwrap();
        assert_eq!(sealed.len(), msg.len() + OVERHEAD);
        assert!(!sealed.windows(11).any(|w| w == b"cluster key"));
        assert_eq!(open(&a, b"prod\0rekey", &sealed).unwrap().as_slice(), msg);
        assert!(open(&b, b"prod\0rekey", &sealed).is_err(), "another node");
        assert!(
            open(&a, b"staging\0rekey", &sealed).is_err(),
            "another context"
        );
        // Fresh ephemeral key and nonce each time.
        assert_ne!(
            seal(&a.public(), b"c", msg).unwrap(),
            seal(&a.public(), b"c", msg).unwrap()
        );
    }

    #[test]
    fn every_altered_or_cut_box_is_refused() {
        let a = NodeIdentity::generate().unwrap();
        let sealed = seal(&a.public(), b"ctx", b"secret").unwrap();
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x01;
            assert!(open(&a, b"ctx", &t).is_err(), "byte {i}");
        }
        for n in 0..sealed.len() {
            assert!(open(&a, b"ctx", &sealed[..n]).is_err(), "cut to {n}");
        }
        assert!(open(&a, b"ctx", &[]).is_err());
    }

    #[test]
    fn small_order_points_and_weak_keys_are_refused() {
        let a = NodeIdentity::generate().unwrap();
        // The identity point as the ephemeral key: X25519 with it is all zeroes.
        let mut forged = vec![VERSION];
        forged.extend_from_slice(&[0u8; POINT_LEN]);
        forged.extend_from_slice(&[0u8; NONCE_LEN + 8 + TAG_LEN]);
        let err = open(&a, b"ctx", &forged).unwrap_err().to_string();
        assert!(err.contains("degenerate"), "{err}");
        // The Ed25519 identity point (small order) as a recipient.
        let mut weak = [0u8; 32];
        weak[0] = 1;
        assert!(seal(&PublicKey(weak), b"ctx", b"x").is_err());
    }

    #[test]
    fn an_empty_plaintext_seals_and_opens() {
        let a = NodeIdentity::generate().unwrap();
        let sealed = seal(&a.public(), b"", b"").unwrap();
        assert_eq!(sealed.len(), OVERHEAD);
        assert!(open(&a, b"", &sealed).unwrap().is_empty());
    }
}
