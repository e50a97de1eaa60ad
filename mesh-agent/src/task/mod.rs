//! Tasks: workloads the agent runs itself. A task is a fresh network namespace
//! (`<node>-<task>`) with one interface per network it is attached to, and in it either a
//! process (the `process` driver: started in its own session so it outlives an agent crash)
//! or a podman container of an image (the `podman` driver, see `container`); either way its
//! init process is followed through a pidfd.
//!
//! Records persist under the state directory, so a restarted agent adopts the tasks that
//! are still running (same PID and start time) and marks the others exited. A task whose
//! process exits loses its network at once (veth, namespace) and is announced on
//! [`Tasks::subscribe`], so its endpoint can leave the cluster's tables.

mod cni;
mod container;
mod files;
pub mod init;
mod isolation;
mod limits;
mod logs;
mod plumbing;
mod process;
mod store;
pub mod volumes;

use mesh_api::spec::{Limits, RunOptions, Security};
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use nix::sys::signal::Signal;
use rtnetlink::Handle;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tracing::{debug, info, warn};

use crate::{
    netns,
    overlay::{GATEWAY_BRIDGE, GatewayPlumbing, MacAddr, NetworkPlumbing},
};

pub use cni::{CniAttachment, CniRequest};
pub use container::{
    available as podman_available, prefetch as prefetch_image, resolve as resolve_image,
};
pub use files::{SECRETS_DIR, TaskFile, TaskFiles};
pub use logs::{
    DEFAULT_MAX_FILE as DEFAULT_LOG_MAX_FILE, DEFAULT_MAX_SIZE as DEFAULT_LOG_MAX_SIZE,
    MAX_FILES as MAX_LOG_FILES, MAX_LINE as MAX_LOG_LINE, Stamped, write_log,
};
pub use plumbing::HOST_VETH_PREFIX;

/// The network name of a task's attachment to the node's gateway bridge.
pub const GATEWAY_NETWORK: &str = "gateway";

/// How the agent runs tasks on this node.
#[derive(Clone, Debug)]
pub struct TaskConfig {
    /// Unique per agent; task namespaces are named `<node>-<task>`.
    pub node: String,
    /// Task records and logs live in `<state_dir>/tasks`.
    pub state_dir: PathBuf,
    /// A cgroup v2 directory under which every process task gets a leaf of its own (see
    /// `limits`). None leaves tasks in the agent's cgroup.
    pub cgroup: Option<PathBuf>,
    /// Where each controller a limit needs lives on this host (v1 or v2); None: limits are
    /// refused and tasks join `cgroup` itself.
    pub cgroup_layout: Option<crate::cgroup::Layout>,
    pub resolv: ResolvConf,
    /// Where per-namespace /etc overrides live (`ip netns exec` reads the same place).
    pub netns_etc: PathBuf,
    /// How long a task gets between SIGTERM and SIGKILL.
    pub stop_timeout: Duration,
    /// Where the podman driver mounts each task's tmpfs of secrets and configs (never under
    /// the state directory: nothing there may hold a secret).
    pub files_dir: PathBuf,
    /// Host paths no process task may reach (the state directory, the cluster key, the API
    /// socket, the agent's run-time directory): covered by empty read-only mounts in its
    /// mount namespace.
    pub masked: Vec<PathBuf>,
    /// The binary that runs as a process task's init (see `init`): the agent's own. A
    /// program embedding `Tasks` points it at a mesh-agent binary.
    pub init: PathBuf,
    /// The most a task's log may grow to before it is rotated, and the files kept
    /// (agent.toml's `[task_logs]`): a service's `--log-opt` may only ask for less.
    pub log_max_size: u64,
    pub log_max_file: u32,
}

impl TaskConfig {
    pub fn new(node: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            node: node.into(),
            state_dir: state_dir.into(),
            cgroup: None,
            cgroup_layout: None,
            resolv: ResolvConf::default(),
            netns_etc: PathBuf::from("/etc/netns"),
            stop_timeout: Duration::from_secs(10),
            files_dir: PathBuf::from("/run/mesh/task-files"),
            masked: Vec::new(),
            // The child's own /proc/self: the agent's binary even if it was replaced on disk.
            init: PathBuf::from("/proc/self/exe"),
            log_max_size: logs::DEFAULT_MAX_SIZE,
            log_max_file: logs::DEFAULT_MAX_FILE,
        }
    }
}

/// The resolv.conf tasks see.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvConf {
    pub nameservers: Vec<Ipv4Addr>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

impl ResolvConf {
    /// What a task with these DNS settings sees: the node's resolver stays first (it answers
    /// service names and forwards the rest to the task's own `--dns` servers, as Docker's
    /// embedded DNS does); a loopback server of the task's own comes after it; the task's
    /// search domains replace the node's; its options replace the node's of the same name.
    pub fn for_task(&self, dns: &mesh_api::spec::DnsConfig) -> Self {
        let mut out = self.clone();
        for ip in dns.nameservers.iter().filter(|ip| ip.is_loopback()) {
            if let std::net::IpAddr::V4(v4) = ip
                && !out.nameservers.contains(v4)
            {
                out.nameservers.push(*v4);
            }
        }
        if !dns.search.is_empty() {
            out.search = dns.search.clone();
        }
        let name = |o: &str| o.split(':').next().unwrap_or(o).to_owned();
        for o in &dns.options {
            out.options.retain(|x| name(x) != name(o));
            out.options.push(o.clone());
        }
        out
    }
}

impl Default for ResolvConf {
    /// The embedded resolver at Docker's address; ndots:0 so service names are tried as
    /// they are before any search domain.
    fn default() -> Self {
        Self {
            nameservers: vec![Ipv4Addr::new(127, 0, 0, 11)],
            search: Vec::new(),
            options: vec!["ndots:0".into()],
        }
    }
}

/// What to run and where to attach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub name: String,
    /// In order: the first becomes eth0, the next eth1, ...
    pub attachments: Vec<Attachment>,
    /// A way out of the cluster through the node's gateway bridge: one more interface, after
    /// the attachments, with an address the node picks from the bridge's subnet, the default
    /// route, and masquerade (the docker_gwbridge role). The attachments then must not carry
    /// a gateway.
    #[serde(default)]
    pub egress: Option<GatewayPlumbing>,
    /// The process driver: the command line. The podman driver: the arguments that replace
    /// the image's CMD (empty keeps it).
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The task's hostname; default: its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// An OCI image: the task runs as a podman container of it (the podman driver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Entrypoint, user, working directory, stop signal, container labels.
    #[serde(default, skip_serializing_if = "RunOptions::is_empty")]
    pub run: RunOptions,
    /// Memory, CPU and PID limits the kernel enforces (cgroups; podman's flags for images).
    #[serde(default, skip_serializing_if = "Limits::is_empty")]
    pub limits: Limits,
    /// Capabilities, read-only root, sysctls, ulimits (both drivers).
    #[serde(default, skip_serializing_if = "Security::is_empty")]
    pub security: Security,
    /// Volumes, bind mounts and tmpfs (both drivers, see `volumes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<mesh_api::spec::Mount>,
}

/// A stop signal as Docker names it: `SIGTERM`, `TERM` or `15`.
pub fn stop_signal(s: &str) -> Result<Signal, String> {
    let bad =
        || format!("unknown stop signal {s:?}: use a name such as SIGTERM or SIGINT, or a number");
    if let Ok(n) = s.trim().parse::<i32>() {
        return Signal::try_from(n).map_err(|_| bad());
    }
    let upper = s.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>().map_err(|_| bad())
}

impl TaskSpec {
    pub fn hostname(&self) -> &str {
        self.hostname.as_deref().unwrap_or(&self.name)
    }
}

impl TaskRecord {
    /// The podman container of an image task (named after its namespace).
    fn container(&self) -> Option<&str> {
        self.spec.image.as_ref().map(|_| self.netns.as_str())
    }
}

/// A task's output, as `meshctl logs` streams it (see `logs`).
pub enum Logs {
    /// A process task's log file (and the rotated one beside it).
    File {
        path: PathBuf,
        query: mesh_api::v1::LogsQuery,
    },
    /// `podman logs --timestamps` of a container task, ready to spawn.
    Podman {
        cmd: tokio::process::Command,
        query: mesh_api::v1::LogsQuery,
    },
}

/// One interface of a task on a bridge of this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub network: String,
    pub bridge: String,
    /// The task's address and the network's prefix length.
    pub address: Ipv4Net,
    pub mtu: u32,
    /// The default route goes via this address on this interface; at most one attachment
    /// of a task has one.
    pub gateway: Option<Ipv4Addr>,
    /// The bridge port cannot talk to other isolated ports, only to the bridge (the node)
    /// and beyond: Docker's inter-container communication off.
    #[serde(default)]
    pub isolated: bool,
}

impl Attachment {
    /// An attachment to an overlay network, routed via the node's address on it.
    pub fn overlay(network: &NetworkPlumbing, ip: Ipv4Addr) -> Self {
        Self {
            network: network.name.clone(),
            bridge: network.bridge(),
            address: Ipv4Net::new(ip, network.subnet.prefix_len()).expect("valid prefix"),
            mtu: network.mtu,
            gateway: Some(network.node_address),
            isolated: false,
        }
    }

    /// The same attachment without the default route (which egress then provides).
    pub fn without_default_route(mut self) -> Self {
        self.gateway = None;
        self
    }

    fn egress(gw: &GatewayPlumbing, ip: Ipv4Addr) -> Self {
        Self {
            network: GATEWAY_NETWORK.into(),
            bridge: GATEWAY_BRIDGE.into(),
            address: Ipv4Net::new(ip, gw.subnet.prefix_len()).expect("valid prefix"),
            mtu: gw.mtu,
            gateway: Some(gw.address),
            isolated: true,
        }
    }
}

/// An interface a task got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Inside the task: eth0, eth1, ...
    pub name: String,
    pub host_veth: String,
    pub network: String,
    pub mac: MacAddr,
    pub address: Ipv4Net,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum ProcessState {
    /// Namespace and interfaces are being set up; a record left in this state by a crash is
    /// cleaned away on adoption.
    Creating,
    Running,
    /// The process is gone. The exit status is only known when this agent started it.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        /// The kernel killed it for going over its memory limit of this many bytes (0: an
        /// image task podman found OOM-killed without a limit of its own).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        out_of_memory: Option<u64>,
    },
}

impl ProcessState {
    pub fn label(&self) -> &'static str {
        match self {
            ProcessState::Creating => "creating",
            ProcessState::Running => "running",
            ProcessState::Exited { .. } => "exited",
        }
    }
}

/// Everything known about a task; what is persisted and what listings show.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub spec: TaskSpec,
    pub netns: String,
    pub interfaces: Vec<Interface>,
    pub pid: Option<u32>,
    /// Clock ticks since boot (`/proc/<pid>/stat` field 22): with the PID, names the process.
    pub start_time: Option<u64>,
    pub state: ProcessState,
    pub log: PathBuf,
    /// Empty files this task created on the host as mount points of its configs (the
    /// process driver shares the host's file system); removed with the task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_points: Vec<PathBuf>,
    /// Directories this task created on the host as mount points of its volumes, bind
    /// mounts and tmpfs (process driver); removed with the task if still empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_dirs: Vec<PathBuf>,
}

impl TaskRecord {
    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

/// Announced when a task's process exits (or is found gone on adoption).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskExit {
    pub name: String,
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// The tasks of this node.
#[derive(Clone)]
pub struct Tasks {
    inner: Arc<Inner>,
}

struct Inner {
    config: TaskConfig,
    host: Handle,
    store: store::Store,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Attachments made for other runtimes through the CNI plugin, by container/interface.
    /// Locked after `entries` when both are held.
    cni: Mutex<BTreeMap<String, CniAttachment>>,
    exits: broadcast::Sender<TaskExit>,
}

struct Entry {
    record: TaskRecord,
    /// Present while the process runs.
    pidfd: Option<Arc<OwnedFd>>,
    /// Turns true once the process is gone: a stop's grace period ends there, not when the
    /// teardown after it is done (100 teardowns at once wait on the kernel for seconds).
    ended: watch::Receiver<bool>,
    /// Turns true once the exit was handled (network removed, record saved).
    exited: watch::Receiver<bool>,
}

/// See [`Tasks::create`].
pub type BeforeStart<'a> =
    &'a (dyn Fn(TaskRecord) -> futures_util::future::BoxFuture<'a, Result<()>> + Sync);

impl Tasks {
    /// Opens the task store and adopts what an earlier agent left: running tasks are
    /// followed again, tasks whose process is gone are marked exited and lose their network,
    /// half-created ones are removed. `host` must be a netlink handle in the node's namespace.
    pub async fn open(config: TaskConfig, host: Handle) -> Result<Self> {
        let store = store::Store::open(&config.state_dir)?;
        let (exits, _) = broadcast::channel(256);
        let tasks = Tasks {
            inner: Arc::new(Inner {
                config,
                host,
                store,
                entries: Mutex::new(BTreeMap::new()),
                cni: Mutex::new(BTreeMap::new()),
                exits,
            }),
        };
        let (records, damaged) = tasks.inner.store.load_all()?;
        for record in records {
            tasks.adopt(record).await;
        }
        for name in damaged {
            tasks.reap_unrecorded(&name).await;
        }
        tasks.cni_adopt().await;
        tasks.remove_orphan_containers().await;
        Ok(tasks)
    }

    /// Containers labelled as this node's that no record knows (a crash between `podman
    /// run` and saving the record) are removed: their task was never announced, and keeping
    /// them would run a second copy next to the one the orchestrator starts.
    async fn remove_orphan_containers(&self) {
        let Ok(names) = container::list(&self.inner.config.node).await else {
            // No podman here: nothing it could have left.
            return;
        };
        let known: std::collections::BTreeSet<String> =
            self.list().into_iter().map(|r| r.netns).collect();
        for name in names.into_iter().filter(|n| !known.contains(n)) {
            warn!(container = %name, "removing a container no task record knows");
            if let Err(e) = container::remove(&name).await {
                warn!(container = %name, "{e:#}");
            }
        }
    }

    async fn adopt(&self, mut record: TaskRecord) {
        let name = record.spec.name.clone();
        match record.state {
            ProcessState::Creating => {
                info!(task = %name, "removing a task whose creation was interrupted");
                if let Err(e) = self.teardown(&record).await {
                    warn!(task = %name, "cleaning up an interrupted task: {e:#}");
                }
                if let Err(e) = self.inner.store.remove(&name) {
                    warn!(task = %name, "{e:#}");
                }
            }
            ProcessState::Running => {
                let found = match (record.pid, record.start_time) {
                    (Some(pid), Some(start)) => process::find(pid, start),
                    _ => process::Found::Exited(process::Exit {
                        code: None,
                        signal: None,
                    }),
                };
                match found {
                    process::Found::Running(fd) => {
                        for (iface, att) in record.interfaces.iter().zip(&record.spec.attachments) {
                            match plumbing::reattach(&self.inner.host, iface, att).await {
                                Ok(true) => {
                                    info!(task = %name, veth = %iface.host_veth, "re-attached to {}", att.bridge)
                                }
                                Ok(false) => {}
                                Err(e) => warn!(task = %name, "{e:#}"),
                            }
                        }
                        info!(task = %name, pid = ?record.pid, "adopted running task");
                        self.insert_running(record, fd);
                    }
                    process::Found::Exited(mut exit) => {
                        if let Some(c) = record.container() {
                            exit = container::exit(c).await;
                        }
                        info!(task = %name, code = ?exit.code, "task exited while the agent was away");
                        record.state = self.exited_state(&record, exit).await;
                        if let Err(e) = self.teardown(&record).await {
                            warn!(task = %name, "removing the network of an exited task: {e:#}");
                        }
                        self.save_or_warn(&record);
                        self.insert_finished(record);
                    }
                }
            }
            ProcessState::Exited { .. } => self.insert_finished(record),
        }
    }

    /// Creates the task's namespace and interfaces and starts its process.
    /// Creates and starts a task. `before_start` runs once the task's namespace is plumbed
    /// and before its process starts: what the process may use from its first instruction
    /// on (the agent's resolver and VIP balancing there) is in place by then.
    pub async fn create(
        &self,
        mut spec: TaskSpec,
        files: TaskFiles,
        before_start: BeforeStart<'_>,
    ) -> Result<TaskRecord> {
        validate(&spec)?;
        let name = spec.name.clone();
        let record = {
            let mut entries = self.inner.entries.lock().expect("task table poisoned");
            if entries.contains_key(&name) {
                bail!(
                    "a task named {name} already exists on this node; stop it first or pick \
                     another name"
                );
            }
            // Picked under the lock: two tasks created at once never get the same address.
            if let Some(gw) = &spec.egress {
                let taken: Vec<Ipv4Addr> = self
                    .inner
                    .cni
                    .lock()
                    .expect("cni table poisoned")
                    .values()
                    .flat_map(|c| &c.attachments)
                    .filter(|a| a.bridge == GATEWAY_BRIDGE)
                    .map(|a| a.address.addr())
                    .collect();
                let ip = free_gateway_address(gw, entries.values().map(|e| &e.record), &taken)?;
                spec.attachments.push(Attachment::egress(gw, ip));
                validate(&spec)?;
            }
            let record = TaskRecord {
                log: self.inner.store.log_path(&name),
                netns: format!("{}-{}", self.inner.config.node, name),
                interfaces: Vec::new(),
                pid: None,
                start_time: None,
                state: ProcessState::Creating,
                mount_points: Vec::new(),
                mount_dirs: Vec::new(),
                spec,
            };
            let (_, rx) = watch::channel(false);
            entries.insert(
                name.clone(),
                Entry {
                    record: record.clone(),
                    pidfd: None,
                    ended: rx.clone(),
                    exited: rx,
                },
            );
            record
        };
        match self.build(record, &files, before_start).await {
            Ok((record, Some(pidfd))) => {
                info!(task = %name, pid = ?record.pid, netns = %record.netns, "task started");
                self.insert_running(record.clone(), pidfd);
                Ok(record)
            }
            Ok((record, None)) => {
                info!(task = %name, state = ?record.state, "task exited as soon as it started");
                if let Err(e) = self.teardown(&record).await {
                    warn!(task = %name, "removing the network of an exited task: {e:#}");
                }
                self.insert_finished(record.clone());
                Ok(record)
            }
            Err((record, e)) => {
                if let Err(te) = self.teardown(&record).await {
                    warn!(task = %name, "cleaning up after a failed start: {te:#}");
                }
                let _ = self.inner.store.remove(&name);
                self.inner
                    .entries
                    .lock()
                    .expect("task table poisoned")
                    .remove(&name);
                Err(e.context(format!("starting task {name}")))
            }
        }
    }

    /// Everything between reserving the name and a running process; on failure returns the
    /// record as far as it got so the caller can undo exactly that.
    async fn build(
        &self,
        mut record: TaskRecord,
        files: &TaskFiles,
        before_start: BeforeStart<'_>,
    ) -> std::result::Result<(TaskRecord, Option<OwnedFd>), (TaskRecord, anyhow::Error)> {
        let config = &self.inner.config;
        let mut stages = Stages::new();
        macro_rules! attempt {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(e) => return Err((record, e.into())),
                }
            };
        }
        attempt!(self.inner.store.save(&record));
        if netns::exists(&record.netns) {
            // Named after this node and a task it no longer knows: left by an agent that
            // lost its record. Replaced, as the record's absence says nobody owns it.
            warn!(task = %record.spec.name, netns = %record.netns, "removing a stale namespace");
            attempt!(self.teardown(&record).await);
        }
        attempt!(netns::create(&record.netns));
        stages.lap("netns");
        let etc = plumbing::etc_dir(&config.netns_etc, &record.netns);
        let resolv = config.resolv.for_task(&record.spec.run.dns);
        attempt!(plumbing::write_resolv_conf(&etc, &resolv));
        for (i, att) in record.spec.attachments.clone().iter().enumerate() {
            let iface = attempt!(plumbing::attach(&self.inner.host, &record.netns, i, att).await);
            record.interfaces.push(iface);
        }
        stages.lap("veths");
        let gateway = record
            .spec
            .attachments
            .iter()
            .enumerate()
            .find_map(|(i, a)| a.gateway.map(|g| (i, g)));
        attempt!(plumbing::configure_inside(&record.netns, &record.interfaces, gateway).await);
        stages.lap("inside");
        if record.spec.image.is_none() {
            // A container gets its /etc/hosts from podman (`--add-host`); a process task's is
            // written here and bound over /etc/hosts in its mount namespace.
            let own: Vec<_> = record
                .interfaces
                .iter()
                .filter(|i| i.network != GATEWAY_NETWORK)
                .map(|i| i.address.addr())
                .collect();
            attempt!(plumbing::write_hosts(
                &etc,
                record.spec.hostname(),
                &own,
                &record.spec.run.hosts
            ));
        }
        let (log_max_size, log_max_file) = mesh_api::spec::capped_log(
            Some(&record.spec.run.log),
            config.log_max_size,
            config.log_max_file,
        );
        stages.lap("files");
        attempt!(before_start(record.clone()).await);
        stages.lap("resolver");
        let netns_path = netns::path(&record.netns);
        let spawned = match &record.spec.image {
            None => {
                let isolation = attempt!(self.isolation(&record.spec));
                let (prepared, mount_points) = attempt!(files::prepare(files));
                record.mount_points = mount_points;
                let (mounts, mount_dirs) = attempt!(volumes::prepare(
                    &config.state_dir,
                    &config.masked,
                    &record.spec.mounts,
                    isolation.owner()
                ));
                record.mount_dirs = mount_dirs;
                attempt!(self.inner.store.save(&record));
                let cgroups = attempt!(limits::create(config, &record.netns, &record.spec.limits));
                attempt!(process::spawn(
                    process::Launch {
                        netns: &netns_path,
                        etc_overrides: &etc,
                        hostname: record.spec.hostname(),
                        cgroups: &cgroups,
                        command: &record.spec.command,
                        env: &record.spec.env,
                        workdir: record.spec.run.workdir.as_deref(),
                        log: &record.log,
                        log_max_size,
                        log_max_file,
                        files: &prepared,
                        init: &config.init,
                        mounts,
                    },
                    isolation
                ))
            }
            Some(image) => match attempt!(
                container::run(&container::Run {
                    workdir: &attempt!(container::workdir(&config.state_dir, &record.netns)),
                    container: &record.netns,
                    node: &config.node,
                    task: &record.spec.name,
                    image,
                    args: &record.spec.command,
                    env: &record.spec.env,
                    hostname: record.spec.hostname(),
                    run: &record.spec.run,
                    security: &record.spec.security,
                    netns: &netns_path,
                    nameservers: &resolv.nameservers,
                    dns_search: &resolv.search,
                    dns_options: &resolv.options,
                    log_max_size,
                    volumes: &attempt!(files::podman_mounts(
                        &config.files_dir.join(&record.netns),
                        files
                    )),
                    mounts: &attempt!(
                        volumes::podman_mounts(
                            &config.state_dir,
                            &config.node,
                            &config.masked,
                            &record.spec.mounts
                        )
                        .await
                    ),
                    limits: &record.spec.limits,
                })
                .await
            ) {
                container::Started::Running(s) => s,
                // It ran and ended before it could be followed (a one-shot job): a task
                // that started and exited, not one that failed to start.
                container::Started::Exited(exit) => {
                    record.state = self.exited_state(&record, exit).await;
                    attempt!(self.inner.store.save(&record));
                    return Ok((record, None));
                }
            },
        };
        stages.lap("spawn");
        debug!(task = %record.spec.name, stages = %stages, "where the process start's time went");
        record.pid = Some(spawned.pid);
        record.start_time = Some(spawned.start_time);
        record.state = ProcessState::Running;
        if let Err(e) = self.inner.store.save(&record) {
            let _ = process::signal(&spawned.pidfd, Signal::SIGKILL);
            return Err((record, e));
        }
        Ok((record, Some(spawned.pidfd)))
    }

    fn insert_running(&self, record: TaskRecord, pidfd: OwnedFd) {
        let name = record.spec.name.clone();
        let container = record.container().map(str::to_owned);
        let pidfd = Arc::new(pidfd);
        let (ended_tx, ended_rx) = watch::channel(false);
        let (done_tx, done_rx) = watch::channel(false);
        self.inner
            .entries
            .lock()
            .expect("task table poisoned")
            .insert(
                name.clone(),
                Entry {
                    record,
                    pidfd: Some(pidfd.clone()),
                    ended: ended_rx,
                    exited: done_rx,
                },
            );
        let tasks = self.clone();
        tokio::spawn(async move {
            // A dup keeps the watcher's fd independent of the entry's lifetime.
            let mut exit = match pidfd.try_clone() {
                Ok(fd) => process::wait(fd).await,
                Err(e) => {
                    warn!(task = %name, "cannot watch the task process: {e}");
                    return;
                }
            };
            // A container's init is conmon's child, not ours: podman has its status.
            if let Some(c) = &container {
                exit = container::exit(c).await;
            }
            let _ = ended_tx.send(true);
            tasks.on_exit(&name, exit).await;
            let _ = done_tx.send(true);
        });
    }

    fn insert_finished(&self, record: TaskRecord) {
        let (_, rx) = watch::channel(true);
        self.inner
            .entries
            .lock()
            .expect("task table poisoned")
            .insert(
                record.spec.name.clone(),
                Entry {
                    record,
                    pidfd: None,
                    ended: rx.clone(),
                    exited: rx,
                },
            );
    }

    async fn on_exit(&self, name: &str, exit: process::Exit) {
        let Some(record) = self.get(name) else {
            return;
        };
        // Read before the teardown removes what tells (the cgroup leaf, the container).
        let state = self.exited_state(&record, exit).await;
        let record = {
            let mut entries = self.inner.entries.lock().expect("task table poisoned");
            let Some(entry) = entries.get_mut(name) else {
                return;
            };
            entry.pidfd = None;
            entry.record.state = state;
            entry.record.clone()
        };
        info!(task = %name, code = ?exit.code, signal = ?exit.signal, state = ?record.state, "task exited");
        if let Err(e) = self.teardown(&record).await {
            warn!(task = %name, "removing the network of an exited task: {e:#}");
        }
        self.save_or_warn(&record);
        // Announced only once the network is gone: the endpoint (and so the address) leaves
        // gossip when this is heard, and an address handed to a new task while the old
        // namespace still holds it would have two owners on the bridge.
        let _ = self.inner.exits.send(TaskExit {
            name: name.to_owned(),
            code: exit.code,
            signal: exit.signal,
        });
    }

    /// How a task ended: its exit status, and whether the kernel killed it for going over
    /// its memory limit (podman knows that of a container, the leaf of a process).
    async fn exited_state(&self, record: &TaskRecord, exit: process::Exit) -> ProcessState {
        match record.container() {
            Some(c) => {
                let limit = record.spec.limits.memory_bytes;
                // podman knows on v2; on a v1 memory hierarchy conmon (and the kernel log)
                // tell.
                let oom = container::oom_killed(&self.inner.config.state_dir, c).await
                    || (limit > 0
                        && exit.code == Some(128 + libc::SIGKILL)
                        && record
                            .pid
                            .zip(record.start_time)
                            .is_some_and(|(pid, start)| {
                                crate::cgroup::memcg_killed(pid, crate::cgroup::ticks_to_us(start))
                            }));
                ProcessState::Exited {
                    code: exit.code,
                    signal: exit.signal,
                    out_of_memory: oom.then_some(limit),
                }
            }
            None => limits::exited(&self.inner.config, record, exit),
        }
    }

    /// Stops a task (SIGTERM, then SIGKILL after the stop timeout) and forgets it: its
    /// network, record and log are removed. Stopping an exited task just forgets it.
    pub async fn stop(&self, name: &str) -> Result<()> {
        self.stop_within(name, self.inner.config.stop_timeout).await
    }

    /// [`Tasks::stop`] with the task's own grace period between SIGTERM and SIGKILL.
    pub async fn stop_within(&self, name: &str, timeout: Duration) -> Result<()> {
        let (pidfd, mut ended, mut exited, container, signal) = {
            let entries = self.inner.entries.lock().expect("task table poisoned");
            let entry = entries
                .get(name)
                .with_context(|| format!("no task named {name} on this node"))?;
            if entry.record.state == ProcessState::Creating {
                bail!("task {name} is still being created; try again in a moment");
            }
            (
                entry.pidfd.clone(),
                entry.ended.clone(),
                entry.exited.clone(),
                entry.record.container().map(str::to_owned),
                entry
                    .record
                    .spec
                    .run
                    .stop_signal
                    .as_deref()
                    .and_then(|s| stop_signal(s).ok())
                    .unwrap_or(Signal::SIGTERM),
            )
        };
        if let (Some(_), Some(c)) = (&pidfd, &container) {
            // podman sends the image's stop signal, then SIGKILL after the grace period.
            container::stop(c, timeout)
                .await
                .with_context(|| format!("stopping task {name}"))?;
            tokio::time::timeout(Duration::from_secs(30), ended.wait_for(|d| *d))
                .await
                .with_context(|| format!("task {name} still runs after podman stop"))?
                .ok();
        } else if let Some(fd) = pidfd {
            process::signal(&fd, signal).with_context(|| format!("signalling task {name}"))?;
            if tokio::time::timeout(timeout, ended.wait_for(|d| *d))
                .await
                .is_err()
            {
                warn!(task = %name, "did not stop within {timeout:?}; killing it");
                process::signal(&fd, Signal::SIGKILL)
                    .with_context(|| format!("killing task {name}"))?;
                tokio::time::timeout(Duration::from_secs(10), ended.wait_for(|d| *d))
                    .await
                    .with_context(|| format!("task {name} survived SIGKILL"))?
                    .ok();
            }
        }
        // The exit handler tears the network down; this stop is done when it is, however
        // long the kernel takes (the grace period was the process's, and it is over). Bounded
        // all the same: the teardown below repeats it if it hangs.
        if tokio::time::timeout(TEARDOWN_WAIT, exited.wait_for(|d| *d))
            .await
            .is_err()
        {
            warn!(task = %name, "its network was not removed within {TEARDOWN_WAIT:?} of its exit");
        }
        let record = self
            .inner
            .entries
            .lock()
            .expect("task table poisoned")
            .remove(name)
            .map(|e| e.record);
        if let Some(record) = record {
            // The exit handler already did this; repeating it is harmless and covers a task
            // that was found exited on adoption but could not be cleaned then.
            self.teardown(&record).await?;
        }
        self.inner.store.remove(name)?;
        info!(task = %name, "task removed");
        Ok(())
    }

    /// Runs `command` inside a running task (its namespaces, /etc overrides and cgroup, so
    /// it resolves and balances like the task) and returns its output.
    pub async fn exec(
        &self,
        name: &str,
        command: &[String],
        env: &[(String, String)],
        timeout: Duration,
    ) -> Result<std::process::Output> {
        let record = self
            .get(name)
            .with_context(|| format!("no task named {name} on this node"))?;
        if record.state != ProcessState::Running {
            bail!(
                "task {name} is {}: exec needs a running task",
                record.state.label()
            );
        }
        if let Some(c) = record.container() {
            return container::exec(c, command, env, timeout).await;
        }
        let pid = record
            .pid
            .with_context(|| format!("task {name} has no process to enter"))?;
        process::exec(
            &process::Target {
                pid,
                cgroups: &limits::joined(&self.inner.config, &record.netns),
                command,
                env,
                hostname: record.spec.hostname(),
                // `meshctl exec` runs where the task's program runs.
                workdir: record.spec.run.workdir.as_deref(),
            },
            self.isolation(&record.spec)?,
            timeout,
        )
        .await
    }

    /// The process driver's user, capabilities and limits for `spec`, and what it must not
    /// reach on the host.
    fn isolation(&self, spec: &TaskSpec) -> Result<isolation::Isolation> {
        isolation::Isolation::prepare(
            &spec.security,
            spec.run.user.as_deref(),
            &self.inner.config.masked,
        )
        .with_context(|| format!("task {}", spec.name))
    }

    /// Where a task's output is (`follow`: and keeps arriving).
    pub fn logs(&self, name: &str, query: &mesh_api::v1::LogsQuery) -> Result<Logs> {
        let record = self
            .get(name)
            .with_context(|| format!("no task named {name} on this node"))?;
        Ok(match record.container() {
            Some(c) => Logs::Podman {
                cmd: container::logs(c, query),
                query: query.clone(),
            },
            None => Logs::File {
                path: record.log,
                query: query.clone(),
            },
        })
    }

    /// How this node runs tasks.
    pub fn config(&self) -> &TaskConfig {
        &self.inner.config
    }

    /// Every task of this node, by name.
    pub fn list(&self) -> Vec<TaskRecord> {
        self.inner
            .entries
            .lock()
            .expect("task table poisoned")
            .values()
            .map(|e| e.record.clone())
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<TaskRecord> {
        self.inner
            .entries
            .lock()
            .expect("task table poisoned")
            .get(name)
            .map(|e| e.record.clone())
    }

    /// Exits from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<TaskExit> {
        self.inner.exits.subscribe()
    }

    /// Puts running tasks' host veths back on their bridges; call after the overlay
    /// re-created a bridge. Returns how many were re-attached.
    pub async fn reattach_all(&self) -> Result<usize> {
        let mut n = 0;
        for record in self.list() {
            if record.state != ProcessState::Running {
                continue;
            }
            for (iface, att) in record.interfaces.iter().zip(&record.spec.attachments) {
                if plumbing::reattach(&self.inner.host, iface, att).await? {
                    n += 1;
                }
            }
        }
        for record in self.cni_list() {
            for (iface, att) in record.interfaces.iter().zip(&record.attachments) {
                if plumbing::reattach(&self.inner.host, iface, att).await? {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Kills what is left in the task's namespace and removes its network.
    /// A task whose record was damaged cannot be adopted (its pid, spec and addresses are
    /// gone with the record): what it left in the kernel is found by its derived names and
    /// removed, so nothing runs unmanaged; the orchestrator sees the task missing and starts
    /// its slot again, with a fresh record.
    async fn reap_unrecorded(&self, name: &str) {
        let netns_name = format!("{}-{}", self.inner.config.node, name);
        let path = netns::path(&netns_name);
        let pids = netns::pids(&path);
        for pid in &pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGKILL);
        }
        // Veth names are derived from the namespace and the attachment's index; a task has
        // a few attachments at most.
        let veths: Vec<String> = (0..16)
            .map(|i| plumbing::host_veth_name(&netns_name, i))
            .collect();
        let etc = plumbing::etc_dir(&self.inner.config.netns_etc, &netns_name);
        match plumbing::detach(&self.inner.host, &netns_name, &veths, &etc).await {
            Ok(()) => warn!(
                task = %name,
                killed = pids.len(),
                "stopped a task whose record was damaged; its slot starts again"
            ),
            Err(e) => warn!(task = %name, "cleaning up a task whose record was damaged: {e:#}"),
        }
        let _ = std::fs::remove_file(self.inner.store.log_path(name));
    }

    async fn teardown(&self, record: &TaskRecord) -> Result<()> {
        if let Some(c) = record.container() {
            // Before the namespace goes: podman unmounts and forgets its container.
            container::remove(c).await?;
            container::remove_workdir(&self.inner.config.state_dir, c);
        }
        let path = netns::path(&record.netns);
        // Processes the task forked and left behind would keep the namespace (and with it
        // the task's address) alive.
        for pid in netns::pids(&path) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        let inner = self.inner.clone();
        let netns = record.netns.clone();
        // Blocking: a killed process leaves its cgroup a moment after the signal.
        let removed = tokio::task::spawn_blocking(move || limits::remove(&inner.config, &netns));
        if record.container().is_none()
            && let Err(e) = removed.await.map_err(anyhow::Error::from).and_then(|r| r)
        {
            // The network still goes; a leftover leaf holds no address, only its name.
            warn!(task = %record.spec.name, "{e:#}");
        }
        let mut veths: Vec<String> = record
            .interfaces
            .iter()
            .map(|i| i.host_veth.clone())
            .collect();
        // A crash between creating a veth and saving the record leaves it unrecorded; its
        // name is derived, so it is found anyway.
        for i in 0..record.spec.attachments.len() {
            let v = plumbing::host_veth_name(&record.netns, i);
            if !veths.contains(&v) {
                veths.push(v);
            }
        }
        files::remove_podman_dir(&self.inner.config.files_dir.join(&record.netns));
        if !record.mount_points.is_empty() {
            let in_use = self.in_use_by_others(&record.spec.name, |r| r.mount_points.clone());
            files::remove_placeholders(&record.mount_points, &in_use);
        }
        if !record.mount_dirs.is_empty() {
            // Every other task's mount targets, not only the points it made: a task started
            // while this one's mount point still stood did not make it, yet mounts on it, and
            // removing it on the host would take that mount away from the task (the kernel
            // detaches mounts on a directory removed in another namespace).
            let in_use = self.in_use_by_others(&record.spec.name, |r| {
                let targets = r
                    .spec
                    .mounts
                    .iter()
                    .map(|m| PathBuf::from(m.clean_target()));
                r.mount_dirs.iter().cloned().chain(targets).collect()
            });
            volumes::remove_mount_points(&record.mount_dirs, &in_use);
        }
        let etc = plumbing::etc_dir(&self.inner.config.netns_etc, &record.netns);
        plumbing::detach(&self.inner.host, &record.netns, &veths, &etc).await
    }

    /// The host paths `paths` names for every task but `name` that has not exited.
    fn in_use_by_others(
        &self,
        name: &str,
        paths: impl Fn(&TaskRecord) -> Vec<PathBuf>,
    ) -> Vec<PathBuf> {
        self.inner
            .entries
            .lock()
            .expect("task table poisoned")
            .values()
            .filter(|e| e.record.spec.name != name)
            .filter(|e| !matches!(e.record.state, ProcessState::Exited { .. }))
            .flat_map(|e| paths(&e.record))
            .collect()
    }

    fn save_or_warn(&self, record: &TaskRecord) {
        if let Err(e) = self.inner.store.save(record) {
            warn!(task = %record.spec.name, "{e:#}");
        }
    }
}

/// The first address of the gateway subnet that is neither the node's, nor held by a task
/// still running (or starting), nor in `taken` (CNI attachments' addresses).
fn free_gateway_address<'a>(
    gw: &GatewayPlumbing,
    records: impl Iterator<Item = &'a TaskRecord>,
    taken: &[Ipv4Addr],
) -> Result<Ipv4Addr> {
    let mut used: std::collections::BTreeSet<Ipv4Addr> = records
        .filter(|r| !matches!(r.state, ProcessState::Exited { .. }))
        .flat_map(|r| &r.spec.attachments)
        .filter(|a| a.bridge == GATEWAY_BRIDGE)
        .map(|a| a.address.addr())
        .collect();
    used.extend(taken);
    gw.subnet
        .hosts()
        .find(|ip| *ip != gw.address && !used.contains(ip))
        .with_context(|| {
            format!(
                "the gateway subnet {} has no free address left for another task",
                gw.subnet
            )
        })
}

fn validate(spec: &TaskSpec) -> Result<()> {
    let name = &spec.name;
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    // Service tasks are named `<service>.<slot>.<id>`: longer than a DNS label, and dotted.
    if name.is_empty()
        || name.len() > 160
        || !name.chars().all(ok_char)
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
    {
        bail!(
            "invalid task name {name:?}: use 1-160 letters, digits, '_', '.' or '-', starting \
             with a letter or digit"
        );
    }
    match &spec.image {
        None if spec.command.is_empty() => bail!("task {name} has no command to run"),
        Some(image)
            if image.is_empty()
                || image.starts_with('-')
                || image.contains(char::is_whitespace) =>
        {
            bail!("task {name}: {image:?} is not an image name (e.g. localhost/web:1)")
        }
        _ => {}
    }
    let hostname = spec.hostname();
    if hostname.is_empty()
        || hostname.len() > 63
        || !hostname
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        bail!(
            "invalid hostname {hostname:?} for task {name}: use 1-63 letters, digits, '.', '-' or '_'"
        );
    }
    if spec.attachments.is_empty() {
        bail!("task {name} is attached to no network");
    }
    if spec.attachments.len() > 10 {
        bail!("task {name} has more than 10 attachments");
    }
    if spec
        .attachments
        .iter()
        .filter(|a| a.gateway.is_some())
        .count()
        > 1
    {
        bail!(
            "task {name} has more than one default gateway{}",
            if spec.egress.is_some() {
                " (with egress the default route goes through the gateway bridge: attach the \
                 networks without_default_route)"
            } else {
                ""
            }
        );
    }
    for a in &spec.attachments {
        if let Some(gw) = a.gateway
            && !a.address.contains(&gw)
        {
            bail!(
                "task {name}: gateway {gw} is not on the network {} of its address {}",
                a.network,
                a.address.trunc()
            );
        }
    }
    Ok(())
}

/// Where a node's task namespaces are mounted, for callers that want to enter one.
/// How long a stop waits for the teardown that follows a task's exit.
const TEARDOWN_WAIT: Duration = Duration::from_secs(60);

/// How long each part of a task's start took, for the debug log: where a slow placement's
/// time goes.
pub(crate) struct Stages {
    last: std::time::Instant,
    laps: Vec<(&'static str, Duration)>,
}

impl Stages {
    pub(crate) fn new() -> Self {
        Self {
            last: std::time::Instant::now(),
            laps: Vec::new(),
        }
    }

    /// Ends the stage called `stage`: it took the time since the previous one ended.
    pub(crate) fn lap(&mut self, stage: &'static str) {
        let now = std::time::Instant::now();
        self.laps.push((stage, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Stages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (stage, took)) in self.laps.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{stage}={}ms", took.as_millis())?;
        }
        Ok(())
    }
}

pub fn netns_path(record: &TaskRecord) -> PathBuf {
    netns::path(&record.netns)
}
