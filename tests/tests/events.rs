//! `meshctl events` follows what happens in the cluster: a scale and a killed task show up
//! as the events a Swarm operator expects, in order, on a node that did neither.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use mesh_tests::{Cluster, cluster::bin, events::Follower};
use serde_json::Value;

fn create(c: &Cluster, name: &str, args: &[&str]) {
    let whoami = bin("mesh-whoami");
    let mut cmd = vec!["service", "create", name];
    cmd.extend_from_slice(args);
    cmd.extend(["--", whoami.to_str().unwrap()]);
    c.host(1).meshctl_ok(&cmd).unwrap();
}

#[test]
fn events_follow_a_scale_and_a_killed_task_in_order() {
    let mut c = Cluster::new(3).unwrap();
    c.start_agents().unwrap();
    // Host 3 only watches: every event below happens elsewhere and reaches it by gossip.
    let mut all = Follower::start(c.host(3), &[]);
    let mut web = Follower::start(c.host(3), &["--filter", "service=web"]);

    create(
        &c,
        "web",
        &[
            "--replicas",
            "2",
            "-p",
            "8080:80",
            "--restart-delay",
            "200ms",
        ],
    );
    all.expect(
        &[
            ("service", "created", "web"),
            ("task", "started", "*"),
            ("task", "running", "*"),
        ],
        Duration::from_secs(15),
    );
    c.host(2)
        .meshctl_ok(&["service", "scale", "web=3"])
        .unwrap();
    let scaled = web.expect(
        &[
            ("service", "updated", "web"),
            ("task", "started", "web.3"),
            ("task", "running", "web.3"),
        ],
        Duration::from_secs(15),
    );
    assert_eq!(scaled[0]["attributes"]["replicas"], "3", "{scaled:#?}");
    assert_eq!(scaled[1]["id"], scaled[2]["id"], "one task: {scaled:#?}");

    // Kill one of host 1's tasks as a crash would.
    let local: Vec<Value> = c.host(1).meshctl_json(&["ps"]).unwrap();
    let victim = local
        .iter()
        .find(|t| t["service"] == "web" && t["state"] == "running")
        .unwrap_or_else(|| panic!("no running web task on host 1: {local:#?}"));
    let pid = victim["pid"].as_u64().unwrap() as i32;
    // The local name is `web.<slot>.<id>`.
    let name = victim["name"].as_str().unwrap();
    let (task, id) = name.rsplit_once('.').unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let healed = web.expect(
        &[
            ("task", "failed", task),
            ("task", "started", task),
            ("task", "running", task),
        ],
        Duration::from_secs(15),
    );
    assert_eq!(healed[0]["id"], id, "{healed:#?}");
    assert_eq!(healed[0]["node"], c.host(1).node_name());
    assert_ne!(healed[1]["id"], id, "a restart is a new task: {healed:#?}");
    assert_eq!(healed[1]["id"], healed[2]["id"]);

    // The filtered follower saw nothing but web's events; the text format reads like Docker.
    for e in &web.seen {
        assert_eq!(e["service"], "web", "{e}");
    }
    // --since replays what the node remembers, then follows.
    let mut replay = Follower::start(c.host(2), &["--since", "5m", "--filter", "type=service"]);
    let backlog = replay.expect(
        &[("service", "created", "web"), ("service", "updated", "web")],
        Duration::from_secs(5),
    );
    assert!(
        backlog[0]["time_ms"].as_u64() <= backlog[1]["time_ms"].as_u64(),
        "{backlog:#?}"
    );
}

#[test]
fn bad_event_filters_say_how_to_fix_them() {
    let mut c = Cluster::new(1).unwrap();
    c.start_agents().unwrap();
    for (args, says) in [
        (&["events", "--filter", "colour=red"][..], "use service="),
        (&["events", "--since", "yesterday"][..], "duration ago"),
    ] {
        // A filter wrongly accepted would follow forever: meshctl gets 5 s to say no.
        let out = Command::new("timeout")
            .arg("5")
            .arg(bin("meshctl"))
            .arg("--socket")
            .arg(c.host(1).socket())
            .args(args)
            .output()
            .unwrap();
        assert_ne!(out.status.code(), Some(124), "{args:?} still ran after 5 s");
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn the_text_format_is_dockers() {
    let mut c = Cluster::new(1).unwrap();
    c.start_agents().unwrap();
    create(&c, "web", &["--replicas", "1"]);
    // A follower that never ends: read its first line with a deadline.
    let mut child = Command::new(bin("meshctl"))
        .arg("--socket")
        .arg(c.host(1).socket())
        .args(["events", "--since", "10m", "--filter", "type=service"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, first) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = tx.send(BufReader::new(out).read_line(&mut line).map(|_| line));
    });
    let line = first.recv_timeout(Duration::from_secs(5));
    // Killing the follower also ends the reading thread (its pipe closes).
    let _ = child.kill();
    let _ = child.wait();
    let line = line
        .expect("no event line within 5 s")
        .expect("reading meshctl events");
    // 2026-12-01T08:00:00.000000000Z service created web (id=…, replicas=1, version=1)
    let (time, rest) = line.trim().split_once(' ').unwrap();
    assert!(time.ends_with('Z') && time.len() == 30, "{line}");
    assert!(rest.starts_with("service created web (id="), "{line}");
    assert!(rest.contains("replicas=1"), "{line}");
}
