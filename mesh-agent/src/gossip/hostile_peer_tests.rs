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
    start_carrying(name, seeds, auth, false).await
}

/// As [`start_with`], carrying large values outside gossip when `carry_payloads`.
async fn start_carrying(
    name: &str,
    seeds: Vec<String>,
    auth: Arc<GossipAuth>,
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
        tombstone_grace: Duration::from_secs(3600),
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

/// A member holding the cluster key writes values under another node's id, as gossip
/// relays do: chitchat takes them, but none reaches a snapshot, and each is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_forged_for_another_node_never_reach_a_snapshot() {
    let (victim, victim_addr, victim_auth) = start("victim", vec![]).await;
    let (peer, peer_addr, _) = start("peer", vec![victim_addr.to_string()]).await;
    peer.write([("ep:real".into(), Some("signed".into()))])
        .await;
    sees(&victim, "peer", "ep:real", "signed").await;
    let peer_state_at_victim = |key: &'static str| {
        let chitchat = victim.handle.chitchat();
        async move {
            let cc = chitchat.lock().await;
            let (_, state) = cc
                .node_states()
                .iter()
                .find(|(id, _)| &*id.node_id == "peer")
                .expect("the victim knows the peer");
            (state.max_version(), state.get(key).map(str::to_owned))
        }
    };
    let (max, _) = peer_state_at_victim("ep:real").await;

    let mallory = crate::identity::NodeIdentity::generate().unwrap();
    let forged = [
        // Signed by another key, in the peer's name.
        (
            "ep:forged".to_owned(),
            super::signed::seal(&mallory, "peer", peer.generation(), "ep:forged", "{}"),
        ),
        // Unsigned.
        ("obj:svc:evil".to_owned(), "{}".to_owned()),
        // The peer's own signed value, replayed under another key.
        (
            "ep:moved".to_owned(),
            super::signed::seal(&mallory, "peer", peer.generation(), "ep:real", "signed"),
        ),
    ];
    let mut ops = Vec::new();
    craft::node_op(&mut ops, "peer", peer.generation(), peer_addr, max);
    for (i, (k, v)) in forged.iter().enumerate() {
        craft::kv_op(&mut ops, k, v, max + 1 + i as u64);
    }
    let raw = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    send_sealed(&raw, victim_addr, &victim_auth, &craft::ack(&ops));
    let start = Instant::now();
    while peer_state_at_victim("ep:forged").await.1.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "chitchat never took the delta"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let snap = victim.snapshot().await;
    let peer_kv = &snap.nodes.iter().find(|n| n.name == "peer").unwrap().kv;
    for (k, _) in &forged {
        assert!(
            !peer_kv.contains_key(k),
            "{k} got into the snapshot: {peer_kv:?}"
        );
    }
    assert_eq!(peer_kv["ep:real"], "signed", "the peer's own values stay");
    assert_eq!(victim.origin_report().invalid_records, forged.len() as u64);
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
    let (reader, reader_addr) = start_carrying("reader", vec![], auth(), true).await;
    let (writer, _) = start_carrying("writer", vec![reader_addr.to_string()], auth(), true).await;
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
