//! The agent under the shipped systemd unit's sandbox (read from `packaging/mesh-agent.service`
//! and reproduced with a mount namespace and setpriv, since PID 1 here is not systemd; see
//! `mesh_tests::sandbox`): a cluster made with `init` and `join` the way the README makes one,
//! with the paths the unit gives (`/etc/mesh`, `/var/lib/mesh`, one pair per node), runs a
//! process service that reads a secret and a config, rotates its key and lets a node leave —
//! everything that writes outside the state directory.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::{
    Cluster, Host,
    cluster::bin,
    membership::{join_command, token_and_address},
    sandbox::{MadeDirs, UnitSandbox},
};
use serde_json::Value;

/// One node's agent process under the sandbox, stopped (SIGTERM, then SIGKILL) on drop.
struct Sandboxed {
    child: Child,
}

impl Sandboxed {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Sandboxed {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: a signal to our own child's PID.
            unsafe { libc::kill(self.pid(), libc::SIGTERM) };
            if self.wait(Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// A node's own `/etc/mesh` and `/var/lib/mesh`, on the host under its run directory.
fn node_dirs(h: &Host) -> (PathBuf, PathBuf) {
    let base = h.socket().parent().unwrap().join("unit");
    let etc = base.join("etc-mesh");
    let state = base.join("var-lib-mesh");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    (etc, state)
}

/// `mesh-agent <command…>` on `h` under the sandbox, with the unit's config path and state
/// directory and the test cluster's per-node names; stdout to `out`.
fn start(sandbox: &UnitSandbox, h: &Host, command: &[&str], out: &Path) -> Sandboxed {
    let (etc, state) = node_dirs(h);
    let mut cmd = sandbox.command(
        &h.ns,
        &[(etc, "/etc/mesh"), (state, "/var/lib/mesh")],
        &bin("mesh-agent"),
    );
    cmd.args(command)
        .args(["--config", "/etc/mesh/agent.toml"])
        .args(["--interface", "eth0", "--node-name", h.node_name()])
        .arg("--socket")
        .arg(h.socket())
        .arg("--bpffs")
        .arg(h.bpffs())
        .args(["--state-dir", "/var/lib/mesh"])
        .arg("--cgroup")
        .arg(h.cgroup())
        .env("MESH_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(out.with_extension("log"))
                .unwrap(),
        );
    if command[0] != "join" {
        cmd.args(["--advertise", &h.ip]);
    }
    let agent = Sandboxed {
        child: cmd.spawn().unwrap(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while h
        .meshctl(&["node", "ls"])
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        assert!(
            Instant::now() < deadline,
            "the sandboxed agent on {} did not answer:\n{}",
            h.node_name(),
            std::fs::read_to_string(out.with_extension("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    agent
}

fn ready(c: &Cluster, i: usize) -> usize {
    let nodes: Vec<Value> = c.host(i).meshctl_json(&["node", "ls"]).unwrap_or_default();
    nodes.iter().filter(|n| n["status"] == "Ready").count()
}

#[test]
fn a_cluster_works_under_the_shipped_units_sandbox() {
    let sandbox = UnitSandbox::shipped().unwrap();
    // What the unit's ExecStartPre makes before the sandbox exists.
    let _made =
        MadeDirs::ensure(&["/etc/mesh", "/var/lib/mesh", "/etc/netns", "/run/netns"]).unwrap();
    let c = Cluster::new(2).unwrap();
    let dir = c.log_dir();
    std::fs::create_dir_all(&dir).unwrap();

    // The sandbox is what the unit says: only its writable paths can be written.
    let probe = |what: &str| {
        let (etc, state) = node_dirs(c.host(1));
        sandbox
            .command(
                &c.host(1).ns,
                &[(etc, "/etc/mesh"), (state, "/var/lib/mesh")],
                Path::new("/bin/sh"),
            )
            .args(["-c", what])
            .output()
            .unwrap()
    };
    for outside in [
        "/etc/mesh-probe",
        "/usr/local/mesh-probe",
        "/opt/mesh-probe",
    ] {
        let out = probe(&format!("touch {outside}"));
        assert!(!out.status.success(), "{outside} writable under the unit");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
            "{out:?}"
        );
        assert!(!Path::new(outside).exists());
    }
    let out = probe("touch /etc/mesh/probe && rm /etc/mesh/probe && ls /root 2>&1; touch /tmp/x");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Permission denied")
            || String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "ProtectHome hides /root: {out:?}"
    );
    assert!(!Path::new("/tmp/x").exists(), "PrivateTmp");

    // init, then join with the printed token (from a file in the node's /etc/mesh).
    let _a1 = start(&sandbox, c.host(1), &["init"], &dir.join("h1.out"));
    let printed = std::fs::read_to_string(dir.join("h1.out")).unwrap();
    let (token, address) = token_and_address(&join_command(&printed));
    let (etc2, _) = node_dirs(c.host(2));
    std::fs::write(etc2.join("join-token"), format!("{token}\n")).unwrap();
    let mut a2 = start(
        &sandbox,
        c.host(2),
        &["join", "--token-file", "/etc/mesh/join-token", &address],
        &dir.join("h2.out"),
    );
    c.eventually(Duration::from_secs(20), "2 nodes Ready", |c| {
        Ok((ready(c, 1) == 2 && ready(c, 2) == 2).then_some(()))
    })
    .unwrap();
    let (etc1, _) = node_dirs(c.host(1));
    assert!(etc1.join("agent.toml").exists() && etc2.join("agent.toml").exists());
    // podman works under the unit (under its old capability bounding set it could not read
    // its own configuration, and the node offered no podman driver).
    let n: Value = c
        .host(1)
        .meshctl_json(&["node", "inspect", c.host(1).node_name()])
        .unwrap();
    assert!(
        n["drivers"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d == "podman")),
        "{n}"
    );

    // A secret and a config read by a process task on the joined node.
    let h1 = c.host(1);
    let out = h1
        .meshctl_stdin(&["secret", "create", "db_password", "-"], b"s3cret-pw")
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let conf = dir.join("app.conf");
    std::fs::write(&conf, "mode=fast\n").unwrap();
    h1.meshctl_ok(&["config", "create", "app_conf", conf.to_str().unwrap()])
        .unwrap();
    let node2 = c.host(2).node_name().to_owned();
    h1.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "reader",
        "--constraint",
        &format!("node.id=={node2}"),
        "--secret",
        "db_password",
        "--config",
        "source=app_conf,target=/etc/app.conf",
        "-d",
        "--process",
        "--",
        "/bin/sh",
        "-c",
        "echo secret=$(cat /run/secrets/db_password) config=$(cat /etc/app.conf) \
         host=$(hostname); exec sleep 1000",
    ])
    .unwrap();
    // The host's / is read-only under the unit: a mount point for a new config file cannot
    // be made there, and the task says so.
    let error = c
        .eventually(Duration::from_secs(30), "the task is rejected", |c| {
            let rows: Vec<Value> =
                c.host(1)
                    .meshctl_json(&["service", "ps", "reader", "--no-trunc"])?;
            Ok(rows
                .iter()
                .find(|r| r["state"] == "Rejected")
                .map(|r| r["error"].as_str().unwrap_or_default().to_owned()))
        })
        .unwrap();
    assert!(
        error.contains("config target /etc/app.conf")
            && error.contains("ProtectSystem=strict")
            && error.contains("/tmp is the agent's own"),
        "{error}"
    );
    assert!(!Path::new("/etc/app.conf").exists());
    // Under /tmp (the agent's private one) it can.
    h1.meshctl_ok(&[
        "service",
        "update",
        "-d",
        "--config-rm",
        "app_conf",
        "--config-add",
        "source=app_conf,target=/tmp/app.conf",
        "--args",
        "-c 'echo secret=$(cat /run/secrets/db_password) config=$(cat /tmp/app.conf) \
         host=$(hostname); exec sleep 1000'",
        "reader",
    ])
    .unwrap();
    let logs = c
        .eventually(Duration::from_secs(30), "the task read both", |c| {
            let out = c.host(1).meshctl_ok(&["service", "logs", "reader"])?;
            Ok(out
                .contains("secret=s3cret-pw config=mode=fast")
                .then_some(out))
        })
        .unwrap_or_else(|e| {
            let ps = c
                .host(1)
                .meshctl_ok(&["service", "ps", "reader", "--no-trunc"])
                .unwrap_or_default();
            panic!("{e:#}\n{ps}")
        });
    assert!(logs.contains("host=reader.1"), "{logs}");

    // A key rotation rewrites /etc/mesh/cluster.key on every node.
    let key_before = std::fs::read_to_string(etc2.join("cluster.key")).unwrap();
    let rotated = h1.meshctl(&["join-token", "--rotate"]).unwrap();
    let stderr = String::from_utf8_lossy(&rotated.stderr);
    assert!(rotated.status.success(), "{stderr}");
    assert!(stderr.contains("2/2 nodes use the new key"), "{stderr}");
    assert_ne!(
        std::fs::read_to_string(etc2.join("cluster.key")).unwrap(),
        key_before
    );
    c.eventually(
        Duration::from_secs(10),
        "2 nodes Ready after the rotation",
        |c| Ok((ready(c, 1) == 2).then_some(())),
    )
    .unwrap();

    // leave: host2 drains (its task moves to... nowhere: it is pinned), stops, and removes
    // its key from /etc/mesh.
    h1.meshctl_ok(&["service", "rm", "reader"]).unwrap();
    let out = Command::new(bin("mesh-agent"))
        .arg("leave")
        .arg("--socket")
        .arg(c.host(2).socket())
        .args(["--timeout", "30"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let status = a2.wait(Duration::from_secs(15)).expect("the agent stopped");
    assert!(status.success(), "{status}");
    assert!(
        !etc2.join("cluster.key").exists(),
        "leave removed the key: {:?}",
        std::fs::read_dir(&etc2).unwrap().collect::<Vec<_>>()
    );
    for log in ["h1.log", "h2.log"] {
        let text = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
        assert!(
            !text.contains("Read-only file system"),
            "{log} wrote outside the unit's paths:\n{text}"
        );
    }
}
