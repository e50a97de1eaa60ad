//! `service logs`: the output of every task of a service, wherever it runs, merged.
//!
//! The agent asked reads its own tasks' output and asks every other node that runs (or ran)
//! one over the sealed node-to-node path ([`super::peer_logs`]). Without `follow` the lines of
//! all tasks are merged by time; with it they interleave as they arrive. The answer is one
//! JSON [`LogEvent`] per line; a node that cannot be read gives a warning event, not a hang.

use std::{collections::BTreeSet, net::SocketAddr, sync::Arc};

use axum::{
    extract::{Path as UrlPath, Query, State},
    response::Response,
};
use futures_util::{StreamExt, stream::BoxStream};
use mesh_api::{
    spec::{NodeStatus, Protocol},
    v1::{LogEvent, LogLine, LogsQuery},
};

use super::peer_logs::{self, PeerRequest};
use crate::agent::{Agent, Error};

/// This node's tasks of `service` as events: only those named in `tasks` (full ids) unless it
/// is empty.
pub fn local_events(
    agent: &Agent,
    service: &str,
    tasks: &[String],
    query: &LogsQuery,
) -> BoxStream<'static, LogEvent> {
    let Some(local) = agent.local() else {
        return futures_util::stream::empty().boxed();
    };
    let node = agent.node_name().to_owned();
    let mut streams = Vec::new();
    for r in local.tasks.list() {
        let Some((slot, id)) = task_of(&r.spec.name, service) else {
            continue;
        };
        if !tasks.is_empty() && !tasks.iter().any(|t| t == id) {
            continue;
        }
        let line = {
            let (service, slot, id, node) = (
                service.to_owned(),
                slot.to_owned(),
                id.to_owned(),
                node.clone(),
            );
            let attrs = r
                .spec
                .run
                .log
                .attributes(&r.spec.run.container_labels, &r.spec.env);
            move |(time_ns, line)| {
                LogEvent::Line(LogLine {
                    service: service.clone(),
                    slot: slot.clone(),
                    task: id.clone(),
                    node: node.clone(),
                    time_ns,
                    line,
                    attrs: attrs.clone(),
                })
            }
        };
        let name = r.spec.name.clone();
        match local.tasks.logs(&name, query).map(|l| l.into_lines()) {
            Ok(Ok(lines)) => streams.push(
                lines
                    .map(move |l| match l {
                        Ok(l) => line(l),
                        Err(e) => LogEvent::Warning(format!("reading the output of {name}: {e}")),
                    })
                    .boxed(),
            ),
            Ok(Err(e)) => streams.push(warning(format!("reading the output of {name}: {e}"))),
            Err(e) => streams.push(warning(format!("{e:#}"))),
        }
    }
    futures_util::stream::select_all(streams).boxed()
}

fn warning(w: String) -> BoxStream<'static, LogEvent> {
    futures_util::stream::iter([LogEvent::Warning(w)]).boxed()
}

/// `web.2.<id>` of service `web`: its slot and task id.
fn task_of<'n>(name: &'n str, service: &str) -> Option<(&'n str, &'n str)> {
    name.strip_prefix(service)?
        .strip_prefix('.')?
        .rsplit_once('.')
}

/// Where a node's node-to-node API listens: the TCP port its record reserves for it, on its
/// address (an agent from before it existed reserves none: it is not asked).
pub(super) fn peer_address(view: &crate::cluster::View, node: &str) -> Option<SocketAddr> {
    let record = view.nodes.get(node)?.record.as_ref()?;
    let port = record
        .reserved_ports
        .iter()
        .find(|p| p.protocol == Protocol::Tcp && p.used_by == peer_logs::USED_BY)?
        .port;
    Some(SocketAddr::from((record.address, port)))
}

/// The output of `service`'s tasks (or task `task`) on `node`.
fn source(
    agent: &Agent,
    view: &crate::cluster::View,
    node: &str,
    service: &str,
    tasks: Vec<String>,
    query: &LogsQuery,
) -> BoxStream<'static, LogEvent> {
    if node == agent.node_name() {
        return local_events(agent, service, &tasks, query);
    }
    let down = view
        .nodes
        .get(node)
        .is_none_or(|n| n.status != NodeStatus::Ready);
    match (down, agent.gossip.auth(), peer_address(view, node)) {
        (true, ..) => warning(format!(
            "the logs of tasks on node {node} are left out: the node is down"
        )),
        (_, None, _) => warning(format!(
            "the logs of tasks on node {node} are left out: without a cluster key agents \
             do not read each other's logs (run `meshctl service logs` there)"
        )),
        (_, _, None) => warning(format!(
            "the logs of tasks on node {node} are left out: its agent is too old to serve them"
        )),
        (false, Some(auth), Some(addr)) => peer_logs::ask(
            auth.clone(),
            node.to_owned(),
            addr,
            PeerRequest {
                service: service.to_owned(),
                tasks,
                query: query.clone(),
            },
        ),
    }
}

/// Whether a task got as far as its node making its record (and its output file).
fn started(t: &mesh_planner::Task) -> bool {
    use mesh_planner::TaskState::*;
    !matches!(t.state, New | Assigned | Preparing)
}

/// How often a followed service is checked for tasks that started since.
const NEW_TASKS: std::time::Duration = std::time::Duration::from_secs(1);

/// `merged`, joined by the output of every task of `service` that starts later (a scaled
/// service, a replaced task), from its first line.
fn with_new_tasks(
    agent: Arc<Agent>,
    service: String,
    known: BTreeSet<String>,
    merged: futures_util::stream::SelectAll<BoxStream<'static, LogEvent>>,
) -> impl futures_util::Stream<Item = LogEvent> + Send {
    let tick = tokio::time::interval(NEW_TASKS);
    futures_util::stream::unfold(
        (merged, known, tick),
        move |(mut all, mut known, mut tick)| {
            let (agent, service) = (agent.clone(), service.clone());
            async move {
                loop {
                    tokio::select! {
                        Some(e) = all.next(), if !all.is_empty() => {
                            return Some((e, (all, known, tick)));
                        }
                        _ = tick.tick() => {
                            let view = agent.view();
                            let query = LogsQuery { follow: true, ..Default::default() };
                            for t in view.tasks.iter().filter(|t| t.service == service) {
                                if started(t) && known.insert(t.id.clone()) {
                                    let only = vec![t.id.clone()];
                                    all.push(source(&agent, &view, &t.node, &service, only, &query));
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// Orders every line by time; warnings come first (they go to stderr anyway).
pub fn merge_by_time(mut events: Vec<LogEvent>) -> Vec<LogEvent> {
    events.sort_by_key(|e| match e {
        LogEvent::Warning(_) => (0, i64::MIN),
        LogEvent::Line(l) => (1, l.time_ns),
    });
    events
}

/// `GET /v1/services/{name}/logs`: NAME is a service, or a task id (or its unique prefix).
pub async fn service_logs(
    State(agent): State<Arc<Agent>>,
    UrlPath(name): UrlPath<String>,
    Query(query): Query<LogsQuery>,
) -> Result<Response, Error> {
    let permit = match super::STREAMS.open("log stream") {
        Ok(p) => p,
        Err(refused) => return Ok(*refused),
    };
    let events = log_events(agent, &name, query).await?;
    let body = events.map(|e| {
        let mut line = serde_json::to_vec(&e).expect("events serialize");
        line.push(b'\n');
        Ok::<_, std::io::Error>(axum::body::Bytes::from(line))
    });
    Ok(Response::new(axum::body::Body::from_stream(
        crate::serving::holding(body, permit),
    )))
}

/// The output of service NAME's tasks (or of the task NAME, an id or its unique prefix),
/// from every node: what `service logs` streams, whichever API it answers on.
pub async fn log_events(
    agent: Arc<Agent>,
    name: &str,
    query: LogsQuery,
) -> Result<BoxStream<'static, LogEvent>, Error> {
    let name = name.to_owned();
    let view = agent.view();
    let (service, task) = if view.services.contains_key(&name) {
        (name.clone(), None)
    } else {
        let found: Vec<_> = view
            .tasks
            .iter()
            .filter(|t| !name.is_empty() && t.id.starts_with(&name))
            .collect();
        match found[..] {
            [t] => (t.service.clone(), Some(t.id.clone())),
            [] => {
                return Err(Error::NotFound(format!(
                    "no such service or task: {name} (see `meshctl service ls` and `meshctl service ps`)"
                )));
            }
            _ => {
                return Err(Error::Invalid(format!(
                    "task id prefix {name} is ambiguous: give more of it"
                )));
            }
        }
    };
    // The tasks whose output is read from the start: those of the service (or the one task
    // named) that have started, so their node holds their record; later ones join a follow.
    let mut by_node: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for t in view
        .tasks
        .iter()
        .filter(|t| t.service == service && started(t))
    {
        if task.as_ref().is_none_or(|id| *id == t.id) {
            by_node
                .entry(t.node.clone())
                .or_default()
                .push(t.id.clone());
        }
    }
    let known: BTreeSet<String> = by_node.values().flatten().cloned().collect();
    let sources: Vec<_> = by_node
        .into_iter()
        .map(|(node, ids)| source(&agent, &view, &node, &service, ids, &query))
        .collect();
    let merged = futures_util::stream::select_all(sources);
    Ok(match (query.follow, task) {
        (true, None) => with_new_tasks(agent.clone(), service, known, merged).boxed(),
        (true, Some(_)) => merged.boxed(),
        (false, _) => {
            let all: Vec<LogEvent> = merged.collect().await;
            futures_util::stream::iter(merge_by_time(all)).boxed()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(task: &str, time_ns: i64) -> LogEvent {
        LogEvent::Line(LogLine {
            service: "web".into(),
            slot: "1".into(),
            task: task.into(),
            node: "n".into(),
            time_ns,
            line: format!("{task}@{time_ns}"),
            attrs: Default::default(),
        })
    }

    #[test]
    fn merged_lines_are_in_time_order_and_warnings_lead() {
        let events = vec![
            line("a", 30),
            line("a", 31),
            line("b", 10),
            LogEvent::Warning("node x is down".into()),
            line("c", 20),
            line("b", 30),
        ];
        let got = merge_by_time(events);
        assert_eq!(got[0], LogEvent::Warning("node x is down".into()));
        let order: Vec<String> = got[1..]
            .iter()
            .map(|e| match e {
                LogEvent::Line(l) => l.line.clone(),
                _ => unreachable!(),
            })
            .collect();
        // Equal times keep each source's order (a stable sort).
        assert_eq!(order, ["b@10", "c@20", "a@30", "b@30", "a@31"]);
    }

    #[test]
    fn task_names_give_slot_and_id() {
        assert_eq!(task_of("web.2.abcd", "web"), Some(("2", "abcd")));
        assert_eq!(task_of("web.node-1.abcd", "web"), Some(("node-1", "abcd")));
        assert_eq!(task_of("webapp.1.abcd", "web"), None);
        assert_eq!(task_of("other.1.x", "web"), None);
    }
}
