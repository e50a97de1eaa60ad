//! `GET /metrics` in the Prometheus text format (0.0.4), on its own listen address
//! (`metrics_listen`): the routing mesh's counters per service and backend, drops by reason,
//! DNS answers, gossip datagrams, tasks and services as this node sees them, and how long a
//! kernel convergence pass takes.
//!
//! Most values live elsewhere (BPF maps, the DNS server's and gossip's atomics, the view),
//! so a scrape builds a fresh registry and fills it from them: nothing is mirrored, and a
//! counter is exactly what the kernel holds. Only the programming-latency histogram is
//! recorded here, by the agent's loop. Every metric is documented in the README; names
//! follow Prometheus conventions (`_total` counters, base units, snake_case labels).

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use anyhow::Context;
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    agent::{Agent, Local},
    lb::FlowTableStats,
};
use mesh_api::v1::{AuthReport, Counters, NodeInfo, ServiceStats, ServiceSummary, TaskCard};
use mesh_common::lb::{FLOW_REPLY, Reason};

type Labels = Vec<(&'static str, String)>;

/// Reasons that mean a packet or a connect was dropped, with the label they get.
fn drop_reason(r: Reason) -> Option<&'static str> {
    match r {
        Reason::NoBackend => Some("no_backend"),
        Reason::SnatExhausted => Some("snat_exhausted"),
        Reason::FlowTableFull => Some("flow_table_full"),
        Reason::RewriteFailed => Some("rewrite_failed"),
        Reason::SockNoBackend => Some("sock_no_backend"),
        Reason::TtlExceeded => Some("ttl_exceeded"),
        _ => None,
    }
}

fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c: Counter = Counter::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

fn counters(reg: &mut Registry, name: &str, help: &str, rows: Vec<(Labels, u64)>) {
    let f = Family::<Labels, Counter>::default();
    for (labels, v) in rows {
        f.get_or_create(&labels).inc_by(v);
    }
    reg.register(name, help, f);
}

fn gauges(reg: &mut Registry, name: &str, help: &str, rows: Vec<(Labels, i64)>) {
    let f = Family::<Labels, Gauge>::default();
    for (labels, v) in rows {
        f.get_or_create(&labels).inc_by(v);
    }
    reg.register(name, help, f);
}

/// Everything this node exposes, as text. Families appear in this order in every scrape
/// (the encoder keeps registration order): the routing mesh's, then DNS, gossip, the
/// cluster as this node sees it, and the programming latency.
pub async fn render(agent: &Agent) -> anyhow::Result<String> {
    let mut reg = Registry::default();
    let view = agent.view();
    let overview = crate::overview::overview(agent, &view);
    // Without a dataplane (a node that only gossips) there is nothing of the routing mesh
    // to report, not zeros.
    if let Some(local) = agent.local() {
        let sample = DataplaneSample::read(local).await?;
        register_flows(&mut reg, &sample);
        register_dataplane(&mut reg, &sample.reasons);
        register_services(&mut reg, &sample.stats);
    }
    register_dns(&mut reg, &agent.dns);
    register_gossip(&mut reg, agent.gossip.auth().map(|a| a.report()));
    register_origins(&mut reg, agent.gossip.origin_report());
    register_roles(&mut reg, agent.gossip.roles_report());
    counter(
        &mut reg,
        "mesh_secret_copies_refused",
        "Copies of secrets sealed to this node by an admin that did not open with its key.",
        agent
            .secret_copies_refused
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    let payloads = agent.gossip.payload_report();
    counter(
        &mut reg,
        "mesh_payloads_fetched",
        "Bodies of large values (secrets, configs over 16 KB) fetched from peers.",
        payloads.fetched,
    );
    counter(
        &mut reg,
        "mesh_payloads_fetch_failed",
        "Fetches of large values' bodies that got nothing (peer unreachable or not holding \
         it); each is retried later with backoff.",
        payloads.failed,
    );
    counter(
        &mut reg,
        "mesh_payloads_refused",
        "Bodies of large values a peer served that did not match their signed manifest's \
         size or sha256.",
        payloads.refused,
    );
    counter(
        &mut reg,
        "mesh_state_files_quarantined",
        "Damaged state files (gossip keys, task and CNI records) set aside as *.corrupt-<time> \
         since the agent started.",
        crate::state_files::quarantined(),
    );
    counters(
        &mut reg,
        "mesh_docker_api_refused",
        "Requests the Docker API socket refused (bad JSON, unsupported fields, version \
         conflicts, oversized bodies, unknown paths), by HTTP status code.",
        crate::docker::refused()
            .into_iter()
            .map(|(code, n)| (vec![("code", code.to_string())], n))
            .collect(),
    );
    register_nodes(&mut reg, &overview.nodes);
    register_tasks(&mut reg, &overview.tasks);
    register_replicas(&mut reg, &overview.services);
    reg.register(
        "mesh_programming_duration_seconds",
        "Time of one kernel convergence pass (links, FDB, load balancer, firewall).",
        agent.programming.histogram(),
    );
    encode(&reg)
}

fn encode(reg: &Registry) -> anyhow::Result<String> {
    let mut text = String::new();
    prometheus_text::encode(&mut text, reg).context("encoding metrics")?;
    Ok(text)
}

/// What the routing mesh's maps hold, read under one hold of the dataplane's lock so the
/// families of one scrape agree with each other.
struct DataplaneSample {
    reasons: Vec<(Reason, u64)>,
    stats: Vec<ServiceStats>,
    /// Flows in the flow table, replies not counted.
    active: usize,
    table: FlowTableStats,
}

impl DataplaneSample {
    async fn read(local: &Local) -> anyhow::Result<Self> {
        let dp = local.dataplane.lock().await;
        let lb = dp.lb();
        Ok(DataplaneSample {
            reasons: lb.reasons()?,
            stats: lb.stats()?,
            active: lb
                .flows()?
                .iter()
                .filter(|(_, f)| f.flags & FLOW_REPLY == 0)
                .count(),
            table: lb.flow_table()?,
        })
    }
}

/// The flow table: flows created, in it now, by table, and evicted.
fn register_flows(reg: &mut Registry, sample: &DataplaneSample) {
    let new_flows = sample
        .reasons
        .iter()
        .find(|(r, _)| *r == Reason::NewFlow)
        .map_or(0, |(_, n)| *n);
    counter(
        reg,
        "mesh_flows_created",
        "Routing-mesh flows created (new connections to a published port).",
        new_flows,
    );
    let table = &sample.table;
    for (name, help, n) in [
        (
            "mesh_flows_active",
            "Routing-mesh flows in the flow table (one per connection, replies not counted).",
            sample.active as u64,
        ),
        (
            "mesh_flows_established",
            "Routing-mesh flows whose client answered the backend (the established table).",
            table.established,
        ),
        (
            "mesh_flows_embryonic",
            "Routing-mesh flows still in their handshake (the embryonic table).",
            table.embryonic,
        ),
        (
            "mesh_snat_ports_reserved",
            "SNAT ports held for closed flows until the backend's TIME_WAIT is over.",
            table.snat_reserved,
        ),
    ] {
        let g: Gauge = Gauge::default();
        g.set(n as i64);
        reg.register(name, help, g);
    }
    counter(
        reg,
        "mesh_flows_embryonic_evicted",
        "Embryonic flows pushed out of the embryonic table when it was full (a flood's \
         work), estimated: created - established - swept - still embryonic.",
        table.embryonic_evicted,
    );
}

/// What the eBPF programs did with packets and socket calls, and what they dropped.
fn register_dataplane(reg: &mut Registry, reasons: &[(Reason, u64)]) {
    counters(
        reg,
        "mesh_dataplane_packets",
        "Packets and socket calls the eBPF programs handled, by what they did.",
        reasons
            .iter()
            .map(|(r, n)| (vec![("reason", r.name().to_owned())], *n))
            .collect(),
    );
    counters(
        reg,
        "mesh_dataplane_drops",
        "Packets and connects the eBPF programs dropped, by reason.",
        reasons
            .iter()
            .filter_map(|(r, n)| Some((vec![("reason", drop_reason(*r)?.to_owned())], *n)))
            .collect(),
    );
}

/// The load balancer's counters per service, then per backend (task address) of a service.
fn register_services(reg: &mut Registry, stats: &[ServiceStats]) {
    let per_service = |f: fn(&Counters) -> u64| {
        stats
            .iter()
            .map(|s| (vec![("service", s.name.clone())], f(&s.counters)))
            .collect::<Vec<_>>()
    };
    let per_backend = |f: fn(&Counters) -> u64| {
        stats
            .iter()
            .flat_map(|s| {
                s.backends.iter().map(|b| {
                    (
                        vec![("service", s.name.clone()), ("backend", b.ip.to_string())],
                        f(&b.counters),
                    )
                })
            })
            .collect::<Vec<_>>()
    };
    counters(
        reg,
        "mesh_service_flows",
        "Connections balanced to a service: routing-mesh flows plus balanced sockets.",
        per_service(|c| c.flows),
    );
    counters(
        reg,
        "mesh_service_packets",
        "Routing-mesh packets to a service (socket balancing sees no packets).",
        per_service(|c| c.packets),
    );
    counters(
        reg,
        "mesh_service_bytes",
        "Routing-mesh bytes to a service.",
        per_service(|c| c.bytes),
    );
    counters(
        reg,
        "mesh_service_drops",
        "Packets or connects to a service dropped because it had no active backend.",
        per_service(|c| c.dropped),
    );
    counters(
        reg,
        "mesh_backend_flows",
        "Connections balanced to one backend (task address) of a service.",
        per_backend(|c| c.flows),
    );
    counters(
        reg,
        "mesh_backend_packets",
        "Routing-mesh packets to one backend of a service.",
        per_backend(|c| c.packets),
    );
    counters(
        reg,
        "mesh_backend_bytes",
        "Routing-mesh bytes to one backend of a service.",
        per_backend(|c| c.bytes),
    );
}

/// This node's resolvers: answers by type and code, forwarding, and what they refused.
fn register_dns(reg: &mut Registry, dns: &mesh_dns::DnsServer) {
    counters(
        reg,
        "mesh_dns_queries",
        "DNS queries answered by this node's resolvers, by query type and response code.",
        dns.answers()
            .into_iter()
            .map(|a| (vec![("type", a.qtype), ("rcode", a.rcode)], a.count))
            .collect(),
    );
    let c = dns.counters();
    counter(
        reg,
        "mesh_dns_forwarded",
        "DNS queries for names outside the mesh, sent to the upstream resolvers.",
        c.forwarded,
    );
    counter(
        reg,
        "mesh_dns_upstream_failures",
        "Upstream resolver attempts that failed (timeout, unreachable, SERVFAIL, REFUSED).",
        c.upstream_failures,
    );
    counter(
        reg,
        "mesh_dns_malformed",
        "Messages to the resolvers dropped unanswered (not DNS, a response, not one question).",
        c.malformed,
    );
}

/// Whether gossip is sealed and, when it is, its datagrams (unsealed gossip counts none).
fn register_gossip(reg: &mut Registry, auth: Option<AuthReport>) {
    let g: Gauge = Gauge::default();
    g.set(i64::from(auth.is_some()));
    reg.register(
        "mesh_gossip_authenticated",
        "1 when gossip is sealed with a cluster key; the datagram counters exist only then.",
        g,
    );
    let Some(a) = auth else {
        return;
    };
    counter(
        reg,
        "mesh_gossip_datagrams_sent",
        "Gossip datagrams sealed and sent.",
        a.sent,
    );
    counter(
        reg,
        "mesh_gossip_datagrams_received",
        "Authentic gossip datagrams accepted.",
        a.received,
    );
    counters(
        reg,
        "mesh_gossip_datagrams_dropped",
        "Gossip datagrams dropped, by reason (see `meshctl gossip stats`).",
        a.dropped
            .into_iter()
            .map(|(r, n)| (vec![("reason", r)], n))
            .collect(),
    );
}

/// Gossip values and nodes refused for their origin (see `gossip::origin`).
fn register_origins(reg: &mut Registry, o: crate::gossip::origin::OriginReport) {
    counter(
        reg,
        "mesh_gossip_records_invalid",
        "Gossip values dropped before they reached the view: unsigned, or not signed by the \
         key of the node they are written under.",
        o.invalid_records,
    );
    counter(
        reg,
        "mesh_gossip_nodes_refused",
        "Runs of nodes refused for claiming a name bound to another node's key.",
        o.impostors,
    );
}

/// What roles refused (see `crate::roles`).
fn register_roles(reg: &mut Registry, r: crate::roles::RolesReport) {
    counter(
        reg,
        "mesh_gossip_grants_forged",
        "Role grants dropped: not signed by the cluster's admin key.",
        r.forged_grants,
    );
    counter(
        reg,
        "mesh_gossip_worker_objects_dropped",
        "Replicated objects (services, networks, secrets, ...) written by workers, dropped \
         before they reached the view: only admins write them.",
        r.worker_objects,
    );
}

fn register_nodes(reg: &mut Registry, nodes: &[NodeInfo]) {
    gauges(
        reg,
        "mesh_nodes",
        "Nodes this node knows, by status and availability.",
        count_by(nodes.iter().map(|n| {
            vec![
                ("status", format!("{:?}", n.status).to_ascii_lowercase()),
                (
                    "availability",
                    n.availability.to_string().to_ascii_lowercase(),
                ),
            ]
        })),
    );
}

fn register_tasks(reg: &mut Registry, tasks: &[TaskCard]) {
    gauges(
        reg,
        "mesh_tasks",
        "Current tasks of every service (no history), by service, node and state.",
        count_by(tasks.iter().map(|t| {
            vec![
                ("service", t.service.clone()),
                ("node", t.node.clone()),
                ("state", t.state.to_ascii_lowercase()),
            ]
        })),
    );
}

/// Per service: the tasks it wants, the slots running one, and its latest rollout's state.
fn register_replicas(reg: &mut Registry, services: &[ServiceSummary]) {
    gauges(
        reg,
        "mesh_service_replicas_desired",
        "Tasks a service wants (replicas, or eligible nodes in global mode).",
        services
            .iter()
            .filter_map(|s| Some((vec![("service", s.name.clone())], s.desired? as i64)))
            .collect(),
    );
    gauges(
        reg,
        "mesh_service_replicas_running",
        "Slots of a service with a running task.",
        services
            .iter()
            .map(|s| (vec![("service", s.name.clone())], s.running as i64))
            .collect(),
    );
    gauges(
        reg,
        "mesh_service_update_state",
        "1 for the state of a service's latest rollout (updating, paused, completed, rollback_started, rollback_paused, rollback_completed); absent if never updated.",
        services
            .iter()
            .filter_map(|s| {
                let u = s.update.as_ref()?;
                Some((
                    vec![("service", s.name.clone()), ("state", u.state.to_string())],
                    1,
                ))
            })
            .collect(),
    );
}

/// One sample per distinct label set, valued by how many times it occurs, in label order.
fn count_by(labels: impl Iterator<Item = Labels>) -> Vec<(Labels, i64)> {
    let mut counts: BTreeMap<Labels, i64> = BTreeMap::new();
    for l in labels {
        *counts.entry(l).or_default() += 1;
    }
    counts.into_iter().collect()
}

async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    match render(&agent).await {
        Ok(text) => (
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the counters failed: {e:#}\n"),
        )
            .into_response(),
    }
}

/// Binds `addr` now, so a taken port stops the agent at start with a clear message.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics_listen (--metrics-listen)"))
}

/// Serves `GET /metrics` (read-only) until the future is dropped.
pub async fn serve(listener: tokio::net::TcpListener, agent: Arc<Agent>) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(agent);
    crate::serving::serve(listener, app, crate::serving::Limits::READ_ONLY)
        .await
        .context("serving /metrics")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(register: impl FnOnce(&mut Registry)) -> String {
        let mut reg = Registry::default();
        register(&mut reg);
        encode(&reg).unwrap()
    }

    #[test]
    fn only_dropping_reasons_are_drops() {
        let t =
            text(|reg| register_dataplane(reg, &[(Reason::NewFlow, 3), (Reason::NoBackend, 2)]));
        assert!(
            t.contains("mesh_dataplane_packets_total{reason=\"new_flow\"} 3"),
            "{t}"
        );
        assert!(
            t.contains("mesh_dataplane_packets_total{reason=\"drop_no_backend\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("mesh_dataplane_drops_total{reason=\"no_backend\"} 2"),
            "{t}"
        );
        assert!(
            !t.contains("mesh_dataplane_drops_total{reason=\"new_flow\"}"),
            "{t}"
        );
    }

    #[test]
    fn unsealed_gossip_has_no_datagram_counters() {
        let t = text(|reg| register_gossip(reg, None));
        assert!(t.contains("mesh_gossip_authenticated 0"), "{t}");
        assert!(!t.contains("datagrams"), "{t}");
    }

    #[test]
    fn equal_label_sets_are_one_sample() {
        let l = |s: &str| vec![("state", s.to_owned())];
        assert_eq!(
            count_by([l("running"), l("failed"), l("running")].into_iter()),
            [(l("failed"), 1), (l("running"), 2)]
        );
    }
}
