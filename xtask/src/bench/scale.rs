//! Per-packet cost of the load balancer as the service table and the flow table grow, and
//! the same for netfilter DNAT at the same service counts.
//!
//! **mesh**: the routing-mesh program itself, run by the kernel on crafted frames with
//! BPF_PROG_TEST_RUN against real maps loaded with N services (each with a VIP, the first
//! 60,000 also with a published port) and up to F flows. The kernel times each run; the
//! table shows medians over many single runs (a rewritten frame is no longer the same
//! packet, so runs cannot be batched). The "pass" row is the same timing of a frame the
//! program only parses, i.e. the floor of the method.
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
    lb::{BackendLb, LbLimits, NetworkLb, NodeLb, Protocol, PublishedPort, ServiceLb},
};
use mesh_tests::Netns;

use super::report::{Plot, Report, Table, percentile_sorted};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const NET: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const FIRST_PORT: u16 = 1024;
const MAX_PUBLISHED: u32 = 60_000;
const TC_ACT_REDIRECT: u32 = 7;
const SERVICE_COUNTS: [u32; 4] = [1, 100, 10_000, 100_000];

struct MeshPoint {
    services: u32,
    apply: Duration,
    pass_ns: f64,
    /// (flows in the table, median ns) for a new flow's SYN and an established flow's packet.
    new_flow: Vec<(u64, f64)>,
    established: Vec<(u64, f64)>,
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
        "mesh: BPF_PROG_TEST_RUN of the routing-mesh program on real maps; {samples} single \
         runs per cell, median; N services with 3 backends each (at least 300 backends in \
         all, so 1M flows do not run out of SNAT ports), flows filled by real handshakes (SYN, \
         the backend's SYN-ACK, the client's ACK: established flows)"
    ));
    report.ran(
        "netfilter: sequential TCP connects from a client netns through a router netns (nat \
         rules, conntrack) to a backend netns that refuses them; cost = median time per connect \
         minus the same with an empty nat chain (medians), best of 3 interleaved rounds",
    );
    let mut t = Table::new(
        "mesh load balancer, ns per packet (kernel-timed program run)",
        &{
            let mut h = vec!["services".to_owned(), "pass (floor)".to_owned()];
            for f in flow_levels {
                h.push(format!("new flow @ {} flows", count(*f)));
            }
            for f in flow_levels {
                h.push(format!("established @ {} flows", count(*f)));
            }
            h
        }
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    for m in &mesh {
        let mut row = vec![count(u64::from(m.services)), format!("{:.0}", m.pass_ns)];
        row.extend(m.new_flow.iter().map(|(_, ns)| format!("{ns:.0}")));
        row.extend(m.established.iter().map(|(_, ns)| format!("{ns:.0}")));
        t.row(row);
    }
    report.tables.push(t);

    let mut nf = Table::new(
        "first packet of a new flow: ns added by the service table (ratio = cost / cost at 1 service)",
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
    let mesh_base = mesh[0].new_flow[0].1;
    let ipt_base = netfilter[0].1.iptables.max(1.0);
    let nft_base = netfilter[0].1.nft_map.max(1.0);
    for (m, (s, n)) in mesh.iter().zip(&netfilter) {
        nf.row(vec![
            count(u64::from(*s)),
            format!("{:.0}", m.new_flow[0].1),
            format!("{:.2}", m.new_flow[0].1 / mesh_base),
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

    let largest = *flow_levels.last().expect("levels");
    report.plots.push(Plot {
        stem: "scale".into(),
        title: "ns per new-flow packet vs services".into(),
        xlabel: "services".into(),
        ylabel: "ns per packet (log)".into(),
        logx: true,
        logy: true,
        series: vec![
            (
                "mesh (eBPF, new flow, program run)".into(),
                mesh.iter()
                    .map(|m| (f64::from(m.services), m.new_flow[0].1))
                    .collect(),
            ),
            (
                format!("mesh (eBPF, established, {} flows)", count(largest)),
                mesh.iter()
                    .map(|m| {
                        (
                            f64::from(m.services),
                            m.established.last().expect("levels").1,
                        )
                    })
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
    report.note(
        "The two methods time different things (the program alone vs the wall-time delta of \
         the netfilter rules); compare each column's growth with N (the ratio columns), not \
         mesh against netfilter cell by cell. A netfilter delta near 0 is within noise \
         (clamped to 1 ns for the ratios and the log plot).",
    );
    report.note(
        "Flows: the established-flow cost is one LRU hash lookup plus the rewrite; how it moves \
         from 10k to 1M flows shows the cache cost of a bigger table, not an algorithmic one.",
    );
    Ok(report)
}

fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// A TCP frame (Ethernet + IPv4 + TCP, no payload) with a valid IPv4 checksum; the program
/// checks it before creating state, and updates the TCP checksum incrementally.
fn frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> [u8; 54] {
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

/// `f` acknowledging `ack` (what a client sends after the SYN-ACK of sequence number 1
/// that [`frame`] builds).
fn with_ack(mut f: [u8; 54], ack: u32) -> [u8; 54] {
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

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// The n-th client of the benchmark: 50,000 ports per source address.
fn client(n: u64) -> (Ipv4Addr, u16) {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (n / 50_000) as u32);
    (ip, 10_000 + (n % 50_000) as u16)
}

/// A small deterministic generator: which service or flow a sample hits.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

fn services(n: u32) -> Vec<ServiceLb> {
    let per_service = (300 / n).max(3);
    (0..n)
        .map(|i| ServiceLb {
            id: format!("s{i}"),
            name: format!("s{i}"),
            network: NetworkLb {
                id: 4096,
                node_addr: NET,
                bridge_ifindex: 1,
            },
            vip: Some(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i)),
            ports: if i < MAX_PUBLISHED {
                vec![PublishedPort {
                    proto: Protocol::Tcp,
                    published: FIRST_PORT + i as u16,
                    target: 80,
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
    let max_flows =
        levels.iter().copied().max().unwrap_or(0) + (samples * (levels.len() + 1)) as u64;
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

    let pass = frame(client(0).0, 1, NODE, 22, SYN);
    let mut pass_ns = Vec::with_capacity(samples);
    for _ in 0..samples {
        pass_ns.push(f64::from(run(&pass)?.1));
    }

    // Flow k: client(k) → NODE:(FIRST_PORT + service(k)).
    let mut flows: Vec<u16> = Vec::with_capacity(max_flows as usize);
    let mut new_flow = Vec::new();
    let mut established = Vec::new();
    let open = |flows: &mut Vec<u16>, rng: &mut Lcg, timed: bool| -> Result<Option<f64>> {
        let k = flows.len() as u64;
        let (src, sport) = client(k);
        let port = FIRST_PORT + rng.below(published) as u16;
        let (verdict, ns, out) = run_out(&frame(src, sport, NODE, port, SYN))?;
        ensure!(
            verdict == TC_ACT_REDIRECT,
            "new flow {k} to port {port} not redirected (verdict {verdict}) at {n} services"
        );
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
        Ok(timed.then_some(f64::from(ns)))
    };
    for level in levels {
        while (flows.len() as u64) < *level {
            open(&mut flows, &mut rng, false)?;
        }
        let mut new_ns = Vec::with_capacity(samples);
        for _ in 0..samples {
            new_ns.extend(open(&mut flows, &mut rng, true)?);
        }
        let mut est_ns = Vec::with_capacity(samples);
        for _ in 0..samples {
            let k = rng.below(flows.len() as u64);
            let (src, sport) = client(k);
            let (verdict, ns) = run(&with_ack(
                frame(src, sport, NODE, flows[k as usize], ACK),
                2,
            ))?;
            ensure!(
                verdict == TC_ACT_REDIRECT,
                "established flow {k} not redirected (verdict {verdict})"
            );
            est_ns.push(f64::from(ns));
        }
        new_flow.push((*level, median(new_ns)));
        established.push((*level, median(est_ns)));
    }
    Ok(MeshPoint {
        services: n,
        apply,
        pass_ns: median(pass_ns),
        new_flow,
        established,
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
