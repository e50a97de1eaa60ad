//! Routes for volumes: `/v1/volumes` (every node's, from gossip), and `create`/`rm` on
//! this node.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path as UrlPath, State},
    routing::get,
};
use mesh_api::v1::{Volume, VolumeCreate};

use crate::agent::{Agent, Error};

type ApiResult<T> = Result<Json<T>, Error>;

pub fn routes() -> Router<Arc<Agent>> {
    Router::new()
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route(
            "/v1/volumes/{name}",
            get(inspect_volume).delete(remove_volume),
        )
}

async fn list_volumes(State(agent): State<Arc<Agent>>) -> ApiResult<Vec<Volume>> {
    let view = agent.refresh().await;
    let mut vols = view.volumes.clone();
    vols.sort_by(|a, b| (&a.name, &a.node).cmp(&(&b.name, &b.node)));
    Ok(Json(vols))
}

async fn create_volume(
    State(agent): State<Arc<Agent>>,
    Json(req): Json<VolumeCreate>,
) -> ApiResult<Volume> {
    Ok(Json(agent.create_volume(&req).await?))
}

/// Every node's volume of that name (a name may exist on several nodes).
async fn inspect_volume(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Vec<Volume>> {
    let view = agent.refresh().await;
    let found: Vec<Volume> = view
        .volumes
        .iter()
        .filter(|v| v.name == name)
        .cloned()
        .collect();
    if found.is_empty() {
        return Err(Error::NotFound(format!("get {name}: no such volume")));
    }
    Ok(Json(found))
}

async fn remove_volume(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<()> {
    agent.remove_volume(&name).await?;
    Ok(Json(()))
}
