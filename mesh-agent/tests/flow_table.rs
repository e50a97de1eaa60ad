//! The two flow tables on crafted frames in this kernel (BPF_PROG_TEST_RUN): new flows are
//! embryonic until their client answers the backend, a flood of new flows evicts only
//! embryos, and a closed flow's SNAT port is not given to a new flow to the same backend
//! while the backend may still hold it in TIME_WAIT.

mod lab;

use std::{net::Ipv4Addr, time::Duration};

use lab::{
    BACKENDS, CLIENT, Frame, Lab, NET_ADDR, NODE_IP, TC_ACT_REDIRECT, TC_ACT_SHOT, service, tcp,
    udp,
};
use mesh_agent::lb::{FlowTimeouts, LbLimits};
use mesh_common::lb::{FLOW_EMBRYO, FLOW_REPLY, Reason};

/// The lab's frames all carry sequence number 1000.
const SEQ: u32 = 1000;

/// The embryo flags of the forward entry of the flow from CLIENT:`sport`.
fn embryonic(lab: &Lab, sport: u16) -> Option<bool> {
    lab.dp
        .lb()
        .flows()
        .unwrap()
        .iter()
        .find(|(k, f)| f.flags & FLOW_REPLY == 0 && k.sport == sport && k.src == CLIENT.octets())
        .map(|(_, f)| f.flags & FLOW_EMBRYO != 0)
}

/// SYN, the backend's SYN-ACK, the client's ACK: what an answering client does.
fn handshake(lab: &Lab, src: Ipv4Addr, sport: u16) -> Frame {
    let fwd = Frame::parse(&lab.run(&tcp(src, sport, NODE_IP, 8080).syn()).1);
    let (v, _) = lab.run(&tcp(fwd.dst, 80, NET_ADDR, fwd.sport).syn().ack(1));
    assert_eq!(v, TC_ACT_REDIRECT, "SYN-ACK of {src}:{sport}");
    let (v, _) = lab.run(&tcp(src, sport, NODE_IP, 8080).ack(SEQ + 1));
    assert_eq!(v, TC_ACT_REDIRECT, "ACK of {src}:{sport}");
    fwd
}

#[test]
fn a_tcp_flow_is_established_when_its_client_acks_the_backends_syn_ack() {
    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);

    let fwd = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).1);
    assert_eq!(embryonic(&lab, 40000), Some(true), "a SYN makes an embryo");
    let (v, out) = lab.run(&tcp(fwd.dst, 80, NET_ADDR, fwd.sport).syn().ack(1));
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(
        Frame::parse(&out).dst,
        CLIENT,
        "embryos translate replies too"
    );
    assert_eq!(
        embryonic(&lab, 40000),
        Some(true),
        "a SYN-ACK alone proves nothing: backends answer spoofed SYNs too"
    );
    lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).ack(SEQ + 7));
    assert_eq!(
        embryonic(&lab, 40000),
        Some(true),
        "an ACK of another sequence number is a blind guess"
    );

    let (v, out) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).ack(SEQ + 1));

    assert_eq!(v, TC_ACT_REDIRECT);
    let p = Frame::parse(&out);
    assert_eq!((p.dst, p.sport), (fwd.dst, fwd.sport));
    assert!(p.ip_checksum_ok() && p.l4_checksum_ok());
    assert_eq!(embryonic(&lab, 40000), Some(false), "established");
    assert_eq!(lab.reason(Reason::Promoted), 1);
    assert_eq!(lab.dp.lb().flows().unwrap().len(), 2, "moved, not copied");
    // Both directions keep working from the established table.
    let again = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).ack(SEQ + 1)).1);
    assert_eq!((again.dst, again.sport), (fwd.dst, fwd.sport));
    let (v, out) = lab.run(
        &tcp(fwd.dst, 80, NET_ADDR, fwd.sport)
            .ack(2)
            .payload(b"HTTP"),
    );
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(Frame::parse(&out).dport, 40000);
}

#[test]
fn a_udp_flow_is_established_when_its_client_sends_after_the_backends_answer() {
    let mut lab = Lab::new();
    let mut s = service("dns", 5353, 53, &BACKENDS);
    s.ports[0].proto = mesh_agent::lb::Protocol::Udp;
    lab.apply(&[s]);

    let fwd = Frame::parse(&lab.run(&udp(CLIENT, 40000, NODE_IP, 5353).payload(b"q1")).1);
    lab.run(&udp(CLIENT, 40000, NODE_IP, 5353).payload(b"q2"));
    assert_eq!(
        embryonic(&lab, 40000),
        Some(true),
        "a client talking alone is not established"
    );
    let (v, _) = lab.run(&udp(fwd.dst, 53, NET_ADDR, fwd.sport).payload(b"a1"));
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(embryonic(&lab, 40000), Some(true));

    lab.run(&udp(CLIENT, 40000, NODE_IP, 5353).payload(b"q3"));

    assert_eq!(embryonic(&lab, 40000), Some(false));
    assert_eq!(lab.reason(Reason::Promoted), 1);
}

#[test]
fn a_syn_flood_evicts_embryos_only_and_never_an_established_flow() {
    // 1024 embryo entries: room for 512 flows in their handshake.
    let mut lab = Lab::with_limits(LbLimits {
        embryos: 1024,
        ..lab::small_limits()
    });
    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);
    let established = handshake(&lab, CLIENT, 40000);
    let (mut evicted_before, mut rng) = (0, 0x2545_f491_u32);

    // 20 floods of 1000 spoofed SYNs (the backend answers each: that must not count), each
    // followed by a new legitimate handshake and a packet of the established connection.
    for round in 0..20u16 {
        for _ in 0..1000 {
            rng ^= rng << 13;
            rng ^= rng >> 17;
            rng ^= rng << 5;
            // 198.18.0.0/15, the benchmarking range.
            let src = Ipv4Addr::from(0xc612_0000 | (rng & 0x0001_ffff));
            let sport = (rng >> 8) as u16 | 1024;
            let (v, out) = lab.run(&tcp(src, sport, NODE_IP, 8080).syn());
            assert_eq!(v, TC_ACT_REDIRECT);
            let f = Frame::parse(&out);
            lab.run(&tcp(f.dst, 80, NET_ADDR, f.sport).syn().ack(1));
        }
        let fresh = handshake(&lab, CLIENT, 41000 + round);
        assert_eq!(embryonic(&lab, 41000 + round), Some(false), "round {round}");
        let (v, out) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).ack(SEQ + 1));
        assert_eq!(
            v, TC_ACT_REDIRECT,
            "the established flow survives round {round}"
        );
        let p = Frame::parse(&out);
        assert_eq!((p.dst, p.sport), (established.dst, established.sport));
        assert_ne!(fresh.sport, established.sport);
        let evicted = lab.dp.lb().flow_table().unwrap().embryonic_evicted;
        assert!(evicted > evicted_before, "round {round}: nothing evicted?");
        evicted_before = evicted;
    }
    let t = lab.dp.lb().flow_table().unwrap();
    assert_eq!(t.established, 21, "the first flow and one per round");
    assert!(t.embryonic <= 512, "{t:?}");
    assert!(t.embryonic_evicted >= 19_000, "{t:?}");
    assert_eq!(lab.reason(Reason::Promoted), 21);
}

#[test]
fn a_closed_flows_snat_port_is_not_reused_towards_its_backend_within_time_wait() {
    let mut lab = Lab::with_node(|n| n.snat_ports = 2000..=2000);
    lab.apply(&[service("web", 8080, 80, &BACKENDS[..1])]);
    let close = |lab: &Lab, sport: u16| {
        let f = handshake(lab, CLIENT, sport);
        assert_eq!(f.sport, 2000);
        // The backend closes first (Connection: close): it is the one left in TIME_WAIT.
        lab.run(&tcp(f.dst, 80, NET_ADDR, 2000).fin().ack(SEQ + 1));
        lab.run(&tcp(CLIENT, sport, NODE_IP, 8080).fin().ack(SEQ + 2));
        lab.run(&tcp(f.dst, 80, NET_ADDR, 2000).ack(SEQ + 2));
    };
    let swept = FlowTimeouts {
        tcp_closed: Duration::ZERO,
        ..FlowTimeouts::default()
    };

    // Without a reservation (what the sweep did before): the port goes straight back to the
    // same backend, whose TIME_WAIT socket answers the new SYN with an ACK of the old flow.
    close(&lab, 40000);
    let r = lab
        .dp
        .lb_mut()
        .sweep(&FlowTimeouts {
            snat_reuse_delay: Duration::ZERO,
            ..swept
        })
        .unwrap();
    assert_eq!((r.removed, r.reserved), (2, 0));
    close(&lab, 40001);

    // With it: the port is held towards that backend.
    let r = lab.dp.lb_mut().sweep(&swept).unwrap();
    assert_eq!((r.removed, r.reserved), (2, 1));
    assert_eq!(lab.dp.lb().flow_table().unwrap().snat_reserved, 1);
    assert_eq!(
        lab.run(&tcp(CLIENT, 40002, NODE_IP, 8080).syn()).0,
        TC_ACT_SHOT
    );
    assert_eq!(lab.reason(Reason::SnatExhausted), 1);

    // Another backend may use the same port at once: its 4-tuple differs.
    lab.apply(&[service("web", 8080, 80, &BACKENDS[1..2])]);
    let (v, out) = lab.run(&tcp(CLIENT, 40003, NODE_IP, 8080).syn());
    assert_eq!(v, TC_ACT_REDIRECT);
    let p = Frame::parse(&out);
    assert_eq!((p.dst, p.sport), (BACKENDS[1], 2000));
}

#[test]
fn a_client_reusing_its_port_leaves_the_old_flows_snat_port_reserved() {
    let mut lab = Lab::with_node(|n| n.snat_ports = 2000..=2001);
    lab.apply(&[service("web", 8080, 80, &BACKENDS[..1])]);
    let first = handshake(&lab, CLIENT, 40000);
    lab.run(&tcp(first.dst, 80, NET_ADDR, first.sport).fin().ack(SEQ + 1));
    lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).fin().ack(SEQ + 2));
    // The same client port again: a new flow, the old reply half left behind.
    let second = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).1);
    assert_ne!(second.sport, first.sport);
    lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).rst());

    let r = lab
        .dp
        .lb_mut()
        .sweep(&FlowTimeouts {
            tcp_closed: Duration::ZERO,
            orphan: Duration::ZERO,
            ..FlowTimeouts::default()
        })
        .unwrap();

    assert_eq!(
        r.reserved, 2,
        "the orphaned reply half's port and the reset flow's"
    );
    assert_eq!(
        lab.run(&tcp(CLIENT, 40001, NODE_IP, 8080).syn()).0,
        TC_ACT_SHOT
    );
}

/// The sweep lists the tables, then removes what it found finished. A client that reuses
/// the port of a finished connection in between starts a new connection on the same
/// 5-tuple, under the same keys: the sweep must leave that one alone (it did not: the
/// client's next packet met no flow and the node answered RST).
#[test]
fn a_connection_on_a_reused_port_survives_a_sweep_that_listed_the_finished_one() {
    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &BACKENDS[..1])]);
    let first = handshake(&lab, CLIENT, 40000);
    lab.run(&tcp(first.dst, 80, NET_ADDR, first.sport).fin().ack(SEQ + 1));
    lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).fin().ack(SEQ + 2));
    let swept = FlowTimeouts {
        tcp_closed: Duration::ZERO,
        ..FlowTimeouts::default()
    };
    let plan = lab.dp.lb().plan_sweep(&swept).unwrap();
    assert_eq!(plan.entries(), 2, "{plan:?}");

    // The client's port again, before the sweep removes anything.
    let second = handshake(&lab, CLIENT, 40000);
    assert_ne!(
        second.sport, first.sport,
        "a new flow, with its own SNAT port"
    );
    let r = lab.dp.lb_mut().finish_sweep(plan).unwrap();

    // The old connection's reply half (keyed by its own SNAT port) is still the old one;
    // the forward key now belongs to the new connection.
    assert_eq!(r.removed, 1, "{r:?}");
    let flows = lab.dp.lb().flows().unwrap();
    assert!(
        !flows
            .iter()
            .any(|(k, _)| k.dport == first.sport && k.dst == NET_ADDR.octets()),
        "the old reply half is gone: {flows:?}"
    );
    assert_eq!(flows.len(), 2, "the new connection's two halves: {flows:?}");
    assert_eq!(embryonic(&lab, 40000), Some(false), "still established");
    let (v, out) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).ack(SEQ + 1));
    assert_eq!(
        v, TC_ACT_REDIRECT,
        "the new connection's data still has its flow"
    );
    assert_eq!(Frame::parse(&out).sport, second.sport);

    // Once that one is finished too, the next sweep removes it as usual.
    lab.run(
        &tcp(second.dst, 80, NET_ADDR, second.sport)
            .fin()
            .ack(SEQ + 1),
    );
    lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).fin().ack(SEQ + 2));
    let r = lab.dp.lb_mut().sweep(&swept).unwrap();
    assert_eq!(r.removed, 2, "{r:?}");
    assert_eq!(embryonic(&lab, 40000), None);
}
