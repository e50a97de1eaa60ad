//! The request path every listener of a server shares: one message in, what to do with it
//! out (drop it, send a reply, or forward it upstream), and the forward itself.

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Name};

use crate::answer::{self, Transport};
use crate::counters::Tally;
use crate::forward::{Forward, Upstreams};
use crate::zone::{Lookup, Zones};

/// The networks a listener answers for: those of the task it serves, in the order the task
/// joined them (the first network that knows a name answers it), and where the task's own
/// foreign names go when it named servers of its own (Docker's `--dns`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    networks: Arc<[String]>,
    upstreams: Option<Arc<[SocketAddr]>>,
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
            upstreams: None,
        }
    }

    /// Foreign names from this listener go to `servers` instead of the node's upstreams, as
    /// Docker's embedded resolver forwards to a container's `--dns` servers. Empty: the
    /// node's.
    pub fn with_upstreams(mut self, servers: Vec<SocketAddr>) -> Self {
        self.upstreams = (!servers.is_empty()).then(|| servers.into());
        self
    }

    /// The task's own upstreams, if it has any.
    pub fn upstreams(&self) -> Option<&[SocketAddr]> {
        self.upstreams.as_deref()
    }

    /// The networks, lowercased, without duplicates.
    pub fn networks(&self) -> &[String] {
        &self.networks
    }
}

/// What every listener of one server answers from.
pub(crate) struct Inner {
    pub(crate) zones: RwLock<Arc<Zones>>,
    pub(crate) upstreams: Upstreams,
    pub(crate) ttl: u32,
    pub(crate) tally: Tally,
}

/// What to do with one received message.
pub(crate) enum Decision {
    Drop,
    Reply(Vec<u8>),
    Forward(Forward),
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
        let response = match forward.upstreams.clone() {
            Some(servers) => {
                let own = Upstreams {
                    servers: servers.to_vec(),
                    timeout: self.upstreams.timeout,
                };
                own.resolve(forward, &self.tally).await
            }
            None => self.upstreams.resolve(forward, &self.tally).await,
        };
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
            upstreams: scope.upstreams.clone(),
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
