//! Tasks of this node as the cluster sees them: starting one attaches it to its network and
//! publishes its endpoint; when it exits or is removed, the endpoint leaves every node.

use tracing::{info, warn};

use super::{Agent, Error, Result, validate_name};
use crate::{
    api::TaskRun,
    cluster::{EndpointRecord, TaskState as EndpointState, key, mac_for_ip},
    task::{Attachment, TaskExit, TaskRecord, TaskSpec},
};

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
                Some(s) if s.spec.network != req.network => {
                    return Err(Error::Invalid(format!(
                        "service {svc} is on network {}, not {}: run its tasks on {}",
                        s.spec.network, req.network, s.spec.network
                    )));
                }
                Some(_) => {}
            }
        }
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

        // Plumbing the network and creating the task happen under the convergence lock so a
        // concurrent convergence cannot unplumb the network in between.
        let _converging = self.converging.lock().await;
        self.converge_locked(&view, Some(&req.network)).await?;
        let plumbing = self
            .plumbing(local, &view, &req.network)
            .await
            .ok_or_else(|| {
                Error::Internal(anyhow::anyhow!(
                    "network {} could not be plumbed on this node (no address for the node yet)",
                    req.network
                ))
            })?;
        let ip = self.allocate(&req.network).await?;
        let spec = TaskSpec {
            name: req.name.clone(),
            // Overlay traffic stays on eth0; everything else leaves through the gateway
            // bridge, masqueraded, as with Docker's docker_gwbridge.
            attachments: vec![Attachment::overlay(&plumbing, ip).without_default_route()],
            egress: Some(local.gateway.clone()),
            command: req.command.clone(),
            env: req.env.clone(),
        };
        let record = match local.tasks.create(spec).await {
            Ok(r) => r,
            Err(e) => {
                self.release(&req.network, ip).await;
                return Err(Error::Invalid(format!("{e:#}")));
            }
        };
        let endpoint = EndpointRecord {
            task: req.name.clone(),
            network: req.network.clone(),
            service: req.service.clone(),
            ip,
            mac: mac_for_ip(ip),
            state: EndpointState::Running,
        };
        self.gossip
            .write([(
                format!("{}{}", key::ENDPOINT, req.name),
                Some(serde_json::to_string(&endpoint).map_err(anyhow::Error::from)?),
            )])
            .await;
        self.release(&req.network, ip).await;
        self.update_dns(&*self.refresh().await);
        if let Err(e) = self.serve_dns_for(&record).await {
            warn!(task = req.name, "the task has no DNS: {e:#}");
        }
        info!(task = req.name, network = req.network, %ip, service = ?req.service, "task running");
        self.poke();
        Ok(record)
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
        self.gossip
            .write([(format!("{}{name}", key::ENDPOINT), None)])
            .await;
        self.stop_dns_for(name).await;
        local.tasks.stop(name).await?;
        self.poke();
        Ok(())
    }

    pub(crate) async fn task_exited(
        &self,
        exit: Result<TaskExit, tokio::sync::broadcast::error::RecvError>,
    ) {
        match exit {
            Ok(exit) => {
                info!(task = exit.name, code = ?exit.code, signal = ?exit.signal, "task exited; removing its endpoint");
                self.stop_dns_for(&exit.name).await;
                self.gossip
                    .write([(format!("{}{}", key::ENDPOINT, exit.name), None)])
                    .await;
            }
            // Missed some exits: drop every endpoint whose task is no longer running.
            Err(_) => self.forget_stopped_endpoints().await,
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
                let task = k.strip_prefix(key::ENDPOINT)?;
                let running = self.local().is_some_and(|l| {
                    l.tasks
                        .get(task)
                        .is_some_and(|t| t.state == crate::task::TaskState::Running)
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
