//! Services as objects: create, update, scale and remove, from any node. Every request is
//! checked whole before anything is written, so a rejected command changes nothing; a
//! change is one replicated write, and a concurrent change of the same service from another
//! node is detected after the settle time and reported to the loser.

use std::{collections::HashSet, time::Duration};

use mesh_planner::{Constraint, MAX_REPLICAS, RestartPolicy, ServiceMode, Spread};
use tracing::info;

use super::{Agent, Error, Result, rollout, validate_name};
use crate::cluster::{Clock, Replicated, View, key};
use mesh_api::spec::{
    EndpointMode, FileRef, PortSpec, Protocol, ServiceSpec, TaskTemplate, UpdateState,
};
use mesh_api::v1::{HealthFlags, RestartFlags, ServiceCreate, ServiceScale, ServiceUpdate};

/// The network a service joins when none is named (Swarm's `ingress` role).
pub const DEFAULT_NETWORK: &str = "ingress";

impl Agent {
    pub async fn create_service(&self, req: &ServiceCreate) -> Result<Replicated<ServiceSpec>> {
        validate_name("service", &req.name)?;
        let name = req.name.as_str();
        let mut spec = draft(req)?;
        let view = self.refresh().await;
        if view.services.contains_key(name) {
            return Err(Error::Conflict(format!(
                "service {name} already exists: change it with `meshctl service update {name}`, \
                 or remove it first"
            )));
        }
        check_ports(&view, name, &spec.ports)?;
        check_file_refs(&view, &spec)?;
        match &req.network {
            Some(network) if !view.networks.contains_key(network) => {
                return Err(Error::NotFound(format!(
                    "network {network} not found: create it with `meshctl network create {network}`"
                )));
            }
            Some(_) => {}
            None => self.default_network(view).await?,
        }
        let network = spec.network.clone();
        let vip = match spec.endpoint_mode {
            EndpointMode::Vip => Some(self.allocate(&network).await?),
            EndpointMode::Dnsrr => None,
        };
        spec.vip = vip;
        spec.version = 1;
        spec.template_version = 1;
        let stamp = self.tick();
        let record = Replicated::new(spec, stamp.clone());
        self.write_object(key::SERVICE, name, &record).await?;
        let view = self.settle().await;
        if let Some(vip) = vip {
            self.release(&network, vip).await;
        }
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
        let spec = apply_update(&current.spec, req)?;
        check_file_refs(&view, &spec)?;
        if spec.ports != current.spec.ports {
            check_ports(&view, name, &spec.ports)?;
        }
        if spec == current.spec {
            return Ok(current.clone());
        }
        let record = self.write_change(current, spec).await?;
        info!(
            service = name,
            version = record.spec.version,
            "service updated"
        );
        Ok(record)
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
        spec.version = current.spec.version + 1;
        let stamp = self.tick();
        let mut record = current.clone();
        record.spec = spec;
        record.updated = stamp.clone();
        record.deleted = None;
        self.write_object(key::SERVICE, &name, &record).await?;
        let view = self.settle().await;
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
                    ServiceMode::Global => String::new(),
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

fn file_refs(raw: &[String], config: bool) -> Result<Vec<FileRef>> {
    raw.iter()
        .map(|s| FileRef::parse(s, config).map_err(Error::Invalid))
        .collect()
}

/// Two grants on one path would hide one of them.
fn check_targets(t: &TaskTemplate) -> Result<()> {
    let mut seen = HashSet::new();
    for r in &t.secrets {
        if !seen.insert(format!("/run/secrets/{}", r.target)) {
            return Err(Error::Invalid(format!(
                "two secrets have the target {}: give one another target=",
                r.target
            )));
        }
    }
    for r in &t.configs {
        if !seen.insert(r.target.clone()) {
            return Err(Error::Invalid(format!(
                "two configs or secrets land on {}: give one another target=",
                r.target
            )));
        }
    }
    Ok(())
}

/// `--publish-rm`'s `PUBLISHED[/PROTOCOL]`; a full `--publish` spec names its published port
/// too (`8080:80`, `published=8080,target=80,protocol=udp`).
fn published_port(s: &str) -> Result<(u16, Protocol)> {
    let bad = || {
        Error::Invalid(format!(
            "--publish-rm {s:?}: name the published port, PUBLISHED[/PROTOCOL], e.g. 8080 or \
             5353/udp"
        ))
    };
    let (port, protocol) = match s.split_once('/') {
        Some((p, proto)) if !p.contains([':', '=']) => {
            (p, proto.parse::<Protocol>().map_err(|_| bad())?)
        }
        _ if !s.contains([':', '=']) => (s, Protocol::Tcp),
        _ => {
            let spec: PortSpec = s.parse().map_err(|_| bad())?;
            return Ok((spec.published.ok_or_else(bad)?, spec.protocol));
        }
    };
    Ok((port.parse::<u16>().map_err(|_| bad())?, protocol))
}

/// The spec a create request asks for (network and VIP filled in by the caller).
pub(crate) fn draft(req: &ServiceCreate) -> Result<ServiceSpec> {
    let invalid = Error::Invalid;
    let ports = req
        .publish
        .iter()
        .map(|p| p.parse::<PortSpec>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(invalid)?;
    let task = if req.command.is_empty() && req.image.is_none() {
        if req.replicas.is_some() || req.mode.is_some() {
            return Err(Error::Invalid(format!(
                "no command for the tasks to run: put it after `--`, e.g. meshctl service create \
                 {} --replicas 3 -- /usr/bin/python3 -m http.server 80",
                req.name
            )));
        }
        None
    } else {
        Some(TaskTemplate {
            command: req.command.clone(),
            env: parse_env(&req.env)?,
            hostname: req.hostname.clone(),
            health: None,
            stop_grace_ms: match &req.stop_grace_period {
                Some(g) => duration_ms("--stop-grace-period", g)?,
                None => TaskTemplate::default().stop_grace_ms,
            },
            image: req.image.clone(),
            secrets: file_refs(&req.secrets, false)?,
            configs: file_refs(&req.configs, true)?,
        })
    };
    if task.is_none() && (!req.secrets.is_empty() || !req.configs.is_empty()) {
        return Err(Error::Invalid(
            "--secret and --config are for scheduled tasks: put the command after `--`".into(),
        ));
    }
    if let Some(t) = &task {
        check_targets(t)?;
    }
    if task.is_none() && (req.health != HealthFlags::default() || req.stop_grace_period.is_some()) {
        return Err(Error::Invalid(
            "health checks and --stop-grace-period are for scheduled tasks: put the command              after `--`"
                .into(),
        ));
    }
    let mode = match req.mode.as_deref() {
        None | Some("replicated") => ServiceMode::Replicated {
            replicas: match req.replicas {
                Some(n) => replicas(n)?,
                None if task.is_some() => 1,
                None => 0,
            },
        },
        Some("global") => {
            if req.replicas.is_some() {
                return Err(Error::Invalid(
                    "--replicas does not go with --mode global: a global service runs one task \
                     on every eligible node (limit them with --constraint)"
                        .into(),
                ));
            }
            ServiceMode::Global
        }
        Some(other) => {
            return Err(Error::Invalid(format!(
                "unknown service mode {other:?}: use replicated or global"
            )));
        }
    };
    let mut spec = ServiceSpec {
        name: req.name.clone(),
        labels: req.labels.clone(),
        network: req
            .network
            .clone()
            .unwrap_or_else(|| DEFAULT_NETWORK.into()),
        endpoint_mode: req.endpoint_mode,
        vip: None,
        ports,
        mode,
        task,
        ..Default::default()
    };
    spec.placement.constraints = constraints(&req.constraints)?;
    spec.placement.preferences = preferences(&req.placement_prefs)?;
    spec.placement.max_replicas_per_node = per_node(req.replicas_max_per_node)?;
    spec.restart = restart(RestartPolicy::default(), &req.restart)?;
    if let Some(t) = spec.task.as_mut() {
        t.health = rollout::health(None, &req.health, &spec.ports)?;
    }
    rollout::configs(&mut spec, &req.rollout)?;
    Ok(spec)
}

/// The spec after an update, or why the update is refused.
fn apply_update(current: &ServiceSpec, req: &ServiceUpdate) -> Result<ServiceSpec> {
    if req.rollback {
        let only_rollback = ServiceUpdate {
            rollback: true,
            rollout: req.rollout.clone(),
            ..Default::default()
        };
        if *req != only_rollback {
            return Err(Error::Invalid(
                "--rollback goes back to the previous spec: it takes no other changes (only                  --rollback-* flags)"
                    .into(),
            ));
        }
        let mut with_config = current.clone();
        rollout::configs(&mut with_config, &req.rollout)?;
        return rollout::rolled_back(&with_config, "manually requested rollback", Clock::now_ms())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "service {} has no previous spec to roll back to: it was not updated since                      it was created",
                    current.name
                ))
            });
    }
    let mut spec = current.clone();
    if let Some(n) = req.replicas {
        match spec.mode {
            ServiceMode::Global => {
                return Err(Error::Invalid(format!(
                    "service {} is global: it runs one task on every eligible node and cannot be \
                     scaled (narrow it with --constraint-add instead)",
                    spec.name
                )));
            }
            ServiceMode::Replicated { .. } => {
                if spec.task.is_none() {
                    return Err(Error::Invalid(format!(
                        "service {} has no command to run, so it schedules no tasks: its tasks \
                         are started with `meshctl run --service {}`",
                        spec.name, spec.name
                    )));
                }
                spec.mode = ServiceMode::Replicated {
                    replicas: replicas(n)?,
                };
            }
        }
    }
    let placement = &mut spec.placement;
    for c in constraints(&req.constraint_rm)? {
        if !placement.constraints.contains(&c) {
            return Err(Error::Invalid(format!(
                "service {} has no constraint {c} to remove (see `meshctl service inspect {}`)",
                current.name, current.name
            )));
        }
        placement.constraints.retain(|x| *x != c);
    }
    for c in constraints(&req.constraint_add)? {
        if !placement.constraints.contains(&c) {
            placement.constraints.push(c);
        }
    }
    for p in preferences(&req.placement_pref_rm)? {
        placement.preferences.retain(|x| *x != p);
    }
    for p in preferences(&req.placement_pref_add)? {
        if !placement.preferences.contains(&p) {
            placement.preferences.push(p);
        }
    }
    if req.replicas_max_per_node.is_some() {
        placement.max_replicas_per_node = per_node(req.replicas_max_per_node)?;
    }
    for rm in &req.publish_rm {
        let (port, protocol) = published_port(rm)?;
        let before = spec.ports.len();
        spec.ports
            .retain(|p| !(p.published == Some(port) && p.protocol == protocol));
        if spec.ports.len() == before {
            return Err(Error::Invalid(format!(
                "service {} does not publish {port}/{protocol} (see `meshctl service inspect {}`)",
                current.name, current.name
            )));
        }
    }
    for add in &req.publish_add {
        let p: PortSpec = add.parse().map_err(Error::Invalid)?;
        // Publishing a port again replaces it (a new target or mode).
        spec.ports.retain(|q| {
            !(q.published.is_some() && q.published == p.published && q.protocol == p.protocol)
        });
        spec.ports.push(p);
    }
    spec.restart = restart(spec.restart, &req.restart)?;
    rollout::configs(&mut spec, &req.rollout)?;
    let template_flags = req.args.is_some()
        || !req.secret_add.is_empty()
        || !req.secret_rm.is_empty()
        || !req.config_add.is_empty()
        || !req.config_rm.is_empty()
        || !req.env_add.is_empty()
        || !req.env_rm.is_empty()
        || req.health != HealthFlags::default()
        || req.stop_grace_period.is_some();
    let ports = spec.ports.clone();
    match spec.task.as_mut() {
        None if template_flags || req.force => {
            return Err(Error::Invalid(format!(
                "service {} schedules no tasks (it has no command), so there is nothing to                  update or force",
                spec.name
            )));
        }
        None => {}
        Some(t) => {
            if let Some(args) = &req.args {
                let args = shlex::split(args).ok_or_else(|| {
                    Error::Invalid(format!("--args {args:?} has an unclosed quote"))
                })?;
                t.command.truncate(1);
                t.command.extend(args);
            }
            for k in &req.env_rm {
                t.env.retain(|(key, _)| key != k);
            }
            for (k, v) in parse_env(&req.env_add)? {
                t.env.retain(|(key, _)| *key != k);
                t.env.push((k, v));
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
                for r in file_refs(add, config)? {
                    refs.retain(|x| x.source != r.source);
                    refs.push(r);
                }
            }
            check_targets(t)?;
            t.health = rollout::health(t.health.take(), &req.health, &ports)?;
            if let Some(g) = &req.stop_grace_period {
                t.stop_grace_ms = duration_ms("--stop-grace-period", g)?;
            }
        }
    }
    if req.force {
        spec.force_update += 1;
    }
    if spec.template_id() != current.template_id() {
        rollout::start_rollout(&mut spec, current, Clock::now_ms());
    } else if spec
        .update_status
        .as_ref()
        .is_some_and(|s| s.state.is_paused())
        && spec != *current
    {
        // Any update of a paused rollout resumes it (as Swarm's does).
        let status = spec.update_status.as_mut().expect("checked");
        status.state = if status.state.is_rollback() {
            UpdateState::RollbackStarted
        } else {
            UpdateState::Updating
        };
        status.message = "update resumed".into();
    }
    Ok(spec)
}

fn replicas(n: i64) -> Result<u32> {
    if n < 0 {
        return Err(Error::Invalid(format!(
            "invalid replicas {n}: use a number from 0 to {MAX_REPLICAS}"
        )));
    }
    if n > i64::from(MAX_REPLICAS) {
        return Err(Error::Invalid(format!(
            "replicas {n} is more than mesh allows ({MAX_REPLICAS}): use a number from 0 to {MAX_REPLICAS}"
        )));
    }
    Ok(n as u32)
}

fn per_node(n: Option<i64>) -> Result<Option<u32>> {
    match n {
        None | Some(0) => Ok(None),
        Some(n) if n < 0 => Err(Error::Invalid(format!(
            "invalid --replicas-max-per-node {n}: use a positive number (0 for no limit)"
        ))),
        Some(n) => Ok(Some(replicas(n)?)),
    }
}

fn constraints(raw: &[String]) -> Result<Vec<Constraint>> {
    raw.iter()
        .map(|c| c.parse::<Constraint>().map_err(Error::Invalid))
        .collect()
}

fn preferences(raw: &[String]) -> Result<Vec<Spread>> {
    raw.iter()
        .map(|p| p.parse::<Spread>().map_err(Error::Invalid))
        .collect()
}

fn parse_env(raw: &[String]) -> Result<Vec<(String, String)>> {
    raw.iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) if !k.is_empty() && !k.contains(char::is_whitespace) => {
                Ok((k.to_owned(), v.to_owned()))
            }
            _ => Err(Error::Invalid(format!(
                "invalid --env {e:?}: expected KEY=VALUE"
            ))),
        })
        .collect()
}

fn restart(mut policy: RestartPolicy, flags: &RestartFlags) -> Result<RestartPolicy> {
    if let Some(c) = &flags.restart_condition {
        policy.condition = c.parse().map_err(Error::Invalid)?;
    }
    if let Some(d) = &flags.restart_delay {
        policy.delay_ms = duration_ms("--restart-delay", d)?;
    }
    if let Some(n) = flags.restart_max_attempts {
        policy.max_attempts =
            match n {
                0 => None,
                n if n < 0 => {
                    return Err(Error::Invalid(format!(
                        "invalid --restart-max-attempts {n}: use a positive number (0 for no limit)"
                    )));
                }
                n => Some(u32::try_from(n).map_err(|_| {
                    Error::Invalid(format!("--restart-max-attempts {n} is too large"))
                })?),
            };
    }
    if let Some(w) = &flags.restart_window {
        policy.window_ms = match duration_ms("--restart-window", w)? {
            0 => None,
            ms => Some(ms),
        };
    }
    Ok(policy)
}

/// `5s`, `1m30s`, `250ms`; a bare number is seconds, as Docker's flags take it.
pub fn duration_ms(flag: &str, s: &str) -> Result<u64> {
    let d = if let Ok(secs) = s.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        humantime::parse_duration(s).map_err(|e| {
            Error::Invalid(format!(
                "invalid {flag} {s:?}: {e}; write a duration such as 5s, 1m30s or 250ms"
            ))
        })?
    };
    if d > Duration::from_secs(365 * 24 * 3600) {
        return Err(Error::Invalid(format!(
            "{flag} {s:?} is longer than a year"
        )));
    }
    Ok(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(args: impl FnOnce(&mut ServiceCreate)) -> Result<ServiceSpec> {
        let mut req = ServiceCreate {
            name: "web".into(),
            command: vec!["sleep".into(), "100".into()],
            ..Default::default()
        };
        args(&mut req);
        draft(&req)
    }

    fn err(r: Result<ServiceSpec>) -> String {
        match r {
            Err(Error::Invalid(m)) => m,
            other => panic!("expected an invalid-input error, got {other:?}"),
        }
    }

    #[test]
    fn a_create_request_becomes_a_spec() {
        let spec = create(|r| {
            r.replicas = Some(3);
            r.constraints = vec!["node.labels.env==production".into()];
            r.placement_prefs = vec!["spread=node.labels.zone".into()];
            r.replicas_max_per_node = Some(2);
            r.restart.restart_condition = Some("on-failure".into());
            r.restart.restart_delay = Some("1m30s".into());
            r.restart.restart_max_attempts = Some(3);
            r.env = vec!["A=b=c".into()];
            r.publish = vec!["published=8080,target=80".into()];
        })
        .unwrap();
        assert_eq!(spec.mode, ServiceMode::Replicated { replicas: 3 });
        assert_eq!(spec.network, DEFAULT_NETWORK);
        assert_eq!(spec.placement.constraints.len(), 1);
        assert_eq!(spec.placement.max_replicas_per_node, Some(2));
        assert_eq!(spec.restart.delay_ms, 90_000);
        assert_eq!(spec.restart.max_attempts, Some(3));
        assert_eq!(spec.task.unwrap().env, vec![("A".into(), "b=c".into())]);
        assert_eq!(spec.ports[0].published, Some(8080));
        let spec = create(|_| {}).unwrap();
        assert_eq!(spec.mode, ServiceMode::Replicated { replicas: 1 });
    }

    #[test]
    fn bad_create_requests_say_how_to_fix_them() {
        let e = err(create(|r| {
            r.mode = Some("global".into());
            r.replicas = Some(3);
        }));
        assert!(e.contains("does not go with --mode global"), "{e}");
        assert!(err(create(|r| r.replicas = Some(-1))).contains("from 0 to"));
        assert!(err(create(|r| r.replicas = Some(1_000_000))).contains("more than mesh allows"));
        assert!(
            err(create(
                |r| r.constraints = vec!["node.labels.env=production".into()]
            ))
            .contains("FIELD==VALUE")
        );
        assert!(
            err(create(|r| r.constraints = vec!["node.role==manager".into()]))
                .contains("unknown constraint field")
        );
        assert!(
            err(create(|r| r.mode = Some("daemonset".into()))).contains("replicated or global")
        );
        assert!(
            err(create(|r| r.restart.restart_delay = Some("soon".into()))).contains("duration")
        );
        assert!(
            err(create(
                |r| r.restart.restart_condition = Some("always".into())
            ))
            .contains("on-failure")
        );
        assert!(err(create(|r| r.env = vec!["=x".into()])).contains("KEY=VALUE"));
        assert!(
            err(create(|r| {
                r.command.clear();
                r.replicas = Some(2);
            }))
            .contains("no command")
        );
    }

    #[test]
    fn published_ports_are_added_replaced_and_removed_without_rolling_the_tasks() {
        let spec = create(|r| r.publish = vec!["8080:80".into(), "5353:53/udp".into()]).unwrap();
        let update = |f: fn(&mut ServiceUpdate)| {
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

        let added = update(|r| r.publish_add = vec!["9090:90".into(), "8080:81".into()]).unwrap();
        assert_eq!(
            ports(&added),
            [
                (5353, Protocol::Udp, 53),
                (9090, Protocol::Tcp, 90),
                (8080, Protocol::Tcp, 81)
            ]
        );
        assert_eq!(added.template_id(), spec.template_id(), "no rollout");
        for rm in ["8080", "8080/tcp", "8080:80", "published=8080,target=80"] {
            let removed = update_rm(&spec, rm).unwrap();
            assert_eq!(ports(&removed), [(5353, Protocol::Udp, 53)], "{rm}");
        }
        assert_eq!(ports(&update_rm(&spec, "5353/udp").unwrap()).len(), 1);

        for (rm, says) in [
            ("5353", "does not publish 5353/tcp"),
            ("9999", "does not publish 9999/tcp"),
            ("http", "name the published port"),
            ("8080/sctp", "name the published port"),
        ] {
            let m = err(update_rm(&spec, rm));
            assert!(m.contains(says), "{rm}: {m}");
        }
        let m = err(update(|r| r.publish_add = vec!["80:".into()]));
        assert!(!m.is_empty());
    }

    fn update_rm(spec: &ServiceSpec, rm: &str) -> Result<ServiceSpec> {
        apply_update(
            spec,
            &ServiceUpdate {
                publish_rm: vec![rm.into()],
                ..Default::default()
            },
        )
    }

    #[test]
    fn updates_change_placement_and_refuse_what_cannot_be() {
        let spec = create(|r| r.replicas = Some(3)).unwrap();
        let up = apply_update(
            &spec,
            &ServiceUpdate {
                replicas: Some(5),
                constraint_add: vec!["node.hostname!=node3".into()],
                placement_pref_add: vec!["spread=node.labels.zone".into()],
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
                constraint_rm: vec!["node.hostname!=node3".into()],
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

        let global = create(|r| r.mode = Some("global".into())).unwrap();
        let e = apply_update(
            &global,
            &ServiceUpdate {
                replicas: Some(2),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("is global"), "{e}");
        let e = apply_update(
            &spec,
            &ServiceUpdate {
                constraint_rm: vec!["node.labels.a==b".into()],
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("no constraint"), "{e}");
    }
}
