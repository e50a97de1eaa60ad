//! Confirmed drains: a task leaves every node's load balancer, and this node knows it has,
//! before the task's process is asked to stop.
//!
//! A fixed wait ("gossip usually spreads in a second") fails exactly when it matters: on a
//! loaded node the reprogramming lags, new connections still go to a task that is gone, and
//! a rolling update loses requests. So a removal carries a counter (see
//! [`LbProgress`]), every node echoes the counters its load balancer has applied, and the
//! stopping node waits for every live node's echo, bounded by [`CONFIRM_WITHIN`].

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Mutex as StdMutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

// tokio's clock, not std's: the same in the agent, and paused and advanced by unit tests.
use tokio::{sync::Mutex, time::Instant};
use tracing::{debug, warn};

use super::{Agent, runtime::NodeRuntime};
use crate::cluster::{Clock, EndpointRecord, LbProgress, View, key};
use mesh_api::spec::{EndpointState, NodeStatus};

/// How long a stopping task waits for every node to confirm: past it, a node that is live
/// but silent (overloaded, half partitioned) must not hold the task up for ever.
pub(super) const CONFIRM_WITHIN: Duration = Duration::from_secs(10);

/// This node's part in confirmed drains: what it publishes under `key::LB_PROGRESS`, and
/// how far its own load balancer has caught up with its own removals.
#[derive(Default)]
pub(super) struct Drains {
    /// Held across the gossip write, so a removal and an echo written at the same time
    /// never overwrite each other with a stale copy.
    published: Mutex<LbProgress>,
    own_applied: AtomicU64,
    announced: AtomicBool,
    /// Since when this node has seen each down node down (see [`SUSPECT_FOR`]).
    down_since: StdMutex<BTreeMap<String, Instant>>,
}

/// A node the failure detector has called down for less than this is still waited for: on
/// an overloaded host a node that missed heartbeats for a second is usually alive, and its
/// load balancer still sends connections to the stopping task. A node down for longer is
/// taken for dead (its own backends left every load balancer already).
const SUSPECT_FOR: Duration = Duration::from_secs(3);

impl Agent {
    /// Marks task `name`'s endpoint stopping, so every node's load balancer stops sending
    /// it new connections while those it has go on; returns the removal's counter for
    /// [`Agent::drained`]. The endpoint itself goes once the process has stopped
    /// ([`Agent::forget_endpoint`]): deleting it now would also take the task's overlay
    /// entries away from under its established connections.
    pub(super) async fn leave_load_balancers(&self, name: &str) -> u64 {
        // On every network the task is on.
        let stopping: Vec<(String, Option<String>)> = self
            .own_endpoints(name)
            .await
            .into_iter()
            .map(|(k, v)| {
                let v = serde_json::from_str::<EndpointRecord>(&v)
                    .ok()
                    .map(|mut e| {
                        e.state = EndpointState::Stopping;
                        serde_json::to_string(&e).expect("EndpointRecord serialises")
                    });
                (k, v)
            })
            .collect();
        let mut p = self.drains.published.lock().await;
        p.removal = (p.removal + 1).max(Clock::now_ms());
        let removal = p.removal;
        let value = serde_json::to_string(&*p).expect("LbProgress serialises");
        // The endpoints first: gossip delivers a node's keys in version order, so a node that
        // has the new counter also has the endpoints' new state.
        self.gossip
            .write(
                stopping
                    .into_iter()
                    .chain([(key::LB_PROGRESS.to_owned(), Some(value))]),
            )
            .await;
        removal
    }

    /// Takes a stopped task's endpoints out of gossip (and so out of every node's overlay).
    pub(super) async fn forget_endpoint(&self, name: &str) {
        self.forget_endpoints(name).await
    }

    /// Called once this node's load balancer is programmed from `view`: echoes the other
    /// nodes' removals it now reflects (and notes its own).
    pub(super) async fn lb_applied(&self, view: &View) {
        let me = self.node_name();
        self.drains.note_down_nodes(view);
        if let Some(own) = view.lb_progress.get(me) {
            self.drains.note_own_applied(own.removal);
        }
        let mut p = self.drains.published.lock().await;
        let first = !self.drains.announced.swap(true, Ordering::SeqCst);
        let applied = view
            .lb_progress
            .iter()
            .filter(|(node, _)| node.as_str() != me)
            .map(|(node, theirs)| (node.clone(), theirs.removal))
            .collect();
        // Published once even when empty: a stopping node waits only for nodes that
        // publish, and must wait for this one from its first programmed load balancer on.
        if p.applied == applied && !first {
            return;
        }
        p.applied = applied;
        let value = serde_json::to_string(&*p).expect("LbProgress serialises");
        self.gossip
            .write([(key::LB_PROGRESS.to_owned(), Some(value))])
            .await;
    }

    /// [`wait_drained`] for tasks stopped by hand (`meshctl rm`).
    pub(super) async fn drained(&self, task: &str, removal: u64) {
        wait_drained(self, task, removal).await
    }
}

impl Drains {
    /// This node's load balancer no longer holds its own removals up to `removal`.
    pub(super) fn note_own_applied(&self, removal: u64) {
        self.own_applied.fetch_max(removal, Ordering::SeqCst);
    }

    /// Records when each node was first seen down; returns the record.
    pub(super) fn note_down_nodes(&self, view: &View) -> BTreeMap<String, Instant> {
        let mut down = self.down_since.lock().expect("down_since lock");
        down.retain(|name, _| {
            view.nodes
                .get(name)
                .is_some_and(|n| n.status != NodeStatus::Ready)
        });
        for n in view.nodes.values() {
            if n.status != NodeStatus::Ready {
                down.entry(n.name.clone()).or_insert_with(Instant::now);
            }
        }
        down.clone()
    }
}

/// Waits until every live node's load balancer, this one's included, no longer holds the
/// endpoint removed with counter `removal` (or [`CONFIRM_WITHIN`] passed), then a moment
/// more for connections admitted just before to be answered.
pub(super) async fn wait_drained<R: NodeRuntime>(rt: &R, task: &str, removal: u64) {
    let started = Instant::now();
    let mut waiting;
    loop {
        let view = rt.refresh().await;
        waiting = unconfirmed(rt, &view, removal);
        if waiting.is_empty() {
            debug!(task, took = ?started.elapsed(), "every load balancer let the task go");
            break;
        }
        if started.elapsed() >= CONFIRM_WITHIN {
            warn!(
                task,
                nodes = ?waiting,
                "these nodes did not confirm the task left their load balancers within \
                 {CONFIRM_WITHIN:?}; stopping it anyway"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(rt.settle_time()).await;
}

/// Live nodes whose load balancer may still send new connections to the removed task.
fn unconfirmed<R: NodeRuntime>(rt: &R, view: &View, removal: u64) -> BTreeSet<String> {
    let me = rt.node_name();
    let now = Instant::now();
    let down = rt.drains().note_down_nodes(view);
    let suspected = |name: &str| {
        down.get(name)
            .is_some_and(|since| now.duration_since(*since) < SUSPECT_FOR)
    };
    let mut waiting: BTreeSet<String> = view
        .nodes
        .values()
        .filter(|n| n.name != me && (n.status == NodeStatus::Ready || suspected(&n.name)))
        // A node that never published progress runs no load balancer (control plane
        // only) or has not programmed one yet; there is nothing to wait for.
        .filter_map(|n| {
            let p = view.lb_progress.get(&n.name)?;
            (p.applied.get(me).copied().unwrap_or(0) < removal).then(|| n.name.clone())
        })
        .collect();
    if rt.runs_tasks() && rt.drains().own_applied.load(Ordering::SeqCst) < removal {
        waiting.insert(me.to_owned());
    }
    waiting
}
