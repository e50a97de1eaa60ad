//! Docker's `ServiceSpec` ↔ mesh's, in one place. Decoding is strict: a field Docker has
//! and mesh does not support is refused by name when it is set (the docker client sends
//! many fields at their zero value, which mean "not set" and pass); a field Docker does not
//! have is refused too. Nothing is silently dropped.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use mesh_api::spec::{
    DnsConfig as MeshDns, EndpointMode, ExtraHost, FileRef, HealthCheck, LogDriver as MeshLog,
    Mount as MeshMount, MountType, NetworkAttachment as MeshAttachment, PortSpec, Probe, Protocol,
    PublishMode, RunOptions, Security, ServiceSpec as MeshSpec, TaskTemplate, Ulimit as MeshUlimit,
    validate_mounts,
};
use mesh_planner::{
    Constraint, FailureAction, Placement as MeshPlacement, RestartCondition,
    RestartPolicy as MeshRestart, ServiceMode, Spread, UpdateConfig as MeshUpdate, UpdateOrder,
};

use super::{ms, ns};

type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    #[serde(default)]
    pub task_template: TaskSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_config: Option<UpdateConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_config: Option<UpdateConfig>,
    /// Deprecated by Docker in favour of `TaskTemplate.Networks`; still read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<NetworkAttachment>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_spec: Option<EndpointSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct TaskSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_spec: Option<ContainerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_spec: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_attachment_spec: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<RestartPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<NetworkAttachment>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_driver: Option<Driver>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_update: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ContainerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privileges: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "TTY")]
    pub tty: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_stdin: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounts: Option<Vec<Mount>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_period: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "DNSConfig")]
    pub dns_config: Option<DnsConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<SecretReference>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configs: Option<Vec<ConfigReference>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sysctls: Option<Labels>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability_add: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability_drop: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ulimits: Option<Vec<Ulimit>>,
}

/// A log driver, or a volume's driver: a name and its options.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Driver {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Labels>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct DnsConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nameservers: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Mount {
    #[serde(default, rename = "Type")]
    pub kind: String,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_options: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_options: Option<VolumeOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmpfs_options: Option<TmpfsOptions>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct VolumeOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_copy: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_config: Option<Driver>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subpath: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct TmpfsOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Healthcheck {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_period: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_interval: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct FileTarget {
    pub name: String,
    #[serde(default, rename = "UID")]
    pub uid: String,
    #[serde(default, rename = "GID")]
    pub gid: String,
    #[serde(default)]
    pub mode: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct SecretReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileTarget>,
    #[serde(default, rename = "SecretID")]
    pub secret_id: String,
    #[serde(default)]
    pub secret_name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ConfigReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileTarget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Value>,
    #[serde(default, rename = "ConfigID")]
    pub config_id: String,
    #[serde(default)]
    pub config_name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Ulimit {
    pub name: String,
    pub soft: i64,
    pub hard: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ResourceRequirements {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservations: Option<Reservation>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    #[serde(default, rename = "NanoCPUs", skip_serializing_if = "is_zero")]
    pub nano_cpus: i64,
    #[serde(default, rename = "MemoryBytes", skip_serializing_if = "is_zero")]
    pub memory_bytes: i64,
    #[serde(default, rename = "Pids", skip_serializing_if = "is_zero")]
    pub pids: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reservation {
    #[serde(default, rename = "NanoCPUs", skip_serializing_if = "is_zero")]
    pub nano_cpus: i64,
    #[serde(default, rename = "MemoryBytes", skip_serializing_if = "is_zero")]
    pub memory_bytes: i64,
    #[serde(
        default,
        rename = "GenericResources",
        skip_serializing_if = "Option::is_none"
    )]
    pub generic_resources: Option<Value>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct RestartPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Placement {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferences: Option<Vec<PlacementPreference>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platforms: Option<Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct PlacementPreference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<SpreadOver>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct SpreadOver {
    pub spread_descriptor: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct NetworkAttachment {
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aliases: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_opts: Option<Labels>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Mode {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicated: Option<Replicated>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global: Option<Empty>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicated_job: Option<ReplicatedJob>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_job: Option<Empty>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Replicated {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ReplicatedJob {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_completions: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct UpdateConfig {
    #[serde(default)]
    pub parallelism: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<i64>,
    #[serde(default)]
    pub max_failure_ratio: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct EndpointSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortConfig>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct PortConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default)]
    pub target_port: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_mode: Option<String>,
}

/// Networks as the request names them (by ID or name) → their mesh names.
pub trait NetworkNames {
    fn network_name(&self, id_or_name: &str) -> Option<String>;
    fn network_id(&self, name: &str) -> String;
}

/// A field mesh does not support, set to something other than its zero value.
fn unsupported(field: &str, hint: &str) -> String {
    format!("{field} is not supported by mesh{hint}")
}

/// JSON's zero values (what the docker client sends for "not set").
fn is_unset(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => !b,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.values().all(|v| is_unset(&Some(v.clone()))),
        Some(Value::Number(n)) => n.as_f64() == Some(0.0),
    }
}

fn refuse_set(v: &Option<Value>, field: &str, hint: &str) -> Result<(), String> {
    if is_unset(v) {
        Ok(())
    } else {
        Err(unsupported(field, hint))
    }
}

fn duration(v: Option<i64>, field: &str) -> Result<Option<u64>, String> {
    v.map(|n| ms(n).map_err(|e| format!("invalid {field}: {e}")))
        .transpose()
}

/// Docker's ServiceSpec → mesh's. `networks` resolves names and IDs.
pub fn to_mesh(d: &ServiceSpec, networks: &dyn NetworkNames) -> Result<MeshSpec, String> {
    if d.name.is_empty() {
        return Err("Spec.Name is empty: name the service (--name)".into());
    }
    let mut spec = MeshSpec {
        name: d.name.clone(),
        labels: d.labels.clone().unwrap_or_default(),
        ..Default::default()
    };
    let t = &d.task_template;
    refuse_set(
        &t.plugin_spec,
        "TaskTemplate.PluginSpec",
        ": mesh runs containers",
    )?;
    refuse_set(
        &t.network_attachment_spec,
        "TaskTemplate.NetworkAttachmentSpec",
        "",
    )?;
    if let Some(r) = t.runtime.as_deref()
        && !r.is_empty()
        && r != "container"
    {
        return Err(unsupported(
            &format!("TaskTemplate.Runtime {r:?}"),
            ": only containers",
        ));
    }
    spec.force_update = t.force_update.unwrap_or(0);
    let c = t
        .container_spec
        .as_ref()
        .ok_or("TaskTemplate.ContainerSpec is missing: give the service an image")?;
    let mut task = template(c, t.resources.as_ref())?;
    if let Some(d) = &t.log_driver {
        task.run.log = log_driver(d)?;
    }
    spec.task = Some(task);
    spec.mode = mode(d.mode.as_ref())?;
    if let Some(r) = &t.restart_policy {
        spec.restart = restart(r)?;
    }
    if let Some(p) = &t.placement {
        spec.placement = placement(p)?;
    }
    let nets: Vec<&NetworkAttachment> = t
        .networks
        .iter()
        .flatten()
        .chain(d.networks.iter().flatten())
        .collect();
    let short = stack_alias(&spec).map(str::to_owned);
    for (i, n) in nets.iter().enumerate() {
        if n.driver_opts.as_ref().is_some_and(|o| !o.is_empty()) {
            return Err(unsupported("TaskTemplate.Networks.DriverOpts", ""));
        }
        let target = networks
            .network_name(&n.target)
            .ok_or_else(|| format!("network {} not found", n.target))?;
        // `docker stack deploy` gives every service its short name as an alias; mesh's DNS
        // answers to it already, on the stack's networks.
        let aliases: Vec<String> = n
            .aliases
            .iter()
            .flatten()
            .filter(|a| Some(a.as_str()) != short.as_deref())
            .cloned()
            .collect();
        if i == 0 {
            spec.network = target;
            spec.aliases = aliases;
        } else {
            spec.networks.push(MeshAttachment {
                target,
                aliases,
                vip: None,
            });
        }
    }
    if let Some(u) = &d.update_config {
        spec.update = update_config(u, "UpdateConfig")?;
    }
    if let Some(u) = &d.rollback_config {
        spec.rollback = update_config(u, "RollbackConfig")?;
    }
    if let Some(e) = &d.endpoint_spec {
        spec.endpoint_mode = match e.mode.as_deref() {
            None | Some("") | Some("vip") => EndpointMode::Vip,
            Some("dnsrr") => EndpointMode::Dnsrr,
            Some(other) => {
                return Err(format!(
                    "invalid EndpointSpec.Mode {other:?}: use vip or dnsrr"
                ));
            }
        };
        for p in e.ports.iter().flatten() {
            spec.ports.push(port(p)?);
        }
    }
    Ok(spec)
}

fn template(c: &ContainerSpec, res: Option<&ResourceRequirements>) -> Result<TaskTemplate, String> {
    refuse_set(&c.groups, "ContainerSpec.Groups", "")?;
    refuse_set(&c.privileges, "ContainerSpec.Privileges", "")?;
    if c.tty == Some(true) {
        return Err(unsupported("ContainerSpec.TTY", ""));
    }
    if c.open_stdin == Some(true) {
        return Err(unsupported("ContainerSpec.OpenStdin", ""));
    }
    if let Some(i) = c.isolation.as_deref()
        && !i.is_empty()
        && i != "default"
    {
        return Err(unsupported(&format!("ContainerSpec.Isolation {i:?}"), ""));
    }
    let image = c
        .image
        .clone()
        .filter(|i| !i.is_empty())
        .ok_or("ContainerSpec.Image is empty: give the service an image")?;
    let mut env = Vec::new();
    for e in c.env.iter().flatten() {
        let (k, v) = e.split_once('=').ok_or_else(|| {
            format!("invalid ContainerSpec.Env {e:?}: use KEY=VALUE (the client resolves KEY)")
        })?;
        env.push((k.to_owned(), v.to_owned()));
    }
    let mut t = TaskTemplate {
        command: c.args.clone().unwrap_or_default(),
        env,
        hostname: c.hostname.clone().filter(|h| !h.is_empty()),
        image: Some(image),
        run: RunOptions {
            entrypoint: c.command.clone().filter(|c| !c.is_empty()),
            user: c.user.clone().filter(|u| !u.is_empty()),
            workdir: c.dir.clone().filter(|d| !d.is_empty()),
            stop_signal: c.stop_signal.clone().filter(|s| !s.is_empty()),
            container_labels: c.labels.clone().unwrap_or_default(),
            hosts: c
                .hosts
                .iter()
                .flatten()
                .map(|h| hosts_line(h))
                .collect::<Result<Vec<_>, _>>()?
                .concat(),
            dns: c
                .dns_config
                .as_ref()
                .map(dns_config)
                .transpose()?
                .unwrap_or_default(),
            log: MeshLog::default(),
        },
        security: Security {
            cap_add: c.capability_add.clone().unwrap_or_default(),
            cap_drop: c.capability_drop.clone().unwrap_or_default(),
            read_only: c.read_only.unwrap_or(false),
            sysctls: c.sysctls.clone().unwrap_or_default(),
            ulimits: c
                .ulimits
                .iter()
                .flatten()
                .map(|u| {
                    Ok(MeshUlimit {
                        name: u.name.clone(),
                        soft: u64::try_from(u.soft)
                            .map_err(|_| format!("invalid ulimit {}: negative", u.name))?,
                        hard: u64::try_from(u.hard)
                            .map_err(|_| format!("invalid ulimit {}: negative", u.name))?,
                    })
                })
                .collect::<Result<_, String>>()?,
            init: c.init.unwrap_or(false),
        },
        ..Default::default()
    };
    t.security.validate()?;
    if let Some(g) = c.stop_grace_period {
        t.stop_grace_ms = ms(g).map_err(|e| format!("invalid StopGracePeriod: {e}"))?;
    }
    t.health = health(c.healthcheck.as_ref())?;
    for s in c.secrets.iter().flatten() {
        t.secrets
            .push(file_ref(&s.secret_name, s.file.as_ref(), "Secrets")?);
    }
    for s in c.configs.iter().flatten() {
        refuse_set(&s.runtime, "ContainerSpec.Configs.Runtime", "")?;
        t.configs
            .push(file_ref(&s.config_name, s.file.as_ref(), "Configs")?);
    }
    if let Some(r) = res {
        if let Some(l) = &r.limits {
            t.resources.limits.nano_cpus = positive(l.nano_cpus, "Limits.NanoCPUs")?;
            t.resources.limits.memory_bytes = positive(l.memory_bytes, "Limits.MemoryBytes")?;
            t.resources.limits.pids = positive(l.pids, "Limits.Pids")?;
        }
        if let Some(r) = &r.reservations {
            refuse_set(&r.generic_resources, "Reservations.GenericResources", "")?;
            t.resources.reservations.nano_cpus = positive(r.nano_cpus, "Reservations.NanoCPUs")?;
            t.resources.reservations.memory_bytes =
                positive(r.memory_bytes, "Reservations.MemoryBytes")?;
        }
    }
    t.mounts = c
        .mounts
        .iter()
        .flatten()
        .map(mount)
        .collect::<Result<_, _>>()?;
    validate_mounts(&t.mounts).map_err(|e| format!("invalid ContainerSpec.Mounts: {e}"))?;
    Ok(t)
}

/// One `Hosts` line as dockerd writes it to /etc/hosts: `IP NAME [ALIAS…]`.
fn hosts_line(line: &str) -> Result<Vec<ExtraHost>, String> {
    let mut words = line.split_whitespace();
    let bad = || format!("invalid ContainerSpec.Hosts entry {line:?}: write \"IP HOSTNAME\"");
    let ip = words.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    let hosts: Vec<ExtraHost> = words
        .map(|host| ExtraHost {
            host: host.to_owned(),
            ip,
        })
        .collect();
    if hosts.is_empty() {
        return Err(bad());
    }
    for h in &hosts {
        h.validate()
            .map_err(|e| format!("invalid ContainerSpec.Hosts entry {line:?}: {e}"))?;
    }
    Ok(hosts)
}

fn dns_config(d: &DnsConfig) -> Result<MeshDns, String> {
    let dns = MeshDns {
        nameservers: d
            .nameservers
            .iter()
            .flatten()
            .map(|n| {
                n.parse()
                    .map_err(|_| format!("invalid DNSConfig.Nameservers {n:?}: an IP address"))
            })
            .collect::<Result<_, _>>()?,
        search: d.search.clone().unwrap_or_default(),
        options: d.options.clone().unwrap_or_default(),
    };
    dns.validate()
        .map_err(|e| format!("invalid ContainerSpec.DNSConfig: {e}"))?;
    Ok(dns)
}

fn log_driver(d: &Driver) -> Result<MeshLog, String> {
    let opts: Vec<(String, String)> = d.options.clone().unwrap_or_default().into_iter().collect();
    let name = (!d.name.is_empty()).then_some(d.name.as_str());
    MeshLog::parse("TaskTemplate.LogDriver", name, &opts).map(Option::unwrap_or_default)
}

fn mount(m: &Mount) -> Result<MeshMount, String> {
    let kind = match m.kind.as_str() {
        "" | "volume" => MountType::Volume,
        "bind" => MountType::Bind,
        "tmpfs" => MountType::Tmpfs,
        other => {
            return Err(unsupported(
                &format!("ContainerSpec.Mounts.Type {other:?}"),
                ": use volume, bind or tmpfs",
            ));
        }
    };
    if m.consistency
        .as_deref()
        .is_some_and(|c| !c.is_empty() && c != "default")
    {
        return Err(unsupported("ContainerSpec.Mounts.Consistency", ""));
    }
    refuse_set(&m.bind_options, "ContainerSpec.Mounts.BindOptions", "")?;
    let mut out = MeshMount {
        kind,
        source: m.source.clone(),
        target: m.target.clone(),
        read_only: m.read_only.unwrap_or(false),
        ..Default::default()
    };
    if let Some(v) = &m.volume_options {
        if let Some(d) = &v.driver_config
            && (!matches!(d.name.as_str(), "" | "local")
                || d.options.as_ref().is_some_and(|o| !o.is_empty()))
        {
            return Err(unsupported(
                "ContainerSpec.Mounts.VolumeOptions.DriverConfig",
                ": mesh's volumes are local, without options",
            ));
        }
        if v.subpath.as_deref().is_some_and(|p| !p.is_empty()) {
            return Err(unsupported(
                "ContainerSpec.Mounts.VolumeOptions.Subpath",
                "",
            ));
        }
        out.volume_nocopy = v.no_copy.unwrap_or(false);
        out.volume_labels = v.labels.clone().unwrap_or_default();
    }
    if let Some(t) = &m.tmpfs_options {
        refuse_set(&t.options, "ContainerSpec.Mounts.TmpfsOptions.Options", "")?;
        out.tmpfs_size = t
            .size_bytes
            .filter(|n| *n != 0)
            .map(|n| positive(n, "TmpfsOptions.SizeBytes"))
            .transpose()?;
        out.tmpfs_mode = t.mode.filter(|m| *m != 0);
    }
    Ok(out)
}

fn docker_mount(m: &MeshMount) -> Mount {
    Mount {
        kind: m.kind.to_string(),
        source: m.source.clone(),
        target: m.target.clone(),
        read_only: m.read_only.then_some(true),
        volume_options: (m.kind == MountType::Volume).then(|| VolumeOptions {
            no_copy: m.volume_nocopy.then_some(true),
            labels: (!m.volume_labels.is_empty()).then(|| m.volume_labels.clone()),
            ..Default::default()
        }),
        tmpfs_options: (m.kind == MountType::Tmpfs).then(|| TmpfsOptions {
            size_bytes: m.tmpfs_size.map(|n| n as i64),
            mode: m.tmpfs_mode,
            options: None,
        }),
        ..Default::default()
    }
}

/// A stack's service short name (`web` for `infra_web`): the alias `docker stack deploy`
/// gives each service on its networks, and the one mesh's DNS already answers to.
fn stack_alias(s: &MeshSpec) -> Option<&str> {
    let stack = s.labels.get(mesh_api::spec::STACK_LABEL)?;
    s.name
        .strip_prefix(stack.as_str())?
        .strip_prefix('_')
        .filter(|short| !short.is_empty())
}

fn positive(n: i64, field: &str) -> Result<u64, String> {
    u64::try_from(n).map_err(|_| format!("invalid Resources.{field} {n}: negative"))
}

fn file_ref(name: &str, file: Option<&FileTarget>, field: &str) -> Result<FileRef, String> {
    if name.is_empty() {
        return Err(format!("ContainerSpec.{field}: a reference without a name"));
    }
    let f = file.ok_or_else(|| {
        unsupported(
            &format!("ContainerSpec.{field} {name} without File"),
            ": grant it as a file",
        )
    })?;
    let id = |v: &str, what: &str| -> Result<u32, String> {
        if v.is_empty() {
            return Ok(0);
        }
        v.parse()
            .map_err(|_| format!("invalid {what} {v:?} of ContainerSpec.{field} {name}"))
    };
    Ok(FileRef {
        source: name.to_owned(),
        target: f.name.clone(),
        uid: id(&f.uid, "UID")?,
        gid: id(&f.gid, "GID")?,
        mode: f.mode & 0o777,
    })
}

fn health(h: Option<&Healthcheck>) -> Result<Option<HealthCheck>, String> {
    let Some(h) = h else { return Ok(None) };
    if h.start_interval.is_some_and(|n| n != 0) {
        return Err(unsupported("Healthcheck.StartInterval", ""));
    }
    let test = h.test.clone().unwrap_or_default();
    let probe = match test.split_first() {
        None => return Ok(None),
        Some((k, _)) if k == "NONE" => return Ok(None),
        Some((k, rest)) if k == "CMD-SHELL" => {
            Probe::Cmd(vec!["sh".into(), "-c".into(), rest.join(" ")])
        }
        Some((k, rest)) if k == "CMD" && !rest.is_empty() => Probe::Cmd(rest.to_vec()),
        _ => {
            return Err(format!(
                "invalid Healthcheck.Test {test:?}: expected [CMD, …], [CMD-SHELL, …] or [NONE]"
            ));
        }
    };
    let defaults = HealthDefaults::docker();
    Ok(Some(HealthCheck {
        probe,
        interval_ms: nonzero(duration(h.interval, "Healthcheck.Interval")?)
            .unwrap_or(defaults.interval_ms),
        timeout_ms: nonzero(duration(h.timeout, "Healthcheck.Timeout")?)
            .unwrap_or(defaults.timeout_ms),
        retries: h.retries.filter(|r| *r > 0).unwrap_or(defaults.retries),
        start_period_ms: duration(h.start_period, "Healthcheck.StartPeriod")?.unwrap_or(0),
    }))
}

fn nonzero(v: Option<u64>) -> Option<u64> {
    v.filter(|v| *v > 0)
}

/// Docker's HEALTHCHECK defaults, what a zero in the request means.
struct HealthDefaults {
    interval_ms: u64,
    timeout_ms: u64,
    retries: u32,
}

impl HealthDefaults {
    fn docker() -> Self {
        Self {
            interval_ms: 30_000,
            timeout_ms: 30_000,
            retries: 3,
        }
    }
}

fn mode(m: Option<&Mode>) -> Result<ServiceMode, String> {
    let Some(m) = m else {
        return Ok(ServiceMode::Replicated { replicas: 1 });
    };
    let count = |n: u64, field: &str| {
        u32::try_from(n).map_err(|_| format!("invalid Mode.{field} {n}: too many"))
    };
    match (&m.replicated, &m.global, &m.replicated_job, &m.global_job) {
        (Some(r), None, None, None) => Ok(ServiceMode::Replicated {
            replicas: count(r.replicas.unwrap_or(1), "Replicated.Replicas")?,
        }),
        (None, Some(_), None, None) => Ok(ServiceMode::Global),
        (None, None, Some(j), None) => Ok(ServiceMode::ReplicatedJob {
            completions: count(
                j.total_completions.unwrap_or(1),
                "ReplicatedJob.TotalCompletions",
            )?,
            max_concurrent: count(j.max_concurrent.unwrap_or(1), "ReplicatedJob.MaxConcurrent")?,
        }),
        (None, None, None, Some(_)) => Ok(ServiceMode::GlobalJob),
        (None, None, None, None) => Ok(ServiceMode::Replicated { replicas: 1 }),
        _ => Err("Mode has more than one of Replicated, Global, ReplicatedJob, GlobalJob".into()),
    }
}

fn restart(r: &RestartPolicy) -> Result<MeshRestart, String> {
    let condition = match r.condition.as_deref() {
        None | Some("") | Some("any") => RestartCondition::Any,
        Some("on-failure") => RestartCondition::OnFailure,
        Some("none") => RestartCondition::None,
        Some(other) => {
            return Err(format!(
                "invalid RestartPolicy.Condition {other:?}: use none, on-failure or any"
            ));
        }
    };
    Ok(MeshRestart {
        condition,
        delay_ms: duration(r.delay, "RestartPolicy.Delay")?
            .unwrap_or(MeshRestart::default().delay_ms),
        max_attempts: r
            .max_attempts
            .filter(|n| *n > 0)
            .map(|n| u32::try_from(n).map_err(|_| format!("invalid RestartPolicy.MaxAttempts {n}")))
            .transpose()?,
        window_ms: nonzero(duration(r.window, "RestartPolicy.Window")?),
    })
}

fn placement(p: &Placement) -> Result<MeshPlacement, String> {
    refuse_set(
        &p.platforms,
        "Placement.Platforms",
        " (use a node.platform.arch constraint)",
    )?;
    let mut out = MeshPlacement::default();
    for c in p.constraints.iter().flatten() {
        out.constraints.push(c.parse::<Constraint>()?);
    }
    for pref in p.preferences.iter().flatten() {
        let s = pref
            .spread
            .as_ref()
            .ok_or("Placement.Preferences: only Spread preferences exist")?;
        let label = s
            .spread_descriptor
            .strip_prefix("node.labels.")
            .ok_or_else(|| {
                format!(
                    "invalid Spread {:?}: mesh spreads over node labels (node.labels.KEY)",
                    s.spread_descriptor
                )
            })?;
        out.preferences.push(Spread {
            label: label.to_owned(),
        });
    }
    out.max_replicas_per_node = p
        .max_replicas
        .filter(|n| *n > 0)
        .map(|n| u32::try_from(n).map_err(|_| format!("invalid Placement.MaxReplicas {n}")))
        .transpose()?;
    Ok(out)
}

fn update_config(u: &UpdateConfig, field: &str) -> Result<MeshUpdate, String> {
    let mut c = MeshUpdate {
        parallelism: u32::try_from(u.parallelism)
            .map_err(|_| format!("invalid {field}.Parallelism {}", u.parallelism))?,
        ..Default::default()
    };
    if let Some(d) = duration(u.delay, &format!("{field}.Delay"))? {
        c.delay_ms = d;
    }
    if let Some(m) = nonzero(duration(u.monitor, &format!("{field}.Monitor"))?) {
        c.monitor_ms = m;
    }
    c.failure_action = match u.failure_action.as_deref() {
        None | Some("") | Some("pause") => FailureAction::Pause,
        Some("continue") => FailureAction::Continue,
        Some("rollback") => FailureAction::Rollback,
        Some(other) => {
            return Err(format!(
                "invalid {field}.FailureAction {other:?}: use pause, continue or rollback"
            ));
        }
    };
    c.order = match u.order.as_deref() {
        None | Some("") | Some("stop-first") => UpdateOrder::StopFirst,
        Some("start-first") => UpdateOrder::StartFirst,
        Some(other) => {
            return Err(format!(
                "invalid {field}.Order {other:?}: use stop-first or start-first"
            ));
        }
    };
    c.max_failure_ratio = u
        .max_failure_ratio
        .try_into()
        .map_err(|e| format!("invalid {field}.MaxFailureRatio: {e}"))?;
    Ok(c)
}

fn port(p: &PortConfig) -> Result<PortSpec, String> {
    if p.name.as_ref().is_some_and(|n| !n.is_empty()) {
        return Err(unsupported("EndpointSpec.Ports.Name", ""));
    }
    let protocol = match p.protocol.as_deref() {
        None | Some("") | Some("tcp") => Protocol::Tcp,
        Some("udp") => Protocol::Udp,
        Some(other) => {
            return Err(unsupported(
                &format!("EndpointSpec.Ports.Protocol {other:?}"),
                ": use tcp or udp",
            ));
        }
    };
    let target = u16::try_from(p.target_port)
        .ok()
        .filter(|t| *t > 0)
        .ok_or_else(|| format!("invalid EndpointSpec.Ports.TargetPort {}", p.target_port))?;
    let published = p
        .published_port
        .filter(|p| *p > 0)
        .map(|n| u16::try_from(n).map_err(|_| format!("invalid PublishedPort {n}")))
        .transpose()?;
    let mode = match p.publish_mode.as_deref() {
        // Swarm's ingress mode hides the client's address behind the ingress node's: mesh's
        // snat mode is that behaviour (its own ingress keeps the client's address).
        None | Some("") | Some("ingress") => PublishMode::Ingress,
        Some("host") => PublishMode::Host,
        Some(other) => {
            return Err(format!(
                "invalid EndpointSpec.Ports.PublishMode {other:?}: use ingress or host"
            ));
        }
    };
    Ok(PortSpec {
        protocol,
        published,
        target,
        mode,
    })
}

// ---- mesh → Docker ------------------------------------------------------------------------

/// Mesh's spec as Docker's (what `service inspect` shows and `service update` sends back).
pub fn from_mesh(s: &MeshSpec, networks: &dyn NetworkNames) -> ServiceSpec {
    let t = s.task.as_ref();
    ServiceSpec {
        name: s.name.clone(),
        labels: Some(s.labels.clone()),
        task_template: TaskSpec {
            container_spec: t.map(container_spec),
            resources: t.map(|t| ResourceRequirements {
                limits: Some(Limit {
                    nano_cpus: t.resources.limits.nano_cpus as i64,
                    memory_bytes: t.resources.limits.memory_bytes as i64,
                    pids: t.resources.limits.pids as i64,
                }),
                reservations: Some(Reservation {
                    nano_cpus: t.resources.reservations.nano_cpus as i64,
                    memory_bytes: t.resources.reservations.memory_bytes as i64,
                    generic_resources: None,
                }),
            }),
            restart_policy: Some(RestartPolicy {
                condition: Some(s.restart.condition.to_string()),
                delay: Some(ns(s.restart.delay_ms)),
                max_attempts: Some(s.restart.max_attempts.unwrap_or(0).into()),
                window: s.restart.window_ms.map(ns),
            }),
            placement: Some(Placement {
                constraints: (!s.placement.constraints.is_empty()).then(|| {
                    s.placement
                        .constraints
                        .iter()
                        .map(ToString::to_string)
                        .collect()
                }),
                preferences: (!s.placement.preferences.is_empty()).then(|| {
                    s.placement
                        .preferences
                        .iter()
                        .map(|p| PlacementPreference {
                            spread: Some(SpreadOver {
                                spread_descriptor: format!("node.labels.{}", p.label),
                            }),
                        })
                        .collect()
                }),
                max_replicas: s.placement.max_replicas_per_node.map(u64::from),
                platforms: None,
            }),
            networks: (!s.network.is_empty()).then(|| {
                s.attachments()
                    .into_iter()
                    .map(|a| {
                        let aliases: Vec<String> = stack_alias(s)
                            .map(str::to_owned)
                            .into_iter()
                            .chain(a.aliases)
                            .collect();
                        NetworkAttachment {
                            target: networks.network_id(&a.target),
                            aliases: (!aliases.is_empty()).then_some(aliases),
                            driver_opts: None,
                        }
                    })
                    .collect()
            }),
            log_driver: t.filter(|t| !t.run.log.is_empty()).map(|t| Driver {
                name: t.run.log.name.clone(),
                options: Some(t.run.log.options().into_iter().collect()),
            }),
            force_update: Some(s.force_update),
            runtime: Some("container".into()),
            ..Default::default()
        },
        mode: Some(match s.mode {
            ServiceMode::Replicated { replicas } => Mode {
                replicated: Some(Replicated {
                    replicas: Some(replicas.into()),
                }),
                ..Default::default()
            },
            ServiceMode::Global => Mode {
                global: Some(Empty {}),
                ..Default::default()
            },
            ServiceMode::ReplicatedJob {
                completions,
                max_concurrent,
            } => Mode {
                replicated_job: Some(ReplicatedJob {
                    max_concurrent: Some(max_concurrent.into()),
                    total_completions: Some(completions.into()),
                }),
                ..Default::default()
            },
            ServiceMode::GlobalJob => Mode {
                global_job: Some(Empty {}),
                ..Default::default()
            },
        }),
        update_config: (!s.mode.is_job()).then(|| docker_update(&s.update)),
        rollback_config: (!s.mode.is_job()).then(|| docker_update(&s.rollback)),
        networks: None,
        endpoint_spec: Some(EndpointSpec {
            mode: Some(s.endpoint_mode.to_string()),
            ports: (!s.ports.is_empty())
                .then(|| s.ports.iter().map(docker_port).collect::<Vec<_>>()),
        }),
    }
}

fn container_spec(t: &TaskTemplate) -> ContainerSpec {
    let non_empty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
    ContainerSpec {
        image: t.image.clone(),
        labels: (!t.run.container_labels.is_empty()).then(|| t.run.container_labels.clone()),
        command: t.run.entrypoint.clone(),
        args: non_empty(&t.command),
        hostname: t.hostname.clone(),
        env: (!t.env.is_empty()).then(|| t.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        dir: t.run.workdir.clone(),
        user: t.run.user.clone(),
        init: t.security.init.then_some(true),
        read_only: t.security.read_only.then_some(true),
        stop_signal: t.run.stop_signal.clone(),
        stop_grace_period: Some(ns(t.stop_grace_ms)),
        healthcheck: t.health.as_ref().and_then(docker_health),
        secrets: (!t.secrets.is_empty()).then(|| {
            t.secrets
                .iter()
                .map(|r| SecretReference {
                    file: Some(file_target(r)),
                    secret_id: super::objects::object_id("secret", &r.source),
                    secret_name: r.source.clone(),
                })
                .collect()
        }),
        configs: (!t.configs.is_empty()).then(|| {
            t.configs
                .iter()
                .map(|r| ConfigReference {
                    file: Some(file_target(r)),
                    runtime: None,
                    config_id: super::objects::object_id("config", &r.source),
                    config_name: r.source.clone(),
                })
                .collect()
        }),
        isolation: Some("default".into()),
        sysctls: (!t.security.sysctls.is_empty()).then(|| t.security.sysctls.clone()),
        capability_add: non_empty(&t.security.cap_add),
        capability_drop: non_empty(&t.security.cap_drop),
        mounts: (!t.mounts.is_empty()).then(|| t.mounts.iter().map(docker_mount).collect()),
        hosts: (!t.run.hosts.is_empty()).then(|| {
            t.run
                .hosts
                .iter()
                .map(|h| format!("{} {}", h.ip, h.host))
                .collect()
        }),
        dns_config: (!t.run.dns.is_empty()).then(|| DnsConfig {
            nameservers: Some(
                t.run
                    .dns
                    .nameservers
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            ),
            search: Some(t.run.dns.search.clone()),
            options: Some(t.run.dns.options.clone()),
        }),
        ulimits: (!t.security.ulimits.is_empty()).then(|| {
            t.security
                .ulimits
                .iter()
                .map(|u| Ulimit {
                    name: u.name.clone(),
                    soft: u.soft as i64,
                    hard: u.hard as i64,
                })
                .collect()
        }),
        ..Default::default()
    }
}

fn file_target(r: &FileRef) -> FileTarget {
    FileTarget {
        name: r.target.clone(),
        uid: r.uid.to_string(),
        gid: r.gid.to_string(),
        mode: r.mode,
    }
}

/// Docker has command probes only: mesh's HTTP and TCP probes (set with meshctl) are not
/// shown, and [`keep_mesh_only`] keeps them across a docker update.
fn docker_health(h: &HealthCheck) -> Option<Healthcheck> {
    let test = match &h.probe {
        Probe::Cmd(c) => match c.as_slice() {
            [sh, dash_c, script] if sh == "sh" && dash_c == "-c" => {
                vec!["CMD-SHELL".to_owned(), script.clone()]
            }
            _ => std::iter::once("CMD".to_owned())
                .chain(c.iter().cloned())
                .collect(),
        },
        Probe::Http { .. } | Probe::Tcp { .. } => return None,
    };
    Some(Healthcheck {
        test: Some(test),
        interval: Some(ns(h.interval_ms)),
        timeout: Some(ns(h.timeout_ms)),
        retries: Some(h.retries),
        start_period: Some(ns(h.start_period_ms)),
        start_interval: None,
    })
}

fn docker_update(u: &MeshUpdate) -> UpdateConfig {
    UpdateConfig {
        parallelism: u.parallelism.into(),
        delay: Some(ns(u.delay_ms)),
        failure_action: Some(u.failure_action.to_string()),
        monitor: Some(ns(u.monitor_ms)),
        max_failure_ratio: u.max_failure_ratio.get(),
        order: Some(u.order.to_string()),
    }
}

pub fn docker_port(p: &PortSpec) -> PortConfig {
    PortConfig {
        name: None,
        protocol: Some(p.protocol.to_string()),
        target_port: p.target.into(),
        published_port: p.published.map(u32::from),
        publish_mode: Some(match p.mode {
            PublishMode::Host => "host".into(),
            PublishMode::Ingress | PublishMode::Snat => "ingress".into(),
        }),
    }
}

/// What a docker update cannot express but a meshctl-made service may have: kept from the
/// current spec instead of being dropped by a client that never saw it.
pub fn keep_mesh_only(new: &mut MeshSpec, current: &MeshSpec) {
    // Docker's spec has no field for them: they change only with X-Registry-Auth.
    new.registry_auth = current.registry_auth.clone();
    // Older clients (docker 20.10's stack deploy) list a service's networks in Go's map
    // order, which changes between runs: the same networks in another order are no change,
    // and must not make another network the first (eth0) and roll every task.
    let key = |s: &MeshSpec| {
        let mut a: Vec<(String, Vec<String>)> = s
            .attachments()
            .into_iter()
            .map(|a| (a.target, a.aliases))
            .collect();
        a.sort();
        a
    };
    if key(new) == key(current) {
        new.network = current.network.clone();
        new.aliases = current.aliases.clone();
        new.networks = current
            .networks
            .iter()
            .map(|a| MeshAttachment {
                vip: None,
                ..a.clone()
            })
            .collect();
    }
    if let (Some(n), Some(c)) = (new.task.as_mut(), current.task.as_ref()) {
        if n.health.is_none()
            && c.health
                .as_ref()
                .is_some_and(|h| !matches!(h.probe, Probe::Cmd(_)))
        {
            n.health = c.health.clone();
        }
        // The driver of a meshctl process service has no image: a docker client cannot
        // name one, and `service update --replicas` must not turn it into a container.
        if c.image.is_none() && n.image.as_deref() == Some(PROCESS_IMAGE) {
            n.image = None;
            n.command = c.command.clone();
        }
    }
    for (n, c) in new.ports.iter_mut().zip(&current.ports) {
        // Docker has no snat mode: its "ingress" of a snat port stays snat.
        if c.mode == PublishMode::Snat && n.mode == PublishMode::Ingress {
            n.mode = PublishMode::Snat;
        }
    }
}

/// What a process service (run without an image) shows as its image.
pub const PROCESS_IMAGE: &str = "mesh/process";

/// [`from_mesh`] with process services shown under [`PROCESS_IMAGE`].
pub fn shown(s: &MeshSpec, networks: &dyn NetworkNames) -> ServiceSpec {
    let mut d = from_mesh(s, networks);
    if let (Some(c), Some(t)) = (d.task_template.container_spec.as_mut(), s.task.as_ref())
        && t.image.is_none()
    {
        c.image = Some(PROCESS_IMAGE.into());
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nets;
    impl NetworkNames for Nets {
        fn network_name(&self, id: &str) -> Option<String> {
            match id {
                "netid1" | "app" => Some("app".into()),
                "netid2" | "back" => Some("back".into()),
                _ => None,
            }
        }
        fn network_id(&self, name: &str) -> String {
            match name {
                "app" => "netid1".into(),
                "back" => "netid2".into(),
                other => panic!("no network {other}"),
            }
        }
    }

    fn decode(json: &str) -> Result<MeshSpec, String> {
        let d: ServiceSpec = serde_json::from_str(json).map_err(|e| e.to_string())?;
        to_mesh(&d, &Nets)
    }

    /// What docker 20.10's `service create` sends, zero values included.
    const CLI_CREATE: &str = r#"{
        "Name": "my-web", "Labels": {"a": "b"},
        "TaskTemplate": {
            "ContainerSpec": {"Image": "nginx:latest", "Labels": null, "Args": ["-g", "daemon off;"],
                "Env": ["A=1", "B=x=y"], "Dir": "/srv", "User": "www", "Init": null,
                "Privileges": {"CredentialSpec": null, "SELinuxContext": null},
                "StopGracePeriod": 5000000000, "Isolation": "default", "Mounts": null,
                "Healthcheck": {"Test": ["CMD-SHELL", "wget -q localhost"], "Interval": 2000000000,
                    "Timeout": 1000000000, "Retries": 2, "StartPeriod": 0},
                "Secrets": [{"File": {"Name": "db", "UID": "0", "GID": "0", "Mode": 292},
                    "SecretID": "s1", "SecretName": "db_password"}],
                "DNSConfig": {}, "Hosts": null, "Groups": null},
            "Resources": {"Limits": {"MemoryBytes": 67108864}, "Reservations": {"NanoCPUs": 500000000}},
            "RestartPolicy": {"Condition": "on-failure", "Delay": 1000000000, "MaxAttempts": 3},
            "Placement": {"Constraints": ["node.role==manager"],
                "Preferences": [{"Spread": {"SpreadDescriptor": "node.labels.zone"}}], "MaxReplicas": 2},
            "Networks": [{"Target": "netid1"}], "ForceUpdate": 0, "Runtime": "container",
            "LogDriver": null
        },
        "Mode": {"Replicated": {"Replicas": 3}},
        "UpdateConfig": {"Parallelism": 2, "Delay": 10000000000, "FailureAction": "rollback",
            "Monitor": 5000000000, "MaxFailureRatio": 0.5, "Order": "start-first"},
        "RollbackConfig": {"Parallelism": 1, "FailureAction": "pause", "Monitor": 5000000000,
            "MaxFailureRatio": 0, "Order": "stop-first"},
        "EndpointSpec": {"Mode": "vip", "Ports": [{"Protocol": "tcp", "TargetPort": 80,
            "PublishedPort": 8080, "PublishMode": "ingress"}]}
    }"#;

    #[test]
    fn the_clients_create_maps_to_mesh() {
        let s = decode(CLI_CREATE).unwrap();
        assert_eq!(s.name, "my-web");
        assert_eq!(s.network, "app");
        assert_eq!(s.mode, ServiceMode::Replicated { replicas: 3 });
        let t = s.task.as_ref().unwrap();
        assert_eq!(t.image.as_deref(), Some("nginx:latest"));
        assert_eq!(t.command, ["-g", "daemon off;"]);
        assert_eq!(
            t.env,
            [("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!(t.run.workdir.as_deref(), Some("/srv"));
        assert_eq!(t.stop_grace_ms, 5_000);
        assert_eq!(
            t.health.as_ref().unwrap().probe,
            Probe::Cmd(vec!["sh".into(), "-c".into(), "wget -q localhost".into()])
        );
        assert_eq!(t.secrets[0].source, "db_password");
        assert_eq!(t.secrets[0].target, "db");
        assert_eq!(t.secrets[0].mode, 0o444);
        assert_eq!(t.resources.limits.memory_bytes, 64 << 20);
        assert_eq!(t.resources.reservations.nano_cpus, 500_000_000);
        assert_eq!(s.restart.condition, RestartCondition::OnFailure);
        assert_eq!(s.restart.max_attempts, Some(3));
        assert_eq!(s.placement.constraints[0].to_string(), "node.role==manager");
        assert_eq!(s.placement.preferences[0].label, "zone");
        assert_eq!(s.placement.max_replicas_per_node, Some(2));
        assert_eq!(s.update.parallelism, 2);
        assert_eq!(s.update.delay_ms, 10_000);
        assert_eq!(s.update.order, UpdateOrder::StartFirst);
        assert_eq!(s.update.failure_action, FailureAction::Rollback);
        assert_eq!(
            s.ports,
            [PortSpec {
                protocol: Protocol::Tcp,
                published: Some(8080),
                target: 80,
                mode: PublishMode::Ingress
            }]
        );
    }

    #[test]
    fn a_spec_round_trips_through_dockers_shape() {
        let mesh = decode(CLI_CREATE).unwrap();
        let docker = from_mesh(&mesh, &Nets);
        let json = serde_json::to_string(&docker).unwrap();
        let again = decode(&json).unwrap();
        assert_eq!(again, mesh);
        // And Docker's shape is stable too: what inspect shows, update sends back unchanged.
        assert_eq!(from_mesh(&again, &Nets), docker);
    }

    #[test]
    fn modes_round_trip() {
        for m in [
            ServiceMode::Global,
            ServiceMode::GlobalJob,
            ServiceMode::ReplicatedJob {
                completions: 5,
                max_concurrent: 2,
            },
        ] {
            let mut s = decode(CLI_CREATE).unwrap();
            s.mode = m;
            if m.is_job() {
                s.update = Default::default();
                s.rollback = Default::default();
            }
            let json = serde_json::to_string(&from_mesh(&s, &Nets)).unwrap();
            assert_eq!(decode(&json).unwrap().mode, m, "{json}");
        }
    }

    #[test]
    fn unsupported_fields_are_refused_by_name() {
        let with = |from: &str, to: &str| {
            assert!(CLI_CREATE.contains(from), "{from}");
            decode(&CLI_CREATE.replace(from, to)).unwrap_err()
        };
        let e = with(
            r#""Mounts": null"#,
            r#""Mounts": [{"Type": "npipe", "Source": "x", "Target": "/x"}]"#,
        );
        assert!(e.contains("ContainerSpec.Mounts.Type \"npipe\""), "{e}");
        let e = with(
            r#""Mounts": null"#,
            r#""Mounts": [{"Type": "volume", "Source": "d", "Target": "/d",
                "VolumeOptions": {"DriverConfig": {"Name": "nfs"}}}]"#,
        );
        assert!(e.contains("DriverConfig"), "{e}");
        let e = with(
            r#""Mounts": null"#,
            r#""Mounts": [{"Type": "bind", "Source": "relative", "Target": "/d"}]"#,
        );
        assert!(e.contains("ContainerSpec.Mounts"), "{e}");
        let e = with(r#""LogDriver": null"#, r#""LogDriver": {"Name": "syslog"}"#);
        assert!(e.contains("TaskTemplate.LogDriver"), "{e}");
        let e = with(r#""Hosts": null"#, r#""Hosts": ["db.local"]"#);
        assert!(e.contains("ContainerSpec.Hosts"), "{e}");
        let e = with(
            r#""DNSConfig": {}"#,
            r#""DNSConfig": {"Nameservers": ["resolver"]}"#,
        );
        assert!(e.contains("DNSConfig.Nameservers"), "{e}");
        // A stack's service may carry its short name, as `docker stack deploy` sends it.
        let stacked = CLI_CREATE
            .replace(r#""Name": "my-web""#, r#""Name": "infra_web""#)
            .replace(
                r#""Labels": {"a": "b"}"#,
                r#""Labels": {"com.docker.stack.namespace": "infra"}"#,
            );
        let ok = decode(&stacked.replace(
            r#""Networks": [{"Target": "netid1"}]"#,
            r#""Networks": [{"Target": "netid1", "Aliases": ["web"]}]"#,
        ))
        .unwrap();
        let back = from_mesh(&ok, &Nets);
        let nets = back.task_template.networks.unwrap();
        assert_eq!(nets[0].aliases.as_deref(), Some(&["web".to_owned()][..]));
        let e = with(r#""Protocol": "tcp""#, r#""Protocol": "sctp""#);
        assert!(e.contains("sctp"), "{e}");
    }

    /// What `docker stack deploy` sends for a vote-app worker: two networks with aliases, a
    /// named volume and a tmpfs, extra hosts, DNS settings and log rotation. All of it maps,
    /// and inspect shows it back as the client sent it.
    #[test]
    fn networks_mounts_hosts_dns_and_logging_map_both_ways() {
        let json = CLI_CREATE
            .replace(r#""Name": "my-web""#, r#""Name": "vote_worker""#)
            .replace(
                r#""Labels": {"a": "b"}"#,
                r#""Labels": {"com.docker.stack.namespace": "vote"}"#,
            )
            .replace(
                r#""Networks": [{"Target": "netid1"}]"#,
                r#""Networks": [{"Target": "netid1", "Aliases": ["worker"]},
                    {"Target": "back", "Aliases": ["worker", "jobs"]}]"#,
            )
            .replace(
                r#""Mounts": null"#,
                r#""Mounts": [{"Type": "volume", "Source": "vote_data", "Target": "/data",
                    "VolumeOptions": {"Labels": {"com.docker.stack.namespace": "vote"}}},
                    {"Type": "tmpfs", "Target": "/run/x", "TmpfsOptions": {"SizeBytes": 1048576}}]"#,
            )
            .replace(r#""Hosts": null"#, r#""Hosts": ["10.0.0.5 db.local db"]"#)
            .replace(
                r#""DNSConfig": {}"#,
                r#""DNSConfig": {"Nameservers": ["10.0.0.53"], "Search": ["corp"], "Options": ["ndots:2"]}"#,
            )
            .replace(
                r#""LogDriver": null"#,
                r#""LogDriver": {"Name": "json-file", "Options": {"max-size": "10m", "max-file": "3"}}"#,
            );
        let s = decode(&json).unwrap();
        assert_eq!(s.network, "app");
        assert!(
            s.aliases.is_empty(),
            "the stack's short name is not an alias"
        );
        assert_eq!(s.networks.len(), 1);
        assert_eq!(s.networks[0].target, "back");
        assert_eq!(s.networks[0].aliases, ["jobs"]);
        let t = s.task.as_ref().unwrap();
        assert_eq!(t.mounts.len(), 2);
        assert_eq!(t.mounts[0].kind, MountType::Volume);
        assert_eq!(t.mounts[0].source, "vote_data");
        assert_eq!(t.mounts[1].tmpfs_size, Some(1 << 20));
        let hosts: Vec<String> = t.run.hosts.iter().map(ToString::to_string).collect();
        assert_eq!(hosts, ["db.local:10.0.0.5", "db:10.0.0.5"]);
        assert_eq!(t.run.dns.nameservers[0].to_string(), "10.0.0.53");
        assert_eq!(t.run.dns.search, ["corp"]);
        assert_eq!(t.run.log.max_size, Some(10 << 20));
        assert_eq!(t.run.log.max_file, Some(3));

        let docker = from_mesh(&s, &Nets);
        let nets = docker.task_template.networks.as_ref().unwrap();
        assert_eq!(nets[1].target, "netid2");
        assert_eq!(
            nets[1].aliases.as_deref(),
            Some(&["worker".to_owned(), "jobs".to_owned()][..])
        );
        let again = decode(&serde_json::to_string(&docker).unwrap()).unwrap();
        assert_eq!(again, s);
    }

    /// docker 20.10 lists a stack service's networks in Go's map order: the same networks
    /// in another order keep the service's own order (its first network stays eth0).
    #[test]
    fn networks_in_another_order_are_no_change() {
        let current = decode(&CLI_CREATE.replace(
            r#""Networks": [{"Target": "netid1"}]"#,
            r#""Networks": [{"Target": "netid1"}, {"Target": "back", "Aliases": ["jobs"]}]"#,
        ))
        .unwrap();
        let mut swapped = decode(&CLI_CREATE.replace(
            r#""Networks": [{"Target": "netid1"}]"#,
            r#""Networks": [{"Target": "back", "Aliases": ["jobs"]}, {"Target": "netid1"}]"#,
        ))
        .unwrap();
        assert_eq!(swapped.network, "back");
        keep_mesh_only(&mut swapped, &current);
        assert_eq!(swapped, current);
        // Another set of networks is a change, kept as sent.
        let mut other = decode(CLI_CREATE).unwrap();
        keep_mesh_only(&mut other, &current);
        assert!(other.networks.is_empty());
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused() {
        let e = decode(&CLI_CREATE.replace(r#""Dir": "/srv""#, r#""Dir": "/srv", "Bogus": 1"#))
            .unwrap_err();
        assert!(e.contains("unknown field `Bogus`"), "{e}");
        let e =
            decode(&CLI_CREATE.replace(r#""Replicas": 3"#, r#""Replicas": "three""#)).unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
        let e = decode(&CLI_CREATE.replace(r#""Replicas": 3"#, r#""Replicas": -1"#)).unwrap_err();
        assert!(e.contains("invalid value"), "{e}");
        let e = decode(&CLI_CREATE.replace(r#""A=1", "#, r#""A", "#)).unwrap_err();
        assert!(e.contains("KEY=VALUE"), "{e}");
        let e = decode(&CLI_CREATE.replace(r#""Target": "netid1""#, r#""Target": "nope""#))
            .unwrap_err();
        assert!(e.contains("network nope not found"), "{e}");
        let e = decode(&CLI_CREATE.replace("node.role==manager", "node.role=manager")).unwrap_err();
        assert!(e.contains("invalid constraint"), "{e}");
    }

    #[test]
    fn decoding_never_panics_on_mangled_input() {
        // A small fuzz: every prefix, and every single-byte change to a few bytes, decodes
        // to a value or an error.
        let bytes = CLI_CREATE.as_bytes();
        for cut in 0..bytes.len() {
            let _ =
                serde_json::from_slice::<ServiceSpec>(&bytes[..cut]).map(|d| to_mesh(&d, &Nets));
        }
        for i in (0..bytes.len()).step_by(7) {
            for b in [b'0', b'"', b'{', b'-', b'9', b'x'] {
                let mut m = bytes.to_vec();
                m[i] = b;
                let _ = serde_json::from_slice::<ServiceSpec>(&m).map(|d| to_mesh(&d, &Nets));
            }
        }
    }
}
