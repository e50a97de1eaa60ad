//! What an agent costs its node: resident memory and CPU, idle and with 10,000 services.
//!
//! Read from /proc (VmRSS; utime + stime over a window) for each of the 3 agents of a
//! namespace cluster running one service with a task per node. "Idle" means nothing is
//! asked of the agents: they gossip (100 ms interval), recompute the view on changes and
//! reconcile every second.

use std::time::Duration;

use anyhow::{Context, Result};
use mesh_tests::Cluster;

use super::{
    agents, programming,
    report::{Report, Table},
};

pub fn run(quick: bool) -> Result<Report> {
    let window = if quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(10)
    };
    let mut c = agents::cluster(3)?;
    agents::whoami(&c, &[1, 2, 3])?;
    // Let start-up work (first reconciles, DNS listeners) finish before measuring.
    std::thread::sleep(Duration::from_secs(2));
    let idle = measure(&c, window)?;
    let bulk = programming::bulk_services(&mut c, programming::BULK_SERVICES)?;
    std::thread::sleep(Duration::from_secs(2));
    let loaded = measure(&c, window)?;

    let mut report = Report::new("Footprint: agent memory and CPU");
    report.ran(format!(
        "3 namespace hosts with agents (release build), service whoami with a task on each; \
         CPU over {} s windows measured on all agents at once; then {} services added \
         (programmed everywhere in {:.1} s) and measured again",
        window.as_secs(),
        programming::BULK_SERVICES,
        bulk.per_node
            .values()
            .max()
            .map_or(0.0, |d| d.as_secs_f64())
    ));
    let mut t = Table::new(
        "per agent (CPU: 100% = one core)",
        &[
            "node",
            "RSS idle",
            "CPU idle",
            &format!("RSS, {} services", programming::BULK_SERVICES),
            &format!("CPU, {} services", programming::BULK_SERVICES),
            "RSS ratio",
        ],
    );
    for ((node, (cpu0, rss0)), (_, (cpu1, rss1))) in idle.iter().zip(&loaded) {
        t.row(vec![
            format!("host{node}"),
            mib(*rss0),
            format!("{:.1}%", cpu0 * 100.0),
            mib(*rss1),
            format!("{:.1}%", cpu1 * 100.0),
            format!("{:.1}", *rss1 as f64 / *rss0 as f64),
        ]);
    }
    report.tables.push(t);
    report.note(
        "host1's agent was restarted to inject the services (see Programming), so its idle \
         column is a different process from its loaded one.",
    );
    drop(c);
    Ok(report)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// (node, (CPU share, RSS KiB)) for every agent, measured over the same window.
fn measure(c: &Cluster, window: Duration) -> Result<Vec<(usize, (f64, u64))>> {
    let pids: Vec<(usize, u32)> = c
        .hosts()
        .iter()
        .map(|h| Ok((h.index, h.agent_pid().context("agent not running")?)))
        .collect::<Result<_>>()?;
    let threads: Vec<_> = pids
        .into_iter()
        .map(|(node, pid)| std::thread::spawn(move || (node, agents::cpu_over(pid, window))))
        .collect();
    threads
        .into_iter()
        .map(|t| {
            let (node, r) = t.join().expect("measuring thread");
            Ok((node, r?))
        })
        .collect()
}
