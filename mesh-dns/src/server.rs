//! The server object: configuration, the current snapshot, counters, and the request path
//! shared by every listener.

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Name};
use tokio::net::{TcpListener, UdpSocket};

use crate::answer::{self, Transport};
use crate::counters::{AnswerCount, Counters, Tally};
use crate::forward::{Forward, Upstreams};
use crate::listener::{self, ServeHandle};
use crate::snapshot::Snapshot;
use crate::zone::{Lookup, Zones};

/// TTL of the records we answer with, unless configured otherwise.
///
/// Clients resolve through a server on their own loopback, so a lookup costs microseconds and
/// caching buys nothing; what a cache costs is handing out a task that is gone. The agent
/// drops a dead task from the table within about a second, so with 2 s a client stops using it
/// within ~3 s, while a busy client still asks at most once per name every 2 s. (Swarm
/// answers with 600 s, which is how containers end up holding dead tasks.) Negative answers
/// carry no SOA, so clients do not cache them at all: a new service resolves at once.
pub const DEFAULT_TTL: Duration = Duration::from_secs(2);

/// How long one upstream gets to answer before the next is tried.
///
/// glibc gives up on a server after 5 s: at 2 s per upstream, a dead first upstream still
/// leaves time for the second one to answer before the client retries.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// How a node's DNS server behaves; one per node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Resolvers for names that are not ours, tried in this order. The agent takes them from
    /// its own configuration or the node's resolv.conf; mesh-dns never reads resolv.conf,
    /// which inside a task would name mesh-dns itself. Empty: foreign names get SERVFAIL.
    pub upstreams: Vec<SocketAddr>,
    /// Time one upstream has to answer (including a TCP retry after a truncated answer).
    pub upstream_timeout: Duration,
    /// TTL of our records, in whole seconds (see [`DEFAULT_TTL`]).
    pub ttl: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            upstreams: Vec::new(),
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            ttl: DEFAULT_TTL,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("upstream resolver {0} is not an address a query can be sent to")]
    UnusableUpstream(SocketAddr),
    #[error("the upstream timeout must be longer than zero")]
    ZeroUpstreamTimeout,
    #[error("a TTL of {0:?} does not fit in a DNS record (at most 2^32-1 seconds)")]
    TtlTooLong(Duration),
}

/// The networks a listener answers for: those of the task it serves, in the order the task
/// joined them (the first network that knows a name answers it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    networks: Arc<[String]>,
}

impl Scope {
    pub fn new<I, S>(networks: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list: Vec<String> = Vec::new();
        for network in networks {
            let network = network.as_ref().to_ascii_lowercase();
            if !list.contains(&network) {
                list.push(network);
            }
        }
        Scope {
            networks: list.into(),
        }
    }

    /// The networks, lowercased, without duplicates.
    pub fn networks(&self) -> &[String] {
        &self.networks
    }
}

/// One node's DNS server. Cheap to clone; every clone is the same server.
#[derive(Clone)]
pub struct DnsServer {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    zones: RwLock<Arc<Zones>>,
    upstreams: Upstreams,
    ttl: u32,
    pub(crate) tally: Tally,
}

/// What to do with one received message.
pub(crate) enum Decision {
    Drop,
    Reply(Vec<u8>),
    Forward(Forward),
}

impl DnsServer {
    /// A server with an empty snapshot: until [`update`](Self::update), every name is foreign.
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        if let Some(bad) = config
            .upstreams
            .iter()
            .find(|u| u.ip().is_unspecified() || u.port() == 0)
        {
            return Err(ConfigError::UnusableUpstream(*bad));
        }
        if config.upstream_timeout.is_zero() {
            return Err(ConfigError::ZeroUpstreamTimeout);
        }
        let ttl =
            u32::try_from(config.ttl.as_secs()).map_err(|_| ConfigError::TtlTooLong(config.ttl))?;
        Ok(DnsServer {
            inner: Arc::new(Inner {
                zones: RwLock::new(Arc::new(Zones::default())),
                upstreams: Upstreams {
                    servers: config.upstreams,
                    timeout: config.upstream_timeout,
                },
                ttl,
                tally: Tally::default(),
            }),
        })
    }

    /// Replaces what every listener answers from. Queries that arrive after this returns see
    /// the new snapshot; compiling it happens before the swap, off the query path.
    pub fn update(&self, snapshot: &Snapshot) {
        let zones = Arc::new(Zones::compile(snapshot));
        let old = std::mem::replace(
            &mut *self
                .inner
                .zones
                .write()
                .unwrap_or_else(PoisonError::into_inner),
            zones,
        );
        // Dropped here, after the lock is released.
        drop(old);
    }

    /// Serves DNS on sockets the caller bound (127.0.0.11:53 inside a task's network
    /// namespace, typically) for a task on `scope`'s networks. Must be called inside a tokio
    /// runtime. Serving stops when the returned handle is dropped.
    pub fn serve(&self, udp: UdpSocket, tcp: TcpListener, scope: Scope) -> ServeHandle {
        listener::spawn(self.inner.clone(), udp, tcp, scope)
    }

    /// Counters summed over every listener since the server was created.
    pub fn counters(&self) -> Counters {
        self.inner.tally.snapshot()
    }

    /// Answers sent since the server was created, by query type and response code.
    pub fn answers(&self) -> Vec<AnswerCount> {
        self.inner.tally.answers()
    }

    /// Answers one raw DNS message exactly as a listener on `scope` would: the bytes to send
    /// back, or `None` when the message is dropped as malformed.
    pub async fn answer(
        &self,
        scope: &Scope,
        query: &[u8],
        transport: Transport,
    ) -> Option<Vec<u8>> {
        self.inner.answer(scope, query, transport).await
    }
}

impl Inner {
    pub(crate) async fn answer(
        &self,
        scope: &Scope,
        query: &[u8],
        transport: Transport,
    ) -> Option<Vec<u8>> {
        match self.decide(scope, query, transport) {
            Decision::Drop => None,
            Decision::Reply(bytes) => Some(bytes),
            Decision::Forward(forward) => Some(self.forward(forward).await),
        }
    }

    pub(crate) async fn forward(&self, forward: Forward) -> Vec<u8> {
        let qtype = forward.request.queries[0].query_type();
        let response = self.upstreams.resolve(forward, &self.tally).await;
        // The relayed header's RCODE (the low 4 bits of byte 3): what the client sees.
        let rcode = response.get(3).map_or(2, |b| u16::from(b & 0x0f));
        self.tally.answered(qtype, rcode);
        response
    }

    /// Everything about a message that needs no network: parse it, answer it if the name is
    /// ours, or hand it to the upstreams. Synchronous, so listeners answer local names inline.
    pub(crate) fn decide(&self, scope: &Scope, query: &[u8], transport: Transport) -> Decision {
        let request = match Message::from_vec(query) {
            Ok(m) if m.metadata.message_type == MessageType::Query && m.queries.len() == 1 => m,
            // Not DNS, a response (reflection), or a question count resolvers never send.
            _ => {
                self.tally.malformed();
                return Decision::Drop;
            }
        };
        self.tally.query();
        let limit = transport.response_limit(&request);

        let code = if request.metadata.op_code != OpCode::Query {
            Some(ResponseCode::NotImp)
        } else if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            Some(ResponseCode::BADVERS)
        } else {
            None
        };
        if let Some(code) = code {
            return self.local(&request, answer::response_to(&request, code), limit);
        }

        let question = &request.queries[0];
        if question.query_class() == DNSClass::IN
            && let Some(key) = lookup_key(question.name())
        {
            let zones = self.zones.read().unwrap_or_else(PoisonError::into_inner);
            let lookup = zones.lookup(scope.networks(), &key);
            if !matches!(lookup, Lookup::Foreign) {
                let response = answer::local(&request, &lookup, self.ttl, limit);
                drop(zones);
                return self.local(&request, response, limit);
            }
        }

        self.tally.forwarded();
        Decision::Forward(Forward {
            raw: query.to_vec(),
            request,
            transport,
            limit,
        })
    }

    fn local(&self, request: &Message, response: Message, limit: usize) -> Decision {
        self.tally.answered_locally();
        let rcode = u16::from(response.metadata.response_code);
        match answer::encode_within(response, limit) {
            Some(bytes) => {
                self.tally.answered(request.queries[0].query_type(), rcode);
                Decision::Reply(bytes)
            }
            None => Decision::Drop,
        }
    }
}

/// The question name as our maps key it: lowercase labels joined by dots, no trailing dot.
/// `None` for names no snapshot name can match (a label with a dot or non-ASCII in it).
fn lookup_key(name: &Name) -> Option<String> {
    let mut key = String::with_capacity(64);
    for label in name.iter() {
        if !label.is_ascii() || label.contains(&b'.') {
            return None;
        }
        if !key.is_empty() {
            key.push('.');
        }
        key.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
    }
    Some(key)
}
