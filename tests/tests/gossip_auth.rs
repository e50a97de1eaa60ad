//! Gossip sealed with a cluster key: agents that share it form a cluster, an agent with another
//! key (or none) can neither join, read nor inject, and keys rotate node by node while every
//! node stays Ready.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{Cluster, cluster::bin};
use serde_json::Value;

/// A new key line from the real CLI.
fn new_key() -> String {
    let out = Command::new(bin("mesh-agent"))
        .arg("keygen")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(key.len(), 44, "32 bytes in base64: {key}");
    key
}

/// Writes a key file (owner-only, as the agent requires) under the cluster's scratch dir.
fn key_file(c: &Cluster, name: &str, keys: &[&str]) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let path = c.log_dir().join(name);
    let text: String = keys.iter().map(|k| format!("{k}\n")).collect();
    // Replace atomically: a reload must never read half a file.
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::io::Write::write_all(
        &mut std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .unwrap(),
        text.as_bytes(),
    )
    .unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn key_arg(path: &Path) -> [&str; 2] {
    ["--cluster-key-file", path.to_str().unwrap()]
}

fn node_names(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_owned())
        .collect()
}

fn ready(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap()
        .iter()
        .filter(|n| n["status"] == "Ready")
        .map(|n| n["name"].as_str().unwrap().to_owned())
        .collect()
}

fn network_names(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_owned())
        .collect()
}

fn names_of(c: &Cluster, hosts: &[usize]) -> BTreeSet<String> {
    hosts
        .iter()
        .map(|i| c.host(*i).node_name().to_owned())
        .collect()
}

fn wait_ready(c: &Cluster, observers: &[usize], expected: &[usize]) {
    let want = names_of(c, expected);
    for i in observers {
        c.eventually(
            Duration::from_secs(10),
            &format!("host{i} sees {want:?} Ready"),
            |c| {
                let nodes: Value = c.host(*i).meshctl_json(&["node", "ls"])?;
                Ok((ready(&nodes) == want).then_some(()))
            },
        )
        .unwrap();
    }
}

fn stats(c: &Cluster, i: usize) -> Value {
    c.host(i).meshctl_json(&["gossip", "stats"]).unwrap()
}

fn dropped(stats: &Value, reason: &str) -> u64 {
    stats["auth"]["dropped"][reason].as_u64().unwrap()
}

fn key_ids(stats: &Value) -> Vec<String> {
    stats["auth"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Captures gossip on the underlay bridge: what anyone on the network can read.
fn capture_gossip(c: &Cluster, packets: usize) -> Vec<u8> {
    let file = c.log_dir().join("gossip.pcap");
    let out = c
        .underlay()
        .command("timeout")
        .args(["5", "tcpdump", "-i", "br0", "-U", "-c"])
        .arg(packets.to_string())
        .args(["-w", file.to_str().unwrap(), "udp", "port", "7946"])
        .output()
        .unwrap();
    let pcap = std::fs::read(&file).unwrap_or_default();
    assert!(
        pcap.len() > 24 * packets,
        "tcpdump captured too little ({} bytes): {}",
        pcap.len(),
        String::from_utf8_lossy(&out.stderr)
    );
    pcap
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn only_agents_with_the_cluster_key_join_read_or_inject() {
    let mut c = Cluster::new(4).unwrap();
    let shared = key_file(&c, "cluster.key", &[&new_key()]);
    let other = key_file(&c, "other.key", &[&new_key()]);
    c.host_mut(1).start_agent(&key_arg(&shared)).unwrap();
    c.host_mut(2).start_agent(&key_arg(&shared)).unwrap();
    // host3 has a key of another cluster, host4 none at all (it must say --insecure); both
    // try to join hosts 1 and 2.
    c.host_mut(3).start_agent(&key_arg(&other)).unwrap();
    c.host_mut(4).start_agent(&["--insecure"]).unwrap();

    wait_ready(&c, &[1, 2], &[1, 2]);
    c.host(3)
        .meshctl_ok(&["network", "create", "intruder", "--subnet", "10.66.0.0/24"])
        .unwrap();
    c.host(4)
        .meshctl_ok(&["network", "create", "plain", "--subnet", "10.77.0.0/24"])
        .unwrap();
    c.host(1)
        .meshctl_ok(&["network", "create", "app", "--subnet", "10.10.0.0/24"])
        .unwrap();

    // Thirty gossip rounds and more: the outsiders never show up and their records never land.
    let members = names_of(&c, &[1, 2]);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for i in [1, 2] {
            let nodes: Value = c.host(i).meshctl_json(&["node", "ls"]).unwrap();
            assert_eq!(node_names(&nodes), members, "host{i}: {nodes}");
            let nets: Value = c.host(i).meshctl_json(&["network", "ls"]).unwrap();
            assert_eq!(
                network_names(&nets),
                BTreeSet::from(["app".to_owned()]),
                "host{i}"
            );
        }
        // Nor can the outsiders read the members' state.
        for i in [3, 4] {
            let nodes: Value = c.host(i).meshctl_json(&["node", "ls"]).unwrap();
            assert_eq!(node_names(&nodes), names_of(&c, &[i]), "host{i}: {nodes}");
            let nets: Value = c.host(i).meshctl_json(&["network", "ls"]).unwrap();
            assert!(!network_names(&nets).contains("app"), "host{i}");
        }
        thread::sleep(Duration::from_millis(200));
    }

    // The members counted what they refused, by reason, and agree on the one key in use.
    let s1 = stats(&c, 1);
    assert_eq!(s1["authenticated"], true);
    assert!(dropped(&s1, "unknown_key") > 0, "host3's datagrams: {s1}");
    assert!(dropped(&s1, "unsealed") > 0, "host4's datagrams: {s1}");
    assert_eq!(dropped(&s1, "bad_tag"), 0, "{s1}");
    assert!(s1["auth"]["received"].as_u64().unwrap() > 10, "{s1}");
    let peers: Vec<&str> = s1["auth"]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["address"].as_str().unwrap())
        .collect();
    assert_eq!(peers, vec!["192.0.2.2:7946"], "only host2 authenticated");
    assert_eq!(key_ids(&s1), key_ids(&stats(&c, 2)));
    assert!(dropped(&stats(&c, 3), "unknown_key") > 0);
    let s4 = stats(&c, 4);
    assert_eq!(s4["authenticated"], false);
    let table = c.host(4).meshctl_ok(&["gossip", "stats"]).unwrap();
    assert!(table.contains("NO: anyone"), "{table}");
    assert!(
        c.host(4).logs().contains("gossip is NOT authenticated"),
        "the unkeyed agent warns"
    );
    // Its node list says so too, on stderr (the table and JSON stay parseable).
    let ls = c.host(4).meshctl(&["node", "ls"]).unwrap();
    let warning = String::from_utf8_lossy(&ls.stderr);
    assert!(
        warning.contains("WARNING: gossip is not authenticated on")
            && warning.contains(c.host(4).node_name()),
        "{warning}"
    );
    let nodes: Value = c.host(4).meshctl_json(&["node", "ls"]).unwrap();
    assert_eq!(nodes[0]["insecure"], true, "{nodes}");
    let ls = c.host(1).meshctl(&["node", "ls"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&ls.stderr).contains("WARNING"),
        "{ls:?}"
    );
    let nodes: Value = c.host(1).meshctl_json(&["node", "ls"]).unwrap();
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n.get("insecure").is_none()),
        "{nodes}"
    );
    let table = c.host(1).meshctl_ok(&["gossip", "stats"]).unwrap();
    assert!(
        table.contains("unknown_key") && table.contains("primary"),
        "{table}"
    );

    // On the wire: the unkeyed agent's gossip is readable, the members' is not.
    let pcap = capture_gossip(&c, 60);
    assert!(
        contains(&pcap, c.host(4).node_name()),
        "plain gossip carries node names in clear"
    );
    for i in [1, 2, 3] {
        assert!(
            !contains(&pcap, c.host(i).node_name()),
            "host{i}'s name is readable on the wire"
        );
    }
    assert!(!contains(&pcap, "10.10.0.0"), "network app is readable");
}

#[test]
fn an_agent_without_a_key_refuses_to_start_unless_insecure() {
    let c = Cluster::new(1).unwrap();
    let h = c.host(1);
    let mut args: Vec<String> = vec!["run".into(), "--advertise".into(), h.ip.clone()];
    args.extend(h.path_args());
    args.extend(["--config".into(), "/dev/null".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = h.mesh_agent(&args, Duration::from_secs(10)).unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no cluster key")
            && err.contains("mesh-agent keygen")
            && err.contains("--insecure"),
        "{err}"
    );
    // Refused before it touched anything: no socket, no pins, no state.
    assert!(!h.socket().exists());
    assert!(!h.bpffs().exists());
    assert!(!h.state_dir().exists());

    // agent.toml's `insecure = true` is the same as the flag.
    let conf = c.log_dir().join("insecure.toml");
    std::fs::write(&conf, "insecure = true\n").unwrap();
    let mut c = c;
    c.host_mut(1)
        .start_agent(&["--config", conf.to_str().unwrap()])
        .unwrap();
    assert!(
        c.host(1)
            .logs()
            .contains("--insecure: gossip is NOT authenticated")
    );
}

/// What an operator watches during a rotation: every node, as seen by each other node.
struct ReadyWatch {
    stop: Arc<AtomicBool>,
    /// The host being restarted (1-based; 0 = none): its own view is not checked meanwhile.
    restarting: Arc<AtomicUsize>,
    violations: Arc<Mutex<Vec<String>>>,
    samples: Arc<AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ReadyWatch {
    fn start(c: &Cluster) -> Self {
        let sockets: Vec<PathBuf> = c.hosts().iter().map(|h| h.socket()).collect();
        let everyone: BTreeSet<String> = c.hosts().iter().map(|h| h.node_name().into()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let restarting = Arc::new(AtomicUsize::new(0));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let samples = Arc::new(AtomicUsize::new(0));
        let (s, r, v, n) = (
            stop.clone(),
            restarting.clone(),
            violations.clone(),
            samples.clone(),
        );
        let meshctl = bin("meshctl");
        let thread = thread::spawn(move || {
            let start = Instant::now();
            while !s.load(Ordering::SeqCst) {
                for (i, socket) in sockets.iter().enumerate() {
                    if r.load(Ordering::SeqCst) == i + 1 {
                        continue;
                    }
                    let out = Command::new(&meshctl)
                        .arg("--socket")
                        .arg(socket)
                        .args(["node", "ls", "--format", "json"])
                        .output()
                        .unwrap();
                    if !out.status.success() {
                        // Only the restarting agent may be unreachable, and it is skipped.
                        if r.load(Ordering::SeqCst) != i + 1 {
                            v.lock().unwrap().push(format!(
                                "{:?}: host{} API down: {}",
                                start.elapsed(),
                                i + 1,
                                String::from_utf8_lossy(&out.stderr)
                            ));
                        }
                        continue;
                    }
                    let nodes: Value = serde_json::from_slice(&out.stdout).unwrap();
                    n.fetch_add(1, Ordering::SeqCst);
                    if ready(&nodes) != everyone {
                        v.lock().unwrap().push(format!(
                            "{:?}: host{} sees {}",
                            start.elapsed(),
                            i + 1,
                            nodes
                        ));
                    }
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        Self {
            stop,
            restarting,
            violations,
            samples,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        (
            self.samples.load(Ordering::SeqCst),
            self.violations.lock().unwrap().clone(),
        )
    }
}

/// Every node holds only `key` and hears every peer seal with it.
fn only_key_in_use(c: &Cluster, key: &str) {
    let n = c.hosts().len();
    for i in 1..=n {
        c.eventually(
            Duration::from_secs(10),
            &format!("host{i} uses only key {key}"),
            |c| {
                let s = stats(c, i);
                // A restarted agent may gossip to its own previous generation, i.e. itself.
                let me = format!("{}:7946", c.host(i).ip);
                let peers: Vec<&Value> = s["auth"]["peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|p| p["address"] != me.as_str())
                    .collect();
                let done = key_ids(&s) == vec![key.to_owned()]
                    && peers.len() == n - 1
                    && peers
                        .iter()
                        .all(|p| p["primary_key"] == key && p["last_key"] == key);
                if !done {
                    anyhow::bail!("{}", s["auth"]);
                }
                Ok(Some(()))
            },
        )
        .unwrap();
    }
}

fn primary_id(c: &Cluster, i: usize) -> String {
    key_ids(&stats(c, i))[0].clone()
}

/// Restarts are graceful (SIGTERM): the stopping agent announces it and its peers keep it
/// Ready while it comes back, with the default failure detector. This checks what the
/// rotation adds: a restarted node that switched keys must be understood at once.

#[test]
fn a_rolling_key_rotation_with_restarts_keeps_every_node_ready() {
    let mut c = Cluster::new(3).unwrap();
    let (old, new) = (new_key(), new_key());
    let files: Vec<PathBuf> = (1..=3)
        .map(|i| key_file(&c, &format!("h{i}.key"), &[&old]))
        .collect();
    for i in 1..=3 {
        c.host_mut(i).start_agent(&key_arg(&files[i - 1])).unwrap();
    }
    wait_ready(&c, &[1, 2, 3], &[1, 2, 3]);
    c.host(1)
        .meshctl_ok(&["network", "create", "app", "--subnet", "10.10.0.0/24"])
        .unwrap();
    let old_id = primary_id(&c, 1);

    let watch = ReadyWatch::start(&c);
    let mut gaps = Vec::new();
    // Step 1: the new key first, the old one still accepted; step 2: the new key only.
    for step in [vec![new.as_str(), old.as_str()], vec![new.as_str()]] {
        for i in 1..=3 {
            key_file(&c, &format!("h{i}.key"), &step);
            watch.restarting.store(i, Ordering::SeqCst);
            let t = Instant::now();
            c.host_mut(i).stop_agent().unwrap();
            c.host_mut(i).restart_agent().unwrap();
            gaps.push(t.elapsed());
            wait_ready(&c, &[i], &[1, 2, 3]);
            watch.restarting.store(0, Ordering::SeqCst);
        }
    }
    let new_id = primary_id(&c, 1);
    assert_ne!(new_id, old_id);
    only_key_in_use(&c, &new_id);
    // Let the watcher see the final state for a while too.
    thread::sleep(Duration::from_secs(1));
    let (samples, violations) = watch.finish();
    eprintln!("agent restart (stop + start until its API answers): {gaps:?}");
    assert!(samples > 20, "the watcher looked {samples} times");
    assert!(
        violations.is_empty(),
        "nodes left Ready during the rotation:\n{}",
        violations.join("\n")
    );

    // State from before the rotation is intact and new state still spreads.
    c.host(3)
        .meshctl_ok(&["network", "create", "db", "--subnet", "10.20.0.0/24"])
        .unwrap();
    c.eventually(Duration::from_secs(2), "db and app on host2", |c| {
        let nets: Value = c.host(2).meshctl_json(&["network", "ls"])?;
        Ok((network_names(&nets) == BTreeSet::from(["app".into(), "db".into()])).then_some(()))
    })
    .unwrap();
}

#[test]
fn keys_rotate_on_sighup_without_restarting_any_agent() {
    let mut c = Cluster::new(3).unwrap();
    let (old, new) = (new_key(), new_key());
    let files: Vec<PathBuf> = (1..=3)
        .map(|i| key_file(&c, &format!("h{i}.key"), &[&old]))
        .collect();
    for i in 1..=3 {
        c.host_mut(i).start_agent(&key_arg(&files[i - 1])).unwrap();
    }
    wait_ready(&c, &[1, 2, 3], &[1, 2, 3]);
    let pids: Vec<u32> = (1..=3).map(|i| c.host(i).agent_pid().unwrap()).collect();
    let hup = |i: usize| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pids[i - 1] as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };

    // A broken key file is refused and reported; the node keeps gossiping with its keys.
    std::fs::write(&files[0], "not a key\n").unwrap();
    hup(1);
    c.eventually(Duration::from_secs(5), "the failed reload reported", |c| {
        let s = stats(c, 1);
        Ok(s["auth"]["last_reload"]["error"]
            .as_str()
            .map(|e| e.contains("line 1"))
            .unwrap_or(false)
            .then_some(s))
    })
    .unwrap();
    let watch = ReadyWatch::start(&c);
    thread::sleep(Duration::from_millis(500));

    let old_id = primary_id(&c, 2);
    for step in [vec![new.as_str(), old.as_str()], vec![new.as_str()]] {
        for i in 1..=3 {
            key_file(&c, &format!("h{i}.key"), &step);
            hup(i);
            c.eventually(Duration::from_secs(5), "reload applied", |c| {
                Ok((key_ids(&stats(c, i)).len() == step.len()).then_some(()))
            })
            .unwrap();
            // A few gossip rounds with the cluster half rotated.
            thread::sleep(Duration::from_millis(500));
        }
    }
    let new_id = primary_id(&c, 1);
    assert_ne!(new_id, old_id);
    only_key_in_use(&c, &new_id);
    let (samples, violations) = watch.finish();
    assert!(samples > 20, "the watcher looked {samples} times");
    assert!(
        violations.is_empty(),
        "nodes left Ready during the rotation:\n{}",
        violations.join("\n")
    );
    for i in 1..=3 {
        assert_eq!(
            c.host(i).agent_pid(),
            Some(pids[i - 1]),
            "no agent restarted"
        );
        let s = stats(&c, i);
        assert!(s["auth"]["last_reload"]["error"].is_null());
        // Each node answered every peer with a key that peer held, at every step.
        let drops: u64 = s["auth"]["dropped"]
            .as_object()
            .unwrap()
            .values()
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(drops, 0, "host{i} dropped gossip: {}", s["auth"]["dropped"]);
    }
}
