//! The server object: configuration, the current snapshot and counters. It spawns the
//! listeners and hands each the request path (`request`) they share.

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};

use crate::answer::Transport;
use crate::counters::{AnswerCount, Counters, Tally};
use crate::forward::Upstreams;
use crate::listener::{self, ServeHandle};
use crate::request::{Inner, Scope};
use crate::snapshot::Snapshot;
use crate::zone::Zones;

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

/// One node's DNS server. Cheap to clone; every clone is the same server.
#[derive(Clone)]
pub struct DnsServer {
    inner: Arc<Inner>,
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
