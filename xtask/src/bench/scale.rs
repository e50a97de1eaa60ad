//! Per-packet cost of the load balancer as the service table and the flow table grow, and
//! the same for netfilter DNAT at the same service counts.
//!
//! **mesh**: the routing-mesh program itself, run by the kernel on crafted frames with
//! BPF_PROG_TEST_RUN against real maps loaded with N services (each with a VIP, the first
//! 60,000 also with a published port) and about F flows. The kernel times each run; the
//! tables show medians over many single runs (a rewritten frame is no longer the same
//! packet, so runs cannot be batched), of five packet kinds sampled in turn so drift of a
//! shared machine hits them alike: a non-IP frame (the method's floor), the **pass floor**
//! (a TCP packet to the node that the program parses, looks up and passes untouched), a
//! packet to a published port without a flow, a packet of an **established flow** and the
//! **first packet of a new flow**. The goals are ratios to the pass floor of the same cell,
//! and flatness: the largest size over the smallest, services 1 → 100k and flows 10k → 1M.
//!
//! **netfilter**: what N DNAT rules add to a new flow's first packet. A client namespace
//! connects to random VIPs through a router namespace whose `nat` prerouting holds N
//! services; the backend namespace behind it refuses (RST), so each connect() is one
//! synchronous round trip whose SYN runs the nat rules once. Median time per connect minus
//! the same through a router with an empty `nat` chain is the rules' cost. Two shapes:
//! iptables (one rule per service in a chain, as Docker and kube-proxy's iptables mode
//! build it; matched linearly) and nft with a `ip daddr . tcp dport` map (as kube-proxy's
//! nftables mode does; hashed). Later packets of a flow skip the nat rules in netfilter
//! (conntrack remembers), so only first packets depend on N there.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use mesh_agent::{
    bpf::SkbContext,
    dataplane::Dataplane,
    lb::{BackendLb, LbLimits, NetworkLb, NodeLb, Protocol, PublishMode, PublishedPort, ServiceLb},
};
use mesh_tests::Netns;

use super::report::{Plot, Report, Spread, Table, percentile_sorted};

pub(super) const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub(super) const NET: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub(super) const FIRST_PORT: u16 = 1024;
pub(super) const MAX_PUBLISHED: u32 = 60_000;
pub(super) const TC_ACT_OK: u32 = 0;
pub(super) const TC_ACT_REDIRECT: u32 = 7;
/// Unmeasured turns before each cell's samples.
pub(super) const WARMUP: usize = 500;
/// Client numbers from here on never open a flow (far above any flow level).
pub(super) const STRANGERS: u64 = 50_000_000;
const SERVICE_COUNTS: [u32; 4] = [1, 100, 10_000, 100_000];

/// One cell of the mesh measurement: `services` loaded, about `flows` in the flow table;
/// medians of kernel-timed single runs, all kinds sampled interleaved so drift of the
/// machine hits them alike.
#[derive(Clone, Copy, Debug)]
struct Cell {
    flows: u64,
    /// A non-IP frame: the program returns at the EtherType (the method's own floor).
    non_ip_ns: f64,
    /// The pass floor: a TCP SYN to the node on a port nothing publishes; parsed, looked up,
    /// passed untouched.
    floor_ns: f64,
    /// A TCP ACK to a published port with no flow: service found, flow lookup misses,
    /// passed (the kernel answers RST).
    no_flow_ns: f64,
    /// A packet of an established flow: flow found, rewritten, redirected.
    established_ns: f64,
    /// The first packet (SYN) of a new flow: flow created (backend, SNAT port, both
    /// entries), rewritten, redirected.
    new_flow_ns: f64,
}

/// Which of a cell's numbers.
type CellNs = fn(&Cell) -> f64;

struct MeshPoint {
    services: u32,
    apply: Duration,
    /// The pass floor timed over a batch of runs (BPF_PROG_TEST_RUN's `repeat`): without
    /// the per-run clock reads that every single-run number carries.
    floor_batched_ns: f64,
    cells: Vec<Cell>,
}

impl MeshPoint {
    fn cell(&self, flows: u64) -> &Cell {
        self.cells
            .iter()
            .find(|c| c.flows == flows)
            .expect("every flow level measured")
    }
}

pub fn run(quick: bool) -> Result<Report> {
    let flow_levels: &[u64] = if quick {
        &[10_000, 100_000]
    } else {
        &[10_000, 100_000, 1_000_000]
    };
    let samples = if quick { 3_000 } else { 10_000 };
    let mut mesh = Vec::new();
    for s in SERVICE_COUNTS {
        eprintln!(
            "==> mesh load balancer: {s} services, flows up to {}",
            flow_levels.last().unwrap()
        );
        mesh.push(mesh_point(s, flow_levels, samples)?);
    }
    let mut netfilter = Vec::new();
    for s in SERVICE_COUNTS {
        eprintln!("==> netfilter DNAT: {s} services");
        netfilter.push((s, netfilter_point(s, quick)?));
    }

    let mut report = Report::new("Per-packet cost vs scale: mesh load balancer vs netfilter DNAT");
    report.ran(format!(
        "mesh: BPF_PROG_TEST_RUN of the routing-mesh program (Dataplane::test_run_lb_ingress) \
         on real maps; per cell {samples} single runs of each packet kind, the kinds \
         interleaved (one of each in turn, after {WARMUP} unmeasured turns), median; N \
         services with 3 backends each (at least 300 backends in all, so 1M flows do not run \
         out of SNAT ports), flows filled by real handshakes (SYN, the backend's SYN-ACK, the \
         client's ACK: established flows)"
    ));
    report.ran(
        "flows: a cell at F flows fills the table to F − (warm-up + samples)/2 and its new \
         flows take it to F + (warm-up + samples)/2, so F is the middle of the cell; an \
         established packet hits a flow chosen at random from all in the table",
    );
    report.ran(
        "netfilter: sequential TCP connects from a client netns through a router netns (nat \
         rules, conntrack) to a backend netns that refuses them; cost = median time per connect \
         minus the same with an empty nat chain (medians), best of 3 interleaved rounds",
    );

    let mut t = Table::new(
        "mesh load balancer, ns per packet (kernel-timed single program runs, medians)",
        &[
            "services",
            "flows",
            "non-IP frame",
            "pass floor",
            "published, no flow",
            "established",
            "new flow",
            "established / floor",
            "new flow / floor",
        ],
    );
    for m in &mesh {
        for c in &m.cells {
            t.row(vec![
                count(u64::from(m.services)),
                count(c.flows),
                format!("{:.0}", c.non_ip_ns),
                format!("{:.0}", c.floor_ns),
                format!("{:.0}", c.no_flow_ns),
                format!("{:.0}", c.established_ns),
                format!("{:.0}", c.new_flow_ns),
                format!("{:.2}", c.established_ns / c.floor_ns),
                format!("{:.2}", c.new_flow_ns / c.floor_ns),
            ]);
        }
    }
    report.tables.push(t);

    // Flatness: the largest size over the smallest, per packet kind, at each value of the
    // other dimension.
    let smallest = flow_levels[0];
    let largest = *flow_levels.last().expect("levels");
    let (few, many) = (&mesh[0], mesh.last().expect("service counts"));
    let kinds: [(&str, CellNs); 3] = [
        ("pass floor", |c| c.floor_ns),
        ("established", |c| c.established_ns),
        ("new flow", |c| c.new_flow_ns),
    ];
    let mut flat = Table::new(
        &format!(
            "flatness: ns at the largest size / ns at the smallest (services {} → {}, flows {} → {})",
            count(u64::from(few.services)),
            count(u64::from(many.services)),
            count(smallest),
            count(largest)
        ),
        &{
            let mut h = vec!["packet".to_owned()];
            for f in flow_levels {
                h.push(format!("services, at {} flows", count(*f)));
            }
            for m in &mesh {
                h.push(format!(
                    "flows, at {} services",
                    count(u64::from(m.services))
                ));
            }
            h
        }
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    let mut worst_services = [0f64; 3];
    let mut worst_flows = [0f64; 3];
    for (k, (name, ns)) in kinds.iter().enumerate() {
        let mut row = vec![(*name).to_owned()];
        for f in flow_levels {
            let r = ns(many.cell(*f)) / ns(few.cell(*f));
            worst_services[k] = worst_services[k].max(r);
            row.push(format!("{r:.2}"));
        }
        for m in &mesh {
            let r = ns(m.cell(largest)) / ns(m.cell(smallest));
            worst_flows[k] = worst_flows[k].max(r);
            row.push(format!("{r:.2}"));
        }
        flat.row(row);
    }
    report.tables.push(flat);

    let cells: Vec<(u32, &Cell)> = mesh
        .iter()
        .flat_map(|m| m.cells.iter().map(move |c| (m.services, c)))
        .collect();
    let worst = |f: CellNs| -> (f64, String, f64) {
        let ratios: Vec<(f64, String)> = cells
            .iter()
            .map(|(s, c)| {
                (
                    f(c) / c.floor_ns,
                    format!(
                        "{} services, {} flows",
                        count(u64::from(*s)),
                        count(c.flows)
                    ),
                )
            })
            .collect();
        let best = ratios.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
        let (w, at) = ratios
            .into_iter()
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .expect("cells");
        (w, at, best)
    };
    let mut goals = Table::new(
        "Goals of issue 15 (the worst cell or size step counts)",
        &[
            "goal",
            "target",
            "measured (worst)",
            "where",
            "best",
            "result",
        ],
    );
    for (name, target, f) in [
        (
            "established flow / pass floor",
            2.0,
            (|c| c.established_ns) as CellNs,
        ),
        ("first packet of a new flow / pass floor", 3.0, |c| {
            c.new_flow_ns
        }),
    ] {
        let (w, at, best) = worst(f);
        goals.row(vec![
            name.into(),
            format!("≤ {target}"),
            format!("{w:.2}"),
            at,
            format!("{best:.2}"),
            met(w <= target).into(),
        ]);
    }
    for (k, (name, _)) in kinds.iter().enumerate().skip(1) {
        goals.row(vec![
            format!(
                "flat, {} → {} services: {name}",
                count(u64::from(few.services)),
                count(u64::from(many.services))
            ),
            "≤ 1.3".into(),
            format!("{:.2}", worst_services[k]),
            "worst flow level".into(),
            "–".into(),
            met(worst_services[k] <= 1.3).into(),
        ]);
    }
    for (k, (name, _)) in kinds.iter().enumerate().skip(1) {
        goals.row(vec![
            format!(
                "flat, {} → {} flows: {name}",
                count(smallest),
                count(largest)
            ),
            "≤ 1.3".into(),
            format!("{:.2}", worst_flows[k]),
            "worst service count".into(),
            "–".into(),
            met(worst_flows[k] <= 1.3).into(),
        ]);
    }
    report.tables.push(goals);

    let mut nf = Table::new(
        &format!(
            "first packet of a new flow: ns added by the service table (ratio = cost / cost at \
             1 service; mesh at {} flows)",
            count(smallest)
        ),
        &[
            "services",
            "mesh new flow (ns)",
            "mesh ratio",
            "iptables DNAT (ns added)",
            "iptables ratio",
            "nft map DNAT (ns added)",
            "nft ratio",
        ],
    );
    let mesh_base = few.cell(smallest).new_flow_ns;
    let ipt_base = netfilter[0].1.iptables.max(1.0);
    let nft_base = netfilter[0].1.nft_map.max(1.0);
    for (m, (s, n)) in mesh.iter().zip(&netfilter) {
        let new_flow = m.cell(smallest).new_flow_ns;
        nf.row(vec![
            count(u64::from(*s)),
            format!("{new_flow:.0}"),
            format!("{:.2}", new_flow / mesh_base),
            format!("{:.0}", n.iptables),
            format!("{:.1}", n.iptables.max(1.0) / ipt_base),
            format!("{:.0}", n.nft_map),
            format!("{:.1}", n.nft_map.max(1.0) / nft_base),
        ]);
    }
    report.tables.push(nf);

    let mut apply = Table::new(
        "LoadBalancer::apply, all services at once into empty maps",
        &["services", "apply time", "per service"],
    );
    for m in &mesh {
        apply.row(vec![
            count(u64::from(m.services)),
            format!("{:.1} ms", m.apply.as_secs_f64() * 1000.0),
            format!(
                "{:.1} µs",
                m.apply.as_secs_f64() * 1e6 / f64::from(m.services)
            ),
        ]);
    }
    report.tables.push(apply);

    report.plots.push(Plot {
        stem: "scale".into(),
        title: "ns per new-flow packet vs services".into(),
        xlabel: "services".into(),
        ylabel: "ns per packet (log)".into(),
        logx: true,
        logy: true,
        series: vec![
            (
                format!("mesh (eBPF, new flow, {} flows)", count(smallest)),
                mesh.iter()
                    .map(|m| (f64::from(m.services), m.cell(smallest).new_flow_ns))
                    .collect(),
            ),
            (
                format!("mesh (eBPF, established, {} flows)", count(largest)),
                mesh.iter()
                    .map(|m| (f64::from(m.services), m.cell(largest).established_ns))
                    .collect(),
            ),
            (
                "mesh (eBPF, pass floor)".into(),
                mesh.iter()
                    .map(|m| (f64::from(m.services), m.cell(smallest).floor_ns))
                    .collect(),
            ),
            (
                "iptables DNAT (added by rules)".into(),
                netfilter
                    .iter()
                    .map(|(s, n)| (f64::from(*s), n.iptables.max(1.0)))
                    .collect(),
            ),
            (
                "nft map DNAT (added by rules)".into(),
                netfilter
                    .iter()
                    .map(|(s, n)| (f64::from(*s), n.nft_map.max(1.0)))
                    .collect(),
            ),
        ],
    });
    let floors: Vec<f64> = cells.iter().map(|(_, c)| c.floor_ns).collect();
    let batched: Vec<f64> = mesh.iter().map(|m| m.floor_batched_ns).collect();
    let median = |v: &[f64]| Spread::of(v).map_or(f64::NAN, |s| s.median);
    report.note(format!(
        "Where the time goes (medians over all cells): the method's floor (a non-IP frame) is \
         {non_ip:.0} ns, of which the clock reads around a single run are about \
         {clock:.0} ns (pass floor single-run {floor:.0} ns vs {batched:.0} ns per run in a \
         batch); parsing plus the published-port lookup that misses adds {parse:.0} ns; a \
         published port whose flow lookup misses costs {no_flow:.0} ns over the floor; an \
         established packet {est:.0} ns over the floor (one flow-table hit, the IPv4 \
         checksum in place, 2 TCP checksum helpers, counters, MACs written in place, \
         bpf_redirect into the VXLAN device); a new flow {new:.0} ns over an established one \
         (IP checksum check, backend pick, SNAT port, two flow-table inserts). Profiled with \
         perf (cpu-clock) on the same runs: with random flows most of an established \
         packet's time is the flow lookup's memory stalls (lookup_nulls_elem_raw): the \
         table is sized for the largest level, so its bucket array (one 16-byte bucket per \
         entry, rounded up to a power of two) and entries span far more pages than the \
         TLB and caches hold, at every occupancy; the pass floor touches none of it.",
        non_ip = median(&cells.iter().map(|(_, c)| c.non_ip_ns).collect::<Vec<_>>()),
        clock = median(&floors) - median(&batched),
        floor = median(&floors),
        batched = median(&batched),
        parse = median(
            &cells
                .iter()
                .map(|(_, c)| c.floor_ns - c.non_ip_ns)
                .collect::<Vec<_>>()
        ),
        no_flow = median(
            &cells
                .iter()
                .map(|(_, c)| c.no_flow_ns - c.floor_ns)
                .collect::<Vec<_>>()
        ),
        est = median(
            &cells
                .iter()
                .map(|(_, c)| c.established_ns - c.floor_ns)
                .collect::<Vec<_>>()
        ),
        new = median(
            &cells
                .iter()
                .map(|(_, c)| c.new_flow_ns - c.established_ns)
                .collect::<Vec<_>>()
        ),
    ));
    report.note(
        "The ratios to the floor are taken within the cell (the floor sampled interleaved \
         with the others). The floor itself carries the per-run clock reads and the program's \
         entry, so a ratio to it understates how much more the program does than a pass; the \
         differences above say what each step costs.",
    );
    report.note(
        "The two methods time different things (the program alone vs the wall-time delta of \
         the netfilter rules); compare each column's growth with N (the ratio columns), not \
         mesh against netfilter cell by cell. A netfilter delta near 0 is within noise \
         (clamped to 1 ns for the ratios and the log plot).",
    );
    report.note(format!(
        "Flows: the flow table is sized for the largest level ({} flows: 2.5 entries each, \
         two per flow plus headroom, preallocated) in every cell, so 10k → 1M compares occupancy of one table: how many \
         distinct entries (and their cache lines and pages) random packets touch, not an \
         algorithmic cost. Services: packets pick one of the published ports uniformly, so \
         at 100k services each packet meets a cold service entry, backend and counters; at 1 \
         service they stay hot.",
        count(largest)
    ));
    Ok(report)
}

pub(super) fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

pub(super) fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// A TCP frame (Ethernet + IPv4 + TCP, no payload) with a valid IPv4 checksum; the program
/// checks it before creating state, and updates the TCP checksum incrementally.
pub(super) fn frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> [u8; 54] {
    let mut f = [0u8; 54];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[7] = 1;
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    f
}

/// An ARP request: the program looks at the EtherType and passes it.
pub(super) fn non_ip_frame() -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    // htype 1, ptype IPv4, hlen 6, plen 4, op request; sender and target left zero.
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f
}

/// `f` acknowledging `ack` (what a client sends after the SYN-ACK of sequence number 1
/// that [`frame`] builds).
pub(super) fn with_ack(mut f: [u8; 54], ack: u32) -> [u8; 54] {
    f[42..46].copy_from_slice(&ack.to_be_bytes());
    f
}

fn checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub(super) const SYN: u8 = 0x02;
pub(super) const ACK: u8 = 0x10;

/// The n-th client of the benchmark: 50,000 ports per source address.
pub(super) fn client(n: u64) -> (Ipv4Addr, u16) {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (n / 50_000) as u32);
    (ip, 10_000 + (n % 50_000) as u16)
}

/// A small deterministic generator: which service or flow a sample hits.
pub(super) struct Lcg(pub(super) u64);

impl Lcg {
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

pub(super) fn services(n: u32) -> Vec<ServiceLb> {
    let per_service = (300 / n).max(3);
    (0..n)
        .map(|i| ServiceLb {
            id: format!("s{i}"),
            name: format!("s{i}"),
            network: NetworkLb {
                id: 4096,
                node_addr: NET,
                bridge_ifindex: 1,
                // The backends are other nodes' tasks: the VXLAN path, as on a real node (a
                // test run does not perform the redirect).
                vxlan_ifindex: 1,
            },
            vip: Some(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i)),
            ports: if i < MAX_PUBLISHED {
                vec![PublishedPort {
                    proto: Protocol::Tcp,
                    published: FIRST_PORT + i as u16,
                    target: 80,
                    mode: PublishMode::Snat,
                }]
            } else {
                Vec::new()
            },
            backends: (0..per_service)
                .map(|b| {
                    BackendLb::active(Ipv4Addr::from(
                        u32::from(Ipv4Addr::new(10, 1, 0, 0)) + i * per_service + b,
                    ))
                })
                .collect(),
        })
        .collect()
}

/// The routing-mesh program with `n` services loaded: apply time and ns/packet.
fn mesh_point(n: u32, levels: &[u64], samples: usize) -> Result<MeshPoint> {
    let pin = PathBuf::from(format!(
        "/sys/fs/bpf/mesh/bench{}scale{n}",
        std::process::id()
    ));
    let result = measure_mesh(&pin, n, levels, samples);
    let _ = std::fs::remove_dir_all(&pin);
    result
}

fn measure_mesh(
    pin: &std::path::Path,
    n: u32,
    levels: &[u64],
    samples: usize,
) -> Result<MeshPoint> {
    let max_flows = levels.iter().copied().max().unwrap_or(0) + (WARMUP + samples) as u64;
    let desired = services(n);
    let backends: usize = desired.iter().map(|s| s.backends.len()).sum();
    let mut dp = Dataplane::load(
        pin,
        &LbLimits {
            services: n + 16,
            backends: backends as u32 + 16,
            // Two entries per flow, and headroom so the LRU never evicts what we measure.
            flows: (2 * max_flows + max_flows / 2) as u32,
            ..LbLimits::default()
        },
    )?;
    dp.lb_mut().set_node(&NodeLb::new(NODE)?)?;
    let started = Instant::now();
    dp.lb_mut().apply(&desired)?;
    let apply = started.elapsed();
    drop(desired);

    let published = u64::from(n.min(MAX_PUBLISHED));
    let mut rng = Lcg(u64::from(n));
    let run_out = |frame: &[u8]| -> Result<(u32, u32, Vec<u8>)> {
        let r = dp.test_run_lb_ingress(frame, 1, SkbContext::default())?;
        Ok((r.retval, r.duration_ns, r.data))
    };
    let run = |frame: &[u8]| -> Result<(u32, u32)> {
        let (v, ns, _) = run_out(frame)?;
        Ok((v, ns))
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        percentile_sorted(&v, 0.5)
    };
    let expect = |what: &str, (verdict, ns): (u32, u32), want: u32| -> Result<f64> {
        ensure!(
            verdict == want,
            "{what}: verdict {verdict}, expected {want}, at {n} services"
        );
        Ok(f64::from(ns))
    };

    let non_ip = non_ip_frame();
    let pass = frame(client(0).0, 1, NODE, 22, SYN);
    // The floor in batches: the per-run average without a clock read around every run.
    let mut batched = Vec::new();
    for _ in 0..20 {
        let r = dp.test_run_lb_ingress(&pass, 1000, SkbContext::default())?;
        ensure!(r.retval == TC_ACT_OK, "pass frame: verdict {}", r.retval);
        batched.push(f64::from(r.duration_ns));
    }

    // Flow k: client(k) → NODE:(FIRST_PORT + service(k)).
    let mut flows: Vec<u16> = Vec::with_capacity(max_flows as usize);
    let open = |flows: &mut Vec<u16>, rng: &mut Lcg| -> Result<f64> {
        let k = flows.len() as u64;
        let (src, sport) = client(k);
        let port = FIRST_PORT + rng.below(published) as u16;
        let (verdict, ns, out) = run_out(&frame(src, sport, NODE, port, SYN))?;
        let ns = expect(
            &format!("new flow {k} to port {port}"),
            (verdict, ns),
            TC_ACT_REDIRECT,
        )?;
        // The rest of the handshake (untimed) makes it an established flow: the backend's
        // SYN-ACK back through the reply entry, then the client's ACK of it.
        let (backend, snat) = (&out[30..34], &out[34..36]);
        let backend = Ipv4Addr::new(backend[0], backend[1], backend[2], backend[3]);
        let snat = u16::from_be_bytes([snat[0], snat[1]]);
        let target = u16::from_be_bytes([out[36], out[37]]);
        let (verdict, _) = run(&frame(backend, target, NET, snat, SYN | ACK))?;
        ensure!(
            verdict == TC_ACT_REDIRECT,
            "SYN-ACK of flow {k} not redirected"
        );
        let (verdict, _) = run(&with_ack(frame(src, sport, NODE, port, ACK), 2))?;
        ensure!(verdict == TC_ACT_REDIRECT, "ACK of flow {k} not redirected");
        flows.push(port);
        Ok(ns)
    };
    let mut cells = Vec::new();
    let mut strangers = 0u64;
    for level in levels {
        let start = level.saturating_sub(((WARMUP + samples) / 2) as u64);
        while (flows.len() as u64) < start {
            open(&mut flows, &mut rng)?;
        }
        let mut v: [Vec<f64>; 5] = Default::default();
        for i in 0..WARMUP + samples {
            // A client that never opened a flow, mid-connection, at a published port.
            strangers += 1;
            let (src, sport) = client(STRANGERS + strangers);
            let port = FIRST_PORT + rng.below(published) as u16;
            let no_flow = frame(src, sport, NODE, port, ACK);
            let k = rng.below(flows.len() as u64);
            let (src, sport) = client(k);
            let established = frame(src, sport, NODE, flows[k as usize], ACK);
            let turn = [
                expect("non-IP frame", run(&non_ip)?, TC_ACT_OK)?,
                expect("pass frame", run(&pass)?, TC_ACT_OK)?,
                expect("ACK without a flow", run(&no_flow)?, TC_ACT_OK)?,
                expect(
                    &format!("established flow {k}"),
                    run(&established)?,
                    TC_ACT_REDIRECT,
                )?,
                open(&mut flows, &mut rng)?,
            ];
            if i >= WARMUP {
                for (samples, ns) in v.iter_mut().zip(turn) {
                    samples.push(ns);
                }
            }
        }
        let [non_ip_ns, floor_ns, no_flow_ns, established_ns, new_flow_ns] = v.map(median);
        cells.push(Cell {
            flows: *level,
            non_ip_ns,
            floor_ns,
            no_flow_ns,
            established_ns,
            new_flow_ns,
        });
    }
    Ok(MeshPoint {
        services: n,
        apply,
        floor_batched_ns: median(batched),
        cells,
    })
}

#[derive(Clone, Copy, Debug, Default)]
struct NetfilterPoint {
    /// ns added per first packet, over an empty nat chain.
    iptables: f64,
    nft_map: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Rules {
    Empty,
    Iptables,
    NftMap,
}

/// Opens connections through a router with `n` services in each rule shape.
fn netfilter_point(n: u32, quick: bool) -> Result<NetfilterPoint> {
    let tag = format!("bench{}xnf", std::process::id());
    // Per rule shape: client ── router (nat rules) ── backend, each its own namespace.
    let mut paths = Vec::new();
    for (i, rules) in [Rules::Empty, Rules::Iptables, Rules::NftMap]
        .into_iter()
        .enumerate()
    {
        let client = Netns::create(&format!("{tag}-c{i}"))?;
        let router = Netns::create(&format!("{tag}-r{i}"))?;
        let backend = Netns::create(&format!("{tag}-b{i}"))?;
        client.sh(&format!(
            "ip link add eth0 type veth peer name eth0 netns {r} && \
             ip addr add 198.51.100.1/24 dev eth0 && ip link set eth0 up && \
             ip route add 10.96.0.0/12 via 198.51.100.2",
            r = router.name()
        ))?;
        router.sh(&format!(
            "ip link add eth1 type veth peer name eth0 netns {b} && \
             ip addr add 198.51.100.2/24 dev eth0 && ip link set eth0 up && \
             ip addr add 198.51.101.1/24 dev eth1 && ip link set eth1 up && \
             sysctl -qw net.ipv4.ip_forward=1 && \
             ip route add 10.96.0.0/12 via 198.51.101.2 && \
             ip route add 10.112.0.0/12 via 198.51.101.2",
            b = backend.name()
        ))?;
        // The backend owns every VIP and backend address and has no listener: it answers
        // each SYN with a RST, so a connect() is one round trip through the router.
        backend.sh(
            "ip addr add 198.51.101.2/24 dev eth0 && ip link set eth0 up && \
             ip route add default via 198.51.101.1 && \
             ip route add local 10.96.0.0/12 dev lo && ip route add local 10.112.0.0/12 dev lo",
        )?;
        load_rules(&router, rules, n)?;
        paths.push((client, router, backend));
    }
    let budget = if quick {
        Duration::from_millis(300)
    } else {
        Duration::from_millis(800)
    };
    let mut best = [f64::INFINITY; 3];
    for _round in 0..3 {
        for (i, (client, _, _)) in paths.iter().enumerate() {
            let ns = client.run(move || refused_connects(n, budget))??;
            best[i] = best[i].min(ns);
        }
    }
    drop(paths);
    Ok(NetfilterPoint {
        iptables: (best[1] - best[0]).max(0.0),
        nft_map: (best[2] - best[0]).max(0.0),
    })
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i)
}

fn backend(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 112, 0, 0)) + i)
}

fn load_rules(router: &Netns, rules: Rules, n: u32) -> Result<()> {
    let path = std::env::temp_dir().join(format!("{}.rules", router.name()));
    let mut text = String::new();
    let command = match rules {
        Rules::Empty => {
            text.push_str(
                "table ip bench {\n chain pre {\n  type nat hook prerouting priority dstnat;\n }\n}\n",
            );
            "nft -f"
        }
        Rules::Iptables => {
            text.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:BENCH-SERVICES - [0:0]\n");
            text.push_str("-A PREROUTING -j BENCH-SERVICES\n");
            for i in 0..n {
                let _ = writeln!(
                    text,
                    "-A BENCH-SERVICES -d {}/32 -p tcp --dport 80 -j DNAT --to-destination {}:8080",
                    vip(i),
                    backend(i)
                );
            }
            text.push_str("COMMIT\n");
            "iptables-restore"
        }
        Rules::NftMap => {
            text.push_str(
                "table ip bench {\n map services {\n  type ipv4_addr . inet_service : ipv4_addr . inet_service\n  elements = { ",
            );
            for i in 0..n {
                if i > 0 {
                    text.push_str(", ");
                }
                let _ = write!(text, "{} . 80 : {} . 8080", vip(i), backend(i));
            }
            text.push_str(
                " }\n }\n chain pre {\n  type nat hook prerouting priority dstnat;\n  \
                 dnat ip addr . port to ip daddr . tcp dport map @services\n }\n}\n",
            );
            "nft -f"
        }
    };
    std::fs::write(&path, text)?;
    let started = Instant::now();
    let r = router.sh(&format!("{command} {}", path.display()));
    let _ = std::fs::remove_file(&path);
    r.with_context(|| format!("loading {n} services as {rules:?}"))?;
    eprintln!(
        "    {rules:?}: {n} services loaded in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Median wall-clock ns of a refused connect() to a random VIP: SYN through the router's
/// nat rules, RST back through conntrack. Runs on a thread inside the client namespace.
/// The median, not the mean: a shared machine's preemptions hit single attempts.
fn refused_connects(services: u32, budget: Duration) -> Result<f64> {
    let mut rng = Lcg(u64::from(services) ^ 0x5eed);
    let mut times = Vec::new();
    let started = Instant::now();
    while started.elapsed() < budget || times.len() < 20 {
        let addr = std::net::SocketAddr::from((vip(rng.below(u64::from(services)) as u32), 80));
        let t = Instant::now();
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Ok(_) => bail!("{addr} accepted a connection: the backend namespace should refuse"),
            Err(e) => return Err(e).with_context(|| format!("connecting to {addr}")),
        }
        times.push(t.elapsed().as_nanos() as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(percentile_sorted(&times, 0.5))
}

/// `LoadBalancer::apply` alone for `n` services into fresh maps (for the programming
/// benchmark).
pub fn apply_time(n: u32) -> Result<Duration> {
    let pin = PathBuf::from(format!(
        "/sys/fs/bpf/mesh/bench{}apply{n}",
        std::process::id()
    ));
    let result = (|| {
        let desired = services(n);
        let backends: usize = desired.iter().map(|s| s.backends.len()).sum();
        let mut dp = Dataplane::load(
            &pin,
            &LbLimits {
                services: n + 16,
                backends: backends as u32 + 16,
                ..LbLimits::default()
            },
        )?;
        dp.lb_mut().set_node(&NodeLb::new(NODE)?)?;
        let started = Instant::now();
        dp.lb_mut().apply(&desired)?;
        let took = started.elapsed();
        // A second apply of the same table must change nothing (and is the reconcile cost).
        let ops = dp.lb_mut().apply(&desired)?;
        ensure!(
            ops.total() == 0,
            "re-applying the same table changed {} entries",
            ops.total()
        );
        Ok(took)
    })();
    let _ = std::fs::remove_dir_all(&pin);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_a_valid_ip_checksum() {
        let f = frame(Ipv4Addr::new(198, 18, 0, 1), 1234, NODE, 8080, SYN);
        assert_eq!(checksum(&f[14..34]), 0);
    }
}
