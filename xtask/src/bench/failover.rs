//! Node failure, end to end: kill host3's agent (SIGKILL) and cut its underlay link, time
//! until host1's and host2's load balancers no longer have host3's task as an active
//! backend (time-to-evict); then restore the link and restart the agent, time until every
//! node has it back (time-to-recover, including the agent's start).
//!
//! Each node's load balancer is read from its kernel (the pinned maps, the programs' own
//! lookup of the published port) by one long-lived reader per node, a thread of the bench in
//! the node's namespace (see [`kernel`]); up to 2026-12-07 it was `meshctl service inspect`
//! (the agent's record of what it programmed), a process per node per poll.
//!
//! Failure detection is chitchat's phi-accrual detector with the agent defaults (gossip
//! every 100 ms, phi threshold 8): both are agent settings (`gossip_interval_ms`,
//! `phi_threshold`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{
    agents,
    kernel::{self, KernelWatch},
    report::{self, Report, Spread, Table},
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
    let watches: Vec<KernelWatch> = c
        .hosts()
        .iter()
        .map(|h| KernelWatch::start(h, POLL))
        .collect::<Result<_>>()?;
    let mut evict = Vec::new();
    let mut recover = Vec::new();
    for run in 0..runs {
        eprintln!("==> failover run {}", run + 1);
        let started = Instant::now();
        c.host_mut(VICTIM).kill_agent()?;
        c.underlay().sh(&format!("ip link set {link} down"))?;
        let times = kernel::until_all(
            &[&watches[0], &watches[1]],
            started,
            Duration::from_secs(30),
            "host3's task evicted",
            move |k| {
                Ok(!k
                    .published_backends(agents::PUBLISHED)?
                    .is_some_and(|b| b.contains(&victim_ip)))
            },
        )?;
        evict.push(times.into_iter().max().expect("two nodes"));

        let started = Instant::now();
        c.underlay().sh(&format!("ip link set {link} up"))?;
        c.host_mut(VICTIM).restart_agent()?;
        let all: Vec<&KernelWatch> = watches.iter().collect();
        let times = kernel::until_all(
            &all,
            started,
            Duration::from_secs(30),
            "host3's task back",
            move |k| {
                Ok(k.published_backends(agents::PUBLISHED)?
                    .is_some_and(|b| b.contains(&victim_ip)))
            },
        )?;
        recover.push(times.into_iter().max().expect("three nodes"));
        // The next run starts from a healed cluster: every node sees host3 Ready.
        agents::ready_everywhere(&c, Duration::from_secs(20))?;
    }
    let (mut read, mut read_max) = (Duration::ZERO, Duration::ZERO);
    for w in &watches {
        let (_, mean, max) = w.resolution();
        read = read.max(mean);
        read_max = read_max.max(max);
    }
    drop(watches);
    let mut report = Report::new("Failover: a dead node's tasks evicted and restored");
    report.ran(format!(
        "3 namespace hosts with agents (gossip every 100 ms, phi threshold 8), service whoami \
         with a task on each; {runs} runs of: SIGKILL host3's agent + `ip link set h3 down` on \
         the underlay bridge, then link up + agent restart; each node's LB maps read from its \
         kernel every {} ms by one long-lived reader per node (no agent asked, no process per \
         read; a round of reads took {} µs on average, {} µs at most)",
        POLL.as_millis(),
        read.as_micros(),
        read_max.as_micros()
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
    report.note(format!(
        "Load average (1/5/15 min) at the end: {} (a shared 2-core machine).",
        report::load_average()
    ));
    report.note(
        "The task process on host3 keeps running while its agent is dead (tasks outlive the \
         agent); recovery is the restarted agent adopting it and re-asserting its endpoint.",
    );
    drop(c);
    Ok(report)
}
