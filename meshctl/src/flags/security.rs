//! `--cap-add`, `--cap-drop`, `--read-only`, `--sysctl`, `--ulimit` and `--init` as the typed
//! `Security` of a task template; names are checked here so a typo fails before anything is
//! sent.

use std::collections::BTreeMap;

use clap::Args;
use mesh_api::spec::{Security, capability, sysctl, ulimit};

#[derive(Args, Debug, Clone, Default)]
pub struct SecurityArgs {
    /// Add a Linux capability (NET_BIND_SERVICE, ALL, ...); process tasks start with none.
    #[arg(long = "cap-add")]
    pub cap_add: Vec<String>,
    /// Drop a Linux capability (NET_RAW, ALL, ...).
    #[arg(long = "cap-drop")]
    pub cap_drop: Vec<String>,
    /// Mount the task's root file system read-only.
    #[arg(long = "read-only")]
    pub read_only: bool,
    /// A namespaced kernel parameter (net.core.somaxconn=1024).
    #[arg(long)]
    pub sysctl: Vec<String>,
    /// A resource limit: NAME=SOFT[:HARD], e.g. nofile=4096:4096.
    #[arg(long)]
    pub ulimit: Vec<String>,
    /// Run an init inside the task that forwards signals and reaps processes.
    #[arg(long)]
    pub init: bool,
}

impl SecurityArgs {
    pub fn security(&self) -> Result<Security, String> {
        Ok(Security {
            cap_add: capabilities("--cap-add", &self.cap_add)?,
            cap_drop: capabilities("--cap-drop", &self.cap_drop)?,
            read_only: self.read_only,
            sysctls: sysctls("--sysctl", &self.sysctl)?,
            ulimits: self
                .ulimit
                .iter()
                .map(|u| ulimit(u).map_err(|e| format!("--ulimit: {e}")))
                .collect::<Result<_, _>>()?,
            init: self.init,
        })
    }
}

/// Capability names, checked, as written.
pub fn capabilities(what: &str, raw: &[String]) -> Result<Vec<String>, String> {
    raw.iter()
        .map(|c| {
            capability(c)
                .map(|_| c.trim().to_owned())
                .map_err(|e| format!("{what}: {e}"))
        })
        .collect()
}

/// `NAME=VALUE` sysctls, namespaced ones only.
pub fn sysctls(what: &str, raw: &[String]) -> Result<BTreeMap<String, String>, String> {
    raw.iter()
        .map(|s| sysctl(s).map_err(|e| format!("{what}: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn flags_become_a_typed_security() {
        let a = SecurityArgs {
            cap_add: s(&["NET_BIND_SERVICE"]),
            cap_drop: s(&["ALL"]),
            read_only: true,
            sysctl: s(&["net.core.somaxconn=1024"]),
            ulimit: s(&["nofile=4096:4096"]),
            init: true,
        };
        let sec = a.security().unwrap();
        assert_eq!(sec.cap_add, ["NET_BIND_SERVICE"]);
        assert_eq!(sec.sysctls["net.core.somaxconn"], "1024");
        assert_eq!(sec.ulimits[0].hard, 4096);
        assert!(sec.read_only && sec.init);
    }

    #[test]
    fn bad_names_say_which_flag() {
        let bad = |a: SecurityArgs| a.security().unwrap_err();
        let e = bad(SecurityArgs {
            cap_add: s(&["NET_BIND"]),
            ..Default::default()
        });
        assert!(e.starts_with("--cap-add: unknown capability"), "{e}");
        let e = bad(SecurityArgs {
            sysctl: s(&["kernel.pid_max=10"]),
            ..Default::default()
        });
        assert!(
            e.contains("--sysctl: sysctl kernel.pid_max is not namespaced"),
            "{e}"
        );
        let e = bad(SecurityArgs {
            ulimit: s(&["nofile=2:1"]),
            ..Default::default()
        });
        assert!(e.contains("--ulimit"), "{e}");
    }
}
