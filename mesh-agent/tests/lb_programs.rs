//! The routing-mesh program run on crafted frames in this kernel (BPF_PROG_TEST_RUN): each
//! test programs the maps through `LoadBalancer`, runs the real program on frames built
//! with etherparse, and checks the verdict, the rewritten bytes and the checksums.

mod lab;

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use lab::{
    BACKENDS, CLIENT, Frame, Lab, NET_ADDR, NODE_IP, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
    reason, service, tcp, udp,
};
use mesh_agent::lb::{BackendLb, FlowTimeouts, LbLimits};
use mesh_common::lb::{FLOW_REPLY, Reason};

#[test]
fn a_new_tcp_flow_goes_to_a_backend_from_a_snat_port_with_valid_checksums() {
    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);

    let (verdict, out) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn());

    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = Frame::parse(&out);
    assert_eq!(p.src, NET_ADDR, "source NAT to the node's network address");
    assert!(
        BACKENDS.contains(&p.dst),
        "sent to a backend, not {}",
        p.dst
    );
    assert_eq!(p.dport, 80, "published 8080 maps to target 80");
    assert!(
        (1024..=32767).contains(&p.sport),
        "SNAT port {} outside the configured range",
        p.sport
    );
    assert!(p.ip_checksum_ok(), "IPv4 header checksum");
    assert!(p.l4_checksum_ok(), "TCP checksum");
    assert_eq!(lab.reason(Reason::NewFlow), 1);
    assert_eq!(lab.reason(Reason::Forwarded), 1);
}

#[test]
fn packets_of_an_established_flow_keep_their_backend_and_snat_port() {
    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);
    let first = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).1);

    // Other clients in between move the round robin on.
    for port in 41000..41005 {
        lab.run(&tcp(CLIENT, port, NODE_IP, 8080).syn());
    }
    for _ in 0..5 {
        let (verdict, out) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).ack(1).payload(b"GET /"));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let p = Frame::parse(&out);
        assert_eq!((p.dst, p.sport), (first.dst, first.sport));
        assert!(p.l4_checksum_ok());
    }
    assert_eq!(lab.reason(Reason::NewFlow), 6);
}

#[test]
fn a_reply_from_the_backend_is_restored_and_sent_back_where_the_client_came_from() {
    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);
    let fwd = Frame::parse(&lab.run_on(&tcp(CLIENT, 40000, NODE_IP, 8080).syn(), 1).1);

    let reply = tcp(fwd.dst, 80, NET_ADDR, fwd.sport).syn().ack(1);
    let (verdict, out) = lab.run_on(&reply, 1);

    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = Frame::parse(&out);
    assert_eq!(
        (p.src, p.sport),
        (NODE_IP, 8080),
        "seen from the published port"
    );
    assert_eq!((p.dst, p.dport), (CLIENT, 40000));
    assert!(p.ip_checksum_ok() && p.l4_checksum_ok());
    assert_eq!(lab.reason(Reason::Replied), 1);
    // The reply entry redirects out of the interface the client's packet came in on.
    let flows = lab.dp.lb().flows().unwrap();
    let (_, entry) = flows
        .iter()
        .find(|(_, f)| f.flags & FLOW_REPLY != 0)
        .expect("a reply entry");
    assert_eq!(entry.ifindex, 1);
}

#[test]
fn the_node_takes_one_from_the_ttl_both_ways_and_drops_packets_that_would_expire() {
    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);
    let fwd = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn().ttl(64)).1);
    assert_eq!(fwd.ttl, 63, "a router's hop");
    assert!(fwd.ip_checksum_ok() && fwd.l4_checksum_ok());
    let reply = Frame::parse(
        &lab.run(&tcp(fwd.dst, 80, NET_ADDR, fwd.sport).syn().ack(1).ttl(2))
            .1,
    );
    assert_eq!(reply.ttl, 1);
    assert!(reply.ip_checksum_ok() && reply.l4_checksum_ok());

    for ttl in [1, 0] {
        let (verdict, _) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).ack(1).ttl(ttl));
        assert_eq!(verdict, TC_ACT_SHOT, "TTL {ttl}");
    }
    let (verdict, _) = lab.run(&tcp(CLIENT, 40001, NODE_IP, 8080).syn().ttl(1));
    assert_eq!(verdict, TC_ACT_SHOT, "a new flow's first packet too");
    assert_eq!(lab.reason(Reason::TtlExceeded), 3);
}

#[test]
fn a_port_no_longer_published_keeps_its_established_flows_and_takes_no_new_ones() {
    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);
    let fwd = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).1);
    let mut unpublished = service("web", 8080, 80, &BACKENDS);
    unpublished.ports.clear();
    lab.apply(&[unpublished]);

    let (verdict, out) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).ack(1).payload(b"GET /"));
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "the established connection finishes"
    );
    let p = Frame::parse(&out);
    assert_eq!((p.dst, p.sport), (fwd.dst, fwd.sport));
    let (verdict, out) = lab.run(&tcp(fwd.dst, 80, NET_ADDR, fwd.sport).ack(6));
    assert_eq!(verdict, TC_ACT_REDIRECT, "and its replies");
    assert_eq!(Frame::parse(&out).dst, CLIENT);

    let syn = tcp(CLIENT, 40001, NODE_IP, 8080).syn();
    let (verdict, out) = lab.run(&syn);
    assert_eq!(
        (verdict, out),
        (TC_ACT_OK, syn.bytes()),
        "a new one is the kernel's"
    );
    // The client's port reused after its connection finished: a new connection too.
    lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).fin().ack(1));
    let again = tcp(CLIENT, 40000, NODE_IP, 8080).syn();
    assert_eq!(lab.run(&again), (TC_ACT_OK, again.bytes()));
}

#[test]
fn thirty_new_flows_are_spread_round_robin_ten_per_backend() {
    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);

    let mut hits: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for port in 0..30 {
        let (verdict, out) = lab.run(&tcp(CLIENT, 50000 + port, NODE_IP, 8080).syn());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        *hits.entry(Frame::parse(&out).dst).or_default() += 1;
    }

    assert_eq!(hits.len(), 3, "{hits:?}");
    assert!(hits.values().all(|n| *n == 10), "{hits:?}");
    let stats = lab.dp.lb().service_stats("web").unwrap().unwrap();
    assert_eq!(stats.counters.flows, 30);
    assert!(stats.backends.iter().all(|b| b.counters.flows == 10));
}

#[test]
fn traffic_counted_on_every_cpu_adds_up_in_the_services_counters() {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;

    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);
    let allowed = sched_getaffinity(Pid::from_raw(0)).unwrap();
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|c| allowed.is_set(*c).unwrap_or(false))
        .collect();
    // A test run executes the program on the calling thread's CPU: one connection from
    // each CPU lands in that CPU's stripe of the counters.
    for (i, cpu) in cpus.iter().enumerate() {
        let mut only = CpuSet::new();
        only.set(*cpu).unwrap();
        sched_setaffinity(Pid::from_raw(0), &only).unwrap();
        let syn = tcp(CLIENT, 41000 + i as u16, NODE_IP, 8080).syn();
        assert_eq!(lab.run(&syn).0, TC_ACT_REDIRECT);
        assert_eq!(
            lab.run(&tcp(CLIENT, 41000 + i as u16, NODE_IP, 8080).ack(1))
                .0,
            TC_ACT_REDIRECT
        );
    }
    sched_setaffinity(Pid::from_raw(0), &allowed).unwrap();

    let n = cpus.len() as u64;
    let stats = lab.dp.lb().service_stats("web").unwrap().unwrap();
    assert_eq!(stats.counters.flows, n, "{stats:?}");
    assert_eq!(stats.counters.packets, 2 * n, "{stats:?}");
    assert!(stats.counters.bytes >= 2 * n * 54, "{stats:?}");
    let backends = stats.backends.iter().fold((0, 0), |(f, p), b| {
        (f + b.counters.flows, p + b.counters.packets)
    });
    assert_eq!(backends, (n, 2 * n), "{stats:?}");

    // A service whose id is recycled starts from zero on every CPU.
    lab.apply(&[]);
    lab.apply(&[service("api", 9090, 90, &BACKENDS)]);
    let api = lab.dp.lb().service_stats("api").unwrap().unwrap();
    assert_eq!(api.index, stats.index, "the freed id is reused");
    assert_eq!(api.counters, Default::default(), "{api:?}");
    assert!(
        api.backends
            .iter()
            .all(|b| b.counters == Default::default())
    );
}

#[test]
fn a_draining_backend_keeps_its_flow_but_gets_no_new_ones() {
    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);
    let pinned = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).1);

    let mut s = service("web", 8080, 80, &BACKENDS);
    s.backends = BACKENDS
        .iter()
        .map(|ip| BackendLb {
            ip: *ip,
            draining: *ip == pinned.dst,
        })
        .collect();
    lab.apply(&[s]);

    let again = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).ack(1)).1);
    assert_eq!(
        again.dst, pinned.dst,
        "the established flow stays on its backend"
    );
    for port in 0..20 {
        let p = Frame::parse(&lab.run(&tcp(CLIENT, 50000 + port, NODE_IP, 8080).syn()).1);
        assert_ne!(p.dst, pinned.dst, "a draining backend got a new flow");
    }
}

#[test]
fn udp_flows_are_balanced_and_a_missing_udp_checksum_stays_missing() {
    let mut lab = Lab::new();
    let mut s = service("dns", 5353, 53, &BACKENDS);
    s.ports[0].proto = mesh_agent::lb::Protocol::Udp;
    lab.apply(&[s]);

    let (verdict, out) = lab.run(&udp(CLIENT, 40000, NODE_IP, 5353).payload(b"query"));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = Frame::parse(&out);
    assert_eq!((p.src, p.dport), (NET_ADDR, 53));
    assert!(p.ip_checksum_ok() && p.l4_checksum_ok());

    let no_checksum = udp(CLIENT, 40001, NODE_IP, 5353)
        .payload(b"query")
        .without_udp_checksum();
    let (verdict, out) = lab.run(&no_checksum);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = Frame::parse(&out);
    assert_eq!(p.l4_checksum, 0, "0 means no checksum and must stay 0");
    assert!(p.ip_checksum_ok());
}

/// Overlay packets are most of what nodes send each other; the program passes them before
/// any lookup. Even a table that (wrongly) published the VXLAN port could not capture them:
/// the agent refuses that port, and the program does not look.
#[test]
fn overlay_packets_to_the_node_pass_untouched_even_if_their_port_were_published() {
    let mut lab = Lab::new();
    let mut s = service("vxlan", mesh_common::lb::VXLAN_PORT, 53, &BACKENDS);
    s.ports[0].proto = mesh_agent::lb::Protocol::Udp;
    lab.apply(&[s]);

    let overlay = udp(CLIENT, 40000, NODE_IP, mesh_common::lb::VXLAN_PORT)
        .payload(&[8, 0, 0, 0, 0, 16, 0, 0])
        .bytes();
    let (verdict, out) = lab.run_raw(&overlay);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, overlay, "passed untouched");
    assert_eq!(lab.reason(Reason::NewFlow), 0, "no flow created");
    assert_eq!(lab.reason(Reason::Forwarded), 0);
}

#[test]
fn ip_options_move_the_transport_header_and_are_handled() {
    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);

    let with_options = tcp(CLIENT, 40000, NODE_IP, 8080)
        .syn()
        .with_ip_options(&[1, 1, 1, 1]);
    let (verdict, out) = lab.run(&with_options);

    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = Frame::parse(&out);
    assert_eq!(p.ihl, 24);
    assert_eq!(p.dport, 80);
    assert!(p.ip_checksum_ok() && p.l4_checksum_ok());
}

#[test]
fn malformed_packets_are_passed_or_dropped_and_counted_and_create_no_state() {
    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);
    let syn = || tcp(CLIENT, 40000, NODE_IP, 8080).syn();

    // Frames shorter than an IPv4 header are refused by BPF_PROG_TEST_RUN itself (EINVAL);
    // the namespace scenario throws those at the program from a raw socket.
    let cases: Vec<(&str, Vec<u8>, u32, Reason)> = vec![
        (
            "header length beyond the packet",
            syn().patch(14, 0x4f).bytes(),
            TC_ACT_OK,
            Reason::BadHeader,
        ),
        (
            "UDP header cut short",
            {
                let mut b = udp(CLIENT, 40000, NODE_IP, 8080).bytes();
                b.truncate(14 + 20 + 4);
                b[16..18].copy_from_slice(&24u16.to_be_bytes());
                b
            },
            TC_ACT_OK,
            Reason::Truncated,
        ),
        (
            "TCP header cut short",
            {
                let mut b = syn().bytes();
                b.truncate(14 + 20 + 10);
                // Keep the total length consistent so only the TCP header is short.
                b[16..18].copy_from_slice(&30u16.to_be_bytes());
                b
            },
            TC_ACT_OK,
            Reason::Truncated,
        ),
        (
            "header length below 20",
            syn().patch(14, 0x43).bytes(),
            TC_ACT_OK,
            Reason::BadHeader,
        ),
        (
            "IP version 5",
            syn().patch(14, 0x55).bytes(),
            TC_ACT_OK,
            Reason::BadHeader,
        ),
        (
            "total length beyond the frame",
            syn().patch16(16, 1500).bytes(),
            TC_ACT_OK,
            Reason::BadHeader,
        ),
        (
            "total length shorter than the header",
            syn().patch16(16, 12).bytes(),
            TC_ACT_OK,
            Reason::BadHeader,
        ),
        (
            "TCP data offset below 5",
            syn().patch(14 + 20 + 12, 0x40).bytes(),
            TC_ACT_OK,
            Reason::BadHeader,
        ),
        (
            "first fragment",
            syn().patch16(20, 0x2000).bytes(),
            TC_ACT_OK,
            Reason::Fragment,
        ),
        (
            "later fragment",
            syn().patch16(20, 0x0010).bytes(),
            TC_ACT_OK,
            Reason::Fragment,
        ),
        (
            "bogus IPv4 checksum",
            syn().patch16(24, 0xdead).bytes(),
            TC_ACT_OK,
            Reason::BadIpChecksum,
        ),
        (
            "ACK without a flow",
            tcp(CLIENT, 40000, NODE_IP, 8080).ack(7).bytes(),
            TC_ACT_OK,
            Reason::NotSyn,
        ),
    ];
    for (what, frame, verdict, why) in cases {
        let before = lab.reason(why);
        let (got, _) = lab.run_raw(&frame);
        assert_eq!(got, verdict, "{what}: verdict");
        assert_eq!(
            lab.reason(why),
            before + 1,
            "{what}: counted as {}",
            why.name()
        );
    }
    assert!(lab.dp.lb().flows().unwrap().is_empty(), "no flow created");

    // Not ours at all: untouched and uncounted.
    let total: u64 = lab.dp.lb().reasons().unwrap().iter().map(|(_, n)| n).sum();
    for frame in [
        tcp(CLIENT, 40000, NODE_IP, 22).syn().bytes(),
        tcp(CLIENT, 40000, Ipv4Addr::new(192, 0, 2, 9), 8080)
            .syn()
            .bytes(),
        vec![0u8; 14],
        {
            let mut arp = tcp(CLIENT, 1, NODE_IP, 2).bytes();
            arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
            arp
        },
    ] {
        let (got, out) = lab.run_raw(&frame);
        assert_eq!(got, TC_ACT_OK);
        assert_eq!(out, frame, "passed untouched");
    }
    let after: u64 = lab.dp.lb().reasons().unwrap().iter().map(|(_, n)| n).sum();
    assert_eq!(after, total);

    // And the program still works.
    assert_eq!(lab.run(&syn()).0, TC_ACT_REDIRECT);
}

#[test]
fn a_service_without_backends_drops_new_flows_and_counts_them() {
    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &[])]);

    assert_eq!(
        lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).0,
        TC_ACT_SHOT
    );
    assert_eq!(lab.reason(Reason::NoBackend), 1);
    let stats = lab.dp.lb().service_stats("web").unwrap().unwrap();
    assert_eq!(stats.counters.dropped, 1);
}

#[test]
fn when_every_snat_port_is_taken_new_flows_are_dropped() {
    let mut lab = Lab::with_node(|n| n.snat_ports = 2000..=2000);
    lab.apply(&[service("web", 8080, 80, &BACKENDS[..1])]);

    let (verdict, out) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn());
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(Frame::parse(&out).sport, 2000);
    assert_eq!(
        lab.run(&tcp(CLIENT, 40001, NODE_IP, 8080).syn()).0,
        TC_ACT_SHOT
    );
    assert_eq!(lab.reason(Reason::SnatExhausted), 1);
}

#[test]
fn a_syn_reusing_the_port_of_a_finished_connection_starts_a_new_flow() {
    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);
    let first = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).1);
    lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).fin().ack(1));

    let again = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).1);

    assert_ne!(
        again.dst, first.dst,
        "round robin moved on to the next backend"
    );
    assert_eq!(lab.reason(Reason::NewFlow), 2);
}

#[test]
fn the_sweep_removes_closed_flows_and_flows_of_removed_backends_only() {
    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);
    // Flow 1 closes in both directions; flows 2-4 stay open.
    let closed = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).1);
    let open: Vec<Frame> = (1..4)
        .map(|i| Frame::parse(&lab.run(&tcp(CLIENT, 40000 + i, NODE_IP, 8080).syn()).1))
        .collect();
    for f in open.iter().chain([&closed]) {
        lab.run(&tcp(f.dst, 80, NET_ADDR, f.sport).syn().ack(1));
    }
    lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).fin().ack(1));
    lab.run(&tcp(closed.dst, 80, NET_ADDR, closed.sport).fin().ack(2));
    assert_eq!(lab.dp.lb().flows().unwrap().len(), 8);

    let now = FlowTimeouts {
        tcp_closed: Duration::ZERO,
        ..FlowTimeouts::default()
    };
    let report = lab.dp.lb_mut().sweep(&now).unwrap();
    assert_eq!(report.removed, 2, "the closed flow's two entries");

    // Removing a backend (not draining) ends its flows at the next sweep.
    let removed = open[0].dst;
    let keep: Vec<Ipv4Addr> = BACKENDS.iter().copied().filter(|b| *b != removed).collect();
    lab.apply(&[service("web", 8080, 80, &keep)]);
    let report = lab.dp.lb_mut().sweep(&now).unwrap();
    assert_eq!(report.removed, 2);
    let left = lab.dp.lb().flows().unwrap();
    assert_eq!(left.len(), 4);
    assert!(
        left.iter()
            .all(|(k, f)| f.nat_dst != removed.octets() && k.src != removed.octets())
    );
}

#[test]
fn a_restarted_load_balancer_adopts_the_pinned_maps_and_changes_nothing() {
    let mut lab = Lab::new();
    let mut api = service("api", 9090, 90, &BACKENDS[..2]);
    api.vip = Some(Ipv4Addr::new(10, 0, 0, 3));
    let table = [service("web", 8080, 80, &BACKENDS), api];
    lab.apply(&table);
    let before = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).1);

    lab.restart();
    let ops = lab.dp.lb_mut().apply(&table).unwrap();

    assert_eq!(
        ops.total(),
        0,
        "the same table on adopted maps needs no writes"
    );
    let after = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).ack(1)).1);
    assert_eq!((after.dst, after.sport), (before.dst, before.sport));
    let stats = lab.dp.lb().service_stats("web").unwrap().unwrap();
    assert_eq!(stats.counters.flows, 1, "counters survive the restart");
    assert_eq!(stats.counters.packets, 2);
}

#[test]
fn conflicting_tables_are_refused_with_the_services_named_and_change_nothing() {
    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);
    let mut api = service("api", 8080, 90, &BACKENDS);
    api.vip = Some(Ipv4Addr::new(10, 0, 0, 3));

    let err = lab
        .dp
        .lb_mut()
        .apply(&[service("web", 8080, 80, &BACKENDS), api])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("8080/tcp is already published by service web"),
        "{err}"
    );

    let mut bad = service("web", 8080, 0, &BACKENDS);
    bad.ports[0].target = 0;
    let err = lab.dp.lb_mut().apply(&[bad]).unwrap_err().to_string();
    assert!(err.contains("out of range"), "{err}");

    // Still balanced as before.
    assert_eq!(
        lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).0,
        TC_ACT_REDIRECT
    );
}

#[test]
fn ten_thousand_services_then_one_backend_change_costs_a_handful_of_map_writes() {
    let mut lab = Lab::with_limits(LbLimits {
        services: 10_240,
        backends: 32_768,
        flows: 1024,
        embryos: 1024,
        snat_reservations: 1024,
        sockets: 1024,
        returns: 1024,
    });
    let table: Vec<_> = (0..10_000u32)
        .map(|i| {
            let b = |n: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + 2 * i + n);
            let mut s = service(&format!("svc{i}"), 10_000 + i as u16, 80, &[b(0), b(1)]);
            s.vip = Some(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i));
            s
        })
        .collect();
    let started = std::time::Instant::now();
    let ops = lab.dp.lb_mut().apply(&table).unwrap();
    eprintln!(
        "10000 services: {} map ops in {:?}",
        ops.total(),
        started.elapsed()
    );

    let mut grown = table.clone();
    grown[4321]
        .backends
        .push(BackendLb::active(Ipv4Addr::new(10, 9, 9, 9)));
    let ops = lab.dp.lb_mut().apply(&grown).unwrap();
    // Counters reset, registry entry, slot, count.
    assert!(ops.total() <= 4, "adding a backend cost {ops:?}");

    let mut shrunk = grown.clone();
    shrunk[4321].backends.remove(0);
    let ops = lab.dp.lb_mut().apply(&shrunk).unwrap();
    // Move the last slot into the hole, lower the count, delete the last slot, free the id.
    assert!(ops.total() <= 4, "removing a backend cost {ops:?}");

    let ops = lab.dp.lb_mut().apply(&shrunk).unwrap();
    assert_eq!(ops.total(), 0, "re-applying the same table is free");
    // The changed service balances over its new backend set.
    let port = 10_000 + 4321;
    let mut seen = std::collections::BTreeSet::new();
    for p in 0..4 {
        seen.insert(Frame::parse(&lab.run(&tcp(CLIENT, 50000 + p, NODE_IP, port).syn()).1).dst);
    }
    assert_eq!(seen.len(), 2);
    assert!(seen.contains(&Ipv4Addr::new(10, 9, 9, 9)));
}

#[test]
fn reply_packets_of_unknown_flows_pass_untouched() {
    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);
    let stray = tcp(BACKENDS[0], 80, NET_ADDR, 2000).syn().ack(1).bytes();
    let (verdict, out) = lab.run_raw(&stray);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, stray);
    assert_eq!(reason(&lab, Reason::Replied), 0);
}

/// The parser only exists in eBPF, so it is fuzzed where it runs: mutated frames through
/// the real program in this kernel. Whatever arrives, the verdict is pass, drop or
/// redirect; a passed frame is untouched; a redirected frame's checksums are exactly as
/// valid as they were (incremental updates never repair or break them).
#[test]
fn thousands_of_mutated_frames_never_break_the_program_or_its_checksums() {
    let mut lab = Lab::new();
    let mut dns = service("dns", 5353, 53, &BACKENDS);
    dns.id = "dns".into();
    dns.vip = Some(Ipv4Addr::new(10, 0, 0, 3));
    dns.ports[0].proto = mesh_agent::lb::Protocol::Udp;
    lab.apply(&[service("web", 8080, 80, &BACKENDS), dns]);
    let established = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).1);
    let seeds = [
        tcp(CLIENT, 40001, NODE_IP, 8080).syn().bytes(),
        tcp(CLIENT, 40000, NODE_IP, 8080)
            .ack(1)
            .payload(b"GET / HTTP/1.0\r\n\r\n")
            .bytes(),
        tcp(established.dst, 80, NET_ADDR, established.sport)
            .ack(9)
            .payload(b"HTTP/1.0 200")
            .bytes(),
        udp(CLIENT, 40002, NODE_IP, 5353)
            .payload(&[0xab; 40])
            .bytes(),
        udp(CLIENT, 40003, NODE_IP, 5353)
            .payload(b"q")
            .without_udp_checksum()
            .bytes(),
        tcp(CLIENT, 40004, NODE_IP, 8080)
            .syn()
            .with_ip_options(&[1, 1, 1, 0])
            .bytes(),
    ];

    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut redirected, mut refused) = (0, 0);
    for i in 0..20_000 {
        let mut frame = seeds[i % seeds.len()].clone();
        for _ in 0..1 + next() % 3 {
            match next() % 4 {
                0 | 1 => {
                    let at = 14 + (next() as usize % (frame.len() - 14));
                    frame[at] ^= 1 << (next() % 8);
                }
                2 => frame.truncate(34 + next() as usize % (frame.len() - 33)),
                _ => frame.extend((0..next() % 16).map(|_| next() as u8)),
            }
        }
        let before = Checks::of(&frame);
        let r = match lab.dp.test_run_lb_ingress(&frame, 1, Default::default()) {
            Ok(r) => r,
            // BPF_PROG_TEST_RUN refuses some frames itself (EINVAL).
            Err(_) => {
                refused += 1;
                continue;
            }
        };
        match r.retval {
            TC_ACT_OK | TC_ACT_SHOT => {
                if r.retval == TC_ACT_OK {
                    assert_eq!(r.data, frame, "frame {i} passed but changed");
                }
            }
            TC_ACT_REDIRECT => {
                redirected += 1;
                let after = Checks::of(&r.data);
                assert_eq!(
                    after.ip, before.ip,
                    "frame {i}: IPv4 checksum validity changed"
                );
                assert_eq!(
                    after.l4, before.l4,
                    "frame {i}: L4 checksum validity changed"
                );
            }
            other => panic!("frame {i}: unexpected verdict {other}"),
        }
    }
    eprintln!("20000 mutated frames: {redirected} redirected, {refused} refused by test-run");
    assert!(
        redirected > 1000,
        "the mutations should leave many frames valid"
    );
    assert_eq!(
        lab.run(&tcp(CLIENT, 50000, NODE_IP, 8080).syn()).0,
        TC_ACT_REDIRECT
    );
}

/// Whether a frame's checksums verify (None when there is no valid structure to check).
struct Checks {
    ip: Option<bool>,
    l4: Option<bool>,
}

impl Checks {
    fn of(frame: &[u8]) -> Self {
        let none = Self { ip: None, l4: None };
        if frame.len() < 34 || frame[12..14] != [8, 0] {
            return none;
        }
        let ihl = usize::from(frame[14] & 0x0f) * 4;
        let tot = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
        let l4_len = match frame[23] {
            6 => 20,
            17 => 8,
            _ => return none,
        };
        if frame[14] >> 4 != 4 || ihl < 20 || tot < ihl + l4_len || 14 + tot > frame.len() {
            return none;
        }
        let f = Frame::parse(frame);
        let l4 = if f.proto == 17 && f.l4_checksum == 0 {
            None
        } else {
            Some(f.l4_checksum_ok())
        };
        Self {
            ip: Some(f.ip_checksum_ok()),
            l4,
        }
    }
}
