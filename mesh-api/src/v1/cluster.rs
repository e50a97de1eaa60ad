//! The cluster's membership and gossip: join tokens, key rotation, `meshctl gossip stats`.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// Names a key without revealing it; shown as 8 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub u32);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

impl Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        u32::from_str_radix(&s, 16)
            .map(KeyId)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a key id")))
    }
}

/// `meshctl join-token`: how another host joins, through this node. As secret as the key
/// file; only root on a member gets it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JoinTokenInfo {
    pub token: String,
    /// The whole command to run on the joining host.
    pub command: String,
    /// The key the token carries (its fingerprint), safe to show.
    pub key: KeyId,
    /// The latest key rotation, if one ran.
    pub rotation: Option<RotationStatus>,
}

impl std::fmt::Debug for JoinTokenInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JoinTokenInfo(key {})", self.key)
    }
}

/// `meshctl join-token --rotate`: the new key; the rotation goes on in the background.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RotateInfo {
    pub key: KeyId,
}

/// How this node's gossip is protected (`GET /v1/gossip`): key ids and counters, never keys.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GossipInfo {
    pub node: String,
    pub cluster: String,
    /// False when the agent runs without a cluster key: anyone who reaches the gossip port
    /// can join, read and inject state.
    pub authenticated: bool,
    /// Keys, peers and drop counters of sealed gossip; absent when unauthenticated.
    pub auth: Option<AuthReport>,
    /// Records and nodes refused for their origin (absent from older agents).
    #[serde(default)]
    pub origins: OriginStats,
}

/// What gossip refused for its origin: values not signed by the key of the node they are
/// written under, and nodes claiming a name bound to another node's key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OriginStats {
    pub invalid_records: u64,
    pub nodes_refused: u64,
    /// Role grants not signed by the cluster's admin key (absent from older agents).
    #[serde(default)]
    pub forged_grants: u64,
    /// Replicated objects written by workers, dropped: only admins write them.
    #[serde(default)]
    pub worker_objects: u64,
    /// This node's copies of secrets (sealed to its key by an admin) that did not open.
    #[serde(default)]
    pub secret_copies_refused: u64,
    /// Bodies of large values a peer served that did not match their signed manifest.
    #[serde(default)]
    pub payloads_refused: u64,
}

/// Where a key rotation stands, for `meshctl join-token --rotate` to report.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RotationStatus {
    pub key: KeyId,
    /// Ready nodes that seal with the new key, of all Ready nodes.
    pub switched: Vec<String>,
    /// Ready nodes that hold only the new key: the old one is retired there.
    pub retired: Vec<String>,
    pub ready: Vec<String>,
    /// Down nodes: they keep the old key and must join again with a new token.
    pub down: Vec<String>,
}

impl RotationStatus {
    pub fn done(&self) -> bool {
        self.retired.len() == self.ready.len()
    }
}

/// Gossip authentication as `GET /v1/gossip` reports it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuthReport {
    pub cipher: String,
    pub key_file: PathBuf,
    pub replay_window_ms: u64,
    pub remembered_nonces: usize,
    /// Configured keys, primary first.
    pub keys: Vec<KeyReport>,
    /// Peers that sent authentic gossip, with the keys they use.
    pub peers: Vec<PeerReport>,
    /// Datagrams sealed and sent.
    pub sent: u64,
    /// Authentic datagrams accepted.
    pub received: u64,
    /// Datagrams dropped, by reason (every reason listed).
    pub dropped: BTreeMap<String, u64>,
    pub last_drop: Option<LastDrop>,
    pub last_reload: Option<ReloadReport>,
    /// Nodes let back in after a missed key rotation, and requests refused, by outcome.
    #[serde(default)]
    pub rekeys: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyReport {
    pub id: KeyId,
    pub primary: bool,
    pub sent: u64,
    pub received: u64,
    pub last_received_ms_ago: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerReport {
    pub address: SocketAddr,
    /// The key the peer seals with.
    pub primary_key: KeyId,
    /// The key of its last datagram.
    pub last_key: KeyId,
    pub last_seen_ms_ago: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LastDrop {
    pub from: SocketAddr,
    pub reason: DropReason,
    pub ms_ago: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReloadReport {
    pub ms_ago: u64,
    /// Why the last reload failed (the keys in use stayed the same).
    pub error: Option<String>,
}

/// Why a datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Shorter than a header and a tag.
    Truncated,
    /// Plain chitchat: an agent running without a cluster key.
    Unsealed,
    /// Neither sealed gossip nor plain chitchat.
    UnknownFormat,
    /// Sealed with a key this node does not hold.
    UnknownKey,
    /// The tag does not verify: tampered, or sealed for another cluster name.
    BadTag,
    /// Authentic but older than the replay window (or the sender's clock is behind).
    TooOld,
    /// Authentic but newer than the replay window (the sender's clock is ahead).
    TooNew,
    /// Authentic and seen before.
    Replayed,
    /// Authentic but chitchat could not decode it.
    Undecodable,
    /// A datagram on the local codec socket that did not come from this agent.
    StrayLoopback,
    /// Could not be sent: sealed, it exceeds the largest UDP datagram.
    Oversized,
    /// A peer refused this node's datagram (a refusal): it does not hold our key.
    Refused,
    /// Authentic, but not what chitchat itself sends (ops out of order, versions going back,
    /// too many nodes, too large once decompressed), or telling a node's records or gossip
    /// versions that node did not sign: chitchat would mis-apply it.
    Invalid,
}

impl DropReason {
    pub const ALL: [DropReason; 13] = [
        DropReason::Truncated,
        DropReason::Unsealed,
        DropReason::UnknownFormat,
        DropReason::UnknownKey,
        DropReason::BadTag,
        DropReason::TooOld,
        DropReason::TooNew,
        DropReason::Replayed,
        DropReason::Undecodable,
        DropReason::StrayLoopback,
        DropReason::Oversized,
        DropReason::Refused,
        DropReason::Invalid,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::Unsealed => "unsealed",
            DropReason::UnknownFormat => "unknown_format",
            DropReason::UnknownKey => "unknown_key",
            DropReason::BadTag => "bad_tag",
            DropReason::TooOld => "too_old",
            DropReason::TooNew => "too_new",
            DropReason::Replayed => "replayed",
            DropReason::Undecodable => "undecodable",
            DropReason::StrayLoopback => "stray_loopback",
            DropReason::Oversized => "oversized",
            DropReason::Refused => "refused",
            DropReason::Invalid => "invalid",
        }
    }

    /// What an operator should look at.
    pub fn hint(self) -> &'static str {
        match self {
            DropReason::Unsealed => "an agent without a cluster key is sending to this node",
            DropReason::UnknownKey => {
                "a peer uses a key this node does not hold: another cluster, or a rotation step skipped"
            }
            DropReason::BadTag => "tampered datagram, or a peer with another --cluster name",
            DropReason::TooOld | DropReason::TooNew => {
                "a first datagram from a peer whose clock differs by more than the replay window \
                 (it is challenged and proves itself fresh after; harmless), or captured gossip \
                 replayed late"
            }
            DropReason::Replayed => "a datagram was sent again: someone replays captured gossip",
            DropReason::Undecodable => "a key holder sent something chitchat cannot decode",
            DropReason::StrayLoopback => "a local process sent to the gossip codec socket",
            DropReason::Oversized => "gossip state too large for one datagram",
            DropReason::Refused => {
                "a peer does not accept this node's cluster key: a rotation retired it while this \
                 node was away (this node asks for the current key, and members let it back in \
                 for 7 days: see `rekeys` in `meshctl gossip stats`; later, join again with a \
                 current `meshctl join-token`), or the peer is of another cluster"
            }
            DropReason::Invalid => {
                "a key holder sent gossip that could corrupt this node's state (ops out of order, \
                 phantom nodes, a decompression bomb, a node's records or gossip versions that \
                 node did not sign): a compromised node, or an agent of an incompatible version"
            }
            DropReason::Truncated | DropReason::UnknownFormat => {
                "something that is not mesh gossip reached the gossip port"
            }
        }
    }
}
