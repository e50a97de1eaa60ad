//! The README's `meshctl events` claims not covered by events.rs ("Seeing the cluster"):
//! node events (`drain`, `active`), `--filter node=…` (a node's own events and its tasks'),
//! filters of one key as alternatives and of different keys all holding (`service` + `type`
//! + `node`).
//!
//! And the error line of a reader that falls behind, which then resumes with `--since`.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::{Cluster, cluster::bin, events::Follower};
use serde_json::Value;

fn whoami() -> String {
    bin("mesh-whoami").to_str().unwrap().to_owned()
}

#[test]
fn node_events_node_filters_and_combined_filters() {
    let mut c = Cluster::new(3).unwrap();
    c.start_agents().unwrap();
    let (n1, n2) = (
        c.host(1).node_name().to_owned(),
        c.host(2).node_name().to_owned(),
    );
    let h3 = c.host(3);
    // Host 3 only watches: everything below happens elsewhere and reaches it by gossip.
    let mut of_n2 = Follower::start(h3, &["--filter", &format!("node={n2}")]);
    let mut n2_as_node = Follower::start(
        h3,
        &["--filter", "type=node", "--filter", &format!("node={n2}")],
    );
    let mut web_tasks_on_n1 = Follower::start(
        h3,
        &[
            "--filter",
            "service=web",
            "--filter",
            "type=task",
            "--filter",
            &format!("node={n1}"),
        ],
    );
    let mut either = Follower::start(
        h3,
        &[
            "--filter",
            "type=node",
            "--filter",
            &format!("node={n1}"),
            "--filter",
            &format!("node={n2}"),
        ],
    );

    let w = whoami();
    for name in ["web", "api"] {
        c.host(1)
            .meshctl_ok(&[
                "service", "create", name, "--mode", "global", "-d", "--", &w,
            ])
            .unwrap();
    }
    let web_n1 = format!("web.{n1}");
    web_tasks_on_n1.expect(
        &[("task", "started", &web_n1), ("task", "running", &web_n1)],
        Duration::from_secs(20),
    );
    let web_n2 = format!("web.{n2}");
    of_n2.expect(&[("task", "running", &web_n2)], Duration::from_secs(20));

    // Drain n2 (its tasks stop) and bring it back (they start again), from host 1.
    c.host(1)
        .meshctl_ok(&["node", "update", "--availability", "drain", &n2])
        .unwrap();
    n2_as_node.expect(&[("node", "drain", &n2)], Duration::from_secs(10));
    of_n2.expect(
        &[("node", "drain", &n2), ("task", "stopped", &web_n2)],
        Duration::from_secs(20),
    );
    c.host(1)
        .meshctl_ok(&["node", "update", "--availability", "active", &n2])
        .unwrap();
    n2_as_node.expect(&[("node", "active", &n2)], Duration::from_secs(10));
    of_n2.expect(
        &[("node", "active", &n2), ("task", "running", &web_n2)],
        Duration::from_secs(20),
    );
    // The same on n1, which n2's followers must not see.
    c.host(2)
        .meshctl_ok(&["node", "update", "--availability", "drain", &n1])
        .unwrap();
    either.expect(
        &[
            ("node", "drain", &n2),
            ("node", "active", &n2),
            ("node", "drain", &n1),
        ],
        Duration::from_secs(10),
    );
    web_tasks_on_n1.expect(&[("task", "stopped", &web_n1)], Duration::from_secs(20));

    for f in [
        &mut of_n2,
        &mut n2_as_node,
        &mut web_tasks_on_n1,
        &mut either,
    ] {
        f.settle(Duration::from_secs(1));
    }
    for e in &of_n2.seen {
        assert_eq!(e["node"], n2.as_str(), "node={n2} only: {e}");
    }
    assert!(
        of_n2.seen.iter().any(|e| e["service"] == "api"),
        "every service's tasks on n2: {:#?}",
        of_n2.seen
    );
    for e in &n2_as_node.seen {
        assert!(e["type"] == "node" && e["actor"] == n2.as_str(), "{e}");
    }
    for e in &web_tasks_on_n1.seen {
        assert!(
            e["type"] == "task" && e["service"] == "web" && e["node"] == n1.as_str(),
            "service, type and node must all match: {e}"
        );
    }
    for e in &either.seen {
        assert!(
            e["type"] == "node" && (e["actor"] == n1.as_str() || e["actor"] == n2.as_str()),
            "{e}"
        );
    }
    // The text format of a node event.
    let text = Command::new("timeout")
        .arg("5")
        .arg(bin("meshctl"))
        .arg("--socket")
        .arg(h3.socket())
        .args(["events", "--since", "5m", "--filter", "type=node"])
        .args(["--filter", &format!("node={n1}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains(&format!(" node drain {n1} (id="))),
        "{text}"
    );
}

/// A reader that stops reading while events keep coming gets, once the agent's channel
/// (1,024 events) and what the connection buffers (500–1,400 lines in trial runs) are full, the
/// events up to the gap in order, then one error line saying how many it missed and what to
/// do, and the stream ends; `--since` from its last event brings the missed ones back. Takes
/// ~80 s: tasks that exit at once and restart without delay make ~30 events a second here.
#[test]
fn a_reader_that_falls_behind_gets_an_error_line_and_resumes_with_since() {
    let mut c = Cluster::new(1).unwrap();
    c.start_agents().unwrap();
    let h = c.host(1);
    let mut all = Follower::start(h, &[]);
    let mut stalled = UnixStream::connect(h.socket()).unwrap();
    stalled
        .write_all(b"GET /v1/events HTTP/1.1\r\nHost: mesh\r\n\r\n")
        .unwrap();
    // Both subscribed before anything happens (an idle node makes no events).
    std::thread::sleep(Duration::from_millis(500));
    h.meshctl_ok(&[
        "service",
        "create",
        "churn",
        "--replicas",
        "8",
        "--restart-delay",
        "0s",
        "-d",
        "--",
        "/bin/false",
    ])
    .unwrap();
    // Well past channel + buffers (~2,450 events when the gap came in a trial run).
    let deadline = Instant::now() + Duration::from_secs(240);
    while all.seen.len() < 3_000 {
        assert!(
            Instant::now() < deadline,
            "only {} events in 240 s: churn is too slow to overflow the reader",
            all.seen.len()
        );
        std::thread::sleep(Duration::from_secs(1));
        all.settle(Duration::from_millis(20));
    }
    h.meshctl_ok(&["service", "rm", "churn"]).unwrap();

    let body = read_until_stream_end(&mut stalled, Duration::from_secs(20));
    let lines: Vec<Value> = body
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (error, events) = lines.split_last().expect("no line at all");
    let error = error["error"]
        .as_str()
        .unwrap_or_else(|| panic!("the last line is not the error: {error}"));
    assert!(
        error.contains("events behind") && error.contains("--since"),
        "{error}"
    );
    let missed: usize = error
        .split("fell ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of missed events: {error}"));
    assert!(missed > 0, "{error}");
    // Up to the gap nothing was skipped: the stalled reader's events are the first ones
    // the reading follower saw, in the same order.
    assert!(!events.is_empty(), "the gap came before any event");
    assert_eq!(events, &all.seen[..events.len()], "events before the gap");

    // Resuming from the last event it got brings back the one right after it.
    let last = events.last().unwrap();
    let since_secs = last["time_ms"].as_u64().unwrap() / 1000;
    let next = &all.seen[events.len()];
    let mut resumed = Follower::start(h, &["--since", &since_secs.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !resumed.seen.contains(next) {
        assert!(
            Instant::now() < deadline,
            "--since {since_secs} did not bring back {next} ({} events read)",
            resumed.seen.len()
        );
        resumed.settle(Duration::from_millis(200));
    }
}

/// Reads a chunked response until its last chunk, or fails at the deadline.
fn read_until_stream_end(s: &mut UnixStream, within: Duration) -> String {
    let deadline = Instant::now() + within;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut body = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    while !body.ends_with(b"\r\n0\r\n\r\n") {
        assert!(
            Instant::now() < deadline,
            "the stream did not end: {} bytes, last: {:?}",
            body.len(),
            String::from_utf8_lossy(&body[body.len().saturating_sub(300)..])
        );
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("reading the stalled stream: {e}"),
        }
    }
    String::from_utf8(body).unwrap()
}
