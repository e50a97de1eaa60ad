//! Docker's `--log-driver` and `--log-opt`, as far as mesh keeps task output itself: the
//! node stores it in files it rotates (json-file's and local's `max-size`/`max-file`) and
//! `service logs` reads them. Drivers that ship output elsewhere (syslog, journald, fluentd,
//! …) are refused rather than silently ignored.
//!
//! The node's agent.toml has the last word: a service may only ask for less than the node
//! allows, so a service cannot fill a node's disk.

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
            other => {
                return Err(format!(
                    "{what}: log option {other:?} is not supported: mesh keeps task logs on the \
                     node and honours max-size and max-file"
                ));
            }
        }
        Ok(())
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
        out
    }
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
