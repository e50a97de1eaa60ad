//! Tasks of this node as the cluster sees them: starting one attaches it to its network and
//! publishes its endpoint; when it exits or is removed, the endpoint leaves every node.

use tracing::{info, warn};

use super::{Agent, Error, Result, validate_name};
use crate::{
    cluster::{EndpointRecord, View, key, mac_for_ip},
    task::{Attachment, TaskExit, TaskFiles, TaskRecord, TaskSpec},
};
use mesh_api::spec::EndpointState;
use mesh_api::v1::TaskRun;

/// What to start: a task of this node.
pub(crate) struct Launch<'a> {
    pub name: &'a str,
    /// One interface on each (eth0 on the first); the first is the one egress and
    /// published ports use.
    pub networks: Vec<&'a str>,
    pub service: Option<&'a str>,
    /// The process driver's command line; with an image, the container's arguments.
    pub command: &'a [String],
    pub env: &'a [(String, String)],
    /// Default: the task name.
    pub hostname: Option<&'a str>,
    /// A backend from the start; false: the caller publishes it (once it is healthy).
    pub publish: bool,
    /// Run this OCI image with podman instead of a process.
    pub image: Option<&'a str>,
    /// Entrypoint, user, working directory, stop signal, container labels.
    pub run: &'a mesh_api::spec::RunOptions,
    /// Memory, CPU and PID limits.
    pub limits: &'a mesh_api::spec::Limits,
    /// Capabilities, read-only root, sysctls, ulimits.
    pub security: &'a mesh_api::spec::Security,
    /// Secrets and configs it is granted, opened for this start only.
    pub files: TaskFiles,
    /// Volumes, bind mounts and tmpfs.
    pub mounts: &'a [mesh_api::spec::Mount],
}

impl Agent {
    /// Starts a task: a process in a new network namespace on `network`, optionally a task of
    /// a service (then it receives the service's traffic).
    pub async fn run_task(&self, req: &TaskRun) -> Result<TaskRecord> {
        validate_name("task", &req.name)?;
        if req.command.is_empty() {
            return Err(Error::Invalid(
                "no command to run: put it after `--`, e.g. meshctl run --network app --name c1 -- sleep 1000".into(),
            ));
        }
        let view = self.refresh().await;
        if !view.networks.contains_key(&req.network) {
            return Err(Error::NotFound(format!(
                "network {} not found: create it with `meshctl network create {}`",
                req.network, req.network
            )));
        }
        if let Some(svc) = &req.service {
            match view.services.get(svc) {
                None => {
                    return Err(Error::NotFound(format!(
                        "service {svc} not found: create it with `meshctl service create {svc} --network {}`",
                        req.network
                    )));
                }
                Some(s) => super::attachments::check_task_network(
                    &s.spec,
                    &req.network,
                    "run its tasks on",
                )?,
            }
        }
        let files = self.hand_started_files(&view, req)?;
        let local = self.require_local()?;
        if local.tasks.get(&req.name).is_some() {
            return Err(Error::Conflict(format!(
                "a task named {} already exists on this node: remove it with `meshctl rm {}` or pick another name",
                req.name, req.name
            )));
        }
        if let Some(other) = view.endpoints.iter().find(|e| e.record.task == req.name) {
            return Err(Error::Conflict(format!(
                "a task named {} already runs on node {}: task names are cluster-wide (they resolve in DNS)",
                req.name, other.node
            )));
        }

        self.launch(
            &view,
            Launch {
                name: &req.name,
                networks: vec![&req.network],
                service: req.service.as_deref(),
                command: &req.command,
                env: &req.env,
                hostname: None,
                publish: true,
                image: None,
                run: &Default::default(),
                limits: &Default::default(),
                security: &Default::default(),
                files,
                mounts: &[],
            },
        )
        .await
    }

    /// Plumbs the task's network on this node, starts its process and publishes its
    /// endpoint: from then on it is a backend of its service on every node.
    pub(crate) async fn launch(&self, view: &View, task: Launch<'_>) -> Result<TaskRecord> {
        let local = self.require_local()?;
        let mut stages = crate::task::Stages::new();
        let first = *task
            .networks
            .first()
            .ok_or_else(|| Error::Invalid(format!("task {} has no network", task.name)))?;
        // Pinned, a network stays plumbed until the task is created (then the task keeps
        // it): convergence may run beside the rest of the start, and so may other starts.
        let (_pin, ready) = super::converge::Pin::new(&local.plumbed, &task.networks);
        if !ready {
            let _converging = self.converging.lock().await;
            self.converge_locked(view, Some(first)).await?;
        }
        stages.lap("plumbing");
        let own = self.own_attachments().await;
        let mut plumbed = Vec::new();
        for network in &task.networks {
            let plumbing = self
                .plumbing_of(local, view, &own, network)
                .ok_or_else(|| {
                    Error::Internal(anyhow::anyhow!(
                        "network {network} could not be plumbed on this node (no address for \
                         the node yet)"
                    ))
                })?;
            plumbed.push(plumbing);
        }
        let mut addresses: Vec<(&str, std::net::Ipv4Addr)> = Vec::new();
        for network in &task.networks {
            match self.allocate(network).await {
                Ok(ip) => addresses.push((network, ip)),
                Err(e) => {
                    self.release_addresses(&addresses).await;
                    return Err(e);
                }
            }
        }
        stages.lap("addresses");
        let spec = TaskSpec {
            name: task.name.to_owned(),
            // Overlay traffic stays on eth0, eth1, …; everything else leaves through the
            // gateway bridge, masqueraded, as with Docker's docker_gwbridge.
            attachments: plumbed
                .iter()
                .zip(&addresses)
                .map(|(p, (_, ip))| Attachment::overlay(p, *ip).without_default_route())
                .collect(),
            egress: Some(local.gateway.clone()),
            command: task.command.to_vec(),
            env: task.env.to_vec(),
            hostname: task.hostname.map(str::to_owned),
            image: task.image.map(str::to_owned),
            run: task.run.clone(),
            limits: *task.limits,
            security: task.security.clone(),
            mounts: task.mounts.to_vec(),
        };
        // A process that resolves a name or connects to a VIP as it starts (an app dialling
        // its database) must find the resolver and the socket hooks already there.
        let before_start = |r: crate::task::TaskRecord| -> futures_util::future::BoxFuture<
            '_,
            anyhow::Result<()>,
        > { Box::pin(async move { self.serve_dns_before_start(&r).await }) };
        let record = match local.tasks.create(spec, task.files, &before_start).await {
            Ok(r) => r,
            Err(e) => {
                self.stop_dns_for(task.name).await;
                self.release_addresses(&addresses).await;
                return Err(Error::Invalid(format!("{e:#}")));
            }
        };
        stages.lap("process");
        if task
            .mounts
            .iter()
            .any(|m| m.kind == mesh_api::spec::MountType::Volume)
        {
            // Its first use may have created one.
            self.publish_volumes().await;
        }
        if record.state != crate::task::ProcessState::Running {
            // Ended before it could serve (a one-shot container): no endpoint; the
            // orchestrator sees the exit on its next pass.
            self.stop_dns_for(task.name).await;
            self.release_addresses(&addresses).await;
            self.poke();
            return Ok(record);
        }
        if let Err(e) = self.attach_task_veths(local, &record, &plumbed).await {
            warn!(
                task = task.name,
                "client-address replies are not steered yet: {e:#}"
            );
        }
        stages.lap("steering");
        if task.publish {
            self.publish_endpoints(task.name, task.service, &addresses)
                .await?;
            // An exit handled while the endpoint was being written found nothing to remove:
            // the process is gone, so its endpoint must not outlive it.
            if local
                .tasks
                .get(task.name)
                .is_none_or(|t| t.state != crate::task::ProcessState::Running)
            {
                self.forget_endpoints(task.name).await;
            }
        }
        self.release_addresses(&addresses).await;
        stages.lap("endpoint");
        self.update_dns(&*self.refresh().await);
        stages.lap("dns");
        tracing::debug!(task = task.name, stages = %stages, "where the start's time went");
        info!(task = task.name, networks = ?task.networks, addresses = ?addresses, service = ?task.service, "task running");
        self.poke();
        Ok(record)
    }

    async fn release_addresses(&self, addresses: &[(&str, std::net::Ipv4Addr)]) {
        for (network, ip) in addresses {
            self.release(network, *ip).await;
        }
    }

    /// Makes a task a backend on each of its networks (`addresses`: network and address, the
    /// first network first).
    pub(crate) async fn publish_endpoints(
        &self,
        task: &str,
        service: Option<&str>,
        addresses: &[(&str, std::net::Ipv4Addr)],
    ) -> Result<()> {
        let mut writes = Vec::new();
        for (i, (network, ip)) in addresses.iter().enumerate() {
            let endpoint = EndpointRecord {
                task: task.to_owned(),
                network: (*network).to_owned(),
                service: service.map(str::to_owned),
                ip: *ip,
                mac: mac_for_ip(*ip),
                state: EndpointState::Running,
            };
            writes.push((
                key::endpoint(task, network, i),
                Some(serde_json::to_string(&endpoint).map_err(anyhow::Error::from)?),
            ));
        }
        self.gossip.write(writes).await;
        Ok(())
    }

    /// Makes a task a backend: its endpoint goes to every node's load balancer and DNS.
    pub(crate) async fn publish_endpoint(
        &self,
        task: &str,
        network: &str,
        service: Option<&str>,
        ip: std::net::Ipv4Addr,
    ) -> Result<()> {
        self.publish_endpoints(task, service, &[(network, ip)])
            .await
    }

    /// Stops and forgets a task of this node.
    pub async fn remove_task(&self, name: &str) -> Result<()> {
        let local = self.require_local()?;
        if local.tasks.get(name).is_none() {
            return Err(Error::NotFound(format!(
                "no task named {name} on this node (see `meshctl ps -a`)"
            )));
        }
        // The endpoint leaves first, so no new connection is sent to a task being stopped.
        let removal = self.leave_load_balancers(name).await;
        self.stop_dns_for(name).await;
        self.drained(name, removal).await;
        let stopped = local.tasks.stop(name).await;
        self.forget_endpoint(name).await;
        stopped?;
        self.poke();
        Ok(())
    }

    /// Takes the endpoints of tasks that exited out of gossip, all of a batch in one write:
    /// exits are handled between passes of the reconcile loop, and one pass per exit let a
    /// crash-looping service's dead endpoints pile up behind each other (25 s behind with
    /// eight tasks exiting at once) — dead backends in every load balancer, and addresses
    /// still in use when the restarted tasks asked for new ones, until the network ran out.
    pub(crate) async fn tasks_exited(
        &self,
        exits: Vec<Result<TaskExit, tokio::sync::broadcast::error::RecvError>>,
    ) {
        let mut names = std::collections::BTreeSet::new();
        let mut missed = false;
        for exit in exits {
            match exit {
                Ok(exit) => {
                    info!(task = exit.name, code = ?exit.code, signal = ?exit.signal, "task exited; removing its endpoint");
                    names.insert(exit.name);
                }
                Err(_) => missed = true,
            }
        }
        for name in &names {
            self.stop_dns_for(name).await;
        }
        let keys: Vec<(String, Option<String>)> = self
            .gossip
            .own_keys()
            .await
            .into_keys()
            .filter(|k| key::endpoint_task(k).is_some_and(|(t, _)| names.contains(t)))
            .map(|k| (k, None))
            .collect();
        if !keys.is_empty() {
            self.gossip.write(keys).await;
        }
        // Missed some exits: drop every endpoint whose task is no longer running.
        if missed {
            self.forget_stopped_endpoints().await;
        }
    }

    /// This node's endpoint records of `task`, one per network it is on (key, value).
    pub(crate) async fn own_endpoints(&self, task: &str) -> Vec<(String, String)> {
        self.gossip
            .own_keys()
            .await
            .into_iter()
            .filter(|(k, _)| key::endpoint_task(k).is_some_and(|(t, _)| t == task))
            .collect()
    }

    /// Takes `task`'s endpoints, on every network, out of gossip.
    pub(crate) async fn forget_endpoints(&self, task: &str) {
        let keys: Vec<(String, Option<String>)> = self
            .own_endpoints(task)
            .await
            .into_iter()
            .map(|(k, _)| (k, None))
            .collect();
        if !keys.is_empty() {
            self.gossip.write(keys).await;
        }
    }

    /// Removes endpoints this node publishes for tasks that do not run (e.g. after a restart
    /// found them gone).
    pub async fn forget_stopped_endpoints(&self) {
        let stale: Vec<(String, Option<String>)> = self
            .gossip
            .own_keys()
            .await
            .into_keys()
            .filter_map(|k| {
                let (task, _) = key::endpoint_task(&k)?;
                // Containers attached through CNI are not tasks the agent runs, but their
                // endpoints live as long as the attachment.
                let running = self.local().is_some_and(|l| {
                    l.tasks
                        .get(task)
                        .is_some_and(|t| t.state == crate::task::ProcessState::Running)
                        || l.tasks.cni_list().iter().any(|c| c.task == task)
                });
                (!running).then_some((k.clone(), None))
            })
            .collect();
        if !stale.is_empty() {
            warn!(
                count = stale.len(),
                "removing endpoints of tasks that are not running"
            );
            self.gossip.write(stale).await;
        }
    }
}
