//! `GET /events`: the cluster's events ([`crate::events`]) as Docker's event JSON. Services
//! and nodes keep their types with Docker's actions (`create`, `update`, `remove`); tasks,
//! which the Engine API has no events for, show as `container` events of the task (`create`,
//! `start`, `die`, `stop`), with the swarm labels a container of a task carries.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::header,
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::{DockerError, Filters, FiltersQuery, nodes::node_id};
use crate::agent::Agent;
use mesh_api::events::{Event, Kind, NodeAction, ServiceAction, TaskAction};

#[derive(Deserialize, Default)]
pub struct EventsQuery {
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
    #[serde(default)]
    filters: Option<String>,
}

/// Docker's time parameters: Unix seconds, with a fraction.
fn unix_ms(v: &Option<String>, what: &str) -> Result<Option<u64>, DockerError> {
    match v.as_deref() {
        None | Some("") => Ok(None),
        Some(s) => s
            .parse::<f64>()
            .map(|secs| Some((secs * 1000.0) as u64))
            .map_err(|_| DockerError::bad_request(format!("invalid {what} {s:?}: Unix seconds"))),
    }
}

/// The event as Docker's JSON, or None for what Docker has no event for.
pub fn docker_event(e: &Event) -> Option<Value> {
    let (kind, action, id, mut attributes) = match e.kind {
        Kind::Service(a) => {
            let action = match a {
                ServiceAction::Created => "create",
                ServiceAction::Removed => "remove",
                _ => "update",
            };
            let mut attrs = BTreeMap::from([("name".to_owned(), e.actor.clone())]);
            if !matches!(a, ServiceAction::Created | ServiceAction::Removed) {
                attrs.insert("updatestate.new".into(), e.kind.action_name());
            }
            ("service", action, e.id.clone().unwrap_or_default(), attrs)
        }
        Kind::Node(a) => {
            let mut attrs = BTreeMap::from([("name".to_owned(), e.actor.clone())]);
            match a {
                NodeAction::Ready => attrs.insert("state.new".into(), "ready".into()),
                NodeAction::Down => attrs.insert("state.new".into(), "down".into()),
                NodeAction::Drain => attrs.insert("availability.new".into(), "drain".into()),
                NodeAction::Active => attrs.insert("availability.new".into(), "active".into()),
                // Docker has no event for an impostor refused: meshctl events shows it.
                NodeAction::Refused => return None,
            };
            ("node", "update", node_id(&e.actor), attrs)
        }
        Kind::Task(a) => {
            let action = match a {
                TaskAction::Started => "create",
                TaskAction::Running => "start",
                TaskAction::Failed | TaskAction::Rejected | TaskAction::Complete => "die",
                TaskAction::Stopped => "stop",
            };
            let mut attrs = BTreeMap::from([
                ("com.docker.swarm.task.name".to_owned(), e.actor.clone()),
                ("name".to_owned(), e.actor.clone()),
            ]);
            if let Some(s) = &e.service {
                attrs.insert("com.docker.swarm.service.name".into(), s.clone());
            }
            if let Some(n) = &e.node {
                attrs.insert("com.docker.swarm.node.id".into(), node_id(n));
            }
            if let Some(id) = &e.id {
                attrs.insert("com.docker.swarm.task.id".into(), id.clone());
            }
            ("container", action, e.id.clone().unwrap_or_default(), attrs)
        }
    };
    for (k, v) in &e.attributes {
        attributes.entry(k.clone()).or_insert_with(|| v.clone());
    }
    let ns = e.time_ms as i128 * 1_000_000;
    Some(json!({
        "Type": kind,
        "Action": action,
        "Actor": { "ID": id, "Attributes": attributes },
        "scope": if kind == "container" { "local" } else { "swarm" },
        "time": e.time_ms / 1000,
        "timeNano": ns,
    }))
}

fn wanted(f: &Filters, v: &Value) -> bool {
    let attr = |k: &str| {
        v["Actor"]["Attributes"][k]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    f.matches("type", |t| v["Type"] == t)
        && f.matches("event", |a| v["Action"] == a)
        && f.matches("scope", |s| v["scope"] == s)
        && f.matches("service", |s| {
            attr("com.docker.swarm.service.name") == s
                || (v["Type"] == "service" && attr("name") == s)
        })
        && f.matches("node", |n| {
            attr("com.docker.swarm.node.id").starts_with(n)
                || (v["Type"] == "node" && attr("name") == n)
        })
}

fn line(v: &Value) -> Result<Bytes, std::convert::Infallible> {
    let mut json = serde_json::to_vec(v).unwrap_or_default();
    json.push(b'\n');
    Ok(Bytes::from(json))
}

pub async fn follow(
    State(agent): State<Arc<Agent>>,
    Query(q): Query<EventsQuery>,
) -> Result<Response, DockerError> {
    let filters = Filters::parse(&FiltersQuery {
        filters: q.filters.clone(),
        status: None,
    })?;
    filters.only(&["type", "event", "scope", "service", "node"])?;
    let since = unix_ms(&q.since, "since")?;
    let until = unix_ms(&q.until, "until")?;
    let Ok(permit) = super::STREAMS.open("event stream") else {
        return Err(DockerError {
            status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
            message: "too many open event and log streams on this agent: close one and retry"
                .into(),
        });
    };
    let (backlog, rx) = agent.events.subscribe(since);
    let backlog: std::collections::VecDeque<Value> = backlog
        .iter()
        .filter(|e| until.is_none_or(|u| e.time_ms <= u))
        .filter_map(docker_event)
        .filter(|v| wanted(&filters, v))
        .collect();
    // With `until`, the stream ends at that time, as dockerd's does.
    let deadline = until.map(|u| {
        let left = u.saturating_sub(mesh_api::id::now_ms());
        tokio::time::Instant::now() + std::time::Duration::from_millis(left)
    });
    let state = (backlog, rx, filters);
    let lines =
        futures_util::stream::unfold(state, move |(mut backlog, mut rx, filters)| async move {
            if let Some(v) = backlog.pop_front() {
                return Some((line(&v), (backlog, rx, filters)));
            }
            loop {
                let next = match deadline {
                    Some(d) => match tokio::time::timeout_at(d, rx.recv()).await {
                        Ok(r) => r,
                        Err(_) => return None,
                    },
                    None => rx.recv().await,
                };
                match next {
                    Ok(e) => {
                        if let Some(v) = docker_event(&e).filter(|v| wanted(&filters, v)) {
                            return Some((line(&v), (backlog, rx, filters)));
                        }
                    }
                    // A reader that fell behind ends rather than skip events silently.
                    Err(broadcast::error::RecvError::Lagged(_))
                    | Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(crate::serving::holding(lines, permit)),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_take_dockers_shape() {
        let e = Event {
            time_ms: 1_500,
            kind: Kind::Service(ServiceAction::Created),
            actor: "web".into(),
            id: Some("abc".into()),
            service: Some("web".into()),
            node: None,
            attributes: Default::default(),
        };
        let v = docker_event(&e).unwrap();
        assert_eq!(v["Type"], "service");
        assert_eq!(v["Action"], "create");
        assert_eq!(v["Actor"]["ID"], "abc");
        assert_eq!(v["Actor"]["Attributes"]["name"], "web");
        assert_eq!(v["time"], 1);
        assert_eq!(v["timeNano"], 1_500_000_000i64);
        let t = Event {
            kind: Kind::Task(TaskAction::Running),
            actor: "web.1".into(),
            node: Some("n1".into()),
            ..e
        };
        let v = docker_event(&t).unwrap();
        assert_eq!(
            (v["Type"].as_str(), v["Action"].as_str()),
            (Some("container"), Some("start"))
        );
        assert_eq!(
            v["Actor"]["Attributes"]["com.docker.swarm.service.name"],
            "web"
        );
    }
}
