//! Joining and leaving: join tokens, cluster key rotation, `node rm` and `leave`.

use std::time::Duration;

use anyhow::Context;
use tracing::{error, info, warn};

use super::{Agent, Error, Result};
use crate::gossip::keyring::key_id;
use crate::{
    cluster::view::CLUSTER_KEY_NAME,
    cluster::{Clock, KeyRotation, KeyState, Left, NodeRemoval, Replicated, View, key},
    gossip::keyring::{self, KEY_LEN},
    gossip::token::JoinToken,
};
use mesh_api::spec::NodeStatus;
use mesh_api::v1::KeyId;
use mesh_api::v1::RotationStatus;

/// Why the agent stops on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// `mesh-agent leave`: peers were told; clean up everything.
    Leave,
    /// Another node ran `node rm --force` on this one.
    Removed,
}

impl Agent {
    /// The key the join token carries: this node's primary.
    pub fn join_token(&self) -> Result<JoinToken> {
        let Some(path) = &self.config.cluster_key_file else {
            return Err(no_cluster_key());
        };
        let keys = keyring::read_material(path)?;
        Ok(JoinToken::new(&keys[0], &self.config.cluster))
    }

    /// Starts a cluster-wide key rotation: a new key becomes primary on every node, which
    /// keeps its old keys as secondaries until every Ready node seals with the new one, then
    /// drops them (see [`Agent::converge_keys`]). Returns the new key's id.
    pub async fn rotate_key(&self) -> Result<KeyId> {
        if self.gossip.auth().is_none() || self.config.cluster_key_file.is_none() {
            return Err(no_cluster_key());
        }
        let key = keyring::generate()?;
        let id = key_id(&key);
        let view = self.refresh().await;
        let stamp = self.tick();
        // With roles, sealed to each node's key: a stolen old key must not open the new one.
        let spec = if self.gossip.has_roles() {
            let cluster = self.gossip.auth().map(|a| a.cluster().to_owned());
            KeyRotation {
                id,
                key: String::new(),
                sealed: sealed_to_nodes(&view, cluster.as_deref().unwrap_or_default(), &key, None),
            }
        } else {
            KeyRotation {
                id,
                key: keyring::encode(&key).to_string(),
                sealed: Default::default(),
            }
        };
        // One incarnation, updated by each rotation: the newest update wins everywhere, so
        // rotations that follow each other never resolve to an older key.
        let record = match &view.cluster_key {
            Some(current) => Replicated {
                spec,
                updated: stamp,
                ..current.clone()
            },
            None => Replicated::new(spec, stamp),
        };
        self.write_object(key::CLUSTER_KEY, CLUSTER_KEY_NAME, &record)
            .await?;
        info!(key = %id, "cluster key rotation started");
        self.poke();
        Ok(id)
    }

    pub fn rotation_status(&self, view: &View) -> Option<RotationStatus> {
        let rotation = view.cluster_key.as_ref()?;
        let id = rotation.spec.id;
        let mut status = RotationStatus {
            key: id,
            switched: Vec::new(),
            retired: Vec::new(),
            ready: Vec::new(),
            down: Vec::new(),
        };
        for (name, n) in &view.nodes {
            if n.status != NodeStatus::Ready {
                status.down.push(name.clone());
                continue;
            }
            status.ready.push(name.clone());
            if let Some(k) = view.node_keys.get(name) {
                if k.primary == id {
                    status.switched.push(name.clone());
                }
                if k.accepted == [id] {
                    status.retired.push(name.clone());
                }
            }
        }
        Some(status)
    }

    /// Publishes the keys this node holds and carries out a rotation the view asks for:
    /// the new key first, the old ones kept until every Ready node seals with the new one.
    /// Every node decides from the same view, so no coordinator has to survive the rotation.
    pub(crate) async fn converge_keys(&self, view: &View) {
        let Some(auth) = self.gossip.auth() else {
            return;
        };
        if let Err(e) = self.apply_rotation(view).await {
            // Retried on every pass (about once a second): say it once a minute.
            static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
            let mut last = LAST.lock().expect("log lock");
            if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                *last = Some(std::time::Instant::now());
                error!(
                    "carrying out the cluster key rotation (this node keeps its keys and \
                     retries): {e:#}"
                );
            }
        }
        self.seal_rotation_to_new_nodes(view).await;
        let ring = auth.keyring();
        let ids = ring.ids();
        let state = KeyState {
            primary: ids[0],
            accepted: ids,
        };
        self.gossip
            .write([(
                key::KEYS.to_owned(),
                Some(serde_json::to_string(&state).expect("plain struct")),
            )])
            .await;
    }

    async fn apply_rotation(&self, view: &View) -> anyhow::Result<()> {
        let (Some(auth), Some(rotation), Some(path)) = (
            self.gossip.auth(),
            view.cluster_key.as_ref(),
            self.config.cluster_key_file.as_ref(),
        ) else {
            return Ok(());
        };
        let new = rotation.spec.id;
        let status = self
            .rotation_status(view)
            .expect("a rotation is in the view");
        let everyone_switched = status.switched.len() == status.ready.len();
        let held = auth.keyring().ids();
        let want_len = if everyone_switched { 1 } else { held.len() };
        if held[0] == new && held.len() == want_len {
            return Ok(());
        }
        let mut material = keyring::read_material(path)?;
        if held[0] != new {
            let key = self.rotation_key(&rotation.spec, auth.cluster())?;
            if key_id(&key) != new {
                anyhow::bail!("the rotation record's key does not match its id {new}");
            }
            material.retain(|k| key_id(k) != new);
            material.insert(0, key);
        }
        if everyone_switched && material.len() > 1 {
            // Kept a while for a node that was away and still seals with one of them.
            let dropped: Vec<&[u8; KEY_LEN]> = material[1..].iter().map(|k| &**k).collect();
            if let Err(e) = auth.retire(&dropped) {
                warn!("keeping the dropped cluster keys for nodes that missed the rotation: {e:#}");
            }
            material.truncate(1);
        }
        material.truncate(keyring::MAX_KEYS);
        let refs: Vec<&[u8; KEY_LEN]> = material.iter().map(|k| &**k).collect();
        keyring::write_key_file(path, &refs)?;
        let ids = auth.reload()?;
        if ids.len() == 1 {
            info!(key = %new, "every node uses the new cluster key; old keys retired");
        } else {
            info!(key = %new, "new cluster key is primary; old keys kept until every node switched");
        }
        Ok(())
    }

    /// The new key a rotation carries: in the clear (a cluster without roles), or sealed to
    /// this node's key.
    fn rotation_key(
        &self,
        spec: &KeyRotation,
        cluster: &str,
    ) -> anyhow::Result<zeroize::Zeroizing<[u8; KEY_LEN]>> {
        if spec.key.is_empty() {
            let sealed = spec.sealed.get(self.node_name()).with_context(|| {
                format!(
                    "the new cluster key {} is not sealed to this node yet: an admin adds it",
                    spec.id
                )
            })?;
            return crate::gossip::sealed::open_cluster_key(
                self.gossip.identity(),
                cluster,
                self.node_name(),
                sealed,
            )
            .with_context(|| {
                format!(
                    "the new cluster key {} sealed to this node does not open with its key",
                    spec.id
                )
            });
        }
        let bytes = zeroize::Zeroizing::new(
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &spec.key)
                .ok()
                .filter(|b| b.len() == KEY_LEN)
                .context("the rotation record's key is not a 32-byte base64 key")?,
        );
        Ok(zeroize::Zeroizing::new(
            bytes.as_slice().try_into().expect("length checked"),
        ))
    }

    /// As the admin that holds the new key and that the planner picks among ready admins:
    /// seals a rotation's key to nodes that have none yet (they joined with a token of the
    /// old key while the rotation went on). Written as an update of the rotation; a rotation
    /// started at the same moment on another admin may lose to it, and is then run again.
    async fn seal_rotation_to_new_nodes(&self, view: &View) {
        let (Some(auth), Some(rotation), Some(path)) = (
            self.gossip.auth(),
            view.cluster_key.as_ref(),
            self.config.cluster_key_file.as_ref(),
        ) else {
            return;
        };
        if !self.gossip.has_roles()
            || !rotation.spec.key.is_empty()
            || self.role() != crate::roles::Role::Admin
            || auth.keyring().ids()[0] != rotation.spec.id
        {
            return;
        }
        let missing = view.nodes.values().any(|n| {
            n.record.as_ref().is_some_and(|r| r.key.is_some())
                && !rotation.spec.sealed.contains_key(&n.name)
        });
        let nodes = view.planner_nodes();
        if !missing || mesh_planner::coordinator(CLUSTER_KEY_NAME, &nodes) != Some(self.node_name())
        {
            return;
        }
        let Ok(material) = keyring::read_material(path) else {
            return;
        };
        if key_id(&material[0]) != rotation.spec.id {
            return;
        }
        let mut record = rotation.clone();
        record.spec.sealed = sealed_to_nodes(
            view,
            auth.cluster(),
            &material[0],
            Some(&rotation.spec.sealed),
        );
        record.updated = self.tick();
        info!(key = %rotation.spec.id, "sealing the new cluster key to nodes that joined since");
        if let Err(e) = self
            .write_object(key::CLUSTER_KEY, CLUSTER_KEY_NAME, &record)
            .await
        {
            warn!("sealing the new cluster key to new nodes: {e}");
        }
    }

    /// `meshctl node rm`: forgets a node on every node. Refused for this node (`leave` is
    /// for that) and, without `force`, for a node that is up.
    pub async fn remove_node(&self, name: &str, force: bool) -> Result<()> {
        let view = self.refresh().await;
        let Some(node) = view.nodes.get(name) else {
            return Err(Error::NotFound(format!(
                "node {name} not found (see `meshctl node ls`)"
            )));
        };
        if name == self.node_name() {
            return Err(Error::Conflict(format!(
                "node {name} is the node this command runs on: run `mesh-agent leave` here \
                 instead, or `meshctl node rm` from another node"
            )));
        }
        if node.status == NodeStatus::Ready && !force {
            return Err(Error::Conflict(format!(
                "node {name} is up: run `mesh-agent leave` on it (its tasks are moved first), \
                 or pass --force to remove it anyway"
            )));
        }
        let generation = self
            .gossip
            .snapshot()
            .await
            .nodes
            .iter()
            .filter(|n| n.name == name)
            .map(|n| n.generation)
            .max()
            .unwrap_or(0);
        let stamp = self.tick();
        let spec = NodeRemoval {
            node: name.to_owned(),
            generation,
        };
        let mut current: Option<Replicated<NodeRemoval>> = None;
        for n in self.gossip.snapshot().await.nodes {
            if let Some(r) =
                n.kv.get(&format!("{}{name}", key::NODE_REMOVAL))
                    .and_then(|v| serde_json::from_str::<Replicated<NodeRemoval>>(v).ok())
                && current.as_ref().is_none_or(|c| r.updated > c.updated)
            {
                current = Some(r);
            }
        }
        // Updating the one incarnation keeps the newest removal winning everywhere.
        let record = match current {
            Some(c) => Replicated {
                spec,
                updated: stamp,
                deleted: None,
                ..c
            },
            None => Replicated::new(spec, stamp),
        };
        self.write_object(key::NODE_REMOVAL, name, &record).await?;
        self.refresh().await;
        info!(
            node = name,
            generation, force, "node removed from the cluster"
        );
        Ok(())
    }

    /// Tells peers this node leaves for good and waits for that to spread; the caller then
    /// stops the agent with [`Shutdown::Leave`].
    pub async fn announce_leave(&self) {
        let value = serde_json::to_string(&Left {
            at_ms: Clock::now_ms(),
        })
        .expect("plain struct");
        self.gossip
            .write([(key::LEFT.to_owned(), Some(value))])
            .await;
        tokio::time::sleep(self.config.gossip_interval() * 5).await;
    }

    /// Asks the agent's main task to stop.
    pub fn request_shutdown(&self, why: Shutdown) {
        let _ = self.shutdown.send(Some(why));
    }

    /// Resolves when something asked the agent to stop.
    pub async fn shutdown_requested(&self) -> Shutdown {
        let mut rx = self.shutdown.subscribe();
        loop {
            if let Some(why) = *rx.borrow_and_update() {
                return why;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Stops this node's part in the cluster: its tasks, its networks' plumbing and gateway,
    /// its saved state and its key file (it is no longer a member; joining again takes a token).
    pub async fn clean_up_after_leaving(&self) -> anyhow::Result<()> {
        if let Some(local) = self.local() {
            for t in local.tasks.list() {
                if let Err(e) = self.remove_task(&t.spec.name).await {
                    warn!(task = t.spec.name, "stopping task: {e}");
                }
            }
            let _one_at_a_time = self.converging.lock().await;
            self.converge_locked(&View::default(), None)
                .await
                .context("unplumbing this node's networks")?;
            // The gateway bridge and the nftables table stay through restarts; not now.
            local
                .overlay
                .remove_all(&local.underlay)
                .await
                .context("removing the gateway bridge and firewall")?;
        }
        let _ = std::fs::remove_file(super::state_file(&self.config.state_dir));
        let _ = std::fs::remove_dir_all(
            self.config
                .state_dir
                .join(crate::gossip::payloads::BODIES_DIR),
        );
        if let Some(path) = &self.config.cluster_key_file {
            match std::fs::remove_file(path) {
                Ok(()) => info!(path = %path.display(), "cluster key file removed"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!(path = %path.display(), "removing the cluster key file: {e}"),
            }
        }
        Ok(())
    }

    /// Whether `node rm --force` named this very run of the agent.
    pub(crate) fn removed_from(&self, view: &View) -> bool {
        view.removed
            .get(self.node_name())
            .is_some_and(|g| self.gossip.generation() <= *g)
    }
}

fn no_cluster_key() -> Error {
    Error::Invalid(
        "this cluster runs without a cluster key, so there is no join token: anyone who \
         reaches the gossip port can join. Start a new cluster with `mesh-agent init`, or \
         create a key with `mesh-agent keygen --out FILE`, copy it to every node and set \
         cluster_key_file"
            .into(),
    )
}

/// How long `mesh-agent leave` and `join-token --rotate` wait by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// A new cluster key sealed to every node of the view that has a key, keeping the copies in
/// `kept` (nodes already given one).
fn sealed_to_nodes(
    view: &View,
    cluster: &str,
    key: &[u8; KEY_LEN],
    kept: Option<&std::collections::BTreeMap<String, String>>,
) -> std::collections::BTreeMap<String, String> {
    let mut out = kept.cloned().unwrap_or_default();
    for n in view.nodes.values() {
        let Some(to) = n.record.as_ref().and_then(|r| r.key) else {
            continue;
        };
        if out.contains_key(&n.name) {
            continue;
        }
        match crate::gossip::sealed::seal_cluster_key(&to, cluster, &n.name, key) {
            Ok(sealed) => {
                out.insert(n.name.clone(), sealed);
            }
            Err(e) => warn!(
                node = n.name,
                "cannot seal the new cluster key to the node: {e}"
            ),
        }
    }
    out
}
