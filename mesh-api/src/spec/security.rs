//! The names `--cap-add`, `--sysctl` and `--ulimit` take, checked the same way by the CLI,
//! compose and the agent: a name mesh cannot honour is an error, never silently dropped.

use super::{Security, Ulimit};

/// Linux capabilities by number, as Docker names them (without `CAP_`).
pub const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// One capability or all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    All,
    /// The kernel's number (`CAP_NET_BIND_SERVICE` = 10).
    One(u8),
}

/// `NET_BIND_SERVICE`, `CAP_NET_BIND_SERVICE`, `net_bind_service` or `ALL`, as Docker reads
/// them.
pub fn capability(name: &str) -> Result<Capability, String> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    if bare == "ALL" {
        return Ok(Capability::All);
    }
    CAPABILITIES
        .iter()
        .position(|c| *c == bare)
        .map(|n| Capability::One(n as u8))
        .ok_or_else(|| {
            format!(
                "unknown capability {name:?}: use a name such as NET_BIND_SERVICE or SYS_TIME \
                 (see capabilities(7)), or ALL"
            )
        })
}

/// The capabilities a task keeps: none, then `add`, then minus `drop` (so `--cap-add ALL
/// --cap-drop SYS_ADMIN` is every one but SYS_ADMIN). A bit per capability number.
pub fn capability_set(add: &[String], drop: &[String]) -> Result<u64, String> {
    let mask = |names: &[String]| -> Result<u64, String> {
        names.iter().try_fold(0u64, |m, n| {
            Ok(m | match capability(n)? {
                Capability::All => (1u64 << CAPABILITIES.len()) - 1,
                Capability::One(c) => 1u64 << c,
            })
        })
    };
    Ok(mask(add)? & !mask(drop)?)
}

/// Sysctls that belong to a task's own namespaces (Docker's list): `net.*` (network),
/// `kernel.msg*`, `kernel.sem`, `kernel.shm*` and `fs.mqueue.*` (IPC). Any other would change
/// the whole node.
pub fn check_sysctl(name: &str) -> Result<(), String> {
    const IPC: [&str; 8] = [
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    let well_formed = !name.is_empty()
        && name.split('.').all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
        });
    if !well_formed {
        return Err(format!(
            "invalid sysctl name {name:?}: use dotted names such as net.core.somaxconn"
        ));
    }
    if name.starts_with("net.") || name.starts_with("fs.mqueue.") || IPC.contains(&name) {
        return Ok(());
    }
    Err(format!(
        "sysctl {name} is not namespaced: it would change the whole node, not just the task; \
         only net.*, fs.mqueue.*, kernel.msg*, kernel.sem and kernel.shm* may be set"
    ))
}

/// `--ulimit` names as Docker takes them, with their resource numbers.
pub const ULIMITS: [(&str, u32); 16] = [
    ("cpu", 0),
    ("fsize", 1),
    ("data", 2),
    ("stack", 3),
    ("core", 4),
    ("rss", 5),
    ("nproc", 6),
    ("nofile", 7),
    ("memlock", 8),
    ("as", 9),
    ("locks", 10),
    ("sigpending", 11),
    ("msgqueue", 12),
    ("nice", 13),
    ("rtprio", 14),
    ("rttime", 15),
];

/// `nofile=4096:8192` or `nofile=4096` (soft = hard), as Docker's `--ulimit`.
pub fn ulimit(s: &str) -> Result<Ulimit, String> {
    let bad = || format!("invalid ulimit {s:?}: use NAME=SOFT[:HARD], e.g. nofile=4096:8192");
    let (name, values) = s.split_once('=').ok_or_else(bad)?;
    let (soft, hard) = match values.split_once(':') {
        Some((s, h)) => (s, h),
        None => (values, values),
    };
    let num = |v: &str| v.trim().parse::<u64>().map_err(|_| bad());
    let u = Ulimit {
        name: name.trim().to_owned(),
        soft: num(soft)?,
        hard: num(hard)?,
    };
    check_ulimit(&u)?;
    Ok(u)
}

/// Known name, soft within hard.
pub fn check_ulimit(u: &Ulimit) -> Result<u32, String> {
    let Some((_, res)) = ULIMITS.iter().find(|(n, _)| *n == u.name) else {
        let names: Vec<&str> = ULIMITS.iter().map(|(n, _)| *n).collect();
        return Err(format!(
            "unknown ulimit {:?}: use one of {}",
            u.name,
            names.join(", ")
        ));
    };
    if u.soft > u.hard {
        return Err(format!(
            "ulimit {}: the soft limit {} is above the hard limit {}",
            u.name, u.soft, u.hard
        ));
    }
    Ok(*res)
}

/// `NAME=VALUE` of `--sysctl`.
pub fn sysctl(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| {
        format!("invalid sysctl {s:?}: use NAME=VALUE, e.g. net.core.somaxconn=1024")
    })?;
    check_sysctl(k.trim())?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

impl Security {
    /// Every name known and every sysctl namespaced: what the agent checks again before it
    /// starts anything.
    pub fn validate(&self) -> Result<(), String> {
        capability_set(&self.cap_add, &self.cap_drop)?;
        for k in self.sysctls.keys() {
            check_sysctl(k)?;
        }
        for u in &self.ulimits {
            check_ulimit(u)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_read_as_docker_reads_them() {
        assert_eq!(capability("NET_BIND_SERVICE"), Ok(Capability::One(10)));
        assert_eq!(capability("cap_net_bind_service"), Ok(Capability::One(10)));
        assert_eq!(capability("SYS_ADMIN"), Ok(Capability::One(21)));
        assert_eq!(capability("CHECKPOINT_RESTORE"), Ok(Capability::One(40)));
        assert_eq!(capability("all"), Ok(Capability::All));
        let e = capability("NET_BIND").unwrap_err();
        assert!(e.contains("unknown capability \"NET_BIND\""), "{e}");
        assert!(capability("").is_err());
    }

    #[test]
    fn a_task_keeps_what_is_added_minus_what_is_dropped() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(capability_set(&[], &[]), Ok(0));
        assert_eq!(
            capability_set(&s(&["NET_BIND_SERVICE"]), &s(&["ALL"])),
            Ok(0)
        );
        assert_eq!(
            capability_set(&s(&["NET_BIND_SERVICE", "NET_RAW"]), &[]),
            Ok((1 << 10) | (1 << 13))
        );
        let all_but_admin = capability_set(&s(&["ALL"]), &s(&["SYS_ADMIN"])).unwrap();
        assert_eq!(all_but_admin.count_ones(), 40);
        assert_eq!(all_but_admin & (1 << 21), 0);
        assert!(capability_set(&s(&["BOGUS"]), &[]).is_err());
        assert!(capability_set(&[], &s(&["BOGUS"])).is_err());
    }

    #[test]
    fn only_namespaced_sysctls_pass() {
        for ok in [
            "net.core.somaxconn",
            "net.ipv4.ip_unprivileged_port_start",
            "kernel.shmmax",
            "kernel.sem",
            "fs.mqueue.msg_max",
        ] {
            assert_eq!(check_sysctl(ok), Ok(()), "{ok}");
        }
        for host in [
            "kernel.pid_max",
            "vm.overcommit_memory",
            "fs.file-max",
            "kernel.hostname",
        ] {
            let e = check_sysctl(host).unwrap_err();
            assert!(e.contains("not namespaced"), "{host}: {e}");
        }
        for bad in ["", "net..x", "net/core", "../../etc", "net.core.x y"] {
            assert!(check_sysctl(bad).unwrap_err().contains("invalid"), "{bad}");
        }
        assert_eq!(
            sysctl("net.core.somaxconn=1024"),
            Ok(("net.core.somaxconn".into(), "1024".into()))
        );
        assert!(sysctl("net.core.somaxconn").is_err());
    }

    #[test]
    fn ulimits_are_read_as_docker_reads_them() {
        assert_eq!(
            ulimit("nofile=4096:8192"),
            Ok(Ulimit {
                name: "nofile".into(),
                soft: 4096,
                hard: 8192
            })
        );
        assert_eq!(ulimit("nproc=100").unwrap().hard, 100);
        assert!(ulimit("nofile=9:8").unwrap_err().contains("above the hard"));
        assert!(ulimit("files=1:1").unwrap_err().contains("unknown ulimit"));
        assert!(ulimit("nofile=x").unwrap_err().contains("invalid ulimit"));
    }
}
