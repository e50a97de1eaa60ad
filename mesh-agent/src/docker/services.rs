//! `/services*`: create, list (`status=true` counts running and desired tasks), inspect,
//! update (`version`, `rollback=previous`), remove, logs. Specs go through [`super::spec`]
//! and the agent's own service methods, as the mesh API's do.

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    DockerError, DockerResult, Filters, FiltersQuery, body,
    spec::{self, NetworkNames, ServiceSpec as DockerSpec},
    timestamp,
};
use crate::{
    agent::{Agent, Error},
    answers::service_info,
    cluster::View,
};
use mesh_api::{
    id::short_id,
    spec::{EndpointMode, ServiceSpec},
    v1::{RegistryAuth, ServiceCreate, ServiceUpdate},
};
use mesh_planner::ServiceMode;

pub fn routes() -> Router<Arc<Agent>> {
    Router::new()
        .route("/services", get(list))
        .route("/services/create", post(create))
        .route("/services/{id}", get(inspect).delete(remove))
        .route("/services/{id}/update", post(update))
        .route("/services/{id}/logs", get(super::logs::service_logs))
        .route("/tasks/{id}/logs", get(super::logs::service_logs))
}

pub fn service_id(view: &View, name: &str) -> String {
    view.services
        .get(name)
        .map(|s| short_id(name, &s.created))
        .unwrap_or_default()
}

/// A service named by its ID, a unique ID prefix, or its name.
pub fn resolve(view: &View, id: &str) -> Result<String, DockerError> {
    if view.services.contains_key(id) {
        return Ok(id.to_owned());
    }
    let matches: Vec<&String> = view
        .services
        .keys()
        .filter(|n| !id.is_empty() && service_id(view, n).starts_with(id))
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(DockerError::not_found(format!("service {id} not found"))),
        _ => Err(DockerError::not_found(format!(
            "service {id} is ambiguous ({} matches)",
            matches.len()
        ))),
    }
}

fn update_status(spec: &ServiceSpec) -> Option<Value> {
    let s = spec.update_status.as_ref()?;
    let mut v = json!({
        "State": s.state.to_string(),
        "StartedAt": timestamp(s.started_ms),
        "Message": s.message,
    });
    if let Some(done) = s.completed_ms {
        v["CompletedAt"] = json!(timestamp(done));
    }
    Some(v)
}

/// A service as the Engine API shows it; `status` adds ServiceStatus (`?status=true`).
pub fn service(view: &View, name: &str, status: bool) -> Option<Value> {
    let r = view.services.get(name)?;
    let s = &r.spec;
    let shown = spec::shown(s, view);
    let mut v = json!({
        "ID": short_id(name, &r.created),
        "Version": { "Index": s.version },
        "CreatedAt": timestamp(r.created.ms),
        "UpdatedAt": timestamp(r.updated.ms),
        "Spec": shown,
        "Endpoint": {
            "Spec": shown.endpoint_spec,
            "Ports": s.ports.iter().map(spec::docker_port).collect::<Vec<_>>(),
            "VirtualIPs": match (s.endpoint_mode, s.vip, view.networks.get(&s.network)) {
                (EndpointMode::Vip, Some(vip), Some(net)) => json!([{
                    "NetworkID": view.network_id(&s.network),
                    "Addr": format!("{vip}/{}", net.spec.subnet.prefix_len()),
                }]),
                _ => json!([]),
            },
        },
    });
    if let Some(p) = &s.previous {
        v["PreviousSpec"] = json!(spec::shown(p, view));
    }
    if let Some(u) = update_status(s) {
        v["UpdateStatus"] = u;
    }
    if s.mode.is_job() {
        v["JobStatus"] = json!({
            "JobIteration": { "Index": s.template_version },
            "LastExecution": timestamp(r.updated.ms),
        });
    }
    if status && let Some(info) = service_info(view, name) {
        let mut st = json!({
            "RunningTasks": info.running,
            "DesiredTasks": info.desired.unwrap_or(0),
        });
        if let Some(c) = info.completed {
            st["CompletedTasks"] = json!(c);
        }
        v["ServiceStatus"] = st;
    }
    Some(v)
}

fn mode_name(m: ServiceMode) -> &'static str {
    match m {
        ServiceMode::Replicated { .. } => "replicated",
        ServiceMode::Global => "global",
        ServiceMode::ReplicatedJob { .. } => "replicated-job",
        ServiceMode::GlobalJob => "global-job",
    }
}

async fn list(
    State(agent): State<Arc<Agent>>,
    Query(q): Query<FiltersQuery>,
) -> DockerResult<Vec<Value>> {
    let filters = Filters::parse(&q)?;
    filters.only(&["id", "label", "mode", "name"])?;
    let view = agent.refresh().await;
    Ok(Json(
        view.services
            .iter()
            .filter(|(n, r)| {
                filters.matches("id", |v| service_id(&view, n).starts_with(v))
                    && filters.matches("name", |v| n.starts_with(v))
                    && filters.matches("mode", |v| v == mode_name(r.spec.mode))
                    && filters.labels_match(&r.spec.labels)
            })
            .filter_map(|(n, _)| service(&view, n, q.status.unwrap_or(false)))
            .collect(),
    ))
}

async fn inspect(State(agent): State<Arc<Agent>>, Path(id): Path<String>) -> DockerResult<Value> {
    let view = agent.refresh().await;
    let name = resolve(&view, &id)?;
    service(&view, &name, false)
        .map(Json)
        .ok_or_else(|| DockerError::not_found(format!("service {id} not found")))
}

fn decode_spec(bytes: &[u8]) -> Result<DockerSpec, DockerError> {
    body(bytes)
}

/// Docker's `X-Registry-Auth` header (what `--with-registry-auth` sends): base64url of an
/// AuthConfig. An empty one (`{}`, what the client sends when it has no credentials for the
/// registry) is none.
fn registry_auth(headers: &HeaderMap) -> Result<Option<RegistryAuth>, DockerError> {
    use base64::Engine;
    let Some(value) = headers.get("x-registry-auth") else {
        return Ok(None);
    };
    let bad = |why: &str| DockerError::bad_request(format!("X-Registry-Auth: {why}"));
    let text = value.to_str().map_err(|_| bad("not text"))?.trim();
    let engines = [
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
        base64::engine::general_purpose::STANDARD,
    ];
    let json = engines
        .iter()
        .find_map(|e| e.decode(text).ok())
        .ok_or_else(|| bad("not base64"))?;
    #[derive(Deserialize, Default)]
    struct AuthConfig {
        #[serde(default)]
        username: String,
        #[serde(default)]
        password: String,
        #[serde(default)]
        auth: String,
        #[serde(default)]
        serveraddress: String,
        #[serde(default)]
        identitytoken: String,
        #[serde(default)]
        registrytoken: String,
    }
    let c: AuthConfig = serde_json::from_slice(&json).map_err(|_| bad("not an AuthConfig"))?;
    if !c.identitytoken.is_empty() || !c.registrytoken.is_empty() {
        return Err(bad(
            "identity and registry tokens are not supported: log in with a user name and \
             password",
        ));
    }
    let (username, password) = if c.username.is_empty() && !c.auth.is_empty() {
        let pair = base64::engine::general_purpose::STANDARD
            .decode(&c.auth)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| bad("its auth is not base64 of user:password"))?;
        let (u, p) = pair
            .split_once(':')
            .ok_or_else(|| bad("its auth is not base64 of user:password"))?;
        (u.to_owned(), p.to_owned())
    } else {
        (c.username, c.password)
    };
    if username.is_empty() {
        return Ok(None);
    }
    Ok(Some(RegistryAuth {
        username,
        password,
        server_address: c.serveraddress,
    }))
}

async fn create(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, DockerError> {
    let auth = registry_auth(&headers)?;
    let d = decode_spec(&bytes)?;
    let view = agent.refresh().await;
    let mesh = spec::to_mesh(&d, &*view).map_err(DockerError::bad_request)?;
    if view.services.contains_key(&mesh.name) {
        // dockerd's words and status for a taken name.
        return Err(DockerError {
            status: StatusCode::CONFLICT,
            message: format!(
                "rpc error: code = AlreadyExists desc = name conflicts with an existing object: \
                 service {} already exists",
                mesh.name
            ),
        });
    }
    let r = agent
        .create_service(&ServiceCreate {
            spec: mesh,
            no_resolve_image: false,
            registry_auth: auth,
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "ID": short_id(&r.spec.name, &r.created), "Warnings": null })),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateQuery {
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    rollback: Option<String>,
}

async fn update(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Query(q): Query<UpdateQuery>,
    headers: HeaderMap,
    bytes: Bytes,
) -> DockerResult<Value> {
    let auth = registry_auth(&headers)?;
    let d = decode_spec(&bytes)?;
    let view = agent.refresh().await;
    let name = resolve(&view, &id)?;
    let version = q.version.ok_or_else(|| {
        DockerError::bad_request("the version of the service being updated is missing (?version=N)")
    })?;
    match q.rollback.as_deref() {
        None | Some("") | Some("none") => {}
        Some("previous") => {
            let current = view.services[&name].spec.version;
            if version != current {
                return Err(out_of_sequence(&name, current, version));
            }
            agent
                .update_service(
                    &name,
                    &ServiceUpdate {
                        rollback: true,
                        ..Default::default()
                    },
                )
                .await?;
            return Ok(Json(json!({ "Warnings": null })));
        }
        Some(other) => {
            return Err(DockerError::bad_request(format!(
                "unrecognized rollback option {other}"
            )));
        }
    }
    let mesh = spec::to_mesh(&d, &*view).map_err(DockerError::bad_request)?;
    agent
        .replace_service(&name, Some(version), |current| {
            let mut m = mesh;
            spec::keep_mesh_only(&mut m, current);
            if let Some(auth) = &auth {
                m.registry_auth = Some(agent.seal_registry_auth(&m, auth)?);
            }
            Ok(m)
        })
        .await
        .map_err(|e| match e {
            Error::Conflict(m) if m.starts_with("update out of sequence") => DockerError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: format!("rpc error: code = Unknown desc = {m}"),
            },
            e => e.into(),
        })?;
    Ok(Json(json!({ "Warnings": null })))
}

/// Swarm's answer when the spec changed since the client read it.
fn out_of_sequence(name: &str, current: u64, sent: u64) -> DockerError {
    DockerError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!(
            "rpc error: code = Unknown desc = update out of sequence: service {name} is at \
             version {current}, not {sent}; inspect it again and retry"
        ),
    }
}

async fn remove(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<StatusCode, DockerError> {
    let view = agent.refresh().await;
    let name = resolve(&view, &id)?;
    agent.remove_service(&name).await?;
    Ok(StatusCode::OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn with_header(json: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = base64::engine::general_purpose::URL_SAFE.encode(json);
        h.insert("x-registry-auth", v.parse().unwrap());
        h
    }

    #[test]
    fn x_registry_auth_is_read_as_dockers_client_sends_it() {
        let a = registry_auth(&with_header(
            r#"{"username":"u","password":"p?w>","serveraddress":"r:5000"}"#,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            (
                a.username.as_str(),
                a.password.as_str(),
                a.server_address.as_str()
            ),
            ("u", "p?w>", "r:5000")
        );
        // docker 20.10 sends the file's `auth` as it is.
        let token = base64::engine::general_purpose::STANDARD.encode("v:q");
        let a = registry_auth(&with_header(&format!(
            r#"{{"auth":"{token}","serveraddress":"r"}}"#
        )))
        .unwrap()
        .unwrap();
        assert_eq!((a.username.as_str(), a.password.as_str()), ("v", "q"));
        // No credentials for the registry: the client sends an empty config.
        assert!(registry_auth(&with_header("{}")).unwrap().is_none());
        assert!(registry_auth(&HeaderMap::new()).unwrap().is_none());
        for bad in [r#"{"identitytoken":"t","serveraddress":"r"}"#, "[1]"] {
            let e = registry_auth(&with_header(bad)).unwrap_err();
            assert!(e.message.starts_with("X-Registry-Auth: "), "{}", e.message);
        }
    }
}
