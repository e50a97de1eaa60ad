//! Overlay networks across three namespace hosts, programmed by mesh-agent's overlay module
//! from the desired state an agent would compute, with real tasks on them.

use std::{
    io::Read,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::Output,
    time::{Duration, Instant},
};

use mesh_agent::overlay::{Change, MacAddr};
use mesh_tests::{
    Cluster,
    netns::command_in,
    overlay::{NetworkDef, Node, Placements},
};

fn app() -> NetworkDef {
    NetworkDef::new("app", 4096, "10.10.0.0/24")
}

fn other() -> NetworkDef {
    NetworkDef::new("other", 4097, "10.20.0.0/24")
}

/// Serves "hello from <task>" to every TCP connection on port 8080.
const HELLO_SERVER: &[&str] = &[
    "sh",
    "-c",
    "while :; do echo \"hello from $HOSTNAME\" | nc -l -N 8080; done",
];

struct World {
    cluster: Cluster,
    nodes: Vec<Node>,
    placements: Placements,
}

impl World {
    fn new(hosts: usize) -> Self {
        let cluster = Cluster::new(hosts).unwrap();
        let nodes = cluster
            .hosts()
            .iter()
            .map(|h| Node::start(h).unwrap())
            .collect();
        let placements = Placements::new(cluster.hosts());
        Self {
            cluster,
            nodes,
            placements,
        }
    }

    fn node(&self, i: usize) -> &Node {
        &self.nodes[i - 1]
    }

    /// Every host reconciles the desired state for the current placements; returns the
    /// changes per host.
    fn reconcile_all(&self) -> Vec<Vec<Change>> {
        self.nodes
            .iter()
            .map(|n| n.reconcile(&self.placements.desired(n.index)).unwrap())
            .collect()
    }

    /// Places a hello server, reconciles every host so the network exists, starts the task.
    fn start(
        &mut self,
        host: usize,
        net: &NetworkDef,
        task: &str,
        last_octet: u8,
    ) -> (String, Ipv4Addr) {
        let ip = self.placements.place(host, net, task, last_octet);
        self.reconcile_all();
        let record = self
            .node(host)
            .run_task(task, net, ip, HELLO_SERVER)
            .unwrap();
        (record.netns, ip)
    }

    /// Runs a shell command line on host `i`.
    fn host_sh(&self, i: usize, script: &str) -> String {
        self.cluster.host(i).ns.sh(script).unwrap()
    }
}

fn run_in(netns: &str, program: &str, args: &[&str]) -> Output {
    command_in(netns, program).args(args).output().unwrap()
}

fn ping(netns: &str, args: &[&str]) -> Output {
    let mut all = vec!["-c", "1", "-W", "2"];
    all.extend_from_slice(args);
    run_in(netns, "ping", &all)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Connects from inside `netns` to `ip:8080` and returns what the server said. Retries
/// briefly: the server restarts `nc` between connections.
fn tcp_hello(netns: &str, ip: Ipv4Addr) -> std::io::Result<String> {
    let path = mesh_agent::netns::path(netns);
    let addr = SocketAddr::from((ip, 8080));
    mesh_agent::netns::run_in(&path, move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let attempt = (|| -> std::io::Result<String> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            })();
            match attempt {
                Ok(out) if !out.is_empty() => return Ok(out),
                // Between two `nc` runs the port is closed or the connection cut short.
                Ok(_) if Instant::now() < deadline => {}
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionRefused
                                | std::io::ErrorKind::ConnectionReset
                        ) => {}
                other => return other,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .unwrap()
}

#[test]
fn tasks_on_three_hosts_reach_each_other_over_the_overlay() {
    let mut w = World::new(3);
    let (c1, ip1) = w.start(1, &app(), "c1", 11);
    let (_, ip2) = w.start(2, &app(), "c2", 21);
    let (_, ip3) = w.start(3, &app(), "c3", 31);

    for (ip, name) in [(ip2, "c2"), (ip3, "c3")] {
        let out = ping(&c1, &[&ip.to_string()]);
        assert!(
            out.status.success(),
            "c1 cannot ping {name}: {}",
            text(&out)
        );
        let hello = tcp_hello(&c1, ip).unwrap();
        assert_eq!(hello.trim(), format!("hello from {name}"));
    }
    // And back, and between the two remote hosts.
    assert_eq!(
        tcp_hello(&w.placement_netns(3, "c3"), ip1).unwrap().trim(),
        "hello from c1"
    );
    assert_eq!(
        tcp_hello(&w.placement_netns(2, "c2"), ip3).unwrap().trim(),
        "hello from c3"
    );
    // Each node reaches the others' addresses on the network through the same entries.
    let out = ping(&c1, &[&app().node_address(3).to_string()]);
    assert!(
        out.status.success(),
        "c1 cannot ping host 3's bridge: {}",
        text(&out)
    );

    // Nothing was learned: the VXLAN device's own FDB entries (not the bridge's, listed
    // with "master") are ours, all permanent.
    let fdb = w.host_sh(1, "bridge fdb show dev mvx4096");
    for line in fdb.lines().filter(|l| !l.contains("master")) {
        assert!(
            line.contains("permanent"),
            "non-permanent FDB entry: {line}"
        );
    }
    assert!(
        fdb.contains(&format!("{} dst 192.0.2.2", MacAddr::for_ip(ip2))),
        "{fdb}"
    );
    assert!(fdb.contains("00:00:00:00:00:00 dst 192.0.2.2"), "{fdb}");
    assert!(fdb.contains("00:00:00:00:00:00 dst 192.0.2.3"), "{fdb}");
    let details = w.host_sh(1, "ip -d link show mvx4096");
    for want in [
        "vxlan id 4096",
        "local 192.0.2.1",
        "dev eth0",
        "dstport 4789",
        "nolearning",
        "mtu 1450",
    ] {
        assert!(details.contains(want), "mvx4096 lacks {want:?}: {details}");
    }
    // No ARP proxy: tasks answer ARP themselves (see mesh_agent::overlay).
    assert!(!details.contains(" proxy "), "{details}");
}

impl World {
    fn placement_netns(&self, host: usize, task: &str) -> String {
        format!("{}-{task}", self.node(host).name)
    }
}

#[test]
fn a_1450_byte_packet_crosses_the_overlay_and_one_byte_more_fails_cleanly() {
    let mut w = World::new(2);
    let (c1, _) = w.start(1, &app(), "c1", 11);
    let (_, ip2) = w.start(2, &app(), "c2", 21);
    let dst = ip2.to_string();

    // 1422 bytes of ICMP payload + 8 ICMP + 20 IP = 1450, the overlay MTU, with DF set: the
    // VXLAN packet on the underlay is exactly 1500.
    let out = ping(&c1, &["-M", "do", "-s", "1422", &dst]);
    assert!(
        out.status.success(),
        "1450-byte DF ping failed: {}",
        text(&out)
    );
    assert!(text(&out).contains("1430 bytes from"), "{}", text(&out));

    // One more byte is refused at the sender, immediately and with the MTU: no blackhole.
    let started = Instant::now();
    let out = ping(&c1, &["-M", "do", "-s", "1423", &dst]);
    let took = started.elapsed();
    assert!(
        !out.status.success(),
        "a 1451-byte DF ping crossed: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("message too long") && text(&out).contains("mtu=1450"),
        "unexpected failure: {}",
        text(&out)
    );
    assert!(
        took < Duration::from_millis(1900),
        "failing took {took:?}, like a timeout"
    );

    // The node itself sends through the bridge with the same limit.
    let host = w
        .cluster
        .host(1)
        .ns
        .sh_output(&format!("ping -c1 -W2 -M do -s 1423 {dst}"))
        .unwrap();
    assert!(text(&host).contains("message too long"), "{}", text(&host));
    w.cluster
        .host(1)
        .ns
        .sh(&format!("ping -c1 -W2 -M do -s 1422 {dst}"))
        .unwrap();
}

#[test]
fn tasks_on_different_networks_cannot_reach_each_other() {
    let mut w = World::new(2);
    let (c1, _) = w.start(1, &app(), "c1", 11);
    let (d1, d1_ip) = w.start(1, &other(), "d1", 11);
    let (_, d2_ip) = w.start(2, &other(), "d2", 21);
    let (_, c2_ip) = w.start(2, &app(), "c2", 21);

    // Same network: fine, locally and across hosts.
    assert_eq!(tcp_hello(&d1, d2_ip).unwrap().trim(), "hello from d2");
    assert_eq!(tcp_hello(&c1, c2_ip).unwrap().trim(), "hello from c2");

    // Across networks: refused, on the same host (routed bridge to bridge) and towards the
    // other host (the node has a route into the other network's bridge).
    for target in [d1_ip, d2_ip] {
        let out = ping(&c1, &[&target.to_string()]);
        assert!(
            !out.status.success(),
            "c1 (app) pinged {target} (other): {}",
            text(&out)
        );
        let err = tcp_hello(&c1, target).unwrap_err();
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::HostUnreachable,
            "connecting c1 → {target}: {err}"
        );
    }
    // The rule per network is the node's only nftables state we own, and it refused them.
    let rules = w.host_sh(1, "nft list table inet mesh");
    assert!(
        rules.contains("iifname \"mbr4096\" oifname \"mbr*\" oifname != \"mbr4096\" reject"),
        "{rules}"
    );
}

#[test]
fn removing_an_endpoint_removes_its_fdb_and_neighbour_entries_everywhere() {
    let mut w = World::new(3);
    let (c1, _) = w.start(1, &app(), "c1", 11);
    w.start(2, &app(), "c2", 21);
    let (_, ip3) = w.start(3, &app(), "c3", 31);
    let mac3 = MacAddr::for_ip(ip3).to_string();
    assert!(ping(&c1, &[&ip3.to_string()]).status.success());
    for h in [1, 2] {
        assert!(w.host_sh(h, "bridge fdb show dev mvx4096").contains(&mac3));
        assert!(
            w.host_sh(h, "ip neigh show dev mbr4096")
                .contains(&ip3.to_string())
        );
        assert!(
            w.host_sh(h, "ip neigh show dev mvx4096")
                .contains(&ip3.to_string())
        );
    }

    w.node(3).stop_task("c3").unwrap();
    w.placements.remove("c3");
    let changes = w.reconcile_all();

    let ip3s = ip3.to_string();
    for h in [1, 2] {
        let c = &changes[h - 1];
        assert!(
            c.iter()
                .any(|c| matches!(c, Change::FdbRemoved { mac, .. } if mac.to_string() == mac3)),
            "host {h}: {c:?}"
        );
        // The VXLAN device's own entries; the bridge's learned ones ("master") age out.
        let fdb = w.host_sh(h, "bridge fdb show dev mvx4096 | grep -v master || true");
        assert!(!fdb.contains(&mac3), "host {h}: {fdb}");
        // Host 3 has no task on app any more: it is no longer a flood target either.
        assert!(!fdb.contains("dst 192.0.2.3"), "host {h}: {fdb}");
        for dev in ["mbr4096", "mvx4096"] {
            let neigh = w.host_sh(h, &format!("ip neigh show dev {dev} nud permanent"));
            assert!(
                !neigh.contains(&format!("{ip3s} ")),
                "host {h} {dev}: {neigh}"
            );
        }
    }
    // Host 3 dropped the whole network with its last task.
    assert!(!w.host_sh(3, "ip -br link").contains("mbr4096"));
    assert!(!ping(&c1, &[&ip3s]).status.success());
}

#[test]
fn a_second_reconcile_changes_nothing_and_a_restarted_node_adopts_everything() {
    let mut w = World::new(3);
    w.start(1, &app(), "c1", 11);
    w.start(2, &app(), "c2", 21);
    w.start(3, &app(), "c3", 31);
    w.start(1, &other(), "d1", 11);
    w.start(3, &other(), "d3", 31);

    // Everything reconciliation owns, without what moves by itself (timers, entries the
    // bridges learn from traffic, IPv6 DAD).
    let dump = |h: usize| {
        w.host_sh(
            h,
            "ip -d link show | sed -E 's/[a-z_]+_timer +[0-9.]+//g'; ip -4 addr; \
             bridge fdb show | grep -v master; ip neigh show nud permanent; ip route; \
             nft list ruleset",
        )
    };
    let before: Vec<String> = (1..=3).map(dump).collect();
    let again = w.reconcile_all();
    assert!(
        again.iter().all(Vec::is_empty),
        "second reconcile changed: {again:?}"
    );
    assert_eq!(before, (1..=3).map(dump).collect::<Vec<_>>());

    // A restarted agent opens a fresh netlink socket and has no memory: it finds everything
    // in place and changes nothing.
    let restarted = Node::start(w.cluster.host(1)).unwrap();
    assert_eq!(
        restarted.reconcile(&w.placements.desired(1)).unwrap(),
        Vec::new()
    );
    assert_eq!(dump(1), before[0]);
}

#[test]
fn stale_and_misconfigured_objects_from_a_previous_run_are_replaced_and_others_left_alone() {
    let mut w = World::new(2);
    let (c1, _) = w.start(1, &app(), "c1", 11);
    let (_, ip2) = w.start(2, &app(), "c2", 21);

    // What a crashed agent with an older table, and an operator, could leave on host 1.
    w.host_sh(
        1,
        "ip link add mbr4099 type bridge && \
         ip link add mvx4099 type vxlan id 4099 dstport 4789 local 192.0.2.1 dev eth0 && \
         ip addr add 10.10.0.200/24 dev mbr4096 && \
         bridge fdb append 02:42:de:ad:be:ef dev mvx4096 dst 192.0.2.99 self permanent && \
         bridge fdb append 00:00:00:00:00:00 dev mvx4096 dst 192.0.2.77 self permanent && \
         ip neigh add 10.10.0.99 lladdr 02:42:de:ad:be:ef dev mbr4096 nud permanent && \
         ip neigh replace 10.10.0.21 lladdr 02:42:00:00:00:01 dev mbr4096 nud permanent && \
         ip link set mbr4096 mtu 1400 && \
         ip link add keep0 type bridge && ip link add mbrlan type bridge",
    );
    let changes = w.node(1).reconcile(&w.placements.desired(1)).unwrap();
    let said: Vec<String> = changes.iter().map(ToString::to_string).collect();
    for want in [
        "deleted mvx4099",
        "deleted mbr4099",
        "removed 10.10.0.200 from mbr4096",
        "removed fdb 02:42:de:ad:be:ef → 192.0.2.99 from mvx4096",
        "removed fdb 00:00:00:00:00:00 → 192.0.2.77 from mvx4096",
        "removed neighbour 10.10.0.99 from mbr4096",
        "neighbour 10.10.0.21 → 02:42:0a:0a:00:15 on mbr4096",
        "updated mbr4096: mtu 1400 → 1450",
    ] {
        assert!(
            said.iter().any(|s| s.starts_with(want)),
            "no {want:?} in {said:#?}"
        );
    }
    assert_eq!(changes.len(), 8, "{said:#?}");
    let links = w.host_sh(1, "ip -br link");
    assert!(
        !links.contains("mbr4099") && !links.contains("mvx4099"),
        "{links}"
    );
    assert!(
        links.contains("keep0") && links.contains("mbrlan"),
        "not ours, must stay: {links}"
    );
    let fdb = w.host_sh(1, "bridge fdb show dev mvx4096");
    assert!(
        !fdb.contains("de:ad:be:ef") && !fdb.contains("192.0.2.77"),
        "{fdb}"
    );
    let addrs = w.host_sh(1, "ip addr show mbr4096");
    assert!(
        addrs.contains("10.10.0.1/24") && !addrs.contains("10.10.0.200"),
        "{addrs}"
    );

    // The VXLAN device of app re-created by hand with learning on and an ARP proxy: settings
    // that cannot change in place, so it is replaced (and its entries written again).
    w.host_sh(
        1,
        "ip link del mvx4096 && ip link add mvx4096 type vxlan id 4096 dstport 4789 \
         local 192.0.2.1 dev eth0 learning proxy && ip link set mvx4096 master mbr4096 up",
    );
    let said: Vec<String> = w
        .node(1)
        .reconcile(&w.placements.desired(1))
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        said.iter()
            .any(|s| s.starts_with("deleted mvx4096 (settings differ")),
        "{said:#?}"
    );
    assert!(said.iter().any(|s| s == "created mvx4096"), "{said:#?}");
    let details = w.host_sh(1, "ip -d link show mvx4096");
    assert!(
        details.contains("nolearning") && !details.contains(" proxy "),
        "{details}"
    );
    // The task still reaches its peer after the repair, and the next pass is quiet.
    assert_eq!(tcp_hello(&c1, ip2).unwrap().trim(), "hello from c2");
    assert_eq!(
        w.node(1).reconcile(&w.placements.desired(1)).unwrap(),
        Vec::new()
    );
}

#[test]
fn one_endpoint_more_among_a_thousand_is_a_three_entry_change() {
    let mut w = World::new(2);
    w.start(1, &app(), "c1", 11);
    w.start(2, &app(), "c2", 21);
    // A thousand more endpoints on host 2 (addresses of a /16 would do the same).
    let fake = |i: u32| {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 10, 4, 0)) + i);
        mesh_agent::overlay::RemoteEndpoint {
            vni: 4096,
            ip,
            mac: MacAddr::for_ip(ip),
            vtep: "192.0.2.2".parse().unwrap(),
        }
    };
    let mut desired = w.placements.desired(1);
    desired.networks[0].subnet = "10.10.0.0/16".parse().unwrap();
    desired.remote_endpoints.extend((0..1000).map(fake));

    let started = Instant::now();
    let first = w.node(1).reconcile(&desired).unwrap();
    let first_took = started.elapsed();
    assert!(first.len() >= 3000, "{} changes", first.len());

    desired.remote_endpoints.push(fake(1000));
    let started = Instant::now();
    let mut next = w.node(1).reconcile(&desired).unwrap();
    let next_took = started.elapsed();
    next.sort_by_key(ToString::to_string);
    let ip = fake(1000).ip;
    let mac = MacAddr::for_ip(ip);
    assert_eq!(
        next,
        vec![
            Change::FdbAdded {
                link: "mvx4096".into(),
                mac,
                vtep: "192.0.2.2".parse().unwrap()
            },
            Change::NeighbourSet {
                link: "mbr4096".into(),
                ip,
                mac
            },
            Change::NeighbourSet {
                link: "mvx4096".into(),
                ip,
                mac
            },
        ]
    );
    eprintln!("1000 endpoints programmed in {first_took:?}; one more in {next_took:?}");
    assert!(
        next_took < Duration::from_secs(1),
        "one endpoint took {next_took:?}"
    );
}

#[test]
fn tasks_leave_through_the_gateway_bridge_masqueraded_and_stay_apart() {
    let mut w = World::new(2);
    w.placements.gateway = true;
    let idle = ["sleep", "3600"];
    let ip1 = w.placements.place(1, &app(), "t1", 11);
    let ip2 = w.placements.place(1, &app(), "t2", 12);
    let d1_ip = w.placements.place(1, &other(), "d1", 11);
    w.reconcile_all();
    let t1 = w
        .node(1)
        .run_task_with_egress("t1", &app(), ip1, &idle)
        .unwrap();
    let t2 = w
        .node(1)
        .run_task_with_egress("t2", &app(), ip2, &idle)
        .unwrap();
    w.node(1)
        .run_task_with_egress("d1", &other(), d1_ip, HELLO_SERVER)
        .unwrap();
    assert_eq!(t1.interfaces[1].address.to_string(), "172.18.0.2/16");
    assert_eq!(t2.interfaces[1].address.to_string(), "172.18.0.3/16");

    let routes = text(&run_in(&t1.netns, "ip", &["route"]));
    assert!(
        routes.contains("default via 172.18.0.1 dev eth1"),
        "{routes}"
    );
    assert!(routes.contains("10.10.0.0/24 dev eth0"), "{routes}");

    // A server on another host's underlay sees the task's node as the client.
    let server = w
        .cluster
        .host(2)
        .ns
        .run(|| std::net::TcpListener::bind("192.0.2.2:9000"))
        .unwrap()
        .unwrap();
    let accepted = std::thread::spawn(move || server.accept().map(|(_, peer)| peer));
    let path = mesh_agent::netns::path(&t1.netns);
    mesh_agent::netns::run_in(&path, || {
        TcpStream::connect_timeout(&"192.0.2.2:9000".parse().unwrap(), Duration::from_secs(3))
    })
    .unwrap()
    .expect("t1 cannot reach a server on the underlay");
    let peer = accepted.join().unwrap().unwrap();
    assert_eq!(
        peer.ip().to_string(),
        "192.0.2.1",
        "not masqueraded behind the node"
    );

    // The gateway bridge does not connect tasks with each other (ICC off)...
    let port = w.host_sh(
        1,
        &format!("bridge -d link show dev {}", t1.interfaces[1].host_veth),
    );
    assert!(port.contains("isolated on"), "{port}");
    let out = ping(&t1.netns, &["172.18.0.3"]);
    assert!(
        !out.status.success(),
        "t1 reached t2 over the gateway bridge: {}",
        text(&out)
    );
    // ...while the overlay still does.
    assert!(ping(&t1.netns, &[&ip2.to_string()]).status.success());
    // And the other network stays out of reach, now by the gateway route.
    let err = tcp_hello(&t1.netns, d1_ip).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::HostUnreachable, "{err}");

    let again = w.reconcile_all();
    assert!(again.iter().all(Vec::is_empty), "{again:?}");
    // Without the gateway, the bridge and its masquerade go.
    w.placements.gateway = false;
    let changes = w.node(1).reconcile(&w.placements.desired(1)).unwrap();
    assert!(
        changes.contains(&Change::LinkDeleted {
            name: "mbrgw".into(),
            why: "no gateway bridge wanted"
        }),
        "{changes:?}"
    );
    assert!(
        !w.host_sh(1, "nft list table inet mesh")
            .contains("masquerade")
    );
}
