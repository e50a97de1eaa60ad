//! Coming back after a missed key rotation: a node that was down while the cluster key
//! rotated (and the old key was dropped) holds only a key nobody seals with any more. It
//! rejoins without a new token if it is a member in good standing:
//!
//! 1. Members keep the keys a rotation dropped for [`RETENTION`] (in [`RETIRED_FILE`] in the
//!    state dir, owner-only), never to gossip with, only to read a rekey request.
//! 2. The returning node's gossip is refused (`unknown_key`, see `auth::Refusal`); it then
//!    asks, in a datagram sealed under its old key, signed with its node key: its name and
//!    public key.
//! 3. A member that holds that old key as a retired one checks the name is pinned to that
//!    public key (see `origin`: a node removed with `node rm` has no pin any more, a name
//!    never seen has none) and answers with its current keys sealed to the node's key
//!    (`identity::sealing`), in a datagram sealed under the old key. Everything else is
//!    refused and counted (`meshctl gossip stats`).
//! 4. The node writes the keys to its key file (its old key last) and gossips again.
//!
//! What this gives a holder of a retired key who is not that node (a removed node, someone
//! who stole an old key): nothing readable — answers open only with the pinned node's
//! private key. A forged answer (any holder of the old key can seal one to the node) can only
//! give the node a key that does not work: it stays out, as without this.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use zeroize::Zeroizing;

use super::keyring::{ClusterKey, KEY_LEN, key_id};
use crate::identity::{NodeIdentity, PublicKey, SIGNATURE_LEN, sealing};
use mesh_api::v1::KeyId;

/// How long a dropped key still lets a node that missed the rotation come back.
pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Where a member keeps the keys rotations dropped, in its state dir.
pub const RETIRED_FILE: &str = "retired-cluster-keys";
const REQUEST: &[u8] = b"mesh rekey request 1\0";
const ANSWER: &[u8] = b"mesh rekey answer 1\0";
const MAX_NAME: usize = 255;

/// Keys a rotation dropped, with when.
#[derive(Default)]
pub struct Retired {
    path: Option<PathBuf>,
    keys: Vec<(u64, Zeroizing<[u8; KEY_LEN]>)>,
}

impl Retired {
    /// The retired keys in `path`; a file that does not parse is left out (with a warning):
    /// it only costs a returning node its way back in.
    pub fn load(path: &Path) -> Self {
        let mut keys = Vec::new();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let text = Zeroizing::new(text);
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    match parse_line(line) {
                        Some(k) => keys.push(k),
                        None => tracing::warn!(
                            file = %path.display(),
                            "a line of the retired cluster keys does not parse; left out"
                        ),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(file = %path.display(), "reading retired cluster keys: {e}"),
        }
        Self {
            path: Some(path.to_owned()),
            keys,
        }
    }

    /// Remembers `dropped` as retired at `now_ms`, forgets those past the retention, and
    /// saves the file.
    pub fn retire(&mut self, dropped: &[&[u8; KEY_LEN]], now_ms: u64) -> Result<()> {
        for k in dropped {
            if !self.keys.iter().any(|(_, have)| **have == **k) {
                self.keys.push((now_ms, Zeroizing::new(**k)));
            }
        }
        let keep = RETENTION.as_millis() as u64;
        self.keys
            .retain(|(at, _)| now_ms.saturating_sub(*at) <= keep);
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut text = Zeroizing::new(String::from(
            "# cluster keys dropped by rotations: kept to let a node that missed one back in\n",
        ));
        for (at, k) in &self.keys {
            text.push_str(&format!("{at} {}\n", B64.encode(&k[..])));
        }
        crate::state_files::write_atomic(path, text.as_bytes(), 0o600)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The retired key with this id, while within the retention.
    pub fn get(&self, id: KeyId, now_ms: u64) -> Option<ClusterKey> {
        let keep = RETENTION.as_millis() as u64;
        self.keys
            .iter()
            .find(|(at, k)| key_id(k) == id && now_ms.saturating_sub(*at) <= keep)
            .map(|(_, k)| ClusterKey::new(k))
    }

    /// Whether a key with this id was retired at all (however long ago).
    pub fn knows(&self, id: KeyId) -> bool {
        self.keys.iter().any(|(_, k)| key_id(k) == id)
    }
}

fn parse_line(line: &str) -> Option<(u64, Zeroizing<[u8; KEY_LEN]>)> {
    let (at, key) = line.trim().split_once(' ')?;
    if line.trim_start().starts_with('#') {
        return None;
    }
    let bytes = Zeroizing::new(B64.decode(key.trim()).ok()?);
    let key: [u8; KEY_LEN] = bytes.as_slice().try_into().ok()?;
    Some((at.parse().ok()?, Zeroizing::new(key)))
}

fn signed_request(cluster: &str, name: &str, key: &PublicKey) -> Vec<u8> {
    let mut m = REQUEST.to_vec();
    m.extend_from_slice(cluster.as_bytes());
    m.push(0);
    m.extend_from_slice(name.as_bytes());
    m.push(0);
    m.extend_from_slice(&key.0);
    m
}

/// The plaintext of a rekey request by `name`, signed with its node key.
pub fn request(identity: &NodeIdentity, cluster: &str, name: &str) -> Vec<u8> {
    let key = identity.public();
    let name = &name.as_bytes()[..name.len().min(MAX_NAME)];
    let name = String::from_utf8_lossy(name);
    let signature = identity.sign(&signed_request(cluster, &name, &key));
    let mut out = REQUEST.to_vec();
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&key.0);
    out.extend_from_slice(&signature);
    out
}

pub fn is_request(plaintext: &[u8]) -> bool {
    plaintext.starts_with(REQUEST)
}

pub fn is_answer(plaintext: &[u8]) -> bool {
    plaintext.starts_with(ANSWER)
}

/// Why a rekey request was refused: the counter it goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Malformed,
    BadSignature,
    /// No pin for the name: never a member, or removed with `node rm`.
    NotAMember,
    /// The name is pinned to another key.
    WrongKey,
}

impl Refused {
    pub fn name(self) -> &'static str {
        match self {
            Refused::Malformed => "rekey_malformed",
            Refused::BadSignature => "rekey_bad_signature",
            Refused::NotAMember => "rekey_not_a_member",
            Refused::WrongKey => "rekey_wrong_key",
        }
    }
}

/// Reads and checks a request: who asks, under the key its signature proves it holds.
pub fn read_request(cluster: &str, plaintext: &[u8]) -> Result<(String, PublicKey), Refused> {
    let rest = plaintext.strip_prefix(REQUEST).ok_or(Refused::Malformed)?;
    let (&len, rest) = rest.split_first().ok_or(Refused::Malformed)?;
    let len = len as usize;
    if rest.len() != len + 32 + SIGNATURE_LEN {
        return Err(Refused::Malformed);
    }
    let name = std::str::from_utf8(&rest[..len]).map_err(|_| Refused::Malformed)?;
    let key = PublicKey(rest[len..len + 32].try_into().expect("32"));
    let signature: [u8; SIGNATURE_LEN] = rest[len + 32..].try_into().expect("64");
    if !key.verify(&signed_request(cluster, name, &key), &signature) {
        return Err(Refused::BadSignature);
    }
    Ok((name.to_owned(), key))
}

fn answer_context(cluster: &str) -> Vec<u8> {
    let mut c = cluster.as_bytes().to_vec();
    c.extend_from_slice(b"\0rekey answer");
    c
}

/// The plaintext of an answer: `keys` (primary first) sealed to `to`.
pub fn answer(to: &PublicKey, cluster: &str, keys: &[Zeroizing<[u8; KEY_LEN]>]) -> Result<Vec<u8>> {
    let mut material = Zeroizing::new(Vec::with_capacity(keys.len() * KEY_LEN));
    for k in keys {
        material.extend_from_slice(&**k);
    }
    let mut out = ANSWER.to_vec();
    out.extend(sealing::seal(to, &answer_context(cluster), &material)?);
    Ok(out)
}

/// The keys in an answer sealed to `me`, primary first.
pub fn read_answer(
    me: &NodeIdentity,
    cluster: &str,
    plaintext: &[u8],
) -> Result<Vec<Zeroizing<[u8; KEY_LEN]>>> {
    let sealed = plaintext
        .strip_prefix(ANSWER)
        .context("not a rekey answer")?;
    let material = sealing::open(me, &answer_context(cluster), sealed)?;
    if material.is_empty() || material.len() % KEY_LEN != 0 {
        bail!(
            "a rekey answer of {} bytes is not a list of keys",
            material.len()
        );
    }
    Ok(material
        .chunks(KEY_LEN)
        .map(|c| Zeroizing::new(c.try_into().expect("chunk of KEY_LEN")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_request_reads_back_and_a_forged_one_does_not() {
        let id = NodeIdentity::generate().unwrap();
        let r = request(&id, "prod", "h3");
        assert!(is_request(&r));
        assert_eq!(read_request("prod", &r), Ok(("h3".to_owned(), id.public())));
        assert_eq!(read_request("staging", &r), Err(Refused::BadSignature));
        // Another node's name under this key, or this name under another key.
        let mut renamed = r.clone();
        let at = REQUEST.len() + 1;
        renamed[at..at + 2].copy_from_slice(b"h4");
        assert_eq!(read_request("prod", &renamed), Err(Refused::BadSignature));
        let other = NodeIdentity::generate().unwrap();
        let mut swapped = r.clone();
        swapped[at + 2..at + 34].copy_from_slice(&other.public().0);
        assert_eq!(read_request("prod", &swapped), Err(Refused::BadSignature));
        assert_eq!(
            read_request("prod", &r[..r.len() - 1]),
            Err(Refused::Malformed)
        );
        assert_eq!(read_request("prod", b"junk"), Err(Refused::Malformed));
    }

    #[test]
    fn an_answer_opens_only_for_the_node_it_was_sealed_to() {
        let id = NodeIdentity::generate().unwrap();
        let keys = vec![
            Zeroizing::new([3u8; KEY_LEN]),
            Zeroizing::new([4u8; KEY_LEN]),
        ];
        let a = answer(&id.public(), "prod", &keys).unwrap();
        assert!(is_answer(&a));
        let back = read_answer(&id, "prod", &a).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(*back[0], [3u8; KEY_LEN]);
        assert!(read_answer(&NodeIdentity::generate().unwrap(), "prod", &a).is_err());
        assert!(read_answer(&id, "staging", &a).is_err());
    }

    #[test]
    fn retired_keys_survive_a_restart_and_expire() {
        let dir = std::env::temp_dir().join(format!("mesh-retired-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(RETIRED_FILE);
        let day = 24 * 3600 * 1000;
        let mut r = Retired::load(&path);
        r.retire(&[&[1u8; KEY_LEN]], 10 * day).unwrap();
        r.retire(&[&[2u8; KEY_LEN], &[1u8; KEY_LEN]], 12 * day)
            .unwrap();
        let r = Retired::load(&path);
        let id1 = key_id(&[1u8; KEY_LEN]);
        let id2 = key_id(&[2u8; KEY_LEN]);
        assert!(r.get(id1, 12 * day).is_some());
        assert!(r.get(id1, 18 * day).is_none(), "past seven days");
        assert!(r.knows(id1));
        assert!(r.get(id2, 18 * day).is_some());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let mut r = Retired::load(&path);
        r.retire(&[], 20 * day).unwrap();
        assert!(!Retired::load(&path).knows(id1), "forgotten once expired");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod flow_tests {
    use std::{net::SocketAddr, sync::Arc};

    use super::*;
    use crate::gossip::{
        auth::{GossipAuth, Member, Refusal},
        keyring::{self, Keyring},
    };
    use mesh_api::v1::DropReason;

    fn key_file(dir: &Path, name: &str, key: &[u8; KEY_LEN]) -> PathBuf {
        let p = dir.join(name);
        keyring::write_key_file(&p, &[key]).unwrap();
        p
    }

    #[test]
    fn a_pinned_node_with_a_retired_key_gets_the_current_one_and_a_removed_one_does_not() {
        let dir = std::env::temp_dir().join(format!("mesh-rekey-flow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (old, current) = ([1u8; KEY_LEN], [3u8; KEY_LEN]);
        let member_file = key_file(&dir, "member.key", &current);
        let member = GossipAuth::new(Keyring::load(&member_file).unwrap(), &member_file, "prod");
        let returning = NodeIdentity::generate().unwrap();
        let pinned_key = returning.public();
        let pinned = Arc::new(std::sync::Mutex::new(Some(pinned_key)));
        let p = pinned.clone();
        member.set_member(
            Member {
                name: "h1".into(),
                generation: 1,
                identity: Arc::new(NodeIdentity::generate().unwrap()),
                pinned: Box::new(move |n| (n == "h3").then(|| *p.lock().unwrap()).flatten()),
            },
            Some(&dir.join(RETIRED_FILE)),
        );
        member.retire(&[&old]).unwrap();

        let node_file = key_file(&dir, "node.key", &old);
        let node = GossipAuth::new(Keyring::load(&node_file).unwrap(), &node_file, "prod");
        node.set_member(
            Member {
                name: "h3".into(),
                generation: 1,
                identity: Arc::new(returning),
                pinned: Box::new(|_| None),
            },
            None,
        );
        let m_addr: SocketAddr = "192.0.2.1:7946".parse().unwrap();
        let n_addr: SocketAddr = "192.0.2.3:7946".parse().unwrap();

        // Its gossip under the old key is refused; the refusal names the key.
        let mut d = Vec::new();
        node.seal_for(m_addr, b"syn", &mut d).unwrap();
        assert_eq!(
            member.open_from(n_addr, &mut d),
            Err(DropReason::UnknownKey)
        );
        let mut out = Vec::new();
        assert!(
            member.answer_rekey(n_addr, &mut d, &mut out).is_none(),
            "gossip, not a request"
        );
        let refusal = Refusal::decode(&Refusal::of(DropReason::UnknownKey, &d).unwrap().encode());
        assert_eq!(refusal.unwrap().key, keyring::key_id(&old));

        // It asks; the member answers with the current key sealed to it.
        let ask = |node: &GossipAuth| {
            let mut req = Vec::new();
            node.rekey_request(m_addr, &mut req).unwrap();
            let mut answer = Vec::new();
            let outcome = member.answer_rekey(n_addr, &mut req, &mut answer).unwrap();
            (outcome, answer)
        };
        *pinned.lock().unwrap() = None;
        let (outcome, _) = ask(&node);
        assert_eq!(outcome, Err(Refused::NotAMember), "removed: no pin");
        *pinned.lock().unwrap() = Some(NodeIdentity::generate().unwrap().public());
        assert_eq!(ask(&node).0, Err(Refused::WrongKey));
        *pinned.lock().unwrap() = Some(pinned_key);
        let (outcome, mut answer) = ask(&node);
        assert_eq!(outcome, Ok(()));
        assert!(
            !answer.windows(KEY_LEN).any(|w| w == current),
            "the key never travels in the clear"
        );
        let range = node.open_from(m_addr, &mut answer).unwrap();
        let plaintext = answer[range].to_vec();
        node.take_rekey_answer(m_addr, &plaintext).unwrap();
        assert_eq!(
            node.keyring().ids(),
            vec![keyring::key_id(&current), keyring::key_id(&old)]
        );
        // The same answer again (or any this node did not ask for) is not taken.
        let e = node.take_rekey_answer(m_addr, &plaintext).unwrap_err();
        assert!(e.to_string().contains("did not ask"), "{e}");

        // Now they gossip.
        let mut d = Vec::new();
        node.seal_for(m_addr, b"back", &mut d).unwrap();
        let r = member.open_from(n_addr, &mut d).unwrap();
        assert_eq!(&d[r], b"back");
        let counts = member.report().rekeys;
        assert_eq!(counts["rekey_answered"], 1);
        assert_eq!(counts["rekey_not_a_member"], 1);
        assert_eq!(counts["rekey_wrong_key"], 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
