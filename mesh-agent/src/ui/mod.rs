//! The cluster visualizer: a read-only page that shows every node as a column and every
//! task as a card on its node, a services strip and an event ticker, updated live over
//! Server-Sent Events. Off unless `ui_listen` is set.
//!
//! Any node's page shows the whole cluster: it renders this node's view, which gossip makes
//! the same everywhere. The assets are compiled into the binary (no CDN, no build step), so
//! the page works on a machine without internet access. Only GET routes exist: the page
//! cannot change the cluster; the API socket stays the only way to write.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use axum::{
    Json, Router,
    extract::State,
    http::header,
    response::{
        IntoResponse, Response,
        sse::{Event as SseEvent, KeepAlive, Sse},
    },
    routing::get,
};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::agent::Agent;
use mesh_api::events::Event;
use mesh_api::v1::Overview;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");

/// Events the page shows when it connects, before live ones.
const TICKER_BACKLOG: usize = 40;
/// Views can change many times a second while a cluster converges; the page needs at
/// most a few frames a second to show it.
const MIN_FRAME_INTERVAL: Duration = Duration::from_millis(200);
/// Sent even when nothing changes, so "since" times on the page keep counting and a
/// stalled connection is noticed.
const IDLE_FRAME_INTERVAL: Duration = Duration::from_secs(5);

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/", get(|| asset(INDEX, "text/html; charset=utf-8")))
        .route(
            "/app.js",
            get(|| asset(SCRIPT, "text/javascript; charset=utf-8")),
        )
        .route(
            "/style.css",
            get(|| asset(STYLE, "text/css; charset=utf-8")),
        )
        .route("/api/overview", get(snapshot))
        .route("/api/stream", get(stream))
        .layer(axum::middleware::from_fn_with_state(
            agent.clone(),
            check_host,
        ))
        .with_state(agent)
}

/// DNS rebinding: a page on evil.example whose name is made to resolve to this listener
/// would otherwise read the whole cluster from the visitor's browser. The browser sends the
/// name it thinks it talks to as Host; only names that are this node's own pass.
async fn check_host(
    State(agent): State<Arc<Agent>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    if host_allowed(host, agent.node_name()) {
        return next.run(req).await;
    }
    crate::serving::refuse(
        axum::http::StatusCode::FORBIDDEN,
        format!(
            "the visualizer answers only to localhost, an IP address or this node's name \
             ({}), not to Host {host:?}: browse it by one of those",
            agent.node_name()
        ),
    )
}

/// Whether `host` (a Host header: name or address, with an optional port) names this node:
/// an IP literal, localhost, the node name or the machine's hostname.
pub fn host_allowed(host: &str, node_name: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split_once(']').is_some_and(|(ip, port)| {
            ip.parse::<std::net::Ipv6Addr>().is_ok()
                && (port.is_empty()
                    || port
                        .strip_prefix(':')
                        .is_some_and(|p| p.parse::<u16>().is_ok()))
        });
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.parse::<u16>().is_ok() => name,
            Some(_) => return false,
            None => host,
        }
    };
    if name.is_empty() {
        return false;
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    name == "localhost"
        || name.ends_with(".localhost")
        || name == node_name.to_ascii_lowercase()
        || (!hostname.is_empty() && name == hostname)
}

/// The page's live streams open at once.
static STREAMS: std::sync::LazyLock<crate::serving::Streams> =
    std::sync::LazyLock::new(Default::default);

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Everything the page needs comes from here: no third-party origin can run.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self'; script-src 'self'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[derive(Serialize)]
struct Snapshot {
    overview: Overview,
    events: Vec<Event>,
}

async fn snapshot(State(agent): State<Arc<Agent>>) -> Json<Snapshot> {
    let view = agent.view();
    Json(Snapshot {
        overview: crate::overview::overview(&agent, &view),
        events: agent.events.recent(TICKER_BACKLOG),
    })
}

fn frame(name: &str, data: &impl Serialize) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default()
        .event(name)
        .data(serde_json::to_string(data).unwrap_or_else(|_| "null".into())))
}

struct Follow {
    agent: Arc<Agent>,
    views: tokio::sync::watch::Receiver<Arc<crate::cluster::View>>,
    events: broadcast::Receiver<Event>,
    /// Frames to send before waiting again.
    queue: std::collections::VecDeque<Result<SseEvent, Infallible>>,
    last_frame: tokio::time::Instant,
}

/// `overview` frames (the whole picture) when the view changes, `event` frames as events
/// happen. The whole picture each time keeps the page simple and always right; it is a few
/// kB for a cluster that fits on a screen.
async fn stream(State(agent): State<Arc<Agent>>) -> Response {
    let permit = match STREAMS.open("page") {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    let (_, events) = agent.events.subscribe(None);
    let mut queue = std::collections::VecDeque::new();
    let view = agent.view();
    queue.push_back(frame("overview", &crate::overview::overview(&agent, &view)));
    for e in agent.events.recent(TICKER_BACKLOG) {
        queue.push_back(frame("event", &e));
    }
    let mut views = agent.watch_views();
    views.mark_unchanged();
    let state = Follow {
        agent,
        views,
        events,
        queue,
        last_frame: tokio::time::Instant::now(),
    };
    let frames = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(f) = s.queue.pop_front() {
                return Some((f, s));
            }
            let idle = tokio::time::sleep_until(s.last_frame + IDLE_FRAME_INTERVAL);
            let redraw = tokio::select! {
                changed = s.views.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    true
                }
                e = s.events.recv() => {
                    match e {
                        Ok(e) => s.queue.push_back(frame("event", &e)),
                        // Fell behind: the next overview frame is the truth anyway.
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                    false
                }
                _ = idle => true,
            };
            if redraw {
                tokio::time::sleep_until(s.last_frame + MIN_FRAME_INTERVAL).await;
                s.views.mark_unchanged();
                let view = s.agent.view();
                s.queue.push_back(frame(
                    "overview",
                    &crate::overview::overview(&s.agent, &view),
                ));
                s.last_frame = tokio::time::Instant::now();
            }
        }
    });
    Sse::new(crate::serving::holding(frames, permit))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Binds `addr` now, so a taken port stops the agent at start with a clear message.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for ui_listen (--ui-listen)"))
}

/// Serves the page until the future is dropped.
pub async fn serve(listener: tokio::net::TcpListener, agent: Arc<Agent>) -> anyhow::Result<()> {
    crate::serving::serve(listener, router(agent), crate::serving::Limits::READ_ONLY)
        .await
        .context("serving the UI")
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn only_this_nodes_names_and_addresses_pass_the_host_check() {
        for ok in [
            "127.0.0.1:8090",
            "192.0.2.1",
            "localhost:8090",
            "LOCALHOST",
            "app.localhost",
            "[::1]:8090",
            "[fe80::1]",
            "node1:8090",
            "node1.",
        ] {
            assert!(host_allowed(ok, "node1"), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8090",
            "node1.evil.example",
            "127.0.0.1.evil.example",
            "",
            ":8090",
            "localhost:x",
            "[::1",
            "[evil]:80",
        ] {
            assert!(!host_allowed(bad, "node1"), "{bad}");
        }
    }
}
