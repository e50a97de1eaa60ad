//! Volumes, bind mounts and tmpfs in a task (Docker's `--mount`).
//!
//! A named volume is node-local, as with Swarm's `local` driver: created on this node the
//! first time a task here mounts it (or by `meshctl volume create`), kept when the task
//! stops, removed only by `volume rm` while no task of this node uses it. Its catalogue entry
//! is `<state>/volumes/<name>/volume.json`.
//!
//! - process driver: its data is `<state>/volumes/<name>/_data`, owned by the task's user
//!   when the volume is new (process tasks run as `nobody` by default). Between fork and
//!   exec, in the task's own mount namespace and before the agent's paths are masked, it is
//!   bind-mounted at the target; bind mounts likewise; tmpfs mounted fresh.
//! - podman driver: a podman volume of the same name (`podman volume ls` shows it), labelled
//!   `mesh.node` so what is mesh's can be found, passed as `--mount`.
//!
//! A bind source is a host path: a service spec is an operator's word (as in Docker), but no
//! source may hold, or sit inside, what the agent masks from tasks (state, keys, sockets).

use std::{
    collections::BTreeMap,
    ffi::{CStr, CString},
    io,
    os::unix::{ffi::OsStrExt, fs::PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use mesh_api::{
    spec::{Mount, MountType, validate_volume_name},
    v1::{VOLUME_DRIVER, Volume},
};
use nix::mount::{MsFlags, mount};
use serde::{Deserialize, Serialize};

/// The label podman volumes made by mesh carry (the node that made them).
pub(super) const LABEL_NODE: &str = super::container::LABEL_NODE;

/// What a volume's directory records about it.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    created_ms: u64,
    /// Made by `volume create` and not mounted yet: the first task to mount it gets its data
    /// directory (as Docker's first mount copies the image's ownership into a new volume).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    unclaimed: bool,
}

/// `<state>/volumes`.
pub fn root(state_dir: &Path) -> PathBuf {
    state_dir.join("volumes")
}

fn dir(state_dir: &Path, name: &str) -> Result<PathBuf> {
    validate_volume_name(name).map_err(anyhow::Error::msg)?;
    Ok(root(state_dir).join(name))
}

/// Where the process driver keeps a volume's data.
pub fn data_dir(state_dir: &Path, name: &str) -> Result<PathBuf> {
    Ok(dir(state_dir, name)?.join("_data"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `volume create`: makes the volume if this node lacks it, owned by root until a task
/// claims it. Returns whether it was made now.
pub fn create(state_dir: &Path, name: &str, labels: &BTreeMap<String, String>) -> Result<bool> {
    make(state_dir, name, labels, (0, 0), true)
}

/// A task mounts the volume: made if missing, its data directory given to `owner` if new
/// (or made by `volume create` and still empty).
pub(super) fn claim(
    state_dir: &Path,
    name: &str,
    labels: &BTreeMap<String, String>,
    owner: (u32, u32),
) -> Result<()> {
    if make(state_dir, name, labels, owner, false)? {
        return Ok(());
    }
    let dir = dir(state_dir, name)?;
    let meta_path = dir.join("volume.json");
    let mut meta: Meta = serde_json::from_slice(&std::fs::read(&meta_path)?)
        .with_context(|| format!("reading {}", meta_path.display()))?;
    if !meta.unclaimed {
        return Ok(());
    }
    let data = dir.join("_data");
    let empty = std::fs::read_dir(&data).is_ok_and(|mut d| d.next().is_none());
    if empty {
        std::os::unix::fs::chown(&data, Some(owner.0), Some(owner.1))
            .with_context(|| format!("giving {} to the task's user", data.display()))?;
    }
    meta.unclaimed = false;
    write_meta(&dir, &meta)
}

fn write_meta(dir: &Path, meta: &Meta) -> Result<()> {
    let tmp = dir.join("volume.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(meta)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("volume.json"))
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    Ok(())
}

fn make(
    state_dir: &Path,
    name: &str,
    labels: &BTreeMap<String, String>,
    owner: (u32, u32),
    unclaimed: bool,
) -> Result<bool> {
    let dir = dir(state_dir, name)?;
    let meta = dir.join("volume.json");
    if meta.exists() {
        return Ok(false);
    }
    let existed = dir.exists();
    let made = make_dirs(state_dir, &dir, owner).and_then(|()| {
        let m = Meta {
            name: name.to_owned(),
            labels: labels.clone(),
            created_ms: now_ms(),
            unclaimed,
        };
        // Written last: a volume is listed only once it is whole.
        write_meta(&dir, &m)
    });
    if let Err(e) = made {
        // A full disk (say) leaves no half volume behind to trip the next try.
        if !existed {
            let _ = std::fs::remove_dir_all(&dir);
        }
        return Err(e);
    }
    Ok(true)
}

fn make_dirs(state_dir: &Path, dir: &Path, owner: (u32, u32)) -> Result<()> {
    let root = root(state_dir);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    // Only the agent walks here; tasks reach their volume through its bind mount.
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let data = dir.join("_data");
    if !data.exists() {
        std::fs::create_dir(&data).with_context(|| format!("creating {}", data.display()))?;
        std::os::unix::fs::chown(&data, Some(owner.0), Some(owner.1))
            .with_context(|| format!("giving {} to the task's user", data.display()))?;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// This node's volumes, by name.
pub fn list(state_dir: &Path, node: &str) -> Vec<Volume> {
    let Ok(entries) = std::fs::read_dir(root(state_dir)) else {
        return Vec::new();
    };
    let mut out: Vec<Volume> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            get(state_dir, node, &name)
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// One volume of this node.
pub fn get(state_dir: &Path, node: &str, name: &str) -> Option<Volume> {
    let dir = dir(state_dir, name).ok()?;
    let meta: Meta = serde_json::from_slice(&std::fs::read(dir.join("volume.json")).ok()?).ok()?;
    Some(Volume {
        name: meta.name,
        driver: VOLUME_DRIVER.into(),
        node: node.to_owned(),
        labels: meta.labels,
        mountpoint: dir.join("_data").display().to_string(),
        created_ms: meta.created_ms,
    })
}

/// Removes a volume and its data (the caller checked no task uses it).
pub fn remove(state_dir: &Path, name: &str) -> Result<()> {
    let dir = dir(state_dir, name)?;
    // The catalogue entry first: a half-removed volume is no longer listed.
    let _ = std::fs::remove_file(dir.join("volume.json"));
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))
}

/// Refuses a bind source that does not exist, or that holds or sits inside a path the
/// agent masks from tasks. Returns the source with symlinks resolved (what is mounted).
pub fn check_bind_source(source: &str, masked: &[PathBuf]) -> Result<PathBuf> {
    let path = Path::new(source);
    let real = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!(
                "invalid mount config for type \"bind\": bind source path does not exist: {source}"
            )
        }
        Err(e) => return Err(e).with_context(|| format!("reading bind source {source}")),
    };
    for m in masked {
        let m = std::fs::canonicalize(m).unwrap_or_else(|_| m.clone());
        if real.starts_with(&m) || m.starts_with(&real) {
            bail!(
                "invalid mount config for type \"bind\": bind source {source} would expose {} to the task: mesh keeps its state, keys and sockets out of every task; bind another directory",
                m.display()
            );
        }
    }
    Ok(real)
}

/// One mount of a process task, ready to make between fork and exec.
pub(super) struct Prepared {
    source: Option<CString>,
    target: CString,
    /// tmpfs: its mount data (`size=…,mode=…`).
    tmpfs: Option<CString>,
    read_only: bool,
}

/// The process driver's plan, made before the fork: volumes created (owned by `owner`),
/// bind sources checked. Targets the host lacks are made, with their missing parents (the
/// process driver shares the host's file system, and a mount needs a mount point): an empty
/// file where a file is bound, a directory otherwise. They are returned so the task's
/// teardown can remove them again.
pub(super) fn prepare(
    state_dir: &Path,
    masked: &[PathBuf],
    mounts: &[Mount],
    owner: (u32, u32),
) -> Result<(Vec<Prepared>, Vec<PathBuf>)> {
    let mut out = Vec::new();
    let mut made = Vec::new();
    let cs = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .with_context(|| format!("{} contains a NUL byte", p.display()))
    };
    for m in mounts {
        m.validate().map_err(anyhow::Error::msg)?;
        let source = match m.kind {
            MountType::Volume => {
                claim(state_dir, &m.source, &m.volume_labels, owner)?;
                Some(cs(&data_dir(state_dir, &m.source)?)?)
            }
            MountType::Bind => Some(cs(&check_bind_source(&m.source, masked)?)?),
            MountType::Tmpfs => None,
        };
        let target = PathBuf::from(m.clean_target());
        if masked.iter().any(|p| target.starts_with(p)) {
            bail!(
                "mount target {} is inside a path mesh hides from tasks",
                target.display()
            );
        }
        if !target.exists() {
            // Every level made, deepest first: the order they are removed in.
            let mut chain = vec![target.clone()];
            while let Some(parent) = chain
                .last()
                .and_then(|p| p.parent())
                .filter(|p| !p.exists())
            {
                chain.push(parent.to_path_buf());
            }
            let file = source.as_ref().is_some_and(|s| {
                std::fs::metadata(std::ffi::OsStr::from_bytes(s.as_bytes()))
                    .is_ok_and(|m| !m.is_dir())
            });
            let made_now = if file {
                // A file is bound onto a file. `create_new` does not follow a symlink
                // someone placed there meanwhile.
                target
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|_| {
                        std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .open(&target)
                            .map(drop)
                    })
            } else {
                std::fs::create_dir_all(&target)
            };
            made_now.with_context(|| format!("creating the mount point {}", target.display()))?;
            made.extend(chain);
        }
        let tmpfs = match m.kind {
            MountType::Tmpfs => {
                let mut data = format!("mode={:o}", m.tmpfs_mode.unwrap_or(0o1777));
                if let Some(size) = m.tmpfs_size {
                    data.push_str(&format!(",size={size}"));
                }
                Some(CString::new(data)?)
            }
            _ => None,
        };
        out.push(Prepared {
            source,
            target: cs(&target)?,
            tmpfs,
            read_only: m.read_only,
        });
    }
    Ok((out, made))
}

/// Mount points this task made, removed once no other task mounts on them or below them (and
/// only if empty: someone may have put files there meanwhile).
pub(super) fn remove_mount_points(mine: &[PathBuf], in_use: &[PathBuf]) {
    for p in mine
        .iter()
        .filter(|p| !in_use.iter().any(|t| t.starts_with(p)))
    {
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => {
                let _ = std::fs::remove_dir(p);
            }
            // Only an empty regular file is ours: someone may have put a real one there.
            Ok(m) if m.is_file() && m.len() == 0 => {
                let _ = std::fs::remove_file(p);
            }
            _ => {}
        }
    }
}

/// In the forked child, in the task's own mount namespace (already a slave of the host's),
/// before the agent's paths are masked: every mount, in order. Only system calls on memory
/// prepared before the fork.
pub(super) fn apply(mounts: &[Prepared]) -> io::Result<()> {
    let os = |e: nix::errno::Errno| io::Error::from_raw_os_error(e as i32);
    for m in mounts {
        let ro = if m.read_only {
            MsFlags::MS_RDONLY
        } else {
            MsFlags::empty()
        };
        match (&m.source, &m.tmpfs) {
            (_, Some(data)) => mount(
                Some(c"tmpfs"),
                m.target.as_c_str(),
                Some(c"tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | ro,
                Some(data.as_c_str()),
            )
            .map_err(os)?,
            (Some(src), None) => {
                // Not recursive: mounts below the source (a mask, another volume) stay out.
                mount(
                    Some(src.as_c_str()),
                    m.target.as_c_str(),
                    None::<&CStr>,
                    MsFlags::MS_BIND,
                    None::<&CStr>,
                )
                .map_err(os)?;
                if m.read_only {
                    mount(
                        None::<&CStr>,
                        m.target.as_c_str(),
                        None::<&CStr>,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                        None::<&CStr>,
                    )
                    .map_err(os)?;
                }
            }
            (None, None) => {}
        }
    }
    Ok(())
}

/// The podman driver: podman volumes made (labelled with this node) where missing, and the
/// `--mount` arguments. Bind sources are checked as for process tasks.
pub(super) async fn podman_mounts(
    state_dir: &Path,
    node: &str,
    masked: &[PathBuf],
    mounts: &[Mount],
) -> Result<Vec<String>> {
    let mut args = Vec::new();
    for m in mounts {
        m.validate().map_err(anyhow::Error::msg)?;
        let mut arg = format!("type={}", m.kind);
        match m.kind {
            MountType::Volume => {
                ensure_podman_volume(node, &m.source, &m.volume_labels).await?;
                // The catalogue entry (its data is podman's): `volume ls` lists it.
                claim(state_dir, &m.source, &m.volume_labels, (0, 0))?;
                arg.push_str(&format!(",source={}", m.source));
            }
            MountType::Bind => {
                let src = check_bind_source(&m.source, masked)?;
                arg.push_str(&format!(",source={}", src.display()));
            }
            MountType::Tmpfs => {
                if let Some(s) = m.tmpfs_size {
                    arg.push_str(&format!(",tmpfs-size={s}"));
                }
                if let Some(mode) = m.tmpfs_mode {
                    arg.push_str(&format!(",tmpfs-mode={mode:o}"));
                }
            }
        }
        arg.push_str(&format!(",destination={}", m.clean_target()));
        if m.read_only {
            arg.push_str(",ro");
        }
        if m.volume_nocopy {
            arg.push_str(",nocopy");
        }
        args.push(arg);
    }
    Ok(args)
}

async fn ensure_podman_volume(
    node: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> Result<()> {
    let exists = super::container::podman_command()
        .args(["volume", "exists", name])
        .status()
        .await
        .context("running podman volume exists")?;
    if exists.success() {
        return Ok(());
    }
    let mut cmd = super::container::podman_command();
    cmd.args([
        "volume",
        "create",
        "--label",
        &format!("{LABEL_NODE}={node}"),
    ]);
    for (k, v) in labels {
        cmd.args(["--label", &format!("{k}={v}")]);
    }
    let out = cmd
        .arg(name)
        .output()
        .await
        .context("running podman volume create")?;
    if !out.status.success() {
        bail!(
            "podman volume create {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Removes the podman volume of that name if this node made it (`volume rm`).
pub async fn remove_podman_volume(node: &str, name: &str) -> Result<()> {
    let out = super::container::podman_command()
        .args([
            "volume",
            "inspect",
            "--format",
            &format!("{{{{index .Labels \"{LABEL_NODE}\"}}}}"),
            name,
        ])
        .output()
        .await;
    let Ok(out) = out else {
        // No podman here: nothing of podman's to remove.
        return Ok(());
    };
    if !out.status.success() || String::from_utf8_lossy(&out.stdout).trim() != node {
        return Ok(());
    }
    let out = super::container::podman_command()
        .args(["volume", "rm", name])
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "podman volume rm {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mesh-volumes-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn bind_sources_that_expose_mesh_are_refused() {
        let d = scratch("bind");
        let state = d.join("state");
        std::fs::create_dir_all(state.join("tasks")).unwrap();
        let site = d.join("site");
        std::fs::create_dir_all(&site).unwrap();
        let masked = vec![state.clone(), PathBuf::from("/etc/mesh")];
        // Inside, equal to, or a parent of a masked path.
        for bad in [&state.join("tasks"), &state, &d] {
            let e = check_bind_source(bad.to_str().unwrap(), &masked)
                .unwrap_err()
                .to_string();
            assert!(e.contains("would expose"), "{e}");
        }
        let e = check_bind_source("/", &masked).unwrap_err().to_string();
        assert!(e.contains("would expose"), "{e}");
        // Through a symlink too.
        let link = d.join("link");
        std::os::unix::fs::symlink(&state, &link).unwrap();
        let e = check_bind_source(link.to_str().unwrap(), &masked)
            .unwrap_err()
            .to_string();
        assert!(e.contains("would expose"), "{e}");
        let e = check_bind_source(d.join("nope").to_str().unwrap(), &masked)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bind source path does not exist"), "{e}");
        assert_eq!(
            check_bind_source(site.to_str().unwrap(), &masked).unwrap(),
            site
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn volumes_are_created_once_listed_and_removed() {
        let d = scratch("catalogue");
        let labels = BTreeMap::from([("a".to_string(), "b".to_string())]);
        use std::os::unix::fs::MetadataExt;
        claim(&d, "pgdata", &labels, (65534, 65534)).unwrap();
        assert!(!create(&d, "pgdata", &BTreeMap::new()).unwrap());
        let data = data_dir(&d, "pgdata").unwrap();
        assert_eq!(std::fs::metadata(&data).unwrap().uid(), 65534);
        // Made by `volume create`: root's until the first task claims it, then that task's.
        assert!(create(&d, "made", &BTreeMap::new()).unwrap());
        let made = data_dir(&d, "made").unwrap();
        assert_eq!(std::fs::metadata(&made).unwrap().uid(), 0);
        claim(&d, "made", &BTreeMap::new(), (1000, 1000)).unwrap();
        assert_eq!(std::fs::metadata(&made).unwrap().uid(), 1000);
        claim(&d, "made", &BTreeMap::new(), (2000, 2000)).unwrap();
        assert_eq!(std::fs::metadata(&made).unwrap().uid(), 1000);
        remove(&d, "made").unwrap();
        let vols = list(&d, "n1");
        assert_eq!(vols.len(), 1);
        assert_eq!(vols[0].labels, labels);
        assert_eq!(vols[0].node, "n1");
        assert_eq!(vols[0].driver, "local");
        for bad in ["..", "../x", "a/b"] {
            assert!(create(&d, bad, &labels).is_err());
            assert!(remove(&d, bad).is_err());
        }
        remove(&d, "pgdata").unwrap();
        assert!(list(&d, "n1").is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
