//! A cluster of fake nodes for unit tests of orchestration: the [`NodeRuntime`] seam of
//! `runtime.rs`, implemented in memory. Each node runs the real orchestrator (the same
//! `orchestrate::pass` the agent runs) over a shared in-memory gossip; nothing starts a
//! process, touches the kernel or needs root.
//!
//! The test decides what the agent cannot: how each started process ends ([`Run`]), what
//! health checks say, whether a node's load balancer confirms drains, which nodes are dead
//! or cut off from each other. It asserts on what a user sees — task records, as `service
//! ps` shows them — and on what the runtime was asked to do ([`Event`]).
//!
//! Time is tokio's clock, paused by `#[tokio::test(start_paused = true)]`:
//! [`FakeCluster::run_for`] runs a pass on every node every [`TICK`] as the agent's loop
//! would, and tokio advances the clock whenever every job is waiting, so 30 s of a
//! cluster's life take milliseconds and a job's waits line up with the records' times.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use mesh_api::{
    id::Stamp,
    spec::{DRIVER_PODMAN, DRIVER_PROCESS, HealthCheck, NodeStatus, ServiceSpec, TaskTemplate},
};
use mesh_planner::Task;

use super::{
    drain::Drains,
    health, orchestrate,
    orchestrate::Jobs,
    rollout,
    runtime::{LocalProcess, NodeRuntime, Started, TaskStart},
};
use crate::{
    cluster::{LbProgress, NodeRecord, NodeSpec, NodeView, Replicated, View},
    task::ProcessState,
};

/// Where the fake clock starts, in wall-clock ms (any fixed time works).
pub(super) const EPOCH_MS: u64 = 1_700_000_000_000;

/// How often every node runs a pass (the agent's loop runs one at least every 500 ms, and
/// at once when a job ends or gossip moves).
pub(super) const TICK: Duration = Duration::from_millis(100);

/// What a started process does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Run {
    /// Runs until stopped.
    Serve,
    /// Exits on its own.
    Exit { after: Duration, code: i32 },
    /// Could not be started (the error the runtime reports).
    Reject(String),
}

/// What a node's runtime was asked to do, and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Event {
    pub at_ms: u64,
    pub node: String,
    /// The task's local name, `web.1.<id>`.
    pub task: String,
    pub what: What,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum What {
    Started {
        command: Vec<String>,
    },
    Rejected(String),
    /// Its endpoint was published: a backend in every load balancer.
    Serving,
    LeftLoadBalancers {
        removal: u64,
    },
    Stopped {
        grace: Duration,
    },
    /// An image asked for ahead of its tasks (the event's task is empty).
    Prefetched {
        image: String,
    },
    /// A task's image is here (pulled for it).
    Pulled {
        image: String,
    },
}

impl Event {
    /// The slot in the task's name (`web.2.<id>` → `2`).
    pub fn slot(&self) -> &str {
        self.task.split('.').nth(1).unwrap_or_default()
    }

    pub fn task_id(&self) -> &str {
        self.task.rsplit('.').next().unwrap_or_default()
    }
}

type Script = Box<dyn FnMut(&str, &str, &TaskTemplate) -> Run + Send>;
type Probe = Box<dyn FnMut(&str, &str) -> Result<(), String> + Send>;
/// How long a start takes, from (node, task name, template).
type StartTakes = Box<dyn FnMut(&str, &str, &TaskTemplate) -> Duration + Send>;
/// How long a pull takes, from (node, image).
type PullTakes = Box<dyn FnMut(&str, &str) -> Duration + Send>;

/// What every node's gossip holds, and how the cluster is wired.
#[derive(Default)]
struct Gossip {
    services: BTreeMap<String, Replicated<ServiceSpec>>,
    /// Each node's own task records, by node then ID.
    tasks: BTreeMap<String, BTreeMap<String, Task>>,
    lb: BTreeMap<String, LbProgress>,
    dead: BTreeSet<String>,
    /// Pairs of nodes that cannot reach each other, both ways round.
    cut: BTreeSet<(String, String)>,
    /// Nodes whose load balancer is not reprogrammed (a loaded host): they confirm nothing.
    held_lb: BTreeSet<String>,
    /// What each node offers to reservations (none: unlimited, as an older agent).
    capacity: BTreeMap<String, mesh_api::spec::Resources>,
    /// Gossip running late: (me, other) → the task records of `other` that `me` still sees.
    late: BTreeMap<(String, String), BTreeMap<String, Task>>,
    secrets: BTreeMap<String, Replicated<crate::cluster::SecretSpec>>,
    secret_copies: BTreeMap<String, Replicated<crate::cluster::SecretCopy>>,
    log: Vec<Event>,
}

impl Gossip {
    fn sees(&self, me: &str, other: &str) -> bool {
        me == other
            || (!self.dead.contains(other) && !self.cut.contains(&(me.into(), other.into())))
    }
}

struct Shared {
    names: Vec<String>,
    zero: Instant,
    gossip: Mutex<Gossip>,
    script: Mutex<Script>,
    probe: Mutex<Probe>,
    start_takes: Mutex<StartTakes>,
    pull_takes: Mutex<PullTakes>,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        EPOCH_MS + Instant::now().duration_since(self.zero).as_millis() as u64
    }

    fn log(&self, node: &str, task: &str, what: What) {
        let at_ms = self.now_ms();
        self.gossip.lock().unwrap().log.push(Event {
            at_ms,
            node: node.into(),
            task: task.into(),
            what,
        });
    }

    /// The view `me` computes: every node's records, with the nodes it cannot hear from
    /// Down (their records stay, as gossip keeps a silent node's last state).
    fn view_for(&self, me: &str) -> View {
        let g = self.gossip.lock().unwrap();
        let mut view = View::default();
        for (i, name) in self.names.iter().enumerate() {
            let record = NodeRecord {
                name: name.clone(),
                hostname: name.clone(),
                address: Ipv4Addr::new(192, 0, 2, i as u8 + 1),
                mtu: 1500,
                agent_version: "test".into(),
                drivers: vec![DRIVER_PROCESS.into(), DRIVER_PODMAN.into()],
                labels: BTreeMap::new(),
                reserved_ports: Vec::new(),
                platform: Default::default(),
                capacity: g.capacity.get(name).copied().unwrap_or_default(),
                insecure: false,
                key: None,
                grant: None,
            };
            let status = if g.sees(me, name) {
                NodeStatus::Ready
            } else {
                NodeStatus::Down
            };
            view.nodes.insert(
                name.clone(),
                NodeView {
                    name: name.clone(),
                    record: Some(record),
                    spec: NodeSpec::default(),
                    status,
                    role: mesh_planner::Role::Admin,
                },
            );
        }
        view.services = g.services.clone();
        view.tasks = g
            .tasks
            .iter()
            .flat_map(|(node, tasks)| {
                g.late
                    .get(&(me.to_owned(), node.clone()))
                    .unwrap_or(tasks)
                    .values()
                    .cloned()
            })
            .collect();
        view.lb_progress = g.lb.clone();
        view.secrets = g.secrets.clone();
        view.secret_copies = g.secret_copies.clone();
        view
    }
}

pub(super) struct FakeCluster {
    shared: Arc<Shared>,
    nodes: Mutex<BTreeMap<String, Arc<FakeNode>>>,
}

impl FakeCluster {
    /// Nodes that all see each other, each just started.
    pub fn new(names: &[&str]) -> Self {
        let shared = Arc::new(Shared {
            names: names.iter().map(|n| n.to_string()).collect(),
            zero: Instant::now(),
            gossip: Mutex::default(),
            script: Mutex::new(Box::new(|_, _, _| Run::Serve)),
            probe: Mutex::new(Box::new(|_, _| Ok(()))),
            start_takes: Mutex::new(Box::new(|_, _, _| Duration::ZERO)),
            pull_takes: Mutex::new(Box::new(|_, _| Duration::ZERO)),
        });
        let nodes = names
            .iter()
            .map(|n| (n.to_string(), FakeNode::boot(n, &shared)))
            .collect();
        Self {
            shared,
            nodes: Mutex::new(nodes),
        }
    }

    /// Decides what each started process does, from (node, task name, template).
    pub fn script(&self, f: impl FnMut(&str, &str, &TaskTemplate) -> Run + Send + 'static) {
        *self.shared.script.lock().unwrap() = Box::new(f);
    }

    /// Decides what each health probe says, from (node, task name).
    pub fn probe(&self, f: impl FnMut(&str, &str) -> Result<(), String> + Send + 'static) {
        *self.shared.probe.lock().unwrap() = Box::new(f);
    }

    /// Decides how long each start takes (the process is up at its end), from (node, task
    /// name, template). Instant unless set.
    pub fn start_takes(
        &self,
        f: impl FnMut(&str, &str, &TaskTemplate) -> Duration + Send + 'static,
    ) {
        *self.shared.start_takes.lock().unwrap() = Box::new(f);
    }

    /// Decides how long pulling an image for a task takes, from (node, image).
    pub fn pull_takes(&self, f: impl FnMut(&str, &str) -> Duration + Send + 'static) {
        *self.shared.pull_takes.lock().unwrap() = Box::new(f);
    }

    /// The most starts `node`'s runtime had underway at once.
    pub fn most_starts_at_once(&self, node: &str) -> usize {
        self.nodes.lock().unwrap()[node].starting.lock().unwrap().1
    }

    pub fn now_ms(&self) -> u64 {
        self.shared.now_ms()
    }

    /// Runs the cluster for `d`: every live node programs its load balancer from its view
    /// and runs a pass, every [`TICK`]; jobs run in between.
    pub async fn run_for(&self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            let nodes: Vec<Arc<FakeNode>> = self.nodes.lock().unwrap().values().cloned().collect();
            for node in nodes {
                if self.shared.gossip.lock().unwrap().dead.contains(&node.name) {
                    continue;
                }
                node.program_load_balancer();
                let view = node.refresh().await;
                orchestrate::pass(&node, &view).await;
            }
            tokio::time::sleep(TICK).await;
        }
    }

    /// Creates a service (spec version 1).
    pub fn create(&self, mut spec: ServiceSpec) {
        spec.version = 1;
        spec.template_version = 1;
        let stamp = Stamp {
            ms: self.now_ms(),
            node: "test".into(),
        };
        let mut g = self.shared.gossip.lock().unwrap();
        g.services
            .insert(spec.name.clone(), Replicated::new(spec, stamp));
    }

    /// `service update`: a new spec version; a new task template starts a rollout, as the
    /// agent's update does.
    pub fn update(&self, name: &str, change: impl FnOnce(&mut ServiceSpec)) {
        let now = self.now_ms();
        let mut g = self.shared.gossip.lock().unwrap();
        let record = g.services.get_mut(name).expect("service exists");
        let current = record.spec.clone();
        change(&mut record.spec);
        record.spec.version = current.version + 1;
        // A job has no rollout: a new template is a new run (see `services::job_runs_again`).
        if record.spec.mode.is_job() {
            record.spec.update_status = None;
        } else if record.spec.template_id() != current.template_id() {
            rollout::start_rollout(&mut record.spec, &current, now);
        }
        record.updated = Stamp {
            ms: now,
            node: "test".into(),
        };
    }

    /// `secret create` in a cluster with roles: sealed to the admin key only (the fake nodes
    /// hold none), so a node's tasks need its own copy.
    pub fn create_secret(&self, name: &str) {
        let stamp = Stamp {
            ms: self.now_ms(),
            node: "test".into(),
        };
        let spec = crate::cluster::SecretSpec {
            name: name.into(),
            labels: BTreeMap::new(),
            size: 1,
            sealed: None,
            admins: Some("sealed".into()),
        };
        let mut g = self.shared.gossip.lock().unwrap();
        g.secrets.insert(name.into(), Replicated::new(spec, stamp));
    }

    /// An admin's copy of `secret` sealed to `node` arrives by gossip.
    pub fn give_secret_copy(&self, secret: &str, node: &str) {
        let stamp = Stamp {
            ms: self.now_ms(),
            node: "test".into(),
        };
        let mut g = self.shared.gossip.lock().unwrap();
        let of = g.secrets[secret].created.clone();
        let copy = crate::cluster::SecretCopy {
            secret: secret.into(),
            node: node.into(),
            key: crate::identity::NodeIdentity::generate().unwrap().public(),
            of,
            data: "sealed".into(),
        };
        g.secret_copies.insert(
            crate::cluster::key::secret_copy(secret, node),
            Replicated::new(copy, stamp),
        );
    }

    /// An admin's copy of `service`'s registry credentials sealed to `node` arrives by gossip.
    pub fn give_registry_auth_copy(&self, service: &str, node: &str) {
        let stamp = Stamp {
            ms: self.now_ms(),
            node: "test".into(),
        };
        let mut g = self.shared.gossip.lock().unwrap();
        let auth = g.services[service].spec.registry_auth.clone();
        let of = auth
            .and_then(|a| a.sealed_at)
            .expect("sealed to the admins");
        let name = crate::agent::registry_auth::sealed_name(service);
        let copy = crate::cluster::SecretCopy {
            secret: name.clone(),
            node: node.into(),
            key: crate::identity::NodeIdentity::generate().unwrap().public(),
            of,
            data: "sealed".into(),
        };
        g.secret_copies.insert(
            crate::cluster::key::secret_copy(&name, node),
            Replicated::new(copy, stamp),
        );
    }

    pub fn service(&self, name: &str) -> ServiceSpec {
        self.shared.gossip.lock().unwrap().services[name]
            .spec
            .clone()
    }

    /// The node that wrote the service's latest change (a coordinator recording a rollout's
    /// outcome, or "test" for the test's own writes).
    pub fn last_writer(&self, name: &str) -> String {
        self.shared.gossip.lock().unwrap().services[name]
            .updated
            .node
            .clone()
    }

    /// The service's coordinator as the first live node sees the cluster.
    pub fn coordinator(&self, service: &str) -> String {
        let live = {
            let g = self.shared.gossip.lock().unwrap();
            self.shared
                .names
                .iter()
                .find(|n| !g.dead.contains(*n))
                .cloned()
                .expect("a live node")
        };
        let nodes = self.shared.view_for(&live).planner_nodes();
        mesh_planner::coordinator(service, &nodes)
            .expect("a ready node")
            .to_owned()
    }

    /// Every task record of a service, as `service ps` lists them: by slot, newest first (a
    /// restart's replacement is made in the millisecond its predecessor ended: the later
    /// change, then the ID, break the tie).
    pub fn ps(&self, service: &str) -> Vec<Task> {
        let g = self.shared.gossip.lock().unwrap();
        let mut tasks: Vec<Task> = g
            .tasks
            .values()
            .flat_map(|t| t.values())
            .filter(|t| t.service == service)
            .cloned()
            .collect();
        tasks.sort_by(|a, b| {
            (&a.slot, b.created_ms, b.since_ms, &b.id).cmp(&(
                &b.slot,
                a.created_ms,
                a.since_ms,
                &a.id,
            ))
        });
        tasks
    }

    /// Tasks that want to run and have not ended, on nodes that are alive.
    pub fn live(&self, service: &str) -> Vec<Task> {
        let dead = self.shared.gossip.lock().unwrap().dead.clone();
        self.ps(service)
            .into_iter()
            .filter(|t| t.is_live() && !dead.contains(&t.node))
            .collect()
    }

    pub fn events(&self) -> Vec<Event> {
        self.shared.gossip.lock().unwrap().log.clone()
    }

    /// Process starts of a service's tasks, in order.
    pub fn starts(&self, service: &str) -> Vec<Event> {
        let prefix = format!("{service}.");
        self.events()
            .into_iter()
            .filter(|e| e.task.starts_with(&prefix) && matches!(e.what, What::Started { .. }))
            .collect()
    }

    /// The plan `node` computes from its own view now.
    pub fn plan_on(&self, node: &str, service: &str) -> mesh_planner::Plan {
        let view = self.shared.view_for(node);
        let spec = view.services[service].spec.clone();
        mesh_planner::plan(
            &mesh_planner::Cluster {
                nodes: &view.planner_nodes(),
                tasks: &view.tasks,
                now_ms: self.now_ms(),
            },
            &spec.planned().expect("a scheduled service"),
        )
    }

    /// The node's host stops: no pass, no load balancer, peers call it down.
    pub fn kill(&self, node: &str) {
        self.shared.gossip.lock().unwrap().dead.insert(node.into());
    }

    /// The host comes back with a fresh agent: its processes are gone, its records (kept
    /// in its state file) are what it last published.
    pub fn revive(&self, node: &str) {
        self.shared.gossip.lock().unwrap().dead.remove(node);
        self.nodes
            .lock()
            .unwrap()
            .insert(node.into(), FakeNode::boot(node, &self.shared));
    }

    /// The node's agent is killed and started again: its jobs (a stop underway) are gone,
    /// its task processes (the process driver's) still run.
    pub fn restart_agent(&self, node: &str) {
        let mut nodes = self.nodes.lock().unwrap();
        let old = nodes.get(node).expect("a node of the cluster").clone();
        old.killed.store(true, std::sync::atomic::Ordering::SeqCst);
        let fresh = FakeNode::boot(node, &self.shared);
        *fresh.processes.lock().unwrap() = std::mem::take(&mut *old.processes.lock().unwrap());
        nodes.insert(node.into(), fresh);
    }

    /// `a` and `b` stop hearing each other.
    pub fn cut(&self, a: &str, b: &str) {
        let mut g = self.shared.gossip.lock().unwrap();
        g.cut.insert((a.into(), b.into()));
        g.cut.insert((b.into(), a.into()));
    }

    pub fn heal(&self) {
        self.shared.gossip.lock().unwrap().cut.clear();
    }

    /// What `node` offers to tasks' reservations.
    pub fn capacity(&self, node: &str, offers: mesh_api::spec::Resources) {
        let mut g = self.shared.gossip.lock().unwrap();
        g.capacity.insert(node.into(), offers);
    }

    /// Every node goes on seeing the others' task records as they are now, until
    /// [`FakeCluster::catch_up`]: gossip a round late, as every node hears of its own tasks
    /// before anyone else does.
    pub fn lag(&self) {
        let mut g = self.shared.gossip.lock().unwrap();
        let now = g.tasks.clone();
        for me in &self.shared.names {
            for (other, tasks) in &now {
                if me != other {
                    g.late.insert((me.clone(), other.clone()), tasks.clone());
                }
            }
        }
    }

    pub fn catch_up(&self) {
        self.shared.gossip.lock().unwrap().late.clear();
    }

    /// `node`'s load balancer stops being reprogrammed: it confirms no drain.
    pub fn hold_load_balancer(&self, node: &str) {
        self.shared
            .gossip
            .lock()
            .unwrap()
            .held_lb
            .insert(node.into());
    }

    pub fn release_load_balancer(&self, node: &str) {
        self.shared.gossip.lock().unwrap().held_lb.remove(node);
    }
}

struct Process {
    ip: Ipv4Addr,
    /// When it exits on its own (fake ms), with its status.
    exit: Option<(u64, i32)>,
}

pub(super) struct FakeNode {
    name: String,
    shared: Arc<Shared>,
    booted: Instant,
    jobs: Jobs,
    drains: Drains,
    processes: Mutex<BTreeMap<String, Process>>,
    next_ip: Mutex<u8>,
    /// Starts underway, and the most there were at once.
    starting: Mutex<(usize, usize)>,
    /// Its agent was killed (see `FakeCluster::restart_agent`): its jobs still running on
    /// the test's runtime write nothing more.
    killed: std::sync::atomic::AtomicBool,
}

impl FakeNode {
    fn boot(name: &str, shared: &Arc<Shared>) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            shared: shared.clone(),
            booted: Instant::now(),
            jobs: Jobs::default(),
            drains: Drains::default(),
            processes: Mutex::default(),
            next_ip: Mutex::new(2),
            starting: Mutex::default(),
            killed: Default::default(),
        })
    }

    /// What the agent's `lb_applied` does once its load balancer is programmed from a view:
    /// echo every node's removal it can hear of, and note its own.
    fn program_load_balancer(&self) {
        self.drains
            .note_down_nodes(&self.shared.view_for(&self.name));
        let mut g = self.shared.gossip.lock().unwrap();
        if g.held_lb.contains(&self.name) {
            return;
        }
        let applied: BTreeMap<String, u64> =
            g.lb.iter()
                .filter(|(n, _)| **n != self.name && g.sees(&self.name, n))
                .map(|(n, p)| (n.clone(), p.removal))
                .collect();
        let own = g.lb.entry(self.name.clone()).or_default();
        own.applied = applied;
        self.drains.note_own_applied(own.removal);
    }
}

impl NodeRuntime for FakeNode {
    fn node_name(&self) -> &str {
        &self.name
    }

    fn now_ms(&self) -> u64 {
        self.shared.now_ms()
    }

    fn uptime(&self) -> Duration {
        Instant::now().duration_since(self.booted)
    }

    fn expects_peers(&self) -> bool {
        false
    }

    fn runs_tasks(&self) -> bool {
        true
    }

    fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    fn drains(&self) -> &Drains {
        &self.drains
    }

    fn poke(&self) {}

    fn view(&self) -> Arc<View> {
        Arc::new(self.shared.view_for(&self.name))
    }

    async fn refresh(&self) -> Arc<View> {
        self.view()
    }

    async fn own_tasks(&self) -> BTreeMap<String, Task> {
        let g = self.shared.gossip.lock().unwrap();
        g.tasks.get(&self.name).cloned().unwrap_or_default()
    }

    async fn publish_tasks(&self, tasks: &[&Task]) {
        if self.killed.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let mut g = self.shared.gossip.lock().unwrap();
        let own = g.tasks.entry(self.name.clone()).or_default();
        for t in tasks {
            own.insert(t.id.clone(), (*t).clone());
        }
    }

    async fn forget_tasks(&self, ids: Vec<String>) {
        let mut g = self.shared.gossip.lock().unwrap();
        let own = g.tasks.entry(self.name.clone()).or_default();
        for id in ids {
            own.remove(&id);
        }
    }

    async fn record_service(&self, mut record: Replicated<ServiceSpec>) {
        record.updated = Stamp {
            ms: self.now_ms(),
            node: self.name.clone(),
        };
        let mut g = self.shared.gossip.lock().unwrap();
        g.services.insert(record.spec.name.clone(), record);
    }

    fn prefetch(&self, image: &str, _service: &ServiceSpec) {
        self.shared.log(
            &self.name,
            "",
            What::Prefetched {
                image: image.to_owned(),
            },
        );
    }

    fn process(&self, name: &str) -> Option<LocalProcess> {
        let now = self.now_ms();
        let processes = self.processes.lock().unwrap();
        let p = processes.get(name)?;
        let state = match p.exit {
            Some((at, code)) if at <= now => ProcessState::Exited {
                code: Some(code),
                signal: None,
                out_of_memory: None,
            },
            _ => ProcessState::Running,
        };
        Some(LocalProcess {
            state,
            ip: Some(p.ip),
        })
    }

    async fn pull(&self, image: &str, _service: &ServiceSpec) -> Result<(), String> {
        let takes = (*self.shared.pull_takes.lock().unwrap())(&self.name, image);
        if !takes.is_zero() {
            tokio::time::sleep(takes).await;
        }
        self.shared.log(
            &self.name,
            "",
            What::Pulled {
                image: image.to_owned(),
            },
        );
        Ok(())
    }

    async fn start_process(&self, _view: &View, task: TaskStart<'_>) -> Result<Started, String> {
        let takes =
            (*self.shared.start_takes.lock().unwrap())(&self.name, task.name, task.template);
        if !takes.is_zero() {
            {
                let mut s = self.starting.lock().unwrap();
                s.0 += 1;
                s.1 = s.1.max(s.0);
            }
            tokio::time::sleep(takes).await;
            self.starting.lock().unwrap().0 -= 1;
        }
        let run = (*self.shared.script.lock().unwrap())(&self.name, task.name, task.template);
        let exit = match run {
            Run::Reject(why) => {
                self.shared
                    .log(&self.name, task.name, What::Rejected(why.clone()));
                return Err(why);
            }
            Run::Serve => None,
            Run::Exit { after, code } => Some((self.now_ms() + after.as_millis() as u64, code)),
        };
        let ip = {
            let mut next = self.next_ip.lock().unwrap();
            *next += 1;
            let node = self.shared.names.iter().position(|n| *n == self.name);
            Ipv4Addr::new(10, 0, node.unwrap_or(0) as u8, *next)
        };
        self.processes
            .lock()
            .unwrap()
            .insert(task.name.into(), Process { ip, exit });
        self.shared.log(
            &self.name,
            task.name,
            What::Started {
                command: task.template.command.clone(),
            },
        );
        if task.publish {
            self.shared.log(&self.name, task.name, What::Serving);
        }
        Ok(Started { ip: Some(ip) })
    }

    async fn stop_process(&self, name: &str, grace: Duration) -> anyhow::Result<()> {
        self.processes.lock().unwrap().remove(name);
        self.shared.log(&self.name, name, What::Stopped { grace });
        Ok(())
    }

    async fn forget_process(&self, name: &str) -> anyhow::Result<()> {
        self.processes.lock().unwrap().remove(name);
        Ok(())
    }

    async fn wait_listening(
        &self,
        name: &str,
        _ip: Ipv4Addr,
        _port: u16,
        _limit: Duration,
    ) -> health::Ready {
        match self.process(name).map(|p| p.state) {
            Some(ProcessState::Running) => health::Ready::Listening,
            _ => health::Ready::Gone,
        }
    }

    async fn probe(&self, name: &str, _ip: Ipv4Addr, _check: &HealthCheck) -> Result<(), String> {
        (*self.shared.probe.lock().unwrap())(&self.name, name)
    }

    async fn publish_endpoint(
        &self,
        name: &str,
        _network: &str,
        _service: &str,
        _ip: Ipv4Addr,
    ) -> anyhow::Result<()> {
        self.shared.log(&self.name, name, What::Serving);
        Ok(())
    }

    async fn leave_load_balancers(&self, name: &str) -> u64 {
        let now = self.now_ms();
        let removal = {
            let mut g = self.shared.gossip.lock().unwrap();
            let p = g.lb.entry(self.name.clone()).or_default();
            // As the agent's counter: increasing, and past any from before a restart.
            p.removal = (p.removal + 1).max(now);
            p.removal
        };
        self.shared
            .log(&self.name, name, What::LeftLoadBalancers { removal });
        removal
    }

    async fn forget_endpoint(&self, _name: &str) {}

    async fn stop_dns(&self, _name: &str) {}

    fn settle_time(&self) -> Duration {
        Duration::from_millis(200)
    }

    fn placement_hold(&self) -> Duration {
        // The agent's for 3 nodes gossiping every 100 ms.
        Duration::from_millis(400)
    }
}
