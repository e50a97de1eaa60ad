//! Rolling updates, rollbacks and health checks, the way `docker service update` is used:
//! waves in slot order, start-first and stop-first with clients that see no failed request,
//! a broken version that pauses or rolls back, a manual rollback, the rollout carrying on
//! when its coordinator dies, and tasks that serve only while healthy.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use mesh_tests::{
    Cluster, Host,
    availability::Probe,
    cluster::bin,
    netns::Netns,
    workload::{http_get, tally},
};
use serde_json::Value;

fn cluster(n: usize) -> Cluster {
    let mut c = Cluster::new(n).unwrap();
    c.start_agents().unwrap();
    c.external("client", 100).unwrap();
    c
}

fn create(c: &Cluster, name: &str, args: &[&str]) {
    let whoami = bin("mesh-whoami");
    let mut cmd = vec!["service", "create", name, "-p", "8080:80"];
    cmd.extend_from_slice(args);
    cmd.extend(["--", whoami.to_str().unwrap()]);
    c.host(1).meshctl_ok(&cmd).unwrap();
}

fn service(h: &Host, name: &str) -> Value {
    h.meshctl_json(&["service", "inspect", name]).unwrap()
}

fn ps(h: &Host, name: &str) -> Vec<Value> {
    h.meshctl_json(&["service", "ps", name]).unwrap()
}

fn addr(h: &Host) -> SocketAddr {
    format!("{}:8080", h.ip).parse().unwrap()
}

/// Every host: `n` running of `n` and `n` active backends.
fn converged(c: &Cluster, name: &str, n: usize) {
    c.eventually(
        Duration::from_secs(30),
        &format!("{name} at {n}/{n}"),
        |c| {
            for h in c.hosts().iter().filter(|h| h.agent_pid().is_some()) {
                let s = service(h, name);
                let active = s["dataplane"]["backends"]
                    .as_array()
                    .map_or(0, |b| b.iter().filter(|b| b["state"] == "active").count());
                if s["running"] != n || s["desired"] != n || active != n {
                    anyhow::bail!(
                        "{}: {}/{} running, {active} backends",
                        h.node_name(),
                        s["running"],
                        s["desired"]
                    );
                }
            }
            Ok(Some(()))
        },
    )
    .unwrap();
}

fn update_state(h: &Host, name: &str) -> String {
    service(h, name)["spec"]["update_status"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Current, running rows of `service ps`, by slot.
fn current(h: &Host, name: &str) -> BTreeMap<String, Value> {
    ps(h, name)
        .into_iter()
        .filter(|r| !r["history"].as_bool().unwrap() && r["desired"] == "Running")
        .map(|r| (r["slot"].as_str().unwrap().to_owned(), r))
        .collect()
}

#[test]
fn the_seed_update_replaces_tasks_in_waves_in_slot_order() {
    let c = cluster(4);
    create(&c, "web", &["--replicas", "4"]);
    converged(&c, "web", 4);
    let out = c
        .host(2)
        .meshctl_ok(&[
            "service",
            "update",
            "web",
            "--env-add",
            "VERSION=2",
            "--update-parallelism",
            "2",
            "--update-delay",
            "2s",
            "--update-monitor",
            "1s",
        ])
        .unwrap();
    assert!(out.contains("overall progress: 4 out of 4 tasks"), "{out}");
    assert!(out.contains("verify: Service web converged"), "{out}");
    // The command watched the update on host 2; the coordinator's completed record reaches
    // host 3 by gossip, a round or two later.
    c.eventually(
        Duration::from_secs(3),
        "host 3 sees the update completed",
        |c| Ok((update_state(c.host(3), "web") == "completed").then_some(())),
    )
    .unwrap();
    converged(&c, "web", 4);
    let now = current(c.host(1), "web");
    assert_eq!(now.len(), 4);
    let created = |slot: &str| now[slot]["created_ms"].as_u64().unwrap();
    assert!(now.values().all(|r| r["updated"] == true), "{now:?}");
    // Two waves, slots 1-2 then 3-4, at least the delay apart.
    let (w1, w2) = (
        created("1").max(created("2")),
        created("3").min(created("4")),
    );
    assert!(
        w2 >= w1 + 2_000,
        "waves {w1} and {w2} are less than 2 s apart: {now:?}"
    );
    assert!(created("1").abs_diff(created("2")) < 1_500, "{now:?}");
    // The old tasks are history rows.
    let rows = ps(c.host(1), "web");
    assert_eq!(
        rows.iter().filter(|r| r["history"] == true).count(),
        4,
        "{rows:?}"
    );
    let inspect = c
        .host(4)
        .meshctl_ok(&["service", "inspect", "web", "--pretty"])
        .unwrap();
    assert!(
        inspect.contains("UpdateStatus:") && inspect.contains("completed"),
        "{inspect}"
    );
    assert!(inspect.contains("Parallelism:\t2"), "{inspect}");
}

/// An update while two clients run, one from outside against host1's published port and
/// one from a task on host2 against the service's VIP: "0 failed and no gap over `max_gap`"
/// for both.
fn update_with_clients(order: &str, max_gap: Duration) {
    let c = cluster(3);
    create(&c, "web", &["--replicas", "3"]);
    converged(&c, "web", 3);
    let client = Probe::start(c.external_ns("client").unwrap(), addr(c.host(1))).unwrap();
    let whoami = bin("mesh-whoami");
    c.host(2)
        .meshctl_ok(&[
            "run",
            "--network",
            "ingress",
            "--name",
            "cli",
            "--",
            whoami.to_str().unwrap(),
            "--no-http",
            "--udp",
            "9",
        ])
        .unwrap();
    let tasks: Vec<Value> = c.host(2).meshctl_json(&["ps"]).unwrap();
    let cli_ns = tasks
        .iter()
        .find(|t| t["name"] == "cli")
        .and_then(|t| t["netns"].as_str())
        .expect("task cli has a namespace")
        .to_owned();
    let vip: SocketAddr = format!("{}:80", service(c.host(2), "web")["vip"].as_str().unwrap())
        .parse()
        .unwrap();
    let east_west = Probe::start(&Netns::existing(&cli_ns), vip).unwrap();
    c.host(3)
        .meshctl_ok(&[
            "service",
            "update",
            "web",
            "--env-add",
            "VERSION=2",
            "--update-order",
            order,
            "--update-monitor",
            "1s",
        ])
        .unwrap();
    // And a rolling restart of the same spec.
    c.host(2)
        .meshctl_ok(&[
            "service",
            "update",
            "--force",
            "web",
            "--update-monitor",
            "1s",
        ])
        .unwrap();
    converged(&c, "web", 3);
    let reports = [("outside", client), ("the VIP", east_west)].map(|(from, p)| (from, p.finish()));
    for (from, r) in reports {
        r.assert_available(&format!("{order}, from {from}"), max_gap);
    }
}

#[test]
fn a_start_first_update_fails_no_request() {
    // Each new task serves before its old one leaves the load balancers: nothing should
    // stall for half a SYN retransmit (1 s). Measured: gaps ≤ 40 ms from either client.
    update_with_clients("start-first", Duration::from_millis(500));
}

#[test]
fn a_stop_first_update_fails_no_request() {
    // The old task leaves the load balancers before it stops and two others serve
    // meanwhile: the same bound as start-first. Measured: gaps ≤ 45 ms.
    update_with_clients("stop-first", Duration::from_millis(500));
}

#[test]
fn a_version_that_exits_at_once_pauses_the_update_and_old_tasks_serve() {
    let c = cluster(3);
    create(&c, "web", &["--replicas", "3", "--restart-delay", "1s"]);
    converged(&c, "web", 3);
    let out = c
        .host(1)
        .meshctl(&["service", "update", "web", "--args", "--no-such-flag"])
        .unwrap();
    assert!(
        !out.status.success(),
        "a failed update exits non-zero: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        c.host(1).meshctl_ok(&["service", "ps", "web"]).unwrap()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("paused due to failure"), "{err}");
    assert!(err.contains("non-zero exit"), "{err}");
    // The coordinator recorded it; another node reads it once gossip brings it (a round or
    // two), and it stays paused there.
    c.eventually(
        Duration::from_secs(3),
        "host2 sees the update paused",
        |c| Ok((update_state(c.host(2), "web") == "paused").then_some(())),
    )
    .unwrap();
    // Stop-first replaced one slot; the two others still run the old version and serve.
    let answers = c
        .external_ns("client")
        .unwrap()
        .run({
            let a = addr(c.host(2));
            move || (0..10).map(|_| http_get(a).unwrap()).collect::<Vec<_>>()
        })
        .unwrap();
    assert_eq!(tally(answers).len(), 2);
    let old = current(c.host(3), "web")
        .values()
        .filter(|r| r["updated"] == false && r["state"] == "Running")
        .count();
    assert_eq!(old, 2);
}

#[test]
fn a_failing_update_rolls_back_by_itself_and_by_hand() {
    let c = cluster(3);
    create(&c, "web", &["--replicas", "3", "--restart-delay", "1s"]);
    converged(&c, "web", 3);
    let v1 = service(c.host(1), "web")["spec"]["task"].clone();
    let out = c
        .host(1)
        .meshctl(&[
            "service",
            "update",
            "web",
            "--args",
            "--no-such-flag",
            "--update-failure-action",
            "rollback",
        ])
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rolled back"), "{err}");
    converged(&c, "web", 3);
    let s = service(c.host(2), "web");
    assert_eq!(s["spec"]["update_status"]["state"], "rollback_completed");
    assert_eq!(s["spec"]["task"]["command"], v1["command"], "back on v1");
    assert!(
        current(c.host(2), "web")
            .values()
            .all(|r| r["updated"] == true)
    );

    // A good update, then `service rollback` by hand.
    c.host(2)
        .meshctl_ok(&[
            "service",
            "update",
            "web",
            "--env-add",
            "V=2",
            "--update-monitor",
            "1s",
        ])
        .unwrap();
    assert_eq!(
        service(c.host(1), "web")["spec"]["task"]["env"][0],
        serde_json::json!(["V", "2"])
    );
    let out = c
        .host(3)
        .meshctl_ok(&[
            "service",
            "update",
            "web",
            "--rollback",
            "--rollback-monitor",
            "1s",
        ])
        .unwrap();
    assert!(out.contains("converged"), "{out}");
    converged(&c, "web", 3);
    let s = service(c.host(1), "web");
    assert_eq!(s["spec"]["task"], v1, "the env is gone again");
    assert_eq!(s["spec"]["update_status"]["state"], "rollback_completed");
}

#[test]
fn the_update_completes_when_its_coordinator_dies() {
    let mut c = cluster(4);
    create(&c, "web", &["--replicas", "4"]);
    converged(&c, "web", 4);
    let coordinator = service(c.host(1), "web")["coordinator"]
        .as_str()
        .unwrap()
        .to_owned();
    let i = c
        .hosts()
        .iter()
        .position(|h| h.node_name() == coordinator)
        .unwrap()
        + 1;
    let typed_on = if i == 1 { 2 } else { 1 };
    c.host(typed_on)
        .meshctl_ok(&[
            "service",
            "update",
            "web",
            "--env-add",
            "V=2",
            "--update-delay",
            "1s",
            "--update-monitor",
            "1s",
            "--detach",
        ])
        .unwrap();
    // Mid-update: the first slot has its new task.
    c.eventually(Duration::from_secs(15), "one slot updated", |c| {
        let n = current(c.host(typed_on), "web")
            .values()
            .filter(|r| r["updated"] == true && r["state"] == "Running")
            .count();
        Ok((n >= 1).then_some(()))
    })
    .unwrap();
    c.host_mut(i).kill_agent().unwrap();
    c.underlay().sh(&format!("ip link set h{i} down")).unwrap();
    c.eventually(Duration::from_secs(60), "the update completed", |c| {
        let h = c.host(typed_on);
        let s = service(h, "web");
        Ok((s["spec"]["update_status"]["state"] == "completed"
            && s["coordinator"] != coordinator.as_str())
        .then_some(()))
    })
    .unwrap();
    converged(&c, "web", 4);
    assert!(
        current(c.host(typed_on), "web")
            .values()
            .all(|r| r["updated"] == true)
    );
}

#[test]
fn only_healthy_tasks_serve_and_an_unhealthy_one_is_replaced() {
    let c = cluster(2);
    let sick = c.log_dir().join("sick");
    std::fs::create_dir_all(&sick).unwrap();
    // web.2 starts sick: it never passes its check.
    std::fs::write(sick.join("web.2"), "").unwrap();
    let check = format!("test ! -e {}/$HOSTNAME", sick.display());
    create(
        &c,
        "web",
        &[
            "--replicas",
            "3",
            "--health-cmd",
            &check,
            "--health-interval",
            "300ms",
            "--health-retries",
            "2",
            "--restart-delay",
            "500ms",
            "-d",
        ],
    );
    c.eventually(Duration::from_secs(15), "2 of 3 healthy", |c| {
        let s = service(c.host(1), "web");
        Ok((s["running"] == 2).then_some(()))
    })
    .unwrap();
    let curl = |c: &Cluster| {
        let a = addr(c.host(2));
        tally(
            c.external_ns("client")
                .unwrap()
                .run(move || {
                    (0..20)
                        .map(|_| http_get(a).unwrap().trim().to_owned())
                        .collect::<Vec<_>>()
                })
                .unwrap(),
        )
    };
    let t = curl(&c);
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        vec!["web.1", "web.3"],
        "{t:?}"
    );
    c.eventually(
        Duration::from_secs(10),
        "web.2 replaced as unhealthy",
        |c| {
            Ok(ps(c.host(1), "web")
                .iter()
                .any(|r| {
                    r["name"] == "web.2" && r["error"].as_str().unwrap_or("").contains("unhealthy")
                })
                .then_some(()))
        },
    )
    .unwrap();

    // web.1 turns sick: it leaves every load balancer and is replaced.
    let before = current(c.host(1), "web")["1"]["id"].clone();
    std::fs::write(sick.join("web.1"), "").unwrap();
    c.eventually(Duration::from_secs(10), "web.1 out of every LB", |c| {
        for h in c.hosts() {
            if service(h, "web")["running"] != 1 {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .unwrap();
    let t = curl(&c);
    assert_eq!(t.keys().collect::<Vec<_>>(), vec!["web.3"], "{t:?}");
    // Healed: both come back healthy, web.1 as a new task.
    std::fs::remove_file(sick.join("web.1")).unwrap();
    std::fs::remove_file(sick.join("web.2")).unwrap();
    converged(&c, "web", 3);
    assert_ne!(current(c.host(2), "web")["1"]["id"], before);
    assert_eq!(curl(&c).len(), 3);
}

#[test]
fn bad_update_commands_say_how_to_fix_them_and_change_nothing() {
    let c = cluster(1);
    create(&c, "web", &["--replicas", "1"]);
    let h = c.host(1);
    let before = service(h, "web")["spec"].clone();
    for (args, says) in [
        (
            vec!["--update-failure-action", "explode"],
            "pause, continue or rollback",
        ),
        (
            vec!["--update-order", "random"],
            "stop-first or start-first",
        ),
        (vec!["--update-delay", "-1s"], "--update-delay"),
        (
            vec!["--no-healthcheck", "--health-cmd", "true"],
            "conflicts",
        ),
        (vec!["--health-interval", "1s"], "need a probe"),
        (vec!["--rollback"], "no previous spec"),
    ] {
        let mut cmd = vec!["service", "update", "web"];
        cmd.extend(args.iter().copied());
        let out = h.meshctl(&cmd).unwrap();
        assert!(!out.status.success(), "{cmd:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{cmd:?}: {err}");
    }
    let out = h.meshctl(&["service", "rollback", "web"]).unwrap();
    assert!(!out.status.success());
    // Parallelism above the replicas is allowed: all at once.
    h.meshctl_ok(&["service", "update", "web", "--update-parallelism", "5"])
        .unwrap();
    let after = service(h, "web")["spec"].clone();
    assert_eq!(after["task"], before["task"], "nothing else changed");
    assert_eq!(after["update"]["parallelism"], 5);
}
