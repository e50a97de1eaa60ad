//! `cargo xtask demo`: a 3-host mesh cluster in network namespaces on this machine, a service
//! published on every host, the routing mesh's round robin and service DNS, then cleanup.

use std::{
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_tests::{Cluster, Host, cluster::bin};
use serde_json::Value;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn step(msg: &str) -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    println!("\n\x1b[1;34m==> {msg}\x1b[0m");
    Ok(())
}

/// Runs meshctl on a host and echoes the command line and its output, as a user would see it.
fn show(h: &Host, host_label: &str, args: &[&str]) -> Result<String> {
    println!("\x1b[2m[{host_label}]$ meshctl {}\x1b[0m", args.join(" "));
    let out = h.meshctl_ok(args)?;
    print!("{out}");
    if !out.ends_with('\n') {
        println!();
    }
    Ok(out)
}

pub fn run() -> Result<()> {
    // Ctrl-C: the current step fails (its child processes get the signal too), the cluster is
    // dropped and everything it made is removed.
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    if !nix_is_root() {
        bail!("the demo creates network namespaces and loads eBPF: run it as root");
    }
    let started = Instant::now();
    let result = demo();
    match &result {
        Ok(()) => println!(
            "\n\x1b[1;32mDemo finished in {:.1}s; everything it created is gone.\x1b[0m",
            started.elapsed().as_secs_f64()
        ),
        Err(e) => {
            eprintln!("\n\x1b[1;31mDemo stopped: {e:#}\x1b[0m\nEverything it created was removed.")
        }
    }
    result
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn demo() -> Result<()> {
    step("Building mesh-agent, meshctl and the demo task (mesh-whoami)")?;
    let whoami = bin("mesh-whoami");

    step("Creating 3 hosts (network namespaces on one underlay bridge, 192.0.2.0/24)")?;
    let mut c = Cluster::with_prefix("demo", 3)?;
    c.external("client", 100)?;
    for h in c.hosts() {
        println!(
            "  host{} = namespace {} at {}",
            h.index,
            h.node_name(),
            h.ip
        );
    }
    println!("  client = a machine outside the mesh at 192.0.2.100");

    step("Starting one mesh-agent per host; each joins the others over gossip")?;
    c.start_agents()?;
    c.eventually(Duration::from_secs(10), "all nodes ready", |c| {
        let nodes: Value = c.host(1).meshctl_json(&["node", "ls"])?;
        let ready = nodes
            .as_array()
            .map_or(0, |n| n.iter().filter(|n| n["status"] == "Ready").count());
        Ok((ready == 3).then_some(()))
    })?;
    show(c.host(1), "host1", &["node", "ls"])?;

    step("Creating overlay network `app` (VXLAN) from host1")?;
    show(
        c.host(1),
        "host1",
        &["network", "create", "app", "--subnet", "10.10.0.0/24"],
    )?;
    show(c.host(2), "host2", &["network", "ls"])?;

    step("Creating service `whoami`, publishing port 8080 on every host -> 80 in its tasks")?;
    show(
        c.host(2),
        "host2",
        &[
            "service",
            "create",
            "whoami",
            "--network",
            "app",
            "--publish",
            "8080:80",
        ],
    )?;

    step("Starting 3 tasks of whoami, one per host (each answers with its own name)")?;
    for h in c.hosts() {
        let name = format!("whoami-{}", h.index);
        c.eventually(Duration::from_secs(5), "whoami known on every host", |_| {
            Ok(h.meshctl(&["service", "inspect", "whoami"])?
                .status
                .success()
                .then_some(()))
        })?;
        show(
            h,
            &format!("host{}", h.index),
            &[
                "run",
                "--network",
                "app",
                "--service",
                "whoami",
                "--name",
                &name,
                "--",
                whoami.to_str().unwrap(),
                "--name",
                &name,
            ],
        )?;
    }
    c.eventually(Duration::from_secs(5), "3 tasks everywhere", |c| {
        let s: Value = c.host(3).meshctl_json(&["service", "inspect", "whoami"])?;
        Ok((s["tasks"].as_array().map_or(0, Vec::len) == 3).then_some(()))
    })?;
    show(c.host(3), "host3", &["service", "ls"])?;
    show(c.host(3), "host3", &["service", "ps", "whoami"])?;

    step("curl http://<host>:8080/ from the client, 6 times per host: round robin over all tasks")?;
    let client = format!("{}-xclient", c.name());
    for h in c.hosts() {
        let mut answers = Vec::new();
        for _ in 0..6 {
            let out = Command::new("ip")
                .args(["netns", "exec", &client, "curl", "-s", "--max-time", "3"])
                .arg(format!("http://{}:8080/", h.ip))
                .output()?;
            let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            answers.push(if body.is_empty() {
                "(no answer)".to_owned()
            } else {
                body
            });
        }
        println!("  curl {}:8080 -> {}", h.ip, answers.join(", "));
    }

    step("Resolving names from inside task whoami-1 (resolver at 127.0.0.11)")?;
    let tasks: Value = c.host(1).meshctl_json(&["ps"])?;
    let netns = tasks[0]["netns"]
        .as_str()
        .context("task namespace")?
        .to_owned();
    for q in ["whoami", "tasks.whoami"] {
        let out = Command::new("ip")
            .args(["netns", "exec", &netns, "getent", "ahostsv4", q])
            .output()?;
        let mut ips: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        ips.dedup();
        ips.sort();
        ips.dedup();
        println!("  getent ahostsv4 {q:<13} -> {}", ips.join(" "));
    }

    step("Cleaning up: stopping agents, removing namespaces, links, pins and cgroups")?;
    drop(c);
    Ok(())
}
