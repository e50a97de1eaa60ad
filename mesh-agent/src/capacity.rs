//! What this node offers to tasks' reservations: the CPUs the agent may run on and the
//! memory the kernel has, read once at start (agent.toml `cpus` and `memory` override them).

use mesh_api::spec::Resources;

/// The host's CPUs (those this process may be scheduled on, and within a cgroup CPU quota:
/// what `available_parallelism` reads) and its MemTotal. A part that cannot be read is zero:
/// not advertised, so reservations do not limit it.
pub fn detect() -> Resources {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get() as u64);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_total(&text))
        .unwrap_or(0);
    Resources {
        nano_cpus: cpus * 1_000_000_000,
        memory_bytes: memory,
    }
}

/// `MemTotal:  2046932 kB` in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `cpus = 1.5` from agent.toml as billionths of a CPU; the error names the key.
pub fn cpus_setting(cpus: f64) -> Result<u64, String> {
    // Up to a million CPUs: far above any host, and nano-CPUs stay well inside a u64.
    if !cpus.is_finite() || cpus <= 0.0 || cpus > 1_000_000.0 {
        return Err(format!(
            "cpus = {cpus} in the agent config is not a number of CPUs: use a positive number \
             such as 2 or 1.5 (leave it out to advertise the CPUs the agent may run on)"
        ));
    }
    Ok((cpus * 1e9).round() as u64)
}

/// `memory = "4g"` from agent.toml in bytes; the error names the key.
pub fn memory_setting(memory: &str) -> Result<u64, String> {
    let bytes = mesh_api::spec::bytes("memory", memory)
        .map_err(|e| format!("{e} in the agent config (leave it out to advertise MemTotal)"))?;
    if bytes == 0 {
        return Err(format!(
            "memory = {memory:?} in the agent config is zero: give a size such as 4g (leave \
             it out to advertise MemTotal)"
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_says_what_the_node_has() {
        let r = detect();
        assert!(r.nano_cpus >= 1_000_000_000, "{r:?}");
        assert!(r.memory_bytes > 64 << 20, "{r:?}");
        assert_eq!(
            mem_total("MemFree: 1 kB\nMemTotal:        2046932 kB\n"),
            Some(2_046_932 * 1024)
        );
        assert_eq!(mem_total("nothing"), None);
    }

    #[test]
    fn settings_read_like_dockers_and_bad_ones_say_so() {
        assert_eq!(cpus_setting(1.5), Ok(1_500_000_000));
        assert_eq!(cpus_setting(2.0), Ok(2_000_000_000));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(cpus_setting(bad).unwrap_err().contains("cpus ="), "{bad}");
        }
        assert_eq!(memory_setting("512m"), Ok(512 << 20));
        assert_eq!(memory_setting("4g"), Ok(4 << 30));
        let e = memory_setting("512Q").unwrap_err();
        assert!(e.contains("invalid memory \"512Q\""), "{e}");
        assert!(memory_setting("0").unwrap_err().contains("zero"));
    }
}
