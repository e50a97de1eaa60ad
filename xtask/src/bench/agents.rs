//! A benchmark cluster: 3 namespace hosts with real agents (the tests' harness), an overlay
//! network and a published service, and ways to read what each node's kernel holds.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_api::v1::{NodeInfo, ServiceInfo, TaskInfo};
use mesh_tests::{Cluster, Host};

pub const NETWORK: &str = "app";
pub const SUBNET: &str = "10.10.0.0/24";
pub const SERVICE: &str = "whoami";
pub const PUBLISHED: u16 = 8080;

/// Hosts with agents joined and Ready, network `app` created.
pub fn cluster(hosts: usize) -> Result<Cluster> {
    let mut c = Cluster::with_prefix("bench", hosts)?;
    c.start_agents()?;
    c.eventually(Duration::from_secs(20), "all nodes Ready", |c| {
        let nodes: Vec<NodeInfo> = c.host(1).meshctl_json(&["node", "ls"])?;
        let ready = nodes
            .iter()
            .filter(|n| n.status == mesh_api::spec::NodeStatus::Ready)
            .count();
        Ok((ready == hosts).then_some(()))
    })?;
    c.host(1)
        .meshctl_ok(&["network", "create", NETWORK, "--subnet", SUBNET])?;
    Ok(c)
}

/// Waits until every host's agent sees every host Ready (a healed cluster).
pub fn ready_everywhere(c: &Cluster, timeout: Duration) -> Result<()> {
    let n = c.hosts().len();
    c.eventually(timeout, "every node Ready everywhere", |c| {
        for h in c.hosts() {
            let nodes: Vec<NodeInfo> = h.meshctl_json(&["node", "ls"])?;
            let ready = nodes
                .iter()
                .filter(|n| n.status == mesh_api::spec::NodeStatus::Ready)
                .count();
            if ready != n {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
}

/// Service `whoami` publishing 8080 → 80, with one mesh-whoami task on each host listed;
/// returns when every node's load balancer has all of them.
pub fn whoami(c: &Cluster, on: &[usize]) -> Result<Vec<TaskInfo>> {
    let publish = format!("{PUBLISHED}:80");
    c.host(1).meshctl_ok(&[
        "service",
        "create",
        SERVICE,
        "--network",
        NETWORK,
        "--publish",
        &publish,
    ])?;
    for i in on {
        let h = c.host(*i);
        c.eventually(
            Duration::from_secs(10),
            "the service known on the host",
            |_| {
                Ok(h.meshctl(&["service", "inspect", SERVICE])?
                    .status
                    .success()
                    .then_some(()))
            },
        )?;
        let name = format!("whoami-{i}");
        h.run_whoami::<serde_json::Value>(NETWORK, Some(SERVICE), &name, &[])?;
    }
    let tasks = c.eventually(Duration::from_secs(20), "every task on every node", |c| {
        let tasks: Vec<TaskInfo> = c
            .host(1)
            .meshctl_json::<ServiceInfo>(&["service", "inspect", SERVICE])?
            .tasks;
        if tasks.len() != on.len() {
            return Ok(None);
        }
        for h in c.hosts() {
            let active = active_backends(h, SERVICE)?;
            if !tasks.iter().all(|t| active.contains(&t.ip)) {
                return Ok(None);
            }
        }
        Ok(Some(tasks))
    })?;
    Ok(tasks)
}

/// Active backends of `service` in the host's load balancer as its agent records them
/// (`meshctl service inspect`: the agent's memory of what it programmed, not a read of the
/// maps; [`super::kernel`] reads the kernel).
pub fn active_backends(h: &Host, service: &str) -> Result<Vec<Ipv4Addr>> {
    let info: ServiceInfo = h.meshctl_json(&["service", "inspect", service])?;
    Ok(info
        .dataplane
        .map(|d| {
            d.backends
                .iter()
                .filter(|b| b.state == mesh_api::v1::BackendState::Active)
                .map(|b| b.ip)
                .collect()
        })
        .unwrap_or_default())
}

/// Resident memory (KiB) and CPU time used so far (user + system) of a process.
pub fn usage(pid: u32) -> Result<(u64, Duration)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .context("no VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces); utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = rest[11].parse::<u64>()? + rest[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok((rss, Duration::from_millis(ticks * 1000 / hz)))
}

/// CPU share (1.0 = one core) and final RSS of a process over `window`.
pub fn cpu_over(pid: u32, window: Duration) -> Result<(f64, u64)> {
    let (_, before) = usage(pid)?;
    let t = Instant::now();
    std::thread::sleep(window);
    let (rss, after) = usage(pid)?;
    Ok((
        (after - before).as_secs_f64() / t.elapsed().as_secs_f64(),
        rss,
    ))
}

/// Polls `check` every `every` until it holds; the time from `since` when it first did.
pub fn time_until(
    since: Instant,
    timeout: Duration,
    every: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    loop {
        if check()? {
            return Ok(since.elapsed());
        }
        if since.elapsed() > timeout {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(every);
    }
}
