//! The way a translated packet leaves the node (BPF_PROG_TEST_RUN): straight into a local
//! task's namespace, straight into the network's VXLAN device for another node's task, or
//! through the bridge — the frame each gets, the return learned on the way, and the task's
//! reply that depends on it; and the way back: replies caught before the bridge, on the
//! VXLAN device (from other nodes) and on the task's veth (SNAT replies of local tasks).
//!
//! A test run does not perform the redirect, so the verdict cannot tell the paths apart;
//! the Ethernet header can: the bridge path leaves it to the neighbour lookup, the shorter
//! ones write the task's MAC and the node's bridge MAC themselves.

mod lab;

use std::net::Ipv4Addr;

use lab::{
    BACKENDS, CLIENT, Frame, Lab, NET_ADDR, NODE_IP, TC_ACT_REDIRECT, assert_first_reply,
    service_in, tcp, udp,
};
use mesh_agent::lb::PublishMode;
use mesh_common::lb::{FLOW_REMOTE, FLOW_REPLY, LocalTaskKey, RETURN_LOCAL, mac_for_ip};

/// The task's host veth in the test runs (the kernel's loopback).
const VETH: u32 = 1;
const VXLAN_IFINDEX: u32 = 1;
const NETWORK: u32 = 4096;
/// What the frames carry when the program leaves the Ethernet header alone.
const CLIENT_MACS: ([u8; 6], [u8; 6]) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
/// The gateway bridge's MAC, where a task's reply to an outside client is addressed.
const GW_MAC: [u8; 6] = [0x02, 0x99, 0, 0, 0, 1];

fn mac(ip: Ipv4Addr) -> [u8; 6] {
    mac_for_ip(ip.octets())
}

/// A lab with `web` published in `mode`; `vxlan` sets the network's VXLAN device and
/// `local` are this node's tasks.
fn lab(mode: PublishMode, vxlan: bool, local: &[Ipv4Addr]) -> Lab {
    let mut lab = Lab::new();
    let mut s = service_in("web", mode, 8080, 80, &BACKENDS[..1]);
    if vxlan {
        s.network.vxlan_ifindex = VXLAN_IFINDEX;
    }
    lab.apply(&[s]);
    for t in local {
        let task = LocalTaskKey {
            network: NETWORK,
            addr: t.octets(),
        };
        lab.dp.put_local_task(task, VETH).unwrap();
    }
    lab
}

fn assert_to_task(out: &[u8], task: Ipv4Addr) -> Frame {
    let f = Frame::parse(out);
    assert_eq!(f.dst, task);
    assert_eq!(f.dst_mac(), mac(task), "addressed to the task's MAC");
    assert_eq!(
        f.src_mac(),
        mac(NET_ADDR),
        "from the node's bridge MAC on the network, as if the bridge had routed it"
    );
    assert!(f.ip_checksum_ok() && f.l4_checksum_ok());
    f
}

/// The flags of the lab's one forward entry.
fn forward_flags(lab: &Lab) -> u32 {
    let flows = lab.dp.lb().flows().unwrap();
    let forward: Vec<u32> = flows
        .iter()
        .filter(|(_, f)| f.flags & FLOW_REPLY == 0)
        .map(|(_, f)| f.flags)
        .collect();
    assert_eq!(forward.len(), 1, "{flows:?}");
    forward[0]
}

/// Opens the SNAT flow of CLIENT:40000 through the published port: the frame sent on.
fn open_snat_flow(lab: &Lab) -> Frame {
    Frame::parse(&lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn()).1)
}

/// The SYN-ACK of backend `b` to this node's address on SNAT port `sport`, as a task sends
/// it (from its MAC, to the node's bridge MAC).
fn snat_syn_ack(b: Ipv4Addr, sport: u16) -> lab::Packet {
    tcp(b, 80, NET_ADDR, sport)
        .syn()
        .ack(1)
        .macs(mac(b), mac(NET_ADDR))
}

#[test]
fn a_client_address_flow_to_a_local_task_enters_it_directly_and_its_reply_finds_the_way_back() {
    let mut lab = lab(PublishMode::Ingress, true, &BACKENDS[..1]);
    let b = BACKENDS[0];
    let (verdict, out) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn());
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let f = assert_to_task(&out, b);
    assert_eq!((f.src, f.sport, f.dport), (CLIENT, 40000, 80));
    assert_eq!(f.ttl, 63);
    assert_eq!(
        forward_flags(&lab) & FLOW_REMOTE,
        0,
        "settled when the flow began"
    );

    // The learning program on the veth never sees this packet: the return was learned here.
    let returns = lab.dp.returns_table().unwrap();
    assert_eq!(returns.len(), 1, "{returns:?}");
    let (k, e) = returns[0];
    assert_eq!((k.src, k.sport), (b.octets(), 80));
    assert_eq!((k.dst, k.dport), (CLIENT.octets(), 40000));
    assert_ne!(e.flags & RETURN_LOCAL, 0);
    assert_eq!(e.task_addr, b.octets());

    // So the task's reply, sent to its gateway, leaves from the published address.
    let reply = tcp(b, 80, CLIENT, 40000).syn().ack(1).macs(mac(b), GW_MAC);
    assert_first_reply(&lab, lab.run_from_task(&reply));

    // The client's next packets take the same way and refresh the same entry.
    let (verdict, out) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).ack(1));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_to_task(&out, b);
    assert_eq!(lab.dp.returns_table().unwrap().len(), 1);
}

#[test]
fn udp_to_a_local_task_enters_it_directly_and_learns_its_return() {
    let mut lab = lab(PublishMode::Ingress, true, &BACKENDS[..1]);
    let (verdict, out) = lab.run(&udp(CLIENT, 40001, NODE_IP, 8080).payload(b"hello"));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_to_task(&out, BACKENDS[0]);
    let returns = lab.dp.returns_table().unwrap();
    assert_eq!(returns.len(), 1);
    // UDP returns are keyed without their source (see mesh_common::lb::ReturnEntry).
    assert_eq!(returns[0].0.src, [0; 4]);
    assert_eq!(returns[0].1.task_addr, BACKENDS[0].octets());
}

#[test]
fn a_snat_flow_to_a_local_task_enters_it_directly_and_needs_no_return() {
    let mut lab = lab(PublishMode::Snat, true, &BACKENDS[..1]);
    let (verdict, out) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn());
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let f = assert_to_task(&out, BACKENDS[0]);
    assert_eq!(f.src, NET_ADDR, "the node's address on the network");
    assert!(
        lab.dp.returns_table().unwrap().is_empty(),
        "replies to the node's own address find their way without one"
    );
}

#[test]
fn a_flow_to_another_nodes_task_goes_into_the_vxlan_device_with_the_tasks_mac() {
    for mode in [PublishMode::Ingress, PublishMode::Snat] {
        let mut lab = lab(mode, true, &[]);
        let (verdict, out) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_to_task(&out, BACKENDS[0]);
        assert!(
            lab.dp.returns_table().unwrap().is_empty(),
            "the task's own node learns the return"
        );
        assert_eq!(forward_flags(&lab) & FLOW_REMOTE, FLOW_REMOTE);
    }
}

#[test]
fn without_a_vxlan_device_or_a_local_task_the_flow_takes_the_bridge() {
    let lab = lab(PublishMode::Ingress, false, &[]);
    let (verdict, out) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn());
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let f = Frame::parse(&out);
    assert_eq!(f.dst, BACKENDS[0]);
    assert_eq!(
        (f.src_mac(), f.dst_mac()),
        CLIENT_MACS,
        "the neighbour lookup of redirect_neigh writes the frame"
    );
}

#[test]
fn a_task_that_is_gone_from_this_node_no_longer_gets_flows_directly() {
    let mut lab = lab(PublishMode::Ingress, false, &BACKENDS[..1]);
    let (_, out) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn());
    assert_to_task(&out, BACKENDS[0]);
    assert_eq!(lab.dp.local_tasks_table().unwrap().len(), 1);

    // The agent forgets the task's veth (the task stopped, or moved to another node).
    lab.dp.retain_task_veths(&[]).unwrap();
    assert!(lab.dp.local_tasks_table().unwrap().is_empty());
    let (verdict, out) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).ack(1));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let f = Frame::parse(&out);
    assert_eq!(f.dst, BACKENDS[0], "the flow stays on its backend");
    assert_eq!((f.src_mac(), f.dst_mac()), CLIENT_MACS, "by the bridge");
}

#[test]
fn reply_entries_leave_the_frame_to_the_neighbour_lookup() {
    // A client-address reply routed back through this node from the task's node: it goes
    // to the client by the way it came in, whatever the forward path was.
    let lab = lab(PublishMode::Ingress, true, &[]);
    let (_, out) = lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn());
    let fwd = Frame::parse(&out);
    let flows = lab.dp.lb().flows().unwrap();
    assert!(flows.iter().any(|(_, f)| f.flags & FLOW_REPLY != 0));
    let reply = tcp(fwd.dst, 80, CLIENT, 40000)
        .syn()
        .ack(1)
        .macs(mac(fwd.dst), mac(NET_ADDR));
    let (verdict, out) = lab.run(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = Frame::parse(&out);
    assert_eq!((p.src, p.sport), (NODE_IP, 8080));
    assert_eq!((p.src_mac(), p.dst_mac()), (mac(fwd.dst), mac(NET_ADDR)));
}

#[test]
fn a_reply_from_another_node_is_translated_on_the_vxlan_device() {
    let lab = lab(PublishMode::Ingress, true, &[]);
    let b = BACKENDS[0];
    lab.run(&tcp(CLIENT, 40000, NODE_IP, 8080).syn());
    // As the task's node sends it back: to this node's bridge MAC, from the task's.
    let reply = tcp(b, 80, CLIENT, 40000)
        .syn()
        .ack(1)
        .macs(mac(b), mac(NET_ADDR));
    assert_first_reply(&lab, lab.run_from_overlay(&reply));
}

#[test]
fn the_tasks_own_overlay_traffic_passes_the_vxlan_device_untouched_and_uncounted() {
    let lab = lab(PublishMode::Snat, true, &[]);
    let b = BACKENDS[0];
    let snat = open_snat_flow(&lab);
    let before = lab.dp.lb().reasons().unwrap();
    for p in [
        // A task on another node talking to a task here, straight to its MAC.
        tcp(b, 41000, BACKENDS[1], 8080)
            .syn()
            .macs(mac(b), mac(BACKENDS[1])),
        udp(b, 41000, BACKENDS[1], 53).macs(mac(b), mac(BACKENDS[1])),
        // To this node's address on a SNAT port that no flow holds (an unknown connection
        // from a task, or a backend's reply to a flow long gone).
        snat_syn_ack(b, snat.sport + 1),
        // A task's own traffic to this node's address outside the SNAT range.
        tcp(b, 41000, NET_ADDR, 22)
            .syn()
            .macs(mac(b), mac(NET_ADDR)),
        // Malformed: a header length below 20.
        tcp(b, 41000, BACKENDS[1], 8080)
            .macs(mac(b), mac(BACKENDS[1]))
            .patch(14, 0x44),
    ] {
        let frame = p.bytes();
        let r = lab
            .dp
            .test_run_from_overlay(&frame, Default::default())
            .unwrap();
        assert_eq!(r.retval, lab::TC_ACT_OK, "{p:?}");
        assert_eq!(r.data, frame, "untouched: {p:?}");
    }
    assert_eq!(lab.dp.lb().reasons().unwrap(), before, "nothing counted");
}

/// A SNAT flow to another node's task: the task's reply comes back over the overlay to this
/// node's address on the network; it is translated on the VXLAN device and leaves for the
/// client without being bridged up to the node.
#[test]
fn a_snat_reply_from_another_node_is_translated_on_the_vxlan_device() {
    let lab = lab(PublishMode::Snat, true, &[]);
    let b = BACKENDS[0];
    let snat = open_snat_flow(&lab);
    assert_eq!(snat.src, NET_ADDR);
    let p = assert_first_reply(&lab, lab.run_from_overlay(&snat_syn_ack(b, snat.sport)));
    assert_eq!(
        (p.src_mac(), p.dst_mac()),
        (mac(b), mac(NET_ADDR)),
        "the Ethernet header is left for the neighbour lookup towards the client"
    );
}

/// The same for a SNAT flow to a task on this node: its reply is translated on the task's
/// veth, before the bridge.
#[test]
fn a_local_tasks_snat_reply_is_translated_on_its_veth() {
    let mut lab = lab(PublishMode::Snat, true, &BACKENDS[..1]);
    lab.task_port(VETH, VXLAN_IFINDEX);
    let b = BACKENDS[0];
    let snat = open_snat_flow(&lab);
    assert_first_reply(&lab, lab.run_from_task(&snat_syn_ack(b, snat.sport)));

    // What is not a SNAT reply passes untouched and uncounted: another port of this node,
    // a SNAT port without a flow, a task on the network.
    let before = lab.dp.lb().reasons().unwrap();
    for p in [
        tcp(b, 41000, NET_ADDR, 22)
            .syn()
            .macs(mac(b), mac(NET_ADDR)),
        tcp(b, 80, NET_ADDR, snat.sport + 1)
            .ack(1)
            .macs(mac(b), mac(NET_ADDR)),
        tcp(b, 41000, BACKENDS[1], snat.sport)
            .syn()
            .macs(mac(b), mac(BACKENDS[1])),
    ] {
        let frame = p.bytes();
        assert_eq!(
            lab.run_from_task_raw(&frame),
            (lab::TC_ACT_OK, frame.clone()),
            "{p:?}"
        );
    }
    assert_eq!(lab.dp.lb().reasons().unwrap(), before, "nothing counted");
}

/// Another node's bridge, which routed a client-address flow's packet onto the network.
const OTHER_NODE_MAC: [u8; 6] = [0x02, 0x42, 10, 0, 0, 2];

/// The receiving side of the remote path: a packet another node's routing mesh sent to a
/// task here enters the task from the VXLAN device (no bridge), and the return the task's
/// veth would have learned is learned there, so the task's reply goes back to that node.
#[test]
fn a_packet_another_node_routed_to_a_task_here_enters_it_from_the_vxlan_device() {
    let mut lab = lab(PublishMode::Ingress, true, &BACKENDS[..1]);
    lab.task_port(VETH, VXLAN_IFINDEX);
    let b = BACKENDS[0];
    let before = lab.dp.lb().reasons().unwrap();
    let routed = tcp(CLIENT, 40000, b, 80).syn().macs(OTHER_NODE_MAC, mac(b));
    let frame = routed.bytes();
    let r = lab
        .dp
        .test_run_from_overlay(&frame, Default::default())
        .unwrap();
    assert_eq!(r.retval, TC_ACT_REDIRECT, "straight into the task");
    assert_eq!(
        r.data, frame,
        "delivered as it came: the other node translated it"
    );
    assert_eq!(
        lab.dp.lb().reasons().unwrap(),
        before,
        "counted by the node that routed it"
    );

    let returns = lab.dp.returns_table().unwrap();
    assert_eq!(returns.len(), 1, "{returns:?}");
    let (k, e) = returns[0];
    assert_eq!(
        (k.src, k.sport, k.dst, k.dport),
        (b.octets(), 80, CLIENT.octets(), 40000)
    );
    assert_eq!(e.flags & RETURN_LOCAL, 0, "came in through another node");
    assert_eq!((e.node_mac, e.ifindex), (OTHER_NODE_MAC, VXLAN_IFINDEX));

    // The task's reply, sent to its gateway, goes back into the overlay to that node.
    let reply = tcp(b, 80, CLIENT, 40000).syn().ack(1).macs(mac(b), GW_MAC);
    let (verdict, out) = lab.run_from_task(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let f = Frame::parse(&out);
    assert_eq!((f.src, f.dst), (b, CLIENT), "addresses untouched");
    assert_eq!((f.src_mac(), f.dst_mac()), (mac(b), OTHER_NODE_MAC));
}

#[test]
fn routed_packets_for_tasks_this_node_does_not_know_take_the_bridge() {
    // No local task: the address is another node's, or a task this node lost.
    let mut lab_no_task = lab(PublishMode::Ingress, true, &[]);
    // A local task, but the network has no VXLAN device in the table.
    let mut lab_no_overlay = lab(PublishMode::Ingress, false, &BACKENDS[..1]);
    for lab in [&mut lab_no_task, &mut lab_no_overlay] {
        let b = BACKENDS[0];
        let frame = tcp(CLIENT, 40000, b, 80)
            .syn()
            .macs(OTHER_NODE_MAC, mac(b))
            .bytes();
        let r = lab
            .dp
            .test_run_from_overlay(&frame, Default::default())
            .unwrap();
        assert_eq!(r.retval, lab::TC_ACT_OK);
        assert_eq!(r.data, frame);
        assert!(lab.dp.returns_table().unwrap().is_empty());
    }
}

/// LB_OVERLAYS follows the networks' VXLAN devices, whatever order they change in: two
/// networks trading ifindexes (a device re-created and its old number reused) each end up
/// with their own device, and a removed network's device is forgotten.
#[test]
fn each_networks_vxlan_device_names_its_network_as_devices_change() {
    let mut lab = Lab::new();
    let net = |name: &str, id: u32, vxlan: u32, port: u16, task: Ipv4Addr| {
        let mut s = service_in(name, PublishMode::Ingress, port, 80, &[task]);
        s.network.id = id;
        s.network.vxlan_ifindex = vxlan;
        s.network.node_addr = Ipv4Addr::new(10, (id - 4096) as u8, 0, 1);
        s.vip = Some(Ipv4Addr::new(10, (id - 4096) as u8, 0, 2));
        s
    };
    let overlays = |lab: &Lab| lab.dp.lb().overlays().unwrap();
    lab.apply(&[
        net("web", 4096, 7, 8080, BACKENDS[0]),
        net("api", 4097, 8, 9090, BACKENDS[1]),
    ]);
    assert_eq!(overlays(&lab), [(7, 4096), (8, 4097)].into());
    lab.apply(&[
        net("web", 4096, 8, 8080, BACKENDS[0]),
        net("api", 4097, 7, 9090, BACKENDS[1]),
    ]);
    assert_eq!(overlays(&lab), [(7, 4097), (8, 4096)].into());
    lab.apply(&[net("web", 4096, 8, 8080, BACKENDS[0])]);
    assert_eq!(overlays(&lab), [(8, 4096)].into());
    // A restarted agent adopts the map as it is.
    lab.restart();
    assert_eq!(overlays(&lab), [(8, 4096)].into());
}
