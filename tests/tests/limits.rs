//! The README's resource limits, end to end: a process task's limits are in the kernel (its
//! own cgroup leaf, in whichever hierarchy holds each controller — v1 on this hybrid host,
//! v2 on a systemd one), a task that allocates past `--limit-memory` is OOM-killed, shown
//! as such in `service ps` and restarted by its policy while another service's task and the
//! agent carry on, a task cannot fork past `--limit-pids`, and the leaves go with the tasks.
//! Image tasks get the same limits through podman, and its OOM kill reads the same.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_agent::cgroup::{Controller, Layout};
use mesh_tests::{Cluster, Host, image::Image};
use serde_json::Value;

fn ps(h: &Host, name: &str) -> Vec<Value> {
    h.meshctl_json(&["service", "ps", name]).unwrap()
}

/// The leaf directory of the running task of `service` in the hierarchy holding `c`: named
/// `<node>-<service>.<slot>.<id>`, in the node's `tasks` cgroup in v2 and in the node's
/// cgroup itself in v1 (where every cgroup has a file named `tasks`).
fn leaf(layout: &Layout, h: &Host, c: Controller, service: &str) -> Option<PathBuf> {
    let hierarchy = layout.hierarchy(c)?;
    let v2_root = layout.unified.as_ref()?;
    let rel = h.cgroup().strip_prefix(v2_root).ok()?.to_owned();
    let node = hierarchy.mount.join(rel);
    let tasks = if hierarchy.v2 {
        node.join("tasks")
    } else {
        node
    };
    let prefix = format!("{}-{service}.", h.node_name());
    std::fs::read_dir(tasks)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()))
        .trim()
        .to_owned()
}

#[test]
fn limits_are_enforced_by_the_kernel_and_an_oom_kill_is_a_failure_the_policy_restarts() {
    let layout = Layout::discover().unwrap();
    let mut c = Cluster::new(1).unwrap();
    c.start_agents().unwrap();
    let h = c.host(1);
    let agent = h.agent_pid().unwrap();

    // A well-behaved service with every kind of limit: its leaf holds them.
    h.meshctl_ok(&[
        "service",
        "create",
        "steady",
        "--limit-memory",
        "64M",
        "--limit-cpu",
        "0.5",
        "--limit-pids",
        "50",
        "-d",
        "--",
        "sleep",
        "1000",
    ])
    .unwrap();
    // Allocates 200 MiB, touching every byte, under a 32 MiB limit.
    h.meshctl_ok(&[
        "service",
        "create",
        "hog",
        "--limit-memory",
        "32M",
        "--restart-delay",
        "500ms",
        "-d",
        "--",
        "python3",
        "-c",
        "import time; time.sleep(0.5); x = b'a' * (200 << 20); time.sleep(1000)",
    ])
    .unwrap();
    // Forks 40 children under a limit of 20 processes (itself and the task's init included).
    let forker = r#"
import os, time
ok = failed = 0
for _ in range(40):
    try:
        pid = os.fork()
    except OSError:
        failed += 1
        continue
    if pid == 0:
        time.sleep(1000)
        os._exit(0)
    ok += 1
print(f"forked={ok} failed={failed}", flush=True)
time.sleep(1000)
"#;
    h.meshctl_ok(&[
        "service",
        "create",
        "forker",
        "--limit-pids",
        "20",
        "-d",
        "--",
        "python3",
        "-c",
        forker,
    ])
    .unwrap();

    // Spins under a fifth of a CPU: CFS throttles it.
    h.meshctl_ok(&[
        "service",
        "create",
        "spinner",
        "--limit-cpu",
        "0.2",
        "-d",
        "--",
        "python3",
        "-c",
        "while True: pass",
    ])
    .unwrap();

    let running = |name: &str| {
        let rows = ps(h, name);
        rows.iter()
            .find(|r| r["history"] == false && r["state"] == "Running")
            .map(|r| r["id"].as_str().unwrap_or_default().to_owned())
    };
    let steady_id = c
        .eventually(Duration::from_secs(20), "steady runs", |_| {
            Ok(running("steady"))
        })
        .unwrap();

    // The kernel holds the limits, in whichever hierarchy each controller lives.
    let mem = leaf(&layout, h, Controller::Memory, "steady").expect("a memory leaf");
    let cpu = leaf(&layout, h, Controller::Cpu, "steady").expect("a cpu leaf");
    let pids = leaf(&layout, h, Controller::Pids, "steady").expect("a pids leaf");
    let v2 = |c| layout.hierarchy(c).unwrap().v2;
    if v2(Controller::Memory) {
        assert_eq!(read(&mem, "memory.max"), "67108864");
    } else {
        assert_eq!(read(&mem, "memory.limit_in_bytes"), "67108864");
    }
    if v2(Controller::Cpu) {
        assert_eq!(read(&cpu, "cpu.max"), "50000 100000");
    } else {
        assert_eq!(read(&cpu, "cpu.cfs_quota_us"), "50000");
        assert_eq!(read(&cpu, "cpu.cfs_period_us"), "100000");
    }
    assert_eq!(read(&pids, "pids.max"), "50");
    // The task's process is in every leaf, joined before it ran `sleep`.
    let pid = read(&mem, "cgroup.procs");
    assert!(!pid.is_empty());
    for dir in [&cpu, &pids] {
        assert_eq!(read(dir, "cgroup.procs"), pid, "{}", dir.display());
    }

    // In its leaf the task still has what the socket hooks at the cgroup v2 root give it (the
    // resolver at 127.0.0.11), and `exec` runs in the same leaves, under the same limits.
    let task = format!("steady.1.{steady_id}");
    let out = h
        .meshctl_ok(&[
            "exec",
            &task,
            "--",
            "sh",
            "-c",
            "getent hosts steady; cat /proc/self/cgroup",
        ])
        .unwrap();
    let vip: Value = h.meshctl_json(&["service", "inspect", "steady"]).unwrap();
    let vip = vip["vip"].as_str().unwrap_or_else(|| panic!("{vip}"));
    assert!(out.contains(&format!("{vip} ")), "{out}");
    let leaf_name = mem.file_name().unwrap().to_string_lossy().into_owned();
    let memory_line = out
        .lines()
        .find(|l| {
            l.split(':').nth(1).is_some_and(|c| {
                if v2(Controller::Memory) {
                    c.is_empty()
                } else {
                    c.split(',').any(|c| c == "memory")
                }
            })
        })
        .unwrap_or_else(|| panic!("{out}"));
    assert!(memory_line.ends_with(&leaf_name), "{out}");

    // The hog is killed by the kernel, recorded as such, and restarted by its policy.
    let rows = c
        .eventually(
            Duration::from_secs(30),
            "hog OOM-killed and restarted",
            |_| {
                let rows = ps(h, "hog");
                let oom = rows.iter().filter(|r| {
                    r["state"] == "Failed" && r["error"] == "task: out of memory (limit 32MiB)"
                });
                Ok((oom.count() >= 2).then_some(rows))
            },
        )
        .unwrap();
    assert!(
        rows.iter()
            .any(|r| r["history"] == false && r["desired"] == "Running"),
        "a new task took the slot: {rows:?}"
    );
    let table = h
        .meshctl_ok(&["service", "ps", "--no-trunc", "hog"])
        .unwrap();
    assert!(
        table.contains("task: out of memory (limit 32MiB)"),
        "{table}"
    );

    // The other service's task never noticed, and neither did the agent.
    assert_eq!(running("steady").as_deref(), Some(steady_id.as_str()));
    assert_eq!(ps(h, "steady").len(), 1, "steady was never restarted");
    assert_eq!(h.agent_pid(), Some(agent));
    assert!(
        Path::new(&format!("/proc/{agent}")).exists(),
        "the agent is alive"
    );
    h.meshctl_ok(&["node", "ls"]).unwrap();

    // Forks past --limit-pids fail: 18 children fit beside the task's init (PID 1 in the
    // task, in the same leaf) and the program itself.
    let logs = c
        .eventually(Duration::from_secs(20), "forker reports", |_| {
            let out = h.meshctl_ok(&["service", "logs", "forker"])?;
            Ok(out.contains("forked=").then_some(out))
        })
        .unwrap();
    assert!(logs.contains("forked=18 failed=22"), "{logs}");
    let forker_pids = leaf(&layout, h, Controller::Pids, "forker").unwrap();
    assert_eq!(read(&forker_pids, "pids.max"), "20");
    assert_eq!(read(&forker_pids, "pids.current"), "20");

    // The spinner wanted a whole CPU and got its quota: the kernel throttled it.
    c.eventually(Duration::from_secs(20), "spinner throttled", |_| {
        let Some(dir) = leaf(&layout, h, Controller::Cpu, "spinner") else {
            return Ok(None);
        };
        let stat = std::fs::read_to_string(dir.join("cpu.stat")).unwrap_or_default();
        let throttled = stat
            .lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
        Ok((throttled > 0).then_some(()))
    })
    .unwrap();

    // Leaves go with their tasks, in every hierarchy.
    for s in ["steady", "hog", "forker", "spinner"] {
        h.meshctl_ok(&["service", "rm", s]).unwrap();
    }
    c.eventually(Duration::from_secs(20), "leaves removed", |_| {
        Ok(
            (!mem.exists() && !cpu.exists() && !pids.exists() && !forker_pids.exists())
                .then_some(()),
        )
    })
    .unwrap();
    let node_dirs: Vec<PathBuf> = mesh_tests::cluster::cgroup_bases()
        .iter()
        .map(|b| b.join(h.node_name()))
        .collect();
    let leaf_prefix = format!("{}-", h.node_name());
    c.eventually(Duration::from_secs(20), "no leaf left", |_| {
        let left: Vec<PathBuf> = node_dirs
            .iter()
            .flat_map(|d| [d.clone(), d.join("tasks")])
            .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
            .map(|e| e.path())
            .filter(|p| {
                p.is_dir()
                    && p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&leaf_prefix))
            })
            .collect();
        Ok(left.is_empty().then_some(()))
    })
    .unwrap();
}

/// `podman inspect` of the running container of `service` on `h`.
fn container_of(h: &Host, service: &str) -> Option<String> {
    let out = std::process::Command::new("podman")
        .args(["ps", "--format", "{{.Names}}"])
        .args(["--filter", &format!("name=^{}-{service}\\.", h.node_name())])
        .output()
        .ok()?;
    let names = String::from_utf8_lossy(&out.stdout);
    names.lines().next().map(|n| n.trim().to_owned())
}

fn podman_inspect(container: &str, format: &str) -> String {
    let out = std::process::Command::new("podman")
        .args(["inspect", "--format", format, container])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn an_image_task_gets_its_limits_through_podman_and_its_oom_kill_reads_the_same() {
    let sleeper = Image::busybox("limited", r#"["/bin/sleep","1000"]"#).unwrap();
    // dd's 100 MiB buffer, filled from /dev/zero, is the container's init: the kernel kills it.
    let hog = Image::busybox(
        "hog",
        r#"["/bin/sh","-c","sleep 1; exec dd if=/dev/zero of=/dev/null bs=100M count=1"]"#,
    )
    .unwrap();
    let mut c = Cluster::new(1).unwrap();
    c.start_agents().unwrap();
    let h = c.host(1);
    h.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "capped",
        "--limit-memory",
        "48M",
        "--limit-cpu",
        "0.5",
        "--limit-pids",
        "30",
        "-d",
        sleeper.name(),
    ])
    .unwrap();
    h.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "hog",
        "--limit-memory",
        "32M",
        "--restart-delay",
        "500ms",
        "-d",
        hog.name(),
    ])
    .unwrap();

    let container = c
        .eventually(Duration::from_secs(60), "capped's container runs", |_| {
            Ok(container_of(h, "capped"))
        })
        .unwrap();
    assert_eq!(
        podman_inspect(
            &container,
            "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}} {{.HostConfig.PidsLimit}}"
        ),
        "50331648 500000000 30"
    );
    // And the kernel holds it: the container's own memory cgroup, wherever runc made it.
    let pid = podman_inspect(&container, "{{.State.Pid}}");
    let layout = Layout::discover().unwrap();
    let memory = layout.hierarchy(Controller::Memory).unwrap();
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = own
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let here = if memory.v2 {
                controllers.is_empty()
            } else {
                controllers.split(',').any(|c| c == "memory")
            };
            here.then(|| memory.mount.join(path.trim_start_matches('/')))
        })
        .unwrap_or_else(|| panic!("{own}"));
    let file = if memory.v2 {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    };
    assert_eq!(read(&path, file), "50331648", "{}", path.display());

    let rows = c
        .eventually(
            Duration::from_secs(60),
            "the image task OOM-killed and restarted",
            |_| {
                let rows = ps(h, "hog");
                let oom = rows.iter().filter(|r| {
                    r["state"] == "Failed" && r["error"] == "task: out of memory (limit 32MiB)"
                });
                Ok((oom.count() >= 2).then_some(rows))
            },
        )
        .unwrap();
    assert!(rows.len() >= 3, "{rows:?}");
    // conmon's own OOM note went to the container's working directory, not the agent's.
    assert!(!std::env::current_dir().unwrap().join("oom").exists());
    assert_eq!(ps(h, "capped").len(), 1, "the other task carried on");
    for s in ["capped", "hog"] {
        h.meshctl_ok(&["service", "rm", s]).unwrap();
    }
    c.eventually(Duration::from_secs(30), "containers removed", |_| {
        Ok((container_of(h, "capped").is_none() && container_of(h, "hog").is_none()).then_some(()))
    })
    .unwrap();
}
