//! Reservations as placement: what the tasks on a node have reserved, whether one more
//! fits, how much a node would have left, and the words for a node it does not fit on.
//!
//! A node's capacity is what it advertises (its CPUs and memory, or what its operator set);
//! a zero in either is "not advertised" and does not limit reservations of that kind, so a
//! node running an agent from before reservations takes anything, as before. A reservation
//! of zero fits anywhere, even on a node whose tasks already reserve more than it has.

use std::collections::BTreeMap;

use crate::{
    spec::{Node, Resources},
    task::Task,
};

impl Resources {
    pub fn saturating_add(self, other: Self) -> Self {
        Self {
            nano_cpus: self.nano_cpus.saturating_add(other.nano_cpus),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
        }
    }

    pub fn saturating_sub(self, other: Self) -> Self {
        Self {
            nano_cpus: self.nano_cpus.saturating_sub(other.nano_cpus),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
        }
    }
}

/// Which of a node's resources a reservation does not fit in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Short {
    Cpu,
    Memory,
    Both,
}

impl Short {
    /// Swarm's words: `insufficient memory on 3 nodes`.
    pub(crate) fn what(self) -> &'static str {
        match self {
            Self::Cpu => "CPU",
            Self::Memory => "memory",
            Self::Both => "resources",
        }
    }
}

/// None when `want` fits beside `used` on a node with `capacity`.
pub(crate) fn short(capacity: Resources, used: Resources, want: Resources) -> Option<Short> {
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
pub(crate) fn left_ppm(capacity: Resources, used: Resources, want: Resources) -> u64 {
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

/// What the live tasks on each node reserve, every service's together.
pub fn reserved_by_node(tasks: &[Task]) -> BTreeMap<&str, Resources> {
    let mut by: BTreeMap<&str, Resources> = BTreeMap::new();
    for t in tasks
        .iter()
        .filter(|t| t.is_live() && !t.reservation.is_zero())
    {
        let r = by.entry(t.node.as_str()).or_default();
        *r = r.saturating_add(t.reservation);
    }
    by
}

/// `no node has 64GiB of memory: the largest has 1.952GiB`, when the reservation is more
/// than every node (of those that could otherwise run it) has at all: no amount of scaling
/// other services down makes room for it.
pub(crate) fn larger_than_any(nodes: &[&Node], want: Resources) -> Option<String> {
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

/// CPUs as Docker prints them: `0.5`, `2`, `1.25`.
pub fn cpus(nano: u64) -> String {
    let (whole, frac) = (nano / 1_000_000_000, nano % 1_000_000_000);
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:09}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

/// A size as Docker prints it (go-units' `BytesSize`): four significant digits in binary
/// units, `256MiB`, `1.952GiB`, `512B`.
pub fn bytes_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut size = bytes as f64;
    let mut unit = 0;
    while size >= 1024.0 && unit < UNITS.len() - 1 {
        size /= 1024.0;
        unit += 1;
    }
    let digits = if size < 1.0 {
        1
    } else {
        size.log10().floor() as usize + 1
    };
    let decimals = 4usize.saturating_sub(digits);
    let mut s = format!("{size:.decimals$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_owned();
    }
    format!("{s}{}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(nano_cpus: u64, memory_bytes: u64) -> Resources {
        Resources {
            nano_cpus,
            memory_bytes,
        }
    }

    #[test]
    fn sizes_and_cpus_print_as_dockers() {
        assert_eq!(bytes_size(256 << 20), "256MiB");
        assert_eq!(bytes_size(512), "512B");
        assert_eq!(bytes_size(0), "0B");
        assert_eq!(bytes_size(3 << 29), "1.5GiB");
        assert_eq!(bytes_size(2_096_058_368), "1.952GiB");
        assert_eq!(bytes_size(64 << 30), "64GiB");
        assert_eq!(cpus(500_000_000), "0.5");
        assert_eq!(cpus(2_000_000_000), "2");
        assert_eq!(cpus(1_250_000_000), "1.25");
    }

    #[test]
    fn zero_capacity_is_unlimited_and_zero_reservations_fit_anywhere() {
        let gib = 1 << 30;
        assert_eq!(short(r(0, 0), r(99, 99), r(5, 5)), None);
        assert_eq!(short(r(2, gib), r(2, gib), r(0, 0)), None);
        assert_eq!(short(r(2, gib), r(1, 0), r(1, gib)), None);
        assert_eq!(short(r(2, gib), r(1, 1), r(1, gib)), Some(Short::Memory));
        assert_eq!(short(r(2, gib), r(2, 0), r(1, 1)), Some(Short::Cpu));
        assert_eq!(short(r(2, gib), r(2, gib), r(1, 1)), Some(Short::Both));
        // Only what the node advertises limits.
        assert_eq!(short(r(0, gib), r(0, 0), r(64, 1)), None);
    }

    #[test]
    fn what_is_left_is_the_scarcer_share() {
        assert_eq!(left_ppm(r(4, 100), r(1, 0), r(1, 10)), 500_000);
        assert_eq!(left_ppm(r(4, 100), r(0, 50), r(0, 0)), 500_000);
        assert_eq!(left_ppm(r(0, 0), r(9, 9), r(1, 1)), 1_000_000);
        assert_eq!(left_ppm(r(4, 100), r(8, 0), r(0, 0)), 0);
    }
}
