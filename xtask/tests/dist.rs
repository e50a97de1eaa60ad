//! `cargo xtask dist` makes a package Debian's dpkg installs, configures and purges, whose
//! binaries run and whose unit systemd accepts without a warning.
//!
//! dpkg installs into a scratch root (`--root`), so this host's packages are untouched; the
//! maintainer scripts run outside the root with DPKG_ROOT set, as Debian runs them when it
//! bootstraps a system.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use mesh_tests::cluster::bin;

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(what: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("mesh-dist-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("running a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An empty dpkg database: what `dpkg --root` needs to install into a directory.
fn dpkg_root(root: &Path) {
    for dir in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(root.join("var/lib/dpkg").join(dir)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
}

fn dpkg(root: &Path) -> Command {
    let mut cmd = Command::new("dpkg");
    cmd.arg(format!("--root={}", root.display()))
        .args(["--force-script-chrootless", "--log=/dev/null"]);
    cmd
}

fn build_package(out: &Path) -> PathBuf {
    // The debug binaries the other tests use: the package's contents are what is checked,
    // not the optimiser's work.
    let _ = bin("mesh-agent");
    let printed = run(Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["dist", "--debug", "--out"])
        .arg(out));
    PathBuf::from(text(&printed).trim())
}

#[test]
fn the_package_declares_what_a_host_needs_and_holds_the_agent_cli_plugin_unit_and_config() {
    let out = scratch("info");
    let deb = build_package(&out.0);
    assert!(deb.is_file(), "{} is not a file", deb.display());

    let field = |name: &str| {
        text(&run(Command::new("dpkg-deb")
            .args(["--field"])
            .arg(&deb)
            .arg(name)))
        .trim()
        .to_owned()
    };
    assert_eq!(field("Package"), "mesh");
    let depends = field("Depends");
    for dep in ["iproute2", "nftables"] {
        assert!(depends.contains(dep), "Depends: {depends}");
    }
    let recommends = field("Recommends");
    assert!(recommends.contains("podman"), "Recommends: {recommends}");
    assert!(
        !depends.contains("podman"),
        "podman is optional (process tasks need none): Depends: {depends}"
    );

    let contents = text(&run(Command::new("dpkg-deb").arg("--contents").arg(&deb)));
    for (path, mode) in [
        ("./usr/bin/mesh-agent", "-rwxr-xr-x root/root"),
        ("./usr/bin/meshctl", "-rwxr-xr-x root/root"),
        ("./usr/lib/cni/mesh-cni", "-rwxr-xr-x root/root"),
        (
            "./lib/systemd/system/mesh-agent.service",
            "-rw-r--r-- root/root",
        ),
        ("./etc/mesh/agent.toml", "-rw-r--r-- root/root"),
    ] {
        let line = contents
            .lines()
            .find(|l| l.ends_with(path))
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{contents}"));
        assert!(line.starts_with(mode), "{line}");
    }
    assert!(
        !contents.contains("./usr/local/"),
        "a Debian package never writes /usr/local:\n{contents}"
    );
}

#[test]
fn dpkg_installs_it_the_binaries_run_the_unit_verifies_and_a_purge_removes_everything() {
    let out = scratch("install");
    let deb = build_package(&out.0);
    let root = scratch("root");
    dpkg_root(&root.0);

    // --force-depends: the scratch root has no libc6 or iproute2 of its own to satisfy them.
    run(dpkg(&root.0).args(["--force-depends", "-i"]).arg(&deb));
    let status = text(&run(dpkg(&root.0).args(["-s", "mesh"])));
    assert!(status.contains("Status: install ok installed"), "{status}");
    assert!(
        status.contains("/etc/mesh/agent.toml"),
        "agent.toml is not a conffile (an upgrade would overwrite the operator's edits):\n{status}"
    );

    for (binary, expect) in [
        ("usr/bin/meshctl", "meshctl "),
        ("usr/bin/mesh-agent", "mesh-agent "),
    ] {
        let version = text(&run(Command::new(root.0.join(binary)).arg("--version")));
        assert!(version.starts_with(expect), "{binary} --version: {version}");
    }

    // systemd checks the unit against this host's systemd, with ExecStart pointed at the
    // installed binary (verify looks commands up on the host).
    let unit =
        std::fs::read_to_string(root.0.join("lib/systemd/system/mesh-agent.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/mesh-agent run"), "{unit}");
    let verify_dir = scratch("verify");
    let checked = verify_dir.0.join("mesh-agent.service");
    std::fs::write(
        &checked,
        unit.replace(
            "ExecStart=/usr/bin/mesh-agent",
            &format!("ExecStart={}", root.0.join("usr/bin/mesh-agent").display()),
        ),
    )
    .unwrap();
    let verified = run(Command::new("systemd-analyze").arg("verify").arg(&checked));
    let warnings = String::from_utf8_lossy(&verified.stderr);
    assert!(
        warnings.trim().is_empty(),
        "systemd-analyze verify warns:\n{warnings}"
    );

    run(dpkg(&root.0).args(["--purge", "mesh"]));
    for gone in [
        "usr/bin/mesh-agent",
        "usr/bin/meshctl",
        "usr/lib/cni/mesh-cni",
        "lib/systemd/system/mesh-agent.service",
        "etc/mesh/agent.toml",
    ] {
        assert!(!root.0.join(gone).exists(), "{gone} is left after a purge");
    }
}
