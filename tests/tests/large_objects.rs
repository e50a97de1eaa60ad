//! Secrets and configs up to the documented 500 KB reach a task on another node, and a scale
//! of another service started on the same node at the same time converges: a value larger
//! than a gossip datagram travels as chunks, so it no longer blocks the node's later keys for
//! good (before, the 100 KB and 500 KB objects never left the node, nor did anything written
//! after them). The scale still waits for the chunks written before it (chitchat sends a
//! node's keys in version order): both times are printed (issue 31).

use std::{
    io::Write,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::{Cluster, Host, cluster::bin};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A cluster whose gossip is sealed: secrets need a cluster key.
fn cluster(n: usize) -> Cluster {
    let mut c = Cluster::new(n).unwrap();
    let out = Command::new(bin("mesh-agent"))
        .arg("keygen")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let key = c.log_dir().join("cluster.key");
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)
            .unwrap()
            .write_all(&out.stdout)
            .unwrap();
    }
    let key = key.to_str().unwrap().to_owned();
    for i in 1..=n {
        c.host_mut(i)
            .start_agent(&["--cluster-key-file", &key])
            .unwrap();
    }
    c
}

/// Bytes that do not compress, as sealed secrets and most binary configs are not.
fn random_bytes(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ n as u64;
    while out.len() < n {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(n);
    out
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn meshctl(h: &Host, args: &[&str]) -> Child {
    Command::new(bin("meshctl"))
        .arg("--socket")
        .arg(h.socket())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Scales `service` from host1 and returns how long until every host sees `n` running.
fn timed_scale(c: &Cluster, service: &str, n: usize, timeout: Duration) -> Duration {
    let start = Instant::now();
    c.host(1)
        .meshctl_ok(&["service", "scale", &format!("{service}={n}")])
        .unwrap();
    running_everywhere(c, service, n, timeout);
    start.elapsed()
}

fn running_everywhere(c: &Cluster, service: &str, n: usize, timeout: Duration) {
    c.eventually(timeout, &format!("{service} at {n}/{n} everywhere"), |c| {
        for h in c.hosts() {
            let s: Value = h.meshctl_json(&["service", "inspect", service])?;
            if s["running"] != n {
                anyhow::bail!("{}: {} running", h.node_name(), s["running"]);
            }
        }
        Ok(Some(()))
    })
    .unwrap();
}

#[test]
fn large_secrets_and_configs_reach_a_remote_task_without_holding_up_other_changes() {
    let c = cluster(3);
    let h1 = c.host(1);
    let h1_name = h1.node_name().to_owned();

    h1.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "pace",
        "--process",
        "--",
        "sleep",
        "100000",
    ])
    .unwrap();
    running_everywhere(&c, "pace", 1, Duration::from_secs(30));
    let without = timed_scale(&c, "pace", 3, Duration::from_secs(60));

    // Six objects created on host1 at once, and a scale from host1 right behind them.
    let sizes = [("64", 64 * 1024), ("100", 100 * 1024), ("500", 500 * 1024)];
    let mut expected = Vec::new();
    let mut creates = Vec::new();
    for (label, size) in sizes {
        for kind in ["secret", "config"] {
            let name = format!("{kind}{label}");
            let mut data = random_bytes(size);
            // Not the same bytes for the secret and the config.
            data[0] ^= kind.len() as u8;
            let file = c.log_dir().join(&name);
            std::fs::write(&file, &data).unwrap();
            expected.push((kind, name.clone(), sha256_hex(&data)));
            creates.push((
                name.clone(),
                meshctl(h1, &[kind, "create", &name, file.to_str().unwrap()]),
            ));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let with = timed_scale(&c, "pace", 6, Duration::from_secs(300));
    eprintln!(
        "scale converged in {without:?} without large objects, in {with:?} while 6 objects \
         of 64 KB to 500 KB (3.3 MB) spread"
    );
    for (name, child) in creates {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{name}: {out:?}");
    }

    // A task on another node gets every object, byte for byte.
    let mut args = vec![
        "service".to_owned(),
        "create".into(),
        "--name".into(),
        "reader".into(),
        "--process".into(),
        "--constraint".into(),
        format!("node.id!={h1_name}"),
    ];
    let mut paths = Vec::new();
    for (kind, name, _) in &expected {
        // Secrets appear as /run/secrets/<target>; a config's target is a path, unique per
        // cluster here as the process driver shares the host's /etc.
        let (target, path) = match *kind {
            "secret" => (name.clone(), format!("/run/secrets/{name}")),
            _ => {
                let p = format!("/etc/{}-{name}", c.name());
                (p.clone(), p)
            }
        };
        args.push(format!("--{kind}"));
        args.push(format!("source={name},target={target}"));
        paths.push(path);
    }
    args.push("--".into());
    args.extend(["sh".into(), "-c".into()]);
    args.push(format!(
        "sha256sum {} && exec sleep 100000",
        paths.join(" ")
    ));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    h1.meshctl_ok(&args).unwrap();
    running_everywhere(&c, "reader", 1, Duration::from_secs(60));
    let logs = c
        .eventually(Duration::from_secs(20), "the reader's checksums", |c| {
            for h in c.hosts() {
                let out = h.meshctl_ok(&["service", "logs", "reader"])?;
                if out.lines().filter(|l| l.contains("  /")).count() == expected.len() {
                    return Ok(Some((h.node_name().to_owned(), out)));
                }
            }
            Ok(None)
        })
        .unwrap();
    assert_ne!(logs.0, h1_name, "the reader runs on another node");
    for ((_, name, sum), path) in expected.iter().zip(&paths) {
        assert!(
            logs.1.contains(&format!("{sum}  {path}")),
            "{name}: want {sum} in\n{}",
            logs.1
        );
    }

    // Removal takes the objects away everywhere.
    h1.meshctl_ok(&["service", "rm", "reader"]).unwrap();
    c.eventually(Duration::from_secs(30), "reader gone", |c| {
        Ok(c.hosts()
            .iter()
            .all(|h| {
                !h.meshctl(&["service", "inspect", "reader"])
                    .unwrap()
                    .status
                    .success()
            })
            .then_some(()))
    })
    .unwrap();
    for (kind, name, _) in &expected {
        h1.meshctl_ok(&[kind, "rm", name]).unwrap();
    }
    c.eventually(Duration::from_secs(20), "no objects left anywhere", |c| {
        for h in c.hosts() {
            for kind in ["secret", "config"] {
                let ls = h.meshctl_ok(&[kind, "ls"])?;
                if expected.iter().any(|(_, n, _)| ls.contains(n.as_str())) {
                    return Ok(None);
                }
            }
        }
        Ok(Some(()))
    })
    .unwrap();
}
