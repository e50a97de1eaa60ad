//! The README's resealing claim, end to end ("Secrets, configs and stacks"): "after a
//! cluster key rotation every node reseals the secrets it can open under the new key". A
//! secret created under the old key is, once every node holds only the new one, sealed
//! under the new key (`secret inspect`) and still opens for a task started after the
//! rotation on another node than the one that created it; an agent that holds only the old
//! key gets nothing from the cluster any more.

use std::{
    collections::BTreeSet,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use mesh_tests::{Cluster, cluster::bin, workload::http_get};
use serde_json::Value;

const SECRET: &str = "sealed-before-the-rotation";

fn new_key() -> String {
    let out = Command::new(bin("mesh-agent"))
        .arg("keygen")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Writes (atomically, owner-only) a key file of `keys`, the first the primary.
fn key_file(c: &Cluster, name: &str, keys: &[&str]) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let path = c.log_dir().join(name);
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let text: String = keys.iter().map(|k| format!("{k}\n")).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn key_arg(path: &Path) -> [&str; 2] {
    ["--cluster-key-file", path.to_str().unwrap()]
}

fn stats(c: &Cluster, i: usize) -> Value {
    c.host(i).meshctl_json(&["gossip", "stats"]).unwrap()
}

fn key_ids(s: &Value) -> Vec<String> {
    s["auth"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The names of the nodes `node ls` on host `i` shows Ready.
fn ready(c: &Cluster, i: usize) -> BTreeSet<String> {
    let nodes: Vec<Value> = c.host(i).meshctl_json(&["node", "ls"]).unwrap();
    nodes
        .iter()
        .filter(|n| n["status"] == "Ready")
        .map(|n| n["name"].as_str().unwrap().to_owned())
        .collect()
}

fn secret_key(c: &Cluster, i: usize) -> String {
    let s: Value = c
        .host(i)
        .meshctl_json(&["secret", "inspect", "pw"])
        .unwrap();
    // `inspect NAME…` prints a list, as Docker's does.
    let s = if s.is_array() { s[0].clone() } else { s };
    match &s["key"] {
        Value::String(k) => k.clone(),
        other => panic!("secret inspect's key: {other}"),
    }
}

#[test]
fn secrets_are_resealed_under_the_new_key_and_still_open_after_a_rotation() {
    let mut c = Cluster::new(4).unwrap();
    let (old, new) = (new_key(), new_key());
    let files: Vec<PathBuf> = (1..=3)
        .map(|i| key_file(&c, &format!("h{i}.key"), &[&old]))
        .collect();
    for i in 1..=3 {
        c.host_mut(i).start_agent(&key_arg(&files[i - 1])).unwrap();
    }
    let members: BTreeSet<String> = (1..=3).map(|i| c.host(i).node_name().to_owned()).collect();
    c.eventually(Duration::from_secs(15), "3 nodes Ready", |c| {
        Ok((1..=3).all(|i| ready(c, i) == members).then_some(()))
    })
    .unwrap();
    c.external("client", 100).unwrap();

    let out = c
        .host(1)
        .meshctl_stdin(&["secret", "create", "pw", "-"], SECRET.as_bytes())
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let old_id = key_ids(&stats(&c, 1))[0].clone();
    c.eventually(Duration::from_secs(10), "pw on host3", |c| {
        Ok(c.host(3)
            .meshctl_json::<Value>(&["secret", "inspect", "pw"])
            .ok()
            .map(|_| ()))
    })
    .unwrap();
    assert_eq!(
        secret_key(&c, 3),
        old_id,
        "sealed under the key of its time"
    );

    // The rotation as an operator does it: the new key first with the old one still
    // accepted, then the new key alone, node by node, each reloaded with SIGHUP.
    for step in [vec![new.as_str(), old.as_str()], vec![new.as_str()]] {
        for i in 1..=3 {
            key_file(&c, &format!("h{i}.key"), &step);
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.host(i).agent_pid().unwrap() as i32),
                nix::sys::signal::Signal::SIGHUP,
            )
            .unwrap();
            c.eventually(Duration::from_secs(5), "the reload applied", |c| {
                Ok((key_ids(&stats(c, i)).len() == step.len()).then_some(()))
            })
            .unwrap();
        }
        if step.len() == 2 {
            // The old key is dropped only once the secret is sealed under the new one (the
            // README's order): dropped at once, nobody could open it any more.
            let primary = key_ids(&stats(&c, 1))[0].clone();
            for i in 1..=3 {
                c.eventually(
                    Duration::from_secs(10),
                    &format!("pw resealed under {primary} before the old key goes (host{i})"),
                    |c| Ok((secret_key(c, i) == primary).then_some(())),
                )
                .unwrap();
            }
        }
    }
    let new_id = key_ids(&stats(&c, 1))[0].clone();
    assert_ne!(new_id, old_id);
    for i in 1..=3 {
        assert_eq!(
            key_ids(&stats(&c, i)),
            std::slice::from_ref(&new_id),
            "host{i}"
        );
        c.eventually(
            Duration::from_secs(10),
            &format!("pw resealed under {new_id} as host{i} sees it"),
            |c| Ok((secret_key(c, i) == new_id).then_some(())),
        )
        .unwrap();
    }
    let log = c.host(1).logs() + &c.host(2).logs() + &c.host(3).logs();
    assert!(
        log.contains("resealing the secret under the new primary key"),
        "a node says it resealed"
    );

    // A task started now on host3 (the secret was created on host1) reads it.
    let n3 = c.host(3).node_name().to_owned();
    c.host(2)
        .meshctl_ok(&[
            "service",
            "create",
            "reader",
            "-p",
            "8080:80",
            "--constraint",
            &format!("node.hostname=={n3}"),
            "--secret",
            "pw",
            "--",
            bin("mesh-whoami").to_str().unwrap(),
            "--file",
            "/run/secrets/pw",
        ])
        .unwrap();
    let addr: SocketAddr = format!("{}:8080", c.host(1).ip).parse().unwrap();
    let client = c.external_ns("client").unwrap();
    let body = c
        .eventually(Duration::from_secs(20), "reader answers", |_| {
            Ok(client.run(move || http_get(addr).ok()).unwrap())
        })
        .unwrap();
    assert_eq!(body, SECRET, "the task on host3 read the secret");
    let ps: Vec<Value> = c.host(3).meshctl_json(&["ps"]).unwrap();
    assert!(
        ps.iter()
            .any(|t| t["service"] == "reader" && t["state"] == "running"),
        "the reader runs on host3: {ps:?}"
    );

    // An agent holding only the old key: the cluster drops its gossip and it learns nothing.
    let stale = key_file(&c, "h4.key", &[&old]);
    c.host_mut(4).start_agent(&key_arg(&stale)).unwrap();
    let dropped = |c: &Cluster| {
        stats(c, 1)["auth"]["dropped"]["unknown_key"]
            .as_u64()
            .unwrap()
    };
    let before = dropped(&c);
    c.eventually(Duration::from_secs(10), "host4's gossip dropped", |c| {
        Ok((dropped(c) > before).then_some(()))
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ready(&c, 1), members, "host4 did not join");
    let n4 = c.host(4).node_name().to_owned();
    assert_eq!(ready(&c, 4), BTreeSet::from([n4]), "host4 sees only itself");
    let secrets: Vec<Value> = c.host(4).meshctl_json(&["secret", "ls"]).unwrap();
    assert!(secrets.is_empty(), "host4 got no secret: {secrets:?}");
}
