//! Reservations are placement, end to end: nodes advertise the memory their agent.toml
//! gives them, a service reserving more than fits stays partly pending with Swarm's reason
//! in `service ps`, and scaling down or removing a service frees the room for pending
//! tasks. Underneath, the processes running on each node are counted from /proc.

use std::{collections::BTreeMap, time::Duration};

use mesh_tests::{Cluster, cluster::bin};
use serde_json::Value;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Three nodes that advertise 2 CPUs and 1 GiB each, whatever this machine has.
fn cluster() -> Cluster {
    let mut c = Cluster::new(3).unwrap();
    let config = c.log_dir().join("agent.toml");
    std::fs::create_dir_all(c.log_dir()).unwrap();
    std::fs::write(&config, "cpus = 2\nmemory = \"1g\"\n").unwrap();
    for i in 1..=3 {
        c.host_mut(i)
            .start_agent(&["--config", config.to_str().unwrap()])
            .unwrap();
    }
    c
}

/// `service ps NAME` on host 2: (running tasks per node, the pending rows' errors).
fn ps(c: &Cluster, name: &str) -> anyhow::Result<(BTreeMap<String, usize>, Vec<String>)> {
    let rows: Vec<Value> = c.host(2).meshctl_json(&["service", "ps", name])?;
    let mut running = BTreeMap::new();
    let mut pending = Vec::new();
    for r in rows.iter().filter(|r| r["history"] == false) {
        match r["state"].as_str() {
            Some("Running") => {
                *running
                    .entry(r["node"].as_str().unwrap_or_default().to_owned())
                    .or_default() += 1
            }
            Some("Pending") => pending.push(r["error"].as_str().unwrap_or_default().to_owned()),
            _ => {}
        }
    }
    Ok((running, pending))
}

/// The service's task processes alive on each node, from each node's own `meshctl ps` and
/// /proc: what runs, not what gossip says.
fn processes(c: &Cluster, service: &str) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for h in c.hosts() {
        let tasks: Vec<Value> = h.meshctl_json(&["ps"]).unwrap();
        let alive = tasks
            .iter()
            .filter(|t| t["service"] == service && t["state"] == "running")
            .filter_map(|t| t["pid"].as_u64())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| !s.contains(") Z"))
            })
            .count();
        if alive > 0 {
            by.insert(h.node_name().to_owned(), alive);
        }
    }
    by
}

fn create(c: &Cluster, name: &str, replicas: &str, memory: &str) {
    let w = bin("mesh-whoami");
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "--name",
            name,
            "--replicas",
            replicas,
            "--reserve-memory",
            memory,
            "--reserve-cpu",
            "0.1",
            "-d",
            "--process",
            "--",
            w.to_str().unwrap(),
        ])
        .unwrap();
}

/// Waits until `service ps` shows `running` tasks (per node at most `per_node`) and the
/// `pending` reasons.
fn settle(c: &Cluster, name: &str, running: usize, pending: &[&str]) -> BTreeMap<String, usize> {
    c.eventually(
        Duration::from_secs(30),
        &format!("{name}: {running} running, pending {pending:?}"),
        |c| {
            let (by, why) = ps(c, name)?;
            let n: usize = by.values().sum();
            Ok((n == running && why == pending).then_some(by))
        },
    )
    .unwrap()
}

#[test]
fn reservations_fill_nodes_and_pending_tasks_start_when_room_frees() {
    let c = cluster();
    // Every node advertises what its config says, and nothing is reserved yet.
    let n1 = c.host(1).node_name().to_owned();
    let info: Value = c.host(2).meshctl_json(&["node", "inspect", &n1]).unwrap();
    let r = &info["resources"];
    assert_eq!(r["capacity"]["memory_bytes"], GIB, "{info}");
    assert_eq!(r["capacity"]["nano_cpus"], 2_000_000_000u64, "{info}");
    assert_eq!(r["reserved"]["memory_bytes"], 0, "{info}");

    // 400 MiB a task on 1 GiB nodes: two fit on each, the seventh waits and says why.
    create(&c, "big", "7", "400M");
    let full = "no suitable node: insufficient memory on 3 nodes";
    let by = settle(&c, "big", 6, &[full]);
    assert!(by.values().all(|&n| n == 2), "{by:?}");
    assert_eq!(
        processes(&c, "big"),
        by,
        "what runs is what service ps says"
    );
    let text = c
        .host(3)
        .meshctl_ok(&["service", "ps", "big", "--no-trunc"])
        .unwrap();
    assert!(text.contains(full), "{text}");
    let pretty = c
        .host(3)
        .meshctl_ok(&["node", "inspect", &n1, "--pretty"])
        .unwrap();
    for line in [
        "Resources:",
        " CPUs:\t\t\t2",
        " Memory:\t\t1GiB",
        " Reserved by tasks:",
        "  CPUs:\t\t\t0.2",
        "  Memory:\t\t800MiB",
        " Available:",
        "  CPUs:\t\t\t1.8",
        "  Memory:\t\t224MiB",
    ] {
        assert!(pretty.lines().any(|l| l == line), "{line:?} in:\n{pretty}");
    }
    let inspect = c
        .host(2)
        .meshctl_ok(&["service", "inspect", "big", "--pretty"])
        .unwrap();
    assert!(
        inspect.contains("Resources:\n Reservations:\n  CPU:\t\t0.1\n  Memory:\t400MiB\n"),
        "{inspect}"
    );

    // Scaled to 5: one node has room for one more, and another service's first task takes
    // it; its second waits.
    c.host(1)
        .meshctl_ok(&["service", "scale", "big=5", "-d"])
        .unwrap();
    settle(&c, "big", 5, &[]);
    create(&c, "small", "2", "400M");
    let small = settle(&c, "small", 1, &[full]);
    let big = processes(&c, "big");
    let (node, _) = small.iter().next().unwrap();
    assert_eq!(
        big.get(node),
        Some(&1),
        "small went where big left room: {big:?}"
    );

    // Removing big frees every node: small's pending task starts.
    c.host(1).meshctl_ok(&["service", "rm", "big"]).unwrap();
    settle(&c, "small", 2, &[]);
    c.eventually(Duration::from_secs(15), "big's processes gone", |c| {
        Ok(processes(c, "big").is_empty().then_some(()))
    })
    .unwrap();
    assert_eq!(processes(&c, "small").values().sum::<usize>(), 2);
    let reserved: u64 = c
        .hosts()
        .iter()
        .map(|h| {
            let n: Value = c
                .host(1)
                .meshctl_json(&["node", "inspect", h.node_name()])
                .unwrap();
            n["resources"]["reserved"]["memory_bytes"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(reserved, 800 * MIB, "node inspect counts small's two tasks");
}

#[test]
fn a_reservation_no_node_can_hold_is_accepted_and_pending_and_bad_sizes_change_nothing() {
    let c = cluster();
    // As Docker: accepted, and pending with the reason.
    create(&c, "huge", "1", "64G");
    settle(
        &c,
        "huge",
        0,
        &[
            "no suitable node: insufficient memory on 3 nodes (no node has 64GiB of memory: \
           the largest has 1GiB)",
        ],
    );
    assert!(processes(&c, "huge").is_empty());
    // Lowered to what fits: the task starts.
    c.host(1)
        .meshctl_ok(&[
            "service",
            "update",
            "huge",
            "--reserve-memory",
            "512M",
            "-d",
        ])
        .unwrap();
    settle(&c, "huge", 1, &[]);

    // Malformed and negative values are refused before anything is sent.
    let w = bin("mesh-whoami");
    for (flag, value, says) in [
        (
            "--reserve-memory",
            "512Q",
            "invalid --reserve-memory \"512Q\"",
        ),
        ("--reserve-cpu", "-1", "a reservation cannot be negative"),
        ("--reserve-cpu", "lots", "invalid --reserve-cpu \"lots\""),
    ] {
        let out = c
            .host(1)
            .meshctl(&[
                "service",
                "create",
                "--name",
                "bad",
                flag,
                value,
                "--process",
                "--",
                w.to_str().unwrap(),
            ])
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{flag} {value}: {err}"
        );
        let out = c
            .host(1)
            .meshctl(&["service", "update", "huge", flag, value])
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "update {flag} {value}: {err}"
        );
    }
    assert!(
        !c.host(1)
            .meshctl(&["service", "inspect", "bad"])
            .unwrap()
            .status
            .success()
    );
    let huge: Value = c
        .host(1)
        .meshctl_json(&["service", "inspect", "huge"])
        .unwrap();
    assert_eq!(
        huge["spec"]["task"]["resources"]["reservations"]["memory_bytes"],
        512 * MIB,
        "the refused updates changed nothing: {huge}"
    );
}
