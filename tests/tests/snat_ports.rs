//! SNAT ports and the backend's TIME_WAIT: many short connections (`Connection: close`, the
//! backend closes first and keeps each 4-tuple in TIME_WAIT for 60 s) through a published
//! port. A SNAT port given again to a new flow towards the same backend within those 60 s
//! lands on a TIME_WAIT socket; when the client does not use TCP timestamps, the backend
//! then answers the new SYN with an ACK of the old connection about half the time, the
//! client resets it, and the connection stalls a second until the SYN is sent again.
//! A closed flow's SNAT port is held towards its backend for `snat_reuse_delay_s` (65 s).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_tests::{
    Cluster, Netns,
    workload::{NameServer, http_get},
};

/// Connections per second and for how long: after ~12 s the sweep frees the ports of the
/// first closed flows, so without reservations later flows reuse ports in TIME_WAIT.
const PACE: Duration = Duration::from_millis(50);
const RUN: Duration = Duration::from_secs(24);

/// What one run saw.
struct Run {
    connections: usize,
    /// Requests slower than 800 ms or failed.
    stalled: Vec<String>,
    /// Distinct 4-tuples the backend holds in TIME_WAIT at the end.
    time_wait: usize,
    /// The backend's other sockets and TIME_WAIT counter: whether a missing 4-tuple was
    /// reused or its connection never reached TIME_WAIT.
    backend: String,
}

/// The peers (address:port) of the TCP sockets in TIME_WAIT in `ns` matching the `ss`
/// filter `filter`.
fn time_wait_peers(ns: &Netns, filter: &str) -> std::collections::BTreeSet<String> {
    ns.sh(&format!("ss -Htan state time-wait {filter}"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
        .collect()
}

/// Short connections through a node whose agent has the given `[dataplane]` settings.
fn short_connections(dataplane: &str) -> Run {
    let mut c = Cluster::new(1).unwrap();
    let config = c.log_dir().join("agent.toml");
    // 2000 ports: the ~400 flows of the run, all held for 65 s, take a fifth of them (so
    // random choices find a free one at once), and few enough that without reservations
    // random choices land on recently closed ports.
    std::fs::write(
        &config,
        format!(
            "[dataplane]\nsnat_port_min = 20000\nsnat_port_max = 21999\n\
             max_embryonic_flows = 1000\n{dataplane}\n"
        ),
    )
    .unwrap();
    c.host_mut(1)
        .start_agent(&["--config", config.to_str().unwrap()])
        .unwrap();
    let client = c.external("client", 100).unwrap();
    // No timestamps: the backend's TIME_WAIT socket then judges a new SYN by its sequence
    // number alone (as with clients that do not send them).
    client.sh("sysctl -qw net.ipv4.tcp_timestamps=0").unwrap();
    c.create_network("app", "10.10.0.0/24").unwrap();
    // SNAT ports are mode=snat's. A client-address port (the default) keeps the client's own
    // 4-tuple: there is no port of the mesh's to test, and whether one repeats is the client
    // kernel's choice.
    c.create_service("web", "app", &["-p", "published=8080,target=80,mode=snat"])
        .unwrap();
    c.host(1)
        .run_whoami::<serde_json::Value>("app", Some("web"), "web-1", &[])
        .unwrap();
    let web: SocketAddr = format!("{}:8080", c.host(1).ip).parse().unwrap();
    let client = c.external_ns("client").unwrap();
    c.eventually(Duration::from_secs(10), "web answers", |_| {
        Ok(client.run(move || http_get(web))?.ok().map(|_| ()))
    })
    .unwrap();
    let r = client
        .run(move || {
            let started = Instant::now();
            let (mut n, mut bad) = (0, Vec::new());
            while started.elapsed() < RUN {
                let t = Instant::now();
                let r = http_get(web);
                let took = t.elapsed();
                n += 1;
                match r {
                    Ok(_) if took < Duration::from_millis(800) => {}
                    Ok(_) => bad.push(format!("at {:?}: took {took:?}", started.elapsed())),
                    Err(e) => bad.push(format!("at {:?}: {e:#}", started.elapsed())),
                }
                std::thread::sleep(PACE);
            }
            (n, bad)
        })
        .unwrap();
    // Every 4-tuple the backend holds in TIME_WAIT, by the peer's address and port (the
    // node's SNAT address and port): a connection that landed on one in TIME_WAIT replaced
    // it, so fewer sockets than connections means collisions.
    let time_wait = time_wait_peers(&Netns::existing(&format!("{}-h1-web-1", c.name())), "");
    let backend = c
        .host(1)
        .ns
        .sh(&format!(
            "ip netns exec {0}-h1-web-1 ss -Htan exclude time-wait; \
             ip netns exec {0}-h1-web-1 nstat -az TcpExtTW TcpOutRsts TcpEstabResets",
            c.name()
        ))
        .unwrap_or_else(|e| format!("{e:#}"));
    Run {
        connections: r.0,
        stalled: r.1,
        time_wait: time_wait.len(),
        backend,
    }
}

#[test]
fn short_connections_never_land_on_a_backends_time_wait() {
    let Run {
        connections: n,
        stalled,
        time_wait,
        backend,
    } = short_connections("");
    eprintln!(
        "{n} connections, {time_wait} in TIME_WAIT at the backend, {} stalled: {stalled:?}",
        stalled.len()
    );
    assert!(n >= 300, "only {n} connections");
    // The run is shorter than TIME_WAIT: every connection (and the readiness probe before
    // them) left its own 4-tuple there.
    assert!(
        time_wait > n,
        "{} of {n} connections reused a 4-tuple in TIME_WAIT (the backend: {backend})",
        n + 1 - time_wait.min(n + 1)
    );
    assert!(
        stalled.is_empty(),
        "{} of {n} stalled: {stalled:?}",
        stalled.len()
    );
}

/// The measure above can fail: a 4-tuple used twice within TIME_WAIT leaves one TIME_WAIT
/// socket for two connections, so the backend holds fewer 4-tuples than connections. Shown
/// without the mesh (a client that picks its ports, in one namespace, no TCP timestamps),
/// which makes it fast and deterministic.
#[test]
fn a_reused_4_tuple_leaves_fewer_time_wait_sockets_than_connections() {
    let ns = Netns::create(&format!("mt{}xtw", std::process::id())).unwrap();
    ns.sh("sysctl -qw net.ipv4.tcp_timestamps=0").unwrap();
    let _server = NameServer::start(&ns, "tw", 8080, 8053).unwrap();
    let server: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    // Ports 40001 and 40002 once each, then 40002 again while its first connection is in
    // the server's TIME_WAIT (the server closes first).
    let ports = [40001, 40002, 40002];
    ns.run(move || {
        for port in ports {
            get_from(server, port).unwrap();
        }
    })
    .unwrap();
    let peers = time_wait_peers(&ns, "sport = :8080");
    assert_eq!(
        peers,
        std::collections::BTreeSet::from([
            "127.0.0.1:40001".to_owned(),
            "127.0.0.1:40002".to_owned()
        ]),
        "3 connections over 2 4-tuples"
    );
    assert!(peers.len() < ports.len());
}

/// An HTTP GET from the client's port `port`, the whole answer read (a stalled one is
/// retried by the kernel within the 5 s deadline).
fn get_from(server: SocketAddr, port: u16) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    s.connect_timeout(&server.into(), Duration::from_secs(5))?;
    let mut s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
