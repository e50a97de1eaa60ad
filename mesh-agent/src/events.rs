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
    sync::Mutex,
};

use mesh_planner::TaskState;
use tokio::sync::broadcast;

use mesh_api::{
    events::{Event, Kind, NodeAction, ServiceAction, TaskAction},
    spec::{Availability, NodeStatus},
};

use crate::cluster::View;

/// Events kept for `--since`: a few hours of a busy cluster, a few MB at most.
pub const RING_CAPACITY: usize = 10_000;

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
        let id = mesh_api::id::short_id(name, &s.created);
        let mut attributes = BTreeMap::new();
        attributes.insert("version".into(), s.spec.version.to_string());
        if let mesh_planner::ServiceMode::Replicated { replicas } = s.spec.mode {
            attributes.insert("replicas".into(), replicas.to_string());
        }
        let status = |spec: &mesh_api::spec::ServiceSpec| {
            spec.update_status.as_ref().map(|u| (u.state, u.started_ms))
        };
        let rollout = match (prev.services.get(name), &s.spec.update_status) {
            (Some(old), Some(u)) if status(&old.spec) != status(&s.spec) => {
                use mesh_api::spec::UpdateState as U;
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
                id: Some(mesh_api::id::short_id(name, &s.created)),
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
                id: Some(mesh_api::id::node_id(name)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{NodeSpec, NodeView, Replicated};
    use mesh_api::{id::Stamp, spec::ServiceSpec};
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
            reservation: Default::default(),
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
            role: mesh_planner::Role::Admin,
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
