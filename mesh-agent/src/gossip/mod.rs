//! The agent's membership and state dissemination: chitchat over UDP.
//!
//! Each agent owns its keys (see `cluster::key`); chitchat spreads them, detects failed nodes
//! with a phi-accrual detector, and keeps tombstones of deleted keys for a grace period. This
//! module hides chitchat behind a small surface: write own keys, take a [`Snapshot`] of
//! everyone's, and wait for changes.
//!
//! With a cluster key, chitchat runs over [`transport::SealedTransport`]: every datagram is
//! authenticated and encrypted (`auth`) with keys from a key file (`keyring`). Whatever the
//! transport, every value a node writes is signed with its own key (`crate::identity`, `signed`)
//! and every value read is checked for its origin (`origin`) before a snapshot shows it.

pub mod auth;
pub mod chunks;
pub mod keyring;
pub mod origin;
pub mod rekey;
pub mod sealed;
pub mod signed;
pub mod token;
pub mod transport;
pub mod validate;

#[cfg(test)]
mod clock_step_tests;
#[cfg(test)]
mod hostile_peer_tests;

use std::{collections::BTreeMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ProtocolVersion,
    spawn_chitchat, transport::Transport,
};
use tokio::sync::Notify;

use crate::cluster::{Clock, Snapshot, SnapshotNode};
use crate::identity::{NodeIdentity, PublicKey};

/// Docker Swarm's gossip port, kept for familiarity.
pub const DEFAULT_PORT: u16 = 7946;

#[derive(Clone, Debug)]
pub struct GossipConfig {
    pub node: String,
    /// Cluster name: agents of different clusters ignore each other.
    pub cluster: String,
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    /// Peers to contact first (`host:port`).
    pub seeds: Vec<String>,
    pub interval: Duration,
    /// A peer is declared dead once silent for about `phi_threshold` × its mean heartbeat
    /// interval (≈ `interval` when gossip flows normally).
    pub phi_threshold: f64,
    /// How long a dead node's keys are kept (its address blocks stay reserved meanwhile).
    pub dead_node_grace: Duration,
    /// How long deleted keys are remembered so late peers learn of the deletion.
    pub tombstone_grace: Duration,
}

impl GossipConfig {
    /// The time after which a silent peer is declared dead, as configured.
    pub fn failure_detection_time(&self) -> Duration {
        self.interval.mul_f64(self.phi_threshold)
    }
}

pub struct Gossip {
    handle: ChitchatHandle,
    /// Woken on local writes; chitchat itself only notices them on its next round.
    local_change: Arc<Notify>,
    /// Keys and counters of sealed gossip; `None` when gossip runs unauthenticated.
    auth: Option<Arc<auth::GossipAuth>>,
    /// This run's generation: what `node rm` of this node names.
    generation: u64,
    /// Chunked values already verified (see [`chunks::Assembler`]).
    assembler: std::sync::Mutex<chunks::Assembler>,
    /// This node's name and key pair: every value it writes is signed with it.
    name: String,
    identity: Arc<NodeIdentity>,
    /// Name-to-key pins and verdicts on every peer's values.
    origins: Arc<std::sync::Mutex<origin::Origins>>,
    /// Where this node keeps its gossip state (pins, generation, retired keys), if anywhere.
    state_dir: Option<std::path::PathBuf>,
}

impl Gossip {
    /// Starts gossip as `config.node`, signing with `identity`; `pins` is the file that keeps
    /// name-to-key pins across restarts (none: kept in memory only).
    pub async fn start(
        config: &GossipConfig,
        identity: Arc<NodeIdentity>,
        pins: Option<std::path::PathBuf>,
        initial: Vec<(String, String)>,
        transport: &dyn Transport,
    ) -> Result<Self> {
        let generation = next_generation(
            pins.as_deref()
                .and_then(Path::parent)
                .map(|d| d.join(GENERATION_FILE))
                .as_deref(),
        );
        let state_dir = pins.as_deref().and_then(Path::parent).map(Path::to_owned);
        let origins = origin::Origins::new(pins, (&config.node, identity.public(), generation));
        let chitchat_id = ChitchatId::new(config.node.clone(), generation, config.advertise);
        let chitchat_config = ChitchatConfig {
            chitchat_id,
            cluster_id: config.cluster.clone(),
            gossip_interval: config.interval,
            listen_addr: config.listen,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: config.phi_threshold,
                sampling_window_size: 1000,
                // Silences longer than this are failures, not samples of the normal interval.
                max_interval: config.interval * 10,
                initial_interval: config.interval,
                dead_node_grace_period: config.dead_node_grace,
            },
            marked_for_deletion_grace_period: config.tombstone_grace,
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V0,
        };
        let initial = initial
            .iter()
            .flat_map(|(k, v)| {
                chunks::split(k, &signed::seal(&identity, &config.node, generation, k, v))
            })
            .collect();
        let handle = spawn_chitchat(chitchat_config, initial, transport)
            .await
            .with_context(|| format!("starting gossip on {}", config.listen))?;
        Ok(Self {
            handle,
            local_change: Arc::new(Notify::new()),
            auth: None,
            generation,
            assembler: Default::default(),
            name: config.node.clone(),
            identity,
            origins: Arc::new(std::sync::Mutex::new(origins)),
            state_dir,
        })
    }

    /// This node's public key, as its node record must carry it.
    pub fn public_key(&self) -> PublicKey {
        self.identity.public()
    }

    /// Values dropped for their origin, and impostors refused.
    pub fn origin_report(&self) -> origin::OriginReport {
        self.origins.lock().expect("origins lock").report()
    }

    /// Nodes refused since the last call for claiming a name bound to another key.
    pub fn take_impostors(&self) -> Vec<origin::Impostor> {
        self.origins.lock().expect("origins lock").take_impostors()
    }

    /// `node rm` of `name` up to `generation`: the name may join again under a new key.
    pub fn forget_identity(&self, name: &str, generation: u64) {
        self.origins
            .lock()
            .expect("origins lock")
            .forget(name, generation);
    }

    /// Records the keys the transport seals with, for the API to report.
    pub fn with_auth(mut self, auth: Arc<auth::GossipAuth>) -> Self {
        let origins = self.origins.clone();
        auth.set_member(
            auth::Member {
                name: self.name.clone(),
                identity: self.identity.clone(),
                pinned: Box::new(move |name| {
                    origins
                        .lock()
                        .expect("origins lock")
                        .pins()
                        .get(name)
                        .map(|p| p.key)
                }),
            },
            self.state_dir
                .as_ref()
                .map(|d| d.join(rekey::RETIRED_FILE))
                .as_deref(),
        );
        self.auth = Some(auth);
        self
    }

    pub fn auth(&self) -> Option<&Arc<auth::GossipAuth>> {
        self.auth.as_ref()
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Writes this node's keys (set when `Some`, delete when `None`) in one step. A value
    /// too large for one datagram goes out as chunks (see [`chunks`]).
    pub async fn write(&self, changes: impl IntoIterator<Item = (String, Option<String>)>) {
        let chitchat = self.handle.chitchat();
        let mut cc = chitchat.lock().await;
        let state = cc.self_node_state();
        let mut changed = false;
        for (k, v) in changes {
            let raw = v
                .map(|v| {
                    let sealed = signed::seal(&self.identity, &self.name, self.generation, &k, &v);
                    chunks::split(&k, &sealed)
                })
                .unwrap_or_default();
            // The manifest (or the small value itself) is the last raw key: when it is
            // unchanged, so are its chunks.
            if raw.last().map(|(_, v)| v.as_str()) == state.get(&k) {
                continue;
            }
            changed = true;
            let old_chunks: Vec<String> = state
                .iter_prefix(&format!("{}{k}#", chunks::CHUNK_PREFIX))
                .map(|(c, _)| c.to_owned())
                .filter(|c| chunks::is_chunk_of(c, &k))
                .collect();
            if raw.is_empty() {
                state.delete(&k);
            }
            for c in old_chunks {
                if !raw.iter().any(|(r, _)| *r == c) {
                    state.delete(&c);
                }
            }
            for (rk, rv) in raw {
                if state.get(&rk) != Some(rv.as_str()) {
                    state.set(rk, rv);
                }
            }
        }
        drop(cc);
        if changed {
            self.local_change.notify_one();
        }
    }

    /// This node's own live keys.
    pub async fn own_keys(&self) -> BTreeMap<String, String> {
        let chitchat = self.handle.chitchat();
        let mut cc = chitchat.lock().await;
        let mut assembler = self.assembler.lock().expect("assembler lock");
        assembler
            .node(cc.self_node_state().key_values())
            .into_iter()
            .filter_map(|(k, v)| Some((k, signed::unchecked(&v)?.to_owned())))
            .collect()
    }

    /// What identifies the cluster state without copying it: every known generation, its
    /// liveness and its newest key version. Equal fingerprints mean equal snapshots (but for
    /// the clock); heartbeats alone do not change it.
    pub async fn fingerprint(&self) -> Fingerprint {
        let chitchat = self.handle.chitchat();
        let cc = chitchat.lock().await;
        let live: std::collections::HashSet<&ChitchatId> = cc.live_nodes().collect();
        Fingerprint(
            cc.node_states()
                .iter()
                .map(|(id, state)| {
                    (
                        id.node_id.clone(),
                        id.generation_id,
                        live.contains(id),
                        state.max_version(),
                    )
                })
                .collect(),
        )
    }

    pub async fn snapshot(&self) -> Snapshot {
        let chitchat = self.handle.chitchat();
        let cc = chitchat.lock().await;
        let live: std::collections::HashSet<&ChitchatId> = cc.live_nodes().collect();
        let mut assembler = self.assembler.lock().expect("assembler lock");
        let assembled: Vec<(ChitchatId, bool, BTreeMap<String, String>)> = cc
            .node_states()
            .iter()
            .map(|(id, state)| {
                (
                    id.clone(),
                    live.contains(id),
                    assembler.node(state.key_values()),
                )
            })
            .collect();
        assembler.forget_unseen();
        drop(assembler);
        drop(live);
        // Signatures are checked with chitchat's lock released: the gossip task (and so the
        // heartbeats peers judge liveness by) never waits behind them.
        drop(cc);
        let mut origins = self.origins.lock().expect("origins lock");
        let nodes = assembled
            .into_iter()
            .filter_map(|(id, live, kv)| {
                // An impostor's run is left out whole: it never reaches the view.
                let kv = origins.node(&id.node_id, id.generation_id, kv)?;
                Some(SnapshotNode {
                    name: id.node_id.to_string(),
                    generation: id.generation_id,
                    live,
                    kv,
                })
            })
            .collect();
        origins.forget_unseen();
        Snapshot {
            nodes,
            now_ms: Clock::now_ms(),
        }
    }

    /// Resolves when the cluster may have changed: a peer's keys, membership or liveness
    /// (chitchat's live-node watch) or a local write.
    pub async fn changes(&self) -> Changes {
        let watcher = self.handle.chitchat().lock().await.live_nodes_watcher();
        Changes {
            watcher,
            local: self.local_change.clone(),
        }
    }

    /// Resolves when the gossip task ends (it panicked, or its socket failed), with why.
    /// Nothing else restarts it: the agent must end and be restarted.
    pub fn stopped(&self) -> impl std::future::Future<Output = anyhow::Error> + use<> {
        let done = self.handle.termination_watcher();
        async move {
            match done.await {
                Ok(()) => anyhow::anyhow!("gossip stopped"),
                Err(e) => e.context("gossip stopped"),
            }
        }
    }

    pub async fn shutdown(self) -> Result<()> {
        self.handle.shutdown().await
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint(Vec<(std::sync::Arc<str>, u64, bool, u64)>);

pub struct Changes {
    watcher: tokio::sync::watch::Receiver<BTreeMap<ChitchatId, chitchat::NodeState>>,
    local: Arc<Notify>,
}

impl Changes {
    pub async fn next(&mut self) {
        tokio::select! {
            r = self.watcher.changed() => {
                if r.is_err() {
                    // Gossip stopped; nothing will change any more.
                    std::future::pending::<()>().await;
                }
            }
            _ = self.local.notified() => {}
        }
    }
}

/// Where a node keeps the generation it last gossiped under, beside its pins.
pub const GENERATION_FILE: &str = "generation";

/// The generation of this run: the wall clock in ms, as chitchat's examples use, but always
/// past the one the node last ran under. Peers take the highest generation of a name as the
/// node: an agent restarted after its clock stepped back (NTP, a wrong hardware clock) would
/// otherwise come back under a lower one, and every peer would keep listening to its dead
/// previous run, tasks and all. Without the file (no state dir, or a new one) it is the
/// clock, as before.
fn next_generation(file: Option<&Path>) -> u64 {
    let last = file
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|s| s.trim().parse::<u64>().ok());
    let generation = Clock::now_ms().max(last.map_or(0, |l| l + 1));
    if let Some(f) = file
        && let Err(e) =
            crate::state_files::write_atomic(f, format!("{generation}\n").as_bytes(), 0o600)
    {
        tracing::warn!(
            file = %f.display(),
            "cannot record this run's gossip generation ({e}): a restart after the clock \
             steps back would not be seen by peers until the clock catches up"
        );
    }
    if last.is_some_and(|l| generation == l + 1) {
        tracing::warn!(
            generation,
            "the wall clock is behind this node's previous run: gossiping under the next \
             generation instead (check NTP)"
        );
    }
    generation
}

#[cfg(test)]
mod generation_tests {
    use super::*;

    #[test]
    fn a_generation_never_goes_back_even_when_the_clock_does() {
        let dir = std::env::temp_dir().join(format!("mesh-generation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(GENERATION_FILE);
        let first = next_generation(Some(&file));
        assert!(first.abs_diff(Clock::now_ms()) < 5_000);
        // The previous run's clock was an hour ahead of this one's.
        let ahead = Clock::now_ms() + 3_600_000;
        std::fs::write(&file, format!("{ahead}\n")).unwrap();
        assert_eq!(next_generation(Some(&file)), ahead + 1);
        assert_eq!(next_generation(Some(&file)), ahead + 2);
        // A file that does not parse is the clock again, and is rewritten.
        std::fs::write(&file, "garbage").unwrap();
        let g = next_generation(Some(&file));
        assert!(g.abs_diff(Clock::now_ms()) < 5_000);
        assert_eq!(
            std::fs::read_to_string(&file).unwrap().trim(),
            g.to_string()
        );
        assert!(next_generation(None).abs_diff(Clock::now_ms()) < 5_000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
