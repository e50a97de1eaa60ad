//! Health probes a node runs against its own tasks: a command inside the task, an HTTP GET
//! or a TCP connect to the task's address (the node reaches it over its bridge).

use std::{net::Ipv4Addr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::Local;
use mesh_api::spec::{HealthCheck, Probe};

/// Ok when the task is healthy; otherwise what the probe saw.
pub async fn probe(
    local: &Local,
    task: &str,
    ip: Ipv4Addr,
    check: &HealthCheck,
) -> Result<(), String> {
    let timeout = Duration::from_millis(check.timeout_ms);
    let outcome = tokio::time::timeout(timeout, async {
        match &check.probe {
            Probe::Tcp { port } => TcpStream::connect((ip, *port))
                .await
                .map(drop)
                .map_err(|e| format!("connect to {ip}:{port}: {e}")),
            Probe::Http { port, path } => http(ip, *port, path).await,
            Probe::Cmd(cmd) => match local.tasks.exec(task, cmd, &[], timeout).await {
                Ok(out) if out.status.success() => Ok(()),
                Ok(out) => {
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    let detail = stderr.trim().lines().last().unwrap_or_default().to_owned();
                    Err(match out.status.code() {
                        Some(c) if detail.is_empty() => format!("exit {c}"),
                        Some(c) => format!("exit {c}: {detail}"),
                        None => "killed".into(),
                    })
                }
                Err(e) => Err(format!("{e:#}")),
            },
        }
    })
    .await;
    outcome.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// GET `path`; healthy on 2xx and 3xx.
async fn http(ip: Ipv4Addr, port: u16, path: &str) -> Result<(), String> {
    let mut s = TcpStream::connect((ip, port))
        .await
        .map_err(|e| format!("connect to {ip}:{port}: {e}"))?;
    let req =
        format!("GET {path} HTTP/1.0\r\nHost: {ip}:{port}\r\nUser-Agent: mesh-health\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut head[n..]).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&head[..n]);
    let status: Option<u16> = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok());
    match status {
        Some(code) if (200..400).contains(&code) => Ok(()),
        Some(code) => Err(format!("GET {path}: HTTP {code}")),
        None => Err(format!("GET {path}: not an HTTP answer")),
    }
}

/// What [`wait_listening`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    Listening,
    /// The process ended first.
    Gone,
    /// It still runs but did not listen in time.
    TimedOut,
}

/// Waits until something accepts TCP connections at `ip:port`, the task's process is gone,
/// or `limit` passed.
pub async fn wait_listening(
    local: &Local,
    task: &str,
    ip: Ipv4Addr,
    port: u16,
    limit: Duration,
) -> Ready {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let attempt =
            tokio::time::timeout(Duration::from_millis(500), TcpStream::connect((ip, port))).await;
        if matches!(attempt, Ok(Ok(_))) {
            return Ready::Listening;
        }
        let alive = local
            .tasks
            .get(task)
            .is_some_and(|r| r.state == crate::task::ProcessState::Running);
        if !alive {
            return Ready::Gone;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(task, %ip, port, "the task does not listen on its target port; serving it anyway");
            return Ready::TimedOut;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
