//! Agents fetching the bodies of large values from each other (see `gossip::payloads`), over
//! the node-to-node channel `service logs` uses: the same listener, the same frames sealed
//! with the cluster key, with their own associated data so a request of one kind never
//! opens as the other.
//!
//! The asker sends one sealed [`PayloadRequest`] naming a sha256; the node answers with one
//! sealed frame bound to the request's nonce: the body, or nothing when it does not hold it.
//! Any member may ask for any body: every member already receives every value through
//! gossip (a secret's body is the same sealed record gossip carried before), so the channel
//! shows nobody anything new; a non-member cannot open a request or an answer. What arrives
//! is checked against the signed manifest's size and digest before use.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::{io::AsyncReadExt, net::TcpStream};
use tracing::{debug, warn};

use super::peer_logs::{CONNECT_TIMEOUT, READ_TIMEOUT, open, seal, write_frame};
use crate::{
    agent::Agent,
    gossip::{
        auth::{GossipAuth, NONCE_LEN},
        payloads::{Due, Manifest, Store},
    },
};

/// How often the wanted bodies are looked at: a gossip round's time.
const FETCH_TICK: Duration = Duration::from_millis(100);

#[derive(Debug, Serialize, Deserialize)]
pub struct PayloadRequest {
    pub sha256: String,
}

pub(super) fn request_ad(cluster: &str) -> String {
    format!("{cluster}\0payload-request")
}

fn answer_ad(cluster: &str, nonce: &[u8; NONCE_LEN]) -> String {
    let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    format!("{cluster}\0payload-answer\0{hex}")
}

/// Answers one opened request with the body it names, if held.
pub(super) async fn answer(
    conn: &mut TcpStream,
    store: &Mutex<Store>,
    auth: &GossipAuth,
    request: &[u8],
    nonce: &[u8; NONCE_LEN],
) -> Result<()> {
    let req: PayloadRequest = serde_json::from_slice(request).context("a malformed request")?;
    let body = store.lock().expect("payloads lock").body(&req.sha256);
    let plain = body.as_deref().unwrap_or_default().as_bytes();
    let (_, sealed) = seal(auth, &answer_ad(auth.cluster(), nonce), plain)?;
    write_frame(conn, &sealed).await?;
    Ok(())
}

/// What sealing adds to a frame's plaintext (header, nonce, tag), with room to spare.
const SEAL_OVERHEAD: usize = 256;

/// The bytes the node at `addr` holds under `manifest`'s digest (the store checks them).
/// An answer longer than the manifest says is not even read: a hostile peer cannot make
/// this node allocate more than the body it asked for.
pub async fn fetch(auth: &GossipAuth, addr: SocketAddr, manifest: &Manifest) -> Result<Vec<u8>> {
    let sha256 = &manifest.sha256;
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .context("it did not answer in time")?
        .context("it cannot be reached")?;
    let req = serde_json::to_vec(&PayloadRequest {
        sha256: sha256.to_owned(),
    })?;
    let (nonce, sealed) = seal(auth, &request_ad(auth.cluster()), &req)?;
    write_frame(&mut conn, &sealed).await?;
    let frame = tokio::time::timeout(READ_TIMEOUT, async {
        let len = conn.read_u32().await? as usize;
        if len > manifest.len + SEAL_OVERHEAD {
            bail!("an answer of {len} bytes for a body of {}", manifest.len);
        }
        let mut frame = vec![0u8; len];
        conn.read_exact(&mut frame).await?;
        anyhow::Ok(frame)
    })
    .await
    .context("it stopped answering")??;
    let (body, _, _) = open(auth, &answer_ad(auth.cluster(), &nonce), frame)?;
    if body.is_empty() {
        bail!("it does not hold that body");
    }
    Ok(body)
}

/// Fetches the bodies this node's manifests name and it does not hold, until dropped.
pub async fn fetch_wanted(agent: Arc<Agent>, auth: Arc<GossipAuth>) {
    let Some(store) = agent.gossip.payloads().cloned() else {
        return;
    };
    let mut tick = tokio::time::interval(FETCH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let due = store.lock().expect("payloads lock").due(Instant::now());
        if due.is_empty() {
            continue;
        }
        let view = agent.view();
        for d in due {
            let addr =
                super::logs::peer_address(&view, &d.node).filter(|_| d.node != agent.node_name());
            let (agent, auth, store) = (agent.clone(), auth.clone(), store.clone());
            tokio::spawn(async move {
                let got = match addr {
                    Some(addr) => fetch(&auth, addr, &d.manifest).await,
                    None => Err(anyhow::anyhow!("no node-to-node address known")),
                };
                if take(&store, &d, got) {
                    agent.gossip.payload_arrived();
                }
            });
        }
    }
}

/// Stores what a fetch got; whether a body arrived.
fn take(store: &Mutex<Store>, d: &Due, got: Result<Vec<u8>>) -> bool {
    let Due {
        manifest: Manifest { sha256, len },
        node,
    } = d;
    let mut s = store.lock().expect("payloads lock");
    match got {
        Ok(bytes) => match s.arrived(&d.manifest, bytes, Instant::now()) {
            Ok(()) => {
                debug!(node, sha256, len, "fetched a large value's body");
                true
            }
            Err(r) => {
                warn!(
                    node,
                    sha256, "refused a large value's body from node {node}: {r}"
                );
                false
            }
        },
        Err(e) => {
            debug!(node, sha256, "fetching a large value's body failed: {e:#}");
            s.failed(&d.manifest, Instant::now());
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::peer_logs::read_frame;
    use super::*;
    use crate::gossip::keyring::{ClusterKey, Keyring};

    fn auth(cluster: &str, key: u8) -> Arc<GossipAuth> {
        let ring = Keyring::new(vec![ClusterKey::new(&[key; 32])]).unwrap();
        // The key file is only read again on a reload, which these tests do not do.
        Arc::new(GossipAuth::new(
            ring,
            std::path::Path::new("/nonexistent"),
            cluster,
        ))
    }

    /// A node serving its store on a local port, as `peer_logs::serve` does.
    async fn serving(store: Arc<Mutex<Store>>, auth: Arc<GossipAuth>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let frame = read_frame(&mut conn).await.unwrap();
                let Ok((plain, nonce, _)) = open(&auth, &request_ad(auth.cluster()), frame) else {
                    continue;
                };
                answer(&mut conn, &store, &auth, &plain, &nonce)
                    .await
                    .unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_member_fetches_a_body_and_the_store_checks_it() {
        let body: String = (0..40_000)
            .map(|i| (b'a' + (i % 26) as u8) as char)
            .collect();
        let mut server = Store::default();
        let manifest = Manifest::parse(&server.carry(&body).unwrap()).unwrap();
        let server = Arc::new(Mutex::new(server));
        let key = auth("c", 7);
        let addr = serving(server, key.clone()).await;

        let got = fetch(&key, addr, &manifest).await.unwrap();
        assert_eq!(got, body.as_bytes());
        let mut reader = Store::default();
        reader.arrived(&manifest, got, Instant::now()).unwrap();
        assert_eq!(
            reader.body(&manifest.sha256).as_deref(),
            Some(body.as_str())
        );

        let unknown = Manifest {
            sha256: "0".repeat(64),
            len: 40_000,
        };
        let err = fetch(&key, addr, &unknown).await.unwrap_err();
        assert!(format!("{err:#}").contains("does not hold"), "{err:#}");
        // A body longer than its manifest says is not read.
        let short = Manifest {
            len: 100,
            ..manifest.clone()
        };
        let err = fetch(&key, addr, &short).await.unwrap_err();
        assert!(format!("{err:#}").contains("an answer of"), "{err:#}");
    }

    #[tokio::test]
    async fn without_the_cluster_key_nothing_is_served() {
        let mut server = Store::default();
        let manifest = Manifest::parse(&server.carry(&"s".repeat(40_000)).unwrap()).unwrap();
        let addr = serving(Arc::new(Mutex::new(server)), auth("c", 7)).await;
        // Another key, and the right key for another cluster: neither opens the request.
        for outsider in [auth("c", 8), auth("other", 7)] {
            assert!(fetch(&outsider, addr, &manifest).await.is_err());
        }
    }

    #[test]
    fn a_peer_serving_wrong_bytes_is_refused_and_counted() {
        let body = "w".repeat(40_000);
        let manifest = Manifest::of(&body);
        let store = Mutex::new(Store::default());
        let due = Due {
            manifest: manifest.clone(),
            node: "liar".into(),
        };
        assert!(!take(&store, &due, Ok("x".repeat(40_000).into_bytes())));
        assert!(!take(&store, &due, Err(anyhow::anyhow!("gone"))));
        assert!(take(&store, &due, Ok(body.into_bytes())));
        let r = store.lock().unwrap().report();
        assert_eq!((r.refused, r.failed, r.fetched), (1, 1, 1));
    }
}
