//! The per-task listeners: a UDP loop and a TCP accept loop on sockets the agent bound inside
//! the task's network namespace, both answering through the shared [`Inner`].

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, timeout};
use tracing::{debug, warn};

use crate::answer::Transport;
use crate::request::{Decision, Inner, Scope};

/// Forwarded queries one listener may have waiting on upstreams. Past this the UDP loop stops
/// reading, and the kernel's socket buffer absorbs or drops the excess: one task flooding its
/// resolver cannot grow the agent's memory without bound.
const MAX_FORWARDS_IN_FLIGHT: usize = 256;

/// Open TCP connections per listener; further clients wait in the accept backlog.
const MAX_TCP_CONNECTIONS: usize = 32;

/// A TCP client that sends nothing for this long is disconnected (RFC 7766 §6.2.3 suggests
/// seconds, not minutes, for a server with many clients).
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after an unexpected socket error so that a persistent one does not spin a core.
const ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// A listener pair serving one task. Dropping it stops serving: both loops, the queries they
/// have in flight and open TCP connections end, and the sockets close.
pub struct ServeHandle {
    scope: Arc<RwLock<Scope>>,
    udp: JoinHandle<()>,
    tcp: JoinHandle<()>,
}

impl ServeHandle {
    /// Changes the networks this listener answers for (a task joined or left a network);
    /// the next query sees the new scope.
    pub fn set_scope(&self, scope: Scope) {
        *self.scope.write().unwrap_or_else(PoisonError::into_inner) = scope;
    }

    /// The networks this listener answers for.
    pub fn scope(&self) -> Scope {
        current(&self.scope)
    }
}

impl Drop for ServeHandle {
    fn drop(&mut self) {
        self.udp.abort();
        self.tcp.abort();
    }
}

fn current(scope: &RwLock<Scope>) -> Scope {
    scope.read().unwrap_or_else(PoisonError::into_inner).clone()
}

pub(crate) fn spawn(
    inner: Arc<Inner>,
    udp: UdpSocket,
    tcp: TcpListener,
    scope: Scope,
) -> ServeHandle {
    let scope = Arc::new(RwLock::new(scope));
    ServeHandle {
        udp: tokio::spawn(serve_udp(inner.clone(), udp, scope.clone())),
        tcp: tokio::spawn(serve_tcp(inner, tcp, scope.clone())),
        scope,
    }
}

async fn serve_udp(inner: Arc<Inner>, socket: UdpSocket, scope: Arc<RwLock<Scope>>) {
    let socket = Arc::new(socket);
    // Owned by this loop: aborting the loop drops the set, which aborts what is in flight.
    let mut forwards = JoinSet::new();
    // Large enough for any datagram, so an oversized one is read whole and judged, not cut.
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        while forwards.try_join_next().is_some() {}
        if forwards.len() >= MAX_FORWARDS_IN_FLIGHT {
            forwards.join_next().await;
            continue;
        }
        let (len, client) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                socket_error("udp receive", &error).await;
                continue;
            }
        };
        match inner.decide(&current(&scope), &buf[..len], Transport::Udp) {
            Decision::Drop => {}
            Decision::Reply(response) => send(&socket, &response, client).await,
            Decision::Forward(forward) => {
                let inner = inner.clone();
                let socket = socket.clone();
                forwards.spawn(async move {
                    let response = inner.forward(forward).await;
                    send(&socket, &response, client).await;
                });
            }
        }
    }
}

async fn send(socket: &UdpSocket, response: &[u8], client: SocketAddr) {
    if let Err(error) = socket.send_to(response, client).await {
        // The client is gone or its buffer is full; DNS over UDP is allowed to lose this.
        debug!(%client, %error, "could not send a DNS response");
    }
}

async fn serve_tcp(inner: Arc<Inner>, listener: TcpListener, scope: Arc<RwLock<Scope>>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_TCP_CONNECTIONS {
            connections.join_next().await;
            continue;
        }
        match listener.accept().await {
            Ok((stream, _)) => {
                connections.spawn(serve_connection(inner.clone(), stream, scope.clone()));
            }
            Err(error) => socket_error("tcp accept", &error).await,
        }
    }
}

/// One TCP client: length-prefixed queries answered in order until it goes quiet or away.
async fn serve_connection(inner: Arc<Inner>, mut stream: TcpStream, scope: Arc<RwLock<Scope>>) {
    loop {
        let Ok(Ok(len)) = timeout(TCP_IDLE_TIMEOUT, stream.read_u16()).await else {
            return;
        };
        let mut query = vec![0u8; usize::from(len)];
        let Ok(Ok(_)) = timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut query)).await else {
            return;
        };
        let response = match inner.decide(&current(&scope), &query, Transport::Tcp) {
            Decision::Drop => continue,
            Decision::Reply(response) => response,
            Decision::Forward(forward) => inner.forward(forward).await,
        };
        let Ok(len) = u16::try_from(response.len()) else {
            // encode_within keeps TCP answers within 65535 bytes; never send a broken frame.
            return;
        };
        let mut framed = Vec::with_capacity(response.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&response);
        if !matches!(
            timeout(TCP_IDLE_TIMEOUT, stream.write_all(&framed)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

async fn socket_error(what: &str, error: &io::Error) {
    match error.kind() {
        // Per-datagram or per-connection trouble; the socket itself is fine.
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionRefused
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::Interrupted => debug!(%error, "{what} failed"),
        _ => {
            warn!(%error, "{what} failed; retrying");
            sleep(ERROR_BACKOFF).await;
        }
    }
}
