//! What a task sees of its environment, checked from inside it on real agents: `--host`
//! entries in /etc/hosts, `--dns-search`/`--dns-option` in resolv.conf with 127.0.0.11 still
//! first (service names resolve) and foreign names forwarded to the task's own `--dns`
//! servers, `--hostname` and `--env` templates expanded on the node, and `--log-opt
//! max-size/max-file` rotating the task's log while `service logs` keeps working. Bad input
//! is refused before anything changes.

use std::time::Duration;

use mesh_tests::{Cluster, Host, image::Image};
use serde_json::Value;

/// The task's own resolver: answers every name under corp.example with this address.
const TASK_DNS: &str = "192.0.2.53";
const TASK_ANSWER: &str = "203.0.113.7";
/// The node's upstream: answers the same names with another address.
const NODE_DNS: &str = "192.0.2.54";
const NODE_ANSWER: &str = "198.51.100.1";

/// The running task of `service` on host1: its name.
fn task(c: &Cluster, service: &str) -> String {
    c.eventually(
        Duration::from_secs(30),
        &format!("{service} running"),
        |c| {
            let tasks: Vec<Value> = c.host(1).meshctl_json(&["ps"])?;
            Ok(tasks
                .iter()
                .find(|t| t["service"] == service && t["state"] == "running")
                .map(|t| t["name"].as_str().unwrap().to_owned()))
        },
    )
    .unwrap()
}

/// `meshctl exec TASK -- CMD…`: stdout, or a panic with what went wrong.
fn exec(h: &Host, task: &str, cmd: &[&str]) -> String {
    let mut args = vec!["exec", task, "--"];
    args.extend_from_slice(cmd);
    let out = h.meshctl(&args).unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} in {task}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn first_ip(getent: &str) -> Option<String> {
    getent
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_owned)
}

#[test]
fn a_process_task_sees_its_hosts_dns_and_templated_names() {
    let mut c = Cluster::new(1).unwrap();
    let task_dns = c.external("dns", 53).unwrap();
    let _task_dns = task_dns
        .spawn_resolver(TASK_DNS, "corp.example", TASK_ANSWER)
        .unwrap();
    let node_dns = c.external("dns2", 54).unwrap();
    let _node_dns = node_dns
        .spawn_resolver(NODE_DNS, "corp.example", NODE_ANSWER)
        .unwrap();
    c.host_mut(1)
        .start_agent(&["--dns-upstream", NODE_DNS])
        .unwrap();
    let h = c.host(1);
    h.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "other",
        "-d",
        "--process",
        "--",
        "/bin/sleep",
        "3600",
    ])
    .unwrap();
    h.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "-d",
        "--hostname",
        "{{.Service.Name}}-{{.Task.Slot}}",
        "-e",
        "WHERE={{.Node.ID}}/{{.Task.Slot}}",
        "--host",
        "db.local:10.0.0.5",
        "--dns",
        TASK_DNS,
        "--dns-search",
        "corp.example",
        "--dns-option",
        "timeout:1",
        "--process",
        "--",
        "/bin/sleep",
        "3600",
    ])
    .unwrap();
    let web = task(&c, "web");
    let other = task(&c, "other");

    // /etc/hosts: the --host entry, and the task's own name.
    let hosts = exec(h, &web, &["cat", "/etc/hosts"]);
    assert!(hosts.contains("10.0.0.5\tdb.local\n"), "{hosts}");
    assert!(hosts.contains("\tweb-1\n"), "{hosts}");
    assert_eq!(
        first_ip(&exec(h, &web, &["getent", "hosts", "db.local"])).as_deref(),
        Some("10.0.0.5")
    );
    // The template expanded on the node, in the hostname and in the environment.
    assert_eq!(exec(h, &web, &["hostname"]).trim(), "web-1");
    let node_id: Value = h.meshctl_json(&["node", "inspect", h.node_name()]).unwrap();
    let node_id = node_id["id"].as_str().unwrap_or_default().to_owned();
    // The task's own environment (exec'd commands get their own): its first process's.
    let tasks: Vec<Value> = h.meshctl_json(&["ps"]).unwrap();
    let pid = tasks.iter().find(|t| t["name"] == web.as_str()).unwrap()["pid"]
        .as_u64()
        .unwrap();
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let env = String::from_utf8_lossy(&env);
    assert!(
        env.split('\0').any(|l| l == format!("WHERE={node_id}/1")),
        "node id {node_id}: {env}"
    );

    // resolv.conf: the embedded resolver first, the search domain and options after.
    let resolv = exec(h, &web, &["cat", "/etc/resolv.conf"]);
    assert!(resolv.starts_with("nameserver 127.0.0.11\n"), "{resolv}");
    assert!(
        !resolv.contains(TASK_DNS),
        "asked through 127.0.0.11: {resolv}"
    );
    assert!(resolv.contains("search corp.example\n"), "{resolv}");
    assert!(resolv.contains("timeout:1"), "{resolv}");
    // Service names still resolve, and foreign ones go to the task's own --dns server …
    let vip: Value = h.meshctl_json(&["service", "inspect", "other"]).unwrap();
    let vip = vip["vip"].as_str().unwrap().to_owned();
    c.eventually(Duration::from_secs(5), "other resolves in web", |_| {
        Ok(
            (first_ip(&exec(h, &web, &["getent", "ahostsv4", "other"])) == Some(vip.clone()))
                .then_some(()),
        )
    })
    .unwrap();
    assert_eq!(
        first_ip(&exec(
            h,
            &web,
            &["getent", "ahostsv4", "printer.corp.example"]
        ))
        .as_deref(),
        Some(TASK_ANSWER)
    );
    // … while a task without one still uses the node's.
    assert_eq!(
        first_ip(&exec(
            h,
            &other,
            &["getent", "ahostsv4", "printer.corp.example"]
        ))
        .as_deref(),
        Some(NODE_ANSWER)
    );
    let other_resolv = exec(h, &other, &["cat", "/etc/resolv.conf"]);
    assert!(!other_resolv.contains("corp.example"), "{other_resolv}");

    // An update changes what the next task sees.
    h.meshctl_ok(&[
        "service",
        "update",
        "-d",
        "--host-rm",
        "db.local",
        "--host-add",
        "cache.local:10.0.0.6",
        "web",
    ])
    .unwrap();
    c.eventually(Duration::from_secs(30), "the updated task", |c| {
        let t = task(c, "web");
        if t == web {
            return Ok(None);
        }
        let hosts = exec(c.host(1), &t, &["cat", "/etc/hosts"]);
        Ok(
            (hosts.contains("10.0.0.6\tcache.local\n") && !hosts.contains("db.local"))
                .then_some(()),
        )
    })
    .unwrap();
}

#[test]
fn log_opts_rotate_the_task_log_and_service_logs_still_reads_it() {
    let mut c = Cluster::new(1).unwrap();
    c.start_agents().unwrap();
    let h = c.host(1);
    // ~70 bytes a stored line: 600 lines are ~40 KiB, ten times the 4 KiB cap.
    let script = "i=0; while [ $i -lt 600 ]; do echo line-$i-xxxxxxxxxxxxxxxxxxxx; \
                  i=$((i+1)); done; exec sleep 3600";
    h.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "noisy",
        "-d",
        "--log-opt",
        "max-size=4k,max-file=3",
        "--process",
        "--",
        "/bin/sh",
        "-c",
        script,
    ])
    .unwrap();
    let t = task(&c, "noisy");
    let log = h.state_dir().join("tasks").join(format!("{t}.log"));
    let rotated = |n: u32| log.with_file_name(format!("{t}.log.{n}"));
    let logs = c
        .eventually(Duration::from_secs(20), "the last line logged", |_| {
            let out = h.meshctl(&["service", "logs", "--raw", "noisy"])?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            Ok(text.contains("line-599-").then_some(text))
        })
        .unwrap();
    // The service asked for 3 files, the node (agent.toml's default [task_logs], 2 files)
    // allows 2: the service may only lower the node's cap. Its 4k max-size is below the
    // node's 10m, so it holds.
    assert!(rotated(1).exists(), "one old file kept");
    assert!(
        !rotated(2).exists(),
        "the node's max_file = 2 caps the service's max-file=3"
    );
    for p in [log.clone(), rotated(1)] {
        let size = std::fs::metadata(&p).unwrap().len();
        assert!(size <= 4096, "{} is {size} bytes", p.display());
    }
    // What is kept reads in order, ending with the last line; the oldest lines are gone.
    let lines: Vec<&str> = logs.lines().filter(|l| l.starts_with("line-")).collect();
    assert!(lines.last().unwrap().starts_with("line-599-"), "{lines:?}");
    assert!(
        !logs.contains("line-0-"),
        "the first lines were rotated away"
    );
    let numbers: Vec<u32> = lines
        .iter()
        .map(|l| l.split('-').nth(1).unwrap().parse().unwrap())
        .collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    let tail = h
        .meshctl_ok(&["service", "logs", "--raw", "--tail", "2", "noisy"])
        .unwrap();
    assert_eq!(tail.lines().count(), 2, "{tail}");
    assert!(tail.contains("line-599-"), "{tail}");
}

#[test]
fn bad_input_changes_nothing() {
    let mut c = Cluster::new(1).unwrap();
    c.start_agents().unwrap();
    let h = c.host(1);
    h.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "-d",
        "--process",
        "--",
        "/bin/sleep",
        "3600",
    ])
    .unwrap();
    let before: Value = h.meshctl_json(&["service", "inspect", "web"]).unwrap();
    for (args, says) in [
        (&["--host", "db.local"][..], "bad format for add-host"),
        (
            &["--log-driver", "syslog"][..],
            "log driver \"syslog\" is not supported",
        ),
        (
            &["--hostname", "{{.Nope}}"][..],
            "executing \"expansion\" at <.Nope>: can't evaluate field Nope in type template.Context",
        ),
        (&["--dns", "not-an-ip"][..], "is not an ip address"),
        (
            &["--log-opt", "compress=true"][..],
            "\"compress\" is not supported",
        ),
    ] {
        let mut cmd = vec!["service", "create", "--name", "bad", "-d"];
        cmd.extend_from_slice(args);
        cmd.extend(["--process", "--", "/bin/sleep", "1"]);
        let out = h.meshctl(&cmd).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // The agent refuses a bad template itself (an update is checked there, not in meshctl).
    let out = h
        .meshctl(&[
            "service",
            "update",
            "-d",
            "--hostname",
            "{{.Task.Nope}}",
            "web",
        ])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("can't evaluate field Nope"),
        "{err}"
    );
    let out = h
        .meshctl(&["service", "update", "-d", "--log-driver", "journald", "web"])
        .unwrap();
    assert!(!out.status.success());
    let services: Vec<Value> = h.meshctl_json(&["service", "ls"]).unwrap();
    let names: Vec<&str> = services.iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, ["web"], "nothing was created");
    let after: Value = h.meshctl_json(&["service", "inspect", "web"]).unwrap();
    assert_eq!(after["spec"], before["spec"], "nothing was changed");
}

#[test]
fn a_container_task_gets_its_hosts_dns_and_hostname() {
    let Ok(image) = Image::busybox("taskenv", r#"["/bin/sh","-c","exec sleep 3600"]"#) else {
        eprintln!("skipped: podman cannot build images here");
        return;
    };
    let mut c = Cluster::new(1).unwrap();
    c.start_agents().unwrap();
    let h = c.host(1);
    let out = h
        .meshctl(&[
            "service",
            "create",
            "--name",
            "box",
            "-d",
            "--hostname",
            "{{.Service.Name}}-{{.Task.Slot}}",
            "--host",
            "db.local:10.0.0.5",
            "--dns-search",
            "corp.example",
            "--dns-option",
            "timeout:1",
            "--log-opt",
            "max-size=1m",
            image.name(),
        ])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = task(&c, "box");
    let hosts = exec(h, &t, &["cat", "/etc/hosts"]);
    assert!(
        hosts.contains("10.0.0.5") && hosts.contains("db.local"),
        "{hosts}"
    );
    assert_eq!(exec(h, &t, &["hostname"]).trim(), "box-1");
    let resolv = exec(h, &t, &["cat", "/etc/resolv.conf"]);
    assert!(resolv.contains("nameserver 127.0.0.11"), "{resolv}");
    assert!(resolv.contains("corp.example"), "{resolv}");
    assert!(resolv.contains("timeout:1"), "{resolv}");
}
