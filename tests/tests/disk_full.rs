//! A full disk under the state dir fails the command that needed the disk, with an error
//! that says so, and nothing else: the agent keeps gossiping and serving, and the command
//! works again once space is freed. Node 1's state dir is a small tmpfs of its own, filled.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use mesh_tests::{
    Cluster, Host,
    cluster::bin,
    workload::{http_get, tally},
};
use serde_json::Value;

/// A tmpfs mounted on a node's state dir, unmounted when dropped (before the cluster's
/// cleanup removes the dir).
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(h: &Host, size: &str) -> Self {
        let dir = h.state_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("mesh-test-state")
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs on {}", dir.display());
        Self(dir)
    }

    /// Fills it up; the file that did it.
    fn fill(&self) -> PathBuf {
        let f = self.0.join("filler");
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", f.display()))
            .output();
        let st = nix::sys::statvfs::statvfs(&self.0).unwrap();
        assert!(st.blocks_available() == 0, "the state dir is full");
        f
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn addr(h: &Host, port: u16) -> SocketAddr {
    format!("{}:{port}", h.ip).parse().unwrap()
}

fn ready_everywhere(c: &Cluster) -> bool {
    c.hosts().iter().all(|h| {
        h.meshctl_json::<Vec<Value>>(&["node", "ls"])
            .is_ok_and(|n| n.len() == 3 && n.iter().all(|n| n["status"] == "Ready"))
    })
}

fn fails(h: &Host, args: &[&str]) -> String {
    let out = h.meshctl(args).unwrap();
    assert!(!out.status.success(), "{args:?} succeeded on a full disk");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_full_state_dir_fails_the_write_that_needs_it_and_nothing_else() {
    let mut c = Cluster::new(3).unwrap();
    let disk = SmallDisk::mount(c.host(1), "8m");
    c.start_agents().unwrap();
    c.external("client", 100).unwrap();
    let whoami = bin("mesh-whoami");
    let w = whoami.to_str().unwrap();
    c.host(2)
        .meshctl_json::<Value>(&[
            "service",
            "create",
            "web",
            "--replicas",
            "3",
            "-p",
            "8080:80",
            "--",
            w,
        ])
        .unwrap();
    c.eventually(Duration::from_secs(20), "web at 3/3 on every node", |c| {
        Ok(c.hosts()
            .iter()
            .all(|h| {
                h.meshctl_json::<Value>(&["service", "inspect", "web"])
                    .is_ok_and(|s| s["running"] == 3)
            })
            .then_some(()))
    })
    .unwrap();

    let filler = disk.fill();

    // What needs node 1's disk fails there, saying why, and leaves nothing behind.
    let e = fails(c.host(1), &["volume", "create", "data"]);
    eprintln!("volume create on a full disk: {e}");
    assert!(
        e.contains("create data") && e.contains("No space left on device") && e.contains("volumes"),
        "says what failed, where and why: {e}"
    );
    assert!(
        !c.host(1).state_dir().join("volumes/data").exists(),
        "no half-made volume left behind"
    );
    let vols: Vec<Value> = c.host(1).meshctl_json(&["volume", "ls"]).unwrap();
    assert!(vols.iter().all(|v| v["name"] != "data"), "{vols:?}");

    // Cluster-wide commands still work from node 1 (their state lives in gossip), and node 1
    // keeps gossiping and serving: Ready everywhere, its published port answers.
    c.host(1)
        .meshctl_json::<Value>(&[
            "service",
            "create",
            "--name",
            "api",
            "--replicas",
            "1",
            "--process",
            "--",
            w,
        ])
        .unwrap();
    // A task that must run on node 1 cannot start there (its record and log need the disk):
    // it fails, saying why, and nothing else on node 1 stops.
    let h1 = c.host(1).node_name().to_owned();
    let on_h1 = format!("node.hostname=={h1}");
    c.host(2)
        .meshctl_json::<Value>(&[
            "service",
            "create",
            "--name",
            "pinned",
            "--constraint",
            &on_h1,
            "--restart-delay",
            "1s",
            "--process",
            "--",
            w,
        ])
        .unwrap();
    let why = c
        .eventually(
            Duration::from_secs(20),
            "pinned's task fails on node 1",
            |c| {
                let rows: Vec<Value> = c.host(2).meshctl_json(&["service", "ps", "pinned"])?;
                Ok(rows
                    .iter()
                    .find(|r| r["state"] == "Failed" || r["state"] == "Rejected")
                    .map(|r| r["error"].as_str().unwrap_or_default().to_owned()))
            },
        )
        .unwrap();
    eprintln!("a task started on the full node: {why}");
    assert!(why.contains("No space left"), "{why}");
    for _ in 0..10 {
        assert!(
            ready_everywhere(&c),
            "every node Ready while node 1's disk is full"
        );
        let a = addr(c.host(1), 8080);
        let answers = c
            .external_ns("client")
            .unwrap()
            .run(move || {
                (0..6)
                    .map(|_| http_get(a).map(|s| s.trim().to_owned()))
                    .collect::<Vec<_>>()
            })
            .unwrap();
        let answers: Vec<String> = answers.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(tally(answers).values().sum::<usize>(), 6);
        std::thread::sleep(Duration::from_millis(500));
    }
    c.host(2)
        .meshctl_ok(&["service", "scale", "web=4"])
        .unwrap();
    c.eventually(Duration::from_secs(10), "node 1 sees the scale", |c| {
        let s: Value = c.host(1).meshctl_json(&["service", "inspect", "web"])?;
        Ok((s["desired"] == 4).then_some(()))
    })
    .unwrap();
    let logs = c.host(1).logs();
    for l in logs.lines().filter(|l| l.contains("No space left")).take(3) {
        eprintln!("node 1: {l}");
    }
    assert!(c.host(1).agent_pid().is_some());

    // Space freed: the same command works.
    std::fs::remove_file(&filler).unwrap();
    c.host(1).meshctl_ok(&["volume", "create", "data"]).unwrap();
    c.eventually(Duration::from_secs(20), "pinned runs on node 1", |c| {
        let rows: Vec<Value> = c.host(2).meshctl_json(&["service", "ps", "pinned"])?;
        Ok(rows
            .iter()
            .any(|r| r["node"] == h1.as_str() && r["state"] == "Running")
            .then_some(()))
    })
    .unwrap();
    assert!(
        Path::new(&c.host(1).state_dir())
            .join("volumes/data")
            .exists()
    );
    c.host_mut(1).stop_agent().unwrap();
    drop(disk);
}
