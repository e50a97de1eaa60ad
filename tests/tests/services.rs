//! Services with a desired state, the way the Swarm tutorials use them: create with
//! replicas, scale, global mode, constraints, drain, and the cluster healing itself when a
//! task or a node dies. Real agents on a namespace cluster; the checks are what a user sees
//! (`service ls`, `service ps`, curl answers) and the load balancers underneath.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use mesh_tests::{
    Cluster, Host,
    availability::Probe,
    cluster::bin,
    workload::{http_get, refused_at_once, tally},
};
use serde_json::Value;

/// `n` hosts with agents and an external client on the underlay.
fn cluster(n: usize) -> Cluster {
    let mut c = Cluster::new(n).unwrap();
    c.start_agents().unwrap();
    c.external("client", 100).unwrap();
    c
}

/// `meshctl service create NAME ARGS… -- mesh-whoami` from host1 (whoami answers with its
/// hostname, `NAME.<slot>`).
fn create(c: &Cluster, name: &str, args: &[&str]) -> Value {
    let whoami = bin("mesh-whoami");
    let mut cmd = vec!["service", "create", name];
    cmd.extend_from_slice(args);
    cmd.extend(["--", whoami.to_str().unwrap()]);
    c.host(1).meshctl_json(&cmd).unwrap()
}

fn service(h: &Host, name: &str) -> Value {
    h.meshctl_json(&["service", "inspect", name]).unwrap()
}

fn ps(h: &Host, name: &str) -> Vec<Value> {
    h.meshctl_json(&["service", "ps", name]).unwrap()
}

/// Running tasks (current rows of `service ps`) by node.
fn running_by_node(h: &Host, name: &str) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for r in ps(h, name) {
        if !r["history"].as_bool().unwrap() && r["state"] == "Running" && r["desired"] == "Running"
        {
            *by.entry(r["node"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    by
}

/// Waits until every host says `running/desired` and each host's load balancer has
/// `desired` active backends for the service.
fn converged(c: &Cluster, name: &str, desired: usize, timeout: Duration) {
    c.eventually(
        timeout,
        &format!("{name} at {desired}/{desired} everywhere"),
        |c| {
            for h in c.hosts().iter().filter(|h| h.agent_pid().is_some()) {
                let s = service(h, name);
                if s["running"] != desired || s["desired"] != desired {
                    anyhow::bail!("{} says {}/{}", h.node_name(), s["running"], s["desired"]);
                }
                let active = s["dataplane"]["backends"]
                    .as_array()
                    .map_or(0, |b| b.iter().filter(|b| b["state"] == "active").count());
                if active != desired {
                    anyhow::bail!("{} balances over {active} backends", h.node_name());
                }
            }
            Ok(Some(()))
        },
    )
    .unwrap();
}

fn addr(h: &Host, port: u16) -> SocketAddr {
    format!("{}:{port}", h.ip).parse().unwrap()
}

fn curl_many(c: &Cluster, h: &Host, port: u16, n: usize) -> BTreeMap<String, usize> {
    let a = addr(h, port);
    let answers = c
        .external_ns("client")
        .unwrap()
        .run(move || {
            (0..n)
                .map(|_| http_get(a).unwrap().trim().to_owned())
                .collect::<Vec<_>>()
        })
        .unwrap();
    tally(answers)
}

#[test]
fn replicas_spread_one_per_node_and_every_node_balances_over_them() {
    let c = cluster(4);
    // The seed's spelling: --name, the long publish syntax, no --network.
    let whoami = bin("mesh-whoami");
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "--name",
            "web",
            "--publish",
            "published=8080,target=80",
            "--replicas",
            "3",
            "--",
            whoami.to_str().unwrap(),
        ])
        .unwrap();
    converged(&c, "web", 3, Duration::from_secs(10));
    let by_node = running_by_node(c.host(2), "web");
    assert_eq!(by_node.len(), 3, "one task per node: {by_node:?}");
    assert!(by_node.values().all(|n| *n == 1), "{by_node:?}");
    let s = service(c.host(3), "web");
    assert_eq!(s["network"], "ingress", "the default network");

    // Round robin from every node, including the one that runs no task.
    for h in c.hosts() {
        let t = curl_many(&c, h, 8080, 30);
        assert_eq!(t.len(), 3, "{} answered from {t:?}", h.node_name());
        assert!(t.values().all(|n| n.abs_diff(10) <= 1), "{t:?}");
        assert!(t.keys().all(|k| k.starts_with("web.")), "{t:?}");
    }

    let ls = c.host(4).meshctl_ok(&["service", "ls"]).unwrap();
    assert!(ls.contains("replicated") && ls.contains("3/3"), "{ls}");
    assert!(ls.contains("*:8080->80/tcp"), "{ls}");
    let table = c.host(4).meshctl_ok(&["service", "ps", "web"]).unwrap();
    for slot in 1..=3 {
        assert!(table.contains(&format!("web.{slot} ")), "{table}");
    }
    assert!(table.contains("Running"), "{table}");
}

#[test]
fn scale_up_and_down_keeps_running_tasks_where_they_are() {
    let c = cluster(3);
    create(&c, "web", &["--replicas", "3", "-p", "8080:80"]);
    converged(&c, "web", 3, Duration::from_secs(10));
    let before: Vec<Value> = ps(c.host(1), "web");
    let ids = |rows: &[Value]| -> BTreeMap<String, String> {
        rows.iter()
            .filter(|r| r["state"] == "Running" && r["desired"] == "Running")
            .map(|r| {
                (
                    r["name"].as_str().unwrap().into(),
                    r["id"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    let first = ids(&before);

    let out = c
        .host(2)
        .meshctl_ok(&["service", "scale", "web=5"])
        .unwrap();
    assert!(out.contains("web scaled to 5"), "{out}");
    assert!(out.contains("verify: Service web converged"), "{out}");
    converged(&c, "web", 5, Duration::from_secs(10));
    let by_node = running_by_node(c.host(3), "web");
    let mut counts: Vec<usize> = by_node.values().copied().collect();
    counts.sort();
    assert_eq!(counts, vec![1, 2, 2], "spread 2/2/1: {by_node:?}");
    let after = ids(&ps(c.host(1), "web"));
    for (slot, id) in &first {
        assert_eq!(after.get(slot), Some(id), "scaling up moved {slot}");
    }
    assert_eq!(curl_many(&c, c.host(3), 8080, 25).len(), 5);

    c.host(3)
        .meshctl_ok(&["service", "scale", "web=1", "--detach"])
        .unwrap();
    converged(&c, "web", 1, Duration::from_secs(10));
    let after = ids(&ps(c.host(1), "web"));
    assert_eq!(after.keys().collect::<Vec<_>>(), vec!["web.1"]);
    assert_eq!(after["web.1"], first["web.1"], "slot 1 kept its task");
    let t = curl_many(&c, c.host(2), 8080, 5);
    assert_eq!(t.keys().collect::<Vec<_>>(), vec!["web.1"], "{t:?}");
}

#[test]
fn bad_service_commands_say_how_to_fix_them_and_change_nothing() {
    let c = cluster(1);
    let h = c.host(1);
    let whoami = bin("mesh-whoami");
    let w = whoami.to_str().unwrap();
    let fails = |args: &[&str], says: &str| {
        let out = h.meshctl(args).unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    };
    fails(
        &[
            "service",
            "create",
            "m",
            "--mode",
            "global",
            "--replicas",
            "3",
            "--",
            w,
        ],
        "replicas can only be used with replicated or replicated-job mode",
    );
    fails(
        &[
            "service",
            "create",
            "m",
            "--constraint",
            "node.labels.env=production",
            "--",
            w,
        ],
        "FIELD==VALUE",
    );
    fails(
        &[
            "service",
            "create",
            "m",
            "--constraint",
            "node.labels.==x",
            "--",
            w,
        ],
        "no label key",
    );
    fails(
        &[
            "service",
            "create",
            "m",
            "--constraint",
            "node.colour==red",
            "--",
            w,
        ],
        "unknown constraint field",
    );
    fails(
        &["service", "create", "m", "--replicas", "-2", "--", w],
        "from 0 to",
    );
    fails(
        &["service", "create", "m", "--replicas", "99999999", "--", w],
        "more than mesh allows",
    );
    fails(&["service", "create", "m", "--replicas", "2"], "no command");
    // Ports the agents themselves use answer on every node too: not publishable.
    fails(
        &["service", "create", "m", "-p", "4789:80/udp", "--", w],
        "carries the overlay (VXLAN)",
    );
    // The harness runs agents on gossip's default port.
    fails(
        &["service", "create", "m", "-p", "7946:80/udp", "--", w],
        "is used by gossip on node",
    );
    // Nothing of the above exists.
    let ls: Vec<Value> = h.meshctl_json(&["service", "ls"]).unwrap();
    assert!(ls.is_empty(), "{ls:?}");

    create(&c, "web", &["--replicas", "1"]);
    create(&c, "mon", &["--mode", "global"]);
    fails(&["service", "scale", "mon=2"], "is global");
    fails(
        &["service", "scale", "web=3", "nope=2"],
        "no service named nope",
    );
    fails(&["service", "scale", "web"], "SERVICE=REPLICAS");
    fails(&["service", "update", "web"], "nothing to update");
    // The failed scale applied nothing, not even web's part.
    let s = service(h, "web");
    assert_eq!(s["spec"]["mode"]["replicated"]["replicas"], 1, "{s}");
}

#[test]
fn a_killed_task_is_restarted_with_its_history() {
    let c = cluster(2);
    create(
        &c,
        "web",
        &["--replicas", "2", "--restart-delay", "1s", "-p", "8080:80"],
    );
    converged(&c, "web", 2, Duration::from_secs(10));
    let rows = ps(c.host(1), "web");
    let victim = rows
        .iter()
        .find(|r| r["name"] == "web.1" && r["state"] == "Running")
        .unwrap()
        .clone();
    let node = victim["node"].as_str().unwrap();
    let h = c.hosts().iter().find(|h| h.node_name() == node).unwrap();
    // Kill the task's process the way a crash would.
    let local: Vec<Value> = h.meshctl_json(&["ps"]).unwrap();
    let pid = local
        .iter()
        .find(|t| {
            t["name"]
                .as_str()
                .unwrap()
                .ends_with(victim["id"].as_str().unwrap())
        })
        .and_then(|t| t["pid"].as_u64())
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    c.eventually(Duration::from_secs(10), "web.1 restarted", |c| {
        let rows = ps(c.host(2), "web");
        let current: Vec<&Value> = rows
            .iter()
            .filter(|r| r["name"] == "web.1" && !r["history"].as_bool().unwrap())
            .collect();
        let old: Vec<&Value> = rows
            .iter()
            .filter(|r| r["name"] == "web.1" && r["history"].as_bool().unwrap())
            .collect();
        Ok((current.len() == 1
            && current[0]["state"] == "Running"
            && current[0]["id"] != victim["id"]
            && old
                .iter()
                .any(|r| r["id"] == victim["id"] && r["state"] == "Failed"))
        .then_some(()))
    })
    .unwrap();
    converged(&c, "web", 2, Duration::from_secs(5));
    let table = c.host(1).meshctl_ok(&["service", "ps", "web"]).unwrap();
    assert!(table.contains("\\_ web.1"), "{table}");
    assert!(table.contains("killed by signal 9"), "{table}");
}

#[test]
fn global_services_follow_nodes_and_labels() {
    let mut c = Cluster::new(5).unwrap();
    for i in 1..=4 {
        c.host_mut(i).start_agent(&[]).unwrap();
    }
    create(&c, "mon", &["--mode", "global"]);
    converged(&c, "mon", 4, Duration::from_secs(10));
    let by_node = running_by_node(c.host(1), "mon");
    assert_eq!(by_node.len(), 4, "{by_node:?}");

    // A fifth node joins and gets its task.
    c.host_mut(5).start_agent(&[]).unwrap();
    converged(&c, "mon", 5, Duration::from_secs(10));

    // A constrained one follows a label.
    let h2 = c.host(2).node_name().to_owned();
    create(
        &c,
        "prod",
        &[
            "--mode",
            "global",
            "--constraint",
            "node.labels.env==production",
        ],
    );
    c.eventually(Duration::from_secs(5), "prod pending with a reason", |c| {
        let s = service(c.host(1), "prod");
        Ok((s["desired"] == 0).then_some(()))
    })
    .unwrap();
    c.host(1)
        .meshctl_ok(&["node", "update", "--label-add", "env=production", &h2])
        .unwrap();
    converged(&c, "prod", 1, Duration::from_secs(10));
    assert_eq!(
        running_by_node(c.host(3), "prod")
            .keys()
            .collect::<Vec<_>>(),
        vec![&h2]
    );
    c.host(1)
        .meshctl_ok(&["node", "update", "--label-rm", "env", &h2])
        .unwrap();
    c.eventually(Duration::from_secs(10), "prod stopped on h2", |c| {
        Ok(running_by_node(c.host(1), "prod").is_empty().then_some(()))
    })
    .unwrap();
}

#[test]
fn an_unsatisfiable_constraint_leaves_tasks_pending_with_the_reason() {
    let c = cluster(3);
    create(
        &c,
        "db",
        &[
            "--replicas",
            "2",
            "--constraint",
            "node.labels.env==production",
            "-d",
        ],
    );
    let rows = c
        .eventually(Duration::from_secs(5), "pending rows", |c| {
            let rows = ps(c.host(2), "db");
            Ok((rows.len() == 2 && rows.iter().all(|r| r["state"] == "Pending")).then_some(rows))
        })
        .unwrap();
    assert_eq!(
        rows[0]["error"],
        "no suitable node: 0 of 3 nodes match node.labels.env==production"
    );
    let h3 = c.host(3).node_name().to_owned();
    c.host(1)
        .meshctl_ok(&["node", "update", "--label-add", "env=production", &h3])
        .unwrap();
    c.eventually(Duration::from_secs(10), "db running on h3", |c| {
        let by = running_by_node(c.host(1), "db");
        Ok((by.get(&h3) == Some(&2)).then_some(()))
    })
    .unwrap();
}

#[test]
fn a_drained_node_hands_its_tasks_over_and_nothing_moves_back() {
    let c = cluster(3);
    create(&c, "web", &["--replicas", "3", "-p", "8080:80"]);
    converged(&c, "web", 3, Duration::from_secs(10));
    let h2 = c.host(2).node_name().to_owned();
    let client = Probe::start(c.external_ns("client").unwrap(), addr(c.host(1), 8080)).unwrap();
    c.host(1)
        .meshctl_ok(&["node", "update", "--availability", "drain", &h2])
        .unwrap();
    c.eventually(Duration::from_secs(10), "h2 runs nothing", |c| {
        let by = running_by_node(c.host(3), "web");
        Ok((!by.contains_key(&h2) && by.values().sum::<usize>() == 3).then_some(()))
    })
    .unwrap();
    converged(&c, "web", 3, Duration::from_secs(10));
    let before = running_by_node(c.host(1), "web");
    c.host(1)
        .meshctl_ok(&["node", "update", "--availability", "active", &h2])
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        running_by_node(c.host(1), "web"),
        before,
        "activating moved tasks back"
    );
    // A drain replaces h2's task elsewhere while the others serve; the drained task leaves
    // the load balancers before it stops, so nothing should stall for half a SYN
    // retransmit (1 s). Measured: gaps ≤ 25 ms.
    client
        .finish()
        .assert_available("during the drain", Duration::from_millis(500));

    // `update --force` re-spreads.
    c.host(1)
        .meshctl_ok(&["service", "update", "--force", "web"])
        .unwrap();
    c.eventually(Duration::from_secs(20), "one per node again", |c| {
        let by = running_by_node(c.host(1), "web");
        Ok((by.len() == 3 && by.values().all(|n| *n == 1)).then_some(()))
    })
    .unwrap();
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

/// `Ready` or `Down`: how host `h` sees node `of`.
fn node_status(h: &Host, of: &str) -> anyhow::Result<String> {
    let nodes: Vec<Value> = h.meshctl_json(&["node", "ls"])?;
    Ok(nodes
        .iter()
        .find(|n| n["name"] == of)
        .and_then(|n| n["status"].as_str())
        .unwrap_or_default()
        .to_owned())
}

/// Live tasks of a service by slot, as one host sees them.
fn live_slots(h: &Host, name: &str) -> BTreeMap<String, Vec<String>> {
    let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in ps(h, name) {
        if r["desired"] == "Running" && r["state"] == "Running" {
            by.entry(r["name"].as_str().unwrap().into())
                .or_default()
                .push(r["id"].as_str().unwrap().into());
        }
    }
    by
}

#[test]
fn a_dead_nodes_slots_run_elsewhere_and_requests_keep_succeeding() {
    let mut c = cluster(3);
    create(&c, "web", &["--replicas", "3", "-p", "8080:80"]);
    converged(&c, "web", 3, Duration::from_secs(10));
    let h3 = c.host(3).node_name().to_owned();
    let dead_ip = service(c.host(1), "web")["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["node"] == h3.as_str())
        .map(|t| t["ip"].clone())
        .unwrap();
    c.host_mut(3).kill_agent().unwrap();
    link(&c, 3, false);
    // Once the dead node's task has left host1's load balancer, no request fails.
    c.eventually(
        Duration::from_secs(5),
        "host3's task evicted on host1",
        |c| {
            let s = service(c.host(1), "web");
            let still = s["dataplane"]["backends"].as_array().is_some_and(|b| {
                b.iter()
                    .any(|b| b["ip"] == dead_ip && b["state"] == "active")
            });
            Ok((!still).then_some(()))
        },
    )
    .unwrap();
    let client = Probe::start(c.external_ns("client").unwrap(), addr(c.host(1), 8080)).unwrap();
    converged(&c, "web", 3, Duration::from_secs(10));
    let by_node = running_by_node(c.host(2), "web");
    assert!(!by_node.contains_key(&h3), "{by_node:?}");
    assert_eq!(by_node.values().sum::<usize>(), 3, "{by_node:?}");
    std::thread::sleep(Duration::from_millis(500));
    // With the dead task out of host1's load balancer, the two live tasks serve while
    // replacements start and join: only additions, so no answer should stall for half a
    // second. Measured: gaps ≤ 15 ms.
    client.finish().assert_available(
        "while the dead node's slots moved",
        Duration::from_millis(500),
    );
    let table = c.host(1).meshctl_ok(&["service", "ps", "web"]).unwrap();
    assert!(table.contains("Orphaned"), "the dead node's task: {table}");

    // It comes back: its stale task stops, nothing moves back to it.
    link(&c, 3, true);
    c.host_mut(3).restart_agent().unwrap();
    c.eventually(Duration::from_secs(15), "exactly 3, none on host3", |c| {
        for h in c.hosts() {
            let slots = live_slots(h, "web");
            let by = running_by_node(h, "web");
            if slots.len() != 3 || slots.values().any(|ids| ids.len() != 1) || by.contains_key(&h3)
            {
                anyhow::bail!("{} sees {slots:?} on {by:?}", h.node_name());
            }
        }
        Ok(Some(()))
    })
    .unwrap();
}

#[test]
fn a_partition_keeps_both_sides_serving_and_heals_to_exactly_n() {
    let c = cluster(3);
    create(&c, "web", &["--replicas", "3", "-p", "8080:80"]);
    converged(&c, "web", 3, Duration::from_secs(10));
    link(&c, 1, false);
    // Right after the cut both sides still see every task: first each side has to call the
    // other down.
    let (h1, h2) = (c.host(1).node_name(), c.host(2).node_name());
    c.eventually(
        Duration::from_secs(10),
        "each side calls the other down",
        |c| {
            Ok(
                (node_status(c.host(2), h1)? == "Down" && node_status(c.host(1), h2)? == "Down")
                    .then_some(()),
            )
        },
    )
    .unwrap();
    // Both sides fill every slot on their own.
    c.eventually(Duration::from_secs(10), "both sides at 3/3", |c| {
        let alone = live_slots(c.host(1), "web");
        let rest = live_slots(c.host(2), "web");
        Ok((alone.len() == 3 && rest.len() == 3).then_some(()))
    })
    .unwrap();
    let t = curl_many(&c, c.host(2), 8080, 9);
    assert_eq!(
        t.values().sum::<usize>(),
        9,
        "the majority side serves: {t:?}"
    );
    std::thread::sleep(Duration::from_secs(8));
    link(&c, 1, true);
    c.eventually(
        Duration::from_secs(20),
        "exactly one task per slot everywhere",
        |c| {
            let mut seen = Vec::new();
            for h in c.hosts() {
                let slots = live_slots(h, "web");
                let all: usize = ps(h, "web")
                    .iter()
                    .filter(|r| r["state"] == "Running" || r["state"] == "Starting")
                    .count();
                if slots.len() != 3 || slots.values().any(|ids| ids.len() != 1) || all != 3 {
                    anyhow::bail!("{} sees {slots:?} ({all} running)", h.node_name());
                }
                seen.push(slots);
            }
            Ok(seen.windows(2).all(|w| w[0] == w[1]).then_some(()))
        },
    )
    .unwrap();
    converged(&c, "web", 3, Duration::from_secs(10));
}

#[test]
fn concurrent_scales_from_two_nodes_one_wins_everywhere_and_the_other_is_told() {
    let c = cluster(3);
    create(&c, "web", &["--replicas", "2", "-d"]);
    c.eventually(Duration::from_secs(5), "web everywhere", |c| {
        Ok(c.hosts()
            .iter()
            .all(|h| {
                h.meshctl(&["service", "inspect", "web"])
                    .unwrap()
                    .status
                    .success()
            })
            .then_some(()))
    })
    .unwrap();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            c.host(1)
                .meshctl(&["service", "scale", "web=4", "-d"])
                .unwrap()
        });
        let b = s.spawn(|| {
            c.host(2)
                .meshctl(&["service", "scale", "web=6", "-d"])
                .unwrap()
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    let outcomes = [(4, &a), (6, &b)];
    let won: Vec<u64> = outcomes
        .iter()
        .filter(|(_, o)| o.status.success())
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(won.len(), 1, "exactly one wins: {a:?} {b:?}");
    let lost = outcomes
        .iter()
        .find(|(_, o)| !o.status.success())
        .unwrap()
        .1;
    let err = String::from_utf8_lossy(&lost.stderr);
    assert!(err.contains("changed at the same time"), "{err}");
    for h in c.hosts() {
        let s = service(h, "web");
        assert_eq!(
            s["spec"]["mode"]["replicated"]["replicas"],
            won[0],
            "{}",
            h.node_name()
        );
    }
    converged(&c, "web", won[0] as usize, Duration::from_secs(15));
}

#[test]
fn a_restarted_agent_adopts_its_tasks_and_never_duplicates_them() {
    let mut c = cluster(3);
    create(&c, "web", &["--replicas", "3", "-p", "8080:80"]);
    converged(&c, "web", 3, Duration::from_secs(10));
    let before = live_slots(c.host(1), "web");
    // A graceful restart keeps the node up for its peers: the same tasks carry on.
    c.host_mut(2).stop_agent().unwrap();
    c.host_mut(2).restart_agent().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    converged(&c, "web", 3, Duration::from_secs(10));
    assert_eq!(live_slots(c.host(2), "web"), before, "tasks were replaced");
    // A crash and a quick restart: whatever the failure detector made of it, exactly one
    // task per slot once things settle.
    c.host_mut(2).kill_agent().unwrap();
    c.host_mut(2).restart_agent().unwrap();
    c.eventually(Duration::from_secs(15), "one task per slot", |c| {
        for h in c.hosts() {
            let slots = live_slots(h, "web");
            if slots.len() != 3 || slots.values().any(|ids| ids.len() != 1) {
                anyhow::bail!("{} sees {slots:?}", h.node_name());
            }
        }
        Ok(Some(()))
    })
    .unwrap();
    converged(&c, "web", 3, Duration::from_secs(10));
    let local: Vec<Value> = c.host(2).meshctl_json(&["ps"]).unwrap();
    let web = local.iter().filter(|t| t["service"] == "web").count();
    // The crash may have moved host2's task away (then it runs none): no entry is 0.
    assert_eq!(
        web,
        running_by_node(c.host(1), "web")
            .get(c.host(2).node_name())
            .copied()
            .unwrap_or(0),
        "{local:?}"
    );
}

#[test]
fn a_removed_service_lets_its_connections_finish_and_refuses_new_ones() {
    let c = cluster(3);
    // The task ignores SIGTERM (an ignored signal stays ignored across exec), as a server
    // finishing its requests would take its time: it stops at the grace period's SIGKILL.
    let whoami = bin("mesh-whoami");
    let script = format!("trap '' TERM; exec {} --name web", whoami.display());
    c.host(1)
        .meshctl_json::<Value>(&[
            "service",
            "create",
            "web",
            "--replicas",
            "1",
            "--publish",
            "8080:80",
            "--stop-grace-period",
            "6s",
            "--",
            "/bin/sh",
            "-c",
            &script,
        ])
        .unwrap();
    converged(&c, "web", 1, Duration::from_secs(20));
    let a = addr(c.host(3), 8080);
    let session = mesh_tests::workload::RemoteSession::open(c.external_ns("client").unwrap(), a);
    assert_eq!(session.get(), "web");

    c.host(1).meshctl_ok(&["service", "rm", "web"]).unwrap();
    // Refused at once (an RST or ICMP error within 100 ms), not a SYN left to time out; and
    // from then on, every time.
    let refused = |c: &Cluster| {
        c.external_ns("client")
            .unwrap()
            .run(move || refused_at_once(a))
    };
    c.eventually(Duration::from_secs(3), "new connections refused", |c| {
        refused(c)?.map(Some)
    })
    .unwrap();
    for _ in 0..5 {
        refused(&c).unwrap().unwrap();
    }
    // The task is in its grace period: the connection it has still answers, through a node
    // that runs no task of it.
    assert_eq!(session.get(), "web", "the removal cut the connection");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(session.get(), "web");

    // When the task is gone, so is every trace of the service in the load balancers.
    c.eventually(
        Duration::from_secs(15),
        "the service leaves every node",
        |c| {
            for h in c.hosts() {
                let m = h.meshctl_ok(&["ps"]).unwrap_or_default();
                if m.contains("web") {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .unwrap();
}

/// Docker's `--publish 80`: the cluster picks the published port from 30000-32767, every
/// node answers on it, an update keeps it, and the next service gets another.
#[test]
fn a_target_alone_is_published_on_a_port_the_cluster_picks() {
    let c = cluster(2);
    create(&c, "cache", &["--replicas", "2", "-p", "80"]);
    converged(&c, "cache", 2, Duration::from_secs(10));
    let published = |h: &Host, name: &str| -> u16 {
        let s = service(h, name);
        let p = s["spec"]["ports"][0]["published"].as_u64();
        p.unwrap_or_else(|| panic!("{name} has no published port: {s}")) as u16
    };
    let port = published(c.host(2), "cache");
    assert!((30000..=32767).contains(&port), "{port}");
    for h in c.hosts() {
        let t = curl_many(&c, h, port, 10);
        assert_eq!(t.len(), 2, "{} answered {t:?} on {port}", h.node_name());
    }
    let ls = c.host(2).meshctl_ok(&["service", "ls"]).unwrap();
    assert!(ls.contains(&format!("*:{port}->80/tcp")), "{ls}");

    c.host(2)
        .meshctl_ok(&["service", "update", "--env-add", "A=1", "-d", "cache"])
        .unwrap();
    assert_eq!(
        published(c.host(1), "cache"),
        port,
        "an update keeps the port"
    );
    create(&c, "other", &["-p", "80"]);
    let other = published(c.host(1), "other");
    assert!(other != port && (30000..=32767).contains(&other), "{other}");
}
