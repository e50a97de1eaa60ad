//! Rolling updates against what a user without them does: 10 tasks of one service replaced
//! one at a time, start-first, no delay (`service update --env-add …`), beside a naive
//! stop-all/start-all of the same service (`service scale =0`, then `=10`), while a client
//! sends 100 new connections a second (1 s each at most) to a published port. Reported: time
//! until all 10 run the new version (or run again) and every node balances over them, the
//! requests that failed meanwhile (by kind) and the longest stretch with no answer.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use mesh_api::v1::ServiceInfo;
use mesh_tests::{
    availability::{Availability, Probe},
    cluster::bin,
};

use super::{
    agents,
    report::{Report, Spread, Table},
};

const SERVICE: &str = "upd";
const REPLICAS: usize = 10;
const POLL: Duration = Duration::from_millis(50);

pub fn run(quick: bool) -> Result<Report> {
    let runs = if quick { 1 } else { 3 };
    let mut c = agents::cluster(3)?;
    c.external("client", 100)?;
    let whoami = bin("mesh-whoami");
    let publish = format!("{}:80", agents::PUBLISHED);
    c.host(1).meshctl_ok(&[
        "service",
        "create",
        SERVICE,
        "--network",
        agents::NETWORK,
        "--replicas",
        &REPLICAS.to_string(),
        "--publish",
        &publish,
        "--",
        whoami.to_str().unwrap_or_default(),
    ])?;
    serving(&c, true)?;
    let target = format!("{}:{}", c.host(1).ip, agents::PUBLISHED).parse()?;
    let (mut rolling, mut naive) = (Vec::new(), Vec::new());
    for run in 0..runs {
        eprintln!("==> update run {}", run + 1);
        let client = Probe::start(c.external_ns("client").expect("made above"), target)?;
        let started = Instant::now();
        c.host(2).meshctl_ok(&[
            "service",
            "update",
            SERVICE,
            "--env-add",
            &format!("RUN={run}"),
            "--update-parallelism",
            "1",
            "--update-delay",
            "0s",
            "--update-order",
            "start-first",
            "--update-monitor",
            "0s",
            "--detach",
        ])?;
        let took = agents::time_until(started, Duration::from_secs(120), POLL, "rolled", || {
            let s: ServiceInfo = c.host(1).meshctl_json(&["service", "inspect", SERVICE])?;
            let done = s
                .spec
                .update_status
                .as_ref()
                .is_some_and(|u| u.state == mesh_api::spec::UpdateState::Completed);
            Ok(done && serving(&c, false)?)
        })?;
        rolling.push((took, client.finish()));

        let client = Probe::start(c.external_ns("client").expect("made above"), target)?;
        let started = Instant::now();
        c.host(2)
            .meshctl_ok(&["service", "scale", &format!("{SERVICE}=0"), "-d"])?;
        agents::time_until(started, Duration::from_secs(60), POLL, "stopped", || {
            let s: ServiceInfo = c.host(1).meshctl_json(&["service", "inspect", SERVICE])?;
            Ok(s.running == 0)
        })?;
        c.host(2)
            .meshctl_ok(&["service", "scale", &format!("{SERVICE}={REPLICAS}"), "-d"])?;
        let took = agents::time_until(started, Duration::from_secs(120), POLL, "back", || {
            serving(&c, false)
        })?;
        naive.push((took, client.finish()));
    }
    let mut report = Report::new("Rolling update against stop-all/start-all");
    report.ran(format!(
        "3 namespace hosts with agents (release builds), service `{SERVICE}` with {REPLICAS} \
         mesh-whoami tasks publishing {}; {runs} runs of: `service update --env-add …` \
         (parallelism 1, delay 0, start-first, monitor 0s) until the coordinator records it \
         completed and every node balances over {REPLICAS} tasks; then `service scale =0` and \
         `=10` until the same (both read from the agents, not the kernel: `meshctl service \
         inspect` on each node every {poll} ms, the coordinator's update state and each \
         agent's record of what it programmed); throughout, a client on the underlay opens {} new connections \
         a second to host1's published port, paced by a clock, each with {} ms to be \
         answered (connect included)",
        agents::PUBLISHED,
        mesh_tests::availability::RATE,
        mesh_tests::availability::BUDGET.as_millis(),
        poll = POLL.as_millis(),
    ));
    let mut t = Table::new(
        "min / median / max over runs",
        &[
            "",
            "time",
            "requests",
            "failed requests",
            "longest gap without an answer",
        ],
    );
    for (name, v) in [
        ("rolling update, start-first", &rolling),
        ("stop all, start all (scale 0 → 10)", &naive),
    ] {
        let times: Vec<Duration> = v.iter().map(|r| r.0).collect();
        let total: Vec<f64> = v.iter().map(|r| r.1.sent as f64).collect();
        let failed: Vec<f64> = v.iter().map(|r| r.1.failed() as f64).collect();
        let gaps: Vec<Duration> = v.iter().map(|r| r.1.gap()).collect();
        t.row(vec![
            name.into(),
            Spread::of_durations(&times).map_or("-".into(), |s| s.show(0, " ms")),
            Spread::of(&total).map_or("-".into(), |s| s.show(0, "")),
            Spread::of(&failed).map_or("-".into(), |s| s.show(0, "")),
            Spread::of_durations(&gaps).map_or("-".into(), |s| s.show(0, " ms")),
        ]);
    }
    report.tables.push(t);
    for (name, v) in [("rolling", &rolling), ("stop all, start all", &naive)] {
        for (run, (_, seen)) in v.iter().enumerate() {
            report.note(format!("{name}, run {}: {}", run + 1, summary(seen)));
        }
    }
    report.note(
        "Start-first keeps every slot serving: the old task leaves the load balancers only \
         once its replacement accepts connections, and stays up ~1 s while that spreads. The \
         naive way has a window with no task at all: the routing mesh drops new connections \
         while a service has no backend, so their SYNs go unanswered past the client's 1 s \
         budget (connect timeouts), and the longest gap shows how long nothing was served.",
    );
    drop(c);
    Ok(report)
}

/// A run's client in one line: failures by kind and the longest gap.
fn summary(seen: &Availability) -> String {
    let kinds: Vec<String> = seen
        .failed_by_kind
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    format!(
        "{} sent, {} ok, {} failed{}; longest gap {} ms",
        seen.sent,
        seen.ok,
        seen.failed(),
        if kinds.is_empty() {
            String::new()
        } else {
            format!(" ({})", kinds.join(", "))
        },
        seen.gap().as_millis()
    )
}

/// Every node balances over REPLICAS active backends (and says so).
fn serving(c: &mesh_tests::Cluster, wait: bool) -> Result<bool> {
    let check = || -> Result<bool> {
        for h in c.hosts() {
            let s: ServiceInfo = h.meshctl_json(&["service", "inspect", SERVICE])?;
            if s.running != REPLICAS || agents::active_backends(h, SERVICE)?.len() != REPLICAS {
                return Ok(false);
            }
        }
        Ok(true)
    };
    if !wait {
        return check();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if check()? {
            return Ok(true);
        }
        std::thread::sleep(POLL);
    }
    bail!("{SERVICE} never reached {REPLICAS} tasks on every node")
}
