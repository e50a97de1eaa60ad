//! The load balancer on real namespaces: one node with the routing mesh and socket load
//! balancing loaded, tasks answering their name on its network, and clients outside.
//!
//! ```text
//!  [client 192.0.2.100] ── underlay ── eth0 192.0.2.1 [node]  mbr4096 10.77.0.1
//!                                                       ├─ t1 10.77.0.11
//!                                                       ├─ t2 10.77.0.12
//!                                                       └─ vx4096 ══ [remote] mbr4096 ─ t3 10.77.0.13
//! ```
//! The veth between the two bridges stands in for the VXLAN overlay: the remote task is on
//! the same network but behind another node's bridge, as it is in a cluster.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::programs::{SchedClassifier, TcAttachType};
use etherparse::PacketBuilder;
use mesh_agent::{
    dataplane::Dataplane,
    lb::{
        BackendLb, FlowTimeouts, NetworkLb, NodeLb, Protocol, PublishMode, PublishedPort, ServiceLb,
    },
};
use mesh_common::lb::Reason;
use mesh_tests::{
    Cluster, Netns,
    workload::{NameServer, Session, http_get, tally, udp_ask_each},
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const NET_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const BRIDGE: &str = "mbr4096";

fn task_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 10 + n)
}

fn published(port: u16) -> SocketAddr {
    SocketAddr::from((NODE_IP, port))
}

struct Task {
    _server: NameServer,
    ns: Netns,
    ip: Ipv4Addr,
}

/// The node, its tasks and the service `web` (8080→80/tcp, 5353→53/udp, VIP 10.77.0.2).
struct Node {
    // Dropped in this order: servers, dataplane handles, then every namespace.
    tasks: BTreeMap<String, Task>,
    dp: Option<Dataplane>,
    remote: Netns,
    cluster: Cluster,
    bridge_ifindex: u32,
}

impl Node {
    /// A node with tasks `local` on its bridge and `remote` behind the other bridge.
    fn new(local: &[u8], remote: &[u8]) -> Result<Self> {
        let mut cluster = Cluster::new(1)?;
        cluster.external("client", 100)?;
        let host = cluster.host(1);
        // The bridge's MAC is set explicitly: a bridge otherwise takes its lowest port MAC,
        // which changes when a task's veth leaves, and tasks keep sending replies for the
        // SNAT address to the old MAC until their neighbour entries expire.
        host.ns.sh(&format!(
            "ip link add {BRIDGE} address 02:4d:00:00:10:00 type bridge && \
             ip link set {BRIDGE} up && ip addr add {NET_ADDR}/24 dev {BRIDGE}"
        ))?;
        let remote_ns = Netns::create(&format!("{}-r", cluster.name()))?;
        remote_ns.sh(&format!(
            "ip link add {BRIDGE} type bridge && ip link set {BRIDGE} up"
        ))?;
        host.ns.sh(&format!(
            "ip link add vx4096 type veth peer name vx4096 netns {r} && \
             ip link set vx4096 master {BRIDGE} up",
            r = remote_ns.name()
        ))?;
        remote_ns.sh(&format!("ip link set vx4096 master {BRIDGE} up"))?;
        // A bridge that validates IPv4 (br_netfilter) would drop the malformed frames the
        // garbage scenario sends before they reach the node: real switches do not.
        for ns in [cluster.underlay(), &host.ns, &remote_ns] {
            ns.sh(
                "[ ! -e /proc/sys/net/bridge ] || sysctl -qw net.bridge.bridge-nf-call-iptables=0",
            )?;
        }

        let pin = host.bpffs();
        // Loaded from a thread inside the node's namespace: attaching resolves interface
        // names there and the host netns cookie is that namespace's.
        let (dp, bridge_ifindex) = host.ns.run(move || -> Result<(Dataplane, u32)> {
            let mut dp = Dataplane::start(&pin, "eth0")?;
            dp.lb_mut().set_node(&NodeLb::new(NODE_IP)?)?;
            let bridge = nix::net::if_::if_nametoindex(BRIDGE)?;
            dp.attach_network(bridge)?;
            dp.attach_sockets()?;
            Ok((dp, bridge))
        })??;

        let mut node = Self {
            tasks: BTreeMap::new(),
            dp: Some(dp),
            remote: remote_ns,
            cluster,
            bridge_ifindex,
        };
        for n in local {
            node.add_task(*n, false)?;
        }
        for n in remote {
            node.add_task(*n, true)?;
        }
        node.apply()?;
        Ok(node)
    }

    /// Starts task `t<n>` on the node's bridge or behind the remote one.
    fn add_task(&mut self, n: u8, remote: bool) -> Result<()> {
        let name = format!("t{n}");
        let ns = Netns::create(&format!("{}-{name}", self.cluster.name()))?;
        let host = if remote {
            &self.remote
        } else {
            &self.cluster.host(1).ns
        };
        let ip = task_ip(n);
        host.sh(&format!(
            "ip link add v{name} type veth peer name eth0 netns {ns} && \
             ip link set v{name} master {BRIDGE} up",
            ns = ns.name()
        ))?;
        ns.sh(&format!(
            "ip addr add {ip}/24 dev eth0 && ip link set eth0 up && \
             ip route add default via {NET_ADDR}"
        ))?;
        let server = NameServer::start(&ns, &name, 80, 53)?;
        self.tasks.insert(
            name,
            Task {
                _server: server,
                ns,
                ip,
            },
        );
        Ok(())
    }

    fn service(&self, draining: &[&str]) -> ServiceLb {
        ServiceLb {
            id: "web-id".into(),
            name: "web".into(),
            network: NetworkLb {
                id: 4096,
                node_addr: NET_ADDR,
                bridge_ifindex: self.bridge_ifindex,
                // The backends are plain namespaces on the bridge, not tasks of an agent.
                vxlan_ifindex: 0,
            },
            vip: Some(VIP),
            ports: vec![
                PublishedPort {
                    proto: Protocol::Tcp,
                    published: 8080,
                    target: 80,
                    mode: PublishMode::Snat,
                },
                PublishedPort {
                    proto: Protocol::Udp,
                    published: 5353,
                    target: 53,
                    mode: PublishMode::Snat,
                },
            ],
            backends: self
                .tasks
                .iter()
                .map(|(name, t)| BackendLb {
                    ip: t.ip,
                    draining: draining.contains(&name.as_str()),
                })
                .collect(),
        }
    }

    fn apply(&mut self) -> Result<usize> {
        self.apply_draining(&[])
    }

    fn apply_draining(&mut self, draining: &[&str]) -> Result<usize> {
        let table = [self.service(draining)];
        Ok(self.dp_mut().lb_mut().apply(&table)?.total())
    }

    fn dp_mut(&mut self) -> &mut Dataplane {
        self.dp.as_mut().expect("dataplane loaded")
    }

    fn dp(&self) -> &Dataplane {
        self.dp.as_ref().expect("dataplane loaded")
    }

    fn client(&self) -> &Netns {
        self.cluster
            .external_ns("client")
            .expect("client namespace")
    }

    fn node_ns(&self) -> &Netns {
        &self.cluster.host(1).ns
    }

    /// `count` requests from the client to a published port, each on a new connection or
    /// socket; the names that answered.
    fn client_requests(&self, proto: Protocol, count: usize) -> Result<Vec<String>> {
        self.client().run(move || match proto {
            Protocol::Tcp => (0..count)
                .map(|i| {
                    http_get(published(8080))
                        .with_context(|| format!("request {} of {count}", i + 1))
                })
                .collect::<Result<Vec<_>>>(),
            // Each its own flow, as the counters are checked against.
            Protocol::Udp => udp_ask_each(published(5353), count),
        })?
    }

    /// Lets the socket hooks act in task `t<n>`'s namespace, as the agent does for its tasks.
    fn steer(&mut self, task: &str) -> Result<()> {
        let cookie = self.tasks[task]
            .ns
            .run(mesh_agent::lb::current_netns_cookie)??;
        self.dp_mut()
            .steer_netns(cookie, mesh_common::lb::NETNS_TASK)
    }

    /// Runs mesh-probe inside `ns`; (peer, answer) per request. Its cgroup is the test's:
    /// the socket hooks select by namespace, not by cgroup.
    fn probe(
        &self,
        ns: &Netns,
        mode: &str,
        addr: &str,
        count: usize,
    ) -> Result<Vec<(String, String)>> {
        let mut cmd = ns.command(env!("CARGO_BIN_EXE_mesh-probe"));
        let out = cmd
            .args([mode, addr, &count.to_string()])
            .output()
            .context("running mesh-probe")?;
        if !out.status.success() {
            bail!(
                "mesh-probe failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let (a, b) = l.split_once(' ').unwrap_or((l, ""));
                (a.to_owned(), b.to_owned())
            })
            .collect())
    }

    fn reason(&self, r: Reason) -> u64 {
        self.dp()
            .lb()
            .reasons()
            .unwrap()
            .into_iter()
            .find(|(x, _)| *x == r)
            .map_or(0, |(_, n)| n)
    }
}

/// Every task answered `per_task`±1 times.
fn assert_even(answers: &BTreeMap<String, usize>, tasks: &[&str], per_task: usize) {
    let names: Vec<&str> = answers.keys().map(String::as_str).collect();
    assert_eq!(names, tasks, "who answered: {answers:?}");
    for (task, n) in answers {
        assert!(
            n.abs_diff(per_task) <= 1,
            "{task} answered {n} times, expected {per_task}±1: {answers:?}"
        );
    }
}

#[test]
fn thirty_requests_to_a_published_port_reach_every_task_evenly_over_tcp_and_udp() {
    let node = Node::new(&[1, 2], &[3]).unwrap();

    let tcp = tally(node.client_requests(Protocol::Tcp, 30).unwrap());
    assert_even(&tcp, &["t1", "t2", "t3"], 10);

    let udp = tally(node.client_requests(Protocol::Udp, 30).unwrap());
    assert_even(&udp, &["t1", "t2", "t3"], 10);

    let stats = node.dp().lb().service_stats("web-id").unwrap().unwrap();
    assert_eq!(stats.counters.flows, 60);
    for b in &stats.backends {
        assert_eq!(b.counters.flows, 20, "{b:?}");
        assert!(b.counters.packets >= 40, "{b:?}");
    }
}

#[test]
fn a_long_lived_connection_survives_task_changes_and_removed_tasks_get_no_new_connections() {
    let mut node = Node::new(&[1, 2], &[3]).unwrap();
    let mut session = node
        .client()
        .run(|| Session::open(published(8080)))
        .unwrap()
        .unwrap();
    let pinned = session.ask().unwrap();
    let other = ["t1", "t2", "t3"]
        .into_iter()
        .find(|t| *t != pinned)
        .unwrap()
        .to_owned();

    // A task is added.
    node.add_task(4, false).unwrap();
    node.apply().unwrap();
    assert_eq!(session.ask().unwrap(), pinned);

    // Another task is removed for good; the sweep purges its flows, not ours.
    node.tasks.remove(&other);
    node.apply().unwrap();
    node.dp_mut()
        .lb_mut()
        .sweep(&FlowTimeouts::default())
        .unwrap();
    assert_eq!(session.ask().unwrap(), pinned);
    let after = tally(node.client_requests(Protocol::Tcp, 30).unwrap());
    assert!(
        !after.contains_key(&other),
        "removed {other} still answered: {after:?}"
    );
    assert!(
        after.contains_key("t4"),
        "the new task gets traffic: {after:?}"
    );
    assert_eq!(after.values().sum::<usize>(), 30);

    // Our own task drains: the connection lives on, new ones go elsewhere.
    node.apply_draining(&[pinned.as_str()]).unwrap();
    assert_eq!(session.ask().unwrap(), pinned);
    let drained = tally(node.client_requests(Protocol::Tcp, 30).unwrap());
    assert!(
        !drained.contains_key(&pinned),
        "draining {pinned} got new connections: {drained:?}"
    );
    for _ in 0..3 {
        assert_eq!(session.ask().unwrap(), pinned);
    }
}

#[test]
fn bulk_transfers_through_the_routing_mesh_arrive_intact_both_ways() {
    let node = Node::new(&[1, 2], &[3]).unwrap();
    const SIZE: usize = 32 << 20;
    // Three connections: round robin gives one to each task, the remote one included.
    let mut answered = Vec::new();
    for _ in 0..3 {
        let mut s = node
            .client()
            .run(|| Session::open(published(8080)))
            .unwrap()
            .unwrap();
        let task = s.ask().unwrap();
        assert!(s.download(SIZE).unwrap(), "download from {task} corrupted");
        assert!(s.upload(SIZE).unwrap(), "upload to {task} corrupted");
        answered.push(task);
    }
    answered.sort();
    assert_eq!(answered, ["t1", "t2", "t3"]);
}

#[test]
fn processes_in_steered_namespaces_reach_the_vip_and_published_ports_through_socket_balancing() {
    let mut node = Node::new(&[1, 2], &[3]).unwrap();
    node.steer("t1").unwrap();
    let all = ["t1", "t2", "t3"];

    // The node itself reaching the VIP: balanced, and getpeername() still shows the VIP.
    let out = node
        .probe(node.node_ns(), "tcp", "10.77.0.2:80", 30)
        .unwrap();
    assert!(
        out.iter().all(|(peer, _)| peer == "10.77.0.2:80"),
        "{out:?}"
    );
    assert_even(&tally(out.into_iter().map(|(_, a)| a)), &all, 10);

    // Unconnected UDP to the VIP: replies appear to come from the VIP.
    let out = node
        .probe(node.node_ns(), "udp", "10.77.0.2:53", 30)
        .unwrap();
    assert!(
        out.iter().all(|(from, _)| from == "10.77.0.2:53"),
        "{out:?}"
    );
    assert_even(&tally(out.into_iter().map(|(_, a)| a)), &all, 10);

    // A task on the network reaching the VIP is balanced too.
    let t1 = &node.tasks["t1"].ns;
    let out = node.probe(t1, "tcp", "10.77.0.2:80", 30).unwrap();
    assert_even(&tally(out.into_iter().map(|(_, a)| a)), &all, 10);

    // Host-local clients of the published port: loopback and the node's own address.
    for addr in ["127.0.0.1:8080", "192.0.2.1:8080"] {
        let out = node.probe(node.node_ns(), "tcp", addr, 3).unwrap();
        assert!(
            out.iter()
                .all(|(peer, a)| peer == addr && all.contains(&a.as_str())),
            "{addr}: {out:?}"
        );
    }
    let out = node
        .probe(node.node_ns(), "udp", "127.0.0.1:5353", 3)
        .unwrap();
    assert!(
        out.iter()
            .all(|(from, a)| from == "127.0.0.1:5353" && all.contains(&a.as_str())),
        "{out:?}"
    );

    // A namespace the node does not steer reaching its node's published port goes through
    // the bridge's TC program instead (hairpin NAT), possibly to itself.
    let t2 = &node.tasks["t2"].ns;
    let out = node.probe(t2, "tcp", "192.0.2.1:8080", 6).unwrap();
    assert!(
        out.iter()
            .all(|(peer, a)| peer == "192.0.2.1:8080" && all.contains(&a.as_str())),
        "{out:?}"
    );

    // Inside a task, 127.0.0.1 is the task's own loopback: nothing listens on 8080 there.
    let out = node.probe(t1, "tcp", "127.0.0.1:8080", 1).unwrap();
    assert!(
        out[0].0 == "error" && out[0].1.contains("refused"),
        "{out:?}"
    );

    assert!(node.reason(Reason::SockBalanced) >= 99);
    assert!(node.reason(Reason::SockRestored) >= 96);
}

#[test]
fn garbage_thrown_at_the_published_ports_is_counted_and_leaves_the_routing_mesh_working() {
    let node = Node::new(&[1, 2], &[3]).unwrap();
    let node_mac = mac_of(node.node_ns(), "eth0").unwrap();
    let client_mac = mac_of(node.client(), "eth0").unwrap();
    let client = Ipv4Addr::new(192, 0, 2, 100);
    let frame = |l4: &dyn Fn(etherparse::PacketBuilderStep<etherparse::IpHeaders>) -> Vec<u8>| {
        l4(PacketBuilder::ethernet2(client_mac, node_mac).ipv4(
            client.octets(),
            NODE_IP.octets(),
            64,
        ))
    };
    let syn = |sport: u16| {
        frame(&|b| {
            let mut v = Vec::new();
            b.tcp(sport, 8080, 1, 1000)
                .syn()
                .write(&mut v, &[])
                .unwrap();
            v
        })
    };
    let dgram = |payload: &[u8]| {
        frame(&|b| {
            let mut v = Vec::new();
            b.udp(40000, 5353).write(&mut v, payload).unwrap();
            v
        })
    };
    let patch = |mut f: Vec<u8>, at: usize, bytes: &[u8]| {
        f[at..at + bytes.len()].copy_from_slice(bytes);
        f
    };

    // (what it is counted as, the frame); each is sent 10 times.
    let garbage: Vec<(Reason, Vec<u8>)> = vec![
        // An IPv4 header cut after 10 bytes.
        (Reason::Truncated, syn(1000)[..24].to_vec()),
        // Header length 12 bytes.
        (Reason::BadHeader, patch(syn(1001), 14, &[0x43])),
        // Claims 65535 bytes, carries 40: oversized.
        (
            Reason::BadHeader,
            patch(syn(1002), 16, &65535u16.to_be_bytes()),
        ),
        // TCP data offset 8 bytes.
        (Reason::BadHeader, patch(syn(1003), 14 + 20 + 12, &[0x20])),
        // UDP length beyond the datagram.
        (
            Reason::BadHeader,
            patch(dgram(b"x"), 14 + 20 + 4, &900u16.to_be_bytes()),
        ),
        // First and later fragments.
        (
            Reason::Fragment,
            patch(dgram(&[7; 64]), 20, &0x2000u16.to_be_bytes()),
        ),
        (
            Reason::Fragment,
            patch(dgram(&[7; 64]), 20, &0x00b9u16.to_be_bytes()),
        ),
        // A SYN with a wrong IPv4 header checksum must not create a flow.
        (Reason::BadIpChecksum, patch(syn(1004), 24, &[0xde, 0xad])),
        // A SYN with a wrong TCP checksum is forwarded like a router would (the backend's
        // stack drops it): one flow, then nine packets on it.
        (
            Reason::Forwarded,
            patch(syn(1005), 14 + 20 + 16, &[0xbe, 0xef]),
        ),
    ];
    let before: BTreeMap<Reason, u64> =
        garbage.iter().map(|(r, _)| (*r, node.reason(*r))).collect();
    let mut expected = before.clone();
    for (r, _) in &garbage {
        *expected.get_mut(r).unwrap() += 10;
    }

    let frames: Vec<Vec<u8>> = garbage
        .iter()
        .flat_map(|(_, f)| std::iter::repeat_n(f.clone(), 10))
        .collect();
    node.client()
        .run(move || send_raw("eth0", node_mac, &frames))
        .unwrap()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now: BTreeMap<Reason, u64> = before.keys().map(|r| (*r, node.reason(*r))).collect();
        if now == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counters {now:?}, expected {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Still balancing, evenly.
    let tcp = tally(node.client_requests(Protocol::Tcp, 30).unwrap());
    assert_eq!(tcp.values().sum::<usize>(), 30);
    assert_eq!(tcp.len(), 3, "{tcp:?}");
}

#[test]
fn a_dataplane_reloaded_over_its_pins_keeps_forwarding_and_adopts_its_maps() {
    let mut node = Node::new(&[1, 2], &[3]).unwrap();
    let mut session = node
        .client()
        .run(|| Session::open(published(8080)))
        .unwrap()
        .unwrap();
    let pinned = session.ask().unwrap();

    // The agent is gone: programs, links and maps stay pinned and keep forwarding.
    drop(node.dp.take());
    assert_eq!(session.ask().unwrap(), pinned);
    assert_eq!(node.client_requests(Protocol::Tcp, 6).unwrap().len(), 6);

    // A new agent loads fresh programs into the pinned links and adopts the maps.
    let pin = node.cluster.host(1).bpffs();
    let bridge = node.bridge_ifindex;
    let dp = node
        .node_ns()
        .run(move || -> Result<Dataplane> {
            let mut dp = Dataplane::start(&pin, "eth0")?;
            dp.lb_mut().set_node(&NodeLb::new(NODE_IP)?)?;
            dp.attach_network(bridge)?;
            dp.attach_sockets()?;
            Ok(dp)
        })
        .unwrap()
        .unwrap();
    node.dp = Some(dp);
    assert_eq!(
        node.apply().unwrap(),
        0,
        "the same table needs no map writes"
    );

    assert_eq!(session.ask().unwrap(), pinned);
    let tcp = tally(node.client_requests(Protocol::Tcp, 30).unwrap());
    assert_even(&tcp, &["t1", "t2", "t3"], 10);
    let attached = node
        .node_ns()
        .run(|| SchedClassifier::query_tcx("eth0", TcAttachType::Ingress))
        .unwrap()
        .unwrap()
        .1;
    let names: Vec<_> = attached
        .iter()
        .map(|p| p.name_as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        names,
        [Some("mesh_lb_ingress".to_owned())],
        "replaced in place, not stacked"
    );
}

fn mac_of(ns: &Netns, iface: &str) -> Result<[u8; 6]> {
    // Not /sys/class/net: nsenter keeps the sysfs of the namespace that mounted it.
    let out = ns.sh(&format!("ip -br link show dev {iface}"))?;
    let text = out
        .split_whitespace()
        .find(|w| w.len() == 17 && w.matches(':').count() == 5)
        .with_context(|| format!("no MAC address in {out:?}"))?;
    let mut mac = [0u8; 6];
    for (i, part) in text.split(':').enumerate() {
        mac[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

/// Sends whole Ethernet frames out of `iface` with a packet socket, bypassing the stack.
fn send_raw(iface: &str, dst: [u8; 6], frames: &[Vec<u8>]) -> Result<()> {
    let ifindex = nix::net::if_::if_nametoindex(iface)?;
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a packet socket");
    }
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&dst);
    let mut result = Ok(());
    for f in frames {
        // SAFETY: valid fd, buffer and address of the advertised sizes.
        let n = unsafe {
            libc::sendto(
                fd,
                f.as_ptr().cast(),
                f.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            result = Err(std::io::Error::last_os_error()).context("sending a raw frame");
            break;
        }
    }
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
    result
}
