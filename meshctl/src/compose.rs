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

use mesh_api::spec::{MAX_FILE_OBJECT, PortSpec, STACK_LABEL};
use mesh_api::v1::{
    HealthFlags, RestartFlags, RolloutFlags, ServiceCreate, StackDeploy, StackFile, StackNetwork,
};

/// The parsed stack and the warnings (one line per ignored key).
pub struct Parsed {
    pub deploy: StackDeploy,
    pub warnings: Vec<String>,
}

/// Keys Swarm ignores in `stack deploy` (it warns "Ignoring unsupported options").
const IGNORED_SERVICE_KEYS: &[&str] = &[
    "build",
    "cap_add",
    "cap_drop",
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
    "labels",
    "logging",
    "ulimits",
    "sysctls",
    "tty",
    "stdin_open",
    "working_dir",
    "user",
    "entrypoint",
    "dns",
    "dns_search",
    "extra_hosts",
    "expose",
    "init",
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

/// Reads a compose file; `files` resolves `file:` paths of secrets and configs (relative to
/// the compose file's directory).
pub fn parse(stack: &str, text: &str, dir: &Path, prune: bool) -> Result<Parsed, String> {
    let root: Value = serde_yaml::from_str(text).map_err(|e| match e.location() {
        Some(l) => format!(
            "line {}, column {}: not a valid compose file: {e}",
            l.line(),
            l.column()
        ),
        None => format!("not a valid compose file: {e}"),
    })?;
    let root = map(&root, "the file")?;
    let mut warnings = Vec::new();
    let labels = BTreeMap::from([(STACK_LABEL.to_owned(), stack.to_owned())]);
    let full = |n: &str| format!("{stack}_{n}");
    let mut deploy = StackDeploy {
        name: stack.to_owned(),
        prune,
        ..Default::default()
    };
    let mut services_v = None;
    let mut net_names: BTreeMap<String, String> = BTreeMap::new();
    let mut secret_names: BTreeMap<String, String> = BTreeMap::new();
    let mut config_names: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in root {
        let k = key_str(k, "the file")?;
        match k.as_str() {
            "version" | "name" => {}
            k if k.starts_with("x-") => {}
            "services" => services_v = Some(v),
            "networks" => {
                for (n, spec) in map(v, "networks")? {
                    let n = key_str(n, "networks")?;
                    let at = format!("networks.{n}");
                    let mut net = StackNetwork {
                        name: full(&n),
                        subnet: None,
                        labels: labels.clone(),
                    };
                    let mut external = false;
                    if !spec.is_null() {
                        for (nk, nv) in map(spec, &at)? {
                            let nk = key_str(nk, &at)?;
                            match nk.as_str() {
                                "driver" => {
                                    let d = string(nv, &format!("{at}.driver"))?;
                                    if d != "overlay" {
                                        return Err(format!(
                                            "{at}.driver: {d:?} is not supported: mesh networks are overlays"
                                        ));
                                    }
                                }
                                "external" => external = nv.as_bool().unwrap_or(true),
                                "name" => net.name = string(nv, &format!("{at}.name"))?,
                                "labels" => {
                                    net.labels.extend(list_or_map(nv, &format!("{at}.labels"))?)
                                }
                                "ipam" => {
                                    let ipam = map(nv, &format!("{at}.ipam"))?;
                                    if let Some(configs) = ipam.get("config") {
                                        let Value::Sequence(c) = configs else {
                                            return Err(format!(
                                                "{at}.ipam.config: expected a list"
                                            ));
                                        };
                                        if c.len() > 1 {
                                            return Err(format!(
                                                "{at}.ipam.config: mesh networks have one subnet"
                                            ));
                                        }
                                        if let Some(first) = c.first() {
                                            net.subnet = first
                                                .get("subnet")
                                                .map(|s| {
                                                    string(
                                                        s,
                                                        &format!("{at}.ipam.config[0].subnet"),
                                                    )
                                                })
                                                .transpose()?;
                                        }
                                    }
                                }
                                "attachable" | "driver_opts" | "internal" | "enable_ipv6" => {
                                    warnings.push(format!("Ignoring unsupported option {at}.{nk}"))
                                }
                                other => return Err(format!("{at}: unknown key {other:?}")),
                            }
                        }
                    }
                    net_names.insert(n, net.name.clone());
                    if !external {
                        deploy.networks.push(net);
                    }
                }
            }
            "secrets" | "configs" => {
                let secret = k == "secrets";
                for (n, spec) in map(v, &k)? {
                    let n = key_str(n, &k)?;
                    let at = format!("{k}.{n}");
                    let spec = map(spec, &at)?;
                    let mut name = full(&n);
                    let mut file = None;
                    let mut external = false;
                    let mut obj_labels = labels.clone();
                    for (sk, sv) in spec {
                        match key_str(sk, &at)?.as_str() {
                            "file" => file = Some(string(sv, &format!("{at}.file"))?),
                            "external" => external = sv.as_bool().unwrap_or(true),
                            "name" => name = string(sv, &format!("{at}.name"))?,
                            "labels" => {
                                obj_labels.extend(list_or_map(sv, &format!("{at}.labels"))?)
                            }
                            other => {
                                return Err(format!(
                                    "{at}: unknown or unsupported key {other:?} (use file: or external:)"
                                ));
                            }
                        }
                    }
                    if secret {
                        secret_names.insert(n.clone(), name.clone());
                    } else {
                        config_names.insert(n.clone(), name.clone());
                    }
                    if external {
                        continue;
                    }
                    let file =
                        file.ok_or_else(|| format!("{at}: give file: PATH or external: true"))?;
                    let path = dir.join(&file);
                    let meta = std::fs::metadata(&path)
                        .map_err(|e| format!("{at}.file: cannot read {}: {e}", path.display()))?;
                    if meta.len() as usize > MAX_FILE_OBJECT {
                        return Err(format!(
                            "{at}.file: {} is {} bytes; the limit for a {} is {MAX_FILE_OBJECT} bytes (500 KB)",
                            path.display(),
                            meta.len(),
                            if secret { "secret" } else { "config" }
                        ));
                    }
                    let data =
                        zeroize::Zeroizing::new(std::fs::read(&path).map_err(|e| {
                            format!("{at}.file: cannot read {}: {e}", path.display())
                        })?);
                    let obj = StackFile {
                        name,
                        data: BASE64.encode(&*data),
                        labels: obj_labels,
                    };
                    if secret {
                        deploy.secrets.push(obj);
                    } else {
                        deploy.configs.push(obj);
                    }
                }
            }
            "volumes" if v.as_mapping().is_none_or(|m| m.is_empty()) => {}
            "volumes" => return Err("volumes: mesh has no volumes; remove them".into()),
            other => return Err(format!("the file: unknown top-level key {other:?}")),
        }
    }
    let services = services_v.ok_or("the file has no services")?;
    let mut published: BTreeMap<(String, u16), String> = BTreeMap::new();
    for (n, spec) in map(services, "services")? {
        let n = key_str(n, "services")?;
        let at = format!("services.{n}");
        let mut req = ServiceCreate {
            name: full(&n),
            labels: labels.clone(),
            ..Default::default()
        };
        let mut network: Option<String> = None;
        for (sk, sv) in map(spec, &at)? {
            let sk = key_str(sk, &at)?;
            let here = format!("{at}.{sk}");
            match sk.as_str() {
                "image" => req.image = Some(string(sv, &here)?),
                "command" => {
                    req.command = match sv {
                        Value::String(s) => {
                            shlex::split(s).ok_or(format!("{here}: an unclosed quote"))?
                        }
                        _ => strings(sv, &here)?,
                    }
                }
                "environment" => {
                    req.env = list_or_map(sv, &here)?
                        .into_iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect()
                }
                "hostname" => req.hostname = Some(string(sv, &here)?),
                "stop_grace_period" => req.stop_grace_period = Some(string(sv, &here)?),
                "ports" => {
                    let Value::Sequence(ports) = sv else {
                        return Err(format!("{here}: expected a list"));
                    };
                    for (i, p) in ports.iter().enumerate() {
                        let pat = format!("{here}[{i}]");
                        let text = match p {
                            Value::Mapping(m) => m
                                .iter()
                                .map(|(k, v)| {
                                    Ok(format!("{}={}", key_str(k, &pat)?, string(v, &pat)?))
                                })
                                .collect::<Result<Vec<_>, String>>()?
                                .join(","),
                            _ => string(p, &pat)?,
                        };
                        let port: PortSpec = text.parse().map_err(|e| format!("{pat}: {e}"))?;
                        if let Some(pp) = port.published {
                            let key = (port.protocol.to_string(), pp);
                            if let Some(other) = published.insert(key, n.clone()) {
                                return Err(format!(
                                    "{pat}: port {pp}/{} is published twice (also by services.{other})",
                                    port.protocol
                                ));
                            }
                        }
                        req.publish.push(text);
                    }
                }
                "networks" => {
                    let names: Vec<String> = match sv {
                        Value::Mapping(m) => m
                            .keys()
                            .map(|k| key_str(k, &here))
                            .collect::<Result<_, _>>()?,
                        _ => strings(sv, &here)?,
                    };
                    if names.len() > 1 {
                        return Err(format!(
                            "{here}: mesh attaches a service to one network; {} are listed",
                            names.len()
                        ));
                    }
                    if let Some(first) = names.first() {
                        network = Some(
                            net_names
                                .get(first)
                                .cloned()
                                .ok_or_else(|| format!("{here}: network {first} is not defined under the top-level networks"))?,
                        );
                    }
                }
                "secrets" | "configs" => {
                    let secret = sk == "secrets";
                    let names = if secret { &secret_names } else { &config_names };
                    let Value::Sequence(refs) = sv else {
                        return Err(format!("{here}: expected a list"));
                    };
                    for (i, r) in refs.iter().enumerate() {
                        let rat = format!("{here}[{i}]");
                        let (source, mut fields) = match r {
                            Value::Mapping(m) => {
                                let mut source = None;
                                let mut fields = Vec::new();
                                for (k, v) in m {
                                    let k = key_str(k, &rat)?;
                                    let v = string(v, &rat)?;
                                    if k == "source" {
                                        source = Some(v);
                                    } else if matches!(
                                        k.as_str(),
                                        "target" | "uid" | "gid" | "mode"
                                    ) {
                                        fields.push(format!("{k}={v}"));
                                    } else {
                                        return Err(format!("{rat}: unknown key {k:?}"));
                                    }
                                }
                                (source.ok_or(format!("{rat}: no source"))?, fields)
                            }
                            _ => (string(r, &rat)?, Vec::new()),
                        };
                        let object = names.get(&source).ok_or_else(|| {
                            format!(
                                "{rat}: {} {source} is not defined under the top-level {sk}",
                                if secret { "secret" } else { "config" }
                            )
                        })?;
                        // The file keeps its short name inside the task, as in Swarm.
                        if !fields.iter().any(|f| f.starts_with("target=")) {
                            fields.push(if secret {
                                format!("target={source}")
                            } else {
                                format!("target=/{source}")
                            });
                        }
                        let spec = format!("source={object},{}", fields.join(","));
                        if secret {
                            req.secrets.push(spec);
                        } else {
                            req.configs.push(spec);
                        }
                    }
                }
                "healthcheck" => req.health = healthcheck(sv, &here)?,
                "deploy" => deploy_keys(sv, &here, &mut req, &mut warnings)?,
                "volumes" => return Err(format!("{here}: mesh has no volumes; remove them")),
                k if IGNORED_SERVICE_KEYS.contains(&k) => {
                    warnings.push(format!("Ignoring unsupported option {here}"))
                }
                other => return Err(format!("{at}: unknown key {other:?}")),
            }
        }
        if req.image.is_none() && req.command.is_empty() {
            return Err(format!("{at}: give an image or a command"));
        }
        req.network = Some(match network {
            Some(n) => n,
            None => {
                // Swarm's default network of a stack.
                let default = full("default");
                if !deploy.networks.iter().any(|x| x.name == default) {
                    deploy.networks.push(StackNetwork {
                        name: default.clone(),
                        subnet: None,
                        labels: labels.clone(),
                    });
                }
                default
            }
        });
        deploy.services.push(req);
    }
    Ok(Parsed { deploy, warnings })
}

fn healthcheck(v: &Value, at: &str) -> Result<HealthFlags, String> {
    let mut h = HealthFlags::default();
    for (k, v) in map(v, at)? {
        let k = key_str(k, at)?;
        let here = format!("{at}.{k}");
        match k.as_str() {
            "test" => {
                let t = match v {
                    Value::String(s) => vec!["CMD-SHELL".to_owned(), s.clone()],
                    _ => strings(v, &here)?,
                };
                match t.split_first() {
                    Some((kind, rest)) if kind == "CMD-SHELL" => {
                        h.health_cmd = Some(rest.join(" "))
                    }
                    Some((kind, rest)) if kind == "CMD" => {
                        h.health_cmd = Some(
                            shlex::try_join(rest.iter().map(String::as_str))
                                .map_err(|e| format!("{here}: {e}"))?,
                        )
                    }
                    Some((kind, _)) if kind == "NONE" => h.no_healthcheck = true,
                    _ => {
                        return Err(format!(
                            "{here}: expected [CMD, …], [CMD-SHELL, …] or [NONE]"
                        ));
                    }
                }
            }
            "interval" => h.health_interval = Some(string(v, &here)?),
            "timeout" => h.health_timeout = Some(string(v, &here)?),
            "start_period" => h.health_start_period = Some(string(v, &here)?),
            "retries" => {
                h.health_retries = Some(v.as_i64().ok_or(format!("{here}: expected a number"))?)
            }
            "disable" => h.no_healthcheck = v.as_bool().unwrap_or(false),
            other => return Err(format!("{at}: unknown key {other:?}")),
        }
    }
    Ok(h)
}

fn deploy_keys(
    v: &Value,
    at: &str,
    req: &mut ServiceCreate,
    warnings: &mut Vec<String>,
) -> Result<(), String> {
    for (k, v) in map(v, at)? {
        let k = key_str(k, at)?;
        let here = format!("{at}.{k}");
        match k.as_str() {
            "mode" => req.mode = Some(string(v, &here)?),
            "replicas" => {
                req.replicas = Some(v.as_i64().ok_or(format!("{here}: expected a number"))?)
            }
            "endpoint_mode" => {
                req.endpoint_mode = string(v, &here)?
                    .parse()
                    .map_err(|e| format!("{here}: {e}"))?
            }
            "labels" => req.labels.extend(list_or_map(v, &here)?),
            "placement" => {
                for (pk, pv) in map(v, &here)? {
                    let pk = key_str(pk, &here)?;
                    let pat = format!("{here}.{pk}");
                    match pk.as_str() {
                        "constraints" => req.constraints = strings(pv, &pat)?,
                        "max_replicas_per_node" => {
                            req.replicas_max_per_node =
                                Some(pv.as_i64().ok_or(format!("{pat}: expected a number"))?)
                        }
                        "preferences" => {
                            let Value::Sequence(prefs) = pv else {
                                return Err(format!("{pat}: expected a list"));
                            };
                            for p in prefs {
                                let spread = p
                                    .get("spread")
                                    .ok_or(format!("{pat}: only spread: preferences exist"))?;
                                req.placement_prefs
                                    .push(format!("spread={}", string(spread, &pat)?));
                            }
                        }
                        other => return Err(format!("{here}: unknown key {other:?}")),
                    }
                }
            }
            "restart_policy" => {
                let mut r = RestartFlags::default();
                for (rk, rv) in map(v, &here)? {
                    let rk = key_str(rk, &here)?;
                    let rat = format!("{here}.{rk}");
                    match rk.as_str() {
                        "condition" => r.restart_condition = Some(string(rv, &rat)?),
                        "delay" => r.restart_delay = Some(string(rv, &rat)?),
                        "max_attempts" => {
                            r.restart_max_attempts =
                                Some(rv.as_i64().ok_or(format!("{rat}: expected a number"))?)
                        }
                        "window" => r.restart_window = Some(string(rv, &rat)?),
                        other => return Err(format!("{here}: unknown key {other:?}")),
                    }
                }
                req.restart = r;
            }
            "update_config" | "rollback_config" => {
                let update = k == "update_config";
                let f = &mut req.rollout;
                for (uk, uv) in map(v, &here)? {
                    let uk = key_str(uk, &here)?;
                    let uat = format!("{here}.{uk}");
                    let s = string(uv, &uat)?;
                    let set = |u: &mut Option<String>, r: &mut Option<String>| {
                        if update {
                            *u = Some(s.clone())
                        } else {
                            *r = Some(s.clone())
                        }
                    };
                    match uk.as_str() {
                        "parallelism" => {
                            let n = uv.as_i64().ok_or(format!("{uat}: expected a number"))?;
                            if update {
                                f.update_parallelism = Some(n)
                            } else {
                                f.rollback_parallelism = Some(n)
                            }
                        }
                        "delay" => set(&mut f.update_delay, &mut f.rollback_delay),
                        "order" => set(&mut f.update_order, &mut f.rollback_order),
                        "failure_action" => {
                            set(&mut f.update_failure_action, &mut f.rollback_failure_action)
                        }
                        "monitor" => set(&mut f.update_monitor, &mut f.rollback_monitor),
                        "max_failure_ratio" => set(
                            &mut f.update_max_failure_ratio,
                            &mut f.rollback_max_failure_ratio,
                        ),
                        other => return Err(format!("{here}: unknown key {other:?}")),
                    }
                }
                let _: &RolloutFlags = f;
            }
            "resources" => warnings.push(format!(
                "Ignoring unsupported option {here} (mesh sets no resource limits yet)"
            )),
            other => return Err(format!("{at}: unknown key {other:?}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Parsed, String> {
        parse("st", text, Path::new("/nonexistent"), false)
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
      placement: { constraints: ["node.labels.zone==a"], max_replicas_per_node: 1 }
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
        let web = d.services.iter().find(|s| s.name == "st_web").unwrap();
        assert_eq!(web.network.as_deref(), Some("st_front"));
        assert_eq!(web.replicas, Some(2));
        assert_eq!(web.labels[STACK_LABEL], "st");
        let api = d.services.iter().find(|s| s.name == "st_api").unwrap();
        assert_eq!(api.network.as_deref(), Some("st_default"));
        assert_eq!(api.env, vec!["MODE=prod"]);
        assert!(
            d.networks
                .iter()
                .any(|n| n.name == "st_front" && n.subnet.as_deref() == Some("10.9.0.0/24"))
        );
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
}
