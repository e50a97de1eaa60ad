//! Where the cgroup v2 hierarchy is mounted. Hosts differ: a systemd host has cgroup2 alone
//! at /sys/fs/cgroup, a hybrid one (this machine kind) at /sys/fs/cgroup/unified, a
//! container may see it elsewhere. The mount table says, so it is read, never assumed.
//! Task limits go wherever each controller lives (`layout`), in a leaf per task (`leaf`).

mod layout;
mod leaf;
mod oom;

use std::path::PathBuf;

use anyhow::{Context, Result};

pub use layout::{Controller, Hierarchy, Layout};
pub use leaf::{CPU_PERIOD_US, Leaf, LeafDir, cpu_quota_us};
pub use oom::{memcg_killed, ticks_to_us};

/// The mount point of the cgroup v2 hierarchy's root, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context("reading /proc/self/mountinfo to find the cgroup v2 mount")?;
    cgroup2_mount_in(&text).context(
        "no cgroup2 filesystem is mounted: mount one (`mount -t cgroup2 none /sys/fs/cgroup`) \
         or boot with cgroup v2 enabled; the socket hooks attach to its root",
    )
}

/// The cgroup2 mount of a mountinfo table whose root is the hierarchy's root (a bind mount of
/// a subtree would attach below the root and miss processes elsewhere).
fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // `id parent maj:min root mountpoint options [optional…] - fstype source super`
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mut fields = left.split_whitespace();
            let root = fields.nth(3)?;
            let mountpoint = fields.next()?;
            (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape(mountpoint)))
        })
        // Several mounts of the same hierarchy: the shortest path is the canonical one.
        .min_by_key(|p| p.as_os_str().len())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hybrid_and_the_unified_layouts_are_both_found() {
        let hybrid = "\
25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "\
31 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw
90 31 0:26 /system.slice /mnt/sub rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_mount_in("26 25 0:23 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw\n"),
            None
        );
        assert_eq!(unescape(r"/mnt/my\040cg"), "/mnt/my cg");
    }
}
