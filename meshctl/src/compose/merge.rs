//! Several `-c` files, merged in order as Docker merges them: mappings key by key, the later
//! file winning a scalar; sequences appended, except a service's `command`, `entrypoint` and
//! `healthcheck.test`, which the later file replaces; `ports`, `volumes`, `secrets` and
//! `configs` by their unique key (the later entry replaces one with the same key);
//! `environment` and `labels` as maps whichever way each file writes them.

use serde_yaml::{Mapping, Value};

/// `over` merged onto `base`; `path` is where they are (`services.web`), which decides the
/// rule for sequences.
pub fn merge(base: Value, over: Value, path: &[&str]) -> Value {
    match (base, over) {
        (Value::Mapping(mut b), Value::Mapping(o)) => {
            for (k, ov) in o {
                let key = k.as_str().unwrap_or_default().to_owned();
                let mut here = path.to_vec();
                here.push(&key);
                let merged = match b.remove(&k) {
                    Some(bv) => merge(bv, ov, &here),
                    None => ov,
                };
                b.insert(k, merged);
            }
            Value::Mapping(b)
        }
        (b, o) if is_service_key(path, &["environment", "labels"]) || is_deploy_labels(path) => {
            match (as_map(&b), as_map(&o)) {
                (Some(mut bm), Some(om)) => {
                    for (k, v) in om {
                        bm.insert(k, v);
                    }
                    Value::Mapping(bm)
                }
                _ => o,
            }
        }
        (Value::Sequence(b), Value::Sequence(o)) => {
            if is_service_key(path, &["command", "entrypoint"])
                || (path.len() == 4
                    && path[0] == "services"
                    && path[2] == "healthcheck"
                    && path[3] == "test")
            {
                return Value::Sequence(o);
            }
            let unique: Option<fn(&Value) -> Option<String>> = match service_key(path) {
                Some("ports") => Some(port_key),
                Some("volumes") => Some(volume_key),
                Some("secrets") | Some("configs") => Some(source_key),
                _ => None,
            };
            let mut out = b;
            for item in o {
                let replaced = unique.and_then(|key| {
                    let k = key(&item)?;
                    out.iter().position(|x| key(x).as_deref() == Some(&k))
                });
                match replaced {
                    Some(i) => out[i] = item,
                    None => out.push(item),
                }
            }
            Value::Sequence(out)
        }
        (_, o) => o,
    }
}

/// `services.<name>.<key>`'s key, if `path` is one.
fn service_key<'a>(path: &[&'a str]) -> Option<&'a str> {
    (path.len() == 3 && path[0] == "services").then(|| path[2])
}

fn is_service_key(path: &[&str], keys: &[&str]) -> bool {
    service_key(path).is_some_and(|k| keys.contains(&k))
}

fn is_deploy_labels(path: &[&str]) -> bool {
    path.len() == 4 && path[0] == "services" && path[2] == "deploy" && path[3] == "labels"
}

/// `KEY=VALUE` lists and `KEY: VALUE` maps as one map.
fn as_map(v: &Value) -> Option<Mapping> {
    match v {
        Value::Mapping(m) => Some(m.clone()),
        Value::Sequence(items) => Some(
            items
                .iter()
                .filter_map(Value::as_str)
                .map(|e| {
                    let (k, v) = e.split_once('=').unwrap_or((e, ""));
                    (Value::String(k.into()), Value::String(v.into()))
                })
                .collect(),
        ),
        _ => None,
    }
}

/// A port's identity: what it publishes and where it goes (short or long syntax).
fn port_key(v: &Value) -> Option<String> {
    match v {
        Value::Mapping(m) => {
            let f = |k: &str| m.get(k).map(scalar).unwrap_or_default();
            Some(format!(
                "{}:{}/{}",
                f("published"),
                f("target"),
                m.get("protocol")
                    .map(scalar)
                    .unwrap_or_else(|| "tcp".into())
            ))
        }
        other => {
            let s = scalar(other);
            Some(if s.contains('/') {
                s
            } else {
                format!("{s}/tcp")
            })
        }
    }
}

/// A volume's identity: its target in the task.
fn volume_key(v: &Value) -> Option<String> {
    match v {
        Value::Mapping(m) => m.get("target").map(scalar),
        other => {
            let s = scalar(other);
            let parts: Vec<&str> = s.split(':').collect();
            Some(match parts.len() {
                1 => parts[0].to_owned(),
                _ => parts[1].to_owned(),
            })
        }
    }
}

/// A secret's or config's identity: its source.
fn source_key(v: &Value) -> Option<String> {
    match v {
        Value::Mapping(m) => m.get("source").map(scalar),
        other => Some(scalar(other)),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn y(s: &str) -> Value {
        serde_yaml::from_str(s).unwrap()
    }

    #[test]
    fn later_files_win_scalars_and_add_keys() {
        let m = merge(
            y("services:\n  web:\n    image: web:1\n    deploy: {replicas: 2}\n"),
            y("services:\n  web:\n    image: web:2\n    hostname: h\n  db:\n    image: pg\n"),
            &[],
        );
        assert_eq!(m["services"]["web"]["image"], "web:2");
        assert_eq!(m["services"]["web"]["hostname"], "h");
        assert_eq!(m["services"]["web"]["deploy"]["replicas"], 2);
        assert_eq!(m["services"]["db"]["image"], "pg");
    }

    #[test]
    fn sequences_append_but_commands_are_replaced_and_unique_keys_merge() {
        let m = merge(
            y(
                "services:\n  web:\n    command: [a, b]\n    dns: [1.1.1.1]\n    ports: ['8080:80', '9090:90']\n    secrets: [pw]\n    environment: [A=1, B=2]\n",
            ),
            y(
                "services:\n  web:\n    command: [c]\n    dns: [8.8.8.8]\n    ports: ['8080:80', {published: 7070, target: 70}]\n    secrets: [{source: pw, target: other}]\n    environment: {B: '3', C: '4'}\n",
            ),
            &[],
        );
        let web = &m["services"]["web"];
        assert_eq!(web["command"], y("[c]"));
        assert_eq!(web["dns"], y("[1.1.1.1, 8.8.8.8]"));
        assert_eq!(web["ports"].as_sequence().unwrap().len(), 3);
        assert_eq!(web["secrets"], y("[{source: pw, target: other}]"));
        assert_eq!(web["environment"], y("{A: '1', B: '3', C: '4'}"));
    }
}
