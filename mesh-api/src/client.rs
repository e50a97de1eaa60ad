//! The client side of the local API, used by meshctl and the tests.

use std::path::PathBuf;

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::UnixStream;

use crate::v1::ApiError;

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
        let mut resp = self.send(Method::GET, path, None::<&()>).await?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.into_body().collect().await?.to_bytes();
            return Err(api_error(status, &body));
        }
        while let Some(frame) = resp.body_mut().frame().await {
            if let Some(data) = frame.context("reading from the mesh agent")?.data_ref() {
                out(data);
            }
        }
        Ok(())
    }

    /// A GET whose answer is a stream of lines (`/v1/events`): `on_line` gets each one as
    /// it arrives, until the agent ends the stream or `on_line` fails.
    pub async fn get_lines(
        &self,
        path: &str,
        mut on_line: impl FnMut(&str) -> Result<()>,
    ) -> Result<()> {
        let mut resp = self.send(Method::GET, path, None::<&()>).await?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.into_body().collect().await?.to_bytes();
            return Err(api_error(status, &body));
        }
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = resp.body_mut().frame().await {
            let frame = frame.context("reading from the mesh agent")?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(data);
            while let Some(at) = pending.iter().position(|b| *b == b'\n') {
                let rest = pending.split_off(at + 1);
                let line = String::from_utf8_lossy(&pending[..at]).into_owned();
                pending = rest;
                on_line(&line)?;
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
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(api_error(status, &body));
        }
        serde_json::from_slice(&body).context("decoding the mesh agent's answer")
    }

    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
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
        sender
            .send_request(req)
            .await
            .context("request to the mesh agent")
    }
}

/// An answer of the agent that is not a success, with its HTTP status, for callers that
/// tell kinds of failure apart (the CNI plugin maps them to CNI error codes); it displays
/// as the agent's message.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refused {}

/// The agent's error message, or its status and body when it sent no API error.
fn api_error(status: hyper::StatusCode, body: &[u8]) -> anyhow::Error {
    let message = match serde_json::from_slice::<ApiError>(body) {
        Ok(e) => e.error,
        Err(_) => format!(
            "mesh agent answered {status}: {}",
            String::from_utf8_lossy(body)
        ),
    };
    anyhow::Error::new(Refused {
        status: status.as_u16(),
        message,
    })
}
