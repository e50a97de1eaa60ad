//! Network namespaces: create, enter on a dedicated thread, run commands inside, delete.

use std::{
    fs::File,
    os::fd::AsFd,
    path::PathBuf,
    process::{Command, Output},
};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

/// A named network namespace (`ip netns add`), deleted on drop with every process still in it.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Whether dropping this handle deletes the namespace: false for one somebody else made
    /// (a task's, see [`Netns::existing`]).
    owned: bool,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        run_ok(Command::new("ip").args(["netns", "add", name]))
            .with_context(|| format!("creating netns {name}"))?;
        let ns = Self {
            name: name.to_owned(),
            owned: true,
        };
        ns.sh("ip link set lo up")?;
        Ok(ns)
    }

    /// A handle on a namespace this test did not make (an agent's task's): dropping it
    /// leaves the namespace alone.
    pub fn existing(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            owned: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command that runs inside the namespace. `nsenter --net` switches only the network
    /// namespace, so /sys/fs/bpf and the cgroup tree stay visible (`ip netns exec` remounts
    /// /sys and hides them).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs a shell command line inside the namespace and fails with its output if it fails.
    pub fn sh(&self, script: &str) -> Result<String> {
        let out = self
            .command("sh")
            .args(["-c", script])
            .output()
            .with_context(|| format!("running `{script}` in {}", self.name))?;
        if !out.status.success() {
            bail!(
                "`{script}` in {} failed ({}): {}{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a shell command line inside the namespace and returns its output, whatever the
    /// exit status.
    pub fn sh_output(&self, script: &str) -> Result<Output> {
        self.command("sh")
            .args(["-c", script])
            .output()
            .with_context(|| format!("running `{script}` in {}", self.name))
    }

    /// Runs `f` on a fresh thread that has entered the namespace, so sockets `f` creates live
    /// there. Never switches the caller's (possibly async runtime's) thread.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        let handle = std::thread::spawn(move || -> Result<T> {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        });
        match handle.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// A tokio runtime whose threads all live in this namespace, so sockets (netlink ones
    /// included) opened by the futures it runs belong here.
    pub fn runtime(&self) -> Result<NsRuntime> {
        let rt = self
            .run(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
            })?
            .context("building a tokio runtime")?;
        Ok(NsRuntime { rt })
    }

    /// Runs `f` on a new thread inside the namespace and returns at once: for servers that
    /// live as long as the test needs them. Threads `f` spawns stay in the namespace too.
    pub fn spawn_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<T>>> {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        Ok(std::thread::spawn(move || -> Result<T> {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        }))
    }

    /// PIDs of processes whose network namespace is this one.
    pub fn pids(&self) -> Vec<i32> {
        let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        else {
            return Vec::new();
        };
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            delete_netns(&self.name);
        }
    }
}

/// A tokio runtime created inside a namespace (see [`Netns::runtime`]).
pub struct NsRuntime {
    rt: tokio::runtime::Runtime,
}

impl NsRuntime {
    /// Runs `fut` to completion on one of the runtime's (namespaced) worker threads. The
    /// calling thread only waits: it may be in another namespace.
    pub fn block_on<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        match self.rt.block_on(self.rt.spawn(fut)) {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

/// A command that runs inside the namespace called `name` (one the test did not create
/// itself, e.g. a task's), entered with `nsenter --net` so /sys stays the host's.
pub fn command_in(name: &str, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{name}"))
        .arg("--")
        .arg(program);
    cmd
}

/// Kills the processes still inside a namespace (by PID) and deletes it.
pub fn delete_netns(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                crate::process::kill_pid(pid);
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).output();
}

/// Every namespace name currently in /run/netns.
pub fn list() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

pub(crate) fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A process started in a namespace for the length of a test; stopped (by PID) on drop.
pub struct Background {
    child: std::process::Child,
}

impl Background {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        crate::process::kill_pid(self.child.id() as i32);
        let _ = self.child.wait();
    }
}

impl Netns {
    /// A site resolver outside the mesh (dnsmasq) listening on `listen` in this namespace,
    /// answering `name` with `ip` and nothing else: the upstream of agents under test.
    pub fn spawn_resolver(&self, listen: &str, name: &str, ip: &str) -> Result<Background> {
        self.spawn(
            "dnsmasq",
            &[
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                &format!("--listen-address={listen}"),
                "--pid-file=",
                &format!("--address=/{name}/{ip}"),
            ],
        )
    }

    /// Starts `program args…` in the namespace in the background, output discarded.
    pub fn spawn(&self, program: &str, args: &[&str]) -> Result<Background> {
        let child = self
            .command(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting {program} in {}", self.name))?;
        Ok(Background { child })
    }
}
