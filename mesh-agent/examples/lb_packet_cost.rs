//! Cost of the routing-mesh program per packet, measured in this kernel with
//! BPF_PROG_TEST_RUN (run time of the program alone, as the kernel times it).
//!
//! `cargo run --release -p mesh-agent --example lb_packet_cost [-- PACKETS]`
//!
//! Needs root and bpffs; uses its own pin directory and removes it.

use std::{net::Ipv4Addr, path::PathBuf};

use anyhow::{Context, Result};
use etherparse::PacketBuilder;
use mesh_agent::{
    bpf::SkbContext,
    dataplane::Dataplane,
    lb::{BackendLb, LbLimits, NetworkLb, NodeLb, Protocol, PublishMode, PublishedPort, ServiceLb},
};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const NET: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, ack: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1, 64240);
    // An ACK acknowledges the SYN-ACK of sequence number 1 (see synack): the client's half
    // of the handshake, which makes the flow established.
    let b = if ack { b.ack(2) } else { b.syn() };
    let mut out = Vec::new();
    b.write(&mut out, &[0u8; 64]).expect("building a frame");
    out
}

/// The backend's SYN-ACK (sequence number 1).
fn synack(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1, 64240)
        .syn()
        .ack(1)
        .write(&mut out, &[])
        .expect("building a frame");
    out
}

struct Cost {
    what: &'static str,
    samples: Vec<u32>,
}

impl Cost {
    fn report(mut self) {
        self.samples.sort_unstable();
        let n = self.samples.len();
        let mean = self.samples.iter().map(|s| u64::from(*s)).sum::<u64>() as f64 / n as f64;
        println!(
            "{:<40} {:>8.0} {:>8} {:>8}",
            self.what,
            mean,
            self.samples[n / 2],
            self.samples[n * 99 / 100]
        );
    }
}

fn main() -> Result<()> {
    let packets: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()
        .context("PACKETS is a number")?
        .unwrap_or(20_000);
    let pin = PathBuf::from(format!("/sys/fs/bpf/mesh/mtlbbench{}", std::process::id()));
    let result = measure(&pin, packets);
    let _ = std::fs::remove_dir_all(&pin);
    result
}

fn measure(pin: &std::path::Path, packets: usize) -> Result<()> {
    let mut dp = Dataplane::load(
        pin,
        &LbLimits {
            flows: 4 * packets as u32 + 1024,
            ..LbLimits::default()
        },
    )?;
    dp.lb_mut().set_node(&NodeLb::new(NODE)?)?;
    let backends: Vec<BackendLb> = (11..14)
        .map(|i| BackendLb::active(Ipv4Addr::new(10, 0, 0, i)))
        .collect();
    dp.lb_mut().apply(&[ServiceLb {
        id: "web".into(),
        name: "web".into(),
        network: NetworkLb {
            id: 4096,
            node_addr: NET,
            bridge_ifindex: 1,
            // The backends are other nodes' tasks: the VXLAN path, as on a real node (a
            // test run does not perform the redirect).
            vxlan_ifindex: 1,
        },
        vip: None,
        ports: vec![PublishedPort {
            proto: Protocol::Tcp,
            published: 8080,
            target: 80,
            mode: PublishMode::Snat,
        }],
        backends,
    }])?;
    let run = |frame: &[u8], repeat: u32| -> Result<(u32, u32, Vec<u8>)> {
        let r = dp.test_run_lb_ingress(frame, repeat, SkbContext::default())?;
        Ok((r.retval, r.duration_ns, r.data))
    };
    let client =
        |i: usize| Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (i / 50_000) as u32);
    let port = |i: usize| 10_000 + (i % 50_000) as u16;

    println!("{packets} packets per path; ns per packet as timed by the kernel");
    println!("{:<40} {:>8} {:>8} {:>8}", "path", "mean", "median", "p99");

    // Everything that is not ours pays this: parse and one service lookup.
    let other = syn(client(0), 1, NODE, 22, false);
    let (_, ns, _) = run(&other, packets as u32)?;
    println!(
        "{:<40} {:>8} {:>8} {:>8}",
        "pass: node traffic, not published", ns, "-", "-"
    );

    let mut new_flow = Cost {
        what: "new flow: SYN, backend + SNAT port",
        samples: Vec::with_capacity(packets),
    };
    let mut syn_ack = Cost {
        what: "embryonic: backend's SYN-ACK",
        samples: Vec::with_capacity(packets),
    };
    let mut promote = Cost {
        what: "embryonic: client's ACK, promoted",
        samples: Vec::with_capacity(packets),
    };
    let mut replies = Vec::with_capacity(packets);
    for i in 0..packets {
        let (verdict, ns, out) = run(&syn(client(i), port(i), NODE, 8080, false), 1)?;
        anyhow::ensure!(verdict == 7, "new flow not redirected ({verdict})");
        new_flow.samples.push(ns);
        // The backend's answer to what came out.
        let b = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        let snat = u16::from_be_bytes([out[34], out[35]]);
        let (verdict, ns, _) = run(&synack(b, 80, NET, snat), 1)?;
        anyhow::ensure!(verdict == 7, "SYN-ACK not redirected ({verdict})");
        syn_ack.samples.push(ns);
        let (verdict, ns, _) = run(&syn(client(i), port(i), NODE, 8080, true), 1)?;
        anyhow::ensure!(verdict == 7, "handshake ACK not redirected ({verdict})");
        promote.samples.push(ns);
        replies.push(syn(b, 80, NET, snat, true));
    }
    let mut established = Cost {
        what: "established flow: client -> backend",
        samples: Vec::with_capacity(packets),
    };
    for i in 0..packets {
        let (verdict, ns, _) = run(&syn(client(i), port(i), NODE, 8080, true), 1)?;
        anyhow::ensure!(verdict == 7, "established flow not redirected ({verdict})");
        established.samples.push(ns);
    }
    let mut reply = Cost {
        what: "reply: backend -> client",
        samples: Vec::with_capacity(packets),
    };
    for frame in &replies {
        let (verdict, ns, _) = run(frame, 1)?;
        anyhow::ensure!(verdict == 7, "reply not redirected ({verdict})");
        reply.samples.push(ns);
    }
    // The same packets again and again: caches warm, as for one busy connection. Each
    // sample is one run (repeat=1) because a rewritten packet is no longer ours; the pass
    // path timed the same way shows the share of the kernel's timing around one run.
    let mut hot = Cost {
        what: "established flow, one busy connection",
        samples: Vec::with_capacity(packets),
    };
    let mut hot_pass = Cost {
        what: "pass, timed one run at a time",
        samples: Vec::with_capacity(packets),
    };
    let busy = syn(client(0), port(0), NODE, 8080, true);
    for _ in 0..packets {
        hot.samples.push(run(&busy, 1)?.1);
        hot_pass.samples.push(run(&other, 1)?.1);
    }
    new_flow.report();
    syn_ack.report();
    promote.report();
    established.report();
    reply.report();
    hot.report();
    hot_pass.report();
    Ok(())
}
