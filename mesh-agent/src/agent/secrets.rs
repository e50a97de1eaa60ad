//! Secrets and configs as cluster objects: created once from any node (immutable, as in
//! Swarm: rotate by creating another name and switching services with `--secret-rm/-add`),
//! removed only while no service uses them, and opened on the node that starts a task.

use std::collections::BTreeMap;

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use tracing::{info, warn};
use zeroize::Zeroizing;

use super::{Agent, Error, Result};
use crate::{
    cluster::{ConfigSpec, Replicated, SecretSpec, View, key},
    gossip::sealed,
    task::{TaskFile, TaskFiles},
};
use mesh_api::spec::{FileRef, MAX_FILE_OBJECT, TaskTemplate};

/// Which kind of file object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Secret,
    Config,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::Secret => "secret",
            Kind::Config => "config",
        }
    }
}

/// Docker's rule for secret and config names (they need not be DNS labels).
pub fn validate_object_name(kind: Kind, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid {} name {name:?}: use 1-64 letters, digits, '-', '_' or '.', starting with \
             a letter or digit",
            kind.word()
        )))
    }
}

/// The size check, before anything is sealed or sent; the message never shows the data.
pub fn check_size(kind: Kind, name: &str, len: usize) -> Result<()> {
    if len == 0 {
        return Err(Error::Invalid(format!(
            "{} {name} is empty: give it some data",
            kind.word()
        )));
    }
    if len > MAX_FILE_OBJECT {
        return Err(Error::Invalid(format!(
            "{} {name} is {len} bytes; the limit is {MAX_FILE_OBJECT} bytes (500 KB)",
            kind.word()
        )));
    }
    Ok(())
}

/// Services whose current or previous template uses the object (a rollback needs it too).
pub fn users(view: &View, kind: Kind, name: &str) -> Vec<String> {
    let uses = |t: &Option<TaskTemplate>| {
        t.as_ref().is_some_and(|t| {
            let refs = match kind {
                Kind::Secret => &t.secrets,
                Kind::Config => &t.configs,
            };
            refs.iter().any(|r| r.source == name)
        })
    };
    view.services
        .values()
        .filter_map(|s| {
            if uses(&s.spec.task) {
                Some(s.spec.name.clone())
            } else if s.spec.previous.as_ref().is_some_and(|p| uses(&p.task)) {
                // `service rollback` would need it back.
                Some(format!(
                    "{} (its previous spec, kept for rollback)",
                    s.spec.name
                ))
            } else {
                None
            }
        })
        .collect()
}

impl Agent {
    pub(super) fn keyring(
        &self,
    ) -> Result<(std::sync::Arc<crate::gossip::keyring::Keyring>, String)> {
        let auth = self.gossip.auth().ok_or_else(|| {
            Error::Invalid(
                "secrets need a cluster key: this agent's gossip is not sealed, so a secret \
                 would travel and be stored in the clear. Run the agents with a key \
                 (`mesh-agent init` makes one, or --cluster-key-file)"
                    .into(),
            )
        })?;
        Ok((auth.keyring(), auth.cluster().to_owned()))
    }

    pub async fn create_secret(
        &self,
        name: &str,
        data: &[u8],
        labels: BTreeMap<String, String>,
    ) -> Result<Replicated<SecretSpec>> {
        validate_object_name(Kind::Secret, name)?;
        check_size(Kind::Secret, name, data.len())?;
        let (ring, cluster) = self.keyring()?;
        let view = self.refresh().await;
        if view.secrets.contains_key(name) {
            return Err(Error::Conflict(format!(
                "secret {name} already exists: secrets cannot change; create one under a new \
                 name and switch services with --secret-rm {name} --secret-add NEW"
            )));
        }
        let spec = SecretSpec {
            name: name.to_owned(),
            labels,
            size: data.len(),
            sealed: sealed::seal(&ring, &cluster, name, data),
        };
        let stamp = self.tick();
        self.write_object(key::SECRET, name, &Replicated::new(spec, stamp.clone()))
            .await?;
        let view = self.settle().await;
        match view.secrets.get(name) {
            Some(s) if s.created == stamp => {
                info!(secret = name, "secret created");
                Ok(s.clone())
            }
            Some(s) => Err(Error::Conflict(format!(
                "secret {name} was created at the same time on node {}, whose create came first",
                s.created.node
            ))),
            None => Err(Error::Conflict(format!(
                "secret {name} was removed while it was being created"
            ))),
        }
    }

    pub async fn create_config(
        &self,
        name: &str,
        data: &[u8],
        labels: BTreeMap<String, String>,
    ) -> Result<Replicated<ConfigSpec>> {
        validate_object_name(Kind::Config, name)?;
        check_size(Kind::Config, name, data.len())?;
        let view = self.refresh().await;
        if view.configs.contains_key(name) {
            return Err(Error::Conflict(format!(
                "config {name} already exists: configs cannot change; create one under a new \
                 name and switch services with --config-rm {name} --config-add NEW"
            )));
        }
        let spec = ConfigSpec {
            name: name.to_owned(),
            labels,
            data: BASE64.encode(data),
        };
        let stamp = self.tick();
        self.write_object(key::CONFIG, name, &Replicated::new(spec, stamp.clone()))
            .await?;
        let view = self.settle().await;
        match view.configs.get(name) {
            Some(c) if c.created == stamp => {
                info!(config = name, "config created");
                Ok(c.clone())
            }
            Some(c) => Err(Error::Conflict(format!(
                "config {name} was created at the same time on node {}, whose create came first",
                c.created.node
            ))),
            None => Err(Error::Conflict(format!(
                "config {name} was removed while it was being created"
            ))),
        }
    }

    /// Removes a secret or config no service uses.
    pub async fn remove_file_object(&self, kind: Kind, name: &str) -> Result<()> {
        let view = self.refresh().await;
        let users = users(&view, kind, name);
        if !users.is_empty() {
            return Err(Error::Conflict(format!(
                "{} {name} is in use by service(s) {}: remove it from them first (service update \
                 --{}-rm {name}) or remove the services",
                kind.word(),
                users.join(", "),
                kind.word()
            )));
        }
        let not_found = || {
            Error::NotFound(format!(
                "{} {name} not found (see `meshctl {} ls`)",
                kind.word(),
                kind.word()
            ))
        };
        match kind {
            Kind::Secret => {
                let mut tomb = view.secrets.get(name).ok_or_else(not_found)?.clone();
                tomb.deleted = Some(self.tick());
                self.write_object(key::SECRET, name, &tomb).await?;
            }
            Kind::Config => {
                let mut tomb = view.configs.get(name).ok_or_else(not_found)?.clone();
                tomb.deleted = Some(self.tick());
                self.write_object(key::CONFIG, name, &tomb).await?;
            }
        }
        self.refresh().await;
        info!(kind = kind.word(), name, "removed");
        Ok(())
    }

    /// Opens what a task of this template is granted, or says which object is missing.
    pub(crate) fn task_files(&self, view: &View, template: &TaskTemplate) -> Result<TaskFiles> {
        let file = |r: &FileRef, data: Zeroizing<Vec<u8>>| TaskFile {
            target: r.target.clone(),
            data,
            uid: r.uid,
            gid: r.gid,
            mode: r.mode,
        };
        let mut secrets = Vec::new();
        if !template.secrets.is_empty() {
            let (ring, cluster) = self.keyring()?;
            for r in &template.secrets {
                let s = view
                    .secrets
                    .get(&r.source)
                    .ok_or_else(|| Error::NotFound(format!("secret {} not found", r.source)))?;
                let data = sealed::open(&ring, &cluster, &r.source, &s.spec.sealed)
                    .map_err(Error::Invalid)?;
                secrets.push(file(r, data));
            }
        }
        let mut configs = Vec::new();
        for r in &template.configs {
            let c = view
                .configs
                .get(&r.source)
                .ok_or_else(|| Error::NotFound(format!("config {} not found", r.source)))?;
            let data = BASE64.decode(&c.spec.data).map_err(|_| {
                Error::Invalid(format!("config {}: its data is not base64", r.source))
            })?;
            configs.push(file(r, Zeroizing::new(data)));
        }
        Ok(TaskFiles { secrets, configs })
    }

    /// After a key rotation, seals again under the new primary every secret this node can
    /// open under an older key, so the old key can be retired without stranding secrets.
    /// Several nodes may do it at once: each writes a valid copy and the newest update wins.
    pub(crate) async fn reseal_secrets(&self, view: &View) {
        // A worker's copy would be dropped by its peers: admins reseal.
        if self.role() != crate::roles::Role::Admin {
            return;
        }
        let Ok((ring, cluster)) = self.keyring() else {
            return;
        };
        let primary = ring.primary().id;
        for s in view.secrets.values() {
            if s.spec.sealed.key == primary || ring.get(s.spec.sealed.key).is_none() {
                continue;
            }
            let data = match sealed::open(&ring, &cluster, &s.spec.name, &s.spec.sealed) {
                Ok(d) => d,
                Err(e) => {
                    warn!("cannot reseal: {e}");
                    continue;
                }
            };
            let mut copy = s.clone();
            copy.spec.sealed = sealed::seal(&ring, &cluster, &s.spec.name, &data);
            copy.updated = self.tick();
            info!(secret = s.spec.name, key = %primary, "resealing the secret under the new primary key");
            if let Err(e) = self.write_object(key::SECRET, &s.spec.name, &copy).await {
                warn!(secret = s.spec.name, "resealing: {e}");
            }
        }
    }
}
