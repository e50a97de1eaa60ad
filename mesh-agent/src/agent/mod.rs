//! The agent: owns gossip, the local clock, address allocation and the reconcile loop, and
//! carries out what the API asks (create a network, a service, ...).

mod addresses;
mod attachments;
mod cni;
mod converge;
pub mod dns;
mod drain;
mod events;
#[cfg(test)]
mod fake;
mod health;
pub mod membership;
mod objects;
mod orchestrate;
mod ports;
mod programming;
pub(crate) mod registry_auth;
mod roles;
mod rollout;
mod routing;
mod runtime;
pub mod secrets;
mod services;
pub mod stacks;
mod tasks;
mod volumes;

pub use membership::Shutdown;
pub use objects::validate_name;
pub use programming::ProgrammingLatency;
pub use services::DEFAULT_NETWORK;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use anyhow::Context;
use tokio::sync::{Mutex, Notify, broadcast, watch};
use tracing::{debug, info, warn};

use crate::{
    cluster::{BlockClaim, Clock, NodeRecord, Replicated, View, key},
    config::ResolvedConfig,
    dataplane::Dataplane,
    gossip::{Fingerprint, Gossip},
    overlay::{GatewayPlumbing, Overlay, Underlay},
    task::Tasks,
};
use mesh_api::id::Stamp;

/// What went wrong, in terms the API maps to status codes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The node-to-node API's name among a node's reserved ports (its peers find the port by it).
pub const PEER_API_USED_BY: &str = "node-to-node API (service logs)";

pub struct Agent {
    pub config: ResolvedConfig,
    pub gossip: Gossip,
    clock: StdMutex<Clock>,
    view: watch::Sender<Arc<View>>,
    /// Serialises allocations on this node and remembers addresses handed out but not yet
    /// visible in the view (see `addresses.rs`).
    ipam: Mutex<addresses::Reserved>,
    /// Every gossip write this node made before this instant is in the current view.
    view_covers: StdMutex<std::time::Instant>,
    /// The node-local parts; `None` when the agent runs the control plane only.
    local: Option<Local>,
    /// One kernel convergence at a time; also held by a task start whose networks are not
    /// plumbed yet, while it plumbs them (see `Local::plumbed` for the rest of a start).
    converging: Mutex<()>,
    /// The gossip state the current view was computed from: a refresh on an unchanged state
    /// (most API reads) reuses the view instead of merging every key again. Held from
    /// snapshot to republish, and while an object is written: republish drops this node's
    /// `obj:` keys the view does not know, so a key written after the snapshot was taken
    /// would be dropped as if it had lost a merge.
    publishing: Mutex<Option<Fingerprint>>,
    reconcile_now: Notify,
    /// What was last written to the state file, to skip identical rewrites.
    persisted: Mutex<BTreeMap<String, String>>,
    pub dns: mesh_dns::DnsServer,
    dns_last: StdMutex<Option<mesh_dns::Snapshot>>,
    /// One resolver listener per running task, by task name; dropping one closes it.
    dns_listeners: StdMutex<BTreeMap<String, (mesh_dns::ServeHandle, u64)>>,
    /// Service task starts and stops underway on this node.
    jobs: orchestrate::Jobs,
    /// Image pulls underway, one lock per image (see `NodeRuntime::pull`).
    pulls: StdMutex<BTreeMap<String, Arc<Mutex<()>>>>,
    /// Confirmed drains: how far every load balancer has let stopping tasks go.
    drains: drain::Drains,
    started: std::time::Instant,
    /// Set when the agent should stop on its own (it left, or was removed).
    shutdown: watch::Sender<Option<Shutdown>>,
    /// Cluster events derived from successive views (`meshctl events`, the UI's ticker).
    pub events: crate::events::Events,
    /// Time of kernel convergence passes, for /metrics.
    pub programming: programming::ProgrammingLatency,
    /// Copies of secrets sealed to this node that did not open (see `secrets`).
    pub secret_copies_refused: std::sync::atomic::AtomicU64,
}

/// What the agent drives besides gossip and the merged view.
pub struct Parts {
    pub dns: mesh_dns::DnsServer,
    /// The kernel side of this node: `None` runs the control plane only (gossip, the merged
    /// view and the API), for benchmarks of gossip at a scale one machine cannot host as
    /// full nodes.
    pub node: Option<NodeParts>,
}

/// The node-local parts: eBPF dataplane, tasks and the overlay.
pub struct NodeParts {
    pub dataplane: Dataplane,
    pub tasks: Tasks,
    pub overlay: Overlay,
    pub underlay: Underlay,
    pub gateway: GatewayPlumbing,
}

/// [`NodeParts`] as the running agent holds them.
pub struct Local {
    pub dataplane: Mutex<Dataplane>,
    pub tasks: Tasks,
    overlay: Overlay,
    /// The underlay as the overlay needs it (interface, address, MTU).
    underlay: Underlay,
    gateway: GatewayPlumbing,
    /// Networks' bridges and VXLAN devices the routing mesh is attached to, by name, with
    /// the ifindex it saw.
    network_devices: Mutex<BTreeMap<String, u32>>,
    /// Task veths the client-address programs are attached to, as last attached.
    task_veths: Mutex<Vec<crate::dataplane::TaskVeth>>,
    /// Networks task starts underway need, and those the last convergence plumbed.
    plumbed: StdMutex<converge::Plumbed>,
}

impl Agent {
    pub fn new(config: ResolvedConfig, gossip: Gossip, parts: Parts) -> Arc<Self> {
        let clock = Clock::new(&config.node_name);
        Arc::new(Self {
            clock: StdMutex::new(clock),
            view: watch::channel(Arc::new(View::default())).0,
            ipam: Mutex::new(Default::default()),
            view_covers: StdMutex::new(std::time::Instant::now()),
            local: parts.node.map(|n| Local {
                dataplane: Mutex::new(n.dataplane),
                tasks: n.tasks,
                overlay: n.overlay,
                underlay: n.underlay,
                gateway: n.gateway,
                network_devices: Mutex::new(BTreeMap::new()),
                task_veths: Mutex::new(Vec::new()),
                plumbed: StdMutex::new(converge::Plumbed::default()),
            }),
            converging: Mutex::new(()),
            publishing: Mutex::new(None),
            reconcile_now: Notify::new(),
            persisted: Mutex::new(BTreeMap::new()),
            dns: parts.dns,
            dns_last: StdMutex::new(None),
            dns_listeners: StdMutex::new(BTreeMap::new()),
            jobs: orchestrate::Jobs::default(),
            pulls: StdMutex::new(BTreeMap::new()),
            drains: drain::Drains::default(),
            started: std::time::Instant::now(),
            shutdown: watch::channel(None).0,
            events: crate::events::Events::default(),
            programming: programming::ProgrammingLatency::default(),
            secret_copies_refused: Default::default(),
            gossip,
            config,
        })
    }

    pub fn node_name(&self) -> &str {
        &self.config.node_name
    }

    /// The node-local parts, if this agent has them.
    pub fn local(&self) -> Option<&Local> {
        self.local.as_ref()
    }

    /// The node-local parts, or the error an API request for them gets from an agent that
    /// runs the control plane only.
    pub fn require_local(&self) -> Result<&Local> {
        self.local.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "node {} runs the control plane only (control_plane_only): it has no \
                 dataplane and runs no tasks",
                self.node_name()
            ))
        })
    }

    /// The node record this agent publishes.
    pub fn node_record(config: &ResolvedConfig, mtu: u32) -> NodeRecord {
        NodeRecord {
            name: config.node_name.clone(),
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            address: config.advertise,
            mtu,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            drivers: vec![mesh_api::spec::DRIVER_PROCESS.into()],
            labels: config.labels.clone(),
            reserved_ports: reserved_ports(config),
            platform: mesh_planner::Platform {
                os: std::env::consts::OS.into(),
                arch: std::env::consts::ARCH.into(),
            },
            capacity: config.capacity,
            insecure: config.cluster_key_file.is_none(),
            key: None,
            grant: None,
        }
    }

    fn tick(&self) -> Stamp {
        self.clock.lock().expect("clock lock").tick()
    }

    /// The latest merged view.
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// Every new view as it is published (events, the UI's live updates).
    pub fn watch_views(&self) -> watch::Receiver<Arc<View>> {
        self.view.subscribe()
    }

    /// The view of the current gossip state (instead of waiting for the loop): recomputed
    /// if gossip moved or a time-based transition is due since it was last computed.
    pub async fn refresh(&self) -> Arc<View> {
        let mut computed_from = self.publishing.lock().await;
        let read_at = std::time::Instant::now();
        let fingerprint = self.gossip.fingerprint().await;
        let current = self.view();
        if !current.change_due(Clock::now_ms()) && computed_from.as_ref() == Some(&fingerprint) {
            *self.view_covers.lock().expect("view lock") = read_at;
            return current;
        }
        let read_at = std::time::Instant::now();
        let snapshot = self.gossip.snapshot().await;
        self.publish_impostors();
        let view = View::compute(&snapshot);
        // A removed node's name may join again under a new key.
        for (name, generation) in &view.removed {
            self.gossip.forget_identity(name, *generation);
        }
        if let Some(s) = &view.newest_stamp {
            self.clock.lock().expect("clock lock").observe(s);
        }
        self.republish(&view).await;
        let view = Arc::new(view);
        // Published under the lock, so the view and the state it came from always match.
        self.view.send_replace(view.clone());
        *self.view_covers.lock().expect("view lock") = read_at;
        *computed_from = Some(fingerprint);
        drop(computed_from);
        self.persist_or_say().await;
        view
    }

    /// Tells peers this agent is stopping while its tasks and dataplane keep serving, and
    /// waits for that to spread: peers keep the node's tasks for `grace` instead of evicting
    /// them when heartbeats stop.
    pub async fn announce_restart(&self, grace: Duration) {
        let until_ms = Clock::now_ms() + grace.as_millis() as u64;
        let value =
            serde_json::to_string(&crate::cluster::Restarting { until_ms }).expect("plain struct");
        self.gossip
            .write([(key::RESTARTING.to_owned(), Some(value))])
            .await;
        tokio::time::sleep(self.config.gossip_interval() * 3).await;
    }

    /// Asks the loop to converge the kernel now.
    pub fn poke(&self) {
        self.reconcile_now.notify_one();
    }

    /// Runs forever: whenever gossip changes, a task exits or someone asks, make the kernel
    /// match the view and carry out this node's part of the services' plans. Checked twice a
    /// second; the kernel pass runs when the view is a new one
    /// (refresh recomputes only when gossip moved or a time-based transition is due), when
    /// asked, or every `FULL_PASS_EVERY` to repair kernel state someone else changed: with
    /// 10,000 services a pass costs ~150 ms of CPU, too much to spend every second on a
    /// state nobody touched.
    pub async fn run(self: Arc<Self>) {
        const FULL_PASS_EVERY: Duration = Duration::from_secs(10);
        let mut changes = self.gossip.changes().await;
        if let Some(exits) = self.local.as_ref().map(|l| l.tasks.subscribe()) {
            tokio::spawn(self.clone().follow_exits(exits));
        }
        self.serve_dns_for_all().await;
        // What this node kept from before a restart.
        self.publish_volumes().await;
        let mut last: Option<(Arc<View>, std::time::Instant)> = None;
        let mut asked = true;
        let mut restart_due: Option<u64> = None;
        loop {
            let view = self.refresh().await;
            let stale = last
                .as_ref()
                .is_none_or(|(v, at)| !Arc::ptr_eq(v, &view) || at.elapsed() >= FULL_PASS_EVERY);
            if self.removed_from(&view) {
                warn!(
                    "this node was removed from the cluster (`meshctl node rm --force` on another \
                     node): stopping; join again with a token to come back"
                );
                self.request_shutdown(Shutdown::Removed);
            }
            self.converge_keys(&view).await;
            self.reseal_secrets(&view).await;
            self.reseal_registry_auth(&view).await;
            if asked || stale {
                self.place_secret_copies(&view).await;
                self.prune_cni().await;
                self.update_dns(&view);
                let pass = std::time::Instant::now();
                if let Err(e) = self.converge(&view).await {
                    warn!("programming the kernel: {e:#}");
                }
                self.programming.observe(pass.elapsed());
                last = Some((view.clone(), std::time::Instant::now()));
            }
            // Restart delays come due without any change in gossip.
            if asked || stale || restart_due.is_some_and(|at| Clock::now_ms() >= at) {
                restart_due = self.orchestrate(&view).await;
            }
            asked = tokio::select! {
                _ = changes.next() => false,
                _ = self.reconcile_now.notified() => true,
                _ = tokio::time::sleep(Duration::from_millis(500)) => false,
            };
        }
    }

    /// Takes exited tasks' endpoints out of gossip as the exits happen, beside the reconcile
    /// loop rather than between its passes: a pass can take most of a second, and a dead
    /// task's endpoint is a dead backend in every load balancer until it goes. Exits already
    /// queued are handled together (see `tasks_exited`); then the loop is asked for a pass,
    /// which restarts what the restart policy says.
    async fn follow_exits(self: Arc<Self>, mut exits: broadcast::Receiver<crate::task::TaskExit>) {
        loop {
            let first = exits.recv().await;
            if matches!(first, Err(broadcast::error::RecvError::Closed)) {
                return;
            }
            let mut batch = vec![first];
            loop {
                match exits.try_recv() {
                    Ok(e) => batch.push(Ok(e)),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        batch.push(Err(broadcast::error::RecvError::Lagged(n)))
                    }
                    Err(_) => break,
                }
            }
            self.tasks_exited(batch).await;
            self.poke();
        }
    }

    /// Saves this node's gossip keys so a restarted agent re-asserts them (with their original
    /// stamps, so nothing it owned is lost or re-ordered).
    /// Saves this node's keys; a failure (a full disk) is said once a minute, not on every
    /// change, and its end once: gossip goes on meanwhile, and peers hold the replicated
    /// records, so what is lost is only this node's own keys if it restarts before then.
    async fn persist_or_say(&self) {
        static FAILING_SINCE: std::sync::Mutex<Option<std::time::Instant>> =
            std::sync::Mutex::new(None);
        static LAST_SAID: std::sync::Mutex<Option<std::time::Instant>> =
            std::sync::Mutex::new(None);
        let result = self.persist().await;
        let mut since = FAILING_SINCE.lock().expect("persist lock");
        match result {
            Ok(()) => {
                if let Some(t) = since.take() {
                    info!(
                        failing_for_s = t.elapsed().as_secs(),
                        "this node's state is saved again"
                    );
                }
            }
            Err(e) => {
                let now = std::time::Instant::now();
                since.get_or_insert(now);
                let mut said = LAST_SAID.lock().expect("persist lock");
                if said.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60)) {
                    *said = Some(now);
                    warn!(
                        "cannot save this node's state (said again in a minute while it \
                         lasts): {e:#}"
                    );
                }
            }
        }
    }

    async fn persist(&self) -> anyhow::Result<()> {
        let own = self.gossip.own_keys().await;
        let mut last = self.persisted.lock().await;
        if *last == own {
            return Ok(());
        }
        // Writes and fsyncs on a blocking thread: on a busy disk they take a good part of a
        // second, and the gossip task (heartbeats peers judge liveness by) must not wait.
        let (dir, to_save) = (self.config.state_dir.clone(), own.clone());
        tokio::task::spawn_blocking(move || save_own_keys(&dir, &to_save))
            .await
            .context("saving this node's state")??;
        *last = own;
        Ok(())
    }

    /// Makes this node's replicated keys equal the merged view, and drops block claims it
    /// lost.
    async fn republish(&self, view: &View) {
        let own = self.gossip.own_keys().await;
        let mut changes: Vec<(String, Option<String>)> = Vec::new();
        for (k, v) in &view.republish {
            if own.get(k) != Some(v) {
                changes.push((k.clone(), Some(v.clone())));
            }
        }
        for (k, v) in &own {
            if k.starts_with("obj:") && !view.republish.contains_key(k) {
                changes.push((k.clone(), None));
            }
            if k.starts_with(key::BLOCK)
                && let Ok(claim) = serde_json::from_str::<BlockClaim>(v)
            {
                let winner = view
                    .blocks
                    .get(&claim.network)
                    .and_then(|b| b.get(&claim.index));
                if winner.is_some_and(|w| *w != claim.stamp) {
                    info!(
                        network = claim.network,
                        block = claim.index,
                        "lost a block claim; releasing it"
                    );
                    changes.push((k.clone(), None));
                }
            }
        }
        if !changes.is_empty() {
            debug!(count = changes.len(), "republishing replicated keys");
            self.gossip.write(changes).await;
        }
    }

    /// Waits out the settle time, then recomputes: after this, a concurrent create on another
    /// node has reached us and the deterministic merge has picked a winner.
    async fn settle(&self) -> Arc<View> {
        tokio::time::sleep(self.settle_time()).await;
        self.refresh().await
    }

    /// How long a write waits for a concurrent one made on another node before it is final:
    /// until news reaches every live node and theirs comes back. Each gossip round a node
    /// pushes and pulls with 3 peers, so news reaches about 4 times as many nodes a round:
    /// log4(live nodes) rounds there, as many back, and two rounds to spare — 400 ms for 3
    /// nodes gossiping every 100 ms (a fixed second made every write of a small cluster
    /// wait 1 s), 1.2 s for 1,000 (where a second was too short). `settle_ms` overrides it.
    pub(crate) fn settle_time(&self) -> Duration {
        if self.config.settle_ms > 0 {
            return self.config.settle();
        }
        let live = self
            .view()
            .nodes
            .values()
            .filter(|n| n.status == mesh_api::spec::NodeStatus::Ready)
            .count();
        let (mut rounds, mut reached) = (0u32, 1usize);
        while reached < live {
            reached = reached.saturating_mul(4);
            rounds += 1;
        }
        self.config.gossip_interval() * (2 * rounds.max(1) + 2)
    }

    pub(crate) async fn write_object<T: serde::Serialize>(
        &self,
        prefix: &str,
        name: &str,
        record: &Replicated<T>,
    ) -> Result<()> {
        // Peers take replicated objects from admins only (see `crate::roles`).
        self.require_admin()?;
        let json = serde_json::to_string(record).context("encoding record")?;
        let _publishing = self.publishing.lock().await;
        self.gossip
            .write([(format!("{prefix}{name}"), Some(json))])
            .await;
        Ok(())
    }
}

/// Writes the node's own keys to its state file, large values beside it (once each, so the
/// file stays small).
fn save_own_keys(dir: &std::path::Path, own: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let path = state_file(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let saved = crate::gossip::payloads::save_bodies(dir, own)
        .with_context(|| format!("saving large values in {}", dir.display()))?;
    // Owner-only: the replicated records include a key rotation's new key.
    crate::state_files::write_with_backup(&path, &serde_json::to_vec_pretty(&saved)?, 0o600)
        .with_context(|| format!("writing {}", path.display()))?;
    crate::gossip::payloads::prune_bodies(dir, &saved);
    Ok(())
}

pub(crate) fn state_file(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("gossip-keys.json")
}

/// The keys a previous run of this node owned, to publish again at start. The node record is
/// rebuilt fresh; a missing file means a first start. A damaged copy is set aside (see
/// [`crate::state_files::quarantine`]) and its twin read; with both damaged the node starts
/// from its task records and the kernel and takes replicated objects from its peers.
pub fn load_own_keys(state_dir: &std::path::Path) -> BTreeMap<String, String> {
    let path = state_file(state_dir);
    let Some(mut keys) = crate::state_files::read_with_backup(&path, |b| {
        serde_json::from_slice::<BTreeMap<String, String>>(b)
    }) else {
        return BTreeMap::new();
    };
    crate::gossip::payloads::load_bodies(state_dir, &mut keys);
    keys.remove(key::NODE);
    keys.remove(key::RESTARTING);
    keys.remove(key::LEFT);
    keys.remove(key::KEYS);
    keys
}

/// What a published port may not take on this node: gossip and the overlay's VXLAN port on
/// the node's address, and the UI and metrics listeners when they listen there too.
fn reserved_ports(config: &ResolvedConfig) -> Vec<crate::cluster::ReservedPort> {
    use crate::cluster::ReservedPort;
    use mesh_api::spec::Protocol;
    let mut ports = vec![
        ReservedPort {
            protocol: Protocol::Udp,
            port: config.gossip_port,
            used_by: "gossip".into(),
        },
        ReservedPort {
            protocol: Protocol::Udp,
            port: crate::overlay::VXLAN_PORT,
            used_by: "the overlay (VXLAN)".into(),
        },
    ];
    if config.config.cluster_key_file.is_some() {
        ports.push(ReservedPort {
            protocol: Protocol::Tcp,
            port: config.gossip_port,
            used_by: PEER_API_USED_BY.into(),
        });
    }
    let on_node = |a: &std::net::SocketAddr| {
        a.ip().is_unspecified() || a.ip() == std::net::IpAddr::V4(config.advertise)
    };
    for (addr, used_by) in [
        (config.ui_listen, "the web UI (--ui-listen)"),
        (config.metrics_listen, "metrics (--metrics-listen)"),
    ] {
        if let Some(a) = addr.filter(on_node) {
            ports.push(ReservedPort {
                protocol: Protocol::Tcp,
                port: a.port(),
                used_by: used_by.into(),
            });
        }
    }
    ports
}
