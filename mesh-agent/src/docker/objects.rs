//! `/networks*` (overlay networks only), `/secrets*` and `/configs*`.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::StatusCode,
    routing::{get, post},
};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    DockerError, DockerResult, Filters, FiltersQuery, body, spec::NetworkNames, timestamp,
};
use crate::{
    agent::{Agent, Error, secrets::Kind},
    answers::network_info,
    cluster::View,
};
use mesh_api::id::{Stamp, short_id};

pub fn routes() -> Router<Arc<Agent>> {
    Router::new()
        .route("/networks", get(list_networks))
        .route("/networks/create", post(create_network))
        .route(
            "/networks/{id}",
            get(inspect_network).delete(remove_network),
        )
        .route("/secrets", get(list_secrets))
        .route("/secrets/create", post(create_secret))
        .route("/secrets/{id}", get(inspect_secret).delete(remove_secret))
        .route("/secrets/{id}/update", post(update_secret))
        .route("/configs", get(list_configs))
        .route("/configs/create", post(create_config))
        .route("/configs/{id}", get(inspect_config).delete(remove_config))
        .route("/configs/{id}/update", post(update_config))
}

/// A secret's or config's ID: stable for its name (they cannot change, only be re-created).
pub fn object_id(kind: &str, name: &str) -> String {
    short_id(
        name,
        &Stamp {
            ms: 0,
            node: kind.into(),
        },
    )
}

impl NetworkNames for View {
    fn network_name(&self, id_or_name: &str) -> Option<String> {
        if self.networks.contains_key(id_or_name) {
            return Some(id_or_name.to_owned());
        }
        let matches: Vec<&String> = self
            .networks
            .iter()
            .filter(|(n, r)| short_id(n, &r.created).starts_with(id_or_name))
            .map(|(n, _)| n)
            .collect();
        match matches.as_slice() {
            [one] if !id_or_name.is_empty() => Some((*one).clone()),
            _ => None,
        }
    }

    fn network_id(&self, name: &str) -> String {
        self.networks
            .get(name)
            .map(|r| short_id(name, &r.created))
            .unwrap_or_else(|| name.to_owned())
    }
}

// ---- networks ----------------------------------------------------------------------------

fn network(view: &View, name: &str) -> Option<Value> {
    let info = network_info(view, name)?;
    let r = view.networks.get(name)?;
    let created = timestamp(r.created.ms);
    Some(json!({
        "Name": name,
        "Id": info.id,
        "Created": created,
        "Scope": "swarm",
        "Driver": "overlay",
        "EnableIPv6": false,
        "IPAM": {
            "Driver": "default",
            "Options": null,
            "Config": [{ "Subnet": info.subnet, "Gateway": info.gateway.to_string() }],
        },
        "Internal": false,
        "Attachable": false,
        "Ingress": false,
        "ConfigFrom": { "Network": "" },
        "ConfigOnly": false,
        "Containers": {},
        "Options": {
            "com.docker.network.driver.overlay.vxlanid_list": info.vni.to_string(),
        },
        "Labels": r.spec.labels,
    }))
}

async fn list_networks(
    State(agent): State<Arc<Agent>>,
    Query(q): Query<FiltersQuery>,
) -> DockerResult<Vec<Value>> {
    let filters = Filters::parse(&q)?;
    filters.only(&["label", "name", "id", "driver", "scope", "type"])?;
    let view = agent.refresh().await;
    Ok(Json(
        view.networks
            .iter()
            .filter(|(n, r)| {
                filters.matches("name", |v| n.contains(v))
                    && filters.matches("id", |v| short_id(n, &r.created).starts_with(v))
                    && filters.matches("driver", |v| v == "overlay")
                    && filters.matches("scope", |v| v == "swarm")
                    && filters.matches("type", |v| v == "custom")
                    && filters.labels_match(&r.spec.labels)
            })
            .filter_map(|(n, _)| network(&view, n))
            .collect(),
    ))
}

fn network_name(view: &View, id: &str) -> Result<String, DockerError> {
    view.network_name(id)
        .ok_or_else(|| DockerError::not_found(format!("network {id} not found")))
}

async fn inspect_network(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> DockerResult<Value> {
    let view = agent.refresh().await;
    let name = network_name(&view, &id)?;
    network(&view, &name)
        .map(Json)
        .ok_or_else(|| DockerError::not_found(format!("network {id} not found")))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct NetworkCreate {
    name: String,
    #[serde(default)]
    check_duplicate: Option<bool>,
    #[serde(default)]
    driver: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    internal: Option<bool>,
    #[serde(default)]
    attachable: Option<bool>,
    #[serde(default)]
    ingress: Option<bool>,
    #[serde(default, rename = "IPAM")]
    ipam: Option<Ipam>,
    #[serde(default, rename = "EnableIPv6")]
    enable_ipv6: Option<bool>,
    #[serde(default)]
    options: Option<BTreeMap<String, String>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    config_only: Option<bool>,
    #[serde(default)]
    config_from: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct Ipam {
    #[serde(default)]
    driver: Option<String>,
    #[serde(default)]
    config: Option<Vec<IpamConfig>>,
    #[serde(default)]
    options: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct IpamConfig {
    #[serde(default)]
    subnet: Option<String>,
    #[serde(default, rename = "IPRange")]
    ip_range: Option<String>,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    auxiliary_addresses: Option<BTreeMap<String, String>>,
}

/// The subnet the request asks for, after refusing what mesh's overlay cannot do.
fn check_network(req: &NetworkCreate) -> Result<Option<String>, DockerError> {
    let no = |what: &str| {
        Err(DockerError::bad_request(format!(
            "{what} is not supported by mesh: its networks are swarm-scoped overlays"
        )))
    };
    match req.driver.as_deref() {
        Some("overlay") => {}
        None | Some("") | Some("bridge") => {
            return Err(DockerError::bad_request(
                "mesh creates overlay networks only: pass --driver overlay (-d overlay)",
            ));
        }
        Some(other) => return no(&format!("driver {other:?}")),
    }
    if matches!(req.scope.as_deref(), Some(s) if !s.is_empty() && s != "swarm") {
        return no("a scope other than swarm");
    }
    if req.internal == Some(true) {
        return no("an internal network");
    }
    if req.attachable == Some(true) {
        return no("an attachable network (tasks join through services)");
    }
    if req.ingress == Some(true) {
        return no("--ingress (every service's published ports use the routing mesh)");
    }
    if req.enable_ipv6 == Some(true) {
        return no("IPv6");
    }
    if req.config_only == Some(true) || req.config_from.as_ref().is_some_and(|v| !v.is_null()) {
        return no("--config-only/--config-from");
    }
    if let Some(o) = req.options.as_ref().filter(|o| !o.is_empty()) {
        let keys: Vec<&str> = o.keys().map(String::as_str).collect();
        return no(&format!("option {}", keys.join(", ")));
    }
    let _ = req.check_duplicate;
    let Some(ipam) = &req.ipam else {
        return Ok(None);
    };
    if matches!(ipam.driver.as_deref(), Some(d) if !d.is_empty() && d != "default") {
        return no("an IPAM driver");
    }
    if ipam.options.as_ref().is_some_and(|o| !o.is_empty()) {
        return no("IPAM options");
    }
    match ipam.config.as_deref().unwrap_or_default() {
        [] => Ok(None),
        [c] => {
            if c.ip_range.as_ref().is_some_and(|r| !r.is_empty()) {
                return no("--ip-range");
            }
            if c.gateway.as_ref().is_some_and(|g| !g.is_empty()) {
                return no("--gateway (the first address of the subnet is the gateway)");
            }
            if c.auxiliary_addresses
                .as_ref()
                .is_some_and(|a| !a.is_empty())
            {
                return no("--aux-address");
            }
            Ok(c.subnet.clone().filter(|s| !s.is_empty()))
        }
        _ => no("more than one subnet"),
    }
}

async fn create_network(
    State(agent): State<Arc<Agent>>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Value>), DockerError> {
    let req: NetworkCreate = body(&bytes)?;
    let subnet = check_network(&req)?;
    let labels = req.labels.clone().unwrap_or_default();
    let r = agent
        .create_network(&req.name, subnet.as_deref(), &labels)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "Id": short_id(&req.name, &r.created), "Warning": "" })),
    ))
}

async fn remove_network(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<StatusCode, DockerError> {
    let view = agent.refresh().await;
    let name = network_name(&view, &id)?;
    // `docker stack rm` removes a network right after its services, as Swarm allows: the
    // removed services' tasks leave it while they stop (their grace period), so wait for
    // them. A network a service still names is refused at once.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match agent.remove_network(&name).await {
            Err(Error::Conflict(_))
                if tokio::time::Instant::now() < deadline
                    && !agent
                        .refresh()
                        .await
                        .services
                        .values()
                        .any(|s| s.spec.network == name) =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
            r => {
                r?;
                return Ok(StatusCode::NO_CONTENT);
            }
        }
    }
}

// ---- secrets and configs -----------------------------------------------------------------

fn file_object(
    kind: &str,
    name: &str,
    r: &crate::cluster::Replicated<impl Sized>,
    labels: &BTreeMap<String, String>,
    data: Option<&str>,
) -> Value {
    let mut spec = json!({ "Name": name, "Labels": labels });
    if let Some(d) = data {
        spec["Data"] = json!(d);
    }
    json!({
        "ID": object_id(kind, name),
        "Version": { "Index": r.updated.ms },
        "CreatedAt": timestamp(r.created.ms),
        "UpdatedAt": timestamp(r.updated.ms),
        "Spec": spec,
    })
}

fn secret(view: &View, name: &str) -> Option<Value> {
    let r = view.secrets.get(name)?;
    // A secret's data never leaves the cluster through the API, as in Docker.
    Some(file_object("secret", name, r, &r.spec.labels, None))
}

fn config(view: &View, name: &str) -> Option<Value> {
    let r = view.configs.get(name)?;
    Some(file_object(
        "config",
        name,
        r,
        &r.spec.labels,
        Some(&r.spec.data),
    ))
}

/// The name of a secret or config given by name, ID or ID prefix.
fn object_name<'a>(
    kind: &str,
    mut names: impl Iterator<Item = &'a String>,
    id: &str,
) -> Result<String, DockerError> {
    let found = names.find(|n| *n == id || (!id.is_empty() && object_id(kind, n).starts_with(id)));
    found
        .cloned()
        .ok_or_else(|| DockerError::not_found(format!("{kind} {id} not found")))
}

fn labels_of_filter(
    filters: &Filters,
    kind: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    filters.matches("name", |v| name.starts_with(v))
        && filters.matches("id", |v| object_id(kind, name).starts_with(v))
        && filters.labels_match(labels)
}

async fn list_secrets(
    State(agent): State<Arc<Agent>>,
    Query(q): Query<FiltersQuery>,
) -> DockerResult<Vec<Value>> {
    let filters = Filters::parse(&q)?;
    filters.only(&["label", "name", "id", "names"])?;
    let view = agent.refresh().await;
    Ok(Json(
        view.secrets
            .iter()
            .filter(|(n, r)| {
                labels_of_filter(&filters, "secret", n, &r.spec.labels)
                    && filters.matches("names", |v| v == n.as_str())
            })
            .filter_map(|(n, _)| secret(&view, n))
            .collect(),
    ))
}

async fn list_configs(
    State(agent): State<Arc<Agent>>,
    Query(q): Query<FiltersQuery>,
) -> DockerResult<Vec<Value>> {
    let filters = Filters::parse(&q)?;
    filters.only(&["label", "name", "id", "names"])?;
    let view = agent.refresh().await;
    Ok(Json(
        view.configs
            .iter()
            .filter(|(n, r)| {
                labels_of_filter(&filters, "config", n, &r.spec.labels)
                    && filters.matches("names", |v| v == n.as_str())
            })
            .filter_map(|(n, _)| config(&view, n))
            .collect(),
    ))
}

async fn inspect_secret(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> DockerResult<Value> {
    let view = agent.refresh().await;
    let name = object_name("secret", view.secrets.keys(), &id)?;
    secret(&view, &name)
        .map(Json)
        .ok_or_else(|| DockerError::not_found(format!("secret {id} not found")))
}

async fn inspect_config(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> DockerResult<Value> {
    let view = agent.refresh().await;
    let name = object_name("config", view.configs.keys(), &id)?;
    config(&view, &name)
        .map(Json)
        .ok_or_else(|| DockerError::not_found(format!("config {id} not found")))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct FileCreate {
    name: String,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    driver: Option<Value>,
    #[serde(default)]
    templating: Option<Value>,
}

impl FileCreate {
    fn decode(
        bytes: &[u8],
        kind: &str,
    ) -> Result<(Self, zeroize::Zeroizing<Vec<u8>>), DockerError> {
        let req: Self = body(bytes)?;
        if req.driver.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(DockerError::bad_request(format!(
                "{kind} drivers are not supported by mesh: the data is stored in the cluster"
            )));
        }
        if req.templating.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(DockerError::bad_request(format!(
                "{kind} templating is not supported by mesh"
            )));
        }
        let data = BASE64
            .decode(req.data.as_deref().unwrap_or_default())
            .map_err(|_| DockerError::bad_request(format!("{kind} data is not valid base64")))?;
        Ok((req, zeroize::Zeroizing::new(data)))
    }
}

async fn create_secret(
    State(agent): State<Arc<Agent>>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Value>), DockerError> {
    let (req, data) = FileCreate::decode(&bytes, "secret")?;
    agent
        .create_secret(&req.name, &data, req.labels.unwrap_or_default())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "ID": object_id("secret", &req.name) })),
    ))
}

async fn create_config(
    State(agent): State<Arc<Agent>>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Value>), DockerError> {
    let (req, data) = FileCreate::decode(&bytes, "config")?;
    agent
        .create_config(&req.name, &data, req.labels.unwrap_or_default())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "ID": object_id("config", &req.name) })),
    ))
}

async fn remove_secret(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<StatusCode, DockerError> {
    let view = agent.refresh().await;
    let name = object_name("secret", view.secrets.keys(), &id)?;
    agent.remove_file_object(Kind::Secret, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_config(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<StatusCode, DockerError> {
    let view = agent.refresh().await;
    let name = object_name("config", view.configs.keys(), &id)?;
    agent.remove_file_object(Kind::Config, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `?version=` of an update: the object's `Version.Index` as the client read it.
#[derive(Deserialize)]
struct VersionQuery {
    version: Option<u64>,
}

/// Docker lets an update change only a secret's or config's labels; mesh's objects do not
/// change at all. An update that changes nothing is what `docker stack deploy` sends for
/// the stack's existing objects on every redeploy, so it is answered 200 and writes
/// nothing; a change is refused by what it would change.
fn check_unchanged(
    kind: &str,
    name: &str,
    current: (&BTreeMap<String, String>, u64, &[u8]),
    req: &FileCreate,
    sent: (Option<u64>, &[u8]),
) -> Result<StatusCode, DockerError> {
    let (labels, version, data) = current;
    let (sent_version, sent_data) = sent;
    if let Some(v) = sent_version.filter(|v| *v != version) {
        return Err(DockerError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!(
                "rpc error: code = Unknown desc = update out of sequence: {kind} {name} is at \
                 version {version}, not {v}; inspect it again and retry"
            ),
        });
    }
    if req.name != name {
        return Err(DockerError::bad_request(format!(
            "renaming {kind}s is not supported: {name} cannot become {}",
            req.name
        )));
    }
    // Docker's own rule: the data may be left out of an update, or sent unchanged.
    if !sent_data.is_empty() && sent_data != data {
        return Err(DockerError::bad_request(format!(
            "only updates to Labels are allowed: {kind} {name}'s data cannot change; create \
             one under a new name (e.g. {name}_v2) and switch services to it"
        )));
    }
    if req.labels.clone().unwrap_or_default() != *labels {
        return Err(DockerError::bad_request(format!(
            "{kind} {name}'s labels cannot change in mesh: create one under a new name and \
             switch services to it"
        )));
    }
    Ok(StatusCode::OK)
}

async fn update_secret(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Query(q): Query<VersionQuery>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<crate::serving::Peer>>>,
    bytes: Bytes,
) -> Result<StatusCode, DockerError> {
    let (req, sent) = FileCreate::decode(&bytes, "secret")?;
    // An answer to "is this the secret's data?" would let the socket's group test guesses;
    // only root, who may read the cluster key anyway, gets it.
    let root = peer.is_some_and(|axum::Extension(axum::extract::ConnectInfo(p))| p.uid == Some(0));
    if !sent.is_empty() && !root {
        return Err(DockerError {
            status: StatusCode::FORBIDDEN,
            message: "only root may update a secret with its data (it is compared with the \
                      sealed data): run the command as root, or leave the data out"
                .into(),
        });
    }
    let view = agent.refresh().await;
    let name = object_name("secret", view.secrets.keys(), &id)?;
    let r = &view.secrets[&name];
    // Comparing the data means opening the sealed secret here, on an admin's socket; it
    // goes no further than this comparison.
    let data = if sent.is_empty() {
        zeroize::Zeroizing::new(Vec::new())
    } else {
        agent
            .open_secret(&r.spec)
            .map_err(|e| DockerError::bad_request(e.to_string()))?
    };
    check_unchanged(
        "secret",
        &name,
        (&r.spec.labels, r.updated.ms, &data),
        &req,
        (q.version, &sent),
    )
}

async fn update_config(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Query(q): Query<VersionQuery>,
    bytes: Bytes,
) -> Result<StatusCode, DockerError> {
    let (req, sent) = FileCreate::decode(&bytes, "config")?;
    let view = agent.refresh().await;
    let name = object_name("config", view.configs.keys(), &id)?;
    let r = &view.configs[&name];
    let data = BASE64
        .decode(&r.spec.data)
        .map_err(|_| DockerError::bad_request(format!("config {name}'s stored data is damaged")))?;
    check_unchanged(
        "config",
        &name,
        (&r.spec.labels, r.updated.ms, &data),
        &req,
        (q.version, &sent),
    )
}
