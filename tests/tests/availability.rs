//! The availability client against a real service: a service whose only task is frozen for
//! 1.5 s must break "0 failed and no gap over 1000 ms", and the same service left alone
//! must keep "0 failed and no gap over 500 ms". Without the first, a passing claim in the
//! other tests would prove nothing.

use std::{net::SocketAddr, time::Duration};

use mesh_tests::{
    Cluster,
    availability::{Failure, Probe},
    cluster::bin,
    workload::http_get,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;

/// One host, service `web` with one mesh-whoami task published on 8080, answering an
/// outside client; the task's PID.
fn one_task_service() -> (Cluster, SocketAddr, i32) {
    let mut c = Cluster::new(1).unwrap();
    c.start_agents().unwrap();
    c.external("client", 100).unwrap();
    let whoami = bin("mesh-whoami");
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "web",
            "-p",
            "8080:80",
            "--",
            whoami.to_str().unwrap(),
        ])
        .unwrap();
    let web: SocketAddr = format!("{}:8080", c.host(1).ip).parse().unwrap();
    let client = c.external_ns("client").unwrap();
    c.eventually(Duration::from_secs(15), "web answers", |_| {
        Ok(client.run(move || http_get(web))?.ok().map(|_| ()))
    })
    .unwrap();
    let tasks: Vec<Value> = c.host(1).meshctl_json(&["ps"]).unwrap();
    let pids: Vec<i32> = tasks
        .iter()
        .filter(|t| t["service"] == "web" && t["state"] == "running")
        .filter_map(|t| t["pid"].as_u64())
        .map(|p| p as i32)
        .collect();
    assert_eq!(pids.len(), 1, "one running task: {tasks:?}");
    (c, web, pids[0])
}

/// SIGSTOP now, SIGCONT on drop: the task never stays frozen, whatever the test does. The
/// recorded PID is the task's init; its program (init's child) is the one that serves.
struct Frozen(Vec<i32>);

impl Frozen {
    fn freeze(pid: i32) -> Self {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let mut pids: Vec<i32> = children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        pids.push(pid);
        for p in &pids {
            kill(Pid::from_raw(*p), Signal::SIGSTOP).unwrap();
        }
        Self(pids)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = kill(Pid::from_raw(*p), Signal::SIGCONT);
        }
    }
}

#[test]
fn a_task_frozen_for_1_5_s_breaks_the_availability_claim() {
    let (c, web, pid) = one_task_service();
    let probe = Probe::start(c.external_ns("client").unwrap(), web).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // The kernel still completes handshakes on the frozen task's listening socket: the
    // connects succeed and the answers do not come.
    let frozen = Frozen::freeze(pid);
    std::thread::sleep(Duration::from_millis(1500));
    drop(frozen);
    std::thread::sleep(Duration::from_secs(1));
    let r = probe.finish();
    eprintln!("{r}");
    let e = r
        .check(Duration::from_millis(1000))
        .expect_err("a 1.5 s freeze must break the claim");
    assert!(
        e.contains("\"0 failed and no gap over 1000 ms\" does not hold"),
        "{e}"
    );
    assert!(r.gap() >= Duration::from_millis(1400), "{r}");
    assert!(r.failed() > 0, "{r}");
    assert!(
        r.failed_where(Failure::is_timeout) == r.failed(),
        "only timeouts: {r}"
    );
    // The task answers again afterwards: the gap is the freeze, not a dead task.
    assert!(r.longest_gap.1 < r.duration, "{r}");
    assert!(
        r.ok as f64 >= 0.5 * r.expected(),
        "the rest was served: {r}"
    );
}

#[test]
fn the_same_service_left_alone_keeps_the_claim() {
    let (c, web, _) = one_task_service();
    let probe = Probe::start(c.external_ns("client").unwrap(), web).unwrap();
    std::thread::sleep(Duration::from_millis(3500));
    // One task on one idle host: nothing should stall an answer for half a second (a
    // dropped SYN would show as a failure, a stall as a gap of its length).
    probe
        .finish()
        .assert_available("a service left alone", Duration::from_millis(500));
}
