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
