//! How long the agent takes to program the kernel from a view.

use std::time::Duration;

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Durations of kernel convergence passes (the agent's run loop), for /metrics.
#[derive(Clone, Debug)]
pub struct ProgrammingLatency(Histogram);

impl Default for ProgrammingLatency {
    fn default() -> Self {
        // 1 ms to ~16 s: an idle pass is a few ms, 10,000 services ~150 ms.
        Self(Histogram::new(exponential_buckets(0.001, 2.0, 15)))
    }
}

impl ProgrammingLatency {
    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }

    pub fn histogram(&self) -> Histogram {
        self.0.clone()
    }
}
