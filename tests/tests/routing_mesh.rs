//! The routing mesh with real agents: every node answers every published port and balances
//! across the service's tasks wherever they run; VIPs are balanced east–west; established
//! connections survive task changes.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use mesh_tests::{
    Cluster, Host,
    cluster::bin,
    workload::{RemoteSession, http_get, refused_at_once, tally, udp_ask, udp_ask_each},
};
use serde_json::Value;

/// 3 hosts with agents, network app, service web publishing 8080/tcp and 5353/udp, and an
/// external client on the underlay.
fn cluster() -> Cluster {
    let mut c = Cluster::new(3).unwrap();
    c.start_agents().unwrap();
    c.external("client", 100).unwrap();
    c.create_network("app", "10.10.0.0/24").unwrap();
    c.create_service("web", "app", &["-p", "8080:80", "-p", "5353:53/udp"])
        .unwrap();
    c
}

fn task(h: &Host, name: &str) -> Value {
    h.run_whoami("app", Some("web"), name, &["--udp", "53"])
        .unwrap()
}

/// Waits until every node's load balancer has `n` active backends for web.
fn wait_backends(c: &Cluster, n: usize) {
    c.eventually(
        Duration::from_secs(3),
        "every node programs the backends",
        |c| {
            for h in c.hosts() {
                let s: Value = h.meshctl_json(&["service", "inspect", "web"])?;
                let active = s["dataplane"]["backends"]
                    .as_array()
                    .map_or(0, |b| b.iter().filter(|b| b["state"] == "active").count());
                if active != n {
                    anyhow::bail!(
                        "{} has {active} active backends: {}",
                        h.node_name(),
                        s["dataplane"]
                    );
                }
            }
            Ok(Some(()))
        },
    )
    .unwrap();
}

/// Tasks web-1 on host 1 and web-2 on host 2, and the client's keep-alive connection to
/// host 3's published 8080 (a node without a task): the address, the session and the task
/// that answers it.
fn session_through_host3(c: &Cluster) -> (SocketAddr, RemoteSession, String) {
    task(c.host(1), "web-1");
    task(c.host(2), "web-2");
    wait_backends(c, 2);
    let a = addr(c.host(3), 8080);
    let session = RemoteSession::open(c.external_ns("client").unwrap(), a);
    let on = session.get();
    (a, session, on)
}

fn addr(h: &Host, port: u16) -> SocketAddr {
    format!("{}:{port}", h.ip).parse().unwrap()
}

fn client<T: Send + 'static>(c: &Cluster, f: impl FnOnce() -> T + Send + 'static) -> T {
    c.external_ns("client").unwrap().run(f).unwrap()
}

fn assert_even(t: &BTreeMap<String, usize>, names: &[&str], each: usize) {
    assert_eq!(
        t.keys().map(String::as_str).collect::<Vec<_>>(),
        names,
        "{t:?}"
    );
    for (name, n) in t {
        assert!(n.abs_diff(each) <= 1, "{name} got {n}, not {each}±1: {t:?}");
    }
}

#[test]
fn every_node_balances_its_published_ports_over_all_tasks() {
    let c = cluster();
    // Tasks on hosts 1 and 2, none on host 3.
    task(c.host(1), "web-1");
    task(c.host(1), "web-2");
    task(c.host(2), "web-3");
    wait_backends(&c, 3);
    for h in c.hosts() {
        let a = addr(h, 8080);
        let answers = client(&c, move || {
            (0..30)
                .map(|_| http_get(a).unwrap().trim().to_owned())
                .collect::<Vec<_>>()
        });
        assert_even(&tally(answers), &["web-1", "web-2", "web-3"], 10);
        let a = addr(h, 5353);
        // Each its own flow, as the counters are checked against.
        let answers = client(&c, move || {
            udp_ask_each(a, 30)
                .unwrap()
                .iter()
                .map(|s| s.trim().to_owned())
                .collect::<Vec<_>>()
        });
        assert_even(&tally(answers), &["web-1", "web-2", "web-3"], 10);
    }
    // The counters say the same.
    let s: Value = c
        .host(3)
        .meshctl_json(&["service", "inspect", "web"])
        .unwrap();
    assert!(
        s["dataplane"]["counters"]["flows"].as_u64().unwrap() >= 60,
        "{s}"
    );
    let pretty = c
        .host(3)
        .meshctl_ok(&["service", "inspect", "web", "--pretty"])
        .unwrap();
    assert!(pretty.contains("FLOWS"), "{pretty}");
}

#[test]
fn an_established_connection_survives_task_changes_and_removed_tasks_get_no_new_ones() {
    let c = cluster();
    let (a, session, on) = session_through_host3(&c);
    let (other, other_host) = if on == "web-1" {
        ("web-2", 2)
    } else {
        ("web-1", 1)
    };

    task(c.host(3), "web-3");
    wait_backends(&c, 3);
    assert_eq!(session.get(), on, "adding a task moved the connection");

    c.host(other_host).meshctl_ok(&["rm", other]).unwrap();
    wait_backends(&c, 2);
    assert_eq!(
        session.get(),
        on,
        "removing another task moved the connection"
    );
    let answers = client(&c, move || {
        (0..6)
            .map(|_| http_get(a).unwrap().trim().to_owned())
            .collect::<Vec<_>>()
    });
    assert!(
        !answers.iter().any(|x| x == other),
        "a removed task got new connections: {answers:?}"
    );

    // Draining the connection's node: the connection stays, new ones go elsewhere.
    let on_host = if on == "web-2" { c.host(2) } else { c.host(1) };
    c.host(3)
        .meshctl_ok(&[
            "node",
            "update",
            "--availability",
            "drain",
            on_host.node_name(),
        ])
        .unwrap();
    // The removed task may still be listed as draining (its drain is confirmed, then it
    // stops), so "some backend drains" is not enough: only web-3 may be left active.
    c.eventually(Duration::from_secs(3), "host3 drains the node", |c| {
        let s: Value = c.host(3).meshctl_json(&["service", "inspect", "web"])?;
        let backends = s["dataplane"]["backends"].as_array().unwrap();
        let active = backends.iter().filter(|b| b["state"] == "active").count();
        let draining = backends.iter().any(|b| b["state"] == "draining");
        Ok((active == 1 && draining).then_some(()))
    })
    .unwrap();
    assert_eq!(session.get(), on, "draining cut the established connection");
    let answers = client(&c, move || {
        (0..4)
            .map(|_| http_get(a).unwrap().trim().to_owned())
            .collect::<Vec<_>>()
    });
    assert!(answers.iter().all(|x| x == "web-3"), "{answers:?}");
}

#[test]
fn a_port_that_stops_being_published_lets_its_connections_finish_and_refuses_new_ones() {
    let c = cluster();
    let (a, session, on) = session_through_host3(&c);

    c.host(1)
        .meshctl_ok(&["service", "update", "web", "--publish-rm", "8080"])
        .unwrap();
    let ls = c.host(3).meshctl_ok(&["service", "ls"]).unwrap();
    assert!(!ls.contains("8080"), "{ls}");
    // Refused at once (an RST or ICMP error within 100 ms), not a SYN left to time out; and
    // from then on, every time.
    c.eventually(Duration::from_secs(3), "host3 refuses 8080", |c| {
        client(c, move || refused_at_once(a)).map(Some)
    })
    .unwrap();
    for _ in 0..5 {
        client(&c, move || refused_at_once(a)).unwrap();
    }
    assert_eq!(session.get(), on, "the established connection was cut");
    assert_eq!(session.get(), on);
    // The other published port is untouched.
    let u = addr(c.host(3), 5353);
    assert!(client(&c, move || udp_ask(u)).is_ok());

    // And a bad removal says what is wrong and changes nothing.
    let out = c
        .host(1)
        .meshctl(&["service", "update", "web", "--publish-rm", "8080"])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not publish 8080/tcp"),
        "{out:?}"
    );
    c.host(1)
        .meshctl_ok(&["service", "update", "web", "--publish-add", "8080:80"])
        .unwrap();
    c.eventually(Duration::from_secs(3), "host3 publishes 8080 again", |c| {
        Ok(client(c, move || http_get(a).ok()))
    })
    .unwrap();
}

#[test]
fn a_bridge_deleted_under_a_live_connection_comes_back_and_the_connection_goes_on() {
    let c = cluster();
    let (a, session, on) = session_through_host3(&c);
    let ifindex = |c: &Cluster| -> anyhow::Result<Option<String>> {
        let out = c
            .host(3)
            .ns
            .sh("ip -o link show mbr4096 2>/dev/null || true")?;
        Ok(out
            .split(':')
            .next()
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .map(str::to_owned))
    };
    let before = ifindex(&c).unwrap().expect("host3's bridge of app");

    // Someone deletes the network's bridge on the node the connection came in through.
    c.host(3).ns.sh("ip link del mbr4096").unwrap();
    c.eventually(
        Duration::from_secs(10),
        "host3 re-creates its bridge",
        |c| Ok(ifindex(c)?.filter(|now| *now != before)),
    )
    .unwrap();
    c.eventually(
        Duration::from_secs(5),
        "new connections through host3",
        |c| Ok(client(c, move || http_get(a).ok())),
    )
    .unwrap();
    // The flow leaves by the bridge as it is now, not by the ifindex it started with.
    assert_eq!(session.get(), on, "the connection did not survive");
    assert_eq!(session.get(), on);
}

#[test]
fn tasks_reach_the_vip_and_the_node_reaches_its_own_published_port() {
    let c = cluster();
    task(c.host(1), "web-1");
    task(c.host(2), "web-2");
    task(c.host(3), "web-3");
    wait_backends(&c, 3);
    let vip = c
        .host(1)
        .meshctl_json::<Value>(&["service", "inspect", "web"])
        .unwrap()["vip"]
        .as_str()
        .unwrap()
        .to_owned();
    // A plain task (no service) on app: connect() to the VIP is balanced by the socket hook.
    let who = bin("mesh-whoami").display().to_string();
    c.host(2)
        .meshctl_ok(&[
            "run",
            "--network",
            "app",
            "--name",
            "cli",
            "--",
            &who,
            "--no-http",
            "--udp",
            "9",
        ])
        .unwrap();
    let mut answers = Vec::new();
    for _ in 0..9 {
        let out = c
            .host(2)
            .meshctl_ok(&[
                "exec",
                "cli",
                "--",
                "curl",
                "-s",
                "--max-time",
                "3",
                &format!("http://{vip}:80/"),
            ])
            .unwrap();
        answers.push(out.trim().to_owned());
    }
    assert_even(&tally(answers), &["web-1", "web-2", "web-3"], 3);

    // Host-local clients: a process of host1 (in the node's cgroup) on 127.0.0.1 and on the
    // node's own address.
    let probe = bin("mesh-probe").display().to_string();
    for target in [
        "127.0.0.1:8080".to_owned(),
        format!("{}:8080", c.host(1).ip),
    ] {
        let out = c
            .host(1)
            .ns
            .command(&probe)
            .args([
                "--cgroup",
                c.host(1).cgroup().to_str().unwrap(),
                "tcp",
                &target,
                "6",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let names: Vec<String> = text
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
            .collect();
        assert_eq!(names.len(), 6, "{target}: {text}");
        assert_even(&tally(names), &["web-1", "web-2", "web-3"], 2);
    }
}
