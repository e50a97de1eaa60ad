//! Scenarios: names that are not ours, resolved through the node's upstream resolvers — real
//! DNS servers on loopback — including the ones that are down, silent, failing or truncating.

mod support;

use std::time::{Duration, Instant};

use anyhow::Result;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use mesh_dns::Transport;
use support::*;

/// Short, so that the timeout scenarios stay quick; long enough for a loopback answer on a
/// loaded 2-core CI machine.
const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(700);

#[tokio::test]
async fn foreign_names_are_answered_by_the_upstream_as_it_answered() -> Result<()> {
    let upstream = Upstream::zone().await?;
    let server = server_with(vec![upstream.addr], UPSTREAM_TIMEOUT);
    server.update(&stack());
    let task = serve(&server, &["frontend"]).await?;

    let response = a(task.addr, "www.example.test").await?;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert_eq!(ips(&response), vec![ip("192.0.2.80")]);
    assert_eq!(response.answers[0].ttl, 30, "the upstream's TTL, not ours");
    assert!(response.metadata.recursion_desired, "RD echoed");

    // A negative answer keeps the upstream's SOA, so the client can cache it properly.
    let response = a(task.addr, "nothing.example.test").await?;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    assert!(
        response
            .authorities
            .iter()
            .any(|r| matches!(r.data, RData::SOA(_))),
        "SOA relayed: {:?}",
        response.authorities
    );

    // RD off is passed on, and the answer still comes back with the client's id.
    let response = ask(
        task.addr,
        "www.example.test",
        RecordType::A,
        Ask {
            recursion_desired: false,
            ..Ask::default()
        },
    )
    .await?;
    assert!(!response.metadata.recursion_desired);
    assert_eq!(ips(&response), vec![ip("192.0.2.80")]);

    let counters = server.counters();
    assert_eq!(
        (
            counters.forwarded,
            counters.upstream_failures,
            counters.unanswered
        ),
        (3, 0, 0)
    );
    Ok(())
}

#[tokio::test]
async fn a_dead_first_upstream_is_skipped_at_once() -> Result<()> {
    let dead = dead_upstream().await?;
    let upstream = Upstream::zone().await?;
    let server = server_with(vec![dead, upstream.addr], UPSTREAM_TIMEOUT);
    let task = serve(&server, &["frontend"]).await?;

    let started = Instant::now();
    let response = a(task.addr, "www.example.test").await?;
    assert_eq!(ips(&response), vec![ip("192.0.2.80")]);
    assert!(
        started.elapsed() < UPSTREAM_TIMEOUT,
        "a refused port fails over without waiting: {:?}",
        started.elapsed()
    );
    assert_eq!(server.counters().upstream_failures, 1);
    Ok(())
}

#[tokio::test]
async fn a_silent_first_upstream_is_skipped_after_its_timeout() -> Result<()> {
    let (_silent_socket, silent) = silent_upstream().await?;
    let upstream = Upstream::zone().await?;
    let server = server_with(vec![silent, upstream.addr], UPSTREAM_TIMEOUT);
    let task = serve(&server, &["frontend"]).await?;

    let started = Instant::now();
    let response = a(task.addr, "www.example.test").await?;
    let took = started.elapsed();
    assert_eq!(ips(&response), vec![ip("192.0.2.80")]);
    assert!(took >= UPSTREAM_TIMEOUT, "waited the timeout: {took:?}");
    assert!(
        took < UPSTREAM_TIMEOUT * 3,
        "then failed over promptly: {took:?}"
    );
    assert_eq!(server.counters().upstream_failures, 1);
    Ok(())
}

#[tokio::test]
async fn an_upstream_answering_servfail_or_refused_is_skipped() -> Result<()> {
    let servfail = Upstream::failing(ResponseCode::ServFail).await?;
    let refused = Upstream::failing(ResponseCode::Refused).await?;
    let upstream = Upstream::zone().await?;
    let server = server_with(
        vec![servfail.addr, refused.addr, upstream.addr],
        UPSTREAM_TIMEOUT,
    );
    let task = serve(&server, &["frontend"]).await?;

    let response = a(task.addr, "www.example.test").await?;
    assert_eq!(ips(&response), vec![ip("192.0.2.80")]);
    assert_eq!(
        (servfail.queries(), refused.queries(), upstream.queries()),
        (1, 1, 1)
    );
    assert_eq!(server.counters().upstream_failures, 2);
    Ok(())
}

#[tokio::test]
async fn a_truncated_upstream_answer_is_fetched_again_over_tcp() -> Result<()> {
    let upstream = Upstream::truncating_udp().await?;
    let server = server_with(vec![upstream.addr], UPSTREAM_TIMEOUT);
    let task = serve(&server, &["frontend"]).await?;

    // The client has room for the whole answer over UDP; the upstream would not send it so.
    let response = ask(
        task.addr,
        "big.example.test",
        RecordType::A,
        Ask {
            edns: Some(4096),
            ..Ask::default()
        },
    )
    .await?;
    assert!(!response.metadata.truncation);
    assert_eq!(ips(&response).len(), usize::from(BIG_SIZE));
    let udp = upstream
        .udp_queries
        .load(std::sync::atomic::Ordering::SeqCst);
    let tcp = upstream
        .tcp_queries
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!((udp, tcp), (1, 1), "one UDP try, one TCP retry");
    assert_eq!(server.counters().tcp_fallbacks, 1);

    // A classic client cannot take 1.6 kB over UDP: it gets what fits and TC, then its TCP
    // retry is forwarded over TCP straight away.
    let response = a(task.addr, "big.example.test").await?;
    assert!(response.metadata.truncation);
    assert!(response.to_vec()?.len() <= 512);
    let response = ask(
        task.addr,
        "big.example.test",
        RecordType::A,
        Ask {
            tcp: true,
            ..Ask::default()
        },
    )
    .await?;
    assert!(!response.metadata.truncation);
    assert_eq!(ips(&response).len(), usize::from(BIG_SIZE));
    assert_eq!(
        server.counters().tcp_fallbacks,
        2,
        "the TCP client's query went straight to TCP"
    );
    Ok(())
}

#[tokio::test]
async fn servfail_when_no_upstream_answers() -> Result<()> {
    let dead = dead_upstream().await?;
    let (_silent_socket, silent) = silent_upstream().await?;
    let servfail = Upstream::failing(ResponseCode::ServFail).await?;
    let server = server_with(vec![dead, silent, servfail.addr], UPSTREAM_TIMEOUT);
    let task = serve(&server, &["frontend"]).await?;

    for ask_with in [
        Ask::default(),
        Ask {
            tcp: true,
            ..Ask::default()
        },
        Ask {
            edns: Some(1232),
            ..Ask::default()
        },
    ] {
        let response = ask(task.addr, "www.example.test", RecordType::A, ask_with).await?;
        assert_eq!(
            response.metadata.response_code,
            ResponseCode::ServFail,
            "{ask_with:?}"
        );
        assert!(response.answers.is_empty());
        assert!(response.metadata.recursion_available);
        assert_eq!(
            response.edns.is_some(),
            ask_with.edns.is_some(),
            "OPT only for EDNS clients"
        );
    }
    let counters = server.counters();
    assert_eq!(counters.unanswered, 3);
    assert_eq!(counters.upstream_failures, 9);
    Ok(())
}

#[tokio::test]
async fn with_no_upstreams_foreign_names_fail_fast() -> Result<()> {
    let server = server_with(vec![], UPSTREAM_TIMEOUT);
    server.update(&stack());
    let query = query_message("www.example.test", RecordType::A, Ask::default()).to_vec()?;
    let started = Instant::now();
    let raw = server
        .answer(&mesh_dns::Scope::new(["frontend"]), &query, Transport::Udp)
        .await
        .expect("a well-formed query is answered");
    assert!(started.elapsed() < Duration::from_millis(100));
    let response = hickory_proto::op::Message::from_vec(&raw)?;
    assert_eq!(response.metadata.response_code, ResponseCode::ServFail);
    Ok(())
}

#[tokio::test]
async fn a_task_with_servers_of_its_own_asks_them_and_not_the_nodes() -> Result<()> {
    // The node's upstream is dead: an answer can only come from the task's own server.
    let dead = dead_upstream().await?;
    let own = Upstream::zone().await?;
    let server = server_with(vec![dead], UPSTREAM_TIMEOUT);
    server.update(&stack());
    let (udp, tcp, addr) = bind_pair().await?;
    let _handle = server.serve(
        udp,
        tcp,
        mesh_dns::Scope::new(["frontend"]).with_upstreams(vec![own.addr]),
    );
    let response = a(addr, "www.example.test").await?;
    assert_eq!(ips(&response), vec![ip("192.0.2.80")]);
    // Service names still answer from the cluster's table, not from the task's servers.
    let response = a(addr, "web").await?;
    assert_eq!(ips(&response), vec![ip("10.0.1.2")]);
    // A task without servers of its own is still sent to the node's (dead) one.
    let plain = serve(&server, &["frontend"]).await?;
    let response = a(plain.addr, "www.example.test").await?;
    assert_eq!(response.metadata.response_code, ResponseCode::ServFail);
    Ok(())
}
