//! A flood at a published port: spoofed SYNs and UDP datagrams from random sources (a raw
//! socket in a namespace of the test) while a client holds a keep-alive connection and
//! another opens new ones. The flood fills only the embryonic flow table: the established
//! connection keeps working, new connections keep being served, and the counters show
//! what the embryonic table evicted.

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use mesh_tests::{
    Cluster,
    availability::Probe,
    flood::{FloodKind, flood_at, scrape},
    workload::{RemoteSession, http_get},
};

const METRICS: &str = "127.0.0.1:9464";
/// What the namespaces' links carry on a 2-core machine without dropping packets (faster,
/// legitimate packets are lost with the flood's before they reach the routing mesh).
const PPS: u64 = 40_000;
/// Small enough that the flood overflows it many times over.
const EMBRYONIC: u32 = 8192;

#[test]
fn a_spoofed_flood_breaks_no_established_connection_and_stops_no_new_ones() {
    let mut c = Cluster::new(1).unwrap();
    let config = c.log_dir().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "metrics_listen = \"{METRICS}\"\n\n[dataplane]\nmax_embryonic_flows = {EMBRYONIC}\n"
        ),
    )
    .unwrap();
    c.host_mut(1)
        .start_agent(&["--config", config.to_str().unwrap()])
        .unwrap();
    c.external("client", 100).unwrap();
    c.external("flooder", 66).unwrap();
    c.create_network("app", "10.10.0.0/24").unwrap();
    c.create_service("web", "app", &["-p", "8080:80", "-p", "5353:53/udp"])
        .unwrap();
    c.host(1)
        .run_whoami::<serde_json::Value>("app", Some("web"), "web-1", &["--udp", "53"])
        .unwrap();
    let web: SocketAddr = format!("{}:8080", c.host(1).ip).parse().unwrap();
    let client = c.external_ns("client").unwrap();
    c.eventually(Duration::from_secs(10), "web answers", |_| {
        match client.run(move || http_get(web))? {
            Ok(a) if a.trim() == "web-1" => Ok(Some(())),
            Ok(a) => anyhow::bail!("answered {a:?}"),
            Err(e) => Err(e),
        }
    })
    .unwrap();
    let session = RemoteSession::open(client, web);
    assert_eq!(session.get().trim(), "web-1");
    let metrics = METRICS.parse().unwrap();
    let before = c.host(1).ns.run(move || scrape(metrics)).unwrap().unwrap();

    let newcomers = Probe::start(client, web).unwrap();
    let flooder = c.external_ns("flooder").unwrap();
    let SocketAddr::V4(target) = web else {
        unreachable!()
    };
    let udp_target = SocketAddrV4::new(*target.ip(), 5353);
    let syn = flooder
        .run(move || flood_at(FloodKind::Syn, target, 100_000, 7, Some(PPS)))
        .unwrap()
        .unwrap();
    assert_eq!(
        session.get().trim(),
        "web-1",
        "the keep-alive connection after the SYN flood"
    );
    let udp = flooder
        .run(move || flood_at(FloodKind::Udp, udp_target, 50_000, 11, Some(PPS)))
        .unwrap()
        .unwrap();
    assert_eq!(
        session.get().trim(),
        "web-1",
        "the keep-alive connection after the UDP flood"
    );
    let newcomers = newcomers.finish();

    let after = c.host(1).ns.run(move || scrape(metrics)).unwrap().unwrap();
    let delta =
        |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    eprintln!(
        "SYN flood {:.0} pps, UDP flood {:.0} pps; new connections {newcomers}; \
         flows created {}, embryonic evicted {}, established now {}",
        syn.pps(),
        udp.pps(),
        delta("mesh_flows_created_total"),
        delta("mesh_flows_embryonic_evicted_total"),
        after["mesh_flows_established"],
    );
    // New connections are never stopped: no stretch of half a second without one served
    // (measured: at most 118 ms). Some do fail within the 1 s budget, which the old client
    // (3 s timeout) hid: measured 6 to 16 of ~376 (connect timeouts: a SYN or SYN-ACK
    // lost among 40,000 packets/s on 2 cores; resets ~220 ms in: most likely the embryonic
    // entry evicted before the handshake completed, since 8192 entries last ~200 ms at
    // that rate and answers queue up to ~300 ms). The honest bound: at most 10 % of what
    // the rate should send.
    let max_failed = (newcomers.expected() * 0.10) as usize;
    newcomers.assert_available_allowing(
        "new connections during the floods",
        max_failed,
        Duration::from_millis(500),
    );
    // What the routing mesh counted against what was sent: every spoofed packet is a new
    // flow (a new source), so flows created are the flood's packets that reached the mesh
    // plus the clients' connections, and no more. The links are paced not to drop, so
    // (nearly) all of the flood is counted.
    let flood = (syn.packets + udp.packets) as f64;
    let created = delta("mesh_flows_created_total");
    let clients = (newcomers.sent + 1) as f64;
    assert!(
        created >= 0.9 * flood,
        "the routing mesh counted {created} new flows of the {flood} packets sent"
    );
    assert!(
        created <= flood + clients,
        "{created} new flows from {flood} flood packets and {clients} client connections"
    );
    // The table holds EMBRYONIC flows: everything else of the flood that was counted in had
    // to be evicted (or expire, which takes seconds; the flood lasts ~4 s).
    let evicted = delta("mesh_flows_embryonic_evicted_total");
    assert!(
        evicted >= 0.75 * (created - f64::from(EMBRYONIC)) && evicted <= created,
        "{evicted} evicted of {created} created with room for {EMBRYONIC}: {after:?}"
    );
    assert!(
        after["mesh_flows_embryonic"] <= f64::from(EMBRYONIC),
        "{after:?}"
    );
    assert!(after["mesh_flows_established"] >= 1.0);
}
