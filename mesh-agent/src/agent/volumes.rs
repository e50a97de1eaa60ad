//! `meshctl volume …`: volumes are node-local (Swarm's `local` driver). Each node keeps its
//! own catalogue (see `task::volumes`) and publishes it in gossip under `key::VOLUMES`, a
//! record only that node writes; `volume ls` on any node reads every node's from its view.
//! `create` and `rm` act on the node whose agent takes the command, as Docker's do.

use mesh_api::{
    spec::{MountType, validate_volume_name},
    v1::{Volume, VolumeCreate},
};
use tracing::warn;

use std::path::PathBuf;

use mesh_api::spec::ServiceSpec;

use super::{Agent, Error, Result};

/// Mesh's own directories on every node, whatever this agent's configuration says.
const ALWAYS_MASKED: [&str; 3] = ["/etc/mesh", "/run/mesh", "/var/lib/mesh"];
use crate::{cluster::key, task::volumes};

impl Agent {
    /// `volume create NAME`: on this node; an existing volume is kept as it is (Docker's
    /// `volume create` of an existing name succeeds too).
    pub(crate) async fn create_volume(&self, req: &VolumeCreate) -> Result<Volume> {
        validate_volume_name(&req.name).map_err(Error::Invalid)?;
        let local = self.require_local()?;
        let state = &local.tasks.config().state_dir;
        volumes::create(state, &req.name, &req.labels)?;
        self.publish_volumes().await;
        volumes::get(state, self.node_name(), &req.name)
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("volume {} vanished", req.name)))
    }

    /// `volume rm NAME` on this node: refused while a task of this node mounts it.
    pub(crate) async fn remove_volume(&self, name: &str) -> Result<()> {
        validate_volume_name(name).map_err(Error::Invalid)?;
        let local = self.require_local()?;
        let state = &local.tasks.config().state_dir;
        if volumes::get(state, self.node_name(), name).is_none() {
            let view = self.refresh().await;
            let elsewhere: Vec<&str> = view
                .volumes
                .iter()
                .filter(|v| v.name == name)
                .map(|v| v.node.as_str())
                .collect();
            return Err(Error::NotFound(if elsewhere.is_empty() {
                format!("get {name}: no such volume")
            } else {
                format!(
                    "get {name}: no such volume on node {}: it is on node {} (volumes are local to their node: run `meshctl volume rm` against that node's agent)",
                    self.node_name(),
                    elsewhere.join(", ")
                )
            }));
        }
        let users: Vec<String> = local
            .tasks
            .list()
            .into_iter()
            .filter(|r| {
                r.spec
                    .mounts
                    .iter()
                    .any(|m| m.kind == MountType::Volume && m.source == name)
            })
            .map(|r| r.spec.name)
            .collect();
        if !users.is_empty() {
            return Err(Error::Conflict(format!(
                "remove {name}: volume is in use - [{}]",
                users.join(", ")
            )));
        }
        volumes::remove_podman_volume(self.node_name(), name).await?;
        volumes::remove(state, name)?;
        self.publish_volumes().await;
        Ok(())
    }

    /// Bind sources of a service, checked on the node that takes the command (Docker checks
    /// them where the task lands; a node that lacks the path still rejects the task): the
    /// path exists, and holds nothing mesh keeps from tasks. Mounts `before` already had
    /// are not checked again (an update must not fail on what it does not change).
    pub(crate) fn check_bind_sources(
        &self,
        spec: &ServiceSpec,
        before: Option<&ServiceSpec>,
    ) -> Result<()> {
        let Some(t) = &spec.task else {
            return Ok(());
        };
        let old: &[mesh_api::spec::Mount] = before
            .and_then(|b| b.task.as_ref())
            .map_or(&[], |t| &t.mounts);
        let mut masked: Vec<PathBuf> = ALWAYS_MASKED.iter().map(PathBuf::from).collect();
        if let Some(local) = &self.local {
            masked.extend(local.tasks.config().masked.iter().cloned());
        }
        for m in t
            .mounts
            .iter()
            .filter(|m| m.kind == MountType::Bind && !old.contains(m))
        {
            volumes::check_bind_source(&m.source, &masked)
                .map_err(|e| Error::Invalid(format!("service {}: {e:#}", spec.name)))?;
        }
        Ok(())
    }

    /// Writes this node's catalogue to gossip (after it changed, and at start).
    pub(crate) async fn publish_volumes(&self) {
        let Some(local) = self.local.as_ref() else {
            return;
        };
        let list = volumes::list(&local.tasks.config().state_dir, self.node_name());
        let value = if list.is_empty() {
            None
        } else {
            match serde_json::to_string(&list) {
                Ok(v) => Some(v),
                Err(e) => {
                    warn!("cannot encode this node's volumes: {e}");
                    return;
                }
            }
        };
        self.gossip.write([(key::VOLUMES.to_owned(), value)]).await;
    }
}
