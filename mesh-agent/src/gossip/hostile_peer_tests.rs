//! Two real gossip instances over sealed UDP on loopback, and a key holder sending them
//! what chitchat itself never sends.

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    Gossip, GossipConfig,
    auth::{GossipAuth, NONCE_LEN, seal},
    keyring::{ClusterKey, KEY_LEN, Keyring},
    transport::SealedTransport,
    validate::craft,
};
use mesh_api::v1::DropReason;

const CLUSTER: &str = "prod";

pub(super) fn auth() -> Arc<GossipAuth> {
    let ring = Keyring::new(vec![ClusterKey::new(&[7; KEY_LEN])]).unwrap();
    Arc::new(GossipAuth::new(ring, Path::new("/x"), CLUSTER))
}

fn free_port() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap()
}

async fn start(name: &str, seeds: Vec<String>) -> (Gossip, SocketAddr, Arc<GossipAuth>) {
    let a = auth();
    let (g, addr) = start_with(name, seeds, a.clone()).await;
    (g, addr, a)
}

/// A gossip instance on a free loopback port sealing with `auth`, its node record naming a
/// fresh node key (peers verify a node's values against the key its record names).
pub(super) async fn start_with(
    name: &str,
    seeds: Vec<String>,
    auth: Arc<GossipAuth>,
) -> (Gossip, SocketAddr) {
    // These tests check what crosses gossip itself, chunks included.
    start_configured(name, seeds, auth, Duration::from_secs(3600), false).await
}

/// As [`start_with`], forgetting deleted keys after `tombstone_grace`.
async fn start_with_grace(
    name: &str,
    seeds: Vec<String>,
    auth: Arc<GossipAuth>,
    tombstone_grace: Duration,
) -> (Gossip, SocketAddr) {
    start_configured(name, seeds, auth, tombstone_grace, false).await
}

/// As [`start_with`], carrying large values outside gossip.
async fn start_carrying(
    name: &str,
    seeds: Vec<String>,
    auth: Arc<GossipAuth>,
) -> (Gossip, SocketAddr) {
    start_configured(name, seeds, auth, Duration::from_secs(3600), true).await
}

async fn start_configured(
    name: &str,
    seeds: Vec<String>,
    auth: Arc<GossipAuth>,
    tombstone_grace: Duration,
    carry_payloads: bool,
) -> (Gossip, SocketAddr) {
    let addr = free_port();
    let config = GossipConfig {
        node: name.into(),
        cluster: CLUSTER.into(),
        listen: addr,
        advertise: addr,
        seeds,
        interval: Duration::from_millis(50),
        phi_threshold: 8.0,
        dead_node_grace: Duration::from_secs(3600),
        tombstone_grace,
        carry_payloads,
    };
    let id = Arc::new(crate::identity::NodeIdentity::generate().unwrap());
    let record = format!(r#"{{"key":"{}"}}"#, id.public());
    let initial = vec![("node".to_owned(), record)];
    let g = Gossip::start(
        &config,
        id,
        None,
        None,
        initial,
        &SealedTransport::new(auth.clone()),
    )
    .await
    .unwrap()
    .with_auth(auth);
    (g, addr)
}

/// Waits until `g`'s view of node `node`, live, has `key` = `value`; how long it took.
pub(super) async fn sees(g: &Gossip, node: &str, key: &str, value: &str) -> Duration {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let snap = g.snapshot().await;
        if snap
            .nodes
            .iter()
            .any(|n| n.name == node && n.live && n.kv.get(key).map(String::as_str) == Some(value))
        {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{key}={value} of {node} never arrived live");
}

fn send_sealed(raw: &std::net::UdpSocket, to: SocketAddr, a: &GossipAuth, plaintext: &[u8]) {
    let ring = a.keyring();
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut d = Vec::new();
    seal(
        &ring,
        ring.primary().id,
        CLUSTER,
        now,
        nonce,
        plaintext,
        &mut d,
    )
    .unwrap();
    raw.send_to(&d, to).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_deltas_and_digests_are_dropped_and_gossip_goes_on() {
    let (victim, victim_addr, victim_auth) = start("victim", vec![]).await;
    let (peer, _, _) = start("peer", vec![victim_addr.to_string()]).await;
    let stopped = victim.stopped();
    tokio::pin!(stopped);

    // A value several datagrams large crosses as chunks; a small key written after it
    // is not stuck behind it.
    let big: String = (0..300_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    peer.write([("obj:config:big".into(), Some(big.clone()))])
        .await;
    peer.write([("ep:small".into(), Some("after".into()))])
        .await;
    let small = sees(&victim, "peer", "ep:small", "after").await;
    sees(&victim, "peer", "obj:config:big", &big).await;
    eprintln!("a small key written after a 300 KB value arrived in {small:?}");
    assert_eq!(
        victim_auth.dropped(DropReason::Invalid),
        0,
        "chitchat's own traffic, chunks included, passes validation"
    );
    // Removing the value removes every chunk, here and at the peer.
    peer.write([("obj:config:big".into(), None)]).await;
    let raw_keys = |g: &Gossip| {
        let chitchat = g.handle.chitchat();
        async move {
            let mut cc = chitchat.lock().await;
            cc.self_node_state()
                .key_values()
                .filter(|(_, v)| !super::signed::is_deletion(v))
                .map(|(k, _)| k.to_owned())
                .collect::<Vec<_>>()
        }
    };
    let left = raw_keys(&peer).await;
    assert!(!left.iter().any(|k| k.contains("big")), "{left:?}");
    let start = Instant::now();
    while victim
        .snapshot()
        .await
        .nodes
        .iter()
        .any(|n| n.kv.contains_key("obj:config:big"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "removal never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let raw = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let phantom: SocketAddr = "127.0.0.1:9".parse().unwrap();
    // A digest naming one unknown node (valid: chitchat creates its state) ...
    send_sealed(
        &raw,
        victim_addr,
        &victim_auth,
        &craft::syn_naming(CLUSTER, ["x".to_owned()].into_iter(), phantom),
    );
    // ... then a delta for it with SetMaxVersion after a key-value: chitchat 0.13 would
    // assert (max_version 1 < 5) inside the gossip task.
    let mut ops = Vec::new();
    craft::node_op(&mut ops, "x", 1, phantom, 0);
    craft::kv_op(&mut ops, "k", "v", 5);
    craft::max_version_op(&mut ops, 1);
    send_sealed(&raw, victim_addr, &victim_auth, &craft::ack(&ops));
    // And a digest of 10,000 phantom nodes.
    send_sealed(
        &raw,
        victim_addr,
        &victim_auth,
        &craft::syn_naming(CLUSTER, (0..10_000).map(|i| format!("ph{i}")), phantom),
    );

    peer.write([("ep:later".into(), Some("still gossiping".into()))])
        .await;
    tokio::select! {
        _ = sees(&victim, "peer", "ep:later", "still gossiping") => {}
        e = &mut stopped => panic!("the victim's gossip ended: {e:#}"),
    }
    assert_eq!(victim_auth.dropped(DropReason::Invalid), 2);
    let nodes = victim.snapshot().await.nodes.len();
    assert!(nodes <= 3, "{nodes} nodes: phantoms got in");
    peer.shutdown().await.unwrap();
    victim.shutdown().await.unwrap();
}

/// The version at which `g` holds `node`'s `key`, and its envelope.
async fn held(g: &Gossip, node: &str, key: &str) -> Option<(u64, String)> {
    let chitchat = g.handle.chitchat();
    let cc = chitchat.lock().await;
    let (_, state) = cc
        .node_states()
        .iter()
        .find(|(id, _)| &*id.node_id == node)?;
    state
        .get_versioned(key)
        .map(|v| (v.version, v.value.clone()))
}

/// `node`'s max version and last GC version as `g` holds them.
async fn versions_at(g: &Gossip, node: &str) -> (u64, u64) {
    let chitchat = g.handle.chitchat();
    let cc = chitchat.lock().await;
    let (_, state) = cc
        .node_states()
        .iter()
        .find(|(id, _)| &*id.node_id == node)
        .expect("known");
    (state.max_version(), state.last_gc_version())
}

/// Sends each datagram and waits for the victim to drop it as invalid.
async fn refused_each(victim_addr: SocketAddr, a: &GossipAuth, datagrams: &[(&str, Vec<u8>)]) {
    let raw = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for (what, d) in datagrams {
        let before = a.dropped(DropReason::Invalid);
        send_sealed(&raw, victim_addr, a, d);
        let start = Instant::now();
        while a.dropped(DropReason::Invalid) == before {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "not refused: {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A member holding the cluster key relays another node's run with what that node never
/// wrote: values it did not sign, its own values moved to another key or raised to a higher
/// version, a max version or a GC version past any it signed, an unsigned tombstone, a
/// signed value marked deleted. The transport drops each datagram before chitchat sees it
/// (counted as invalid): chitchat's versions for the node do not move, nothing reaches a
/// snapshot, and the node's later writes still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_values_and_versions_never_reach_chitchat() {
    let (victim, victim_addr, victim_auth) = start("victim", vec![]).await;
    let (peer, peer_addr, _) = start("peer", vec![victim_addr.to_string()]).await;
    peer.write([("ep:real".into(), Some("signed".into()))])
        .await;
    sees(&victim, "peer", "ep:real", "signed").await;
    let before = versions_at(&victim, "peer").await;
    let (max, _) = before;
    let (version, envelope) = held(&victim, "peer", "ep:real").await.unwrap();
    let g = peer.generation();
    let next = max + 1;
    let mallory = crate::identity::NodeIdentity::generate().unwrap();
    let one = |key: &str, value: &str, version: u64, status: u8| {
        let mut ops = Vec::new();
        craft::node_op(&mut ops, "peer", g, peer_addr, max);
        craft::kv_op_status(&mut ops, key, value, version, status);
        craft::ack(&ops)
    };
    let mut max_op = Vec::new();
    craft::node_op(&mut max_op, "peer", g, peer_addr, max);
    craft::max_version_op(&mut max_op, 1 << 40);
    let mut reset = Vec::new();
    craft::node_op_gc(&mut reset, "peer", g, peer_addr, 1 << 40, 0);
    craft::kv_op(&mut reset, "ep:real", &envelope, version);
    let signed = |key: &str, value: &str, at: u64| {
        super::signed::seal(peer.identity(), "peer", g, key, at, value)
    };
    let mallorys = super::signed::seal(&mallory, "peer", g, "ep:forged", next, "{}");
    let forged = [
        (
            "signed by another key",
            one("ep:forged", &mallorys, next, 0),
        ),
        ("unsigned", one("obj:svc:evil", "{}", next, 0)),
        (
            "the node's own value at a raised version",
            one("ep:real", &envelope, 1 << 40, 0),
        ),
        (
            "the node's own value under another key",
            one("ep:moved", &envelope, next, 0),
        ),
        ("an unsigned tombstone", one("ep:real", "", 1 << 40, 1)),
        (
            "a signed value marked deleted",
            one("ep:x", &signed("ep:x", "{}", next), next, 2),
        ),
        ("a max version past any signed", craft::ack(&max_op)),
        (
            "a reset to a GC version past any signed",
            craft::ack(&reset),
        ),
    ];
    refused_each(victim_addr, &victim_auth, &forged).await;
    assert_eq!(versions_at(&victim, "peer").await, before);
    assert!(held(&victim, "peer", "ep:forged").await.is_none());
    // The same kinds of ops, signed by the node at the versions they carry, pass.
    let d = super::signed::seal_deletion(peer.identity(), "peer", g, "ep:real", next);
    let honest = one("ep:real", &d, next, 2);
    let raw = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    send_sealed(&raw, victim_addr, &victim_auth, &honest);
    let start = Instant::now();
    while versions_at(&victim, "peer").await.0 != next {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "an honest deletion refused"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        victim_auth.dropped(DropReason::Invalid),
        forged.len() as u64
    );
    // The node is still heard: its next writes (past the version just taken) arrive.
    peer.write([
        ("ep:real".into(), None),
        ("ep:later".into(), Some("heard".into())),
    ])
    .await;
    sees(&victim, "peer", "ep:later", "heard").await;
    assert_eq!(victim.origin_report().invalid_records, 0);
    assert_eq!(
        victim_auth.dropped(DropReason::Invalid),
        forged.len() as u64
    );
    peer.shutdown().await.unwrap();
    victim.shutdown().await.unwrap();
}

/// Waits until `g`'s view of the peer has `kept` but not `gone`.
async fn gone(g: &Gossip, gone: &str, kept: &str) {
    let start = Instant::now();
    loop {
        let snap = g.snapshot().await;
        let n = snap.nodes.iter().find(|n| n.name == "peer");
        if n.is_some_and(|n| n.kv.contains_key(kept) && !n.kv.contains_key(gone)) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{gone} never went"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What honest relays send once chitchat has forgotten deleted keys passes the version
/// check: a node's deletions reach its peers, and a node joining after the tombstones are
/// gone (a grace of 300 ms here) learns the node's state whole — several datagrams of it, so
/// a reset over several rounds — from it and from a relay, with nothing dropped anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_gossip_after_tombstones_are_forgotten_passes() {
    let grace = Duration::from_millis(300);
    let (victim_auth, peer_auth, joiner_auth) = (auth(), auth(), auth());
    let (victim, victim_addr) =
        start_with_grace("victim", vec![], victim_auth.clone(), grace).await;
    let (peer, _) = start_with_grace(
        "peer",
        vec![victim_addr.to_string()],
        peer_auth.clone(),
        grace,
    )
    .await;
    let big: String = (0..300_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    peer.write([
        ("ep:a".into(), Some("a".into())),
        ("ep:b".into(), Some("b".into())),
        ("obj:config:big".into(), Some(big.clone())),
    ])
    .await;
    sees(&victim, "peer", "obj:config:big", &big).await;
    peer.write([("ep:a".into(), None)]).await;
    gone(&victim, "ep:a", "ep:b").await;
    // Past the grace, every node has forgotten the tombstone.
    tokio::time::sleep(grace * 4).await;
    let (_, gc) = versions_at(&victim, "peer").await;
    assert!(gc > 0, "the victim forgot the tombstone");
    let (joiner, _) = start_with_grace(
        "joiner",
        vec![victim_addr.to_string()],
        joiner_auth.clone(),
        grace,
    )
    .await;
    sees(&joiner, "peer", "obj:config:big", &big).await;
    gone(&joiner, "ep:a", "ep:b").await;
    let (_, adopted) = versions_at(&joiner, "peer").await;
    assert_eq!(adopted, gc, "the joiner took the relays' reset");
    // And the node's writes after that still arrive everywhere.
    peer.write([("ep:b".into(), None), ("ep:c".into(), Some("c".into()))])
        .await;
    sees(&joiner, "peer", "ep:c", "c").await;
    sees(&victim, "peer", "ep:c", "c").await;
    for (who, a) in [
        ("victim", &victim_auth),
        ("peer", &peer_auth),
        ("joiner", &joiner_auth),
    ] {
        assert_eq!(
            a.dropped(DropReason::Invalid),
            0,
            "{who}: {:?}",
            a.report().dropped
        );
    }
    for g in [&victim, &joiner] {
        assert_eq!(g.origin_report().invalid_records, 0);
    }
    joiner.shutdown().await.unwrap();
    peer.shutdown().await.unwrap();
    victim.shutdown().await.unwrap();
}

/// Another agent under a name already bound to a key is refused whole, and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_under_a_taken_name_is_refused() {
    let (victim, victim_addr, _) = start("victim", vec![]).await;
    let (peer, _, _) = start("peer", vec![victim_addr.to_string()]).await;
    peer.write([("ep:real".into(), Some("first".into()))]).await;
    sees(&victim, "peer", "ep:real", "first").await;
    // Same name, its own (other) key pair.
    let (impostor, _, _) = start("peer", vec![victim_addr.to_string()]).await;
    impostor
        .write([("ep:real".into(), Some("impostor".into()))])
        .await;
    let start = Instant::now();
    // Values are checked as snapshots are taken.
    while victim.snapshot().await.nodes.len() < 2 || victim.origin_report().impostors == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = victim.take_impostors();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].generation, impostor.generation());
    assert_eq!(refused[0].pinned, peer.public_key());
    let snap = victim.snapshot().await;
    let peers: Vec<_> = snap.nodes.iter().filter(|n| n.name == "peer").collect();
    assert_eq!(
        peers.len(),
        1,
        "only the first key's run is in the snapshot"
    );
    assert_eq!(peers[0].generation, peer.generation());
    impostor.shutdown().await.unwrap();
    peer.shutdown().await.unwrap();
    victim.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_end_of_the_gossip_task_is_reported() {
    let (g, _, _) = start("solo", vec![]).await;
    let stopped = g.stopped();
    g.handle.abort();
    let e = tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("reported");
    assert!(format!("{e:#}").contains("gossip stopped"), "{e:#}");
}

/// One fuzz input: a datagram a key holder sends, either chitchat-shaped ops about nodes the
/// victim knows (where chitchat's asserts live) or raw bytes after chitchat's header.
#[derive(Clone, Debug)]
enum Input {
    Ops(Vec<(u8, u8, u64)>),
    Raw(u8, Vec<u8>),
}

fn encode(input: &Input, phantom: SocketAddr) -> Vec<u8> {
    match input {
        Input::Ops(ops) => {
            let mut b = Vec::new();
            for (kind, node, n) in ops {
                match kind % 3 {
                    0 => craft::node_op(&mut b, &format!("f{}", node % 3), 1, phantom, *n % 16),
                    1 => craft::kv_op(&mut b, &format!("k{node}"), "v", *n % 32),
                    _ => craft::max_version_op(&mut b, *n % 32),
                }
            }
            craft::ack(&b)
        }
        Input::Raw(t, body) => {
            let mut b = craft::header(*t % 5, 0);
            b.extend(body);
            b
        }
    }
}

/// The sealed transport's open, the validation and chitchat's decoding and delta
/// application, fed a few thousand hostile datagrams (what `fuzz/fuzz_targets/
/// gossip_datagram.rs` does without end): the victim never stops gossiping.
#[test]
fn hostile_datagrams_never_stop_gossip() {
    use proptest::prelude::*;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (victim, victim_addr, victim_auth) = rt.block_on(start("victim", vec![]));
    let (peer, _, _) = rt.block_on(start("peer", vec![victim_addr.to_string()]));
    let stopped = victim.stopped();
    let raw = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let phantom: SocketAddr = "127.0.0.1:9".parse().unwrap();
    // Nodes the fuzzed deltas name, so chitchat applies them.
    send_sealed(
        &raw,
        victim_addr,
        &victim_auth,
        &craft::syn_naming(CLUSTER, (0..3).map(|i| format!("f{i}")), phantom),
    );
    let op = (any::<u8>(), any::<u8>(), any::<u64>());
    let input = prop_oneof![
        proptest::collection::vec(op, 0..12).prop_map(Input::Ops),
        (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(t, b)| Input::Raw(t, b)),
    ];
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(3000));
    runner
        .run(&input, |input| {
            let before = victim_auth.report().received;
            send_sealed(&raw, victim_addr, &victim_auth, &encode(&input, phantom));
            // One at a time, so the socket buffer never drops any.
            let deadline = Instant::now() + Duration::from_secs(2);
            while victim_auth.report().received == before && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(100));
            }
            Ok(())
        })
        .unwrap();
    let report = victim_auth.report();
    eprintln!("dropped: {:?}", report.dropped);
    assert!(report.dropped["invalid"] > 0);
    rt.block_on(async {
        peer.write([("ep:after".into(), Some("fuzz".into()))]).await;
        tokio::select! {
            _ = sees(&victim, "peer", "ep:after", "fuzz") => {}
            e = stopped => panic!("the victim's gossip ended: {e:#}"),
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_value_crosses_as_a_manifest_and_only_its_true_body_is_shown() {
    let (reader, reader_addr) = start_carrying("reader", vec![], auth()).await;
    let (writer, _) = start_carrying("writer", vec![reader_addr.to_string()], auth()).await;
    let big: String = (0..300_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    writer
        .write([("obj:config:big".into(), Some(big.clone()))])
        .await;
    writer
        .write([("ep:small".into(), Some("after".into()))])
        .await;
    let small = sees(&reader, "writer", "ep:small", "after").await;
    eprintln!("a small key written after a 300 KB value arrived in {small:?}");

    // In gossip: a signed manifest of under a hundred bytes, no chunks.
    let raw: Vec<(String, usize)> = {
        let chitchat = writer.handle.chitchat();
        let mut cc = chitchat.lock().await;
        cc.self_node_state()
            .key_values()
            .map(|(k, v)| (k.to_owned(), v.len()))
            .collect()
    };
    assert!(raw.iter().all(|(k, _)| !k.starts_with("chunk:")), "{raw:?}");
    let manifest = raw.iter().find(|(k, _)| k == "obj:config:big").unwrap();
    assert!(manifest.1 < 300, "{raw:?}");
    assert_eq!(
        writer.own_keys().await["obj:config:big"],
        big,
        "the writer reads its own value whole"
    );

    // The reader sees no key until it holds the body, and wants it from the writer.
    async fn has_big(g: &Gossip) -> bool {
        g.snapshot()
            .await
            .nodes
            .iter()
            .any(|n| n.name == "writer" && n.kv.contains_key("obj:config:big"))
    }
    assert!(!has_big(&reader).await, "not shown before its body is here");
    let store = reader.payloads().unwrap().clone();
    let due = store.lock().unwrap().due(Instant::now());
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(due[0].node, "writer");
    let m = due[0].manifest.clone();

    // A forged body is refused and leaves the key out; the true one shows it.
    let before = reader.fingerprint().await;
    let mut forged = big.clone().into_bytes();
    forged[1000] = b'!';
    assert!(
        store
            .lock()
            .unwrap()
            .arrived(&m, forged, Instant::now())
            .is_err()
    );
    assert!(!has_big(&reader).await);
    let body = writer.payloads().unwrap().lock().unwrap().body(&m.sha256);
    let body = body.unwrap().as_bytes().to_vec();
    store
        .lock()
        .unwrap()
        .arrived(&m, body, Instant::now())
        .unwrap();
    assert_ne!(
        reader.fingerprint().await,
        before,
        "an arrival makes the agent compute its view again"
    );
    sees(&reader, "writer", "obj:config:big", &big).await;
    assert_eq!(store.lock().unwrap().report().refused, 1);
}

/// Every raw key a node holds of its own is signed at the version chitchat holds it at
/// (values, chunks, manifests and deletions alike), and its newest version is a live value
/// (the stamp after deletions): what lets relays never tell a version nothing proves.
#[tokio::test]
async fn every_own_key_is_signed_at_its_version_and_the_newest_is_live() {
    let (g, _, _) = start("solo", vec![]).await;
    let big: String = "y".repeat(40_000);
    g.write([
        ("ep:a".into(), Some("a".into())),
        ("obj:config:big".into(), Some(big.clone())),
    ])
    .await;
    // Replaced by a smaller chunked value (fewer chunks: the rest deleted), then removed.
    g.write([("obj:config:big".into(), Some("z".repeat(20_000)))])
        .await;
    g.write([("ep:a".into(), None), ("obj:config:big".into(), None)])
        .await;
    let chitchat = g.handle.chitchat();
    let mut cc = chitchat.lock().await;
    let state = cc.self_node_state();
    let key = g.public_key();
    let mut deletions = 0;
    let mut newest = (0, String::new());
    for (k, v) in state.key_values_including_deleted() {
        let opened = super::signed::open(&key, "solo", g.generation(), k, v.version, &v.value);
        let opened = opened.unwrap_or_else(|e| panic!("{k} at {}: {e:?}", v.version));
        if opened.is_none() {
            deletions += 1;
        }
        if v.version > newest.0 {
            newest = (v.version, k.to_owned());
        }
    }
    assert!(
        deletions >= 4,
        "ep:a, the manifest and its chunks: {deletions}"
    );
    assert_eq!(newest.0, state.max_version());
    assert_eq!(newest.1, super::STAMP);
    assert_eq!(super::live(state, super::STAMP), Some(""));
    drop(cc);
    assert!(g.own_keys().await.keys().all(|k| k == "node"));
}
