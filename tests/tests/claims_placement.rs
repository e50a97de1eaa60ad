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

/// Docker's tutorials constrain with `node.role==manager` and `node.platform.*`: every mesh
/// node is an admin (Swarm's manager) until nodes get roles, so the first runs everywhere
/// and a worker constraint finds no node.
#[test]
fn role_and_platform_constraints_read_as_dockers() {
    let mut c = Cluster::new(2).unwrap();
    c.start_agents().unwrap();
    let w = bin("mesh-whoami");
    let w = w.to_str().unwrap();
    let arch = std::env::consts::ARCH;
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "--name",
            "mgr",
            "--replicas",
            "2",
            "-d",
            "--constraint",
            "node.role == manager",
            "--constraint",
            "node.platform.os==linux",
            "--constraint",
            &format!("node.platform.arch=={arch}"),
            "--process",
            "--",
            w,
        ])
        .unwrap();
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "--name",
            "wrk",
            "-d",
            "--constraint",
            "node.role==worker",
            "--process",
            "--",
            w,
        ])
        .unwrap();
    let states = |c: &Cluster, name: &str| -> anyhow::Result<Vec<(String, String)>> {
        let rows: Vec<Value> = c.host(2).meshctl_json(&["service", "ps", name])?;
        Ok(rows
            .iter()
            .filter(|r| r["history"] == false)
            .map(|r| {
                (
                    r["state"].as_str().unwrap_or_default().to_owned(),
                    r["error"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect())
    };
    c.eventually(Duration::from_secs(15), "mgr at 2/2", |c| {
        let s = states(c, "mgr")?;
        Ok((s.len() == 2 && s.iter().all(|(st, _)| st == "Running")).then_some(()))
    })
    .unwrap();
    let pending = c
        .eventually(Duration::from_secs(10), "wrk pending with a reason", |c| {
            let s = states(c, "wrk")?;
            Ok(s.first()
                .filter(|(st, e)| st == "Pending" && !e.is_empty())
                .cloned())
        })
        .unwrap();
    assert!(pending.1.contains("no suitable node"), "{pending:?}");
    let pretty = c
        .host(1)
        .meshctl_ok(&["node", "inspect", "--pretty", c.host(2).node_name()])
        .unwrap();
    assert!(pretty.contains("node.role==manager"), "{pretty}");
    assert!(
        pretty.contains(&format!("Architecture:\t\t{arch}")),
        "{pretty}"
    );
    // A misspelt role is refused before anything is created.
    let e = c
        .host(1)
        .meshctl(&[
            "service",
            "create",
            "--name",
            "bad",
            "--constraint",
            "node.role==leader",
            "--process",
            "--",
            w,
        ])
        .unwrap();
    assert!(!e.status.success());
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("manager or worker"),
        "{e:?}"
    );
    let ls = c.host(1).meshctl_ok(&["service", "ls", "-q"]).unwrap();
    assert_eq!(ls.lines().count(), 2, "{ls}");
}
