//! How long until what a user asked for is in every node's kernel: a `service create`, a
//! `meshctl run`, and 10,000 services at once (through the agents: gossip, merge, apply; and
//! `LoadBalancer::apply` alone).
//!
//! The kernel is polled: a service counts as programmed on a node when its load balancer
//! holds it (`meshctl service inspect`'s dataplane section, read from the maps); a task when
//! every node's load balancer has it as an active backend and every other node's overlay has
//! the static FDB entry for its MAC pointing at the task's node (`bridge fdb`). 10,000
//! services are counted straight from the pinned LB_SERVICES map with the bpf syscall.

use std::{
    collections::BTreeMap,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_agent::cluster::{Replicated, key};
use mesh_api::id::Stamp;
use mesh_api::spec::{EndpointMode, PortSpec, Protocol, ServiceSpec};
use mesh_api::v1::{LocalTaskInfo, ServiceInfo, TaskInfo};
use mesh_tests::{Cluster, cluster::bin};

use super::{
    agents, lbmaps,
    report::{Report, Spread, Table, ms},
    scale,
};

/// Polling interval of the kernel checks: the resolution of these timings.
const POLL: Duration = Duration::from_millis(20);
pub const BULK_SERVICES: u32 = 10_000;
const BULK_FIRST_PORT: u16 = 20_000;

pub fn run(quick: bool) -> Result<Report> {
    let runs = if quick { 3 } else { 5 };
    // Before the cluster exists, so three busy agents do not share the CPU with it.
    let apply = scale::apply_time(BULK_SERVICES)?;
    let mut c = agents::cluster(3)?;
    let mut report = Report::new("Programming latency: from the command to every node's kernel");
    report.ran(format!(
        "3 namespace hosts with agents (gossip interval 100 ms, settle 1 s); {runs} runs each; \
         kernel polled every {} ms on every node (the resolution)",
        POLL.as_millis()
    ));

    // service create on host1 → LB maps of all three nodes.
    let mut per_node: BTreeMap<usize, Vec<Duration>> = BTreeMap::new();
    let mut all = Vec::new();
    let mut command = Vec::new();
    for i in 0..runs {
        let name = format!("svc{i}");
        let publish = format!("{}:80", 9000 + i);
        let started = Instant::now();
        let mut child = std::process::Command::new(bin("meshctl"))
            .arg("--socket")
            .arg(c.host(1).socket())
            .args(["service", "create", &name, "--network", agents::NETWORK])
            .args(["--publish", &publish])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running meshctl service create")?;
        let mut done: BTreeMap<usize, Duration> = BTreeMap::new();
        let mut returned = None;
        while done.len() < 3 || returned.is_none() {
            if returned.is_none()
                && let Some(status) = child.try_wait()?
            {
                if !status.success() {
                    bail!("meshctl service create {name} failed ({status})");
                }
                returned = Some(started.elapsed());
            }
            for h in c.hosts() {
                if !done.contains_key(&h.index) && agents::programmed(h, &name)? {
                    done.insert(h.index, started.elapsed());
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("service {name} not programmed on every node within 30 s: {done:?}");
            }
            std::thread::sleep(POLL);
        }
        for (node, d) in &done {
            per_node.entry(*node).or_default().push(*d);
        }
        all.push(*done.values().max().expect("three nodes"));
        command.push(returned.expect("returned"));
    }
    let mut t = Table::new(
        "`meshctl service create` on host1 (min / median / max)",
        &["until", "time"],
    );
    for (node, times) in &per_node {
        t.row(vec![
            format!("LB maps programmed on host{node}"),
            spread_ms(times),
        ]);
    }
    t.row(vec!["programmed on all 3 nodes".into(), spread_ms(&all)]);
    t.row(vec![
        "the command returned (waits out the 1 s settle)".into(),
        spread_ms(&command),
    ]);
    report.tables.push(t);

    // meshctl run on host1 → backends on all nodes and FDB on the others.
    agents::whoami(&c, &[])?;
    let mut lb_all = Vec::new();
    let mut fdb_all = Vec::new();
    let mut both = Vec::new();
    let mut command = Vec::new();
    for i in 0..runs {
        let name = format!("t{i}");
        let started = Instant::now();
        let task: LocalTaskInfo =
            c.host(1)
                .run_whoami(agents::NETWORK, Some(agents::SERVICE), &name, &[])?;
        command.push(started.elapsed());
        let ip = task.ip.context("the task has no address")?;
        let tasks: Vec<TaskInfo> = c
            .host(1)
            .meshctl_json::<ServiceInfo>(&["service", "inspect", agents::SERVICE])?
            .tasks;
        let mac = tasks
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.mac.clone())
            .context("the task is not listed")?;
        let vtep = c.host(1).ip.clone();
        let mut lb_done = None;
        let mut fdb_done = None;
        while lb_done.is_none() || fdb_done.is_none() {
            if lb_done.is_none() {
                let mut ok = true;
                for h in c.hosts() {
                    ok &= agents::active_backends(h, agents::SERVICE)?.contains(&ip);
                }
                if ok {
                    lb_done = Some(started.elapsed());
                }
            }
            if fdb_done.is_none()
                && agents::fdb_has(c.host(2), &mac, &vtep)?
                && agents::fdb_has(c.host(3), &mac, &vtep)?
            {
                fdb_done = Some(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("task {name} not programmed everywhere within 30 s");
            }
            std::thread::sleep(POLL);
        }
        let (lb, fdb) = (lb_done.expect("set"), fdb_done.expect("set"));
        lb_all.push(lb);
        fdb_all.push(fdb);
        both.push(lb.max(fdb));
    }
    let mut t = Table::new(
        "`meshctl run` of a task of the service on host1 (min / median / max)",
        &["until", "time"],
    );
    t.row(vec![
        "the command returned (task running)".into(),
        spread_ms(&command),
    ]);
    t.row(vec![
        "active backend in the LB maps of all 3 nodes".into(),
        spread_ms(&lb_all),
    ]);
    t.row(vec![
        "FDB entry on host2 and host3".into(),
        spread_ms(&fdb_all),
    ]);
    t.row(vec!["both, everywhere".into(), spread_ms(&both)]);
    report.tables.push(t);

    // 10,000 services through the agents, and apply alone.
    let bulk = bulk_services(&mut c, BULK_SERVICES)?;
    let mut t = Table::new(
        &format!("{BULK_SERVICES} services at once"),
        &["path", "time"],
    );
    for (node, d) in &bulk.per_node {
        t.row(vec![
            format!("through the agents: in host{node}'s LB maps"),
            ms(*d),
        ]);
    }
    t.row(vec![
        "LoadBalancer::apply alone (same count, empty maps)".into(),
        ms(apply),
    ]);
    report.tables.push(t);
    report.note(
        "The slow maximum of `service create` is the first run: the first service on a network \
         makes every node plumb the network (bridge, VXLAN, FDB) before its LB can point at it.",
    );
    report.note(format!(
        "{BULK_SERVICES} services: host1's agent is stopped, the services are added to its saved \
         gossip keys (the file a restarted agent re-asserts), and the clock starts when it is \
         started again; host1 programs them from its own state, host2 and host3 after gossip \
         delivers them and the merged view is recomputed. Services are dnsrr with one published \
         port each, no tasks."
    ));
    drop(c);
    Ok(report)
}

fn spread_ms(v: &[Duration]) -> String {
    Spread::of_durations(v).map_or("-".into(), |s| s.show(0, " ms"))
}

pub struct Bulk {
    /// Time from host1's restart until each node's LB maps hold every service.
    pub per_node: BTreeMap<usize, Duration>,
}

/// Adds `n` services to the cluster at once through host1's saved gossip keys (see the note
/// in [`run`]) and waits until every node's LB maps hold them.
pub fn bulk_services(c: &mut Cluster, n: u32) -> Result<Bulk> {
    let before: Vec<usize> = c
        .hosts()
        .iter()
        .map(|h| lbmaps::service_keys(&h.bpffs()))
        .collect::<Result<_>>()?;
    let host = c.host_mut(1);
    host.stop_agent()?;
    let path = host.state_dir().join("gossip-keys.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut keys: BTreeMap<String, String> = serde_json::from_str(&text)?;
    let now = mesh_agent::cluster::Clock::now_ms();
    for i in 0..n {
        let name = format!("bulk{i}");
        let spec = ServiceSpec {
            name: name.clone(),
            network: agents::NETWORK.into(),
            endpoint_mode: EndpointMode::Dnsrr,
            vip: None,
            ports: vec![PortSpec {
                protocol: Protocol::Tcp,
                published: Some(BULK_FIRST_PORT + i as u16),
                target: 80,
                mode: Default::default(),
            }],
            ..ServiceSpec::default()
        };
        let stamp = Stamp {
            ms: now + u64::from(i),
            node: host.node_name().to_owned(),
        };
        keys.insert(
            format!("{}{name}", key::SERVICE),
            serde_json::to_string(&Replicated::new(spec, stamp))?,
        );
    }
    std::fs::write(&path, serde_json::to_vec(&keys)?)?;
    eprintln!("==> {n} services written to host1's state; restarting its agent");
    let started = Instant::now();
    host.restart_agent()?;
    let mut per_node = BTreeMap::new();
    while per_node.len() < c.hosts().len() {
        for (h, base) in c.hosts().iter().zip(&before) {
            if !per_node.contains_key(&h.index)
                && lbmaps::service_keys(&h.bpffs())? >= base + n as usize
            {
                per_node.insert(h.index, started.elapsed());
            }
        }
        if started.elapsed() > Duration::from_secs(180) {
            bail!("{n} services not programmed on every node within 180 s: {per_node:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Bulk { per_node })
}
