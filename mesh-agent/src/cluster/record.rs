//! Records as they travel in gossip (JSON values under well-known key prefixes).

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, str::FromStr};

use ipnet::Ipv4Net;
use mesh_planner::{Placement, RestartPolicy, ServiceMode, UpdateConfig};
use serde::{Deserialize, Serialize};

/// Gossip keys. One place so that readers and writers cannot disagree.
pub mod key {
    /// The node's own record.
    pub const NODE: &str = "node";
    /// Set by an agent that is stopping with its dataplane and tasks left running: until the
    /// time it names, the node counts as up (see [`super::Restarting`]).
    pub const RESTARTING: &str = "restarting";
    /// `ep:<task>`: a task of this node.
    pub const ENDPOINT: &str = "ep:";
    /// `att:<network>`: this node's own address on a network it plumbs.
    pub const ATTACHMENT: &str = "att:";
    /// `blk:<network>:<index>`: a claim on a block of a network's subnet.
    pub const BLOCK: &str = "blk:";
    /// `obj:net:<name>`, replicated.
    pub const NETWORK: &str = "obj:net:";
    /// `obj:svc:<name>`, replicated.
    pub const SERVICE: &str = "obj:svc:";
    /// `obj:nodespec:<node>`, replicated: what an operator set on a node (drain, labels).
    pub const NODE_SPEC: &str = "obj:nodespec:";
    /// Set by an agent that leaves the cluster for good (`mesh-agent leave`): peers drop the
    /// node at once instead of waiting for the failure detector (see [`super::Left`]).
    pub const LEFT: &str = "left";
    /// The cluster key ids this node holds (see [`super::KeyState`]): how a rotation knows
    /// every node switched before it retires the old key.
    pub const KEYS: &str = "keys";
    /// `obj:noderm:<node>`, replicated: `meshctl node rm` (see [`super::NodeRemoval`]).
    pub const NODE_REMOVAL: &str = "obj:noderm:";
    /// `obj:clusterkey:primary`, replicated: the key a rotation makes primary everywhere (see
    /// [`super::KeyRotation`]).
    pub const CLUSTER_KEY: &str = "obj:clusterkey:";
    /// `tsk:<id>`: a task of a service on this node, with its state (mesh_planner::Task).
    pub const TASK: &str = "tsk:";
    /// `obj:secret:<name>`, replicated: a secret, its data sealed under the cluster key.
    pub const SECRET: &str = "obj:secret:";
    /// `obj:config:<name>`, replicated: a config file's data.
    pub const CONFIG: &str = "obj:config:";
    /// How far this node's load balancer has caught up with every other node's task
    /// removals (see [`super::LbProgress`]): what lets a stopping task know that no node
    /// sends it new connections any more.
    pub const LB_PROGRESS: &str = "lb";
}

/// The label that names the stack an object belongs to (Docker's own, so tools that read
/// Swarm labels read ours).
pub const STACK_LABEL: &str = "com.docker.stack.namespace";

/// The largest secret or config Docker accepts (500 KB); gossip carries every one to every
/// node, so the limit is also what keeps a state file and a sync round bounded.
pub const MAX_FILE_OBJECT: usize = 500 * 1024;

/// A secret: immutable once created (rotate by creating another and switching services).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Bytes of the plaintext, shown by `secret inspect` in place of the data.
    pub size: usize,
    /// Never the plaintext: see `gossip::sealed`.
    pub sealed: crate::gossip::sealed::Sealed,
}

/// A config: a file given to tasks, immutable once created; not secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// base64 of the file's bytes (a config need not be text).
    pub data: String,
}

/// A secret or config granted to a service's tasks: `source` is the object's name, `target`
/// where the file appears (secrets: a name under /run/secrets; configs: an absolute path).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileRef {
    pub source: String,
    pub target: String,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

impl FileRef {
    /// Docker's `--secret`/`--config` syntax: `NAME`, or
    /// `source=NAME[,target=T][,uid=U][,gid=G][,mode=0400]`. `config` selects the target
    /// rules: secrets are file names under /run/secrets (default: the name), configs absolute
    /// paths (default `/<name>`).
    pub fn parse(s: &str, config: bool) -> Result<Self, String> {
        let kind = if config { "config" } else { "secret" };
        let mut r = FileRef {
            source: String::new(),
            target: String::new(),
            uid: 0,
            gid: 0,
            mode: 0o444,
        };
        if !s.contains('=') {
            r.source = s.to_owned();
        } else {
            for field in s.split(',') {
                let (k, v) = field.split_once('=').ok_or_else(|| {
                    format!("invalid --{kind} {s:?}: expected source=NAME[,target=…][,uid=…][,gid=…][,mode=0444]")
                })?;
                let num = |v: &str, radix: u32| {
                    u32::from_str_radix(v, radix)
                        .map_err(|_| format!("invalid {k} {v:?} in --{kind} {s:?}"))
                };
                match k.trim() {
                    "source" | "src" => r.source = v.to_owned(),
                    "target" | "dst" | "destination" => r.target = v.to_owned(),
                    "uid" => r.uid = num(v, 10)?,
                    "gid" => r.gid = num(v, 10)?,
                    "mode" => {
                        r.mode = num(v, 8)?;
                        if r.mode > 0o777 {
                            return Err(format!(
                                "invalid mode {v:?} in --{kind} {s:?}: use octal permission bits such as 0400"
                            ));
                        }
                    }
                    other => {
                        return Err(format!(
                            "unknown key {other:?} in --{kind} {s:?}: use source, target, uid, gid or mode"
                        ));
                    }
                }
            }
        }
        if r.source.is_empty() {
            return Err(format!("--{kind} {s:?} names no source={kind}"));
        }
        if r.target.is_empty() {
            r.target = if config {
                format!("/{}", r.source)
            } else {
                r.source.clone()
            };
        }
        if config {
            if !r.target.starts_with('/')
                || r.target.split('/').any(|c| c == "..")
                || r.target == "/"
            {
                return Err(format!(
                    "config target {:?} must be an absolute file path such as /etc/site.conf",
                    r.target
                ));
            }
        } else if r.target.contains('/') || r.target == "." || r.target == ".." {
            return Err(format!(
                "secret target {:?} must be a file name: secrets appear as /run/secrets/<target>",
                r.target
            ));
        }
        Ok(r)
    }
}

/// The first VXLAN network identifier mesh hands out (Docker's overlay driver starts at 4096
/// too, leaving lower ones to hand-made tunnels).
pub const FIRST_VNI: u32 = 4096;
/// The largest VNI a VXLAN header can carry.
pub const MAX_VNI: u32 = (1 << 24) - 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            other => Err(format!("unknown protocol {other:?}: use tcp or udp")),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    /// Takes part in load balancing.
    #[default]
    Active,
    /// Its tasks receive no new connections; established ones finish.
    Drain,
}

impl fmt::Display for Availability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Active => "Active",
            Self::Drain => "Drain",
        })
    }
}

/// What a node says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub hostname: String,
    /// Underlay address: VXLAN tunnels end here and published ports answer here.
    pub address: Ipv4Addr,
    /// Underlay MTU; overlay networks use 50 bytes less.
    pub mtu: u32,
    pub agent_version: String,
    /// Task drivers this node runs; placement only picks nodes that have a task's driver.
    #[serde(default = "default_drivers")]
    pub drivers: Vec<String>,
    /// The node's own labels (agent.toml `labels`, `--label`): Swarm's engine labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Ports of the node's address the agent itself needs (gossip, VXLAN, its UI and metrics
    /// listeners): a published port answers on every node, so none may take one of these.
    #[serde(default)]
    pub reserved_ports: Vec<ReservedPort>,
}

/// A port a node's agent listens on, and what for (the error names it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservedPort {
    pub protocol: Protocol,
    pub port: u16,
    pub used_by: String,
}

/// A node that left for good: peers forget this generation of it at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Left {
    pub at_ms: u64,
}

/// `meshctl node rm`: every generation of `node` up to `generation` is forgotten (its records
/// leave every view, its address blocks are freed). A later generation (the node joined
/// again) is not affected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRemoval {
    pub node: String,
    pub generation: u64,
}

/// Key ids a node holds, primary first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    pub primary: crate::gossip::keyring::KeyId,
    pub accepted: Vec<crate::gossip::keyring::KeyId>,
}

/// A cluster key rotation (`meshctl join-token --rotate`): every node makes `key` its primary
/// and keeps the keys it had as secondaries until every Ready node uses `key`, then drops
/// them. Travels only in sealed gossip; its Debug form never shows the key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRotation {
    pub id: crate::gossip::keyring::KeyId,
    /// base64, as in a key file.
    pub key: String,
}

impl fmt::Debug for KeyRotation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyRotation({})", self.id)
    }
}

/// A node label as `--label` and `--label-add` take it: `key=value`, or `key` for an empty
/// value. Keys are what constraints name (`node.labels.KEY`), so no spaces or `=` in them.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').unwrap_or((s, ""));
    if k.is_empty() {
        return Err(format!(
            "invalid label {s:?}: the key is empty; use key=value, e.g. type=low-memory"
        ));
    }
    if k.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "invalid label {s:?}: the key {k:?} contains spaces; use key=value with a key of \
             letters, digits, '.', '-' or '_', e.g. type=low-memory"
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(format!(
            "invalid label {s:?}: the value contains control characters"
        ));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// Every agent runs processes; records from before drivers were advertised mean that.
fn default_drivers() -> Vec<String> {
    vec![DRIVER_PROCESS.to_owned()]
}

/// The driver that runs a command in the task's namespaces (no image).
pub const DRIVER_PROCESS: &str = "process";
/// OCI images run by podman; advertised only where podman works.
pub const DRIVER_PODMAN: &str = "podman";

/// An agent going down gracefully leaves its tasks and pinned dataplane serving; peers keep
/// counting the node (and its tasks) as up until `until_ms`, so a restart slower than the
/// failure detector does not evict tasks that never stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restarting {
    pub until_ms: u64,
}

/// A node's part in confirmed drains. A node that takes a task out of the load balancers
/// bumps `removal` in the same write as the endpoint's deletion (after it, so gossip, which
/// delivers a node's keys in version order, never carries the counter without the
/// deletion). Every node, once its load balancer is programmed from a view, records the
/// other nodes' counters it has applied in `applied`. The stopping node waits until every
/// live node's `applied` reaches its own counter: only then is no new connection headed for
/// the task (Swarm has no such step and routes to tasks that are shutting down, moby#38841).
///
/// Echoing counters cannot loop: a node's `applied` changes only when another node's
/// `removal` does, and `removal` changes only when a task stops.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbProgress {
    /// Milliseconds since the epoch of this node's newest removal, kept increasing across
    /// restarts without any state of its own.
    #[serde(default)]
    pub removal: u64,
    /// Other nodes' `removal`, as this node's load balancer has applied them.
    #[serde(default)]
    pub applied: BTreeMap<String, u64>,
}

/// Operator-set properties of a node, replicated so they can be changed from any node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub availability: Availability,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub name: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    /// Object labels (a stack's networks carry [`STACK_LABEL`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

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

/// A service port: `published` is answered on every node (the routing mesh), `target` is
/// where the tasks listen; a port with no published side is reachable through the VIP only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub published: Option<u16>,
    pub target: u16,
    /// Records written before modes existed have none: the default.
    #[serde(default)]
    pub mode: PublishMode,
}

/// How a published port reaches the tasks, and what source address they see.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// The routing mesh, keeping the client's own address and port.
    #[default]
    Ingress,
    /// The routing mesh with the ingress node's address as the source (Swarm's behaviour).
    Snat,
    /// Only the node's own tasks answer, with the client's address kept; nodes without a
    /// task of the service refuse the port (Swarm's `mode=host`).
    Host,
}

impl fmt::Display for PublishMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Snat => "snat",
            Self::Host => "host",
        })
    }
}

impl FromStr for PublishMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ingress" => Ok(Self::Ingress),
            "snat" => Ok(Self::Snat),
            "host" => Ok(Self::Host),
            other => Err(format!(
                "unknown publish mode {other:?}: use ingress (the default: every node, the task \
                 sees the client's address), snat (the task sees the ingress node's) or host \
                 (only nodes running a task answer)"
            )),
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.published {
            Some(p) => write!(f, "*:{p}->{}/{}", self.target, self.protocol)?,
            None => write!(f, "{}/{}", self.target, self.protocol)?,
        }
        if self.mode != PublishMode::default() {
            write!(f, " ({})", self.mode)?;
        }
        Ok(())
    }
}

impl FromStr for PortSpec {
    type Err = String;
    /// Docker's short syntax: `8080:80`, `8080:80/udp`, `80` (target only); and its long one:
    /// `published=8080,target=80[,protocol=udp][,mode=ingress]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // `8080:80,mode=snat`: the short syntax with a mode.
        if let Some((short, rest)) = s.split_once(',')
            && !short.contains('=')
        {
            let mut port: Self = short.parse()?;
            port.mode = match rest.trim().split_once('=') {
                Some(("mode", m)) => m.trim().parse().map_err(|e| format!("{e} (in {s:?})"))?,
                _ => {
                    return Err(format!(
                        "invalid port {s:?}: after PUBLISHED:TARGET only ,mode=ingress|snat|host may follow"
                    ));
                }
            };
            return Ok(port);
        }
        if s.contains('=') {
            return Self::from_long_syntax(s);
        }
        let (ports, protocol) = match s.split_once('/') {
            Some((p, proto)) => (p, proto.parse()?),
            None => (s, Protocol::Tcp),
        };
        let port = |p: &str, what: &str| -> Result<u16, String> {
            match p.parse::<u32>() {
                Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
                Ok(n) => Err(format!("{what} port {n} is out of range: use 1-65535")),
                Err(_) => Err(format!(
                    "invalid {what} port {p:?} in {s:?}: expected PUBLISHED:TARGET[/tcp|udp], e.g. 8080:80"
                )),
            }
        };
        match ports.split_once(':') {
            Some((published, target)) => Ok(Self {
                protocol,
                published: Some(port(published, "published")?),
                target: port(target, "target")?,
                mode: PublishMode::default(),
            }),
            None => Ok(Self {
                protocol,
                published: None,
                target: port(ports, "target")?,
                mode: PublishMode::default(),
            }),
        }
    }
}

impl PortSpec {
    fn from_long_syntax(s: &str) -> Result<Self, String> {
        let (mut published, mut target, mut protocol) = (None, None, Protocol::Tcp);
        let mut mode = PublishMode::default();
        let port = |v: &str, what: &str| -> Result<u16, String> {
            match v.parse::<u32>() {
                Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
                _ => Err(format!(
                    "invalid {what} port {v:?} in {s:?}: use a number from 1 to 65535"
                )),
            }
        };
        for field in s.split(',') {
            let (k, v) = field.split_once('=').ok_or_else(|| {
                format!(
                    "invalid port {s:?}: expected published=PORT,target=PORT[,protocol=tcp|udp][,mode=ingress|snat|host]"
                )
            })?;
            match k.trim() {
                "published" => published = Some(port(v.trim(), "published")?),
                "target" => target = Some(port(v.trim(), "target")?),
                "protocol" => protocol = v.trim().parse()?,
                "mode" => mode = v.trim().parse().map_err(|e| format!("{e} (in {s:?})"))?,
                other => {
                    return Err(format!(
                        "unknown key {other:?} in port {s:?}: use published, target, protocol or mode"
                    ));
                }
            }
        }
        let target = target.ok_or_else(|| format!("port {s:?} has no target=PORT"))?;
        Ok(Self {
            protocol,
            published,
            target,
            mode,
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    /// Service labels (Swarm's `--label`, compose `deploy.labels`; a stack's services carry
    /// [`STACK_LABEL`]). Not part of the task template: changing them rolls nothing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub network: String,
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
        let json = serde_json::to_string(&(&self.task, self.force_update)).unwrap_or_default();
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
        })
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
        }
    }
}

impl TaskTemplate {
    pub fn driver(&self) -> &'static str {
        if self.image.is_some() {
            DRIVER_PODMAN
        } else {
            DRIVER_PROCESS
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    #[default]
    Running,
    /// Draining before its process is stopped: no load balancer sends it new connections and
    /// DNS no longer names it, but every node still reaches it (its overlay entries stay), so
    /// the connections it has finish.
    Stopping,
    Exited,
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Exited => "exited",
        })
    }
}

/// A task's attachment to a network, owned by the node the task runs on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub task: String,
    pub network: String,
    pub service: Option<String>,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub state: TaskState,
}

/// A node's own address on a network (on its bridge): source of routing-mesh traffic to
/// tasks and of host-local connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub network: String,
    pub ip: Ipv4Addr,
    pub mac: String,
}

/// A claim on block `index` of a network's subnet; the oldest claim wins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockClaim {
    pub network: String,
    pub index: u32,
    pub stamp: super::Stamp,
}

/// Docker's habit for container MACs: a locally administered prefix followed by the IPv4
/// address, so the MAC is unique wherever the IP is.
pub fn mac_for_ip(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_like_docker() {
        assert_eq!(
            "8080:80".parse::<PortSpec>().unwrap(),
            PortSpec {
                protocol: Protocol::Tcp,
                published: Some(8080),
                target: 80,
                mode: PublishMode::Ingress,
            }
        );
        assert_eq!(
            "5353:53/udp".parse::<PortSpec>().unwrap(),
            PortSpec {
                protocol: Protocol::Udp,
                published: Some(5353),
                target: 53,
                mode: PublishMode::Ingress,
            }
        );
        assert_eq!(
            "80".parse::<PortSpec>().unwrap(),
            PortSpec {
                protocol: Protocol::Tcp,
                published: None,
                target: 80,
                mode: PublishMode::Ingress,
            }
        );
        let e = "8080:70000".parse::<PortSpec>().unwrap_err();
        assert!(e.contains("target port 70000 is out of range"), "{e}");
        let e = "8080:80/sctp".parse::<PortSpec>().unwrap_err();
        assert!(e.contains("unknown protocol"), "{e}");
        let e = "web:80".parse::<PortSpec>().unwrap_err();
        assert!(e.contains("expected PUBLISHED:TARGET"), "{e}");
        assert!("0:80".parse::<PortSpec>().is_err());
    }

    #[test]
    fn ports_parse_in_dockers_long_syntax_too() {
        assert_eq!(
            "published=8080,target=80".parse::<PortSpec>().unwrap(),
            "8080:80".parse::<PortSpec>().unwrap()
        );
        assert_eq!(
            "published=5353,target=53,protocol=udp,mode=ingress"
                .parse::<PortSpec>()
                .unwrap(),
            "5353:53/udp".parse::<PortSpec>().unwrap()
        );
        for (bad, says) in [
            ("published=8080", "no target"),
            ("published=8080,target=0", "invalid target port"),
            ("published=8080,target=80,mode=dsr", "unknown publish mode"),
            ("8080:80,mode=nat", "unknown publish mode"),
            ("8080:80,protocol=udp", "only ,mode="),
            ("published=8080,dest=80", "unknown key"),
        ] {
            let e = bad.parse::<PortSpec>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn port_display_matches_docker_service_ls() {
        let p: PortSpec = "8080:80".parse().unwrap();
        assert_eq!(p.to_string(), "*:8080->80/tcp");
        let p: PortSpec = "8080:80,mode=snat".parse().unwrap();
        assert_eq!(p.to_string(), "*:8080->80/tcp (snat)");
    }

    #[test]
    fn the_publish_mode_defaults_to_ingress_and_snat_is_spelled_both_ways() {
        let snat = PortSpec {
            protocol: Protocol::Udp,
            published: Some(5353),
            target: 53,
            mode: PublishMode::Snat,
        };
        assert_eq!("5353:53/udp,mode=snat".parse::<PortSpec>().unwrap(), snat);
        assert_eq!(
            "published=5353,target=53,protocol=udp,mode=snat"
                .parse::<PortSpec>()
                .unwrap(),
            snat
        );
        assert_eq!(
            "8080:80".parse::<PortSpec>().unwrap().mode,
            PublishMode::Ingress
        );
        // A record written before modes existed.
        let old: PortSpec =
            serde_json::from_str(r#"{"protocol":"tcp","published":8080,"target":80}"#).unwrap();
        assert_eq!(old.mode, PublishMode::Ingress);
    }

    #[test]
    fn labels_parse_like_docker_and_bad_ones_say_how_to_fix() {
        assert_eq!(
            parse_label("type=low-memory").unwrap(),
            ("type".into(), "low-memory".into())
        );
        assert_eq!(parse_label("ssd").unwrap(), ("ssd".into(), "".into()));
        assert_eq!(parse_label("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        let e = parse_label("=x").unwrap_err();
        assert!(e.contains("key is empty") && e.contains("key=value"), "{e}");
        let e = parse_label("a b=c").unwrap_err();
        assert!(e.contains("contains spaces"), "{e}");
        assert!(parse_label("").is_err());
    }

    #[test]
    fn a_key_rotation_never_shows_its_key_in_debug_output() {
        let r = KeyRotation {
            id: crate::gossip::keyring::KeyId(0xabcd),
            key: "c2VjcmV0".into(),
        };
        let shown = format!("{r:?}");
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
        assert!(shown.contains("0000abcd"), "{shown}");
    }

    #[test]
    fn node_records_of_older_agents_have_no_labels() {
        let old = r#"{"name":"a","hostname":"a","address":"192.0.2.1","mtu":1500,"agent_version":"0.1.0"}"#;
        let r: NodeRecord = serde_json::from_str(old).unwrap();
        assert!(r.labels.is_empty());
    }

    #[test]
    fn mac_follows_ip() {
        assert_eq!(mac_for_ip(Ipv4Addr::new(10, 0, 1, 5)), "02:42:0a:00:01:05");
    }
}
