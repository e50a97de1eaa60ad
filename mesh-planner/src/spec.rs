//! The parts of a service's spec that decide where its tasks run and how they come back:
//! mode, placement (constraints, spread preferences, a per-node limit) and restart policy.
//! They are gossiped inside the service record, so they are plain serde types.

use std::{collections::BTreeMap, fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// The most replicas a service may ask for: far above what a cluster of this kind runs, low
/// enough that a typo (`--replicas 10000000`) is refused instead of flooding every node.
pub const MAX_REPLICAS: u32 = 10_000;

/// Replicated: `replicas` slots placed over eligible nodes. Global: one task on every
/// eligible node. The jobs (Swarm 20.10) run their tasks to completion instead of keeping
/// them running: a replicated job until `completions` tasks have exited 0, at most
/// `max_concurrent` at a time; a global job once on every eligible node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    Replicated {
        replicas: u32,
    },
    Global,
    /// Docker's `ReplicatedJob { TotalCompletions, MaxConcurrent }`.
    #[serde(rename = "replicated-job")]
    ReplicatedJob {
        completions: u32,
        max_concurrent: u32,
    },
    #[serde(rename = "global-job")]
    GlobalJob,
}

impl Default for ServiceMode {
    fn default() -> Self {
        Self::Replicated { replicas: 1 }
    }
}

impl ServiceMode {
    /// As `--mode` spells it (and `service ls --filter mode=`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Replicated { .. } => "replicated",
            Self::Global => "global",
            Self::ReplicatedJob { .. } => "replicated-job",
            Self::GlobalJob => "global-job",
        }
    }

    /// As `service ls` shows it (Docker's MODE column).
    pub fn display(&self) -> &'static str {
        match self {
            Self::Replicated { .. } => "replicated",
            Self::Global => "global",
            Self::ReplicatedJob { .. } => "replicated job",
            Self::GlobalJob => "global job",
        }
    }

    /// Its tasks run to completion: one that exits 0 is `Complete` and never restarted.
    pub fn is_job(&self) -> bool {
        matches!(self, Self::ReplicatedJob { .. } | Self::GlobalJob)
    }
}

/// Where tasks may run and how they spread.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// All must hold on a node for it to run a task.
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// Applied in order: spread over the first label's values, then within each value over
    /// the next one's, and so on.
    #[serde(default)]
    pub preferences: Vec<Spread>,
    /// At most this many tasks of the service on one node (None or 0: no limit, as Swarm's 0).
    #[serde(default)]
    pub max_replicas_per_node: Option<u32>,
}

/// What a constraint looks at on a node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    /// `node.id`: the node's ID or its name.
    NodeId,
    /// `node.hostname`: the node's hostname or its name (test clusters share one hostname).
    NodeHostname,
    /// `node.labels.<key>`: labels set by an operator, over the node's own.
    NodeLabel(String),
    /// `engine.labels.<key>`: the labels the node declared itself.
    EngineLabel(String),
    /// `node.role`: `manager` (a mesh admin) or `worker`, Docker's spelling.
    NodeRole,
    /// `node.platform.os`: `linux`.
    NodePlatformOs,
    /// `node.platform.arch`: `x86_64`, `aarch64`, … as the node reports it.
    NodePlatformArch,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NodeId => f.write_str("node.id"),
            Self::NodeHostname => f.write_str("node.hostname"),
            Self::NodeLabel(k) => write!(f, "node.labels.{k}"),
            Self::EngineLabel(k) => write!(f, "engine.labels.{k}"),
            Self::NodeRole => f.write_str("node.role"),
            Self::NodePlatformOs => f.write_str("node.platform.os"),
            Self::NodePlatformArch => f.write_str("node.platform.arch"),
        }
    }
}

impl FromStr for Field {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let label = |k: &str, prefix: &str| -> Result<String, String> {
            if k.is_empty() {
                return Err(format!(
                    "constraint field {s:?} has no label key: write {prefix}<key>, e.g. {prefix}zone"
                ));
            }
            if !k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
            {
                return Err(format!(
                    "invalid label key {k:?} in {s:?}: use letters, digits, '.', '-', '_' or '/'"
                ));
            }
            Ok(k.to_owned())
        };
        match s {
            "node.id" => Ok(Self::NodeId),
            "node.hostname" => Ok(Self::NodeHostname),
            "node.role" => Ok(Self::NodeRole),
            "node.platform.os" => Ok(Self::NodePlatformOs),
            "node.platform.arch" => Ok(Self::NodePlatformArch),
            _ => {
                if let Some(k) = s.strip_prefix("node.labels.") {
                    Ok(Self::NodeLabel(label(k, "node.labels.")?))
                } else if let Some(k) = s.strip_prefix("engine.labels.") {
                    Ok(Self::EngineLabel(label(k, "engine.labels.")?))
                } else if s == "node.labels" || s == "engine.labels" {
                    Err(format!(
                        "constraint field {s:?} has no label key: write {s}.<key>, e.g. {s}.zone"
                    ))
                } else {
                    Err(format!(
                        "unknown constraint field {s:?}: use node.id, node.hostname, node.role, \
                         node.platform.os, node.platform.arch, node.labels.<key> or \
                         engine.labels.<key>"
                    ))
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = "==")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
}

/// `field==value` or `field!=value`; values compare case-insensitively, as Swarm's do. A
/// label a node does not have is unequal to every value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Constraint {
    pub field: Field,
    pub op: Op,
    pub value: String,
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            Op::Eq => "==",
            Op::Ne => "!=",
        };
        write!(f, "{}{op}{}", self.field, self.value)
    }
}

impl FromStr for Constraint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (field, op, value) = if let Some((f, v)) = s.split_once("==") {
            (f, Op::Eq, v)
        } else if let Some((f, v)) = s.split_once("!=") {
            (f, Op::Ne, v)
        } else {
            return Err(format!(
                "invalid constraint {s:?}: expected FIELD==VALUE or FIELD!=VALUE, e.g. \
                 node.labels.env==production"
            ));
        };
        let (field, value) = (field.trim(), value.trim());
        if value.is_empty() {
            return Err(format!(
                "invalid constraint {s:?}: no value after the operator"
            ));
        }
        if value.contains("==") || value.contains("!=") || value.contains(char::is_whitespace) {
            return Err(format!(
                "invalid constraint {s:?}: one operator and a value without spaces, e.g. \
                 node.labels.env==production"
            ));
        }
        let field: Field = field.parse()?;
        if field == Field::NodeRole && value.parse::<Role>().is_err() {
            return Err(format!(
                "invalid constraint {s:?}: node.role is manager or worker"
            ));
        }
        Ok(Self {
            field,
            op,
            value: value.to_owned(),
        })
    }
}

/// `spread=node.labels.<key>`: tasks go evenly to each value of the label (nodes without it
/// count as one more value).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Spread {
    pub label: String,
}

impl fmt::Display for Spread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spread=node.labels.{}", self.label)
    }
}

impl FromStr for Spread {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "invalid placement preference {s:?}: expected spread=node.labels.<key>, e.g. \
                 spread=node.labels.zone"
            )
        };
        let (strategy, target) = s.split_once('=').ok_or_else(bad)?;
        if strategy != "spread" {
            return Err(format!(
                "unknown placement preference {strategy:?} in {s:?}: only spread=node.labels.<key> exists"
            ));
        }
        match target.parse::<Field>() {
            Ok(Field::NodeLabel(label)) => Ok(Self { label }),
            Ok(_) | Err(_) => Err(bad()),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    /// Never restart: the slot holds its finished task.
    None,
    /// Restart when the task exits with a non-zero status or cannot start.
    OnFailure,
    /// Restart whenever the task stops without being asked to.
    #[default]
    Any,
}

impl fmt::Display for RestartCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::OnFailure => "on-failure",
            Self::Any => "any",
        })
    }
}

impl FromStr for RestartCondition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "on-failure" => Ok(Self::OnFailure),
            "any" => Ok(Self::Any),
            other => Err(format!(
                "unknown restart condition {other:?}: use none, on-failure or any"
            )),
        }
    }
}

/// Carried out by the node a task runs on (see [`crate::restart`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RestartPolicy {
    #[serde(default)]
    pub condition: RestartCondition,
    /// Wait between a task's end and its replacement's start.
    #[serde(default = "default_restart_delay_ms")]
    pub delay_ms: u64,
    /// Restarts allowed (within `window_ms` when set); None: no limit.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// The window `max_attempts` counts in; None: the slot's whole life.
    #[serde(default)]
    pub window_ms: Option<u64>,
}

fn default_restart_delay_ms() -> u64 {
    5_000
}

impl RestartPolicy {
    /// The policy a task of a service in `mode` ends under. A job's task that completed is
    /// never restarted, so `any` acts as `on-failure` there (Swarm's restart supervisor does
    /// the same: "it would be nonsensical to restart completed jobs").
    pub fn for_mode(self, mode: ServiceMode) -> Self {
        match self.condition {
            RestartCondition::Any if mode.is_job() => Self {
                condition: RestartCondition::OnFailure,
                ..self
            },
            _ => self,
        }
    }
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            condition: RestartCondition::Any,
            delay_ms: default_restart_delay_ms(),
            max_attempts: None,
            window_ms: None,
        }
    }
}

/// How a change of the task template rolls out (Swarm's UpdateConfig; the same shape is
/// the rollback config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UpdateConfig {
    /// Slots replaced at once; 0: all at once.
    #[serde(default = "one")]
    pub parallelism: u32,
    /// Wait after a replaced slot's new task runs before that place takes the next slot.
    #[serde(default)]
    pub delay_ms: u64,
    #[serde(default)]
    pub order: UpdateOrder,
    #[serde(default)]
    pub failure_action: FailureAction,
    /// A new task that fails within this long of starting counts as a failed update.
    #[serde(default = "five_seconds")]
    pub monitor_ms: u64,
    /// Failed tasks tolerated, as a share of the service's slots, before the failure action.
    #[serde(default)]
    pub max_failure_ratio: Ratio,
}

fn one() -> u32 {
    1
}

fn five_seconds() -> u64 {
    5_000
}

impl Default for UpdateConfig {
    /// Swarm's defaults: one at a time, no delay, stop first, pause on failure, 5 s monitor,
    /// no failure tolerated.
    fn default() -> Self {
        Self {
            parallelism: 1,
            delay_ms: 0,
            order: UpdateOrder::StopFirst,
            failure_action: FailureAction::Pause,
            monitor_ms: five_seconds(),
            max_failure_ratio: Ratio::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    /// The old task stops, then the new one starts (the slot is empty in between).
    #[default]
    StopFirst,
    /// The new task starts, and the old one stops once it runs.
    StartFirst,
}

impl fmt::Display for UpdateOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::StopFirst => "stop-first",
            Self::StartFirst => "start-first",
        })
    }
}

impl FromStr for UpdateOrder {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stop-first" => Ok(Self::StopFirst),
            "start-first" => Ok(Self::StartFirst),
            other => Err(format!(
                "unknown update order {other:?}: use stop-first or start-first"
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    /// Stop replacing slots; the old tasks keep serving; a new update resumes.
    #[default]
    Pause,
    /// Go on as if nothing failed.
    Continue,
    /// Go back to the previous spec, with the rollback config.
    Rollback,
}

impl fmt::Display for FailureAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pause => "pause",
            Self::Continue => "continue",
            Self::Rollback => "rollback",
        })
    }
}

impl FromStr for FailureAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pause" => Ok(Self::Pause),
            "continue" => Ok(Self::Continue),
            "rollback" => Ok(Self::Rollback),
            other => Err(format!(
                "unknown failure action {other:?}: use pause, continue or rollback"
            )),
        }
    }
}

/// A share from 0 to 1 kept in millionths, so specs stay comparable for equality (a float
/// would not be `Eq`); it travels as a plain number.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(into = "f64", try_from = "f64")]
pub struct Ratio(u32);

impl Ratio {
    pub fn get(self) -> f64 {
        f64::from(self.0) / 1_000_000.0
    }
}

impl From<Ratio> for f64 {
    fn from(r: Ratio) -> f64 {
        r.get()
    }
}

impl TryFrom<f64> for Ratio {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, Self::Error> {
        if !(0.0..=1.0).contains(&v) {
            return Err(format!("ratio {v} is not between 0 and 1"));
        }
        Ok(Self((v * 1_000_000.0).round() as u32))
    }
}

impl FromStr for Ratio {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let v: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("invalid ratio {s:?}: use a number from 0 to 1, e.g. 0.2"))?;
        Self::try_from(v).map_err(|e| format!("{e}: use a number from 0 to 1, e.g. 0.2"))
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.get())
    }
}

/// CPUs and memory: what a node has, or what a task reserves of it (Docker's
/// `Resources.Reservations`). Zero means none reserved, or, for a node, not advertised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// Billionths of a CPU (Docker's NanoCPUs): `--reserve-cpu 0.5` is 500_000_000.
    #[serde(default)]
    pub nano_cpus: u64,
    #[serde(default)]
    pub memory_bytes: u64,
}

impl Resources {
    pub fn is_zero(&self) -> bool {
        *self == Self::default()
    }
}

/// What a node may do in the cluster. Every node is an admin until the trust model gives
/// nodes roles; Docker's constraints spell an admin `manager`, as Swarm's nodes that accept
/// commands are called.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Admin,
    Worker,
}

impl Role {
    /// Docker's word for it (`node.role==manager`, `docker node ls`).
    pub fn docker_name(self) -> &'static str {
        match self {
            Self::Admin => "manager",
            Self::Worker => "worker",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Admin => "admin",
            Self::Worker => "worker",
        })
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "manager" | "admin" => Ok(Self::Admin),
            "worker" => Ok(Self::Worker),
            _ => Err(format!("unknown node role {s:?}: use manager or worker")),
        }
    }
}

/// `node.platform`: what the node's agent runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    /// As `uname -m` says it (Docker's `Architecture`).
    pub arch: String,
}

/// What the planner knows about a node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub id: String,
    pub hostname: String,
    /// Alive (or restarting within its grace) as the failure detector sees it.
    pub ready: bool,
    /// Availability active (not drained).
    pub active: bool,
    /// Operator labels over the node's own.
    pub labels: BTreeMap<String, String>,
    /// The node's own labels.
    pub engine_labels: BTreeMap<String, String>,
    /// Task drivers the node can run (`process`, `podman`).
    pub drivers: Vec<String>,
    /// What the node offers to tasks' reservations; zero: not advertised (an older agent),
    /// which reservations do not limit.
    #[serde(default)]
    pub capacity: Resources,
    #[serde(default)]
    pub role: Role,
    #[serde(default)]
    pub platform: Platform,
}

impl Constraint {
    pub fn holds(&self, node: &Node) -> bool {
        let eq = |a: &str| a.eq_ignore_ascii_case(&self.value);
        let matches = match &self.field {
            Field::NodeId => eq(&node.id) || eq(&node.name),
            Field::NodeHostname => eq(&node.hostname) || eq(&node.name),
            Field::NodeLabel(k) => node.labels.get(k).is_some_and(|v| eq(v)),
            Field::EngineLabel(k) => node.engine_labels.get(k).is_some_and(|v| eq(v)),
            Field::NodeRole => self.value.parse::<Role>().is_ok_and(|r| r == node.role),
            Field::NodePlatformOs => eq(&node.platform.os),
            Field::NodePlatformArch => eq(&node.platform.arch),
        };
        match self.op {
            Op::Eq => matches,
            Op::Ne => !matches,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraints_parse_like_swarms() {
        let c: Constraint = "node.labels.env==production".parse().unwrap();
        assert_eq!(c.field, Field::NodeLabel("env".into()));
        assert_eq!(c.op, Op::Eq);
        assert_eq!(c.value, "production");
        assert_eq!(c.to_string(), "node.labels.env==production");
        let c: Constraint = "node.hostname != node3".parse().unwrap();
        assert_eq!((c.field, c.op), (Field::NodeHostname, Op::Ne));
        assert!(
            "engine.labels.type==low-memory"
                .parse::<Constraint>()
                .is_ok()
        );
    }

    #[test]
    fn malformed_constraints_say_how_to_fix_them() {
        for (input, says) in [
            ("node.labels.env=production", "expected FIELD==VALUE"),
            ("node.labels.==x", "no label key"),
            ("node.labels==x", "no label key"),
            ("node.rol==manager", "unknown constraint field"),
            ("node.role==leader", "manager or worker"),
            ("node.labels.env==", "no value"),
            ("node.labels.env==a==b", "one operator"),
            ("", "expected FIELD==VALUE"),
        ] {
            let e = input.parse::<Constraint>().unwrap_err();
            assert!(e.contains(says), "{input:?}: {e}");
        }
    }

    #[test]
    fn missing_labels_are_unequal_to_everything() {
        let node = Node {
            name: "n1".into(),
            labels: [("env".to_owned(), "Production".to_owned())].into(),
            ..Default::default()
        };
        let holds = |s: &str| s.parse::<Constraint>().unwrap().holds(&node);
        assert!(holds("node.labels.env==production"), "case-insensitive");
        assert!(!holds("node.labels.env!=production"));
        assert!(!holds("node.labels.zone==a"));
        assert!(holds("node.labels.zone!=a"));
        assert!(holds("node.hostname==n1"));
        assert!(holds("node.id!=n2"));
    }

    #[test]
    fn roles_and_platforms_match_dockers_spelling() {
        let admin = Node {
            name: "n1".into(),
            platform: Platform {
                os: "linux".into(),
                arch: "x86_64".into(),
            },
            ..Default::default()
        };
        let worker = Node {
            role: Role::Worker,
            ..admin.clone()
        };
        let holds = |s: &str, n: &Node| s.parse::<Constraint>().unwrap().holds(n);
        assert!(holds("node.role==manager", &admin));
        assert!(holds("node.role == Manager", &admin), "case-insensitive");
        assert!(!holds("node.role==manager", &worker));
        assert!(holds("node.role!=manager", &worker));
        assert!(holds("node.role==worker", &worker));
        assert!(holds("node.platform.os==linux", &admin));
        assert!(holds("node.platform.arch==x86_64", &worker));
        assert!(!holds("node.platform.arch==aarch64", &worker));
        assert_eq!(
            "node.role==manager"
                .parse::<Constraint>()
                .unwrap()
                .to_string(),
            "node.role==manager"
        );
    }

    #[test]
    fn spread_preferences_name_a_node_label() {
        let p: Spread = "spread=node.labels.zone".parse().unwrap();
        assert_eq!(p.label, "zone");
        assert_eq!(p.to_string(), "spread=node.labels.zone");
        assert!("spread=node.hostname".parse::<Spread>().is_err());
        assert!("binpack=node.labels.zone".parse::<Spread>().is_err());
        assert!("zone".parse::<Spread>().is_err());
    }
}
