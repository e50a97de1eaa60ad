//! A service: its mode, placement, ports, task template, restart, update and rollback.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, str::FromStr};

use mesh_planner::{Placement, RestartPolicy, ServiceMode, UpdateConfig};
use serde::{Deserialize, Serialize};

use super::{
    DnsConfig, ExtraHost, FileRef, LogDriver, Mount, NetworkAttachment, PortSpec, Security,
    TaskResources, template,
};

/// The driver that runs a command in the task's namespaces (no image).
pub const DRIVER_PROCESS: &str = "process";
/// OCI images run by podman; advertised only where podman works.
pub const DRIVER_PODMAN: &str = "podman";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    /// One virtual IP, balanced by the dataplane.
    #[default]
    Vip,
    /// DNS round robin: the name resolves to the task IPs, no VIP.
    Dnsrr,
}

impl fmt::Display for EndpointMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Vip => "vip",
            Self::Dnsrr => "dnsrr",
        })
    }
}

impl FromStr for EndpointMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vip" => Ok(Self::Vip),
            "dnsrr" => Ok(Self::Dnsrr),
            other => Err(format!("unknown endpoint mode {other:?}: use vip or dnsrr")),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    /// Service labels (Swarm's `--label`, compose `deploy.labels`; a stack's services carry
    /// [`STACK_LABEL`]). Not part of the task template: changing them rolls nothing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The network the tasks join (their eth0).
    pub network: String,
    /// The service's aliases on `network`: names that resolve like its own, there only.
    /// Outside the task template: changing them replaces no task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// The networks after the first (eth1, eth2, …), each with its aliases and VIP. The
    /// first keeps its own fields so specs written before stay as they were.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<NetworkAttachment>,
    pub endpoint_mode: EndpointMode,
    /// Set in vip mode, from the creating node's address block.
    pub vip: Option<Ipv4Addr>,
    pub ports: Vec<PortSpec>,
    /// replicated (N slots) or global (one task per eligible node).
    #[serde(default)]
    pub mode: ServiceMode,
    /// What each task runs. None: nothing is scheduled; the service's tasks are started by
    /// hand (`meshctl run --service`) or attached by another runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskTemplate>,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Counts every change of the spec (Swarm's spec version).
    #[serde(default)]
    pub version: u64,
    /// The version at which what a task runs last changed (or an update was forced): tasks
    /// created for an older one are replaced.
    #[serde(default)]
    pub template_version: u64,
    /// Bumped by `service update --force`: part of the template's identity, so every task is
    /// replaced although nothing else changed (Swarm's ForceUpdate).
    #[serde(default)]
    pub force_update: u64,
    /// How a template change rolls out, and how a rollback does.
    #[serde(default)]
    pub update: UpdateConfig,
    #[serde(default)]
    pub rollback: UpdateConfig,
    /// The spec before the last template change: what `service rollback` goes back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Box<ServiceSpec>>,
    /// The last rollout and how it stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_status: Option<UpdateStatus>,
    /// `--with-registry-auth`: the credentials the creating node had for the image's
    /// registry, sealed by its agent. Outside the task template: new credentials replace no
    /// task; a node opens them only to pull the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<SealedRegistryAuth>,
}

/// Registry credentials as a service carries them (see `ServiceSpec::registry_auth`). Its
/// Debug form shows only the registry.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedRegistryAuth {
    /// The registry they are for (`registry.example.com:5000`, `docker.io`).
    pub registry: String,
    /// The id of the cluster key they are sealed with (clusters without roles).
    pub key: u32,
    /// base64 of nonce ‖ ciphertext ‖ tag under that key; empty when sealed to the admins.
    pub data: String,
    /// base64 of the credentials sealed to the admin key (clusters with roles): only holders
    /// of `admin.key` open them; a node that pulls the image gets a copy sealed to its own
    /// key, as for secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admins: Option<String>,
    /// When they were sealed to the admins: which credentials a node's copy is of (new
    /// credentials need new copies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_at: Option<crate::id::Stamp>,
}

impl fmt::Debug for SealedRegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealedRegistryAuth({}, sealed)", self.registry)
    }
}

/// Swarm's UpdateStatus.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    pub state: UpdateState,
    pub started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_ms: Option<u64>,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    Updating,
    Paused,
    Completed,
    RollbackStarted,
    RollbackPaused,
    RollbackCompleted,
}

impl UpdateState {
    /// The rollout is still replacing tasks (or would, once resumed).
    pub fn in_progress(self) -> bool {
        matches!(self, Self::Updating | Self::RollbackStarted)
    }

    pub fn is_rollback(self) -> bool {
        matches!(
            self,
            Self::RollbackStarted | Self::RollbackPaused | Self::RollbackCompleted
        )
    }

    pub fn is_paused(self) -> bool {
        matches!(self, Self::Paused | Self::RollbackPaused)
    }
}

impl fmt::Display for UpdateState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Updating => "updating",
            Self::Paused => "paused",
            Self::Completed => "completed",
            Self::RollbackStarted => "rollback_started",
            Self::RollbackPaused => "rollback_paused",
            Self::RollbackCompleted => "rollback_completed",
        })
    }
}

impl ServiceSpec {
    /// What identifies the task template: tasks made from another one are replaced. FNV-1a
    /// of its canonical JSON, so every node and every build computes the same.
    pub fn template_id(&self) -> u64 {
        // The networks are the tasks' interfaces: joining or leaving one replaces them. A
        // service on one network hashes as before several existed.
        let json = if self.networks.is_empty() {
            serde_json::to_string(&(&self.task, self.force_update))
        } else {
            let names: Vec<&str> = self.attachments_names().collect();
            serde_json::to_string(&(&self.task, self.force_update, names))
        }
        .unwrap_or_default();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in json.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }

    /// The planner's view of this service, if it schedules tasks at all.
    pub fn planned(&self) -> Option<mesh_planner::Service<'_>> {
        let task = self.task.as_ref()?;
        let status = self.update_status.as_ref().map(|s| s.state);
        Some(mesh_planner::Service {
            name: &self.name,
            mode: self.mode,
            placement: &self.placement,
            driver: task.driver(),
            template: self.template_id(),
            update: if status.is_some_and(UpdateState::is_rollback) {
                self.rollback
            } else {
                self.update
            },
            paused: status.is_some_and(UpdateState::is_paused),
            reservation: task.resources.reservations,
        })
    }

    /// The networks the service is on, with its aliases on each.
    pub fn attachments(&self) -> Vec<NetworkAttachment> {
        let first = NetworkAttachment {
            target: self.network.clone(),
            aliases: self.aliases.clone(),
            vip: self.vip,
        };
        std::iter::once(first)
            .chain(self.networks.iter().cloned())
            .collect()
    }

    /// The names of the service's networks, the first first.
    pub fn attachments_names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.network.as_str())
            .chain(self.networks.iter().map(|n| n.target.as_str()))
    }

    /// Whether the service is on `network`.
    pub fn on_network(&self, network: &str) -> bool {
        self.attachments_names().any(|n| n == network)
    }

    /// What each task reserves of its node (nothing for a service without tasks).
    pub fn reservation(&self) -> mesh_planner::Resources {
        self.task
            .as_ref()
            .map(|t| t.resources.reservations)
            .unwrap_or_default()
    }
}

/// What a service's tasks run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskTemplate {
    /// The command line; with an image, the arguments that replace the image's CMD.
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The task's hostname; default: the task name (`web.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Run by the task's node; until it passes the task is not a backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// Between SIGTERM and SIGKILL when the task is stopped.
    #[serde(default = "default_stop_grace_ms")]
    pub stop_grace_ms: u64,
    /// An OCI image the tasks run as podman containers (the podman driver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Secrets mounted at /run/secrets/<target>. Part of the template: granting or revoking
    /// one rolls the tasks. Skipped when empty so templates from before keep their id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<FileRef>,
    /// Configs mounted at their target path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub configs: Vec<FileRef>,
    /// How the task's program runs (entrypoint, user, working directory, stop signal,
    /// container labels). Skipped when empty so templates from before keep their id.
    #[serde(default, skip_serializing_if = "RunOptions::is_empty")]
    pub run: RunOptions,
    /// Reservations (placement) and limits (cgroups). Skipped when empty so templates from
    /// before keep their id.
    #[serde(default, skip_serializing_if = "TaskResources::is_empty")]
    pub resources: TaskResources,
    /// Capabilities, read-only root, sysctls, ulimits, init.
    #[serde(default, skip_serializing_if = "Security::is_empty")]
    pub security: Security,
    /// Volumes, bind mounts and tmpfs (`--mount`). Skipped when empty so templates from
    /// before keep their id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
}

/// What one task gets of its template's templates: its hostname (None: the default) and
/// environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expanded {
    pub hostname: Option<String>,
    pub env: Vec<(String, String)>,
}

/// Docker's `--entrypoint`, `--user`, `--workdir`, `--stop-signal`, `--container-label`, and
/// what the task sees of its environment: `--host`, `--dns*`, `--log-driver`/`--log-opt`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunOptions {
    /// Replaces the image's ENTRYPOINT (image tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `user`, `uid` or `uid:gid` inside the container (image tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The working directory of the task's program (both drivers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// The signal that asks the task to stop, before SIGKILL (both drivers); `SIGTERM` if
    /// unset (an image's own STOPSIGNAL for image tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// Labels on the task's container (image tasks).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub container_labels: BTreeMap<String, String>,
    /// Extra /etc/hosts entries (`--host host:ip`), in order (both drivers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<ExtraHost>,
    /// Servers the task's resolver forwards to, search domains, resolver options.
    #[serde(default, skip_serializing_if = "DnsConfig::is_empty")]
    pub dns: DnsConfig,
    /// How the task's output is rotated (within what the node allows).
    #[serde(default, skip_serializing_if = "LogDriver::is_empty")]
    pub log: LogDriver,
}

impl RunOptions {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Extra hosts, DNS settings and log options, each checked to be what it claims.
    pub fn validate_env(&self) -> Result<(), String> {
        for h in &self.hosts {
            h.validate()?;
        }
        self.dns.validate()?;
        self.log.validate()
    }
}

fn default_stop_grace_ms() -> u64 {
    10_000
}

/// Docker's HEALTHCHECK, with the probes a node can run without a container runtime too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failures that make the task unhealthy.
    pub retries: u32,
    /// Failures in this first stretch do not count (a success still makes it healthy).
    pub start_period_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Probe {
    /// A command inside the task; healthy when it exits 0.
    Cmd(Vec<String>),
    /// HTTP GET of this path on the task's port; healthy on 2xx or 3xx.
    Http { port: u16, path: String },
    /// A TCP connect to the task's port.
    Tcp { port: u16 },
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cmd(c) => write!(f, "CMD {}", c.join(" ")),
            Self::Http { port, path } => write!(f, "HTTP GET :{port}{path}"),
            Self::Tcp { port } => write!(f, "TCP :{port}"),
        }
    }
}

impl Default for TaskTemplate {
    fn default() -> Self {
        Self {
            command: Vec::new(),
            env: Vec::new(),
            hostname: None,
            health: None,
            stop_grace_ms: default_stop_grace_ms(),
            image: None,
            secrets: Vec::new(),
            configs: Vec::new(),
            run: RunOptions::default(),
            resources: TaskResources::default(),
            security: Security::default(),
            mounts: Vec::new(),
        }
    }
}

impl TaskTemplate {
    /// Every template (hostname, env values) expanded against a sample task, as Swarm checks
    /// them when a service is created: Err is Go's message for the first bad one.
    pub fn check_templates(&self, labels: &BTreeMap<String, String>) -> Result<(), String> {
        if let Some(h) = &self.hostname {
            template::check(h, labels).map_err(|e| format!("--hostname {h:?}: {e}"))?;
        }
        for (k, v) in &self.env {
            template::check(v, labels).map_err(|e| format!("--env {k}={v}: {e}"))?;
        }
        Ok(())
    }

    /// The hostname and environment of one task, templates expanded.
    pub fn expanded(&self, ctx: &template::Context) -> Result<Expanded, String> {
        let hostname = self
            .hostname
            .as_deref()
            .map(|h| template::expand(h, ctx).map_err(|e| format!("hostname: {e}")))
            .transpose()?;
        let env = self
            .env
            .iter()
            .map(|(k, v)| {
                let v = if template::is_template(v) {
                    template::expand(v, ctx).map_err(|e| format!("env {k}: {e}"))?
                } else {
                    v.clone()
                };
                Ok((k.clone(), v))
            })
            .collect::<Result<_, String>>()?;
        Ok(Expanded { hostname, env })
    }

    pub fn driver(&self) -> &'static str {
        if self.image.is_some() {
            DRIVER_PODMAN
        } else {
            DRIVER_PROCESS
        }
    }
}
