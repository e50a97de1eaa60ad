//! The README's health checks, end to end ("Health checks"): `--health-http`,
//! `--health-tcp`, `--health-timeout` and `--health-start-period`. A task failing its check
//! is no backend anywhere (curl through the published port never reaches it) and is
//! replaced (`service ps` shows it as an unhealthy history row); a passing one serves; a slow
//! starter within its start period is not failed. One cluster, a service per flag.

use std::{net::SocketAddr, time::Duration};

use mesh_tests::{
    Cluster, Host,
    cluster::bin,
    workload::{http_get, tally},
};
use serde_json::Value;

/// 2 failures in a row make a task unhealthy; checks every 300 ms unless `args` say else.
const FAST: [&str; 4] = ["--health-retries", "2", "--restart-delay", "300ms"];

/// `service create NAME --replicas N -p PUBLISHED:80 FAST ARGS… -d -- /bin/sh -c SCRIPT`,
/// where `$W` in the script is mesh-whoami's path.
fn create(c: &Cluster, name: &str, replicas: &str, published: u16, args: &[&str], script: &str) {
    let whoami = bin("mesh-whoami");
    let script = script.replace("$W", whoami.to_str().unwrap());
    let publish = format!("{published}:80");
    let mut cmd = vec![
        "service",
        "create",
        name,
        "--replicas",
        replicas,
        "-p",
        &publish,
    ];
    cmd.extend_from_slice(&FAST);
    if !args.contains(&"--health-interval") {
        cmd.extend(["--health-interval", "300ms"]);
    }
    cmd.extend_from_slice(args);
    cmd.extend(["-d", "--", "/bin/sh", "-c", &script]);
    c.host(1).meshctl_ok(&cmd).unwrap();
}

fn ps(h: &Host, name: &str) -> Vec<Value> {
    h.meshctl_json(&["service", "ps", name]).unwrap()
}

fn inspect(h: &Host, name: &str) -> Value {
    h.meshctl_json(&["service", "inspect", name]).unwrap()
}

/// Waits until `service ps` has a history row of `task` failed as unhealthy.
fn replaced_as_unhealthy(c: &Cluster, service: &str, task: &str) {
    c.eventually(
        Duration::from_secs(15),
        &format!("{task} replaced as unhealthy"),
        |c| {
            Ok(ps(c.host(2), service)
                .iter()
                .any(|r| {
                    r["name"] == task
                        && r["history"] == true
                        && r["error"].as_str().unwrap_or("").contains("unhealthy")
                })
                .then_some(()))
        },
    )
    .unwrap();
}

/// Every host: `running` tasks of the service count and as many active backends.
fn serving(c: &Cluster, service: &str, running: usize) {
    c.eventually(
        Duration::from_secs(15),
        &format!("{service}: {running} serving on every host"),
        |c| {
            for h in c.hosts() {
                let s = inspect(h, service);
                let active = s["dataplane"]["backends"]
                    .as_array()
                    .map_or(0, |b| b.iter().filter(|b| b["state"] == "active").count());
                if s["running"] != running || active != running {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .unwrap();
}

/// Who answers 20 requests from outside to host2's published port.
fn answers(c: &Cluster, port: u16) -> Vec<String> {
    let a: SocketAddr = format!("{}:{port}", c.host(2).ip).parse().unwrap();
    let t = tally(
        c.external_ns("client")
            .unwrap()
            .run(move || {
                (0..20)
                    .map(|_| http_get(a).unwrap().trim().to_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap(),
    );
    t.into_keys().collect()
}

#[test]
fn health_checks_gate_backends_and_replace_failing_tasks() {
    let mut c = Cluster::new(2).unwrap();
    c.start_agents().unwrap();
    c.external("client", 100).unwrap();
    let pages = c.log_dir().join("pages");
    std::fs::create_dir_all(&pages).unwrap();
    // web.1 has a page, web.2 none: mesh-whoami --file answers 500 without it.
    std::fs::write(pages.join("web.1"), "web.1").unwrap();
    create(
        &c,
        "web",
        "2",
        8080,
        &["--health-http", "/"],
        &format!("exec $W --file {}/$HOSTNAME", pages.display()),
    );
    // tcp.2 listens on 81, not on the checked port 80.
    create(
        &c,
        "tcp",
        "2",
        8081,
        &["--health-tcp", "80"],
        "if [ $HOSTNAME = tcp.1 ]; then exec $W; else exec $W --http 81; fi",
    );
    // A check that takes 1 s: past a 300 ms timeout it fails, within 3 s it passes.
    let check = ["--health-cmd", "sleep 1", "--health-interval", "1500ms"];
    create(
        &c,
        "hasty",
        "1",
        8082,
        &[&check[..], &["--health-timeout", "300ms"]].concat(),
        "exec $W",
    );
    create(
        &c,
        "patient",
        "1",
        8083,
        &[&check[..], &["--health-timeout", "3s"]].concat(),
        "exec $W",
    );
    // Binds its port 2 s after it starts: the start period covers it, no start period does
    // not.
    let slow = "sleep 2; exec $W";
    create(
        &c,
        "slow",
        "1",
        8084,
        &["--health-tcp", "80", "--health-start-period", "5s"],
        slow,
    );
    create(&c, "rushed", "1", 8085, &["--health-tcp", "80"], slow);

    replaced_as_unhealthy(&c, "web", "web.2");
    replaced_as_unhealthy(&c, "tcp", "tcp.2");
    replaced_as_unhealthy(&c, "hasty", "hasty.1");
    replaced_as_unhealthy(&c, "rushed", "rushed.1");
    serving(&c, "web", 1);
    serving(&c, "tcp", 1);
    serving(&c, "patient", 1);
    serving(&c, "slow", 1);
    assert_eq!(answers(&c, 8080), ["web.1"]);
    assert_eq!(answers(&c, 8081), ["tcp.1"]);
    assert_eq!(answers(&c, 8083), ["patient.1"]);
    assert_eq!(answers(&c, 8084), ["slow.1"]);
    for failing in ["hasty", "rushed"] {
        let s = inspect(c.host(1), failing);
        assert_eq!(s["running"], 0, "{failing} serves nothing: {s}");
    }
    // The passing ones were never replaced.
    for passing in ["patient", "slow"] {
        let rows = ps(c.host(1), passing);
        assert_eq!(rows.len(), 1, "{passing} kept its first task: {rows:?}");
        assert_eq!(rows[0]["state"], "Running", "{rows:?}");
    }
}
