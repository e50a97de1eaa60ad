//! Gossip at scale: N agents (10, 50, 200) as separate processes in one network namespace,
//! each on its own loopback address (127.0.0.i), running the control plane only (gossip,
//! merged view, API; `--control-plane-only`, no eBPF, overlay or tasks, so hundreds fit on
//! one machine). Measured: time until every agent sees all N nodes Ready after start
//! (membership), time until every agent's API lists a network created on agent 1, and
//! gossip bandwidth per node.
//!
//! Bandwidth is read from the namespace's loopback counters (/proc/net/dev: the namespace
//! carries nothing but the agents' gossip; API calls use unix sockets), divided by N.
//! Each agent is polled through its API socket; the pollers only ask agents that have not
//! converged yet, so the resolution is one poll round (stated in the table).

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_tests::{Netns, cluster::bin};

use super::{
    agents,
    report::{Plot, Report, Spread, Table},
};

struct Point {
    agents: usize,
    membership: Duration,
    converge: Vec<Duration>,
    /// Poll round at the end of the measurement: the resolution.
    round: Duration,
    idle_bps: f64,
    change_bytes: f64,
    rss_kib: f64,
}

pub fn run(quick: bool) -> Result<Report> {
    let sizes: &[usize] = if quick { &[10, 50] } else { &[10, 50, 200] };
    let changes = if quick { 2 } else { 3 };
    // 200 agents converge in tens of seconds on 2 cores: two changes are enough there.
    let changes_at = |n: usize| if n >= 200 { 2 } else { changes };
    let window = if quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(5)
    };
    let mut points = Vec::new();
    for n in sizes {
        eprintln!("==> {n} control-plane agents");
        points.push(point(*n, changes_at(*n), window)?);
    }
    let mut report = Report::new("Gossip convergence at scale (control-plane-only agents)");
    report.ran(format!(
        "N mesh-agent processes with --control-plane-only in one netns on 127.0.0.1..N, each \
         joining agents 1 and 2; gossip interval 100 ms (default); {changes} network creates \
         on agent 1 per N (2 at 200); idle bandwidth over {} s; each agent's view read through \
         its API socket by the bench's pollers (4 threads, no process per read; the agents \
         run without a data path, so their view is what there is to time), each agent at most \
         every max(N, 10) ms",
        window.as_secs()
    ));
    let mut t = Table::new(
        "time until every agent sees it; bandwidth per node",
        &[
            "agents",
            "membership (all see all Ready)",
            "network create seen by all (min / median / max)",
            "poll round",
            "idle gossip per node",
            "bytes per node per change",
            "RSS per agent",
        ],
    );
    for p in &points {
        t.row(vec![
            p.agents.to_string(),
            format!("{:.1} s", p.membership.as_secs_f64()),
            Spread::of_durations(&p.converge).map_or("-".into(), |s| s.show(0, " ms")),
            format!("{} ms", p.round.as_millis()),
            format!("{:.1} KB/s", p.idle_bps / 1000.0),
            if p.change_bytes > 0.0 {
                format!("{:.1} KB", p.change_bytes / 1000.0)
            } else {
                "within idle noise".into()
            },
            format!("{:.1} MiB", p.rss_kib / 1024.0),
        ]);
    }
    report.tables.push(t);
    report.plots.push(Plot {
        stem: "convergence".into(),
        title: "time until every agent sees a new network".into(),
        xlabel: "agents".into(),
        ylabel: "ms (median)".into(),
        logx: false,
        logy: false,
        series: vec![(
            "network create → seen by all".into(),
            points
                .iter()
                .map(|p| {
                    (
                        p.agents as f64,
                        Spread::of_durations(&p.converge).map_or(0.0, |s| s.median),
                    )
                })
                .collect(),
        )],
    });
    report.note(
        "All agents share this machine's 2 cores: at 200 agents the CPU, not the network, \
         bounds gossip rounds (load average above 200 during that step), so convergence at \
         that size is pessimistic for a real cluster (one agent per machine).",
    );
    report.note(
        "The pollers are paced: every API read is a process switch into an agent on the \
         same 2 cores (agents reuse their view while gossip has not moved, so a read no \
         longer recomputes it), and 200 agents polled flat out would measure the pollers.",
    );
    Ok(report)
}

struct Agents {
    ns: Option<Netns>,
    children: Vec<Child>,
    dirs: Vec<PathBuf>,
    logs: PathBuf,
}

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        let _ = std::fs::remove_dir_all(&self.logs);
        drop(self.ns.take());
    }
}

fn point(n: usize, changes: usize, window: Duration) -> Result<Point> {
    let tag = format!("bench{}xcp{n}", std::process::id());
    let ns = Netns::create(&tag)?;
    let logs = std::env::temp_dir().join(format!("{tag}-logs"));
    std::fs::create_dir_all(&logs)?;
    let mut group = Agents {
        ns: None,
        children: Vec::new(),
        dirs: Vec::new(),
        logs: logs.clone(),
    };
    let agent = bin("mesh-agent");
    // Agents refuse to gossip without a key; the bench measures sealed gossip, as deployed.
    let key = logs.join("cluster.key");
    let keygen = std::process::Command::new(&agent)
        .arg("keygen")
        .arg("--out")
        .arg(&key)
        .output()
        .context("running mesh-agent keygen")?;
    if !keygen.status.success() {
        anyhow::bail!(
            "mesh-agent keygen failed: {}",
            String::from_utf8_lossy(&keygen.stderr)
        );
    }
    let mut sockets = Vec::new();
    for i in 1..=n {
        let name = format!("{tag}-a{i}");
        let dir = PathBuf::from("/run/mesh").join(&name);
        let socket = dir.join("agent.sock");
        let ip = format!("127.0.0.{i}");
        let seeds: Vec<String> = [1, 2]
            .into_iter()
            .filter(|s| *s != i && *s <= n)
            .map(|s| format!("127.0.0.{s}"))
            .collect();
        let log = std::fs::File::create(logs.join(format!("a{i}.log")))?;
        let child = ns
            .command(agent.to_str().context("utf-8 path")?)
            .args(["run", "--control-plane-only", "--interface", "lo"])
            .args(["--node-name", &name, "--advertise", &ip])
            .args(seeds.iter().flat_map(|s| ["--join", s.as_str()]))
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--config", "/dev/null"])
            .arg("--cluster-key-file")
            .arg(&key)
            .env("MESH_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning mesh-agent")?;
        group.children.push(child);
        group.dirs.push(dir);
        sockets.push(socket);
    }
    group.ns = Some(ns);
    let started = Instant::now();
    let ready = format!("\"status\":\"{:?}\"", mesh_api::spec::NodeStatus::Ready);
    let (membership, _) = until_all(&sockets, started, Duration::from_secs(120), |s| {
        let body = http(s, "GET", "/v1/nodes", None)?;
        Ok(body.matches(&ready).count() == n)
    })
    .with_context(|| {
        format!(
            "{n} agents did not all see each other; logs in {}",
            logs.display()
        )
    })?;
    eprintln!(
        "    membership converged in {:.1} s",
        membership.as_secs_f64()
    );
    // Let start-up traffic settle, then measure the steady state.
    std::thread::sleep(Duration::from_secs(1));
    let ns = group.ns.as_ref().expect("set");
    let tx0 = lo_tx_bytes(ns)?;
    let t0 = Instant::now();
    std::thread::sleep(window);
    let idle_bps = (lo_tx_bytes(ns)? - tx0) as f64 / t0.elapsed().as_secs_f64() / n as f64;

    let mut converge = Vec::new();
    let mut round = Duration::ZERO;
    let mut change_bytes = Vec::new();
    for k in 0..changes {
        let name = format!("conv{k}");
        let body = format!(r#"{{"name":"{name}","subnet":"10.77.{k}.0/24"}}"#);
        let first = sockets[0].clone();
        let tx0 = lo_tx_bytes(ns)?;
        let started = Instant::now();
        // The create waits out the settle time before it answers; others see it earlier.
        let create = std::thread::spawn(move || http(&first, "POST", "/v1/networks", Some(&body)));
        let needle = format!("\"name\":\"{name}\"");
        let (took, r) = until_all(&sockets, started, Duration::from_secs(60), |s| {
            Ok(http(s, "GET", "/v1/networks", None)?.contains(&needle))
        })?;
        let tx = lo_tx_bytes(ns)? - tx0;
        let elapsed = started.elapsed().as_secs_f64();
        let reply = create.join().expect("create thread")?;
        if !reply.contains(&needle) {
            bail!("creating network {name} failed: {reply}");
        }
        converge.push(took);
        round = r;
        // Bytes beyond the idle rate while the change spread, per node.
        change_bytes.push(((tx as f64 - idle_bps * n as f64 * elapsed) / n as f64).max(0.0));
        eprintln!(
            "    network {name} seen by all {n} in {} ms",
            took.as_millis()
        );
    }
    let rss: u64 = group
        .children
        .iter()
        .map(|c| agents::usage(c.id()).map(|(rss, _)| rss).unwrap_or(0))
        .sum();
    drop(group);
    Ok(Point {
        agents: n,
        membership,
        converge,
        round,
        idle_bps,
        change_bytes: Spread::of(&change_bytes).map_or(0.0, |s| s.median),
        rss_kib: rss as f64 / n as f64,
    })
}

/// Polls every socket with `check` (4 threads, each over its share, asking only those not
/// yet true) until all are true; returns when the last one became true, measured from
/// `since`, and the duration of the last poll round.
fn until_all(
    sockets: &[PathBuf],
    since: Instant,
    timeout: Duration,
    check: impl Fn(&Path) -> Result<bool> + Sync,
) -> Result<(Duration, Duration)> {
    let last = Arc::new(Mutex::new((Duration::ZERO, Duration::ZERO)));
    let check = &check;
    // Polling N agents flat out would load the CPU they share: each agent is asked at most
    // every N ms (10 ms at least).
    let pause = Duration::from_millis(sockets.len().max(10) as u64);
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let mine: Vec<&PathBuf> = sockets.iter().skip(w).step_by(4).collect();
                let last = last.clone();
                scope.spawn(move || -> Result<()> {
                    let mut pending = mine;
                    while !pending.is_empty() {
                        let round = Instant::now();
                        let mut still = Vec::new();
                        for s in pending {
                            // An agent still starting does not answer yet: not converged.
                            if check(s).unwrap_or(false) {
                                let at = since.elapsed();
                                let mut l = last.lock().expect("lock");
                                l.0 = l.0.max(at);
                                l.1 = l.1.max(round.elapsed());
                            } else {
                                still.push(s);
                            }
                        }
                        pending = still;
                        if since.elapsed() > timeout {
                            let first = pending[0];
                            let why = match check(first) {
                                Ok(_) => "it answers, but not yet with the change".to_owned(),
                                Err(e) => format!("{e:#}"),
                            };
                            bail!(
                                "{} agents not there after {timeout:?}, e.g. {}: {why}",
                                pending.len(),
                                first.display()
                            );
                        }
                        if !pending.is_empty() {
                            std::thread::sleep(pause.saturating_sub(round.elapsed()));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().expect("poller")?;
        }
        Ok(())
    })?;
    let l = *last.lock().expect("lock");
    Ok(l)
}

/// One HTTP/1.1 request to an agent's API socket; the response body.
fn http(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<String> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (_, body) = out.split_once("\r\n\r\n").context("no HTTP response")?;
    Ok(body.to_owned())
}

fn lo_tx_bytes(ns: &Netns) -> Result<u64> {
    let text = ns.sh("cat /proc/net/dev")?;
    // "lo: rx_bytes rx_packets … (8 rx fields) tx_bytes …"
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("lo:"))
        .context("no lo in /proc/net/dev")?;
    let fields: Vec<&str> = line
        .split(':')
        .nth(1)
        .context("lo line")?
        .split_whitespace()
        .collect();
    Ok(fields.get(8).context("tx bytes")?.parse()?)
}
