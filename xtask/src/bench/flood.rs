//! A flood at a published port, measured: spoofed SYNs, then spoofed UDP datagrams, from
//! random sources (a raw socket in an outside namespace) at one node, while a keep-alive
//! connection asks every 10 ms and a second client opens 100 new connections a second, paced
//! by a clock, each with 1 s to be answered. Reported: the flood's rate, whether the
//! keep-alive connection survived and how many of its requests were answered, the share of
//! new connections answered within 1 s and the longest stretch with none, and what the flow
//! tables did (embryonic flows evicted, established flows kept).

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use mesh_tests::{
    Cluster,
    availability::{Availability, Probe},
    flood::{FloodKind, FloodReport, flood_at, scrape},
    workload::{Session, http_get},
};

use super::report::{Report, Table};

const METRICS: &str = "127.0.0.1:9464";
/// The agent's default: the flood meets the table a node really has.
const EMBRYONIC: u32 = 8192;
/// What the namespaces' veth and bridge links carry on this 2-core machine without
/// dropping (faster, the links drop legitimate packets with the flood's, which measures the
/// machine, not the routing mesh).
const PPS: u64 = 40_000;

struct Round {
    kind: FloodKind,
    sent: FloodReport,
    kept: (usize, usize),
    newcomers: Availability,
    created: f64,
    evicted: f64,
}

/// New connections may not stop for longer than this during a flood.
const MAX_GAP: Duration = Duration::from_millis(500);

pub fn run(quick: bool) -> Result<Report> {
    let packets: u64 = if quick { 100_000 } else { 300_000 };
    let mut c = Cluster::with_prefix("bench", 1)?;
    let config = c.log_dir().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "metrics_listen = \"{METRICS}\"\n\n[dataplane]\nmax_embryonic_flows = {EMBRYONIC}\n"
        ),
    )?;
    c.host_mut(1)
        .start_agent(&["--config", config.to_str().context("utf-8 path")?])?;
    c.external("client", 100)?;
    c.external("flooder", 66)?;
    c.create_network("app", "10.10.0.0/24")?;
    c.create_service("web", "app", &["-p", "8080:80", "-p", "5353:53/udp"])?;
    c.host(1)
        .run_whoami::<serde_json::Value>("app", Some("web"), "web-1", &["--udp", "53"])?;
    let web: SocketAddr = format!("{}:8080", c.host(1).ip).parse()?;
    let client = c.external_ns("client").context("client namespace")?;
    c.eventually(Duration::from_secs(10), "web answers", |_| {
        Ok(client.run(move || http_get(web))?.ok().map(|_| ()))
    })?;
    let SocketAddr::V4(tcp_target) = web else {
        unreachable!("an IPv4 address")
    };
    let metrics: SocketAddr = METRICS.parse()?;

    let mut rounds = Vec::new();
    for (kind, port, seed) in [(FloodKind::Syn, 8080, 7), (FloodKind::Udp, 5353, 11)] {
        eprintln!("==> flood: {packets} spoofed {kind:?} packets");
        let target = SocketAddrV4::new(*tcp_target.ip(), port);
        let before = c.host(1).ns.run(move || scrape(metrics))??;
        // The keep-alive connection, opened before the flood and asked throughout.
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let keep = client.spawn_thread(move || -> Result<(usize, usize)> {
            let mut s = Session::open(web)?;
            let (mut ok, mut failed) = (0, 0);
            while !flag.load(Ordering::SeqCst) {
                match s.http_get() {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok((ok, failed))
        })?;
        std::thread::sleep(Duration::from_millis(100));
        let newcomers = Probe::start(client, web)?;
        let flooder = c.external_ns("flooder").context("flooder namespace")?;
        let sent = flooder.run(move || flood_at(kind, target, packets, seed, Some(PPS)))??;
        let newcomers = newcomers.finish();
        stop.store(true, Ordering::SeqCst);
        let kept = keep
            .join()
            .map_err(|_| anyhow::anyhow!("keep-alive thread panicked"))???;
        let after = c.host(1).ns.run(move || scrape(metrics))??;
        let delta =
            |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
        rounds.push(Round {
            kind,
            sent,
            kept,
            newcomers,
            created: delta("mesh_flows_created_total"),
            evicted: delta("mesh_flows_embryonic_evicted_total"),
        });
    }

    let mut report = Report::new("Flood: spoofed SYN and UDP floods at a published port");
    report.ran(format!(
        "1 namespace host with an agent (max_embryonic_flows = {EMBRYONIC}, the default), \
         service web (8080/tcp, 5353/udp) with one local task; per round {packets} packets \
         from random 198.18.0.0/15 sources and ports at up to {PPS} packets/s, from a raw \
         socket in an outside namespace; during it a keep-alive HTTP connection (opened before) \
         asks every 10 ms and another client opens {} new connections a second, paced by a \
         clock, each with {} ms to be answered (connect included)",
        mesh_tests::availability::RATE,
        mesh_tests::availability::BUDGET.as_millis(),
    ));
    let mut t = Table::new(
        "per flood",
        &[
            "flood",
            "packets/s",
            "keep-alive connection",
            "new connections answered within 1 s",
            "longest gap without an answer",
            "flows created",
            "embryonic evicted",
            "target",
        ],
    );
    for r in &rounds {
        let n = &r.newcomers;
        let served = n.ok as f64 / n.sent.max(1) as f64;
        let survived = r.kept.1 == 0 && r.kept.0 > 0;
        t.row(vec![
            match r.kind {
                FloodKind::Syn => "TCP SYN".into(),
                FloodKind::Udp => "UDP".into(),
            },
            format!("{:.0}", r.sent.pps()),
            format!(
                "{} ({} answered, {} failed)",
                if survived { "survived" } else { "BROKEN" },
                r.kept.0,
                r.kept.1
            ),
            format!("{:.1} % ({} of {})", served * 100.0, n.ok, n.sent),
            format!("{} ms", n.gap().as_millis()),
            format!("{:.0}", r.created),
            format!("{:.0}", r.evicted),
            format!(
                "keep-alive survives, ≥ 99 % answered, no gap over {} ms ({})",
                MAX_GAP.as_millis(),
                if survived && served >= 0.99 && n.gap() <= MAX_GAP {
                    "met"
                } else {
                    "NOT met"
                }
            ),
        ]);
    }
    report.tables.push(t);
    for r in &rounds {
        report.note(format!(
            "{:?} flood, new connections: {}",
            r.kind, r.newcomers
        ));
    }
    report.note(
        "A flood lands in the embryonic flow table only (flows whose client has not answered \
         the backend): its LRU evicts flood entries, and established flows live in a table \
         only promotions fill. Embryonic evictions are estimated from the counters (created − \
         established − swept − still embryonic).",
    );
    drop(c);
    Ok(report)
}
