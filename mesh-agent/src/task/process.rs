//! The task's process: started inside its namespaces, in its own session, and followed
//! through a pidfd so exits are seen at once and a recycled PID is never signalled.

use std::{
    ffi::{CStr, CString},
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{ffi::OsStrExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, setns, unshare},
    sys::wait::{Id, WaitPidFlag, WaitStatus, waitid},
};
use tokio::io::unix::AsyncFd;

use super::isolation::Isolation;

/// Where a task's process runs and what it sees.
pub(super) struct Launch<'a> {
    pub netns: &'a Path,
    /// Files bind-mounted over their namesake in /etc inside the task's private mount
    /// namespace, as `ip netns exec` does with /etc/netns/<name>/*.
    pub etc_overrides: &'a Path,
    pub hostname: &'a str,
    /// Cgroup directories (the task's leaf in each hierarchy) the process joins before it
    /// executes anything.
    pub cgroups: &'a [PathBuf],
    pub command: &'a [String],
    pub env: &'a [(String, String)],
    /// Where the program starts, inside the task's mount namespace (default `/`).
    pub workdir: Option<&'a str>,
    pub log: &'a Path,
    /// Rotate the log past this many bytes, keeping this many files.
    pub log_max_size: u64,
    pub log_max_file: u32,
    /// Secrets and configs written into the task's own tmpfs before exec (see `files`).
    pub files: &'a [super::files::Prepared],
    /// The task's init binary (see `init`).
    pub init: &'a Path,
    /// Volumes, bind mounts and tmpfs, made in its mount namespace (see `volumes`).
    pub mounts: Vec<super::volumes::Prepared>,
}

/// A running task process.
pub(super) struct Spawned {
    pub pid: u32,
    pub start_time: u64,
    pub pidfd: OwnedFd,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a process needs to enter a task, opened before the fork: between fork and exec only
/// async-signal-safe system calls may run (no allocation, no locks).
struct Entry {
    netns: File,
    cgroup_procs: Vec<File>,
    binds: Vec<(CString, CString)>,
    hostname: Vec<u8>,
    files: Vec<super::files::Prepared>,
    workdir: Option<CString>,
    mounts: Vec<super::volumes::Prepared>,
    /// Taken by the child's setup closure.
    isolation: Option<Isolation>,
}

impl Entry {
    fn open(launch: &mut Launch, isolation: Isolation) -> Result<Self> {
        let netns = File::open(launch.netns)
            .with_context(|| format!("opening the task namespace {}", launch.netns.display()))?;
        Ok(Self {
            netns,
            cgroup_procs: cgroup_procs(launch.cgroups)?,
            binds: etc_binds(launch.etc_overrides)?,
            hostname: launch.hostname.as_bytes().to_vec(),
            workdir: workdir(launch.workdir)?,
            mounts: std::mem::take(&mut launch.mounts),
            files: launch
                .files
                .iter()
                .map(|f| super::files::Prepared {
                    path: f.path.clone(),
                    bind_to: f.bind_to.clone(),
                    data: f.data.clone(),
                    uid: f.uid,
                    gid: f.gid,
                    mode: f.mode,
                })
                .collect(),
            isolation: Some(isolation),
        })
    }

    /// The command, set to enter the task (namespaces, /etc overrides, hostname, cgroup,
    /// isolation) as its first act in the child; it runs the task's init, which runs the
    /// program. `self` must outlive the spawn (it holds the fds).
    fn command(mut self, launch: &Launch) -> Result<(Command, Self)> {
        let Some(program) = launch.command.first() else {
            bail!("nothing to run: give a command");
        };
        check_program(program, launch.env, launch.workdir)?;
        let mut cmd = Command::new(launch.init);
        cmd.arg(super::init::INIT_ARG)
            .arg("--")
            .args(launch.command)
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .env("HOSTNAME", launch.hostname)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .current_dir("/");
        let netns_fd = self.netns.as_raw_fd();
        let cgroup_fds: Vec<RawFd> = self.cgroup_procs.iter().map(|f| f.as_raw_fd()).collect();
        let binds = self.binds.clone();
        let hostname = self.hostname.clone();
        let files = std::mem::take(&mut self.files);
        let workdir = self.workdir.take();
        let mounts = std::mem::take(&mut self.mounts);
        let iso = self
            .isolation
            .take()
            .context("the task's isolation was already used")?;
        // SAFETY: the closure only makes system calls on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                enter(netns_fd, &cgroup_fds, &binds, &hostname)?;
                // Before the masks: a volume's data lives under the (masked) state dir.
                super::volumes::apply(&mounts)?;
                iso.hide_host()?;
                write_files(&files)?;
                iso.tune()?;
                iso.seal_root()?;
                // After entering: the directory is the task's view of it (std's own chdir
                // would run before the mount namespace is entered).
                chdir(workdir.as_deref())?;
                iso.drop_privileges()
            });
        }
        Ok((cmd, self))
    }
}

/// The `cgroup.procs` of each directory, opened before the fork: the child joins them by
/// writing to these fds (after `hide_host` the cgroup filesystem may no longer be reachable).
fn cgroup_procs(dirs: &[PathBuf]) -> Result<Vec<File>> {
    dirs.iter()
        .map(|dir| {
            let p = dir.join("cgroup.procs");
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .with_context(|| format!("opening {} to place the task in its cgroup", p.display()))
        })
        .collect()
}

fn workdir(w: Option<&str>) -> Result<Option<CString>> {
    w.map(|w| CString::new(w).context("a working directory with a NUL byte"))
        .transpose()
}

fn chdir(w: Option<&CStr>) -> io::Result<()> {
    // SAFETY: plain system call on a C string.
    if let Some(w) = w
        && unsafe { libc::chdir(w.as_ptr()) } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A program that cannot be found is refused before anything starts, as `docker run` does
/// ("executable file not found in $PATH"), rather than becoming a task that exits 127.
fn check_program(program: &str, env: &[(String, String)], workdir: Option<&str>) -> Result<()> {
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        // A relative path is the task's, from its working directory.
        if !executable(&Path::new(workdir.unwrap_or("/")).join(program)) {
            bail!("{program}: no such executable file");
        }
        return Ok(());
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    if !std::env::split_paths(path).any(|d| executable(&d.join(program))) {
        bail!("{program:?}: executable file not found in $PATH");
    }
    Ok(())
}

/// Runs `spawn` on a thread of its own whose children start in a new PID namespace: the
/// task's first process is PID 1 there. The thread's namespace for children goes with it.
fn in_new_pid_namespace<T: Send>(spawn: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            unshare(CloneFlags::CLONE_NEWPID).context("creating the task's PID namespace")?;
            spawn()
        })
        .join()
        .unwrap_or_else(|_| bail!("the thread starting the task panicked"))
    })
}

pub(super) fn spawn(mut launch: Launch, isolation: Isolation) -> Result<Spawned> {
    let log = super::logs::capture(launch.log, launch.log_max_size, launch.log_max_file)
        .with_context(|| format!("opening the task log {}", launch.log.display()))?;
    let (mut cmd, _entry) = Entry::open(&mut launch, isolation)?.command(&launch)?;
    cmd.stdout(log.try_clone()?).stderr(log);
    let child = in_new_pid_namespace(|| {
        cmd.spawn().with_context(|| {
            format!(
                "starting {:?} in {}",
                launch.command[0],
                launch.netns.display()
            )
        })
    })?;
    let pid = child.id();
    // The Child handle is dropped without waiting: the process is reaped through its pidfd.
    drop(child);
    // Unreaped, the child keeps its PID even if it already exited: both calls see it.
    let pidfd = pidfd_open(pid).context("opening a pidfd for the task process")?;
    let (_, start_time) = stat(pid).context("reading the task process's start time")?;
    Ok(Spawned {
        pid,
        start_time,
        pidfd,
    })
}

/// A running process task to run a command in (`meshctl exec`, health check commands).
pub(super) struct Target<'a> {
    /// The task's first process (its init): its namespaces are the task's.
    pub pid: u32,
    /// The task's cgroup leaves (its limits hold for the command too).
    pub cgroups: &'a [PathBuf],
    pub command: &'a [String],
    pub env: &'a [(String, String)],
    pub hostname: &'a str,
    pub workdir: Option<&'a str>,
}

/// Runs a command inside a running task — its network, mount, UTS, IPC and PID namespaces
/// and cgroup, as its user with its capabilities (like `docker exec`) — and collects its
/// output; it is killed if it outlives `timeout`.
pub(super) async fn exec(
    target: &Target<'_>,
    isolation: Isolation,
    timeout: std::time::Duration,
) -> Result<std::process::Output> {
    let Some(program) = target.command.first() else {
        bail!("nothing to run: give a command");
    };
    let ns = |kind: &str| {
        let p = format!("/proc/{}/ns/{kind}", target.pid);
        File::open(&p).with_context(|| format!("opening {p}: is the task still running?"))
    };
    let (net, mnt, uts, ipc, pid) = (ns("net")?, ns("mnt")?, ns("uts")?, ns("ipc")?, ns("pid")?);
    let cgroups = cgroup_procs(target.cgroups)?;
    let workdir = workdir(target.workdir)?;
    let mut cmd = Command::new(program);
    cmd.args(&target.command[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOSTNAME", target.hostname)
        .envs(target.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let fds = [
        (net.as_raw_fd(), CloneFlags::CLONE_NEWNET),
        (uts.as_raw_fd(), CloneFlags::CLONE_NEWUTS),
        (ipc.as_raw_fd(), CloneFlags::CLONE_NEWIPC),
        (mnt.as_raw_fd(), CloneFlags::CLONE_NEWNS),
    ];
    let cgroup_fds: Vec<RawFd> = cgroups.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: the closure only makes system calls on memory prepared before the fork; the
    // fds stay open until the spawn returned.
    unsafe {
        cmd.pre_exec(move || {
            let os = |e: nix::errno::Errno| io::Error::from_raw_os_error(e as i32);
            for (fd, kind) in fds {
                setns(std::os::fd::BorrowedFd::borrow_raw(fd), kind).map_err(os)?;
            }
            join_cgroups(&cgroup_fds)?;
            chdir(workdir.as_deref())?;
            isolation.limit()?;
            isolation.drop_privileges()
        });
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let runtime = tokio::runtime::Handle::current();
    // The command's PID namespace is the task's: set on a thread of its own for its children.
    let child = std::thread::scope(|s| {
        s.spawn(|| {
            let _rt = runtime.enter();
            setns(pid.as_fd(), CloneFlags::CLONE_NEWPID)
                .context("entering the task's PID namespace")?;
            cmd.spawn()
                .with_context(|| format!("starting {program:?} in task {}", target.hostname))
        })
        .join()
        .unwrap_or_else(|_| bail!("the thread starting the command panicked"))
    })?;
    drop((net, mnt, uts, ipc, pid, cgroups));
    let output = super::logs::bounded_output(child, super::logs::EXEC_OUTPUT_LIMIT);
    match tokio::time::timeout(timeout, output).await {
        Ok(out) => Ok(out?),
        Err(_) => bail!("{program:?} did not finish within {timeout:?}; it was killed"),
    }
}

/// Runs in the forked child: its own session (it outlives the agent), the task's network
/// namespace, private mount, UTS and IPC namespaces with the task's /etc overrides and
/// hostname, and the task's cgroups (its limits hold from its first instruction, and the
/// task's init and every process it starts stay in them).
fn enter(
    netns: RawFd,
    cgroup_procs: &[RawFd],
    binds: &[(CString, CString)],
    hostname: &[u8],
) -> io::Result<()> {
    let os = |e: nix::errno::Errno| io::Error::from_raw_os_error(e as i32);
    nix::unistd::setsid().map_err(os)?;
    // SAFETY: the fd stays open in the parent's File until after spawn returns.
    let netns = unsafe { std::os::fd::BorrowedFd::borrow_raw(netns) };
    setns(netns, CloneFlags::CLONE_NEWNET).map_err(os)?;
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC)
        .map_err(os)?;
    // Our bind mounts must not leak back into the host's mount namespace.
    mount(
        None::<&CStr>,
        c"/",
        None::<&CStr>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&CStr>,
    )
    .map_err(os)?;
    for (src, dst) in binds {
        mount(
            Some(src.as_c_str()),
            dst.as_c_str(),
            None::<&CStr>,
            MsFlags::MS_BIND,
            None::<&CStr>,
        )
        .map_err(os)?;
    }
    // SAFETY: plain system call on a live buffer.
    if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    join_cgroups(cgroup_procs)
}

/// Moves the calling process into the cgroups whose `cgroup.procs` fds are given.
fn join_cgroups(cgroup_procs: &[RawFd]) -> io::Result<()> {
    for &fd in cgroup_procs {
        // "0" moves the writing process itself (v1 and v2 alike).
        // SAFETY: plain system call on a static buffer.
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs in the forked child, inside the task's own mount namespace: a fresh tmpfs at
/// /run/secrets gets the secrets and is made read-only; configs are written there, bound
/// read-only over their target and unlinked (the bind mount keeps them). Only system calls on
/// memory prepared before the fork.
fn write_files(files: &[super::files::Prepared]) -> io::Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    let os = |e: nix::errno::Errno| io::Error::from_raw_os_error(e as i32);
    let dir = c"/run/secrets";
    let quiet = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some(c"tmpfs"),
        dir,
        Some(c"tmpfs"),
        quiet,
        Some(c"mode=0755"),
    )
    .map_err(os)?;
    for f in files {
        // SAFETY: plain system calls on C strings and buffers that outlive them.
        unsafe {
            let fd = libc::open(
                f.path.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                0o600,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut done = 0;
            while done < f.data.len() {
                let n = libc::write(fd, f.data[done..].as_ptr().cast(), f.data.len() - done);
                if n <= 0 {
                    let e = io::Error::last_os_error();
                    libc::close(fd);
                    return Err(e);
                }
                done += n as usize;
            }
            if libc::fchown(fd, f.uid, f.gid) != 0 || libc::fchmod(fd, f.mode) != 0 {
                let e = io::Error::last_os_error();
                libc::close(fd);
                return Err(e);
            }
            libc::close(fd);
        }
        if let Some(target) = &f.bind_to {
            mount(
                Some(f.path.as_c_str()),
                target.as_c_str(),
                None::<&CStr>,
                MsFlags::MS_BIND,
                None::<&CStr>,
            )
            .map_err(os)?;
            mount(
                None::<&CStr>,
                target.as_c_str(),
                None::<&CStr>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | quiet,
                None::<&CStr>,
            )
            .map_err(os)?;
            // SAFETY: plain system call on a C string.
            if unsafe { libc::unlink(f.path.as_ptr()) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    if files.iter().any(|f| f.bind_to.is_none()) {
        // Read-only as a mount, not as a file system: a config's file, unlinked above, lives
        // on while its bind mount holds it, and the kernel refuses (EBUSY) to make a file
        // system with such files read-only.
        mount(
            None::<&CStr>,
            dir,
            None::<&CStr>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | quiet,
            None::<&CStr>,
        )
        .map_err(os)?;
    } else {
        // Configs only: the staging tmpfs goes; the bind mounts keep its files alive.
        nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH).map_err(os)?;
    }
    Ok(())
}

/// (source, target) pairs: every file in `dir` over /etc/<file>, skipping files that do not
/// exist in /etc (a bind mount needs a target, and creating one would change the host).
fn etc_binds(dir: &Path) -> Result<Vec<(CString, CString)>> {
    let mut binds = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(binds);
    };
    for e in entries.flatten() {
        let target = Path::new("/etc").join(e.file_name());
        if !target.exists() {
            tracing::warn!(
                "{} does not exist; the task sees no {}",
                target.display(),
                e.path().display()
            );
            continue;
        }
        binds.push((cstring(&e.path())?, cstring(&target)?));
    }
    Ok(binds)
}

fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .with_context(|| format!("{} contains a NUL byte", p.display()))
}

pub(super) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the returned fd is owned by us.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Signals the process behind `pidfd`; a process that already exited is not an error.
pub(super) fn signal(pidfd: &OwnedFd, sig: nix::sys::signal::Signal) -> io::Result<()> {
    // SAFETY: plain system call on a live fd.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
    }
    Ok(())
}

/// How a process ended, as far as we can know: only a parent learns the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// Waits until the process behind `pidfd` exits, and reaps it if it is our child.
pub(super) async fn wait(pidfd: OwnedFd) -> Exit {
    // SAFETY: an OwnedFd keeps its descriptor open and unchanged until it is dropped.
    match unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) } {
        Ok(fd) => {
            // A pidfd turns readable once, when the process exits, and stays so.
            if let Err(e) = fd.readable().await {
                tracing::warn!("watching a task pidfd failed ({e}); polling instead");
                poll_until_exit(fd.get_ref()).await;
            }
            reap(fd.get_ref())
        }
        Err(e) => {
            let (pidfd, e) = e.into_parts();
            tracing::warn!("cannot watch a task pidfd ({e}); polling instead");
            poll_until_exit(&pidfd).await;
            reap(&pidfd)
        }
    }
}

async fn poll_until_exit(pidfd: &OwnedFd) {
    loop {
        let mut p = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: plain system call on a live pollfd, zero timeout.
        if unsafe { libc::poll(&mut p, 1, 0) } != 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn reap(pidfd: &OwnedFd) -> Exit {
    match waitid(
        Id::PIDFd(pidfd.as_fd()),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
    ) {
        Ok(WaitStatus::Exited(_, code)) => Exit {
            code: Some(code),
            signal: None,
        },
        Ok(WaitStatus::Signaled(_, sig, _)) => Exit {
            code: None,
            signal: Some(sig as i32),
        },
        // Not our child (started by an earlier agent): the status went to its new parent.
        _ => Exit {
            code: None,
            signal: None,
        },
    }
}

/// (state, start time) from /proc/<pid>/stat. The start time, in clock ticks since boot,
/// names one process for good together with the PID.
pub(super) fn stat(pid: u32) -> io::Result<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let malformed = || io::Error::other(format!("malformed /proc/{pid}/stat"));
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let (_, rest) = stat.rsplit_once(')').ok_or_else(malformed)?;
    // `rest` starts at field 3 (state).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields
        .first()
        .and_then(|f| f.chars().next())
        .ok_or_else(malformed)?;
    let start = fields
        .get(22 - 3)
        .and_then(|f| f.parse().ok())
        .ok_or_else(malformed)?;
    Ok((state, start))
}

/// What became of a process recorded as running.
pub(super) enum Found {
    /// Still the same process, now followed through this pidfd.
    Running(OwnedFd),
    /// It exited; the status is known if it was our child.
    Exited(Exit),
}

/// Looks for the process recorded as `pid` started at `start`.
pub(super) fn find(pid: u32, start: u64) -> Found {
    let gone = Found::Exited(Exit {
        code: None,
        signal: None,
    });
    let Ok(fd) = pidfd_open(pid) else {
        return gone;
    };
    // Checked after opening: the pidfd pins this PID, so a match now cannot be a process
    // that got the PID recycled in between.
    match stat(pid) {
        Ok((state, t)) if t == start && state != 'Z' && state != 'X' => Found::Running(fd),
        // Our own child that exited while we were not watching: reaping it yields the status.
        Ok((_, t)) if t == start => Found::Exited(reap(&fd)),
        _ => gone,
    }
}
