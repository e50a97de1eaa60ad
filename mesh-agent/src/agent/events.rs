//! The agent's events: derived by diffing its successive views (see `crate::events`).

use std::sync::Arc;

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
}
