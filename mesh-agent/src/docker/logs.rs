//! `GET /services/{id}/logs` (and `/tasks/{id}/logs`): the cluster-wide output of a
//! service's tasks ([`crate::http::logs::log_events`]) in Docker's multiplexed stream. Each
//! line carries the details the client needs to name its task and node
//! (`com.docker.swarm.node.id=…,com.docker.swarm.service.id=…,com.docker.swarm.task.id=…`).
//! Mesh keeps one output per task, so every line is sent as stdout.

use std::sync::Arc;

use axum::{
    body::{Body, Bytes},
    extract::{Path, Query, State},
    http::header,
    response::{IntoResponse, Response},
};
use futures_util::StreamExt;
use serde::Deserialize;

use super::{DockerError, nodes::node_id, services};
use crate::agent::Agent;
use mesh_api::v1::{LogEvent, LogLine, LogsQuery};

/// Docker's query: booleans as `1`/`true`, `tail` as `all` or N, `since` as Unix seconds.
#[derive(Deserialize, Default)]
pub struct DockerLogsQuery {
    #[serde(default)]
    follow: Option<String>,
    #[serde(default)]
    stdout: Option<String>,
    #[serde(default)]
    stderr: Option<String>,
    #[serde(default)]
    timestamps: Option<String>,
    #[serde(default)]
    tail: Option<String>,
    #[serde(default)]
    since: Option<String>,
}

fn truthy(v: &Option<String>) -> bool {
    matches!(v.as_deref(), Some("1" | "true" | "True" | "TRUE"))
}

impl DockerLogsQuery {
    fn to_mesh(&self) -> Result<LogsQuery, DockerError> {
        let tail = match self.tail.as_deref() {
            None | Some("") | Some("all") => None,
            Some(n) => Some(n.parse::<u64>().map_err(|_| {
                DockerError::bad_request(format!("invalid tail {n:?}: a number or \"all\""))
            })?),
        };
        let since_ns = match self.since.as_deref() {
            None | Some("") | Some("0") => None,
            Some(s) => {
                let secs: f64 = s.parse().map_err(|_| {
                    DockerError::bad_request(format!(
                        "invalid since {s:?}: Unix seconds (the client converts durations)"
                    ))
                })?;
                Some((secs * 1e9) as i64)
            }
        };
        Ok(LogsQuery {
            follow: truthy(&self.follow),
            tail,
            since_ns,
        })
    }
}

/// One frame of Docker's multiplexed stream: stream 1 (stdout) or 2 (stderr), the length,
/// the bytes.
pub fn frame(stream: u8, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&[stream, 0, 0, 0]);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

pub async fn service_logs(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Query(q): Query<DockerLogsQuery>,
) -> Result<Response, DockerError> {
    if !truthy(&q.stdout) && !truthy(&q.stderr) {
        return Err(DockerError::bad_request(
            "Bad parameters: you must choose at least one stream",
        ));
    }
    let Ok(permit) = super::STREAMS.open("log stream") else {
        return Err(DockerError {
            status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
            message: format!(
                "too many open log streams on this agent ({} at once): close one and retry",
                crate::serving::MAX_STREAMS
            ),
        });
    };
    let view = agent.refresh().await;
    let name = services::resolve(&view, &id).or_else(|e| {
        // A task ID (or its prefix) names one task's output, as Docker's does.
        if view
            .tasks
            .iter()
            .any(|t| !id.is_empty() && t.id.starts_with(&id))
        {
            Ok(id.clone())
        } else {
            Err(e)
        }
    })?;
    let query = q.to_mesh()?;
    let timestamps = truthy(&q.timestamps);
    let stdout = truthy(&q.stdout);
    let events = crate::http::logs::log_events(agent.clone(), &name, query).await?;
    let service_ids: std::collections::BTreeMap<String, String> = view
        .services
        .keys()
        .map(|n| (n.clone(), services::service_id(&view, n)))
        .collect();
    let body = events.filter_map(move |e| {
        let out = match e {
            LogEvent::Line(l) => {
                let details = details(
                    &node_id(&l.node),
                    service_ids.get(&l.service).map_or("", String::as_str),
                    &l,
                );
                let mut text = String::new();
                if timestamps {
                    text.push_str(&mesh_api::v1::format_timestamp(l.time_ns));
                    text.push(' ');
                }
                text.push_str(&details);
                text.push(' ');
                text.push_str(&l.line);
                text.push('\n');
                // Mesh keeps one output per task: it is stdout, and a client that asked
                // for stderr only gets nothing.
                stdout.then(|| frame(1, text.as_bytes()))
            }
            // Why some output is missing goes to stderr, as the client prints it.
            LogEvent::Warning(w) => Some(frame(2, format!("{w}\n").as_bytes())),
        };
        std::future::ready(out.map(Ok::<_, std::io::Error>))
    });
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/vnd.docker.multiplexed-stream",
        )],
        Body::from_stream(crate::serving::holding(body, permit)),
    )
        .into_response())
}

/// The details Docker's daemon puts before each line of a service's output: the task's swarm
/// ids (the client names the task and node from them) and the attributes its log options
/// name, each key and value query-escaped, sorted, joined by commas.
fn details(node_id: &str, service_id: &str, l: &LogLine) -> String {
    let escape = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let mut pairs: Vec<String> = [
        ("com.docker.swarm.node.id", node_id),
        ("com.docker.swarm.service.id", service_id),
        ("com.docker.swarm.task.id", l.task.as_str()),
    ]
    .into_iter()
    .chain(l.attrs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
    .collect();
    pairs.sort();
    pairs.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_stream_and_length() {
        let f = frame(1, b"hello\n");
        assert_eq!(&f[..8], &[1, 0, 0, 0, 0, 0, 0, 6]);
        assert_eq!(&f[8..], b"hello\n");
        assert_eq!(frame(2, &[0; 300])[4..8], [0, 0, 1, 44]);
    }

    #[test]
    fn dockers_query_maps_to_meshs() {
        let q = DockerLogsQuery {
            follow: Some("1".into()),
            tail: Some("5".into()),
            since: Some("1700000000.5".into()),
            ..Default::default()
        };
        let m = q.to_mesh().unwrap();
        assert!(m.follow);
        assert_eq!(m.tail, Some(5));
        assert_eq!(m.since_ns, Some(1_700_000_000_500_000_000));
        let bad = DockerLogsQuery {
            tail: Some("many".into()),
            ..Default::default()
        };
        assert!(bad.to_mesh().is_err());
    }

    #[test]
    fn details_carry_the_swarm_ids_and_the_attributes_escaped() {
        let l = LogLine {
            service: "web".into(),
            slot: "1".into(),
            task: "t1".into(),
            node: "n1".into(),
            time_ns: 0,
            line: "hi".into(),
            attrs: [("team", "a b"), ("REGION", "eu,west")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
        };
        assert_eq!(
            details("N", "S", &l),
            "REGION=eu%2Cwest,com.docker.swarm.node.id=N,com.docker.swarm.service.id=S,\
             com.docker.swarm.task.id=t1,team=a+b"
        );
    }
}
