//! Routes for secrets and configs (and their views). A secret's data enters in a request
//! body and leaves the agent only sealed (in gossip) or into a task's tmpfs: no answer here
//! carries it.

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path as UrlPath, State},
    routing::get,
};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use zeroize::Zeroizing;

use crate::{
    agent::{
        Agent, Error,
        secrets::{Kind, users},
    },
    cluster::View,
};
use mesh_api::{
    id::short_id,
    v1::{ConfigInfo, FileObjectCreate, SecretInfo},
};

type ApiResult<T> = Result<Json<T>, Error>;

pub fn routes() -> Router<Arc<Agent>> {
    Router::new()
        .route("/v1/secrets", get(list_secrets).post(create_secret))
        .route("/v1/secrets/{name}", get(get_secret).delete(remove_secret))
        .route("/v1/configs", get(list_configs).post(create_config))
        .route("/v1/configs/{name}", get(get_config).delete(remove_config))
}

pub(crate) fn secret_info(view: &View, name: &str) -> Option<SecretInfo> {
    let s = view.secrets.get(name)?;
    Some(SecretInfo {
        id: short_id(name, &s.created),
        name: name.to_owned(),
        labels: s.spec.labels.clone(),
        size: s.spec.size,
        key: s.spec.sealed.as_ref().map(|s| s.key),
        created_ms: s.created.ms,
        created_by: s.created.node.clone(),
        services: users(view, Kind::Secret, name),
    })
}

pub(crate) fn config_info(view: &View, name: &str) -> Option<ConfigInfo> {
    let c = view.configs.get(name)?;
    Some(ConfigInfo {
        id: short_id(name, &c.created),
        name: name.to_owned(),
        labels: c.spec.labels.clone(),
        size: BASE64.decode(&c.spec.data).map_or(0, |d| d.len()),
        data: c.spec.data.clone(),
        created_ms: c.created.ms,
        created_by: c.created.node.clone(),
        services: users(view, Kind::Config, name),
    })
}

/// The request's data, decoded; the error never echoes it.
fn decode(bytes: &Bytes) -> Result<(FileObjectCreate, Zeroizing<Vec<u8>>), Error> {
    let req: FileObjectCreate = serde_json::from_slice(bytes)
        .map_err(|_| Error::Invalid("malformed request: expected {name, data, labels}".into()))?;
    let data = Zeroizing::new(BASE64.decode(&req.data).map_err(|_| {
        Error::Invalid(format!(
            "malformed request: the data of {} is not base64",
            req.name
        ))
    })?);
    Ok((req, data))
}

async fn list_secrets(State(agent): State<Arc<Agent>>) -> ApiResult<Vec<SecretInfo>> {
    let view = agent.refresh().await;
    Ok(Json(
        view.secrets
            .keys()
            .filter_map(|n| secret_info(&view, n))
            .collect(),
    ))
}

async fn get_secret(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<SecretInfo> {
    let view = agent.refresh().await;
    secret_info(&view, &name).map(Json).ok_or_else(|| {
        Error::NotFound(format!("secret {name} not found (see `meshctl secret ls`)"))
    })
}

async fn create_secret(State(agent): State<Arc<Agent>>, bytes: Bytes) -> ApiResult<SecretInfo> {
    let (mut req, data) = decode(&bytes)?;
    req.data.clear();
    agent
        .create_secret(&req.name, &data, std::mem::take(&mut req.labels))
        .await?;
    secret_info(&agent.view(), &req.name)
        .map(Json)
        .ok_or_else(|| Error::Conflict(format!("secret {} vanished after creation", req.name)))
}

async fn remove_secret(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    agent.remove_file_object(Kind::Secret, &name).await?;
    Ok(Json(serde_json::json!({ "removed": name })))
}

async fn list_configs(State(agent): State<Arc<Agent>>) -> ApiResult<Vec<ConfigInfo>> {
    let view = agent.refresh().await;
    Ok(Json(
        view.configs
            .keys()
            .filter_map(|n| config_info(&view, n))
            .collect(),
    ))
}

async fn get_config(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<ConfigInfo> {
    let view = agent.refresh().await;
    config_info(&view, &name).map(Json).ok_or_else(|| {
        Error::NotFound(format!("config {name} not found (see `meshctl config ls`)"))
    })
}

async fn create_config(State(agent): State<Arc<Agent>>, bytes: Bytes) -> ApiResult<ConfigInfo> {
    let (mut req, data) = decode(&bytes)?;
    agent
        .create_config(&req.name, &data, std::mem::take(&mut req.labels))
        .await?;
    config_info(&agent.view(), &req.name)
        .map(Json)
        .ok_or_else(|| Error::Conflict(format!("config {} vanished after creation", req.name)))
}

async fn remove_config(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    agent.remove_file_object(Kind::Config, &name).await?;
    Ok(Json(serde_json::json!({ "removed": name })))
}
