//! Client-address publishing on crafted frames (BPF_PROG_TEST_RUN): the ingress node's
//! translation (destination only, and the reply restored when it is routed back), the
//! backend node's learning towards a task and the steering of the task's replies — verdicts,
//! rewritten bytes and checksums.

mod lab;

use std::net::Ipv4Addr;

use lab::{
    BACKENDS, CLIENT, Frame, Lab, NET_ADDR, NODE_IP, TC_ACT_OK, TC_ACT_REDIRECT,
    assert_first_reply, service_in, tcp, udp,
};
use mesh_agent::{dataplane::ReturnTimeouts, lb::PublishMode};
use mesh_common::lb::{
    FLOW_EMBRYO, FLOW_REPLY, FlowKey, IPPROTO_TCP, IPPROTO_UDP, RETURN_FIN_IN, RETURN_FIN_OUT,
    RETURN_LOCAL, Reason, ReturnEntry, mac_for_ip,
};

/// Another node's address on the network: its bridge MAC is where replies go back to.
const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
/// The task's address on the gateway bridge (a UDP server bound to 0.0.0.0 answers from it).
const TASK_GW: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 7);
/// The gateway bridge's MAC (not derived from any address).
const GW_MAC: [u8; 6] = [0x02, 0x99, 0, 0, 0, 1];
const VXLAN_IFINDEX: u32 = 9;
/// The task's host veth in the test runs (the kernel's loopback).
const VETH: u32 = 1;

fn mac(ip: Ipv4Addr) -> [u8; 6] {
    mac_for_ip(ip.octets())
}

fn lab() -> Lab {
    lab_with(&BACKENDS)
}

fn lab_with(backends: &[Ipv4Addr]) -> Lab {
    let mut lab = Lab::new();
    lab.apply(&[service_in("web", PublishMode::Ingress, 8080, 80, backends)]);
    lab.task_port(VETH, VXLAN_IFINDEX);
    lab
}

fn key(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: src.octets(),
        dst: dst.octets(),
        sport,
        dport,
        proto,
        _pad: 0,
        _pad2: 0,
    }
}

fn returns(lab: &mut Lab) -> Vec<(FlowKey, ReturnEntry)> {
    lab.dp.returns_table().unwrap()
}

#[test]
fn a_client_address_flow_translates_only_the_destination_with_valid_checksums() {
    let lab = lab();
    for (p, sport) in [
        (tcp(CLIENT, 40000, NODE_IP, 8080).syn(), 40000),
        (udp(CLIENT, 40001, NODE_IP, 8080).payload(b"client?"), 40001),
    ] {
        let (verdict, out) = lab.run(&p);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let f = Frame::parse(&out);
        assert_eq!(
            (f.src, f.sport),
            (CLIENT, sport),
            "the client's own address"
        );
        assert!(BACKENDS.contains(&f.dst), "to a backend, not {}", f.dst);
        assert_eq!(f.dport, 80);
        assert!(f.ip_checksum_ok() && f.l4_checksum_ok());
    }
    // The reply entry is keyed by backend:target → client:port and restores the published
    // address; it leaves by the interface the client came in on.
    let flows = lab.dp.lb().flows().unwrap();
    let (k, reply) = flows
        .iter()
        .find(|(k, f)| f.flags & FLOW_REPLY != 0 && k.proto == IPPROTO_TCP)
        .expect("a reply entry");
    assert_eq!((k.dst, k.sport, k.dport), (CLIENT.octets(), 80, 40000));
    assert_eq!((reply.nat_src, reply.nat_sport), (NODE_IP.octets(), 8080));
    assert_eq!((reply.nat_dst, reply.nat_dport), (CLIENT.octets(), 40000));
}

#[test]
fn a_reply_routed_back_through_the_ingress_node_leaves_from_the_published_address() {
    let lab = lab();
    let fwd = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).1);

    // As the backend's node sends it: to this node's bridge MAC, from the task's.
    let reply = tcp(fwd.dst, 80, CLIENT, 40000)
        .syn()
        .ack(1)
        .macs(mac(fwd.dst), mac(NET_ADDR));
    assert_first_reply(&lab, lab.run(&reply));

    // The same packet sent straight to its destination's MAC is not routed through us, and
    // its port is outside the SNAT range: no lookup, no change.
    let direct = tcp(fwd.dst, 80, CLIENT, 40000)
        .ack(1)
        .macs(mac(fwd.dst), mac(CLIENT));
    let (verdict, out) = lab.run(&direct);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, direct.bytes());
}

#[test]
fn packets_routed_to_a_task_by_another_node_teach_where_its_replies_go() {
    let mut lab = lab();
    let b = BACKENDS[0];
    let p = tcp(CLIENT, 40000, b, 80)
        .syn()
        .macs(mac(OTHER_NODE), mac(b));
    let (verdict, out) = lab.run_to_task(&p, VETH);
    assert_eq!(verdict, TC_ACT_OK, "learning never changes the verdict");
    assert_eq!(out, p.bytes(), "nor the packet");
    let table = returns(&mut lab);
    assert_eq!(table.len(), 1);
    let (k, e) = table[0];
    assert_eq!(k, key(b, 80, CLIENT, 40000, IPPROTO_TCP));
    assert_eq!(e.node_mac, mac(OTHER_NODE));
    assert_eq!(e.ifindex, VXLAN_IFINDEX);
    assert_eq!(e.task_addr, b.octets());
    assert_eq!(e.flags & RETURN_LOCAL, 0);

    // A FIN from the client is noted.
    lab.run_to_task(
        &tcp(CLIENT, 40000, b, 80)
            .fin()
            .ack(1)
            .macs(mac(OTHER_NODE), mac(b)),
        VETH,
    );
    assert_ne!(returns(&mut lab)[0].1.flags & RETURN_FIN_IN, 0);
}

#[test]
fn packets_from_tasks_and_node_addresses_and_unmeshed_local_clients_teach_nothing() {
    let mut lab = lab();
    let b = BACKENDS[0];
    for p in [
        // From another task: its MAC is its address's.
        tcp(BACKENDS[1], 40000, b, 80)
            .syn()
            .macs(mac(BACKENDS[1]), mac(b)),
        // From a node's own address (health checks, SNAT-mode flows).
        tcp(OTHER_NODE, 2000, b, 80)
            .syn()
            .macs(mac(OTHER_NODE), mac(b)),
        // Routed by this node without a routing-mesh flow: a client reaching the task
        // directly keeps the task's usual path.
        tcp(CLIENT, 40000, b, 80).syn().macs(mac(NET_ADDR), mac(b)),
    ] {
        assert_eq!(lab.run_to_task(&p, VETH).0, TC_ACT_OK);
    }
    assert!(returns(&mut lab).is_empty(), "{:?}", returns(&mut lab));
    // Not a task port the agent set up.
    let p = tcp(CLIENT, 40000, b, 80)
        .syn()
        .macs(mac(OTHER_NODE), mac(b));
    lab.dp.retain_task_veths(&[]).unwrap();
    lab.run_to_task(&p, VETH);
    assert!(returns(&mut lab).is_empty());
}

#[test]
fn a_tasks_reply_goes_back_into_the_overlay_to_the_ingress_nodes_bridge_unchanged() {
    let mut lab = lab();
    let b = BACKENDS[0];
    lab.run_to_task(
        &tcp(CLIENT, 40000, b, 80)
            .syn()
            .macs(mac(OTHER_NODE), mac(b)),
        VETH,
    );
    // The task's routes sent it to the gateway bridge.
    let reply = tcp(b, 80, CLIENT, 40000)
        .syn()
        .ack(1)
        .payload(b"hello")
        .macs([2, 0x42, 1, 1, 1, 1], GW_MAC);
    let (verdict, out) = lab.run_from_task(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = Frame::parse(&out);
    assert_eq!(p.dst_mac(), mac(OTHER_NODE), "to the ingress node's bridge");
    assert_eq!(p.src_mac(), mac(b), "from the task's overlay MAC");
    assert_eq!(out[12..], reply.bytes()[12..], "the IP packet is untouched");
    assert_eq!(lab.reason(Reason::Returned), 1);

    // The task's FIN is noted for the sweep.
    lab.run_from_task(&tcp(b, 80, CLIENT, 40000).fin().ack(1).macs(mac(b), GW_MAC));
    assert_ne!(returns(&mut lab)[0].1.flags & RETURN_FIN_OUT, 0);
}

#[test]
fn a_udp_reply_from_the_gateway_address_gets_the_task_address_back_with_a_valid_checksum() {
    let mut lab = lab();
    let b = BACKENDS[1];
    lab.run_to_task(
        &udp(CLIENT, 40002, b, 53)
            .payload(b"client?")
            .macs(mac(OTHER_NODE), mac(b)),
        VETH,
    );
    let table = returns(&mut lab);
    assert_eq!(
        table[0].0,
        key(Ipv4Addr::UNSPECIFIED, 53, CLIENT, 40002, IPPROTO_UDP),
        "UDP entries are keyed without the task address"
    );
    for reply in [
        udp(TASK_GW, 53, CLIENT, 40002)
            .payload(b"web-2 192.0.2.100:40002")
            .macs(mac(TASK_GW), GW_MAC),
        udp(TASK_GW, 53, CLIENT, 40002)
            .payload(b"no checksum")
            .without_udp_checksum()
            .macs(mac(TASK_GW), GW_MAC),
    ] {
        let (verdict, out) = lab.run_from_task(&reply);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let p = Frame::parse(&out);
        assert_eq!((p.src, p.sport), (b, 53));
        assert_eq!((p.dst, p.dport), (CLIENT, 40002));
        assert!(p.ip_checksum_ok());
        if p.l4_checksum != 0 {
            assert!(p.l4_checksum_ok());
        }
        assert_eq!(p.dst_mac(), mac(OTHER_NODE));
        assert_eq!(p.src_mac(), mac(b));
    }
}

#[test]
fn a_reply_to_a_connection_that_came_in_here_is_translated_and_leaves_by_the_underlay() {
    let mut lab = lab();
    let fwd = Frame::parse(&lab.run_on(&tcp(CLIENT, 40000, NODE_IP, 8080).syn(), 1).1);
    // The bridge delivered it to the task: routed by this node.
    lab.run_to_task(
        &tcp(CLIENT, 40000, fwd.dst, 80)
            .syn()
            .macs(mac(NET_ADDR), mac(fwd.dst)),
        VETH,
    );
    let table = returns(&mut lab);
    assert_eq!(table.len(), 1);
    assert_ne!(table[0].1.flags & RETURN_LOCAL, 0);

    let reply = tcp(fwd.dst, 80, CLIENT, 40000)
        .syn()
        .ack(1)
        .macs(mac(fwd.dst), GW_MAC);
    assert_first_reply(&lab, lab.run_from_task(&reply));
}

#[test]
fn other_traffic_of_a_task_passes_untouched() {
    let lab = lab();
    let b = BACKENDS[0];
    lab.run_to_task(
        &tcp(CLIENT, 40000, b, 80)
            .syn()
            .macs(mac(OTHER_NODE), mac(b)),
        VETH,
    );
    for p in [
        // To another task, straight to its MAC.
        tcp(b, 80, BACKENDS[1], 40000)
            .ack(1)
            .macs(mac(b), mac(BACKENDS[1])),
        // Out of the gateway bridge to a conversation of its own.
        tcp(b, 41000, CLIENT, 443).syn().macs(mac(b), GW_MAC),
        udp(TASK_GW, 41000, CLIENT, 53).macs(mac(TASK_GW), GW_MAC),
    ] {
        let (verdict, out) = lab.run_from_task(&p);
        assert_eq!(verdict, TC_ACT_OK, "{p:?}");
        assert_eq!(out, p.bytes());
    }
    assert_eq!(lab.reason(Reason::Returned), 0);
}

#[test]
fn the_sweep_removes_return_entries_of_finished_and_idle_connections_only() {
    let mut lab = lab();
    let fresh = ReturnEntry {
        last_seen: u64::MAX / 2,
        ..Default::default()
    };
    // Far in the past: CLOCK_MONOTONIC 0.
    let old = ReturnEntry::default();
    let closed = ReturnEntry {
        flags: RETURN_FIN_IN | RETURN_FIN_OUT,
        ..old
    };
    let entries = [
        (key(BACKENDS[0], 80, CLIENT, 1, IPPROTO_TCP), fresh),
        (key(BACKENDS[0], 80, CLIENT, 2, IPPROTO_TCP), closed),
        (key(Ipv4Addr::UNSPECIFIED, 53, CLIENT, 3, IPPROTO_UDP), old),
        (key(BACKENDS[0], 80, CLIENT, 4, IPPROTO_TCP), old),
    ];
    for (k, e) in entries {
        lab.dp.put_return(k, e).unwrap();
    }
    let t = ReturnTimeouts::default();
    // CLOCK_MONOTONIC here is the machine's uptime: entries at 0 are as old as it.
    let uptime = std::time::Duration::from_secs_f64(
        std::fs::read_to_string("/proc/uptime")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap(),
    );
    let removed = lab.dp.sweep_returns(&t).unwrap();
    let left: Vec<u16> = returns(&mut lab).iter().map(|(k, _)| k.dport).collect();
    let mut expected = vec![1];
    if uptime < t.tcp_idle {
        expected.push(4);
    }
    let mut left_sorted = left.clone();
    left_sorted.sort();
    assert_eq!(left_sorted, expected, "removed {removed}");
}

/// The sequence number of every crafted TCP segment (see lab::Packet::bytes).
const SEQ: u32 = 1000;

/// A whole client-address connection from the client's port 40000 through this node, both
/// FINs included, to a `local` task (its replies steered back by its veth's program) or a
/// remote one (its node routes them back here); returns the backend.
fn finished_mesh_connection(lab: &mut Lab, local: bool) -> Ipv4Addr {
    let fwd = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).1);
    let b = fwd.dst;
    let to_task = |lab: &mut Lab, p: lab::Packet| {
        if local {
            lab.run_to_task(&p.macs(mac(NET_ADDR), mac(b)), VETH);
        }
    };
    let from_task = |lab: &mut Lab, p: lab::Packet| {
        if local {
            lab.run_from_task(&p.macs(mac(b), GW_MAC)).0
        } else {
            lab.run(&p.macs(mac(b), mac(NET_ADDR))).0
        }
    };
    to_task(lab, tcp(CLIENT, 40000, b, 80).syn());
    let v = from_task(lab, tcp(b, 80, CLIENT, 40000).syn().ack(SEQ + 1));
    assert_eq!(v, TC_ACT_REDIRECT, "the SYN-ACK is translated");
    lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).ack(SEQ + 1));
    to_task(lab, tcp(CLIENT, 40000, b, 80).ack(SEQ + 1));
    assert_eq!(lab.reason(Reason::Promoted), 1, "established");
    lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).fin().ack(SEQ + 1));
    to_task(lab, tcp(CLIENT, 40000, b, 80).fin().ack(SEQ + 1));
    from_task(lab, tcp(b, 80, CLIENT, 40000).fin().ack(SEQ + 2));
    assert_eq!(lab.dp.lb().flows().unwrap().len(), 2, "not swept yet");
    b
}

#[test]
fn a_direct_connection_to_a_local_task_on_a_finished_flows_5_tuple_is_not_translated() {
    let mut lab = lab_with(&BACKENDS[..1]);
    let b = finished_mesh_connection(&mut lab, true);
    let replied = lab.reason(Reason::Replied);

    // The client dials the task itself from the same port, routed by this node (as the
    // bench's direct path does): no routing-mesh flow, so its replies are not steered, and
    // the finished flow goes so none of its packets relearns it.
    lab.run_to_task(
        &tcp(CLIENT, 40000, b, 80).syn().macs(mac(NET_ADDR), mac(b)),
        VETH,
    );
    assert!(returns(&mut lab).is_empty(), "{:?}", returns(&mut lab));
    assert!(lab.dp.lb().flows().unwrap().is_empty());
    assert_eq!(lab.reason(Reason::Superseded), 1);
    lab.run_to_task(
        &tcp(CLIENT, 40000, b, 80)
            .ack(SEQ + 1)
            .payload(b"GET /")
            .macs(mac(NET_ADDR), mac(b)),
        VETH,
    );
    assert!(returns(&mut lab).is_empty(), "{:?}", returns(&mut lab));
    for p in [
        tcp(b, 80, CLIENT, 40000).syn().ack(SEQ + 1),
        tcp(b, 80, CLIENT, 40000).ack(SEQ + 6).payload(b"web-1"),
    ] {
        let p = p.macs(mac(b), GW_MAC);
        let (v, out) = lab.run_from_task(&p);
        assert_eq!((v, out), (TC_ACT_OK, p.bytes()), "untouched");
    }
    assert_eq!(lab.reason(Reason::Replied), replied);
}

#[test]
fn a_direct_connection_to_a_remote_task_on_a_finished_flows_5_tuple_is_not_translated() {
    let mut lab = lab_with(&BACKENDS[..1]);
    let b = finished_mesh_connection(&mut lab, false);
    let replied = lab.reason(Reason::Replied);

    // The client dialled the task through this node as a router; the task's node routes
    // the SYN-ACK back through here: the finished flow must not restore the published
    // address on a connection the client made to the task.
    let syn_ack = tcp(b, 80, CLIENT, 40000)
        .syn()
        .ack(SEQ + 1)
        .macs(mac(b), mac(NET_ADDR));
    let (v, out) = lab.run(&syn_ack);
    assert_eq!((v, out), (TC_ACT_OK, syn_ack.bytes()));
    assert_eq!(lab.reason(Reason::Superseded), 1);
    assert!(
        lab.dp.lb().flows().unwrap().is_empty(),
        "the finished flow is gone"
    );
    let data = tcp(b, 80, CLIENT, 40000)
        .ack(SEQ + 1)
        .payload(b"web-1")
        .macs(mac(b), mac(NET_ADDR));
    let (v, out) = lab.run(&data);
    assert_eq!((v, out), (TC_ACT_OK, data.bytes()));
    assert_eq!(lab.reason(Reason::Replied), replied);
}

#[test]
fn a_client_reusing_a_finished_flows_port_through_the_mesh_gets_a_new_flow() {
    let mut lab = lab_with(&BACKENDS[..1]);
    let b = finished_mesh_connection(&mut lab, true);

    // Same client port, same (only) backend: the same reply key as the finished flow.
    let (v, out) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn());
    assert_eq!((v, Frame::parse(&out).dst), (TC_ACT_REDIRECT, b));
    let flows = lab.dp.lb().flows().unwrap();
    assert_eq!(flows.len(), 2, "the new flow's entries only: {flows:?}");
    assert!(flows.iter().all(|(_, f)| f.flags & FLOW_EMBRYO != 0));
    lab.run_to_task(
        &tcp(CLIENT, 40000, b, 80).syn().macs(mac(NET_ADDR), mac(b)),
        VETH,
    );
    let table = returns(&mut lab);
    assert_eq!(table.len(), 1);
    assert_ne!(table[0].1.flags & RETURN_LOCAL, 0);
    assert_eq!(
        table[0].1.flags & (RETURN_FIN_IN | RETURN_FIN_OUT),
        0,
        "a new connection's flags start over"
    );
    let (v, out) = lab.run_from_task(
        &tcp(b, 80, CLIENT, 40000)
            .syn()
            .ack(SEQ + 1)
            .macs(mac(b), GW_MAC),
    );
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(
        Frame::parse(&out).src,
        NODE_IP,
        "from the published address"
    );
    lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).ack(SEQ + 1));
    assert_eq!(
        lab.reason(Reason::Promoted),
        2,
        "the new flow is established"
    );
    assert_eq!(lab.reason(Reason::Superseded), 0);
}

#[test]
fn a_connection_the_client_reset_is_finished_for_a_direct_one_on_its_5_tuple() {
    let mut lab = lab_with(&BACKENDS[..1]);
    let fwd = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).1);
    let b = fwd.dst;
    let routed = |p: lab::Packet| p.macs(mac(NET_ADDR), mac(b));
    lab.run_to_task(&routed(tcp(CLIENT, 40000, b, 80).syn()), VETH);
    lab.run_from_task(
        &tcp(b, 80, CLIENT, 40000)
            .syn()
            .ack(SEQ + 1)
            .macs(mac(b), GW_MAC),
    );
    lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).ack(SEQ + 1));
    // The client kills its socket (`ss -K`): a RST, seen on the forward entry only.
    lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).rst().ack(SEQ + 1));
    lab.run_to_task(&routed(tcp(CLIENT, 40000, b, 80).rst().ack(SEQ + 1)), VETH);

    lab.run_to_task(&routed(tcp(CLIENT, 40000, b, 80).syn()), VETH);
    assert!(returns(&mut lab).is_empty(), "{:?}", returns(&mut lab));
    assert!(lab.dp.lb().flows().unwrap().is_empty());
    assert_eq!(lab.reason(Reason::Superseded), 1);
}

#[test]
fn a_connection_the_task_reset_is_finished_for_the_clients_next_one_through_the_mesh() {
    let lab = lab_with(&BACKENDS[..1]);
    let fwd = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).1);
    let b = fwd.dst;
    let from_task = |p: lab::Packet| p.macs(mac(b), GW_MAC);
    lab.run_to_task(
        &tcp(CLIENT, 40000, b, 80).syn().macs(mac(NET_ADDR), mac(b)),
        VETH,
    );
    lab.run_from_task(&from_task(tcp(b, 80, CLIENT, 40000).syn().ack(SEQ + 1)));
    lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).ack(SEQ + 1));
    // The task's socket is killed: a RST, seen on the reply entry only.
    lab.run_from_task(&from_task(tcp(b, 80, CLIENT, 40000).rst().ack(SEQ + 1)));

    // The client's next connection from the same port is a new flow, so the task's SYN-ACK
    // is translated (not taken for a connection the mesh never saw).
    lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn());
    lab.run_to_task(
        &tcp(CLIENT, 40000, b, 80).syn().macs(mac(NET_ADDR), mac(b)),
        VETH,
    );
    let (v, out) = lab.run_from_task(&from_task(tcp(b, 80, CLIENT, 40000).syn().ack(SEQ + 1)));
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(Frame::parse(&out).src, NODE_IP);
    assert_eq!(lab.reason(Reason::Superseded), 0);
    let flows = lab.dp.lb().flows().unwrap();
    assert!(
        flows.iter().all(|(_, f)| f.flags & FLOW_EMBRYO != 0),
        "only the new flow's entries: {flows:?}"
    );
}
