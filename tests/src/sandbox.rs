//! The shipped systemd unit's sandbox (`packaging/mesh-agent.service`), reproduced where
//! PID 1 is not systemd: read from the unit file itself, so a change to the unit is what the
//! tests run under.
//!
//! What is reproduced is what decides whether the agent and its tasks can work: the file
//! system (`ProtectSystem=strict` with its `ReadWritePaths`, `ProtectHome`, `PrivateTmp`),
//! the capability bounding set and `NoNewPrivileges` — all inherited by every task the
//! agent starts. Filters systemd installs with seccomp (`RestrictAddressFamilies`,
//! `SystemCallArchitectures`, …) are not: [`UnitSandbox::not_reproduced`] lists them.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::Netns;

/// The unit's sandbox settings.
#[derive(Clone, Debug)]
pub struct UnitSandbox {
    /// Writable paths; those the unit marks optional (`-`) only when they exist.
    pub read_write: Vec<String>,
    /// Capability names as setpriv takes them (`net_admin`).
    pub bounding: Vec<String>,
    pub no_new_privileges: bool,
    /// `ProtectHome=yes`: /home, /root and /run/user hidden. (`read-only` needs nothing more
    /// than `ProtectSystem=strict` already does.)
    pub protect_home: bool,
    pub private_tmp: bool,
    pub umask: Option<String>,
    /// Directives that restrict the service but are not reproduced here.
    pub not_reproduced: Vec<String>,
}

/// The unit file in the repository.
pub fn shipped_unit() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/mesh-agent.service")
}

impl UnitSandbox {
    pub fn shipped() -> Result<Self> {
        let path = shipped_unit();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text)
    }

    pub fn parse(unit: &str) -> Result<Self> {
        let mut s = Self {
            read_write: Vec::new(),
            bounding: Vec::new(),
            no_new_privileges: false,
            protect_home: false,
            private_tmp: false,
            umask: None,
            not_reproduced: Vec::new(),
        };
        let mut bounding_set = false;
        for line in unit.lines().map(str::trim) {
            if line.starts_with('#') || line.starts_with('[') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let yes = value == "yes" || value == "true";
            match key {
                "ProtectSystem" if value != "strict" => {
                    bail!("ProtectSystem={value}: only strict is reproduced")
                }
                "ProtectSystem" => {}
                "ReadWritePaths" => s
                    .read_write
                    .extend(value.split_whitespace().map(str::to_owned)),
                "CapabilityBoundingSet" => {
                    bounding_set = true;
                    s.bounding.extend(
                        value
                            .split_whitespace()
                            .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase()),
                    );
                }
                "NoNewPrivileges" => s.no_new_privileges = yes,
                "ProtectHome" => s.protect_home = yes,
                "PrivateTmp" => s.private_tmp = yes,
                "UMask" => s.umask = Some(value.to_owned()),
                "RestrictAddressFamilies"
                | "SystemCallArchitectures"
                | "SystemCallFilter"
                | "ProtectHostname"
                | "ProtectClock"
                | "ProtectKernelModules"
                | "ProtectKernelLogs"
                | "ProtectKernelTunables"
                | "RestrictRealtime"
                | "RestrictSUIDSGID"
                | "LockPersonality"
                | "MemoryDenyWriteExecute"
                | "RestrictNamespaces"
                | "PrivateDevices" => s.not_reproduced.push(line.to_owned()),
                _ => {}
            }
        }
        if !bounding_set {
            s.bounding.clear();
        }
        Ok(s)
    }

    /// The unit's writable paths that exist here.
    fn writable(&self) -> Vec<String> {
        self.read_write
            .iter()
            .filter_map(|p| match p.strip_prefix('-') {
                Some(optional) => Path::new(optional).exists().then(|| optional.to_owned()),
                None => Some(p.clone()),
            })
            .collect()
    }

    /// `program` run in `ns` under the sandbox, with `binds` (host directory → path inside)
    /// mounted first: each node gets its own `/etc/mesh` and `/var/lib/mesh`, as each host of
    /// a real cluster has. The command keeps the program's PID (every step execs).
    pub fn command(&self, ns: &Netns, binds: &[(PathBuf, &str)], program: &Path) -> Command {
        let writable = self.writable().join(" ");
        let mut script = String::from("set -e\n");
        for (i, _) in binds.iter().enumerate() {
            script.push_str(&format!("mount --bind \"$B{i}\" \"$T{i}\"\n"));
        }
        if self.private_tmp {
            script.push_str(
                "mount -t tmpfs -o mode=1777 tmpfs /tmp\nmount -t tmpfs -o mode=1777 tmpfs /var/tmp\n",
            );
        }
        if self.protect_home {
            script.push_str(
                "for d in /home /root /run/user; do\n  \
                   if [ -d \"$d\" ]; then mount -t tmpfs -o ro,mode=000 tmpfs \"$d\"; fi\n\
                 done\n",
            );
        }
        // Writable paths become mounts of their own, so making every other mount read-only
        // (ProtectSystem=strict) leaves them as they are.
        script.push_str(&format!(
            "for p in {writable}; do mount --rbind \"$p\" \"$p\"; done\n\
             awk '{{print $5}}' /proc/self/mountinfo | sort -u | while read -r mp; do\n  \
               case \"$mp\" in /dev|/dev/*|/proc|/proc/*|/sys|/sys/*) continue;; esac\n  \
               keep=0\n  \
               for p in {writable} /tmp /var/tmp; do\n    \
                 case \"$mp\" in \"$p\"|\"$p\"/*) keep=1;; esac\n  \
               done\n  \
               if [ $keep = 0 ]; then mount -o remount,bind,ro \"$mp\"; fi\n\
             done\n"
        ));
        if let Some(u) = &self.umask {
            script.push_str(&format!("umask {u}\n"));
        }
        let mut setpriv = vec!["exec setpriv".to_owned()];
        if self.no_new_privileges {
            setpriv.push("--no-new-privs".into());
        }
        if !self.bounding.is_empty() {
            let caps: Vec<String> = self.bounding.iter().map(|c| format!("+{c}")).collect();
            setpriv.push(format!("--bounding-set=-all,{}", caps.join(",")));
        }
        script.push_str(&setpriv.join(" "));
        script.push_str(" \"$@\"\n");

        let mut cmd = ns.command("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(script)
            .arg("sh")
            .arg(program);
        for (i, (host, inside)) in binds.iter().enumerate() {
            cmd.env(format!("B{i}"), host).env(format!("T{i}"), inside);
        }
        cmd
    }
}

/// Directories the unit's ExecStartPre makes (`mkdir -p`), made here too when missing and
/// removed again on drop, so a machine without mesh installed is left as it was.
pub struct MadeDirs(Vec<PathBuf>);

impl MadeDirs {
    pub fn ensure(paths: &[&str]) -> Result<Self> {
        let mut made = Vec::new();
        for p in paths {
            let p = PathBuf::from(p);
            if !p.exists() {
                std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
                made.push(p);
            }
        }
        Ok(Self(made))
    }
}

impl Drop for MadeDirs {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = std::fs::remove_dir(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_unit_is_read() {
        let s = UnitSandbox::shipped().unwrap();
        assert!(s.read_write.iter().any(|p| p == "/etc/mesh"), "{s:?}");
        assert!(s.private_tmp, "{s:?}");
        assert!(
            !s.protect_home,
            "read-only, not hidden: root's podman reads /root: {s:?}"
        );
        assert!(s.bounding.is_empty() && !s.no_new_privileges, "{s:?}");
    }
}
