//! The agent's local API over HTTP: an adapter that decodes a request into `mesh_api::v1`
//! types, calls the agent, and turns its answer (or its [`Error`]) into a response. No
//! decisions are made here.

mod events;
pub mod logs;
mod objects;
pub mod peer_logs;
pub mod peer_payloads;
mod stacks;
mod volumes;

use std::{path::Path, sync::Arc};

use anyhow::Context;
use axum::{
    Extension, Json, Router,
    body::Bytes,
    extract::{Path as UrlPath, Query, State, connect_info::ConnectInfo},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::de::DeserializeOwned;
use tokio::net::UnixListener;

use crate::{
    agent::{Agent, Error, Shutdown},
    answers::{network_info, node_info, service_info, service_tasks, task_info},
    cluster::View,
};
use mesh_api::v1::{
    ApiError, CniAdd, CniInfo, CniRef, ExecOutput, ExecRequest, GossipInfo, JoinTokenInfo,
    LocalTaskInfo, NetworkCreate, NetworkInfo, NodeInfo, NodeUpdate, PortStats, RotateInfo,
    ServiceCreate, ServiceInfo, ServiceScale, ServiceTaskInfo, ServiceUpdate, TaskInfo, TaskRun,
};

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = match &self {
            Error::Invalid(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let error = match &self {
            Error::Internal(e) => format!("{e:#}"),
            other => other.to_string(),
        };
        (status, Json(ApiError { error })).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, Error>;

/// Decodes a JSON body with an error that says what was wrong (axum's default rejection is
/// plain text).
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, Error> {
    mesh_api::v1::decode_request(bytes).map_err(Error::Invalid)
}

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/nodes", get(list_nodes))
        .route(
            "/v1/nodes/{name}",
            get(get_node).post(update_node).delete(remove_node),
        )
        .route("/v1/join-token", get(join_token))
        .route("/v1/join-token/rotate", axum::routing::post(rotate_key))
        .route("/v1/local/leave", axum::routing::post(leave))
        .route("/v1/networks", get(list_networks).post(create_network))
        .route(
            "/v1/networks/{name}",
            get(get_network).delete(remove_network),
        )
        .route("/v1/services", get(list_services).post(create_service))
        .route(
            "/v1/services/{name}",
            get(get_service).post(update_service).delete(remove_service),
        )
        .route("/v1/services/{name}/tasks", get(list_service_tasks))
        .route("/v1/scale", axum::routing::post(scale_services))
        .route("/v1/tasks", get(list_tasks).post(run_task))
        .route("/v1/local/tasks", get(list_local_tasks))
        .route("/v1/local/tasks/{name}", axum::routing::delete(remove_task))
        .route("/v1/local/tasks/{name}/logs", get(task_logs))
        .route("/v1/services/{name}/logs", get(logs::service_logs))
        .route(
            "/v1/local/tasks/{name}/exec",
            axum::routing::post(exec_task),
        )
        .route("/v1/dataplane/ports", get(port_stats))
        .route("/v1/gossip", get(gossip_info))
        .route("/v1/events", get(events::follow))
        .route("/v1/cni/add", axum::routing::post(cni_add))
        .route("/v1/cni/del", axum::routing::post(cni_del))
        .route("/v1/cni/check", axum::routing::post(cni_check))
        .merge(objects::routes())
        .merge(stacks::routes())
        .merge(volumes::routes())
        .layer(axum::middleware::from_fn_with_state(
            agent.clone(),
            admins_only,
        ))
        .with_state(agent)
}

/// A worker refuses every request that changes the cluster before its handler runs, so a
/// refused command changes nothing (see `crate::roles`). What only touches this node — its
/// local tasks, CNI, `run`, `leave`, its own volumes (node-local, as Docker's) — stays open
/// to it.
async fn admins_only(
    State(agent): State<Arc<Agent>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if changes_the_cluster(req.method(), req.uri().path())
        && let Err(e) = agent.require_admin()
    {
        return e.into_response();
    }
    next.run(req).await
}

fn changes_the_cluster(method: &axum::http::Method, path: &str) -> bool {
    use axum::http::Method;
    !(matches!(*method, Method::GET | Method::HEAD)
        || path.starts_with("/v1/local/")
        || path.starts_with("/v1/cni/")
        || path == "/v1/tasks"
        || path == "/v1/volumes"
        || path.starts_with("/v1/volumes/"))
}

#[cfg(test)]
mod tests {
    use super::changes_the_cluster;
    use axum::http::Method;

    #[test]
    fn workers_keep_what_touches_their_own_node_only() {
        for (method, path) in [
            (Method::POST, "/v1/services"),
            (Method::POST, "/v1/services/web"),
            (Method::DELETE, "/v1/services/web"),
            (Method::POST, "/v1/scale"),
            (Method::POST, "/v1/networks"),
            (Method::POST, "/v1/nodes/n2"),
            (Method::DELETE, "/v1/nodes/n2"),
            (Method::POST, "/v1/secrets"),
            (Method::POST, "/v1/stacks"),
            (Method::POST, "/v1/join-token/rotate"),
            (Method::PUT, "/v1/localx"),
        ] {
            assert!(changes_the_cluster(&method, path), "{method} {path}");
        }
        for (method, path) in [
            (Method::GET, "/v1/services"),
            (Method::GET, "/v1/join-token"),
            (Method::POST, "/v1/tasks"),
            (Method::POST, "/v1/local/leave"),
            (Method::DELETE, "/v1/local/tasks/t1"),
            (Method::POST, "/v1/local/tasks/t1/exec"),
            (Method::POST, "/v1/cni/add"),
            (Method::POST, "/v1/volumes"),
            (Method::DELETE, "/v1/volumes/data"),
        ] {
            assert!(!changes_the_cluster(&method, path), "{method} {path}");
        }
    }
}

/// Binds the socket, replacing a stale one left by a killed agent.
pub fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(socket);
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    // Only root (and the group the operator chooses) may drive the agent.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

pub use crate::serving::Peer;

/// Serves the API on a bound socket, with [`Limits::API`], until the future is dropped.
pub async fn serve(listener: UnixListener, agent: Arc<Agent>) -> anyhow::Result<()> {
    crate::serving::serve(listener, router(agent), crate::serving::Limits::API)
        .await
        .context("serving the local API")
}

/// Log and event streams open at once on the API socket.
static STREAMS: std::sync::LazyLock<crate::serving::Streams> =
    std::sync::LazyLock::new(Default::default);

/// The join token is the cluster key: the socket's group may drive the agent, but only root
/// may read the key (as only root may read the key file).
fn require_root(peer: Option<Extension<ConnectInfo<Peer>>>) -> Result<(), Error> {
    match peer.and_then(|Extension(ConnectInfo(p))| p.uid) {
        Some(0) => Ok(()),
        _ => Err(Error::Forbidden(
            "only root may see or rotate the join token (it carries the cluster key): run the \
             command as root on a member"
                .into(),
        )),
    }
}

// ---- views → answers ---------------------------------------------------------------------

// ---- handlers ----------------------------------------------------------------------------

async fn list_nodes(State(agent): State<Arc<Agent>>) -> ApiResult<Vec<NodeInfo>> {
    let view = agent.refresh().await;
    Ok(Json(
        view.nodes
            .keys()
            .filter_map(|n| node_info(&agent, &view, n))
            .collect(),
    ))
}

async fn get_node(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<NodeInfo> {
    let view = agent.refresh().await;
    let name = resolve_node_name(&agent, &view, &name);
    node_info(&agent, &view, &name)
        .map(Json)
        .ok_or_else(|| Error::NotFound(format!("node {name} not found (see `meshctl node ls`)")))
}

/// `self` names the answering node, as Docker's `node inspect self`.
fn resolve_node_name(agent: &Agent, _view: &View, name: &str) -> String {
    if name == "self" {
        agent.node_name().to_owned()
    } else {
        name.to_owned()
    }
}

async fn update_node(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
    bytes: Bytes,
) -> ApiResult<NodeInfo> {
    let req: NodeUpdate = body(&bytes)?;
    let add = req.labels_to_add().map_err(Error::Invalid)?;
    let view = agent.view();
    let name = resolve_node_name(&agent, &view, &name);
    if let Some(role) = req.role {
        agent.set_role(&name, role).await?;
    }
    if req.availability.is_none() && add.is_empty() && req.label_rm.is_empty() {
        let view = agent.refresh().await;
        return node_info(&agent, &view, &name)
            .map(Json)
            .ok_or_else(|| Error::NotFound(format!("node {name} not found")));
    }
    agent
        .update_node(&name, |spec| {
            if let Some(a) = req.availability {
                spec.availability = a;
            }
            for (k, v) in add {
                spec.labels.insert(k, v);
            }
            for k in &req.label_rm {
                spec.labels.remove(k);
            }
        })
        .await?;
    let view = agent.refresh().await;
    node_info(&agent, &view, &name)
        .map(Json)
        .ok_or_else(|| Error::NotFound(format!("node {name} not found")))
}

#[derive(serde::Deserialize)]
struct RemoveNode {
    #[serde(default)]
    force: bool,
}

async fn remove_node(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<RemoveNode>,
) -> ApiResult<serde_json::Value> {
    agent.remove_node(&name, q.force).await?;
    Ok(Json(serde_json::json!({ "removed": name })))
}

#[derive(serde::Deserialize)]
struct JoinTokenQuery {
    role: Option<String>,
}

async fn join_token(
    State(agent): State<Arc<Agent>>,
    peer: Option<Extension<ConnectInfo<Peer>>>,
    Query(query): Query<JoinTokenQuery>,
) -> ApiResult<JoinTokenInfo> {
    require_root(peer)?;
    let role = match query.role.as_deref() {
        None | Some("worker") => crate::roles::Role::Worker,
        Some("admin" | "manager") => crate::roles::Role::Admin,
        Some(other) => {
            return Err(Error::Invalid(format!(
                "unknown role {other:?}: a join token is for a worker or an admin"
            )));
        }
    };
    let token = agent.join_token_for(role)?;
    let view = agent.refresh().await;
    let port = agent.config.gossip_port;
    let address = if port == crate::gossip::DEFAULT_PORT {
        agent.config.advertise.to_string()
    } else {
        format!("{}:{port}", agent.config.advertise)
    };
    let encoded = token.encode();
    Ok(Json(JoinTokenInfo {
        command: format!("mesh-agent join --token {} {address}", encoded.as_str()),
        token: encoded.to_string(),
        key: token.id(),
        rotation: agent.rotation_status(&view),
    }))
}

async fn rotate_key(
    State(agent): State<Arc<Agent>>,
    peer: Option<Extension<ConnectInfo<Peer>>>,
) -> ApiResult<RotateInfo> {
    require_root(peer)?;
    let key = agent.rotate_key().await?;
    Ok(Json(RotateInfo { key }))
}

/// Announces that this node leaves, answers, then stops the agent: the caller has drained
/// the node first (`mesh-agent leave`).
async fn leave(State(agent): State<Arc<Agent>>) -> ApiResult<serde_json::Value> {
    agent.announce_leave().await;
    let node = agent.node_name().to_owned();
    tokio::spawn(async move {
        // Lets the answer reach the caller before the socket goes.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        agent.request_shutdown(Shutdown::Leave);
    });
    Ok(Json(serde_json::json!({ "left": node })))
}

async fn list_networks(State(agent): State<Arc<Agent>>) -> ApiResult<Vec<NetworkInfo>> {
    let view = agent.refresh().await;
    Ok(Json(
        view.networks
            .keys()
            .filter_map(|n| network_info(&view, n))
            .collect(),
    ))
}

async fn get_network(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<NetworkInfo> {
    let view = agent.refresh().await;
    network_info(&view, &name).map(Json).ok_or_else(|| {
        Error::NotFound(format!(
            "network {name} not found (see `meshctl network ls`)"
        ))
    })
}

async fn create_network(State(agent): State<Arc<Agent>>, bytes: Bytes) -> ApiResult<NetworkInfo> {
    let req: NetworkCreate = body(&bytes)?;
    agent
        .create_network(&req.name, req.subnet.as_deref(), &Default::default())
        .await?;
    let view = agent.view();
    network_info(&view, &req.name).map(Json).ok_or_else(|| {
        Error::Internal(anyhow::anyhow!(
            "network {} vanished right after creation",
            req.name
        ))
    })
}

async fn remove_network(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    agent.remove_network(&name).await?;
    Ok(Json(serde_json::json!({ "removed": name })))
}

async fn list_services(State(agent): State<Arc<Agent>>) -> ApiResult<Vec<ServiceInfo>> {
    let view = agent.refresh().await;
    Ok(Json(
        view.services
            .keys()
            .filter_map(|n| service_info(&view, n))
            .collect(),
    ))
}

async fn get_service(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<ServiceInfo> {
    let view = agent.refresh().await;
    let mut info = service_info(&view, &name).ok_or_else(|| {
        Error::NotFound(format!(
            "service {name} not found (see `meshctl service ls`)"
        ))
    })?;
    if let Some(local) = agent.local() {
        info.dataplane = local.dataplane.lock().await.lb().service_stats(&info.id)?;
    }
    Ok(Json(info))
}

async fn create_service(State(agent): State<Arc<Agent>>, bytes: Bytes) -> ApiResult<ServiceInfo> {
    let req: ServiceCreate = body(&bytes)?;
    agent.create_service(&req).await?;
    let view = agent.view();
    service_info(&view, &req.spec.name)
        .map(Json)
        .ok_or_else(|| {
            Error::Internal(anyhow::anyhow!(
                "service {} vanished right after creation",
                req.spec.name
            ))
        })
}

async fn update_service(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
    bytes: Bytes,
) -> ApiResult<ServiceInfo> {
    let req: ServiceUpdate = body(&bytes)?;
    agent.update_service(&name, &req).await?;
    let view = agent.refresh().await;
    service_info(&view, &name)
        .map(Json)
        .ok_or_else(|| Error::NotFound(format!("service {name} was removed meanwhile")))
}

async fn scale_services(
    State(agent): State<Arc<Agent>>,
    bytes: Bytes,
) -> ApiResult<Vec<ServiceInfo>> {
    let req: ServiceScale = body(&bytes)?;
    let done = agent.scale_services(&req).await?;
    let view = agent.refresh().await;
    Ok(Json(
        done.iter()
            .filter_map(|s| service_info(&view, &s.spec.name))
            .collect(),
    ))
}

async fn list_service_tasks(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Vec<ServiceTaskInfo>> {
    let view = agent.refresh().await;
    if !view.services.contains_key(&name) {
        return Err(Error::NotFound(format!(
            "service {name} not found (see `meshctl service ls`)"
        )));
    }
    Ok(Json(service_tasks(&view, &name)))
}

async fn remove_service(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    agent.remove_service(&name).await?;
    Ok(Json(serde_json::json!({ "removed": name })))
}

async fn list_tasks(State(agent): State<Arc<Agent>>) -> ApiResult<Vec<TaskInfo>> {
    let view = agent.refresh().await;
    Ok(Json(view.endpoints.iter().map(task_info).collect()))
}

async fn port_stats(State(agent): State<Arc<Agent>>) -> ApiResult<Vec<PortStats>> {
    let dp = agent.require_local()?.dataplane.lock().await;
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

fn local_task_info(agent: &Agent, view: &View, r: &crate::task::TaskRecord) -> LocalTaskInfo {
    let iface = r.interfaces.first();
    let endpoint = view
        .endpoints
        .iter()
        .find(|e| e.node == agent.node_name() && e.record.task == r.spec.name);
    LocalTaskInfo {
        name: r.spec.name.clone(),
        service: endpoint.and_then(|e| e.record.service.clone()),
        network: r
            .spec
            .attachments
            .first()
            .map(|a| a.network.clone())
            .unwrap_or_default(),
        ip: iface.map(|i| i.address.addr()),
        node: agent.node_name().to_owned(),
        state: r.state.label().to_owned(),
        exit_code: match r.state {
            crate::task::ProcessState::Exited { code, .. } => code,
            _ => None,
        },
        pid: r.pid,
        netns: r.netns.clone(),
        command: r.spec.command.clone(),
        log: r.log.display().to_string(),
    }
}

async fn run_task(State(agent): State<Arc<Agent>>, bytes: Bytes) -> ApiResult<LocalTaskInfo> {
    let req: TaskRun = body(&bytes)?;
    let record = agent.run_task(&req).await?;
    let view = agent.refresh().await;
    Ok(Json(local_task_info(&agent, &view, &record)))
}

async fn list_local_tasks(State(agent): State<Arc<Agent>>) -> ApiResult<Vec<LocalTaskInfo>> {
    let view = agent.view();
    let tasks = agent.local().map(|l| l.tasks.list()).unwrap_or_default();
    Ok(Json(
        tasks
            .iter()
            .map(|r| local_task_info(&agent, &view, r))
            .collect(),
    ))
}

/// A task's output (`?follow=true`: and what it writes next), streamed as it comes.
async fn task_logs(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
    axum::extract::Query(q): axum::extract::Query<mesh_api::v1::LogsQuery>,
) -> Result<Response, Error> {
    let local = agent.require_local()?;
    let logs = local
        .tasks
        .logs(&name, &q)
        .map_err(|e| Error::NotFound(format!("{e:#} (see `meshctl ps -a`)")))?;
    let permit = match STREAMS.open("log stream") {
        Ok(p) => p,
        Err(refused) => return Ok(*refused),
    };
    let stream = logs.into_lines().map_err(|e| {
        Error::Internal(anyhow::Error::from(e).context(format!("reading the logs of {name}")))
    })?;
    let stream = futures_util::StreamExt::map(stream, |l| {
        l.map(|(_, mut line)| {
            line.push('\n');
            Bytes::from(line)
        })
    });
    Ok(Response::new(axum::body::Body::from_stream(
        crate::serving::holding(stream, permit),
    )))
}

async fn remove_task(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    agent.remove_task(&name).await?;
    Ok(Json(serde_json::json!({ "removed": name })))
}

async fn gossip_info(State(agent): State<Arc<Agent>>) -> ApiResult<GossipInfo> {
    let auth = agent.gossip.auth().map(|a| a.report());
    let origins = agent.gossip.origin_report();
    let roles = agent.gossip.roles_report();
    Ok(Json(GossipInfo {
        node: agent.node_name().to_owned(),
        cluster: agent.config.cluster.clone(),
        authenticated: auth.is_some(),
        auth,
        origins: mesh_api::v1::OriginStats {
            invalid_records: origins.invalid_records,
            nodes_refused: origins.impostors,
            forged_grants: roles.forged_grants,
            worker_objects: roles.worker_objects,
            secret_copies_refused: agent
                .secret_copies_refused
                .load(std::sync::atomic::Ordering::Relaxed),
            payloads_refused: agent.gossip.payload_report().refused,
        },
    }))
}

async fn exec_task(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
    bytes: Bytes,
) -> ApiResult<ExecOutput> {
    let req: ExecRequest = body(&bytes)?;
    if req.command.is_empty() {
        return Err(Error::Invalid(
            "nothing to run: put the command after `--`".into(),
        ));
    }
    let local = agent.require_local()?;
    if local.tasks.get(&name).is_none() {
        return Err(Error::NotFound(format!(
            "no task named {name} on this node (see `meshctl ps`)"
        )));
    }
    let out = local
        .tasks
        .exec(
            &name,
            &req.command,
            &req.env,
            std::time::Duration::from_secs(req.timeout_secs.max(1)),
        )
        .await
        .map_err(|e| Error::Invalid(format!("{e:#}")))?;
    Ok(Json(ExecOutput {
        exit_code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }))
}

/// The CNI plugin's ADD: plumbs the runtime's namespace (see `agent::cni`).
async fn cni_add(State(agent): State<Arc<Agent>>, bytes: Bytes) -> ApiResult<CniInfo> {
    let req: CniAdd = body(&bytes)?;
    Ok(Json(agent.cni_add(&req).await?))
}

async fn cni_del(State(agent): State<Arc<Agent>>, bytes: Bytes) -> ApiResult<serde_json::Value> {
    let req: CniRef = body(&bytes)?;
    agent.cni_del(&req.container_id, &req.ifname).await?;
    Ok(Json(serde_json::json!({ "removed": req.container_id })))
}

async fn cni_check(State(agent): State<Arc<Agent>>, bytes: Bytes) -> ApiResult<CniInfo> {
    let req: CniRef = body(&bytes)?;
    Ok(Json(agent.cni_check(&req.container_id, &req.ifname).await?))
}
