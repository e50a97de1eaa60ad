//! Services with a desired state, end to end on 3 namespace hosts: `service create
//! --replicas 30` until 30 tasks run and every node balances over all of them; `scale` to
//! 60 likewise; then host3 dies (agent SIGKILL + underlay link down) and the clock runs until
//! its slots serve from host1 and host2 again (60 running, host3's backends gone from their
//! load balancers). No baseline runs beside it: the goals are absolute (< 2 s to place 30,
//! < 3 s to reschedule after a death, detection included).

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Result;
use mesh_api::v1::ServiceInfo;
use mesh_tests::{Cluster, cluster::bin};

use super::{
    agents,
    report::{Report, Spread, Table},
};

const POLL: Duration = Duration::from_millis(20);
const VICTIM: usize = 3;

pub fn run(quick: bool) -> Result<Report> {
    let runs = if quick { 2 } else { 3 };
    let mut c = agents::cluster(3)?;
    let whoami = bin("mesh-whoami");
    let whoami = whoami.to_str().unwrap_or_default().to_owned();
    let (mut create, mut scale, mut death) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        eprintln!("==> orchestration run {}", run + 1);
        let name = format!("orch{run}");
        let started = Instant::now();
        c.host(1).meshctl_ok(&[
            "service",
            "create",
            &name,
            "--network",
            agents::NETWORK,
            "--replicas",
            "30",
            "-d",
            "--",
            &whoami,
        ])?;
        create.push(agents::time_until(
            started,
            Duration::from_secs(60),
            POLL,
            "30 tasks running and balanced on every node",
            || serving_everywhere(&c, &name, 30, &[1, 2, 3]),
        )?);

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
                if !serving_everywhere(&c, &name, 60, &[1, 2])? {
                    return Ok(false);
                }
                for i in [1, 2] {
                    let active = agents::active_backends(c.host(i), &name)?;
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
        c.host(1).meshctl_ok(&["service", "rm", &name])?;
        c.eventually(Duration::from_secs(60), "every task stopped", |c| {
            for h in c.hosts() {
                let local: Vec<serde_json::Value> = h.meshctl_json(&["ps"])?;
                if !local.is_empty() {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })?;
    }

    let mut report = Report::new("Orchestration: placing, scaling and rescheduling tasks");
    report.ran(format!(
        "3 namespace hosts with agents (release builds, gossip every 100 ms, phi threshold 8), \
         mesh-whoami tasks (process driver); {runs} runs of: `service create --replicas 30`, \
         `service scale =60`, then SIGKILL host3's agent + `ip link set h3 down`; done when \
         `service inspect` on every surviving node says N/N running and its load balancer has N \
         active backends (none of host3's), polled every {} ms",
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
        format!("< 2 s ({})", verdict(&create, Duration::from_secs(2))),
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
    report.note(
        "Each node starts the tasks the plan gives it itself, one at a time (network plumbing \
         and the process spawn hold the node's convergence lock), so placing 30 tasks costs \
         about a third of 30 task starts per node, in parallel across nodes.",
    );
    drop(c);
    Ok(report)
}

/// `service inspect` on each host says `n` running of `n`, and its load balancer balances
/// over `n` active backends.
fn serving_everywhere(c: &Cluster, name: &str, n: usize, hosts: &[usize]) -> Result<bool> {
    for i in hosts {
        let h = c.host(*i);
        let s: ServiceInfo = h.meshctl_json(&["service", "inspect", name])?;
        if s.running != n || s.desired != Some(n) {
            return Ok(false);
        }
        if agents::active_backends(h, name)?.len() != n {
            return Ok(false);
        }
    }
    Ok(true)
}
