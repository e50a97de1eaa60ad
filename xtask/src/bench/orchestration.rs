//! Services with a desired state, end to end on 3 namespace hosts: `service create
//! --replicas 30` (and 300) until every task runs and every node balances over all of them;
//! `scale` to 60 likewise; then host3 dies (agent SIGKILL + underlay link down) and the clock
//! runs until its slots serve from host1 and host2 again (60 running, host3's backends gone
//! from their load balancers). No baseline runs beside it: the goals are absolute (≤ 1 s to
//! place 30, ≤ 5 s to place 300, < 3 s to reschedule after a death, detection included).
//!
//! Where a create's time goes comes from the task records themselves (`service ps`): when
//! the command returned, when the first and the last task record was made (the plan reached
//! the nodes), when the last task ran, and when every node balanced over all of them; and
//! per node, tasks started per second (its tasks over the time from its first record to its
//! last task running).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use mesh_api::v1::{ServiceInfo, ServiceTaskInfo};
use mesh_tests::{Cluster, cluster::bin};

use super::{
    agents,
    report::{Report, Spread, Table},
};

const POLL: Duration = Duration::from_millis(20);
const VICTIM: usize = 3;
/// A network with room for 300 tasks (the shared one is a /24).
const BIG_NETWORK: &str = "big";
const BIG_SUBNET: &str = "10.12.0.0/22";

/// One `service create`'s timeline, in ms from the command's start.
#[derive(Default)]
struct Timeline {
    returned: f64,
    first_record: f64,
    last_record: f64,
    last_running: f64,
    balanced: f64,
    /// Tasks started per second, per node.
    rates: Vec<f64>,
}

pub fn run(quick: bool) -> Result<Report> {
    let runs = if quick { 2 } else { 3 };
    let big_runs = if quick { 1 } else { 2 };
    let mut c = agents::cluster(3)?;
    c.host(1)
        .meshctl_ok(&["network", "create", BIG_NETWORK, "--subnet", BIG_SUBNET])?;
    let whoami = bin("mesh-whoami");
    let whoami = whoami.to_str().unwrap_or_default().to_owned();
    let (mut create, mut scale, mut death) = (Vec::new(), Vec::new(), Vec::new());
    let mut timelines: BTreeMap<usize, Vec<Timeline>> = BTreeMap::new();
    for run in 0..runs {
        eprintln!("==> orchestration run {}", run + 1);
        let name = format!("orch{run}");
        let (took, timeline) = create_until_balanced(&c, &name, agents::NETWORK, 30, &whoami)?;
        create.push(took);
        timelines.entry(30).or_default().push(timeline);

        let started = Instant::now();
        c.host(2)
            .meshctl_ok(&["service", "scale", &format!("{name}=60"), "-d"])?;
        scale.push(agents::time_until(
            started,
            Duration::from_secs(60),
            POLL,
            "60 tasks running and balanced on every node",
            || serving_everywhere(&c, &name, 60, &[1, 2, 3]),
        )?);

        let victim_ips: BTreeSet<Ipv4Addr> = {
            let s: ServiceInfo = c.host(1).meshctl_json(&["service", "inspect", &name])?;
            let node = c.host(VICTIM).node_name().to_owned();
            s.tasks
                .iter()
                .filter(|t| t.node == node)
                .map(|t| t.ip)
                .collect()
        };
        let started = Instant::now();
        c.host_mut(VICTIM).kill_agent()?;
        c.underlay().sh(&format!("ip link set h{VICTIM} down"))?;
        death.push(agents::time_until(
            started,
            Duration::from_secs(60),
            POLL,
            "host3's slots serving from host1 and host2",
            || {
                for i in [1, 2] {
                    let Some(active) = serving_on(&c, i, &name, 60)? else {
                        return Ok(false);
                    };
                    if active.iter().any(|ip| victim_ips.contains(ip)) {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )?);

        // Heal and clean up for the next run.
        c.underlay().sh(&format!("ip link set h{VICTIM} up"))?;
        c.host_mut(VICTIM).restart_agent()?;
        agents::ready_everywhere(&c, Duration::from_secs(30))?;
        remove(&c, &name)?;
    }
    let mut big = Vec::new();
    for run in 0..big_runs {
        eprintln!("==> orchestration: 300 replicas, run {}", run + 1);
        let name = format!("big{run}");
        let (took, timeline) = create_until_balanced(&c, &name, BIG_NETWORK, 300, &whoami)?;
        big.push(took);
        timelines.entry(300).or_default().push(timeline);
        remove(&c, &name)?;
    }

    let mut report = Report::new("Orchestration: placing, scaling and rescheduling tasks");
    report.ran(format!(
        "3 namespace hosts with agents (release builds, gossip every 100 ms, phi threshold 8), \
         mesh-whoami tasks (process driver); {runs} runs of: `service create --replicas 30`, \
         `service scale =60`, then SIGKILL host3's agent + `ip link set h3 down`; then \
         {big_runs} of `service create --replicas 300` (on a /22 network); done when `service \
         inspect` on every surviving node says N/N running and its load balancer has N active \
         backends (none of host3's), polled every {} ms",
        POLL.as_millis()
    ));
    let show = |v: &[Duration]| Spread::of_durations(v).map_or("-".into(), |s| s.show(0, " ms"));
    let verdict = |v: &[Duration], goal: Duration| {
        let worst = v.iter().max().copied().unwrap_or_default();
        if worst <= goal { "met" } else { "NOT met" }
    };
    let mut t = Table::new("min / median / max", &["", "time", "goal"]);
    t.row(vec![
        "service create --replicas 30 → 30/30, balanced on every node".into(),
        show(&create),
        format!("≤ 1 s ({})", verdict(&create, Duration::from_secs(1))),
    ]);
    t.row(vec![
        "service create --replicas 300 → 300/300, balanced on every node".into(),
        show(&big),
        format!("≤ 5 s ({})", verdict(&big, Duration::from_secs(5))),
    ]);
    t.row(vec![
        "service scale 30 → 60 → 60/60, balanced on every node".into(),
        show(&scale),
        "-".into(),
    ]);
    t.row(vec![
        "host3 dies → its slots serving from host1 and host2 (detection included)".into(),
        show(&death),
        format!("< 3 s ({})", verdict(&death, Duration::from_secs(3))),
    ]);
    report.tables.push(t);

    let mut t = Table::new(
        "Where a create's time goes: ms from the command's start (median over runs), and tasks \
         started per second per node (median over nodes and runs)",
        &[
            "replicas",
            "command returned",
            "first task record",
            "last task record",
            "last task running",
            "balanced everywhere",
            "tasks/s per node",
        ],
    );
    for (replicas, lines) in &timelines {
        let median = |f: fn(&Timeline) -> f64| {
            let v: Vec<f64> = lines.iter().map(f).collect();
            Spread::of(&v).map_or("-".into(), |s| format!("{:.0}", s.median))
        };
        let rates: Vec<f64> = lines.iter().flat_map(|l| l.rates.iter().copied()).collect();
        t.row(vec![
            replicas.to_string(),
            median(|l| l.returned),
            median(|l| l.first_record),
            median(|l| l.last_record),
            median(|l| l.last_running),
            median(|l| l.balanced),
            Spread::of(&rates).map_or("-".into(), |s| format!("{:.0}", s.median)),
        ]);
    }
    report.tables.push(t);
    report.note(
        "A task record is made when the node's orchestrator takes the slot the plan gives it; \
         it runs once its process started (mesh-whoami has no health check, so running is \
         when it listens). From the last task running to balanced everywhere is gossip \
         carrying the endpoints and each node programming its load balancer.",
    );
    drop(c);
    Ok(report)
}

/// `service create NAME --replicas N -d` from host1, timed until every node balances over
/// all N; the timeline read from the task records afterwards.
fn create_until_balanced(
    c: &Cluster,
    name: &str,
    network: &str,
    replicas: usize,
    whoami: &str,
) -> Result<(Duration, Timeline)> {
    let wall0 = wall_ms();
    let started = Instant::now();
    let n = replicas.to_string();
    c.host(1).meshctl_ok(&[
        "service",
        "create",
        name,
        "--network",
        network,
        "--replicas",
        &n,
        "-d",
        "--",
        whoami,
    ])?;
    let returned = started.elapsed();
    let took = agents::time_until(
        started,
        Duration::from_secs(120),
        POLL,
        &format!("{replicas} tasks running and balanced on every node"),
        || serving_everywhere(c, name, replicas, &[1, 2, 3]),
    )?;
    let rows: Vec<ServiceTaskInfo> = c.host(1).meshctl_json(&["service", "ps", name])?;
    let running: Vec<&ServiceTaskInfo> = rows
        .iter()
        .filter(|r| !r.history && r.state == "Running")
        .collect();
    let at = |ms: u64| ms.saturating_sub(wall0) as f64;
    let mut by_node: BTreeMap<&str, Vec<&ServiceTaskInfo>> = BTreeMap::new();
    for r in &running {
        by_node
            .entry(r.node.as_deref().unwrap_or_default())
            .or_default()
            .push(r);
    }
    let rates = by_node
        .values()
        .filter_map(|tasks| {
            let first = tasks.iter().map(|t| t.created_ms).min()?;
            let last = tasks.iter().map(|t| t.since_ms).max()?;
            let secs = (last.saturating_sub(first) as f64 / 1000.0).max(0.001);
            Some(tasks.len() as f64 / secs)
        })
        .collect();
    let timeline = Timeline {
        returned: returned.as_secs_f64() * 1000.0,
        first_record: running
            .iter()
            .map(|r| at(r.created_ms))
            .fold(f64::MAX, f64::min),
        last_record: running.iter().map(|r| at(r.created_ms)).fold(0.0, f64::max),
        last_running: running.iter().map(|r| at(r.since_ms)).fold(0.0, f64::max),
        balanced: took.as_secs_f64() * 1000.0,
        rates,
    };
    eprintln!(
        "    {replicas} replicas: returned {:.0} ms, records {:.0}–{:.0} ms, last running {:.0} \
         ms, balanced {:.0} ms, tasks/s per node {:?}",
        timeline.returned,
        timeline.first_record,
        timeline.last_record,
        timeline.last_running,
        timeline.balanced,
        timeline.rates.iter().map(|r| r.round()).collect::<Vec<_>>()
    );
    Ok((took, timeline))
}

fn remove(c: &Cluster, name: &str) -> Result<()> {
    c.host(1).meshctl_ok(&["service", "rm", name])?;
    c.eventually(Duration::from_secs(120), "every task stopped", |c| {
        for h in c.hosts() {
            let local: Vec<serde_json::Value> = h.meshctl_json(&["ps"])?;
            if !local.is_empty() {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `service inspect` on each host says `n` running of `n`, and its load balancer balances
/// over `n` active backends.
fn serving_everywhere(c: &Cluster, name: &str, n: usize, hosts: &[usize]) -> Result<bool> {
    for i in hosts {
        if serving_on(c, *i, name, n)?.is_none() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Host `i`'s active backends of the service when it says `n` of `n` run and balances over
/// `n` (one `service inspect`: the poll itself takes CPU from the agents it measures).
fn serving_on(c: &Cluster, i: usize, name: &str, n: usize) -> Result<Option<Vec<Ipv4Addr>>> {
    let s: ServiceInfo = c.host(i).meshctl_json(&["service", "inspect", name])?;
    if s.running != n || s.desired != Some(n) {
        return Ok(None);
    }
    let active: Vec<Ipv4Addr> = s
        .dataplane
        .map(|d| {
            d.backends
                .iter()
                .filter(|b| b.state == mesh_api::v1::BackendState::Active)
                .map(|b| b.ip)
                .collect()
        })
        .unwrap_or_default();
    Ok((active.len() == n).then_some(active))
}
