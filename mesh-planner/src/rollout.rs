//! How far a rolling update has come, and who records it.
//!
//! The plan decides which slot is replaced next from the view alone; what it cannot keep in
//! the view by itself is the update's outcome — paused, rolled back, completed — which must
//! stick once decided. One node writes it: the service's coordinator, picked from the ready
//! nodes by rendezvous hashing, so every node agrees who it is and a dead coordinator's
//! successor carries on from what gossip holds.

use crate::{
    plan::{Plan, SlotPlacement},
    spec::{Node, UpdateConfig},
    task::{Task, TaskState},
};

/// The node that records a service's update status: the ready admin with the highest
/// rendezvous hash of (service, node). Only admins write services; with no admin up, the
/// rollout's outcome waits for one (slots keep being replaced by the plan meanwhile).
pub fn coordinator<'a>(service: &str, nodes: &'a [Node]) -> Option<&'a str> {
    nodes
        .iter()
        .filter(|n| n.ready && n.role == crate::spec::Role::Admin)
        .max_by_key(|n| (score(service, &n.name), n.name.as_str()))
        .map(|n| n.name.as_str())
}

fn score(service: &str, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in service.bytes().chain([0xff]).chain(node.bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Slots the service has.
    pub total: usize,
    /// Slots whose task runs the current template.
    pub updated: usize,
    /// New tasks that failed to start or ended within the monitor window.
    pub failed: Vec<Failure>,
    /// Every slot runs the current template and has been stable for the monitor window.
    pub done: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub task: String,
    pub name: String,
    pub error: String,
}

impl Progress {
    /// Failures beyond what the config tolerates (Swarm: failed / slots > ratio).
    pub fn over_ratio(&self, config: &UpdateConfig) -> bool {
        !self.failed.is_empty()
            && self.failed.len() as f64 / self.total.max(1) as f64 > config.max_failure_ratio.get()
    }
}

/// Progress of the update that started at `started_ms` towards `template`.
pub fn progress(
    plan: &Plan,
    tasks: &[Task],
    service: &str,
    template: u64,
    config: &UpdateConfig,
    started_ms: u64,
    now_ms: u64,
) -> Progress {
    let by_id = |id: &str| tasks.iter().find(|t| t.id == id);
    let mut updated = 0;
    let mut stable = 0;
    for s in &plan.slots {
        if let SlotPlacement::Kept { task, .. } = &s.placement
            && let Some(t) = by_id(task)
            && t.template == template
            && t.state == TaskState::Running
        {
            updated += 1;
            let since = t.running_ms.unwrap_or(t.since_ms);
            if now_ms >= since.saturating_add(config.monitor_ms) {
                stable += 1;
            }
        }
    }
    let failed = tasks
        .iter()
        .filter(|t| {
            t.service == service
                && t.template == template
                && t.created_ms >= started_ms
                && matches!(t.state, TaskState::Failed | TaskState::Rejected)
                && t.running_ms
                    .is_none_or(|r| t.since_ms.saturating_sub(r) <= config.monitor_ms)
        })
        .map(|t| Failure {
            task: t.id.clone(),
            name: t.name(),
            error: t.error.clone().unwrap_or_else(|| "it stopped".into()),
        })
        .collect();
    let total = plan.slots.len();
    Progress {
        total,
        updated,
        failed,
        done: stable == total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ready: bool) -> Node {
        Node {
            name: name.into(),
            ready,
            ..Default::default()
        }
    }

    #[test]
    fn every_node_agrees_on_the_coordinator_and_a_dead_one_is_replaced() {
        let nodes = vec![node("a", true), node("b", true), node("c", true)];
        let mut shuffled = nodes.clone();
        shuffled.reverse();
        let first = coordinator("web", &nodes).unwrap().to_owned();
        assert_eq!(coordinator("web", &shuffled), Some(first.as_str()));
        let without: Vec<Node> = nodes
            .iter()
            .map(|n| node(&n.name, n.name != first))
            .collect();
        let next = coordinator("web", &without).unwrap();
        assert_ne!(next, first);
        // Services spread their coordinators over the nodes.
        let picked: std::collections::BTreeSet<&str> = (0..20)
            .map(|i| coordinator(&format!("svc{i}"), &nodes).unwrap())
            .collect();
        assert!(picked.len() > 1, "{picked:?}");
        assert_eq!(coordinator("web", &[node("a", false)]), None);
        // Workers never coordinate: their writes of the service would be dropped.
        let first_is_worker: Vec<Node> = nodes
            .iter()
            .cloned()
            .map(|mut n| {
                if n.name == first {
                    n.role = crate::spec::Role::Worker;
                }
                n
            })
            .collect();
        assert_ne!(coordinator("web", &first_is_worker), Some(first.as_str()));
        let workers: Vec<Node> = nodes
            .iter()
            .cloned()
            .map(|mut n| {
                n.role = crate::spec::Role::Worker;
                n
            })
            .collect();
        assert_eq!(coordinator("web", &workers), None);
    }
}
