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

pub mod admins;
pub mod auth;
pub mod chunks;
pub mod keyring;
pub mod origin;
pub mod payloads;
pub mod rekey;
pub mod sealed;
pub mod signed;
pub mod token;
pub mod transport;
pub mod validate;
pub mod versions;

#[cfg(test)]
mod clock_step_tests;
#[cfg(test)]
mod hostile_peer_tests;

use std::{collections::BTreeMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState, ProtocolVersion,
    spawn_chitchat, transport::Transport,
};
use tokio::sync::Notify;

use crate::cluster::{Clock, Snapshot, SnapshotNode};
use crate::identity::{NodeIdentity, PublicKey};

/// Docker Swarm's gossip port, kept for familiarity.
pub const DEFAULT_PORT: u16 = 7946;
/// A key each node rewrites after deleting keys, so its newest gossip version is always a
/// live signed value: relays then never need to tell a peer a version nothing signed proves
/// (see [`versions`]). No reader sees it.
pub const STAMP: &str = "gossip:stamp";

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
    /// Carry values over [`chunks::CHUNK_LEN`] outside gossip (see [`payloads`]): needs the
    /// node-to-node channel, so a cluster key. Without it they go out as chunks.
    pub carry_payloads: bool,
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
    /// Bodies of large values, when they travel outside gossip (see [`payloads`]).
    payloads: Option<Arc<std::sync::Mutex<payloads::Store>>>,
    /// This node's name and key pair: every value it writes is signed with it.
    name: String,
    identity: Arc<NodeIdentity>,
    /// Name-to-key pins and verdicts on every peer's values.
    origins: Arc<std::sync::Mutex<origin::Origins>>,
    /// Where this node keeps its gossip state (pins, generation, retired keys), if anywhere.
    state_dir: Option<std::path::PathBuf>,
    /// Roles, in a cluster that has them (see `crate::roles`).
    admins: Option<std::sync::Mutex<admins::Admins>>,
}

impl Gossip {
    /// Starts gossip as `config.node`, signing with `identity`; `pins` is the file that keeps
    /// name-to-key pins across restarts (none: kept in memory only).
    pub async fn start(
        config: &GossipConfig,
        identity: Arc<NodeIdentity>,
        pins: Option<std::path::PathBuf>,
        admins: Option<admins::Admins>,
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
                // chitchat allocates the whole window per peer up front (8 bytes a sample):
                // 1,000 samples cost 8 MB per node in a 1,000-node cluster, 40 MB at 5,000
                // (`cargo xtask bench simulation`). 100 samples are the last ~10 s of
                // heartbeats at the default interval: enough for the mean phi is judged by.
                sampling_window_size: 100,
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
        // A worker's replicated copies never enter gossip: peers would only drop them.
        let mut admins = admins;
        let (local, initial): (Vec<_>, Vec<_>) = initial.into_iter().partition(|(k, _)| {
            k.starts_with(crate::cluster::key::OBJECT)
                && admins
                    .as_ref()
                    .is_some_and(|a| a.own_role == crate::roles::Role::Worker)
        });
        if let Some(a) = &mut admins {
            a.local.extend(local);
        }
        let payloads = config
            .carry_payloads
            .then(|| Arc::new(std::sync::Mutex::new(payloads::Store::default())));
        // chitchat sets initial keys one after another from version 1: each is signed at the
        // version it will get, and is in the node's state from its first gossip round on.
        let mut raw: Vec<(String, String)> = initial
            .iter()
            .flat_map(|(k, v)| chunks::split(k, &carried(payloads.as_ref(), v)))
            .collect();
        // A key given twice keeps its last value, as chitchat would: one version per key.
        let mut seen = std::collections::HashSet::new();
        raw.reverse();
        raw.retain(|(k, _)| seen.insert(k.clone()));
        raw.reverse();
        let initial = raw
            .into_iter()
            .enumerate()
            .map(|(i, (k, v))| {
                let sealed =
                    signed::seal(&identity, &config.node, generation, &k, i as u64 + 1, &v);
                (k, sealed)
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
            payloads,
            name: config.node.clone(),
            identity,
            origins: Arc::new(std::sync::Mutex::new(origins)),
            state_dir,
            admins: admins.map(std::sync::Mutex::new),
        })
    }

    /// This node's role: an admin in a cluster without roles.
    pub fn own_role(&self) -> crate::roles::Role {
        self.admins.as_ref().map_or(crate::roles::Role::Admin, |a| {
            a.lock().expect("admins lock").own_role
        })
    }

    /// Whether the cluster has roles (an admin key).
    pub fn has_roles(&self) -> bool {
        self.admins.is_some()
    }

    /// Grants made, refused and objects dropped for their writer's role.
    pub fn roles_report(&self) -> crate::roles::RolesReport {
        self.admins.as_ref().map_or_else(Default::default, |a| {
            a.lock().expect("admins lock").report()
        })
    }

    /// Whether this node holds the admin key's secret (can print admin tokens, grant roles).
    pub fn can_grant(&self) -> bool {
        self.admins
            .as_ref()
            .is_some_and(|a| a.lock().expect("admins lock").can_grant())
    }

    /// The admin key's public half and, when held, its secret seed (for join tokens).
    pub fn admin_key(&self) -> Option<(PublicKey, Option<zeroize::Zeroizing<[u8; 32]>>)> {
        let a = self.admins.as_ref()?.lock().expect("admins lock");
        Some(a.admin_key())
    }

    /// Grants `role` to `node` speaking with `key` (`node promote`/`demote`); gossip carries
    /// the grant from this node's next write on.
    pub async fn grant_role(
        &self,
        node: &str,
        key: PublicKey,
        role: crate::roles::Role,
    ) -> Result<crate::roles::Grant> {
        let (grant, handed) = {
            let Some(admins) = &self.admins else {
                anyhow::bail!(
                    "this cluster has no roles (no admin key): every node is an admin;                      `mesh-agent init` makes clusters with roles"
                );
            };
            let mut a = admins.lock().expect("admins lock");
            let grant = a.grant(node, key, role, Clock::now_ms())?;
            // A promoted admin gets the admin key too, sealed to its own key, so it can grant
            // roles and print admin tokens like any other.
            let handed = match role {
                crate::roles::Role::Admin => a.admin_key_for(node, &key),
                crate::roles::Role::Worker => None,
            };
            (grant, handed)
        };
        let k = format!("{}{node}", crate::cluster::key::ADMIN_KEY_FOR);
        self.write([(k, handed)]).await;
        self.sync_roles().await;
        Ok(grant)
    }

    /// Arranges this node's gossip state for its role: a worker's replicated copies move out
    /// of gossip (an admin's back in), admins republish every grant, and the node record
    /// carries the node's newest grant.
    async fn sync_roles(&self) {
        let Some(admins) = &self.admins else { return };
        {
            let a = admins.lock().expect("admins lock");
            if a.synced == Some(a.own_role) && !a.grants_changed {
                return;
            }
        }
        let own = self.own_keys().await;
        let mut changes: Vec<(String, Option<String>)> = Vec::new();
        {
            let mut a = admins.lock().expect("admins lock");
            let role = a.own_role;
            if a.synced != Some(role) {
                if role == crate::roles::Role::Admin {
                    changes.extend(
                        std::mem::take(&mut a.local)
                            .into_iter()
                            .map(|(k, v)| (k, Some(v))),
                    );
                }
                a.synced = Some(role);
                a.grants_changed = true;
            }
            if a.grants_changed {
                a.grants_changed = false;
                let grants = a.grant_keys();
                if role == crate::roles::Role::Admin {
                    for (k, v) in &grants {
                        if own.get(k) != Some(v) {
                            changes.push((k.clone(), Some(v.clone())));
                        }
                    }
                }
                for k in own
                    .keys()
                    .filter(|k| k.starts_with(crate::cluster::key::ROLE_GRANT))
                {
                    if role != crate::roles::Role::Admin || !grants.contains_key(k) {
                        changes.push((k.clone(), None));
                    }
                }
                // An admin key handed to a node that is no admin any more is taken back.
                for (k, node) in own
                    .keys()
                    .filter_map(|k| Some((k, k.strip_prefix(crate::cluster::key::ADMIN_KEY_FOR)?)))
                {
                    let still_admin = a
                        .registry
                        .grant(node)
                        .is_some_and(|g| g.role == crate::roles::Role::Admin);
                    if role != crate::roles::Role::Admin || !still_admin {
                        changes.push((k.clone(), None));
                    }
                }
                let mine = a.registry.grant(&self.name).cloned();
                if let Some(record) = own.get(crate::cluster::key::NODE)
                    && let Ok(mut record) =
                        serde_json::from_str::<crate::cluster::NodeRecord>(record)
                    && record.grant != mine
                {
                    record.grant = mine;
                    changes.push((
                        crate::cluster::key::NODE.to_owned(),
                        Some(serde_json::to_string(&record).expect("plain struct")),
                    ));
                }
            }
        }
        // A worker's copies still in gossip (it was just demoted) move out through `write`;
        // from then on `write` keeps them local.
        if self.own_role() == crate::roles::Role::Worker {
            let chitchat = self.handle.chitchat();
            let held: Vec<String> = {
                let mut cc = chitchat.lock().await;
                cc.self_node_state()
                    .iter_prefix(crate::cluster::key::OBJECT)
                    .map(|(k, _)| k.to_owned())
                    .collect()
            };
            changes.extend(
                held.into_iter()
                    .filter_map(|k| own.get(&k).map(|v| (k, Some(v.clone())))),
            );
        }
        if !changes.is_empty() {
            self.write(changes).await;
        }
    }

    /// This node's public key, as its node record must carry it.
    pub fn public_key(&self) -> PublicKey {
        self.identity.public()
    }

    /// This node's key pair: what opens the secrets sealed to this node.
    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
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
                generation: self.generation,
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

    /// The bodies of large values, when they travel outside gossip: what the node-to-node
    /// channel serves and fills.
    pub fn payloads(&self) -> Option<&Arc<std::sync::Mutex<payloads::Store>>> {
        self.payloads.as_ref()
    }

    /// Bodies held, wanted, fetched and refused (all zero when they travel in gossip).
    pub fn payload_report(&self) -> payloads::PayloadReport {
        self.payloads.as_ref().map_or_else(Default::default, |p| {
            p.lock().expect("payloads lock").report()
        })
    }

    /// A body arrived: the view may change though no gossip version moved.
    pub fn payload_arrived(&self) {
        self.local_change.notify_one();
    }

    fn signer(&self) -> Signer<'_> {
        Signer {
            identity: &self.identity,
            name: &self.name,
            generation: self.generation,
        }
    }

    /// chitchat's state itself: what the simulation bench (`cargo xtask bench simulation`)
    /// reads to time a change's arrival without taking a snapshot at every node.
    pub fn chitchat(&self) -> Arc<tokio::sync::Mutex<chitchat::Chitchat>> {
        self.handle.chitchat()
    }

    /// Writes this node's keys (set when `Some`, delete when `None`) in one step. A value
    /// over [`chunks::CHUNK_LEN`] goes out as a manifest whose body peers fetch (see
    /// [`payloads`]) or, without a cluster key, as chunks (see [`chunks`]).
    pub async fn write(&self, changes: impl IntoIterator<Item = (String, Option<String>)>) {
        // Large values are hashed and set aside before chitchat's lock is taken: the gossip
        // task never waits behind them.
        let changes: Vec<(String, Option<String>)> = self
            .keep_local(changes)
            .into_iter()
            .map(|(k, v)| (k, v.map(|v| carried(self.payloads.as_ref(), &v))))
            .collect();
        let chitchat = self.handle.chitchat();
        let mut cc = chitchat.lock().await;
        let state = cc.self_node_state();
        let signer = self.signer();
        let mut changed = false;
        let mut deleted = false;
        for (k, v) in changes {
            let raw = v.map(|v| chunks::split(&k, &v)).unwrap_or_default();
            // The manifest (or the small value itself) is the last raw key: when it is
            // unchanged, so are its chunks.
            if raw.last().map(|(_, v)| v.as_str()) == live(state, &k) {
                continue;
            }
            changed = true;
            let old_chunks: Vec<String> = state
                .iter_prefix(&format!("{}{k}#", chunks::CHUNK_PREFIX))
                .filter(|(c, v)| chunks::is_chunk_of(c, &k) && !signed::is_deletion(&v.value))
                .map(|(c, _)| c.to_owned())
                .collect();
            if raw.is_empty() {
                signer.put(state, &k, None);
                deleted = true;
            }
            for c in old_chunks {
                if !raw.iter().any(|(r, _)| *r == c) {
                    signer.put(state, &c, None);
                    deleted = true;
                }
            }
            for (rk, rv) in &raw {
                if live(state, rk) != Some(rv.as_str()) {
                    signer.put(state, rk, Some(rv));
                }
            }
        }
        if deleted {
            signer.put(state, STAMP, Some(""));
        }
        drop(cc);
        if changed {
            self.local_change.notify_one();
        }
    }

    /// On a worker, replicated objects are kept by this node alone: their writes land in
    /// [`admins::Admins::local`], and any copy still in gossip is deleted there.
    fn keep_local(
        &self,
        changes: impl IntoIterator<Item = (String, Option<String>)>,
    ) -> Vec<(String, Option<String>)> {
        let Some(admins) = &self.admins else {
            return changes.into_iter().collect();
        };
        let mut a = admins.lock().expect("admins lock");
        if a.own_role != crate::roles::Role::Worker {
            return changes.into_iter().collect();
        }
        changes
            .into_iter()
            .map(|(k, v)| {
                if k.starts_with(crate::cluster::key::OBJECT) {
                    match v {
                        Some(v) => a.local.insert(k.clone(), v),
                        None => a.local.remove(&k),
                    };
                    (k, None)
                } else {
                    (k, v)
                }
            })
            .collect()
    }

    /// This node's own live keys (a worker's replicated copies included).
    pub async fn own_keys(&self) -> BTreeMap<String, String> {
        let chitchat = self.handle.chitchat();
        let mut cc = chitchat.lock().await;
        let mut assembler = self.assembler.lock().expect("assembler lock");
        let mut own: BTreeMap<String, String> = assembler.node(
            cc.self_node_state()
                .key_values()
                .filter(|(k, _)| *k != STAMP)
                .filter_map(|(k, v)| Some((k, signed::unchecked(v)?))),
        );
        drop(assembler);
        drop(cc);
        if let Some(p) = &self.payloads {
            p.lock()
                .expect("payloads lock")
                .resolve(&self.name, &mut own);
        }
        if let Some(admins) = &self.admins {
            let a = admins.lock().expect("admins lock");
            own.extend(a.local.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        own
    }

    /// What identifies the cluster state without copying it: every known generation, its
    /// liveness and its newest key version. Equal fingerprints mean equal snapshots (but for
    /// the clock); heartbeats alone do not change it.
    pub async fn fingerprint(&self) -> Fingerprint {
        // Read before chitchat's lock: a snapshot may hold this one while it copies bodies.
        let arrivals = self
            .payloads
            .as_ref()
            .map_or(0, |p| p.lock().expect("payloads lock").arrivals());
        let chitchat = self.handle.chitchat();
        let cc = chitchat.lock().await;
        let live: std::collections::HashSet<&ChitchatId> = cc.live_nodes().collect();
        Fingerprint(
            arrivals,
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
        self.sync_roles().await;
        let chitchat = self.handle.chitchat();
        let cc = chitchat.lock().await;
        let live: std::collections::HashSet<&ChitchatId> = cc.live_nodes().collect();
        let raw: Vec<(ChitchatId, bool, BTreeMap<String, origin::Raw>)> = cc
            .node_states()
            .iter()
            .map(|(id, state)| {
                let kv = state
                    .key_values_including_deleted()
                    .filter(|(_, v)| !v.is_deleted())
                    .map(|(k, v)| (k.to_owned(), (v.version, v.value.clone())))
                    .collect();
                (id.clone(), live.contains(id), kv)
            })
            .collect();
        drop(live);
        // Signatures are checked with chitchat's lock released: the gossip task (and so the
        // heartbeats peers judge liveness by) never waits behind them.
        drop(cc);
        let mut origins = self.origins.lock().expect("origins lock");
        let mut payloads = self
            .payloads
            .as_ref()
            .map(|p| p.lock().expect("payloads lock"));
        let mut assembler = self.assembler.lock().expect("assembler lock");
        let mut nodes: Vec<SnapshotNode> = raw
            .into_iter()
            .filter_map(|(id, live, raw)| {
                // An impostor's run is left out whole: it never reaches the view.
                let verified = origins.node(&id.node_id, id.generation_id, raw)?;
                let mut kv = assembler.node(
                    verified
                        .iter()
                        .filter(|(k, _)| *k != STAMP)
                        .map(|(k, v)| (k.as_str(), v.as_str())),
                );
                if let Some(p) = &mut payloads {
                    p.resolve(&id.node_id, &mut kv);
                }
                Some(SnapshotNode {
                    name: id.node_id.to_string(),
                    generation: id.generation_id,
                    live,
                    kv,
                    role: crate::roles::Role::Admin,
                })
            })
            .collect();
        assembler.forget_unseen();
        drop(assembler);
        origins.forget_unseen();
        drop(origins);
        if let Some(p) = &mut payloads {
            p.end_snapshot(std::time::Instant::now());
        }
        drop(payloads);
        if let Some(admins) = &self.admins {
            let mut a = admins.lock().expect("admins lock");
            if let Some(me) = nodes
                .iter_mut()
                .find(|n| n.name == self.name && n.generation == self.generation)
            {
                me.kv
                    .extend(a.local.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            if a.apply(&mut nodes, &self.name, &self.identity) {
                a.grants_changed = true;
            }
            a.settle_own_role((&self.name, self.identity.public()));
        }
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

/// What gossip carries for `value`: a manifest when its body travels outside gossip.
fn carried(payloads: Option<&Arc<std::sync::Mutex<payloads::Store>>>, value: &str) -> String {
    payloads
        .and_then(|p| p.lock().expect("payloads lock").carry(value))
        .unwrap_or_else(|| value.to_owned())
}

/// Who signs this node's writes: every raw key it puts into chitchat.
struct Signer<'a> {
    identity: &'a NodeIdentity,
    name: &'a str,
    generation: u64,
}

impl Signer<'_> {
    /// Sets (`Some`) or deletes (`None`) one raw key of this node's state, signed at the
    /// version chitchat gives the write: the next one, as both happen under chitchat's lock.
    /// A deletion is a signed tombstone that chitchat forgets after the tombstone grace, as
    /// it does its own.
    fn put(&self, state: &mut NodeState, key: &str, value: Option<&str>) {
        let version = state.max_version() + 1;
        match value {
            Some(v) => state.set(
                key,
                signed::seal(self.identity, self.name, self.generation, key, version, v),
            ),
            None => state.set_with_ttl(
                key,
                signed::seal_deletion(self.identity, self.name, self.generation, key, version),
            ),
        }
        debug_assert_eq!(
            state.max_version(),
            version,
            "chitchat versions writes densely"
        );
    }
}

/// The value this node holds under a raw key: `None` when absent or deleted.
fn live<'a>(state: &'a NodeState, key: &str) -> Option<&'a str> {
    state.get(key).and_then(signed::unchecked)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint(u64, Vec<(std::sync::Arc<str>, u64, bool, u64)>);

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
