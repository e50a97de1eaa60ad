//! The kernel's own report of a memory-cgroup OOM kill, for containers whose runtime cannot
//! say: podman with runc on a v1 memory hierarchy leaves `State.OOMKilled` false (measured on
//! this machine kind), and the container's cgroup is gone once it exited. The kernel log
//! keeps `Memory cgroup out of memory: Killed process <pid> (<comm>) …` with the time.

use std::{fs::OpenOptions, io::Read, os::unix::fs::OpenOptionsExt};

/// Whether the kernel log says the memory-cgroup OOM killer killed `pid` at or after
/// `since_us` (µs since boot: a recycled PID's older kill does not count).
pub fn memcg_killed(pid: u32, since_us: u64) -> bool {
    let Ok(mut kmsg) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return false;
    };
    // One record per read, oldest first; EAGAIN once the buffer is read.
    let mut buf = vec![0u8; 8192];
    loop {
        match kmsg.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => {
                if reports_kill(&String::from_utf8_lossy(&buf[..n]), pid, since_us) {
                    return true;
                }
            }
            // Records overwritten while reading: the next read goes on from the oldest kept.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => return false,
        }
    }
}

/// `<prio>,<seq>,<µs since boot>,<flags>[,…];<message>` (Documentation/ABI/testing/dev-kmsg).
fn reports_kill(record: &str, pid: u32, since_us: u64) -> bool {
    let Some((header, message)) = record.split_once(';') else {
        return false;
    };
    let at: Option<u64> = header.split(',').nth(2).and_then(|t| t.parse().ok());
    at.is_some_and(|t| t >= since_us)
        && message.starts_with(&format!(
            "Memory cgroup out of memory: Killed process {pid} ("
        ))
}

/// Clock ticks since boot (a process's start time in /proc/<pid>/stat) as µs.
pub fn ticks_to_us(ticks: u64) -> u64 {
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks.saturating_mul(1_000_000) / hz
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_memcg_kill_of_that_pid_since_its_start_counts() {
        let r = "3,1791,13445847298,-;Memory cgroup out of memory: Killed process 4264 (dd) \
                 total-vm:104668kB, anon-rss:32384kB, file-rss:1296kB, shmem-rss:0kB, UID:0\n";
        assert!(reports_kill(r, 4264, 13_000_000_000));
        assert!(!reports_kill(r, 426, 0), "another PID, even as a prefix");
        assert!(
            !reports_kill(r, 4264, 13_500_000_000),
            "before the task started"
        );
        let global = "3,1,5,-;Out of memory: Killed process 4264 (dd)\n";
        assert!(
            !reports_kill(global, 4264, 0),
            "the node ran out, not the task's limit"
        );
        assert!(!reports_kill("garbage", 4264, 0));
    }
}
