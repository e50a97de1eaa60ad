//! Node failure, end to end: kill host3's agent (SIGKILL) and cut its underlay link, time
//! until host1's and host2's load balancers no longer have host3's task as an active
//! backend (time-to-evict); then restore the link and restart the agent, time until every
//! node has it back (time-to-recover, including the agent's start).
//!
//! Failure detection is chitchat's phi-accrual detector with the agent defaults (gossip
//! every 100 ms, phi threshold 8): both are agent settings (`gossip_interval_ms`,
//! `phi_threshold`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{
    agents,
    report::{Report, Spread, Table},
};

const POLL: Duration = Duration::from_millis(20);
const VICTIM: usize = 3;

pub fn run(quick: bool) -> Result<Report> {
    let runs = if quick { 3 } else { 5 };
    let mut c = agents::cluster(3)?;
    let tasks = agents::whoami(&c, &[1, 2, 3])?;
    let victim_node = c.host(VICTIM).node_name().to_owned();
    let victim_ip = tasks
        .iter()
        .find(|t| t.node == victim_node)
        .map(|t| t.ip)
        .context("no task on the victim")?;
    let link = format!("h{VICTIM}");
    let mut evict = Vec::new();
    let mut recover = Vec::new();
    for run in 0..runs {
        eprintln!("==> failover run {}", run + 1);
        let started = Instant::now();
        c.host_mut(VICTIM).kill_agent()?;
        c.underlay().sh(&format!("ip link set {link} down"))?;
        let survivors = [c.host(1), c.host(2)];
        evict.push(agents::time_until(
            started,
            Duration::from_secs(30),
            POLL,
            "host3's task evicted on host1 and host2",
            || {
                for h in survivors {
                    if agents::active_backends(h, agents::SERVICE)?.contains(&victim_ip) {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )?);

        let started = Instant::now();
        c.underlay().sh(&format!("ip link set {link} up"))?;
        c.host_mut(VICTIM).restart_agent()?;
        recover.push(agents::time_until(
            started,
            Duration::from_secs(30),
            POLL,
            "host3's task back on every node",
            || {
                for h in c.hosts() {
                    if !agents::active_backends(h, agents::SERVICE)?.contains(&victim_ip) {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )?);
        // The next run starts from a healed cluster: every node sees host3 Ready.
        agents::ready_everywhere(&c, Duration::from_secs(20))?;
    }
    let mut report = Report::new("Failover: a dead node's tasks evicted and restored");
    report.ran(format!(
        "3 namespace hosts with agents (gossip every 100 ms, phi threshold 8), service whoami \
         with a task on each; {runs} runs of: SIGKILL host3's agent + `ip link set h3 down` on \
         the underlay bridge, then link up + agent restart; load balancers polled every {} ms",
        POLL.as_millis()
    ));
    let mut t = Table::new("min / median / max", &["", "time", "target"]);
    let show = |v: &[Duration]| Spread::of_durations(v).map_or("-".into(), |s| s.show(0, " ms"));
    let worst = evict.iter().max().copied().unwrap_or_default();
    t.row(vec![
        "time-to-evict (LBs of host1 and host2 drop host3's task)".into(),
        show(&evict),
        format!(
            "≤ 2 s ({})",
            if worst <= Duration::from_secs(2) {
                "met"
            } else {
                "NOT met"
            }
        ),
    ]);
    t.row(vec![
        "time-to-recover (link up + agent restart, task back on all 3)".into(),
        show(&recover),
        "-".into(),
    ]);
    report.tables.push(t);
    report.note(
        "The task process on host3 keeps running while its agent is dead (tasks outlive the \
         agent); recovery is the restarted agent adopting it and re-asserting its endpoint.",
    );
    drop(c);
    Ok(report)
}
