//! The agent loads its eBPF programs into this kernel and they see real traffic.

use std::{net::UdpSocket, time::Duration};

use mesh_tests::Cluster;
use serde::Deserialize;

#[derive(Deserialize, Debug)]
struct PortStats {
    port: u16,
    packets: u64,
}

fn packets_to(host: &mesh_tests::Host, port: u16) -> u64 {
    let stats: Vec<PortStats> = host.meshctl_json(&["dataplane", "ports"]).unwrap();
    stats
        .iter()
        .find(|s| s.port == port)
        .map_or(0, |s| s.packets)
}

/// Sends `n` datagrams from a socket inside `from`'s namespace.
fn send_udp(from: &mesh_tests::Host, target: &str, n: usize) {
    let target = target.to_owned();
    from.ns
        .run(move || {
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            for _ in 0..n {
                sock.send_to(b"hello mesh", &target).unwrap();
            }
        })
        .unwrap();
}

#[test]
fn the_underlay_program_counts_packets_per_destination_port() {
    let mut c = Cluster::new(2).unwrap();
    c.host_mut(1).start_agent(&[]).unwrap();
    let target = format!("{}:9999", c.host(1).ip);
    let before = packets_to(c.host(1), 9999);

    send_udp(c.host(2), &target, 25);

    // Counters are read from the map as the packets are processed; allow the last few to land.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut seen = 0;
    while std::time::Instant::now() < deadline {
        seen = packets_to(c.host(1), 9999) - before;
        if seen >= 25 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(seen, 25, "XDP saw {seen} of 25 UDP packets to port 9999");
    // A port nobody sent to stays at zero.
    assert_eq!(packets_to(c.host(1), 9998), 0);
}

#[test]
fn a_restarted_agent_keeps_the_pinned_counters() {
    let mut c = Cluster::new(2).unwrap();
    c.host_mut(1).start_agent(&[]).unwrap();
    let target = format!("{}:7000", c.host(1).ip);
    send_udp(c.host(2), &target, 10);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(packets_to(c.host(1), 7000), 10);

    // While the agent is down the program stays attached and keeps counting.
    c.host_mut(1).kill_agent().unwrap();
    send_udp(c.host(2), &target, 5);
    c.host_mut(1).restart_agent().unwrap();
    send_udp(c.host(2), &target, 5);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(packets_to(c.host(1), 7000), 20);
}
