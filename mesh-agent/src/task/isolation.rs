//! What a process task is kept from: its own PID, mount, UTS and IPC namespaces, a fresh
//! /proc that shows only its own processes, the agent's state, key and sockets hidden under
//! empty read-only mounts, no capabilities but those `--cap-add` grants (bounding, ambient,
//! inheritable, permitted and effective sets all cut to them), `no_new_privs`, and an
//! unprivileged user unless `--user` says otherwise.
//!
//! Everything is resolved before the fork ([`Isolation::prepare`]): between fork and exec
//! only system calls on memory prepared here run.

use std::{
    ffi::{CStr, CString},
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use mesh_api::spec::{Security, capability_set, check_ulimit};
use nix::mount::{MsFlags, mount};

/// Who a process task runs as unless `--user` says otherwise: `nobody:nogroup`. A process
/// task shares the host's file system, where uid 0 owns the binaries, /etc and the agent's
/// files: root without capabilities could still rewrite all of them (file owners need no
/// capability), so root is only what a user asks for.
pub const DEFAULT_UID: u32 = 65534;
pub const DEFAULT_GID: u32 = 65534;

/// Docker's default in a task's own network namespace (since 20.10): any port may be bound
/// by any user there, as the namespace holds nothing but the task.
const UNPRIVILEGED_PORT_START: &str = "net.ipv4.ip_unprivileged_port_start";

/// A task's user, capabilities and limits, ready to apply in the forked child.
pub(super) struct Isolation {
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    /// A bit per capability number the task keeps.
    caps: u64,
    rlimits: Vec<(u32, libc::rlimit)>,
    /// `/proc/sys/...` paths and values, written inside the task's namespaces.
    sysctls: Vec<(CString, Vec<u8>)>,
    read_only: bool,
    /// Host paths covered inside the task: (path, is a directory).
    masks: Vec<(CString, bool)>,
}

impl Isolation {
    /// Resolves `user` (`uid[:gid]` or names from the host's /etc/passwd and /etc/group) and
    /// checks `security`; `masked` are host paths the task must not reach.
    pub fn prepare(security: &Security, user: Option<&str>, masked: &[PathBuf]) -> Result<Self> {
        security.validate().map_err(anyhow::Error::msg)?;
        let (uid, gid, groups) = match user.filter(|u| !u.is_empty()) {
            Some(u) => resolve_user(u, &read("/etc/passwd"), &read("/etc/group"))?,
            None => (DEFAULT_UID, DEFAULT_GID, Vec::new()),
        };
        let caps =
            capability_set(&security.cap_add, &security.cap_drop).map_err(anyhow::Error::msg)?;
        let rlimits = security
            .ulimits
            .iter()
            .map(|u| {
                let res = check_ulimit(u).map_err(anyhow::Error::msg)?;
                Ok((
                    res,
                    libc::rlimit {
                        rlim_cur: u.soft as libc::rlim_t,
                        rlim_max: u.hard as libc::rlim_t,
                    },
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut sysctls = security.sysctls.clone();
        sysctls
            .entry(UNPRIVILEGED_PORT_START.into())
            .or_insert_with(|| "0".into());
        let sysctls = sysctls
            .iter()
            .map(|(k, v)| {
                let path = format!("/proc/sys/{}", k.replace('.', "/"));
                if !Path::new(&path).exists() {
                    bail!("sysctl {k} does not exist on this node's kernel");
                }
                Ok((CString::new(path)?, v.as_bytes().to_vec()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            uid,
            gid,
            groups,
            caps,
            rlimits,
            sysctls,
            read_only: security.read_only,
            masks: masks(masked)?,
        })
    }

    /// Who the task runs as (uid, gid): the owner of a volume it creates.
    pub fn owner(&self) -> (u32, u32) {
        (self.uid, self.gid)
    }

    /// In the child, in the task's new mount namespace and as PID 1 of its new PID
    /// namespace: a /proc of that namespace over the host's, and the masks.
    pub fn hide_host(&self) -> io::Result<()> {
        let quiet = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        mount(Some(c"proc"), c"/proc", Some(c"proc"), quiet, None::<&CStr>).map_err(os)?;
        for (path, dir) in &self.masks {
            if *dir {
                mount(
                    Some(c"tmpfs"),
                    path.as_c_str(),
                    Some(c"tmpfs"),
                    quiet | MsFlags::MS_RDONLY,
                    Some(c"size=4k,mode=0555"),
                )
                .map_err(os)?;
            } else {
                mount(
                    Some(c"/dev/null"),
                    path.as_c_str(),
                    None::<&CStr>,
                    MsFlags::MS_BIND,
                    None::<&CStr>,
                )
                .map_err(os)?;
            }
        }
        Ok(())
    }

    /// In the child, in the task's network and IPC namespaces: sysctls and rlimits.
    pub fn tune(&self) -> io::Result<()> {
        for (path, value) in &self.sysctls {
            // SAFETY: plain system calls on C strings and buffers prepared before the fork.
            unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let n = libc::write(fd, value.as_ptr().cast(), value.len());
                let e = io::Error::last_os_error();
                libc::close(fd);
                if n < 0 {
                    return Err(e);
                }
            }
        }
        self.limit()
    }

    /// setrlimit for each `--ulimit` (also for `exec` into the task).
    pub fn limit(&self) -> io::Result<()> {
        for (res, lim) in &self.rlimits {
            // SAFETY: plain system call on a live struct.
            if unsafe { libc::setrlimit(*res as _, lim) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// `--read-only`: the root mount of the task's mount namespace only (its own tmpfs
    /// mounts, /proc and /dev stay as they are).
    pub fn seal_root(&self) -> io::Result<()> {
        if !self.read_only {
            return Ok(());
        }
        mount(
            None::<&CStr>,
            c"/",
            None::<&CStr>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None::<&CStr>,
        )
        .map_err(os)
    }

    /// The last step before exec: the user, and no capability beyond those kept, for good.
    pub fn drop_privileges(&self) -> io::Result<()> {
        let check = |r: libc::c_int| {
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: plain system calls on values and buffers prepared before the fork.
        unsafe {
            // Permitted capabilities survive the change of uid; they are cut below.
            check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0))?;
            for c in 0..64u64 {
                if self.caps & (1 << c) == 0 {
                    // EINVAL: past the kernel's last capability.
                    if libc::prctl(libc::PR_CAPBSET_DROP, c, 0, 0, 0) < 0
                        && *libc::__errno_location() == libc::EINVAL
                    {
                        break;
                    }
                }
            }
            check(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
            check(libc::setresgid(self.gid, self.gid, self.gid))?;
            check(libc::setresuid(self.uid, self.uid, self.uid))?;
            let header = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let half = |shift: u32| {
                let v = (self.caps >> shift) as u32;
                CapData {
                    effective: v,
                    permitted: v,
                    inheritable: v,
                }
            };
            let data = [half(0), half(32)];
            check(libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as libc::c_int)?;
            check(libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ))?;
            // A user other than root loses permitted capabilities at exec unless they are
            // ambient.
            if self.uid != 0 {
                for c in (0..64u64).filter(|c| self.caps & (1 << c) != 0) {
                    check(libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE,
                        c,
                        0,
                        0,
                    ))?;
                }
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        }
        Ok(())
    }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn os(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The paths that exist, files first (a file inside a masked directory is covered before the
/// directory is), and none inside another masked directory.
fn masks(paths: &[PathBuf]) -> Result<Vec<(CString, bool)>> {
    let mut out: Vec<(PathBuf, bool)> = Vec::new();
    for p in paths {
        let Ok(meta) = std::fs::metadata(p) else {
            continue;
        };
        if !p.is_absolute() {
            bail!("masked path {} is not absolute", p.display());
        }
        let dir = meta.is_dir();
        if paths
            .iter()
            .any(|o| o != p && o.is_dir() && p.starts_with(o))
        {
            continue;
        }
        out.push((p.clone(), dir));
    }
    out.sort_by_key(|(_, dir)| *dir);
    out.into_iter()
        .map(|(p, dir)| {
            CString::new(p.as_os_str().as_bytes())
                .with_context(|| format!("{} contains a NUL byte", p.display()))
                .map(|c| (c, dir))
        })
        .collect()
}

/// `uid`, `uid:gid`, `name`, `name:group` (Docker's `--user`): names from the host's
/// passwd and group files, as the process driver runs on the host's file system. A user
/// found by name or uid also gets the groups that list it; a uid not in passwd gets
/// `nogroup`, never the root group.
pub(super) fn resolve_user(
    spec: &str,
    passwd: &str,
    group: &str,
) -> Result<(u32, u32, Vec<libc::gid_t>)> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    // name:x:uid:gid:...
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && (f[0] == user || (user.parse::<u32>().is_ok() && f[2] == user)));
    let uid = match user.parse::<u32>() {
        Ok(n) => n,
        Err(_) => entry
            .as_ref()
            .and_then(|f| f[2].parse().ok())
            .with_context(|| {
                format!("unable to find user {user}: no matching entries in /etc/passwd")
            })?,
    };
    let name = entry.as_ref().map(|f| f[0].to_owned());
    let primary = entry.as_ref().and_then(|f| f[3].parse::<u32>().ok());
    let groups_file: Vec<Vec<&str>> = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    let gid = match grp.filter(|g| !g.is_empty()) {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => groups_file
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .with_context(|| {
                    format!("unable to find group {g}: no matching entries in /etc/group")
                })?,
        },
        None => primary.unwrap_or(DEFAULT_GID),
    };
    let mut groups: Vec<libc::gid_t> = match &name {
        Some(n) if grp.is_none() => groups_file
            .iter()
            .filter(|f| f[3].split(',').any(|m| m == n))
            .filter_map(|f| f[2].parse().ok())
            .collect(),
        _ => Vec::new(),
    };
    groups.sort_unstable();
    groups.dedup();
    Ok((uid, gid, groups))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
                          www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n\
                          app:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwww-data:x:33:\napp:x:1000:\nvideo:x:44:app,www-data\n";

    #[test]
    fn users_are_read_as_docker_reads_them() {
        let r = |s| resolve_user(s, PASSWD, GROUP).unwrap();
        assert_eq!(r("1000"), (1000, 1000, vec![44]));
        assert_eq!(r("app"), (1000, 1000, vec![44]));
        assert_eq!(r("www-data"), (33, 33, vec![44]));
        assert_eq!(r("1000:33"), (1000, 33, vec![]));
        assert_eq!(r("app:www-data"), (1000, 33, vec![]));
        assert_eq!(r("0"), (0, 0, vec![]));
        // Not in passwd: nogroup, never gid 0.
        assert_eq!(r("4242"), (4242, DEFAULT_GID, vec![]));
        let e = resolve_user("nosuch", PASSWD, GROUP)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unable to find user nosuch"), "{e}");
        let e = resolve_user("app:nosuch", PASSWD, GROUP)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unable to find group nosuch"), "{e}");
    }

    #[test]
    fn masks_skip_missing_and_nested_paths_and_cover_files_first() {
        let dir = std::env::temp_dir().join(format!("mesh-masks-{}", std::process::id()));
        let inner = dir.join("state");
        std::fs::create_dir_all(&inner).unwrap();
        let key = dir.join("cluster.key");
        std::fs::write(&key, "k").unwrap();
        let other = std::env::temp_dir().join(format!("mesh-masks-key-{}", std::process::id()));
        std::fs::write(&other, "k").unwrap();
        let got = masks(&[dir.clone(), inner, key, other.clone(), dir.join("missing")]).unwrap();
        let want = vec![
            (CString::new(other.to_str().unwrap()).unwrap(), false),
            (CString::new(dir.to_str().unwrap()).unwrap(), true),
        ];
        assert_eq!(got, want);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_file(&other).unwrap();
    }
}
