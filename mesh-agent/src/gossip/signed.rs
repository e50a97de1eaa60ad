//! Gossip values signed by the node that wrote them.
//!
//! chitchat applies a delta about any node from any peer (that is how gossip relays), so a
//! member holding the cluster key could write records under another node's id. Every value
//! a node writes under its own id therefore travels as
//!
//! ```text
//!   s1:<base64 Ed25519 signature>:<value>
//! ```
//!
//! signed over the node's name, its generation (this run of its agent), the key and the
//! value. Whoever relays it cannot change a byte of it, nor move it to another node, another
//! key, or another run of the same node: a receiver checks it against the key the node's
//! record carries (itself bound to the node's name, see [`super::origin`]).

use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD as B64};

use crate::identity::{NodeIdentity, PublicKey, SIGNATURE_LEN};

pub const PREFIX: &str = "s1:";
/// Base64 (no padding) of a 64-byte signature.
const SIGNATURE_TEXT_LEN: usize = 86;
/// Keeps these signatures from being valid for anything else the key ever signs.
const DOMAIN: &[u8] = b"mesh gossip record v1\0";

/// Why a value was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not an envelope at all (an older agent, or a forged write).
    Unsigned,
    /// A signature that is not the node's over this node, run, key and value.
    BadSignature,
}

/// What is signed: every field length-prefixed, so no two different records sign alike.
fn message(node: &str, generation: u64, key: &str, value: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + node.len() + key.len() + value.len() + 24);
    m.extend_from_slice(DOMAIN);
    for part in [node.as_bytes(), key.as_bytes()] {
        m.extend_from_slice(&(part.len() as u32).to_be_bytes());
        m.extend_from_slice(part);
    }
    m.extend_from_slice(&generation.to_be_bytes());
    m.extend_from_slice(&(value.len() as u64).to_be_bytes());
    m.extend_from_slice(value.as_bytes());
    m
}

/// The envelope of `value` written by `node` (run `generation`) under `key`.
pub fn seal(
    identity: &NodeIdentity,
    node: &str,
    generation: u64,
    key: &str,
    value: &str,
) -> String {
    let sig = identity.sign(&message(node, generation, key, value));
    format!("{PREFIX}{}:{value}", B64.encode(sig))
}

/// The value inside an envelope, without checking it: only for values this node wrote
/// itself (its own state read back).
pub fn unchecked(envelope: &str) -> Option<&str> {
    split(envelope).map(|(_, v)| v)
}

fn split(envelope: &str) -> Option<(&str, &str)> {
    let rest = envelope.strip_prefix(PREFIX)?;
    let sig = rest.get(..SIGNATURE_TEXT_LEN)?;
    let value = rest.get(SIGNATURE_TEXT_LEN..)?.strip_prefix(':')?;
    Some((sig, value))
}

/// The value of an envelope, if `signer` signed it as `node`'s value of `key` in run
/// `generation`.
pub fn open<'a>(
    signer: &PublicKey,
    node: &str,
    generation: u64,
    key: &str,
    envelope: &'a str,
) -> Result<&'a str, Refusal> {
    let (sig, value) = split(envelope).ok_or(Refusal::Unsigned)?;
    let sig: [u8; SIGNATURE_LEN] = B64
        .decode(sig)
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or(Refusal::BadSignature)?;
    if signer.verify(&message(node, generation, key, value), &sig) {
        Ok(value)
    } else {
        Err(Refusal::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_value_opens_only_as_what_it_was_signed_for() {
        let n1 = NodeIdentity::generate().unwrap();
        let other = NodeIdentity::generate().unwrap();
        let e = seal(&n1, "n1", 7, "ep:web.1", r#"{"ip":"10.0.0.2"}"#);
        assert_eq!(
            open(&n1.public(), "n1", 7, "ep:web.1", &e),
            Ok(r#"{"ip":"10.0.0.2"}"#)
        );
        assert_eq!(unchecked(&e), Some(r#"{"ip":"10.0.0.2"}"#));
        // Relayed as another node's record, another key, another run of n1 (a replay
        // after a restart), or under another node's key: refused.
        for (node, generation, key) in [
            ("n2", 7, "ep:web.1"),
            ("n1", 7, "ep:web.2"),
            ("n1", 8, "ep:web.1"),
        ] {
            assert_eq!(
                open(&n1.public(), node, generation, key, &e),
                Err(Refusal::BadSignature),
                "{node} {generation} {key}"
            );
        }
        assert_eq!(
            open(&other.public(), "n1", 7, "ep:web.1", &e),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn forged_and_unsigned_values_are_refused() {
        let n1 = NodeIdentity::generate().unwrap();
        let e = seal(&n1, "n1", 1, "node", "{}");
        // The value changed after signing.
        let forged = format!("{}{}", &e[..e.len() - 2], "1}");
        assert_eq!(
            open(&n1.public(), "n1", 1, "node", &forged),
            Err(Refusal::BadSignature)
        );
        // A value signed by another key pasted in.
        let mallory = NodeIdentity::generate().unwrap();
        let pasted = seal(&mallory, "n1", 1, "node", "{}");
        assert_eq!(
            open(&n1.public(), "n1", 1, "node", &pasted),
            Err(Refusal::BadSignature)
        );
        for raw in [
            "{}",
            "s1:",
            "s1:short:{}",
            &format!("s1:{}:{{}}", "!".repeat(86)),
        ] {
            assert!(open(&n1.public(), "n1", 1, "node", raw).is_err(), "{raw}");
        }
        assert_eq!(
            open(&n1.public(), "n1", 1, "node", "{}"),
            Err(Refusal::Unsigned)
        );
    }

    #[test]
    fn fields_cannot_be_shifted_between_name_and_key() {
        let n = NodeIdentity::generate().unwrap();
        let e = seal(&n, "ab", 1, "c", "v");
        assert!(open(&n.public(), "a", 1, "bc", &e).is_err());
    }

    /// The cost of signing and verifying one record (printed; `cargo test --release -p
    /// mesh-agent signing_cost -- --nocapture` for the optimized numbers).
    #[test]
    fn signing_cost() {
        let n = NodeIdentity::generate().unwrap();
        let value = format!(
            r#"{{"task":"web.1","network":"front","ip":"10.0.0.2","pad":"{}"}}"#,
            "x".repeat(200)
        );
        const N: u32 = 200;
        let start = std::time::Instant::now();
        let mut last = String::new();
        for i in 0..N {
            last = seal(&n, "node-1", i as u64, "ep:web.1", &value);
        }
        let sign = start.elapsed() / N;
        let start = std::time::Instant::now();
        for _ in 0..N {
            assert!(open(&n.public(), "node-1", (N - 1) as u64, "ep:web.1", &last).is_ok());
        }
        let verify = start.elapsed() / N;
        eprintln!(
            "per record of {} bytes: sign {sign:?}, verify {verify:?}, {} bytes added",
            value.len(),
            last.len() - value.len()
        );
    }

    /// What signatures add to a full datagram: records of three sizes packed into one
    /// datagram with and without envelopes, the time to verify every record of it (the worst
    /// case: all of them new to the receiver, which keeps verdicts per value after that), and
    /// beside it the time to open the datagram under the cluster key, which gossip paid
    /// before node identities. Ignored: its output is timings, only meaningful optimised
    /// (0.15 s in release): `cargo test --release -p mesh-agent datagram_signing_cost --
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn datagram_signing_cost() {
        use crate::gossip::{auth, keyring};
        let n = NodeIdentity::generate().unwrap();
        let material = keyring::generate().unwrap();
        let ring = keyring::Keyring::new(vec![keyring::ClusterKey::new(&material)]).unwrap();
        let key = ring.primary().id;
        let room = auth::MAX_DATAGRAM - auth::OVERHEAD;
        for value_len in [64, 262, 1024] {
            let value = "x".repeat(value_len);
            let record_key = "ep:web.1";
            let envelope = seal(&n, "node-1", 1, record_key, &value);
            let added = envelope.len() - value.len();
            // Key and value bytes only; chitchat's few bytes of framing per record left out.
            let bare = room / (record_key.len() + value_len);
            let signed = room / (record_key.len() + envelope.len());
            let envelopes: Vec<String> = (0..signed)
                .map(|i| seal(&n, "node-1", 1, &format!("ep:web.{i}"), &value))
                .collect();
            const ROUNDS: u32 = 5;
            let start = std::time::Instant::now();
            for _ in 0..ROUNDS {
                for (i, e) in envelopes.iter().enumerate() {
                    assert!(open(&n.public(), "node-1", 1, &format!("ep:web.{i}"), e).is_ok());
                }
            }
            let verify = start.elapsed() / ROUNDS;
            let plaintext: Vec<u8> = envelopes.concat().into_bytes();
            let start = std::time::Instant::now();
            for r in 0..ROUNDS {
                let mut datagram = Vec::with_capacity(auth::MAX_DATAGRAM);
                let mut nonce = [0u8; auth::NONCE_LEN];
                nonce[0] = r as u8;
                auth::seal(&ring, key, "c", 1, nonce, &plaintext, &mut datagram).unwrap();
                auth::open(&ring, "c", &mut datagram).unwrap();
            }
            let seal_open = start.elapsed() / ROUNDS;
            eprintln!(
                "records of {value_len} B: +{added} B each ({:.0}%); {bare} per datagram \
                 unsigned, {signed} signed; verifying all {signed}: {verify:?}; sealing and \
                 opening the {} B datagram: {seal_open:?}",
                100.0 * added as f64 / (record_key.len() + value_len) as f64,
                plaintext.len()
            );
        }
    }
}
