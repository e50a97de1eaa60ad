//! Running the agent as an operator would: systemd unit, readiness, config file, restarts.

use std::{os::unix::net::UnixDatagram, process::Command, time::Duration};

use mesh_tests::{Cluster, cluster::bin};
use serde_json::Value;

#[test]
fn the_installed_unit_passes_systemd_analyze_verify() {
    let root = tempdir("install");
    let out = Command::new(bin("mesh-agent"))
        .args(["install", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "usr/local/bin/mesh-agent",
        "usr/local/bin/meshctl",
        "etc/systemd/system/mesh-agent.service",
        "etc/mesh/agent.toml",
    ] {
        assert!(root.join(f).exists(), "{f} not installed");
    }
    // The unit names /usr/local/bin/mesh-agent; point it at the copy we just installed so
    // verify can check the binary too.
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/mesh-agent.service")).unwrap();
    let unit = unit.replace(
        "/usr/local/bin/mesh-agent",
        root.join("usr/local/bin/mesh-agent").to_str().unwrap(),
    );
    let unit_path = root.join("mesh-agent.service");
    std::fs::write(&unit_path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );

    // A second install keeps the operator's config.
    std::fs::write(
        root.join("etc/mesh/agent.toml"),
        "advertise = \"192.0.2.7\"\n",
    )
    .unwrap();
    let out = Command::new(bin("mesh-agent"))
        .args(["install", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(root.join("etc/mesh/agent.toml")).unwrap(),
        "advertise = \"192.0.2.7\"\n"
    );
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn the_agent_tells_systemd_when_it_is_ready() {
    let mut c = Cluster::new(1).unwrap();
    let dir = c.log_dir();
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    c.host_mut(1)
        .start_agent_with_env(&[], &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())])
        .unwrap();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).unwrap();
    let msg = String::from_utf8_lossy(&buf[..n]);
    assert!(msg.lines().any(|l| l == "READY=1"), "got {msg:?}");
    // Ready means ready: the API answers.
    c.host(1).meshctl_ok(&["node", "ls"]).unwrap();
    c.host_mut(1).stop_agent().unwrap();
    let n = sock.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
}

#[test]
fn a_config_file_configures_the_agent_and_flags_override_it() {
    let mut c = Cluster::new(1).unwrap();
    let conf = c.log_dir().join("agent.toml");
    let ip = c.host(1).ip.clone();
    std::fs::write(
        &conf,
        format!("advertise = \"{ip}\"\nnode_name = \"from-file\"\ncluster = \"blue\"\nphi_threshold = 12.0\n"),
    )
    .unwrap();
    // The harness passes --node-name, which must win over the file.
    c.host_mut(1)
        .start_agent(&["--config", conf.to_str().unwrap()])
        .unwrap();
    let me: Value = c
        .host(1)
        .meshctl_json(&["node", "inspect", "self"])
        .unwrap();
    assert_eq!(me["name"], c.host(1).node_name());
    assert_eq!(me["address"], ip.as_str());
    c.host_mut(1).stop_agent().unwrap();

    std::fs::write(&conf, "advertize = \"192.0.2.1\"\n").unwrap();
    let err = c
        .host_mut(1)
        .start_agent(&["--config", conf.to_str().unwrap()])
        .unwrap_err();
    assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
}

#[test]
fn a_restarted_cluster_keeps_its_networks_and_services() {
    let mut c = Cluster::new(3).unwrap();
    c.start_agents().unwrap();
    c.host(2)
        .meshctl_ok(&["network", "create", "app", "--subnet", "10.10.0.0/24"])
        .unwrap();
    let web: Value = c
        .host(2)
        .meshctl_json(&[
            "service",
            "create",
            "web",
            "--network",
            "app",
            "-p",
            "8080:80",
        ])
        .unwrap();
    // Every agent goes down (gracefully) and comes back: nothing is lost, nothing changes.
    for i in 1..=3 {
        c.host_mut(i).stop_agent().unwrap();
    }
    for i in 1..=3 {
        c.host_mut(i).restart_agent().unwrap();
    }
    c.eventually(
        Duration::from_secs(5),
        "web everywhere after restart",
        |c| {
            for h in c.hosts() {
                let s: Value = match h.meshctl_json(&["service", "inspect", "web"]) {
                    Ok(s) => s,
                    Err(_) => return Ok(None),
                };
                assert_eq!(s["vip"], web["vip"]);
                assert_eq!(s["id"], web["id"]);
            }
            Ok(Some(()))
        },
    )
    .unwrap();
    let nets: Value = c.host(1).meshctl_json(&["network", "ls"]).unwrap();
    assert_eq!(nets.as_array().unwrap().len(), 1);
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mesh-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn node_labels_and_availability_are_set_from_any_node_and_seen_everywhere() {
    let mut c = Cluster::new(2).unwrap();
    c.start_agents().unwrap();
    let h2 = c.host(2).node_name().to_owned();
    c.host(1)
        .meshctl_ok(&[
            "node",
            "update",
            "--label-add",
            "zone=east",
            "--label-add",
            "ssd",
            &h2,
        ])
        .unwrap();
    c.eventually(Duration::from_secs(2), "labels on host2's own view", |c| {
        let n: Value = c.host(2).meshctl_json(&["node", "inspect", "self"])?;
        Ok((n["labels"]["zone"] == "east" && n["labels"]["ssd"] == "").then_some(()))
    })
    .unwrap();
    c.host(2)
        .meshctl_ok(&[
            "node",
            "update",
            "--label-rm",
            "ssd",
            "--availability",
            "drain",
            "self",
        ])
        .unwrap();
    c.eventually(
        Duration::from_secs(2),
        "drain and label removal seen on host1",
        |c| {
            let nodes: Value = c.host(1).meshctl_json(&["node", "ls"])?;
            let n = nodes
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["name"] == h2.as_str())
                .cloned()
                .unwrap();
            Ok((n["availability"] == "drain" && n["labels"].get("ssd").is_none()).then_some(()))
        },
    )
    .unwrap();
    let table = c.host(1).meshctl_ok(&["node", "ls"]).unwrap();
    assert!(table.contains("Drain"), "{table}");
    let pretty = c
        .host(1)
        .meshctl_ok(&["node", "inspect", &h2, "--pretty"])
        .unwrap();
    assert!(pretty.contains("zone=east"), "{pretty}");
    // Bad input says what is wrong.
    let out = c
        .host(1)
        .meshctl(&["node", "update", "--availability", "pause", &h2])
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("use active or drain"));
    let out = c
        .host(1)
        .meshctl(&["node", "update", "--label-add", "=x", &h2])
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid label"));
    let out = c
        .host(1)
        .meshctl(&["node", "update", "nosuchnode", "--availability", "drain"])
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}
