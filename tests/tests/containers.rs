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
    assert!(
        containers_of(c.host(1)).contains(&before[0]),
        "the running container is adopted, not replaced"
    );
    // A restarted agent may plan from a view that has not heard its peers yet and start
    // copies of their slots (the orchestrator's business, not the driver's); those lose to
    // the originals once views agree. What must hold: three containers in the end, one per
    // slot, and no second container for any task.
    c.eventually(
        Duration::from_secs(60),
        "three containers, one per slot",
        |c| {
            let running: Vec<String> = c.hosts().iter().flat_map(containers_of).collect();
            let slots: std::collections::BTreeSet<String> = running
                .iter()
                .filter_map(|n| n.split('-').nth(2).and_then(|t| t.split('.').nth(1)))
                .map(str::to_owned)
                .collect();
            Ok((running.len() == 3 && slots.len() == 3).then_some(()))
        },
    )
    .unwrap();
    converged(&c, "web", 3, Duration::from_secs(30));
    assert_round_robin(&curl_node(&c, c.host(1), 9), &tasks, 3);

    // Removing the service removes every container.
    c.host(1).meshctl_ok(&["service", "rm", "web"]).unwrap();
    c.eventually(Duration::from_secs(40), "no containers left", |c| {
        let left = all_containers(c);
        Ok(left.is_empty().then_some(()))
    })
    .unwrap();
}

#[test]
fn image_tasks_get_env_and_args_report_exit_codes_show_logs_and_avoid_nodes_without_podman() {
    let image = mesh_tests::image::Image::whoami().unwrap();
    let mut c = Cluster::new(2).unwrap();
    c.host_mut(1).start_agent(&[]).unwrap();
    // A podman that cannot read its configuration does not work: host2 has no podman driver.
    c.host_mut(2)
        .start_agent_with_env(&[], &[("CONTAINERS_CONF", "/nonexistent")])
        .unwrap();
    c.create_network("app", "10.61.0.0/24").unwrap();
    let n2: Value = c
        .host(1)
        .meshctl_json(&["node", "inspect", c.host(2).node_name()])
        .unwrap();
    assert_eq!(n2["drivers"], serde_json::json!(["process"]), "{n2}");

    // The words after `--` replace the image's CMD; -e and the MESH_* variables reach it.
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "hello",
            "--network",
            "app",
            "--replicas",
            "2",
            "--replicas-max-per-node",
            "1",
            "--image",
            image.name(),
            "-e",
            "GREETING=hi",
            "-d",
            "--",
            "sh",
            "-c",
            "trap 'exit 0' TERM; echo \"$GREETING from $(hostname) slot $MESH_TASK_SLOT\"; sleep 1000 & wait",
        ])
        .unwrap();
    let rows = c
        .eventually(Duration::from_secs(20), "one running, one pending", |c| {
            let rows: Vec<Value> = c.host(2).meshctl_json(&["service", "ps", "hello"])?;
            let running = rows.iter().filter(|r| r["state"] == "Running").count();
            let pending = rows.iter().filter(|r| r["state"] == "Pending").count();
            Ok((running == 1 && pending == 1).then_some(rows))
        })
        .unwrap();
    let pending = rows.iter().find(|r| r["state"] == "Pending").unwrap();
    assert!(
        pending["error"]
            .as_str()
            .unwrap()
            .contains("no podman driver"),
        "{pending}"
    );
    let running = rows.iter().find(|r| r["state"] == "Running").unwrap();
    assert_eq!(running["node"], c.host(1).node_name());

    let logs = c
        .eventually(Duration::from_secs(10), "the greeting in the logs", |c| {
            let out = c.host(1).meshctl_ok(&["service", "logs", "hello"])?;
            Ok(out.contains("hi from hello-").then_some(out))
        })
        .unwrap();
    let line = logs.lines().find(|l| l.contains("hi from")).unwrap();
    // Docker's prefix: service.slot.<task id, 12 characters>@node.
    let (prefix, text) = line.split_once("    | ").unwrap();
    let slot = running["slot"].as_str().unwrap();
    let id = running["id"].as_str().unwrap();
    assert_eq!(
        prefix,
        format!(
            "hello.{slot}.{}@{}",
            &id[..12.min(id.len())],
            c.host(1).node_name()
        ),
        "{line}"
    );
    assert_eq!(text, format!("hi from hello-{slot} slot {slot}"));
    let task = &format!("hello.{slot}.{id}");
    let one = c.host(1).meshctl_ok(&["logs", task]).unwrap();
    assert_eq!(one.trim(), text);

    // Following: what the task writes later arrives on the open stream.
    let ctr = containers_of(c.host(1)).pop().unwrap();
    let mut follow = Command::new(bin("meshctl"))
        .arg("--socket")
        .arg(c.host(1).socket())
        .args(["logs", "-f", task])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    podman(&["exec", &ctr, "sh", "-c", "echo later > /proc/1/fd/1"]);
    std::thread::sleep(Duration::from_secs(1));
    follow.kill().unwrap();
    let out = follow.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("later"), "followed logs: {text}");

    // A process task's log is its output file.
    c.host(1)
        .meshctl_ok(&[
            "run",
            "--network",
            "app",
            "--name",
            "p1",
            "--",
            "sh",
            "-c",
            "echo from-process; exec sleep 1000",
        ])
        .unwrap();
    c.eventually(Duration::from_secs(5), "the process task's log", |c| {
        Ok(c.host(1)
            .meshctl_ok(&["logs", "p1"])?
            .contains("from-process")
            .then_some(()))
    })
    .unwrap();

    // A container's exit code is the task's; with restart-condition none it stays down, well
    // past the restart delay, while the same service with `any` is restarted within it (so
    // the watch below would see a restart if there were one).
    for (name, condition) in [("oneshot", "none"), ("again", "any")] {
        c.host(1)
            .meshctl_ok(&[
                "service",
                "create",
                name,
                "--network",
                "app",
                "--image",
                image.name(),
                "--restart-condition",
                condition,
                "--restart-delay",
                "1s",
                "-d",
                "--",
                "sh",
                "-c",
                "exit 3",
            ])
            .unwrap();
    }
    let failed = |c: &Cluster, name: &str| -> anyhow::Result<Vec<Value>> {
        let rows: Vec<Value> = c.host(1).meshctl_json(&["service", "ps", name])?;
        Ok(rows
            .into_iter()
            .filter(|r| r["state"] == "Failed")
            .collect())
    };
    let row = c
        .eventually(Duration::from_secs(20), "oneshot failed", |c| {
            Ok(failed(c, "oneshot")?.pop())
        })
        .unwrap();
    assert_eq!(row["error"], "task: non-zero exit (3)", "{row}");
    // Three restart delays: `any` fails again (a second task, also exit 3)...
    c.eventually(
        Duration::from_secs(20),
        "again restarted and failed twice",
        |c| Ok((failed(c, "again")?.len() >= 2).then_some(())),
    )
    .unwrap();
    // ...while `none` keeps its one task, failed, for more than three restart delays.
    let watch = std::time::Instant::now();
    while watch.elapsed() < Duration::from_secs(3) {
        let rows: Vec<Value> = c
            .host(1)
            .meshctl_json(&["service", "ps", "oneshot"])
            .unwrap();
        assert_eq!(rows.len(), 1, "oneshot was restarted: {rows:?}");
        assert_eq!(rows[0]["id"], row["id"], "{rows:?}");
        assert_eq!(rows[0]["state"], "Failed", "{rows:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    for s in ["hello", "oneshot", "again"] {
        c.host(1).meshctl_ok(&["service", "rm", s]).unwrap();
    }
    c.eventually(Duration::from_secs(30), "no containers left", |c| {
        Ok(all_containers(c).is_empty().then_some(()))
    })
    .unwrap();
}
