//! Gossip at scale in one process: N nodes running the agent's real gossip code
//! (`mesh_agent::gossip::Gossip` over chitchat 0.13: signed records, chunking, origin checks
//! on snapshot) and the real view merge (`cluster::View::compute`), over a simulated network
//! with latency, loss and partitions, on tokio's paused clock.
//!
//! Sizes: 100 nodes × 30 tasks on a LAN, a lossy WAN and through a partition by default;
//! others with `MESH_SIM_NODES=200,500` (`MESH_SIM_TASKS`, `MESH_SIM_SERVICES`,
//! `MESH_SIM_CHANGES`). 1,000 gossiping nodes do not fit one 2-core machine: a round costs
//! each node a few µs per known peer (~70–100 CPU-seconds per virtual second at 1,000), and
//! chitchat's failure detector preallocates its sample window per peer (8 KB with the 1,000
//! samples the agent configured until this bench measured it, 8 GB for 1,000 nodes; 0.8 KB
//! now). So one worker's snapshot and view of 1,000 (or, with
//! `MESH_SIM_VIEW=1000,5000`, 5,000) nodes × 30 tasks is measured without gossip, and what
//! grows with N on the wire is read off the largest run.
//!
//! What is simulated: the wire. Messages go through chitchat's own in-process transport
//! (`ChannelTransport`): each is encoded by chitchat's serializer and decoded again (the
//! codec's real cost and size), and one larger than a sealed datagram's payload
//! (`auth::MAX_DATAGRAM - auth::OVERHEAD`) is refused, as the sealed transport refuses it.
//! Loss, partitions and latency are applied where a datagram arrives; the sealed
//! transport's header and tag (`auth::OVERHEAD`) are added to every datagram's size, but
//! the encryption itself is not run (nor `validate`'s pre-checks).
//!
//! Time is virtual: timers (chitchat's gossip interval, its failure detector, the
//! network's latency) advance only when every node is idle, so the times measured are what
//! the protocol takes, not what this machine's 2 cores take to run N nodes; the CPU they
//! cost is measured beside them.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::{BTreeMap, HashSet},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicIsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use async_trait::async_trait;
use chitchat::{
    ChitchatEnvelope, ChitchatId, ChitchatMessage,
    transport::{ChannelTransport, RecvOutcome, SendOutcome, Socket, Transport},
};
use mesh_agent::{
    cluster::{
        AttachmentRecord, BlockClaim, EndpointRecord, NetworkSpec, NodeRecord, Replicated,
        Snapshot, SnapshotNode, View, key, mac_for_ip,
    },
    gossip::{Gossip, GossipConfig, auth, origin::Origins, signed},
    identity::NodeIdentity,
};
use mesh_api::{
    id::Stamp,
    spec::{EndpointState, ServiceSpec, TaskTemplate},
};

use super::report::{Report, Table, percentile_sorted};

/// Live heap bytes of the whole process: what a node's state costs is the growth while
/// nodes converge, divided by N (and a view's, the growth while one is computed and held).
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only a counter is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn heap() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const SERVICES: usize = 1_000;
/// Nodes that publish the replicated objects (services, the network): a cluster with roles,
/// where workers keep their copies out of gossip.
const ADMINS: usize = 3;
const INTERVAL: Duration = Duration::from_millis(100);
const POLL: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, Debug)]
struct Scenario {
    nodes: usize,
    tasks: usize,
    latency: Duration,
    jitter: Duration,
    loss: f64,
    /// Changes are written while the cluster is cut in two halves for this long; the clock
    /// for their arrival starts when it heals.
    partition: Option<Duration>,
    changes: usize,
    /// Services published by the admins (each admin gossips its copy of every one).
    services: usize,
}

impl Scenario {
    fn network(&self) -> String {
        let mut s = format!(
            "{} ms ± {} ms, {:.0}% loss",
            self.latency.as_millis(),
            self.jitter.as_millis(),
            self.loss * 100.0
        );
        if let Some(p) = self.partition {
            s.push_str(&format!(", halves cut {} s", p.as_secs()));
        }
        s
    }
}

struct Point {
    s: Scenario,
    formed: Option<Duration>,
    /// Per change: virtual time until every node had it (None: not within the limit).
    reach_all: Vec<Option<Duration>>,
    /// Every node's arrival time of every change, ms.
    arrivals: Vec<f64>,
    idle_bps: f64,
    change_bytes: f64,
    heap_per_node: f64,
    cpu_us_per_round: f64,
    real_per_virtual: f64,
    wire: Wire,
    view: Option<ViewCost>,
    /// Keys and (signed) values one node's chitchat holds, bytes: what the heap per node is
    /// compared with.
    payload: usize,
}

#[derive(Clone, Copy, Debug, Default)]
struct Wire {
    bytes: u64,
    datagrams: u64,
    oversize: u64,
    lost: u64,
    max_syn: usize,
    max_syn_ack: usize,
    max_ack: usize,
}

struct ViewCost {
    first_ms: f64,
    caches: isize,
    view: isize,
    snapshot: isize,
    again_ms: f64,
    entries: usize,
}

pub fn run(quick: bool) -> Result<Report> {
    let scenarios = scenarios(quick)?;
    let mut report = Report::new("Gossip simulation: N nodes' real gossip and view in one process");
    report.ran(format!(
        "mesh_agent::gossip::Gossip (chitchat 0.13, signed records) × N on one tokio \
         current-thread runtime with the paused clock; gossip interval {} ms, phi 8; \
         services (Replicated<ServiceSpec>, {SERVICES} unless the table says otherwise) \
         published by {ADMINS} admin nodes; every node a node record, T task records (mesh_planner::Task) and T endpoints, one \
         attachment and one block claim; a change is a rewrite of one task record at a random \
         node; sealed-transport overhead ({} B) added per datagram, datagrams over {} B \
         refused",
        INTERVAL.as_millis(),
        auth::OVERHEAD,
        auth::MAX_DATAGRAM
    ));
    let mut points = Vec::new();
    for s in scenarios {
        eprintln!("==> {} nodes × {} tasks, {}", s.nodes, s.tasks, s.network());
        let started = Instant::now();
        let p = simulate(s)?;
        eprintln!("    done in {:.0} s", started.elapsed().as_secs_f64());
        points.push(p);
    }
    report.tables.push(propagation_table(&points));
    report.tables.push(cost_table(&points));
    report.tables.push(view_table(&points));
    let mut scale = Vec::new();
    for (nodes, tasks) in view_sizes()? {
        eprintln!("==> one node's view of {nodes} nodes × {tasks} tasks");
        scale.push(view_at_scale(nodes, tasks));
    }
    report.tables.push(scale_table(&scale));
    notes(&mut report, &points);
    Ok(report)
}

/// N = 100 on three networks, 1,000 on a LAN; `MESH_SIM_NODES=100,1000,5000` (and
/// `MESH_SIM_TASKS`) pick others.
fn scenarios(quick: bool) -> Result<Vec<Scenario>> {
    let lan = |nodes, tasks| Scenario {
        nodes,
        tasks,
        latency: Duration::from_millis(1),
        jitter: Duration::from_millis(1),
        loss: 0.0,
        partition: None,
        changes: if quick { 3 } else { 5 },
        services: SERVICES,
    };
    if let Ok(list) = std::env::var("MESH_SIM_NODES") {
        let tasks = env_number("MESH_SIM_TASKS")?.unwrap_or(30);
        let services = env_number("MESH_SIM_SERVICES")?.unwrap_or(SERVICES);
        let changes = env_number("MESH_SIM_CHANGES")?;
        return list
            .split(',')
            .map(|n| {
                let mut s = lan(n.trim().parse().context("MESH_SIM_NODES")?, tasks);
                s.services = services;
                s.changes = changes.unwrap_or(s.changes);
                Ok(s)
            })
            .collect();
    }
    let wan = Scenario {
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(10),
        loss: 0.05,
        ..lan(100, 30)
    };
    let cut = Scenario {
        partition: Some(Duration::from_secs(5)),
        changes: 2,
        ..lan(100, 30)
    };
    Ok(vec![lan(100, 30), wan, cut])
}

/// The sizes of the one-node view measurement: 1,000 nodes × 30 tasks, or
/// `MESH_SIM_VIEW=1000,5000`.
fn view_sizes() -> Result<Vec<(usize, usize)>> {
    let list = std::env::var("MESH_SIM_VIEW").unwrap_or_else(|_| "1000".into());
    list.split(',')
        .map(|n| Ok((n.trim().parse().context("MESH_SIM_VIEW")?, 30)))
        .collect()
}

fn env_number(name: &str) -> Result<Option<usize>> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().parse::<usize>())
        .transpose()
        .with_context(|| format!("{name} is not a number"))
}

/// The simulated wire between every node's socket.
#[derive(Default)]
struct Net {
    inner: Mutex<NetInner>,
}

#[derive(Default)]
struct NetInner {
    rng: u64,
    latency: Duration,
    jitter: Duration,
    loss: f64,
    /// One side of a partition: datagrams between it and the rest are lost.
    cut: Option<HashSet<SocketAddr>>,
    wire: Wire,
}

impl NetInner {
    fn random(&mut self) -> f64 {
        // splitmix64: enough for loss and jitter, and the same run every time.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Net {
    fn sent(&self, kind: Kind, len: usize) {
        let mut n = self.inner.lock().expect("net lock");
        n.wire.bytes += len as u64;
        n.wire.datagrams += 1;
        let max = match kind {
            Kind::Syn => &mut n.wire.max_syn,
            Kind::SynAck => &mut n.wire.max_syn_ack,
            Kind::Ack => &mut n.wire.max_ack,
        };
        *max = (*max).max(len);
    }

    fn refused(&self) {
        self.inner.lock().expect("net lock").wire.oversize += 1;
    }

    /// Whether a datagram from `from` reaches `to`, and after how long.
    fn fate(&self, from: SocketAddr, to: SocketAddr) -> Option<Duration> {
        let mut n = self.inner.lock().expect("net lock");
        let crosses = n
            .cut
            .as_ref()
            .is_some_and(|side| side.contains(&from) != side.contains(&to));
        if crosses || n.random() < n.loss {
            n.wire.lost += 1;
            return None;
        }
        Some(n.latency + n.jitter.mul_f64(n.random()))
    }

    fn wire(&self) -> Wire {
        self.inner.lock().expect("net lock").wire
    }
}

/// chitchat's own in-process transport (it encodes and decodes every message with
/// chitchat's serializer and refuses one larger than its MTU) under the simulated wire:
/// loss, partitions and latency are applied where a datagram arrives.
struct SimTransport {
    net: Arc<Net>,
    channels: ChannelTransport,
}

#[async_trait]
impl Transport for SimTransport {
    async fn open(&self, listen: SocketAddr) -> Result<Box<dyn Socket>> {
        Ok(Box::new(SimSocket {
            addr: listen,
            net: self.net.clone(),
            inner: self.channels.open(listen).await?,
            waiting: BTreeMap::new(),
            seq: 0,
        }))
    }
}

struct SimSocket {
    addr: SocketAddr,
    net: Arc<Net>,
    inner: Box<dyn Socket>,
    /// Datagrams on their way, by arrival time.
    waiting: BTreeMap<(tokio::time::Instant, u64), RecvOutcome>,
    seq: u64,
}

#[async_trait]
impl Socket for SimSocket {
    fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.addr)
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> Result<SendOutcome> {
        let kind = Kind::of(&envelope.message);
        match self.inner.send(to, envelope).await {
            Ok(sent) => {
                let len = sent.num_bytes_sent + auth::OVERHEAD;
                self.net.sent(kind, len);
                Ok(SendOutcome {
                    num_bytes_sent: len,
                })
            }
            Err(e) => {
                self.net.refused();
                Err(e)
            }
        }
    }

    /// Cancel-safe, as chitchat needs: what has arrived waits in `waiting`.
    async fn recv(&mut self) -> Result<RecvOutcome> {
        loop {
            let next = self.waiting.keys().next().map(|(at, _)| *at);
            tokio::select! {
                arrived = self.inner.recv() => {
                    let arrived = arrived?;
                    if let Some(delay) = self.net.fate(arrived.from_addr, self.addr) {
                        self.seq += 1;
                        let at = tokio::time::Instant::now() + delay;
                        self.waiting.insert((at, self.seq), arrived);
                    }
                }
                _ = tokio::time::sleep_until(next.unwrap_or_else(tokio::time::Instant::now)),
                    if next.is_some() => {
                    if let Some((_, d)) = self.waiting.pop_first() {
                        return Ok(d);
                    }
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Syn,
    SynAck,
    Ack,
}

impl Kind {
    fn of(m: &ChitchatMessage) -> Self {
        match m {
            ChitchatMessage::Syn { .. } => Self::Syn,
            ChitchatMessage::SynAck { .. } => Self::SynAck,
            _ => Self::Ack,
        }
    }
}

struct Node {
    id: ChitchatId,
    gossip: Gossip,
}

fn simulate(s: Scenario) -> Result<Point> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()?;
    rt.block_on(simulate_on(s))
}

async fn simulate_on(s: Scenario) -> Result<Point> {
    let net = Arc::new(Net::default());
    {
        let mut n = net.inner.lock().expect("net lock");
        n.latency = s.latency;
        n.jitter = s.jitter;
        n.loss = s.loss;
        n.rng = 42;
    }
    let transport = SimTransport {
        net: net.clone(),
        channels: ChannelTransport::with_mtu(auth::MAX_DATAGRAM - auth::OVERHEAD),
    };
    let heap_before = heap();
    let now_ms = mesh_api::id::now_ms();
    let services = services(s, now_ms);
    let real_start = Instant::now();
    let seeds: Vec<String> = (0..ADMINS.min(s.nodes))
        .map(|i| address(i).to_string())
        .collect();
    let mut nodes = Vec::with_capacity(s.nodes);
    for i in 0..s.nodes {
        let identity = Arc::new(NodeIdentity::from_seed(&seed(i)));
        let mut initial = own_records(i, s, &identity, now_ms);
        if i < ADMINS {
            initial.extend(services.iter().cloned());
        }
        let config = GossipConfig {
            node: name(i),
            cluster: "sim".into(),
            listen: address(i),
            advertise: address(i),
            seeds: seeds
                .iter()
                .filter(|a| **a != address(i).to_string())
                .cloned()
                .collect(),
            interval: INTERVAL,
            phi_threshold: 8.0,
            dead_node_grace: Duration::from_secs(3600),
            tombstone_grace: Duration::from_secs(3600),
            // The simulation has no node-to-node channel: large values (none here) stay in gossip.
            carry_payloads: false,
        };
        let gossip = Gossip::start(&config, identity, None, None, initial, &transport).await?;
        let id = ChitchatId::new(name(i), gossip.generation(), address(i));
        nodes.push(Node { id, gossip });
    }
    let targets = own_versions(&nodes).await;
    let formed_limit = Duration::from_secs(if s.nodes >= 1_000 { 300 } else { 120 });
    let t0 = tokio::time::Instant::now();
    let mut pending: Vec<usize> = (0..nodes.len()).collect();
    let mut formed = None;
    while t0.elapsed() < formed_limit {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut still = Vec::new();
        for &j in &pending {
            if !has_all(&nodes[j], &targets).await {
                still.push(j);
            }
        }
        pending = still;
        if pending.is_empty() {
            formed = Some(t0.elapsed());
            break;
        }
        if t0.elapsed().as_millis().is_multiple_of(5_000) {
            eprintln!(
                "    {:.0} s virtual ({:.0} s real): {} of {} nodes hold everything",
                t0.elapsed().as_secs_f64(),
                real_start.elapsed().as_secs_f64(),
                s.nodes - pending.len(),
                s.nodes
            );
        }
    }
    eprintln!(
        "    formed: {:?} ({} of {} nodes hold everything)",
        formed,
        s.nodes - pending.len(),
        s.nodes
    );
    // Let the catch-up traffic drain before idle is measured.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let idle_window = Duration::from_secs(if s.nodes >= 500 { 2 } else { 3 });
    let wire0 = net.wire();
    let cpu0 = cpu_seconds();
    let real0 = Instant::now();
    tokio::time::sleep(idle_window).await;
    let wire1 = net.wire();
    let idle_cpu = cpu_seconds() - cpu0;
    let real = real0.elapsed().as_secs_f64();
    let idle_bps = (wire1.bytes - wire0.bytes) as f64 / idle_window.as_secs_f64() / s.nodes as f64;
    let rounds = idle_window.as_secs_f64() / INTERVAL.as_secs_f64();
    let cpu_us_per_round = idle_cpu * 1e6 / rounds / s.nodes as f64;
    let heap_per_node = (heap() - heap_before) as f64 / s.nodes as f64;

    // A non-admin node's view: what every worker computes on each change.
    let observer = nodes.len() - 1;
    let payload = payload(&nodes[observer]).await;
    let view = if formed.is_some() {
        Some(view_cost(&nodes[observer].gossip).await)
    } else {
        None
    };

    let mut reach_all = Vec::new();
    let mut arrivals = Vec::new();
    let mut change_bytes = Vec::new();
    let mut rng = 7u64;
    for c in 0..s.changes {
        rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let writer = (rng >> 33) as usize % s.nodes;
        let half: HashSet<SocketAddr> = (0..s.nodes / 2).map(address).collect();
        if s.partition.is_some() {
            net.inner.lock().expect("net lock").cut = Some(half);
        }
        let version = change(&nodes[writer], writer, c, s).await;
        if let Some(p) = s.partition {
            tokio::time::sleep(p).await;
            net.inner.lock().expect("net lock").cut = None;
        }
        let bytes0 = net.wire().bytes;
        let t0 = tokio::time::Instant::now();
        let limit = Duration::from_secs(30);
        let mut pending: Vec<usize> = (0..s.nodes).collect();
        while !pending.is_empty() && t0.elapsed() < limit {
            let mut still = Vec::new();
            for &j in &pending {
                if seen(&nodes[j], &nodes[writer].id, version).await {
                    arrivals.push(t0.elapsed().as_secs_f64() * 1000.0);
                } else {
                    still.push(j);
                }
            }
            pending = still;
            if !pending.is_empty() {
                tokio::time::sleep(POLL).await;
            }
        }
        let took = t0.elapsed();
        eprintln!(
            "    change {c}: {} of {} nodes in {} ms",
            s.nodes - pending.len(),
            s.nodes,
            took.as_millis()
        );
        reach_all.push(pending.is_empty().then_some(took));
        let bytes = (net.wire().bytes - bytes0) as f64;
        change_bytes.push(
            (bytes - idle_bps * s.nodes as f64 * took.as_secs_f64()).max(0.0) / s.nodes as f64,
        );
        // Apart, so that one change's traffic is not the next one's.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let real_per_virtual = real / idle_window.as_secs_f64();
    let wire = net.wire();
    for n in nodes {
        let _ = n.gossip.shutdown().await;
    }
    change_bytes.sort_by(f64::total_cmp);
    Ok(Point {
        s,
        formed,
        reach_all,
        arrivals,
        idle_bps,
        change_bytes: change_bytes
            .get(change_bytes.len() / 2)
            .copied()
            .unwrap_or(0.0),
        heap_per_node,
        cpu_us_per_round,
        real_per_virtual,
        wire,
        view,
        payload,
    })
}

async fn payload(node: &Node) -> usize {
    let cc = node.gossip.chitchat();
    let cc = cc.lock().await;
    cc.node_states()
        .values()
        .flat_map(|s| s.key_values())
        .map(|(k, v)| k.len() + v.len())
        .sum()
}

/// Each node's newest version of its own keys: what every node must hold to have it all.
async fn own_versions(nodes: &[Node]) -> Vec<(ChitchatId, u64)> {
    let mut v = Vec::with_capacity(nodes.len());
    for n in nodes {
        let cc = n.gossip.chitchat();
        let mut cc = cc.lock().await;
        v.push((n.id.clone(), cc.self_node_state().max_version()));
    }
    v
}

async fn has_all(node: &Node, targets: &[(ChitchatId, u64)]) -> bool {
    let cc = node.gossip.chitchat();
    let cc = cc.lock().await;
    targets.iter().all(|(id, version)| {
        cc.node_state(id)
            .is_some_and(|s| s.max_version() >= *version)
    })
}

async fn seen(node: &Node, writer: &ChitchatId, version: u64) -> bool {
    let cc = node.gossip.chitchat();
    let cc = cc.lock().await;
    cc.node_state(writer)
        .is_some_and(|s| s.max_version() >= version)
}

/// Rewrites one of `writer`'s task records (its state moves on) through the agent's own
/// write path; the version every node must reach.
async fn change(node: &Node, writer: usize, c: usize, s: Scenario) -> u64 {
    let mut t = task(writer, 0, s, 0);
    t.since_ms += 1 + c as u64;
    t.attempt = 1 + c as u32;
    t.state = mesh_planner::TaskState::Running;
    let json = serde_json::to_string(&t).expect("plain struct");
    node.gossip
        .write([(format!("{}{}", key::TASK, t.id), Some(json))])
        .await;
    let cc = node.gossip.chitchat();
    let mut cc = cc.lock().await;
    cc.self_node_state().max_version()
}

/// What taking a snapshot and computing the view costs one node: the first time (every
/// signature checked), and again after one more change (the verdict cache at work).
async fn view_cost(gossip: &Gossip) -> ViewCost {
    let h0 = heap();
    let started = Instant::now();
    let snapshot = gossip.snapshot().await;
    let h1 = heap();
    let view = View::compute(&snapshot);
    let first_ms = started.elapsed().as_secs_f64() * 1000.0;
    let h2 = heap();
    let entries: usize = snapshot
        .nodes
        .iter()
        .map(|n: &SnapshotNode| n.kv.len())
        .sum();
    drop(snapshot);
    let h3 = heap();
    let view_bytes = h2 - h1;
    let started = Instant::now();
    let again = gossip.snapshot().await;
    let again_view = View::compute(&again);
    let again_ms = started.elapsed().as_secs_f64() * 1000.0;
    drop((again, again_view));
    drop(view);
    ViewCost {
        first_ms,
        snapshot: h2 - h3,
        view: view_bytes,
        caches: h3 - h0 - view_bytes,
        again_ms,
        entries,
    }
}

struct ScaleView {
    nodes: usize,
    /// Nodes whose records verified (all of them, or the signing here has drifted from
    /// what `Gossip` writes).
    accepted: usize,
    tasks: usize,
    keys: usize,
    signed_bytes: usize,
    verify_ms: f64,
    compute_ms: f64,
    recompute_ms: f64,
    snapshot: isize,
    view: isize,
}

/// One worker's snapshot and view of a cluster too large to run here as N gossiping nodes:
/// every node's records signed as `Gossip` signs them, verified as a snapshot verifies them
/// (`origin::Origins`, every signature checked), then `View::compute`. No gossip: what it
/// measures is what a node holds and computes once gossip has delivered everything.
fn view_at_scale(nodes: usize, tasks: usize) -> ScaleView {
    let s = Scenario {
        nodes,
        tasks,
        latency: Duration::ZERO,
        jitter: Duration::ZERO,
        loss: 0.0,
        partition: None,
        changes: 0,
        services: SERVICES,
    };
    let now_ms = mesh_api::id::now_ms();
    let services = services(s, now_ms);
    let generation = 1;
    let mut signed_nodes = Vec::with_capacity(nodes);
    let mut signed_bytes = 0;
    for i in 0..nodes {
        let identity = NodeIdentity::from_seed(&seed(i));
        let mut kv = own_records(i, s, &identity, now_ms);
        if i < ADMINS {
            kv.extend(services.iter().cloned());
        }
        // Versions as chitchat gives a run's first writes: 1, 2, … in order.
        let kv: BTreeMap<String, (u64, String)> = kv
            .into_iter()
            .enumerate()
            .map(|(n, (k, v))| {
                let version = n as u64 + 1;
                let sealed = signed::seal(&identity, &name(i), generation, &k, version, &v);
                (k, (version, sealed))
            })
            .collect();
        signed_bytes += kv
            .iter()
            .map(|(k, (_, v))| k.len() + v.len())
            .sum::<usize>();
        signed_nodes.push((name(i), kv));
    }
    let keys = signed_nodes.iter().map(|(_, kv)| kv.len()).sum();
    let observer = NodeIdentity::from_seed(&seed(nodes - 1));
    let mut origins = Origins::new(None, (&name(nodes - 1), observer.public(), generation));
    let h0 = heap();
    let started = Instant::now();
    let snapshot = Snapshot {
        nodes: signed_nodes
            .into_iter()
            .filter_map(|(name, kv)| {
                let kv = origins.node(&name, generation, kv)?;
                Some(SnapshotNode {
                    name,
                    generation,
                    live: true,
                    kv,
                    role: mesh_planner::Role::Admin,
                })
            })
            .collect(),
        now_ms,
    };
    let verify_ms = started.elapsed().as_secs_f64() * 1000.0;
    let accepted = snapshot.nodes.len();
    let h1 = heap();
    let started = Instant::now();
    let view = View::compute(&snapshot);
    let compute_ms = started.elapsed().as_secs_f64() * 1000.0;
    let h2 = heap();
    let started = Instant::now();
    drop(std::hint::black_box(View::compute(&snapshot)));
    let recompute_ms = started.elapsed().as_secs_f64() * 1000.0;
    drop(view);
    ScaleView {
        nodes,
        accepted,
        tasks,
        keys,
        signed_bytes,
        verify_ms,
        compute_ms,
        recompute_ms,
        snapshot: h1 - h0,
        view: h2 - h1,
    }
}

fn scale_table(rows: &[ScaleView]) -> Table {
    let mut t = Table::new(
        &format!(
            "One worker's view of a large cluster without gossip ({SERVICES} services from \
             {ADMINS} admins; real signing, verification and View::compute; goal at 1,000 \
             nodes: ≤ 50 MB)"
        ),
        &[
            "nodes",
            "tasks per node",
            "keys",
            "signed keys and values (what chitchat holds)",
            "verify every signature (first snapshot)",
            "View::compute",
            "again (each change)",
            "snapshot + verdict caches held",
            "view held",
        ],
    );
    for r in rows {
        t.row(vec![
            // A node whose records did not verify would make the view look cheaper.
            if r.accepted == r.nodes {
                r.nodes.to_string()
            } else {
                format!("{} ({} verified)", r.nodes, r.accepted)
            },
            r.tasks.to_string(),
            r.keys.to_string(),
            kib(r.signed_bytes as f64),
            format!("{:.0} ms", r.verify_ms),
            format!("{:.0} ms", r.compute_ms),
            format!("{:.0} ms", r.recompute_ms),
            kib(r.snapshot as f64),
            kib(r.view as f64),
        ]);
    }
    t
}

fn name(i: usize) -> String {
    format!("node{i:04}")
}

fn address(i: usize) -> SocketAddr {
    let [_, a, b, c] = (0x0a00_0000u32 + 1 + i as u32).to_be_bytes();
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, a, b, c), 7946))
}

fn seed(i: usize) -> [u8; 32] {
    let mut s = [7u8; 32];
    s[..8].copy_from_slice(&(i as u64).to_le_bytes());
    s
}

fn task_ip(node: usize, t: usize, s: Scenario) -> Ipv4Addr {
    let n = (node * s.tasks + t + 2) as u32;
    Ipv4Addr::from(0x0a80_0000u32 + n)
}

fn service_name(k: usize) -> String {
    format!("svc{:04}", k % SERVICES)
}

fn task(node: usize, t: usize, s: Scenario, now_ms: u64) -> mesh_planner::Task {
    let k = node * s.tasks + t;
    let replicas = (s.nodes * s.tasks).div_ceil(SERVICES);
    mesh_planner::Task {
        // Task ids are 25 characters, as the agent's are.
        id: format!("{:025x}", 0x5eed_0000_0000u64 + k as u64),
        service: service_name(k),
        slot: mesh_planner::Slot::Replica((k / SERVICES % replicas.max(1)) as u32 + 1),
        node: name(node),
        spec_version: 1,
        template: 1,
        desired: mesh_planner::DesiredState::Running,
        state: mesh_planner::TaskState::Running,
        created_ms: now_ms,
        since_ms: now_ms,
        error: None,
        exit_code: None,
        attempt: 0,
        window_start_ms: now_ms,
        not_before_ms: None,
        running_ms: Some(now_ms),
        holds_slot: false,
        reservation: Default::default(),
    }
}

/// A node's own keys as the agent writes them, unsigned (`Gossip::start` signs them).
fn own_records(
    i: usize,
    s: Scenario,
    identity: &NodeIdentity,
    now_ms: u64,
) -> Vec<(String, String)> {
    let record = NodeRecord {
        name: name(i),
        hostname: format!("{}.dc1.example.com", name(i)),
        address: match address(i) {
            SocketAddr::V4(a) => *a.ip(),
            SocketAddr::V6(_) => unreachable!("v4 addresses"),
        },
        mtu: 1500,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        drivers: vec!["process".into(), "podman".into()],
        labels: [("zone".to_owned(), format!("z{}", i % 3))].into(),
        reserved_ports: Vec::new(),
        platform: Default::default(),
        capacity: Default::default(),
        insecure: false,
        key: Some(identity.public()),
        grant: None,
    };
    let mut kv = vec![(key::NODE.to_owned(), json(&record))];
    for t in 0..s.tasks {
        let task = task(i, t, s, now_ms);
        let ip = task_ip(i, t, s);
        let endpoint = EndpointRecord {
            task: format!("{}.{}.{}", task.service, t + 1, task.id),
            network: "backend".into(),
            service: Some(task.service.clone()),
            ip,
            mac: mac_for_ip(ip),
            state: EndpointState::Running,
        };
        kv.push((key::endpoint(&endpoint.task, "backend", 0), json(&endpoint)));
        kv.push((format!("{}{}", key::TASK, task.id), json(&task)));
    }
    let ip = Ipv4Addr::from(0x0a80_0000u32 + (s.nodes * s.tasks + i + 2) as u32);
    kv.push((
        format!("{}backend", key::ATTACHMENT),
        json(&AttachmentRecord {
            network: "backend".into(),
            ip,
            mac: mac_for_ip(ip),
        }),
    ));
    kv.push((
        format!("{}backend:{i}", key::BLOCK),
        json(&BlockClaim {
            network: "backend".into(),
            index: i as u32,
            stamp: Stamp {
                ms: now_ms,
                node: name(i),
            },
        }),
    ));
    kv
}

/// The replicated objects: one network and `SERVICES` services.
fn services(s: Scenario, now_ms: u64) -> Vec<(String, String)> {
    let stamp = Stamp {
        ms: now_ms,
        node: name(0),
    };
    let network = NetworkSpec {
        name: "backend".into(),
        subnet: "10.128.0.0/9".parse().expect("subnet"),
        gateway: Ipv4Addr::new(10, 128, 0, 1),
        vni: mesh_agent::cluster::FIRST_VNI,
        labels: Default::default(),
    };
    let mut kv = vec![(
        format!("{}backend", key::NETWORK),
        serde_json::to_string(&Replicated::new(network, stamp.clone())).expect("plain struct"),
    )];
    let replicas = (s.nodes * s.tasks).div_ceil(SERVICES).max(1) as u32;
    for k in 0..s.services {
        let task: TaskTemplate = serde_json::from_value(serde_json::json!({
            "command": ["/app", "--listen", ":8080"],
            "env": [["LOG_LEVEL", "info"], ["REGION", "eu-west"]],
            "image": format!("registry.example.com/team/app{k}:1.4.2"),
        }))
        .expect("task template");
        let spec = ServiceSpec {
            name: service_name(k),
            network: "backend".into(),
            vip: Some(Ipv4Addr::from(0x0a80_0000u32 + 0x0070_0000 + k as u32)),
            mode: mesh_planner::ServiceMode::Replicated { replicas },
            task: Some(task),
            version: 1,
            template_version: 1,
            ..Default::default()
        };
        kv.push((
            format!("{}{}", key::SERVICE, spec.name),
            serde_json::to_string(&Replicated::new(spec, stamp.clone())).expect("plain struct"),
        ));
    }
    kv
}

fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("plain struct")
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes only into the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn kib(bytes: f64) -> String {
    if bytes >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", bytes / 1024.0 / 1024.0)
    } else {
        format!("{:.1} KiB", bytes / 1024.0)
    }
}

fn propagation_table(points: &[Point]) -> Table {
    let mut t = Table::new(
        "Time for a change to reach every node (virtual time; goal at 1,000 nodes: p99 ≤ 3 s)",
        &[
            "nodes",
            "tasks per node / services",
            "network",
            "cluster formed",
            "changes reaching all",
            "all reached (median / max)",
            "per node arrival p50 / p99",
        ],
    );
    for p in points {
        let mut all: Vec<f64> = p
            .reach_all
            .iter()
            .flatten()
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        all.sort_by(f64::total_cmp);
        let mut arr = p.arrivals.clone();
        arr.sort_by(f64::total_cmp);
        t.row(vec![
            p.s.nodes.to_string(),
            format!("{} / {}", p.s.tasks, p.s.services),
            p.s.network(),
            p.formed.map_or("NOT within the limit".into(), |d| {
                format!("{:.1} s", d.as_secs_f64())
            }),
            format!(
                "{} of {}",
                p.reach_all.iter().flatten().count(),
                p.reach_all.len()
            ),
            if all.is_empty() {
                "—".into()
            } else {
                format!(
                    "{:.0} / {:.0} ms",
                    percentile_sorted(&all, 0.5),
                    all[all.len() - 1]
                )
            },
            if arr.is_empty() {
                "—".into()
            } else {
                format!(
                    "{:.0} / {:.0} ms",
                    percentile_sorted(&arr, 0.5),
                    percentile_sorted(&arr, 0.99)
                )
            },
        ]);
    }
    t
}

fn cost_table(points: &[Point]) -> Table {
    let mut t = Table::new(
        "Bandwidth, memory and CPU per node (goals at 1,000 nodes: idle ≤ 50 KB/s, view ≤ 50 MB)",
        &[
            "nodes",
            "tasks per node / services",
            "network",
            "idle gossip per node",
            "bytes per node per change",
            "largest Syn / SynAck / Ack",
            "refused (over 64 KB) / lost, of all",
            "heap per node (gossip state) / keys and values it holds",
            "CPU per node per round",
            "real s per virtual s",
        ],
    );
    for p in points {
        t.row(vec![
            p.s.nodes.to_string(),
            format!("{} / {}", p.s.tasks, p.s.services),
            p.s.network(),
            format!("{}/s", kib(p.idle_bps)),
            kib(p.change_bytes),
            format!(
                "{} / {} / {} B",
                p.wire.max_syn, p.wire.max_syn_ack, p.wire.max_ack
            ),
            format!(
                "{} / {} of {}",
                p.wire.oversize,
                p.wire.lost,
                p.wire.datagrams + p.wire.oversize
            ),
            format!("{} / {}", kib(p.heap_per_node), kib(p.payload as f64)),
            format!("{:.0} µs", p.cpu_us_per_round),
            format!("{:.2}", p.real_per_virtual),
        ]);
    }
    t
}

fn view_table(points: &[Point]) -> Table {
    let mut t = Table::new(
        "One worker's snapshot and view (Gossip::snapshot + View::compute, real time)",
        &[
            "nodes",
            "tasks per node / services",
            "keys in snapshot",
            "first (every signature checked)",
            "after one change",
            "view held",
            "snapshot (transient)",
            "verdict caches",
        ],
    );
    for p in points {
        if p.s.partition.is_some() || p.s.loss > 0.0 {
            continue;
        }
        let Some(v) = &p.view else { continue };
        t.row(vec![
            p.s.nodes.to_string(),
            format!("{} / {}", p.s.tasks, p.s.services),
            v.entries.to_string(),
            format!("{:.0} ms", v.first_ms),
            format!("{:.0} ms", v.again_ms),
            kib(v.view as f64),
            kib(v.snapshot as f64),
            kib(v.caches as f64),
        ]);
    }
    t
}

fn notes(report: &mut Report, points: &[Point]) {
    // The largest cluster on a plain LAN: what grows with N is read off it.
    let Some(p) = points
        .iter()
        .filter(|p| p.s.partition.is_none() && p.s.loss == 0.0)
        .max_by_key(|p| p.s.nodes)
    else {
        return;
    };
    let n = p.s.nodes as f64;
    // A Syn is one digest entry per known node; SynAcks carry one too, so idle gossip grows
    // with N per node, N² over the cluster.
    let entry = p.wire.max_syn as f64 / n;
    let idle_per_peer = p.idle_bps / n;
    let cpu_per_peer = p.cpu_us_per_round / n;
    report.note(format!(
        "Digest: the largest Syn at {} nodes is {} B, {entry:.0} B per known node (names of 8 \
         characters; FACTS.md measured 60–70 B with 20). One sealed datagram ({} B) holds the \
         digest of at most ~{:.0} nodes before any delta; at 1,000 nodes a Syn is ~{:.0} KB \
         and a SynAck has ~{:.0} KB left for its delta; at 5,000 the digest alone is ~{:.0} KB: \
         chitchat cannot send a Syn at all and the cluster cannot gossip.",
        p.s.nodes,
        p.wire.max_syn,
        auth::MAX_DATAGRAM,
        auth::MAX_DATAGRAM as f64 / entry,
        // Bytes per entry × 1,000 entries, in KB.
        entry,
        (auth::MAX_DATAGRAM as f64 - entry * 1000.0).max(0.0) / 1000.0,
        entry * 5.0,
    ));
    report.note(format!(
        "Idle gossip is digests: {idle_per_peer:.0} B/s per node per known node at {} nodes \
         (every round a node sends 3 Syns and answers ~3 with a SynAck, each carrying the \
         whole digest). Extrapolated: ~{:.0} KB/s per node at 1,000 nodes (goal 50 KB/s: \
         ~{:.0}× over), ~{:.0} KB/s at 5,000. CPU per round grows the same way: {cpu_per_peer:.1} \
         µs per known node, ~{:.1} ms per node per 100 ms round at 1,000 nodes.",
        p.s.nodes,
        // B/s per known node × 1,000 nodes, in KB/s.
        idle_per_peer,
        idle_per_peer / 50.0,
        idle_per_peer * 5.0,
        // µs per known node × 1,000 nodes, in ms.
        cpu_per_peer,
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bench's two paths at a size a test can afford, so a change to the gossip or view
    /// code that breaks them fails here rather than in the next `bench all`.
    #[test]
    fn a_small_cluster_forms_and_every_change_reaches_every_node() {
        let p = simulate(Scenario {
            nodes: 6,
            tasks: 3,
            latency: Duration::from_millis(1),
            jitter: Duration::from_millis(1),
            loss: 0.0,
            partition: None,
            changes: 2,
            services: 4,
        })
        .unwrap();
        assert!(p.formed.is_some(), "the cluster never formed");
        assert_eq!(p.reach_all.len(), 2);
        assert!(
            p.reach_all.iter().all(Option::is_some),
            "a change did not reach every node: {:?}",
            p.reach_all
        );
        assert_eq!(p.wire.oversize, 0);
    }

    #[test]
    fn every_node_of_the_scaled_view_verifies() {
        let v = view_at_scale(8, 3);
        assert_eq!(v.accepted, 8, "records signed here no longer verify");
        assert!(v.keys > 8 * 3);
    }
}
