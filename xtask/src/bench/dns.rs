//! mesh-dns against dnsmasq: the same hosts file served by both on loopback, the same dnsperf
//! query file sent to each in turn, queries/s and latency side by side.
//!
//! Both servers get one thread (dnsmasq has no more; mesh-dns runs a 1-worker tokio runtime),
//! so dnsperf has the machine's other core. Everything lives in a temporary directory that is
//! removed at the end, and both servers are stopped by PID.

use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::report::{Report, Table};

/// Services in the table; each has a VIP and `TASKS_PER_SERVICE` tasks.
const SERVICES: u32 = 500;
const TASKS_PER_SERVICE: u32 = 3;
const NETWORK: &str = "bench";
/// Same TTL for both, so neither gains from a cheaper answer.
const TTL: u32 = 2;
/// Rate of the latency-percentile pass: well under what either server sustains.
const PACED_QPS: u32 = 10_000;

pub fn run(quick: bool) -> Result<Report> {
    let seconds = if quick { 3 } else { 10 };
    for tool in ["dnsperf", "dnsmasq"] {
        if super::which(tool).is_none() {
            bail!(
                "{tool} is not installed; scripts/setup.sh installs it (Debian packages dnsperf, dnsmasq-base)"
            );
        }
    }
    let dir = TempDir::create()?;
    let hosts = dir.path().join("hosts");
    let queries = dir.path().join("queries");
    fs::write(&hosts, hosts_file())?;
    fs::write(&queries, query_file())?;

    let serve = build_serve_example()?;
    // One loopback address per run, from our PID, so parallel runs and other tests on this
    // machine do not collide.
    let pid = std::process::id();
    let ip = Ipv4Addr::new(127, 53, (pid >> 8) as u8, (pid % 250) as u8 + 1);
    let mesh_addr = SocketAddr::from((ip, 5353));
    let dnsmasq_addr = SocketAddr::from((ip, 5354));

    let mesh = Server::start(
        "mesh-dns",
        Command::new(&serve).args([
            "--listen",
            &mesh_addr.to_string(),
            "--hosts",
            path_str(&hosts)?,
            "--network",
            NETWORK,
            "--threads",
            "1",
        ]),
        dir.path(),
        mesh_addr,
    )?;
    let dnsmasq = Server::start(
        "dnsmasq",
        Command::new("dnsmasq").args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            &format!("--addn-hosts={}", path_str(&hosts)?),
            &format!("--listen-address={ip}"),
            "--bind-interfaces",
            &format!("--port={}", dnsmasq_addr.port()),
            "--pid-file",
            "--user=root",
            "--group=root",
            &format!("--local-ttl={TTL}"),
            &format!("--local=/{NETWORK}/"),
            "--log-facility=-",
        ]),
        dir.path(),
        dnsmasq_addr,
    )?;

    eprintln!(
        "==> dnsperf, {seconds} s each, {} queries in the file ({SERVICES} services x {TASKS_PER_SERVICE} tasks)",
        SERVICES * 4
    );
    let mut mesh_result =
        dnsperf(mesh_addr, &queries, seconds).context("dnsperf against mesh-dns")?;
    let mut dnsmasq_result =
        dnsperf(dnsmasq_addr, &queries, seconds).context("dnsperf against dnsmasq")?;
    // dnsperf reports no percentiles; at a fixed moderate rate its per-query log gives them
    // (at full speed, writing that log would slow dnsperf itself).
    let latency_seconds = if quick { 2 } else { 5 };
    eprintln!("==> latency at {PACED_QPS} queries/s, {latency_seconds} s each");
    (mesh_result.p50, mesh_result.p99) = paced_latency(mesh_addr, &queries, latency_seconds)?;
    (dnsmasq_result.p50, dnsmasq_result.p99) =
        paced_latency(dnsmasq_addr, &queries, latency_seconds)?;
    drop(mesh);
    drop(dnsmasq);

    let mut report = Report::new("DNS: mesh-dns vs dnsmasq");
    report.ran(format!(
        "dnsperf against mesh-dns (serve example, 1-thread runtime) and dnsmasq, both on \
         loopback serving the same {SERVICES} services x {TASKS_PER_SERVICE} tasks; \
         {seconds} s at full load each (-c 4 -q 64), then {latency_seconds} s each at \
         {PACED_QPS} q/s for percentiles"
    ));
    report.tables.push(table(&mesh_result, &dnsmasq_result));
    for (name, m) in [("mesh-dns", &mesh_result), ("dnsmasq", &dnsmasq_result)] {
        report.note(format!(
            "{name}: completed {}, lost {}, {}",
            m.completed, m.lost, m.codes
        ));
    }
    Ok(report)
}

/// `VIP svc-N svc-N.bench` and `TASK tasks.svc-N tasks.svc-N.bench` lines: the serve example
/// turns them into services with VIPs and tasks; dnsmasq serves them as written.
fn hosts_file() -> String {
    let mut out = String::new();
    for n in 0..SERVICES {
        let (hi, lo) = ((n / 250) as u8, (n % 250) as u8 + 1);
        let _ = writeln!(out, "10.10.{hi}.{lo} svc-{n} svc-{n}.{NETWORK}");
        for t in 1..=TASKS_PER_SERVICE {
            let _ = writeln!(
                out,
                "10.{}.{hi}.{lo} tasks.svc-{n} tasks.svc-{n}.{NETWORK}",
                10 + t
            );
        }
    }
    out
}

/// For each service: its bare name, its network-qualified name, `tasks.` (three records) and
/// AAAA (no records: the moby#35118 case). Every query is answered locally by both servers:
/// AAAA is asked of the qualified name, which dnsmasq treats as local (`--local=/bench/`);
/// for a bare name without upstreams it would answer REFUSED instead of NODATA.
fn query_file() -> String {
    let mut out = String::new();
    for n in 0..SERVICES {
        let _ = writeln!(out, "svc-{n} A");
        let _ = writeln!(out, "svc-{n}.{NETWORK} A");
        let _ = writeln!(out, "tasks.svc-{n} A");
        let _ = writeln!(out, "svc-{n}.{NETWORK} AAAA");
    }
    out
}

pub fn build_serve_example() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("==> cargo build --release -p mesh-dns --example serve");
    let output = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "mesh-dns",
            "--example",
            "serve",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !output.status.success() {
        bail!(
            "building the mesh-dns serve example failed ({})",
            output.status
        );
    }
    // Cargo names the built file in its JSON messages; no parser needed for one field.
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .filter(|line| line.contains(r#""name":"serve""#))
        .find_map(|line| {
            let start = line.find(r#""executable":""#)? + r#""executable":""#.len();
            let end = line[start..].find('"')? + start;
            Some(PathBuf::from(&line[start..end]))
        })
        .context("cargo did not report where it built the serve example")
}

/// A server process we started: stopped by PID when dropped, whatever happens.
struct Server {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Server {
    fn start(
        name: &'static str,
        command: &mut Command,
        dir: &Path,
        addr: SocketAddr,
    ) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let mut server = Server { name, child, log };
        server.wait_ready(addr)?;
        eprintln!("==> {name} answering on {addr} (pid {})", server.child.id());
        Ok(server)
    }

    fn wait_ready(&mut self, addr: SocketAddr) -> Result<()> {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let query = a_query("svc-0");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before answering:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            // The server may not be bound yet: a refused send or a timeout both mean wait.
            if socket.send_to(&query, addr).is_ok()
                && matches!(socket.recv_from(&mut buf), Ok((n, _)) if n >= 12 && buf[..2] == query[..2])
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{} did not answer on {addr} within 10 s:\n{}",
            self.name,
            self.log_text()
        )
    }

    fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = fs::File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Closing stdin lets the serve example print its counters; then stop it for sure.
        drop(self.child.stdin.take());
        std::thread::sleep(Duration::from_millis(100));
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.name == "mesh-dns" {
            let log = self.log_text();
            if let Some(counters) = log.lines().rfind(|l| l.contains("Counters")) {
                eprintln!("==> {counters}");
            }
        }
    }
}

/// A minimal DNS query for `name` A, RD set, by hand: the readiness probe needs nothing more.
fn a_query(name: &str) -> Vec<u8> {
    let mut query = vec![0x6d, 0x65, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    query
}

#[derive(Debug, Default)]
struct Measured {
    qps: f64,
    avg_latency: f64,
    max_latency: f64,
    stddev: f64,
    completed: String,
    lost: String,
    codes: String,
    p50: f64,
    p99: f64,
}

fn dnsperf(addr: SocketAddr, queries: &Path, seconds: u32) -> Result<Measured> {
    let output = Command::new("dnsperf")
        .args([
            "-s",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
            "-d",
            path_str(queries)?,
            "-l",
            &seconds.to_string(),
            // Enough outstanding queries to keep a one-thread server busy without queueing
            // so deep that latency measures only the queue.
            "-c",
            "4",
            "-q",
            "64",
            "-T",
            "1",
        ])
        .output()
        .context("running dnsperf")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "dnsperf failed ({}):\n{text}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let field = |label: &str| -> Option<&str> {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(label))
            .map(str::trim)
    };
    let number = |label: &str| -> Result<f64> {
        let value =
            field(label).with_context(|| format!("dnsperf printed no {label:?}:\n{text}"))?;
        let first = value.split_whitespace().next().unwrap_or_default();
        first
            .parse()
            .with_context(|| format!("dnsperf {label:?} {value:?}"))
    };
    let average = field("Average Latency (s):").unwrap_or_default();
    let max_latency = average
        .split("max ")
        .nth(1)
        .and_then(|v| v.trim_end_matches(')').parse().ok())
        .unwrap_or(f64::NAN);
    Ok(Measured {
        qps: number("Queries per second:")?,
        avg_latency: number("Average Latency (s):")?,
        max_latency,
        stddev: number("Latency StdDev (s):")?,
        completed: field("Queries completed:").unwrap_or("?").to_string(),
        lost: field("Queries lost:").unwrap_or("?").to_string(),
        codes: field("Response codes:").unwrap_or("?").to_string(),
        ..Measured::default()
    })
}

/// p50 and p99 latency (seconds) of queries sent at `PACED_QPS`, from dnsperf's per-query log.
fn paced_latency(addr: SocketAddr, queries: &Path, seconds: u32) -> Result<(f64, f64)> {
    let output = Command::new("dnsperf")
        .args([
            "-s",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
            "-d",
            path_str(queries)?,
            "-l",
            &seconds.to_string(),
            "-Q",
            &PACED_QPS.to_string(),
            "-v",
        ])
        .output()
        .context("running dnsperf -v")?;
    if !output.status.success() {
        bail!("dnsperf -v failed ({})", output.status);
    }
    // Lines like "> NOERROR svc-1 A 0.000123": the last field is the latency in seconds.
    let mut latencies: Vec<f64> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.starts_with("> "))
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect();
    if latencies.is_empty() {
        bail!("dnsperf -v logged no answered queries for {addr}");
    }
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Ok((at(0.50), at(0.99)))
}

fn table(mesh: &Measured, dnsmasq: &Measured) -> Table {
    let ms = |s: f64| format!("{:.3} ms", s * 1000.0);
    let mut t = Table::new(
        "ratio = mesh-dns / dnsmasq; first rows at full load, percentiles at a fixed rate",
        &["", "mesh-dns", "dnsmasq", "ratio"],
    );
    let mut row = |label: &str, a: String, b: String, ratio: f64| {
        t.row(vec![label.to_owned(), a, b, format!("{ratio:.2}")]);
    };
    row(
        "queries/s",
        format!("{:.0}", mesh.qps),
        format!("{:.0}", dnsmasq.qps),
        mesh.qps / dnsmasq.qps,
    );
    row(
        "avg latency",
        ms(mesh.avg_latency),
        ms(dnsmasq.avg_latency),
        mesh.avg_latency / dnsmasq.avg_latency,
    );
    row(
        "latency stddev",
        ms(mesh.stddev),
        ms(dnsmasq.stddev),
        mesh.stddev / dnsmasq.stddev,
    );
    row(
        &format!("p50 @ {PACED_QPS} q/s"),
        ms(mesh.p50),
        ms(dnsmasq.p50),
        mesh.p50 / dnsmasq.p50,
    );
    row(
        &format!("p99 @ {PACED_QPS} q/s"),
        ms(mesh.p99),
        ms(dnsmasq.p99),
        mesh.p99 / dnsmasq.p99,
    );
    row(
        "max latency",
        ms(mesh.max_latency),
        ms(dnsmasq.max_latency),
        mesh.max_latency / dnsmasq.max_latency,
    );
    t
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// A directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn create() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("mesh-bench-dns-{}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
