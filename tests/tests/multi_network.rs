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
    assert!(
        pretty
            .lines()
            .any(|l| l.starts_with(&format!(" backend\tVIP: {vip}"))
                && l.ends_with("aliases: tasks-queue")),
        "{pretty}"
    );
}

/// `service create --name NAME ARGS… --process -- mesh-whoami --name NAME` from host 1.
fn create(c: &Cluster, name: &str, args: &[&str]) -> Value {
    let whoami = mesh_tests::cluster::bin("mesh-whoami");
    let mut cmd = vec!["service", "create", "--name", name];
    cmd.extend_from_slice(args);
    cmd.extend(["--process", "--", whoami.to_str().unwrap(), "--name", name]);
    c.host(1).meshctl_json(&cmd).unwrap()
}

/// A running task of `service` made from its current spec (`meshctl ps` on its node), one
/// `keep` accepts.
fn running_task(c: &Cluster, service: &str, keep: impl Fn(&Cluster, &Value) -> bool) -> Value {
    c.eventually(
        Duration::from_secs(30),
        &format!("a running task of {service}"),
        |c| {
            for h in c.hosts() {
                let ps: Vec<Value> = h.meshctl_json(&["ps"])?;
                if let Some(t) = ps
                    .into_iter()
                    .find(|t| t["service"] == service && t["state"] == "running" && keep(c, t))
                {
                    return Ok(Some(t));
                }
            }
            Ok(None)
        },
    )
    .unwrap()
}

/// The task's IPv4 addresses by interface, from the kernel (`ip -4 -o addr` in its netns).
fn interfaces(c: &Cluster, task: &Value) -> Vec<(String, String)> {
    let (_, out) = in_task(c, task, "ip -4 -o addr show");
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|w| *w == "inet")?;
            Some((f[1].to_owned(), f[i + 1].to_owned()))
        })
        .filter(|(name, _)| name.starts_with("eth"))
        .collect()
}

fn on(ifaces: &[(String, String)], name: &str, prefix: &str) -> bool {
    ifaces
        .iter()
        .any(|(n, a)| n == name && a.starts_with(prefix))
}

#[test]
fn a_task_on_two_networks_reaches_each_by_name_and_alias_and_a_one_network_task_does_not() {
    let mut c = Cluster::new(2).unwrap();
    c.start_agents().unwrap();
    c.create_network("frontend", "10.30.0.0/24").unwrap();
    c.create_network("backend", "10.31.0.0/24").unwrap();
    let api = create(&c, "api", &["--network", "name=backend,alias=db-api"]);
    let web = create(&c, "web", &["--network", "frontend"]);
    let worker = create(
        &c,
        "worker",
        &[
            "--network",
            "frontend",
            "--network",
            "name=backend,alias=jobs",
        ],
    );
    // A VIP on each network, from each network's subnet.
    let vip = |s: &Value| s["vip"].as_str().unwrap().to_owned();
    let (api_vip, web_vip) = (vip(&api), vip(&web));
    let worker_front = vip(&worker);
    let worker_back = worker["spec"]["networks"][0]["vip"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(worker_front.starts_with("10.30.0."), "{worker}");
    assert!(worker_back.starts_with("10.31.0."), "{worker}");
    assert_eq!(
        worker["spec"]["networks"][0]["aliases"],
        serde_json::json!(["jobs"])
    );

    // One interface per network in the worker's namespace, in the order given.
    let w = running_task(&c, "worker", |_, _| true);
    let ifaces = interfaces(&c, &w);
    assert!(
        on(&ifaces, "eth0", "10.30.0.") && on(&ifaces, "eth1", "10.31.0."),
        "{ifaces:?}"
    );
    let a = running_task(&c, "api", |_, _| true);
    let f = running_task(&c, "web", |_, _| true);
    let web_ifaces = interfaces(&c, &f);
    assert!(
        on(&web_ifaces, "eth0", "10.30.0.")
            && !web_ifaces.iter().any(|(_, a)| a.starts_with("10.31.")),
        "web is on frontend only: {web_ifaces:?}"
    );

    // The worker resolves and reaches a service of each network, by name and by alias.
    c.eventually(Duration::from_secs(5), "the worker resolves api", |c| {
        Ok((resolve(c, &w, "api") == [api_vip.clone()]).then_some(()))
    })
    .unwrap();
    assert_eq!(resolve(&c, &w, "db-api"), [api_vip.as_str()]);
    assert_eq!(resolve(&c, &w, "web"), [web_vip.as_str()]);
    for (name, answers) in [("api", "api"), ("db-api", "api"), ("web", "web")] {
        let got = get(&c, &w, name).unwrap_or_else(|| panic!("worker → http://{name}/"));
        assert!(got.contains(answers), "{name}: {got}");
    }
    // Each network sees the worker's VIP on it, under the names it has there.
    assert_eq!(resolve(&c, &a, "jobs"), [worker_back.as_str()]);
    assert_eq!(resolve(&c, &a, "worker"), [worker_back.as_str()]);
    assert!(get(&c, &a, "jobs").is_some_and(|g| g.contains("worker")));
    assert_eq!(resolve(&c, &f, "worker"), [worker_front.as_str()]);
    assert!(get(&c, &f, "worker").is_some_and(|g| g.contains("worker")));
    // A frontend-only task neither resolves nor reaches backend's names and addresses.
    for name in ["api", "db-api", "jobs"] {
        assert!(
            resolve(&c, &f, name).is_empty(),
            "{name} resolves on frontend"
        );
    }
    assert!(get(&c, &f, &api_vip).is_none(), "web reached api's VIP");
    let api_ip = interfaces(&c, &a)[0]
        .1
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    assert!(get(&c, &f, &api_ip).is_none(), "web reached api's task");

    // A taken alias on the network web would join: refused, nothing changes.
    let out = c
        .host(1)
        .meshctl(&[
            "service",
            "update",
            "web",
            "--network-add",
            "name=backend,alias=jobs",
        ])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("jobs is already an alias of service worker"),
        "{err}"
    );
    let spec = &service(&c, "web").unwrap()["spec"];
    assert!(spec["networks"].is_null(), "{spec}");
    assert_eq!(spec["version"], web["spec"]["version"]);

    // --network-add rolls web's task onto backend as well.
    c.host(1)
        .meshctl_ok(&["service", "update", "-d", "web", "--network-add", "backend"])
        .unwrap();
    let f2 = running_task(&c, "web", |c, t| {
        let i = interfaces(c, t);
        on(&i, "eth0", "10.30.0.") && on(&i, "eth1", "10.31.0.")
    });
    assert_ne!(f2["name"], f["name"], "the task was replaced");
    c.eventually(Duration::from_secs(5), "web now resolves api", |c| {
        Ok((resolve(c, &f2, "api") == [api_vip.clone()]).then_some(()))
    })
    .unwrap();
    assert!(get(&c, &f2, "db-api").is_some_and(|g| g.contains("api")));
}
