//! Overlay networks driven by real agents: tasks on different hosts talk over VXLAN, networks
//! are isolated, the kernel follows the endpoint table, and agent restarts change nothing.

use std::time::Duration;

use mesh_tests::{Cluster, Host};
use serde_json::Value;

/// A 3-host cluster with agents and network `app` known everywhere.
fn cluster_with_app() -> Cluster {
    let mut c = Cluster::new(3).unwrap();
    c.start_agents().unwrap();
    c.create_network("app", "10.10.0.0/24").unwrap();
    c
}

/// Starts a whoami task and returns (netns, ip).
fn run(h: &Host, name: &str, network: &str) -> (String, String) {
    let t: Value = h
        .meshctl_json(&[
            "run",
            "--network",
            network,
            "--name",
            name,
            "--",
            &mesh_tests::cluster::bin("mesh-whoami")
                .display()
                .to_string(),
            "--name",
            name,
        ])
        .unwrap();
    (
        t["netns"].as_str().unwrap().to_owned(),
        t["ip"].as_str().unwrap().to_owned(),
    )
}

/// Runs a shell command inside a task's namespace.
fn in_task(netns: &str, script: &str) -> std::process::Output {
    std::process::Command::new("ip")
        .args(["netns", "exec", netns, "sh", "-c", script])
        .output()
        .unwrap()
}

fn ok(netns: &str, script: &str) -> String {
    let out = in_task(netns, script);
    assert!(
        out.status.success(),
        "`{script}` in {netns}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kernel state of the overlay on a host, normalised for comparison.
fn overlay_dump(h: &Host) -> String {
    h.ns.sh("ip -d -o link show | grep -E 'mbr|mvx|mve' | sed -E 's/^[0-9]+: //; s/ (qlen|numtxqueues|gso|tso|gro|parentbus).*//' | sort; \
             bridge fdb show | grep -E 'mvx' | sort; ip neigh show | grep -E 'mbr|mvx' | grep PERMANENT | sort; \
             ip addr show | grep -E 'inet .*(mbr)' | sort")
        .unwrap()
}

#[test]
fn tasks_on_three_hosts_talk_over_the_overlay() {
    let c = cluster_with_app();
    let (n1, _ip1) = run(c.host(1), "c1", "app");
    let (_n2, ip2) = run(c.host(2), "c2", "app");
    let (_n3, ip3) = run(c.host(3), "c3", "app");
    // The remote endpoints reach host1's kernel within a second.
    for ip in [&ip2, &ip3] {
        c.eventually(Duration::from_secs(2), "ping across the overlay", |_| {
            Ok(in_task(&n1, &format!("ping -c1 -W1 {ip}"))
                .status
                .success()
                .then_some(()))
        })
        .unwrap();
    }
    // TCP to a task on another host: whoami answers with its name.
    assert_eq!(
        ok(&n1, &format!("curl -s --max-time 3 http://{ip3}/")).trim(),
        "c3"
    );
    assert_eq!(
        ok(&n1, &format!("curl -s --max-time 3 http://{ip2}/")).trim(),
        "c2"
    );
    // MTU: 1450-byte packets cross with DF set; one byte more fails at once, not a blackhole.
    let eth0 = ok(&n1, "ip -o link show eth0");
    assert!(eth0.contains("mtu 1450"), "{eth0}");
    ok(&n1, &format!("ping -c1 -W2 -M do -s 1422 {ip3}"));
    let too_big = in_task(&n1, &format!("ping -c1 -W2 -M do -s 1423 {ip3}"));
    assert!(!too_big.status.success());
    let msg = String::from_utf8_lossy(&too_big.stderr).to_string()
        + &String::from_utf8_lossy(&too_big.stdout);
    assert!(
        msg.contains("message too long") || msg.contains("mtu=1450"),
        "{msg}"
    );

    // Addresses from three nodes' blocks never collide.
    let svc: Value = c
        .host(2)
        .meshctl_json(&["network", "inspect", "app"])
        .unwrap();
    let mut ips: Vec<&str> = svc["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["ip"].as_str().unwrap())
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 3);
}

#[test]
fn tasks_on_different_networks_cannot_reach_each_other() {
    let c = cluster_with_app();
    c.host(1)
        .meshctl_ok(&["network", "create", "db", "--subnet", "10.20.0.0/24"])
        .unwrap();
    let (na, _) = run(c.host(1), "a1", "app");
    let (_, ip_app2) = run(c.host(2), "a2", "app");
    let (nd, _) = run(c.host(1), "d1", "db");
    let (_, ip_db2) = run(c.host(2), "d2", "db");
    c.eventually(Duration::from_secs(2), "same-network pings", |_| {
        Ok((in_task(&na, &format!("ping -c1 -W1 {ip_app2}"))
            .status
            .success()
            && in_task(&nd, &format!("ping -c1 -W1 {ip_db2}"))
                .status
                .success())
        .then_some(()))
    })
    .unwrap();
    assert!(
        !in_task(&na, &format!("ping -c1 -W1 {ip_db2}"))
            .status
            .success(),
        "app reached db across hosts"
    );
    assert!(
        !in_task(&nd, &format!("ping -c1 -W1 {ip_app2}"))
            .status
            .success(),
        "db reached app across hosts"
    );
    assert!(
        !in_task(&na, &format!("curl -s --max-time 2 http://{ip_db2}/"))
            .status
            .success()
    );
}

#[test]
fn a_removed_task_leaves_every_hosts_tables() {
    let c = cluster_with_app();
    let (_n1, _) = run(c.host(1), "c1", "app");
    let (_n2, _) = run(c.host(2), "c2", "app");
    let (_n3, ip3) = run(c.host(3), "c3", "app");
    let mac3 = format!(
        "02:42:{}",
        ip3.split('.')
            .map(|o| format!("{:02x}", o.parse::<u8>().unwrap()))
            .collect::<Vec<_>>()
            .join(":")
    );
    for h in [c.host(1), c.host(2)] {
        c.eventually(Duration::from_secs(2), "c3 programmed", |_| {
            Ok(h.ns
                .sh("bridge fdb show; ip neigh show")?
                .contains(&mac3)
                .then_some(()))
        })
        .unwrap();
    }
    c.host(3).meshctl_ok(&["rm", "c3"]).unwrap();
    let t = std::time::Instant::now();
    for h in [c.host(1), c.host(2)] {
        // What the agent programs: static FDB entries on the VXLAN device and permanent
        // neighbours. (Entries the bridge learned from traffic age out on their own.)
        c.eventually(
            Duration::from_secs(1),
            "c3 gone from fdb and neighbours",
            |_| {
                let fdb =
                    h.ns.sh("bridge fdb show | grep -E 'dev mvx.* self' || true")?;
                let neigh = h.ns.sh("ip neigh show nud permanent")?;
                Ok((!fdb.contains(&mac3) && !neigh.contains(&format!("{ip3} "))).then_some(()))
            },
        )
        .unwrap();
    }
    eprintln!("removal reached both hosts in {:?}", t.elapsed());
    let ps: Value = c.host(3).meshctl_json(&["ps", "-a"]).unwrap();
    assert!(ps.as_array().unwrap().is_empty());
}

#[test]
fn a_killed_agent_restarts_without_duplicating_or_breaking_anything() {
    let mut c = cluster_with_app();
    let (n1, _) = run(c.host(1), "c1", "app");
    let (_, ip2) = run(c.host(2), "c2", "app");
    c.eventually(Duration::from_secs(2), "c1 reaches c2", |_| {
        Ok(in_task(&n1, &format!("ping -c1 -W1 {ip2}"))
            .status
            .success()
            .then_some(()))
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let before = overlay_dump(c.host(1));

    c.host_mut(1).kill_agent().unwrap();
    // The task keeps running and talking while its agent is gone.
    ok(&n1, &format!("ping -c1 -W2 {ip2}"));
    c.host_mut(1).restart_agent().unwrap();
    c.eventually(Duration::from_secs(5), "c1 back in the table", |c| {
        let t: Value = c.host(2).meshctl_json(&["network", "inspect", "app"])?;
        Ok(t["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "c1")
            .then_some(()))
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        overlay_dump(c.host(1)),
        before,
        "kernel state changed across the restart"
    );
    ok(&n1, &format!("curl -s --max-time 3 http://{ip2}/"));
    let ps: Value = c.host(1).meshctl_json(&["ps"]).unwrap();
    assert_eq!(ps[0]["state"], "running");
}

#[test]
fn tasks_reach_the_outside_through_the_gateway_bridge_masqueraded() {
    let c = cluster_with_app();
    // A server on host3's underlay address, outside any overlay.
    let _server = c
        .host(3)
        .ns
        .spawn(
            mesh_tests::cluster::bin("mesh-whoami").to_str().unwrap(),
            &["--name", "outside", "--no-http", "--udp", "9000"],
        )
        .unwrap();
    let (n1, _) = run(c.host(1), "c1", "app");
    let ip3 = c.host(3).ip.clone();
    let reply = ok(&n1, &format!("echo hi | timeout 3 nc -u -w1 {ip3} 9000"));
    assert_eq!(reply.trim(), "outside");
    let conntrack = c
        .host(1)
        .ns
        .sh("conntrack -L -p udp --dport 9000 2>/dev/null || true")
        .unwrap();
    // host1's connection tracking shows the reply addressed to host1 itself: masqueraded.
    assert!(
        conntrack.contains(&format!("dst={}", c.host(1).ip)),
        "not masqueraded behind host1: {conntrack}"
    );
}
