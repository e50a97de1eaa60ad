//! Arbitrary bytes from a key holder, sealed and sent to a running gossip instance: the
//! sealed transport's open, `gossip::validate`, chitchat's decoding and its delta
//! application. The property: gossip never stops (chitchat's asserts are never reached).
#![no_main]

use std::{
    net::{SocketAddr, UdpSocket},
    path::Path,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use libfuzzer_sys::fuzz_target;
use mesh_agent::gossip::{
    Gossip, GossipConfig,
    auth::{GossipAuth, NONCE_LEN, seal},
    keyring::{ClusterKey, KEY_LEN, Keyring},
    transport::SealedTransport,
};

struct Victim {
    _rt: tokio::runtime::Runtime,
    gossip: Gossip,
    addr: SocketAddr,
    auth: Arc<GossipAuth>,
    raw: UdpSocket,
}

fn victim() -> &'static Victim {
    static V: OnceLock<Victim> = OnceLock::new();
    V.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let addr = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let ring = Keyring::new(vec![ClusterKey::new(&[7; KEY_LEN])]).unwrap();
        let auth = Arc::new(GossipAuth::new(ring, Path::new("/x"), "fuzz"));
        let config = GossipConfig {
            node: "victim".into(),
            cluster: "fuzz".into(),
            listen: addr,
            advertise: addr,
            seeds: vec![],
            interval: Duration::from_millis(50),
            phi_threshold: 8.0,
            dead_node_grace: Duration::from_secs(3600),
            tombstone_grace: Duration::from_secs(3600),
        };
        let gossip = rt
            .block_on(Gossip::start(
                &config,
                Arc::new(mesh_agent::identity::NodeIdentity::generate().unwrap()),
                None,
                vec![],
                &SealedTransport::new(auth.clone()),
            ))
            .unwrap();
        Victim {
            _rt: rt,
            gossip,
            addr,
            auth,
            raw: UdpSocket::bind("127.0.0.1:0").unwrap(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let v = victim();
    // chitchat's header, so most inputs reach its decoders.
    let mut plaintext = vec![0x53, 0xb0];
    plaintext.extend_from_slice(data);
    let ring = v.auth.keyring();
    let mut nonce = [0u8; NONCE_LEN];
    getrandom_nonce(&mut nonce);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut d = Vec::new();
    if seal(&ring, ring.primary().id, "fuzz", now, nonce, &plaintext, &mut d).is_err() {
        return;
    }
    let before = v.auth.report().received;
    let _ = v.raw.send_to(&d, v.addr);
    let deadline = Instant::now() + Duration::from_secs(1);
    while v.auth.report().received == before && Instant::now() < deadline {
        std::thread::yield_now();
    }
    // The gossip task is alive if it still answers: its state lock is free between
    // datagrams, and a panicked task leaves the termination watcher resolved.
    assert!(
        v._rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(1), v.gossip.stopped())
                .await
                .is_err()
        }),
        "gossip stopped"
    );
});

fn getrandom_nonce(nonce: &mut [u8; NONCE_LEN]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    // Unique per datagram is all the replay check needs.
    static N: AtomicU64 = AtomicU64::new(1);
    nonce[..8].copy_from_slice(&N.fetch_add(1, Ordering::Relaxed).to_le_bytes());
}
