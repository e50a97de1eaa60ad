//! The README's `service update --publish-add/--publish-rm` claim, end to end ("What a task
//! sees on a published port"): neither restarts the tasks (same task IDs, same PIDs), the
//! added port answers on every node, the removed one is refused at once on every node while
//! a connection already open on it finishes, and the port that stays keeps serving through
//! both updates with no failed request.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use mesh_tests::{
    Cluster, Host,
    availability::Probe,
    cluster::bin,
    workload::{RemoteSession, http_get, refused_at_once},
};
use serde_json::Value;

/// Every running task of `service` on every host: its local name (`web.<slot>.<task ID>`)
/// → its PID.
fn tasks(c: &Cluster, service: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for h in c.hosts() {
        let ps: Vec<Value> = h.meshctl_json(&["ps"]).unwrap();
        for t in ps
            .iter()
            .filter(|t| t["service"] == service && t["state"] == "running")
        {
            out.insert(
                t["name"].as_str().unwrap().to_owned(),
                t["pid"].as_u64().unwrap_or_else(|| panic!("no pid in {t}")),
            );
        }
    }
    out
}

fn addr(h: &Host, port: u16) -> SocketAddr {
    format!("{}:{port}", h.ip).parse().unwrap()
}

/// The published ports `service inspect` reports on `h`, as `published/protocol`.
fn published(h: &Host, service: &str) -> Vec<String> {
    let s: Value = h.meshctl_json(&["service", "inspect", service]).unwrap();
    let mut ports: Vec<String> = s["spec"]["ports"]
        .as_array()
        .unwrap_or_else(|| panic!("no spec.ports in {s}"))
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["published"],
                p["protocol"].as_str().unwrap_or("tcp")
            )
        })
        .collect();
    ports.sort();
    ports
}

#[test]
fn publish_add_and_rm_change_ports_without_restarting_tasks() {
    let mut c = Cluster::new(2).unwrap();
    c.start_agents().unwrap();
    c.external("client", 100).unwrap();
    let whoami = bin("mesh-whoami");
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "web",
            "--replicas",
            "2",
            "-p",
            "8080:80",
            "--",
            whoami.to_str().unwrap(),
        ])
        .unwrap();
    c.eventually(
        Duration::from_secs(20),
        "web 2/2 answering on both nodes",
        |c| {
            let n = tasks(c, "web").len();
            let answers = c
                .external_ns("client")
                .unwrap()
                .run({
                    let a = [addr(c.host(1), 8080), addr(c.host(2), 8080)];
                    move || a.iter().all(|a| http_get(*a).is_ok())
                })
                .unwrap();
            Ok((n == 2 && answers).then_some(()))
        },
    )
    .unwrap();
    let before = tasks(&c, "web");
    let client = c.external_ns("client").unwrap();

    // --publish-add while 8080 is under load.
    let probe = Probe::start(client, addr(c.host(2), 8080)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    c.host(1)
        .meshctl_ok(&["service", "update", "web", "--publish-add", "9090:80"])
        .unwrap();
    c.eventually(Duration::from_secs(10), "9090 answers on both nodes", |c| {
        let a = [addr(c.host(1), 9090), addr(c.host(2), 9090)];
        let ok = client
            .run(move || a.iter().all(|a| http_get(*a).is_ok()))
            .unwrap();
        Ok(ok.then_some(()))
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    probe.finish().assert_available(
        "8080 during --publish-add 9090:80",
        Duration::from_millis(500),
    );
    for h in c.hosts() {
        assert_eq!(
            published(h, "web"),
            ["8080/tcp", "9090/tcp"],
            "host{}",
            h.index
        );
    }
    assert_eq!(tasks(&c, "web"), before, "--publish-add restarted no task");

    // --publish-rm 8080 while 9090 is under load and a connection to 8080 is open.
    let held = RemoteSession::open(client, addr(c.host(1), 8080));
    held.get();
    let probe = Probe::start(client, addr(c.host(2), 9090)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    c.host(2)
        .meshctl_ok(&["service", "update", "web", "--publish-rm", "8080"])
        .unwrap();
    for h in c.hosts() {
        let a = addr(h, 8080);
        c.eventually(
            Duration::from_secs(10),
            &format!("8080 refused at once on host{}", h.index),
            |_| Ok(client.run(move || refused_at_once(a).ok()).unwrap()),
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    probe
        .finish()
        .assert_available("9090 during --publish-rm 8080", Duration::from_millis(500));
    // Once refused, every new connection is: a few more, on both nodes.
    for h in c.hosts() {
        let a = addr(h, 8080);
        for _ in 0..5 {
            client
                .run(move || refused_at_once(a))
                .unwrap()
                .unwrap_or_else(|e| panic!("host{}: {e}", h.index));
        }
    }
    // The connection opened before the removal still finishes its requests.
    for _ in 0..3 {
        held.get();
    }
    for h in c.hosts() {
        assert_eq!(published(h, "web"), ["9090/tcp"], "host{}", h.index);
    }
    assert_eq!(tasks(&c, "web"), before, "--publish-rm restarted no task");
    let ls = c.host(1).meshctl_ok(&["service", "ls"]).unwrap();
    assert!(
        ls.contains("*:9090->80/tcp") && !ls.contains(":8080->"),
        "{ls}"
    );
}
