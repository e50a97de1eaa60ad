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

/// The vote app's shape: `stack deploy` of a compose file whose worker lists frontend and
/// backend, and whose db has an alias on backend.
#[test]
fn a_stack_worker_on_two_networks_reaches_both_and_a_redeploy_keeps_its_task() {
    let mut c = Cluster::new(2).unwrap();
    c.start_agents().unwrap();
    let w = mesh_tests::cluster::bin("mesh-whoami");
    let w = w.to_str().unwrap();
    let text = format!(
        r#"version: "3.8"
services:
  redis:
    command: ["{w}", "--name", "redis"]
    networks: [frontend]
  db:
    command: ["{w}", "--name", "db"]
    networks:
      backend:
        aliases: [postgres]
  worker:
    command: ["{w}", "--name", "worker"]
    networks: [frontend, backend]
  vote:
    command: ["{w}", "--name", "vote"]
    networks: [frontend]
    depends_on: [redis]
networks:
  frontend:
    driver: overlay
    ipam:
      config: [ {{ subnet: 10.40.0.0/24 }} ]
  backend:
    driver: overlay
    ipam:
      config: [ {{ subnet: 10.41.0.0/24 }} ]
"#
    );
    let path = c.log_dir().join("vote.yml");
    std::fs::write(&path, text).unwrap();
    let f = path.to_str().unwrap();
    c.host(1)
        .meshctl_ok(&["stack", "deploy", "-c", f, "vote"])
        .unwrap();

    let worker = running_task(&c, "vote_worker", |_, _| true);
    let ifaces = interfaces(&c, &worker);
    assert!(
        on(&ifaces, "eth0", "10.40.0.") && on(&ifaces, "eth1", "10.41.0."),
        "{ifaces:?}"
    );
    let spec = &service(&c, "vote_worker").unwrap()["spec"];
    assert_eq!(spec["network"], "vote_frontend", "{spec}");
    assert_eq!(spec["networks"][0]["target"], "vote_backend", "{spec}");
    running_task(&c, "vote_redis", |_, _| true);
    running_task(&c, "vote_db", |_, _| true);
    // The worker reaches redis on frontend and the db on backend, by the compose names and
    // the db's alias.
    c.eventually(Duration::from_secs(10), "the worker reaches db", |c| {
        Ok(get(c, &worker, "db")
            .is_some_and(|g| g.contains("db"))
            .then_some(()))
    })
    .unwrap();
    for (name, answers) in [("postgres", "db"), ("redis", "redis"), ("vote_db", "db")] {
        let got = get(&c, &worker, name).unwrap_or_else(|| panic!("worker → http://{name}/"));
        assert!(got.contains(answers), "{name}: {got}");
    }
    // vote is on frontend only: backend's names do not resolve there.
    let vote = running_task(&c, "vote_vote", |_, _| true);
    assert!(get(&c, &vote, "redis").is_some_and(|g| g.contains("redis")));
    for name in ["db", "postgres", "vote_db"] {
        assert!(
            resolve(&c, &vote, name).is_empty(),
            "{name} resolves on frontend"
        );
    }

    // The same file again changes nothing: the worker keeps its task and its VIPs.
    c.host(1)
        .meshctl_ok(&["stack", "deploy", "-c", f, "vote"])
        .unwrap();
    let again = &service(&c, "vote_worker").unwrap()["spec"];
    assert_eq!(again["version"], spec["version"], "{again}");
    assert_eq!(again["networks"], spec["networks"], "{again}");
    std::thread::sleep(Duration::from_secs(2));
    let still = running_task(&c, "vote_worker", |_, _| true);
    assert_eq!(
        still["name"], worker["name"],
        "the worker's task was not replaced"
    );
}

/// A task started by hand may join a service on any of its networks (a container attached
/// by CNI too: the same check): it is the service's backend there, under its names there.
#[test]
fn a_task_started_by_hand_joins_its_service_on_a_further_network() {
    let mut c = Cluster::new(2).unwrap();
    c.start_agents().unwrap();
    c.create_network("frontend", "10.50.0.0/24").unwrap();
    c.create_network("backend", "10.51.0.0/24").unwrap();
    c.create_network("other", "10.52.0.0/24").unwrap();
    let h1 = c.host(1);
    let hub: Value = h1
        .meshctl_json(&[
            "service",
            "create",
            "--name",
            "hub",
            "--process",
            "--network",
            "frontend",
            "--network",
            "name=backend,alias=hq",
        ])
        .unwrap();
    let back_vip = hub["spec"]["networks"][0]["vip"]
        .as_str()
        .unwrap()
        .to_owned();
    let t: Value = c
        .host(2)
        .run_whoami("backend", Some("hub"), "hub-1", &[])
        .unwrap();
    assert!(t["ip"].as_str().unwrap().starts_with("10.51.0."), "{t}");
    let back: Value = h1.run_whoami("backend", None, "back", &[]).unwrap();
    c.eventually(Duration::from_secs(5), "hq reaches hub-1", |c| {
        Ok(get(c, &back, "hq")
            .is_some_and(|g| g.contains("hub-1"))
            .then_some(()))
    })
    .unwrap();
    assert_eq!(resolve(&c, &back, "hub"), [back_vip.as_str()]);
    assert_eq!(resolve(&c, &back, "hq"), [back_vip.as_str()]);
    c.eventually(Duration::from_secs(5), "hub counts its task", |c| {
        Ok((service(c, "hub").is_some_and(|s| s["running"] == 1)).then_some(()))
    })
    .unwrap();

    // A network the service is not on: refused, no task.
    let whoami = mesh_tests::cluster::bin("mesh-whoami");
    let out = h1
        .meshctl(&[
            "run",
            "--network",
            "other",
            "--service",
            "hub",
            "--name",
            "hub-2",
            "--",
            whoami.to_str().unwrap(),
        ])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(
                "service hub is on networks frontend, backend, not other: run its tasks on \
                 frontend or backend"
            ),
        "{err}"
    );
    let ps: Vec<Value> = h1.meshctl_json(&["ps"]).unwrap();
    assert!(!ps.iter().any(|t| t["name"] == "hub-2"), "{ps:?}");
}
