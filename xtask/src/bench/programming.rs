//! How long until what a user asked for is in every node's kernel: a `service create`, a
//! `meshctl run`, and 10,000 services at once (through the agents: gossip, merge, apply; and
//! `LoadBalancer::apply` alone).
//!
//! The kernel is read, not the agents: one reader per node (a thread of the bench that
//! entered the node's namespace once, see [`kernel`]) polls the node's pinned maps and FDB.
//! A service counts as programmed on a node when its published port is in the node's
//! LB_SERVICES map; a task when, on every node, the published port's slots lead to it as an
//! active backend (LB_SERVICES → LB_SVC_STATE → LB_SLOTS → LB_BACKENDS, the programs' own
//! lookup) and every other node's VXLAN device has the static FDB entry for its MAC pointing
//! at the task's node (netlink). 10,000 services are counted straight from the pinned
//! LB_SERVICES map with the bpf syscall.
//!
//! Up to 2026-12-07 the first two tables polled `meshctl service inspect` (the agent's
//! record of what it programmed) and `bridge fdb`, a process per node per poll.

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
    agents,
    kernel::{self, KernelWatch},
    lbmaps,
    report::{self, Report, Spread, Table, ms},
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
    let watches: Vec<KernelWatch> = c
        .hosts()
        .iter()
        .map(|h| KernelWatch::start(h, POLL))
        .collect::<Result<_>>()?;
    let mut report = Report::new("Programming latency: from the command to every node's kernel");

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
        let port = 9000 + i as u16;
        let pending: Vec<_> = watches
            .iter()
            .map(|w| w.when(started, move |k| Ok(k.published_backends(port)?.is_some())))
            .collect::<Result<_>>()?;
        let status = child.wait().context("waiting for meshctl service create")?;
        if !status.success() {
            bail!("meshctl service create {name} failed ({status})");
        }
        command.push(started.elapsed());
        let mut slowest = Duration::ZERO;
        for (h, p) in c.hosts().iter().zip(pending) {
            let d = p.wait(
                Duration::from_secs(30),
                &format!("service {name} in the LB maps"),
            )?;
            per_node.entry(h.index).or_default().push(d);
            slowest = slowest.max(d);
        }
        all.push(slowest);
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
        let vtep: std::net::Ipv4Addr = c.host(1).ip.parse()?;
        let mac = mac.to_ascii_lowercase();
        let all_watches: Vec<&KernelWatch> = watches.iter().collect();
        let lb_times = kernel::until_all(
            &all_watches,
            started,
            Duration::from_secs(30),
            &format!("task {name} an active backend"),
            move |k| {
                Ok(k.published_backends(agents::PUBLISHED)?
                    .is_some_and(|b| b.contains(&ip)))
            },
        )?;
        let fdb_times = kernel::until_all(
            &[&watches[1], &watches[2]],
            started,
            Duration::from_secs(30),
            &format!("FDB entry of task {name}"),
            move |k| Ok(k.fdb()?.contains(&(mac.clone(), vtep))),
        )?;
        let lb = lb_times.into_iter().max().expect("three nodes");
        let fdb = fdb_times.into_iter().max().expect("two nodes");
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
    let mut read = Duration::ZERO;
    let mut read_max = Duration::ZERO;
    for w in &watches {
        let (_, mean, max) = w.resolution();
        read = read.max(mean);
        read_max = read_max.max(max);
    }
    report.ran(format!(
        "3 namespace hosts with agents (gossip interval 100 ms, settle 1 s); {runs} runs each; \
         each node's kernel read every {} ms by one long-lived reader per node (a thread in \
         the node's namespace holding the pinned LB maps and a netlink socket open; no agent \
         asked, no process per read); a round of reads took {} µs on average, {} µs at most \
         (the resolution is the interval plus one round)",
        POLL.as_millis(),
        read.as_micros(),
        read_max.as_micros()
    ));
    report.note(format!(
        "Load average (1/5/15 min) at the end: {} (a shared 2-core machine).",
        report::load_average()
    ));
    drop(watches);
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
