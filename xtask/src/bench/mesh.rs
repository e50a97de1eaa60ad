//! The request path: load against the same mesh-whoami task, directly, through the routing
//! mesh (published port on the task's node, and on a node without tasks) and through an
//! nftables DNAT baseline built the way Docker or kube-proxy build theirs; keep-alive with
//! wrk, `Connection: close` with the bench's own client (see [`close_load`]).
//!
//! ```text
//!  segment client (10.10.0.x) ── mbr<vni> on host1 ───────────────┐
//!  client (192.0.2.100) ──► host1 192.0.2.1 ─ TC ─ redirect_peer ──┼─ task whoami-1 (10.10.0.y:80)
//!                      └──► host2 192.0.2.2 ══ VXLAN ══ host1 ─────┘
//! ```
//!
//! How each path is routed (every path crosses the task's own veth, whose TC programs
//! parse every packet both ways):
//! - direct (the reference): a client namespace whose `eth0` is a port of host1's bridge of
//!   the task's network, with an address of the overlay subnet (one of host1's own address
//!   block that its agent would hand out last): client veth → bridge → task veth, one bridge
//!   hop, no routing, no netfilter (the agent turns `nf_call_iptables` off on its bridges),
//!   no conntrack. The same number of veth crossings as the mesh's local path (client →
//!   underlay bridge → host1 → task), so "mesh → local / direct" prices what the routing
//!   mesh adds on the shortest comparable path.
//! - inside the task (reference, no goal): the load generator in the task's own network
//!   namespace, to the task's address: loopback, no veth at all. A ceiling no network path
//!   reaches.
//! - routed by host1 (what this bench called "direct" up to 2026-12-02): the underlay client
//!   routes the overlay subnet via host1: host1's forwarding, its netfilter hooks (the
//!   agent's `inet mesh` forward chain), conntrack, then the bridge.
//! - mesh local / remote: `host1:8080` / `host2:8080`, the published port in the default
//!   mode (the client's address kept): TC eBPF on the underlay (flow table, destination
//!   rewrite, `bpf_redirect_peer` into the task, or into the VXLAN device to host1, whose
//!   VXLAN device puts it into the task); the task's replies are translated by TC on its
//!   veth (local) or sent back through the overlay to host2 and translated there (remote).
//!   No netfilter, no conntrack, no bridge.
//! - nft local / remote: `host1:8081` / `host2:8081`: a `nat` table with
//!   `dnat to numgen inc mod N map { … }` over the service's tasks, conntrack, and on host2
//!   masquerade towards the overlay (the reply must come back through host2 to be
//!   un-NATed; Docker's ingress network does the same SNAT).
//!
//! So that a ratio means what it says:
//! - the nft tables exist only while an nft path runs; before any other path's run they
//!   are deleted and the bench checks the kernel no longer has them;
//! - rounds rotate the order of the paths (round r starts at path r; with as many rounds as
//!   paths every path runs once in every position) and alternate which connection kind goes
//!   first;
//! - every run is preceded by an unmeasured warm-up of the same path and kind;
//! - ratios are paired per round and reported as median (min–max) over the rounds;
//! - every error wrk reports is a failed request, in both connection kinds, and is shown.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use ipnet::Ipv4Net;
use mesh_agent::cluster::ipam;
use mesh_api::v1::{LocalTaskInfo, NetworkInfo};
use mesh_tests::{Cluster, Netns};

use super::{
    agents,
    report::{self, Report, Spread, Table},
};

const BASELINE_PORT: u16 = 8081;
const BASELINE_TABLE: &str = "mesh_bench_dnat";
const CLIENT: &str = "192.0.2.100";
/// Connections kept busy at once, in both kinds.
const CONNECTIONS: usize = 16;
/// How long a connect or a read may take before the request counts as timed out (wrk's
/// default).
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Direct,
    InTask,
    Routed,
    MeshLocal,
    MeshRemote,
    NftLocal,
    NftRemote,
}

const PATHS: [Path; 7] = [
    Path::Direct,
    Path::InTask,
    Path::Routed,
    Path::MeshLocal,
    Path::MeshRemote,
    Path::NftLocal,
    Path::NftRemote,
];

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Direct => "direct, on the task's segment",
            Path::InTask => "(reference) inside the task, loopback",
            Path::Routed => "(earlier \"direct\") routed by host1",
            Path::MeshLocal => "mesh → local task",
            Path::MeshRemote => "mesh → remote task",
            Path::NftLocal => "nft DNAT → local task",
            Path::NftRemote => "nft DNAT → remote task",
        }
    }

    /// Whether the path needs the bench's nftables DNAT baseline. Every other path runs
    /// with it removed, so its rules and their conntrack lookups are not on that path.
    fn uses_baseline(self) -> bool {
        matches!(self, Path::NftLocal | Path::NftRemote)
    }

    /// Where the path's load generator runs.
    fn client(self) -> Client {
        match self {
            Path::Direct => Client::Segment,
            Path::InTask => Client::Task,
            _ => Client::Underlay,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Client {
    /// On the underlay, beside the hosts (192.0.2.100).
    Underlay,
    /// On the task's network, a port of host1's bridge of it.
    Segment,
    /// In the task's own network namespace.
    Task,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    KeepAlive,
    Close,
}

const MODES: [Mode; 2] = [Mode::KeepAlive, Mode::Close];

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::Close => "Connection: close",
        }
    }
}

/// wrk's error counters: every one is a failed request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Errors {
    connect: u64,
    read: u64,
    write: u64,
    timeout: u64,
    non_2xx: u64,
    /// An answer cut short, or not HTTP (the close-mode client checks each one).
    incomplete: u64,
}

impl Errors {
    fn total(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout + self.non_2xx + self.incomplete
    }

    fn add(&mut self, o: &Errors) {
        self.connect += o.connect;
        self.read += o.read;
        self.write += o.write;
        self.timeout += o.timeout;
        self.non_2xx += o.non_2xx;
        self.incomplete += o.incomplete;
    }

    /// `0`, or the total with the kinds that are not zero.
    fn show(&self) -> String {
        if self.total() == 0 {
            return "0".into();
        }
        let kinds: Vec<String> = [
            ("connect", self.connect),
            ("read", self.read),
            ("write", self.write),
            ("timeout", self.timeout),
            ("non-2xx", self.non_2xx),
            ("incomplete", self.incomplete),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
        format!("{} ({})", self.total(), kinds.join(", "))
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Wrk {
    rps: f64,
    requests: u64,
    p50_us: f64,
    p99_us: f64,
    errors: Errors,
}

/// The measured runs of one path in one mode, in repetition order, and the warm-ups' errors.
#[derive(Default)]
struct Runs {
    runs: Vec<Wrk>,
    warmup_errors: Errors,
}

impl Runs {
    fn spread(&self, f: impl Fn(&Wrk) -> f64) -> Spread {
        Spread::of(&self.runs.iter().map(f).collect::<Vec<_>>()).expect("at least one run")
    }

    fn errors(&self) -> Errors {
        let mut e = Errors::default();
        for r in &self.runs {
            e.add(&r.errors);
        }
        e
    }

    fn requests(&self) -> u64 {
        self.runs.iter().map(|r| r.requests).sum()
    }
}

/// Ratios of one path's RPS to another's, one per repetition (paired: both ran in the same
/// round, seconds apart, so slow drift of the machine cancels out).
fn ratios(a: &Runs, b: &Runs) -> Spread {
    let v: Vec<f64> = a
        .runs
        .iter()
        .zip(&b.runs)
        .map(|(a, b)| a.rps / b.rps)
        .collect();
    Spread::of(&v).expect("at least one run")
}

pub fn run(quick: bool) -> Result<Report> {
    super::require(&[
        ("wrk", "wrk"),
        ("nft", "nftables"),
        ("curl", "curl"),
        ("conntrack", "conntrack"),
        ("ss", "iproute2"),
    ])?;
    // With as many rounds as paths, the rotation puts every path once in every position.
    let (seconds, warmup, reps) = if quick {
        (2, 1, 2)
    } else {
        (4, 1, PATHS.len())
    };
    let load_before = report::load_average();
    let mut c = agents::cluster(3)?;
    let tasks = agents::whoami(&c, &[1])?;
    let task_ip = tasks[0].ip;
    c.external("client", 100)?;
    let client = c.external_ns("client").context("client namespace")?;
    // "routed by host1": the client reaches the overlay through the task's node, as a router
    // would.
    client.sh(&format!(
        "ip route add {} via {}",
        agents::SUBNET,
        c.host(1).ip
    ))?;
    let network: NetworkInfo = c
        .host(1)
        .meshctl_json(&["network", "inspect", agents::NETWORK])?;
    // Declared after the cluster so it is dropped first; its name carries the cluster's, so
    // the cluster's drop, or the stale sweep of a later run if this one is killed, removes it
    // too (and with it both ends of its veth).
    let segment = segment_client(&c, &network, task_ip)?;
    let task_ns = {
        let local: Vec<LocalTaskInfo> = c.host(1).meshctl_json(&["ps"])?;
        let task = local
            .iter()
            .find(|t| t.name == tasks[0].name)
            .with_context(|| format!("{} is not among host1's tasks", tasks[0].name))?;
        Netns::existing(&task.netns)
    };
    let client_ns = |p: Path| -> &Netns {
        match p.client() {
            Client::Underlay => client,
            Client::Segment => &segment.ns,
            Client::Task => &task_ns,
        }
    };
    let backends: Vec<String> = tasks.iter().map(|t| t.ip.to_string()).collect();
    let mut baseline = Baseline {
        hosts: [&c.host(1).ns, &c.host(2).ns],
        backends: &backends,
        installed: false,
    };
    // Nothing of ours may be there before we start (a table left by an earlier, killed run
    // would sit on every path).
    baseline.verify()?;

    let host_ip = |i: usize| -> Result<Ipv4Addr> {
        c.host(i)
            .ip
            .parse()
            .with_context(|| format!("host{i} address {}", c.host(i).ip))
    };
    let targets = [
        (Path::Direct, SocketAddrV4::new(task_ip, 80)),
        (Path::InTask, SocketAddrV4::new(task_ip, 80)),
        (Path::Routed, SocketAddrV4::new(task_ip, 80)),
        (
            Path::MeshLocal,
            SocketAddrV4::new(host_ip(1)?, agents::PUBLISHED),
        ),
        (
            Path::MeshRemote,
            SocketAddrV4::new(host_ip(2)?, agents::PUBLISHED),
        ),
        (
            Path::NftLocal,
            SocketAddrV4::new(host_ip(1)?, BASELINE_PORT),
        ),
        (
            Path::NftRemote,
            SocketAddrV4::new(host_ip(2)?, BASELINE_PORT),
        ),
    ];
    let target = |p: Path| -> SocketAddrV4 {
        targets
            .iter()
            .find(|(q, _)| *q == p)
            .expect("every path has a target")
            .1
    };
    let url = |p: Path| format!("http://{}/", target(p));
    for p in PATHS {
        baseline.set(p.uses_baseline())?;
        let out = client_ns(p).sh_output(&format!("curl -s --max-time 3 {}", url(p)))?;
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

    let mut results: Vec<(Mode, Path, Runs)> = Vec::new();
    for mode in MODES {
        for p in PATHS {
            results.push((mode, p, Runs::default()));
        }
    }
    let mut tw_left = 0;
    // Round r starts at path r (and alternates which connection kind goes first), so no
    // path always follows the same one or always runs first; each run is preceded by an
    // unmeasured warm-up of the same path.
    for rep in 0..reps {
        let modes = if rep % 2 == 0 {
            MODES
        } else {
            [MODES[1], MODES[0]]
        };
        for mode in modes {
            for i in 0..PATHS.len() {
                let p = PATHS[(i + rep) % PATHS.len()];
                baseline.set(p.uses_baseline())?;
                eprintln!(
                    "==> wrk {warmup}s warm-up + {seconds}s, {} ({}), round {}",
                    p.label(),
                    mode.label(),
                    rep + 1
                );
                let load = |secs: u32| match mode {
                    Mode::KeepAlive => wrk(client_ns(p), &url(p), secs),
                    Mode::Close => close_load(client_ns(p), target(p), secs),
                };
                let left = fresh_state(&c)?;
                tw_left = tw_left.max(left);
                let warm = load(warmup)?;
                let measured = load(seconds)?;
                let runs = &mut results
                    .iter_mut()
                    .find(|(m, q, _)| *m == mode && *q == p)
                    .expect("every path has runs")
                    .2;
                runs.warmup_errors.add(&warm.errors);
                runs.runs.push(measured);
            }
        }
    }
    baseline.set(false)?;
    let runs = |mode: Mode, p: Path| -> &Runs {
        &results
            .iter()
            .find(|(m, q, _)| *m == mode && *q == p)
            .expect("every path ran")
            .2
    };

    let mut report = Report::new("Request path: routing mesh vs direct vs nftables DNAT");
    report.ran(format!(
        "3 namespace hosts with agents, service whoami (1 task, mesh-whoami, on host1, \
         {task_ip}) published on 8080; load generators: a client namespace on the underlay \
         bridge (192.0.2.100: mesh, nft and routed paths), a client namespace on the task's \
         segment ({seg}/{prefix}, its eth0 a port of host1's {bridge}, MTU {mtu} like the \
         task's: direct), and the task's own namespace (inside the task)",
        seg = segment.ip,
        prefix = segment.prefix,
        bridge = segment.bridge,
        mtu = segment.mtu,
    ));
    report.ran(
        "direct: client veth → host1's bridge of the network → task veth (bridged: no \
         routing, no netfilter, no conntrack); inside the task: loopback in the task's \
         namespace; routed by host1: underlay → host1 eth0 → forwarding, netfilter (the \
         agent's `inet mesh` forward chain), conntrack → bridge → task veth; mesh local \
         (default mode, the client's address kept): underlay → host1 eth0 TC (flow table, \
         destination rewrite) → bpf_redirect_peer into the task, replies translated by TC on \
         the task's veth → host1 eth0; mesh remote: underlay → host2 eth0 TC → VXLAN to \
         host1 → TC on the VXLAN device → bpf_redirect_peer, replies back through the \
         overlay to host2, translated there; nft: prerouting DNAT + conntrack, then host1's forwarding as \
         routed (remote: host2 masquerades into the overlay)",
    );
    report.ran(format!(
        "keep-alive: wrk -t1 -c{CONNECTIONS} -d{seconds}s --latency; `Connection: close`: the \
         bench's own client, {CONNECTIONS} connections at a time, one request each (connect, \
         request, answer checked, server closes), latency from connect to the answer's end"
    ));
    report.ran(format!(
        "{reps} round(s), each path once per round and kind after a {warmup}s warm-up of \
         itself; round r starts at path r and the kinds alternate which goes first"
    ));
    report.ran(format!(
        "nft baseline built by the bench: host1 and host2 `nat` prerouting \
         `tcp dport {BASELINE_PORT} dnat to numgen inc mod {n} map {{ … }}:80`, conntrack, \
         host2 masquerade to the overlay; loaded only for the nft paths' runs and deleted \
         (and checked gone) before every other path's",
        n = backends.len()
    ));
    report.ran(
        "ratios are taken per round (paths of one round ran seconds apart) and shown as \
         median (min–max) over the rounds",
    );
    let mut total_errors = Errors::default();
    let mut per_path_errors: Vec<String> = Vec::new();
    for mode in MODES {
        let mut t = Table::new(
            &format!(
                "{}: requests/s median (min–max over rounds), latency medians over rounds",
                mode.label()
            ),
            &[
                "path",
                "requests/s",
                "p50",
                "p99",
                "ratio to direct",
                "requests",
                "failed",
                "failed in warm-up",
            ],
        );
        let direct = runs(mode, Path::Direct);
        for p in PATHS {
            let r = runs(mode, p);
            let rps = r.spread(|w| w.rps);
            let errors = r.errors();
            total_errors.add(&errors);
            total_errors.add(&r.warmup_errors);
            if errors.total() + r.warmup_errors.total() > 0 {
                per_path_errors.push(format!("{} ({})", p.label(), mode.label()));
            }
            t.row(vec![
                p.label().to_owned(),
                format!("{:.0} ({:.0}–{:.0})", rps.median, rps.min, rps.max),
                us(r.spread(|w| w.p50_us).median),
                us(r.spread(|w| w.p99_us).median),
                ratio(&ratios(r, direct)),
                r.requests().to_string(),
                errors.show(),
                r.warmup_errors.show(),
            ]);
        }
        report.tables.push(t);
    }

    let mut goals = Table::new(
        "Goals of issue 15 (ratios per round: median (min–max); met = the median meets it; \
         direct = on the task's segment)",
        &["goal", "connections", "target", "measured", "result"],
    );
    for mode in MODES {
        let local = ratios(runs(mode, Path::MeshLocal), runs(mode, Path::Direct));
        goals.row(vec![
            "mesh → local / direct (task's segment)".into(),
            mode.label().into(),
            "≥ 0.95".into(),
            ratio(&local),
            met(local.median >= 0.95).into(),
        ]);
    }
    for mode in MODES {
        let remote = ratios(runs(mode, Path::MeshRemote), runs(mode, Path::NftRemote));
        goals.row(vec![
            "mesh → remote / nft DNAT → remote".into(),
            mode.label().into(),
            "≥ 1.2".into(),
            ratio(&remote),
            met(remote.median >= 1.2).into(),
        ]);
    }
    goals.row(vec![
        "failed requests, every path".into(),
        "both".into(),
        "0".into(),
        total_errors.show(),
        met(total_errors.total() == 0).into(),
    ]);
    for mode in MODES {
        let l = ratios(runs(mode, Path::MeshLocal), runs(mode, Path::Routed));
        goals.row(vec![
            "(no goal) mesh → local / routed by host1 (the earlier \"direct\")".into(),
            mode.label().into(),
            "–".into(),
            ratio(&l),
            "–".into(),
        ]);
    }
    for mode in MODES {
        let l = ratios(runs(mode, Path::Routed), runs(mode, Path::Direct));
        goals.row(vec![
            "(no goal) routed by host1 / direct (what host1's routing costs)".into(),
            mode.label().into(),
            "–".into(),
            ratio(&l),
            "–".into(),
        ]);
    }
    for mode in MODES {
        let l = ratios(runs(mode, Path::MeshLocal), runs(mode, Path::NftLocal));
        goals.row(vec![
            "(no goal) mesh → local / nft DNAT → local".into(),
            mode.label().into(),
            "–".into(),
            ratio(&l),
            "–".into(),
        ]);
    }
    report.tables.push(goals);
    report.ran(
        "before every warm-up: TIME_WAIT sockets destroyed (`ss -K`) in every namespace of the \
         cluster and conntrack flushed on the hosts, so a run starts from the same state \
         whatever ran before it; within a run both build up as they would on a busy server",
    );
    if tw_left > 0 {
        report.note(format!(
            "`ss -K` left up to {tw_left} TIME_WAIT sockets behind: runs inherited some of \
             the previous run's state."
        ));
    }
    if !per_path_errors.is_empty() {
        report.note(format!(
            "FAILED REQUESTS on: {} (see the failed columns).",
            per_path_errors.join("; ")
        ));
    }
    report.note(format!(
        "wrk, the task and the kernel's softirq work share the same 2 cores (with whatever \
         else runs on the machine: load average 1/5/15 min {load_before} at the start, {} at \
         the end): RPS is bounded by CPU, so the ratios compare CPU cost per request along \
         each path; absolute numbers move with the load, paired ratios much less.",
        report::load_average()
    ));
    report.note(
        "failed = every request that did not get a complete 2xx answer: wrk's connect, read, \
         write and timeout errors and non-2xx answers with keep-alive; with `Connection: \
         close` the same kinds, plus answers cut short, from the bench's own client, which \
         checks every answer's status line and complete body and counts failures by kind.",
    );
    report.note(
        "The agent's own nftables table (`inet mesh`: network isolation, gateway-bridge \
         masquerade) is on every host for every path: it is part of a mesh node.",
    );
    drop(segment);
    drop(c);
    Ok(report)
}

/// A load generator's namespace on the task's own L2 segment (see the module docs).
struct SegmentClient {
    ns: Netns,
    ip: Ipv4Addr,
    prefix: u8,
    bridge: String,
    mtu: u32,
}

/// Plugs a new namespace into host1's bridge of the task's network, as an endpoint of the
/// network: the last but one address of the task's address block (host1's agent hands
/// addresses out lowest first and runs one task here, so it never reaches it during the
/// bench) and the MAC the network derives from it.
fn segment_client(c: &Cluster, network: &NetworkInfo, task_ip: Ipv4Addr) -> Result<SegmentClient> {
    let subnet: Ipv4Net = network
        .subnet
        .parse()
        .with_context(|| format!("subnet {}", network.subnet))?;
    let block = ipam::block_index(subnet, task_ip)
        .and_then(|i| ipam::block(subnet, i))
        .with_context(|| format!("{task_ip} is not in {subnet}"))?;
    let ip = Ipv4Addr::from(u32::from(block.broadcast()) - 1);
    let host = &c.host(1).ns;
    let bridge = mesh_agent::overlay::bridge_name(network.vni);
    let link = host.sh(&format!(
        "ip -o -4 addr show dev {bridge}; ip -o link show dev {bridge}"
    ))?;
    ensure!(
        ip != task_ip
            && ip != network.gateway
            && !network.tasks.iter().any(|t| t.ip == ip)
            && !link.contains(&format!("inet {ip}/")),
        "{ip}, meant for the segment client, is in use on {bridge}: {link}"
    );
    let mtu: u32 = link
        .split_once(" mtu ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("no MTU for {bridge} in {link:?}"))?;
    let ns = Netns::create(&format!("{}-xseg", c.name()))?;
    host.sh(&format!(
        "ip link add xseg mtu {mtu} type veth peer name eth0 netns {ns} && \
         ip link set xseg master {bridge} && ip link set xseg up",
        ns = ns.name()
    ))?;
    // Every endpoint of an overlay network has the MAC derived from its address, and the
    // programs on a task's veth rely on it: a frame whose MAC is not its address's is one a
    // router (a node) forwarded, and the task's answers to it are sent back to that node.
    let mac = mesh_common::lb::mac_for_ip(ip.octets())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    ns.sh(&format!(
        "ip link set eth0 mtu {mtu} address {mac} && ip addr add {ip}/{p} dev eth0 && \
         ip link set eth0 up",
        p = subnet.prefix_len()
    ))?;
    Ok(SegmentClient {
        ns,
        ip,
        prefix: subnet.prefix_len(),
        bridge,
        mtu,
    })
}

/// Removes what earlier runs left behind that a later run could trip over: the task's
/// TIME_WAIT sockets (direct and nft local share the client's 4-tuples at the task, mesh
/// and nft remote the node addresses) and the hosts' conntrack entries. Returns how many
/// TIME_WAIT sockets are still there.
fn fresh_state(c: &Cluster) -> Result<usize> {
    let mut left = 0;
    for ns in mesh_tests::netns::list()
        .into_iter()
        .filter(|n| n.starts_with(c.name()))
    {
        let run = |script: &str| {
            mesh_tests::netns::command_in(&ns, "sh")
                .args(["-c", script])
                .output()
                .with_context(|| format!("running `{script}` in {ns}"))
        };
        // ss -K reports sockets it could not destroy on stderr; what counts is what is left.
        run("ss -K -t state time-wait >/dev/null 2>&1")?;
        let out = run("ss -H -t -n state time-wait | wc -l")?;
        left += String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<usize>()
            .unwrap_or(0);
    }
    for h in c.hosts() {
        // Exits non-zero when the table is empty already.
        let _ = h.ns.sh_output("conntrack -F >/dev/null 2>&1")?;
    }
    Ok(left)
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

fn ratio(s: &Spread) -> String {
    format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max)
}

/// The bench's nftables DNAT baseline on host1 and host2: loaded only while an nft path
/// runs, so no other path carries its rules.
struct Baseline<'a> {
    hosts: [&'a Netns; 2],
    backends: &'a [String],
    installed: bool,
}

impl Baseline<'_> {
    fn set(&mut self, installed: bool) -> Result<()> {
        if installed != self.installed {
            for (i, ns) in self.hosts.iter().enumerate() {
                if installed {
                    // host2 has no task: its DNAT needs the masquerade for replies to return.
                    nft_baseline(ns, self.backends, i == 1)?;
                } else {
                    ns.sh(&format!("nft delete table ip {BASELINE_TABLE}"))
                        .context("removing the nftables DNAT baseline")?;
                }
            }
            self.installed = installed;
        }
        self.verify()
    }

    /// Checks the kernel: the baseline table is on both hosts iff it should be.
    fn verify(&self) -> Result<()> {
        for ns in self.hosts {
            let tables = ns.sh("nft list tables")?;
            let present = tables
                .lines()
                .any(|l| l.split_whitespace().last() == Some(BASELINE_TABLE));
            ensure!(
                present == self.installed,
                "the nftables DNAT baseline is {} in {} but should {}",
                if present { "present" } else { "absent" },
                ns.name(),
                if self.installed {
                    "be loaded"
                } else {
                    "be gone"
                }
            );
        }
        Ok(())
    }
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
        "table ip {BASELINE_TABLE} {{\n\
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

/// Keep-alive load: wrk with CONNECTIONS connections on one thread.
fn wrk(client: &Netns, url: &str, seconds: u32) -> Result<Wrk> {
    let mut cmd: Command = client.command("wrk");
    cmd.args([
        "-t1",
        &format!("-c{CONNECTIONS}"),
        &format!("-d{seconds}s"),
        "--latency",
    ]);
    let out = cmd.arg(url).output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "wrk {url} failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("reading wrk's output:\n{text}"))
}

/// `Connection: close` load: CONNECTIONS clients, each doing one request per connection in
/// a loop (connect, send, read the answer until the server closes, close), for `seconds`.
///
/// Not wrk: this client checks each answer (status line, complete body) and counts every
/// failure by kind, where wrk lumps resets and short reads into "read errors". The server
/// closes first (its side holds the TIME_WAIT, as with a real web server).
fn close_load(client: &Netns, addr: SocketAddrV4, seconds: u32) -> Result<Wrk> {
    let run = Duration::from_secs(u64::from(seconds));
    let (mut latencies, errors, elapsed) = client.run(move || {
        let started = Instant::now();
        let deadline = started + run;
        let workers: Vec<_> = (0..CONNECTIONS)
            .map(|_| std::thread::spawn(move || close_worker(addr, deadline)))
            .collect();
        let mut latencies = Vec::new();
        let mut errors = Errors::default();
        for w in workers {
            let (l, e) = w.join().expect("close-mode client thread");
            latencies.extend(l);
            errors.add(&e);
        }
        (latencies, errors, started.elapsed())
    })?;
    latencies.sort_unstable();
    let at = |q: f64| {
        if latencies.is_empty() {
            f64::NAN
        } else {
            f64::from(latencies[((latencies.len() - 1) as f64 * q).round() as usize])
        }
    };
    Ok(Wrk {
        rps: latencies.len() as f64 / elapsed.as_secs_f64(),
        requests: latencies.len() as u64,
        p50_us: at(0.5),
        p99_us: at(0.99),
        errors,
    })
}

/// One client of [`close_load`]: latencies (µs, connect to the answer's end) of the
/// requests that succeeded, and what failed.
fn close_worker(addr: SocketAddrV4, deadline: Instant) -> (Vec<u32>, Errors) {
    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
    let mut latencies = Vec::new();
    let mut errors = Errors::default();
    let mut answer = Vec::with_capacity(1024);
    let timed_out =
        |e: &std::io::Error| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
    while Instant::now() < deadline {
        let t = Instant::now();
        let mut s = match TcpStream::connect_timeout(&SocketAddr::V4(addr), TIMEOUT) {
            Ok(s) => s,
            Err(e) if timed_out(&e) => {
                errors.timeout += 1;
                continue;
            }
            Err(_) => {
                errors.connect += 1;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(TIMEOUT));
        let _ = s.set_write_timeout(Some(TIMEOUT));
        if s.write_all(REQUEST).is_err() {
            errors.write += 1;
            continue;
        }
        answer.clear();
        match s.read_to_end(&mut answer) {
            Ok(_) => {}
            Err(e) if timed_out(&e) => {
                errors.timeout += 1;
                continue;
            }
            Err(_) => {
                errors.read += 1;
                continue;
            }
        }
        match http_status(&answer) {
            Some(200..=299) => {
                latencies.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32)
            }
            Some(_) => errors.non_2xx += 1,
            None => errors.incomplete += 1,
        }
    }
    (latencies, errors)
}

/// The status of a complete HTTP/1.x answer (head and a body of its Content-Length), or
/// None when it is cut short or not HTTP.
fn http_status(answer: &[u8]) -> Option<u16> {
    let head_end = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&answer[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()?
        .strip_prefix("HTTP/1.")?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let length: usize = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })?;
    (answer.len() - head_end - 4 == length).then_some(status)
}

/// Every error wrk reports counts, whatever the connection kind.
fn parse_wrk(text: &str) -> Result<Wrk> {
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
                    let n: u64 = n
                        .parse()
                        .with_context(|| format!("socket error count {n:?}"))?;
                    match kind {
                        "connect" => w.errors.connect += n,
                        "read" => w.errors.read += n,
                        "write" => w.errors.write += n,
                        "timeout" => w.errors.timeout += n,
                        other => bail!("unknown wrk error kind {other:?}"),
                    }
                }
            }
            Some("Non-2xx") => {
                // "Non-2xx or 3xx responses: 12"
                w.errors.non_2xx += line
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .context("Non-2xx count")?;
            }
            // "20000 requests in 2.00s, 1.5MB read"
            Some(n) if line.contains(" requests in ") => {
                w.requests = n.parse().with_context(|| format!("request count {n:?}"))?;
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
        let w = parse_wrk(text).unwrap();
        assert_eq!(w.rps, 10000.5);
        assert_eq!(w.requests, 20000);
        assert_eq!(w.p50_us, 312.0);
        assert_eq!(w.p99_us, 2050.0);
        assert_eq!(w.errors.read, 3);
        assert_eq!(w.errors.timeout, 1);
        assert_eq!(w.errors.total(), 4);
        assert_eq!(w.errors.show(), "4 (read 3, timeout 1)");
        let with_non_2xx = format!("{text}  Non-2xx or 3xx responses: 5\n");
        assert_eq!(parse_wrk(&with_non_2xx).unwrap().errors.total(), 9);
    }

    #[test]
    fn checks_close_mode_answers() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(http_status(ok), Some(200));
        assert_eq!(http_status(&ok[..ok.len() - 1]), None, "body cut short");
        assert_eq!(http_status(&ok[..20]), None, "head cut short");
        let err = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(http_status(err), Some(503));
        assert_eq!(http_status(b""), None);
    }
}
