//! State files damaged while the agent was down (a crash mid-write on a file system that
//! lost the tail, a bad disk block): the agent sets them aside, says so, counts them, and
//! rebuilds instead of taking a damaged gossip-keys file for a first start or leaving a task
//! whose record it cannot read running unmanaged.

use std::{collections::BTreeMap, path::Path, time::Duration};

use mesh_tests::{Cluster, cluster::bin};
use serde_json::Value;

const METRICS: &str = "127.0.0.1:9464";

/// This host's local tasks of `service` that run: name → PID.
fn running(c: &Cluster, service: &str) -> BTreeMap<String, u64> {
    let tasks: Value = c.host(1).meshctl_json(&["ps"]).unwrap();
    tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["service"] == service && t["state"] == "running")
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_owned(),
                t["pid"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn set_aside(dir: &Path, name: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{name}.corrupt-")))
        .collect()
}

#[test]
fn damaged_state_is_set_aside_and_the_node_keeps_its_tasks() {
    let mut c = Cluster::new(2).unwrap();
    c.host_mut(1)
        .start_agent(&["--label", "role=victim", "--metrics-listen", METRICS])
        .unwrap();
    c.host_mut(2).start_agent(&[]).unwrap();
    c.create_network("app", "10.10.0.0/24").unwrap();
    let whoami = bin("mesh-whoami");
    c.host(2)
        .meshctl_ok(&[
            "service",
            "create",
            "web",
            "--network",
            "app",
            "--replicas",
            "3",
            "--constraint",
            "node.labels.role==victim",
            "--",
            whoami.to_str().unwrap(),
        ])
        .unwrap();
    let before = c
        .eventually(
            Duration::from_secs(20),
            "3 tasks of web run on host1",
            |c| {
                let r = running(c, "web");
                Ok((r.len() == 3).then_some(r))
            },
        )
        .unwrap();

    // The agent stops (its tasks keep running); meanwhile its gossip keys and one task's
    // record are damaged: the one truncated, the other cut mid-JSON.
    c.host_mut(1).stop_agent().unwrap();
    let state = c.host(1).state_dir();
    let keys = state.join("gossip-keys.json");
    let text = std::fs::read(&keys).unwrap();
    std::fs::write(&keys, &text[..text.len() / 2]).unwrap();
    let mut names = before.iter();
    // One task loses its record but keeps the record's copy; the other loses both.
    let (damaged, _) = names.next().unwrap();
    let (victim, victim_pid) = names.next().unwrap();
    let tasks = state.join("tasks");
    for (task, files) in [(damaged, &[""][..]), (victim, &["", ".bak"][..])] {
        for f in files {
            let record = tasks.join(format!("{task}.json{f}"));
            assert!(record.exists(), "{}", record.display());
            std::fs::write(&record, b"{\"spec\": {\"name\": ").unwrap();
        }
    }

    c.host_mut(1).restart_agent().unwrap();

    // The damaged files were set aside (kept for a post-mortem), said in the log and
    // counted; a damaged file whose copy was good is whole again.
    assert_eq!(set_aside(&state, "gossip-keys.json").len(), 1);
    assert_eq!(set_aside(&tasks, &format!("{damaged}.json")).len(), 1);
    assert_eq!(set_aside(&tasks, &format!("{victim}.json")).len(), 1);
    assert_eq!(set_aside(&tasks, &format!("{victim}.json.bak")).len(), 1);
    assert!(serde_json::from_slice::<Value>(&std::fs::read(&keys).unwrap()).is_ok());
    let logs = c.host(1).logs();
    for f in [
        "gossip-keys.json".to_owned(),
        format!("{damaged}.json"),
        format!("{victim}.json.bak"),
    ] {
        assert!(logs.contains(&format!("{f} is damaged")), "{f}: {logs}");
    }
    let out = c
        .host(1)
        .ns
        .command("curl")
        .args(["-s", &format!("http://{METRICS}/metrics")])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(
        metrics.contains("mesh_state_files_quarantined_total 4"),
        "{metrics}"
    );

    // The tasks whose record (or its copy) was intact were adopted: same processes. The one
    // whose record and copy were lost was stopped (nothing runs unmanaged) and its slot
    // started again.
    let after = c
        .eventually(Duration::from_secs(20), "web back at 3 tasks", |c| {
            let r = running(c, "web");
            Ok((r.len() == 3 && !r.values().any(|p| p == victim_pid)).then_some(r))
        })
        .unwrap();
    for (name, pid) in &before {
        if name != victim {
            assert_eq!(
                after.get(name),
                Some(pid),
                "{name} was not adopted: {after:?}"
            );
        }
    }
    assert!(
        !Path::new(&format!("/proc/{victim_pid}")).exists(),
        "the unrecorded task's process still runs"
    );
    // The node is whole again in everyone's view: host2 sees three running tasks on it.
    c.eventually(Duration::from_secs(20), "host2 sees web at 3", |c| {
        let rows: Value = c.host(2).meshctl_json(&["service", "ps", "web"])?;
        let n = rows
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["history"] == false && r["state"] == "Running")
            .count();
        Ok((n == 3).then_some(()))
    })
    .unwrap();
    // And a fresh gossip-keys file was written whole.
    c.eventually(Duration::from_secs(10), "gossip keys saved again", |_| {
        Ok(std::fs::read(&keys)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .map(|_| ()))
    })
    .unwrap();
}
