//! The Docker Engine API's swarm subset on a unix socket, so the real `docker` client
//! (`DOCKER_HOST=unix:///run/mesh/docker.sock`), `docker stack deploy` and tools built on the
//! Engine API drive mesh. An adapter like [`crate::http`]: it decodes Docker's JSON into
//! mesh's typed spec (all of it in [`spec`]), calls the same agent methods the mesh API
//! calls, and answers in Docker's shapes and words. Local containers, images and volumes are
//! podman's business: those paths answer 501.

mod events;
mod logs;
mod nodes;
mod objects;
mod services;
pub mod spec;
mod system;
mod tasks;

use std::{path::Path, sync::Arc};

use anyhow::Context;
use axum::{
    Json, Router,
    extract::Request,
    http::{StatusCode, Uri},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use tokio::net::UnixListener;

use crate::agent::{Agent, Error};

/// The Engine API version this socket speaks (docker 20.10's); newer clients negotiate down
/// to it from `/_ping`.
pub const API_VERSION: &str = "1.41";
/// The oldest version a client may ask for in a path prefix.
pub const MIN_API_VERSION: &str = "1.24";

/// An error in Docker's shape: `{"message": "..."}` with the status dockerd would give.
#[derive(Debug)]
pub struct DockerError {
    pub status: StatusCode,
    pub message: String,
}

impl DockerError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_IMPLEMENTED,
            message: message.into(),
        }
    }
}

#[derive(Serialize)]
struct Message<'a> {
    message: &'a str,
}

impl IntoResponse for DockerError {
    fn into_response(self) -> Response {
        refuse(self.status, self.message)
    }
}

/// The agent's errors keep their meaning (400, 404, 409, 403, 500) in Docker's shape.
impl From<Error> for DockerError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Invalid(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = match &e {
            Error::Internal(e) => format!("{e:#}"),
            other => other.to_string(),
        };
        Self { status, message }
    }
}

pub type DockerResult<T> = Result<Json<T>, DockerError>;

/// Requests refused on the Docker socket since the agent started, by status code: what a
/// misbehaving tool or a probing client sends shows in `/metrics`.
static REFUSED: std::sync::Mutex<std::collections::BTreeMap<u16, u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// [`REFUSED`] as (status code, count) pairs.
pub fn refused() -> Vec<(u16, u64)> {
    let counts = REFUSED.lock().unwrap_or_else(|e| e.into_inner());
    counts.iter().map(|(k, v)| (*k, *v)).collect()
}

/// An error answer in Docker's shape; every refusal of this socket passes here and is
/// counted.
pub fn refuse(status: StatusCode, message: String) -> Response {
    *REFUSED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(status.as_u16())
        .or_default() += 1;
    (status, Json(Message { message: &message })).into_response()
}

/// Axum's own rejections (a query that does not parse, a method a path does not have) are
/// plain text: the client reads `message`, so they get Docker's shape too. 413 is left to
/// the body limit, which says what the limit is.
async fn docker_shaped(res: Response) -> Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.as_u16() < 400 || is_json || status == StatusCode::PAYLOAD_TOO_LARGE {
        return res;
    }
    let text = axum::body::to_bytes(res.into_body(), 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    refuse(status, message)
}

/// Decodes a JSON body as dockerd would refuse it: 400 with what was wrong.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DockerError> {
    serde_json::from_slice(bytes)
        .map_err(|e| DockerError::bad_request(format!("invalid JSON in the request body: {e}")))
}

/// The routes without their `/v1.NN` prefix (see [`strip_version`]).
fn routes(agent: Arc<Agent>) -> Router {
    Router::new()
        .merge(system::routes())
        .merge(nodes::routes())
        .merge(services::routes())
        .merge(tasks::routes())
        .merge(objects::routes())
        .fallback(unsupported)
        .layer(axum::middleware::from_fn_with_state(
            agent.clone(),
            managers_only,
        ))
        .layer(axum::middleware::map_response(docker_shaped))
        .with_state(agent)
}

/// Swarm's workers refuse every change with this message; mesh's workers do too, before the
/// handler runs, so a refused command changes nothing (see `crate::roles`).
async fn managers_only(
    axum::extract::State(agent): axum::extract::State<Arc<Agent>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::http::Method;
    if !matches!(*req.method(), Method::GET | Method::HEAD)
        && agent.role() != crate::roles::Role::Admin
    {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "This node is not a swarm manager. Worker nodes can't be used to view or modify \
             cluster state. Please run this command on a manager node or promote the current \
             node to a manager."
                .into(),
        );
    }
    next.run(req).await
}

pub fn router(agent: Arc<Agent>) -> Router {
    let inner = routes(agent);
    Router::new()
        .fallback_service(inner)
        .layer(axum::middleware::map_request(strip_version))
}

/// `/v1.41/services` is `/services`: clients put the negotiated version in the path. A
/// version above ours is refused as dockerd does.
async fn strip_version(mut req: Request) -> Result<Request, Response> {
    let path = req.uri().path();
    let Some(rest) = path.strip_prefix("/v") else {
        return Ok(req);
    };
    let Some((version, tail)) = rest.split_once('/') else {
        return Ok(req);
    };
    if version.is_empty() || !version.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Ok(req);
    }
    if newer(version, API_VERSION) {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "client version {version} is too new. Maximum supported API version is \
                 {API_VERSION}"
            ),
        ));
    }
    let path_and_query = match req.uri().query() {
        Some(q) => format!("/{tail}?{q}"),
        None => format!("/{tail}"),
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    Ok(req)
}

/// `a` is a later API version than `b` (both `MAJOR.MINOR`).
fn newer(a: &str, b: &str) -> bool {
    let parse = |v: &str| -> (u32, u32) {
        let (major, minor) = v.split_once('.').unwrap_or((v, "0"));
        (major.parse().unwrap_or(0), minor.parse().unwrap_or(0))
    };
    parse(a) > parse(b)
}

/// What the Engine API has beyond the swarm subset: local containers, images and volumes
/// belong to the node's container runtime.
async fn unsupported(uri: Uri) -> Response {
    let path = uri.path();
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let message = match first {
        "containers" | "images" | "volumes" | "build" | "commit" | "exec" | "plugins" => format!(
            "{path} is not served by mesh: its Docker socket speaks the swarm API (services, \
             nodes, networks, secrets, configs, tasks); for local containers, images and \
             volumes use podman (`podman ps`, `podman images`, `podman volume ls`) on the node"
        ),
        _ => format!("page not found: {path} is not part of mesh's Docker API"),
    };
    let status = if message.starts_with("page not found") {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::NOT_IMPLEMENTED
    };
    refuse(status, message)
}

/// Binds the Docker socket (mode 0660, like dockerd's), replacing a stale one.
pub fn bind(socket: &Path, group: Option<nix::unistd::Gid>) -> anyhow::Result<UnixListener> {
    let listener = crate::http::bind(socket).context("the Docker API socket")?;
    if let Some(gid) = group {
        nix::unistd::chown(socket, None, Some(gid))
            .with_context(|| format!("giving {} to group {gid}", socket.display()))?;
    }
    Ok(listener)
}

/// The group `docker_socket_group` names, looked up before the agent touches anything.
pub fn socket_group(name: &str) -> anyhow::Result<nix::unistd::Gid> {
    let group = nix::unistd::Group::from_name(name)
        .with_context(|| format!("looking up group {name}"))?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "docker_socket_group {name:?} does not exist: create it (groupadd {name}) or \
                 leave the Docker socket to root"
            )
        })?;
    Ok(group.gid)
}

/// Serves the Docker API with the limits of the mesh API socket.
pub async fn serve(listener: UnixListener, agent: Arc<Agent>) -> anyhow::Result<()> {
    crate::serving::serve_shaped(listener, router(agent), crate::serving::Limits::API, refuse)
        .await
        .context("serving the Docker API")
}

/// A list's query: Docker's `filters` (JSON) and, for services, `status`.
#[derive(serde::Deserialize, Default)]
pub struct FiltersQuery {
    #[serde(default)]
    pub filters: Option<String>,
    #[serde(default)]
    pub status: Option<bool>,
}

/// Docker's list filters: `{"label": {"a=b": true}}` (or the older `{"label": ["a=b"]}`).
/// Values of one key are alternatives; keys must all hold.
#[derive(Debug, Default)]
pub struct Filters(std::collections::BTreeMap<String, Vec<String>>);

impl Filters {
    pub fn parse(q: &FiltersQuery) -> Result<Self, DockerError> {
        let Some(text) = q.filters.as_deref().filter(|t| !t.is_empty()) else {
            return Ok(Self::default());
        };
        let bad = || {
            DockerError::bad_request(format!(
                "invalid filters {text:?}: expected {{\"key\": {{\"value\": true}}}}"
            ))
        };
        let v: serde_json::Value = serde_json::from_str(text).map_err(|_| bad())?;
        let mut out = std::collections::BTreeMap::new();
        for (k, vals) in v.as_object().ok_or_else(bad)? {
            let vals: Vec<String> = match vals {
                serde_json::Value::Object(m) => m.keys().cloned().collect(),
                serde_json::Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().map(str::to_owned).ok_or_else(bad))
                    .collect::<Result<_, _>>()?,
                _ => return Err(bad()),
            };
            out.insert(k.clone(), vals);
        }
        Ok(Self(out))
    }

    /// Refuses a filter this list does not have, in dockerd's words.
    pub fn only(&self, known: &[&str]) -> Result<(), DockerError> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(DockerError::bad_request(format!("invalid filter '{k}'"))),
            None => Ok(()),
        }
    }

    /// No filter on `key`, or one of its values holds.
    pub fn matches(&self, key: &str, pred: impl Fn(&str) -> bool) -> bool {
        self.0
            .get(key)
            .is_none_or(|vals| vals.iter().any(|v| pred(v)))
    }

    pub fn values(&self, key: &str) -> Option<&[String]> {
        self.0.get(key).map(Vec::as_slice)
    }

    /// Every `label` filter (`key` or `key=value`) holds.
    pub fn labels_match(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.0.get("label").is_none_or(|vals| {
            vals.iter().all(|f| match f.split_once('=') {
                Some((k, v)) => labels.get(k).is_some_and(|x| x == v),
                None => labels.contains_key(f),
            })
        })
    }
}

/// Log streams open at once on the Docker socket.
static STREAMS: std::sync::LazyLock<crate::serving::Streams> =
    std::sync::LazyLock::new(Default::default);

/// Nanoseconds (Docker's durations) from milliseconds (mesh's), and back.
pub fn ns(ms: u64) -> i64 {
    (ms as i64).saturating_mul(1_000_000)
}

pub fn ms(ns: i64) -> Result<u64, String> {
    if ns < 0 {
        return Err(format!("negative duration {ns}ns"));
    }
    Ok(ns as u64 / 1_000_000)
}

/// A time in Docker's format (RFC 3339 with nanoseconds, UTC).
pub fn timestamp(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_nanos(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_number() {
        assert!(newer("1.43", "1.41"));
        assert!(!newer("1.41", "1.41"));
        assert!(!newer("1.9", "1.41"));
        assert!(newer("2.0", "1.41"));
    }

    #[test]
    fn timestamps_are_rfc3339_nanos() {
        assert_eq!(timestamp(1_500), "1970-01-01T00:00:01.500000000Z");
    }
}
