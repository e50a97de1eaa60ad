//! A node that was down while the cluster key rotated comes back by itself, without a new
//! token, if it is still a member; a node removed with `meshctl node rm` meanwhile does not.
//! Real agents started with `mesh-agent init` / `join`, each with its own key file.

use std::time::Duration;

use mesh_tests::membership::{join, join_command, names, ready, wait_ready};
use mesh_tests::{Cluster, cluster::bin};
use serde_json::Value;

fn stats(c: &Cluster, i: usize) -> Value {
    c.host(i).meshctl_json(&["gossip", "stats"]).unwrap()
}

fn key_ids(c: &Cluster, i: usize) -> Vec<String> {
    stats(c, i)["auth"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect()
}

fn rekeys(c: &Cluster, i: usize, outcome: &str) -> u64 {
    stats(c, i)["auth"]["rekeys"][outcome].as_u64().unwrap_or(0)
}

#[test]
fn a_node_down_during_two_key_rotations_rejoins_and_a_removed_one_does_not() {
    let mut c = Cluster::new(3).unwrap();
    c.host_mut(1).start_agent_command(&["init"], &[]).unwrap();
    let command = join_command(&c.host(1).output());
    join(&mut c, 2, &command, &[]);
    join(&mut c, 3, &command, &[]);
    wait_ready(&c, &[1, 2, 3], &[1, 2, 3], Duration::from_secs(10));
    let original = key_ids(&c, 3);

    // Node 3 goes down; node 2 goes down and is removed.
    c.host_mut(3).kill_agent().unwrap();
    c.host_mut(2).kill_agent().unwrap();
    wait_ready(&c, &[1], &[1], Duration::from_secs(10));
    c.host(1)
        .meshctl_ok(&["node", "rm", c.host(2).node_name()])
        .unwrap();

    // Two rotations, each finished: the old key dropped.
    for _ in 0..2 {
        let out = c.host(1).meshctl(&["join-token", "--rotate"]).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("down nodes kept the old key"), "{stderr}");
    }
    let current = key_ids(&c, 1);
    assert_eq!(current.len(), 1, "the old keys are dropped: {current:?}");
    assert_ne!(current, original);

    // Node 3 starts again with the key file it had: it asks, is answered, and is back.
    c.host_mut(3).start_agent_command(&["run"], &[]).unwrap();
    let start = std::time::Instant::now();
    wait_ready(&c, &[1, 3], &[1, 3], Duration::from_secs(20));
    eprintln!("node 3 back with the current key in {:?}", start.elapsed());
    assert_eq!(
        key_ids(&c, 3)[0],
        current[0],
        "node 3 gossips under the current key"
    );
    assert_eq!(rekeys(&c, 3, "rekey_applied"), 1);
    assert!(rekeys(&c, 1, "rekey_answered") >= 1);
    // And serves: a global service created now runs a task on it.
    let whoami = bin("mesh-whoami");
    c.host(1)
        .meshctl_json::<Value>(&[
            "service",
            "create",
            "web",
            "--mode",
            "global",
            "--",
            whoami.to_str().unwrap(),
        ])
        .unwrap();
    let h3 = c.host(3).node_name().to_owned();
    c.eventually(
        Duration::from_secs(20),
        "a web task running on node 3",
        |c| {
            let rows: Value = c.host(1).meshctl_json(&["service", "ps", "web"])?;
            Ok(rows
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["node"] == h3.as_str() && r["state"] == "Running")
                .then_some(()))
        },
    )
    .unwrap();

    // Node 2, removed meanwhile, is refused: no pin for its name any more.
    c.host_mut(2).start_agent_command(&["run"], &[]).unwrap();
    c.eventually(Duration::from_secs(15), "node 2's requests refused", |c| {
        let refused = rekeys(c, 1, "rekey_not_a_member") + rekeys(c, 3, "rekey_not_a_member");
        Ok((refused >= 1).then_some(()))
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ready(&c, 1), names(&c, &[1, 3]));
    assert_eq!(key_ids(&c, 2), original, "node 2 got no key");
    assert_eq!(rekeys(&c, 2, "rekey_applied"), 0);
}
