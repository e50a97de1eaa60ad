//! Shared pieces of the mesh-dns scenarios: a served DnsServer on loopback, a raw DNS client,
//! and upstream resolvers that are real DNS servers (hickory-server) on loopback.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol as NetProtocol;
use hickory_server::proto::op::Metadata;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, MessageResponseBuilder, ZoneType};
use mesh_dns::{
    Config, DnsServer, EndpointMode, Network, Port, Protocol, Scope, ServeHandle, Service,
    Snapshot, Task,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::timeout;

/// How long the test client waits for any answer. Generous: CI machines are shared.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds a UDP socket and a TCP listener on the same loopback port, as a DNS server has them.
pub async fn bind_pair() -> Result<(UdpSocket, TcpListener, SocketAddr)> {
    for _ in 0..20 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = udp.local_addr()?;
        // The TCP port of the same number may be taken by someone else; try another.
        if let Ok(tcp) = TcpListener::bind(addr).await {
            return Ok((udp, tcp, addr));
        }
    }
    bail!("no loopback port free for both UDP and TCP after 20 tries")
}

/// A mesh-dns server listening for one task.
pub struct Served {
    pub server: DnsServer,
    pub addr: SocketAddr,
    pub handle: ServeHandle,
}

pub async fn serve(server: &DnsServer, networks: &[&str]) -> Result<Served> {
    let (udp, tcp, addr) = bind_pair().await?;
    let handle = server.serve(udp, tcp, Scope::new(networks));
    Ok(Served {
        server: server.clone(),
        addr,
        handle,
    })
}

pub fn server_with(upstreams: Vec<SocketAddr>, upstream_timeout: Duration) -> DnsServer {
    DnsServer::new(Config {
        upstreams,
        upstream_timeout,
        ..Config::default()
    })
    .expect("a valid config")
}

// ---- the table ------------------------------------------------------------------------

pub fn task(name: &str, ip: [u8; 4]) -> Task {
    Task {
        name: name.into(),
        ip: Ipv4Addr::from(ip),
    }
}

pub fn tcp_port(target: u16, published: Option<u16>) -> Port {
    Port {
        protocol: Protocol::Tcp,
        published,
        target,
    }
}

/// Two networks as a small stack would have them:
/// - frontend: `web` (vip 10.0.1.2, three tasks, 80/tcp published on 8080), `api` (dnsrr,
///   two tasks, 9000/tcp), and a plain task `debug`;
/// - backend: `db` (vip 10.0.2.2, one task, 5432/tcp) and `web` again (its backend VIP
///   10.0.2.3, with its tasks' backend addresses).
pub fn stack() -> Snapshot {
    Snapshot {
        networks: vec![
            Network {
                name: "frontend".into(),
                services: vec![
                    Service {
                        name: "web".into(),
                        endpoint_mode: EndpointMode::Vip(Ipv4Addr::new(10, 0, 1, 2)),
                        tasks: vec![
                            task("web.1.aaa", [10, 0, 1, 11]),
                            task("web.2.bbb", [10, 0, 1, 12]),
                            task("web.3.ccc", [10, 0, 1, 13]),
                        ],
                        ports: vec![tcp_port(80, Some(8080))],
                    },
                    Service {
                        name: "api".into(),
                        endpoint_mode: EndpointMode::Dnsrr,
                        tasks: vec![
                            task("api.1.ddd", [10, 0, 1, 21]),
                            task("api.2.eee", [10, 0, 1, 22]),
                        ],
                        ports: vec![tcp_port(9000, None)],
                    },
                ],
                tasks: vec![task("debug", [10, 0, 1, 99])],
            },
            Network {
                name: "backend".into(),
                services: vec![
                    Service {
                        name: "db".into(),
                        endpoint_mode: EndpointMode::Vip(Ipv4Addr::new(10, 0, 2, 2)),
                        tasks: vec![task("db.1.fff", [10, 0, 2, 11])],
                        ports: vec![tcp_port(5432, None)],
                    },
                    Service {
                        name: "web".into(),
                        endpoint_mode: EndpointMode::Vip(Ipv4Addr::new(10, 0, 2, 3)),
                        tasks: vec![
                            task("web.1.aaa", [10, 0, 2, 21]),
                            task("web.2.bbb", [10, 0, 2, 22]),
                            task("web.3.ccc", [10, 0, 2, 23]),
                        ],
                        ports: vec![tcp_port(80, Some(8080))],
                    },
                ],
                tasks: vec![],
            },
        ],
    }
}

// ---- a raw DNS client -------------------------------------------------------------------

/// How the test client asks.
#[derive(Clone, Copy, Debug)]
pub struct Ask {
    pub tcp: bool,
    /// EDNS UDP payload size to advertise; `None` sends no OPT record.
    pub edns: Option<u16>,
    pub recursion_desired: bool,
}

impl Default for Ask {
    fn default() -> Self {
        Ask {
            tcp: false,
            edns: None,
            recursion_desired: true,
        }
    }
}

pub fn query_message(name: &str, rtype: RecordType, ask: Ask) -> Message {
    let mut message = Message::query();
    message.metadata.recursion_desired = ask.recursion_desired;
    let mut name = Name::from_ascii(name).expect("a valid name");
    // On the wire every name is absolute; the parsed echo must compare equal.
    name.set_fqdn(true);
    message.add_query(Query::query(name, rtype));
    if let Some(payload) = ask.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(payload);
        message.set_edns(edns);
    }
    message
}

/// Sends one query and returns the response, checking the id and question were echoed.
pub async fn ask(server: SocketAddr, name: &str, rtype: RecordType, ask: Ask) -> Result<Message> {
    let query = query_message(name, rtype, ask);
    let bytes = query.to_vec()?;
    let raw = if ask.tcp {
        exchange_tcp(server, &bytes).await?
    } else {
        exchange_udp(server, &bytes).await?
    };
    let response = Message::from_vec(&raw).context("response does not parse")?;
    if response.metadata.id != query.metadata.id {
        bail!(
            "response id {} does not echo query id {}",
            response.metadata.id,
            query.metadata.id
        );
    }
    if response.metadata.message_type != MessageType::Response {
        bail!("answer is not a response");
    }
    if response.queries != query.queries {
        bail!("question not echoed: {:?}", response.queries);
    }
    Ok(response)
}

pub async fn a(server: SocketAddr, name: &str) -> Result<Message> {
    ask(server, name, RecordType::A, Ask::default()).await
}

pub async fn exchange_udp(server: SocketAddr, query: &[u8]) -> Result<Vec<u8>> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 65535];
    let len = timeout(CLIENT_TIMEOUT, socket.recv(&mut buf))
        .await
        .context("no UDP answer in time")??;
    buf.truncate(len);
    Ok(buf)
}

pub async fn exchange_tcp(server: SocketAddr, query: &[u8]) -> Result<Vec<u8>> {
    timeout(CLIENT_TIMEOUT, async {
        let mut stream = TcpStream::connect(server).await?;
        let mut framed = (query.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(query);
        stream.write_all(&framed).await?;
        let len = stream.read_u16().await?;
        let mut buf = vec![0u8; usize::from(len)];
        stream.read_exact(&mut buf).await?;
        Ok(buf)
    })
    .await
    .context("no TCP answer in time")?
}

/// The IPv4 addresses in the answer section, in order.
pub fn ips(response: &Message) -> Vec<Ipv4Addr> {
    response
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(A(ip)) => Some(*ip),
            _ => None,
        })
        .collect()
}

pub fn sorted(mut ips: Vec<Ipv4Addr>) -> Vec<Ipv4Addr> {
    ips.sort();
    ips
}

pub fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("an IPv4 address")
}

// ---- upstream resolvers ------------------------------------------------------------------

/// A real DNS server on loopback standing in for a node's resolver. It is authoritative for
/// the whole namespace (so unknown names get NXDOMAIN, not REFUSED), holds a few names under
/// `example.test.`, and counts the queries it receives per transport.
pub struct Upstream {
    pub addr: SocketAddr,
    pub udp_queries: Arc<AtomicUsize>,
    pub tcp_queries: Arc<AtomicUsize>,
    _server: Server<Counting>,
}

impl Upstream {
    pub fn queries(&self) -> usize {
        self.udp_queries.load(Ordering::SeqCst) + self.tcp_queries.load(Ordering::SeqCst)
    }

    /// Serves `www.example.test` → 192.0.2.80 and `big.example.test` → 192.0.2.1..=BIG_SIZE.
    pub async fn zone() -> Result<Self> {
        Self::start(Behaviour::Zone).await
    }

    /// Answers every query with this response code and nothing else.
    pub async fn failing(code: ResponseCode) -> Result<Self> {
        Self::start(Behaviour::Fail(code)).await
    }

    /// Serves the zone over TCP but answers every UDP query truncated (TC, no records), like a
    /// server configured with a small UDP size.
    pub async fn truncating_udp() -> Result<Self> {
        Self::start(Behaviour::TruncateUdp).await
    }

    async fn start(behaviour: Behaviour) -> Result<Self> {
        let handler = Counting {
            behaviour,
            catalog: Arc::new(example_catalog()?),
            udp: Arc::new(AtomicUsize::new(0)),
            tcp: Arc::new(AtomicUsize::new(0)),
        };
        let (udp_queries, tcp_queries) = (handler.udp.clone(), handler.tcp.clone());
        let (udp, tcp, addr) = bind_pair().await?;
        let mut server = Server::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64 * 1024);
        Ok(Upstream {
            addr,
            udp_queries,
            tcp_queries,
            _server: server,
        })
    }
}

/// Number of A records of `big.example.test.`: about 1.6 kB of answers, more than a 512-byte
/// UDP response holds and less than a 4096-byte EDNS one.
pub const BIG_SIZE: u8 = 100;

fn example_catalog() -> Result<Catalog> {
    let origin = Name::root();
    let mut zone = InMemoryZoneHandler::<hickory_server::net::runtime::TokioRuntimeProvider>::empty(
        origin.clone(),
        ZoneType::Primary,
        AxfrPolicy::Deny,
    );
    let soa = SOA::new(
        Name::from_ascii("ns.example.test.")?,
        Name::from_ascii("admin.example.test.")?,
        1,
        3600,
        600,
        86400,
        30,
    );
    zone.upsert_mut(Record::from_rdata(origin.clone(), 30, RData::SOA(soa)), 1);
    let www = Name::from_ascii("www.example.test.")?;
    zone.upsert_mut(
        Record::from_rdata(www, 30, RData::A(A(Ipv4Addr::new(192, 0, 2, 80)))),
        1,
    );
    let big = Name::from_ascii("big.example.test.")?;
    for i in 1..=BIG_SIZE {
        zone.upsert_mut(
            Record::from_rdata(big.clone(), 30, RData::A(A(Ipv4Addr::new(192, 0, 2, i)))),
            1,
        );
    }
    let mut catalog = Catalog::new();
    catalog.upsert(origin.into(), vec![Arc::new(zone)]);
    Ok(catalog)
}

#[derive(Clone, Copy)]
enum Behaviour {
    Zone,
    Fail(ResponseCode),
    TruncateUdp,
}

struct Counting {
    behaviour: Behaviour,
    catalog: Arc<Catalog>,
    udp: Arc<AtomicUsize>,
    tcp: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl RequestHandler for Counting {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let over_udp = request.protocol() == NetProtocol::Udp;
        if over_udp {
            self.udp.fetch_add(1, Ordering::SeqCst);
        } else {
            self.tcp.fetch_add(1, Ordering::SeqCst);
        }
        let reply = |code: ResponseCode, truncated: bool| {
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = code;
            metadata.truncation = truncated;
            metadata.recursion_available = true;
            metadata
        };
        let metadata = match self.behaviour {
            Behaviour::Fail(code) => reply(code, false),
            Behaviour::TruncateUdp if over_udp => reply(ResponseCode::NoError, true),
            _ => {
                return self
                    .catalog
                    .handle_request::<R, T>(request, response_handle)
                    .await;
            }
        };
        let response =
            MessageResponseBuilder::new(&request.queries, None).build_no_records(metadata);
        response_handle
            .send_response(response)
            .await
            .expect("test upstream could not send its response")
    }
}

/// A loopback UDP port that swallows queries and never answers.
pub async fn silent_upstream() -> Result<(UdpSocket, SocketAddr)> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = socket.local_addr()?;
    Ok((socket, addr))
}

/// A loopback port with nothing behind it: queries to it are refused at once.
pub async fn dead_upstream() -> Result<SocketAddr> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = socket.local_addr()?;
    drop(socket);
    Ok(addr)
}
