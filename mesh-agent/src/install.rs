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
        let dst = bin.join(name);
        // Copy to a temporary name and rename, so a running agent's binary is replaced
        // atomically rather than overwritten in place.
        let tmp = bin.join(format!(".{name}.new"));
        fs::copy(src, &tmp).with_context(|| {
            format!(
                "copying {} (build it first: cargo build --release)",
                src.display()
            )
        })?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
        fs::rename(&tmp, &dst)?;
        written.push(dst);
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
