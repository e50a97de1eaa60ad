//! Secrets and configs inside a task. Their bytes live only in memory: the caller opens them
//! from gossip for this one start and they are wiped when dropped; they are never part of
//! the task record (which is saved to disk).
//!
//! - process driver: the task has its own mount namespace, and in it (between fork and
//!   exec, see `process::enter`) a fresh tmpfs at /run/secrets receives the secrets and is
//!   made read-only; configs are written there too, bind-mounted read-only over their target
//!   and unlinked, so no other process on the host, and no other task, ever sees them. When
//!   the task's processes are gone, so is the namespace and with it the tmpfs.
//! - podman driver: a tmpfs the agent mounts at `<files dir>/<task netns>` (owner-only
//!   parent), bind-mounted into the container (`-v …:/run/secrets:ro`, `-v …:<target>:ro`),
//!   unmounted when the task is torn down.

use std::{
    ffi::CString,
    io::Write,
    os::unix::{ffi::OsStrExt, fs::OpenOptionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use zeroize::Zeroizing;

/// Where secrets appear inside a task, as in Docker.
pub const SECRETS_DIR: &str = "/run/secrets";

/// A file a task gets.
pub struct TaskFile {
    /// Secrets: a file name under /run/secrets. Configs: an absolute path.
    pub target: String,
    pub data: Zeroizing<Vec<u8>>,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// What one task start is granted.
#[derive(Default)]
pub struct TaskFiles {
    pub secrets: Vec<TaskFile>,
    pub configs: Vec<TaskFile>,
}

impl TaskFiles {
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty() && self.configs.is_empty()
    }
}

/// One file to write between fork and exec: everything prepared as C strings and bytes.
pub(super) struct Prepared {
    /// Where it is written inside the task's /run/secrets tmpfs.
    pub path: CString,
    /// Configs: where it is bind-mounted (then `path` is unlinked).
    pub bind_to: Option<CString>,
    pub data: Zeroizing<Vec<u8>>,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// The process driver's plan, made before the fork. Config targets the host lacks get an
/// empty file as their mount point (the process driver shares the host's file system); they
/// are returned so the task record can remove them again.
pub(super) fn prepare(files: &TaskFiles) -> Result<(Vec<Prepared>, Vec<PathBuf>)> {
    let mut out = Vec::new();
    let mut placeholders = Vec::new();
    if files.is_empty() {
        return Ok((out, placeholders));
    }
    // The mount point of every task's own tmpfs; empty on the host itself.
    std::fs::create_dir_all(SECRETS_DIR)
        .with_context(|| format!("creating the mount point {SECRETS_DIR}"))?;
    let cs = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .with_context(|| format!("{} contains a NUL byte", p.display()))
    };
    for f in &files.secrets {
        out.push(Prepared {
            path: cs(&Path::new(SECRETS_DIR).join(&f.target))?,
            bind_to: None,
            data: f.data.clone(),
            uid: f.uid,
            gid: f.gid,
            mode: f.mode,
        });
    }
    for (i, f) in files.configs.iter().enumerate() {
        let target = Path::new(&f.target);
        match std::fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => bail!(
                "config target {} is a directory on this node; give a file path",
                f.target
            ),
            // Another task's placeholder (an update's old task, not yet torn down): this task
            // mounts on it too, so it is this task's to keep until the last one goes.
            Ok(m) if m.is_file() && m.len() == 0 => placeholders.push(target.to_owned()),
            Ok(_) => {}
            Err(_) => {
                let parent = target.parent().unwrap_or(Path::new("/"));
                if !parent.is_dir() {
                    bail!(
                        "config target {}: the directory {} does not exist on this node (the \
                         process driver shares the host's file system: use an existing \
                         directory, or an image)",
                        f.target,
                        parent.display()
                    );
                }
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(target)
                {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EROFS) => bail!(
                        "config target {}: the process driver shares the host's file system, \
                         and {} is read-only to the agent here (the packaged unit's \
                         ProtectSystem=strict): create the file on the node, choose a target \
                         under a writable path (/tmp is the agent's own), or run an image",
                        f.target,
                        parent.display()
                    ),
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("creating the mount point {}", f.target));
                    }
                }
                placeholders.push(target.to_owned());
            }
        }
        out.push(Prepared {
            path: cs(&Path::new(SECRETS_DIR).join(format!(".mesh-config-{i}")))?,
            bind_to: Some(cs(target)?),
            data: f.data.clone(),
            uid: f.uid,
            gid: f.gid,
            mode: f.mode,
        });
    }
    Ok((out, placeholders))
}

/// Removes config mount points this task created, unless another task still uses them.
pub(super) fn remove_placeholders(mine: &[PathBuf], in_use: &[PathBuf]) {
    for p in mine.iter().filter(|p| !in_use.contains(p)) {
        // Only an empty regular file is ours to remove: someone may have put a real one there.
        if std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() == 0) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The podman driver's tmpfs for one task, filled; returns the `-v` arguments.
pub(super) fn podman_mounts(dir: &Path, files: &TaskFiles) -> Result<Vec<String>> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let parent = dir.parent().context("files dir has a parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    use std::os::unix::fs::PermissionsExt;
    // Host users must not reach into any task's files.
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))?;
    remove_podman_dir(dir);
    std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0755"),
    )
    .with_context(|| format!("mounting a tmpfs at {}", dir.display()))?;
    let write = |path: &Path, f: &TaskFile| -> Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.write_all(&f.data)?;
        std::os::unix::fs::fchown(&file, Some(f.uid), Some(f.gid))?;
        file.set_permissions(std::fs::Permissions::from_mode(f.mode))?;
        Ok(())
    };
    let mut args = Vec::new();
    if !files.secrets.is_empty() {
        let secrets = dir.join("secrets");
        std::fs::create_dir(&secrets)?;
        for f in &files.secrets {
            write(&secrets.join(&f.target), f)?;
        }
        args.push(format!("{}:{SECRETS_DIR}:ro", secrets.display()));
    }
    if !files.configs.is_empty() {
        let configs = dir.join("configs");
        std::fs::create_dir(&configs)?;
        for (i, f) in files.configs.iter().enumerate() {
            let p = configs.join(i.to_string());
            write(&p, f)?;
            args.push(format!("{}:{}:ro", p.display(), f.target));
        }
    }
    Ok(args)
}

/// Unmounts and removes a task's podman files dir; nothing there is fine.
pub(super) fn remove_podman_dir(dir: &Path) {
    if dir.exists() {
        let _ = umount2(dir, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(dir);
    }
}
