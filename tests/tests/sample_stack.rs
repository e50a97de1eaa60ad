//! A real application's stack file, in the shape of Docker's vote/result/worker sample: a db
//! with a named volume pinned to one node (`node.role == manager` as the tutorials write it),
//! a cache published on a port the cluster picks, two front ends on fixed ports, a worker on
//! two networks. It deploys unchanged; every port answers on a node that runs no task; the
//! worker resolves names on both its networks; the db's data survives `service update --force`.

use std::{net::SocketAddr, time::Duration};

use mesh_tests::{Cluster, Host, cluster::bin, workload::http_get};
use serde_json::Value;

fn compose(db_node: &str, conf: &str) -> String {
    let w = bin("mesh-whoami");
    let w = w.to_str().unwrap();
    format!(
        r#"version: "3.8"
services:
  redis:
    command: ["{w}", "--name", "redis"]
    ports: ["80"]
    networks: [frontend]
  db:
    command: ["{w}", "--name", "db"]
    volumes:
      - db-data:/data
    configs:
      - source: db-conf
        target: {conf}
    networks: [backend]
    stop_grace_period: 5s
    deploy:
      placement:
        constraints: [node.role == manager, node.hostname == {db_node}]
  vote:
    command: ["{w}", "--name", "vote"]
    ports: ["8080:80"]
    networks: [frontend]
    depends_on: [redis]
    deploy:
      replicas: 2
  result:
    command: ["{w}", "--name", "result"]
    ports: ["8081:80"]
    networks: [backend]
    depends_on: [db]
  worker:
    command: ["{w}", "--name", "worker"]
    networks:
      frontend:
      backend:
        aliases: [jobs]
    depends_on: [db, redis]
volumes:
  db-data:
configs:
  db-conf:
    file: ./db.conf
networks:
  frontend:
    driver: overlay
    ipam:
      config: [ {{ subnet: 10.52.0.0/24 }} ]
  backend:
    driver: overlay
    ipam:
      config: [ {{ subnet: 10.53.0.0/24 }} ]
"#
    )
}

/// A running task of `service` (`meshctl ps` on each node): its host and name.
fn running_task<'c>(c: &'c Cluster, service: &str, not: Option<&str>) -> (&'c Host, String) {
    let (i, name) = c
        .eventually(
            Duration::from_secs(40),
            &format!("a running task of {service}"),
            |c| {
                for (i, h) in c.hosts().iter().enumerate() {
                    let ps: Vec<Value> = h.meshctl_json(&["ps"])?;
                    if let Some(t) = ps.iter().find(|t| {
                        t["service"] == service
                            && t["state"] == "running"
                            && not.is_none_or(|n| t["name"] != n)
                    }) {
                        return Ok(Some((i, t["name"].as_str().unwrap().to_owned())));
                    }
                }
                Ok(None)
            },
        )
        .unwrap();
    (&c.hosts()[i], name)
}

/// `sh -c SCRIPT` inside the task, as its own processes run: (status ok, stdout).
fn in_task(h: &Host, task: &str, script: &str) -> (bool, String) {
    let out = h
        .meshctl(&["exec", task, "--", "sh", "-c", script])
        .unwrap();
    let ok = out.status.success();
    let said = if ok { &out.stdout } else { &out.stderr };
    (ok, String::from_utf8_lossy(said).into_owned())
}

fn converged(c: &Cluster, name: &str, n: u64) {
    c.eventually(
        Duration::from_secs(60),
        &format!("{name} at {n}/{n}"),
        |c| {
            let s: Value = c.host(1).meshctl_json(&["service", "inspect", name])?;
            let done = s["spec"]["update_status"]["state"]
                .as_str()
                .is_none_or(|s| s == "completed");
            Ok((s["running"] == n && done).then_some(()))
        },
    )
    .unwrap();
}

#[test]
fn the_vote_apps_stack_deploys_unchanged_and_serves_from_a_node_without_tasks() {
    let mut c = Cluster::new(3).unwrap();
    c.start_agents().unwrap();
    c.external("client", 100).unwrap();
    let idle = c.host(3).node_name().to_owned();
    c.host(1)
        .meshctl_ok(&["node", "update", "--availability", "drain", &idle])
        .unwrap();
    let db_node = c.host(2).node_name().to_owned();
    let path = c.log_dir().join("vote-app.yml");
    std::fs::write(c.log_dir().join("db.conf"), "max_connections=7\n").unwrap();
    // A process task shares the host's file system: a config target of this cluster's own.
    let conf = format!("/tmp/{}-db.conf", c.name());
    std::fs::write(&path, compose(&db_node, &conf)).unwrap();
    let f = path.to_str().unwrap();
    let out = c
        .host(1)
        .meshctl(&["stack", "deploy", "-c", f, "vote"])
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    // Keys Swarm ignores warn, one line each; nothing else is said.
    assert!(stderr.contains("depends_on"), "{stderr}");
    for (service, n) in [
        ("vote_redis", 1),
        ("vote_db", 1),
        ("vote_vote", 2),
        ("vote_result", 1),
        ("vote_worker", 1),
    ] {
        converged(&c, service, n);
    }

    // The drained node runs nothing, and every published port answers there, the cache's
    // on the port the cluster chose for it.
    let on_idle: Vec<Value> = c.host(3).meshctl_json(&["ps"]).unwrap();
    assert!(
        on_idle.iter().all(|t| t["state"] != "running"),
        "{on_idle:?}"
    );
    let redis: Value = c
        .host(1)
        .meshctl_json(&["service", "inspect", "vote_redis"])
        .unwrap();
    let cache_port = redis["spec"]["ports"][0]["published"]
        .as_u64()
        .expect("a published port chosen for the cache");
    assert!((30000..=32767).contains(&cache_port), "{redis}");
    let ns = c.external_ns("client").unwrap();
    for (port, answer) in [
        (cache_port as u16, "redis\n"),
        (8080, "vote\n"),
        (8081, "result\n"),
    ] {
        let addr: SocketAddr = format!("{}:{port}", c.host(3).ip).parse().unwrap();
        let got = c
            .eventually(Duration::from_secs(10), &format!("{addr}"), |_| {
                Ok(ns.run(move || http_get(addr).ok()).unwrap())
            })
            .unwrap();
        assert_eq!(got, answer, "{addr}");
    }

    // The worker is on both networks: redis on frontend, the db (and its alias-less stack
    // name) on backend, and its own alias answers on backend.
    let (wh, worker) = running_task(&c, "vote_worker", None);
    for (name, answer) in [
        ("redis", "redis"),
        ("db", "db"),
        ("vote_db", "db"),
        ("jobs", "worker"),
    ] {
        let (ok, got) = c
            .eventually(
                Duration::from_secs(10),
                &format!("worker → {name}"),
                |_| {
                    let r = in_task(wh, &worker, &format!("curl -s --max-time 2 http://{name}/"));
                    Ok(r.0.then_some(r))
                },
            )
            .unwrap();
        assert!(ok && got.trim() == answer, "{name}: {got}");
    }
    // vote is on frontend only: the backend's names do not resolve there.
    let (vh, vote) = running_task(&c, "vote_vote", None);
    let (_, got) = in_task(vh, &vote, "getent ahostsv4 db jobs || true");
    assert_eq!(got.trim(), "", "backend names resolve on frontend");

    // The db runs where its constraints put it, writes to its volume, and after
    // `service update --force` its new task reads the data back.
    let (dh, db) = running_task(&c, "vote_db", None);
    assert_eq!(dh.node_name(), db_node);
    let (ok, said) = in_task(dh, &db, "echo ballots-42 > /data/state");
    assert!(ok, "the db writes to its volume: {said}");
    c.host(1)
        .meshctl_ok(&["service", "update", "--force", "vote_db"])
        .unwrap();
    let (dh2, db2) = running_task(&c, "vote_db", Some(&db));
    assert_eq!(dh2.node_name(), db_node);
    let (ok, got) = in_task(dh2, &db2, "cat /data/state");
    assert!(ok && got.trim() == "ballots-42", "{got}");
    // Its config is mounted in the new task too: the old task's teardown, after the new
    // task had started on the same mount points, left them in place.
    let (ok, got) = in_task(dh2, &db2, &format!("cat {conf}"));
    assert!(ok && got.trim() == "max_connections=7", "{got}");
    let vols: Vec<Value> = c.host(2).meshctl_json(&["volume", "ls"]).unwrap();
    assert!(
        vols.iter()
            .any(|v| v["name"] == "vote_db-data" && v["node"] == db_node.as_str()),
        "{vols:?}"
    );

    // stack rm removes the services and keeps the volume, as Docker does.
    c.host(1).meshctl_ok(&["stack", "rm", "vote"]).unwrap();
    c.eventually(Duration::from_secs(30), "the stack's services gone", |c| {
        let ls: Vec<Value> = c.host(2).meshctl_json(&["service", "ls"])?;
        Ok(ls.is_empty().then_some(()))
    })
    .unwrap();
    let vols: Vec<Value> = c.host(2).meshctl_json(&["volume", "ls"]).unwrap();
    assert!(vols.iter().any(|v| v["name"] == "vote_db-data"), "{vols:?}");
}
