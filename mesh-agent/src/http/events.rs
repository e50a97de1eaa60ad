//! `GET /v1/events?since_ms=…&filter=key=value…`: cluster events as JSON lines, the ones
//! still remembered from `since_ms` on, then new ones as they happen, for as long as the
//! client keeps the connection (a chunked response that never ends by itself).

use std::{convert::Infallible, sync::Arc};

use axum::{
    body::{Body, Bytes},
    extract::{RawQuery, State},
    http::header,
    response::{IntoResponse, Response},
};
use tokio::sync::broadcast;

use crate::agent::{Agent, Error};
use mesh_api::events::{Event, Filter, parse_query};

fn line(e: &impl serde::Serialize) -> Result<Bytes, Infallible> {
    let mut json = serde_json::to_vec(e).unwrap_or_default();
    json.push(b'\n');
    Ok(Bytes::from(json))
}

pub(crate) async fn follow(
    State(agent): State<Arc<Agent>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Error> {
    let (since, filter) =
        parse_query(raw.as_deref().unwrap_or_default()).map_err(Error::Invalid)?;
    let permit = match super::STREAMS.open("event stream") {
        Ok(p) => p,
        Err(refused) => return Ok(*refused),
    };
    let (backlog, rx) = agent.events.subscribe(since);
    let backlog: std::collections::VecDeque<Event> =
        backlog.into_iter().filter(|e| filter.matches(e)).collect();
    struct Follow {
        backlog: std::collections::VecDeque<Event>,
        rx: broadcast::Receiver<Event>,
        filter: Filter,
        done: bool,
    }
    let state = Follow {
        backlog,
        rx,
        filter,
        done: false,
    };
    let lines = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        if let Some(e) = s.backlog.pop_front() {
            return Some((line(&e), s));
        }
        loop {
            match s.rx.recv().await {
                Ok(e) if s.filter.matches(&e) => return Some((line(&e), s)),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // A gap must not pass silently: say so and end; the client can resume
                    // with --since.
                    s.done = true;
                    let error = mesh_api::v1::ApiError {
                        error: format!(
                            "this reader fell {n} events behind and missed them; run again \
                             with --since to catch up"
                        ),
                    };
                    return Some((line(&error), s));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(crate::serving::holding(lines, permit)),
    )
        .into_response())
}
