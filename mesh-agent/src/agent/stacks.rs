//! `stack deploy/rm`: a compose file's objects (see `compose`), checked whole against the
//! view before anything is written, then created or changed one by one. A redeploy changes
//! only what differs: an unchanged service is not touched, a changed template rolls.

use std::collections::{BTreeMap, BTreeSet};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use tracing::info;

use super::{
    Agent, Error, Result, attachments,
    ports::PortAssigner,
    rollout,
    secrets::{Kind, check_size, validate_object_name},
    services::{check_file_refs, new_spec},
    validate_name,
};
use crate::cluster::{Clock, View};
use mesh_api::{
    spec::{STACK_LABEL, ServiceSpec},
    v1::{ServiceCreate, StackDeploy, StackFile, StackReport},
};

fn in_stack(labels: &BTreeMap<String, String>, stack: &str) -> bool {
    labels.get(STACK_LABEL).map(String::as_str) == Some(stack)
}

/// The spec a redeploy wants for an existing service: the file's, with the service's
/// identity, address and rollout history kept.
pub(super) fn redeployed(current: &ServiceSpec, mut spec: ServiceSpec) -> Result<ServiceSpec> {
    if spec.network != current.network {
        return Err(Error::Invalid(format!(
            "service {} would move from network {} to {}: mesh cannot change a service's \
             network; remove the service (or the stack) first",
            current.name, current.network, spec.network
        )));
    }
    if spec.endpoint_mode != current.endpoint_mode {
        return Err(Error::Invalid(format!(
            "service {} would change its endpoint mode: remove it first",
            current.name
        )));
    }
    if spec.mode.is_job() != current.mode.is_job() {
        // Swarm refuses it too ("service mode change is not allowed"): a job's tasks and a
        // service's would be planned by different rules.
        return Err(Error::Invalid(format!(
            "service {} would change from mode {} to {}: remove it first",
            current.name,
            current.mode.name(),
            spec.mode.name()
        )));
    }
    spec.vip = current.vip;
    // A network the service stays on keeps its VIP; one it joins gets one when written.
    for a in &mut spec.networks {
        a.vip = current
            .networks
            .iter()
            .find(|c| c.target == a.target)
            .and_then(|c| c.vip);
    }
    spec.version = current.version;
    spec.template_version = current.template_version;
    spec.force_update = current.force_update;
    spec.previous = current.previous.clone();
    spec.update_status = current.update_status.clone();
    // Replaced only by a deploy --with-registry-auth (see `apply_service_plan`).
    spec.registry_auth = current.registry_auth.clone();
    if spec.mode.is_job() {
        return Ok(super::services::job_runs_again(spec, current));
    }
    if spec.template_id() != current.template_id() {
        rollout::start_rollout(&mut spec, current, Clock::now_ms());
    }
    Ok(spec)
}

/// The file's configs that do not exist yet; one that exists must hold the same data.
fn new_configs<'a>(view: &View, req: &'a StackDeploy) -> Result<Vec<NewObject<'a>>> {
    let mut configs = Vec::new();
    for c in &req.configs {
        validate_object_name(Kind::Config, &c.name)?;
        let data = BASE64
            .decode(&c.data)
            .map_err(|_| Error::Invalid(format!("config {}: data is not base64", c.name)))?;
        check_size(Kind::Config, &c.name, data.len())?;
        if let Some(existing) = view.configs.get(&c.name) {
            if existing.spec.data != c.data {
                return Err(Error::Conflict(format!(
                    "config {} changed in the file, but configs cannot change: give it a new \
                     name (e.g. {}_v2) in the compose file",
                    c.name, c.name
                )));
            }
            continue;
        }
        configs.push((c, zeroize::Zeroizing::new(data)));
    }
    Ok(configs)
}

/// Each of the file's services checked against the future view: created, or changed to the
/// spec a redeploy wants.
fn plan_services<'a>(view: &View, future: &View, req: &'a StackDeploy) -> Result<ServicePlan<'a>> {
    let names: BTreeSet<&str> = req.services.iter().map(|s| s.spec.name.as_str()).collect();
    let mut ports = PortAssigner::new(view, &names);
    let mut plan = Vec::new();
    for s in &req.services {
        let mut spec = new_spec(&s.spec)?;
        let current = view.services.get(&spec.name).map(|c| &c.spec);
        ports.assign(&mut spec, current)?;
        if let Some(missing) = spec
            .attachments_names()
            .find(|n| n.is_empty() || !future.networks.contains_key(*n))
        {
            return Err(Error::NotFound(format!(
                "service {}: network {missing} not found",
                spec.name
            )));
        }
        check_file_refs(future, &spec)?;
        check_ports_outside(view, &names, &spec)?;
        // Against the services as they will be: the others outside the stack, and the
        // file's.
        let outside = view
            .services
            .values()
            .map(|o| &o.spec)
            .filter(|o| !names.contains(o.name.as_str()));
        attachments::check_names_free(outside.chain(req.services.iter().map(|o| &o.spec)), &spec)?;
        match view.services.get(&spec.name) {
            Some(current) if !in_stack(&current.spec.labels, &req.name) => {
                return Err(Error::Conflict(format!(
                    "service {} exists and is not part of stack {}: remove it or rename the stack",
                    spec.name, req.name
                )));
            }
            Some(current) => plan.push((s, Some(redeployed(&current.spec, spec)?))),
            None => plan.push((s, None)),
        }
    }
    Ok(plan)
}

/// A port the stack publishes must not be published by a service outside this deploy.
fn check_ports_outside(view: &View, deployed: &BTreeSet<&str>, spec: &ServiceSpec) -> Result<()> {
    for p in &spec.ports {
        let Some(published) = p.published else {
            continue;
        };
        if let Some(owner) = view.services.values().find(|o| {
            !deployed.contains(o.spec.name.as_str())
                && o.spec
                    .ports
                    .iter()
                    .any(|q| q.protocol == p.protocol && q.published == Some(published))
        }) {
            return Err(Error::Conflict(format!(
                "service {}: port {published}/{} is already published by service {}",
                spec.name, p.protocol, owner.spec.name
            )));
        }
    }
    Ok(())
}

/// A stack's secret or config data, decoded and checked, waiting to be created.
type NewObject<'a> = (&'a StackFile, zeroize::Zeroizing<Vec<u8>>);

/// What a deploy will do to each of the file's services: create it, or change it to a spec.
type ServicePlan<'a> = Vec<(&'a ServiceCreate, Option<ServiceSpec>)>;

impl Agent {
    /// Checks the whole stack against the view, then creates or changes its objects: a
    /// stack that cannot be deployed deploys nothing.
    pub async fn deploy_stack(&self, req: &StackDeploy) -> Result<StackReport> {
        validate_name("stack", &req.name)?;
        let view = self.refresh().await;
        for n in &req.networks {
            validate_name("network", &n.name)?;
        }
        let secrets = self.new_secrets(&view, req)?;
        let configs = new_configs(&view, req)?;
        let future = self.future_view(&view, req, &secrets, &configs);
        let plan = plan_services(&view, &future, req)?;
        for s in &req.services {
            let current = view.services.get(&s.spec.name).map(|c| &c.spec);
            self.check_bind_sources(&s.spec, current)?;
        }
        let specs: Vec<&ServiceSpec> = req.services.iter().map(|s| &s.spec).collect();
        super::volumes::check_volume_drivers(&view.services, &specs)?;
        for (s, _) in &plan {
            if !s.no_resolve_image {
                self.resolve_image(&view, &s.spec, s.registry_auth.as_ref())
                    .await?;
            }
        }
        self.create_stack_objects(&view, req, secrets, configs)
            .await?;
        let mut report = self.apply_service_plan(plan).await?;
        if req.prune {
            report.removed = self.prune_stack(&view, req).await?;
        }
        info!(stack = req.name, ?report, "stack deployed");
        Ok(report)
    }

    /// The file's secrets that do not exist yet; one that exists must hold the same data
    /// (secrets cannot change).
    fn new_secrets<'a>(&self, view: &View, req: &'a StackDeploy) -> Result<Vec<NewObject<'a>>> {
        let mut secrets = Vec::new();
        for s in &req.secrets {
            validate_object_name(Kind::Secret, &s.name)?;
            let data =
                zeroize::Zeroizing::new(BASE64.decode(&s.data).map_err(|_| {
                    Error::Invalid(format!("secret {}: data is not base64", s.name))
                })?);
            check_size(Kind::Secret, &s.name, data.len())?;
            if let Some(existing) = view.secrets.get(&s.name) {
                let old = self.open_secret(&existing.spec)?;
                if *old != *data {
                    return Err(Error::Conflict(format!(
                        "secret {} changed in the file, but secrets cannot change: give it a new \
                         name (e.g. {}_v2) in the compose file",
                        s.name, s.name
                    )));
                }
                continue;
            }
            secrets.push((s, data));
        }
        if !secrets.is_empty() && self.gossip.auth().is_none() {
            return Err(Error::Invalid(
                "the stack has secrets, and secrets need a cluster key: this agent's gossip is \
                 not sealed"
                    .into(),
            ));
        }
        Ok(secrets)
    }

    /// The view as it will be once the stack's networks, secrets and configs exist, to check
    /// its services against.
    fn future_view(
        &self,
        view: &View,
        req: &StackDeploy,
        secrets: &[NewObject<'_>],
        configs: &[NewObject<'_>],
    ) -> View {
        let mut future = view.clone();
        for n in &req.networks {
            future.networks.entry(n.name.clone()).or_insert_with(|| {
                crate::cluster::Replicated::new(
                    crate::cluster::NetworkSpec {
                        name: n.name.clone(),
                        subnet: "10.255.255.0/24".parse().expect("valid"),
                        gateway: "10.255.255.1".parse().expect("valid"),
                        vni: 0,
                        labels: n.labels.clone(),
                    },
                    self.tick(),
                )
            });
        }
        for (s, _) in secrets {
            future
                .secrets
                .insert(s.name.clone(), placeholder_secret(&s.name, self.tick()));
        }
        for (c, _) in configs {
            future
                .configs
                .insert(c.name.clone(), placeholder_config(&c.name, self.tick()));
        }
        future
    }

    async fn create_stack_objects(
        &self,
        view: &View,
        req: &StackDeploy,
        secrets: Vec<NewObject<'_>>,
        configs: Vec<NewObject<'_>>,
    ) -> Result<()> {
        for n in &req.networks {
            if !view.networks.contains_key(&n.name) {
                self.create_network(&n.name, n.subnet.as_deref(), &n.labels)
                    .await?;
            }
        }
        for (s, data) in secrets {
            self.create_secret(&s.name, &data, s.labels.clone()).await?;
        }
        for (c, data) in configs {
            self.create_config(&c.name, &data, c.labels.clone()).await?;
        }
        Ok(())
    }

    async fn apply_service_plan(&self, plan: ServicePlan<'_>) -> Result<StackReport> {
        let mut report = StackReport::default();
        for (req, change) in plan {
            let name = req.spec.name.clone();
            let Some(mut spec) = change else {
                self.create_service(req).await?;
                report.created.push(name);
                continue;
            };
            let Some(current) = self.refresh().await.services.get(&name).cloned() else {
                return Err(Error::Conflict(format!(
                    "service {name} was removed during the deploy"
                )));
            };
            if let Some(auth) = &req.registry_auth {
                spec.registry_auth = Some(self.seal_registry_auth(&spec, auth)?);
            }
            if spec == current.spec {
                report.unchanged.push(name);
            } else {
                self.write_service_change(&current, spec).await?;
                report.updated.push(name);
            }
        }
        Ok(report)
    }

    /// `--prune`: the stack's services that the file no longer has.
    async fn prune_stack(&self, view: &View, req: &StackDeploy) -> Result<Vec<String>> {
        let names: BTreeSet<&str> = req.services.iter().map(|s| s.spec.name.as_str()).collect();
        let mut removed = Vec::new();
        for s in view.services.values() {
            if in_stack(&s.spec.labels, &req.name) && !names.contains(s.spec.name.as_str()) {
                self.remove_service(&s.spec.name).await?;
                removed.push(s.spec.name.clone());
            }
        }
        Ok(removed)
    }

    /// Removes everything labelled with the stack: services first, then (once their tasks
    /// left) networks, secrets and configs.
    pub async fn remove_stack(&self, stack: &str) -> Result<Vec<String>> {
        let view = self.refresh().await;
        let mut removed = Vec::new();
        for s in view
            .services
            .values()
            .filter(|s| in_stack(&s.spec.labels, stack))
        {
            self.remove_service(&s.spec.name).await?;
            removed.push(format!("service {}", s.spec.name));
        }
        let networks: Vec<String> = view
            .networks
            .values()
            .filter(|n| in_stack(&n.spec.labels, stack))
            .map(|n| n.spec.name.clone())
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        for n in &networks {
            // Tasks leave their network as they stop; wait for them (their grace period).
            loop {
                match self.remove_network(n).await {
                    Ok(()) => break,
                    Err(Error::Conflict(_)) if std::time::Instant::now() < deadline => {
                        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
            removed.push(format!("network {n}"));
        }
        for s in view
            .secrets
            .values()
            .filter(|s| in_stack(&s.spec.labels, stack))
        {
            self.remove_file_object(Kind::Secret, &s.spec.name).await?;
            removed.push(format!("secret {}", s.spec.name));
        }
        for c in view
            .configs
            .values()
            .filter(|c| in_stack(&c.spec.labels, stack))
        {
            self.remove_file_object(Kind::Config, &c.spec.name).await?;
            removed.push(format!("config {}", c.spec.name));
        }
        if removed.is_empty() {
            return Err(Error::NotFound(format!(
                "stack {stack} not found (see `meshctl stack ls`)"
            )));
        }
        Ok(removed)
    }
}

/// Stacks in the view: name → number of services.
pub fn stacks(view: &View) -> BTreeMap<String, usize> {
    let mut out: BTreeMap<String, usize> = BTreeMap::new();
    for s in view.services.values() {
        if let Some(st) = s.spec.labels.get(STACK_LABEL) {
            *out.entry(st.clone()).or_default() += 1;
        }
    }
    for labels in view
        .networks
        .values()
        .map(|n| &n.spec.labels)
        .chain(view.secrets.values().map(|s| &s.spec.labels))
        .chain(view.configs.values().map(|c| &c.spec.labels))
    {
        if let Some(st) = labels.get(STACK_LABEL) {
            out.entry(st.clone()).or_default();
        }
    }
    out
}

fn placeholder_secret(
    name: &str,
    stamp: mesh_api::id::Stamp,
) -> crate::cluster::Replicated<crate::cluster::SecretSpec> {
    crate::cluster::Replicated::new(
        crate::cluster::SecretSpec {
            name: name.to_owned(),
            labels: BTreeMap::new(),
            size: 0,
            sealed: None,
            admins: None,
        },
        stamp,
    )
}

fn placeholder_config(
    name: &str,
    stamp: mesh_api::id::Stamp,
) -> crate::cluster::Replicated<crate::cluster::ConfigSpec> {
    crate::cluster::Replicated::new(
        crate::cluster::ConfigSpec {
            name: name.to_owned(),
            labels: BTreeMap::new(),
            data: String::new(),
        },
        stamp,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::spec::TaskTemplate;
    use mesh_planner::ServiceMode;

    fn job(command: &str) -> ServiceSpec {
        ServiceSpec {
            name: "st_migrate".into(),
            network: "st_default".into(),
            mode: ServiceMode::ReplicatedJob {
                completions: 2,
                max_concurrent: 2,
            },
            task: Some(TaskTemplate {
                command: vec![command.into()],
                ..Default::default()
            }),
            version: 3,
            ..Default::default()
        }
    }

    #[test]
    fn a_redeployed_job_runs_again_only_when_it_changed() {
        let current = job("/bin/migrate");
        let same = redeployed(&current, job("/bin/migrate")).unwrap();
        assert_eq!(same, current, "an unchanged job is left alone");
        let changed = redeployed(&current, job("/bin/migrate-v2")).unwrap();
        assert_ne!(changed.template_id(), current.template_id());
        assert!(changed.update_status.is_none(), "no rollout for a job");
        let mut service = job("/bin/migrate");
        service.mode = ServiceMode::Replicated { replicas: 2 };
        let e = redeployed(&current, service).unwrap_err().to_string();
        assert!(
            e.contains("would change from mode replicated-job to replicated"),
            "{e}"
        );
    }
}
