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

/// The remembered events, then new ones as they come, as JSON lines; a reader that falls
/// further behind than the channel holds gets one error line saying so, and the stream ends
/// (a gap must never pass silently).
fn event_lines(
    backlog: Vec<Event>,
    rx: broadcast::Receiver<Event>,
    filter: Filter,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
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
    futures_util::stream::unfold(state, |mut s| async move {
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
    })
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
    let lines = event_lines(backlog, rx, filter);
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(crate::serving::holding(lines, permit)),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn event(i: u64) -> Event {
        serde_json::from_value(serde_json::json!({
            "time_ms": i, "type": "task", "action": "running", "actor": "web.1",
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn a_reader_that_falls_behind_is_told_how_many_it_missed_and_the_stream_ends() {
        let (tx, rx) = broadcast::channel(4);
        let lines = event_lines(vec![event(0)], rx, Filter::default());
        // The reader is stopped while 10 events pass through a channel of 4.
        for i in 1..=10 {
            tx.send(event(i)).unwrap();
        }
        let got: Vec<String> = lines
            .map(|l| String::from_utf8(l.unwrap().to_vec()).unwrap())
            .collect()
            .await;
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got[0].contains("\"time_ms\":0"),
            "the backlog first: {got:?}"
        );
        assert!(
            got[1].contains("fell 6 events behind") && got[1].contains("--since"),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn a_reader_that_keeps_up_gets_every_event_in_order() {
        let (tx, rx) = broadcast::channel(4);
        let mut lines = Box::pin(event_lines(Vec::new(), rx, Filter::default()));
        for i in 1..=10 {
            tx.send(event(i)).unwrap();
            let l = lines.next().await.unwrap().unwrap();
            assert!(String::from_utf8_lossy(&l).contains(&format!("\"time_ms\":{i}")));
        }
    }
}
