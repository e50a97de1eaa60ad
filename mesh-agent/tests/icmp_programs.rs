//! ICMP errors about routing-mesh flows on crafted frames (BPF_PROG_TEST_RUN): a router's
//! fragmentation-needed about a backend's reply reaches the backend about the packet it
//! sent, and a backend's port-unreachable reaches the client about the packet the client
//! sent — outer and quoted addresses, ports, and all three checksums.

mod lab;

use std::net::Ipv4Addr;

use lab::{
    BACKENDS, CLIENT, Frame, IcmpFrame, IcmpKind, Lab, NET_ADDR, NODE_IP, TC_ACT_OK,
    TC_ACT_REDIRECT, icmp_error, service, service_in, tcp, udp,
};
use mesh_agent::lb::{Protocol, PublishMode};
use mesh_common::lb::{Reason, mac_for_ip};

/// A router between the client and the node, with a smaller MTU towards the client.
const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);

const ICMP_DEST_UNREACH: u8 = 3;
const CODE_FRAG_NEEDED: u8 = 4;
const CODE_PORT_UNREACH: u8 = 3;

fn assert_valid(f: &IcmpFrame) {
    assert!(f.ip_checksum_ok(), "outer IPv4 checksum: {f:?}");
    assert!(f.icmp_checksums_ok(), "ICMP or quoted IPv4 checksum: {f:?}");
}

/// The backend's reply to client:40000 left this node as node:8080 → client:40000, and a
/// router could not forward it at 1280 bytes with DF set: its error, run through the lab.
fn router_frag_needed(lab: &Lab) -> (u32, Vec<u8>) {
    let on_the_wire = tcp(NODE_IP, 8080, CLIENT, 40000).ack(1);
    lab.run_raw(&icmp_error(
        ROUTER,
        NODE_IP,
        IcmpKind::FragmentationNeeded(1280),
        &on_the_wire,
    ))
}

#[test]
fn fragmentation_needed_for_a_snat_flows_reply_reaches_its_backend() {
    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);
    let fwd = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).1);
    assert_eq!(fwd.src, NET_ADDR, "SNAT mode");

    let (verdict, out) = router_frag_needed(&lab);

    assert_eq!(verdict, TC_ACT_REDIRECT);
    let f = IcmpFrame::parse(&out);
    assert_eq!((f.src, f.dst), (NET_ADDR, fwd.dst), "to the backend");
    assert_eq!((f.icmp_type, f.code), (ICMP_DEST_UNREACH, CODE_FRAG_NEEDED));
    assert_eq!(u16::from_be_bytes([f.rest[2], f.rest[3]]), 1280, "the MTU");
    let q = &f.quoted;
    assert_eq!(
        (q.src, q.sport, q.dst, q.dport),
        (fwd.dst, 80, NET_ADDR, fwd.sport),
        "about the reply as the backend sent it"
    );
    assert_valid(&f);
    assert_eq!(lab.reason(Reason::IcmpTranslated), 1);
}

#[test]
fn fragmentation_needed_for_a_client_address_flows_reply_reaches_its_backend() {
    let mut lab = Lab::new();
    lab.apply(&[service_in("web", PublishMode::Ingress, 8080, 80, &BACKENDS)]);
    let fwd = Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).1);
    let (verdict, out) = router_frag_needed(&lab);

    assert_eq!(verdict, TC_ACT_REDIRECT);
    let f = IcmpFrame::parse(&out);
    assert_eq!(f.dst, fwd.dst, "to the backend");
    let q = &f.quoted;
    assert_eq!(
        (q.src, q.sport, q.dst, q.dport),
        (fwd.dst, 80, CLIENT, 40000),
        "the backend answered the client's own address"
    );
    assert_valid(&f);
}

#[test]
fn a_backends_port_unreachable_reaches_the_client_about_its_own_datagram() {
    let mut lab = Lab::new();
    let mut s = service("dns", 5353, 53, &BACKENDS);
    s.ports[0].proto = Protocol::Udp;
    lab.apply(&[s]);
    let fwd = Frame::parse(&lab.run(&udp(CLIENT, 40001, NODE_IP, 5353).payload(b"q?")).1);
    // The backend has nothing on 53 and says so to the address the datagram came from.
    let delivered = udp(NET_ADDR, fwd.sport, fwd.dst, 53).payload(b"q?");
    let frame = icmp_error(fwd.dst, NET_ADDR, IcmpKind::PortUnreachable, &delivered);
    let (verdict, out) = lab.run_raw(&frame);

    assert_eq!(verdict, TC_ACT_REDIRECT);
    let f = IcmpFrame::parse(&out);
    assert_eq!(
        (f.src, f.dst),
        (NODE_IP, CLIENT),
        "from the published address"
    );
    assert_eq!(
        (f.icmp_type, f.code),
        (ICMP_DEST_UNREACH, CODE_PORT_UNREACH)
    );
    let q = &f.quoted;
    assert_eq!(
        (q.src, q.sport, q.dst, q.dport),
        (CLIENT, 40001, NODE_IP, 5353),
        "about the datagram the client sent"
    );
    assert_valid(&f);
}

#[test]
fn icmp_errors_about_other_traffic_pass_untouched() {
    let mut lab = Lab::new();
    lab.apply(&[service("web", 8080, 80, &BACKENDS)]);
    lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn());
    for frame in [
        // The node's own connection (no flow: another client port).
        icmp_error(
            ROUTER,
            NODE_IP,
            IcmpKind::FragmentationNeeded(1280),
            &tcp(NODE_IP, 22, CLIENT, 40002).ack(1),
        ),
        // Not an error: a ping of the published address.
        {
            let mut out = Vec::new();
            etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
                .ipv4(CLIENT.octets(), NODE_IP.octets(), 64)
                .icmpv4_echo_request(7, 1)
                .write(&mut out, b"ping")
                .unwrap();
            out
        },
    ] {
        let (verdict, out) = lab.run_raw(&frame);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, frame);
    }
    assert_eq!(lab.reason(Reason::IcmpTranslated), 0);
}

/// A client-address UDP service whose task (a backend) has its host veth set up here.
fn client_address_udp_lab() -> Lab {
    let mut lab = Lab::new();
    let mut s = service_in("dns", PublishMode::Ingress, 5353, 53, &BACKENDS[..1]);
    s.ports[0].proto = Protocol::Udp;
    lab.apply(&[s]);
    lab.task_port(VETH, VXLAN_IFINDEX);
    lab
}

const VXLAN_IFINDEX: u32 = 9;
const VETH: u32 = 1;
/// Another node's address on the network.
const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
const GW_MAC: [u8; 6] = [0x02, 0x99, 0, 0, 0, 1];

#[test]
fn a_tasks_port_unreachable_about_a_connection_from_another_node_goes_back_to_that_node() {
    let lab = client_address_udp_lab();
    let b = BACKENDS[0];
    let mac = |ip: Ipv4Addr| mac_for_ip(ip.octets());
    let delivered = udp(CLIENT, 40002, b, 53).payload(b"q?");
    lab.run_to_task(&delivered.clone().macs(mac(OTHER_NODE), mac(b)), VETH);

    // The task serves nothing on 53 any more; its error is addressed to the client.
    let mut frame = icmp_error(b, CLIENT, IcmpKind::PortUnreachable, &delivered);
    frame[..12].copy_from_slice(&[GW_MAC, mac(b)].concat());
    let (verdict, out) = lab.run_from_task_raw(&frame);

    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out[..6], mac(OTHER_NODE), "to the ingress node's bridge");
    assert_eq!(out[6..12], mac(b));
    assert_eq!(out[12..], frame[12..], "translated there, not here");
}

#[test]
fn a_tasks_port_unreachable_about_a_connection_through_this_node_reaches_the_client() {
    let lab = client_address_udp_lab();
    let fwd = Frame::parse(&lab.run(&udp(CLIENT, 40001, NODE_IP, 5353).payload(b"q?")).1);
    let b = fwd.dst;
    let mac = |ip: Ipv4Addr| mac_for_ip(ip.octets());
    let delivered = udp(CLIENT, 40001, b, 53).payload(b"q?");
    lab.run_to_task(&delivered.clone().macs(mac(NET_ADDR), mac(b)), VETH);

    let mut frame = icmp_error(b, CLIENT, IcmpKind::PortUnreachable, &delivered);
    frame[..12].copy_from_slice(&[GW_MAC, mac(b)].concat());
    let (verdict, out) = lab.run_from_task_raw(&frame);

    assert_eq!(verdict, TC_ACT_REDIRECT);
    let f = IcmpFrame::parse(&out);
    assert_eq!((f.src, f.dst), (NODE_IP, CLIENT));
    let q = &f.quoted;
    assert_eq!(
        (q.src, q.sport, q.dst, q.dport),
        (CLIENT, 40001, NODE_IP, 5353)
    );
    assert_valid(&f);
    assert_eq!(lab.reason(Reason::IcmpTranslated), 1);
}
