//! Named network namespaces, mounted under /run/netns the way `ip netns add` does, so
//! iproute2 (`ip netns exec`, `ip netns pids`) and operators see the agent's task namespaces.
//!
//! Entering a namespace always happens on a dedicated short-lived thread: a tokio worker
//! that called setns would carry every later task it runs into the wrong namespace.

use std::{
    fs::File,
    io,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
};

pub const NETNS_DIR: &str = "/run/netns";

/// Where the namespace called `name` is mounted.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn exists(name: &str) -> bool {
    is_netns_mount(&path(name))
}

/// Creates the namespace `name` with only a loopback device (down, like any new namespace).
pub fn create(name: &str) -> Result<PathBuf> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        bail!("{name:?} is not a valid network namespace name");
    }
    prepare_netns_dir()?;
    let target = path(name);
    if target.exists() && !is_netns_mount(&target) {
        // Left by a crash between creating the file and mounting the namespace on it.
        std::fs::remove_file(&target)
            .with_context(|| format!("removing the stale {}", target.display()))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&target)
        .with_context(|| {
            format!(
                "creating {} (does the namespace already exist?)",
                target.display()
            )
        })?;
    let bind_target = target.clone();
    let bound = std::thread::spawn(move || -> Result<()> {
        // CLONE_NEWNET affects only this thread, which ends right after the bind mount keeps
        // the namespace alive.
        unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &bind_target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| {
            format!(
                "bind-mounting the new namespace on {}",
                bind_target.display()
            )
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace creation thread panicked"))?;
    if let Err(e) = bound {
        let _ = std::fs::remove_file(&target);
        return Err(e).with_context(|| format!("creating network namespace {name}"));
    }
    Ok(target)
}

/// Removes the mount that keeps the namespace `name` alive. The kernel frees it (and the
/// devices in it, which takes a veth's peer with it) once no process is left inside.
pub fn delete(name: &str) -> Result<()> {
    let target = path(name);
    match umount2(&target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e).with_context(|| format!("unmounting {}", target.display())),
    }
    match std::fs::remove_file(&target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", target.display())),
    }
}

/// Runs `f` on a fresh thread that entered the network namespace mounted at `netns`.
pub fn run_in<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering {}", netns.display()))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// PIDs of every process whose network namespace is the one mounted at `netns` (what
/// `ip netns pids` prints).
pub fn pids(netns: &Path) -> Vec<i32> {
    let Ok(target) = std::fs::metadata(netns) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.dev() == target.dev() && m.ino() == target.ino())
        })
        .collect()
}

/// A namespace file is a bind mount of an nsfs inode; a plain file left by a crash between
/// creating and mounting it is not a namespace.
fn is_netns_mount(p: &Path) -> bool {
    nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// Makes /run/netns a shared mount point, as iproute2 does, so namespace mounts made here
/// propagate into mount namespaces created later (task processes get private ones).
fn prepare_netns_dir() -> Result<()> {
    std::fs::create_dir_all(NETNS_DIR).with_context(|| format!("creating {NETNS_DIR}"))?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    if mount(None::<&str>, NETNS_DIR, Some("none"), shared, None::<&str>).is_ok() {
        return Ok(());
    }
    // Not a mount point yet: bind it onto itself first.
    mount(
        Some(NETNS_DIR),
        NETNS_DIR,
        Some("none"),
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("bind-mounting {NETNS_DIR} onto itself"))?;
    mount(None::<&str>, NETNS_DIR, Some("none"), shared, None::<&str>)
        .with_context(|| format!("making {NETNS_DIR} a shared mount"))
}
