//! The client side of the local API, used by meshctl and the tests.

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

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::DELETE, path, None::<&()>).await
    }

    /// GET whose answer is a byte stream (logs): hands each piece to `out` as it arrives.
    pub async fn stream(&self, path: &str, mut out: impl FnMut(&[u8])) -> Result<()> {
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
        let req = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header("host", "mesh-agent")
            .body(Full::new(Bytes::new()))?;
        let resp = sender
            .send_request(req)
            .await
            .context("request to the mesh agent")?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let body = body.collect().await?.to_bytes();
            match serde_json::from_slice::<ApiError>(&body) {
                Ok(e) => bail!("{}", e.error),
                Err(_) => bail!(
                    "mesh agent answered {status}: {}",
                    String::from_utf8_lossy(&body)
                ),
            }
        }
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.context("reading from the mesh agent")?.into_data() {
                out(&data);
            }
        }
        Ok(())
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
