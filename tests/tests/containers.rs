//! Processes the agent did not start, in namespaces it manages: a shell `ip netns exec`-ed
//! into a task's namespace, containers podman runs for image services, containers any runtime
//! attaches through the CNI plugin. They must resolve and balance like the agent's own
//! processes, whatever cgroup they live in.

use std::{collections::BTreeMap, process::Command, time::Duration};

use mesh_tests::{Cluster, Host, cluster::bin, workload::tally};
use serde_json::Value;

/// `n` hosts with agents and network `app`.
fn cluster(n: usize) -> Cluster {
    cluster_with(n, &[])
}

fn cluster_with(n: usize, agent_args: &[&str]) -> Cluster {
    let mut c = Cluster::new(n).unwrap();
    for i in 1..=n {
        c.host_mut(i).start_agent(agent_args).unwrap();
    }
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

/// `podman <args>`, failing with its stderr.
fn podman(args: &[&str]) -> String {
    let out = Command::new("podman").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "podman {} ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Running containers of a host's agent (labelled with its node), by name.
fn containers_of(h: &Host) -> Vec<String> {
    let mut names: Vec<String> = podman(&[
        "ps",
        "--filter",
        &format!("label=mesh.node={}", h.node_name()),
        "--format",
        "{{.Names}}",
    ])
    .lines()
    .map(str::to_owned)
    .collect();
    names.sort();
    names
}

/// Every container of the cluster, running or not.
fn all_containers(c: &Cluster) -> Vec<String> {
    podman(&[
        "ps",
        "--all",
        "--filter",
        &format!("name=^{}-", c.name()),
        "--format",
        "{{.Names}}",
    ])
    .lines()
    .map(str::to_owned)
    .collect()
}

fn curl_node(c: &Cluster, h: &Host, n: usize) -> BTreeMap<String, usize> {
    let a: std::net::SocketAddr = format!("{}:8080", h.ip).parse().unwrap();
    let answers = c
        .external_ns("client")
        .unwrap()
        .run(move || {
            (0..n)
                .map(|_| mesh_tests::workload::http_get(a).unwrap().trim().to_owned())
                .collect::<Vec<_>>()
        })
        .unwrap();
    tally(answers)
}

fn assert_round_robin(by: &BTreeMap<String, usize>, names: &[&str], each: usize) {
    let got: Vec<&str> = by.keys().map(String::as_str).collect();
    assert_eq!(got, names, "who answered: {by:?}");
    assert!(
        by.values().all(|n| n.abs_diff(each) <= 1),
        "round robin, {each}±1 each: {by:?}"
    );
}

#[test]
fn an_image_service_runs_podman_containers_that_balance_resolve_heal_and_survive_an_agent_crash() {
    let image = mesh_tests::image::Image::whoami().unwrap();
    // Peers wait ~10 s before declaring a silent node dead, so the agent restarted below is
    // back before its slot would be rescheduled: what is checked is adoption, not failover.
    let mut c = cluster_with(3, &["--phi-threshold", "100"]);
    c.external("client", 100).unwrap();
    for h in c.hosts() {
        let n: Value = h.meshctl_json(&["node", "inspect", "self"]).unwrap();
        assert!(
            n.to_string().contains("\"podman\""),
            "{} advertises the podman driver: {n}",
            h.node_name()
        );
    }
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "web",
            "--network",
            "app",
            "--replicas",
            "3",
            "--publish",
            "8080:80",
            "--image",
            image.name(),
            "-d",
        ])
        .unwrap();
    converged(&c, "web", 3, Duration::from_secs(30));
    // Containers are named web-<slot> (see default_hostname in the agent).
    let tasks = ["web-1", "web-2", "web-3"];
    // Routing mesh: every node balances over the three containers.
    for h in c.hosts() {
        assert_round_robin(&curl_node(&c, h, 9), &tasks, 3);
    }

    // Inside a container (podman's cgroup, its own mount and PID namespaces): service DNS at
    // 127.0.0.11 and VIP balancing.
    let vip = c
        .host(1)
        .meshctl_json::<Value>(&["service", "inspect", "web"])
        .unwrap()["vip"]
        .as_str()
        .unwrap()
        .to_owned();
    let mine = containers_of(c.host(1));
    assert_eq!(mine.len(), 1, "one task per node: {mine:?}");
    let ctr = mine[0].clone();
    let out = podman(&["exec", &ctr, "nslookup", "web"]);
    assert!(out.contains(&vip), "nslookup web in {ctr}: {out}");
    let mut answers = Vec::new();
    for _ in 0..9 {
        answers.push(
            podman(&["exec", &ctr, "wget", "-qO-", "http://web:80/"])
                .trim()
                .to_owned(),
        );
    }
    assert_round_robin(&tally(answers), &tasks, 3);

    // A container killed behind the agent's back is a failed task: restarted.
    podman(&["kill", &ctr]);
    c.eventually(Duration::from_secs(30), "a new container on host1", |c| {
        let now = containers_of(c.host(1));
        Ok((now.len() == 1 && now[0] != ctr).then_some(()))
    })
    .unwrap();
    converged(&c, "web", 3, Duration::from_secs(30));
    let rows: Vec<Value> = c.host(2).meshctl_json(&["service", "ps", "web"]).unwrap();
    assert!(
        rows.iter()
            .any(|r| r["history"] == true && r["state"] == "Failed"),
        "the killed task is in the history as failed: {rows:?}"
    );

    // The agent crashes and comes back: its container is adopted, not started again.
    let before = containers_of(c.host(1));
    c.host_mut(1).kill_agent().unwrap();
    assert_eq!(
        containers_of(c.host(1)),
        before,
        "containers outlive the agent"
    );
    c.host_mut(1).restart_agent().unwrap();
    converged(&c, "web", 3, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(containers_of(c.host(1)), before, "adopted, not duplicated");
    let running: Vec<String> = c.hosts().iter().flat_map(containers_of).collect();
    assert_eq!(running.len(), 3, "{running:?}");
    assert_round_robin(&curl_node(&c, c.host(1), 9), &tasks, 3);

    // Removing the service removes every container.
    c.host(1).meshctl_ok(&["service", "rm", "web"]).unwrap();
    c.eventually(Duration::from_secs(40), "no containers left", |c| {
        let left = all_containers(c);
        Ok(left.is_empty().then_some(()))
    })
    .unwrap();
}
