//! resources.rs at 2c14c36 (see plan.rs).

use mesh_planner::{Node, Resources, bytes_size, cpus};

/// Which of a node's resources a reservation does not fit in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Short {
    Cpu,
    Memory,
    Both,
}

impl Short {
    /// Swarm's words: `insufficient memory on 3 nodes`.
    pub fn what(self) -> &'static str {
        match self {
            Self::Cpu => "CPU",
            Self::Memory => "memory",
            Self::Both => "resources",
        }
    }
}

/// None when `want` fits beside `used` on a node with `capacity`.
pub fn short(capacity: Resources, used: Resources, want: Resources) -> Option<Short> {
    let over =
        |cap: u64, used: u64, want: u64| want > 0 && cap > 0 && used.saturating_add(want) > cap;
    match (
        over(capacity.nano_cpus, used.nano_cpus, want.nano_cpus),
        over(capacity.memory_bytes, used.memory_bytes, want.memory_bytes),
    ) {
        (false, false) => None,
        (true, false) => Some(Short::Cpu),
        (false, true) => Some(Short::Memory),
        (true, true) => Some(Short::Both),
    }
}

/// What a node would have left of its scarcer resource after taking `want`, in millionths
/// of what it has: the planner's "least loaded". A resource the node does not advertise
/// counts as all left; integers, so every node ranks the same way.
pub fn left_ppm(capacity: Resources, used: Resources, want: Resources) -> u64 {
    let left = |cap: u64, used: u64| -> u64 {
        if cap == 0 {
            return 1_000_000;
        }
        let free = cap.saturating_sub(used) as u128;
        (free * 1_000_000 / cap as u128) as u64
    };
    let after = used.saturating_add(want);
    left(capacity.nano_cpus, after.nano_cpus).min(left(capacity.memory_bytes, after.memory_bytes))
}

/// `no node has 64GiB of memory: the largest has 1.952GiB`, when the reservation is more
/// than every node (of those that could otherwise run it) has at all: no amount of scaling
/// other services down makes room for it.
pub fn larger_than_any(nodes: &[&Node], want: Resources) -> Option<String> {
    let largest = |has: fn(&Node) -> u64, want: u64| -> Option<u64> {
        if want == 0 || nodes.is_empty() || nodes.iter().any(|n| has(n) == 0) {
            return None;
        }
        let max = nodes.iter().map(|n| has(n)).max()?;
        (max < want).then_some(max)
    };
    let mut parts = Vec::new();
    if let Some(max) = largest(|n| n.capacity.nano_cpus, want.nano_cpus) {
        parts.push(format!(
            "no node has {} CPUs: the largest has {}",
            cpus(want.nano_cpus),
            cpus(max)
        ));
    }
    if let Some(max) = largest(|n| n.capacity.memory_bytes, want.memory_bytes) {
        parts.push(format!(
            "no node has {} of memory: the largest has {}",
            bytes_size(want.memory_bytes),
            bytes_size(max)
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}
