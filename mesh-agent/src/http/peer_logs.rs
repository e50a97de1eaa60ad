//! Agents reading each other's task output, for `service logs` (and fetching the bodies of
//! large values, see `peer_payloads`): a TCP listener on the node's
//! address and gossip port number, speaking frames sealed with the cluster key.
//!
//! ```text
//!  | length (u32, big endian) | sealed frame (gossip::auth format) |
//! ```
//!
//! The asker sends one [`PeerRequest`]; the node answers with frames of [`LogEvent`]s and an
//! empty frame at the end. Frames are XChaCha20-Poly1305 sealed as gossip datagrams are, with
//! the cluster name and a direction in the associated data, and the answer's also bound to the
//! request's nonce: without the key nobody on the underlay can ask, read an answer, or splice
//! frames of one answer into another. A request older than the replay window is refused. A
//! cluster without a key has no such listener: its agents read only their own tasks.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use futures_util::{StreamExt, stream::BoxStream};
use mesh_api::v1::{LogEvent, LogsQuery};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, warn};

use crate::{
    agent::Agent,
    gossip::auth::{self, GossipAuth, NONCE_LEN, REPLAY_WINDOW},
};

/// Bounds what one frame may make the reader allocate: a full batch of the longest lines,
/// even if every byte is a control character JSON writes as `\u00XX`, fits.
const MAX_FRAME: usize = 8 << 20;
/// How long a node may take to accept and to send each frame of a finite answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines sent together in one frame at most.
const BATCH: usize = 64;
const _: () = assert!(BATCH * crate::task::MAX_LOG_LINE * 6 + (1 << 20) <= MAX_FRAME);
/// What `reserved_ports` calls the listener, so peers find its port.
pub const USED_BY: &str = crate::agent::PEER_API_USED_BY;

/// What one agent asks another.
#[derive(Debug, Serialize, Deserialize)]
pub struct PeerRequest {
    pub service: String,
    /// Only these tasks (full ids); every task of the service on the node if empty.
    pub tasks: Vec<String>,
    pub query: LogsQuery,
}

fn request_ad(cluster: &str) -> String {
    format!("{cluster}\0logs-request")
}

fn answer_ad(cluster: &str, nonce: &[u8; NONCE_LEN]) -> String {
    let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    format!("{cluster}\0logs-answer\0{hex}")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(super) fn seal(
    auth: &GossipAuth,
    ad: &str,
    plaintext: &[u8],
) -> Result<([u8; NONCE_LEN], Vec<u8>)> {
    let ring = auth.keyring();
    let nonce: [u8; NONCE_LEN] = rand::random();
    let mut out = Vec::new();
    auth::seal(
        &ring,
        ring.primary().id,
        ad,
        now_ms(),
        nonce,
        plaintext,
        &mut out,
    )
    .map_err(|r| anyhow::anyhow!("sealing a frame: {r:?}"))?;
    Ok((nonce, out))
}

/// Opens a frame; returns its plaintext, nonce and time.
pub(super) fn open(
    auth: &GossipAuth,
    ad: &str,
    mut frame: Vec<u8>,
) -> Result<(Vec<u8>, [u8; NONCE_LEN], u64)> {
    let opened = auth::open(&auth.keyring(), ad, &mut frame)
        .map_err(|r| anyhow::anyhow!("a frame that does not open with the cluster key ({r:?})"))?;
    Ok((
        frame[opened.plaintext].to_vec(),
        opened.nonce,
        opened.timestamp_ms,
    ))
}

pub(super) async fn write_frame(
    s: &mut (impl AsyncWriteExt + Unpin),
    frame: &[u8],
) -> std::io::Result<()> {
    s.write_all(&(frame.len() as u32).to_be_bytes()).await?;
    s.write_all(frame).await
}

pub(super) async fn read_frame(s: &mut (impl AsyncReadExt + Unpin)) -> Result<Vec<u8>> {
    let len = s.read_u32().await? as usize;
    if len > MAX_FRAME {
        bail!("a frame of {len} bytes (at most {MAX_FRAME})");
    }
    let mut frame = vec![0u8; len];
    s.read_exact(&mut frame).await?;
    Ok(frame)
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the node-to-node API on tcp {addr}"))
}

/// Answers peers until the future is dropped.
pub async fn serve(listener: TcpListener, agent: Arc<Agent>, auth: Arc<GossipAuth>) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("node-to-node API: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (agent, auth) = (agent.clone(), auth.clone());
        tokio::spawn(async move {
            if let Err(e) = answer(conn, &agent, &auth).await {
                debug!(%peer, "node-to-node API: {e:#}");
            }
        });
    }
}

async fn answer(mut conn: TcpStream, agent: &Agent, auth: &GossipAuth) -> Result<()> {
    let frame = tokio::time::timeout(READ_TIMEOUT, read_frame(&mut conn))
        .await
        .context("no request in time")??;
    // A fetch of a large value's body (`peer_payloads`) or a logs request: each kind opens
    // only under its own associated data.
    let payload_ad = super::peer_payloads::request_ad(auth.cluster());
    let (payload, (plain, nonce, sent_ms)) = match open(auth, &payload_ad, frame.clone()) {
        Ok(opened) => (true, opened),
        Err(_) => (false, open(auth, &request_ad(auth.cluster()), frame)?),
    };
    if now_ms().abs_diff(sent_ms) > REPLAY_WINDOW.as_millis() as u64 {
        bail!("a request from {sent_ms} ms: outside the replay window");
    }
    if payload {
        let store = agent
            .gossip
            .payloads()
            .context("a request for a large value's body: this node carries none")?;
        return super::peer_payloads::answer(&mut conn, store, auth, &plain, &nonce).await;
    }
    let req: PeerRequest = serde_json::from_slice(&plain).context("a malformed request")?;
    let ad = answer_ad(auth.cluster(), &nonce);
    let (mut rd, mut wr) = conn.into_split();
    let mut events =
        super::logs::local_events(agent, &req.service, &req.tasks, &req.query).ready_chunks(BATCH);
    let mut probe = [0u8; 1];
    loop {
        tokio::select! {
            // The asker closing (its client went away) ends a followed stream at once.
            _ = rd.read(&mut probe) => return Ok(()),
            batch = events.next() => {
                let batch = batch.unwrap_or_default();
                let (_, sealed) = seal(auth, &ad, &serde_json::to_vec(&batch)?)?;
                write_frame(&mut wr, &sealed).await?;
                if batch.is_empty() {
                    return Ok(());
                }
            }
        }
    }
}

/// The output of `req`'s tasks on the node at `addr`, as it arrives. Any failure ends the
/// stream with a warning naming the node.
pub fn ask(
    auth: Arc<GossipAuth>,
    node: String,
    addr: SocketAddr,
    req: PeerRequest,
) -> BoxStream<'static, LogEvent> {
    let follow = req.query.follow;
    let warn = move |node: &str, e: anyhow::Error| {
        LogEvent::Warning(format!(
            "the logs of tasks on node {node} ({addr}) are left out: {e:#}"
        ))
    };
    let start = async move {
        let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .context("it did not answer in time")?
            .context("it cannot be reached")?;
        let (nonce, sealed) = seal(
            &auth,
            &request_ad(auth.cluster()),
            &serde_json::to_vec(&req)?,
        )?;
        write_frame(&mut conn, &sealed).await?;
        anyhow::Ok((conn, answer_ad(auth.cluster(), &nonce), auth))
    };
    futures_util::stream::once(start)
        .flat_map(move |started| {
            let node = node.clone();
            match started {
                Err(e) => futures_util::stream::iter(vec![warn(&node, e)]).boxed(),
                Ok((conn, ad, auth)) => futures_util::stream::unfold(Some(conn), move |conn| {
                    let (ad, auth, node) = (ad.clone(), auth.clone(), node.clone());
                    async move {
                        let mut conn = conn?;
                        let frame = if follow {
                            read_frame(&mut conn).await
                        } else {
                            tokio::time::timeout(READ_TIMEOUT, read_frame(&mut conn))
                                .await
                                .unwrap_or_else(|_| Err(anyhow::anyhow!("it stopped answering")))
                        };
                        let batch =
                            frame
                                .and_then(|f| open(&auth, &ad, f))
                                .and_then(|(plain, _, _)| {
                                    serde_json::from_slice::<Vec<LogEvent>>(&plain)
                                        .context("a malformed answer")
                                });
                        match batch {
                            Ok(b) if b.is_empty() => None,
                            Ok(b) => Some((futures_util::stream::iter(b), Some(conn))),
                            Err(e) => {
                                Some((futures_util::stream::iter(vec![warn(&node, e)]), None))
                            }
                        }
                    }
                })
                .flatten()
                .boxed(),
            }
        })
        .boxed()
}
