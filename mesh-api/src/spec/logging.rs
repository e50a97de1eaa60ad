//! Docker's `--log-driver` and `--log-opt`, as far as mesh keeps task output itself: the
//! node stores it in files it rotates (json-file's and local's `max-size`/`max-file`) and
//! `service logs` reads them. Drivers that ship output elsewhere (syslog, journald, fluentd,
//! …) are refused rather than silently ignored.
//!
//! The node's agent.toml has the last word: a service may only ask for less than the node
//! allows, so a service cannot fill a node's disk.
//!
//! json-file's `labels`, `labels-regex`, `env` and `env-regex` name container labels and
//! environment variables whose values every line of the task's output carries: what
//! `service logs --details` shows.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{bytes, bytes_size};

/// The drivers whose options mesh honours.
pub const LOG_DRIVERS: [&str; 2] = ["json-file", "local"];

/// A task's log settings: Docker's `LogDriver { Name, Options }` with the options typed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogDriver {
    /// `json-file` or `local` (empty: the node's default, as `--log-opt` alone asks).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Rotate a log file before it grows past this many bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<u64>,
    /// Files kept, the current one included (Docker's `max-file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_file: Option<u32>,
    /// Container labels each line carries (`labels=a,b`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Container labels whose keys match (`labels-regex`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels_regex: Option<String>,
    /// Environment variables each line carries (`env=A,B`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Environment variables whose names match (`env-regex`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_regex: Option<String>,
}

impl LogDriver {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// `--log-driver` and `--log-opt KEY=VALUE`s (`what` names the flags or compose key in
    /// errors). None when neither says anything.
    pub fn parse(
        what: &str,
        driver: Option<&str>,
        opts: &[(String, String)],
    ) -> Result<Option<Self>, String> {
        let mut d = LogDriver {
            name: driver.unwrap_or_default().trim().to_owned(),
            ..Default::default()
        };
        for (k, v) in opts {
            d.set(what, k, v)?;
        }
        d.validate().map_err(|e| format!("{what}: {e}"))?;
        Ok((!d.is_empty()).then_some(d))
    }

    /// One option, as Docker's json-file driver spells it.
    pub fn set(&mut self, what: &str, key: &str, value: &str) -> Result<(), String> {
        match key.trim() {
            "max-size" => {
                let n = bytes(&format!("{what} max-size"), value)?;
                if n == 0 {
                    return Err(format!(
                        "{what} max-size must be more than 0 (e.g. max-size=10m)"
                    ));
                }
                self.max_size = Some(n);
            }
            "max-file" => {
                let n = value.trim().parse::<u32>().ok().filter(|n| *n >= 1);
                self.max_file = Some(n.ok_or_else(|| {
                    format!("{what} max-file {value:?}: use a number of files, 1 or more")
                })?);
            }
            "labels" => self.labels = names(what, "labels", value)?,
            "env" => self.env = names(what, "env", value)?,
            "labels-regex" => self.labels_regex = Some(pattern(what, "labels-regex", value)?),
            "env-regex" => self.env_regex = Some(pattern(what, "env-regex", value)?),
            other => {
                return Err(format!(
                    "{what}: log option {other:?} is not supported: mesh keeps task logs on the \
                     node and honours max-size, max-file, labels, labels-regex, env and env-regex"
                ));
            }
        }
        Ok(())
    }

    /// What each line of a task's output carries, from its container labels and environment
    /// (json-file's extra attributes; a name listed but not set is left out, as Docker does).
    pub fn attributes(
        &self,
        labels: &BTreeMap<String, String>,
        env: &[(String, String)],
    ) -> BTreeMap<String, String> {
        let matches = |re: &Option<String>, key: &str| {
            re.as_deref()
                .and_then(|r| regex::Regex::new(r).ok())
                .is_some_and(|r| r.is_match(key))
        };
        let mut out = BTreeMap::new();
        for (k, v) in labels {
            if self.labels.contains(k) || matches(&self.labels_regex, k) {
                out.insert(k.clone(), v.clone());
            }
        }
        for (k, v) in env {
            if self.env.contains(k) || matches(&self.env_regex, k) {
                out.insert(k.clone(), v.clone());
            }
        }
        out
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.name.is_empty() && !LOG_DRIVERS.contains(&self.name.as_str()) {
            return Err(format!(
                "log driver {:?} is not supported: mesh keeps task logs on the node (`service \
                 logs` reads them); use json-file or local, with --log-opt max-size=… and \
                 max-file=…",
                self.name
            ));
        }
        if self.max_size == Some(0) || self.max_file == Some(0) {
            return Err("max-size and max-file must be more than 0".into());
        }
        for (key, re) in [
            ("labels-regex", &self.labels_regex),
            ("env-regex", &self.env_regex),
        ] {
            if let Some(re) = re {
                pattern("log option", key, re)?;
            }
        }
        Ok(())
    }

    /// The options as `docker service inspect` shows them.
    pub fn options(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(n) = self.max_file {
            out.push(("max-file".to_owned(), n.to_string()));
        }
        if let Some(n) = self.max_size {
            out.push(("max-size".to_owned(), bytes_size(n)));
        }
        if !self.labels.is_empty() {
            out.push(("labels".to_owned(), self.labels.join(",")));
        }
        if let Some(re) = &self.labels_regex {
            out.push(("labels-regex".to_owned(), re.clone()));
        }
        if !self.env.is_empty() {
            out.push(("env".to_owned(), self.env.join(",")));
        }
        if let Some(re) = &self.env_regex {
            out.push(("env-regex".to_owned(), re.clone()));
        }
        out.sort();
        out
    }
}

/// `labels=a,b`: the names, without blanks.
fn names(what: &str, key: &str, value: &str) -> Result<Vec<String>, String> {
    let names: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    if names.is_empty() {
        return Err(format!(
            "{what} {key}: name one or more, separated by commas (e.g. {key}=a,b)"
        ));
    }
    Ok(names)
}

/// A regular expression (Go's RE2 syntax, as Docker's; the `regex` crate reads the same).
fn pattern(what: &str, key: &str, value: &str) -> Result<String, String> {
    regex::Regex::new(value)
        .map(|_| value.to_owned())
        .map_err(|e| format!("{what} {key} {value:?} is not a regular expression: {e}"))
}

/// The rotation a task gets: what its service asks for, never more than the node allows.
pub fn capped(asked: Option<&LogDriver>, node_max_size: u64, node_max_file: u32) -> (u64, u32) {
    let size = asked
        .and_then(|d| d.max_size)
        .map_or(node_max_size, |s| s.min(node_max_size));
    let files = asked
        .and_then(|d| d.max_file)
        .map_or(node_max_file, |f| f.min(node_max_file));
    (size.max(1), files.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(o: &[(&str, &str)]) -> Vec<(String, String)> {
        o.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn options_read_like_json_files() {
        let d = LogDriver::parse(
            "--log-opt",
            Some("json-file"),
            &opts(&[("max-size", "10m"), ("max-file", "3")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(d.max_size, Some(10 << 20));
        assert_eq!(d.max_file, Some(3));
        assert_eq!(
            d.options(),
            opts(&[("max-file", "3"), ("max-size", "10MiB")])
        );
        // What inspect shows reads back (docker stack deploy and update send it again).
        let again = LogDriver::parse("--log-opt", Some("json-file"), &d.options()).unwrap();
        assert_eq!(again, Some(d.clone()));
        assert_eq!(LogDriver::parse("--log-opt", None, &[]).unwrap(), None);
        let e = LogDriver::parse("--log-driver", Some("syslog"), &[]).unwrap_err();
        assert!(e.contains("\"syslog\" is not supported"), "{e}");
        let e = LogDriver::parse("--log-opt", None, &opts(&[("compress", "true")])).unwrap_err();
        assert!(e.contains("\"compress\""), "{e}");
        for (k, v) in [("max-size", "0"), ("max-size", "ten"), ("max-file", "0")] {
            assert!(
                LogDriver::parse("--log-opt", None, &opts(&[(k, v)])).is_err(),
                "{k}={v}"
            );
        }
    }

    #[test]
    fn labels_and_env_name_what_each_line_carries() {
        let d = LogDriver::parse(
            "--log-opt",
            None,
            &opts(&[
                ("labels", "team, tier"),
                ("env", "REGION"),
                ("env-regex", "^APP_"),
            ]),
        )
        .unwrap()
        .unwrap();
        let labels = BTreeMap::from([
            ("team".to_owned(), "web".to_owned()),
            ("unlisted".to_owned(), "x".to_owned()),
        ]);
        let env = [
            ("REGION", "eu"),
            ("APP_MODE", "fast"),
            ("SECRET_TOKEN", "s"),
            ("MY_APP_X", "no"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(
            d.attributes(&labels, &env),
            BTreeMap::from(
                [("APP_MODE", "fast"), ("REGION", "eu"), ("team", "web")]
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            ),
            "listed and matching names only; `tier` is not set"
        );
        assert_eq!(
            d.options(),
            opts(&[
                ("env", "REGION"),
                ("env-regex", "^APP_"),
                ("labels", "team,tier")
            ])
        );
        let again = LogDriver::parse("--log-opt", None, &d.options()).unwrap();
        assert_eq!(again, Some(d));

        for (k, v, says) in [
            ("env-regex", "(", "is not a regular expression"),
            ("labels", " , ", "name one or more"),
        ] {
            let e = LogDriver::parse("--log-opt", None, &opts(&[(k, v)])).unwrap_err();
            assert!(e.contains(says), "{k}={v}: {e}");
        }
    }

    #[test]
    fn a_service_only_lowers_what_the_node_allows() {
        let node = (10 << 20, 2);
        assert_eq!(capped(None, node.0, node.1), node);
        let small = LogDriver {
            max_size: Some(4096),
            max_file: Some(5),
            ..Default::default()
        };
        assert_eq!(capped(Some(&small), node.0, node.1), (4096, 2));
        let big = LogDriver {
            max_size: Some(1 << 40),
            max_file: Some(1),
            ..Default::default()
        };
        assert_eq!(capped(Some(&big), node.0, node.1), (10 << 20, 1));
    }
}
