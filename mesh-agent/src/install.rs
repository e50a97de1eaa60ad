//! `mesh-agent install`: puts the binaries, the systemd unit and a default config in place.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

pub const UNIT: &str = include_str!("../../packaging/mesh-agent.service");
pub const DEFAULT_CONFIG_TEXT: &str = include_str!("../../packaging/agent.toml");

/// Installs under `root` (`/` on a real host). An existing config is left alone: it is the
/// operator's.
pub fn install(root: &Path) -> Result<Vec<PathBuf>> {
    let exe = std::env::current_exe().context("locating the running mesh-agent")?;
    let meshctl = exe.with_file_name("meshctl");
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    let mut written = Vec::new();

    let bin = at("/usr/local/bin");
    fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    for (src, name) in [(&exe, "mesh-agent"), (&meshctl, "meshctl")] {
        written.push(install_binary(src, &bin, name)?);
    }

    // The CNI plugin goes where runtimes look for plugins: Debian's podman and
    // containernetworking-plugins use /usr/lib/cni, containerd and upstream podman
    // /opt/cni/bin.
    let cni = exe.with_file_name("mesh-cni");
    for dir in ["/usr/lib/cni", "/opt/cni/bin"] {
        let dir = at(dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        written.push(install_binary(&cni, &dir, "mesh-cni")?);
    }

    let unit_dir = at("/etc/systemd/system");
    fs::create_dir_all(&unit_dir)?;
    let unit = unit_dir.join("mesh-agent.service");
    fs::write(&unit, UNIT).with_context(|| format!("writing {}", unit.display()))?;
    written.push(unit);

    let conf_dir = at("/etc/mesh");
    fs::create_dir_all(&conf_dir)?;
    let conf = conf_dir.join("agent.toml");
    if !conf.exists() {
        fs::write(&conf, DEFAULT_CONFIG_TEXT)?;
        written.push(conf);
    }
    Ok(written)
}

/// Copies `src` to `dir/name` through a temporary name and a rename, so a running binary is
/// replaced atomically rather than overwritten in place.
fn install_binary(src: &Path, dir: &Path, name: &str) -> Result<PathBuf> {
    let dst = dir.join(name);
    let tmp = dir.join(format!(".{name}.new"));
    fs::copy(src, &tmp).with_context(|| {
        format!(
            "copying {} (build it first: cargo build --release)",
            src.display()
        )
    })?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    fs::rename(&tmp, &dst)?;
    Ok(dst)
}

#[cfg(test)]
mod unit_tests {
    use super::UNIT;
    use std::path::{Path, PathBuf};

    /// What the unit leaves writable under `ProtectSystem=strict`: `ReadWritePaths` (all
    /// lines, "-" optional marks dropped), `StateDirectory` and `RuntimeDirectory`, and the
    /// API file systems strict leaves alone (/dev, /proc, /sys).
    fn writable(unit: &str) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = ["/dev", "/proc", "/sys"].map(PathBuf::from).to_vec();
        let mut strict = false;
        for line in unit.lines().map(str::trim) {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let words = value.split_whitespace();
            match key {
                "ProtectSystem" => strict = value == "strict",
                "ReadWritePaths" => {
                    paths.extend(words.map(|w| PathBuf::from(w.trim_start_matches(['-', '+']))))
                }
                "StateDirectory" => paths.extend(words.map(|w| Path::new("/var/lib").join(w))),
                "RuntimeDirectory" => paths.extend(words.map(|w| Path::new("/run").join(w))),
                _ => {}
            }
        }
        assert!(strict, "the unit is expected to use ProtectSystem=strict");
        paths
    }

    #[test]
    fn every_path_the_agent_writes_is_writable_under_the_unit() {
        let config = crate::config::AgentConfig::default();
        let tasks = crate::task::TaskConfig::new("node", config.state_dir.clone());
        let key_file = Path::new(crate::config::DEFAULT_CONFIG).with_file_name("cluster.key");
        let written: Vec<(&str, PathBuf)> = vec![
            ("state_dir", config.state_dir.clone()),
            ("the API socket", config.socket.clone()),
            ("bpffs", config.bpffs.clone()),
            ("cgroup", PathBuf::from("/sys/fs/cgroup/mesh")),
            ("task namespaces", PathBuf::from(crate::netns::NETNS_DIR)),
            ("task /etc overrides", tasks.netns_etc.clone()),
            ("task files", tasks.files_dir.clone()),
            // `meshctl join-token --rotate` rewrites it (a temporary file beside it, then a
            // rename) and `mesh-agent leave` removes it.
            ("the cluster key file", key_file),
            (
                "podman's storage",
                PathBuf::from("/var/lib/containers/storage"),
            ),
            (
                "podman's run root",
                PathBuf::from("/run/containers/storage"),
            ),
            ("podman's state", PathBuf::from("/run/libpod")),
        ];
        let ok = writable(UNIT);
        for (what, path) in written {
            assert!(
                ok.iter().any(|w| path.starts_with(w)),
                "{what} ({}) is read-only under the unit's ProtectSystem=strict: add it to \
                 ReadWritePaths",
                path.display()
            );
        }
    }

    /// systemd refuses to start a unit whose ReadWritePaths (without "-") do not exist, and
    /// one that would be created later under a read-only parent never can be: each must be
    /// created before the sandbox is set up or exist on every host.
    #[test]
    fn every_required_writable_path_exists_or_is_made_before_start() {
        let made: Vec<&str> = UNIT
            .lines()
            .filter_map(|l| l.trim().strip_prefix("ExecStartPre=+/bin/mkdir -p "))
            .flat_map(str::split_whitespace)
            .collect();
        for line in UNIT.lines().map(str::trim) {
            let Some(paths) = line.strip_prefix("ReadWritePaths=") else {
                continue;
            };
            for p in paths.split_whitespace().filter(|p| !p.starts_with('-')) {
                // /sys ones are kernel mounts; /run/mesh and /var/lib/mesh are the unit's
                // RuntimeDirectory and StateDirectory, which systemd makes.
                let given = p.starts_with("/sys/") || p == "/run/mesh" || p == "/var/lib/mesh";
                assert!(
                    given || made.contains(&p),
                    "{p} may not exist when the unit starts: create it in ExecStartPre or mark \
                     it optional with \"-\""
                );
            }
        }
    }

    #[test]
    fn a_unit_without_etc_mesh_fails_the_check() {
        let old = UNIT.replace(" /etc/mesh\n", "\n");
        assert_ne!(old, UNIT);
        let ok = writable(&old);
        assert!(
            !ok.iter()
                .any(|w| Path::new("/etc/mesh/cluster.key").starts_with(w))
        );
    }
}
