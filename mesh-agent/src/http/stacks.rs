//! Routes for stacks (see `agent::stacks`): deploy takes the parsed file, so the agent
//! checks the whole stack against its view before it writes anything.

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path as UrlPath, State},
    routing::get,
};

use crate::{
    agent::stacks::stacks,
    agent::{Agent, Error},
};
use mesh_api::v1::{StackDeploy, StackReport};

pub fn routes() -> Router<Arc<Agent>> {
    Router::new()
        .route("/v1/stacks", get(list).post(deploy))
        .route("/v1/stacks/{name}", axum::routing::delete(remove))
}

async fn list(State(agent): State<Arc<Agent>>) -> Result<Json<Vec<(String, usize)>>, Error> {
    let view = agent.refresh().await;
    Ok(Json(stacks(&view).into_iter().collect()))
}

async fn deploy(State(agent): State<Arc<Agent>>, bytes: Bytes) -> Result<Json<StackReport>, Error> {
    let req: StackDeploy = mesh_api::v1::decode_request(&bytes).map_err(Error::Invalid)?;
    Ok(Json(agent.deploy_stack(&req).await?))
}

async fn remove(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Vec<String>>, Error> {
    Ok(Json(agent.remove_stack(&name).await?))
}
