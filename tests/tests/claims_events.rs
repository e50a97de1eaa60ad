//! The README's `meshctl events` claims not covered by events.rs ("Seeing the cluster"):
//! node events (`drain`, `active`), `--filter node=…` (a node's own events and its tasks'),
//! filters of one key as alternatives and of different keys all holding (`service` + `type`
//! + `node`).
//!
//! Not here: the error line of a reader that falls behind (mesh-agent/src/http/events.rs).
//! Provoking it needs ~2,000 events while the reader is stopped (the agent's channel holds
//! 1,024, the socket ~1,000 more lines), and this machine makes events at ~1 a second per
//! service write (create, update and scale alike) or ~10 a second from churning tasks: minutes
//! of CPU for one assertion.

use std::{process::Command, time::Duration};

use mesh_tests::{Cluster, cluster::bin, events::Follower};

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
