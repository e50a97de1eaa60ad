//! The README's rolling-update failure handling, end to end ("Rolling updates"):
//! `--update-failure-action continue`, `--update-max-failure-ratio`, the `--rollback-*`
//! config of an automatic rollback (`--rollback-parallelism 0`), and `service rollback NAME`
//! of a process service. New tasks fail by a marker file named after their task: the first
//! task of that slot to start after the marker appears removes it and exits 3, so the slot
//! fails exactly once and its restart runs.

use std::{collections::BTreeMap, path::Path, time::Duration};

use mesh_tests::{Cluster, Host, cluster::bin};
use serde_json::Value;

fn create(c: &Cluster, name: &str, markers: &Path) {
    let whoami = bin("mesh-whoami");
    let script = format!(
        "f={}/$HOSTNAME; if [ -e $f ]; then rm $f; exit 3; fi; exec {}",
        markers.display(),
        whoami.display()
    );
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            name,
            "--replicas",
            "3",
            "--restart-delay",
            "300ms",
            // The task removes a marker root made: it runs as root (without capabilities).
            "--user",
            "0",
            "--",
            "/bin/sh",
            "-c",
            &script,
        ])
        .unwrap();
}

fn service(h: &Host, name: &str) -> Value {
    h.meshctl_json(&["service", "inspect", name]).unwrap()
}

/// Current rows of `service ps`, by slot.
fn current(h: &Host, name: &str) -> BTreeMap<String, Value> {
    let rows: Vec<Value> = h.meshctl_json(&["service", "ps", name]).unwrap();
    rows.into_iter()
        .filter(|r| r["history"] == false && r["desired"] == "Running")
        .map(|r| (r["slot"].as_str().unwrap().to_owned(), r))
        .collect()
}

/// Every slot runs a task of the current spec.
fn converged(c: &Cluster, name: &str) {
    c.eventually(Duration::from_secs(30), &format!("{name} at 3/3"), |c| {
        let now = current(c.host(2), name);
        Ok((now.len() == 3
            && now
                .values()
                .all(|r| r["state"] == "Running" && r["updated"] == true))
        .then_some(()))
    })
    .unwrap();
}

fn fail_once(markers: &Path, tasks: &[&str]) {
    for t in tasks {
        std::fs::write(markers.join(t), "").unwrap();
    }
}

/// `service update NAME ARGS…` from host 3 (monitor 1 s): its output, and whether it
/// exited 0.
fn update(c: &Cluster, name: &str, args: &[&str]) -> (bool, String) {
    let mut cmd = vec!["service", "update", name, "--update-monitor", "1s"];
    cmd.extend_from_slice(args);
    let out = c.host(3).meshctl(&cmd).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn state(h: &Host, name: &str) -> Value {
    service(h, name)["spec"]["update_status"]["state"].clone()
}

#[test]
fn failed_updates_continue_pause_at_the_ratio_and_roll_back() {
    let mut c = Cluster::new(3).unwrap();
    c.start_agents().unwrap();
    let markers = c.log_dir().join("fail-once");
    std::fs::create_dir_all(&markers).unwrap();
    for s in ["cont", "ratio", "rb"] {
        create(&c, s, &markers);
    }
    for s in ["cont", "ratio", "rb"] {
        converged(&c, s);
    }

    // continue: two of three new tasks fail (ratio 0), the update goes on and completes.
    fail_once(&markers, &["cont.1", "cont.2"]);
    let (ok, out) = update(
        &c,
        "cont",
        &["--env-add", "V=2", "--update-failure-action", "continue"],
    );
    assert!(ok, "{out}");
    converged(&c, "cont");
    assert_eq!(state(c.host(1), "cont"), "completed");
    let rows: Vec<Value> = c.host(1).meshctl_json(&["service", "ps", "cont"]).unwrap();
    let failed: Vec<&Value> = rows
        .iter()
        .filter(|r| r["state"] == "Failed" && r["error"] == "task: non-zero exit (3)")
        .collect();
    assert_eq!(failed.len(), 2, "both failures are history: {rows:?}");

    // max failure ratio 0.5 of 3 slots: one failure is tolerated, two are not (all slots in
    // one wave, to keep the test short).
    fail_once(&markers, &["ratio.1"]);
    let (ok, out) = update(
        &c,
        "ratio",
        &[
            "--env-add",
            "V=2",
            "--update-max-failure-ratio",
            "0.5",
            "--update-parallelism",
            "0",
        ],
    );
    assert!(ok, "1/3 failed is within 0.5: {out}");
    converged(&c, "ratio");
    assert_eq!(state(c.host(1), "ratio"), "completed");
    let v2 = service(c.host(1), "ratio")["spec"]["task"].clone();
    fail_once(&markers, &["ratio.1", "ratio.2"]);
    let (ok, out) = update(
        &c,
        "ratio",
        &[
            "--env-add",
            "V=3",
            "--rollback-monitor",
            "1s",
            "--rollback-parallelism",
            "0",
        ],
    );
    assert!(!ok, "2/3 failed is past 0.5: {out}");
    assert!(out.contains("paused due to failure"), "{out}");
    assert_eq!(state(c.host(2), "ratio"), "paused");
    // `service rollback` by hand, from the paused update back to V=2.
    let out = c
        .host(2)
        .meshctl_ok(&["service", "rollback", "ratio"])
        .unwrap();
    assert!(out.contains("converged"), "{out}");
    converged(&c, "ratio");
    let s = service(c.host(1), "ratio");
    assert_eq!(s["spec"]["task"], v2, "back on V=2");
    assert_eq!(s["spec"]["update_status"]["state"], "rollback_completed");

    // rollback with --rollback-parallelism 0: the slots go back in one wave, though the
    // rollback delay would space waves 3 s apart.
    let v1 = service(c.host(1), "rb")["spec"]["task"].clone();
    fail_once(&markers, &["rb.3"]);
    let (ok, out) = update(
        &c,
        "rb",
        &[
            "--env-add",
            "V=2",
            "--update-parallelism",
            "0",
            "--update-failure-action",
            "rollback",
            "--rollback-parallelism",
            "0",
            "--rollback-delay",
            "3s",
            "--rollback-monitor",
            "1s",
        ],
    );
    assert!(!ok, "{out}");
    assert!(out.contains("rolled back"), "{out}");
    converged(&c, "rb");
    let s = service(c.host(1), "rb");
    assert_eq!(s["spec"]["task"], v1, "back on v1");
    assert_eq!(s["spec"]["update_status"]["state"], "rollback_completed");
    assert_eq!(s["spec"]["rollback"]["parallelism"], 0, "{s}");
    let now = current(c.host(1), "rb");
    let created: Vec<u64> = now
        .values()
        .map(|r| r["created_ms"].as_u64().unwrap())
        .collect();
    let spread = created.iter().max().unwrap() - created.iter().min().unwrap();
    assert!(spread < 2_000, "one rollback wave: {now:?}");
}
