//! Compose files for `meshctl stack deploy`: the v3 keys Swarm honours, mapped onto mesh's
//! objects, named `<stack>_<name>` and labelled with the stack.
//!
//! Parsed with serde_yaml into a generic YAML tree and walked by hand rather than with a
//! typed compose crate: what a stack deploy must do per key is Swarm's three-way choice —
//! map it, ignore it with one warning line, or reject it — and walking the tree lets every
//! key of the file land in exactly one of those, including keys a typed model would silently
//! drop. YAML syntax errors carry the line and column; semantic errors name the path
//! (`services.web.ports[1]`).
//!
//! Everything is checked here, before the agent is asked anything: a bad file deploys
//! nothing.

use std::{collections::BTreeMap, path::Path};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use serde_yaml::{Mapping, Value};

use mesh_api::{
    spec::{
        EndpointMode, FileRef, HealthChange, Limits, MAX_FILE_OBJECT, MAX_HEALTH_RETRIES, Mount,
        NetworkAttachment, PortSpec, ProbeChange, Resources, RestartChange, RunOptions,
        STACK_LABEL, Security, ServiceSpec, TaskResources, TaskTemplate, Ulimit,
        UpdateConfigChange,
    },
    v1::{ServiceCreate, StackDeploy, StackFile, StackNetwork},
};
use mesh_planner::ServiceMode;

use crate::flags;

mod interpolate;
mod merge;
mod volumes;

/// The parsed stack and the warnings (one line per ignored key).
pub struct Parsed {
    pub deploy: StackDeploy,
    pub warnings: Vec<String>,
}

/// Keys Swarm ignores in `stack deploy` (it warns "Ignoring unsupported options").
const IGNORED_SERVICE_KEYS: &[&str] = &[
    "build",
    "cgroup_parent",
    "container_name",
    "depends_on",
    "devices",
    "external_links",
    "links",
    "network_mode",
    "restart",
    "security_opt",
    "userns_mode",
    "privileged",
    "tty",
    "stdin_open",
    "expose",
];

fn key_str(k: &Value, at: &str) -> Result<String, String> {
    k.as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{at}: keys must be strings"))
}

fn map<'a>(v: &'a Value, at: &str) -> Result<&'a Mapping, String> {
    v.as_mapping()
        .ok_or_else(|| format!("{at}: expected a mapping"))
}

fn string(v: &Value, at: &str) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(format!("{at}: expected a string")),
    }
}

fn strings(v: &Value, at: &str) -> Result<Vec<String>, String> {
    match v {
        Value::Sequence(s) => s
            .iter()
            .enumerate()
            .map(|(i, v)| string(v, &format!("{at}[{i}]")))
            .collect(),
        Value::String(s) => Ok(vec![s.clone()]),
        _ => Err(format!("{at}: expected a list of strings")),
    }
}

/// `KEY=VALUE` lists or `KEY: VALUE` maps (environment, labels).
fn list_or_map(v: &Value, at: &str) -> Result<Vec<(String, String)>, String> {
    match v {
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                let k = key_str(k, at)?;
                let v = if v.is_null() {
                    String::new()
                } else {
                    string(v, &format!("{at}.{k}"))?
                };
                Ok((k, v))
            })
            .collect(),
        Value::Sequence(_) => strings(v, at)?
            .into_iter()
            .map(|e| {
                let (k, v) = e.split_once('=').unwrap_or((&e, ""));
                Ok((k.to_owned(), v.to_owned()))
            })
            .collect(),
        _ => Err(format!("{at}: expected a list of KEY=VALUE or a mapping")),
    }
}

/// One `-c` file: its name (for errors) and its text.
pub struct Source {
    pub name: String,
    pub text: String,
}

/// Reads the `-c` files in order: each has its anchors and `<<` merge keys resolved and its
/// variables substituted from `env`, then they are merged as Docker merges them. `dir`
/// resolves `file:` paths of secrets and configs (the first file's directory, as Docker's).
pub fn load(
    stack: &str,
    sources: &[Source],
    dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    prune: bool,
) -> Result<Parsed, String> {
    let mut warnings = Vec::new();
    let mut root: Option<Value> = None;
    for s in sources {
        let in_file = |e: String| format!("{}: {e}", s.name);
        let mut v = read_yaml(&s.text).map_err(in_file)?;
        v.apply_merge()
            .map_err(|e| in_file(format!("not a valid compose file: {e}")))?;
        interpolate::values(&mut v, "", env, &mut warnings).map_err(in_file)?;
        root = Some(match root {
            None => v,
            Some(base) => merge::merge(base, v, &[]),
        });
    }
    let root = root.ok_or("no compose file: pass -c FILE")?;
    let mut parsed = from_tree(stack, &root, dir, prune)?;
    warnings.append(&mut parsed.warnings);
    parsed.warnings = warnings;
    Ok(parsed)
}

/// The stack a merged compose tree describes.
fn from_tree(stack: &str, root: &Value, dir: &Path, prune: bool) -> Result<Parsed, String> {
    let mut s = Stack::new(stack, prune);
    s.dir = dir.to_owned();
    let mut services = None;
    for (k, v) in map(root, "the file")? {
        let k = key_str(k, "the file")?;
        match k.as_str() {
            "version" | "name" => {}
            k if k.starts_with("x-") => {}
            "services" => services = Some(v),
            "networks" => s.networks(v)?,
            "secrets" | "configs" => s.file_objects(&k, v, dir)?,
            "volumes" => s.volumes(v)?,
            other => return Err(format!("the file: unknown top-level key {other:?}")),
        }
    }
    let services = services.ok_or("the file has no services")?;
    for (n, spec) in map(services, "services")? {
        let n = key_str(n, "services")?;
        let service = s.service(&n, spec)?;
        s.deploy.services.push(service);
    }
    Ok(Parsed {
        deploy: s.deploy,
        warnings: s.warnings,
    })
}

fn read_yaml(text: &str) -> Result<Value, String> {
    serde_yaml::from_str(text).map_err(|e| match e.location() {
        Some(l) => format!(
            "line {}, column {}: not a valid compose file: {e}",
            l.line(),
            l.column()
        ),
        None => format!("not a valid compose file: {e}"),
    })
}

/// A stack being read: its objects so far, and the names services refer to them by.
struct Stack {
    name: String,
    labels: BTreeMap<String, String>,
    deploy: StackDeploy,
    warnings: Vec<String>,
    /// The file's names of networks, secrets and configs, to the cluster's.
    networks: BTreeMap<String, String>,
    secrets: BTreeMap<String, String>,
    configs: BTreeMap<String, String>,
    /// The file's volumes: their names in the cluster and their labels.
    volumes: BTreeMap<String, volumes::StackVolume>,
    /// Published ports so far, and the service that publishes each.
    published: BTreeMap<(String, u16), String>,
    /// The compose file's directory: `env_file` paths and relative bind sources start there.
    dir: std::path::PathBuf,
}

/// A service's keys as read, before they become its spec: some need others (a health check's
/// HTTP port is the first target port; replicas only go with replicated mode).
#[derive(Default)]
struct ServiceDraft {
    spec: ServiceSpec,
    command: Vec<String>,
    env: Vec<(String, String)>,
    /// From `env_file`, in order; `environment` wins over them.
    env_files: Vec<(String, String)>,
    hostname: Option<String>,
    image: Option<String>,
    stop_grace_ms: Option<u64>,
    secrets: Vec<FileRef>,
    configs: Vec<FileRef>,
    health: HealthChange,
    mode: Option<(String, String)>,
    replicas: Option<(u32, String)>,
    run: RunOptions,
    resources: TaskResources,
    security: Security,
    mounts: Vec<Mount>,
}

impl Stack {
    fn new(name: &str, prune: bool) -> Self {
        Self {
            name: name.to_owned(),
            labels: BTreeMap::from([(STACK_LABEL.to_owned(), name.to_owned())]),
            deploy: StackDeploy {
                name: name.to_owned(),
                prune,
                ..Default::default()
            },
            warnings: Vec::new(),
            networks: BTreeMap::new(),
            secrets: BTreeMap::new(),
            configs: BTreeMap::new(),
            volumes: BTreeMap::new(),
            published: BTreeMap::new(),
            dir: std::path::PathBuf::from("."),
        }
    }

    /// `<stack>_<name>`, as Swarm names a stack's objects.
    fn full(&self, n: &str) -> String {
        format!("{}_{n}", self.name)
    }

    fn networks(&mut self, v: &Value) -> Result<(), String> {
        for (n, spec) in map(v, "networks")? {
            let n = key_str(n, "networks")?;
            let at = format!("networks.{n}");
            let mut net = StackNetwork {
                name: self.full(&n),
                subnet: None,
                labels: self.labels.clone(),
            };
            let mut external = false;
            if !spec.is_null() {
                for (k, v) in map(spec, &at)? {
                    let k = key_str(k, &at)?;
                    let here = format!("{at}.{k}");
                    match k.as_str() {
                        "driver" => {
                            let d = string(v, &here)?;
                            if d != "overlay" {
                                return Err(format!(
                                    "{here}: {d:?} is not supported: mesh networks are overlays"
                                ));
                            }
                        }
                        "external" => external = v.as_bool().unwrap_or(true),
                        "name" => net.name = string(v, &here)?,
                        "labels" => net.labels.extend(list_or_map(v, &here)?),
                        "ipam" => net.subnet = ipam_subnet(v, &here)?,
                        "attachable" | "driver_opts" | "internal" | "enable_ipv6" => self
                            .warnings
                            .push(format!("Ignoring unsupported option {here}")),
                        other => return Err(format!("{at}: unknown key {other:?}")),
                    }
                }
            }
            self.networks.insert(n, net.name.clone());
            if !external {
                self.deploy.networks.push(net);
            }
        }
        Ok(())
    }

    /// Top-level `secrets:` or `configs:`: each read from its file (or external).
    fn file_objects(&mut self, kind: &str, v: &Value, dir: &Path) -> Result<(), String> {
        let secret = kind == "secrets";
        for (n, spec) in map(v, kind)? {
            let n = key_str(n, kind)?;
            let at = format!("{kind}.{n}");
            let mut name = self.full(&n);
            let mut file = None;
            let mut external = false;
            let mut labels = self.labels.clone();
            for (k, v) in map(spec, &at)? {
                match key_str(k, &at)?.as_str() {
                    "file" => file = Some(string(v, &format!("{at}.file"))?),
                    "external" => external = v.as_bool().unwrap_or(true),
                    "name" => name = string(v, &format!("{at}.name"))?,
                    "labels" => labels.extend(list_or_map(v, &format!("{at}.labels"))?),
                    other => {
                        return Err(format!(
                            "{at}: unknown or unsupported key {other:?} (use file: or external:)"
                        ));
                    }
                }
            }
            let names = if secret {
                &mut self.secrets
            } else {
                &mut self.configs
            };
            names.insert(n.clone(), name.clone());
            if external {
                continue;
            }
            let file = file.ok_or_else(|| format!("{at}: give file: PATH or external: true"))?;
            let obj = StackFile {
                name,
                data: BASE64.encode(&*read_object(&dir.join(&file), &at, secret)?),
                labels,
            };
            if secret {
                self.deploy.secrets.push(obj);
            } else {
                self.deploy.configs.push(obj);
            }
        }
        Ok(())
    }

    /// One entry of `services:`, as the spec the agent is asked to run.
    fn service(&mut self, n: &str, v: &Value) -> Result<ServiceCreate, String> {
        let at = format!("services.{n}");
        let mut d = ServiceDraft::default();
        d.spec.name = self.full(n);
        d.spec.labels = self.labels.clone();
        let mut networks = Vec::new();
        for (k, v) in map(v, &at)? {
            let k = key_str(k, &at)?;
            let here = format!("{at}.{k}");
            match k.as_str() {
                "image" => d.image = Some(string(v, &here)?),
                "command" => d.command = command(v, &here)?,
                "environment" => d.env = list_or_map(v, &here)?,
                "hostname" => d.hostname = Some(string(v, &here)?),
                "env_file" => d.env_files = env_files(v, &here, &self.dir)?,
                "extra_hosts" => d.run.hosts = extra_hosts(v, &here)?,
                "dns" => d.run.dns.nameservers = flags::nameservers(&here, &strings(v, &here)?)?,
                "dns_search" => {
                    d.run.dns.search = flags::search_domains(&here, &strings(v, &here)?)?
                }
                "dns_opt" => d.run.dns.options = flags::dns_options(&here, &strings(v, &here)?)?,
                "logging" => d.run.log = logging(v, &here)?,
                "entrypoint" => d.run.entrypoint = Some(command(v, &here)?),
                "user" => d.run.user = Some(string(v, &here)?),
                "working_dir" => d.run.workdir = Some(string(v, &here)?),
                "stop_signal" => d.run.stop_signal = Some(string(v, &here)?),
                // Service-level labels are the containers' (deploy.labels are the service's).
                "labels" => d.run.container_labels.extend(list_or_map(v, &here)?),
                "stop_grace_period" => {
                    d.stop_grace_ms = Some(flags::duration_ms(&here, &string(v, &here)?)?)
                }
                "ports" => self.ports(n, v, &here, &mut d.spec.ports)?,
                "networks" => networks = self.service_networks(v, &here)?,
                "secrets" => d.secrets = self.grants(v, &here, false)?,
                "configs" => d.configs = self.grants(v, &here, true)?,
                "healthcheck" => d.health = healthcheck(v, &here)?,
                "cap_add" => d.security.cap_add = flags::capabilities(&here, &strings(v, &here)?)?,
                "cap_drop" => {
                    d.security.cap_drop = flags::capabilities(&here, &strings(v, &here)?)?
                }
                "sysctls" => d.security.sysctls = sysctls(v, &here)?,
                "ulimits" => d.security.ulimits = ulimits(v, &here)?,
                "init" => d.security.init = boolean(v, &here)?,
                "read_only" => d.security.read_only = boolean(v, &here)?,
                "deploy" => self.deploy_keys(v, &here, &mut d)?,
                "volumes" => d.mounts.extend(self.service_volumes(v, &here)?),
                "tmpfs" => d.mounts.extend(volumes::tmpfs(v, &here)?),
                k if IGNORED_SERVICE_KEYS.contains(&k) => self
                    .warnings
                    .push(format!("Ignoring unsupported option {here}")),
                other => return Err(format!("{at}: unknown key {other:?}")),
            }
        }
        if d.image.is_none() && d.command.is_empty() {
            return Err(format!("{at}: give an image or a command"));
        }
        let mut networks = networks.into_iter();
        match networks.next() {
            Some(n) => {
                d.spec.network = n.target;
                d.spec.aliases = n.aliases;
            }
            None => d.spec.network = self.default_network(),
        }
        d.spec.networks = networks.collect();
        Ok(ServiceCreate {
            spec: finish(d, &at)?,
            no_resolve_image: false,
            registry_auth: None,
        })
    }

    /// Swarm's default network of a stack, made when a service needs it.
    fn default_network(&mut self) -> String {
        let default = self.full("default");
        if !self.deploy.networks.iter().any(|x| x.name == default) {
            self.deploy.networks.push(StackNetwork {
                name: default.clone(),
                subnet: None,
                labels: self.labels.clone(),
            });
        }
        default
    }

    fn ports(
        &mut self,
        service: &str,
        v: &Value,
        at: &str,
        out: &mut Vec<PortSpec>,
    ) -> Result<(), String> {
        let Value::Sequence(ports) = v else {
            return Err(format!("{at}: expected a list"));
        };
        for (i, p) in ports.iter().enumerate() {
            let pat = format!("{at}[{i}]");
            let text = match p {
                Value::Mapping(m) => m
                    .iter()
                    .map(|(k, v)| Ok(format!("{}={}", key_str(k, &pat)?, string(v, &pat)?)))
                    .collect::<Result<Vec<_>, String>>()?
                    .join(","),
                _ => string(p, &pat)?,
            };
            for port in flags::ports(&pat, &[text])? {
                if let Some(pp) = port.published {
                    let key = (port.protocol.to_string(), pp);
                    if let Some(other) = self.published.insert(key, service.to_owned()) {
                        return Err(format!(
                            "{pat}: port {pp}/{} is published twice (also by services.{other})",
                            port.protocol
                        ));
                    }
                }
                out.push(port);
            }
        }
        Ok(())
    }

    /// The networks a service's `networks:` names, in the file's order (none: the stack's
    /// default), as a list of names or a map of names to `{aliases: [...]}`.
    fn service_networks(&self, v: &Value, at: &str) -> Result<Vec<NetworkAttachment>, String> {
        let listed: Vec<(String, Vec<String>)> = match v {
            Value::Mapping(m) => m
                .iter()
                .map(|(k, opts)| {
                    let n = key_str(k, at)?;
                    let aliases = network_aliases(opts, &format!("{at}.{n}"))?;
                    Ok((n, aliases))
                })
                .collect::<Result<_, String>>()?,
            _ => strings(v, at)?
                .into_iter()
                .map(|n| (n, Vec::new()))
                .collect(),
        };
        listed
            .into_iter()
            .map(|(n, aliases)| {
                let target = self.networks.get(&n).cloned().ok_or_else(|| {
                    format!("{at}: network {n} is not defined under the top-level networks")
                })?;
                Ok(NetworkAttachment {
                    target,
                    aliases,
                    vip: None,
                })
            })
            .collect()
    }

    /// A service's `secrets:` or `configs:`: grants of the stack's objects.
    fn grants(&self, v: &Value, at: &str, config: bool) -> Result<Vec<FileRef>, String> {
        let (kind, names) = if config {
            ("config", &self.configs)
        } else {
            ("secret", &self.secrets)
        };
        let Value::Sequence(refs) = v else {
            return Err(format!("{at}: expected a list"));
        };
        let mut out = Vec::new();
        for (i, r) in refs.iter().enumerate() {
            let rat = format!("{at}[{i}]");
            let (source, mut fields) = grant_fields(r, &rat)?;
            let object = names.get(&source).ok_or_else(|| {
                format!("{rat}: {kind} {source} is not defined under the top-level {kind}s")
            })?;
            // The file keeps its short name inside the task, as in Swarm.
            if !fields.iter().any(|f| f.starts_with("target=")) {
                fields.push(if config {
                    format!("target=/{source}")
                } else {
                    format!("target={source}")
                });
            }
            let spec = format!("source={object},{}", fields.join(","));
            out.extend(flags::file_refs(&rat, &[spec], config)?);
        }
        Ok(out)
    }

    fn deploy_keys(&mut self, v: &Value, at: &str, d: &mut ServiceDraft) -> Result<(), String> {
        for (k, v) in map(v, at)? {
            let k = key_str(k, at)?;
            let here = format!("{at}.{k}");
            match k.as_str() {
                "mode" => d.mode = Some((string(v, &here)?, here)),
                "replicas" => d.replicas = Some((flags::replicas(&here, number(v, &here)?)?, here)),
                "endpoint_mode" => {
                    d.spec.endpoint_mode = flags::parsed::<EndpointMode>(&here, &string(v, &here)?)?
                }
                "labels" => d.spec.labels.extend(list_or_map(v, &here)?),
                "placement" => placement(v, &here, &mut d.spec)?,
                "restart_policy" => {
                    d.spec.restart = restart_policy(v, &here)?.apply(d.spec.restart)
                }
                "update_config" => d.spec.update = update_config(v, &here)?.apply(d.spec.update),
                "rollback_config" => {
                    d.spec.rollback = update_config(v, &here)?.apply(d.spec.rollback)
                }
                "resources" => self.resources(v, &here, &mut d.resources)?,
                other => return Err(format!("{at}: unknown key {other:?}")),
            }
        }
        Ok(())
    }

    /// `deploy.resources`: `limits` (enforced by the kernel) and `reservations`.
    fn resources(&mut self, v: &Value, at: &str, r: &mut TaskResources) -> Result<(), String> {
        for (k, v) in map(v, at)? {
            let k = key_str(k, at)?;
            let here = format!("{at}.{k}");
            match k.as_str() {
                "limits" => r.limits = resource_limits(v, &here)?,
                "reservations" => r.reservations = reservations(v, &here)?,
                other => return Err(format!("{at}: unknown key {other:?}")),
            }
        }
        flags::within_reservations(r).map_err(|e| format!("{at}: {e}"))
    }
}

/// `deploy.resources.limits`: `cpus` ('0.5'), `memory` (512M), `pids` (200). Compose's
/// `devices` are reservations only.
fn resource_limits(v: &Value, at: &str) -> Result<Limits, String> {
    let mut l = Limits::default();
    for (k, v) in map(v, at)? {
        let k = key_str(k, at)?;
        let here = format!("{at}.{k}");
        match k.as_str() {
            "cpus" => l.nano_cpus = flags::nano_cpus(&here, &string(v, &here)?)?,
            "memory" => l.memory_bytes = flags::bytes(&here, &string(v, &here)?)?,
            "pids" => l.pids = flags::pids(&here, number(v, &here)?)?,
            other => {
                return Err(format!(
                    "{at}: unknown key {other:?} (limits take cpus, memory and pids)"
                ));
            }
        }
    }
    Ok(l)
}

/// `reservations: { cpus: '0.25', memory: 20M }`, in Docker's spelling (a number or a
/// string each).
fn reservations(v: &Value, at: &str) -> Result<Resources, String> {
    let mut r = Resources::default();
    for (k, v) in map(v, at)? {
        let k = key_str(k, at)?;
        let here = format!("{at}.{k}");
        let value = || -> Result<String, String> {
            let value = string(v, &here)?;
            if value.trim().starts_with('-') {
                return Err(format!(
                    "{here}: {value:?} is negative: a reservation is 0 (none) or more"
                ));
            }
            Ok(value)
        };
        match k.as_str() {
            "cpus" => r.nano_cpus = flags::nano_cpus(&here, &value()?)?,
            "memory" => r.memory_bytes = flags::bytes(&here, &value()?)?,
            "devices" | "generic_resources" => {
                return Err(format!(
                    "{here}: mesh cannot reserve {k}: it places tasks by CPUs and memory only \
                     (remove the key)"
                ));
            }
            other => return Err(format!("{at}: unknown key {other:?}")),
        }
    }
    Ok(r)
}

/// The spec a service's keys add up to.
fn finish(d: ServiceDraft, at: &str) -> Result<ServiceSpec, String> {
    let mut spec = d.spec;
    spec.mode = match (d.mode, d.replicas) {
        (None, r) => ServiceMode::Replicated {
            replicas: r.map_or(1, |(n, _)| n),
        },
        (Some((m, _)), r) if m == "replicated" => ServiceMode::Replicated {
            replicas: r.map_or(1, |(n, _)| n),
        },
        (Some((m, _)), Some((_, here))) if m == "global" => {
            return Err(format!(
                "{here}: replicas do not go with mode: global (a global service runs one task \
                 on every eligible node)"
            ));
        }
        (Some((m, _)), None) if m == "global" => ServiceMode::Global,
        // Docker's stack converter: replicas are both the completions and the concurrency.
        (Some((m, _)), r) if m == "replicated-job" => {
            let n = r.map_or(1, |(n, _)| n);
            if n == 0 {
                return Err(format!(
                    "{at}.deploy.replicas: a replicated-job needs at least 1 replica (its \
                     completions, run that many at a time)"
                ));
            }
            ServiceMode::ReplicatedJob {
                completions: n,
                max_concurrent: n,
            }
        }
        (Some((m, _)), Some((_, here))) if m == "global-job" => {
            return Err(format!(
                "{here}: replicas can only be used with replicated or replicated-job mode"
            ));
        }
        (Some((m, _)), None) if m == "global-job" => ServiceMode::GlobalJob,
        (Some((m, here)), _) => {
            return Err(format!(
                "{here}: unknown mode {m:?}: use replicated, global, replicated-job or global-job"
            ));
        }
    };
    if spec.mode.is_job() {
        for (key, config) in [
            ("update_config", spec.update),
            ("rollback_config", spec.rollback),
        ] {
            if config != mesh_planner::UpdateConfig::default() {
                return Err(format!(
                    "{at}.deploy.{key}: update and rollback configuration is not supported for \
                     jobs"
                ));
            }
        }
        if d.health.probe.is_some() {
            return Err(format!(
                "{at}.healthcheck: jobs run to completion and serve nothing: remove the \
                 health check"
            ));
        }
    }
    let health = d
        .health
        .apply(None, &spec.ports)
        .map_err(|e| format!("{at}.healthcheck: {e}"))?;
    // Docker's order: the env files, then `environment`, a later value of a key winning.
    let mut env = d.env_files;
    for (k, v) in d.env {
        env.retain(|(key, _)| *key != k);
        env.push((k, v));
    }
    let template = TaskTemplate {
        command: d.command,
        env,
        hostname: d.hostname,
        health,
        stop_grace_ms: d
            .stop_grace_ms
            .unwrap_or(TaskTemplate::default().stop_grace_ms),
        image: d.image,
        secrets: d.secrets,
        configs: d.configs,
        run: d.run,
        resources: d.resources,
        security: d.security,
        mounts: d.mounts,
    };
    template
        .check_templates(&spec.labels)
        .map_err(|e| format!("{at}: {e}"))?;
    mesh_api::spec::validate_mounts(&template.mounts).map_err(|e| format!("{at}.volumes: {e}"))?;
    spec.task = Some(template);
    Ok(spec)
}

/// `env_file:` a path, a list of paths, or of `{path, required}` (compose's long form), each
/// relative to the compose file's directory and read in Docker's env-file syntax.
fn env_files(v: &Value, at: &str, dir: &Path) -> Result<Vec<(String, String)>, String> {
    let entries: Vec<(String, bool)> = match v {
        Value::Sequence(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let here = format!("{at}[{i}]");
                match item {
                    Value::Mapping(m) => {
                        let path = m
                            .get("path")
                            .ok_or_else(|| format!("{here}: give path: FILE"))?;
                        let required = match m.get("required") {
                            Some(r) => boolean(r, &format!("{here}.required"))?,
                            None => true,
                        };
                        Ok((string(path, &format!("{here}.path"))?, required))
                    }
                    other => Ok((string(other, &here)?, true)),
                }
            })
            .collect::<Result<_, String>>()?,
        other => vec![(string(other, at)?, true)],
    };
    let mut out = Vec::new();
    for (path, required) in entries {
        let full = dir.join(&path);
        let text = match std::fs::read_to_string(&full) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => continue,
            Err(e) => return Err(format!("{at}: cannot read {}: {e}", full.display())),
        };
        out.extend(flags::env_file(
            &format!("{at}: {}", full.display()),
            &text,
            |k| std::env::var(k).ok(),
        )?);
    }
    Ok(out)
}

/// `extra_hosts:` a list of `host:ip` (or `host=ip`), or a mapping `host: ip`.
fn extra_hosts(v: &Value, at: &str) -> Result<Vec<mesh_api::spec::ExtraHost>, String> {
    let raw: Vec<String> = match v {
        Value::Mapping(m) => m
            .iter()
            .map(|(k, ip)| Ok(format!("{}={}", key_str(k, at)?, string(ip, at)?)))
            .collect::<Result<_, String>>()?,
        _ => strings(v, at)?,
    };
    raw.iter()
        .enumerate()
        .map(|(i, h)| h.parse().map_err(|e: String| format!("{at}[{i}]: {e}")))
        .collect()
}

/// `logging: {driver, options: {max-size, max-file}}`: the drivers whose files mesh keeps.
fn logging(v: &Value, at: &str) -> Result<mesh_api::spec::LogDriver, String> {
    let mut driver = None;
    let mut options = Vec::new();
    for (k, v) in map(v, at)? {
        let k = key_str(k, at)?;
        let here = format!("{at}.{k}");
        match k.as_str() {
            "driver" => driver = Some(string(v, &here)?),
            "options" if v.is_null() => {}
            "options" => options = list_or_map(v, &here)?,
            other => {
                return Err(format!(
                    "{at}: unknown key {other:?} (use driver: and options:)"
                ));
            }
        }
    }
    let at_driver = format!("{at}.driver");
    if let Some(d) = &driver
        && !mesh_api::spec::LOG_DRIVERS.contains(&d.as_str())
    {
        mesh_api::spec::LogDriver::parse(&at_driver, Some(d), &[])?;
    }
    Ok(
        mesh_api::spec::LogDriver::parse(&format!("{at}.options"), driver.as_deref(), &options)?
            .unwrap_or_default(),
    )
}

/// `ipam.config[0].subnet`: mesh networks have one subnet.
fn ipam_subnet(v: &Value, at: &str) -> Result<Option<String>, String> {
    let ipam = map(v, at)?;
    let Some(configs) = ipam.get("config") else {
        return Ok(None);
    };
    let Value::Sequence(c) = configs else {
        return Err(format!("{at}.config: expected a list"));
    };
    if c.len() > 1 {
        return Err(format!("{at}.config: mesh networks have one subnet"));
    }
    c.first()
        .and_then(|first| first.get("subnet"))
        .map(|s| string(s, &format!("{at}.config[0].subnet")))
        .transpose()
}

/// A secret's or config's data, within Docker's limit.
fn read_object(path: &Path, at: &str, secret: bool) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("{at}.file: cannot read {}: {e}", path.display()))?;
    if meta.len() as usize > MAX_FILE_OBJECT {
        return Err(format!(
            "{at}.file: {} is {} bytes; the limit for a {} is {MAX_FILE_OBJECT} bytes (500 KB)",
            path.display(),
            meta.len(),
            if secret { "secret" } else { "config" }
        ));
    }
    Ok(zeroize::Zeroizing::new(std::fs::read(path).map_err(
        |e| format!("{at}.file: cannot read {}: {e}", path.display()),
    )?))
}

/// `command:` as a string (split like a shell would) or a list.
fn command(v: &Value, at: &str) -> Result<Vec<String>, String> {
    match v {
        Value::String(s) => shlex::split(s).ok_or(format!("{at}: an unclosed quote")),
        _ => strings(v, at),
    }
}

fn boolean(v: &Value, at: &str) -> Result<bool, String> {
    v.as_bool().ok_or(format!("{at}: expected true or false"))
}

/// `sysctls:` as a list of `NAME=VALUE` or a mapping; namespaced ones only.
fn sysctls(v: &Value, at: &str) -> Result<BTreeMap<String, String>, String> {
    list_or_map(v, at)?
        .into_iter()
        .map(|(k, val)| {
            mesh_api::spec::sysctl(&format!("{k}={val}")).map_err(|e| format!("{at}: {e}"))
        })
        .collect()
}

/// `ulimits:` — `nofile: 4096` (soft = hard) or `nofile: {soft: 1024, hard: 4096}`.
fn ulimits(v: &Value, at: &str) -> Result<Vec<Ulimit>, String> {
    map(v, at)?
        .iter()
        .map(|(k, v)| {
            let name = key_str(k, at)?;
            let here = format!("{at}.{name}");
            let (soft, hard) = match v {
                Value::Mapping(m) => {
                    let mut soft = None;
                    let mut hard = None;
                    for (k, v) in m {
                        match key_str(k, &here)?.as_str() {
                            "soft" => soft = Some(number(v, &format!("{here}.soft"))?),
                            "hard" => hard = Some(number(v, &format!("{here}.hard"))?),
                            other => return Err(format!("{here}: unknown key {other:?}")),
                        }
                    }
                    match (soft, hard) {
                        (Some(s), Some(h)) => (s, h),
                        _ => return Err(format!("{here}: give both soft and hard")),
                    }
                }
                _ => {
                    let n = number(v, &here)?;
                    (n, n)
                }
            };
            mesh_api::spec::ulimit(&format!("{name}={soft}:{hard}"))
                .map_err(|e| format!("{here}: {e}"))
        })
        .collect()
}

fn number(v: &Value, at: &str) -> Result<i64, String> {
    v.as_i64().ok_or(format!("{at}: expected a number"))
}

/// A grant's source and its other fields (`target=…`, `uid=…`, `gid=…`, `mode=…`).
fn grant_fields(r: &Value, at: &str) -> Result<(String, Vec<String>), String> {
    let Value::Mapping(m) = r else {
        return Ok((string(r, at)?, Vec::new()));
    };
    let mut source = None;
    let mut fields = Vec::new();
    for (k, v) in m {
        let k = key_str(k, at)?;
        let v = string(v, at)?;
        match k.as_str() {
            "source" => source = Some(v),
            "target" | "uid" | "gid" | "mode" => fields.push(format!("{k}={v}")),
            _ => return Err(format!("{at}: unknown key {k:?}")),
        }
    }
    Ok((source.ok_or(format!("{at}: no source"))?, fields))
}

fn healthcheck(v: &Value, at: &str) -> Result<HealthChange, String> {
    let mut h = HealthChange::default();
    for (k, v) in map(v, at)? {
        let k = key_str(k, at)?;
        let here = format!("{at}.{k}");
        let duration =
            |v: &Value| -> Result<u64, String> { flags::duration_ms(&here, &string(v, &here)?) };
        match k.as_str() {
            "test" => {
                let t = match v {
                    Value::String(s) => vec!["CMD-SHELL".to_owned(), s.clone()],
                    _ => strings(v, &here)?,
                };
                match t.split_first() {
                    Some((kind, rest)) if kind == "CMD-SHELL" => {
                        h.probe = Some(ProbeChange::Cmd(vec![
                            "sh".into(),
                            "-c".into(),
                            rest.join(" "),
                        ]))
                    }
                    Some((kind, rest)) if kind == "CMD" && !rest.is_empty() => {
                        h.probe = Some(ProbeChange::Cmd(rest.to_vec()))
                    }
                    Some((kind, _)) if kind == "NONE" => h.disable = true,
                    _ => {
                        return Err(format!(
                            "{here}: expected [CMD, …], [CMD-SHELL, …] or [NONE]"
                        ));
                    }
                }
            }
            "interval" => h.interval_ms = Some(duration(v)?),
            "timeout" => h.timeout_ms = Some(duration(v)?),
            "start_period" => h.start_period_ms = Some(duration(v)?),
            "retries" => {
                h.retries = Some(flags::count(
                    &here,
                    number(v, &here)?,
                    MAX_HEALTH_RETRIES,
                    "invalid",
                )?)
            }
            "disable" => h.disable = v.as_bool().unwrap_or(false),
            other => return Err(format!("{at}: unknown key {other:?}")),
        }
    }
    Ok(h)
}

fn placement(v: &Value, at: &str, spec: &mut ServiceSpec) -> Result<(), String> {
    for (k, v) in map(v, at)? {
        let k = key_str(k, at)?;
        let here = format!("{at}.{k}");
        match k.as_str() {
            "constraints" => {
                spec.placement.constraints = flags::constraints(&here, &strings(v, &here)?)?
            }
            "max_replicas_per_node" => {
                let n = flags::per_node(&here, number(v, &here)?)?;
                spec.placement.max_replicas_per_node = (n > 0).then_some(n);
            }
            "preferences" => {
                let Value::Sequence(prefs) = v else {
                    return Err(format!("{here}: expected a list"));
                };
                for p in prefs {
                    let spread = p
                        .get("spread")
                        .ok_or(format!("{here}: only spread: preferences exist"))?;
                    spec.placement.preferences.extend(flags::preferences(
                        &here,
                        &[format!("spread={}", string(spread, &here)?)],
                    )?);
                }
            }
            other => return Err(format!("{at}: unknown key {other:?}")),
        }
    }
    Ok(())
}

fn restart_policy(v: &Value, at: &str) -> Result<RestartChange, String> {
    let mut r = RestartChange::default();
    for (k, v) in map(v, at)? {
        let k = key_str(k, at)?;
        let here = format!("{at}.{k}");
        match k.as_str() {
            "condition" => r.condition = Some(flags::parsed(&here, &string(v, &here)?)?),
            "delay" => r.delay_ms = Some(flags::duration_ms(&here, &string(v, &here)?)?),
            "max_attempts" => {
                r.max_attempts = Some(flags::count(
                    &here,
                    number(v, &here)?,
                    u32::MAX,
                    "no limit",
                )?)
            }
            "window" => r.window_ms = Some(flags::duration_ms(&here, &string(v, &here)?)?),
            other => return Err(format!("{at}: unknown key {other:?}")),
        }
    }
    Ok(r)
}

fn update_config(v: &Value, at: &str) -> Result<UpdateConfigChange, String> {
    let mut words: BTreeMap<String, String> = BTreeMap::new();
    let mut parallelism = None;
    for (k, v) in map(v, at)? {
        let k = key_str(k, at)?;
        let here = format!("{at}.{k}");
        match k.as_str() {
            "parallelism" => parallelism = Some(number(v, &here)?),
            "delay" | "order" | "failure_action" | "monitor" | "max_failure_ratio" => {
                words.insert(k, string(v, &here)?);
            }
            other => return Err(format!("{at}: unknown key {other:?}")),
        }
    }
    let word = |k: &str| words.get(k).map(String::as_str);
    flags::ConfigWords {
        prefix: at,
        sep: ".",
        parallelism,
        delay: word("delay"),
        order: word("order"),
        failure_action: word("failure_action"),
        monitor: word("monitor"),
        max_failure_ratio: word("max_failure_ratio"),
    }
    .change()
}

/// A service's options on one of its networks: `aliases` (other keys pin addresses or
/// priorities mesh does not have).
fn network_aliases(v: &Value, at: &str) -> Result<Vec<String>, String> {
    let mut aliases = Vec::new();
    if matches!(v, Value::Null) {
        return Ok(aliases);
    }
    for (k, v) in map(v, at)? {
        let k = key_str(k, at)?;
        let here = format!("{at}.{k}");
        match k.as_str() {
            "aliases" => aliases = strings(v, &here)?,
            _ => {
                return Err(format!(
                    "{here}: mesh cannot honour it (a service's networks take aliases only)"
                ));
            }
        }
    }
    Ok(aliases)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Parsed, String> {
        files(&[text], &|_| None)
    }

    fn files(texts: &[&str], env: &dyn Fn(&str) -> Option<String>) -> Result<Parsed, String> {
        let sources: Vec<Source> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| Source {
                name: format!("f{i}.yml"),
                text: (*t).to_owned(),
            })
            .collect();
        load("st", &sources, Path::new("/nonexistent"), env, false)
    }

    fn mounts_of(out: &Parsed, i: usize) -> Vec<Mount> {
        out.deploy.services[i]
            .spec
            .task
            .as_ref()
            .unwrap()
            .mounts
            .clone()
    }

    #[test]
    fn volumes_read_in_short_and_long_syntax_and_tmpfs() {
        let out = p(r#"
volumes:
  pgdata:
    labels: { tier: db }
  shared: { external: true }
  local: { driver: local }
services:
  db:
    image: postgres
    volumes:
      - pgdata:/var/lib/postgresql/data
      - /srv/site:/site:ro
      - shared:/shared:rw
      - type: volume
        source: local
        target: /l
        read_only: true
        volume: { nocopy: true }
      - type: tmpfs
        target: /cache
        tmpfs: { size: 64m, mode: 0o1770 }
      - type: bind
        source: ./conf
        target: /conf
    tmpfs: ["/run:size=1m,noexec", /tmp]
"#)
        .unwrap();
        let m = mounts_of(&out, 0);
        let show: Vec<String> = m.iter().map(|m| m.to_string()).collect();
        assert_eq!(
            show,
            [
                "type=volume,source=st_pgdata,target=/var/lib/postgresql/data,volume-label=com.docker.stack.namespace=st,volume-label=tier=db",
                "type=bind,source=/srv/site,target=/site,readonly",
                "type=volume,source=shared,target=/shared",
                "type=volume,source=st_local,target=/l,readonly,volume-label=com.docker.stack.namespace=st,volume-nocopy",
                &format!(
                    "type=tmpfs,target=/cache,tmpfs-size={},tmpfs-mode=1770",
                    64 << 20
                ),
                "type=bind,source=/nonexistent/conf,target=/conf",
                &format!("type=tmpfs,target=/run,tmpfs-size={}", 1 << 20),
                "type=tmpfs,target=/tmp",
            ]
        );
    }

    #[test]
    fn bad_volumes_name_the_key() {
        let svc = |vols: &str| format!("services:\n  db:\n    image: x\n    volumes: {vols}\n");
        let cases = [
            (
                "volumes:\n  data: { driver: nfs }\n".to_owned() + &svc("[\"data:/d\"]"),
                "volumes.data.driver: volume driver \"nfs\" is not supported",
            ),
            (
                svc("[\"data:/d\"]"),
                "services.db.volumes[0]: undefined volume \"data\"",
            ),
            (svc("[\"/d\"]"), "is an anonymous volume"),
            (
                "volumes:\n  data:\n".to_owned() + &svc("[\"data:/d\", \"data:/d/\"]"),
                "services.db.volumes: Duplicate mount point: /d",
            ),
            (
                "volumes:\n  data:\n".to_owned() + &svc("[\"data:relative\"]"),
                "must be an absolute path",
            ),
            (
                "volumes:\n  \"..\": { external: true }\n".to_owned() + &svc("[\"..:/d\"]"),
                "includes invalid characters for a local volume name",
            ),
            (
                svc("[{type: tmpfs, source: x, target: /t}]"),
                "a tmpfs has no source",
            ),
        ];
        for (text, want) in cases {
            let e = p(&text).err().unwrap_or_default();
            assert!(e.contains(want), "{text}\n-> {e}\nwant {want}");
        }
    }

    #[test]
    fn files_merge_in_order_with_variables_and_merge_keys() {
        let base = r#"
x-defaults: &defaults
  deploy: { replicas: 2, restart_policy: { condition: on-failure } }
services:
  web:
    <<: *defaults
    image: "localhost/web:${TAG:-1}"
    ports: ["${PORT:?set PORT}:80"]
"#;
        let prod = "services:\n  web:\n    deploy: { replicas: 5 }\n    environment: [MODE=prod]\n";
        let env = |k: &str| (k == "PORT").then(|| "8080".to_owned());
        let out = files(&[base, prod], &env).unwrap();
        let web = &out.deploy.services[0].spec;
        assert_eq!(
            web.task.as_ref().unwrap().image.as_deref(),
            Some("localhost/web:1")
        );
        assert_eq!(web.ports[0].published, Some(8080));
        assert_eq!(web.mode, ServiceMode::Replicated { replicas: 5 });
        assert_eq!(
            web.restart.condition,
            mesh_planner::RestartCondition::OnFailure,
            "the merge key's restart policy survives the second file's deploy"
        );
        assert_eq!(
            web.task.as_ref().unwrap().env,
            vec![("MODE".to_owned(), "prod".to_owned())]
        );
        let e = files(&[base], &|_| None).err().unwrap();
        assert!(
            e.starts_with("f0.yml: services.web.ports[0]: required variable PORT"),
            "{e}"
        );
    }

    #[test]
    fn dns_hosts_logging_and_env_files_are_honoured() {
        let dir = std::env::temp_dir().join(format!("mesh-compose-env-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("conf")).unwrap();
        std::fs::write(dir.join("conf/web.env"), "# web\nA=from-file\nB=file\n").unwrap();
        let text = r#"
services:
  web:
    image: my/web:1
    hostname: "{{.Service.Name}}-{{.Task.Slot}}"
    env_file: [conf/web.env, {path: conf/missing.env, required: false}]
    environment: { B: from-environment }
    dns: 192.0.2.53
    dns_search: [corp.example]
    dns_opt: ["ndots:2"]
    extra_hosts: ["db.local:10.0.0.5", "cache=10.0.0.6"]
    logging: { driver: json-file, options: { max-size: 1m, max-file: "3" } }
"#;
        let source = |t: &str| Source {
            name: "c.yml".into(),
            text: t.to_owned(),
        };
        let out = load("st", &[source(text)], &dir, &|_| None, false).unwrap();
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        let t = out.deploy.services[0].spec.task.clone().unwrap();
        assert_eq!(
            t.env,
            [
                ("A".to_owned(), "from-file".to_owned()),
                ("B".to_owned(), "from-environment".to_owned())
            ]
        );
        assert_eq!(t.run.dns.nameservers.len(), 1);
        assert_eq!((t.run.dns.search.len(), t.run.dns.options.len()), (1, 1));
        assert_eq!(t.run.hosts.len(), 2);
        assert_eq!(t.run.log.max_size, Some(1 << 20));
        assert_eq!(t.run.log.max_file, Some(3));
        for (bad, says) in [
            (
                "logging: { driver: syslog }",
                "services.web.logging.driver: log driver \"syslog\" is not supported",
            ),
            (
                "extra_hosts: [db.local]",
                "services.web.extra_hosts[0]: bad format",
            ),
            ("env_file: nope.env", "services.web.env_file: cannot read"),
            ("hostname: \"{{.Nope}}\"", "can't evaluate field Nope"),
        ] {
            let text = format!("services:\n  web:\n    image: my/web:1\n    {bad}\n");
            let e = load("st", &[source(&text)], &dir, &|_| None, false)
                .err()
                .unwrap();
            assert!(e.contains(says), "{bad}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn security_and_run_keys_are_honoured_not_dropped() {
        let out = p(r#"
services:
  w:
    image: my/w:1
    user: "1000:1000"
    working_dir: /srv
    entrypoint: ["/bin/w", "--serve"]
    cap_drop: [ALL]
    cap_add: [NET_BIND_SERVICE]
    read_only: true
    init: true
    sysctls: { net.core.somaxconn: 1024 }
    ulimits:
      nproc: 65535
      nofile: { soft: 4096, hard: 8192 }
  v:
    command: /bin/v
    sysctls: ["net.ipv4.ip_forward=1"]
"#)
        .unwrap();
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        let t = out.deploy.services[0].spec.task.clone().unwrap();
        assert_eq!(t.run.user.as_deref(), Some("1000:1000"));
        assert_eq!(t.run.workdir.as_deref(), Some("/srv"));
        assert_eq!(t.run.entrypoint.as_deref().unwrap(), ["/bin/w", "--serve"]);
        let s = &t.security;
        assert_eq!(
            (s.cap_add.as_slice(), s.cap_drop.as_slice()),
            (
                &["NET_BIND_SERVICE".to_owned()][..],
                &["ALL".to_owned()][..]
            )
        );
        assert!(s.read_only && s.init);
        assert_eq!(s.sysctls["net.core.somaxconn"], "1024");
        assert_eq!(
            s.ulimits,
            [
                Ulimit {
                    name: "nproc".into(),
                    soft: 65535,
                    hard: 65535
                },
                Ulimit {
                    name: "nofile".into(),
                    soft: 4096,
                    hard: 8192
                },
            ]
        );
        let v = out.deploy.services[1].spec.task.clone().unwrap();
        assert_eq!(v.security.sysctls["net.ipv4.ip_forward"], "1");

        for (bad, want) in [
            (
                "cap_add: [NET_BIND]",
                "services.w.cap_add: unknown capability",
            ),
            (
                "sysctls: { kernel.pid_max: 10 }",
                "services.w.sysctls: sysctl kernel.pid_max is not namespaced",
            ),
            (
                "ulimits: { nofile: { soft: 10 } }",
                "services.w.ulimits.nofile: give both soft and hard",
            ),
            ("ulimits: { files: 10 }", "unknown ulimit"),
            (
                "read_only: maybe",
                "services.w.read_only: expected true or false",
            ),
        ] {
            let e = p(&format!("services:\n  w:\n    image: my/w:1\n    {bad}\n"))
                .err()
                .unwrap();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn a_stack_maps_onto_named_labelled_objects() {
        let out = p(r#"
version: "3.8"
services:
  web:
    image: localhost/web:1
    ports: ["8080:80"]
    networks: [front]
    container_name: ignored
    deploy:
      replicas: 2
      placement: { constraints: ["node.labels.zone==a", "node.role == manager"], max_replicas_per_node: 1 }
      update_config: { parallelism: 1, order: start-first }
  api:
    command: ["/bin/api", "--port", "80"]
    environment: { MODE: prod }
networks:
  front:
    driver: overlay
    ipam: { config: [ { subnet: 10.9.0.0/24 } ] }
"#)
        .unwrap();
        let d = out.deploy;
        assert_eq!(
            out.warnings,
            vec!["Ignoring unsupported option services.web.container_name"]
        );
        let web = &d
            .services
            .iter()
            .find(|s| s.spec.name == "st_web")
            .unwrap()
            .spec;
        assert_eq!(web.network, "st_front");
        assert_eq!(web.mode, ServiceMode::Replicated { replicas: 2 });
        assert_eq!(web.labels[STACK_LABEL], "st");
        assert_eq!(web.placement.max_replicas_per_node, Some(1));
        assert_eq!(
            web.placement.constraints[1].field,
            mesh_planner::Field::NodeRole,
            "Docker's tutorials' spelling"
        );
        assert_eq!(web.update.order, mesh_planner::UpdateOrder::StartFirst);
        let api = &d
            .services
            .iter()
            .find(|s| s.spec.name == "st_api")
            .unwrap()
            .spec;
        assert_eq!(api.network, "st_default");
        assert_eq!(
            api.task.as_ref().unwrap().env,
            vec![("MODE".to_owned(), "prod".to_owned())]
        );
        assert!(
            d.networks
                .iter()
                .any(|n| n.name == "st_front" && n.subnet.as_deref() == Some("10.9.0.0/24"))
        );
    }

    #[test]
    fn resource_reservations_are_honoured_and_bad_ones_name_the_key() {
        let out = p(r#"
services:
  web:
    image: localhost/web:1
    deploy:
      resources:
        reservations: { cpus: '0.25', memory: 20M }
        limits: { cpus: '0.5', memory: 50M }
  api:
    image: localhost/api:1
    deploy: { resources: { reservations: { cpus: 2, memory: 1073741824 } } }
"#)
        .unwrap();
        let reserved = |name: &str| {
            out.deploy
                .services
                .iter()
                .find(|s| s.spec.name == name)
                .unwrap()
                .spec
                .reservation()
        };
        assert_eq!(
            reserved("st_web"),
            Resources {
                nano_cpus: 250_000_000,
                memory_bytes: 20 << 20
            }
        );
        assert_eq!(
            reserved("st_api"),
            Resources {
                nano_cpus: 2_000_000_000,
                memory_bytes: 1 << 30
            }
        );
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        let bad = |r: &str| {
            p(&format!(
                "services:\n  web:\n    image: a\n    deploy: {{ resources: {{ reservations: {r} }} }}\n"
            ))
            .err()
            .unwrap()
        };
        let e = bad("{ memory: 512Q }");
        assert!(
            e.contains("invalid services.web.deploy.resources.reservations.memory \"512Q\""),
            "{e}"
        );
        let e = bad("{ cpus: -1 }");
        assert!(
            e.contains("services.web.deploy.resources.reservations.cpus: \"-1\" is negative"),
            "{e}"
        );
        let e = bad("{ generic_resources: [] }");
        assert!(e.contains("mesh cannot reserve generic_resources"), "{e}");
        let e = bad("{ disk: 1g }");
        assert!(e.contains("unknown key \"disk\""), "{e}");
    }

    #[test]
    fn a_service_joins_every_network_it_lists_in_the_files_order() {
        // The vote app's worker: on both networks, the first listed is its first.
        let out = p(r#"
services:
  worker:
    image: w
    networks: [frontend, backend]
  result:
    image: r
    networks:
      backend:
        aliases: [results]
      frontend:
        aliases: [web, ui]
networks:
  frontend: {}
  backend: {}
"#)
        .unwrap();
        let spec = |name: &str| {
            out.deploy
                .services
                .iter()
                .find(|s| s.spec.name == name)
                .unwrap()
                .spec
                .clone()
        };
        let worker = spec("st_worker");
        assert_eq!(worker.network, "st_frontend");
        assert_eq!(worker.networks, [NetworkAttachment::new("st_backend")]);
        let result = spec("st_result");
        assert_eq!(result.network, "st_backend");
        assert_eq!(result.aliases, ["results"]);
        assert_eq!(
            result.networks,
            [NetworkAttachment {
                target: "st_frontend".into(),
                aliases: vec!["web".into(), "ui".into()],
                vip: None,
            }]
        );
        let e = p("services:\n  w:\n    image: a\n    networks: [a, nope]\nnetworks:\n  a: {}\n")
            .err()
            .unwrap();
        assert!(
            e.contains("network nope is not defined under the top-level networks"),
            "{e}"
        );
    }

    #[test]
    fn network_aliases_are_read_from_the_map_form_and_the_list_form_has_none() {
        let out = p(r#"
services:
  worker:
    image: w
    networks:
      backend:
        aliases: [jobs, queue]
  db:
    image: d
    networks: { backend: }
  web:
    image: n
    networks: [backend]
networks:
  backend: {}
"#)
        .unwrap();
        let spec = |name: &str| {
            out.deploy
                .services
                .iter()
                .find(|s| s.spec.name == name)
                .unwrap()
                .spec
                .clone()
        };
        let worker = spec("st_worker");
        assert_eq!(worker.network, "st_backend");
        assert_eq!(worker.aliases, ["jobs", "queue"]);
        assert!(spec("st_db").aliases.is_empty() && spec("st_db").network == "st_backend");
        assert!(spec("st_web").aliases.is_empty());
        let e = p("services:\n  w:\n    image: a\n    networks: { b: { ipv4_address: 10.0.0.9 } }\nnetworks:\n  b: {}\n")
            .err()
            .unwrap();
        assert!(
            e.contains("services.w.networks.b.ipv4_address: mesh cannot honour it"),
            "{e}"
        );
        let e = p("services:\n  w:\n    image: a\n    networks: { b: { aliases: { jobs: 1 } } }\nnetworks:\n  b: {}\n")
            .err()
            .unwrap();
        assert!(e.contains("services.w.networks.b.aliases"), "{e}");
    }

    #[test]
    fn bad_files_name_the_position_or_the_key_at_fault() {
        let e = p("services:\n  web:\n    image: [unclosed\n")
            .err()
            .unwrap();
        assert!(e.contains("line"), "{e}");
        let e = p("services:\n  web:\n    image: a\n    networks: [nope]\n")
            .err()
            .unwrap();
        assert!(
            e.contains("services.web.networks: network nope is not defined"),
            "{e}"
        );
        let e = p("services:\n  web:\n    image: a\n    secrets: [pw]\n")
            .err()
            .unwrap();
        assert!(e.contains("secret pw is not defined"), "{e}");
        let e = p("services:\n  a:\n    image: a\n    ports: ['80:80']\n  b:\n    image: b\n    ports: ['80:81']\n")
            .err()
            .unwrap();
        assert!(e.contains("published twice"), "{e}");
        let e = p("services:\n  a:\n    image: a\n    frobnicate: 1\n")
            .err()
            .unwrap();
        assert!(e.contains("unknown key \"frobnicate\""), "{e}");
    }

    #[test]
    fn deploy_modes_take_jobs_with_replicas_as_completions() {
        let out = p(r#"
services:
  migrate:
    image: localhost/migrate:1
    deploy: { mode: replicated-job, replicas: 3 }
  backup:
    image: localhost/backup:1
    deploy: { mode: global-job }
"#)
        .unwrap();
        let mode = |name: &str| {
            out.deploy
                .services
                .iter()
                .find(|s| s.spec.name == name)
                .unwrap()
                .spec
                .mode
        };
        assert_eq!(
            mode("st_migrate"),
            ServiceMode::ReplicatedJob {
                completions: 3,
                max_concurrent: 3
            }
        );
        assert_eq!(mode("st_backup"), ServiceMode::GlobalJob);
        for (text, says) in [
            (
                "services:\n  b:\n    image: a\n    deploy: { mode: global-job, replicas: 2 }\n",
                "services.b.deploy.replicas: replicas can only be used with replicated or \
                 replicated-job mode",
            ),
            (
                "services:\n  m:\n    image: a\n    deploy: { mode: replicated-job, update_config: { parallelism: 2 } }\n",
                "services.m.deploy.update_config: update and rollback configuration is not \
                 supported for jobs",
            ),
            (
                "services:\n  m:\n    image: a\n    deploy: { mode: batch }\n",
                "unknown mode \"batch\"",
            ),
        ] {
            let e = p(text).err().unwrap();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn resource_limits_become_the_templates_and_bad_ones_name_the_key() {
        let out = p(r#"
services:
  api:
    image: my/api:1
    deploy:
      resources:
        limits: { cpus: '0.50', memory: 512M, pids: 200 }
"#)
        .unwrap();
        let t = out.deploy.services[0].spec.task.clone().unwrap();
        assert_eq!(
            t.resources.limits,
            Limits {
                nano_cpus: 500_000_000,
                memory_bytes: 512 << 20,
                pids: 200
            }
        );
        let bad = |limits: &str| {
            p(&format!(
                "services:\n  api:\n    image: a\n    deploy:\n      resources:\n        limits: {limits}\n"
            ))
            .err()
            .unwrap()
        };
        let e = bad("{ memory: 512Q }");
        assert!(
            e.contains("services.api.deploy.resources.limits.memory") && e.contains("512Q"),
            "{e}"
        );
        assert!(bad("{ cpus: lots }").contains("limits.cpus"));
        assert!(bad("{ gpus: 1 }").contains("unknown key \"gpus\""));
    }
}
