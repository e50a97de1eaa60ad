//! The README's `--placement-pref spread=node.labels.zone`, end to end: tasks are balanced
//! over the label's values, not over the nodes.

use std::{collections::BTreeMap, time::Duration};

use mesh_tests::{Cluster, cluster::bin};
use serde_json::Value;

#[test]
fn spread_balances_tasks_over_zones_not_nodes() {
    let mut c = Cluster::new(3).unwrap();
    c.start_agents().unwrap();
    // Zone a has two nodes, zone b one.
    let zones: BTreeMap<String, &str> = [(1, "a"), (2, "a"), (3, "b")]
        .into_iter()
        .map(|(i, z)| (c.host(i).node_name().to_owned(), z))
        .collect();
    for (node, zone) in &zones {
        c.host(1)
            .meshctl_ok(&[
                "node",
                "update",
                "--label-add",
                &format!("zone={zone}"),
                node,
            ])
            .unwrap();
    }
    c.eventually(Duration::from_secs(5), "labels everywhere", |c| {
        for h in c.hosts() {
            let nodes: Vec<Value> = h.meshctl_json(&["node", "ls"])?;
            let labelled = nodes
                .iter()
                .filter(|n| n.to_string().contains("\"zone\""))
                .count();
            if labelled != 3 {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .unwrap();
    let w = bin("mesh-whoami");
    let create = |name: &str, pref: &[&str]| {
        let mut cmd = vec!["service", "create", name, "--replicas", "4", "-d"];
        cmd.extend_from_slice(pref);
        cmd.extend(["--", w.to_str().unwrap()]);
        c.host(1).meshctl_ok(&cmd).unwrap();
    };
    let per_zone = |c: &Cluster, name: &str| -> anyhow::Result<Option<BTreeMap<&str, usize>>> {
        let rows: Vec<Value> = c.host(2).meshctl_json(&["service", "ps", name])?;
        let running: Vec<&Value> = rows
            .iter()
            .filter(|r| r["history"] == false && r["state"] == "Running")
            .collect();
        if running.len() != 4 {
            return Ok(None);
        }
        let mut by = BTreeMap::new();
        for r in running {
            *by.entry(zones[r["node"].as_str().unwrap()]).or_default() += 1;
        }
        Ok(Some(by))
    };
    create("spread", &["--placement-pref", "spread=node.labels.zone"]);
    let spread = c
        .eventually(Duration::from_secs(15), "spread at 4/4", |c| {
            per_zone(c, "spread")
        })
        .unwrap();
    assert_eq!(spread, BTreeMap::from([("a", 2), ("b", 2)]));
    // Without the preference the nodes are balanced instead (2-1-1, the second task on a
    // node with fewer tasks overall): zone a's two nodes get 3.
    create("plain", &[]);
    let plain = c
        .eventually(Duration::from_secs(15), "plain at 4/4", |c| {
            per_zone(c, "plain")
        })
        .unwrap();
    assert_eq!(plain, BTreeMap::from([("a", 3), ("b", 1)]));
}
