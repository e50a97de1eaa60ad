//! The agents gossip: a cluster forms, networks and services created on one node appear on
//! every node, concurrent creates resolve to one winner everywhere, dead nodes are noticed.

use std::time::Duration;

use mesh_tests::Cluster;
use serde_json::Value;

fn names(v: &Value, field: &str) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x[field].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn three_agents_form_a_cluster_and_share_networks() {
    let mut c = Cluster::new(3).unwrap();
    c.start_agents().unwrap();

    for h in c.hosts() {
        c.eventually(
            Duration::from_secs(10),
            "every node sees 3 ready nodes",
            |_| {
                let nodes: Value = h.meshctl_json(&["node", "ls"])?;
                let ready = nodes
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|n| n["status"] == "Ready")
                    .count();
                Ok((ready == 3).then_some(()))
            },
        )
        .unwrap();
    }
    let table = c.host(1).meshctl_ok(&["node", "ls"]).unwrap();
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.contains("Ready") && table.contains("Active"),
        "{table}"
    );

    let out = c
        .host(1)
        .meshctl_ok(&["network", "create", "app", "--subnet", "10.10.0.0/24"])
        .unwrap();
    assert_eq!(out.trim().len(), 12, "prints the network id: {out}");
    // Replicated to the other nodes within a second.
    c.eventually(Duration::from_secs(1), "network app on host3", |c| {
        let nets: Value = c.host(3).meshctl_json(&["network", "ls"])?;
        Ok(names(&nets, "name")
            .contains(&"app".to_owned())
            .then_some(nets))
    })
    .unwrap();
    let app: Value = c
        .host(2)
        .meshctl_json(&["network", "inspect", "app"])
        .unwrap();
    assert_eq!(app["vni"], 4096);
    assert_eq!(app["subnet"], "10.10.0.0/24");

    // A second network gets the next VNI and, without --subnet, a free subnet.
    let db: Value = c
        .host(3)
        .meshctl_json(&["network", "create", "db"])
        .unwrap();
    assert_eq!(db["vni"], 4097);
    assert_eq!(db["subnet"], "10.0.1.0/24");

    let ls = c.host(2).meshctl_ok(&["network", "ls"]).unwrap();
    assert!(
        ls.contains("app") && ls.contains("4096") && ls.contains("10.10.0.0/24"),
        "{ls}"
    );

    c.host(2).meshctl_ok(&["network", "rm", "db"]).unwrap();
    c.eventually(Duration::from_secs(1), "db gone from host1", |c| {
        let nets: Value = c.host(1).meshctl_json(&["network", "ls"])?;
        Ok((!names(&nets, "name").contains(&"db".to_owned())).then_some(()))
    })
    .unwrap();
}

#[test]
fn concurrent_creates_of_one_network_end_with_one_winner_everywhere() {
    let mut c = Cluster::new(3).unwrap();
    c.start_agents().unwrap();
    c.eventually(Duration::from_secs(10), "cluster formed", |c| {
        let nodes: Value = c.host(3).meshctl_json(&["node", "ls"])?;
        Ok((nodes.as_array().unwrap().len() == 3).then_some(()))
    })
    .unwrap();

    let (r1, r2) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            c.host(1)
                .meshctl(&["network", "create", "app", "--subnet", "10.1.0.0/24"])
                .unwrap()
        });
        let b = s.spawn(|| {
            c.host(2)
                .meshctl(&["network", "create", "app", "--subnet", "10.2.0.0/24"])
                .unwrap()
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    let ok = [&r1, &r2].iter().filter(|r| r.status.success()).count();
    assert_eq!(ok, 1, "exactly one create succeeds:\n{r1:?}\n{r2:?}");
    let loser = if r1.status.success() { &r2 } else { &r1 };
    let err = String::from_utf8_lossy(&loser.stderr);
    assert!(err.contains("app"), "the loser gets a clear error: {err}");

    let winner_subnet = if r1.status.success() {
        "10.1.0.0/24"
    } else {
        "10.2.0.0/24"
    };
    for h in c.hosts() {
        let nets: Value = h.meshctl_json(&["network", "ls"]).unwrap();
        let nets = nets.as_array().unwrap();
        assert_eq!(nets.len(), 1, "{} sees {nets:?}", h.node_name());
        assert_eq!(nets[0]["subnet"], winner_subnet);
    }
}

#[test]
fn bad_input_gets_clear_errors_and_changes_nothing() {
    let mut c = Cluster::new(1).unwrap();
    c.start_agents().unwrap();
    let h = c.host(1);
    let err = |args: &[&str]| {
        let out = h.meshctl(args).unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(
        err(&["network", "create", "app", "--subnet", "10.0.0.5/24"])
            .contains("did you mean 10.0.0.0/24")
    );
    assert!(err(&["network", "create", "app", "--subnet", "banana"]).contains("CIDR"));
    assert!(err(&["network", "create", "bad.name"]).contains("invalid network name"));
    assert!(err(&["network", "create", "_bad"]).contains("invalid network name"));
    h.meshctl_ok(&["network", "create", "app", "--subnet", "10.10.0.0/24"])
        .unwrap();
    assert!(err(&["network", "create", "app"]).contains("already exists"));
    assert!(err(&["network", "create", "other", "--subnet", "10.10.0.0/16"]).contains("overlaps"));
    assert!(
        err(&[
            "service",
            "create",
            "web",
            "--network",
            "nope",
            "-p",
            "8080:80"
        ])
        .contains("network nope not found")
    );
    assert!(
        err(&[
            "service",
            "create",
            "web",
            "--network",
            "app",
            "-p",
            "8080:70000"
        ])
        .contains("out of range")
    );
    h.meshctl_ok(&[
        "service",
        "create",
        "web",
        "--network",
        "app",
        "-p",
        "8080:80",
    ])
    .unwrap();
    assert!(
        err(&[
            "service",
            "create",
            "api",
            "--network",
            "app",
            "-p",
            "8080:81"
        ])
        .contains("port 8080/tcp is already published by service web")
    );
    assert!(err(&["network", "rm", "app"]).contains("in use by service"));
    assert!(err(&["service", "rm", "nope"]).contains("not found"));
    // Nothing was lost along the way.
    let svcs: Value = h.meshctl_json(&["service", "ls"]).unwrap();
    assert_eq!(names(&svcs, "name"), vec!["web"]);
    let nets: Value = h.meshctl_json(&["network", "ls"]).unwrap();
    assert_eq!(names(&nets, "name"), vec!["app"]);
}

#[test]
fn services_created_concurrently_on_every_node_get_distinct_vips() {
    let mut c = Cluster::new(3).unwrap();
    c.start_agents().unwrap();
    c.create_network("app", "10.10.0.0/24").unwrap();
    let vips: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = c
            .hosts()
            .iter()
            .flat_map(|h| (0..2).map(move |k| (h, k)))
            .map(|(h, k)| {
                s.spawn(move || {
                    let name = format!("svc{}x{k}", h.index);
                    let v: Value = h
                        .meshctl_json(&["service", "create", &name, "--network", "app"])
                        .unwrap();
                    v["vip"].as_str().unwrap().to_owned()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut unique = vips.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), vips.len(), "duplicate VIPs: {vips:?}");
    let svcs: Value = c.host(2).meshctl_json(&["service", "ls"]).unwrap();
    assert_eq!(svcs.as_array().unwrap().len(), 6);
}

#[test]
fn a_killed_agent_is_reported_down_and_back_when_it_returns() {
    let mut c = Cluster::new(3).unwrap();
    c.start_agents().unwrap();
    let status = |c: &Cluster, of: &str| -> anyhow::Result<String> {
        let nodes: Value = c.host(1).meshctl_json(&["node", "ls"])?;
        Ok(nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == of)
            .map(|n| n["status"].as_str().unwrap().to_owned())
            .unwrap_or_default())
    };
    let h3 = c.host(3).node_name().to_owned();
    c.eventually(Duration::from_secs(10), "host3 ready", |c| {
        Ok((status(c, &h3)? == "Ready").then_some(()))
    })
    .unwrap();
    c.host_mut(3).kill_agent().unwrap();
    let t = std::time::Instant::now();
    c.eventually(Duration::from_secs(5), "host3 down", |c| {
        Ok((status(c, &h3)? == "Down").then_some(()))
    })
    .unwrap();
    eprintln!("host3 declared down after {:?}", t.elapsed());
    c.host_mut(3).restart_agent().unwrap();
    c.eventually(Duration::from_secs(5), "host3 back", |c| {
        Ok((status(c, &h3)? == "Ready").then_some(()))
    })
    .unwrap();
}

#[test]
fn a_control_plane_only_agent_gossips_but_touches_no_kernel_state() {
    let mut c = Cluster::new(2).unwrap();
    c.host_mut(1).start_agent(&[]).unwrap();
    c.host_mut(2)
        .start_agent(&["--control-plane-only"])
        .unwrap();
    c.eventually(Duration::from_secs(10), "both nodes Ready on host2", |c| {
        let nodes: Value = c.host(2).meshctl_json(&["node", "ls"])?;
        let ready = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["status"] == "Ready")
            .count();
        Ok((ready == 2).then_some(()))
    })
    .unwrap();

    // Objects created on the control-plane-only node reach the full node, whose kernel
    // programs them; the control-plane-only node programs nothing.
    let h2 = c.host(2);
    h2.meshctl_ok(&["network", "create", "app", "--subnet", "10.10.0.0/24"])
        .unwrap();
    h2.meshctl_ok(&[
        "service",
        "create",
        "web",
        "--network",
        "app",
        "--publish",
        "8080:80",
    ])
    .unwrap();
    c.eventually(Duration::from_secs(10), "web programmed on host1", |c| {
        let s: Value = c.host(1).meshctl_json(&["service", "inspect", "web"])?;
        Ok(s["dataplane"].is_object().then_some(()))
    })
    .unwrap();
    let s: Value = h2.meshctl_json(&["service", "inspect", "web"]).unwrap();
    assert!(s["dataplane"].is_null(), "{s}");
    assert!(
        !h2.bpffs().exists(),
        "no pins under {}",
        h2.bpffs().display()
    );
    // It claims no address on the network either (it plumbs nothing).
    let app: Value = c
        .host(1)
        .meshctl_json(&["network", "inspect", "app"])
        .unwrap();
    assert_eq!(
        names_of(&app["nodes"]),
        vec![c.host(1).node_name().to_owned()],
        "{app}"
    );

    // What needs a dataplane says why it cannot.
    for args in [
        &["dataplane", "ports"][..],
        &[
            "run",
            "--network",
            "app",
            "--name",
            "t1",
            "--",
            "sleep",
            "60",
        ][..],
    ] {
        let out = h2.meshctl(args).unwrap();
        assert!(!out.status.success(), "meshctl {args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("control plane only"), "{err}");
    }
    let ps: Value = h2.meshctl_json(&["ps"]).unwrap();
    assert_eq!(ps.as_array().map(Vec::len), Some(0), "{ps}");
}

fn names_of(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect()
}
