//! Secrets and configs as cluster objects: created once from any node (immutable, as in
//! Swarm: rotate by creating another name and switching services with `--secret-rm/-add`),
//! removed only while no service uses them, and opened on the node that starts a task.
//!
//! In a cluster with roles a secret reaches only the nodes that run a task granted it, as in
//! Swarm: `secret create` seals it to the admin key, and while a node runs (or its plan is
//! about to start) a task of a service using it, an admin writes that node a copy sealed to
//! the node's own key (`obj:secretcopy:<secret>@<node>`), and removes it once the node runs
//! none. A task whose copy has not arrived yet waits for it rather than failing. A cluster
//! without roles seals secrets under the cluster key, which every member holds.
//!
//! A service's registry credentials (`--with-registry-auth`, see `registry_auth`) travel the
//! same way: sealed to the admin key, copied to the nodes that run or are about to start the
//! service's tasks (the nodes that pull its image) as
//! `obj:secretcopy:registry-auth:<service>@<node>`.

use std::collections::BTreeMap;

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use tracing::{info, warn};
use zeroize::Zeroizing;

use super::{Agent, Error, Result};
use crate::{
    cluster::{ConfigSpec, Replicated, SecretCopy, SecretSpec, View, key},
    gossip::sealed,
    identity::{NodeIdentity, PublicKey},
    task::{TaskFile, TaskFiles},
};
use mesh_api::{
    id::Stamp,
    spec::{FileRef, MAX_FILE_OBJECT, ServiceSpec, TaskTemplate},
};

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
        // With roles, to the admin key only: workers get copies of their own (see the module
        // docs). Without, under the cluster key as before.
        let (sealed, admins) = match self.gossip.admin_key() {
            Some((admin, _)) => (
                None,
                Some(
                    sealed::seal_for_admins(&admin, &cluster, name, data)
                        .map_err(Error::Invalid)?,
                ),
            ),
            None => (Some(sealed::seal(&ring, &cluster, name, data)), None),
        };
        let spec = SecretSpec {
            name: name.to_owned(),
            labels,
            size: data.len(),
            sealed,
            admins,
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
        for r in &template.secrets {
            let s = view
                .secrets
                .get(&r.source)
                .ok_or_else(|| Error::NotFound(format!("secret {} not found", r.source)))?;
            secrets.push(file(r, self.open_for_task(view, s)?));
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

    /// Seals again what the cluster key opens: in a cluster with roles, to the admin key
    /// (secrets made before roles, which every member could open, are taken from the
    /// workers); otherwise, after a key rotation, under the new primary every secret sealed
    /// under an older key, so the old key can be retired without stranding secrets. Several
    /// admins may do it at once: each writes a valid copy and the newest update wins.
    pub(crate) async fn reseal_secrets(&self, view: &View) {
        // A worker's copy would be dropped by its peers: admins reseal.
        if self.role() != crate::roles::Role::Admin {
            return;
        }
        let Ok((ring, cluster)) = self.keyring() else {
            return;
        };
        let admin = self.gossip.admin_key().map(|(public, _)| public);
        let primary = ring.primary().id;
        for s in view.secrets.values() {
            let Some(old) = &s.spec.sealed else {
                continue;
            };
            if (admin.is_none() && old.key == primary) || ring.get(old.key).is_none() {
                continue;
            }
            let data = match sealed::open(&ring, &cluster, &s.spec.name, old) {
                Ok(d) => d,
                Err(e) => {
                    warn!("cannot reseal: {e}");
                    continue;
                }
            };
            let mut copy = s.clone();
            match &admin {
                Some(admin) => {
                    match sealed::seal_for_admins(admin, &cluster, &s.spec.name, &data) {
                        Ok(to_admins) => {
                            copy.spec.admins = Some(to_admins);
                            copy.spec.sealed = None;
                        }
                        Err(e) => {
                            warn!(secret = s.spec.name, "cannot reseal to the admin key: {e}");
                            continue;
                        }
                    }
                    info!(
                        secret = s.spec.name,
                        "resealing the secret to the admin key: workers get copies of their own"
                    );
                }
                None => {
                    copy.spec.sealed = Some(sealed::seal(&ring, &cluster, &s.spec.name, &data));
                }
            }
            copy.updated = self.tick();
            if admin.is_none() {
                info!(secret = s.spec.name, key = %primary, "resealing the secret under the new primary key");
            }
            if let Err(e) = self.write_object(key::SECRET, &s.spec.name, &copy).await {
                warn!(secret = s.spec.name, "resealing: {e}");
            }
        }
    }
}

/// What a task waits for while its node has no copy of a secret sealed to an admin only.
pub(crate) fn waiting_message(secret: &str) -> String {
    format!("waiting for secret {secret} to be sealed for this node by an admin")
}

/// What a task waits for while its node has no copy of its service's registry credentials.
pub(crate) fn registry_waiting_message(service: &str) -> String {
    format!(
        "waiting for the registry credentials of service {service} to be sealed for this node \
         by an admin"
    )
}

/// Whether a task's error is [`waiting_message`]'s or [`registry_waiting_message`]'s.
pub(crate) fn is_waiting_message(error: &str) -> bool {
    error.starts_with("waiting for ") && error.ends_with(" to be sealed for this node by an admin")
}

/// Whether `node` (speaking with `key`, when known) holds a copy of `name` made of `of`.
fn has_copy(view: &View, name: &str, node: &str, of: &Stamp, key: Option<&PublicKey>) -> bool {
    view.secret_copies
        .get(&key::secret_copy(name, node))
        .is_some_and(|c| c.spec.of == *of && key.is_none_or(|k| c.spec.key == *k))
}

/// The secret of `template`, or the registry credentials of `service`, that `node`
/// (speaking with `key`, when known) has no copy of and cannot open otherwise, as the message
/// its task waits with; `None` when everything can be opened, or a secret is missing
/// altogether (the start then fails, naming it). `opens_admin_form`: the node holds the
/// admin key.
pub(crate) fn waiting_for_copy(
    view: &View,
    node: &str,
    key: Option<&PublicKey>,
    service: &str,
    template: &TaskTemplate,
    opens_admin_form: bool,
) -> Option<String> {
    if opens_admin_form {
        return None;
    }
    let secret = template.secrets.iter().find_map(|r| {
        let s = view.secrets.get(&r.source)?;
        let copied = Copied::Secret(s);
        let of = copied.of()?;
        (!has_copy(view, &copied.name(), node, of, key)).then(|| waiting_message(&r.source))
    });
    secret.or_else(|| {
        let copied = Copied::of_registry_auth(&view.services.get(service)?.spec)?;
        let of = copied.of()?;
        (!has_copy(view, &copied.name(), node, of, key)).then(|| registry_waiting_message(service))
    })
}

/// What admins copy to a node, sealed to its key: a secret sealed to the admins, or a
/// service's registry credentials sealed to them.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Copied<'v> {
    Secret(&'v Replicated<SecretSpec>),
    RegistryAuth {
        service: &'v str,
        admins: &'v str,
        sealed_at: &'v Stamp,
    },
}

impl<'v> Copied<'v> {
    /// A service's registry credentials, when sealed to the admins.
    pub(crate) fn of_registry_auth(spec: &'v ServiceSpec) -> Option<Self> {
        let auth = spec.registry_auth.as_ref()?;
        Some(Copied::RegistryAuth {
            service: &spec.name,
            admins: auth.admins.as_deref()?,
            sealed_at: auth.sealed_at.as_ref()?,
        })
    }

    /// The name its seals are bound to and its copies named after (a secret's name has no
    /// `:`, so credentials' `registry-auth:<service>` never meets one).
    pub(crate) fn name(&self) -> String {
        match self {
            Copied::Secret(s) => s.spec.name.clone(),
            Copied::RegistryAuth { service, .. } => super::registry_auth::sealed_name(service),
        }
    }

    /// Which version a copy is of; `None` when every member opens it anyway (a secret under
    /// the cluster key): no copies then.
    fn of(&self) -> Option<&'v Stamp> {
        match self {
            Copied::Secret(s) => s.spec.sealed.is_none().then_some(&s.created),
            Copied::RegistryAuth { sealed_at, .. } => Some(sealed_at),
        }
    }
}

/// A copy an admin should keep: of what, for which node, sealed to which of its keys.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NeededCopy<'v> {
    pub what: Copied<'v>,
    pub node: &'v str,
    pub key: PublicKey,
}

/// Secrets the service's tasks are granted: its current template's and its previous one's
/// (a rollback, or a task of the old template still running in a rolling update).
fn service_secrets(spec: &ServiceSpec) -> impl Iterator<Item = &str> {
    spec.task
        .iter()
        .chain(spec.previous.iter().filter_map(|p| p.task.as_ref()))
        .flat_map(|t| t.secrets.iter().map(|r| r.source.as_str()))
}

/// The copies admins should keep, by record name (`<name>@<node>`).
type Needed<'v> = BTreeMap<String, NeededCopy<'v>>;

/// Every node's copies it needs: of each secret sealed to the admins only, for every node
/// that holds a live task of a service granted it (task records) or is about to start one
/// (and of a service's registry credentials sealed to the admins, for the same nodes: those
/// that pull its image)
/// (the plans every node computes alike), so the copy is on its way while the node places
/// the task. Never for a node whose record carries no key (it could not open it, and a
/// record without a key is from before node keys), nor for a node gone from the view.
pub(crate) fn copies_needed<'v>(
    view: &'v View,
    plans: &BTreeMap<&'v str, mesh_planner::Plan>,
) -> Needed<'v> {
    let mut needed = Needed::new();
    let mut add = |service: &str, node: &str| {
        let Some((service, n)) = view.services.get(service).zip(view.nodes.get(node)) else {
            return;
        };
        let Some(key) = n.record.as_ref().and_then(|r| r.key) else {
            return;
        };
        let secrets = service_secrets(&service.spec)
            .filter_map(|secret| view.secrets.get(secret))
            .map(Copied::Secret);
        for what in secrets.chain(Copied::of_registry_auth(&service.spec)) {
            if what.of().is_some() {
                let node = n.name.as_str();
                needed.insert(
                    key::secret_copy(&what.name(), node),
                    NeededCopy { what, node, key },
                );
            }
        }
    };
    for t in view.tasks.iter().filter(|t| t.is_live()) {
        add(&t.service, &t.node);
    }
    for (service, plan) in plans {
        for s in &plan.slots {
            if let mesh_planner::SlotPlacement::Start { node } = &s.placement {
                add(service, node);
            }
        }
    }
    needed
}

impl Agent {
    /// The admin key's secret half, on admins that hold `admin.key`.
    fn admin_secret(&self) -> Option<NodeIdentity> {
        let (_, seed) = self.gossip.admin_key()?;
        seed.map(|s| NodeIdentity::from_seed(&s))
    }

    /// Opens a secret's shared form: under the cluster key (clusters without roles, secrets
    /// made before roles), or sealed to the admin key, with `admin.key`. What admins use to
    /// write copies and to compare a stack's secrets; a worker's own tasks use its copy.
    pub(crate) fn open_secret(&self, spec: &SecretSpec) -> Result<Zeroizing<Vec<u8>>> {
        let (ring, cluster) = self.keyring()?;
        if let Some(old) = &spec.sealed {
            return sealed::open(&ring, &cluster, &spec.name, old).map_err(Error::Invalid);
        }
        let Some(to_admins) = &spec.admins else {
            return Err(Error::Invalid(format!(
                "secret {} carries no data (written by a newer agent?)",
                spec.name
            )));
        };
        self.open_admin_form(&spec.name, to_admins)
    }

    /// Opens what is sealed to the admin key under `name`, with `admin.key`.
    pub(crate) fn open_admin_form(
        &self,
        name: &str,
        to_admins: &str,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let (_, cluster) = self.keyring()?;
        let Some(admin) = self.admin_secret() else {
            return Err(Error::Forbidden(format!(
                "{name} is sealed to the admin key, and node {} holds no {}: only admins \
                 holding it open it; other nodes get a copy sealed to their own key while they \
                 run a task that needs it",
                self.node_name(),
                crate::roles::ADMIN_KEY_FILE
            )));
        };
        sealed::open_for_admins(&admin, &cluster, name, to_admins).map_err(Error::Invalid)
    }

    /// What an admin copies to a node, opened from its admin form.
    fn open_copied(&self, what: &Copied<'_>) -> Result<Zeroizing<Vec<u8>>> {
        match what {
            Copied::Secret(s) => self.open_secret(&s.spec),
            Copied::RegistryAuth { admins, .. } => self.open_admin_form(&what.name(), admins),
        }
    }

    /// This node's own copy of `name`, made of `of` for its key, opened; `None` without one.
    /// An admin-signed copy that does not open is counted, and the caller goes on without.
    pub(crate) fn open_own_copy(
        &self,
        view: &View,
        name: &str,
        of: &Stamp,
    ) -> Option<Zeroizing<Vec<u8>>> {
        let me = self.node_name();
        let mine = self.gossip.identity();
        let copy = view.secret_copies.get(&key::secret_copy(name, me))?;
        if copy.spec.of != *of || copy.spec.key != mine.public() {
            return None;
        }
        let (_, cluster) = self.keyring().ok()?;
        let opened = sealed::open_copy(mine, &cluster, name, me, &copy.spec.data);
        if opened.is_none() {
            self.secret_copies_refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            warn!(name, "this node's copy does not open with its key");
        }
        opened
    }

    /// A secret for a task starting on this node: its own copy, sealed to its key; or the
    /// shared form when this node opens it. Without either, the message the task waits with.
    fn open_for_task(&self, view: &View, s: &Replicated<SecretSpec>) -> Result<Zeroizing<Vec<u8>>> {
        let name = &s.spec.name;
        if let Some(data) = self.open_own_copy(view, name, &s.created) {
            return Ok(data);
        }
        if s.spec.sealed.is_some() || self.admin_secret().is_some() {
            return self.open_secret(&s.spec);
        }
        Err(Error::Conflict(waiting_message(name)))
    }

    /// The secrets and configs of a task started by hand into a service (`meshctl run
    /// --service`): the service's, when this node opens them. A node gets a secret's copy
    /// only when the service places a task on it, so on a worker without one the start is
    /// refused rather than waiting for a copy no admin will write.
    pub(crate) fn hand_started_files(
        &self,
        view: &View,
        req: &mesh_api::v1::TaskRun,
    ) -> Result<TaskFiles> {
        let Some(template) = req
            .service
            .as_ref()
            .and_then(|s| view.services.get(s))
            .and_then(|s| s.spec.task.as_ref())
        else {
            return Ok(TaskFiles::default());
        };
        self.task_files(view, template).map_err(|e| match e {
            Error::Conflict(_) | Error::Forbidden(_) => {
                let service = req.service.as_deref().unwrap_or_default();
                let secrets: Vec<&str> =
                    template.secrets.iter().map(|r| r.source.as_str()).collect();
                Error::Forbidden(format!(
                    "task {} joins service {service}, which is granted secret(s) {}, and node \
                     {} has no copy of them: an admin seals a secret only to the nodes the \
                     service places its tasks on. Let the service place the task (`meshctl \
                     service scale {service}=N`, or a placement constraint) instead of \
                     starting it by hand",
                    req.name,
                    secrets.join(", "),
                    self.node_name()
                ))
            }
            e => e,
        })
    }

    /// The message a task of `service` with `template` waits with on this node, if a copy
    /// is missing.
    pub(crate) fn copies_waiting(
        &self,
        view: &View,
        service: &str,
        template: &TaskTemplate,
    ) -> Option<String> {
        waiting_for_copy(
            view,
            self.node_name(),
            Some(&self.gossip.public_key()),
            service,
            template,
            self.admin_secret().is_some(),
        )
    }

    /// As an admin holding `admin.key`: writes the copies nodes need and removes the ones no
    /// node needs any more (see [`copies_needed`]).
    ///
    /// One admin writes each copy: the coordinator `mesh_planner` picks among ready admins
    /// for the copy's name, so copies spread over admins and a copy is not written by every
    /// admin at once. Should two admins' views disagree on who that is, both write a valid
    /// copy and the merge keeps the first created (see `cluster::replicated`).
    pub(crate) async fn place_secret_copies(&self, view: &View) {
        if !self.gossip.has_roles() || self.role() != crate::roles::Role::Admin {
            return;
        }
        let Some(_) = self.admin_secret() else {
            return;
        };
        let anything_to_copy = !view.secret_copies.is_empty()
            || view.secrets.values().any(|s| s.spec.sealed.is_none())
            || view
                .services
                .values()
                .any(|s| Copied::of_registry_auth(&s.spec).is_some());
        if !anything_to_copy {
            return;
        }
        let Ok((_, cluster)) = self.keyring() else {
            return;
        };
        let nodes = view.planner_nodes();
        let plans = super::orchestrate::plans_at(view, &nodes, crate::cluster::Clock::now_ms());
        let needed = copies_needed(view, &plans);
        let me = self.node_name();
        let mine = |name: &str| mesh_planner::coordinator(name, &nodes) == Some(me);
        for (name, NeededCopy { what, node, key }) in &needed {
            let Some(of) = what.of() else {
                continue;
            };
            let secret = &what.name();
            let current = view.secret_copies.get(name);
            if current.is_some_and(|c| c.spec.key == *key && c.spec.of == *of) || !mine(name) {
                continue;
            }
            let data = match self.open_copied(what) {
                Ok(d) => d,
                Err(e) => {
                    warn!(secret, node, "cannot copy the secret for the node: {e}");
                    continue;
                }
            };
            let sealed = match sealed::seal_copy(key, &cluster, secret, node, &data) {
                Ok(b) => b,
                Err(e) => {
                    warn!(
                        secret,
                        node, "cannot seal the secret to the node's key: {e}"
                    );
                    continue;
                }
            };
            let spec = SecretCopy {
                secret: secret.clone(),
                node: (*node).to_owned(),
                key: *key,
                of: of.clone(),
                data: sealed,
            };
            // A copy for an older key or secret is updated in place: a new incarnation would
            // lose to the older one (the first created wins).
            let record = match current {
                Some(c) => Replicated {
                    spec,
                    updated: self.tick(),
                    ..c.clone()
                },
                None => Replicated::new(spec, self.tick()),
            };
            info!(
                secret,
                node, "sealing the secret to the node that runs its task"
            );
            if let Err(e) = self.write_object(key::SECRET_COPY, name, &record).await {
                warn!(secret, node, "writing the node's copy of the secret: {e}");
            }
        }
        for (name, c) in &view.secret_copies {
            if needed.contains_key(name) || !mine(name) {
                continue;
            }
            let mut tomb = c.clone();
            tomb.deleted = Some(self.tick());
            info!(
                secret = c.spec.secret,
                node = c.spec.node,
                "removing the node's copy of the secret: it runs no task granted it"
            );
            if let Err(e) = self.write_object(key::SECRET_COPY, name, &tomb).await {
                warn!(secret = c.spec.secret, "removing a node's copy: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::cluster::{NodeRecord, NodeSpec, NodeView};
    use mesh_api::{id::Stamp, spec::NodeStatus};
    use mesh_planner::{DesiredState, Plan, Slot, SlotPlacement, SlotPlan, Task, TaskState};

    fn stamp(ms: u64) -> Stamp {
        Stamp {
            ms,
            node: "n1".into(),
        }
    }

    fn node(name: &str, key: Option<PublicKey>) -> NodeView {
        NodeView {
            name: name.into(),
            record: Some(NodeRecord {
                name: name.into(),
                hostname: name.into(),
                address: Ipv4Addr::new(192, 0, 2, 1),
                mtu: 1500,
                agent_version: "test".into(),
                drivers: vec![mesh_api::spec::DRIVER_PROCESS.into()],
                labels: BTreeMap::new(),
                reserved_ports: Vec::new(),
                platform: Default::default(),
                capacity: Default::default(),
                insecure: false,
                key,
                grant: None,
            }),
            spec: NodeSpec::default(),
            status: NodeStatus::Ready,
            role: mesh_planner::Role::Worker,
        }
    }

    fn task(id: &str, service: &str, node: &str, desired: DesiredState) -> Task {
        Task {
            id: id.into(),
            service: service.into(),
            slot: Slot::Replica(1),
            node: node.into(),
            spec_version: 1,
            template: 1,
            desired,
            state: TaskState::Running,
            created_ms: 100,
            since_ms: 100,
            error: None,
            exit_code: None,
            attempt: 0,
            window_start_ms: 0,
            not_before_ms: None,
            running_ms: None,
            holds_slot: false,
            reservation: Default::default(),
        }
    }

    fn secret(name: &str, cluster_form: bool) -> Replicated<SecretSpec> {
        Replicated::new(
            SecretSpec {
                name: name.into(),
                labels: BTreeMap::new(),
                size: 1,
                sealed: cluster_form.then(|| crate::cluster::Sealed {
                    key: mesh_api::v1::KeyId(1),
                    data: String::new(),
                }),
                admins: (!cluster_form).then(|| "sealed".into()),
            },
            stamp(1),
        )
    }

    fn service(name: &str, secrets: &[&str]) -> Replicated<ServiceSpec> {
        let template = TaskTemplate {
            secrets: secrets
                .iter()
                .map(|s| FileRef {
                    source: (*s).into(),
                    target: (*s).into(),
                    uid: 0,
                    gid: 0,
                    mode: 0o444,
                })
                .collect(),
            ..TaskTemplate::default()
        };
        Replicated::new(
            ServiceSpec {
                name: name.into(),
                task: Some(template),
                ..ServiceSpec::default()
            },
            stamp(2),
        )
    }

    /// Copies go to the nodes that run a task granted the secret or are planned to start
    /// one; never to a node without a key, a node gone from the view, for a stopped task, or
    /// for a secret every member opens anyway (the cluster-key form).
    #[test]
    fn copies_go_only_to_keyed_nodes_that_run_or_start_a_granted_task() {
        let key = |seed: u8| NodeIdentity::from_seed(&[seed; 32]).public();
        let mut view = View::default();
        for (name, k) in [
            ("runs", Some(key(1))),
            ("starts", Some(key(2))),
            ("keyless", None),
            ("stopped", Some(key(3))),
            ("other", Some(key(4))),
        ] {
            view.nodes.insert(name.into(), node(name, k));
        }
        view.secrets.insert("pw".into(), secret("pw", false));
        view.secrets.insert("old".into(), secret("old", true));
        view.services
            .insert("db".into(), service("db", &["pw", "old"]));
        view.services.insert("web".into(), service("web", &[]));
        view.tasks = vec![
            task("t1", "db", "runs", DesiredState::Running),
            task("t2", "db", "keyless", DesiredState::Running),
            task("t3", "db", "stopped", DesiredState::Shutdown),
            task("t4", "db", "removed", DesiredState::Running),
            task("t5", "web", "other", DesiredState::Running),
        ];
        let plan = Plan {
            slots: vec![SlotPlan {
                slot: Slot::Replica(2),
                placement: SlotPlacement::Start {
                    node: "starts".into(),
                },
            }],
            stops: Vec::new(),
        };
        let plans = BTreeMap::from([("db", plan)]);
        let needed = copies_needed(&view, &plans);
        assert_eq!(
            needed.keys().collect::<Vec<_>>(),
            ["pw@runs", "pw@starts"],
            "{needed:?}"
        );
        let pw = &needed["pw@runs"];
        assert_eq!(
            (pw.what.name(), pw.node, pw.key),
            ("pw".into(), "runs", key(1))
        );
        assert_eq!(needed["pw@starts"].key, key(2));

        // A task waits for its node's copy, made for its key and this incarnation only.
        let tpl = view.services["db"].spec.task.clone().unwrap();
        let waiting = waiting_for_copy(&view, "runs", Some(&key(1)), "db", &tpl, false);
        assert_eq!(waiting.as_deref(), Some(waiting_message("pw").as_str()));
        assert!(is_waiting_message(&waiting_message("pw")));
        let copy = |k: PublicKey, of: Stamp| {
            Replicated::new(
                SecretCopy {
                    secret: "pw".into(),
                    node: "runs".into(),
                    key: k,
                    of,
                    data: String::new(),
                },
                stamp(3),
            )
        };
        view.secret_copies
            .insert("pw@runs".into(), copy(key(9), stamp(1)));
        assert!(waiting_for_copy(&view, "runs", Some(&key(1)), "db", &tpl, false).is_some());
        view.secret_copies
            .insert("pw@runs".into(), copy(key(1), stamp(0)));
        assert!(waiting_for_copy(&view, "runs", Some(&key(1)), "db", &tpl, false).is_some());
        view.secret_copies
            .insert("pw@runs".into(), copy(key(1), stamp(1)));
        assert_eq!(
            waiting_for_copy(&view, "runs", Some(&key(1)), "db", &tpl, false),
            None
        );
        // An admin holding the admin key opens the shared form itself.
        assert_eq!(
            waiting_for_copy(&view, "starts", Some(&key(2)), "db", &tpl, true),
            None
        );
    }

    fn registry_auth(admins: bool) -> mesh_api::spec::SealedRegistryAuth {
        mesh_api::spec::SealedRegistryAuth {
            registry: "registry.example:5000".into(),
            key: 1,
            data: String::new(),
            admins: admins.then(|| "sealed".into()),
            sealed_at: admins.then(|| stamp(7)),
        }
    }

    /// A service's registry credentials sealed to the admins are copied to exactly the nodes
    /// that run or are about to start its tasks (the nodes that pull its image), under a name
    /// no secret can take; credentials under the cluster key get no copies. A task on a node
    /// without its copy waits, saying whose credentials; new credentials need a new copy.
    #[test]
    fn registry_credentials_are_copied_only_to_the_nodes_that_pull_the_image() {
        let key = |seed: u8| NodeIdentity::from_seed(&[seed; 32]).public();
        let mut view = View::default();
        for (name, k) in [
            ("runs", Some(key(1))),
            ("starts", Some(key(2))),
            ("stopped", Some(key(3))),
            ("other", Some(key(4))),
        ] {
            view.nodes.insert(name.into(), node(name, k));
        }
        let mut web = service("web", &[]);
        web.spec.registry_auth = Some(registry_auth(true));
        view.services.insert("web".into(), web);
        let mut old = service("old", &[]);
        old.spec.registry_auth = Some(registry_auth(false));
        view.services.insert("old".into(), old);
        view.services.insert("api".into(), service("api", &[]));
        view.tasks = vec![
            task("t1", "web", "runs", DesiredState::Running),
            task("t2", "web", "stopped", DesiredState::Shutdown),
            task("t3", "old", "other", DesiredState::Running),
            task("t4", "api", "other", DesiredState::Running),
        ];
        let plan = Plan {
            slots: vec![SlotPlan {
                slot: Slot::Replica(2),
                placement: SlotPlacement::Start {
                    node: "starts".into(),
                },
            }],
            stops: Vec::new(),
        };
        let plans = BTreeMap::from([("web", plan)]);
        let needed = copies_needed(&view, &plans);
        assert_eq!(
            needed.keys().collect::<Vec<_>>(),
            ["registry-auth:web@runs", "registry-auth:web@starts"],
            "{needed:?}"
        );
        let c = &needed["registry-auth:web@runs"];
        assert_eq!((c.node, c.key), ("runs", key(1)));
        assert!(matches!(
            c.what,
            Copied::RegistryAuth { service: "web", sealed_at, .. } if *sealed_at == stamp(7)
        ));
        assert!(
            validate_object_name(Kind::Secret, &c.what.name()).is_err(),
            "no secret can be named like a service's credentials"
        );

        let tpl = TaskTemplate::default();
        let waiting = waiting_for_copy(&view, "runs", Some(&key(1)), "web", &tpl, false);
        assert_eq!(
            waiting.as_deref(),
            Some(registry_waiting_message("web").as_str())
        );
        assert!(is_waiting_message(&registry_waiting_message("web")));
        let copy = |of: Stamp| {
            Replicated::new(
                SecretCopy {
                    secret: "registry-auth:web".into(),
                    node: "runs".into(),
                    key: key(1),
                    of,
                    data: String::new(),
                },
                stamp(3),
            )
        };
        view.secret_copies
            .insert("registry-auth:web@runs".into(), copy(stamp(6)));
        assert!(
            waiting_for_copy(&view, "runs", Some(&key(1)), "web", &tpl, false).is_some(),
            "a copy of older credentials does not do"
        );
        view.secret_copies
            .insert("registry-auth:web@runs".into(), copy(stamp(7)));
        assert_eq!(
            waiting_for_copy(&view, "runs", Some(&key(1)), "web", &tpl, false),
            None
        );
        // Under the cluster key, or without credentials, nothing to wait for.
        assert_eq!(
            waiting_for_copy(&view, "other", Some(&key(4)), "old", &tpl, false),
            None
        );
        assert_eq!(
            waiting_for_copy(&view, "other", Some(&key(4)), "api", &tpl, false),
            None
        );
    }
}
