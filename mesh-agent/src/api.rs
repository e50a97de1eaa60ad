//! The agent's local API: HTTP/1.1 with JSON bodies over a unix socket, so only local users
//! allowed by the socket's permissions can reach it. `meshctl` is its one client.

use std::{path::Path, sync::Arc};

use anyhow::{Context, Result};
use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use serde::{Deserialize, Serialize};
use tokio::{net::UnixListener, sync::Mutex};

use crate::dataplane::Dataplane;

/// Default path of the agent's socket.
pub const DEFAULT_SOCKET: &str = "/run/mesh/agent.sock";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortStats {
    pub port: u16,
    pub packets: u64,
    pub bytes: u64,
}

/// An error as the API returns it: a message a user can act on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

pub struct AppState {
    pub dataplane: Mutex<Dataplane>,
}

struct Failure(anyhow::Error);

impl IntoResponse for Failure {
    fn into_response(self) -> axum::response::Response {
        let body = ApiError {
            error: format!("{:#}", self.0),
        };
        (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self(e)
    }
}

async fn port_stats(State(state): State<Arc<AppState>>) -> Result<Json<Vec<PortStats>>, Failure> {
    let dp = state.dataplane.lock().await;
    let stats = dp
        .port_counters()?
        .into_iter()
        .map(|(port, c)| PortStats {
            port,
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect();
    Ok(Json(stats))
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/dataplane/ports", get(port_stats))
        .with_state(state)
}

/// Binds the socket (replacing a stale one left by a killed agent) and serves until the
/// future is dropped.
pub async fn serve(socket: &Path, state: Arc<AppState>) -> Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(socket);
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    axum::serve(listener, router(state))
        .await
        .context("serving the local API")
}

/// The client side, used by meshctl and the tests.
pub mod client {
    use std::path::PathBuf;

    use anyhow::{Context, Result, bail};
    use http_body_util::{BodyExt, Full};
    use hyper::{Method, Request, body::Bytes};
    use hyper_util::rt::TokioIo;
    use serde::{Serialize, de::DeserializeOwned};
    use tokio::net::UnixStream;

    use super::ApiError;

    pub struct Client {
        socket: PathBuf,
    }

    impl Client {
        pub fn new(socket: impl Into<PathBuf>) -> Self {
            Self {
                socket: socket.into(),
            }
        }

        pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
            self.call(Method::GET, path, None::<&()>).await
        }

        pub async fn post<B: Serialize, T: DeserializeOwned>(
            &self,
            path: &str,
            body: &B,
        ) -> Result<T> {
            self.call(Method::POST, path, Some(body)).await
        }

        pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
            self.call(Method::DELETE, path, None::<&()>).await
        }

        async fn call<B: Serialize, T: DeserializeOwned>(
            &self,
            method: Method,
            path: &str,
            body: Option<&B>,
        ) -> Result<T> {
            let stream = UnixStream::connect(&self.socket).await.with_context(|| {
                format!(
                    "cannot reach the mesh agent at {} (is mesh-agent running? set --socket or MESH_SOCKET)",
                    self.socket.display()
                )
            })?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .context("talking to the mesh agent")?;
            tokio::spawn(conn);
            let bytes = match body {
                Some(b) => Bytes::from(serde_json::to_vec(b)?),
                None => Bytes::new(),
            };
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header("host", "mesh-agent")
                .header("content-type", "application/json")
                .body(Full::new(bytes))?;
            let resp = sender
                .send_request(req)
                .await
                .context("request to the mesh agent")?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            if !status.is_success() {
                match serde_json::from_slice::<ApiError>(&body) {
                    Ok(e) => bail!("{}", e.error),
                    Err(_) => bail!(
                        "mesh agent answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    ),
                }
            }
            serde_json::from_slice(&body).context("decoding the mesh agent's answer")
        }
    }
}
