//! Cluster events, Docker style: task started/running/failed/stopped, node ready/down/drain,
//! service created/updated/removed.
//!
//! There is no event log in gossip. Every node sees every change through gossip, so each
//! agent derives the events itself by diffing successive views ([`diff`]) and keeps the
//! recent ones in a bounded ring (for `--since`) with a broadcast channel for followers
//! ([`Events`]). Times come from the records where they carry one (a task's `since_ms` is
//! set by its node when it entered the state; a service's stamps by the node that wrote
//! it), so every node reports the same time for the same change; node status changes are
//! timed when this node noticed them.
//!
//! Adding a kind of event (an update paused or rolled back, a health check failing) is a
//! new variant of [`TaskAction`], [`NodeAction`] or [`ServiceAction`] and a rule in
//! [`diff`]; the wire format and filters need nothing more.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use mesh_planner::TaskState;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::cluster::{Availability, NodeStatus, View};

/// Events kept for `--since`: a few hours of a busy cluster, a few MB at most.
pub const RING_CAPACITY: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Wall-clock milliseconds since the epoch.
    pub time_ms: u64,
    #[serde(flatten)]
    pub kind: Kind,
    /// What the event is about: `web.1`, a node name, a service name.
    pub actor: String,
    /// The task ID or service ID, when the actor has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Details: exit code, error, spec version, replicas.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// `{"type": "task", "action": "running"}` on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "action", rename_all = "lowercase")]
pub enum Kind {
    Task(TaskAction),
    Node(NodeAction),
    Service(ServiceAction),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskAction {
    /// A node took the slot and is setting the task up.
    Started,
    /// Serving: a backend in every load balancer.
    Running,
    /// Exited non-zero or was killed.
    Failed,
    /// Could not be started at all.
    Rejected,
    /// Exited with status 0.
    Complete,
    /// Stopped because it was asked to (scale down, update, removal).
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeAction {
    Ready,
    Down,
    Drain,
    Active,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceAction {
    Created,
    /// Any spec change: scale, constraints, a new template (`version` says which).
    Updated,
    Removed,
    /// A rollout paused on failures (the message says which task).
    UpdatePaused,
    UpdateCompleted,
    /// A rollout went back to the previous spec (by hand, or on failures).
    RollbackStarted,
    RollbackPaused,
    RollbackCompleted,
}

impl Kind {
    pub fn type_name(self) -> &'static str {
        match self {
            Kind::Task(_) => "task",
            Kind::Node(_) => "node",
            Kind::Service(_) => "service",
        }
    }

    pub fn action_name(self) -> String {
        // The serde names, so text and JSON say the same word.
        let json = serde_json::to_value(self).expect("plain enum");
        json["action"].as_str().unwrap_or_default().to_owned()
    }
}

impl fmt::Display for Event {
    /// Docker's line: `2026-12-01T08:00:00.000000000Z task running web.1 (id=…, node=…)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = UNIX_EPOCH + Duration::from_millis(self.time_ms);
        write!(
            f,
            "{} {} {} {}",
            humantime::format_rfc3339_nanos(at),
            self.kind.type_name(),
            self.kind.action_name(),
            self.actor
        )?;
        let mut details: Vec<String> = Vec::new();
        if let Some(id) = &self.id {
            details.push(format!("id={id}"));
        }
        if let Some(s) = &self.service
            && *s != self.actor
        {
            details.push(format!("service={s}"));
        }
        if let Some(n) = &self.node
            && *n != self.actor
        {
            details.push(format!("node={n}"));
        }
        details.extend(self.attributes.iter().map(|(k, v)| format!("{k}={v}")));
        if !details.is_empty() {
            write!(f, " ({})", details.join(", "))?;
        }
        Ok(())
    }
}

/// Which events a reader wants, Docker's way: values of one key are alternatives (OR),
/// different keys must all match (AND).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub services: Vec<String>,
    pub nodes: Vec<String>,
    pub types: Vec<String>,
}

impl Filter {
    /// Adds one `key=value` (`service=web`, `node=n1`, `type=task`).
    pub fn add(&mut self, spec: &str) -> Result<(), String> {
        let (k, v) = spec.split_once('=').ok_or_else(|| {
            format!("invalid filter {spec:?}: expected key=value (service=, node= or type=)")
        })?;
        if v.is_empty() {
            return Err(format!("invalid filter {spec:?}: the value is empty"));
        }
        match k {
            "service" => self.services.push(v.to_owned()),
            "node" => self.nodes.push(v.to_owned()),
            "type" => {
                if !["task", "node", "service"].contains(&v) {
                    return Err(format!(
                        "invalid filter {spec:?}: type is one of task, node, service"
                    ));
                }
                self.types.push(v.to_owned())
            }
            other => {
                return Err(format!(
                    "unknown filter key {other:?} in {spec:?}: use service=, node= or type="
                ));
            }
        }
        Ok(())
    }

    pub fn matches(&self, e: &Event) -> bool {
        let any = |wanted: &[String], have: Option<&str>| {
            wanted.is_empty() || have.is_some_and(|h| wanted.iter().any(|w| w == h))
        };
        any(&self.types, Some(e.kind.type_name()))
            && any(&self.services, e.service.as_deref())
            && any(&self.nodes, e.node.as_deref())
    }
}

/// The query string of `GET /v1/events` for a start time and filters.
pub fn query(since_ms: Option<u64>, filter: &[String]) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(ms) = since_ms {
        parts.push(format!("since_ms={ms}"));
    }
    parts.extend(
        filter
            .iter()
            .map(|f| format!("filter={}", percent_encode(f))),
    );
    parts.join("&")
}

/// `since_ms` and `filter` from a query string made by [`query`] (or typed by hand).
pub fn parse_query(raw: &str) -> Result<(Option<u64>, Filter), String> {
    let mut since = None;
    let mut filter = Filter::default();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v).ok_or_else(|| format!("bad escape in {pair:?}"))?;
        match k {
            "since_ms" => {
                since = Some(v.parse().map_err(|_| {
                    format!("since_ms={v:?} is not a time: milliseconds since the epoch")
                })?)
            }
            "filter" => filter.add(&v)?,
            other => {
                return Err(format!(
                    "unknown parameter {other:?}: use since_ms= and filter="
                ));
            }
        }
    }
    Ok((since, filter))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// The recent events and the followers of new ones.
pub struct Events {
    /// Ring and broadcast change together under this lock, so a reader that takes the
    /// backlog and subscribes at once misses nothing and sees nothing twice.
    ring: Mutex<VecDeque<Event>>,
    tx: broadcast::Sender<Event>,
    capacity: usize,
}

impl Default for Events {
    fn default() -> Self {
        Self::with_capacity(RING_CAPACITY)
    }
}

impl Events {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            // A follower that falls this far behind is told so (and reconnects).
            tx: broadcast::channel(1024).0,
            capacity,
        }
    }

    pub fn publish(&self, events: impl IntoIterator<Item = Event>) {
        let mut ring = self.ring.lock().expect("events lock");
        for e in events {
            if ring.len() == self.capacity {
                ring.pop_front();
            }
            ring.push_back(e.clone());
            // No followers is not an error.
            let _ = self.tx.send(e);
        }
    }

    /// Events at or after `since_ms` still in the ring, and a receiver of every later one.
    pub fn subscribe(&self, since_ms: Option<u64>) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let ring = self.ring.lock().expect("events lock");
        let backlog = match since_ms {
            Some(since) => ring
                .iter()
                .filter(|e| e.time_ms >= since)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        (backlog, self.tx.subscribe())
    }

    /// The newest `n` events, oldest first (the page's ticker).
    pub fn recent(&self, n: usize) -> Vec<Event> {
        let ring = self.ring.lock().expect("events lock");
        ring.iter()
            .skip(ring.len().saturating_sub(n))
            .cloned()
            .collect()
    }
}

/// What changed from `prev` to `next`, in the order a reader needs them: services created
/// or updated, nodes, tasks, services removed. Tasks are ordered by cause, not clock: an
/// ended task before the replacement that a restart created for it (the node stamps the
/// replacement's creation before it stamps the old one's end), a task's start before
/// anything else about it. `started_ms` is when this agent started: finished tasks it
/// first learns about and that ended before then are history, not news (a restarted
/// agent would otherwise replay every slot's past).
pub fn diff(prev: &View, next: &View, now_ms: u64, started_ms: u64) -> Vec<Event> {
    let mut out = Vec::new();
    let mut removed = Vec::new();
    services(prev, next, now_ms, &mut out, &mut removed);
    nodes(prev, next, now_ms, &mut out);
    tasks(prev, next, started_ms, &mut out);
    out.extend(removed);
    out
}

fn services(prev: &View, next: &View, now_ms: u64, out: &mut Vec<Event>, removed: &mut Vec<Event>) {
    for (name, s) in &next.services {
        let id = crate::api::short_id(name, &s.created);
        let mut attributes = BTreeMap::new();
        attributes.insert("version".into(), s.spec.version.to_string());
        if let mesh_planner::ServiceMode::Replicated { replicas } = s.spec.mode {
            attributes.insert("replicas".into(), replicas.to_string());
        }
        let status = |spec: &crate::cluster::ServiceSpec| {
            spec.update_status.as_ref().map(|u| (u.state, u.started_ms))
        };
        let rollout = match (prev.services.get(name), &s.spec.update_status) {
            (Some(old), Some(u)) if status(&old.spec) != status(&s.spec) => {
                use crate::cluster::UpdateState as U;
                attributes.insert("message".into(), u.message.clone());
                match u.state {
                    U::Paused => Some(ServiceAction::UpdatePaused),
                    U::Completed => Some(ServiceAction::UpdateCompleted),
                    U::RollbackStarted => Some(ServiceAction::RollbackStarted),
                    U::RollbackPaused => Some(ServiceAction::RollbackPaused),
                    U::RollbackCompleted => Some(ServiceAction::RollbackCompleted),
                    U::Updating => None,
                }
            }
            _ => None,
        };
        let action = match prev.services.get(name) {
            // Re-created under the same name: a new incarnation.
            Some(old) if old.created != s.created => Some((ServiceAction::Created, s.created.ms)),
            Some(_) if rollout.is_some() => rollout.map(|a| (a, s.updated.ms)),
            Some(old) if old.updated != s.updated || old.spec != s.spec => {
                Some((ServiceAction::Updated, s.updated.ms))
            }
            Some(_) => None,
            None => Some((ServiceAction::Created, s.created.ms)),
        };
        if let Some((action, at)) = action {
            out.push(Event {
                time_ms: at,
                kind: Kind::Service(action),
                actor: name.clone(),
                id: Some(id),
                service: Some(name.clone()),
                node: None,
                attributes,
            });
        }
    }
    for (name, s) in &prev.services {
        if !next.services.contains_key(name) {
            removed.push(Event {
                time_ms: now_ms,
                kind: Kind::Service(ServiceAction::Removed),
                actor: name.clone(),
                id: Some(crate::api::short_id(name, &s.created)),
                service: Some(name.clone()),
                node: None,
                attributes: BTreeMap::new(),
            });
        }
    }
}

fn nodes(prev: &View, next: &View, now_ms: u64, out: &mut Vec<Event>) {
    for (name, n) in &next.nodes {
        let old = prev.nodes.get(name);
        let mut push = |action| {
            let mut attributes = BTreeMap::new();
            if let Some(r) = &n.record {
                attributes.insert("address".into(), r.address.to_string());
            }
            out.push(Event {
                time_ms: now_ms,
                kind: Kind::Node(action),
                actor: name.clone(),
                id: Some(crate::api::node_id(name)),
                service: None,
                node: Some(name.clone()),
                attributes,
            });
        };
        if old.map(|o| o.status) != Some(n.status) {
            push(match n.status {
                NodeStatus::Ready => NodeAction::Ready,
                NodeStatus::Down => NodeAction::Down,
            });
        }
        let was = old.map_or(Availability::Active, |o| o.spec.availability);
        if was != n.spec.availability {
            push(match n.spec.availability {
                Availability::Active => NodeAction::Active,
                Availability::Drain => NodeAction::Drain,
            });
        }
    }
}

fn task_action(state: TaskState) -> Option<TaskAction> {
    match state {
        TaskState::New | TaskState::Assigned | TaskState::Preparing | TaskState::Starting => {
            Some(TaskAction::Started)
        }
        TaskState::Running => Some(TaskAction::Running),
        TaskState::Complete => Some(TaskAction::Complete),
        TaskState::Shutdown => Some(TaskAction::Stopped),
        TaskState::Failed => Some(TaskAction::Failed),
        TaskState::Rejected => Some(TaskAction::Rejected),
    }
}

/// Where a task event goes among one diff's task events (see [`diff`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// A known task ended: first, it is why a replacement exists.
    Ended,
    Started,
    Running,
    /// A task first seen already ended (rejected at once): after its start.
    EndedNew,
}

fn tasks(prev: &View, next: &View, started_ms: u64, out: &mut Vec<Event>) {
    let mut found: Vec<(Phase, Event)> = Vec::new();
    let phase = |a: TaskAction, known: bool| match a {
        TaskAction::Started => Phase::Started,
        TaskAction::Running => Phase::Running,
        _ if known => Phase::Ended,
        _ => Phase::EndedNew,
    };
    let before: BTreeMap<&str, &mesh_planner::Task> =
        prev.tasks.iter().map(|t| (t.id.as_str(), t)).collect();
    for t in &next.tasks {
        let event = |action: TaskAction, at: u64| {
            let mut attributes = BTreeMap::new();
            attributes.insert("spec_version".into(), t.spec_version.to_string());
            if let Some(c) = t.exit_code {
                attributes.insert("exit_code".into(), c.to_string());
            }
            if let Some(e) = &t.error
                && matches!(action, TaskAction::Failed | TaskAction::Rejected)
            {
                attributes.insert("error".into(), e.clone());
            }
            Event {
                time_ms: at,
                kind: Kind::Task(action),
                actor: t.name(),
                id: Some(t.id.clone()),
                service: Some(t.service.clone()),
                node: Some(t.node.clone()),
                attributes,
            }
        };
        let now = task_action(t.state);
        match before.get(t.id.as_str()) {
            Some(old) => {
                let then = task_action(old.state);
                if now != then
                    && let Some(a) = now
                {
                    found.push((phase(a, true), event(a, t.since_ms)));
                }
            }
            None => {
                if t.state.is_terminal() && t.since_ms < started_ms {
                    continue;
                }
                // Every task is reported as started, even when gossip showed it first in
                // a later state: followers can count on a started before anything else.
                found.push((Phase::Started, event(TaskAction::Started, t.created_ms)));
                if let Some(a) = now.filter(|a| *a != TaskAction::Started) {
                    found.push((phase(a, false), event(a, t.since_ms)));
                }
            }
        }
    }
    found.sort_by_key(|(p, e)| (*p, e.time_ms));
    out.extend(found.into_iter().map(|(_, e)| e));
}

/// Feeds `events` from the agent's views until the agent goes away.
pub async fn watch(agent: Arc<crate::agent::Agent>) {
    let started_ms = crate::cluster::Clock::now_ms();
    let mut views = agent.watch_views();
    let mut prev = views.borrow_and_update().clone();
    while views.changed().await.is_ok() {
        let next = views.borrow_and_update().clone();
        let events = diff(&prev, &next, crate::cluster::Clock::now_ms(), started_ms);
        agent.events.publish(events);
        prev = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{NodeSpec, NodeView, Replicated, ServiceSpec, Stamp};
    use mesh_planner::{DesiredState, Slot, Task};

    fn task(id: &str, slot: u32, state: TaskState, since_ms: u64) -> Task {
        Task {
            id: id.into(),
            service: "web".into(),
            slot: Slot::Replica(slot),
            node: "n1".into(),
            spec_version: 1,
            template: 1,
            desired: DesiredState::Running,
            state,
            created_ms: 100,
            since_ms,
            error: None,
            exit_code: None,
            attempt: 0,
            window_start_ms: 0,
            not_before_ms: None,
            running_ms: None,
            holds_slot: false,
        }
    }

    fn view(tasks: Vec<Task>) -> View {
        View {
            tasks,
            ..View::default()
        }
    }

    fn words(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| {
                format!(
                    "{} {} {}",
                    e.kind.type_name(),
                    e.kind.action_name(),
                    e.actor
                )
            })
            .collect()
    }

    #[test]
    fn a_task_moving_through_its_states_is_reported_once_per_state() {
        let a = view(vec![]);
        let b = view(vec![task("t1", 1, TaskState::Preparing, 110)]);
        let c = view(vec![task("t1", 1, TaskState::Starting, 120)]);
        let d = view(vec![task("t1", 1, TaskState::Running, 130)]);
        let mut e = task("t1", 1, TaskState::Failed, 140);
        e.exit_code = Some(137);
        e.error = Some("killed by signal 9".into());
        let e = view(vec![e]);
        let mut all = Vec::new();
        for (p, n) in [(&a, &b), (&b, &c), (&c, &d), (&d, &e)] {
            all.extend(diff(p, n, 1000, 0));
        }
        assert_eq!(
            words(&all),
            [
                "task started web.1",
                "task running web.1",
                "task failed web.1"
            ]
        );
        assert_eq!(all[2].attributes["exit_code"], "137");
        assert_eq!(all[2].time_ms, 140, "the node's time of the change");
    }

    #[test]
    fn a_failed_task_comes_before_its_replacement_whatever_the_clock_says() {
        let a = view(vec![task("t1", 1, TaskState::Running, 130)]);
        let mut replacement = task("t2", 1, TaskState::Starting, 150);
        // Created in the pass that noticed the exit, stamped before the exit was.
        replacement.created_ms = 145;
        let b = view(vec![task("t1", 1, TaskState::Failed, 149), replacement]);
        let events = diff(&a, &b, 1000, 0);
        assert_eq!(words(&events), ["task failed web.1", "task started web.1"]);
        assert_eq!(events[0].id.as_deref(), Some("t1"));
    }

    #[test]
    fn a_task_first_seen_running_is_started_then_running_and_old_history_is_skipped() {
        let a = view(vec![]);
        let b = view(vec![
            task("t1", 1, TaskState::Running, 130),
            task("t0", 1, TaskState::Failed, 50),
        ]);
        let events = diff(&a, &b, 1000, 60);
        assert_eq!(words(&events), ["task started web.1", "task running web.1"]);
    }

    #[test]
    fn services_and_nodes_are_reported_when_they_change() {
        let st = |ms| Stamp {
            ms,
            node: "n1".into(),
        };
        let spec = ServiceSpec {
            name: "web".into(),
            ..ServiceSpec::default()
        };
        let mut a = View::default();
        let mut b = View::default();
        b.services
            .insert("web".into(), Replicated::new(spec.clone(), st(10)));
        let node = |status, availability| NodeView {
            name: "n1".into(),
            record: None,
            spec: NodeSpec {
                availability,
                ..NodeSpec::default()
            },
            status,
        };
        b.nodes
            .insert("n1".into(), node(NodeStatus::Ready, Availability::Active));
        let mut c = b.clone();
        let s = c.services.get_mut("web").unwrap();
        s.spec.version = 2;
        s.updated = st(20);
        c.nodes
            .insert("n1".into(), node(NodeStatus::Ready, Availability::Drain));
        let mut d = c.clone();
        d.services.clear();
        d.nodes
            .insert("n1".into(), node(NodeStatus::Down, Availability::Drain));
        let mut all = diff(&a, &b, 15, 0);
        all.extend(diff(&b, &c, 25, 0));
        all.extend(diff(&c, &d, 35, 0));
        assert_eq!(
            words(&all),
            [
                "service created web",
                "node ready n1",
                "service updated web",
                "node drain n1",
                "node down n1",
                "service removed web",
            ]
        );
        a = d;
        assert!(diff(&a, &a, 40, 0).is_empty());
    }

    #[test]
    fn lines_read_like_dockers_and_json_carries_type_and_action() {
        let mut e = Event {
            time_ms: 1_796_112_000_000,
            kind: Kind::Task(TaskAction::Running),
            actor: "web.1".into(),
            id: Some("abc".into()),
            service: Some("web".into()),
            node: Some("n1".into()),
            attributes: BTreeMap::new(),
        };
        e.attributes.insert("spec_version".into(), "1".into());
        assert_eq!(
            e.to_string(),
            "2026-12-01T08:00:00.000000000Z task running web.1 (id=abc, service=web, node=n1, spec_version=1)"
        );
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["type"], "task");
        assert_eq!(json["action"], "running");
        assert_eq!(serde_json::from_value::<Event>(json).unwrap(), e);
    }

    #[test]
    fn filters_or_within_a_key_and_and_across_keys() {
        let mut f = Filter::default();
        f.add("service=web").unwrap();
        f.add("service=api").unwrap();
        f.add("type=task").unwrap();
        let mut e = Event {
            time_ms: 0,
            kind: Kind::Task(TaskAction::Running),
            actor: "api.1".into(),
            id: None,
            service: Some("api".into()),
            node: Some("n1".into()),
            attributes: BTreeMap::new(),
        };
        assert!(f.matches(&e));
        e.kind = Kind::Service(ServiceAction::Created);
        assert!(!f.matches(&e));
        assert!(f.add("colour=red").unwrap_err().contains("use service="));
        assert!(f.add("type=volume").is_err());
    }

    #[test]
    fn queries_round_trip_and_bad_ones_say_why() {
        let q = query(Some(42), &["service=web".into(), "node=a b&c".into()]);
        assert_eq!(
            q,
            "since_ms=42&filter=service%3Dweb&filter=node%3Da%20b%26c"
        );
        let (since, f) = parse_query(&q).unwrap();
        assert_eq!(since, Some(42));
        assert_eq!(f.services, ["web"]);
        assert_eq!(f.nodes, ["a b&c"]);
        assert!(
            parse_query("since_ms=soon")
                .unwrap_err()
                .contains("milliseconds")
        );
        assert!(
            parse_query("follow=1")
                .unwrap_err()
                .contains("unknown parameter")
        );
    }

    #[test]
    fn the_ring_keeps_the_newest_and_since_selects_by_time() {
        let events = Events::with_capacity(3);
        let at = |ms| Event {
            time_ms: ms,
            kind: Kind::Node(NodeAction::Ready),
            actor: "n1".into(),
            id: None,
            service: None,
            node: Some("n1".into()),
            attributes: BTreeMap::new(),
        };
        events.publish((1..=5).map(at));
        let (backlog, mut rx) = events.subscribe(Some(4));
        assert_eq!(
            backlog.iter().map(|e| e.time_ms).collect::<Vec<_>>(),
            [4, 5]
        );
        assert_eq!(events.subscribe(Some(0)).0.len(), 3);
        events.publish([at(6)]);
        assert_eq!(rx.try_recv().unwrap().time_ms, 6);
    }
}
