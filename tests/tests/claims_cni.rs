//! The README's CNI error codes that are mesh's own, end to end ("CNI plugin"): 102 when
//! the container's name is taken by another task (or the container already has that
//! interface on another network), 103 when the agent refuses the request, 100 when the
//! agent fails while plumbing. Each is CNI error JSON on stdout with a non-zero exit, and a
//! failed ADD leaves nothing behind: no interface in the container, no endpoint in the
//! network, no attachment record.

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use mesh_tests::{Cluster, Host, Netns, cluster::bin};
use serde_json::{Value, json};

fn config(network: &str, socket: &Path) -> String {
    json!({
        "cniVersion": "1.0.0",
        "name": network,
        "type": "mesh-cni",
        "network": network,
        "socket": socket,
    })
    .to_string()
}

/// Runs mesh-cni as a runtime would, with a deadline: its stdout as JSON (Null when empty)
/// and whether it exited 0.
fn cni(env: &[(&str, &str)], stdin: &str) -> (Value, bool) {
    let mut child = Command::new("timeout")
        .arg("30")
        .arg(bin("mesh-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_ne!(
        out.status.code(),
        Some(124),
        "mesh-cni still ran after 30 s"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("mesh-cni printed {text:?}: {e}"))
    };
    (v, out.status.success())
}

fn add<'a>(id: &'a str, netns: &'a str, ifname: &'a str, args: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", ifname),
        ("CNI_ARGS", args),
        ("CNI_PATH", "/usr/lib/cni"),
    ]
}

/// The task names network `net` lists on `h`.
fn endpoints(h: &Host, net: &str) -> Vec<String> {
    let n: Value = h.meshctl_json(&["network", "inspect", net]).unwrap();
    let mut names: Vec<String> = n["tasks"]
        .as_array()
        .map(|t| {
            t.iter()
                .map(|t| t["name"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The interfaces in `ns` other than loopback, by name.
fn links(ns: &Netns) -> Vec<String> {
    let out = ns.sh("ip -o link show").unwrap();
    out.lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap().to_owned())
        .filter(|n| n != "lo")
        .collect()
}

fn assert_error(what: &str, r: &Value, ok: bool, code: u64, says: &str) {
    assert!(!ok, "{what}: exits non-zero: {r}");
    assert_eq!(r["code"], code, "{what}: {r}");
    assert_eq!(r["cniVersion"], "1.0.0", "{what}: {r}");
    let msg = r["msg"].as_str().unwrap_or_default();
    assert!(msg.contains(says), "{what}: the message says {says:?}: {r}");
}

#[test]
fn agent_conflicts_refusals_and_failures_are_codes_102_103_and_100() {
    let mut c = Cluster::new(2).unwrap();
    c.start_agents().unwrap();
    c.create_network("app", "10.63.0.0/24").unwrap();
    c.create_network("db", "10.64.0.0/24").unwrap();
    c.create_service("store", "db", &["--replicas", "0", "--", "true"])
        .unwrap();
    let h1 = c.host(1);
    let app = config("app", &h1.socket());
    let ns: Vec<Netns> = (1..=5)
        .map(|i| Netns::create(&format!("{}-ctr{i}", c.name())).unwrap())
        .collect();
    let path = |i: usize| ns[i - 1].path().display().to_string();

    // The first container takes the name `dup`.
    let (r, ok) = cni(&add("c1", &path(1), "eth0", "K8S_POD_NAME=dup"), &app);
    assert!(ok, "{r}");
    c.eventually(Duration::from_secs(10), "dup on host2", |c| {
        Ok((endpoints(c.host(2), "app") == ["dup"]).then_some(()))
    })
    .unwrap();

    // 102: another container under the same name, on this node and on the other one.
    let (r, ok) = cni(&add("c2", &path(2), "eth0", "K8S_POD_NAME=dup"), &app);
    assert_error(
        "same name, same node",
        &r,
        ok,
        102,
        "a task named dup already exists",
    );
    let (r, ok) = cni(
        &add("c2", &path(2), "eth0", "K8S_POD_NAME=dup"),
        &config("app", &c.host(2).socket()),
    );
    assert_error(
        "same name, other node",
        &r,
        ok,
        102,
        "task names are cluster-wide",
    );
    // 102: the first container's eth0 again, on another network.
    let (r, ok) = cni(
        &add("c1", &path(1), "eth0", "K8S_POD_NAME=dup"),
        &config("db", &h1.socket()),
    );
    assert_error("eth0 on another network", &r, ok, 102, "DEL it first");

    // 103: what the agent refuses.
    let file = c.log_dir().join("not-a-netns");
    std::fs::write(&file, "").unwrap();
    let file = file.display().to_string();
    let (r, ok) = cni(&add("c3", &file, "eth0", ""), &app);
    assert_error(
        "a file for a netns",
        &r,
        ok,
        103,
        "is not a network namespace",
    );
    let (r, ok) = cni(&add("c3", &path(3), "eth0!", ""), &app);
    assert_error(
        "a bad interface name",
        &r,
        ok,
        103,
        "use 1-12 letters and digits",
    );
    let (r, ok) = cni(&add("c3", &path(3), "eth0", "MESH_SERVICE=store"), &app);
    assert_error(
        "a service of another network",
        &r,
        ok,
        103,
        "service store is on network db, not app",
    );

    // 100: the agent fails while plumbing, here because the container already has an eth0.
    ns[3]
        .sh("ip link add eth0 type veth peer name eth0p")
        .unwrap();
    let (r, ok) = cni(&add("c4", &path(4), "eth0", "K8S_POD_NAME=taken-if"), &app);
    assert_error(
        "the interface exists",
        &r,
        ok,
        100,
        "attaching container c4 to network app",
    );
    assert!(
        r["details"]
            .as_str()
            .unwrap_or_default()
            .contains("answered 500"),
        "{r}"
    );

    // Nothing of the failed ADDs is left: no interface, no endpoint, no record.
    for i in [2, 3] {
        assert!(
            links(&ns[i - 1]).is_empty(),
            "ctr{i}: {:?}",
            links(&ns[i - 1])
        );
    }
    let mut left = links(&ns[3]);
    left.sort();
    assert_eq!(left, ["eth0", "eth0p"], "ctr4 has only its own links");
    let mut kept = links(&ns[0]);
    kept.sort();
    assert_eq!(
        kept,
        ["eth0", "gw-eth0"],
        "ctr1 keeps its mesh and gateway links"
    );
    std::thread::sleep(Duration::from_secs(1));
    for h in c.hosts() {
        assert_eq!(endpoints(h, "app"), ["dup"], "host{}", h.index);
        assert!(endpoints(h, "db").is_empty(), "host{}", h.index);
    }
    let records: Vec<_> = std::fs::read_dir(h1.state_dir().join("cni"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(records.len(), 1, "one attachment record: {records:?}");
    // The failed ADDs released their addresses: a new container gets the next one after
    // dup's, as if they had never happened.
    let dup: Value = h1.meshctl_json(&["network", "inspect", "app"]).unwrap();
    let (r, ok) = cni(&add("c5", &path(5), "eth0", "K8S_POD_NAME=fresh"), &app);
    assert!(ok, "{r}");
    let first = dup["tasks"][0]["ip"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let next = r["ips"][0]["address"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let last_octet = |s: &str| -> u32 {
        s.split('/')
            .next()
            .unwrap()
            .rsplit('.')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        last_octet(&next),
        last_octet(&first) + 1,
        "dup has {first}, the next container {next}"
    );
    for (id, i) in [("c1", 1), ("c5", 5)] {
        let netns = path(i);
        let mut del = add(id, &netns, "eth0", "");
        del[0].1 = "DEL";
        let (r, ok) = cni(&del, &app);
        assert!(ok, "DEL {id}: {r}");
    }
}
