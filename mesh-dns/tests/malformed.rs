//! Whatever arrives on a listener, mesh-dns neither crashes nor wedges: garbage is dropped and
//! counted, well-formed queries of any shape get a well-formed answer to exactly them.

mod support;

use std::net::Ipv4Addr;

use anyhow::Result;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use mesh_dns::{Counters, DnsServer, Scope, Transport};
use proptest::prelude::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

thread_local! {
    /// One server per test thread, so that each property reads counters only it moved. No
    /// upstreams: foreign names get SERVFAIL without touching the network.
    static SERVER: DnsServer = {
        let server = server_with(vec![], std::time::Duration::from_secs(1));
        server.update(&stack());
        server
    };
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
}

fn answer(bytes: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let scope = Scope::new(["frontend", "backend"]);
    let server = SERVER.with(DnsServer::clone);
    RUNTIME.with(|runtime| runtime.block_on(server.answer(&scope, bytes, transport)))
}

fn counters() -> Counters {
    SERVER.with(DnsServer::counters)
}

fn transport() -> impl Strategy<Value = Transport> {
    prop_oneof![Just(Transport::Udp), Just(Transport::Tcp)]
}

/// Names that hit every branch of the lookup: ours, ours under a network, SRV, PTR, tasks.,
/// foreign, and random labels in any case.
fn name() -> impl Strategy<Value = Name> {
    let known = prop::sample::select(vec![
        "web.",
        "WEB.frontend.",
        "tasks.web.",
        "tasks.api.frontend.",
        "api.",
        "debug.",
        "web.1.aaa.frontend.",
        "db.backend.",
        "_80._tcp.web.",
        "_8080._TCP.web.frontend.",
        "_9000._tcp.api.",
        "_1._udp.db.",
        "nosuch.frontend.",
        "2.1.0.10.in-addr.arpa.",
        "11.2.0.10.in-addr.arpa.",
        "1.in-addr.arpa.",
        "www.example.test.",
        ".",
        "frontend.",
        "tasks.frontend.",
        "_80._tcp.frontend.",
    ])
    .prop_map(|n| Name::from_ascii(n).expect("valid"));
    let random = prop::collection::vec("[a-zA-Z0-9_-]{1,20}", 0..6).prop_filter_map(
        "name too long",
        |labels| {
            let mut name = Name::from_labels(labels.iter().map(|l| l.as_bytes())).ok()?;
            name.set_fqdn(true);
            Some(name)
        },
    );
    prop_oneof![known, random]
}

fn record_type() -> impl Strategy<Value = RecordType> {
    prop_oneof![
        prop::sample::select(vec![
            RecordType::A,
            RecordType::AAAA,
            RecordType::PTR,
            RecordType::SRV,
            RecordType::ANY,
            RecordType::MX,
            RecordType::TXT,
            RecordType::CNAME,
            RecordType::SOA,
        ]),
        any::<u16>().prop_map(RecordType::from),
    ]
}

#[derive(Debug, Clone)]
struct Shape {
    id: u16,
    op_code: u8,
    rd: bool,
    cd: bool,
    class_in: bool,
    edns: Option<(u16, u8, bool)>,
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        any::<u16>(),
        prop_oneof![4 => Just(0u8), 1 => 0u8..16],
        any::<bool>(),
        any::<bool>(),
        prop_oneof![4 => Just(true), 1 => Just(false)],
        prop::option::of((
            any::<u16>(),
            prop_oneof![4 => Just(0u8), 1 => any::<u8>()],
            any::<bool>(),
        )),
    )
        .prop_map(|(id, op_code, rd, cd, class_in, edns)| Shape {
            id,
            op_code,
            rd,
            cd,
            class_in,
            edns,
        })
}

fn build(name: Name, rtype: RecordType, shape: &Shape) -> Message {
    let mut message = Message::query();
    message.metadata.id = shape.id;
    message.metadata.op_code = OpCode::from_u8(shape.op_code);
    message.metadata.recursion_desired = shape.rd;
    message.metadata.checking_disabled = shape.cd;
    let mut query = Query::query(name, rtype);
    if !shape.class_in {
        query.set_query_class(DNSClass::CH);
    }
    message.add_query(query);
    if let Some((payload, version, dnssec_ok)) = shape.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(payload);
        edns.set_version(version);
        edns.set_dnssec_ok(dnssec_ok);
        message.set_edns(edns);
    }
    message
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Arbitrary bytes: either dropped (and counted) or answered with a parseable response
    /// carrying the same id.
    #[test]
    fn arbitrary_bytes_are_answered_well_or_dropped_and_counted(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        transport in transport(),
    ) {
        let before = counters();
        match answer(&bytes, transport) {
            None => prop_assert!(counters().malformed > before.malformed),
            Some(raw) => {
                let response = Message::from_vec(&raw).expect("our responses parse");
                prop_assert_eq!(response.metadata.message_type, MessageType::Response);
                prop_assert_eq!(&raw[..2], &bytes[..2]);
            }
        }
    }

    /// A valid query with some bytes flipped or cut: same contract as arbitrary bytes.
    #[test]
    fn damaged_queries_are_answered_well_or_dropped(
        name in name(),
        rtype in record_type(),
        shape in shape(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        transport in transport(),
    ) {
        let mut bytes = build(name, rtype, &shape).to_vec().expect("encodes");
        for (at, xor) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= xor;
        }
        bytes.truncate(cut.index(bytes.len() + 1).max(1));
        if let Some(raw) = answer(&bytes, transport) {
            let response = Message::from_vec(&raw).expect("our responses parse");
            prop_assert_eq!(response.metadata.message_type, MessageType::Response);
        }
    }

    /// Well-formed queries of any shape always get an answer to exactly that question, with
    /// the client's id and flags, within the transport's size limit.
    #[test]
    fn well_formed_queries_always_get_a_matching_answer(
        name in name(),
        rtype in record_type(),
        shape in shape(),
        transport in transport(),
    ) {
        let query = build(name, rtype, &shape);
        let Ok(bytes) = query.to_vec() else { return Ok(()) };
        let raw = answer(&bytes, transport).expect("a well-formed query is never dropped");
        let response = Message::from_vec(&raw).expect("our responses parse");
        prop_assert_eq!(response.metadata.id, shape.id);
        prop_assert_eq!(response.metadata.message_type, MessageType::Response);
        prop_assert_eq!(response.metadata.op_code, query.metadata.op_code);
        prop_assert_eq!(response.metadata.recursion_desired, shape.rd);
        prop_assert_eq!(&response.queries, &query.queries);
        prop_assert_eq!(response.edns.is_some(), shape.edns.is_some());
        if transport == Transport::Udp {
            let limit = shape.edns.map_or(512, |(payload, _, _)| usize::from(payload).max(512));
            prop_assert!(raw.len() <= limit, "{} bytes over a {limit}-byte limit", raw.len());
        }
        let code = response.metadata.response_code;
        if shape.op_code != 0 {
            prop_assert_eq!(code, ResponseCode::NotImp);
        } else if shape.edns.is_some_and(|(_, version, _)| version > 0) {
            // 16 is BADVERS in a response to OPT (RFC 6891); the parser names it BADSIG.
            prop_assert_eq!(u16::from(code), u16::from(ResponseCode::BADVERS));
        } else if rtype == RecordType::AAAA {
            prop_assert!(response.answers.is_empty(), "we never have AAAA records");
        }
    }
}

#[tokio::test]
async fn a_listener_survives_garbage_and_keeps_answering() -> Result<()> {
    let server = server_with(vec![], std::time::Duration::from_secs(1));
    server.update(&stack());
    let task = serve(&server, &["frontend"]).await?;

    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0xff; 11],
        vec![0xff; 12],
        vec![0; 512],
        vec![0xab; 4000],
        // A response (QR set): never answered, so we cannot be used as a reflector.
        {
            let mut response = query_message("web", RecordType::A, Ask::default());
            response.metadata.message_type = MessageType::Response;
            response.to_vec()?
        },
        // Two questions.
        {
            let mut two = query_message("web", RecordType::A, Ask::default());
            two.add_query(Query::query(Name::from_ascii("api.")?, RecordType::A));
            two.to_vec()?
        },
    ];
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    for datagram in &garbage {
        socket.send_to(datagram, task.addr).await?;
    }
    let response = a(task.addr, "web").await?;
    assert_eq!(ips(&response), vec![ip("10.0.1.2")]);

    // The same garbage as frames on one TCP connection, then a real query on it: a connection
    // answers in order, so the answer also means every frame before it was handled.
    let mut stream = TcpStream::connect(task.addr).await?;
    let mut frames = Vec::new();
    for message in &garbage {
        frames.extend_from_slice(&(message.len() as u16).to_be_bytes());
        frames.extend_from_slice(message);
    }
    let query = query_message("web", RecordType::A, Ask::default());
    let bytes = query.to_vec()?;
    frames.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    frames.extend_from_slice(&bytes);
    stream.write_all(&frames).await?;
    let len = stream.read_u16().await?;
    let mut raw = vec![0u8; usize::from(len)];
    stream.read_exact(&mut raw).await?;
    let response = Message::from_vec(&raw)?;
    assert_eq!(
        response.metadata.id, query.metadata.id,
        "the first reply is the real query's"
    );
    assert_eq!(ips(&response), vec![ip("10.0.1.2")]);

    let counters = server.counters();
    assert_eq!(
        counters.malformed,
        2 * garbage.len() as u64,
        "every piece counted"
    );
    assert_eq!(counters.queries, 2);
    // Nothing was sent back for any of it.
    let mut buf = [0u8; 512];
    let nothing = tokio::time::timeout(
        std::time::Duration::from_millis(200),
        socket.recv_from(&mut buf),
    )
    .await;
    assert!(nothing.is_err(), "garbage got a reply");
    Ok(())
}
