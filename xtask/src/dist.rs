//! `cargo xtask dist`: a Debian package for real hosts, built with Debian's own `dpkg-deb`
//! from the same unit and default config `mesh-agent install` writes (one source for both).
//!
//! Paths follow Debian policy, not `mesh-agent install`'s: binaries in /usr/bin (a package
//! never writes /usr/local), the unit in /lib/systemd/system, the CNI plugin in /usr/lib/cni
//! (where Debian's podman and containernetworking-plugins look), agent.toml a conffile so an
//! upgrade never overwrites the operator's edits.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

use mesh_agent::install::{DEFAULT_CONFIG_TEXT, UNIT};

const PACKAGE: &str = "mesh";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where each packaged binary goes, by the name cargo builds it under.
const BINARIES: &[(&str, &str)] = &[
    ("mesh-agent", "usr/bin"),
    ("meshctl", "usr/bin"),
    ("mesh-cni", "usr/lib/cni"),
];

/// What the agent runs: links, addresses and routes (iproute2's `ip` for namespaces), the
/// egress NAT (nftables). Image tasks need podman, which is optional: process tasks do not.
const DEPENDS: &str = "libc6, iproute2, nftables";
const RECOMMENDS: &str = "podman, runc";

pub fn run(debug: bool, out: Option<PathBuf>) -> Result<()> {
    let root = workspace_root()?;
    let profile = if debug { "debug" } else { "release" };
    if !debug {
        crate::cargo(&[
            "build",
            "--release",
            "-p",
            "mesh-agent",
            "-p",
            "meshctl",
            "-p",
            "mesh-cni",
            "--bins",
        ])?;
    }
    let bins = target_dir(&root).join(profile);
    let out = out.unwrap_or_else(|| target_dir(&root).join("dist"));
    // A debug package is for checking the packaging: fast compression over small size.
    let compression: &[&str] = if debug { &["-Zgzip", "-z1"] } else { &[] };
    let deb = build(&bins, &out, compression)?;
    println!("{}", deb.display());
    Ok(())
}

/// Stages the package's tree under `out` and builds the .deb from it; returns its path.
pub fn build(bins: &Path, out: &Path, compression: &[&str]) -> Result<PathBuf> {
    let arch = architecture()?;
    let stage = out.join(format!("{PACKAGE}_{VERSION}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("clearing {}", stage.display()))?;
    }
    stage_binaries(bins, &stage)?;
    stage_files(&stage)?;
    let installed_kb = tree_size(&stage)?.div_ceil(1024);
    stage_control(&stage, &arch, installed_kb)?;

    let deb = out.join(format!("{PACKAGE}_{VERSION}_{arch}.deb"));
    let status = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .args(compression)
        .arg(&stage)
        .arg(&deb)
        // The package's path is this task's only output on stdout (scripts read it).
        .stdout(std::io::stderr())
        .status()
        .context("running dpkg-deb (Debian's dpkg package)")?;
    ensure!(status.success(), "dpkg-deb --build failed ({status})");
    Ok(deb)
}

fn stage_binaries(bins: &Path, stage: &Path) -> Result<()> {
    for (name, dir) in BINARIES {
        let src = bins.join(name);
        if !src.is_file() {
            bail!(
                "{} is missing: build it first (cargo build --bins, or drop --debug for a release build)",
                src.display()
            );
        }
        let dst = stage.join(dir).join(name);
        write_file(&dst, &fs::read(&src)?, 0o755)?;
    }
    Ok(())
}

fn stage_files(stage: &Path) -> Result<()> {
    let unit = UNIT.replace(
        "ExecStart=/usr/local/bin/mesh-agent",
        "ExecStart=/usr/bin/mesh-agent",
    );
    ensure!(
        unit.contains("ExecStart=/usr/bin/mesh-agent "),
        "the unit's ExecStart no longer names /usr/local/bin/mesh-agent: update dist.rs"
    );
    write_file(
        &stage.join("lib/systemd/system/mesh-agent.service"),
        unit.as_bytes(),
        0o644,
    )?;
    write_file(
        &stage.join("etc/mesh/agent.toml"),
        DEFAULT_CONFIG_TEXT.as_bytes(),
        0o644,
    )?;
    write_file(
        &stage.join("usr/share/doc/mesh/copyright"),
        COPYRIGHT.as_bytes(),
        0o644,
    )?;
    Ok(())
}

fn stage_control(stage: &Path, arch: &str, installed_kb: u64) -> Result<()> {
    let control = format!(
        "Package: {PACKAGE}\n\
         Version: {VERSION}\n\
         Architecture: {arch}\n\
         Maintainer: mesh developers <mesh@localhost>\n\
         Installed-Size: {installed_kb}\n\
         Depends: {DEPENDS}\n\
         Recommends: {RECOMMENDS}\n\
         Section: net\n\
         Priority: optional\n\
         Homepage: https://github.com/mesh/mesh\n\
         Description: Swarm-style services and networking with an eBPF data path\n \
         A mesh-agent on every host gossips a shared table, places and heals services'\n \
         tasks and programs the kernel: eBPF load balancers for published ports and VIPs,\n \
         VXLAN overlays, egress and an embedded DNS server. meshctl is the Docker-style CLI.\n"
    );
    let debian = stage.join("DEBIAN");
    write_file(&debian.join("control"), control.as_bytes(), 0o644)?;
    write_file(&debian.join("conffiles"), b"/etc/mesh/agent.toml\n", 0o644)?;
    write_file(&debian.join("postinst"), POSTINST.as_bytes(), 0o755)?;
    write_file(&debian.join("prerm"), PRERM.as_bytes(), 0o755)?;
    write_file(&debian.join("postrm"), POSTRM.as_bytes(), 0o755)?;
    Ok(())
}

/// The unit is not enabled or started: a node needs `mesh-agent init` or `join` first (the
/// cluster key), and those start it (`--systemd`). `DPKG_ROOT` set means an install into
/// another root (dpkg --root), where this host's systemd has nothing to reload.
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ] && [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    if systemctl is-active --quiet mesh-agent.service; then
        # An upgrade: the agent adopts the pinned dataplane, so a restart is hitless.
        systemctl restart mesh-agent.service || true
    fi
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = remove ] && [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl disable --now mesh-agent.service || true
fi
exit 0
"#;

/// The node's state (/var/lib/mesh) and key (/etc/mesh) are the operator's: only a purge
/// removes them, as Debian does for every package's data.
const POSTRM: &str = r#"#!/bin/sh
set -e
if [ "$1" = purge ]; then
    rm -rf "$DPKG_ROOT/var/lib/mesh" "$DPKG_ROOT/etc/mesh"
fi
if [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
exit 0
"#;

const COPYRIGHT: &str = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
Upstream-Name: mesh\n\n\
Files: *\n\
License: Apache-2.0\n \
On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.\n";

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // dpkg-deb refuses group- or world-writable control directories; a umask of 002
        // would make them so.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    }
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn tree_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            tree_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

fn architecture() -> Result<String> {
    let out = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .context("running dpkg --print-architecture")?;
    ensure!(out.status.success(), "dpkg --print-architecture failed");
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .context("xtask's manifest has no parent directory")
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}
