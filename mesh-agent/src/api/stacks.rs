//! Routes for stacks (see `agent::stacks`).

use std::sync::Arc;

use axum::Router;

use crate::agent::Agent;

pub fn routes() -> Router<Arc<Agent>> {
    Router::new()
}
