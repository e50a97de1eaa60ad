//! Forwarding names we do not own to the node's upstream resolvers.
//!
//! The client's query goes out as it came (EDNS options, DO and CD bits included) under a
//! fresh random id, and the upstream's answer comes back verbatim with the client's id put
//! back, so negative answers keep their SOA and DNSSEC records survive. Upstreams are tried in
//! the configured order: one that times out, cannot be reached, sends garbage or answers
//! SERVFAIL/REFUSED is skipped for the next. A truncated UDP answer is asked again over TCP.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Header, Message, MessageType, Query, ResponseCode};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;
use tracing::debug;

use crate::answer::{self, Transport};
use crate::counters::Tally;

/// A query on its way to the upstreams.
#[derive(Debug)]
pub(crate) struct Forward {
    /// The client's query as received.
    pub(crate) raw: Vec<u8>,
    pub(crate) request: Message,
    pub(crate) transport: Transport,
    pub(crate) limit: usize,
    /// The listener's own upstreams (a task's `--dns`), instead of the node's.
    pub(crate) upstreams: Option<std::sync::Arc<[std::net::SocketAddr]>>,
}

/// Why one upstream did not give us an answer to relay.
#[derive(Debug)]
enum Failure {
    Timeout,
    Io(io::Error),
    Refused(ResponseCode),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout => write!(f, "no answer in time"),
            Failure::Io(error) => write!(f, "{error}"),
            Failure::Refused(code) => write!(f, "answered {code}"),
        }
    }
}

pub(crate) struct Upstreams {
    pub(crate) servers: Vec<SocketAddr>,
    pub(crate) timeout: Duration,
}

impl Upstreams {
    /// Resolves `forward` upstream; always returns the bytes to send to the client.
    pub(crate) async fn resolve(&self, forward: Forward, tally: &Tally) -> Vec<u8> {
        let Forward {
            mut raw,
            request,
            transport,
            limit,
            upstreams: _,
        } = forward;
        let question = &request.queries[0];
        // A truncated answer is better than SERVFAIL if no upstream does better over TCP.
        let mut truncated: Option<Vec<u8>> = None;

        for &server in &self.servers {
            let id: u16 = rand::random();
            raw[..2].copy_from_slice(&id.to_be_bytes());

            let mut result = match transport {
                Transport::Tcp => self.over_tcp(server, &raw, id, question).await,
                Transport::Udp => self.over_udp(server, &raw, id, question).await,
            };
            if transport == Transport::Udp && matches!(&result, Ok(r) if is_truncated(r)) {
                tally.tcp_fallback();
                if let Ok(r) = result {
                    truncated = Some(r);
                }
                result = self.over_tcp(server, &raw, id, question).await;
            }
            match result {
                Ok(response) => return relay(response, &request, limit),
                Err(failure) => {
                    tally.upstream_failure();
                    debug!(%server, %failure, query = %question, "upstream did not answer; trying the next");
                }
            }
        }

        match truncated {
            Some(response) => relay(response, &request, limit),
            None => {
                tally.unanswered();
                let response = answer::response_to(&request, ResponseCode::ServFail);
                answer::encode_within(response, limit).unwrap_or_default()
            }
        }
    }

    async fn over_udp(
        &self,
        server: SocketAddr,
        query: &[u8],
        id: u16,
        question: &Query,
    ) -> Result<Vec<u8>, Failure> {
        let exchange = async {
            let local: SocketAddr = if server.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            // A connected socket of our own: only `server` can answer it, and a closed port
            // comes back as ECONNREFUSED at once instead of a timeout.
            let socket = UdpSocket::bind(local).await.map_err(Failure::Io)?;
            socket.connect(server).await.map_err(Failure::Io)?;
            socket.send(query).await.map_err(Failure::Io)?;
            let mut buf = vec![0u8; usize::from(u16::MAX)];
            loop {
                let len = socket.recv(&mut buf).await.map_err(Failure::Io)?;
                // Stray or spoofed datagrams do not end the wait for the real answer.
                if let Some(outcome) = check(&buf[..len], id, question) {
                    return outcome.map(|()| buf[..len].to_vec());
                }
            }
        };
        timeout(self.timeout, exchange)
            .await
            .unwrap_or(Err(Failure::Timeout))
    }

    async fn over_tcp(
        &self,
        server: SocketAddr,
        query: &[u8],
        id: u16,
        question: &Query,
    ) -> Result<Vec<u8>, Failure> {
        let exchange = async {
            let mut stream = TcpStream::connect(server).await.map_err(Failure::Io)?;
            let len = u16::try_from(query.len()).map_err(|_| {
                Failure::Io(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "query longer than a TCP DNS message",
                ))
            })?;
            let mut framed = Vec::with_capacity(query.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(query);
            stream.write_all(&framed).await.map_err(Failure::Io)?;
            let len = stream.read_u16().await.map_err(Failure::Io)?;
            let mut response = vec![0u8; usize::from(len)];
            stream
                .read_exact(&mut response)
                .await
                .map_err(Failure::Io)?;
            match check(&response, id, question) {
                Some(outcome) => outcome.map(|()| response),
                None => Err(Failure::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "answer does not match the query",
                ))),
            }
        };
        timeout(self.timeout, exchange)
            .await
            .unwrap_or(Err(Failure::Timeout))
    }
}

/// Is `response` the answer to our query? `None` if it is not (wrong id, not a response,
/// another question, not DNS at all); `Some(Err)` if it is, but says the upstream will not
/// resolve it for us.
fn check(response: &[u8], id: u16, question: &Query) -> Option<Result<(), Failure>> {
    let mut decoder = BinDecoder::new(response);
    let header = Header::read(&mut decoder).ok()?;
    if header.metadata.id != id || header.metadata.message_type != MessageType::Response {
        return None;
    }
    let code = header.metadata.response_code;
    match header.counts.queries {
        1 => {
            let echoed = Query::read(&mut decoder).ok()?;
            if echoed.name() != question.name()
                || echoed.query_type() != question.query_type()
                || echoed.query_class() != question.query_class()
            {
                return None;
            }
        }
        // Some servers drop the question from error responses; an error with our id is
        // still theirs.
        0 if code != ResponseCode::NoError => {}
        _ => return None,
    }
    match code {
        ResponseCode::ServFail | ResponseCode::Refused => Some(Err(Failure::Refused(code))),
        _ => Some(Ok(())),
    }
}

fn is_truncated(response: &[u8]) -> bool {
    // TC is bit 1 of the third header byte; `check` already read the header.
    response.get(2).is_some_and(|flags| flags & 0x02 != 0)
}

/// The upstream's answer as the client must see it: its id, and no larger than it accepts.
fn relay(mut response: Vec<u8>, request: &Message, limit: usize) -> Vec<u8> {
    response[..2].copy_from_slice(&request.metadata.id.to_be_bytes());
    if response.len() <= limit {
        return response;
    }
    // Only after a TCP fallback for a UDP client can the answer outgrow what it accepts.
    let fitted = Message::from_vec(&response)
        .ok()
        .and_then(|parsed| answer::encode_within(parsed, limit));
    fitted.unwrap_or_else(|| {
        let mut cut = answer::response_to(request, ResponseCode::NoError);
        cut.metadata.truncation = true;
        answer::encode_within(cut, limit).unwrap_or_default()
    })
}
