//! Published ports keep the client's own address (the default, `mode=ingress`): from an
//! outside client, every node's published port reaches local and remote tasks, each task
//! sees the client's address and port, and the replies come back from the published address
//! through the node the client connected to. `mode=snat` keeps Swarm's behaviour (the task
//! sees the ingress node).

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use mesh_tests::{
    Cluster, Host,
    workload::{
        RemoteSession, Seen, http_get, http_seen, http_seen_from, refused_at_once, udp_seen,
    },
};
use serde_json::Value;

const CLIENT_IP: &str = "192.0.2.100";

/// 3 hosts with agents, network app, service web publishing `ports`, an external client on
/// the underlay, and tasks web-1 on host 1 and web-2 on host 2 (none on host 3).
fn cluster(ports: &[&str]) -> Cluster {
    let mut c = Cluster::new(3).unwrap();
    c.start_agents().unwrap();
    c.external("client", 100).unwrap();
    c.create_network("app", "10.10.0.0/24").unwrap();
    let mut args = Vec::new();
    for p in ports {
        args.extend(["-p", p]);
    }
    c.create_service("web", "app", &args).unwrap();
    task(c.host(1), "web-1");
    task(c.host(2), "web-2");
    wait_backends(&c, 2);
    c
}

fn task(h: &Host, name: &str) -> Value {
    h.run_whoami("app", Some("web"), name, &["--udp", "53"])
        .unwrap()
}

fn wait_backends(c: &Cluster, n: usize) {
    c.eventually(
        Duration::from_secs(3),
        "every node programs the backends",
        |c| {
            for h in c.hosts() {
                let s: Value = h.meshctl_json(&["service", "inspect", "web"])?;
                let active = s["dataplane"]["backends"]
                    .as_array()
                    .map_or(0, |b| b.iter().filter(|b| b["state"] == "active").count());
                if active != n {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .unwrap();
}

fn addr(h: &Host, port: u16) -> SocketAddr {
    format!("{}:{port}", h.ip).parse().unwrap()
}

/// `n` answers about the client, asked through `a` from the client namespace.
fn ask(
    c: &Cluster,
    n: usize,
    f: fn(SocketAddr) -> anyhow::Result<Seen>,
    a: SocketAddr,
) -> Vec<Seen> {
    c.external_ns("client")
        .unwrap()
        .run(move || (0..n).map(|_| f(a).unwrap()).collect::<Vec<_>>())
        .unwrap()
}

/// A field of task web-1 (host 1) as `meshctl ps` shows it.
fn web_1(c: &Cluster, field: &str) -> String {
    let ps: Value = c.host(1).meshctl_json(&["ps"]).unwrap();
    ps.as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == "web-1"))
        .and_then(|t| t[field].as_str())
        .unwrap_or_else(|| panic!("web-1's {field} in {ps}"))
        .to_owned()
}

fn tasks(seen: &[Seen]) -> BTreeSet<&str> {
    seen.iter().map(|s| s.task.as_str()).collect()
}

#[test]
fn every_node_shows_local_and_remote_tasks_the_clients_own_address_and_port() {
    let c = cluster(&["8080:80", "5353:53/udp"]);
    for h in c.hosts() {
        for (what, f, port) in [
            (
                "tcp",
                http_seen as fn(SocketAddr) -> anyhow::Result<Seen>,
                8080,
            ),
            ("udp", udp_seen, 5353),
        ] {
            let seen = ask(&c, 6, f, addr(h, port));
            // Round robin: both tasks, so through hosts 1 and 2 one is local and one remote.
            assert_eq!(
                tasks(&seen),
                BTreeSet::from(["web-1", "web-2"]),
                "{what} via {}: {seen:?}",
                h.node_name()
            );
            for s in &seen {
                assert_eq!(
                    s.client.ip().to_string(),
                    CLIENT_IP,
                    "{what} via {}: {s:?}",
                    h.node_name()
                );
                assert_eq!(
                    s.client,
                    s.local,
                    "{what} via {}: the client's own port",
                    h.node_name()
                );
            }
        }
    }
}

/// Packets the bridge of network app (10.10.0.0/24) on `h` has sent (to its ports: tasks
/// and the VXLAN device) and received (from them), in that order.
fn bridge_packets(h: &Host) -> (u64, u64) {
    let addrs: Value =
        serde_json::from_str(&h.ns.sh("ip -j addr show to 10.10.0.0/24").unwrap()).unwrap();
    let bridge = addrs[0]["ifname"]
        .as_str()
        .unwrap_or_else(|| panic!("no bridge of app on {}: {addrs}", h.node_name()));
    let link: Value =
        serde_json::from_str(&h.ns.sh(&format!("ip -s -j link show {bridge}")).unwrap()).unwrap();
    let stats = &link[0]["stats64"];
    (
        stats["tx"]["packets"].as_u64().unwrap(),
        stats["rx"]["packets"].as_u64().unwrap(),
    )
}

#[test]
fn the_routing_mesh_skips_the_bridge_to_local_and_remote_tasks_and_back() {
    let c = cluster(&["8080:80", "published=8081,target=80,mode=snat"]);
    const CONNECTIONS: usize = 40;
    // Each connection is at least 4 packets each way. Through the bridge that was at least
    // 4 × CONNECTIONS; what is left is the node's own traffic with its tasks (ARP, say).
    let few = CONNECTIONS as u64 / 2;
    for h in [c.host(1), c.host(2)] {
        for port in [8080, 8081] {
            let (tx, rx) = bridge_packets(h);
            let seen = ask(&c, CONNECTIONS, http_seen, addr(h, port));
            let (tx2, rx2) = bridge_packets(h);
            // Round robin: half to this node's task, half to the other node's.
            assert_eq!(
                tasks(&seen),
                BTreeSet::from(["web-1", "web-2"]),
                "via {}:{port}",
                h.node_name()
            );
            let via = format!("{}:{port}, {CONNECTIONS} connections", h.node_name());
            assert!(
                tx2 - tx < few,
                "{} packets to tasks by the bridge of {via}",
                tx2 - tx
            );
            // Replies come back by the task's veth (local) or the VXLAN device (remote) and
            // leave at once: client-address ones routed to this node, SNAT ones addressed
            // to its address on the network, which the bridge would deliver up to it.
            assert!(
                rx2 - rx < few,
                "{} replies by the bridge of {via}",
                rx2 - rx
            );
        }
    }
}

/// Packets the bridge of app sent out of its task ports on `h` (the tasks' host-side veths;
/// the VXLAN device is a port too, and is left out).
fn to_task_ports(h: &Host) -> u64 {
    let addrs: Value =
        serde_json::from_str(&h.ns.sh("ip -j addr show to 10.10.0.0/24").unwrap()).unwrap();
    let bridge = addrs[0]["ifname"].as_str().unwrap().to_owned();
    let ports: Value = serde_json::from_str(
        &h.ns
            .sh(&format!("ip -s -j link show master {bridge}"))
            .unwrap(),
    )
    .unwrap();
    ports
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !p["ifname"].as_str().unwrap_or("").starts_with("mvx"))
        .map(|p| p["stats64"]["tx"]["packets"].as_u64().unwrap())
        .sum()
}

#[test]
fn the_tasks_node_takes_packets_another_node_routed_straight_into_the_task() {
    let c = cluster(&["8080:80", "published=8081,target=80,mode=snat"]);
    const CONNECTIONS: usize = 40;
    let backends = [c.host(1), c.host(2)];
    let count = || backends.map(to_task_ports);
    // Host 3 has no task: every connection through it goes to another node's task.
    let before = count();
    let seen = ask(&c, CONNECTIONS, http_seen, addr(c.host(3), 8080));
    let after = count();
    assert_eq!(tasks(&seen), BTreeSet::from(["web-1", "web-2"]));
    for s in &seen {
        assert_eq!(s.client, s.local, "the client's own address: {s:?}");
    }
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        // Each connection is at least 4 packets to its task; what is left is the node's own
        // traffic with its task (ARP, say).
        assert!(
            a - b < CONNECTIONS as u64 / 2,
            "{} packets through the bridge of host{} to its task",
            a - b,
            i + 1
        );
    }
    // The same count sees packets that do take the bridge: SNAT ones come from host 3's
    // address on the network, like any task-to-task traffic.
    ask(&c, CONNECTIONS, http_seen, addr(c.host(3), 8081));
    let snat = count();
    let bridged: u64 = snat.iter().zip(&after).map(|(s, a)| s - a).sum();
    assert!(
        bridged >= 4 * CONNECTIONS as u64,
        "only {bridged} packets of {CONNECTIONS} SNAT connections counted on the task ports"
    );
}

#[test]
fn keep_alive_and_short_connections_through_a_node_without_tasks_are_all_answered() {
    let c = cluster(&["8080:80"]);
    let a = addr(c.host(3), 8080);
    // Keep-alive requests on one connection, then many short ones: every one answered.
    let answers = c
        .external_ns("client")
        .unwrap()
        .run(move || {
            let mut s = mesh_tests::workload::Session::open(a).unwrap();
            let mut names: Vec<String> = (0..20).map(|_| s.http_get().unwrap()).collect();
            names.extend((0..40).map(|_| http_get(a).unwrap().trim().to_owned()));
            names
        })
        .unwrap();
    assert_eq!(answers.len(), 60);
    let first = &answers[0];
    assert!(
        answers[..20].iter().all(|n| n == first),
        "the connection moved: {answers:?}"
    );
}

#[test]
fn a_connection_through_another_node_survives_a_restart_of_the_backends_agent() {
    let mut c = cluster(&["8080:80"]);
    let a = addr(c.host(3), 8080);
    let session = RemoteSession::open(c.external_ns("client").unwrap(), a);
    let on = session.get();
    let backend_host = if on == "web-1" { 1 } else { 2 };
    let task_before = local_task(c.host(backend_host), &on);
    let old = c.host(backend_host).agent_pid().unwrap();
    assert_eq!(c.host(backend_host).api_pid(), Some(old));
    // The pinned return table and task-veth links keep the replies on their way back
    // through host 3 while the agent is away, and the new agent adopts them. (A crash long
    // enough to be detected takes the node's backends out everywhere, by design.)
    c.host_mut(backend_host).stop_agent().unwrap();
    assert!(
        !mesh_tests::process::alive(old as i32),
        "the old agent still runs"
    );
    assert_eq!(
        c.host(backend_host).api_pid(),
        None,
        "someone still serves the socket"
    );
    assert_eq!(session.get(), on, "broke while the agent was stopped");
    c.host_mut(backend_host).restart_agent().unwrap();
    // A new process serves the node's API...
    let new = c.host(backend_host).agent_pid().unwrap();
    assert_ne!(new, old);
    assert_eq!(c.host(backend_host).api_pid(), Some(new));
    // ...and adopted the task (same id, same process) rather than starting another.
    assert_eq!(local_task(c.host(backend_host), &on), task_before);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(session.get(), on, "broke across the restart");
    wait_backends(&c, 2);
    for s in ask(&c, 4, http_seen, a) {
        assert_eq!(s.client, s.local, "{s:?}");
    }
    // The flow went on through the adopted task: still the same connection, same task.
    assert_eq!(session.get(), on);
}

/// Task `name` of this host as `meshctl ps` shows it: (id, pid, ip).
fn local_task(h: &Host, name: &str) -> (String, u64, String) {
    let ps: Value = h.meshctl_json(&["ps"]).unwrap();
    let t = ps
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == name))
        .unwrap_or_else(|| panic!("{name} not in {ps}"));
    (
        t["id"].as_str().unwrap_or_default().to_owned(),
        t["pid"].as_u64().unwrap_or_else(|| panic!("no pid in {t}")),
        t["ip"].as_str().unwrap_or_default().to_owned(),
    )
}

#[test]
fn a_client_reusing_a_port_reaches_the_task_directly_after_the_routing_mesh() {
    let c = cluster(&["8080:80"]);
    let task_ip = web_1(&c, "ip");
    let direct: SocketAddr = format!("{task_ip}:80").parse().unwrap();
    let client = c.external_ns("client").unwrap();
    // The client reaches the overlay through host 1, as through a router.
    client
        .sh(&format!("ip route add 10.10.0.0/24 via {}", c.host(1).ip))
        .unwrap();
    let published = addr(c.host(1), 8080);
    let seen = client
        .run(move || {
            let mut seen = Vec::new();
            // Round robin: the port that reached web-1 through the mesh is the one whose
            // finished flow could capture the direct connection's replies.
            for port in 41000..41004 {
                let s = http_seen_from(published, port)?;
                let local = s.task == "web-1";
                seen.push(s);
                if local {
                    seen.push(http_seen_from(direct, port)?);
                    // And through the mesh again from the same port.
                    seen.push(http_seen_from(published, port)?);
                    return Ok(seen);
                }
            }
            anyhow::bail!("no connection through host 1 reached web-1: {seen:?}")
        })
        .unwrap()
        .unwrap();
    let n = seen.len();
    let (via_mesh, direct_seen, again) = (&seen[n - 3], &seen[n - 2], &seen[n - 1]);
    assert_eq!(via_mesh.client, via_mesh.local, "{seen:?}");
    assert_eq!(direct_seen.task, "web-1");
    assert_eq!(
        direct_seen.client, via_mesh.client,
        "the same 4-tuple at the task: {seen:?}"
    );
    assert_eq!(again.client, again.local, "{seen:?}");
}

/// `GET /bytes/N` over HTTP/1.0 to `a`: how many body bytes arrived before the server
/// closed (a stall past the read timeout is an error).
fn download(a: SocketAddr, n: usize) -> anyhow::Result<usize> {
    use anyhow::Context;
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&a, Duration::from_secs(3))
        .with_context(|| format!("connecting to {a}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET /bytes/{n} HTTP/1.0\r\nHost: mesh\r\n\r\n").as_bytes())?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .with_context(|| format!("downloading from {a}: stalled after {} bytes", got.len()))?;
    let head = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("no answer head from {a}"))?;
    Ok(got.len() - head - 4)
}

#[test]
fn a_client_behind_a_small_mtu_link_downloads_through_every_node() {
    // The client's own link has 1500 bytes, so it offers an MSS the path cannot carry: the
    // router in front of it answers the tasks' large segments with fragmentation-needed,
    // addressed to the published address. Unless the nodes hand those errors to the tasks
    // about the packets they sent, path-MTU discovery never learns and the downloads stall.
    let mut c = cluster(&["8080:80", "published=8081,target=80,mode=snat"]);
    c.external("edge", 200).unwrap();
    let far = mesh_tests::Netns::create(&format!("{}-xfar", c.name())).unwrap();
    c.external_ns("edge")
        .unwrap()
        .sh(&format!(
            "ip link add far0 mtu 1280 type veth peer name eth0 mtu 1500 netns {} && \
             ip addr add 198.51.100.1/24 dev far0 && ip link set far0 up && \
             sysctl -qw net.ipv4.ip_forward=1",
            far.name()
        ))
        .unwrap();
    far.sh(
        "ip addr add 198.51.100.2/24 dev eth0 && ip link set eth0 up && \
         ip route add default via 198.51.100.1",
    )
    .unwrap();
    for h in c.hosts() {
        h.ns.sh("ip route add 198.51.100.0/24 via 192.0.2.200")
            .unwrap();
    }
    const SIZE: usize = 1 << 20;
    for h in c.hosts() {
        for port in [8080, 8081] {
            let a = addr(h, port);
            // Two downloads: round robin gives each node's both tasks (one local to hosts
            // 1 and 2, both remote to host 3).
            let got = far
                .run(move || (0..2).map(|_| download(a, SIZE)).collect::<Vec<_>>())
                .unwrap();
            for g in got {
                assert_eq!(g.unwrap(), SIZE, "via {a}");
            }
        }
    }
    // The kernel underneath: web-1 learned the path's MTU towards the client itself.
    let netns = web_1(&c, "netns");
    let route = mesh_tests::Netns::existing(&netns)
        .sh("ip route get 198.51.100.2")
        .unwrap();
    assert!(route.contains("mtu 1280"), "{route}");
}

#[test]
fn mode_snat_shows_the_task_the_ingress_nodes_address() {
    let c = cluster(&[
        "published=8080,target=80,mode=snat",
        "5353:53/udp,mode=snat",
    ]);
    let ls = c.host(1).meshctl_ok(&["service", "ls"]).unwrap();
    assert!(ls.contains("*:8080->80/tcp (snat)"), "{ls}");
    for h in c.hosts() {
        for (f, port) in [
            (http_seen as fn(SocketAddr) -> anyhow::Result<Seen>, 8080),
            (udp_seen, 5353),
        ] {
            let seen = ask(&c, 4, f, addr(h, port));
            assert_eq!(tasks(&seen), BTreeSet::from(["web-1", "web-2"]), "{seen:?}");
            for s in &seen {
                let ip = s.client.ip().to_string();
                assert!(
                    ip.starts_with("10.10.0."),
                    "via {} the task saw {ip}, not the ingress node's address on app",
                    h.node_name()
                );
            }
        }
    }
}

#[test]
fn mode_host_answers_only_on_nodes_with_a_task_and_only_with_their_own() {
    let c = cluster(&["published=8080,target=80,mode=host"]);
    for (i, name) in [(1, "web-1"), (2, "web-2")] {
        let seen = ask(&c, 4, http_seen, addr(c.host(i), 8080));
        assert_eq!(tasks(&seen), BTreeSet::from([name]), "{seen:?}");
        assert!(seen.iter().all(|s| s.client == s.local), "{seen:?}");
    }
    let a = addr(c.host(3), 8080);
    // Refused at once (an RST), not left to time out.
    c.external_ns("client")
        .unwrap()
        .run(move || refused_at_once(a))
        .unwrap()
        .unwrap_or_else(|e| panic!("host 3 runs no task of web: {e:#}"));
    let ls = c.host(1).meshctl_ok(&["service", "ls"]).unwrap();
    assert!(ls.contains("*:8080->80/tcp (host)"), "{ls}");
}

#[test]
fn a_task_with_client_address_flows_still_reaches_the_outside_masqueraded() {
    let c = cluster(&["5353:53/udp"]);
    // The client talks to the task first, so the task has return entries for the client's
    // address; a conversation the task starts itself must still leave masqueraded.
    let seen = ask(&c, 4, udp_seen, addr(c.host(1), 5353));
    assert!(seen.iter().all(|s| s.client.ip().to_string() == CLIENT_IP));
    let outside = c
        .external_ns("client")
        .unwrap()
        .spawn(
            mesh_tests::cluster::bin("mesh-whoami").to_str().unwrap(),
            &["--name", "outside", "--no-http", "--udp", "9000"],
        )
        .unwrap();
    let netns = web_1(&c, "netns");
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &netns,
            "sh",
            "-c",
            &format!("echo client? | timeout 3 nc -u -w1 {CLIENT_IP} 9000"),
        ])
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    let host1 = &c.host(1).ip;
    assert!(
        answer.starts_with(&format!("outside {host1}:")),
        "the task's own conversation was not masqueraded behind host 1: {answer:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(outside);
}

#[test]
fn a_bad_publish_mode_is_refused_and_changes_nothing() {
    let mut c = Cluster::new(1).unwrap();
    c.start_agents().unwrap();
    c.create_network("app", "10.10.0.0/24").unwrap();
    for (bad, says) in [
        ("published=8080,target=80,mode=dsr", "unknown publish mode"),
        ("8080:80,mode=dsr", "unknown publish mode"),
        ("8080:80,protocol=udp", "only ,mode="),
    ] {
        let out = c
            .host(1)
            .meshctl(&["service", "create", "web", "--network", "app", "-p", bad])
            .unwrap();
        assert!(!out.status.success(), "{bad} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{bad}: {err}");
    }
    let ls = c.host(1).meshctl_ok(&["service", "ls"]).unwrap();
    assert!(!ls.contains("web"), "{ls}");
    let help = c
        .host(1)
        .meshctl_ok(&["service", "create", "--help"])
        .unwrap();
    assert!(help.contains("mode=snat"), "{help}");
}
