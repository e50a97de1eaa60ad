//! A task's own cgroup: one directory of the same name in the v2 hierarchy and in every v1
//! hierarchy that holds a controller the task is limited by. Its process joins all of them
//! before it executes anything, so nothing it runs escapes the limits; the kernel then
//! enforces them (the OOM killer, CFS quota, the pids counter) and counts what happened.

use std::{
    fs::File,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use mesh_api::spec::Limits;

use super::layout::{Controller, Layout};

/// CFS period Docker uses (`--cpus` becomes a quota per 100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;
/// The kernel refuses quotas under 1 ms.
const MIN_CPU_QUOTA_US: u64 = 1_000;

/// One directory of a leaf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafDir {
    /// The hierarchy's mount point.
    pub mount: PathBuf,
    pub path: PathBuf,
    pub v2: bool,
    /// The controllers whose limits are written here.
    pub controllers: Vec<Controller>,
}

/// A task's cgroup directories, one per hierarchy it needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leaf {
    pub dirs: Vec<LeafDir>,
}

/// A limit file and what goes in it; optional ones exist only on some kernels (swap
/// accounting) and are skipped where absent.
#[derive(Debug, PartialEq, Eq)]
pub struct Setting {
    pub file: &'static str,
    pub value: String,
    pub optional: bool,
}

impl Leaf {
    /// The directories a task named `name` needs, below `rel` in each hierarchy: the v2
    /// one always, a v1 one per hierarchy holding a controller it is limited by. A limit
    /// no hierarchy here can enforce is an error, never silently dropped.
    pub fn plan(layout: &Layout, rel: &Path, name: &str, limits: &Limits) -> Result<Self> {
        let mut leaf = Self::default();
        if let Some(root) = &layout.unified {
            leaf.dirs.push(LeafDir {
                mount: root.clone(),
                path: root.join(rel).join(name),
                v2: true,
                controllers: Vec::new(),
            });
        }
        for c in Controller::ALL.into_iter().filter(|c| limited(limits, *c)) {
            let Some(h) = layout.hierarchy(c) else {
                bail!(
                    "the task has a {} limit, but this node has no cgroup hierarchy with the {} \
                     controller enabled (see /proc/cgroups): enable it, or remove the limit",
                    describe(c),
                    c.name()
                );
            };
            let dir = match leaf.dirs.iter_mut().find(|d| d.mount == h.mount) {
                Some(d) => d,
                None => {
                    leaf.dirs.push(LeafDir {
                        mount: h.mount.clone(),
                        path: h.mount.join(in_hierarchy(rel, h.v2)).join(name),
                        v2: h.v2,
                        controllers: Vec::new(),
                    });
                    leaf.dirs.last_mut().expect("just pushed")
                }
            };
            dir.controllers.push(c);
        }
        Ok(leaf)
    }

    /// Every directory a leaf named `name` may have (whatever its limits were): what is
    /// removed when the task ends, and what `exec` joins.
    pub fn every(layout: &Layout, rel: &Path, name: &str) -> Self {
        let mut mounts: Vec<(PathBuf, bool)> = Vec::new();
        if let Some(root) = &layout.unified {
            mounts.push((root.clone(), true));
        }
        for m in layout.v1_mounts() {
            mounts.push((m.to_owned(), false));
        }
        Self {
            dirs: mounts
                .into_iter()
                .map(|(mount, v2)| LeafDir {
                    path: mount.join(in_hierarchy(rel, v2)).join(name),
                    mount,
                    v2,
                    controllers: Vec::new(),
                })
                .collect(),
        }
    }

    /// Makes the directories and writes the limits; on failure what was made is removed.
    pub fn create(&self, limits: &Limits) -> Result<()> {
        let made = self.create_dirs(limits);
        if made.is_err() {
            let _ = self.remove();
        }
        made
    }

    fn create_dirs(&self, limits: &Limits) -> Result<()> {
        for d in &self.dirs {
            if d.v2 {
                enable_controllers(&d.mount, &d.path, &d.controllers)?;
            }
            std::fs::create_dir_all(&d.path)
                .with_context(|| format!("creating cgroup {}", d.path.display()))?;
            for c in &d.controllers {
                for s in settings(d.v2, *c, limits) {
                    let file = d.path.join(s.file);
                    if s.optional && !file.exists() {
                        continue;
                    }
                    std::fs::write(&file, &s.value).with_context(|| {
                        format!("writing {} to {}", s.value.trim(), file.display())
                    })?;
                }
            }
        }
        Ok(())
    }

    /// `cgroup.procs` of each directory, opened for writing: a child writes "0" to each
    /// between fork and exec, where nothing may be opened or allocated.
    pub fn procs_files(&self) -> Result<Vec<File>> {
        self.dirs
            .iter()
            .map(|d| {
                let p = d.path.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .with_context(|| {
                        format!("opening {} to place the task in its cgroup", p.display())
                    })
            })
            .collect()
    }

    /// The directories that exist.
    pub fn existing(&self) -> Self {
        Self {
            dirs: self
                .dirs
                .iter()
                .filter(|d| d.path.is_dir())
                .cloned()
                .collect(),
        }
    }

    /// Whether the kernel's OOM killer killed a process of the leaf for going over its
    /// memory limit. v2 and recent v1 count kills (`oom_kill` in memory.events or
    /// memory.oom_control); older v1 kernels only count hits of the limit (memory.failcnt),
    /// which with a SIGKILLed task is the same story.
    pub fn out_of_memory(&self, sigkilled: bool) -> bool {
        let Some(d) = self
            .dirs
            .iter()
            .find(|d| d.controllers.contains(&Controller::Memory))
        else {
            return false;
        };
        let read = |f: &str| std::fs::read_to_string(d.path.join(f)).ok();
        let counted = if d.v2 {
            read("memory.events")
        } else {
            read("memory.oom_control")
        };
        match counted.as_deref().and_then(|t| counter(t, "oom_kill")) {
            Some(n) => n > 0,
            None => {
                sigkilled
                    && read("memory.failcnt")
                        .and_then(|t| t.trim().parse::<u64>().ok())
                        .is_some_and(|n| n > 0)
            }
        }
    }

    /// Kills whatever still runs in the leaf and removes its directories (missing ones are
    /// fine). A cgroup cannot be removed while a process is in it, and a killed process
    /// leaves it a moment after the signal.
    pub fn remove(&self) -> Result<()> {
        let mut failed = Vec::new();
        for d in &self.dirs {
            if !d.path.exists() {
                continue;
            }
            if let Err(e) = remove_dir(&d.path) {
                failed.push(format!("{}: {e}", d.path.display()));
            }
        }
        if !failed.is_empty() {
            bail!("cannot remove task cgroups: {}", failed.join("; "));
        }
        Ok(())
    }
}

/// Where `rel` is in a hierarchy of this version. Every v1 cgroup has a control file named
/// `tasks`, so a v2 path ending in a `tasks` directory (the agent's) ends one level up in v1:
/// leaves are named after the node's namespaces, and do not clash there.
fn in_hierarchy(rel: &Path, v2: bool) -> &Path {
    match rel.parent() {
        Some(parent) if !v2 && rel.file_name().is_some_and(|n| n == "tasks") => parent,
        _ => rel,
    }
}

fn limited(limits: &Limits, c: Controller) -> bool {
    match c {
        Controller::Memory => limits.memory_bytes > 0,
        Controller::Cpu => limits.nano_cpus > 0,
        Controller::Pids => limits.pids > 0,
    }
}

fn describe(c: Controller) -> &'static str {
    match c {
        Controller::Memory => "memory",
        Controller::Cpu => "CPU",
        Controller::Pids => "PID",
    }
}

/// What a limit becomes in each version's files, in the order they must be written.
pub fn settings(v2: bool, c: Controller, limits: &Limits) -> Vec<Setting> {
    let set = |file, value: String| Setting {
        file,
        value,
        optional: false,
    };
    let optional = |file, value: String| Setting {
        file,
        value,
        optional: true,
    };
    match (c, v2) {
        _ if !limited(limits, c) => Vec::new(),
        // Docker lets a task with --memory swap as much again (memory-swap = 2 × memory).
        (Controller::Memory, true) => vec![
            set("memory.max", limits.memory_bytes.to_string()),
            optional("memory.swap.max", limits.memory_bytes.to_string()),
        ],
        (Controller::Memory, false) => vec![
            set("memory.limit_in_bytes", limits.memory_bytes.to_string()),
            // memsw counts memory and swap, and may not be below limit_in_bytes.
            optional(
                "memory.memsw.limit_in_bytes",
                limits.memory_bytes.saturating_mul(2).to_string(),
            ),
        ],
        (Controller::Cpu, true) => {
            vec![set(
                "cpu.max",
                format!("{} {CPU_PERIOD_US}", cpu_quota_us(limits.nano_cpus)),
            )]
        }
        (Controller::Cpu, false) => vec![
            set("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
            set(
                "cpu.cfs_quota_us",
                cpu_quota_us(limits.nano_cpus).to_string(),
            ),
        ],
        (Controller::Pids, _) => vec![set("pids.max", limits.pids.to_string())],
    }
}

/// Docker's `NanoCPUs` as a CFS quota per [`CPU_PERIOD_US`].
pub fn cpu_quota_us(nano_cpus: u64) -> u64 {
    (nano_cpus / (1_000_000_000 / CPU_PERIOD_US)).max(MIN_CPU_QUOTA_US)
}

/// In v2 a controller reaches a cgroup only if every ancestor below the root enables it for
/// its children (`cgroup.subtree_control`). Only what is missing is written: enabling a
/// controller on a cgroup that holds processes fails, and one already on needs nothing.
fn enable_controllers(root: &Path, leaf: &Path, controllers: &[Controller]) -> Result<()> {
    if controllers.is_empty() {
        return Ok(());
    }
    let parent = leaf.parent().context("a cgroup leaf has a parent")?;
    let rel = parent
        .strip_prefix(root)
        .with_context(|| format!("{} is not below {}", leaf.display(), root.display()))?;
    let mut dir = root.to_path_buf();
    let mut ancestors = vec![dir.clone()];
    for part in rel.components() {
        dir.push(part);
        ancestors.push(dir.clone());
    }
    for a in ancestors {
        std::fs::create_dir_all(&a).with_context(|| format!("creating cgroup {}", a.display()))?;
        let control = a.join("cgroup.subtree_control");
        let on = std::fs::read_to_string(&control).unwrap_or_default();
        let missing: Vec<String> = controllers
            .iter()
            .filter(|c| !on.split_whitespace().any(|n| n == c.name()))
            .map(|c| format!("+{}", c.name()))
            .collect();
        if missing.is_empty() {
            continue;
        }
        std::fs::write(&control, missing.join(" ")).with_context(|| {
            format!(
                "enabling {} in {} (a cgroup v2 directory with processes of its own cannot \
                 pass controllers to its children)",
                missing.join(" "),
                control.display()
            )
        })?;
    }
    Ok(())
}

/// `name N` in a flat-keyed cgroup file.
fn counter(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok()).flatten()
    })
}

fn remove_dir(path: &Path) -> std::io::Result<()> {
    for attempt in 0..100 {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if attempt == 99 => return Err(e),
            Err(_) => {
                kill_members(path);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    Ok(())
}

/// SIGKILL to everything in the cgroup: at once through `cgroup.kill` (v2, Linux 5.14),
/// else PID by PID (a PID read here names a member until it is reaped, and members of a
/// task's leaf are the task's processes or zombies of them).
fn kill_members(path: &Path) {
    if std::fs::write(path.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    let Ok(procs) = std::fs::read_to_string(path.join("cgroup.procs")) else {
        return;
    };
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::tests::*;
    use super::*;

    fn limits(memory_bytes: u64, nano_cpus: u64, pids: u64) -> Limits {
        Limits {
            nano_cpus,
            memory_bytes,
            pids,
        }
    }

    fn files(v2: bool, c: Controller, l: &Limits) -> Vec<(&'static str, String)> {
        settings(v2, c, l)
            .into_iter()
            .map(|s| (s.file, s.value))
            .collect()
    }

    #[test]
    fn limits_become_each_versions_files() {
        let l = limits(64 << 20, 1_500_000_000, 200);
        let v = |s: &str| s.to_owned();
        assert_eq!(
            files(true, Controller::Memory, &l),
            [
                ("memory.max", v("67108864")),
                ("memory.swap.max", v("67108864"))
            ]
        );
        assert_eq!(
            files(false, Controller::Memory, &l),
            [
                ("memory.limit_in_bytes", v("67108864")),
                ("memory.memsw.limit_in_bytes", v("134217728"))
            ]
        );
        assert_eq!(
            files(true, Controller::Cpu, &l),
            [("cpu.max", v("150000 100000"))]
        );
        assert_eq!(
            files(false, Controller::Cpu, &l),
            [
                ("cpu.cfs_period_us", v("100000")),
                ("cpu.cfs_quota_us", v("150000"))
            ]
        );
        assert_eq!(files(true, Controller::Pids, &l), [("pids.max", v("200"))]);
        assert_eq!(files(false, Controller::Pids, &l), [("pids.max", v("200"))]);
        assert!(files(true, Controller::Memory, &limits(0, 1, 1)).is_empty());
        // 0.001 CPU is below what CFS takes: the kernel's minimum quota.
        assert_eq!(cpu_quota_us(1_000_000), 1_000);
    }

    #[test]
    fn a_hybrid_leaf_spans_the_v2_and_each_limited_v1_hierarchy() {
        let layout = Layout::parse(HYBRID_MOUNTINFO, HYBRID_CGROUPS, "hugetlb\n");
        let rel = Path::new("mesh/c1-n1/tasks");
        let leaf = Leaf::plan(&layout, rel, "n1-web.1.ab", &limits(32 << 20, 0, 50)).unwrap();
        let dirs: Vec<(&Path, bool, &[Controller])> = leaf
            .dirs
            .iter()
            .map(|d| (d.path.as_path(), d.v2, d.controllers.as_slice()))
            .collect();
        assert_eq!(
            dirs,
            [
                (
                    Path::new("/sys/fs/cgroup/unified/mesh/c1-n1/tasks/n1-web.1.ab"),
                    true,
                    &[][..]
                ),
                (
                    Path::new("/sys/fs/cgroup/memory/mesh/c1-n1/n1-web.1.ab"),
                    false,
                    &[Controller::Memory][..]
                ),
                (
                    Path::new("/sys/fs/cgroup/pids/mesh/c1-n1/n1-web.1.ab"),
                    false,
                    &[Controller::Pids][..]
                ),
            ]
        );
        // Removal looks everywhere a limit could have put a directory.
        assert_eq!(Leaf::every(&layout, rel, "x").dirs.len(), 4);
    }

    #[test]
    fn a_unified_leaf_is_one_directory_with_every_controller() {
        let layout = Layout::parse(UNIFIED_MOUNTINFO, UNIFIED_CGROUPS, "cpu memory pids\n");
        let leaf = Leaf::plan(
            &layout,
            Path::new("mesh/tasks"),
            "t",
            &limits(1 << 30, 1_000_000_000, 10),
        )
        .unwrap();
        assert_eq!(leaf.dirs.len(), 1);
        assert_eq!(
            leaf.dirs[0].controllers,
            [Controller::Memory, Controller::Cpu, Controller::Pids]
        );
        // A limit nothing here enforces is refused.
        let layout = Layout::parse(UNIFIED_MOUNTINFO, UNIFIED_CGROUPS, "memory\n");
        let e = Leaf::plan(&layout, Path::new("m"), "t", &limits(0, 0, 10)).unwrap_err();
        assert!(
            e.to_string().contains("no cgroup hierarchy with the pids"),
            "{e}"
        );
    }

    /// A fresh directory of its own per test, removed when dropped.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("mesh-cgroup-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A layout whose mounts are directories of a temp dir: the writers' real file paths.
    fn temp_layout(root: &Path, unified: bool) -> Layout {
        let mountinfo = if unified {
            format!(
                "1 0 0:1 / {} rw - cgroup2 cgroup2 rw\n",
                root.join("v2").display()
            )
        } else {
            format!(
                "1 0 0:1 / {v2} rw - cgroup2 cgroup2 rw\n\
                 2 0 0:2 / {mem} rw - cgroup cgroup rw,memory\n\
                 3 0 0:3 / {cpu} rw - cgroup cgroup rw,cpu,cpuacct\n\
                 4 0 0:4 / {pids} rw - cgroup cgroup rw,pids\n",
                v2 = root.join("v2").display(),
                mem = root.join("memory").display(),
                cpu = root.join("cpu").display(),
                pids = root.join("pids").display(),
            )
        };
        let controllers = if unified {
            "cpu memory pids"
        } else {
            "hugetlb"
        };
        Layout::parse(&mountinfo, "", controllers)
    }

    #[test]
    fn the_hybrid_writer_fills_v1_files_and_removes_every_directory() {
        let tmp = TempDir::new("hybrid");
        let layout = temp_layout(tmp.path(), false);
        let rel = Path::new("mesh/n1/tasks");
        let l = limits(32 << 20, 500_000_000, 20);
        let leaf = Leaf::plan(&layout, rel, "n1-t", &l).unwrap();
        // Swap accounting present: memsw is written too.
        let mem = tmp.path().join("memory/mesh/n1/n1-t");
        std::fs::create_dir_all(&mem).unwrap();
        std::fs::write(mem.join("memory.memsw.limit_in_bytes"), "").unwrap();
        leaf.create(&l).unwrap();
        let read = |p: &str| std::fs::read_to_string(tmp.path().join(p)).unwrap();
        assert_eq!(
            read("memory/mesh/n1/n1-t/memory.limit_in_bytes"),
            "33554432"
        );
        assert_eq!(
            read("memory/mesh/n1/n1-t/memory.memsw.limit_in_bytes"),
            "67108864"
        );
        assert_eq!(read("cpu/mesh/n1/n1-t/cpu.cfs_period_us"), "100000");
        assert_eq!(read("cpu/mesh/n1/n1-t/cpu.cfs_quota_us"), "50000");
        assert_eq!(read("pids/mesh/n1/n1-t/pids.max"), "20");
        assert!(tmp.path().join("v2/mesh/n1/tasks/n1-t").is_dir());
        // No v2 controller was needed: nothing enabled there.
        assert!(!tmp.path().join("v2/cgroup.subtree_control").exists());
        assert_eq!(
            leaf.procs_files().err().map(|_| ()),
            Some(()),
            "no cgroup.procs in a temp dir"
        );

        std::fs::write(
            mem.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        )
        .unwrap();
        assert!(leaf.out_of_memory(false));
        std::fs::write(
            mem.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\n",
        )
        .unwrap();
        std::fs::write(mem.join("memory.failcnt"), "3\n").unwrap();
        assert!(
            leaf.out_of_memory(true),
            "an old kernel: hits of the limit and SIGKILL"
        );
        assert!(!leaf.out_of_memory(false));

        // Plain files cannot be in a real cgroup directory; clear them so rmdir works here.
        for d in &leaf.dirs {
            for f in std::fs::read_dir(&d.path).unwrap() {
                std::fs::remove_file(f.unwrap().path()).unwrap();
            }
        }
        Leaf::every(&layout, rel, "n1-t").remove().unwrap();
        for d in [
            "v2/mesh/n1/tasks",
            "memory/mesh/n1",
            "cpu/mesh/n1",
            "pids/mesh/n1",
        ] {
            assert!(!tmp.path().join(d).join("n1-t").exists(), "{d}");
            assert!(tmp.path().join(d).is_dir(), "the parents stay");
        }
    }

    #[test]
    fn the_unified_writer_enables_controllers_down_to_the_leaf() {
        let tmp = TempDir::new("unified");
        let layout = temp_layout(tmp.path(), true);
        let l = limits(64 << 20, 2_000_000_000, 0);
        let leaf = Leaf::plan(&layout, Path::new("mesh/tasks"), "t", &l).unwrap();
        // The root already passes memory on (as systemd sets it up).
        std::fs::create_dir_all(tmp.path().join("v2")).unwrap();
        std::fs::write(tmp.path().join("v2/cgroup.subtree_control"), "cpu memory").unwrap();
        leaf.create(&l).unwrap();
        let read = |p: &str| std::fs::read_to_string(tmp.path().join("v2").join(p)).unwrap();
        assert_eq!(
            read("cgroup.subtree_control"),
            "cpu memory",
            "left as it was"
        );
        assert_eq!(read("mesh/cgroup.subtree_control"), "+memory +cpu");
        assert_eq!(read("mesh/tasks/cgroup.subtree_control"), "+memory +cpu");
        assert_eq!(read("mesh/tasks/t/memory.max"), "67108864");
        assert_eq!(read("mesh/tasks/t/cpu.max"), "200000 100000");
        assert!(!tmp.path().join("v2/mesh/tasks/t/memory.swap.max").exists());
        std::fs::write(
            tmp.path().join("v2/mesh/tasks/t/memory.events"),
            "low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert!(leaf.out_of_memory(false));
        std::fs::write(
            tmp.path().join("v2/mesh/tasks/t/memory.events"),
            "max 9\noom_kill 0\n",
        )
        .unwrap();
        assert!(
            !leaf.out_of_memory(true),
            "v2 counts kills: a SIGKILL from elsewhere is not OOM"
        );
    }
}
