//! What carrying out plans needs from a node, and nothing more: the seam between deciding
//! (`orchestrate`, `drain`) and doing (processes, gossip, the kernel).
//!
//! Nomad's scheduler sees its cluster only through `State` and `Planner` interfaces, so its
//! tests run it in memory (`tests.NewHarness`) and assert on the plans it made. mesh's
//! orchestrator sees its node only through [`NodeRuntime`]: the agent is the real one, and
//! unit tests use `fake::FakeCluster`, whose nodes start no process and need no root, and
//! where the test decides how processes end, what health checks say, whether load
//! balancers confirm a drain and what other nodes' records hold. Restart policy, rollout
//! waves, drains and duplicate slots are then checked in milliseconds.
//!
//! Time: records carry [`NodeRuntime::now_ms`]; waits (restart and health intervals, drain
//! confirmation) use tokio's clock, which a test pauses and advances, so both agree there.

use std::{collections::BTreeMap, future::Future, net::Ipv4Addr, sync::Arc, time::Duration};

use mesh_api::spec::{HealthCheck, ServiceSpec, TaskTemplate};
use mesh_planner::Task;
use tracing::warn;

use super::{Agent, drain::Drains, health, orchestrate::Jobs, tasks::Launch};
use crate::{
    cluster::{Clock, Replicated, View, key},
    task::ProcessState,
};

/// A task's process as this node's runtime knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LocalProcess {
    pub state: ProcessState,
    /// Its address on its network: where health checks reach it.
    pub ip: Option<Ipv4Addr>,
}

/// What to start for a service task.
pub(super) struct TaskStart<'a> {
    /// The local name (`web.1.<id>`).
    pub name: &'a str,
    /// The service's networks, the first first.
    pub networks: Vec<&'a str>,
    pub service: &'a str,
    /// Command or image, and the secrets and configs it is granted.
    pub template: &'a TaskTemplate,
    pub env: &'a [(String, String)],
    pub hostname: &'a str,
    /// A backend from the start; false: the orchestrator publishes it once it serves.
    pub publish: bool,
}

/// A task whose process was started (it may have ended already: a one-shot task).
pub(super) struct Started {
    pub ip: Option<Ipv4Addr>,
}

/// Everything the orchestrator does to and reads from its node. Futures are `Send` so that
/// the orchestrator's background jobs (starts, stops, health watches) can be spawned.
pub(super) trait NodeRuntime: Send + Sync + 'static {
    fn node_name(&self) -> &str;
    /// Wall-clock milliseconds: what task records and rollouts carry.
    fn now_ms(&self) -> u64;
    /// Since the agent started.
    fn uptime(&self) -> Duration;
    /// Whether this node was told peers to join: alone, it may act at once.
    fn expects_peers(&self) -> bool;
    /// False on an agent that runs the control plane only.
    fn runs_tasks(&self) -> bool;
    fn jobs(&self) -> &Jobs;
    fn drains(&self) -> &Drains;
    /// Asks for another pass soon (a job ended).
    fn poke(&self);

    /// The latest merged view, and one recomputed from gossip now.
    fn view(&self) -> Arc<View>;
    fn refresh(&self) -> impl Future<Output = Arc<View>> + Send;
    /// This node's own task records (`tsk:<id>`), by task ID.
    fn own_tasks(&self) -> impl Future<Output = BTreeMap<String, Task>> + Send;
    /// Writes task records in one gossip write (a reader sees all of them or none).
    fn publish_tasks(&self, tasks: &[&Task]) -> impl Future<Output = ()> + Send;
    fn forget_tasks(&self, ids: Vec<String>) -> impl Future<Output = ()> + Send;
    /// Writes a service's record (a rollout's outcome), stamped by this node.
    fn record_service(&self, record: Replicated<ServiceSpec>) -> impl Future<Output = ()> + Send;

    fn process(&self, name: &str) -> Option<LocalProcess>;
    /// Makes sure this node has `image`, pulling it if not; Err is the registry's reason.
    /// Pulls of one image wait for each other, so its tasks download it once. With the
    /// credentials `service` carries for the image's registry (`--with-registry-auth`).
    fn pull(
        &self,
        image: &str,
        service: &ServiceSpec,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Pulls an image in the background if this node lacks it (once per image at a time), so
    /// that an update's new tasks do not wait for it after the old ones stopped.
    fn prefetch(&self, image: &str, service: &ServiceSpec);
    /// Why a task of `service` with `template` cannot start yet on this node: a secret it is
    /// granted, or the registry credentials it pulls with, have not been sealed to this node
    /// (see `secrets`). A node without the admin key and of unknown key (the fake runtime)
    /// needs a copy of everything sealed to the admins.
    fn copies_waiting(
        &self,
        view: &View,
        service: &str,
        template: &TaskTemplate,
    ) -> Option<String> {
        super::secrets::waiting_for_copy(view, self.node_name(), None, service, template, false)
    }
    /// Plumbs the task's network and starts its process; Err says why it could not start.
    fn start_process(
        &self,
        view: &View,
        task: TaskStart<'_>,
    ) -> impl Future<Output = Result<Started, String>> + Send;
    /// SIGTERM, SIGKILL after `grace`; the process is forgotten.
    fn stop_process(
        &self,
        name: &str,
        grace: Duration,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Forgets a process that has ended.
    fn forget_process(&self, name: &str) -> impl Future<Output = anyhow::Result<()>> + Send;
    fn wait_listening(
        &self,
        name: &str,
        ip: Ipv4Addr,
        port: u16,
        limit: Duration,
    ) -> impl Future<Output = health::Ready> + Send;
    fn probe(
        &self,
        name: &str,
        ip: Ipv4Addr,
        check: &HealthCheck,
    ) -> impl Future<Output = Result<(), String>> + Send;

    /// Makes the task a backend in every node's load balancer and in DNS.
    fn publish_endpoint(
        &self,
        name: &str,
        network: &str,
        service: &str,
        ip: Ipv4Addr,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Marks its endpoint stopping everywhere; returns the removal's counter, which every
    /// node's load balancer echoes once it has let the task go.
    fn leave_load_balancers(&self, name: &str) -> impl Future<Output = u64> + Send;
    fn forget_endpoint(&self, name: &str) -> impl Future<Output = ()> + Send;
    fn stop_dns(&self, name: &str) -> impl Future<Output = ()> + Send;
    /// How long connections admitted just before a drain was confirmed may take to arrive.
    fn settle_time(&self) -> Duration;
    /// How long a write takes to reach every live node and their answers to come back (see
    /// `Agent::settle_time`): how long a slot that only just came to this node waits before
    /// it starts (see `orchestrate::Holds`).
    fn placement_hold(&self) -> Duration;
}

impl NodeRuntime for Agent {
    fn node_name(&self) -> &str {
        Agent::node_name(self)
    }

    fn now_ms(&self) -> u64 {
        Clock::now_ms()
    }

    fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    fn expects_peers(&self) -> bool {
        !self.config.config.join.is_empty()
    }

    fn runs_tasks(&self) -> bool {
        self.local().is_some()
    }

    fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    fn drains(&self) -> &Drains {
        &self.drains
    }

    fn poke(&self) {
        Agent::poke(self)
    }

    fn view(&self) -> Arc<View> {
        Agent::view(self)
    }

    async fn refresh(&self) -> Arc<View> {
        Agent::refresh(self).await
    }

    async fn own_tasks(&self) -> BTreeMap<String, Task> {
        self.gossip
            .own_keys()
            .await
            .into_iter()
            .filter(|(k, _)| k.starts_with(key::TASK))
            .filter_map(|(_, v)| serde_json::from_str::<Task>(&v).ok())
            .map(|t| (t.id.clone(), t))
            .collect()
    }

    async fn publish_tasks(&self, tasks: &[&Task]) {
        let mut writes = Vec::new();
        for t in tasks {
            match serde_json::to_string(t) {
                Ok(json) => writes.push((format!("{}{}", key::TASK, t.id), Some(json))),
                Err(e) => warn!(task = t.id, "cannot encode task record: {e}"),
            }
        }
        self.gossip.write(writes).await;
    }

    async fn forget_tasks(&self, ids: Vec<String>) {
        let gone: Vec<(String, Option<String>)> = ids
            .into_iter()
            .map(|id| (format!("{}{id}", key::TASK), None))
            .collect();
        self.gossip.write(gone).await;
    }

    async fn record_service(&self, mut record: Replicated<ServiceSpec>) {
        record.updated = self.tick();
        let name = record.spec.name.clone();
        if let Err(e) = self.write_object(key::SERVICE, &name, &record).await {
            warn!(service = name, "recording the rollout: {e}");
        }
    }

    fn prefetch(&self, image: &str, service: &ServiceSpec) {
        crate::task::prefetch_image(image, self.registry_credentials(service, image));
    }

    async fn pull(&self, image: &str, service: &ServiceSpec) -> Result<(), String> {
        let one_image = {
            let mut pulls = self.pulls.lock().expect("pulls lock");
            pulls.retain(|_, m| Arc::strong_count(m) > 1);
            pulls.entry(image.to_owned()).or_default().clone()
        };
        let _one_pull = one_image.lock().await;
        let auth = self.registry_credentials(service, image);
        crate::task::resolve_image(image, auth.as_ref()).await
    }

    fn process(&self, name: &str) -> Option<LocalProcess> {
        let record = self.local()?.tasks.get(name)?;
        Some(LocalProcess {
            state: record.state,
            ip: record.interfaces.first().map(|i| i.address.addr()),
        })
    }

    fn copies_waiting(
        &self,
        view: &View,
        service: &str,
        template: &TaskTemplate,
    ) -> Option<String> {
        Agent::copies_waiting(self, view, service, template)
    }

    async fn start_process(&self, view: &View, task: TaskStart<'_>) -> Result<Started, String> {
        // Opened here, for this start only: the bytes go to the task's tmpfs and nowhere else.
        let files = self
            .task_files(view, task.template)
            .map_err(|e| e.to_string())?;
        let record = self
            .launch(
                view,
                Launch {
                    name: task.name,
                    networks: task.networks,
                    service: Some(task.service),
                    command: &task.template.command,
                    env: task.env,
                    hostname: Some(task.hostname),
                    publish: task.publish,
                    image: task.template.image.as_deref(),
                    run: &task.template.run,
                    limits: &task.template.resources.limits,
                    security: &task.template.security,
                    files,
                    mounts: &task.template.mounts,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(Started {
            ip: record.interfaces.first().map(|i| i.address.addr()),
        })
    }

    async fn stop_process(&self, name: &str, grace: Duration) -> anyhow::Result<()> {
        match self.local() {
            Some(local) => local.tasks.stop_within(name, grace).await,
            None => Ok(()),
        }
    }

    async fn forget_process(&self, name: &str) -> anyhow::Result<()> {
        match self.local() {
            Some(local) => local.tasks.stop(name).await,
            None => Ok(()),
        }
    }

    async fn wait_listening(
        &self,
        name: &str,
        ip: Ipv4Addr,
        port: u16,
        limit: Duration,
    ) -> health::Ready {
        match self.local() {
            Some(local) => health::wait_listening(local, name, ip, port, limit).await,
            None => health::Ready::Gone,
        }
    }

    async fn probe(&self, name: &str, ip: Ipv4Addr, check: &HealthCheck) -> Result<(), String> {
        match self.local() {
            Some(local) => health::probe(local, name, ip, check).await,
            None => Err("this node runs no tasks".into()),
        }
    }

    async fn publish_endpoint(
        &self,
        name: &str,
        network: &str,
        service: &str,
        ip: Ipv4Addr,
    ) -> anyhow::Result<()> {
        // On each of the task's networks: the orchestrator names the first.
        let record = self.local().and_then(|l| l.tasks.get(name));
        let addresses: Vec<(&str, Ipv4Addr)> = match &record {
            Some(r) => r
                .interfaces
                .iter()
                .filter(|i| i.network != crate::task::GATEWAY_NETWORK)
                .map(|i| (i.network.as_str(), i.address.addr()))
                .collect(),
            None => vec![(network, ip)],
        };
        Agent::publish_endpoints(self, name, Some(service), &addresses)
            .await
            .map_err(anyhow::Error::from)
    }

    async fn leave_load_balancers(&self, name: &str) -> u64 {
        Agent::leave_load_balancers(self, name).await
    }

    async fn forget_endpoint(&self, name: &str) {
        Agent::forget_endpoint(self, name).await
    }

    async fn stop_dns(&self, name: &str) {
        self.stop_dns_for(name).await
    }

    fn settle_time(&self) -> Duration {
        // A few gossip rounds' worth is plenty for a request admitted just before the
        // drain to be answered.
        (self.config.gossip_interval() * 2).max(Duration::from_millis(200))
    }

    fn placement_hold(&self) -> Duration {
        Agent::settle_time(self)
    }
}
