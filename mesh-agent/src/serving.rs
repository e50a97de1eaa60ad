//! HTTP serving with limits, for the API socket, the UI and the metrics listener: what a
//! slow, greedy or hostile client can hold is bounded, and it is told why it was refused.
//!
//! - connections: at most `max_connections` at once; the next is answered 503 and closed;
//! - headers: a request's head must arrive within `header_timeout`, which also closes a
//!   keep-alive connection idle that long (slowloris);
//! - bodies: at most `max_body` bytes (413, before reading it when Content-Length says so);
//! - streams (logs, events, the UI's live page): at most [`MAX_STREAMS`] open at once, each
//!   holding a [`StreamPermit`].

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Request},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tracing::{debug, warn};

/// Log follows, event streams and UI pages open at once on one listener.
pub const MAX_STREAMS: usize = 64;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub max_body: usize,
}

impl Limits {
    /// The API socket: objects (secrets, configs up to 500 KB, base64 in JSON) and whole
    /// stacks fit; `meshctl` opens a connection per command.
    pub const API: Self = Self {
        max_connections: 256,
        header_timeout: Duration::from_secs(10),
        max_body: 8 << 20,
    };
    /// The UI and metrics listeners: GET only, reachable over the network.
    pub const READ_ONLY: Self = Self {
        max_connections: 64,
        header_timeout: Duration::from_secs(10),
        max_body: 16 << 10,
    };
}

/// An error answer in the API's shape (`{"error": …}`).
pub fn refuse(status: StatusCode, error: String) -> Response {
    (status, Json(mesh_api::v1::ApiError { error })).into_response()
}

/// Applies the body limit to `router`: a declared oversized body is refused before it is
/// read, an undeclared (chunked) one as soon as it passes the limit, both with a JSON error.
pub fn with_body_limit(router: Router, max_body: usize) -> Router {
    with_body_limit_shaped(router, max_body, refuse)
}

/// An error answer of one listener's API: mesh's `{"error": …}` or Docker's
/// `{"message": …}`.
pub type Refuse = fn(StatusCode, String) -> Response;

/// [`with_body_limit`] with the listener's own error shape.
pub fn with_body_limit_shaped(router: Router, max_body: usize, refuse: Refuse) -> Router {
    router
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            check_body(req, next, max_body, refuse)
        }))
        .layer(DefaultBodyLimit::max(max_body))
}

async fn check_body(req: Request, next: Next, max_body: usize, refuse: Refuse) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_big = |size: String| {
        refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body ({size}) is larger than this listener accepts ({max_body} \
                 bytes); secrets and configs are limited to 500 KB each"
            ),
        )
    };
    if let Some(n) = declared.filter(|n| *n > max_body as u64) {
        return too_big(format!("{n} bytes"));
    }
    let res = next.run(req).await;
    if res.status() == StatusCode::PAYLOAD_TOO_LARGE
        && res.headers().get(header::CONTENT_TYPE) != Some(&"application/json".parse().unwrap())
    {
        return too_big("more".into());
    }
    res
}

/// Counts open streams of one listener.
#[derive(Clone)]
pub struct Streams(Arc<Semaphore>);

impl Default for Streams {
    fn default() -> Self {
        Self(Arc::new(Semaphore::new(MAX_STREAMS)))
    }
}

/// Held by an open stream; dropping the stream frees its place.
pub struct StreamPermit(#[allow(dead_code)] OwnedSemaphorePermit);

impl Streams {
    /// A place for one more stream, or the 503 that says why there is none.
    pub fn open(&self, what: &str) -> Result<StreamPermit, Box<Response>> {
        let Ok(permit) = self.0.clone().try_acquire_owned() else {
            return Err(Box::new(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "too many open streams on this agent ({MAX_STREAMS} log, event and page \
                     streams at once): close one (a `meshctl logs -f` or `events`) and retry \
                     this {what}"
                ),
            )));
        };
        Ok(StreamPermit(permit))
    }
}

/// Wraps a stream so it holds `permit` while it lives.
pub fn holding<S: futures_util::Stream + Send + 'static>(
    stream: S,
    permit: StreamPermit,
) -> impl futures_util::Stream<Item = S::Item> + Send + 'static {
    use futures_util::StreamExt;
    stream.map(move |item| {
        let _ = &permit;
        item
    })
}

/// Who is on the other end of an API connection, from the socket (SO_PEERCRED), set by
/// [`serve`].
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub uid: Option<u32>,
}

/// Something that accepts connections: a TCP or a unix listener.
pub trait Accept {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection and what the router should know of its peer.
    fn accept(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Io, Option<Peer>)>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<(Self::Io, Option<Peer>)> {
        let (s, _) = tokio::net::TcpListener::accept(self).await?;
        Ok((s, None))
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<(Self::Io, Option<Peer>)> {
        let (s, _) = tokio::net::UnixListener::accept(self).await?;
        let peer = Peer {
            uid: s.peer_cred().ok().map(|c| c.uid()),
        };
        Ok((s, Some(peer)))
    }
}

/// Serves `router` on `listener` with `limits` until the future is dropped.
pub async fn serve<L: Accept>(listener: L, router: Router, limits: Limits) -> std::io::Result<()> {
    serve_shaped(listener, router, limits, refuse).await
}

/// [`serve`] with the listener's own error shape for refused bodies.
pub async fn serve_shaped<L: Accept>(
    listener: L,
    router: Router,
    limits: Limits,
    refuse: Refuse,
) -> std::io::Result<()> {
    let router = with_body_limit_shaped(router, limits.max_body, refuse);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (mut io, peer) = match listener.accept().await {
            Ok(c) => c,
            // Out of file descriptors and the like: wait instead of spinning.
            Err(e) => {
                warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                // Both shapes: mesh's clients read `error`, Docker's `message`.
                let message = format!(
                    "too many connections to this agent ({} at once): retry later",
                    limits.max_connections
                );
                let body = serde_json::json!({ "error": message, "message": message }).to_string();
                let answer = format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), io.write_all(answer.as_bytes()))
                        .await;
            });
            continue;
        };
        let mut app = router.clone();
        if let Some(p) = peer {
            app = app.layer(axum::Extension(axum::extract::ConnectInfo(p)));
        }
        tokio::spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                debug!("connection closed: {e}");
            }
            drop(permit);
        });
    }
}
