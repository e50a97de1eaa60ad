//! `cargo xtask demo`: a 3-host mesh cluster in network namespaces on this machine, a service
//! published on every host, the routing mesh's round robin and service DNS, then cleanup.

use std::{
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_tests::{Cluster, Host, cluster::bin, image::Image};
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

/// Where the demo's visualizer is served on this machine (forwarded into host1).
const UI_PORT: u16 = 8090;

pub fn run(keep: bool) -> Result<()> {
    // Ctrl-C: the current step fails (its child processes get the signal too), the cluster is
    // dropped and everything it made is removed.
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    if !nix_is_root() {
        bail!("the demo creates network namespaces and loads eBPF: run it as root");
    }
    let started = Instant::now();
    let result = demo(keep);
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

/// A failed check: the step, what was expected and what was seen.
fn expect(ok: bool, step: &str, expected: &str, seen: impl std::fmt::Display) -> Result<()> {
    if !ok {
        bail!("step \"{step}\": expected {expected}, saw {seen}");
    }
    println!("  \x1b[32m✓\x1b[0m {expected}");
    Ok(())
}

/// Current, running tasks of a service (rows of `service ps`), by node.
fn by_node(h: &Host, service: &str) -> Result<std::collections::BTreeMap<String, usize>> {
    let rows: Vec<Value> = h.meshctl_json(&["service", "ps", service])?;
    let mut by = std::collections::BTreeMap::new();
    for r in rows {
        if r["history"] == false && r["state"] == "Running" && r["desired"] == "Running" {
            *by.entry(r["node"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
    }
    Ok(by)
}

/// Waits until every listed host says `n/n` for the service and balances over n backends.
fn converged(c: &Cluster, hosts: &[usize], service: &str, n: usize) -> Result<()> {
    c.eventually(
        Duration::from_secs(30),
        &format!("{service} at {n}/{n}"),
        |c| {
            for i in hosts {
                let s: Value = c.host(*i).meshctl_json(&["service", "inspect", service])?;
                let active = s["dataplane"]["backends"]
                    .as_array()
                    .map_or(0, |b| b.iter().filter(|b| b["state"] == "active").count());
                if s["running"] != n || s["desired"] != n || active != n {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
}

/// `n` curls of `host:8080` from the client; the answers.
fn curls(c: &Cluster, h: &Host, n: usize) -> Result<Vec<String>> {
    curls_of(c, h, "/", n)
}

/// `n` curls of `http://host:8080<path>` from the client; the answers.
fn curls_of(c: &Cluster, h: &Host, path: &str, n: usize) -> Result<Vec<String>> {
    curls_at(c, h, 8080, path, n)
}

/// `n` curls of `http://host:<port><path>` from the client; the answers.
fn curls_at(c: &Cluster, h: &Host, port: u16, path: &str, n: usize) -> Result<Vec<String>> {
    let client = format!("{}-xclient", c.name());
    let mut answers = Vec::new();
    for _ in 0..n {
        let out = Command::new("ip")
            .args(["netns", "exec", &client, "curl", "-s", "--max-time", "3"])
            .arg(format!("http://{}:{port}{path}", h.ip))
            .output()?;
        let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        answers.push(if body.is_empty() {
            "(no answer)".to_owned()
        } else {
            body
        });
    }
    Ok(answers)
}

/// Serves 127.0.0.1:UI_PORT here by connecting into host1's namespace, where the agent's
/// visualizer listens on its own loopback: the page is reachable from a browser on this
/// machine while nothing of the cluster is.
fn forward_ui(netns: std::path::PathBuf) -> Result<()> {
    use std::{net::TcpStream, os::fd::AsRawFd};
    let listener = std::net::TcpListener::bind(("127.0.0.1", UI_PORT))
        .with_context(|| format!("listening on 127.0.0.1:{UI_PORT} for the visualizer"))?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let netns = netns.clone();
            std::thread::spawn(move || {
                // The upstream socket is made inside host1's namespace on a thread of its own.
                let upstream = std::thread::spawn(move || -> Option<TcpStream> {
                    let f = std::fs::File::open(&netns).ok()?;
                    // SAFETY: setns on this thread only, with a valid namespace fd.
                    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return None;
                    }
                    TcpStream::connect(("127.0.0.1", UI_PORT)).ok()
                })
                .join()
                .ok()
                .flatten();
                let Some(up) = upstream else { return };
                let (Ok(mut c2), Ok(mut u2)) = (conn.try_clone(), up.try_clone()) else {
                    return;
                };
                let (mut c1, mut u1) = (conn, up);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut u2);
                    let _ = u2.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut u1, &mut c1);
            });
        }
    });
    Ok(())
}

/// The outside client's address (`c.external("client", 100)`), as tasks must see it.
const CLIENT_IP: &str = "192.0.2.100:";

/// The site resolver of the demo, and the one outside name it knows.
const UPSTREAM: &str = "192.0.2.53";
const OUTSIDE_NAME: &str = "outside.example";
const OUTSIDE_IP: &str = "203.0.113.7";

fn demo(keep: bool) -> Result<()> {
    step("Building mesh-agent, meshctl and the demo task (mesh-whoami)")?;
    let whoami = bin("mesh-whoami");
    let whoami = whoami.to_str().context("utf-8 path")?.to_owned();

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
    // The site's resolver, outside the mesh: it knows one outside name (nothing here reaches
    // the internet). Every agent forwards names that are not the cluster's to it.
    let resolver = c.external("dns", 53)?;
    let _resolver = resolver.spawn_resolver(UPSTREAM, OUTSIDE_NAME, OUTSIDE_IP)?;
    println!("  dns    = the site's resolver at {UPSTREAM}, which knows {OUTSIDE_NAME}");

    step(
        "Starting one mesh-agent per host; each joins the others over gossip, sealed with a cluster key",
    )?;
    let out = Command::new(bin("mesh-agent")).arg("keygen").output()?;
    if !out.status.success() {
        bail!(
            "mesh-agent keygen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let key = c.log_dir().join("cluster.key");
    {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)?
            .write_all(&out.stdout)?;
    }
    let key = key.to_str().context("utf-8 path")?.to_owned();
    let ui = format!("127.0.0.1:{UI_PORT}");
    c.host_mut(1).start_agent(&[
        "--cluster-key-file",
        &key,
        "--ui-listen",
        &ui,
        "--dns-upstream",
        UPSTREAM,
    ])?;
    for i in 2..=3 {
        c.host_mut(i)
            .start_agent(&["--cluster-key-file", &key, "--dns-upstream", UPSTREAM])?;
    }
    forward_ui(c.host(1).ns.path())?;
    println!(
        "  visualizer: http://127.0.0.1:{UI_PORT}/ (host1's agent; every node's page shows the whole cluster)"
    );
    c.eventually(Duration::from_secs(10), "all nodes ready", |c| {
        let nodes: Value = c.host(1).meshctl_json(&["node", "ls"])?;
        let ready = nodes
            .as_array()
            .map_or(0, |n| n.iter().filter(|n| n["status"] == "Ready").count());
        Ok((ready == 3).then_some(()))
    })?;
    let names: Vec<String> = c.hosts().iter().map(|h| h.node_name().to_owned()).collect();

    step("1. The nodes; label host1 env=production")?;
    show(c.host(1), "host1", &["node", "ls"])?;
    show(
        c.host(1),
        "host1",
        &["node", "update", "--label-add", "env=production", &names[0]],
    )?;
    let label = names[0].clone();
    let n: Value = c
        .eventually(Duration::from_secs(5), "the label everywhere", |c| {
            let n: Value = c.host(2).meshctl_json(&["node", "inspect", &label])?;
            Ok((n["labels"]["env"] == "production").then_some(n))
        })
        .unwrap_or_default();
    expect(
        n["labels"]["env"] == "production",
        "label",
        "host1 labelled env=production, seen from host2",
        &n["labels"],
    )?;

    step("2. A replicated service: 3 whoami tasks (process driver), port 8080 on every node")?;
    show(
        c.host(2),
        "host2",
        &[
            "service",
            "create",
            "--name",
            "whoami",
            "--process",
            "--replicas",
            "3",
            "--publish",
            "published=8080,target=80",
            "--",
            &whoami,
        ],
    )?;
    converged(&c, &[1, 2, 3], "whoami", 3)?;
    show(c.host(3), "host3", &["service", "ls"])?;
    show(c.host(3), "host3", &["service", "ps", "whoami"])?;
    let spread = by_node(c.host(1), "whoami")?;
    expect(
        spread.len() == 3 && spread.values().all(|n| *n == 1),
        "replicas",
        "one task per node",
        format!("{spread:?}"),
    )?;
    // /client: each task answers with its name and the peer address it saw.
    for h in c.hosts() {
        let answers = curls_of(&c, h, "/client", 6)?;
        println!("  curl {}:8080/client -> {}", h.ip, answers.join(", "));
        let tasks: std::collections::BTreeSet<&str> = answers
            .iter()
            .filter_map(|a| a.split_whitespace().next())
            .collect();
        expect(
            tasks.len() == 3 && answers.iter().all(|a| a.starts_with("whoami.")),
            "round robin",
            &format!("{}:8080 answers from all 3 tasks", h.ip),
            answers.join(", "),
        )?;
        let seen_from_client = answers.iter().all(|a| {
            a.split_whitespace()
                .nth(1)
                .is_some_and(|p| p.starts_with(CLIENT_IP))
        });
        expect(
            seen_from_client,
            "client address",
            &format!("every task saw the client's own address {CLIENT_IP}, through every node"),
            answers.join(", "),
        )?;
    }

    step("3. Scale to 5: the new tasks fill the emptiest nodes, nothing running moves")?;
    show(c.host(1), "host1", &["service", "scale", "whoami=5"])?;
    converged(&c, &[1, 2, 3], "whoami", 5)?;
    let mut counts: Vec<usize> = by_node(c.host(1), "whoami")?.into_values().collect();
    counts.sort();
    expect(
        counts == [1, 2, 2],
        "scale",
        "5/5 spread 2/2/1",
        format!("{counts:?}"),
    )?;

    step("4. A global service, and one constrained to node.labels.env==production")?;
    show(
        c.host(3),
        "host3",
        &[
            "service",
            "create",
            "--name",
            "mon",
            "--process",
            "--mode",
            "global",
            "--",
            "sleep",
            "100000",
        ],
    )?;
    show(
        c.host(3),
        "host3",
        &[
            "service",
            "create",
            "--name",
            "prod",
            "--process",
            "--mode",
            "global",
            "--constraint",
            "node.labels.env==production",
            "--",
            "sleep",
            "100000",
        ],
    )?;
    show(c.host(3), "host3", &["service", "ls"])?;
    let mon = by_node(c.host(2), "mon")?;
    let prod = by_node(c.host(2), "prod")?;
    expect(
        mon.len() == 3,
        "global",
        "mon 3/3, one per node",
        format!("{mon:?}"),
    )?;
    expect(
        prod.keys().collect::<Vec<_>>() == [&names[0]],
        "constraint",
        "prod 1/1 on host1 only",
        format!("{prod:?}"),
    )?;

    step(
        "5. A rolling update, 2 at a time with 2 s between waves, while a client sends 100 \
         requests a second (1 s each at most) and times the gaps",
    )?;
    let target = format!("{}:8080", c.host(1).ip).parse()?;
    let client = mesh_tests::availability::Probe::start(
        c.external_ns("client").context("client namespace")?,
        target,
    )?;
    show(
        c.host(2),
        "host2",
        &[
            "service",
            "update",
            "whoami",
            "--env-add",
            "VERSION=2",
            "--update-parallelism",
            "2",
            "--update-delay",
            "2s",
            "--update-order",
            "start-first",
            "--update-monitor",
            "1s",
        ],
    )?;
    let seen = client.finish();
    println!("  client: {seen}");
    // Start-first: a slot's new task serves before its old one leaves the load balancers,
    // so nothing should wait as long as a SYN retransmit (1 s); the tests measure gaps of
    // ~40 ms under such updates.
    let max_gap = Duration::from_millis(500);
    let claim = mesh_tests::availability::Availability::claim(0, max_gap);
    let verdict = seen.check(max_gap);
    expect(
        verdict.is_ok(),
        "update",
        &claim,
        verdict.err().unwrap_or_default(),
    )?;

    seed_001_with_an_image(&c)?;

    step("7. A task dies and is restarted; host3 dies and its tasks run elsewhere; host2 drains")?;
    let rows: Vec<Value> = c.host(1).meshctl_json(&["ps"])?;
    let victim = rows
        .iter()
        .find(|t| t["service"] == "whoami" && t["state"] == "running")
        .context("a whoami task on host1")?;
    let pid = victim["pid"].as_u64().context("its pid")? as i32;
    println!(
        "  kill -9 {pid}  (task {} on host1)",
        victim["name"].as_str().unwrap_or("")
    );
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        bail!("kill -9 {pid}: {}", std::io::Error::last_os_error());
    }
    c.eventually(Duration::from_secs(15), "the task restarted", |c| {
        let rows: Vec<Value> = c.host(2).meshctl_json(&["service", "ps", "whoami"])?;
        let failed = rows
            .iter()
            .any(|r| r["history"] == true && r["state"] == "Failed");
        Ok((failed && by_node(c.host(2), "whoami")?.values().sum::<usize>() == 5).then_some(()))
    })?;
    show(c.host(2), "host2", &["service", "ps", "whoami"])?;
    expect(
        true,
        "restart",
        "the killed task replaced in its slot, its history row kept",
        "",
    )?;

    println!("  host3: SIGKILL its agent and cut its link");
    c.host_mut(3).kill_agent()?;
    c.underlay().sh("ip link set h3 down")?;
    // Right after the kill every view still says 5/5, with host3's tasks: first wait for the
    // failure detector to tell, then for the replacements.
    let dead = names[2].clone();
    c.eventually(Duration::from_secs(15), "host3's tasks replaced", |c| {
        for i in [1, 2] {
            let by = by_node(c.host(i), "whoami")?;
            if by.contains_key(&dead) || by.values().sum::<usize>() != 5 {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })?;
    converged(&c, &[1, 2], "whoami", 5)?;
    let answers = curls(&c, c.host(2), 10)?;
    println!("  curl {}:8080 -> {}", c.host(2).ip, answers.join(", "));
    let failed: Vec<&String> = answers
        .iter()
        .filter(|a| !a.starts_with("whoami."))
        .collect();
    let ok = answers.len() - failed.len();
    show(c.host(1), "host1", &["service", "ps", "whoami"])?;
    let spread = by_node(c.host(1), "whoami")?;
    expect(
        !spread.contains_key(&names[2]) && spread.values().sum::<usize>() == 5 && failed.is_empty(),
        "node failure",
        &format!("5/5 on host1 and host2, {ok} of 10 requests to host2 answered"),
        format!("{spread:?}, {} failed", failed.len()),
    )?;
    show(
        c.host(1),
        "host1",
        &["node", "update", "--availability", "drain", &names[1]],
    )?;
    converged(&c, &[1, 2], "whoami", 5)?;
    // Drained tasks hand over: they stop once their replacements run.
    let host1 = names[0].clone();
    let spread = c
        .eventually(Duration::from_secs(15), "host2 empty", |c| {
            let spread = by_node(c.host(1), "whoami")?;
            Ok((spread.keys().collect::<Vec<_>>() == [&host1]).then_some(spread))
        })
        .unwrap_or_else(|_| by_node(c.host(1), "whoami").unwrap_or_default());
    show(c.host(1), "host1", &["service", "ps", "whoami"])?;
    expect(
        spread.keys().collect::<Vec<_>>() == [&names[0]],
        "drain",
        "every whoami task moved to host1",
        format!("{spread:?}"),
    )?;

    step("8. A secret mounted at /run/secrets, and a compose stack whose web reaches api by name")?;
    let secret = b"1q2w3e4r";
    println!("\x1b[2m[host1]$ echo -n 1q2w3e4r | meshctl secret create db_password -\x1b[0m");
    {
        use std::io::Write;
        let mut child = Command::new(bin("meshctl"))
            .arg("--socket")
            .arg(c.host(1).socket())
            .args(["secret", "create", "db_password", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        child.stdin.take().context("stdin")?.write_all(secret)?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "secret create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    show(
        c.host(1),
        "host1",
        &[
            "service",
            "create",
            "--name",
            "db",
            "--process",
            "--publish",
            "8081:80",
            // Process tasks run as nobody unless told: the secret's owner is the task's user.
            "--user",
            "1000",
            "--secret",
            "source=db_password,target=mysql_root_password,uid=1000,mode=0400",
            "--",
            &whoami,
            "--hash",
            "/run/secrets/mysql_root_password",
        ],
    )?;
    let answer = curls_port(&c, c.host(1), 8081)?;
    let want = fnv(secret);
    println!(
        "  curl {}:8081 -> {answer}   (the task's hash of what it read)",
        c.host(1).ip
    );
    expect(
        answer == want,
        "secret",
        &format!("the task read the secret (hash {want})"),
        &answer,
    )?;
    let inspect = show(c.host(2), "host2", &["secret", "inspect", "db_password"])?;
    expect(
        !inspect.contains("1q2w3e4r"),
        "secret",
        "inspect never shows the data",
        &inspect,
    )?;

    let compose = c.log_dir().join("docker-compose.yml");
    std::fs::write(
        &compose,
        format!(
            r#"version: "3.8"
services:
  web:
    command: ["{whoami}", "--name", "web"]
    ports: ["8082:80"]
    networks: [app]
    deploy:
      replicas: 2
  api:
    command: ["{whoami}", "--name", "api"]
    networks: [app]
    deploy:
      replicas: 2
networks:
  app:
    driver: overlay
"#
        ),
    )?;
    println!("  docker-compose.yml: web (published 8082) and api on network app");
    show(
        c.host(1),
        "host1",
        &[
            "stack",
            "deploy",
            "-c",
            compose.to_str().context("utf-8 path")?,
            "demo",
        ],
    )?;
    converged(&c, &[1, 2], "demo_web", 2)?;
    converged(&c, &[1, 2], "demo_api", 2)?;
    show(c.host(1), "host1", &["stack", "services", "demo"])?;
    let local: Vec<Value> = c.host(1).meshctl_json(&["ps"])?;
    let web = local
        .iter()
        .find(|t| t["service"] == "demo_web" && t["state"] == "running")
        .and_then(|t| t["name"].as_str())
        .context("a running web task on host1")?
        .to_owned();
    let out = show(
        c.host(1),
        "host1",
        &[
            "exec",
            &web,
            "--",
            "curl",
            "-s",
            "--max-time",
            "3",
            "http://api/",
        ],
    )?;
    expect(
        out.trim() == "api",
        "stack",
        "web reaches api by its short name",
        out.trim(),
    )?;

    step(
        "9. DNS from inside a task (resolver at 127.0.0.11): a service, its tasks, an outside name",
    )?;
    let tasks: Vec<Value> = c.host(1).meshctl_json(&["ps"])?;
    let netns = tasks
        .iter()
        .find(|t| t["service"] == "whoami" && t["state"] == "running")
        .and_then(|t| t["netns"].as_str())
        .context("a running whoami task on host1")?
        .to_owned();
    let vip: Value = c.host(1).meshctl_json(&["service", "inspect", "whoami"])?;
    let vip = vip["vip"].as_str().unwrap_or_default().to_owned();
    for (q, want) in [("whoami", 1usize), ("tasks.whoami", 5), (OUTSIDE_NAME, 1)] {
        println!("\x1b[2m[host1]$ ip netns exec {netns} getent ahostsv4 {q}\x1b[0m");
        let out = Command::new("ip")
            .args(["netns", "exec", &netns, "getent", "ahostsv4", q])
            .output()?;
        let mut ips: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        ips.sort();
        ips.dedup();
        println!("  {q} -> {}", ips.join(" "));
        let (ok, wanted) = match q {
            "whoami" => (ips == [vip.clone()], format!("the VIP {vip}")),
            OUTSIDE_NAME => (
                ips == [OUTSIDE_IP.to_owned()],
                format!("{OUTSIDE_IP}, from the upstream resolver"),
            ),
            _ => (ips.len() == want, format!("{want} task addresses")),
        };
        expect(
            ok,
            "dns",
            &format!("{q} resolves to {wanted}"),
            if ips.is_empty() {
                "no answer".to_owned()
            } else {
                ips.join(" ")
            },
        )?;
    }

    step("10. The visualizer")?;
    let page = Command::new("curl")
        .args(["-s", "--max-time", "3"])
        .arg(format!("http://127.0.0.1:{UI_PORT}/"))
        .output()?;
    let page = String::from_utf8_lossy(&page.stdout);
    expect(
        page.contains("<html") || page.contains("<!doctype") || page.contains("<!DOCTYPE"),
        "visualizer",
        &format!("http://127.0.0.1:{UI_PORT}/ serves the cluster page"),
        page.chars().take(80).collect::<String>(),
    )?;
    if keep {
        println!(
            "\n  The cluster stays up: open http://127.0.0.1:{UI_PORT}/ in a browser. Ctrl-C cleans up."
        );
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
        INTERRUPTED.store(false, Ordering::SeqCst);
    }

    step("Cleaning up: stopping agents, removing namespaces, links, pins and cgroups")?;
    drop(c);
    Ok(())
}

/// One curl of `host:port` from the client; the answer, trimmed.
fn curls_port(c: &Cluster, h: &Host, port: u16) -> Result<String> {
    let client = format!("{}-xclient", c.name());
    let out = Command::new("ip")
        .args(["netns", "exec", &client, "curl", "-s", "--max-time", "3"])
        .arg(format!("http://{}:{port}/", h.ip))
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// FNV-1a 64 in hex, as mesh-whoami's `--hash` answers.
fn fnv(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h = (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// What an image of the demo serves: `<hostname> <version>`, so a curl shows which task and
/// which image answered. Exits at once on SIGTERM, as a well-behaved image does.
fn web_image(version: u32) -> Result<Image> {
    Image::named(
        &format!("localhost/demo-web:{version}"),
        &format!(
            r#"["/bin/sh","-c","trap 'exit 0' TERM; echo $(hostname) v{version} > /www/index.html; httpd -f -p 80 -h /www & wait"]"#
        ),
    )
}

/// Seed 001, step for step, with an image (podman): create with Docker's argument order,
/// round robin from every node, scale, a rolling `update --image` under a counting client,
/// the old tasks as `\_` rows, rollback, rm.
fn seed_001_with_an_image(c: &Cluster) -> Result<()> {
    step(
        "6. Seed 001 with an image: my-web from localhost/demo-web:1 (podman), scaled, \
         updated to :2 while a client counts failures, rolled back, removed",
    )?;
    println!(
        "  building localhost/demo-web:1 and :2 offline (busybox httpd serving hostname and version)"
    );
    let v1 = web_image(1)?;
    let v2 = web_image(2)?;
    show(
        c.host(1),
        "host1",
        &[
            "service",
            "create",
            "--name",
            "my-web",
            "--publish",
            "published=8081,target=80",
            "--replicas",
            "3",
            v1.name(),
        ],
    )?;
    converged(c, &[1, 2, 3], "my-web", 3)?;
    for h in c.hosts() {
        let answers = curls_at(c, h, 8081, "/", 6)?;
        println!("  curl {}:8081 -> {}", h.ip, answers.join(", "));
        let tasks: std::collections::BTreeSet<&str> = answers
            .iter()
            .filter_map(|a| a.split_whitespace().next())
            .collect();
        expect(
            tasks.len() == 3 && answers.iter().all(|a| a.ends_with(" v1")),
            "image round robin",
            &format!("{}:8081 answers from all 3 my-web tasks, each v1", h.ip),
            answers.join(", "),
        )?;
    }

    show(c.host(2), "host2", &["service", "scale", "my-web=5"])?;
    converged(c, &[1, 2, 3], "my-web", 5)?;

    let target = format!("{}:8081", c.host(3).ip).parse()?;
    let client = mesh_tests::availability::Probe::start(
        c.external_ns("client").context("client namespace")?,
        target,
    )?;
    show(
        c.host(1),
        "host1",
        &[
            "service",
            "update",
            "--image",
            v2.name(),
            "--update-delay",
            "2s",
            "my-web",
        ],
    )?;
    let seen = client.finish();
    println!("  client: {seen}");
    let max_gap = Duration::from_millis(500);
    let verdict = seen.check(max_gap);
    expect(
        verdict.is_ok(),
        "image update",
        &mesh_tests::availability::Availability::claim(0, max_gap),
        verdict.err().unwrap_or_default(),
    )?;
    converged(c, &[1, 2, 3], "my-web", 5)?;
    let answers = curls_at(c, c.host(2), 8081, "/", 10)?;
    expect(
        answers.iter().all(|a| a.ends_with(" v2")),
        "image update",
        "every answer from a v2 task",
        answers.join(", "),
    )?;
    show(c.host(2), "host2", &["service", "ps", "my-web"])?;
    let rows: Vec<Value> = c.host(2).meshctl_json(&["service", "ps", "my-web"])?;
    let old_rows = rows
        .iter()
        .filter(|r| r["history"] == true && r["image"] == v1.name() && r["state"] == "Shutdown")
        .count();
    expect(
        old_rows == 5,
        "history",
        "5 \\_ rows: the v1 tasks, Shutdown",
        format!("{old_rows} such rows"),
    )?;

    show(c.host(3), "host3", &["service", "rollback", "my-web"])?;
    converged(c, &[1, 2, 3], "my-web", 5)?;
    let answers = c
        .eventually(Duration::from_secs(30), "every answer from v1", |c| {
            let answers = curls_at(c, c.host(1), 8081, "/", 10)?;
            Ok(answers
                .iter()
                .all(|a| a.ends_with(" v1"))
                .then_some(answers))
        })
        .unwrap_or_else(|_| curls_at(c, c.host(1), 8081, "/", 10).unwrap_or_default());
    expect(
        answers.iter().all(|a| a.ends_with(" v1")),
        "rollback",
        "every answer from a v1 task again",
        answers.join(", "),
    )?;

    show(c.host(1), "host1", &["service", "rm", "my-web"])?;
    // podman's containers are the machine's, whichever host's namespace runs them.
    let gone = c.eventually(Duration::from_secs(30), "my-web's containers gone", |_| {
        let out = Command::new("podman")
            .args(["ps", "-a", "-q"])
            .args(["--filter", &format!("ancestor={}", v1.name())])
            .args(["--filter", &format!("ancestor={}", v2.name())])
            .output()?;
        Ok((out.status.success() && out.stdout.trim_ascii().is_empty()).then_some(()))
    });
    expect(
        gone.is_ok(),
        "rm",
        "my-web removed and its containers gone from every node",
        "containers left",
    )?;
    Ok(())
}
