//! Sealed gossip datagrams: what travels on the wire when a cluster key is configured.
//!
//! ```text
//!  0      2        6            10            18            26                 50
//!  | 'm' 2 | key id | sender's   | timestamp   | echo        | nonce (24 bytes)  | ciphertext ... | tag (16) |
//!  |       |        | primary id | ms, unix    | (8 bytes)   |                   |                |          |
//! ```
//!
//! XChaCha20-Poly1305 under the key named by `key id`. The header and the cluster name are the
//! associated data, so a datagram cannot be moved to another cluster or have its header
//! edited. The 192-bit nonce is random per datagram: with XChaCha's nonce size random nonces
//! never collide in practice, so no counter state has to survive restarts.
//!
//! Freshness (what keeps an outsider from replaying captured datagrams) does not rest on
//! clocks agreeing. A datagram is fresh if either
//!
//! - its `echo` is the first 8 bytes of a nonce the receiver itself sealed less than
//!   [`ECHO_LIFETIME`] ago: nonces are random, so the datagram was sealed after the receiver
//!   sent that one, by a key holder. Every datagram echoes the nonce of the last fresh one
//!   its sender got from the receiver, and peers that gossip talk both ways, so this is the
//!   rule that holds between running agents, whatever their clocks say and however they step;
//! - or, for a first contact (a joiner's probe, a peer not heard from lately), its
//!   timestamp is within [`REPLAY_WINDOW`] of the receiver's clock.
//!
//! An authentic datagram that is neither is dropped (counted as too old or too new) and
//! answered with a challenge: an empty sealed datagram echoing its nonce, at most one a
//! second per address and no longer than what provokes it. The sender's next datagram then
//! echoes the challenge, so two agents whose clocks disagree by any amount lose one exchange
//! at first contact and none after. Nonces of accepted datagrams are remembered for as long
//! as either rule could accept them again (the clock rule's share until the receiver's clock
//! has passed the stamp, so a receiver whose clock steps back does not forget them early):
//! a datagram is accepted at most once.
//!
//! What this allows: an outsider can make a receiver accept a captured datagram at most once,
//! and only one sealed less than a minute or so before (what the receiver accepted then
//! anyway, or never saw); replaying older ones costs it a challenge a second at most. A key
//! holder can seal fresh datagrams anyway: the cluster key is not an identity, node
//! signatures on records are (see `signed`).
//!
//! Checks run in this order so counters cannot be inflated by an outsider: format, key id,
//! tag; only an authenticated datagram can count as too old, too new or replayed, and only it
//! updates what the receiver remembers about its sender.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use chacha20poly1305::{AeadInOut, Tag, XNonce};
use tracing::{info, warn};

use super::keyring::{self, Keyring};
use super::rekey::{self, Retired};
use crate::identity::{NodeIdentity, PublicKey};
use mesh_api::v1::AuthReport;
use mesh_api::v1::DropReason;
use mesh_api::v1::KeyId;
use mesh_api::v1::KeyReport;
use mesh_api::v1::LastDrop;
use mesh_api::v1::PeerReport;
use mesh_api::v1::ReloadReport;

/// First bytes of every sealed datagram: 'm' and the format version.
pub const MAGIC: [u8; 2] = [b'm', 2];
pub const NONCE_LEN: usize = 24;
pub const HEADER_LEN: usize = 2 + 4 + 4 + 8 + ECHO_LEN + NONCE_LEN;
const ECHO_LEN: usize = 8;
const NONCE_AT: usize = HEADER_LEN - NONCE_LEN;
/// Format 1, what agents before echoes send: the same header without `echo`. Still read, and
/// written to a peer that sends it, so a cluster upgrades node by node; its datagrams are
/// fresh by the clock rule only.
const MAGIC_V1: [u8; 2] = [b'm', 1];
const HEADER_LEN_V1: usize = HEADER_LEN - ECHO_LEN;

/// (format, header length) of a sealed datagram's first bytes.
fn layout(datagram: &[u8]) -> Option<(u8, usize)> {
    match datagram.get(..2)? {
        m if m == MAGIC => Some((2, HEADER_LEN)),
        m if m == MAGIC_V1 => Some((1, HEADER_LEN_V1)),
        _ => None,
    }
}
pub const TAG_LEN: usize = 16;
/// Bytes a sealed datagram adds to chitchat's.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// The largest UDP payload over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;
/// How far a first contact's timestamp may be from the receiver's clock.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(30);
/// How long a nonce this node sealed proves the freshness of a datagram echoing it: long
/// enough that peers in a large cluster, which gossip with a few others at a time, still
/// echo a live nonce most of the time (a stale echo costs one challenge).
pub const ECHO_LIFETIME: Duration = Duration::from_secs(60);
/// Plain chitchat datagrams start with its magic number (45139, little endian): what an agent
/// without a cluster key sends.
const CHITCHAT_MAGIC: [u8; 2] = 45_139u16.to_le_bytes();
/// Bounds memory if gossip traffic were ever far above normal (about 30 datagrams/s per node).
const MAX_REMEMBERED_NONCES: usize = 1 << 20;
/// Nonces this node sealed, kept for [`ECHO_LIFETIME`]: far above what it sends in that time.
const MAX_SENT_NONCES: usize = 1 << 16;
const MAX_PEERS: usize = 4096;
/// At most one log line per drop reason this often; the counters carry the full story.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// First bytes of a [`Refusal`].
pub const REFUSAL_MAGIC: [u8; 2] = [b'm', 0x80];
pub const REFUSAL_LEN: usize = 2 + 1 + 4;

/// What a node answers, unsealed, to a well-formed sealed datagram it cannot open: without it
/// a joiner with a stale or foreign token hears only silence, which looks exactly like an
/// unreachable address. It reveals nothing a port scan would not (a mesh agent listens) and
/// is far shorter than what provokes it, so it cannot amplify a spoofed flood; a forged one
/// can at worst make a join give up with a wrong reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Only [`DropReason::UnknownKey`] or [`DropReason::BadTag`].
    pub reason: DropReason,
    /// The key id the refused datagram named.
    pub key: KeyId,
}

impl Refusal {
    /// The refusal for a datagram `open` rejected, if it deserves one.
    pub fn of(reason: DropReason, datagram: &[u8]) -> Option<Self> {
        if !matches!(reason, DropReason::UnknownKey | DropReason::BadTag) || datagram.len() < 6 {
            return None;
        }
        let key = KeyId(u32::from_be_bytes(
            datagram[2..6].try_into().expect("4 bytes"),
        ));
        Some(Self { reason, key })
    }

    pub fn encode(&self) -> [u8; REFUSAL_LEN] {
        let mut out = [0u8; REFUSAL_LEN];
        out[..2].copy_from_slice(&REFUSAL_MAGIC);
        out[2] = match self.reason {
            DropReason::BadTag => 2,
            _ => 1,
        };
        out[3..].copy_from_slice(&self.key.0.to_be_bytes());
        out
    }

    pub fn decode(datagram: &[u8]) -> Option<Self> {
        if datagram.len() != REFUSAL_LEN || datagram[..2] != REFUSAL_MAGIC {
            return None;
        }
        let reason = match datagram[2] {
            1 => DropReason::UnknownKey,
            2 => DropReason::BadTag,
            _ => return None,
        };
        let key = KeyId(u32::from_be_bytes(
            datagram[3..].try_into().expect("4 bytes"),
        ));
        Some(Self { reason, key })
    }
}

/// The parts of an opened datagram the receiver acts on.
#[derive(Debug, PartialEq, Eq)]
pub struct Opened {
    pub key: KeyId,
    /// The key the sender seals with: the one to answer it with, if held.
    pub sender_primary: KeyId,
    pub timestamp_ms: u64,
    /// The first bytes of a nonce of the receiver's the sender had heard (0: none).
    pub echo: u64,
    /// 2, or 1 for an agent from before echoes.
    pub format: u8,
    pub nonce: [u8; NONCE_LEN],
    /// Where the plaintext lies in the (decrypted in place) datagram.
    pub plaintext: std::ops::Range<usize>,
}

fn associated_data(header: &[u8], cluster: &str) -> Vec<u8> {
    let mut ad = Vec::with_capacity(header.len() + cluster.len());
    ad.extend_from_slice(header);
    ad.extend_from_slice(cluster.as_bytes());
    ad
}

/// The part of a nonce a datagram echoes.
pub fn echo_of(nonce: &[u8; NONCE_LEN]) -> u64 {
    u64::from_be_bytes(nonce[..ECHO_LEN].try_into().expect("8 bytes"))
}

/// The nonce of a datagram that [`open`] authenticated (its header is left as it came).
pub fn nonce_of(datagram: &[u8]) -> Option<[u8; NONCE_LEN]> {
    let (_, header_len) = layout(datagram)?;
    datagram
        .get(header_len - NONCE_LEN..header_len)?
        .try_into()
        .ok()
}

/// Appends `plaintext` sealed with `key` to `out`, echoing nothing.
pub fn seal(
    ring: &Keyring,
    key: KeyId,
    cluster: &str,
    timestamp_ms: u64,
    nonce: [u8; NONCE_LEN],
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), DropReason> {
    seal_echoing(ring, key, cluster, (timestamp_ms, 0), nonce, plaintext, out)
}

/// Appends `plaintext` sealed with `key` to `out`; `stamp` is (timestamp, echo).
pub fn seal_echoing(
    ring: &Keyring,
    key: KeyId,
    cluster: &str,
    stamp: (u64, u64),
    nonce: [u8; NONCE_LEN],
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), DropReason> {
    seal_as(2, ring, (key, cluster), stamp, nonce, plaintext, out)
}

/// Seals in `format` (1 drops the echo).
fn seal_as(
    format: u8,
    ring: &Keyring,
    (key, cluster): (KeyId, &str),
    (timestamp_ms, echo): (u64, u64),
    nonce: [u8; NONCE_LEN],
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), DropReason> {
    let key = ring.get(key).unwrap_or_else(|| ring.primary());
    let start = out.len();
    out.extend_from_slice(if format == 1 { &MAGIC_V1 } else { &MAGIC });
    out.extend_from_slice(&key.id.0.to_be_bytes());
    out.extend_from_slice(&ring.primary().id.0.to_be_bytes());
    out.extend_from_slice(&timestamp_ms.to_be_bytes());
    if format != 1 {
        out.extend_from_slice(&echo.to_be_bytes());
    }
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let header_len = if format == 1 {
        HEADER_LEN_V1
    } else {
        HEADER_LEN
    };
    let (header, body) = out[start..].split_at_mut(header_len);
    let ad = associated_data(header, cluster);
    let tag = key
        .cipher
        .encrypt_inout_detached(&XNonce::from(nonce), &ad, body.into())
        .map_err(|_| DropReason::Oversized)?;
    out.extend_from_slice(&tag);
    Ok(())
}

/// Authenticates and decrypts `datagram` in place. Checks only what the keys can tell; the
/// time and replay checks need the receiver's state ([`ReplayGuard`]).
pub fn open(ring: &Keyring, cluster: &str, datagram: &mut [u8]) -> Result<Opened, DropReason> {
    if datagram.len() >= 2 && datagram[..2] == CHITCHAT_MAGIC {
        return Err(DropReason::Unsealed);
    }
    if datagram.len() >= 2 && datagram[..2] == REFUSAL_MAGIC {
        return Err(DropReason::Refused);
    }
    let Some((format, header_len)) = layout(datagram) else {
        return Err(if datagram.len() < 2 {
            DropReason::Truncated
        } else {
            DropReason::UnknownFormat
        });
    };
    if datagram.len() < header_len + TAG_LEN {
        return Err(DropReason::Truncated);
    }
    let be32 = |at: usize| u32::from_be_bytes(datagram[at..at + 4].try_into().expect("4 bytes"));
    let key = KeyId(be32(2));
    let sender_primary = KeyId(be32(6));
    let timestamp_ms = u64::from_be_bytes(datagram[10..18].try_into().expect("8 bytes"));
    let echo = match format {
        1 => 0,
        _ => u64::from_be_bytes(datagram[18..NONCE_AT].try_into().expect("8 bytes")),
    };
    let nonce: [u8; NONCE_LEN] = datagram[header_len - NONCE_LEN..header_len]
        .try_into()
        .expect("nonce bytes");
    let cipher = &ring.get(key).ok_or(DropReason::UnknownKey)?.cipher;
    let tag_at = datagram.len() - TAG_LEN;
    let (rest, tag) = datagram.split_at_mut(tag_at);
    let tag = Tag::try_from(&tag[..]).map_err(|_| DropReason::Truncated)?;
    let (header, body) = rest.split_at_mut(header_len);
    let ad = associated_data(header, cluster);
    cipher
        .decrypt_inout_detached(&XNonce::from(nonce), &ad, body.into(), &tag)
        .map_err(|_| DropReason::BadTag)?;
    Ok(Opened {
        key,
        sender_primary,
        timestamp_ms,
        echo,
        format,
        nonce,
        plaintext: header_len..tag_at,
    })
}

/// How an accepted datagram showed it is fresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fresh {
    /// It echoed a live nonce of the receiver's.
    Echo,
    /// Its timestamp is within the window of the receiver's clock.
    Clock,
}

/// Decides whether an authentic datagram is fresh, and remembers the nonces of accepted ones
/// to refuse a datagram seen before.
#[derive(Debug)]
pub struct ReplayGuard {
    window: Duration,
    echo_lifetime: Duration,
    seen: HashSet<[u8; NONCE_LEN]>,
    /// Accepted datagrams whose timestamp the clock rule could accept again, earliest
    /// timestamp first: forgotten once the receiver's clock has passed them, even if it
    /// stepped back meanwhile, and without holding up the others.
    by_stamp: BinaryHeap<Reverse<(u64, Instant, [u8; NONCE_LEN])>>,
    /// The rest (timestamps far from the receiver's clock), in arrival order: only an echo
    /// can make them fresh again, and echoes die after `echo_lifetime`.
    by_arrival: VecDeque<(Instant, [u8; NONCE_LEN])>,
}

impl ReplayGuard {
    pub fn new(window: Duration, echo_lifetime: Duration) -> Self {
        Self {
            window,
            echo_lifetime,
            seen: HashSet::new(),
            by_stamp: BinaryHeap::new(),
            by_arrival: VecDeque::new(),
        }
    }

    /// Accepts a datagram once if it is fresh: `echoed` tells whether its echo names a nonce
    /// the receiver sealed less than the echo lifetime ago; otherwise its timestamp must be
    /// within the window of `now_ms`, the receiver's clock.
    pub fn check(
        &mut self,
        now_ms: u64,
        now: Instant,
        timestamp_ms: u64,
        nonce: [u8; NONCE_LEN],
        echoed: bool,
    ) -> Result<Fresh, DropReason> {
        let window_ms = self.window.as_millis() as u64;
        let too_old = timestamp_ms.saturating_add(window_ms) < now_ms;
        let too_new = timestamp_ms > now_ms.saturating_add(window_ms);
        let fresh = match (echoed, too_old, too_new) {
            (true, _, _) => Fresh::Echo,
            (false, true, _) => return Err(DropReason::TooOld),
            (false, _, true) => return Err(DropReason::TooNew),
            (false, false, false) => Fresh::Clock,
        };
        self.forget(now_ms, now);
        if !self.seen.insert(nonce) {
            return Err(DropReason::Replayed);
        }
        if too_old || too_new {
            self.by_arrival.push_back((now, nonce));
        } else {
            self.by_stamp.push(Reverse((timestamp_ms, now, nonce)));
        }
        Ok(fresh)
    }

    /// Forgets nonces no rule could accept again: the echo rule only within the echo
    /// lifetime after arrival (the echoed nonce was sealed before), the clock rule only
    /// while the receiver's clock is within the window of the timestamp, and a remembered
    /// nonce whose timestamp was an accepted one at arrival ages by the window at most twice.
    fn forget(&mut self, now_ms: u64, now: Instant) {
        let window_ms = self.window.as_millis() as u64;
        let keep = self.echo_lifetime.max(self.window * 2);
        while let Some((at, n)) = self.by_arrival.front() {
            if now.duration_since(*at) <= keep && self.seen.len() < MAX_REMEMBERED_NONCES {
                break;
            }
            self.seen.remove(n);
            self.by_arrival.pop_front();
        }
        while let Some(Reverse((stamp, at, n))) = self.by_stamp.peek() {
            let passed = stamp.saturating_add(window_ms) < now_ms && now.duration_since(*at) > keep;
            if !passed && self.seen.len() < MAX_REMEMBERED_NONCES {
                break;
            }
            self.seen.remove(n);
            self.by_stamp.pop();
        }
    }

    pub fn remembered(&self) -> usize {
        self.seen.len()
    }
}

/// Nonces this node sealed lately: a datagram that echoes one was sealed after it.
#[derive(Debug, Default)]
struct SentNonces {
    live: HashSet<u64>,
    order: VecDeque<(Instant, u64)>,
}

impl SentNonces {
    fn remember(&mut self, echo: u64, now: Instant) {
        self.forget(now);
        if self.order.len() >= MAX_SENT_NONCES
            && let Some((_, old)) = self.order.pop_front()
        {
            self.live.remove(&old);
        }
        if self.live.insert(echo) {
            self.order.push_back((now, echo));
        }
    }

    fn is_live(&mut self, echo: u64, now: Instant) -> bool {
        self.forget(now);
        echo != 0 && self.live.contains(&echo)
    }

    fn forget(&mut self, now: Instant) {
        while let Some((at, old)) = self.order.front() {
            if now.duration_since(*at) <= ECHO_LIFETIME {
                break;
            }
            self.live.remove(old);
            self.order.pop_front();
        }
    }
}

/// What this node knows about a peer that sent it authentic gossip.
#[derive(Clone, Copy, Debug)]
struct Peer {
    /// The key the peer seals with; used to answer it while this node holds that key.
    primary: KeyId,
    /// The key of its last datagram.
    last_key: KeyId,
    last_seen: Instant,
    /// What datagrams to it echo: from its last fresh datagram.
    echo: u64,
    /// The format it sends, and is answered in.
    format: u8,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
}

#[derive(Clone, Copy, Default)]
struct KeyUse {
    sent: u64,
    received: u64,
    last_received: Option<Instant>,
}

struct DropEvent {
    from: SocketAddr,
    reason: DropReason,
    at: SystemTime,
}

struct Reload {
    at: SystemTime,
    error: Option<String>,
}

/// One agent's gossip keys and what happened to its datagrams; shared by the transport, the
/// API and the SIGHUP handler.
pub struct GossipAuth {
    cluster: String,
    key_file: PathBuf,
    ring: RwLock<Arc<Keyring>>,
    replay: Mutex<ReplayGuard>,
    sent_nonces: Mutex<SentNonces>,
    peers: Mutex<HashMap<SocketAddr, Peer>>,
    counters: Counters,
    key_use: Mutex<BTreeMap<KeyId, KeyUse>>,
    last_drop: Mutex<Option<DropEvent>>,
    last_logged: Mutex<HashMap<DropReason, Instant>>,
    last_reload: Mutex<Option<Reload>>,
    /// Added to the wall clock: only unit tests step it (two agents in one process share
    /// one clock); always 0 in the agent.
    clock_offset_ms: AtomicI64,
    /// Keys rotations dropped: only to read a rekey request (see `rekey`).
    retired: Mutex<Retired>,
    member: Mutex<Option<Member>>,
    rekeys: Mutex<BTreeMap<&'static str, u64>>,
    /// When this node last asked a member for the current keys.
    asked: Mutex<Option<Instant>>,
}

/// Who this node is in gossip, and whom it knows: what a rekey needs.
pub struct Member {
    pub name: String,
    /// This run's generation: with the name, the node id chitchat gossips this node under.
    pub generation: u64,
    pub identity: Arc<NodeIdentity>,
    /// The key a node name is pinned to, if it is pinned (a removed node's is not).
    pub pinned: PinnedKey,
}

/// The key a node name is pinned to, if any.
pub type PinnedKey = Box<dyn Fn(&str) -> Option<PublicKey> + Send + Sync>;

impl GossipAuth {
    /// Reads the key file; the agent does not start with a bad one.
    pub fn load(key_file: &Path, cluster: &str) -> Result<Arc<Self>> {
        let ring = Keyring::load(key_file)?;
        Ok(Arc::new(Self::new(ring, key_file, cluster)))
    }

    pub fn new(ring: Keyring, key_file: &Path, cluster: &str) -> Self {
        Self {
            cluster: cluster.to_owned(),
            key_file: key_file.to_owned(),
            ring: RwLock::new(Arc::new(ring)),
            replay: Mutex::new(ReplayGuard::new(REPLAY_WINDOW, ECHO_LIFETIME)),
            sent_nonces: Mutex::new(SentNonces::default()),
            peers: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            key_use: Mutex::new(BTreeMap::new()),
            last_drop: Mutex::new(None),
            last_logged: Mutex::new(HashMap::new()),
            last_reload: Mutex::new(None),
            clock_offset_ms: AtomicI64::new(0),
            retired: Mutex::new(Retired::default()),
            member: Mutex::new(None),
            rekeys: Mutex::new(BTreeMap::new()),
            asked: Mutex::new(None),
        }
    }

    /// Lets this node answer rekey requests with the keys retired in `retired_file`, and ask
    /// for the current keys itself.
    /// Whether `id` is this node's own run: the one node whose state only this node writes.
    pub fn is_self(&self, id: &super::validate::NodeId) -> bool {
        self.member
            .lock()
            .expect("member lock")
            .as_ref()
            .is_some_and(|m| m.name == id.name && m.generation == id.generation)
    }

    /// The key `name` is pinned to, once this node has an identity.
    pub fn pinned(&self, name: &str) -> Option<PublicKey> {
        let member = self.member.lock().expect("member lock");
        member.as_ref().and_then(|m| (m.pinned)(name))
    }

    pub fn set_member(&self, member: Member, retired_file: Option<&Path>) {
        if let Some(f) = retired_file {
            *self.retired.lock().expect("retired lock") = Retired::load(f);
        }
        *self.member.lock().expect("member lock") = Some(member);
    }

    /// Keeps keys a rotation dropped for a node that missed it (see `rekey`).
    pub fn retire(&self, dropped: &[&[u8; keyring::KEY_LEN]]) -> Result<()> {
        self.retired
            .lock()
            .expect("retired lock")
            .retire(dropped, self.now_ms())
    }

    fn count_rekey(&self, outcome: &'static str) {
        *self
            .rekeys
            .lock()
            .expect("rekeys lock")
            .entry(outcome)
            .or_default() += 1;
    }

    /// Answers a rekey request sealed under a retired key, if `datagram` is one: `None` if it
    /// is not (it gets the usual refusal), else whether an answer is in `out`.
    pub fn answer_rekey(
        &self,
        from: SocketAddr,
        datagram: &mut [u8],
        out: &mut Vec<u8>,
    ) -> Option<Result<(), rekey::Refused>> {
        let id = KeyId(u32::from_be_bytes(datagram.get(2..6)?.try_into().ok()?));
        let key = self
            .retired
            .lock()
            .expect("retired lock")
            .get(id, self.now_ms())?;
        // The answer names this node's real primary as the one it seals with, so the
        // returning node answers with that once it holds it.
        let ring = Keyring::new(vec![self.keyring().primary().clone(), key]).ok()?;
        let opened = open(&ring, &self.cluster, datagram).ok()?;
        let plaintext = &datagram[opened.plaintext.clone()];
        if !rekey::is_request(plaintext) {
            return None;
        }
        let outcome = self.rekey_for(plaintext).and_then(|answer| {
            let mut nonce = [0u8; NONCE_LEN];
            getrandom::fill(&mut nonce).map_err(|_| rekey::Refused::Malformed)?;
            let stamp = (self.now_ms(), echo_of(&opened.nonce));
            seal_echoing(&ring, id, &self.cluster, stamp, nonce, &answer, out)
                .map_err(|_| rekey::Refused::Malformed)
        });
        match outcome {
            Ok(()) => {
                self.count_rekey("rekey_answered");
                info!(%from, key = %id, "sent the current cluster keys to a member that missed a rotation");
            }
            Err(r) => {
                self.count_rekey(r.name());
                warn!(%from, key = %id, reason = r.name(), "refused a rekey request");
            }
        }
        Some(outcome)
    }

    /// The answer to a request: the current keys sealed to the key its name is pinned to.
    fn rekey_for(&self, request: &[u8]) -> Result<Vec<u8>, rekey::Refused> {
        let (name, key) = rekey::read_request(&self.cluster, request)?;
        let pinned = {
            let member = self.member.lock().expect("member lock");
            let member = member.as_ref().ok_or(rekey::Refused::NotAMember)?;
            (member.pinned)(&name)
        };
        match pinned {
            None => return Err(rekey::Refused::NotAMember),
            Some(p) if p != key => return Err(rekey::Refused::WrongKey),
            Some(_) => {}
        }
        let material =
            keyring::read_material(&self.key_file).map_err(|_| rekey::Refused::Malformed)?;
        rekey::answer(&key, &self.cluster, &material).map_err(|_| rekey::Refused::Malformed)
    }

    /// Seals a rekey request for `to`, which refused this node's primary key.
    pub fn rekey_request(&self, to: SocketAddr, out: &mut Vec<u8>) -> Result<()> {
        let plaintext = {
            let member = self.member.lock().expect("member lock");
            let member = member.as_ref().context("no node identity to ask with")?;
            rekey::request(&member.identity, &self.cluster, &member.name)
        };
        *self.asked.lock().expect("asked lock") = Some(Instant::now());
        self.seal_echoing(to, &plaintext, None, out)
    }

    /// Takes the keys of a rekey answer this node asked for: written to its key file, its
    /// old keys after them, and loaded.
    pub fn take_rekey_answer(&self, from: SocketAddr, plaintext: &[u8]) -> Result<()> {
        let asked = *self.asked.lock().expect("asked lock");
        if asked.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
            anyhow::bail!("a rekey answer this node did not ask for");
        }
        let fresh = {
            let member = self.member.lock().expect("member lock");
            let member = member.as_ref().context("no node identity")?;
            rekey::read_answer(&member.identity, &self.cluster, plaintext)?
        };
        let mut material = fresh;
        for k in keyring::read_material(&self.key_file)? {
            if !material.iter().any(|m| **m == *k) {
                material.push(k);
            }
        }
        material.truncate(keyring::MAX_KEYS);
        let refs: Vec<&[u8; keyring::KEY_LEN]> = material.iter().map(|k| &**k).collect();
        keyring::write_key_file(&self.key_file, &refs)?;
        *self.asked.lock().expect("asked lock") = None;
        let ids = self.reload()?;
        self.count_rekey("rekey_applied");
        info!(%from, primary = %ids[0], "rejoined with the cluster's current key after missing a rotation");
        Ok(())
    }

    /// Steps this instance's view of the wall clock, as an NTP step would.
    #[cfg(test)]
    pub fn step_clock(&self, by_ms: i64) {
        self.clock_offset_ms.fetch_add(by_ms, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        now_ms().saturating_add_signed(self.clock_offset_ms.load(Ordering::Relaxed))
    }

    pub fn keyring(&self) -> Arc<Keyring> {
        self.ring.read().expect("keyring lock").clone()
    }

    /// The cluster name bound into every sealed datagram (and every sealed secret).
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Reads the key file again. A bad file changes nothing: the agent keeps gossiping with
    /// the keys it has, and the error is reported by the API.
    pub fn reload(&self) -> Result<Vec<KeyId>> {
        let result = Keyring::load(&self.key_file);
        *self.last_reload.lock().expect("reload lock") = Some(Reload {
            at: SystemTime::now(),
            error: result.as_ref().err().map(|e| format!("{e:#}")),
        });
        let ring = result?;
        let ids = ring.ids();
        *self.ring.write().expect("keyring lock") = Arc::new(ring);
        info!(
            primary = %ids[0],
            keys = ?ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "cluster keys reloaded"
        );
        Ok(ids)
    }

    /// The primary key of a peer that sent authentic gossip, as its datagrams say.
    pub fn peer_primary(&self, peer: SocketAddr) -> Option<KeyId> {
        self.peers
            .lock()
            .expect("peers lock")
            .get(&peer)
            .map(|p| p.primary)
    }

    /// Seals a datagram for `to`: with the peer's own primary key when this node holds it
    /// (so both sides of a half-done rotation understand each other), else with this node's
    /// primary.
    pub fn seal_for(&self, to: SocketAddr, plaintext: &[u8], out: &mut Vec<u8>) -> Result<()> {
        self.seal_echoing(to, plaintext, None, out)
    }

    /// Seals the answer to an authentic datagram that was not fresh (as `open_from` said):
    /// nothing but an echo of its nonce, so the sender's next datagram can prove itself fresh
    /// whatever the two clocks say.
    pub fn challenge(&self, to: SocketAddr, datagram: &[u8], out: &mut Vec<u8>) -> Result<()> {
        if layout(datagram).is_some_and(|(format, _)| format == 1) {
            anyhow::bail!("an agent of sealed format 1 cannot echo a challenge");
        }
        let nonce = nonce_of(datagram).context("a datagram too short to challenge")?;
        self.seal_echoing(to, &[], Some(echo_of(&nonce)), out)
    }

    fn seal_echoing(
        &self,
        to: SocketAddr,
        plaintext: &[u8],
        echo: Option<u64>,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        if plaintext.len() + OVERHEAD > MAX_DATAGRAM {
            self.count_drop(to, DropReason::Oversized);
            anyhow::bail!(
                "gossip to {to} not sent: {} bytes sealed exceed a UDP datagram",
                plaintext.len() + OVERHEAD
            );
        }
        let ring = self.keyring();
        let peer = self.peers.lock().expect("peers lock").get(&to).copied();
        let key = peer
            .map(|p| p.primary)
            .filter(|k| ring.get(*k).is_some())
            .unwrap_or(ring.primary().id);
        let echo = echo.or(peer.map(|p| p.echo)).unwrap_or(0);
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)
            .map_err(|e| anyhow::anyhow!("reading the system's random source for a nonce: {e}"))?;
        let stamp = (self.now_ms(), echo);
        let format = peer.map_or(2, |p| p.format);
        seal_as(
            format,
            &ring,
            (key, &self.cluster),
            stamp,
            nonce,
            plaintext,
            out,
        )
        .map_err(|r| anyhow::anyhow!("sealing gossip to {to}: {}", r.name()))?;
        self.sent_nonces
            .lock()
            .expect("sent nonces lock")
            .remember(echo_of(&nonce), Instant::now());
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        self.key_use
            .lock()
            .expect("key use lock")
            .entry(key)
            .or_default()
            .sent += 1;
        Ok(())
    }

    /// Opens a datagram from `from` in place and returns the plaintext's range; a failure is
    /// counted (and logged now and then) before it is returned.
    pub fn open_from(
        &self,
        from: SocketAddr,
        datagram: &mut [u8],
    ) -> Result<std::ops::Range<usize>, DropReason> {
        let result = self.open_checked(datagram);
        match &result {
            Ok(opened) => {
                let now = Instant::now();
                self.counters.received.fetch_add(1, Ordering::Relaxed);
                {
                    let mut key_use = self.key_use.lock().expect("key use lock");
                    let used = key_use.entry(opened.key).or_default();
                    used.received += 1;
                    used.last_received = Some(now);
                }
                let mut peers = self.peers.lock().expect("peers lock");
                if peers.len() >= MAX_PEERS && !peers.contains_key(&from) {
                    // Only authentic senders get here, so this is a very large cluster:
                    // forget the quietest peer.
                    if let Some(oldest) = peers.iter().min_by_key(|(_, p)| p.last_seen) {
                        let oldest = *oldest.0;
                        peers.remove(&oldest);
                    }
                }
                peers.insert(
                    from,
                    Peer {
                        primary: opened.sender_primary,
                        last_key: opened.key,
                        last_seen: now,
                        echo: echo_of(&opened.nonce),
                        format: opened.format,
                    },
                );
            }
            Err(reason) => self.count_drop(from, *reason),
        }
        result.map(|o| o.plaintext)
    }

    fn open_checked(&self, datagram: &mut [u8]) -> Result<Opened, DropReason> {
        let ring = self.keyring();
        let opened = open(&ring, &self.cluster, datagram)?;
        let now = Instant::now();
        let echoed = self
            .sent_nonces
            .lock()
            .expect("sent nonces lock")
            .is_live(opened.echo, now);
        self.replay.lock().expect("replay lock").check(
            self.now_ms(),
            now,
            opened.timestamp_ms,
            opened.nonce,
            echoed,
        )?;
        Ok(opened)
    }

    pub fn count_drop(&self, from: SocketAddr, reason: DropReason) {
        let i = DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("every reason is listed");
        self.counters.dropped[i].fetch_add(1, Ordering::Relaxed);
        *self.last_drop.lock().expect("drop lock") = Some(DropEvent {
            from,
            reason,
            at: SystemTime::now(),
        });
        let now = Instant::now();
        let mut logged = self.last_logged.lock().expect("log lock");
        if logged
            .get(&reason)
            .is_none_or(|t| now.duration_since(*t) >= DROP_LOG_INTERVAL)
        {
            logged.insert(reason, now);
            warn!(
                %from,
                reason = reason.name(),
                "dropped a gossip datagram: {} (counted in `meshctl gossip stats`)",
                reason.hint()
            );
        }
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        let i = DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("every reason is listed");
        self.counters.dropped[i].load(Ordering::Relaxed)
    }

    /// The state as the API shows it: key ids and counters, never key material.
    pub fn report(&self) -> AuthReport {
        let ring = self.keyring();
        let now = Instant::now();
        let wall = SystemTime::now();
        let ago = |t: Instant| now.duration_since(t).as_millis() as u64;
        let wall_ago =
            |t: SystemTime| wall.duration_since(t).unwrap_or_default().as_millis() as u64;
        let key_use = self.key_use.lock().expect("key use lock").clone();
        let keys = ring
            .ids()
            .into_iter()
            .enumerate()
            .map(|(i, id)| {
                let u = key_use.get(&id).copied().unwrap_or_default();
                KeyReport {
                    id,
                    primary: i == 0,
                    sent: u.sent,
                    received: u.received,
                    last_received_ms_ago: u.last_received.map(ago),
                }
            })
            .collect();
        let mut peers: Vec<PeerReport> = self
            .peers
            .lock()
            .expect("peers lock")
            .iter()
            .map(|(addr, p)| PeerReport {
                address: *addr,
                primary_key: p.primary,
                last_key: p.last_key,
                last_seen_ms_ago: ago(p.last_seen),
            })
            .collect();
        peers.sort_by_key(|p| p.address);
        AuthReport {
            cipher: "xchacha20poly1305".into(),
            key_file: self.key_file.clone(),
            replay_window_ms: REPLAY_WINDOW.as_millis() as u64,
            remembered_nonces: self.replay.lock().expect("replay lock").remembered(),
            keys,
            peers,
            sent: self.counters.sent.load(Ordering::Relaxed),
            received: self.counters.received.load(Ordering::Relaxed),
            dropped: DropReason::ALL
                .iter()
                .map(|r| (r.name().to_owned(), self.dropped(*r)))
                .collect(),
            last_drop: self
                .last_drop
                .lock()
                .expect("drop lock")
                .as_ref()
                .map(|d| LastDrop {
                    from: d.from,
                    reason: d.reason,
                    ms_ago: wall_ago(d.at),
                }),
            last_reload: self
                .last_reload
                .lock()
                .expect("reload lock")
                .as_ref()
                .map(|r| ReloadReport {
                    ms_ago: wall_ago(r.at),
                    error: r.error.clone(),
                }),
            rekeys: self
                .rekeys
                .lock()
                .expect("rekeys lock")
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::gossip::keyring::{ClusterKey, KEY_LEN};

    const CLUSTER: &str = "prod";

    fn key(b: u8) -> ClusterKey {
        ClusterKey::new(&[b; KEY_LEN])
    }

    fn ring(keys: &[u8]) -> Keyring {
        Keyring::new(keys.iter().map(|b| key(*b)).collect()).unwrap()
    }

    fn sealed(ring: &Keyring, key: KeyId, cluster: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).unwrap();
        seal(ring, key, cluster, now_ms(), nonce, plaintext, &mut out).unwrap();
        out
    }

    fn opened(ring: &Keyring, cluster: &str, mut datagram: Vec<u8>) -> Result<Vec<u8>, DropReason> {
        let o = open(ring, cluster, &mut datagram)?;
        Ok(datagram[o.plaintext].to_vec())
    }

    #[test]
    fn a_sealed_datagram_opens_to_its_plaintext_and_hides_it() {
        let r = ring(&[1]);
        let msg = b"node h1 has network app at 10.10.0.0/24";
        let d = sealed(&r, r.primary().id, CLUSTER, msg);
        assert_eq!(d.len(), msg.len() + OVERHEAD);
        assert!(
            !d.windows(7).any(|w| w == b"network"),
            "the plaintext is not on the wire"
        );
        assert_eq!(opened(&r, CLUSTER, d).unwrap(), msg);
        // The empty message (chitchat never sends one, but the format allows it).
        let d = sealed(&r, r.primary().id, CLUSTER, b"");
        assert_eq!(opened(&r, CLUSTER, d).unwrap(), b"");
    }

    #[test]
    fn the_same_message_seals_differently_each_time() {
        let r = ring(&[1]);
        let a = sealed(&r, r.primary().id, CLUSTER, b"heartbeat");
        let b = sealed(&r, r.primary().id, CLUSTER, b"heartbeat");
        assert_ne!(a[18..], b[18..], "fresh nonce, different ciphertext");
    }

    #[test]
    fn every_flipped_byte_is_rejected() {
        let r = ring(&[1]);
        let d = sealed(&r, r.primary().id, CLUSTER, b"a small gossip message");
        for i in 0..d.len() {
            let mut t = d.clone();
            t[i] ^= 0x01;
            let err = opened(&r, CLUSTER, t).unwrap_err();
            let want = match i {
                0 | 1 => DropReason::UnknownFormat,
                2..=5 => DropReason::UnknownKey,
                _ => DropReason::BadTag,
            };
            assert_eq!(err, want, "byte {i}");
        }
    }

    #[test]
    fn a_wrong_key_or_cluster_name_is_rejected() {
        let r1 = ring(&[1]);
        let d = sealed(&r1, r1.primary().id, CLUSTER, b"hello");
        assert_eq!(
            opened(&ring(&[2]), CLUSTER, d.clone()),
            Err(DropReason::UnknownKey)
        );
        assert_eq!(opened(&r1, "staging", d), Err(DropReason::BadTag));
        // A forger who guesses the key id still cannot produce a valid tag.
        let forger = key(3);
        let forged_ring = Keyring::new(vec![ClusterKey {
            id: r1.primary().id,
            cipher: forger.cipher,
        }])
        .unwrap();
        let d = sealed(&forged_ring, r1.primary().id, CLUSTER, b"inject");
        assert_eq!(opened(&r1, CLUSTER, d), Err(DropReason::BadTag));
    }

    #[test]
    fn a_secondary_key_is_accepted_and_the_sender_primary_travels_along() {
        let old_only = ring(&[1]);
        let rotating = ring(&[2, 1]);
        // A node that switched to the new key answers an old-key peer with the old key.
        let mut d = sealed(&rotating, key(1).id, CLUSTER, b"answer");
        let o = open(&old_only, CLUSTER, &mut d).unwrap();
        assert_eq!(o.key, key(1).id);
        assert_eq!(o.sender_primary, key(2).id);
        // And understands the old-key peer.
        let d = sealed(&old_only, key(1).id, CLUSTER, b"syn");
        assert_eq!(opened(&rotating, CLUSTER, d).unwrap(), b"syn");
    }

    #[test]
    fn short_plain_and_foreign_datagrams_are_told_apart() {
        let r = ring(&[1]);
        assert_eq!(opened(&r, CLUSTER, vec![]), Err(DropReason::Truncated));
        assert_eq!(opened(&r, CLUSTER, vec![b'm']), Err(DropReason::Truncated));
        assert_eq!(
            opened(&r, CLUSTER, vec![b'm', 2, 0, 0]),
            Err(DropReason::Truncated)
        );
        let full = sealed(&r, r.primary().id, CLUSTER, b"x");
        assert_eq!(
            opened(&r, CLUSTER, full[..full.len() - 1].to_vec()),
            Err(DropReason::BadTag),
            "a datagram cut short fails authentication"
        );
        let mut plain = CHITCHAT_MAGIC.to_vec();
        plain.extend_from_slice(&[0, 3]);
        assert_eq!(opened(&r, CLUSTER, plain), Err(DropReason::Unsealed));
        assert_eq!(
            opened(
                &r,
                CLUSTER,
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n...........................".to_vec()
            ),
            Err(DropReason::UnknownFormat)
        );
    }

    fn guard() -> ReplayGuard {
        ReplayGuard::new(Duration::from_secs(30), Duration::from_secs(60))
    }

    #[test]
    fn old_future_and_repeated_datagrams_are_refused_without_an_echo() {
        let mut g = guard();
        let t0 = Instant::now();
        let now = 1_000_000_000u64;
        assert_eq!(
            g.check(now, t0, now, [1; NONCE_LEN], false),
            Ok(Fresh::Clock)
        );
        assert_eq!(
            g.check(now, t0, now, [1; NONCE_LEN], false),
            Err(DropReason::Replayed)
        );
        assert_eq!(
            g.check(now, t0, now - 29_000, [2; NONCE_LEN], false),
            Ok(Fresh::Clock)
        );
        assert_eq!(
            g.check(now, t0, now - 31_000, [3; NONCE_LEN], false),
            Err(DropReason::TooOld)
        );
        assert_eq!(
            g.check(now, t0, now + 31_000, [4; NONCE_LEN], false),
            Err(DropReason::TooNew)
        );
        // Nonces are forgotten only once a replay would be too old anyway.
        let later = t0 + Duration::from_secs(61);
        assert_eq!(
            g.check(now + 61_000, later, now + 61_000, [5; NONCE_LEN], false),
            Ok(Fresh::Clock)
        );
        assert_eq!(g.remembered(), 1);
        assert_eq!(
            g.check(now + 61_000, later, now, [1; NONCE_LEN], false),
            Err(DropReason::TooOld)
        );
    }

    #[test]
    fn an_echo_makes_any_timestamp_fresh_but_only_once() {
        let mut g = guard();
        let t0 = Instant::now();
        let now = 1_000_000_000u64;
        for skew in [-3_600_000i64, -60_000, 60_000, 86_400_000] {
            let stamp = now.saturating_add_signed(skew);
            let nonce = [(skew % 251) as u8; NONCE_LEN];
            assert!(g.check(now, t0, stamp, nonce, false).is_err(), "{skew}");
            assert_eq!(g.check(now, t0, stamp, nonce, true), Ok(Fresh::Echo));
            assert_eq!(
                g.check(now, t0, stamp, nonce, true),
                Err(DropReason::Replayed),
                "{skew}"
            );
        }
        // Remembered as long as the echo could still be live: a minute.
        let t1 = t0 + Duration::from_secs(59);
        let stamp = now - 3_600_000;
        let nonce = [(-3_600_000i64 % 251) as u8; NONCE_LEN];
        assert_eq!(
            g.check(now + 59_000, t1, stamp, nonce, true),
            Err(DropReason::Replayed)
        );
        let t2 = t0 + Duration::from_secs(61);
        assert_eq!(
            g.check(now + 61_000, t2, now + 61_000, [9; NONCE_LEN], false),
            Ok(Fresh::Clock)
        );
        assert_eq!(g.remembered(), 1, "only the last one is still needed");
    }

    #[test]
    fn a_receiver_whose_clock_steps_back_still_refuses_a_replay() {
        let mut g = guard();
        let t0 = Instant::now();
        let now = 1_000_000_000u64;
        assert_eq!(
            g.check(now, t0, now, [1; NONCE_LEN], false),
            Ok(Fresh::Clock)
        );
        // Ten minutes later the receiver's clock steps back by ten minutes: the old datagram's
        // timestamp is within the window again, and its nonce is still remembered.
        let later = t0 + Duration::from_secs(600);
        assert_eq!(
            g.check(now, later, now + 1, [2; NONCE_LEN], false),
            Ok(Fresh::Clock)
        );
        assert_eq!(
            g.check(now, later, now, [1; NONCE_LEN], false),
            Err(DropReason::Replayed)
        );
        // Datagrams accepted after the step are forgotten in their own time.
        let much_later = later + Duration::from_secs(61);
        assert_eq!(
            g.check(
                now + 31_002,
                much_later,
                now + 31_002,
                [3; NONCE_LEN],
                false
            ),
            Ok(Fresh::Clock)
        );
        assert_eq!(g.remembered(), 1);
    }

    #[test]
    fn a_peer_whose_clock_is_off_is_challenged_once_then_fresh_by_echo() {
        let path = Path::new("/nonexistent/cluster.key");
        let a = GossipAuth::new(ring(&[1]), path, CLUSTER);
        let b = GossipAuth::new(ring(&[1]), path, CLUSTER);
        let a_addr: SocketAddr = "192.0.2.1:7946".parse().unwrap();
        let b_addr: SocketAddr = "192.0.2.2:7946".parse().unwrap();
        b.step_clock(60_000);

        // First contact: a's clock says b's datagram is from the future.
        let mut syn = Vec::new();
        b.seal_for(a_addr, b"syn", &mut syn).unwrap();
        let captured = syn.clone();
        assert_eq!(a.open_from(b_addr, &mut syn), Err(DropReason::TooNew));
        let mut challenge = Vec::new();
        a.challenge(b_addr, &syn, &mut challenge).unwrap();
        assert!(
            challenge.len() < captured.len(),
            "shorter than what provoked it"
        );
        // b's clock finds a's challenge a minute old, but it echoes b's own nonce.
        let range = b.open_from(a_addr, &mut challenge).unwrap();
        assert!(range.is_empty());

        // From now on both ways are fresh, and stay so as b's clock steps again.
        for step in [0, -120_000, 3_600_000] {
            b.step_clock(step);
            for _ in 0..3 {
                let mut d = Vec::new();
                b.seal_for(a_addr, b"from b", &mut d).unwrap();
                let r = a.open_from(b_addr, &mut d).unwrap();
                assert_eq!(&d[r], b"from b", "step {step}");
                let mut d = Vec::new();
                a.seal_for(b_addr, b"from a", &mut d).unwrap();
                let r = b.open_from(a_addr, &mut d).unwrap();
                assert_eq!(&d[r], b"from a", "step {step}");
            }
        }
        // The first datagram, replayed: still not fresh (its echo was none).
        let mut r = captured;
        assert_eq!(a.open_from(b_addr, &mut r), Err(DropReason::TooNew));
        assert_eq!(a.dropped(DropReason::TooNew), 2);
        assert_eq!(
            b.dropped(DropReason::TooOld) + b.dropped(DropReason::TooNew),
            0
        );
    }

    #[test]
    fn an_echo_of_a_nonce_the_receiver_never_sent_proves_nothing() {
        let path = Path::new("/nonexistent/cluster.key");
        let a = GossipAuth::new(ring(&[1]), path, CLUSTER);
        let b_addr: SocketAddr = "192.0.2.2:7946".parse().unwrap();
        let r = ring(&[1]);
        let mut d = Vec::new();
        let stamp = (now_ms() + 60_000, 0x0123_4567_89ab_cdef);
        seal_echoing(
            &r,
            r.primary().id,
            CLUSTER,
            stamp,
            [3; NONCE_LEN],
            b"x",
            &mut d,
        )
        .unwrap();
        assert_eq!(a.open_from(b_addr, &mut d), Err(DropReason::TooNew));
    }

    #[test]
    fn the_receiver_counts_drops_and_remembers_peer_keys() {
        let path = Path::new("/nonexistent/cluster.key");
        let a = GossipAuth::new(ring(&[2, 1]), path, CLUSTER);
        let b = GossipAuth::new(ring(&[1]), path, CLUSTER);
        let a_addr: SocketAddr = "192.0.2.1:7946".parse().unwrap();
        let b_addr: SocketAddr = "192.0.2.2:7946".parse().unwrap();

        // a does not know b yet: its primary (new) key, which b cannot open.
        let mut d = Vec::new();
        a.seal_for(b_addr, b"syn", &mut d).unwrap();
        assert_eq!(b.open_from(a_addr, &mut d), Err(DropReason::UnknownKey));
        assert_eq!(b.dropped(DropReason::UnknownKey), 1);

        // b speaks first with the old key; a then answers b with it.
        let mut d = Vec::new();
        b.seal_for(a_addr, b"syn", &mut d).unwrap();
        let replay = d.clone();
        let range = a.open_from(b_addr, &mut d).unwrap();
        assert_eq!(&d[range], b"syn");
        let mut d = Vec::new();
        a.seal_for(b_addr, b"synack", &mut d).unwrap();
        let range = b.open_from(a_addr, &mut d).unwrap();
        assert_eq!(&d[range], b"synack");

        // The captured datagram sent again is refused.
        let mut r = replay;
        assert_eq!(a.open_from(b_addr, &mut r), Err(DropReason::Replayed));

        let report = a.report();
        assert_eq!(report.sent, 2);
        assert_eq!(report.received, 1);
        assert_eq!(report.dropped["replayed"], 1);
        assert_eq!(report.dropped.len(), DropReason::ALL.len());
        assert_eq!(report.keys[0].id, key(2).id);
        assert!(report.keys[0].primary);
        assert_eq!(
            report.keys[1].received, 1,
            "b's datagram came under the old key"
        );
        assert_eq!(report.peers.len(), 1);
        assert_eq!(report.peers[0].primary_key, key(1).id);
        let last = report.last_drop.as_ref().unwrap();
        assert_eq!((last.from, last.reason), (b_addr, DropReason::Replayed));
        let json = serde_json::to_string(&report).unwrap();
        assert!(!json.contains(&crate::gossip::keyring::encode(&[2; KEY_LEN]).to_string()));
    }

    #[test]
    fn an_agent_of_format_1_is_understood_and_answered_in_its_format() {
        let path = Path::new("/nonexistent/cluster.key");
        let a = GossipAuth::new(ring(&[1]), path, CLUSTER);
        let old_addr: SocketAddr = "192.0.2.7:7946".parse().unwrap();
        // What an agent from before echoes sends.
        let r = ring(&[1]);
        let mut d = Vec::new();
        let nonce = [5; NONCE_LEN];
        seal_as(
            1,
            &r,
            (r.primary().id, CLUSTER),
            (now_ms(), 0),
            nonce,
            b"old syn",
            &mut d,
        )
        .unwrap();
        assert_eq!(d.len(), b"old syn".len() + OVERHEAD - ECHO_LEN);
        assert_eq!(d[..2], MAGIC_V1);
        let range = a.open_from(old_addr, &mut d).unwrap();
        assert_eq!(&d[range], b"old syn");
        // Answered in format 1, which it reads.
        let mut answer = Vec::new();
        a.seal_for(old_addr, b"synack", &mut answer).unwrap();
        assert_eq!(answer[..2], MAGIC_V1);
        let o = open(&r, CLUSTER, &mut answer).unwrap();
        assert_eq!((o.format, &answer[o.plaintext]), (1, &b"synack"[..]));
        // Its clock must agree: it cannot echo, so it is not challenged either.
        let mut late = Vec::new();
        seal_as(
            1,
            &r,
            (r.primary().id, CLUSTER),
            (now_ms() - 60_000, 0),
            [6; NONCE_LEN],
            b"x",
            &mut late,
        )
        .unwrap();
        assert_eq!(a.open_from(old_addr, &mut late), Err(DropReason::TooOld));
        assert!(a.challenge(old_addr, &late, &mut Vec::new()).is_err());
    }

    #[test]
    fn a_plaintext_too_large_for_one_datagram_is_counted_not_sent() {
        let a = GossipAuth::new(ring(&[1]), Path::new("/x"), CLUSTER);
        let to: SocketAddr = "192.0.2.2:7946".parse().unwrap();
        let mut out = Vec::new();
        let big = vec![0u8; MAX_DATAGRAM - OVERHEAD + 1];
        assert!(a.seal_for(to, &big, &mut out).is_err());
        assert!(out.is_empty());
        assert_eq!(a.dropped(DropReason::Oversized), 1);
        a.seal_for(to, &big[1..], &mut out).unwrap();
        assert_eq!(out.len(), MAX_DATAGRAM);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever arrives, opening it returns a verdict and never panics; random bytes
        /// never authenticate.
        #[test]
        fn arbitrary_bytes_never_panic_and_never_open(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            sealed_header in any::<bool>(),
        ) {
            let r = ring(&[1]);
            if sealed_header && bytes.len() >= 6 {
                // Make it past the format and key checks so the tag check is what rejects it.
                bytes[..2].copy_from_slice(&MAGIC);
                bytes[2..6].copy_from_slice(&r.primary().id.0.to_be_bytes());
            }
            let a = GossipAuth::new(r, Path::new("/x"), CLUSTER);
            let from: SocketAddr = "192.0.2.9:7946".parse().unwrap();
            prop_assert!(a.open_from(from, &mut bytes).is_err());
            prop_assert_eq!(a.report().received, 0);
        }

        /// Truncating or extending an authentic datagram anywhere is caught.
        #[test]
        fn resized_datagrams_never_open(
            plaintext in proptest::collection::vec(any::<u8>(), 0..512),
            cut in any::<prop::sample::Index>(),
            extra in proptest::collection::vec(any::<u8>(), 1..32),
        ) {
            let r = ring(&[1]);
            let d = sealed(&r, r.primary().id, CLUSTER, &plaintext);
            let short = d[..cut.index(d.len())].to_vec();
            prop_assert!(opened(&r, CLUSTER, short).is_err());
            let mut long = d.clone();
            long.extend_from_slice(&extra);
            prop_assert!(opened(&r, CLUSTER, long).is_err());
            prop_assert_eq!(opened(&r, CLUSTER, d).unwrap(), plaintext);
        }
    }
}
