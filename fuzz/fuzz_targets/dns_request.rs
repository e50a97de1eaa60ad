//! Arbitrary bytes through mesh-dns's request path, exactly as a listener hands them over.
//!
//! The first input byte picks the transport and the asking task's networks; the rest is the
//! message. The server has a small stack in its snapshot and no upstreams, so every path
//! (local answers, NXDOMAIN, forwarding ending in SERVFAIL, truncation) runs without a network.

#![no_main]

use std::net::Ipv4Addr;
use std::sync::OnceLock;

use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;
use mesh_dns::{
    Config, DnsServer, EndpointMode, Network, Port, Protocol, Scope, Service, Snapshot, Task,
    Transport,
};

struct Fixture {
    server: DnsServer,
    runtime: tokio::runtime::Runtime,
    scopes: [Scope; 4],
}

fn task(name: &str, last: u8) -> Task {
    Task {
        name: name.into(),
        ip: Ipv4Addr::new(10, 0, 1, last),
    }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let server = DnsServer::new(Config::default()).expect("default config is valid");
        let many: Vec<Task> = (1..=120).map(|i| task(&format!("big.{i}"), i)).collect();
        server.update(&Snapshot {
            networks: vec![
                Network {
                    name: "frontend".into(),
                    services: vec![
                        Service {
                            name: "web".into(),
                            endpoint_mode: EndpointMode::Vip(Ipv4Addr::new(10, 0, 1, 2)),
                            tasks: vec![task("web.1.a", 11), task("web.2.b", 12)],
                            ports: vec![Port {
                                protocol: Protocol::Tcp,
                                published: Some(8080),
                                target: 80,
                            }],
                        },
                        Service {
                            name: "big".into(),
                            endpoint_mode: EndpointMode::Dnsrr,
                            tasks: many,
                            ports: vec![Port {
                                protocol: Protocol::Udp,
                                published: None,
                                target: 53,
                            }],
                        },
                    ],
                    tasks: vec![task("debug", 99)],
                },
                Network {
                    name: "backend".into(),
                    services: vec![],
                    tasks: vec![task("db", 50)],
                },
            ],
        });
        Fixture {
            server,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime"),
            scopes: [
                Scope::default(),
                Scope::new(["frontend"]),
                Scope::new(["backend"]),
                Scope::new(["backend", "frontend"]),
            ],
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, message)) = data.split_first() else {
        return;
    };
    let fixture = fixture();
    let transport = if selector & 1 == 0 {
        Transport::Udp
    } else {
        Transport::Tcp
    };
    let scope = &fixture.scopes[usize::from(selector >> 1) % fixture.scopes.len()];
    let Some(response) = fixture
        .runtime
        .block_on(fixture.server.answer(scope, message, transport))
    else {
        return;
    };
    // Whatever we send back must be a DNS response to this message.
    let parsed =
        Message::from_vec(&response).expect("mesh-dns sent a response that does not parse");
    assert_eq!(parsed.metadata.message_type, MessageType::Response);
    assert_eq!(
        response[..2],
        message[..2],
        "response id does not echo the query id"
    );
    if transport == Transport::Udp {
        assert!(response.len() <= 65535);
    }
});
