//! Clock steps: a node whose wall clock steps a minute ahead or back (NTP correcting a bad
//! hardware clock does exactly that) keeps gossiping with the others, and no slot of a
//! replicated service is filled twice.
//!
//! The step is real for the whole agent process: node 3's agent runs under libfaketime
//! (Debian's `libfaketime`), which offsets every CLOCK_REALTIME read by the offset written in
//! a file, re-read each second, and leaves CLOCK_MONOTONIC alone, as an NTP step does. The
//! agent has no clock hook of its own.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mesh_tests::{Cluster, Host, cluster::bin};
use serde_json::Value;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The file node 3's clock offset is read from.
struct Offset(PathBuf);

impl Offset {
    fn new(c: &Cluster) -> Self {
        let f = Self(c.log_dir().join("clock-offset"));
        f.set("+0s");
        f
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LD_PRELOAD", LIBFAKETIME.to_owned()),
            ("FAKETIME_TIMESTAMP_FILE", self.0.display().to_string()),
            ("FAKETIME_CACHE_DURATION", "1".to_owned()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
        ]
    }

    fn set(&self, offset: &str) {
        std::fs::write(&self.0, format!("{offset}\n")).unwrap();
    }
}

/// How far node 3's agent's clock is from this machine's, in ms: from the timestamp of the
/// newest line of its log after byte `from` (every line starts with the wall-clock time).
fn skew_seen(h: &Host, from: usize) -> Option<i64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_millis() as i64;
    let logs = h.logs();
    let last = logs
        .get(from..)?
        .lines()
        .rev()
        .find_map(|l| unix_ms(l.get(..23)?))?;
    Some(last - now)
}

/// `2026-12-07T16:55:00.123` as ms since the epoch.
fn unix_ms(t: &str) -> Option<i64> {
    let n = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss, ms) = (n(11..13)?, n(14..16)?, n(17..19)?, n(20..23)?);
    // Days from 1970-01-01 to y-m-d (the proleptic Gregorian calendar).
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((((days * 24 + hh) * 60 + mm) * 60 + ss) * 1000 + ms)
}

fn ps(h: &Host, name: &str) -> Vec<Value> {
    h.meshctl_json(&["service", "ps", name]).unwrap_or_default()
}

/// Live tasks of a service by slot name, as one host sees them.
fn live_slots(h: &Host, name: &str) -> BTreeMap<String, Vec<String>> {
    let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in ps(h, name) {
        if r["history"] == false && matches!(r["state"].as_str(), Some("Running" | "Starting")) {
            by.entry(r["name"].as_str().unwrap().into())
                .or_default()
                .push(format!(
                    "{}@{}",
                    r["id"].as_str().unwrap(),
                    r["node"].as_str().unwrap()
                ));
        }
    }
    by
}

/// How each host sees each node: `Ready` or `Down`.
fn statuses(h: &Host) -> anyhow::Result<BTreeMap<String, String>> {
    let nodes: Vec<Value> = h.meshctl_json(&["node", "ls"])?;
    Ok(nodes
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or_default().to_owned(),
                n["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// What is wrong with the cluster right now, if anything: a node some host calls down, or a
/// slot of `web` with no task or with two.
fn trouble(c: &Cluster, replicas: usize) -> Option<String> {
    for h in c.hosts() {
        let st = match statuses(h) {
            Ok(s) => s,
            Err(e) => return Some(format!("{}: node ls: {e:#}", h.node_name())),
        };
        if st.len() != 3 || st.values().any(|s| s != "Ready") {
            return Some(format!("{} sees nodes {st:?}", h.node_name()));
        }
        let slots = live_slots(h, "web");
        if slots.len() != replicas || slots.values().any(|t| t.len() != 1) {
            return Some(format!("{} sees slots {slots:?}", h.node_name()));
        }
    }
    None
}

fn converge(c: &Cluster, replicas: usize, what: &str) {
    c.eventually(Duration::from_secs(20), what, |c| {
        Ok(match trouble(c, replicas) {
            None => Some(()),
            Some(t) => anyhow::bail!("{t}"),
        })
    })
    .unwrap();
}

/// Waits until the cluster has been whole for 3 s running: placement races of a create (two
/// nodes filling one slot, the loser stopping) are over before a step is blamed for them.
fn settle(c: &Cluster, replicas: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(40);
    'again: loop {
        assert!(Instant::now() < deadline, "{what}: never whole for 3 s");
        converge(c, replicas, what);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if trouble(c, replicas).is_some() {
                continue 'again;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        return;
    }
}

/// Checks the cluster stays whole for `hold`: long past the failure detector's time to call
/// a silent node down, and the coordinator's to give its slots to others.
fn stays_whole(c: &Cluster, replicas: usize, hold: Duration, what: &str) {
    let end = Instant::now() + hold;
    while Instant::now() < end {
        if let Some(t) = trouble(c, replicas) {
            panic!("{what}: {t}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn dropped_stale(h: &Host) -> u64 {
    let stats: Value = h.meshctl_json(&["gossip", "stats"]).unwrap();
    let d = &stats["auth"]["dropped"];
    d["too_old"].as_u64().unwrap_or(0) + d["too_new"].as_u64().unwrap_or(0)
}

#[test]
fn a_node_whose_clock_steps_a_minute_keeps_gossiping_and_no_slot_is_filled_twice() {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} missing: run scripts/setup.sh (Debian's libfaketime)"
    );
    let mut c = Cluster::new(3).unwrap();
    let offset = Offset::new(&c);
    c.host_mut(1).start_agent(&[]).unwrap();
    c.host_mut(2).start_agent(&[]).unwrap();
    let env = offset.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    c.host_mut(3).start_agent_with_env(&[], &env).unwrap();
    let whoami = bin("mesh-whoami");
    c.host(1)
        .meshctl_json::<Value>(&[
            "service",
            "create",
            "web",
            "--replicas",
            "3",
            "--",
            whoami.to_str().unwrap(),
        ])
        .unwrap();
    settle(&c, 3, "web at one task per slot on a whole cluster");

    for (step, now) in [("+60s", 60_000i64), ("-60s", -60_000)] {
        let log_at = c.host(3).logs().len();
        offset.set(step);
        // Whole for 10 s, and until node 3's log shows its clock off (its agent logs at
        // least every 10 s).
        let start = Instant::now();
        let mut skew = None;
        while start.elapsed() < Duration::from_secs(10) || skew.is_none() {
            if let Some(t) = trouble(&c, 3) {
                panic!("after node 3's clock stepped to {step}: {t}");
            }
            skew = skew.or(skew_seen(c.host(3), log_at).filter(|s| (s - now).abs() < 5_000));
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "node 3's log never showed its clock {now} ms off: libfaketime did not take"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("clock at {step}: every node saw every other for 10 s, web at 3 once each");
    }
    // Running agents never needed their clocks to agree: nothing was dropped as stale.
    let stale: Vec<u64> = c.hosts().iter().map(dropped_stale).collect();
    eprintln!("datagrams dropped as too old or too new per host: {stale:?}");
    assert!(stale.iter().all(|n| *n == 0), "{stale:?}");

    // The node a minute behind scales the service: its stamp still orders after the
    // create's, so its change wins everywhere.
    c.host(3)
        .meshctl_ok(&["service", "scale", "web=4"])
        .unwrap();
    settle(&c, 4, "web scaled to 4 from the node a minute behind");

    // Its agent restarts with the clock still a minute behind: it rejoins (its first
    // datagrams are challenged, as a first contact's are) and no slot is filled twice.
    c.host_mut(3).stop_agent().unwrap();
    let start = Instant::now();
    c.host_mut(3).restart_agent().unwrap();
    converge(
        &c,
        4,
        "node 3 back after a restart with its clock a minute behind",
    );
    eprintln!(
        "node 3 restarted a minute behind and rejoined in {:?}",
        start.elapsed()
    );
    // Its restart grace was written with its clock, so peers may have moved its slots at
    // once: a duplicate that made is resolved, then stays so.
    settle(&c, 4, "after node 3's restart");
    stays_whole(&c, 4, Duration::from_secs(5), "after node 3's restart");
}
