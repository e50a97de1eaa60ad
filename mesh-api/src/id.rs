//! Names for things in cluster time: stamps, and Docker-style short IDs derived from them.

use serde::{Deserialize, Serialize};

/// A point in cluster time: wall-clock milliseconds, ties broken by node name. Nodes issue
/// strictly increasing stamps (see [`Clock`]), so a stamp names one event.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub ms: u64,
    pub node: String,
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A short stable identifier in Docker's style, derived from a name and its creation stamp
/// (so a re-created object gets a new one).
pub fn short_id(name: &str, created: &Stamp) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (name, created).hash(&mut h);
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// A node's ID: stable for its name.
pub fn node_id(name: &str) -> String {
    short_id(
        name,
        &Stamp {
            ms: 0,
            node: name.into(),
        },
    )
}
