//! A service's networks and its aliases on them (`--network name=N,alias=A`): an alias
//! resolves and connects like the service's name, on its network only; an alias another
//! service holds on the network is refused and changes nothing.

use std::time::Duration;

use mesh_tests::Cluster;
use serde_json::Value;

/// `meshctl exec TASK -- sh -c SCRIPT` on the task's node: the task's resolver (127.0.0.11),
/// namespace and cgroup, what its own processes get. (status ok, stdout)
fn in_task(c: &Cluster, task: &Value, script: &str) -> (bool, String) {
    let node = task["node"].as_str().unwrap();
    let h = c.hosts().iter().find(|h| h.node_name() == node).unwrap();
    let name = task["name"].as_str().unwrap();
    let out = h
        .meshctl(&["exec", name, "--", "sh", "-c", script])
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The IPv4 addresses `name` resolves to inside the task (empty: it does not resolve).
fn resolve(c: &Cluster, task: &Value, name: &str) -> Vec<String> {
    let (_, out) = in_task(c, task, &format!("getent ahostsv4 {name}"));
    let mut v: Vec<String> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// An HTTP answer from `name` through whatever it resolves to, inside the task.
fn get(c: &Cluster, task: &Value, name: &str) -> Option<String> {
    let (ok, out) = in_task(c, task, &format!("curl -s --max-time 2 http://{name}/"));
    ok.then_some(out)
}

fn service(c: &Cluster, name: &str) -> Option<Value> {
    c.host(1).meshctl_json(&["service", "inspect", name]).ok()
}

#[test]
fn aliases_resolve_and_connect_on_their_network_only_and_a_taken_one_is_refused() {
    let mut c = Cluster::new(2).unwrap();
    c.start_agents().unwrap();
    c.create_network("backend", "10.20.0.0/24").unwrap();
    c.create_network("frontend", "10.21.0.0/24").unwrap();
    let h1 = c.host(1);
    // Task-less services whose tasks are started by hand, on host 2.
    let worker: Value = h1
        .meshctl_json(&[
            "service",
            "create",
            "--name",
            "worker",
            "--process",
            "--network",
            "name=backend,alias=jobs,alias=queue",
        ])
        .unwrap();
    assert_eq!(
        worker["spec"]["aliases"],
        serde_json::json!(["jobs", "queue"])
    );
    let vip = worker["vip"].as_str().unwrap().to_owned();
    h1.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "db",
        "--process",
        "--endpoint-mode",
        "dnsrr",
        "--network",
        "name=backend,alias=store",
    ])
    .unwrap();
    let w: Value = c
        .host(2)
        .run_whoami("backend", Some("worker"), "worker-1", &[])
        .unwrap();
    let d: Value = c
        .host(2)
        .run_whoami("backend", Some("db"), "db-1", &[])
        .unwrap();
    let back: Value = h1.run_whoami("backend", None, "back", &[]).unwrap();
    let front: Value = h1.run_whoami("frontend", None, "front", &[]).unwrap();

    // On backend: each alias is the service's name (its VIP; the tasks in dnsrr mode), and
    // a connection by alias reaches the service's task.
    c.eventually(
        Duration::from_secs(3),
        "jobs resolves to worker's VIP",
        |c| Ok((resolve(c, &back, "jobs") == [vip.clone()]).then_some(())),
    )
    .unwrap();
    assert_eq!(resolve(&c, &back, "queue"), [vip.as_str()]);
    assert_eq!(resolve(&c, &back, "worker"), [vip.as_str()]);
    assert_eq!(
        resolve(&c, &back, "store"),
        [d["ip"].as_str().unwrap().to_owned()]
    );
    let answer = get(&c, &back, "jobs").expect("http://jobs/ from a backend task");
    assert!(answer.contains("worker-1"), "{answer}");
    let answer = get(&c, &back, "store").expect("http://store/ from a backend task");
    assert!(answer.contains("db-1"), "{answer}");
    // On frontend, backend's names do not exist.
    for name in ["jobs", "queue", "store", "worker"] {
        assert!(
            resolve(&c, &front, name).is_empty(),
            "{name} resolves on frontend"
        );
    }
    assert!(get(&c, &front, "jobs").is_none());
    let _ = w;

    // An alias taken on the network, by another's alias or name: refused, nothing created.
    for (net, says) in [
        (
            "name=backend,alias=jobs",
            "jobs is already an alias of service worker",
        ),
        (
            "name=backend,alias=db",
            "db is already the name of service db",
        ),
    ] {
        let out = h1
            .meshctl(&[
                "service",
                "create",
                "--name",
                "other",
                "--process",
                "--network",
                net,
            ])
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{net}: {err}");
        assert!(service(&c, "other").is_none(), "{net}: other was created");
    }
    // The same alias on another network is another name.
    h1.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "other",
        "--process",
        "--network",
        "name=frontend,alias=jobs",
    ])
    .unwrap();

    // An update to a taken alias is refused and changes nothing.
    let out = h1
        .meshctl(&[
            "service",
            "update",
            "worker",
            "--network-rm",
            "backend",
            "--network-add",
            "name=backend,alias=store",
        ])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("store is already an alias of service db"),
        "{err}"
    );
    let spec = &service(&c, "worker").unwrap()["spec"];
    assert_eq!(spec["aliases"], serde_json::json!(["jobs", "queue"]));
    assert_eq!(spec["version"], worker["spec"]["version"]);

    // --network-rm then --network-add changes the aliases; the task keeps running.
    h1.meshctl_ok(&[
        "service",
        "update",
        "worker",
        "--network-rm",
        "backend",
        "--network-add",
        "name=backend,alias=tasks-queue",
    ])
    .unwrap();
    c.eventually(Duration::from_secs(3), "the new alias resolves", |c| {
        Ok((resolve(c, &back, "tasks-queue") == [vip.clone()]
            && resolve(c, &back, "jobs").is_empty())
        .then_some(()))
    })
    .unwrap();
    let pretty = h1
        .meshctl_ok(&["service", "inspect", "--pretty", "worker"])
        .unwrap();
    assert!(pretty.contains("backend\taliases: tasks-queue"), "{pretty}");
}
