//! A chitchat [`Transport`] whose datagrams are sealed with the cluster key (see `auth`).
//!
//! chitchat 0.13 keeps its wire encoding private to the crate (quickwit-oss/chitchat#207): a
//! transport is handed envelopes it cannot encode and receives bytes it cannot decode. So this
//! transport keeps chitchat's own `UdpSocket` as a codec on loopback and moves only sealed
//! bytes on the wire:
//!
//! ```text
//!  send:  envelope ─► chitchat UdpSocket ─lo─► encoder socket ─► seal ─► wire ─► peer
//!  recv:  peer ─► wire ─► open ─► validate ─► feeder socket of that peer ─lo─► chitchat UdpSocket ─► envelope
//! ```
//!
//! `validate` drops (and counts) authentic datagrams chitchat would mis-apply: see there; and
//! `versions` those telling a node's gossip versions past what that node signed.
//!
//! Each peer gets its own feeder socket, so a decoded envelope is attributed to its sender by
//! the feeder it came from, whatever order loopback delivers in. One datagram is with chitchat
//! at a time (the others wait here): a burst of near-64 KB datagrams (large values crossing
//! as chunks) would overflow the codec socket's receive buffer, losing datagrams while
//! their small sentinels got through. After each datagram a feeder
//! sends a sentinel (chitchat's 4-byte `BadCluster` message): a sentinel that arrives with no
//! decoded envelope before it means chitchat could not decode the datagram, which is counted.
//! Only sockets of this agent reach the codec: the encoder is connected to the chitchat socket
//! (the kernel drops anything else), and envelopes from an address that is not a feeder are
//! dropped and counted.
//!
//! Cost: two loopback hops per datagram (measured in the tests: tens of microseconds), small
//! beside a 100 ms gossip interval.

use std::{
    collections::{HashMap, VecDeque},
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use async_trait::async_trait;
use chitchat::{
    ChitchatEnvelope, ChitchatMessage, ProtocolVersion,
    transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as ChitchatSocket},
};
use tracing::{debug, warn};

use super::auth::{GossipAuth, MAX_DATAGRAM, Refusal};
use super::rekey;
use super::validate::{self, KnownNodes};
use super::versions::Versions;
use mesh_api::v1::DropReason;
use mesh_api::v1::KeyId;

/// chitchat's encoding of `BadCluster` in protocol version 0: magic number 45139 (little
/// endian), version 0, message type 3. Used as the sentinel after each fed datagram.
const SENTINEL: [u8; 4] = [0x53, 0xb0, 0x00, 0x03];
/// Feeder sockets kept at most (one per peer that sent authentic gossip recently).
const MAX_FEEDERS: usize = 1024;
/// Loopback delivers at once; this only bounds a wait that something went badly wrong in.
const ENCODE_TIMEOUT: Duration = Duration::from_secs(1);
/// Opened datagrams kept waiting for chitchat (at most 64 KB each); beyond, the newest are
/// dropped as a full socket buffer would, and gossip sends them again.
const MAX_WAITING: usize = 64;

/// Seals gossip with the keys of a [`GossipAuth`].
pub struct SealedTransport {
    auth: Arc<GossipAuth>,
}

impl SealedTransport {
    pub fn new(auth: Arc<GossipAuth>) -> Self {
        Self { auth }
    }
}

#[async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen: SocketAddr) -> Result<Box<dyn Socket>> {
        Ok(Box::new(
            SealedSocket::open(listen, self.auth.clone()).await?,
        ))
    }
}

pub struct SealedSocket {
    auth: Arc<GossipAuth>,
    wire: tokio::net::UdpSocket,
    codec: Codec,
    recv_buf: Box<[u8]>,
    send_buf: Vec<u8>,
    /// When each address was last sent a [`Refusal`]: one a second per sender at most.
    refused: HashMap<SocketAddr, Instant>,
    /// When each address was last asked for the current keys, and last answered.
    asked: HashMap<SocketAddr, Instant>,
    answered: HashMap<SocketAddr, Instant>,
    /// Nodes that digests named recently (see `validate`).
    known: KnownNodes,
    /// What each node's run has proven of its gossip versions (see `versions`).
    versions: Versions,
}

impl SealedSocket {
    /// A delta about this node's own run is a replay of its records (see `validate`).
    fn refuse_own_state(&self, checked: validate::Checked) -> Result<validate::Checked, String> {
        match checked.delta_nodes.iter().find(|n| self.auth.is_self(n)) {
            Some(n) => Err(format!(
                "a delta about this node itself ({}, run {}): only this node writes its state",
                n.name, n.generation
            )),
            None => Ok(checked),
        }
    }

    pub async fn open(listen: SocketAddr, auth: Arc<GossipAuth>) -> Result<Self> {
        let wire = tokio::net::UdpSocket::bind(listen)
            .await
            .with_context(|| format!("binding the gossip socket {listen}/udp"))?;
        Ok(Self {
            auth,
            wire,
            codec: Codec::open().await?,
            recv_buf: vec![0u8; MAX_DATAGRAM + 1].into_boxed_slice(),
            send_buf: Vec::with_capacity(MAX_DATAGRAM),
            refused: HashMap::new(),
            asked: HashMap::new(),
            answered: HashMap::new(),
            known: KnownNodes::default(),
            versions: Versions::default(),
        })
    }

    /// Tells a sender its datagram was sealed with a key this node does not hold, or
    /// challenges an authentic one that was not fresh (see `auth`). Never waits (recv must
    /// stay cancel-safe): an answer the socket cannot take now is skipped.
    fn refuse(&mut self, to: SocketAddr, reason: DropReason, n: usize) {
        // A rekey request comes right after this node's refusal: it has a limit of its own.
        if reason == DropReason::UnknownKey && self.answer_rekey(to, n) {
            return;
        }
        let stale = matches!(reason, DropReason::TooOld | DropReason::TooNew);
        let refusal = Refusal::of(reason, &self.recv_buf[..n]);
        if !stale && refusal.is_none() {
            return;
        }
        let now = Instant::now();
        if self
            .refused
            .get(&to)
            .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(1))
        {
            return;
        }
        if self.refused.len() >= MAX_FEEDERS {
            self.refused.clear();
        }
        self.refused.insert(to, now);
        if let Some(refusal) = refusal {
            let _ = self.wire.try_send_to(&refusal.encode(), to);
            return;
        }
        self.send_buf.clear();
        match self
            .auth
            .challenge(to, &self.recv_buf[..n], &mut self.send_buf)
        {
            Ok(()) => {
                let _ = self.wire.try_send_to(&self.send_buf, to);
            }
            Err(e) => debug!(%to, "not challenging a stale datagram: {e:#}"),
        }
    }
}

impl SealedSocket {
    /// Answers a rekey request sealed under a retired key (see `rekey`), one a second per
    /// address at most; whether the datagram was one.
    fn answer_rekey(&mut self, to: SocketAddr, n: usize) -> bool {
        self.send_buf.clear();
        let Some(outcome) = self
            .auth
            .answer_rekey(to, &mut self.recv_buf[..n], &mut self.send_buf)
        else {
            return false;
        };
        let now = Instant::now();
        if outcome.is_ok()
            && self
                .answered
                .get(&to)
                .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            if self.answered.len() >= MAX_FEEDERS {
                self.answered.clear();
            }
            self.answered.insert(to, now);
            let _ = self.wire.try_send_to(&self.send_buf, to);
        }
        true
    }

    /// A peer refused this node's primary key: the cluster key may have rotated while this
    /// node was away. Asks that peer for the current keys (see `rekey`), once a second.
    fn ask_for_keys(&mut self, from: SocketAddr, n: usize) {
        let Some(refusal) = Refusal::decode(&self.recv_buf[..n]) else {
            return;
        };
        if refusal.reason != DropReason::UnknownKey
            || refusal.key != self.auth.keyring().primary().id
        {
            return;
        }
        let now = Instant::now();
        if self
            .asked
            .get(&from)
            .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(1))
        {
            return;
        }
        if self.asked.len() >= MAX_FEEDERS {
            self.asked.clear();
        }
        self.asked.insert(from, now);
        self.send_buf.clear();
        match self.auth.rekey_request(from, &mut self.send_buf) {
            Ok(()) => {
                let _ = self.wire.try_send_to(&self.send_buf, from);
            }
            Err(e) => debug!(%from, "not asking for the current cluster keys: {e:#}"),
        }
    }
}

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> Result<SocketAddr> {
        self.wire
            .local_addr()
            .context("reading the gossip socket's address")
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> Result<SendOutcome> {
        let plaintext = self.codec.encode(envelope).await?;
        self.send_buf.clear();
        self.auth.seal_for(to, plaintext, &mut self.send_buf)?;
        let num_bytes_sent = self
            .wire
            .send_to(&self.send_buf, to)
            .await
            .with_context(|| format!("sending gossip to {to}"))?;
        Ok(SendOutcome { num_bytes_sent })
    }

    /// Cancel-safe, as chitchat needs (it races `recv` with its gossip timer): both awaited
    /// receives are, and everything after them is synchronous.
    async fn recv(&mut self) -> Result<RecvOutcome> {
        loop {
            let stuck = self.codec.in_flight.map(|t| t + ENCODE_TIMEOUT);
            tokio::select! {
                decoded = self.codec.chitchat.recv() => {
                    match self.codec.resolve(decoded.context("the gossip codec socket failed")?) {
                        Resolved::Message(m) => return Ok(m),
                        Resolved::Undecodable(peer) => {
                            self.auth.count_drop(peer, DropReason::Undecodable);
                            self.codec.feed_next();
                        }
                        Resolved::Stray(from) => {
                            self.auth.count_drop(from, DropReason::StrayLoopback)
                        }
                        Resolved::Sentinel => self.codec.feed_next(),
                    }
                }
                _ = tokio::time::sleep_until(stuck.unwrap_or_else(Instant::now).into()),
                    if stuck.is_some() => {
                    debug!("a gossip datagram got no answer from the codec; feeding the next");
                    self.codec.feed_next();
                }
                received = self.wire.recv_from(&mut self.recv_buf[..]) => {
                    let (n, from) = match received {
                        Ok(r) => r,
                        Err(e) if is_transient(&e) => continue,
                        Err(e) => return Err(e).context("receiving gossip"),
                    };
                    let plaintext = match self.auth.open_from(from, &mut self.recv_buf[..n]) {
                        Ok(p) => p,
                        Err(DropReason::Refused) => {
                            self.ask_for_keys(from, n);
                            continue;
                        }
                        Err(reason) => {
                            self.refuse(from, reason, n);
                            continue;
                        }
                    };
                    let plaintext = &self.recv_buf[plaintext];
                    if rekey::is_answer(plaintext) {
                        if let Err(e) = self.auth.take_rekey_answer(from, plaintext) {
                            warn!(%from, "a rekey answer not taken: {e:#}");
                        }
                        continue;
                    }
                    if plaintext.is_empty() {
                        // A challenge answered: it only carried an echo.
                        continue;
                    }
                    if plaintext.starts_with(&SENTINEL) {
                        // Chitchat would decode it to exactly the sentinel: no need to ask.
                        return Ok(RecvOutcome {
                            from_addr: from,
                            envelope: sentinel_envelope(),
                            num_bytes_received: n,
                        });
                    }
                    let now = Instant::now();
                    let auth = &self.auth;
                    let checked = validate::check(plaintext)
                        .and_then(|c| self.refuse_own_state(c))
                        .and_then(|c| {
                            self.known.admit(&c.digest_nodes, now)?;
                            self.versions.admit(&c.delta, |n| auth.pinned(n), now)
                        });
                    if let Err(e) = checked {
                        debug!(%from, "gossip datagram rejected: {e}");
                        self.auth.count_drop(from, DropReason::Invalid);
                        continue;
                    }
                    self.codec.submit(from, plaintext);
                }
            }
        }
    }
}

/// What a member answered a joiner's probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeAnswer {
    /// An authentic answer: the peer holds the key; `primary` is the key it seals with (not
    /// the probe's while a rotation is under way).
    Member { primary: Option<KeyId> },
    /// The peer could not open the probe.
    Refused(Refusal),
}

/// Asks `peer` whether it is a member of the cluster `auth`'s key belongs to, before a
/// joining node writes any config: one chitchat Syn with an empty digest (it adds nothing to
/// the peer's state) sealed with the key, retried until `timeout`. Only an answer the peer
/// sealed with that key counts as reaching the right cluster.
pub async fn probe(
    auth: Arc<GossipAuth>,
    cluster: &str,
    local: SocketAddr,
    peer: SocketAddr,
    timeout: Duration,
) -> Result<ProbeAnswer> {
    let wire = tokio::net::UdpSocket::bind(local)
        .await
        .with_context(|| format!("opening a gossip socket on {local}"))?;
    // Connected, so an ICMP port unreachable comes back as an error instead of silence.
    wire.connect(peer)
        .await
        .with_context(|| format!("no route to {peer}: check the address"))?;
    let mut codec = Codec::open().await?;
    let syn = ChitchatEnvelope {
        version: ProtocolVersion::V0,
        message: ChitchatMessage::Syn {
            cluster_id: cluster.to_owned(),
            digest: Default::default(),
        },
    };
    let plaintext = codec.encode(syn).await?.to_vec();
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut refused_port = false;
    let mut sealed = Vec::new();
    while Instant::now() < deadline {
        // Sealed afresh each time: a resent datagram would be dropped as a replay.
        sealed.clear();
        auth.seal_for(peer, &plaintext, &mut sealed)?;
        match wire.send(&sealed).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused_port = true,
            Err(e) => return Err(e).with_context(|| format!("sending to {peer}")),
        }
        let round = Instant::now() + Duration::from_millis(500);
        while Instant::now() < round.min(deadline) {
            let wait = round.min(deadline) - Instant::now();
            let n = match tokio::time::timeout(wait, wire.recv(&mut buf)).await {
                Err(_) => break,
                Ok(Ok(n)) => n,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    refused_port = true;
                    break;
                }
                Ok(Err(e)) => return Err(e).with_context(|| format!("receiving from {peer}")),
            };
            if let Some(r) = Refusal::decode(&buf[..n]) {
                return Ok(ProbeAnswer::Refused(r));
            }
            if auth.open_from(peer, &mut buf[..n]).is_ok() {
                return Ok(ProbeAnswer::Member {
                    primary: auth.peer_primary(peer),
                });
            }
        }
    }
    if refused_port {
        anyhow::bail!(
            "nothing listens on {peer}/udp: is mesh-agent running there, with that gossip port? \
             (check the address in the join command)"
        );
    }
    anyhow::bail!(
        "no answer from {peer}/udp within {}s: the address is not reachable from this host, or \
         a firewall drops udp port {} (check the address in the join command and the route to it)",
        timeout.as_secs(),
        peer.port()
    )
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        OutOfMemory | ConnectionReset | ConnectionRefused | Interrupted
    )
}

fn sentinel_envelope() -> ChitchatEnvelope {
    ChitchatEnvelope {
        version: ProtocolVersion::V0,
        message: ChitchatMessage::BadCluster,
    }
}

enum Resolved {
    Message(RecvOutcome),
    /// The sentinel after a datagram chitchat decoded.
    Sentinel,
    /// The sentinel came first: chitchat dropped the peer's datagram.
    Undecodable(SocketAddr),
    /// From a local socket that is not ours.
    Stray(SocketAddr),
}

struct Feeder {
    socket: std::net::UdpSocket,
    peer: SocketAddr,
    /// Datagrams decoded whose sentinel has not arrived yet.
    decoded: u32,
    last_used: Instant,
}

/// chitchat's own socket on loopback, and the sockets that talk to it.
struct Codec {
    chitchat: ChitchatSocket,
    chitchat_addr: SocketAddr,
    encoder: tokio::net::UdpSocket,
    encoder_addr: SocketAddr,
    encoded: Box<[u8]>,
    /// By the feeder's own address.
    feeders: HashMap<SocketAddr, Feeder>,
    /// Feeder address by peer.
    by_peer: HashMap<SocketAddr, SocketAddr>,
    /// Opened datagrams waiting for chitchat to finish the one before them.
    waiting: VecDeque<(SocketAddr, Vec<u8>)>,
    /// When the datagram chitchat has was fed (until its sentinel comes back).
    in_flight: Option<Instant>,
}

impl Codec {
    async fn open() -> Result<Self> {
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let chitchat = ChitchatSocket::open(loopback).await.context(
            "opening the gossip codec socket on 127.0.0.1 (is the loopback interface up?)",
        )?;
        let chitchat_addr = chitchat.local_addr()?;
        let encoder = tokio::net::UdpSocket::bind(loopback)
            .await
            .context("opening the gossip encoder socket on 127.0.0.1")?;
        encoder.connect(chitchat_addr).await?;
        let encoder_addr = encoder.local_addr()?;
        Ok(Self {
            chitchat,
            chitchat_addr,
            encoder,
            encoder_addr,
            encoded: vec![0u8; MAX_DATAGRAM + 1].into_boxed_slice(),
            feeders: HashMap::new(),
            by_peer: HashMap::new(),
            waiting: VecDeque::new(),
            in_flight: None,
        })
    }

    /// chitchat's bytes for an envelope.
    async fn encode(&mut self, envelope: ChitchatEnvelope) -> Result<&[u8]> {
        let sent = self
            .chitchat
            .send(self.encoder_addr, envelope)
            .await
            .context("encoding gossip")?
            .num_bytes_sent;
        tokio::time::timeout(ENCODE_TIMEOUT, async {
            loop {
                let n = self.encoder.recv(&mut self.encoded).await?;
                // Only a send cancelled midway (chitchat does not cancel sends) could leave an
                // older datagram here; its length would give it away.
                if n == sent {
                    return Ok::<_, std::io::Error>(n);
                }
            }
        })
        .await
        .context("the gossip codec lost a datagram on loopback")?
        .context("reading encoded gossip")
        .map(|n| &self.encoded[..n])
    }

    /// Hands an opened datagram to chitchat now if it is idle, else queues it.
    fn submit(&mut self, peer: SocketAddr, plaintext: &[u8]) {
        if self.in_flight.is_some() {
            if self.waiting.len() < MAX_WAITING {
                self.waiting.push_back((peer, plaintext.to_vec()));
            } else {
                debug!(%peer, "gossip codec busy: datagram dropped");
            }
            return;
        }
        self.feed_now(peer, plaintext);
    }

    /// The datagram with chitchat is done: hands it the next one waiting.
    fn feed_next(&mut self) {
        self.in_flight = None;
        while self.in_flight.is_none()
            && let Some((peer, plaintext)) = self.waiting.pop_front()
        {
            self.feed_now(peer, &plaintext);
        }
    }

    fn feed_now(&mut self, peer: SocketAddr, plaintext: &[u8]) {
        match self.feed(peer, plaintext) {
            Ok(()) => self.in_flight = Some(Instant::now()),
            Err(e) => debug!(%peer, "gossip datagram lost on loopback: {e:#}"),
        }
    }

    /// Hands an opened datagram from `peer` to chitchat to decode, followed by a sentinel.
    fn feed(&mut self, peer: SocketAddr, plaintext: &[u8]) -> Result<()> {
        let feeder = self.feeder(peer)?;
        feeder.last_used = Instant::now();
        feeder.socket.send(plaintext)?;
        feeder.socket.send(&SENTINEL)?;
        Ok(())
    }

    fn feeder(&mut self, peer: SocketAddr) -> Result<&mut Feeder> {
        if let Some(addr) = self.by_peer.get(&peer) {
            return Ok(self.feeders.get_mut(addr).expect("feeder maps agree"));
        }
        if self.feeders.len() >= MAX_FEEDERS
            && let Some(oldest) = self
                .feeders
                .iter()
                .min_by_key(|(_, f)| f.last_used)
                .map(|(a, _)| *a)
        {
            let f = self.feeders.remove(&oldest).expect("just found");
            self.by_peer.remove(&f.peer);
        }
        // A plain non-blocking socket: feeders only ever send, and a send to loopback does
        // not wait.
        let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .context("opening a gossip feeder socket on 127.0.0.1")?;
        socket.connect(self.chitchat_addr)?;
        socket.set_nonblocking(true)?;
        let addr = socket.local_addr()?;
        self.by_peer.insert(peer, addr);
        Ok(self.feeders.entry(addr).or_insert(Feeder {
            socket,
            peer,
            decoded: 0,
            last_used: Instant::now(),
        }))
    }

    /// Maps what chitchat decoded back to the peer that sent it.
    fn resolve(&mut self, out: RecvOutcome) -> Resolved {
        let Some(feeder) = self.feeders.get_mut(&out.from_addr) else {
            return Resolved::Stray(out.from_addr);
        };
        if out.envelope == sentinel_envelope() {
            if feeder.decoded > 0 {
                feeder.decoded -= 1;
                return Resolved::Sentinel;
            }
            return Resolved::Undecodable(feeder.peer);
        }
        feeder.decoded += 1;
        Resolved::Message(RecvOutcome {
            from_addr: feeder.peer,
            ..out
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::gossip::{
        auth::{OVERHEAD, seal},
        keyring::{ClusterKey, KEY_LEN, Keyring},
    };

    const CLUSTER: &str = "prod";

    fn auth(keys: &[u8]) -> Arc<GossipAuth> {
        let ring = Keyring::new(
            keys.iter()
                .map(|b| ClusterKey::new(&[*b; KEY_LEN]))
                .collect(),
        )
        .unwrap();
        Arc::new(GossipAuth::new(ring, Path::new("/x"), CLUSTER))
    }

    async fn socket(keys: &[u8]) -> (SealedSocket, SocketAddr, Arc<GossipAuth>) {
        let a = auth(keys);
        let s = SealedSocket::open("127.0.0.1:0".parse().unwrap(), a.clone())
            .await
            .unwrap();
        let addr = s.local_addr().unwrap();
        (s, addr, a)
    }

    fn syn(cluster: &str) -> ChitchatEnvelope {
        ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::Syn {
                cluster_id: cluster.to_owned(),
                digest: Default::default(),
            },
        }
    }

    async fn recv(s: &mut SealedSocket) -> Option<RecvOutcome> {
        tokio::time::timeout(Duration::from_millis(300), s.recv())
            .await
            .ok()
            .map(Result::unwrap)
    }

    #[tokio::test]
    async fn a_probe_tells_a_member_from_a_refusal_and_from_silence() {
        // A "member" answers a probe with its own sealed gossip; here, the next envelope.
        let (mut member, member_addr, _) = socket(&[1]).await;
        let serve = tokio::spawn(async move {
            loop {
                if let Ok(m) = member.recv().await {
                    let _ = member.send(m.from_addr, syn(CLUSTER)).await;
                }
            }
        });
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let t = Duration::from_secs(2);
        let ok = probe(auth(&[1]), CLUSTER, local, member_addr, t)
            .await
            .unwrap();
        assert_eq!(
            ok,
            ProbeAnswer::Member {
                primary: Some(ClusterKey::new(&[1; KEY_LEN]).id)
            }
        );
        let stale = probe(auth(&[2]), CLUSTER, local, member_addr, t)
            .await
            .unwrap();
        assert_eq!(
            stale,
            ProbeAnswer::Refused(Refusal {
                reason: DropReason::UnknownKey,
                key: ClusterKey::new(&[2; KEY_LEN]).id
            })
        );
        let ring = Keyring::new(vec![ClusterKey::new(&[1; KEY_LEN])]).unwrap();
        let other = Arc::new(GossipAuth::new(ring, Path::new("/x"), "other"));
        let other_name = probe(other, "other", local, member_addr, t).await.unwrap();
        assert!(
            matches!(other_name, ProbeAnswer::Refused(r) if r.reason == DropReason::BadTag),
            "{other_name:?}"
        );
        serve.abort();
        // Nothing listens there any more: the port is refused, not silent.
        let e = probe(auth(&[1]), CLUSTER, local, member_addr, t)
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("nothing listens"), "{e:#}");
    }

    #[test]
    fn refusals_round_trip_and_only_key_failures_get_one() {
        let r = Refusal {
            reason: DropReason::UnknownKey,
            key: KeyId(0x01020304),
        };
        assert_eq!(Refusal::decode(&r.encode()), Some(r));
        let sealed_like = [b'm', 1, 1, 2, 3, 4, 0, 0];
        assert_eq!(
            Refusal::of(DropReason::BadTag, &sealed_like).map(|r| r.key),
            Some(KeyId(0x01020304))
        );
        assert_eq!(Refusal::of(DropReason::Replayed, &sealed_like), None);
        assert_eq!(Refusal::of(DropReason::Truncated, &sealed_like), None);
        assert_eq!(Refusal::decode(&[b'm', 0x80, 9, 0, 0, 0, 0]), None);
    }

    #[tokio::test]
    async fn the_sentinel_is_chitchats_encoding_of_bad_cluster() {
        let mut codec = Codec::open().await.unwrap();
        assert_eq!(codec.encode(sentinel_envelope()).await.unwrap(), SENTINEL);
    }

    #[tokio::test]
    async fn envelopes_cross_sealed_and_arrive_from_their_sender() {
        let (mut a, a_addr, a_auth) = socket(&[1]).await;
        let (mut b, b_addr, b_auth) = socket(&[1]).await;
        // A plain socket watching what goes over the wire instead of b.
        let spy = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        a.send(spy.local_addr().unwrap(), syn("prod-cluster-name"))
            .await
            .unwrap();
        let mut buf = vec![0u8; 2048];
        let n = spy.recv(&mut buf).await.unwrap();
        assert!(
            !buf[..n].windows(4).any(|w| w == b"prod"),
            "the cluster id is not readable on the wire"
        );

        for envelope in [syn("prod-cluster-name"), sentinel_envelope()] {
            let want = format!("{envelope:?}");
            let sent = a.send(b_addr, envelope).await.unwrap();
            let got = recv(&mut b).await.expect("b receives");
            assert_eq!(got.from_addr, a_addr);
            assert_eq!(format!("{:?}", got.envelope), want);
            assert!(sent.num_bytes_sent > OVERHEAD);
        }
        // And back, many times, with nothing lost or misattributed.
        for _ in 0..50 {
            b.send(a_addr, syn("x")).await.unwrap();
        }
        for _ in 0..50 {
            assert_eq!(recv(&mut a).await.expect("a receives").from_addr, b_addr);
        }
        assert_eq!(a_auth.report().received, 50);
        assert_eq!(b_auth.report().received, 2);
        assert_eq!(b_auth.report().dropped.values().sum::<u64>(), 0);
    }

    #[tokio::test]
    async fn outsiders_and_garbage_are_dropped_and_counted() {
        let (mut b, b_addr, b_auth) = socket(&[1]).await;
        let (mut wrong, _, _) = socket(&[2]).await;
        let raw = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();

        wrong.send(b_addr, syn("prod")).await.unwrap();
        raw.send_to(
            b"not gossip at all, just some bytes on the port ..............",
            b_addr,
        )
        .await
        .unwrap();
        raw.send_to(&SENTINEL, b_addr).await.unwrap();
        // A key holder sending bytes chitchat cannot decode.
        let mut d = Vec::new();
        let ring = b_auth.keyring();
        seal(
            &ring,
            ring.primary().id,
            CLUSTER,
            now_ms(),
            [7; 24],
            b"\x53\xb0\x00\x09junk",
            &mut d,
        )
        .unwrap();
        raw.send_to(&d, b_addr).await.unwrap();
        // A local process writing plain chitchat straight to the codec socket.
        raw.send_to(&SENTINEL, b.codec.chitchat_addr).await.unwrap();

        assert!(recv(&mut b).await.is_none(), "nothing gets through");
        let r = b_auth.report();
        assert_eq!(r.received, 1, "only the sealed junk authenticated");
        for (reason, n) in [
            ("unknown_key", 1),
            ("unknown_format", 1),
            ("unsealed", 1),
            ("invalid", 1),
            ("stray_loopback", 1),
        ] {
            assert_eq!(r.dropped[reason], n, "{reason}: {:?}", r.dropped);
        }
    }

    fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    #[tokio::test]
    async fn recv_survives_being_cancelled_midway() {
        let (mut a, _, _) = socket(&[1]).await;
        let (mut b, b_addr, _) = socket(&[1]).await;
        for i in 0..20 {
            a.send(b_addr, syn(&format!("c{i}"))).await.unwrap();
        }
        // Cancel recv over and over, as chitchat's select does on every gossip tick.
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < 20 && Instant::now() < deadline {
            if let Ok(r) = tokio::time::timeout(Duration::from_micros(50), b.recv()).await {
                got.push(r.unwrap());
            }
        }
        let ids: Vec<String> = got
            .iter()
            .map(|r| match &r.envelope.message {
                ChitchatMessage::Syn { cluster_id, .. } => cluster_id.clone(),
                m => panic!("unexpected {m:?}"),
            })
            .collect();
        assert_eq!(ids.len(), 20, "{ids:?}");
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 20, "each once: {ids:?}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        /// A key holder sending arbitrary bytes (here mostly past chitchat's header, so the
        /// validation and chitchat's decoder do the work) gets them decoded or counted, never
        /// a panic or a stall.
        #[test]
        fn authentic_garbage_is_decoded_or_counted(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            message_type in 0u8..5,
            version in 0u8..3,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (mut b, b_addr, b_auth) = socket(&[1]).await;
                let mut plaintext = vec![0x53, 0xb0, version, message_type];
                plaintext.extend_from_slice(&body);
                let ring = b_auth.keyring();
                let mut nonce = [0u8; 24];
                getrandom::fill(&mut nonce).unwrap();
                let mut d = Vec::new();
                seal(&ring, ring.primary().id, CLUSTER, now_ms(), nonce, &plaintext, &mut d)
                    .unwrap();
                let raw = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
                raw.send_to(&d, b_addr).await.unwrap();
                let got = tokio::time::timeout(Duration::from_secs(2), async {
                    loop {
                        tokio::select! {
                            m = b.recv() => return Some(m.unwrap()),
                            _ = tokio::time::sleep(Duration::from_millis(2)) => {
                                if b_auth.dropped(DropReason::Undecodable)
                                    + b_auth.dropped(DropReason::Invalid) > 0
                                {
                                    return None;
                                }
                            }
                        }
                    }
                })
                .await
                .expect("decoded or counted within 2 s");
                let r = b_auth.report();
                assert_eq!(r.received, 1);
                match got {
                    Some(m) => assert_eq!(m.from_addr, raw.local_addr().unwrap()),
                    None => assert_eq!(
                        r.dropped["undecodable"] + r.dropped["invalid"],
                        1,
                        "{:?}",
                        r.dropped
                    ),
                }
            });
        }
    }

    #[tokio::test]
    async fn sealing_costs_little_beside_plain_udp() {
        let n = 500;
        let (mut a, _, _) = socket(&[1]).await;
        let (mut b, b_addr, _) = socket(&[1]).await;
        let start = Instant::now();
        for _ in 0..n {
            a.send(b_addr, syn("prod")).await.unwrap();
            recv(&mut b).await.expect("received");
        }
        let sealed = start.elapsed() / n;

        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut pa = ChitchatSocket::open(loopback).await.unwrap();
        let mut pb = ChitchatSocket::open(loopback).await.unwrap();
        let pb_addr = pb.local_addr().unwrap();
        let start = Instant::now();
        for _ in 0..n {
            pa.send(pb_addr, syn("prod")).await.unwrap();
            pb.recv().await.unwrap();
        }
        let plain = start.elapsed() / n;
        eprintln!("one gossip datagram, send + receive: sealed {sealed:?}, plain UDP {plain:?}");
        assert!(sealed < Duration::from_millis(5), "{sealed:?} per datagram");
    }
}
