//! Building responses: local answers from a [`Lookup`], error responses, and fitting a
//! response into what the client can receive.

use std::net::Ipv4Addr;

use hickory_proto::op::{Edns, Message, Metadata, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use rand::seq::SliceRandom;

use crate::snapshot::EndpointMode;
use crate::zone::{Lookup, ServiceZone};

/// The UDP payload size we advertise in our OPT record: the DNS flag day 2020 value, which
/// avoids IP fragmentation on any path.
const ADVERTISED_PAYLOAD: u16 = 1232;

/// Classic DNS over UDP: a client without EDNS accepts 512 bytes.
const CLASSIC_UDP_LIMIT: usize = 512;

/// The transport a query arrived on, which bounds the size of its response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    /// The largest response this client accepts on this transport.
    pub(crate) fn response_limit(self, request: &Message) -> usize {
        match self {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => request.edns.as_ref().map_or(CLASSIC_UDP_LIMIT, |edns| {
                usize::from(edns.max_payload()).max(CLASSIC_UDP_LIMIT)
            }),
        }
    }
}

/// An empty response to `request`: id, opcode, question, RD and CD echoed, RA set (we
/// recurse for the client by forwarding), and an OPT record if the client sent one.
pub(crate) fn response_to(request: &Message, code: ResponseCode) -> Message {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.recursion_available = true;
    metadata.response_code = code;
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata = metadata;
    response.queries = request.queries.clone();
    if let Some(theirs) = &request.edns {
        let mut ours = Edns::new();
        ours.set_max_payload(ADVERTISED_PAYLOAD);
        ours.set_dnssec_ok(theirs.flags().dnssec_ok);
        response.edns = Some(ours);
    }
    response
}

/// Answers `request` (one question, class IN) from what the zones found for its name, for a
/// client that accepts `limit` bytes.
pub(crate) fn local(request: &Message, lookup: &Lookup<'_>, ttl: u32, limit: usize) -> Message {
    let query = &request.queries[0];
    let owner = query.name();
    let qtype = query.query_type();
    let wants = |t: RecordType| qtype == t || qtype == RecordType::ANY;

    if matches!(lookup, Lookup::NoSuchName) {
        let mut response = response_to(request, ResponseCode::NXDomain);
        response.metadata.authoritative = true;
        return response;
    }

    let mut response = response_to(request, ResponseCode::NoError);
    response.metadata.authoritative = true;
    let a = |ip: Ipv4Addr| Record::from_rdata(owner.clone(), ttl, RData::A(A(ip)));

    match lookup {
        Lookup::Service(service) if wants(RecordType::A) => {
            response.answers = match service.endpoint_mode {
                EndpointMode::Vip(vip) => vec![a(vip)],
                EndpointMode::Dnsrr => shuffled_task_ips(service, limit)
                    .into_iter()
                    .map(a)
                    .collect(),
            };
        }
        Lookup::ServiceTasks(service) if wants(RecordType::A) => {
            response.answers = shuffled_task_ips(service, limit)
                .into_iter()
                .map(a)
                .collect();
        }
        Lookup::Task(task) if wants(RecordType::A) => {
            response.answers = task.ips.iter().copied().map(a).collect();
        }
        Lookup::Ptr(name) if wants(RecordType::PTR) => {
            response.answers = vec![Record::from_rdata(
                owner.clone(),
                ttl,
                RData::PTR(PTR((*name).clone())),
            )];
        }
        Lookup::Srv(service, ports) if wants(RecordType::SRV) => {
            let (answers, additionals) = srv_records(owner, service, ports, ttl);
            response.answers = answers;
            response.additionals = additionals;
        }
        // The name exists and has no records of this type (AAAA above all: we hand out IPv4
        // only). NOERROR with no answers tells the client so without an upstream round trip.
        _ => {}
    }
    response
}

/// A random selection of the service's task IPs in random order: all of them if they can fit
/// in `limit` bytes, else a random subset a little larger than what fits, so that a service
/// with thousands of tasks costs no more to answer than one that fills the packet.
fn shuffled_task_ips(service: &ServiceZone, limit: usize) -> Vec<Ipv4Addr> {
    let mut ips: Vec<Ipv4Addr> = service.tasks.iter().map(|t| t.ip).collect();
    let room = limit / A_RECORD_MIN_LEN + 1;
    let (picked, _) = ips.partial_shuffle(&mut rand::rng(), room);
    picked.to_vec()
}

/// An A record whose owner is a compression pointer: 2 + 2 + 2 + 4 + 2 + 4 bytes.
const A_RECORD_MIN_LEN: usize = 16;

/// SRV answers for `_<port>._<proto>.<service>` and the A records of their targets.
///
/// The SRV port is always the target port: inside the overlay a client reaches the service
/// on VIP:target (vip mode) or task:target (dnsrr), never on the published port, which only
/// exists on the nodes' underlay addresses.
fn srv_records(
    owner: &Name,
    service: &ServiceZone,
    ports: &[crate::snapshot::Port],
    ttl: u32,
) -> (Vec<Record>, Vec<Record>) {
    let mut targets: Vec<u16> = ports.iter().map(|p| p.target).collect();
    targets.sort_unstable();
    targets.dedup();

    let mut answers = Vec::new();
    let mut additionals = Vec::new();
    let glue = |name: &Name, ip: Ipv4Addr| Record::from_rdata(name.clone(), ttl, RData::A(A(ip)));
    match service.endpoint_mode {
        EndpointMode::Vip(vip) => {
            let Some(target) = &service.fqdn else {
                return (answers, additionals);
            };
            for port in &targets {
                let srv = SRV::new(0, 0, *port, target.clone());
                answers.push(Record::from_rdata(owner.clone(), ttl, RData::SRV(srv)));
            }
            additionals.push(glue(target, vip));
        }
        EndpointMode::Dnsrr => {
            let mut tasks = service.tasks.clone();
            tasks.shuffle(&mut rand::rng());
            for task in tasks {
                let Some(target) = &task.fqdn else { continue };
                for port in &targets {
                    // Equal weights: clients spread load across tasks (RFC 2782).
                    let srv = SRV::new(0, 1, *port, target.clone());
                    answers.push(Record::from_rdata(owner.clone(), ttl, RData::SRV(srv)));
                }
                additionals.push(glue(target, task.ip));
            }
        }
    }
    (answers, additionals)
}

/// Encodes `response` so that it fits in `limit` bytes.
///
/// A response that is too large loses its additional and authority records, then as many
/// answers as needed, and gets the TC bit: clients that can retry over TCP do, and those that
/// cannot still get a usable subset (the answers are already shuffled where that matters).
/// `None` only if even the header and question do not encode, which a parsed query can not
/// cause.
pub(crate) fn encode_within(mut response: Message, limit: usize) -> Option<Vec<u8>> {
    let full = response.to_vec().ok()?;
    if full.len() <= limit {
        return Some(full);
    }
    response.metadata.truncation = true;
    response.additionals.clear();
    response.authorities.clear();
    let answers = std::mem::take(&mut response.answers);
    let mut best = response.to_vec().ok()?;
    if best.len() > limit {
        // Header, question and OPT alone are over the limit: nothing useful fits.
        return None;
    }
    // Largest number of answers that fits; the encoded size grows with the count, so bisect.
    // Invariant: `fits` answers fit, more than `most` do not.
    let (mut fits, mut most) = (0, answers.len());
    while fits < most {
        let count = (fits + most).div_ceil(2);
        response.answers = answers[..count].to_vec();
        let bytes = response.to_vec().ok()?;
        if bytes.len() <= limit {
            fits = count;
            best = bytes;
        } else {
            most = count - 1;
        }
    }
    Some(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode, Query};

    fn request_for(name: &str) -> Message {
        let mut request = Message::query();
        request.metadata.recursion_desired = true;
        request.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        request
    }

    #[test]
    fn responses_echo_id_question_and_recursion_flags() {
        let request = request_for("web.");
        let response = response_to(&request, ResponseCode::NoError);
        assert_eq!(response.metadata.id, request.metadata.id);
        assert_eq!(response.metadata.message_type, MessageType::Response);
        assert_eq!(response.metadata.op_code, OpCode::Query);
        assert!(response.metadata.recursion_desired);
        assert!(response.metadata.recursion_available);
        assert_eq!(response.queries, request.queries);
        assert!(
            response.edns.is_none(),
            "no OPT for a client that sent none"
        );
    }

    #[test]
    fn oversized_answers_are_cut_to_fit_and_flagged() {
        let request = request_for("tasks.big.");
        let mut response = response_to(&request, ResponseCode::NoError);
        let owner = Name::from_ascii("tasks.big.").unwrap();
        for i in 0..200u8 {
            let ip = Ipv4Addr::new(10, 0, 1, i);
            response.add_answer(Record::from_rdata(owner.clone(), 2, RData::A(A(ip))));
        }
        let bytes = encode_within(response, 512).expect("a cut answer fits");
        assert!(bytes.len() <= 512);
        let cut = Message::from_vec(&bytes).unwrap();
        assert!(cut.metadata.truncation);
        assert!(!cut.answers.is_empty(), "as many answers as fit are kept");
        // One more answer would not have fitted: each compressed A record is 16 bytes.
        assert!(bytes.len() + 16 > 512);
    }

    #[test]
    fn small_answers_are_untouched() {
        let request = request_for("web.");
        let response = response_to(&request, ResponseCode::NoError);
        let bytes = encode_within(response.clone(), 512).unwrap();
        assert_eq!(bytes, response.to_vec().unwrap());
        assert!(!Message::from_vec(&bytes).unwrap().metadata.truncation);
    }
}
