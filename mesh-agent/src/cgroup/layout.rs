//! Which hierarchy holds each controller a task's limits need. A systemd host has them all in
//! cgroup v2; a hybrid host (this machine kind) has memory, cpu and pids as cgroup v1
//! hierarchies of their own and a cgroup2 mount with none of them. /proc/cgroups says which
//! hierarchy a controller is bound to (0: the v2 one), /proc/self/mountinfo where each
//! hierarchy is mounted, and the v2 root's `cgroup.controllers` which controllers v2 offers.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The controllers task limits are written to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Controller {
    Memory,
    Cpu,
    Pids,
}

impl Controller {
    pub const ALL: [Controller; 3] = [Controller::Memory, Controller::Cpu, Controller::Pids];

    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Pids => "pids",
        }
    }
}

/// A mounted hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount: PathBuf,
    /// cgroup v2 (`memory.max`, ...) rather than v1 (`memory.limit_in_bytes`, ...).
    pub v2: bool,
}

/// Where the cgroup v2 root and each limit controller are on this host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// The cgroup v2 root: every task has a leaf there (the socket hooks and per-task
    /// accounting), whatever controllers it holds.
    pub unified: Option<PathBuf>,
    memory: Option<Hierarchy>,
    cpu: Option<Hierarchy>,
    pids: Option<Hierarchy>,
}

impl Layout {
    /// This host's layout, read from the kernel.
    pub fn discover() -> Result<Self> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .context("reading /proc/self/mountinfo to find the cgroup hierarchies")?;
        // Absent on kernels built without cgroup v1: then every controller is a v2 one.
        let proc_cgroups = std::fs::read_to_string("/proc/cgroups").unwrap_or_default();
        let unified = super::cgroup2_mount_in(&mountinfo);
        let v2_controllers = unified
            .as_ref()
            .and_then(|root| std::fs::read_to_string(root.join("cgroup.controllers")).ok())
            .unwrap_or_default();
        Ok(Self::parse(&mountinfo, &proc_cgroups, &v2_controllers))
    }

    /// The layout described by a mountinfo table, /proc/cgroups and the v2 root's
    /// `cgroup.controllers`.
    pub fn parse(mountinfo: &str, proc_cgroups: &str, v2_controllers: &str) -> Self {
        let unified = super::cgroup2_mount_in(mountinfo);
        let v1 = v1_mounts(mountinfo);
        let find = |c: Controller| -> Option<Hierarchy> {
            match bound_hierarchy(proc_cgroups, c.name()) {
                Binding::Disabled => None,
                Binding::V1 => v1
                    .iter()
                    .filter(|(_, controllers)| controllers.iter().any(|n| n == c.name()))
                    .map(|(mount, _)| mount)
                    .min_by_key(|m| m.as_os_str().len())
                    .map(|mount| Hierarchy {
                        mount: mount.clone(),
                        v2: false,
                    }),
                Binding::V2OrUnknown => {
                    // Without /proc/cgroups a v1 mount naming it still wins: it is where the
                    // controller is bound (a controller is in one hierarchy at a time).
                    if let Some((mount, _)) =
                        v1.iter().find(|(_, cs)| cs.iter().any(|n| n == c.name()))
                    {
                        return Some(Hierarchy {
                            mount: mount.clone(),
                            v2: false,
                        });
                    }
                    let offered = v2_controllers.split_whitespace().any(|n| n == c.name());
                    unified.as_ref().filter(|_| offered).map(|m| Hierarchy {
                        mount: m.clone(),
                        v2: true,
                    })
                }
            }
        };
        Self {
            memory: find(Controller::Memory),
            cpu: find(Controller::Cpu),
            pids: find(Controller::Pids),
            unified,
        }
    }

    pub fn hierarchy(&self, c: Controller) -> Option<&Hierarchy> {
        match c {
            Controller::Memory => self.memory.as_ref(),
            Controller::Cpu => self.cpu.as_ref(),
            Controller::Pids => self.pids.as_ref(),
        }
    }

    /// The v1 mounts holding a limit controller, each once (cpu may share one with cpuacct).
    pub fn v1_mounts(&self) -> Vec<&Path> {
        let mut out: Vec<&Path> = Vec::new();
        for c in Controller::ALL {
            if let Some(h) = self.hierarchy(c).filter(|h| !h.v2)
                && !out.contains(&h.mount.as_path())
            {
                out.push(&h.mount);
            }
        }
        out
    }
}

enum Binding {
    Disabled,
    V1,
    /// Hierarchy 0 in /proc/cgroups (the v2 one), or no line for it at all.
    V2OrUnknown,
}

/// `#subsys_name hierarchy num_cgroups enabled` lines.
fn bound_hierarchy(proc_cgroups: &str, name: &str) -> Binding {
    for line in proc_cgroups.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 4 && f[0] == name {
            if f[3] == "0" {
                return Binding::Disabled;
            }
            return if f[1] == "0" {
                Binding::V2OrUnknown
            } else {
                Binding::V1
            };
        }
    }
    Binding::V2OrUnknown
}

/// (mount point, controllers) of every cgroup v1 mount: the controllers are the super
/// options (`rw,cpu,cpuacct`) after the filesystem type and source.
fn v1_mounts(mountinfo: &str) -> Vec<(PathBuf, Vec<String>)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut r = right.split_whitespace();
            if r.next()? != "cgroup" {
                return None;
            }
            let options = r.nth(1)?;
            let mountpoint = left.split_whitespace().nth(4)?;
            Some((
                PathBuf::from(super::unescape(mountpoint)),
                options.split(',').map(str::to_owned).collect(),
            ))
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// This machine kind: v1 controllers each in their own hierarchy, cgroup2 with hugetlb.
    pub const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    pub const HYBRID_CGROUPS: &str = "\
#subsys_name\thierarchy\tnum_cgroups\tenabled
cpu\t1\t3\t1
cpuacct\t2\t3\t1
memory\t4\t21\t1
hugetlb\t0\t3\t1
pids\t8\t3\t1
";
    /// A systemd host: cgroup2 alone, every controller bound to it.
    pub const UNIFIED_MOUNTINFO: &str = "\
31 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
";
    pub const UNIFIED_CGROUPS: &str = "\
#subsys_name\thierarchy\tnum_cgroups\tenabled
cpu\t0\t80\t1
memory\t0\t80\t1
pids\t0\t80\t1
";

    #[test]
    fn hybrid_hosts_have_the_limit_controllers_in_v1() {
        let l = Layout::parse(HYBRID_MOUNTINFO, HYBRID_CGROUPS, "hugetlb\n");
        assert_eq!(l.unified, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let at = |c| l.hierarchy(c).cloned();
        let v1 = |p: &str| {
            Some(Hierarchy {
                mount: PathBuf::from(p),
                v2: false,
            })
        };
        assert_eq!(at(Controller::Memory), v1("/sys/fs/cgroup/memory"));
        assert_eq!(at(Controller::Cpu), v1("/sys/fs/cgroup/cpu"));
        assert_eq!(at(Controller::Pids), v1("/sys/fs/cgroup/pids"));
        assert_eq!(
            l.v1_mounts(),
            [
                Path::new("/sys/fs/cgroup/memory"),
                Path::new("/sys/fs/cgroup/cpu"),
                Path::new("/sys/fs/cgroup/pids")
            ]
        );
    }

    #[test]
    fn unified_hosts_have_them_all_in_v2() {
        let l = Layout::parse(
            UNIFIED_MOUNTINFO,
            UNIFIED_CGROUPS,
            "cpuset cpu io memory pids\n",
        );
        for c in Controller::ALL {
            assert_eq!(
                l.hierarchy(c),
                Some(&Hierarchy {
                    mount: PathBuf::from("/sys/fs/cgroup"),
                    v2: true
                }),
                "{c:?}"
            );
        }
        assert!(l.v1_mounts().is_empty());
    }

    #[test]
    fn a_controller_v2_does_not_offer_and_no_v1_mount_holds_is_absent() {
        // Bound to v2 by /proc/cgroups, but not enabled at the root: no limit can be set.
        let l = Layout::parse(UNIFIED_MOUNTINFO, UNIFIED_CGROUPS, "memory\n");
        assert!(l.hierarchy(Controller::Memory).is_some());
        assert_eq!(l.hierarchy(Controller::Cpu), None);
        assert_eq!(l.hierarchy(Controller::Pids), None);
        // Disabled on the kernel command line (cgroup_disable=memory).
        let disabled = HYBRID_CGROUPS.replace("memory\t4\t21\t1", "memory\t4\t21\t0");
        let l = Layout::parse(HYBRID_MOUNTINFO, &disabled, "hugetlb\n");
        assert_eq!(l.hierarchy(Controller::Memory), None);
    }

    #[test]
    fn co_mounted_controllers_share_one_hierarchy() {
        let mountinfo = "\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";
        // No /proc/cgroups: the v1 mounts alone decide.
        let l = Layout::parse(mountinfo, "", "");
        assert_eq!(
            l.hierarchy(Controller::Cpu).map(|h| h.mount.clone()),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(l.hierarchy(Controller::Pids), None);
        assert_eq!(l.unified, None);
    }
}
