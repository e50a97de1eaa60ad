//! The request path: wrk against the same mesh-whoami task, directly, through the routing
//! mesh (published port on the task's node, and on a node without tasks) and through an
//! nftables DNAT baseline built the way Docker or kube-proxy build theirs.
//!
//! ```text
//!  client (192.0.2.100) ──► host1 192.0.2.1 ── bridge ── task whoami-1 (10.10.0.x:80)
//!                      └──► host2 192.0.2.2 ══ VXLAN ══┘
//! ```
//!
//! - direct: the client routes the overlay subnet via host1 and talks to the task.
//! - mesh local / remote: `host1:8080` / `host2:8080`, the published port (TC eBPF: flow
//!   table, SNAT, redirect; no netfilter on the path).
//! - nft local / remote: `host1:8081` / `host2:8081`: a `nat` table with
//!   `dnat to numgen inc mod N map { … }` over the service's tasks, conntrack, and on host2
//!   masquerade towards the overlay (the reply must come back through host2 to be
//!   un-NATed; Docker's ingress network does the same SNAT).

use std::process::Command;

use anyhow::{Context, Result, bail};
use mesh_tests::Netns;

use super::{
    agents,
    report::{Report, Table},
};

const BASELINE_PORT: u16 = 8081;
const CLIENT: &str = "192.0.2.100";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Direct,
    MeshLocal,
    MeshRemote,
    NftLocal,
    NftRemote,
}

const PATHS: [Path; 5] = [
    Path::Direct,
    Path::MeshLocal,
    Path::MeshRemote,
    Path::NftLocal,
    Path::NftRemote,
];

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Direct => "direct to the task",
            Path::MeshLocal => "mesh → local task",
            Path::MeshRemote => "mesh → remote task",
            Path::NftLocal => "nft DNAT → local task",
            Path::NftRemote => "nft DNAT → remote task",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    KeepAlive,
    Close,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::Close => "Connection: close",
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Wrk {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

pub fn run(quick: bool) -> Result<Report> {
    super::require(&[("wrk", "wrk"), ("nft", "nftables"), ("curl", "curl")])?;
    let (seconds, reps) = if quick { (2, 1) } else { (4, 3) };
    let mut c = agents::cluster(3)?;
    let tasks = agents::whoami(&c, &[1])?;
    let task_ip = tasks[0].ip;
    c.external("client", 100)?;
    let client = c.external_ns("client").context("client namespace")?;
    // "direct": the client reaches the overlay through the task's node, as a router would.
    client.sh(&format!(
        "ip route add {} via {}",
        agents::SUBNET,
        c.host(1).ip
    ))?;
    let backends: Vec<String> = tasks.iter().map(|t| t.ip.to_string()).collect();
    nft_baseline(&c.host(1).ns, &backends, false)?;
    nft_baseline(&c.host(2).ns, &backends, true)?;

    let url = |p: Path| match p {
        Path::Direct => format!("http://{task_ip}:80/"),
        Path::MeshLocal => format!("http://{}:{}/", c.host(1).ip, agents::PUBLISHED),
        Path::MeshRemote => format!("http://{}:{}/", c.host(2).ip, agents::PUBLISHED),
        Path::NftLocal => format!("http://{}:{BASELINE_PORT}/", c.host(1).ip),
        Path::NftRemote => format!("http://{}:{BASELINE_PORT}/", c.host(2).ip),
    };
    for p in PATHS {
        let out = client.sh_output(&format!("curl -s --max-time 3 {}", url(p)))?;
        let body = String::from_utf8_lossy(&out.stdout);
        if !body.contains("whoami-1") {
            bail!(
                "{} ({}) does not answer before the benchmark: {body:?} {}",
                p.label(),
                url(p),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    let mut results: Vec<(Mode, Path, Vec<Wrk>)> = Vec::new();
    for mode in [Mode::KeepAlive, Mode::Close] {
        for p in PATHS {
            results.push((mode, p, Vec::new()));
        }
    }
    // Paths interleaved, repeated: drift in what else the machine runs spreads over all.
    for rep in 0..reps {
        for (mode, p, runs) in &mut results {
            eprintln!(
                "==> wrk {}s, {} ({}), run {}",
                seconds,
                p.label(),
                mode.label(),
                rep + 1
            );
            runs.push(wrk(client, &url(*p), *mode, seconds)?);
        }
    }

    let mut report = Report::new("Request path: routing mesh vs direct vs nftables DNAT");
    report.ran(
        "3 namespace hosts with agents, service whoami (1 task, mesh-whoami, on host1) \
         published on 8080; client namespace on the underlay bridge",
    );
    report.ran(format!(
        "wrk -t1 -c16 -d{seconds}s --latency, keep-alive and with `Connection: close`; \
         {reps} run(s) per path, paths interleaved; the table shows the median run"
    ));
    report.ran(format!(
        "nft baseline built by the bench: host1 and host2 `nat` prerouting \
         `tcp dport {BASELINE_PORT} dnat to numgen inc mod {n} map {{ … }}:80`, conntrack, \
         host2 masquerade to the overlay",
        n = backends.len()
    ));
    let mut ratios = Vec::new();
    for mode in [Mode::KeepAlive, Mode::Close] {
        let mut t = Table::new(
            &format!("{} (ratio = RPS / direct RPS)", mode.label()),
            &[
                "path",
                "requests/s",
                "p50",
                "p99",
                "ratio to direct",
                "failed",
            ],
        );
        let median = |p: Path| -> Wrk {
            let runs = &results
                .iter()
                .find(|(m, q, _)| *m == mode && *q == p)
                .expect("every path ran")
                .2;
            let mut sorted = runs.clone();
            sorted.sort_by(|a, b| a.rps.total_cmp(&b.rps));
            sorted[sorted.len() / 2]
        };
        let direct = median(Path::Direct);
        for p in PATHS {
            let w = median(p);
            t.row(vec![
                p.label().to_owned(),
                format!("{:.0}", w.rps),
                us(w.p50_us),
                us(w.p99_us),
                format!("{:.2}", w.rps / direct.rps),
                w.errors.to_string(),
            ]);
        }
        let local = median(Path::MeshLocal).rps / direct.rps;
        let remote = median(Path::MeshRemote).rps / median(Path::NftRemote).rps;
        let nft_local = median(Path::MeshLocal).rps / median(Path::NftLocal).rps;
        ratios.push((mode, local, remote, nft_local));
        report.tables.push(t);
    }
    let mut goals = Table::new(
        "Goals of issue 4/8: mesh ≥ 0.95 × direct (local), mesh ≥ 1.2 × nft DNAT (remote)",
        &[
            "mode",
            "mesh local / direct",
            "mesh remote / nft remote",
            "mesh local / nft local",
        ],
    );
    for (mode, local, remote, nft_local) in &ratios {
        goals.row(vec![
            mode.label().to_owned(),
            format!("{local:.2} ({})", met(*local >= 0.95)),
            format!("{remote:.2} ({})", met(*remote >= 1.2)),
            format!("{nft_local:.2}"),
        ]);
    }
    report.tables.push(goals);
    report.note(
        "wrk, the task and the kernel's softirq work share the same 2 cores: RPS is bounded by \
         CPU, so the ratios compare CPU cost per request along each path.",
    );
    report.note(
        "failed = wrk's connect, write and timeout errors and non-2xx answers (and read errors \
         with keep-alive; with `Connection: close` wrk counts the server's close as a read \
         error, so those are left out).",
    );
    drop(c);
    Ok(report)
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

fn us(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

/// The old way on one node: DNAT the baseline port round robin over the tasks (numgen),
/// tracked by conntrack; `masquerade` when the tasks are on other nodes, so replies return
/// through this node to be un-NATed.
fn nft_baseline(ns: &Netns, backends: &[String], masquerade: bool) -> Result<()> {
    let map: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{i} : {b}"))
        .collect();
    let mut script = format!(
        "table ip mesh_bench_dnat {{\n\
           chain prerouting {{\n\
             type nat hook prerouting priority dstnat; policy accept;\n\
             tcp dport {BASELINE_PORT} dnat to numgen inc mod {n} map {{ {map} }}:80\n\
           }}\n",
        n = backends.len(),
        map = map.join(", ")
    );
    if masquerade {
        script.push_str(&format!(
            "  chain postrouting {{\n\
               type nat hook postrouting priority srcnat; policy accept;\n\
               ip saddr {CLIENT} ip daddr {} tcp dport 80 masquerade\n\
             }}\n",
            agents::SUBNET
        ));
    }
    script.push_str("}\n");
    let path = std::env::temp_dir().join(format!(
        "mesh-bench-nft-{}-{}.nft",
        std::process::id(),
        ns.name()
    ));
    std::fs::write(&path, script)?;
    let r = ns.sh(&format!("nft -f {}", path.display()));
    let _ = std::fs::remove_file(&path);
    r.map(|_| ()).context("loading the nftables DNAT baseline")
}

fn wrk(client: &Netns, url: &str, mode: Mode, seconds: u32) -> Result<Wrk> {
    let mut cmd: Command = client.command("wrk");
    cmd.args(["-t1", "-c16", &format!("-d{seconds}s"), "--latency"]);
    if mode == Mode::Close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd.arg(url).output().context("running wrk")?;
    let close = mode == Mode::Close;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "wrk {url} failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text, close).with_context(|| format!("reading wrk's output:\n{text}"))
}

/// With `close`, the server ends every connection after its answer, which wrk counts as a
/// read error: those are not failures then.
fn parse_wrk(text: &str, close: bool) -> Result<Wrk> {
    let mut w = Wrk::default();
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("Requests/sec:") => {
                w.rps = words.next().context("no value")?.parse()?;
            }
            Some("50%") => w.p50_us = duration_us(words.next().context("no value")?)?,
            Some("99%") => w.p99_us = duration_us(words.next().context("no value")?)?,
            Some("Socket") => {
                // "Socket errors: connect 0, read 0, write 0, timeout 0"
                for part in line.trim_start_matches("Socket errors:").split(',') {
                    let mut kv = part.split_whitespace();
                    let (Some(kind), Some(n)) = (kv.next(), kv.next()) else {
                        continue;
                    };
                    if !(close && kind == "read") {
                        w.errors += n.parse::<u64>().unwrap_or(0);
                    }
                }
            }
            Some("Non-2xx") => {
                w.errors += line
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            _ => {}
        }
    }
    if w.rps == 0.0 {
        bail!("no Requests/sec");
    }
    Ok(w)
}

/// wrk prints durations as `123.45us`, `1.23ms`, `1.02s`.
fn duration_us(s: &str) -> Result<f64> {
    let (num, factor) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        bail!("unknown duration {s:?}");
    };
    Ok(num.parse::<f64>()? * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let text = "Running 2s test @ http://192.0.2.1:8080/\n  1 threads and 16 connections\n  \
            Latency Distribution\n     50%  312.00us\n     75%  400.00us\n     90%  1.10ms\n     \
            99%    2.05ms\n  20000 requests in 2.00s, 1.5MB read\n  Socket errors: connect 0, \
            read 3, write 0, timeout 1\nRequests/sec:  10000.50\nTransfer/sec:    700KB\n";
        let w = parse_wrk(text, false).unwrap();
        assert_eq!(w.rps, 10000.5);
        assert_eq!(w.p50_us, 312.0);
        assert_eq!(w.p99_us, 2050.0);
        assert_eq!(w.errors, 4);
        assert_eq!(parse_wrk(text, true).unwrap().errors, 1);
    }
}
