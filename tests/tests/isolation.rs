//! The README's isolation of process tasks ("Isolation"), end to end on real agents: a task
//! running as root (uid 0, no capabilities) tries what a compromised workload would — read
//! the cluster key, read another task's secret through /proc/<pid>/root and through the
//! host's run-time directory, reach the agent's socket and state, `mount`, `setns`, see other
//! processes — and every attempt fails, while the same command succeeds where it should (its
//! own secret, a task granted SYS_ADMIN, the host), so no check can pass vacuously. Also:
//! the default user, `--user` with `--cap-add NET_BIND_SERVICE`, `--read-only`, `--sysctl`,
//! `--ulimit`, and the kernel's view of the task's capability sets.

use std::{io::Write, path::Path, process::Command, time::Duration};

use mesh_tests::{Cluster, Host, cluster::bin};
use serde_json::Value;

const KEY_MARK: &str = "sanity-file-contents";

/// One agent with a sealed cluster (secrets need a key); the key file is in the cluster's
/// scratch directory next to a sanity file with the same owner and mode.
fn cluster() -> (Cluster, String) {
    let mut c = Cluster::new(1).unwrap();
    let out = Command::new(bin("mesh-agent"))
        .arg("keygen")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::create_dir_all(c.log_dir()).unwrap();
    let write = |name: &str, data: &[u8]| {
        use std::os::unix::fs::OpenOptionsExt;
        let p = c.log_dir().join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .unwrap()
            .write_all(data)
            .unwrap();
        p.to_str().unwrap().to_owned()
    };
    let key = write("cluster.key", &out.stdout);
    write("sanity.txt", KEY_MARK.as_bytes());
    c.host_mut(1)
        .start_agent(&["--cluster-key-file", &key])
        .unwrap();
    (c, key)
}

fn secret(h: &Host, name: &str, value: &str) {
    let mut child = Command::new(bin("meshctl"))
        .arg("--socket")
        .arg(h.socket())
        .args(["secret", "create", name, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(value.as_bytes())
        .unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
}

/// `service create NAME ARGS… -- sleep 3600`.
fn service(h: &Host, name: &str, args: &[&str]) {
    let mut cmd = vec!["service", "create", name];
    cmd.extend_from_slice(args);
    cmd.extend(["-d", "--", "/bin/sleep", "3600"]);
    h.meshctl_ok(&cmd).unwrap();
}

/// The running task of `service`: (name, host PID of its first process).
fn task(c: &Cluster, service: &str) -> (String, u32) {
    c.eventually(
        Duration::from_secs(20),
        &format!("{service} running"),
        |c| {
            let tasks: Vec<Value> = c.host(1).meshctl_json(&["ps"])?;
            Ok(tasks
                .iter()
                .find(|t| t["service"] == service && t["state"] == "running")
                .map(|t| {
                    (
                        t["name"].as_str().unwrap().to_owned(),
                        t["pid"].as_u64().unwrap() as u32,
                    )
                }))
        },
    )
    .unwrap()
}

/// `meshctl exec TASK -- sh -c SCRIPT`: (exit code, stdout + stderr).
fn exec(h: &Host, task: &str, script: &str) -> (i32, String) {
    let out = h
        .meshctl(&["exec", task, "--", "/bin/sh", "-c", script])
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn ok(h: &Host, task: &str, script: &str) -> String {
    let (code, out) = exec(h, task, script);
    assert_eq!(code, 0, "`{script}` in {task} should work: {out}");
    out
}

fn fails(h: &Host, task: &str, script: &str) -> String {
    let (code, out) = exec(h, task, script);
    assert_ne!(code, 0, "`{script}` in {task} should fail: {out}");
    out
}

/// A `CapXxx:` line of /proc/<pid>/status inside the task, as a number.
fn caps(h: &Host, task: &str, pid: u32, set: &str) -> u64 {
    let out = ok(h, task, &format!("grep '^{set}:' /proc/{pid}/status"));
    let hex = out.split_whitespace().nth(1).unwrap();
    u64::from_str_radix(hex, 16).unwrap()
}

#[test]
fn a_process_task_cannot_reach_the_node_or_other_tasks() {
    let (c, key) = cluster();
    let h = c.host(1);
    let sanity = c.log_dir().join("sanity.txt");
    let sanity = sanity.to_str().unwrap();
    secret(h, "victim_pw", "victim-secret-value");
    secret(h, "own_pw", "own-secret-value");
    // Root without capabilities: file ownership is no obstacle, so what stops it is the
    // isolation itself.
    service(
        h,
        "victim",
        &["--secret", "source=victim_pw,target=pw,mode=0444"],
    );
    service(
        h,
        "attacker",
        &[
            "--user",
            "0",
            "--secret",
            "source=own_pw,target=pw,mode=0444",
        ],
    );
    service(h, "granted", &["--user", "0", "--cap-add", "SYS_ADMIN"]);
    let (victim, victim_pid) = task(&c, "victim");
    let (attacker, attacker_pid) = task(&c, "attacker");
    let (granted, _) = task(&c, "granted");

    // The cluster key: hidden; a file next to it with the same owner and mode is readable.
    assert!(ok(h, &attacker, &format!("cat {sanity}")).contains(KEY_MARK));
    let key_on_host = std::fs::read_to_string(&key).unwrap();
    let seen = ok(h, &attacker, &format!("cat {key}; echo"));
    assert!(
        seen.trim().is_empty() && !seen.contains(key_on_host.trim()),
        "the key file reads as empty in a task: {seen:?}"
    );

    // Another task's secret through /proc/<pid>/root: its own works, the victim's does not
    // (the victim's PID does not even exist in the task's /proc).
    assert_eq!(
        ok(h, &attacker, "cat /proc/1/root/run/secrets/pw"),
        "own-secret-value"
    );
    assert!(ok(h, &victim, "cat /run/secrets/pw").contains("victim-secret-value"));
    assert!(Path::new(&format!("/proc/{victim_pid}/root")).exists());
    let out = fails(
        h,
        &attacker,
        &format!("cat /proc/{victim_pid}/root/run/secrets/pw"),
    );
    assert!(!out.contains("victim-secret-value"), "{out}");

    // The agent's run-time directory (podman tasks' secrets, the API socket) and state.
    let run = h.socket().parent().unwrap().to_path_buf();
    assert!(h.socket().exists() && h.state_dir().is_dir());
    assert_eq!(ok(h, &attacker, "ls -A /run/mesh | wc -l").trim(), "0");
    fails(h, &attacker, &format!("ls {}", run.display()));
    fails(h, &attacker, &format!("ls {}", h.state_dir().display()));
    fails(h, &attacker, &format!("test -S {}", h.socket().display()));
    // The dataplane's pinned maps.
    assert!(h.bpffs().is_dir());
    assert_eq!(
        ok(
            h,
            &attacker,
            &format!("ls -A {} | wc -l", h.bpffs().display())
        )
        .trim(),
        "0"
    );

    // mount and setns: refused without capabilities, done with SYS_ADMIN.
    let mnt = format!("mount -t tmpfs none {}", c.log_dir().display());
    let out = fails(h, &attacker, &mnt);
    assert!(
        out.contains("ermission denied") || out.contains("not permitted"),
        "{out}"
    );
    ok(h, &granted, &mnt);
    fails(h, &attacker, "nsenter -t 1 -n true");
    fails(h, &attacker, "unshare -n true");
    ok(h, &granted, "nsenter -t 1 -n true && unshare -n true");

    // Its own processes only: init, sleep, and the exec'd shell and ls.
    let pids: Vec<u32> = ok(h, &attacker, "ls /proc")
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(pids.contains(&1) && pids.len() <= 4, "{pids:?}");
    assert!(!pids.contains(&victim_pid) && !pids.contains(&attacker_pid));
    let ps = ok(h, &attacker, "cat /proc/1/cmdline | tr '\\0' ' '");
    assert!(
        ps.contains("__mesh-task-init"),
        "PID 1 is the task's init: {ps}"
    );

    // The kernel's view: no capability in any set, no_new_privs, for init and program.
    for pid in [1, 2] {
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(caps(h, &attacker, pid, set), 0, "{set} of pid {pid}");
        }
        let nnp = ok(h, &attacker, &format!("grep NoNewPrivs /proc/{pid}/status"));
        assert!(nnp.contains('1'), "{nnp}");
    }
    assert_eq!(caps(h, &granted, 1, "CapEff"), 1 << 21);

    // Default user: nobody, in its own namespaces.
    assert_eq!(ok(h, &victim, "id -u; id -g"), "65534\n65534\n");
    assert_eq!(ok(h, &attacker, "id -u"), "0\n");
    // A plain stop still works: SIGTERM reaches the program through init.
    let t = std::time::Instant::now();
    h.meshctl_ok(&["service", "rm", "victim"]).unwrap();
    c.eventually(Duration::from_secs(20), "victim gone", |c| {
        let tasks: Vec<Value> = c.host(1).meshctl_json(&["ps"])?;
        Ok((!tasks.iter().any(|t| t["service"] == "victim")).then_some(()))
    })
    .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "stopped by SIGTERM, not the grace period's SIGKILL: {:?}",
        t.elapsed()
    );
    assert!(!Path::new(&format!("/proc/{victim_pid}")).exists());
}

#[test]
fn security_options_shape_what_a_process_task_may_do() {
    let (c, _) = cluster();
    let h = c.host(1);
    let py_bind = "/usr/bin/python3 -c 'import socket; s=socket.socket(); \
                   s.bind((\"0.0.0.0\", 80)); print(\"bound\")'";
    let privileged_ports = ["--sysctl", "net.ipv4.ip_unprivileged_port_start=1024"];
    service(
        h,
        "plain",
        &[&["--user", "1000"][..], &privileged_ports].concat(),
    );
    service(
        h,
        "binder",
        &[
            &["--user", "1000", "--cap-add", "NET_BIND_SERVICE"][..],
            &privileged_ports,
        ]
        .concat(),
    );
    service(h, "docker_default", &["--user", "1000"]);
    service(
        h,
        "ro",
        &[
            "--user",
            "0",
            "--read-only",
            "--ulimit",
            "nofile=512:1024",
            "--sysctl",
            "net.core.somaxconn=1234",
        ],
    );
    service(h, "rw", &["--user", "0"]);
    let (plain, _) = task(&c, "plain");
    let (binder, _) = task(&c, "binder");
    let (docker_default, _) = task(&c, "docker_default");
    let (ro, _) = task(&c, "ro");
    let (rw, _) = task(&c, "rw");

    // Port 80 as uid 1000: refused without the capability, bound with it, and bound as in
    // Docker when the task keeps the default unprivileged port range of its own namespace.
    let out = fails(h, &plain, py_bind);
    assert!(out.contains("Permission denied"), "{out}");
    assert!(ok(h, &binder, py_bind).contains("bound"));
    assert_eq!(ok(h, &binder, "id -u").trim(), "1000");
    assert_eq!(caps(h, &binder, 2, "CapEff"), 1 << 10);
    assert_eq!(caps(h, &binder, 2, "CapAmb"), 1 << 10);
    assert!(ok(h, &docker_default, py_bind).contains("bound"));

    // --read-only: the same write works in a task without it.
    let probe = format!("/{}-rw-probe", c.name());
    let out = fails(h, &ro, &format!("touch {probe}"));
    assert!(out.contains("Read-only file system"), "{out}");
    ok(h, &rw, &format!("touch {probe}"));
    assert!(Path::new(&probe).exists());
    std::fs::remove_file(&probe).unwrap();

    // --sysctl in the task's own network namespace only; --ulimit.
    assert_eq!(
        ok(h, &ro, "cat /proc/sys/net/core/somaxconn").trim(),
        "1234"
    );
    let host = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap();
    assert_ne!(host.trim(), "1234");
    let limits = ok(h, &ro, "grep 'open files' /proc/2/limits");
    assert_eq!(
        limits.split_whitespace().collect::<Vec<_>>()[3..5],
        ["512", "1024"],
        "{limits}"
    );

    // Refused before anything is created.
    for (args, want) in [
        (&["--cap-add", "NET_BIND"][..], "unknown capability"),
        (&["--sysctl", "kernel.pid_max=100"][..], "not namespaced"),
        (&["--ulimit", "nofile=9:8"][..], "above the hard limit"),
    ] {
        let mut cmd = vec!["service", "create", "bad"];
        cmd.extend_from_slice(args);
        cmd.extend(["--", "/bin/sleep", "1"]);
        let out = h.meshctl(&cmd).unwrap();
        assert!(!out.status.success());
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(want), "{args:?}: {e}");
    }
    assert!(
        h.meshctl(&["service", "inspect", "bad"])
            .is_ok_and(|o| !o.status.success())
    );

    // service update --cap-add: a rolling update gives the new task the capability.
    h.meshctl_ok(&[
        "service",
        "update",
        "plain",
        "--cap-add",
        "NET_BIND_SERVICE",
    ])
    .unwrap();
    let updated = c
        .eventually(Duration::from_secs(30), "plain updated", |c| {
            let tasks: Vec<Value> = c.host(1).meshctl_json(&["ps"])?;
            Ok(tasks
                .iter()
                .find(|t| t["service"] == "plain" && t["state"] == "running" && t["name"] != plain)
                .map(|t| t["name"].as_str().unwrap().to_owned()))
        })
        .unwrap();
    assert!(ok(h, &updated, py_bind).contains("bound"));
}
