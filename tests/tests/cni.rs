//! The CNI plugin `mesh-cni`: driven directly with the CNI environment and config (as any
//! runtime calls it), and by real podman with its CNI backend. Either way the container's
//! namespace is the runtime's; the agent plumbs it, publishes its endpoint cluster-wide and
//! removes every trace on DEL.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use mesh_tests::{Cluster, Host, Netns, cluster::bin, workload::tally};
use serde_json::{Value, json};

/// `n` hosts with agents and network `app`.
fn cluster(n: usize) -> Cluster {
    let mut c = Cluster::new(n).unwrap();
    c.start_agents().unwrap();
    c.create_network("app", "10.62.0.0/24").unwrap();
    c
}

/// The network config a runtime would pass for `network`, talking to `socket`.
fn config(network: &str, socket: &Path) -> String {
    json!({
        "cniVersion": "1.0.0",
        "name": "app",
        "type": "mesh-cni",
        "network": network,
        "socket": socket,
    })
    .to_string()
}

/// Runs mesh-cni with `env` and `stdin`: its stdout as JSON (Null when empty) and whether it
/// exited 0.
fn cni(env: &[(&str, &str)], stdin: &str) -> (Value, bool) {
    let mut child = Command::new(bin("mesh-cni"))
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
    let text = String::from_utf8_lossy(&out.stdout);
    let v = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("mesh-cni printed {text:?}: {e}"))
    };
    (v, out.status.success())
}

fn env<'a>(
    command: &'a str,
    id: &'a str,
    netns: &'a str,
    args: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args),
        ("CNI_PATH", "/usr/lib/cni"),
    ]
}

/// The endpoint of `task` as `meshctl network inspect app` on `h` lists it.
fn endpoint(h: &Host, task: &str) -> Option<Value> {
    let n: Value = h.meshctl_json(&["network", "inspect", "app"]).ok()?;
    n["tasks"]
        .as_array()?
        .iter()
        .find(|t| t["name"] == task)
        .cloned()
}

/// Active backends of `service` on `h`, by address.
fn backends(h: &Host, service: &str) -> Vec<String> {
    let s: Value = h.meshctl_json(&["service", "inspect", service]).unwrap();
    s["dataplane"]["backends"]
        .as_array()
        .map(|b| {
            b.iter()
                .filter(|b| b["state"] == "active")
                .map(|b| b["ip"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_plugin_driven_directly_adds_checks_and_deletes_an_endpoint_everywhere() {
    let c = cluster(2);
    c.create_service("web", "app", &["--replicas", "0", "--", "true"])
        .unwrap();
    let ns = Netns::create(&format!("{}-ctr1", c.name())).unwrap();
    let netns = ns.path().display().to_string();
    let id = "0123456789abcdef0123456789abcdef";
    let conf = config("app", &c.host(1).socket());

    let (r, ok) = cni(
        &env(
            "ADD",
            id,
            &netns,
            "IgnoreUnknown=1;K8S_POD_NAME=ctr1;MESH_SERVICE=web",
        ),
        &conf,
    );
    assert!(ok, "ADD: {r}");
    assert_eq!(r["cniVersion"], "1.0.0");
    assert_eq!(r["interfaces"][0]["name"], "eth0", "{r}");
    assert_eq!(r["interfaces"][0]["sandbox"], netns.as_str(), "{r}");
    let address = r["ips"][0]["address"].as_str().unwrap().to_owned();
    assert!(
        address.starts_with("10.62.0.") && address.ends_with("/24"),
        "{r}"
    );
    assert_eq!(r["ips"][0]["interface"], 0);
    assert_eq!(r["dns"]["nameservers"], json!(["127.0.0.11"]), "{r}");
    assert_eq!(
        r["routes"][0]["dst"], "0.0.0.0/0",
        "egress like a task's: {r}"
    );
    let ip = address.split('/').next().unwrap().to_owned();

    // Inside: the address, the MTU of the overlay, and mesh DNS at 127.0.0.11.
    let inside = ns
        .sh("ip -o addr show dev eth0; ip -o link show dev eth0")
        .unwrap();
    assert!(inside.contains(&address), "{inside}");
    assert!(inside.contains("mtu 1450"), "{inside}");
    let vip = c
        .host(1)
        .meshctl_json::<Value>(&["service", "inspect", "web"])
        .unwrap()["vip"]
        .as_str()
        .unwrap()
        .to_owned();
    let answer = ns.sh("busybox nslookup web 127.0.0.11").unwrap();
    assert!(answer.contains(&vip), "nslookup web: {answer}");
    let answer = ns.sh("busybox nslookup ctr1 127.0.0.11").unwrap();
    assert!(answer.contains(&ip), "nslookup ctr1: {answer}");

    // Everywhere: the endpoint, and a backend of web.
    c.eventually(Duration::from_secs(10), "ctr1 on every node", |c| {
        for h in c.hosts() {
            let Some(e) = endpoint(h, "ctr1") else {
                return Ok(None);
            };
            assert_eq!(e["ip"], ip.as_str(), "{e}");
            assert_eq!(e["service"], "web", "{e}");
            if backends(h, "web") != [ip.clone()] {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .unwrap();
    // Reachable across hosts over the overlay (host2 learnt its FDB entry from gossip).
    let out = c
        .host(2)
        .ns
        .sh_output(&format!("ping -c1 -W2 {ip}"))
        .unwrap();
    assert!(out.status.success(), "ping from host2: {out:?}");

    let (r, ok) = cni(&env("CHECK", id, &netns, ""), &conf);
    assert!(ok && r.is_null(), "CHECK: {r}");

    for round in 0..2 {
        let (r, ok) = cni(&env("DEL", id, &netns, ""), &conf);
        assert!(ok && r.is_null(), "DEL #{round}: {r}");
    }
    c.eventually(Duration::from_secs(10), "ctr1 gone everywhere", |c| {
        for h in c.hosts() {
            if endpoint(h, "ctr1").is_some() || !backends(h, "web").is_empty() {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .unwrap();
    let links = ns.sh("ip -o link").unwrap();
    assert!(
        !links.contains("eth0") && !links.contains("gw-eth0"),
        "{links}"
    );
    let state = c.host(1).state_dir().join("cni");
    let left: Vec<_> = std::fs::read_dir(&state).unwrap().flatten().collect();
    assert!(
        left.is_empty(),
        "records left in {}: {left:?}",
        state.display()
    );
    // CHECK after DEL says what is wrong.
    let (r, ok) = cni(&env("CHECK", id, &netns, ""), &conf);
    assert!(!ok && r["code"] == 101, "{r}");
    // The address is free again: a new ADD may get it; the DNS listener is gone with DEL.
    let (r, ok) = cni(&env("ADD", id, &netns, "K8S_POD_NAME=ctr1"), &conf);
    assert!(ok, "ADD again: {r}");
    let (_, ok) = cni(&env("DEL", id, &netns, ""), &conf);
    assert!(ok);
}

/// What is wrong, the CNI environment, the config and the error code expected.
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, String, u64);

#[test]
fn the_plugin_answers_bad_input_with_cni_errors() {
    let c = cluster(1);
    let ns = Netns::create(&format!("{}-ctr2", c.name())).unwrap();
    let netns = ns.path().display().to_string();
    let conf = config("app", &c.host(1).socket());
    let missing = format!("/run/netns/{}-nonexistent", c.name());
    let cases: [Case; 5] = [
        (
            "missing netns",
            env("ADD", "c2", &missing, ""),
            conf.clone(),
            4,
        ),
        (
            "no CNI_CONTAINERID",
            env("ADD", "", &netns, ""),
            conf.clone(),
            4,
        ),
        (
            "unknown network",
            env("ADD", "c2", &netns, ""),
            config("nope", &c.host(1).socket()),
            101,
        ),
        (
            "malformed config",
            env("ADD", "c2", &netns, ""),
            "{\"cniVersion\": \"1.0.0\", ".into(),
            6,
        ),
        (
            "agent not running",
            env("ADD", "c2", &netns, ""),
            config("app", &c.log_dir().join("no-agent.sock")),
            11,
        ),
    ];
    for (what, env, stdin, code) in cases {
        let (r, ok) = cni(&env, &stdin);
        assert!(!ok, "{what}: exits non-zero: {r}");
        assert_eq!(r["code"], code, "{what}: {r}");
        assert_eq!(r["cniVersion"], "1.0.0", "{what}: {r}");
        assert!(
            !r["msg"].as_str().unwrap_or_default().is_empty(),
            "{what}: {r}"
        );
    }
    let (r, ok) = cni(
        &env("ADD", "c2", &netns, ""),
        &config("nope", &c.host(1).socket()),
    );
    assert!(
        !ok && r["msg"]
            .as_str()
            .unwrap()
            .contains("network nope not found"),
        "{r}"
    );
    let (r, ok) = cni(&[("CNI_COMMAND", "VERSION")], "{\"cniVersion\":\"1.0.0\"}");
    assert!(ok, "{r}");
    assert!(
        r["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0")),
        "{r}"
    );
    // Nothing was plumbed by the failed ADDs.
    let links = ns.sh("ip -o link").unwrap();
    assert!(!links.contains("eth0"), "{links}");
}

/// podman with the CNI backend, configured through its own files only (no change to this
/// machine's /etc/containers or /etc/cni): runc, rlimits this VM allows, mesh-cni from the
/// build directory and the conflists of `dir`.
struct Podman {
    conf: PathBuf,
    names: Vec<String>,
}

impl Podman {
    fn new(dir: &Path) -> Self {
        let plugins = bin("mesh-cni").parent().unwrap().to_owned();
        let conf = dir.join("containers.conf");
        std::fs::write(
            &conf,
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
                 [engine]\nruntime = \"runc\"\n\
                 [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [{plugins:?}]\n\
                 network_config_dir = {dir:?}\n",
                dir = dir.display().to_string(),
                plugins = plugins.display().to_string(),
            ),
        )
        .unwrap();
        Self {
            conf,
            names: Vec::new(),
        }
    }

    fn command(&self, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
        Command::new("podman")
            .env("CONTAINERS_CONF", &self.conf)
            .envs(env.iter().copied())
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, env: &[(&str, &str)], args: &[&str]) -> String {
        let out = self.command(env, args);
        assert!(
            out.status.success(),
            "podman {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn run(&mut self, env: &[(&str, &str)], name: &str, args: &[&str]) {
        self.names.push(name.to_owned());
        let mut all = vec!["run", "-d", "--name", name];
        all.extend_from_slice(args);
        self.ok(env, &all);
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = self.command(&[], &["rm", "--force", "--time", "0", n]);
        }
    }
}

fn curl_published(c: &Cluster, h: &Host, n: usize) -> BTreeMap<String, usize> {
    let a: std::net::SocketAddr = format!("{}:8080", h.ip).parse().unwrap();
    let answers = c
        .external_ns("client")
        .unwrap()
        .run(move || {
            (0..n)
                .map(|_| mesh_tests::workload::http_get(a).unwrap().trim().to_owned())
                .collect::<Vec<_>>()
        })
        .unwrap();
    tally(answers)
}

#[test]
fn podman_containers_on_a_mesh_network_resolve_balance_serve_and_leave_on_rm() {
    let image = mesh_tests::image::Image::whoami().unwrap();
    let mut c = cluster(2);
    c.external("client", 100).unwrap();
    let whoami = bin("mesh-whoami");
    c.create_service(
        "web",
        "app",
        &[
            "--replicas",
            "2",
            "--replicas-max-per-node",
            "1",
            "--publish",
            "8080:80",
            "--",
            whoami.to_str().unwrap(),
        ],
    )
    .unwrap();
    c.eventually(Duration::from_secs(20), "web at 2/2 everywhere", |c| {
        Ok(c.hosts()
            .iter()
            .all(|h| backends(h, "web").len() == 2)
            .then_some(()))
    })
    .unwrap();
    c.host(2)
        .run_whoami::<Value>("app", None, "t1", &[])
        .unwrap();

    // The conflist as an operator writes it, in a directory of this test.
    let dir = c.log_dir().join("cni");
    let net = format!("{}-app", c.name());
    let out = c
        .host(1)
        .meshctl_ok(&[
            "network",
            "cni",
            "app",
            "--cni-dir",
            dir.to_str().unwrap(),
            "--cni-name",
            &net,
        ])
        .unwrap();
    let conflist: Value = serde_json::from_slice(&std::fs::read(out.trim()).unwrap()).unwrap();
    assert_eq!(conflist["cniVersion"], "1.0.0");
    assert_eq!(conflist["plugins"][0]["type"], "mesh-cni");

    let mut podman = Podman::new(&dir);
    let host_veths = |c: &Cluster| {
        let links = c.host(1).ns.sh("ip -o link").unwrap();
        links.lines().filter(|l| l.contains(": mve")).count()
    };
    let veths_before = host_veths(&c);
    let ctr = format!("{}-pc1", c.name());
    // A network alias that names a service of the network makes the container its backend.
    podman.run(
        &[],
        &ctr,
        &[
            "--network",
            &net,
            "--network-alias",
            "web",
            "--hostname",
            "pc1",
            image.name(),
        ],
    );
    let ip = c
        .eventually(Duration::from_secs(10), "the container everywhere", |c| {
            let mut ip = None;
            for h in c.hosts() {
                let Some(e) = endpoint(h, &ctr) else {
                    return Ok(None);
                };
                if e["service"] != "web" || backends(h, "web").len() != 3 {
                    return Ok(None);
                }
                ip = e["ip"].as_str().map(str::to_owned);
            }
            Ok(ip)
        })
        .unwrap();

    // Inside the container: service by name and VIP, a task by name, through 127.0.0.11.
    let vip = c
        .host(1)
        .meshctl_json::<Value>(&["service", "inspect", "web"])
        .unwrap()["vip"]
        .as_str()
        .unwrap()
        .to_owned();
    let resolv = podman.ok(&[], &["exec", &ctr, "cat", "/etc/resolv.conf"]);
    assert!(resolv.starts_with("nameserver 127.0.0.11"), "{resolv}");
    let out = podman.ok(&[], &["exec", &ctr, "nslookup", "web", "127.0.0.11"]);
    assert!(out.contains(&vip), "nslookup web: {out}");
    let mut answers = Vec::new();
    for url in ["http://web/", &format!("http://{vip}/")] {
        for _ in 0..6 {
            answers.push(
                podman
                    .ok(&[], &["exec", &ctr, "wget", "-qO-", url])
                    .trim()
                    .to_owned(),
            );
        }
    }
    let by = tally(answers);
    assert_eq!(
        by.len(),
        3,
        "web's three backends (two tasks, this container): {by:?}"
    );
    let out = podman.ok(&[], &["exec", &ctr, "wget", "-qO-", "http://t1/"]);
    assert_eq!(out.trim(), "t1", "a task on host2 by name");

    // The routing mesh sends the container its share, from either node.
    for h in c.hosts() {
        let by = curl_published(&c, h, 9);
        assert_eq!(
            by.get("pc1"),
            Some(&3),
            "{} balances onto pc1: {by:?}",
            h.node_name()
        );
    }

    // MESH_SERVICE in podman's CNI_ARGS environment works too.
    let ctr2 = format!("{}-pc2", c.name());
    podman.run(
        &[("CNI_ARGS", "MESH_SERVICE=web")],
        &ctr2,
        &["--network", &net, "--hostname", "pc2", image.name()],
    );
    c.eventually(Duration::from_secs(10), "pc2 a backend everywhere", |c| {
        Ok(c.hosts()
            .iter()
            .all(|h| backends(h, "web").len() == 4)
            .then_some(()))
    })
    .unwrap();

    // podman rm -f: DEL, and the endpoints leave every node.
    podman.ok(&[], &["rm", "--force", "--time", "0", &ctr, &ctr2]);
    c.eventually(
        Duration::from_secs(10),
        "the containers gone everywhere",
        |c| {
            for h in c.hosts() {
                if endpoint(h, &ctr).is_some()
                    || endpoint(h, &ctr2).is_some()
                    || backends(h, "web").len() != 2
                    || backends(h, "web").contains(&ip)
                {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .unwrap();
    assert_eq!(
        host_veths(&c),
        veths_before,
        "the containers' veths are gone from host1"
    );
}

#[test]
fn an_attachment_survives_an_agent_restart_and_leaves_when_its_namespace_is_deleted() {
    let mut c = cluster(2);
    let ns = Netns::create(&format!("{}-ctr3", c.name())).unwrap();
    let netns = ns.path().display().to_string();
    let conf = config("app", &c.host(1).socket());
    let (r, ok) = cni(&env("ADD", "ctr3id", &netns, "K8S_POD_NAME=ctr3"), &conf);
    assert!(ok, "ADD: {r}");
    let ip = r["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();

    // A crashed agent comes back: the record is adopted, DNS answers in the namespace again.
    c.host_mut(1).kill_agent().unwrap();
    c.host_mut(1).restart_agent().unwrap();
    let (r, ok) = cni(&env("CHECK", "ctr3id", &netns, ""), &conf);
    assert!(ok, "CHECK after a restart: {r}");
    c.eventually(
        Duration::from_secs(10),
        "DNS in the namespace again",
        |_| {
            Ok(ns
                .sh("busybox nslookup ctr3 127.0.0.11")
                .is_ok_and(|a| a.contains(&ip))
                .then_some(()))
        },
    )
    .unwrap();
    // Peers may have seen the crashed node down for a moment: its endpoints come back with it.
    c.eventually(Duration::from_secs(10), "ctr3 on host2 again", |c| {
        Ok(endpoint(c.host(2), "ctr3").map(|_| ()))
    })
    .unwrap();

    // The runtime deletes the namespace without a DEL (it crashed): the veth pair goes with
    // it, and the agent notices and removes the endpoint everywhere.
    drop(ns);
    c.eventually(Duration::from_secs(20), "ctr3 gone everywhere", |c| {
        Ok(c.hosts()
            .iter()
            .all(|h| endpoint(h, "ctr3").is_none())
            .then_some(()))
    })
    .unwrap();
    let (r, ok) = cni(&env("DEL", "ctr3id", &netns, ""), &conf);
    assert!(ok && r.is_null(), "a late DEL is fine: {r}");
}
