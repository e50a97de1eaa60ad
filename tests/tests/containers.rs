//! Processes the agent did not start, in namespaces it manages: a shell `ip netns exec`-ed
//! into a task's namespace, containers podman runs for image services, containers any runtime
//! attaches through the CNI plugin. They must resolve and balance like the agent's own
//! processes, whatever cgroup they live in.

use std::{collections::BTreeMap, process::Command, time::Duration};

use mesh_tests::{Cluster, Host, cluster::bin, workload::tally};
use serde_json::Value;

/// `n` hosts with agents and network `app`.
fn cluster(n: usize) -> Cluster {
    let mut c = Cluster::new(n).unwrap();
    c.start_agents().unwrap();
    c.create_network("app", "10.61.0.0/24").unwrap();
    c
}

/// Waits until every host balances `name` over `n` active backends.
fn converged(c: &Cluster, name: &str, n: usize, timeout: Duration) {
    c.eventually(timeout, &format!("{name} at {n}/{n} everywhere"), |c| {
        for h in c.hosts().iter().filter(|h| h.agent_pid().is_some()) {
            let s: Value = h.meshctl_json(&["service", "inspect", name])?;
            let active = s["dataplane"]["backends"]
                .as_array()
                .map_or(0, |b| b.iter().filter(|b| b["state"] == "active").count());
            if s["running"] != n || active != n {
                anyhow::bail!(
                    "{} says {}/{} with {active} active backends",
                    h.node_name(),
                    s["running"],
                    s["desired"]
                );
            }
        }
        Ok(Some(()))
    })
    .unwrap();
}

/// The running tasks of this host (`meshctl ps`).
fn local_tasks(h: &Host) -> Vec<Value> {
    h.meshctl_json(&["ps"]).unwrap()
}

/// A command run with `ip netns exec`: a new process in the namespace that inherits nothing
/// from the agent — not its cgroup, not its mount namespace (`ip netns exec` makes its own
/// and bind-mounts /etc/netns/<ns>/resolv.conf, which the agent wrote).
fn netns_exec(netns: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_process_entering_a_task_namespace_by_ip_netns_exec_resolves_and_balances() {
    let c = cluster(2);
    let whoami = bin("mesh-whoami");
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "web",
            "--network",
            "app",
            "--replicas",
            "2",
            "--",
            whoami.to_str().unwrap(),
        ])
        .unwrap();
    converged(&c, "web", 2, Duration::from_secs(15));
    let vip = c
        .host(1)
        .meshctl_json::<Value>(&["service", "inspect", "web"])
        .unwrap()["vip"]
        .as_str()
        .unwrap()
        .to_owned();
    let task = c
        .eventually(Duration::from_secs(5), "a task of web on host1", |c| {
            Ok(local_tasks(c.host(1)).into_iter().next())
        })
        .unwrap();
    let netns = task["netns"].as_str().unwrap().to_owned();

    let out = netns_exec(&netns, &["getent", "hosts", "web"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.split_whitespace().next() == Some(vip.as_str()),
        "getent hosts web in {netns}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut answers = Vec::new();
    for _ in 0..8 {
        let out = netns_exec(&netns, &["curl", "-s", "--max-time", "3", "http://web/"]);
        assert!(
            out.status.success(),
            "curl http://web/ in {netns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        answers.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }
    let by: BTreeMap<String, usize> = tally(answers);
    assert_eq!(by.len(), 2, "balanced over both tasks: {by:?}");
    assert!(
        by.values().all(|n| n.abs_diff(4) <= 1),
        "round robin: {by:?}"
    );
}
