//! Services as objects: create, update, scale and remove, from any node. Every request is
//! checked whole before anything is written, so a rejected command changes nothing; a
//! change is one replicated write, and a concurrent change of the same service from another
//! node is detected after the settle time and reported to the loser.

use std::collections::{BTreeSet, HashSet};

use mesh_planner::{MAX_REPLICAS, ServiceMode, UpdateConfig};
use tracing::info;

use super::{Agent, Error, Result, attachments, ports::PortAssigner, rollout, validate_name};
use crate::cluster::{Clock, Replicated, View, key};
use mesh_api::{
    spec::{
        DRIVER_PODMAN, EndpointMode, PortSpec, Protocol, ServiceSpec, TaskTemplate,
        UpdateConfigChange, UpdateState,
    },
    v1::{ServiceCreate, ServiceScale, ServiceUpdate},
};

/// The network a service joins when none is named (Swarm's `ingress` role).
pub const DEFAULT_NETWORK: &str = "ingress";

impl Agent {
    pub async fn create_service(&self, req: &ServiceCreate) -> Result<Replicated<ServiceSpec>> {
        let mut spec = new_spec(&req.spec)?;
        // The agent seals credentials itself; a sealed form sent in the spec is not taken.
        spec.registry_auth = match &req.registry_auth {
            Some(auth) => Some(self.seal_registry_auth(&spec, auth)?),
            None => None,
        };
        let name = spec.name.clone();
        let name = name.as_str();
        let view = self.refresh().await;
        if view.services.contains_key(name) {
            return Err(Error::Conflict(format!(
                "service {name} already exists: change it with `meshctl service update {name}`, \
                 or remove it first"
            )));
        }
        PortAssigner::new(&view, &BTreeSet::from([name])).assign(&mut spec, None)?;
        check_ports(&view, name, &spec.ports)?;
        check_file_refs(&view, &spec)?;
        self.check_bind_sources(&spec, None)?;
        super::volumes::check_volume_drivers(&view.services, &[&spec])?;
        if !req.no_resolve_image {
            self.resolve_image(&view, &spec, None).await?;
        }
        let view = if req.spec.network.is_empty() {
            self.default_network(view).await?;
            self.refresh().await
        } else {
            view
        };
        attachments::check_networks_exist(&view, &spec)?;
        attachments::check_alias_conflicts(&view, &spec)?;
        let network = spec.network.clone();
        let vips = self.allocate_vips(&mut spec).await?;
        let vip = spec.vip;
        spec.version = 1;
        spec.template_version = 1;
        let stamp = self.tick();
        let record = Replicated::new(spec, stamp.clone());
        if let Err(e) = self.write_object(key::SERVICE, name, &record).await {
            self.release_all(vips).await;
            return Err(e);
        }
        let view = self.settle().await;
        self.release_all(vips).await;
        match view.services.get(name) {
            Some(s) if s.created == stamp => {
                info!(service = name, network, ?vip, mode = ?s.spec.mode, "service created");
                self.poke();
                Ok(s.clone())
            }
            Some(s) => Err(Error::Conflict(format!(
                "service {name} was created at the same time on node {}, whose create came first",
                s.created.node
            ))),
            None => {
                let reason = view
                    .service_conflicts
                    .iter()
                    .find(|c| c.object.created == stamp)
                    .map(|c| c.reason.clone())
                    .unwrap_or_else(|| "it conflicted with a concurrent change".into());
                Err(Error::Conflict(format!(
                    "service {name} was not created: {reason}"
                )))
            }
        }
    }

    /// Docker's image resolution before a spec with a new image is written: refused when
    /// neither this node nor the image's registry has it. A node without podman cannot look
    /// (Docker's CLI then warns and goes on; so does this, with each node pulling).
    /// With `auth`, or else the credentials the spec carries.
    pub(crate) async fn resolve_image(
        &self,
        view: &View,
        spec: &ServiceSpec,
        auth: Option<&mesh_api::v1::RegistryAuth>,
    ) -> Result<()> {
        let Some(image) = image_of(spec) else {
            return Ok(());
        };
        let podman_here = view
            .nodes
            .get(self.node_name())
            .and_then(|n| n.record.as_ref())
            .is_some_and(|r| r.drivers.iter().any(|d| d == DRIVER_PODMAN));
        if !podman_here {
            return Ok(());
        }
        let carried = self.registry_credentials(spec, image);
        let auth = auth.or(carried.as_ref());
        crate::task::resolve_image(image, auth)
            .await
            .map_err(|why| {
                Error::Invalid(format!(
                    "image {image} could not be found on this node or its registry: {why}. Check \
                 its name and tag (or pass --no-resolve-image to leave each node to pull it)"
                ))
            })
    }

    /// A VIP on each of the service's networks that has none yet (vip mode). Returns what
    /// it reserved, to release once the spec is written (or was refused).
    async fn allocate_vips(
        &self,
        spec: &mut ServiceSpec,
    ) -> Result<Vec<(String, std::net::Ipv4Addr)>> {
        let mut reserved = Vec::new();
        if spec.endpoint_mode != EndpointMode::Vip {
            return Ok(reserved);
        }
        let wanted: Vec<String> = spec
            .attachments()
            .into_iter()
            .filter(|a| a.vip.is_none())
            .map(|a| a.target)
            .collect();
        for network in wanted {
            let ip = match self.allocate(&network).await {
                Ok(ip) => ip,
                Err(e) => {
                    self.release_all(reserved).await;
                    return Err(e);
                }
            };
            if network == spec.network {
                spec.vip = Some(ip);
            } else if let Some(a) = spec.networks.iter_mut().find(|a| a.target == network) {
                a.vip = Some(ip);
            }
            reserved.push((network, ip));
        }
        Ok(reserved)
    }

    async fn release_all(&self, reserved: Vec<(String, std::net::Ipv4Addr)>) {
        for (network, ip) in reserved {
            self.release(&network, ip).await;
        }
    }

    /// The default network, created on first use; a concurrent create elsewhere is fine
    /// (whichever won is the network).
    async fn default_network(&self, view: std::sync::Arc<View>) -> Result<()> {
        if view.networks.contains_key(DEFAULT_NETWORK) {
            return Ok(());
        }
        match self
            .create_network(DEFAULT_NETWORK, None, &Default::default())
            .await
        {
            Ok(_) | Err(Error::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
        if !self.refresh().await.networks.contains_key(DEFAULT_NETWORK) {
            return Err(Error::Conflict(format!(
                "the default network {DEFAULT_NETWORK} could not be created: pass --network"
            )));
        }
        Ok(())
    }

    pub async fn update_service(
        &self,
        name: &str,
        req: &ServiceUpdate,
    ) -> Result<Replicated<ServiceSpec>> {
        let view = self.refresh().await;
        let current = view.services.get(name).ok_or_else(|| not_found(name))?;
        let mut spec = apply_update(&current.spec, req)?;
        if let Some(auth) = &req.registry_auth {
            spec.registry_auth = Some(self.seal_registry_auth(&spec, auth)?);
        }
        self.check_and_write(
            &view,
            current,
            spec,
            !req.no_resolve_image,
            "service updated",
        )
        .await
    }

    /// A changed spec of an existing service, however it was asked for (meshctl's update,
    /// Docker's whole spec): checked as every change is, and written unless it is no change.
    async fn check_and_write(
        &self,
        view: &View,
        current: &Replicated<ServiceSpec>,
        mut spec: ServiceSpec,
        resolve_image: bool,
        done: &str,
    ) -> Result<Replicated<ServiceSpec>> {
        let name = current.spec.name.as_str();
        PortAssigner::new(view, &BTreeSet::from([name])).assign(&mut spec, Some(&current.spec))?;
        check_file_refs(view, &spec)?;
        self.check_bind_sources(&spec, Some(&current.spec))?;
        super::volumes::check_volume_drivers(&view.services, &[&spec])?;
        if spec.attachments() != current.spec.attachments() {
            attachments::check_networks_exist(view, &spec)?;
            attachments::check_alias_conflicts(view, &spec)?;
        }
        if spec.ports != current.spec.ports {
            check_ports(view, name, &spec.ports)?;
        }
        if spec == current.spec {
            return Ok(current.clone());
        }
        if resolve_image && image_of(&spec) != image_of(&current.spec) {
            self.resolve_image(view, &spec, None).await?;
        }
        let record = self.write_change(current, spec).await?;
        info!(service = name, version = record.spec.version, "{done}");
        Ok(record)
    }

    /// A whole new spec for an existing service, as Docker's `service update` sends one:
    /// `build` makes it from the current spec. Checked as a stack redeploy's spec (identity,
    /// address and history kept; a changed template rolls out) and written as every change.
    /// `version` is the spec version the caller read: another one means someone changed the
    /// service meanwhile, and nothing is written (Swarm's "update out of sequence").
    pub async fn replace_service(
        &self,
        name: &str,
        version: Option<u64>,
        build: impl FnOnce(&ServiceSpec) -> Result<ServiceSpec>,
    ) -> Result<Replicated<ServiceSpec>> {
        let view = self.refresh().await;
        let current = view.services.get(name).ok_or_else(|| not_found(name))?;
        if let Some(v) = version
            && v != current.spec.version
        {
            return Err(Error::Conflict(format!(
                "update out of sequence: service {name} is at version {}, not {v}; inspect it \
                 again and retry",
                current.spec.version
            )));
        }
        let requested = build(&current.spec)?;
        if requested.name != current.spec.name {
            return Err(Error::Invalid(format!(
                "service {name} cannot be renamed to {}: renaming services is not supported",
                requested.name
            )));
        }
        let force = requested.force_update;
        let mut spec = super::stacks::redeployed(&current.spec, new_spec(&requested)?)?;
        if !spec.mode.is_job() && force != current.spec.force_update {
            let rolling = spec.template_id() != current.spec.template_id();
            spec.force_update = force;
            if !rolling {
                rollout::start_rollout(&mut spec, &current.spec, Clock::now_ms());
            }
        }
        // Checked as a meshctl update is: bind sources, volume drivers and a new image too.
        self.check_and_write(&view, current, spec, true, "service replaced")
            .await
    }

    /// Scales every named service, or none: all are checked before any is written.
    pub async fn scale_services(&self, req: &ServiceScale) -> Result<Vec<Replicated<ServiceSpec>>> {
        if req.replicas.is_empty() {
            return Err(Error::Invalid(
                "nothing to scale: name SERVICE=REPLICAS, e.g. meshctl service scale web=5".into(),
            ));
        }
        let view = self.refresh().await;
        let mut changes = Vec::new();
        let unknown: Vec<&str> = req
            .replicas
            .keys()
            .filter(|n| !view.services.contains_key(*n))
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            return Err(Error::NotFound(format!(
                "no service named {} (see `meshctl service ls`): nothing was scaled",
                unknown.join(", ")
            )));
        }
        for (name, n) in &req.replicas {
            let current = &view.services[name];
            let spec = apply_update(
                &current.spec,
                &ServiceUpdate {
                    replicas: Some(*n),
                    ..Default::default()
                },
            )
            .map_err(|e| match e {
                Error::Invalid(m) => Error::Invalid(format!("{m}: nothing was scaled")),
                e => e,
            })?;
            changes.push((current.clone(), spec));
        }
        let mut done = Vec::new();
        for (current, spec) in changes {
            if spec == current.spec {
                done.push(current);
                continue;
            }
            let record = self.write_change(&current, spec).await?;
            info!(service = record.spec.name, mode = ?record.spec.mode, "service scaled");
            done.push(record);
        }
        Ok(done)
    }

    /// [`Agent::write_change`] for a spec built elsewhere (a stack redeploy).
    pub(crate) async fn write_service_change(
        &self,
        current: &Replicated<ServiceSpec>,
        spec: ServiceSpec,
    ) -> Result<Replicated<ServiceSpec>> {
        self.write_change(current, spec).await
    }

    /// Writes a new version of a service and reports a concurrent change that won.
    async fn write_change(
        &self,
        current: &Replicated<ServiceSpec>,
        mut spec: ServiceSpec,
    ) -> Result<Replicated<ServiceSpec>> {
        let name = spec.name.clone();
        // A network joined gets its VIP now.
        let vips = self.allocate_vips(&mut spec).await?;
        spec.version = current.spec.version + 1;
        let stamp = self.tick();
        let mut record = current.clone();
        record.spec = spec;
        record.updated = stamp.clone();
        record.deleted = None;
        if let Err(e) = self.write_object(key::SERVICE, &name, &record).await {
            self.release_all(vips).await;
            return Err(e);
        }
        let view = self.settle().await;
        self.release_all(vips).await;
        self.poke();
        let without_status = |s: &ServiceSpec| ServiceSpec {
            update_status: None,
            previous: None,
            ..s.clone()
        };
        match view.services.get(&name) {
            Some(s) if s.updated == stamp => Ok(s.clone()),
            // The coordinator recorded the rollout's progress on top of this change (or
            // already rolled it back): the change stands.
            Some(s)
                if without_status(&s.spec) == without_status(&record.spec)
                    || s.spec.previous.as_deref().map(without_status)
                        == Some(without_status(&record.spec)) =>
            {
                Ok(s.clone())
            }
            Some(s) if s.created == current.created => Err(Error::Conflict(format!(
                "service {name} was changed at the same time from node {}, and that change won \
                 (it is now version {}{}); look at `meshctl service inspect {name}` and run your \
                 command again if it is still needed",
                s.updated.node,
                s.spec.version,
                match s.spec.mode {
                    ServiceMode::Replicated { replicas } => format!(", replicas={replicas}"),
                    ServiceMode::ReplicatedJob { completions, .. } =>
                        format!(", replicas={completions}"),
                    ServiceMode::Global | ServiceMode::GlobalJob => String::new(),
                }
            ))),
            _ => Err(Error::Conflict(format!(
                "service {name} was removed or re-created while it was being changed"
            ))),
        }
    }

    pub async fn remove_service(&self, name: &str) -> Result<()> {
        let view = self.refresh().await;
        let svc = view.services.get(name).ok_or_else(|| not_found(name))?;
        let mut tomb = svc.clone();
        tomb.deleted = Some(self.tick());
        self.write_object(key::SERVICE, name, &tomb).await?;
        self.refresh().await;
        self.poke();
        info!(service = name, "service removed");
        Ok(())
    }
}

fn not_found(name: &str) -> Error {
    Error::NotFound(format!(
        "service {name} not found (see `meshctl service ls`)"
    ))
}

/// A published port may belong to one service only.
fn check_ports(view: &View, name: &str, ports: &[PortSpec]) -> Result<()> {
    let mut seen = HashSet::new();
    for p in ports {
        let Some(published) = p.published else {
            continue;
        };
        if !seen.insert((p.protocol, published)) {
            return Err(Error::Invalid(format!(
                "port {published}/{} is published twice",
                p.protocol
            )));
        }
        if p.protocol == Protocol::Udp && published == crate::overlay::VXLAN_PORT {
            return Err(Error::Invalid(format!(
                "port {published}/udp carries the overlay (VXLAN) on every node and cannot be \
                 published: choose another port"
            )));
        }
        if let Some((node, r)) = view.nodes.values().find_map(|n| {
            let r = n
                .record
                .as_ref()?
                .reserved_ports
                .iter()
                .find(|r| r.protocol == p.protocol && r.port == published)?;
            Some((&n.name, r))
        }) {
            return Err(Error::Invalid(format!(
                "port {published}/{} is used by {} on node {node} and cannot be published: \
                 choose another port",
                p.protocol, r.used_by
            )));
        }
        if let Some(owner) = view.services.values().find(|s| {
            s.spec.name != name
                && s.spec
                    .ports
                    .iter()
                    .any(|q| q.protocol == p.protocol && q.published == Some(published))
        }) {
            return Err(Error::Conflict(format!(
                "port {published}/{} is already published by service {}",
                p.protocol, owner.spec.name
            )));
        }
    }
    Ok(())
}

/// Every secret and config the tasks are granted exists, and no two land on one path.
pub(crate) fn check_file_refs(view: &View, spec: &ServiceSpec) -> Result<()> {
    let Some(t) = &spec.task else {
        return Ok(());
    };
    for r in &t.secrets {
        if !view.secrets.contains_key(&r.source) {
            return Err(Error::NotFound(format!(
                "secret {} not found: create it with `meshctl secret create {} FILE`",
                r.source, r.source
            )));
        }
    }
    for r in &t.configs {
        if !view.configs.contains_key(&r.source) {
            return Err(Error::NotFound(format!(
                "config {} not found: create it with `meshctl config create {} FILE`",
                r.source, r.source
            )));
        }
    }
    Ok(())
}

/// Two grants on one path would hide one of them.
fn check_targets(t: &TaskTemplate) -> Result<()> {
    let mut seen = HashSet::new();
    for r in &t.secrets {
        if !seen.insert(format!("/run/secrets/{}", r.target)) {
            return Err(Error::Invalid(format!(
                "two secrets have the target {}: give one another target",
                r.target
            )));
        }
    }
    for r in &t.configs {
        if !seen.insert(r.target.clone()) {
            return Err(Error::Invalid(format!(
                "two configs or secrets land on {}: give one another target",
                r.target
            )));
        }
    }
    Ok(())
}

/// The spec of a new service, as the agent will write it: what the request may not set is
/// reset, and what it sets is checked.
pub(crate) fn new_spec(requested: &ServiceSpec) -> Result<ServiceSpec> {
    validate_name("service", &requested.name)?;
    let spec = ServiceSpec {
        network: if requested.network.is_empty() {
            DEFAULT_NETWORK.into()
        } else {
            requested.network.clone()
        },
        vip: None,
        networks: requested
            .networks
            .iter()
            .map(|a| mesh_api::spec::NetworkAttachment {
                vip: None,
                ..a.clone()
            })
            .collect(),
        version: 1,
        template_version: 1,
        force_update: 0,
        previous: None,
        update_status: None,
        ..requested.clone()
    };
    match (&spec.task, spec.mode) {
        (None, ServiceMode::Replicated { replicas }) if replicas > 0 => {
            return Err(Error::Invalid(format!(
                "service {} has no command or image for its {replicas} tasks to run",
                spec.name
            )));
        }
        (None, ServiceMode::Global) => {
            return Err(Error::Invalid(format!(
                "global service {} has no command or image for its tasks to run",
                spec.name
            )));
        }
        (None, ServiceMode::ReplicatedJob { .. } | ServiceMode::GlobalJob) => {
            return Err(Error::Invalid(format!(
                "job {} has no command or image for its tasks to run",
                spec.name
            )));
        }
        _ => {}
    }
    check_spec(&spec)?;
    Ok(spec)
}

/// Docker's words: a job's tasks are not rolled, a new run replaces them all.
const NO_JOB_ROLLOUT: &str = "update and rollback configuration is not supported for jobs";

/// What every version of a service must satisfy, whoever wrote it.
fn check_spec(spec: &ServiceSpec) -> Result<()> {
    attachments::check_aliases(spec)?;
    attachments::check_networks_once(spec)?;
    match spec.mode {
        ServiceMode::Replicated { replicas } => check_replicas(replicas)?,
        ServiceMode::ReplicatedJob {
            completions,
            max_concurrent,
        } => {
            check_replicas(completions)?;
            check_replicas(max_concurrent)?;
            // Swarm would take 0 and never run a task: the job would wait forever.
            if max_concurrent == 0 {
                return Err(Error::Invalid(
                    "max-concurrent 0 would never run a task of the job: use 1 or more".into(),
                ));
            }
        }
        ServiceMode::Global | ServiceMode::GlobalJob => {}
    }
    if spec.mode.is_job()
        && (spec.update != UpdateConfig::default() || spec.rollback != UpdateConfig::default())
    {
        return Err(Error::Invalid(NO_JOB_ROLLOUT.into()));
    }
    if spec.mode.is_job() && spec.task.as_ref().is_some_and(|t| t.health.is_some()) {
        // A health check decides when a task serves; a job's tasks serve nothing, and
        // a check that failed would kill a task that is still working.
        return Err(Error::Invalid(format!(
            "job {} has a health check: jobs run to completion and serve nothing, remove it",
            spec.name
        )));
    }
    if let Some(n) = spec.placement.max_replicas_per_node {
        check_replicas(n)?;
    }
    if let Some(t) = &spec.task {
        check_targets(t)?;
        mesh_api::spec::validate_mounts(&t.mounts).map_err(Error::Invalid)?;
        for (k, _) in &t.env {
            if k.is_empty() || k.contains(char::is_whitespace) || k.contains('=') {
                return Err(Error::Invalid(format!(
                    "invalid environment variable name {k:?}: no spaces or '='"
                )));
            }
        }
        if let Some(image) = &t.image {
            mesh_api::spec::check_reference(image)
                .map_err(|e| Error::Invalid(format!("image {image:?}: {e}")))?;
        }
        check_run_options(&spec.name, t)?;
        t.run.validate_env().map_err(Error::Invalid)?;
        t.check_templates(&spec.labels).map_err(Error::Invalid)?;
        check_limits(&t.resources).map_err(Error::Invalid)?;
    }
    rollout::check_rollback_config(spec)
}

/// What a task's program runs as, checked for the driver that runs it.
fn check_run_options(service: &str, t: &TaskTemplate) -> Result<()> {
    let run = &t.run;
    if let Some(w) = &run.workdir
        && !w.starts_with('/')
    {
        return Err(Error::Invalid(format!(
            "the working directory {w:?} must be an absolute path, e.g. /srv"
        )));
    }
    if let Some(s) = &run.stop_signal {
        crate::task::stop_signal(s).map_err(Error::Invalid)?;
    }
    if let Some(u) = &run.user
        && (u.is_empty()
            || u.contains(|c: char| c.is_whitespace() || c.is_control())
            || u.matches(':').count() > 1)
    {
        return Err(Error::Invalid(format!(
            "invalid user {u:?}: use a name, a uid, or uid:gid"
        )));
    }
    if t.image.is_none() {
        let image_only = [
            (run.entrypoint.is_some(), "an entrypoint"),
            (!run.container_labels.is_empty(), "container labels"),
        ];
        if let Some((_, what)) = image_only.iter().find(|(set, _)| *set) {
            return Err(Error::Invalid(format!(
                "service {service} runs a process, and {what} only applies to image tasks \
                 (process tasks run their command as given)"
            )));
        }
    }
    t.security.validate().map_err(Error::Invalid)
}

/// Limits the kernel can apply, none below what the task reserves (Docker's rules: at least
/// 6MiB of memory, at least 0.01 CPU).
fn check_limits(r: &mesh_api::spec::TaskResources) -> std::result::Result<(), String> {
    use mesh_api::spec::bytes_size;
    const MIN_MEMORY: u64 = 6 << 20;
    const MIN_NANO_CPUS: u64 = 10_000_000;
    let (l, res) = (&r.limits, &r.reservations);
    if l.memory_bytes > 0 && l.memory_bytes < MIN_MEMORY {
        return Err(format!(
            "the memory limit {} is below the minimum of 6MiB: use --limit-memory 6m or more",
            bytes_size(l.memory_bytes)
        ));
    }
    if l.nano_cpus > 0 && l.nano_cpus < MIN_NANO_CPUS {
        return Err(format!(
            "the CPU limit {} is below the minimum of 0.01: use --limit-cpu 0.01 or more",
            cpus(l.nano_cpus)
        ));
    }
    if l.memory_bytes > 0 && l.memory_bytes < res.memory_bytes {
        return Err(format!(
            "the memory limit {} is below the memory reservation {}: raise --limit-memory or \
             lower --reserve-memory",
            bytes_size(l.memory_bytes),
            bytes_size(res.memory_bytes)
        ));
    }
    if l.nano_cpus > 0 && l.nano_cpus < res.nano_cpus {
        return Err(format!(
            "the CPU limit {} is below the CPU reservation {}: raise --limit-cpu or lower \
             --reserve-cpu",
            cpus(l.nano_cpus),
            cpus(res.nano_cpus)
        ));
    }
    Ok(())
}

/// Nano-CPUs as Docker prints CPUs (`0.5`, `2`).
fn cpus(nano: u64) -> String {
    let s = format!("{}.{:09}", nano / 1_000_000_000, nano % 1_000_000_000);
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn check_replicas(n: u32) -> Result<()> {
    if n > MAX_REPLICAS {
        return Err(Error::Invalid(format!(
            "replicas {n} is more than mesh allows ({MAX_REPLICAS}): use a number from 0 to \
             {MAX_REPLICAS}"
        )));
    }
    Ok(())
}

/// The spec after an update, or why the update is refused.
fn apply_update(current: &ServiceSpec, req: &ServiceUpdate) -> Result<ServiceSpec> {
    if current.mode.is_job()
        && (req.update_config != UpdateConfigChange::default()
            || req.rollback_config != UpdateConfigChange::default())
    {
        return Err(Error::Invalid(NO_JOB_ROLLOUT.into()));
    }
    if req.rollback {
        let spec = rollback(current, req)?;
        return Ok(if spec.mode.is_job() {
            job_runs_again(spec, current)
        } else {
            spec
        });
    }
    let mut spec = current.clone();
    set_replicas(&mut spec, req)?;
    change_placement(&mut spec, current, req)?;
    change_ports(&mut spec, current, req)?;
    attachments::change_networks(&mut spec, req)?;
    for k in &req.label_rm {
        spec.labels.remove(k);
    }
    for (k, v) in &req.label_add {
        spec.labels.insert(k.clone(), v.clone());
    }
    spec.restart = req.restart.apply(spec.restart);
    spec.update = req.update_config.apply(spec.update);
    spec.rollback = req.rollback_config.apply(spec.rollback);
    change_template(&mut spec, current, req)?;
    if req.force {
        spec.force_update += 1;
    }
    check_spec(&spec)?;
    if spec.mode.is_job() {
        return Ok(job_runs_again(spec, current));
    }
    start_or_resume_rollout(&mut spec, current);
    Ok(spec)
}

/// Swarm starts a new iteration of a job on every update of it: the new spec's template
/// differs from the last run's (through `force_update`), so the job runs again from the
/// start. There is no rollout: the old run's tasks stop at once.
pub(super) fn job_runs_again(mut spec: ServiceSpec, current: &ServiceSpec) -> ServiceSpec {
    if spec == *current {
        return spec;
    }
    // Above both: a rollback brings back a spec whose counter the last run may have used.
    spec.force_update = spec.force_update.max(current.force_update) + 1;
    let mut previous = current.clone();
    previous.previous = None;
    previous.update_status = None;
    spec.previous = Some(Box::new(previous));
    spec.template_version = current.version + 1;
    spec.update_status = None;
    spec
}

/// `--rollback`: the previous spec, rolled out with the (possibly changed) rollback config.
fn rollback(current: &ServiceSpec, req: &ServiceUpdate) -> Result<ServiceSpec> {
    let only_rollback = ServiceUpdate {
        rollback: true,
        rollback_config: req.rollback_config.clone(),
        ..Default::default()
    };
    if *req != only_rollback {
        return Err(Error::Invalid(
            "a rollback goes back to the previous spec: it takes no other change than the \
             rollback config"
                .into(),
        ));
    }
    let mut with_config = current.clone();
    with_config.rollback = req.rollback_config.apply(with_config.rollback);
    rollout::check_rollback_config(&with_config)?;
    rollout::rolled_back(&with_config, "manually requested rollback", Clock::now_ms()).ok_or_else(
        || {
            Error::Invalid(format!(
                "service {} has no previous spec to roll back to: it was not updated since it \
                 was created",
                current.name
            ))
        },
    )
}

fn set_replicas(spec: &mut ServiceSpec, req: &ServiceUpdate) -> Result<()> {
    let Some(n) = req.replicas else {
        return Ok(());
    };
    match spec.mode {
        // Docker's words (`docker service scale` of a global job).
        ServiceMode::GlobalJob => Err(Error::Invalid(format!(
            "service {}: scale can only be used with replicated or replicated-job mode",
            spec.name
        ))),
        ServiceMode::ReplicatedJob { max_concurrent, .. } => {
            // Docker's scale of a replicated job sets its completions and keeps its
            // concurrency.
            check_replicas(n)?;
            spec.mode = ServiceMode::ReplicatedJob {
                completions: n,
                max_concurrent,
            };
            Ok(())
        }
        ServiceMode::Global => Err(Error::Invalid(format!(
            "service {} is global: it runs one task on every eligible node and cannot be \
             scaled (narrow it with --constraint-add instead)",
            spec.name
        ))),
        ServiceMode::Replicated { .. } if spec.task.is_none() => Err(Error::Invalid(format!(
            "service {} has no command to run, so it schedules no tasks: its tasks are started \
             with `meshctl run --service {}`",
            spec.name, spec.name
        ))),
        ServiceMode::Replicated { .. } => {
            check_replicas(n)?;
            spec.mode = ServiceMode::Replicated { replicas: n };
            Ok(())
        }
    }
}

fn change_placement(
    spec: &mut ServiceSpec,
    current: &ServiceSpec,
    req: &ServiceUpdate,
) -> Result<()> {
    let placement = &mut spec.placement;
    for c in &req.constraint_rm {
        if !placement.constraints.contains(c) {
            return Err(Error::Invalid(format!(
                "service {} has no constraint {c} to remove (see `meshctl service inspect {}`)",
                current.name, current.name
            )));
        }
        placement.constraints.retain(|x| x != c);
    }
    for c in &req.constraint_add {
        if !placement.constraints.contains(c) {
            placement.constraints.push(c.clone());
        }
    }
    for p in &req.placement_pref_rm {
        placement.preferences.retain(|x| x != p);
    }
    for p in &req.placement_pref_add {
        if !placement.preferences.contains(p) {
            placement.preferences.push(p.clone());
        }
    }
    if let Some(n) = req.replicas_max_per_node {
        placement.max_replicas_per_node = (n > 0).then_some(n);
    }
    Ok(())
}

fn change_ports(spec: &mut ServiceSpec, current: &ServiceSpec, req: &ServiceUpdate) -> Result<()> {
    for rm in &req.publish_rm {
        let before = spec.ports.len();
        spec.ports
            .retain(|p| !(p.published == Some(rm.port) && p.protocol == rm.protocol));
        if spec.ports.len() == before {
            return Err(Error::Invalid(format!(
                "service {} does not publish {}/{} (see `meshctl service inspect {}`)",
                current.name, rm.port, rm.protocol, current.name
            )));
        }
    }
    for p in &req.publish_add {
        // Publishing a port again replaces it (a new target or mode).
        spec.ports.retain(|q| {
            !(q.published.is_some() && q.published == p.published && q.protocol == p.protocol)
        });
        spec.ports.push(*p);
    }
    Ok(())
}

/// What the tasks run: a change here replaces them (a rollout).
fn change_template(
    spec: &mut ServiceSpec,
    current: &ServiceSpec,
    req: &ServiceUpdate,
) -> Result<()> {
    let ports = spec.ports.clone();
    let Some(t) = spec.task.as_mut() else {
        if req.changes_template() || req.force {
            return Err(Error::Invalid(format!(
                "service {} schedules no tasks (it has no command), so there is nothing to \
                 update or force",
                spec.name
            )));
        }
        return Ok(());
    };
    if let Some(args) = &req.args {
        t.command.truncate(1);
        t.command.extend(args.iter().cloned());
    }
    if let Some(image) = &req.image {
        if t.image.is_none() {
            return Err(Error::Invalid(format!(
                "service {} runs a command, not an image: its tasks cannot switch to an image \
                 (create a service with the image instead)",
                current.name
            )));
        }
        t.image = Some(image.clone());
    }
    change_run_options(&mut t.run, req);
    change_names(&mut t.run, req);
    if let Some(h) = &req.hostname {
        t.hostname = (!h.is_empty()).then(|| h.clone());
    }
    req.limits.apply(&mut t.resources.limits);
    change_capabilities(&mut t.security, req);
    for k in &req.env_rm {
        t.env.retain(|(key, _)| key != k);
    }
    for (k, v) in &req.env_add {
        t.env.retain(|(key, _)| key != k);
        t.env.push((k.clone(), v.clone()));
    }
    for (rm, add, config) in [
        (&req.secret_rm, &req.secret_add, false),
        (&req.config_rm, &req.config_add, true),
    ] {
        let refs = if config {
            &mut t.configs
        } else {
            &mut t.secrets
        };
        for name in rm {
            if !refs.iter().any(|r| r.source == *name) {
                return Err(Error::Invalid(format!(
                    "service {} has no {} {name} to remove (see `meshctl service inspect {}`)",
                    current.name,
                    if config { "config" } else { "secret" },
                    current.name
                )));
            }
            refs.retain(|r| r.source != *name);
        }
        for r in add {
            refs.retain(|x| x.source != r.source);
            refs.push(r.clone());
        }
    }
    // Docker's order: removals by target first, then additions replace a mount there.
    let clean = |p: &str| {
        mesh_api::spec::Mount {
            target: p.to_owned(),
            ..Default::default()
        }
        .clean_target()
    };
    for target in &req.mount_rm {
        let target = clean(target);
        t.mounts.retain(|m| m.clean_target() != target);
    }
    for m in &req.mount_add {
        t.mounts.retain(|x| x.clean_target() != m.clean_target());
        t.mounts.push(m.clone());
    }
    t.health = req
        .health
        .apply(t.health.take(), &ports)
        .map_err(Error::Invalid)?;
    if let Some(g) = req.stop_grace_ms {
        t.stop_grace_ms = g;
    }
    // Part of the template, as in Swarm: tasks are replaced to reserve the new amounts.
    let reservations = &mut t.resources.reservations;
    if let Some(cpu) = req.reserve_cpu {
        reservations.nano_cpus = cpu;
    }
    if let Some(memory) = req.reserve_memory {
        reservations.memory_bytes = memory;
    }
    Ok(())
}

/// `--entrypoint`, `--user`, `--workdir`, `--stop-signal` and container labels; an empty
/// value puts back the default.
fn change_run_options(run: &mut mesh_api::spec::RunOptions, req: &ServiceUpdate) {
    if let Some(e) = &req.entrypoint {
        run.entrypoint = (!e.is_empty()).then(|| e.clone());
    }
    let set = |field: &mut Option<String>, to: &Option<String>| {
        if let Some(v) = to {
            *field = (!v.is_empty()).then(|| v.clone());
        }
    };
    set(&mut run.user, &req.user);
    set(&mut run.workdir, &req.workdir);
    set(&mut run.stop_signal, &req.stop_signal);
    for k in &req.container_label_rm {
        run.container_labels.remove(k);
    }
    for (k, v) in &req.container_label_add {
        run.container_labels.insert(k.clone(), v.clone());
    }
}

/// `--host-add/-rm` and `--dns*-add/-rm` as Docker's `service update` takes them: removals
/// first, then additions, an added value already there kept once (and in place).
fn change_names(run: &mut mesh_api::spec::RunOptions, req: &ServiceUpdate) {
    fn add<T: PartialEq + Clone>(list: &mut Vec<T>, more: &[T]) {
        for v in more {
            if !list.contains(v) {
                list.push(v.clone());
            }
        }
    }
    for rm in &req.host_rm {
        // `host` alone removes every address of it; `host:ip` just that one.
        run.hosts.retain(|h| *rm != h.host && *rm != h.to_string());
    }
    add(&mut run.hosts, &req.host_add);
    let dns = &mut run.dns;
    dns.nameservers.retain(|n| !req.dns_rm.contains(n));
    add(&mut dns.nameservers, &req.dns_add);
    dns.search.retain(|d| !req.dns_search_rm.contains(d));
    add(&mut dns.search, &req.dns_search_add);
    // An option is named by its name: `--dns-option-rm ndots` removes `ndots:2`.
    let name = |o: &str| o.split(':').next().unwrap_or(o).to_owned();
    dns.options.retain(|o| {
        !req.dns_option_rm
            .iter()
            .any(|r| *r == *o || name(r) == name(o))
    });
    for o in &req.dns_option_add {
        dns.options.retain(|x| name(x) != name(o));
        dns.options.push(o.clone());
    }
    if let Some(log) = &req.log {
        run.log = log.clone();
    }
}

/// `--cap-add` and `--cap-drop` as Docker's `service update` takes them: a capability
/// added leaves the dropped list and the other way round, so the last word on each wins.
fn change_capabilities(sec: &mut mesh_api::spec::Security, req: &ServiceUpdate) {
    let same =
        |a: &str, b: &str| mesh_api::spec::capability(a).ok() == mesh_api::spec::capability(b).ok();
    for c in &req.cap_add {
        sec.cap_drop.retain(|d| !same(d, c));
        if !sec.cap_add.iter().any(|a| same(a, c)) {
            sec.cap_add.push(c.clone());
        }
    }
    for c in &req.cap_drop {
        sec.cap_add.retain(|a| !same(a, c));
        if !sec.cap_drop.iter().any(|d| same(d, c)) {
            sec.cap_drop.push(c.clone());
        }
    }
}

/// A new template starts a rollout; any other change of a paused rollout resumes it (as
/// Swarm's does).
fn start_or_resume_rollout(spec: &mut ServiceSpec, current: &ServiceSpec) {
    if spec.template_id() != current.template_id() {
        rollout::start_rollout(spec, current, Clock::now_ms());
        return;
    }
    let changed = spec != current;
    if let Some(status) = spec.update_status.as_mut().filter(|s| s.state.is_paused())
        && changed
    {
        status.state = if status.state.is_rollback() {
            UpdateState::RollbackStarted
        } else {
            UpdateState::Updating
        };
        status.message = "update resumed".into();
    }
}

/// The image a service's tasks run (None: the process driver).
pub(super) fn image_of(spec: &ServiceSpec) -> Option<&str> {
    spec.task.as_ref()?.image.as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::{spec::FileRef, v1::PublishedPort};

    fn spec(f: impl FnOnce(&mut ServiceSpec)) -> Result<ServiceSpec> {
        let mut s = ServiceSpec {
            name: "web".into(),
            mode: ServiceMode::Replicated { replicas: 1 },
            task: Some(TaskTemplate {
                command: vec!["sleep".into(), "100".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        f(&mut s);
        new_spec(&s)
    }

    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        match r {
            Err(Error::Invalid(m)) => m,
            other => panic!("expected an invalid-input error, got {other:?}"),
        }
    }

    #[test]
    fn a_new_spec_gets_the_default_network_and_nothing_the_agent_owns() {
        let s = spec(|s| {
            s.version = 7;
            s.template_version = 9;
            s.force_update = 3;
            s.vip = Some("10.0.0.5".parse().unwrap());
            s.update_status = Some(mesh_api::spec::UpdateStatus {
                state: UpdateState::Paused,
                started_ms: 1,
                completed_ms: None,
                message: "forged".into(),
            });
        })
        .unwrap();
        assert_eq!(s.network, DEFAULT_NETWORK);
        assert_eq!((s.version, s.template_version, s.force_update), (1, 1, 0));
        assert!(s.vip.is_none() && s.update_status.is_none() && s.previous.is_none());
        assert_eq!(spec(|s| s.network = "app".into()).unwrap().network, "app");
    }

    #[test]
    fn a_new_spec_that_cannot_run_says_why() {
        assert!(err(spec(|s| s.name = "bad name".into())).contains("invalid service name"));
        assert!(
            err(spec(|s| s.mode = ServiceMode::Replicated {
                replicas: 1_000_000
            }))
            .contains("more than mesh allows")
        );
        assert!(
            err(spec(|s| {
                s.task = None;
                s.mode = ServiceMode::Replicated { replicas: 2 };
            }))
            .contains("no command or image")
        );
        // A service with no tasks of its own (started by `meshctl run`) is fine.
        assert!(
            spec(|s| {
                s.task = None;
                s.mode = ServiceMode::Replicated { replicas: 0 };
            })
            .is_ok()
        );
        let grant = |target: &str| FileRef {
            source: "s".into(),
            target: target.into(),
            uid: 0,
            gid: 0,
            mode: 0o444,
        };
        assert!(
            err(spec(
                |s| s.task.as_mut().unwrap().secrets = vec![grant("a"), grant("a")]
            ))
            .contains("two secrets have the target a")
        );
        assert!(
            err(spec(
                |s| s.rollback.failure_action = mesh_planner::FailureAction::Rollback
            ))
            .contains("roll back a rollback")
        );
        assert!(
            err(spec(
                |s| s.task.as_mut().unwrap().env = vec![("A B".into(), "x".into())]
            ))
            .contains("environment variable")
        );
    }

    #[test]
    fn published_ports_are_added_replaced_and_removed_without_rolling_the_tasks() {
        let spec =
            spec(|s| s.ports = vec!["8080:80".parse().unwrap(), "5353:53/udp".parse().unwrap()])
                .unwrap();
        let update = |f: &dyn Fn(&mut ServiceUpdate)| {
            let mut req = ServiceUpdate::default();
            f(&mut req);
            apply_update(&spec, &req)
        };
        let ports = |s: &ServiceSpec| {
            s.ports
                .iter()
                .map(|p| (p.published.unwrap(), p.protocol, p.target))
                .collect::<Vec<_>>()
        };
        let added = update(&|r| {
            r.publish_add = vec!["9090:90".parse().unwrap(), "8080:81".parse().unwrap()]
        })
        .unwrap();
        assert_eq!(
            ports(&added),
            [
                (5353, Protocol::Udp, 53),
                (9090, Protocol::Tcp, 90),
                (8080, Protocol::Tcp, 81)
            ]
        );
        assert_eq!(added.template_id(), spec.template_id(), "no rollout");
        assert!(added.update_status.is_none());
        let rm = |port, protocol| {
            update(&move |r| r.publish_rm = vec![PublishedPort { port, protocol }])
        };
        assert_eq!(
            ports(&rm(8080, Protocol::Tcp).unwrap()),
            [(5353, Protocol::Udp, 53)]
        );
        assert_eq!(ports(&rm(5353, Protocol::Udp).unwrap()).len(), 1);
        assert!(err(rm(5353, Protocol::Tcp)).contains("does not publish 5353/tcp"));
        assert!(err(rm(9999, Protocol::Tcp)).contains("does not publish 9999/tcp"));
    }

    #[test]
    fn updates_change_placement_and_refuse_what_cannot_be() {
        let spec = spec(|s| s.mode = ServiceMode::Replicated { replicas: 3 }).unwrap();
        let up = apply_update(
            &spec,
            &ServiceUpdate {
                replicas: Some(5),
                constraint_add: vec!["node.hostname!=node3".parse().unwrap()],
                placement_pref_add: vec!["spread=node.labels.zone".parse().unwrap()],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(up.mode, ServiceMode::Replicated { replicas: 5 });
        assert_eq!(
            up.placement.constraints[0].to_string(),
            "node.hostname!=node3"
        );
        assert_eq!(
            up.template_id(),
            spec.template_id(),
            "placement is not the template"
        );
        assert!(
            up.update_status.is_none(),
            "no rollout for a placement change"
        );
        let gone = apply_update(
            &up,
            &ServiceUpdate {
                constraint_rm: vec!["node.hostname!=node3".parse().unwrap()],
                ..Default::default()
            },
        )
        .unwrap();
        assert!(gone.placement.constraints.is_empty());
        let forced = apply_update(
            &spec,
            &ServiceUpdate {
                force: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_ne!(forced.template_id(), spec.template_id());

        let mut global = spec.clone();
        global.mode = ServiceMode::Global;
        let replicas = ServiceUpdate {
            replicas: Some(2),
            ..Default::default()
        };
        assert!(err(apply_update(&global, &replicas)).contains("is global"));
        let no_such = ServiceUpdate {
            constraint_rm: vec!["node.labels.a==b".parse().unwrap()],
            ..Default::default()
        };
        assert!(err(apply_update(&spec, &no_such)).contains("no constraint"));
    }

    #[test]
    fn limits_are_checked_and_an_update_replaces_or_removes_them() {
        use mesh_api::spec::{Limits, LimitsChange};
        let limited =
            |l: Limits| move |s: &mut ServiceSpec| s.task.as_mut().unwrap().resources.limits = l;
        let l = Limits {
            nano_cpus: 1_000_000_000,
            memory_bytes: 512 << 20,
            pids: 200,
        };
        let s = spec(limited(l)).unwrap();
        assert!(
            err(spec(limited(Limits {
                memory_bytes: 1 << 20,
                ..l
            })))
            .contains("below the minimum of 6MiB")
        );
        assert!(
            err(spec(limited(Limits {
                nano_cpus: 1_000,
                ..l
            })))
            .contains("0.01")
        );
        let reserved = |m: u64, c: u64| {
            move |s: &mut ServiceSpec| {
                let r = &mut s.task.as_mut().unwrap().resources;
                r.limits = l;
                r.reservations.memory_bytes = m;
                r.reservations.nano_cpus = c;
            }
        };
        assert_eq!(
            err(spec(reserved(1 << 30, 0))),
            "the memory limit 512MiB is below the memory reservation 1GiB: raise \
             --limit-memory or lower --reserve-memory"
        );
        assert!(
            err(spec(reserved(0, 1_500_000_000)))
                .contains("CPU limit 1 is below the CPU reservation 1.5")
        );
        assert!(spec(reserved(256 << 20, 500_000_000)).is_ok());

        let up = apply_update(
            &s,
            &ServiceUpdate {
                limits: LimitsChange {
                    memory_bytes: Some(64 << 20),
                    pids: Some(0),
                    nano_cpus: None,
                },
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            up.task.as_ref().unwrap().resources.limits,
            Limits {
                nano_cpus: 1_000_000_000,
                memory_bytes: 64 << 20,
                pids: 0
            }
        );
        assert_ne!(
            up.template_id(),
            s.template_id(),
            "new limits roll the tasks"
        );
        let below = ServiceUpdate {
            limits: LimitsChange {
                memory_bytes: Some(1 << 20),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(err(apply_update(&s, &below)).contains("6MiB"));
    }

    #[test]
    fn mounts_are_added_and_removed_by_target_as_docker_does() {
        use mesh_api::spec::Mount;
        let m = |s: &str| Mount::parse(s).unwrap();
        let base = spec(|s| {
            s.task.as_mut().unwrap().mounts = vec![m("source=data,target=/data")];
        })
        .unwrap();
        // An old template without mounts keeps its id: the field is skipped when empty.
        let plain = spec(|_| {}).unwrap();
        assert!(
            !serde_json::to_string(&plain.task)
                .unwrap()
                .contains("mounts")
        );
        let up = apply_update(
            &base,
            &ServiceUpdate {
                mount_add: vec![m("type=tmpfs,target=/data/"), m("type=tmpfs,target=/t")],
                ..Default::default()
            },
        )
        .unwrap();
        let shown: Vec<String> = up
            .task
            .as_ref()
            .unwrap()
            .mounts
            .iter()
            .map(|m| m.to_string())
            .collect();
        assert_eq!(shown, ["type=tmpfs,target=/data/", "type=tmpfs,target=/t"]);
        assert_ne!(up.template_id(), base.template_id(), "a rolling update");
        let down = apply_update(
            &up,
            &ServiceUpdate {
                mount_rm: vec!["/t/".into(), "/nothing".into()],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(down.task.as_ref().unwrap().mounts.len(), 1);
        assert!(
            err(spec(|s| {
                s.task.as_mut().unwrap().mounts =
                    vec![m("source=a1,target=/x"), m("type=tmpfs,target=/x")];
            }))
            .contains("Duplicate mount point: /x")
        );
    }

    #[test]
    fn capabilities_are_checked_and_updated_as_docker_updates_them() {
        // What the API is sent is checked again: nothing unknown or host-wide gets through.
        let bad = |f: fn(&mut mesh_api::spec::Security)| {
            err(spec(|s| f(&mut s.task.as_mut().unwrap().security)))
        };
        assert!(bad(|s| s.cap_add = vec!["NET_BIND".into()]).contains("unknown capability"));
        assert!(
            bad(|s| {
                s.sysctls.insert("kernel.pid_max".into(), "10".into());
            })
            .contains("not namespaced")
        );
        let spec = spec(|s| {
            let t = s.task.as_mut().unwrap();
            t.run.user = Some("1000".into());
            t.security.cap_drop = vec!["ALL".into()];
        })
        .expect("a process task takes --user");
        let up = apply_update(
            &spec,
            &ServiceUpdate {
                cap_add: vec!["NET_BIND_SERVICE".into()],
                cap_drop: vec!["NET_RAW".into()],
                ..Default::default()
            },
        )
        .unwrap();
        let sec = &up.task.as_ref().unwrap().security;
        assert_eq!(sec.cap_add, ["NET_BIND_SERVICE"]);
        assert_eq!(sec.cap_drop, ["ALL", "NET_RAW"]);
        assert_ne!(up.template_id(), spec.template_id(), "a rolling update");
        // Adding what was dropped takes it off the dropped list, and the other way round.
        let back = apply_update(
            &up,
            &ServiceUpdate {
                cap_add: vec!["cap_net_raw".into()],
                cap_drop: vec!["net_bind_service".into()],
                ..Default::default()
            },
        )
        .unwrap();
        let sec = &back.task.as_ref().unwrap().security;
        assert_eq!(sec.cap_add, ["cap_net_raw"]);
        assert_eq!(sec.cap_drop, ["ALL", "net_bind_service"]);

        let wrong = apply_update(
            &spec,
            &ServiceUpdate {
                cap_add: vec!["BOGUS".into()],
                ..Default::default()
            },
        );
        assert!(err(wrong).contains("unknown capability"));
    }

    #[test]
    fn hosts_dns_and_templates_update_as_docker_updates_them() {
        // A spec written by any node is checked: a host name that is a line of its own, a
        // template naming no field, a log driver mesh cannot honour.
        let bad = |f: fn(&mut TaskTemplate)| err(spec(|s| f(s.task.as_mut().unwrap())));
        assert!(
            bad(|t| t.run.hosts = vec![mesh_api::spec::ExtraHost {
                host: "a\nb".into(),
                ip: "10.0.0.1".parse().unwrap()
            }])
            .contains("invalid host name")
        );
        assert!(
            bad(|t| t.hostname = Some("{{.Nope}}".into()))
                .contains("can't evaluate field Nope in type template.Context")
        );
        assert!(bad(|t| t.run.log.name = "syslog".into()).contains("not supported"));
        let spec = spec(|s| {
            let t = s.task.as_mut().unwrap();
            t.run.hosts = vec![
                "db:10.0.0.5".parse().unwrap(),
                "db:10.0.0.6".parse().unwrap(),
                "cache:10.0.0.7".parse().unwrap(),
            ];
            t.run.dns.options = vec!["ndots:2".into(), "rotate".into()];
        })
        .unwrap();
        let up = apply_update(
            &spec,
            &ServiceUpdate {
                host_rm: vec!["db".into(), "cache:10.0.0.7".into()],
                host_add: vec!["api:10.0.0.8".parse().unwrap()],
                dns_add: vec!["192.0.2.53".parse().unwrap()],
                dns_search_add: vec!["corp.example".into()],
                dns_option_add: vec!["ndots:5".into()],
                dns_option_rm: vec!["rotate".into()],
                hostname: Some("{{.Service.Name}}-{{.Task.Slot}}".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let t = up.task.as_ref().unwrap();
        let hosts: Vec<String> = t.run.hosts.iter().map(ToString::to_string).collect();
        assert_eq!(hosts, ["api:10.0.0.8"]);
        assert_eq!(
            t.run.dns.options,
            ["ndots:5"],
            "an option is replaced by its name"
        );
        assert_eq!(t.run.dns.search, ["corp.example"]);
        assert_ne!(up.template_id(), spec.template_id(), "a rolling update");
        let reset = apply_update(
            &up,
            &ServiceUpdate {
                hostname: Some(String::new()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(reset.task.unwrap().hostname, None);
        let wrong = apply_update(
            &spec,
            &ServiceUpdate {
                hostname: Some("{{.Task.Nope}}".into()),
                ..Default::default()
            },
        );
        assert!(err(wrong).contains("can't evaluate field Nope"));
    }

    #[test]
    fn a_new_image_rolls_the_tasks_and_a_rollback_takes_nothing_else() {
        let spec = spec(|s| s.task.as_mut().unwrap().image = Some("nginx:1.10".into())).unwrap();
        let up = apply_update(
            &spec,
            &ServiceUpdate {
                image: Some("nginx:1.11".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            up.task.as_ref().unwrap().image.as_deref(),
            Some("nginx:1.11")
        );
        assert_ne!(up.template_id(), spec.template_id());
        assert_eq!(
            up.update_status.as_ref().unwrap().state,
            UpdateState::Updating
        );
        let back = apply_update(
            &up,
            &ServiceUpdate {
                rollback: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            back.task.as_ref().unwrap().image.as_deref(),
            Some("nginx:1.10")
        );
        let mixed = ServiceUpdate {
            rollback: true,
            replicas: Some(2),
            ..Default::default()
        };
        assert!(err(apply_update(&up, &mixed)).contains("no other change"));
        let process = spec_of_process();
        let to_image = ServiceUpdate {
            image: Some("nginx".into()),
            ..Default::default()
        };
        assert!(err(apply_update(&process, &to_image)).contains("runs a command, not an image"));
    }

    fn spec_of_process() -> ServiceSpec {
        spec(|_| {}).unwrap()
    }

    fn migrate() -> ServiceSpec {
        spec(|s| {
            s.mode = ServiceMode::ReplicatedJob {
                completions: 3,
                max_concurrent: 1,
            }
        })
        .unwrap()
    }

    #[test]
    fn every_update_of_a_job_runs_it_again_without_a_rollout() {
        let job = migrate();
        for req in [
            ServiceUpdate {
                force: true,
                ..Default::default()
            },
            ServiceUpdate {
                label_add: vec![("team".into(), "db".into())],
                ..Default::default()
            },
            ServiceUpdate {
                env_add: vec![("STEP".into(), "2".into())],
                ..Default::default()
            },
        ] {
            let next = apply_update(&job, &req).unwrap();
            assert_ne!(next.template_id(), job.template_id(), "{req:?}: a new run");
            assert!(next.update_status.is_none(), "{req:?}: no rollout");
            assert_eq!(next.previous.as_deref().map(|p| &p.mode), Some(&job.mode));
        }
        // `service rollback`: the previous spec, as a new run too.
        let next = apply_update(
            &job,
            &ServiceUpdate {
                force: true,
                ..Default::default()
            },
        )
        .unwrap();
        let back = apply_update(
            &next,
            &ServiceUpdate {
                rollback: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(back.update_status.is_none());
        assert_ne!(back.template_id(), job.template_id());
        assert_ne!(back.template_id(), next.template_id());
    }

    #[test]
    fn jobs_refuse_what_docker_refuses() {
        let job = migrate();
        let m = err(apply_update(
            &job,
            &ServiceUpdate {
                update_config: UpdateConfigChange {
                    parallelism: Some(2),
                    ..Default::default()
                },
                ..Default::default()
            },
        ));
        assert_eq!(
            m,
            "update and rollback configuration is not supported for jobs"
        );
        let m = err(spec(|s| {
            s.mode = ServiceMode::GlobalJob;
            s.update.parallelism = 3;
        }));
        assert_eq!(
            m,
            "update and rollback configuration is not supported for jobs"
        );
        let global = spec(|s| s.mode = ServiceMode::GlobalJob).unwrap();
        let m = err(apply_update(
            &global,
            &ServiceUpdate {
                replicas: Some(2),
                ..Default::default()
            },
        ));
        assert!(
            m.contains("scale can only be used with replicated or replicated-job mode"),
            "{m}"
        );
        let m = err(spec(|s| {
            s.mode = ServiceMode::ReplicatedJob {
                completions: 3,
                max_concurrent: 0,
            }
        }));
        assert!(m.contains("max-concurrent 0"), "{m}");
        // Scaling a replicated job sets its completions, as Docker's scale does.
        let scaled = apply_update(
            &job,
            &ServiceUpdate {
                replicas: Some(5),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            scaled.mode,
            ServiceMode::ReplicatedJob {
                completions: 5,
                max_concurrent: 1
            }
        );
        assert_ne!(scaled.template_id(), job.template_id(), "a new run");
    }
}
