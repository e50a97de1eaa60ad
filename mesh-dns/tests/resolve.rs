//! Scenarios: a task on the `frontend` network resolving the names of its stack through a
//! mesh-dns listener on loopback, as it would through 127.0.0.11 inside its namespace.

mod support;

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::Result;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::PTR;
use hickory_proto::rr::{RData, RecordType};
use hickory_resolver::Resolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use mesh_dns::{DEFAULT_TTL, EndpointMode, Scope, Snapshot};
use support::*;

/// A frontend task's resolver, with a real upstream behind it for foreign names.
async fn frontend_task() -> Result<(Served, Upstream)> {
    let upstream = Upstream::zone().await?;
    let server = server_with(vec![upstream.addr], Duration::from_secs(2));
    server.update(&stack());
    Ok((serve(&server, &["frontend"]).await?, upstream))
}

#[tokio::test]
async fn a_service_name_resolves_to_its_vip_however_it_is_spelled() -> Result<()> {
    let (task, upstream) = frontend_task().await?;
    for name in ["web", "web.frontend", "WEB.Frontend.", "wEb."] {
        let response = a(task.addr, name).await?;
        assert_eq!(
            response.metadata.response_code,
            ResponseCode::NoError,
            "{name}"
        );
        assert_eq!(ips(&response), vec![ip("10.0.1.2")], "{name}");
        assert!(
            response.metadata.authoritative,
            "{name}: our own names are authoritative"
        );
        assert!(response.metadata.recursion_available);
        assert!(response.metadata.recursion_desired, "RD is echoed");
        assert_eq!(response.answers[0].ttl, DEFAULT_TTL.as_secs() as u32);
        // The answer's owner is the name as asked, so case-randomizing resolvers accept it.
        assert!(response.answers[0].name.eq_case(response.queries[0].name()));
    }
    assert_eq!(
        upstream.queries(),
        0,
        "local names never reach the upstream"
    );
    let counters = task.server.counters();
    assert_eq!(counters.queries, 4);
    assert_eq!(counters.answered_locally, 4);
    assert_eq!(counters.forwarded, 0);
    Ok(())
}

#[tokio::test]
async fn a_dnsrr_service_resolves_to_all_its_tasks_in_shuffled_order() -> Result<()> {
    let (task, _upstream) = frontend_task().await?;
    let mut orders = HashSet::new();
    for _ in 0..20 {
        let answer = ips(&a(task.addr, "api").await?);
        assert_eq!(
            sorted(answer.clone()),
            vec![ip("10.0.1.21"), ip("10.0.1.22")]
        );
        orders.insert(answer);
    }
    // Two orders, 20 answers: all alike by chance has probability 2^-19.
    assert_eq!(orders.len(), 2, "dnsrr answers are shuffled");
    Ok(())
}

#[tokio::test]
async fn tasks_dot_service_lists_every_task_even_in_vip_mode() -> Result<()> {
    let (task, _upstream) = frontend_task().await?;
    let expected = vec![ip("10.0.1.11"), ip("10.0.1.12"), ip("10.0.1.13")];
    let mut orders = HashSet::new();
    for name in ["tasks.web", "tasks.web.frontend", "Tasks.Web"] {
        for _ in 0..10 {
            let answer = ips(&a(task.addr, name).await?);
            assert_eq!(sorted(answer.clone()), expected, "{name}");
            orders.insert(answer);
        }
    }
    assert!(orders.len() > 1, "task lists are shuffled");
    Ok(())
}

#[tokio::test]
async fn task_names_resolve_to_the_task_on_the_asking_tasks_network() -> Result<()> {
    let (task, _upstream) = frontend_task().await?;
    assert_eq!(
        ips(&a(task.addr, "web.2.bbb").await?),
        vec![ip("10.0.1.12")]
    );
    assert_eq!(
        ips(&a(task.addr, "web.2.bbb.frontend").await?),
        vec![ip("10.0.1.12")]
    );
    assert_eq!(ips(&a(task.addr, "debug").await?), vec![ip("10.0.1.99")]);
    Ok(())
}

#[tokio::test]
async fn aaaa_and_other_types_of_local_names_are_empty_and_never_forwarded() -> Result<()> {
    let (task, upstream) = frontend_task().await?;
    for (name, rtype) in [
        ("web", RecordType::AAAA),
        ("tasks.web", RecordType::AAAA),
        ("debug.frontend", RecordType::AAAA),
        ("web", RecordType::MX),
        ("api", RecordType::TXT),
    ] {
        let response = ask(task.addr, name, rtype, Ask::default()).await?;
        assert_eq!(
            response.metadata.response_code,
            ResponseCode::NoError,
            "{name} {rtype}"
        );
        assert!(response.answers.is_empty(), "{name} {rtype}: no records");
    }
    assert_eq!(
        upstream.queries(),
        0,
        "moby#35118: no upstream round trip for AAAA"
    );
    assert_eq!(task.server.counters().forwarded, 0);
    Ok(())
}

#[tokio::test]
async fn unknown_names_under_our_network_are_nxdomain_and_others_are_forwarded() -> Result<()> {
    let (task, upstream) = frontend_task().await?;
    let response = a(task.addr, "nosuch.frontend").await?;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    assert!(response.metadata.authoritative);
    let response = ask(task.addr, "web.frontend", RecordType::AAAA, Ask::default()).await?;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    // Names with names below them exist, even without records: NXDOMAIN there would tell
    // RFC 8020 resolvers that `_80._tcp.web.frontend` and `web.1.aaa.frontend` do not exist.
    for interior in ["_tcp.web.frontend", "1.aaa.frontend", "aaa.frontend"] {
        let response = a(task.addr, interior).await?;
        assert_eq!(
            response.metadata.response_code,
            ResponseCode::NoError,
            "{interior}"
        );
        assert!(response.answers.is_empty(), "{interior}");
    }
    assert_eq!(upstream.queries(), 0, "names under frontend are ours alone");

    // A bare unknown name could be anyone's: the upstream decides.
    let response = a(task.addr, "www.example.test").await?;
    assert_eq!(ips(&response), vec![ip("192.0.2.80")]);
    assert_eq!(upstream.queries(), 1);
    let counters = task.server.counters();
    assert_eq!((counters.answered_locally, counters.forwarded), (5, 1));
    Ok(())
}

#[tokio::test]
async fn ptr_of_a_vip_or_task_ip_names_the_service_or_task() -> Result<()> {
    let (task, upstream) = frontend_task().await?;
    let ptr = |response: hickory_proto::op::Message| -> Vec<String> {
        response
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::PTR(PTR(name)) => Some(name.to_ascii()),
                _ => None,
            })
            .collect()
    };
    let cases = [
        ("2.1.0.10.in-addr.arpa", "web.frontend."),
        ("12.1.0.10.in-addr.arpa", "web.2.bbb.frontend."),
        ("99.1.0.10.IN-ADDR.ARPA", "debug.frontend."),
    ];
    for (reverse, owner) in cases {
        let response = ask(task.addr, reverse, RecordType::PTR, Ask::default()).await?;
        assert_eq!(ptr(response), vec![owner.to_string()], "{reverse}");
    }
    assert_eq!(upstream.queries(), 0);
    // An address we do not own is the upstream's to answer.
    ask(
        task.addr,
        "1.2.0.192.in-addr.arpa",
        RecordType::PTR,
        Ask::default(),
    )
    .await?;
    assert_eq!(upstream.queries(), 1);
    Ok(())
}

#[tokio::test]
async fn srv_names_the_target_port_by_target_or_published_number() -> Result<()> {
    let (task, _upstream) = frontend_task().await?;
    let srv = |response: &hickory_proto::op::Message| -> Vec<(u16, String)> {
        let mut records: Vec<(u16, String)> = response
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some((srv.port, srv.target.to_ascii())),
                _ => None,
            })
            .collect();
        records.sort();
        records
    };

    // vip mode: one record at the service name, its VIP as glue.
    for name in ["_80._tcp.web", "_8080._tcp.web", "_80._tcp.web.frontend"] {
        let response = ask(task.addr, name, RecordType::SRV, Ask::default()).await?;
        assert_eq!(
            srv(&response),
            vec![(80, "web.frontend.".to_string())],
            "{name}"
        );
        let glue: Vec<_> = response
            .additionals
            .iter()
            .map(|r| (r.name.to_ascii(), r.data.clone()))
            .collect();
        assert_eq!(
            glue,
            vec![("web.frontend.".to_string(), RData::A(ip("10.0.1.2").into()))]
        );
    }

    // dnsrr mode: one record per task, each task's address as glue.
    let response = ask(task.addr, "_9000._tcp.api", RecordType::SRV, Ask::default()).await?;
    assert_eq!(
        srv(&response),
        vec![
            (9000, "api.1.ddd.frontend.".to_string()),
            (9000, "api.2.eee.frontend.".to_string())
        ]
    );
    assert_eq!(response.additionals.len(), 2);
    // The targets resolve through the same server.
    assert_eq!(
        ips(&a(task.addr, "api.1.ddd.frontend").await?),
        vec![ip("10.0.1.21")]
    );

    // A port the service does not have, under our network: no such name.
    let response = ask(
        task.addr,
        "_81._tcp.web.frontend",
        RecordType::SRV,
        Ask::default(),
    )
    .await?;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    let response = ask(
        task.addr,
        "_80._udp.web.frontend",
        RecordType::SRV,
        Ask::default(),
    )
    .await?;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    Ok(())
}

#[tokio::test]
async fn a_task_sees_only_the_networks_it_is_on() -> Result<()> {
    let upstream = Upstream::zone().await?;
    let server = server_with(vec![upstream.addr], Duration::from_secs(2));
    server.update(&stack());
    let frontend = serve(&server, &["frontend"]).await?;
    let backend = serve(&server, &["backend"]).await?;
    let both = serve(&server, &["backend", "frontend"]).await?;

    // The same name, each network's own VIP.
    assert_eq!(ips(&a(frontend.addr, "web").await?), vec![ip("10.0.1.2")]);
    assert_eq!(ips(&a(backend.addr, "web").await?), vec![ip("10.0.2.3")]);
    // On both networks, the first in scope order answers a bare name; qualified names pick.
    assert_eq!(ips(&a(both.addr, "web").await?), vec![ip("10.0.2.3")]);
    assert_eq!(
        ips(&a(both.addr, "web.frontend").await?),
        vec![ip("10.0.1.2")]
    );
    assert_eq!(ips(&a(both.addr, "db").await?), vec![ip("10.0.2.2")]);

    // From frontend, backend's names do not exist here: they go upstream like any foreign
    // name (whose answer is NXDOMAIN), without a hint that backend exists.
    let before = upstream.queries();
    for name in ["db", "db.backend", "tasks.db", "db.1.fff"] {
        let response = a(frontend.addr, name).await?;
        assert!(response.answers.is_empty(), "{name} leaked from backend");
        assert_eq!(
            response.metadata.response_code,
            ResponseCode::NXDomain,
            "{name}"
        );
    }
    assert_eq!(
        upstream.queries() - before,
        4,
        "out-of-scope names are foreign"
    );
    let response = ask(
        frontend.addr,
        "11.2.0.10.in-addr.arpa",
        RecordType::PTR,
        Ask::default(),
    )
    .await?;
    assert!(
        response.answers.is_empty(),
        "backend's addresses are not named to frontend"
    );
    Ok(())
}

#[tokio::test]
async fn a_new_snapshot_is_answered_from_the_next_query_on() -> Result<()> {
    let (task, _upstream) = frontend_task().await?;
    assert_eq!(ips(&a(task.addr, "tasks.web").await?).len(), 3);

    // Scale web down to one task and switch api to vip mode.
    let mut snapshot = stack();
    let frontend = &mut snapshot.networks[0];
    frontend.services[0].tasks.truncate(1);
    frontend.services[1].endpoint_mode = EndpointMode::Vip(ip("10.0.1.20"));
    task.server.update(&snapshot);
    assert_eq!(
        ips(&a(task.addr, "tasks.web").await?),
        vec![ip("10.0.1.11")]
    );
    assert_eq!(ips(&a(task.addr, "api").await?), vec![ip("10.0.1.20")]);
    let response = a(task.addr, "web.3.ccc.frontend").await?;
    assert_eq!(
        response.metadata.response_code,
        ResponseCode::NXDomain,
        "removed task is gone"
    );

    // The table empties (the network was removed): its names are foreign again.
    task.server.update(&Snapshot::default());
    let response = a(task.addr, "web.frontend").await?;
    assert!(response.answers.is_empty());
    assert_eq!(task.server.counters().forwarded, 1);
    Ok(())
}

#[tokio::test]
async fn a_listener_follows_its_task_onto_another_network() -> Result<()> {
    let (task, _upstream) = frontend_task().await?;
    assert_eq!(
        a(task.addr, "db.backend").await?.metadata.response_code,
        ResponseCode::NXDomain
    );
    task.handle.set_scope(Scope::new(["frontend", "Backend"]));
    assert_eq!(task.handle.scope().networks(), ["frontend", "backend"]);
    assert_eq!(
        ips(&a(task.addr, "db.backend").await?),
        vec![ip("10.0.2.2")]
    );
    Ok(())
}

#[tokio::test]
async fn tcp_clients_get_whole_answers_that_udp_must_truncate() -> Result<()> {
    let upstream = Upstream::zone().await?;
    let server = server_with(vec![upstream.addr], Duration::from_secs(2));
    let mut snapshot = stack();
    // A dnsrr service with 100 tasks: ~1.6 kB of answers.
    snapshot.networks[0].services[1].tasks = (1..=100)
        .map(|i| task(&format!("api.{i}.x"), [10, 0, 3, i]))
        .collect();
    server.update(&snapshot);
    let task = serve(&server, &["frontend"]).await?;

    let udp = a(task.addr, "api").await?;
    assert!(udp.metadata.truncation, "over 512 bytes: TC set");
    assert!(!udp.answers.is_empty(), "as many answers as fit are kept");
    assert!(udp.to_vec()?.len() <= 512);

    let edns = ask(
        task.addr,
        "api",
        RecordType::A,
        Ask {
            edns: Some(4096),
            ..Ask::default()
        },
    )
    .await?;
    assert!(!edns.metadata.truncation);
    assert_eq!(
        ips(&edns).len(),
        100,
        "an EDNS client with room gets every task over UDP"
    );
    assert!(edns.edns.is_some(), "an OPT record answers an OPT record");

    let tcp = ask(
        task.addr,
        "api",
        RecordType::A,
        Ask {
            tcp: true,
            ..Ask::default()
        },
    )
    .await?;
    assert!(!tcp.metadata.truncation);
    assert_eq!(ips(&tcp).len(), 100);
    Ok(())
}

#[tokio::test]
async fn an_application_resolver_sees_the_stack() -> Result<()> {
    let (task, _upstream) = frontend_task().await?;
    let mut nameserver = NameServerConfig::udp_and_tcp(task.addr.ip());
    for connection in &mut nameserver.connections {
        connection.port = task.addr.port();
    }
    let mut builder = Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![nameserver]),
        TokioRuntimeProvider::default(),
    );
    builder.options_mut().cache_size = 0;
    let resolver = builder.build()?;

    // lookup_ip asks A and AAAA: AAAA comes back empty at once, A carries the VIP.
    let web: Vec<IpAddr> = resolver.lookup_ip("web.").await?.iter().collect();
    assert_eq!(web, vec![IpAddr::from(ip("10.0.1.2"))]);
    let tasks: Vec<IpAddr> = resolver
        .lookup_ip("tasks.web.frontend.")
        .await?
        .iter()
        .collect();
    assert_eq!(tasks.len(), 3);
    let foreign: Vec<IpAddr> = resolver
        .lookup_ip("www.example.test.")
        .await?
        .iter()
        .collect();
    assert_eq!(foreign, vec![IpAddr::from(ip("192.0.2.80"))]);
    Ok(())
}

#[tokio::test]
async fn dropping_the_handle_stops_serving() -> Result<()> {
    let (task, _upstream) = frontend_task().await?;
    assert_eq!(ips(&a(task.addr, "web").await?), vec![ip("10.0.1.2")]);
    let Served {
        addr,
        handle,
        server,
    } = task;
    drop(handle);
    // The loops end at their next poll; the TCP port refuses connections once they have.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still accepting after drop"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(a(addr, "web").await.is_err(), "no UDP answer after drop");
    // The server itself lives on for the node's other tasks.
    let again = serve(&server, &["frontend"]).await?;
    assert_eq!(ips(&a(again.addr, "web").await?), vec![ip("10.0.1.2")]);
    Ok(())
}

#[tokio::test]
async fn answers_are_counted_by_query_type_and_response_code() -> Result<()> {
    let (task, _upstream) = frontend_task().await?;
    a(task.addr, "web.frontend").await?;
    a(task.addr, "nosuch.frontend").await?;
    a(task.addr, "nosuch.frontend").await?;
    ask(task.addr, "web.frontend", RecordType::AAAA, Ask::default()).await?;
    // Forwarded answers count with the upstream's code, as the client sees it.
    a(task.addr, "www.example.test").await?;
    let count = |qtype: &str, rcode: &str| {
        task.server
            .answers()
            .iter()
            .find(|c| c.qtype == qtype && c.rcode == rcode)
            .map_or(0, |c| c.count)
    };
    assert_eq!(count("A", "NOERROR"), 2, "{:?}", task.server.answers());
    assert_eq!(count("A", "NXDOMAIN"), 2);
    assert_eq!(count("AAAA", "NOERROR"), 1);
    let total: u64 = task.server.answers().iter().map(|c| c.count).sum();
    assert_eq!(total, task.server.counters().queries);
    Ok(())
}
