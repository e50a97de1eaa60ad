//! The agent's events: derived by diffing its successive views (see `crate::events`).

use std::sync::Arc;

use mesh_api::events::{Event, Kind, NodeAction};
use mesh_api::id::now_ms;

use super::Agent;
use crate::events::diff;

impl Agent {
    /// Feeds [`Agent::events`] from the agent's views until the agent goes away.
    pub async fn watch_events(self: Arc<Self>) {
        let started_ms = now_ms();
        let mut views = self.watch_views();
        let mut prev = views.borrow_and_update().clone();
        while views.changed().await.is_ok() {
            let next = views.borrow_and_update().clone();
            let events = diff(&prev, &next, now_ms(), started_ms);
            self.events.publish(events);
            prev = next;
        }
    }

    /// Events for nodes gossip refused since the last call for claiming a name bound to
    /// another key (see `gossip::origin`).
    pub(super) fn publish_impostors(&self) {
        let refused = self.gossip.take_impostors();
        self.events.publish(refused.into_iter().map(|i| {
            Event {
                time_ms: now_ms(),
                kind: Kind::Node(NodeAction::Refused),
                actor: i.name.clone(),
                id: None,
                service: None,
                node: Some(i.name),
                attributes: [
                    ("key".to_owned(), i.key.to_string()),
                    ("bound_key".to_owned(), i.pinned.to_string()),
                    ("generation".to_owned(), i.generation.to_string()),
                    (
                        "reason".to_owned(),
                        "the name is bound to another node's key".to_owned(),
                    ),
                ]
                .into(),
            }
        }));
    }
}
