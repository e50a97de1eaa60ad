//! `meshctl volume …`: volumes are node-local (Swarm's `local` driver). Each node keeps its
//! own catalogue (see `task::volumes`) and publishes it in gossip under `key::VOLUMES`, a
//! record only that node writes; `volume ls` on any node reads every node's from its view.
//! `create` and `rm` act on the node whose agent takes the command, as Docker's do.

use anyhow::Context;
use mesh_api::{
    spec::{MountType, validate_volume_name},
    v1::{Volume, VolumeCreate},
};
use tracing::warn;

use std::{collections::BTreeMap, path::PathBuf};

use mesh_api::spec::ServiceSpec;

use super::{Agent, Error, Result};

/// Mesh's own directories on every node, whatever this agent's configuration says.
const ALWAYS_MASKED: [&str; 3] = ["/etc/mesh", "/run/mesh", "/var/lib/mesh"];
use crate::{
    cluster::{Replicated, key},
    task::volumes,
};

impl Agent {
    /// `volume create NAME`: on this node; an existing volume is kept as it is (Docker's
    /// `volume create` of an existing name succeeds too).
    pub(crate) async fn create_volume(&self, req: &VolumeCreate) -> Result<Volume> {
        validate_volume_name(&req.name).map_err(Error::Invalid)?;
        let local = self.require_local()?;
        let state = &local.tasks.config().state_dir;
        volumes::create(state, &req.name, &req.labels)
            .with_context(|| format!("create {}", req.name))?;
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

/// A volume name is mounted by services of one task driver only: each driver keeps a
/// volume's data in its own store (a podman volume, or a directory of the agent), so a
/// podman task and a process task mounting "pgdata" on one node would not share it; the
/// user would see the data vanish. `changed` are the specs about to be written (they
/// replace the view's services of the same name); only clashes they bring are refused.
pub(crate) fn check_volume_drivers(
    existing: &BTreeMap<String, Replicated<ServiceSpec>>,
    changed: &[&ServiceSpec],
) -> Result<()> {
    let volumes = |s: &ServiceSpec| {
        let t = s.task.as_ref();
        let driver = t.map_or(mesh_api::spec::DRIVER_PROCESS, |t| t.driver());
        t.map(|t| t.mounts.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|m| m.kind == MountType::Volume)
            .map(move |m| (m.source.clone(), driver))
            .collect::<Vec<_>>()
    };
    let others = existing
        .iter()
        .filter(|(name, _)| !changed.iter().any(|c| &c.name == *name))
        .map(|(_, r)| &r.spec)
        .chain(changed.iter().copied());
    let mut seen: BTreeMap<String, (&str, &'static str)> = BTreeMap::new();
    for s in others {
        for (volume, driver) in volumes(s) {
            seen.entry(volume).or_insert((&s.name, driver));
        }
    }
    for s in changed {
        for (volume, driver) in volumes(s) {
            if let Some((other, d)) = seen.get(&volume).filter(|(_, d)| *d != driver) {
                return Err(Error::Invalid(format!(
                    "volume {volume:?} is mounted by service {other} ({d} driver) and by \
                     service {} ({driver} driver): the two drivers keep a volume's data apart \
                     (a podman volume, or a directory of the agent), so they would not share it; \
                     give one of them another volume name",
                    s.name
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use mesh_api::spec::{Mount, TaskTemplate};

    use super::*;

    fn service(name: &str, image: Option<&str>, mounts: &[&str]) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            task: Some(TaskTemplate {
                image: image.map(str::to_owned),
                mounts: mounts.iter().map(|m| Mount::parse(m).unwrap()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_volume_is_refused_to_a_second_driver() {
        let db = service("db", Some("postgres:16"), &["source=pgdata,target=/data"]);
        let mut view = BTreeMap::new();
        view.insert(
            "db".to_owned(),
            Replicated::new(
                db.clone(),
                mesh_api::id::Stamp {
                    ms: 1,
                    node: "n1".into(),
                },
            ),
        );
        // Another podman service shares it; a process service on other volumes is fine.
        let same = service("backup", Some("alpine"), &["source=pgdata,target=/in"]);
        let other = service(
            "app",
            None,
            &["source=appdata,target=/d", "type=tmpfs,target=/t"],
        );
        check_volume_drivers(&view, &[&same, &other]).unwrap();
        // A process service mounting pgdata is refused, naming both and the fix.
        let clash = service("app", None, &["source=pgdata,target=/d"]);
        let Err(Error::Invalid(e)) = check_volume_drivers(&view, &[&clash]) else {
            panic!("accepted");
        };
        assert!(
            e.contains("\"pgdata\" is mounted by service db (podman driver) and by service app (process driver)")
                && e.contains("another volume name"),
            "{e}"
        );
        // Within one request (a stack) too.
        let p = service("p", Some("alpine"), &["source=v1,target=/v"]);
        let q = service("q", None, &["source=v1,target=/v"]);
        assert!(check_volume_drivers(&BTreeMap::new(), &[&p, &q]).is_err());
        // A service changing its own driver is not in conflict with its old self.
        let db_process = service("db", None, &["source=pgdata,target=/data"]);
        check_volume_drivers(&view, &[&db_process]).unwrap();
    }
}
