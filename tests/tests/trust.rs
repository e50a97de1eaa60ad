//! Node identities: a member holding the cluster key (what any node, or anyone who read one
//! node's key file, holds) tries to take over another node — by running an agent under its
//! name, and by writing records in its name straight into gossip. Each attempt is refused
//! everywhere, counted, and the cluster keeps serving with 0 failed requests.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_agent::gossip::{
    auth::{GossipAuth, NONCE_LEN, seal},
    keyring::{self, ClusterKey, Keyring},
    signed,
    validate::craft,
};
use mesh_agent::identity::NodeIdentity;
use mesh_agent::roles::{AdminKey, Grant, Role};
use mesh_tests::{Cluster, Host, availability::Probe, cluster::bin, events::Follower};
use serde_json::Value;

/// No request may fail, and no stretch without an answer may be longer than this (a few
/// requests at 100/s: scheduling noise on a shared 2-core machine, not an outage).
const MAX_GAP: Duration = Duration::from_millis(500);

/// The attacker's host on the underlay: it holds the cluster key, nothing else.
const ATTACKER: &str = "attacker";
const ATTACKER_IP: &str = "192.0.2.50";

/// Two serving nodes (a task of `web` on each, published on 8080), a host for the attacker
/// and a client outside the cluster.
fn serving_cluster() -> Cluster {
    serving_cluster_with(|_| Vec::new())
}

/// [`serving_cluster`], each host's agent started with `args(host)`.
fn serving_cluster_with(args: impl Fn(&Host) -> Vec<String>) -> Cluster {
    let mut c = Cluster::new(2).unwrap();
    for i in 1..=2 {
        let a = args(c.host(i));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        c.host_mut(i).start_agent(&a).unwrap();
    }
    c.create_network("app", "10.10.0.0/24").unwrap();
    c.create_service("web", "app", &["-p", "8080:80"]).unwrap();
    for i in 1..=2 {
        c.host(i)
            .run_whoami::<Value>("app", Some("web"), &format!("web-{i}"), &[])
            .unwrap();
    }
    c.eventually(
        Duration::from_secs(10),
        "host1 balances over 2 tasks",
        |c| {
            let s: Value = c.host(1).meshctl_json(&["service", "inspect", "web"])?;
            let n = s["dataplane"]["backends"].as_array().map_or(0, Vec::len);
            Ok((n == 2).then_some(()))
        },
    )
    .unwrap();
    c.external("client", 100).unwrap();
    c.external(ATTACKER, 50).unwrap();
    c
}

fn origins(h: &Host) -> (u64, u64) {
    let v: Value = h.meshctl_json(&["gossip", "stats"]).unwrap();
    (
        // A record not signed at its version by its node's key is refused by the transport
        // (the whole datagram, as invalid) when the node's key is known, else by the view.
        v["origins"]["invalid_records"].as_u64().unwrap()
            + v["auth"]["dropped"]["invalid"].as_u64().unwrap(),
        v["origins"]["nodes_refused"].as_u64().unwrap(),
    )
}

/// The address `observer` has for node `name` (from `node ls`).
fn address_of(observer: &Host, name: &str) -> Option<String> {
    let nodes: Value = observer.meshctl_json(&["node", "ls"]).unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .and_then(|n| n["address"].as_str().map(str::to_owned))
}

fn assert_still_itself(c: &Cluster, victim: usize) {
    let name = c.host(victim).node_name();
    for i in 1..=2 {
        assert_eq!(
            address_of(c.host(i), name).as_deref(),
            Some(c.host(victim).ip.as_str()),
            "host{i} lost {name}'s real record"
        );
    }
}

/// An agent on the attacker's host (its own state dir, so its own new key pair) that calls
/// itself `name`, with the cluster's key.
struct Impostor {
    child: Child,
    dir: std::path::PathBuf,
}

impl Impostor {
    fn start(c: &Cluster, name: &str) -> Self {
        let ns = c.external_ns(ATTACKER).unwrap();
        let dir = std::path::PathBuf::from("/run/mesh").join(ns.name());
        let log = std::fs::File::create(c.log_dir().join("impostor.log")).unwrap();
        let child = ns
            .command(bin("mesh-agent").to_str().unwrap())
            .arg("run")
            .args(["--interface", "eth0", "--node-name", name])
            .args(["--advertise", ATTACKER_IP])
            .args(["--join", &c.host(1).ip])
            .arg("--socket")
            .arg(dir.join("agent.sock"))
            .arg("--bpffs")
            .arg(std::path::Path::new("/sys/fs/bpf/mesh").join(ns.name()))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--cgroup")
            .arg(mesh_tests::cluster::cgroup_base().join(ns.name()))
            .args(["--config", "/dev/null", "--control-plane-only"])
            .arg("--cluster-key-file")
            .arg(c.host(1).cluster_key())
            .env("MESH_LOG", "info,mesh_agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self { child, dir }
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_member_cannot_join_under_another_nodes_name() {
    let c = serving_cluster();
    let victim = c.host(2).node_name().to_owned();
    let mut events = Follower::start(c.host(1), &[]);
    let addr: SocketAddr = format!("{}:8080", c.host(1).ip).parse().unwrap();
    let probe = Probe::start(c.external_ns("client").unwrap(), addr).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // A host with the cluster key runs an agent that calls itself host2.
    let impostor = Impostor::start(&c, &victim);
    c.eventually(
        Duration::from_secs(15),
        "host1 and host2 refuse the impostor",
        |c| Ok((origins(c.host(1)).1 >= 1 && origins(c.host(2)).1 >= 1).then_some(())),
    )
    .unwrap();
    let refused = events.expect(&[("node", "refused", &victim)], Duration::from_secs(5));
    // The name stays bound to host2's own key, as host2 itself and host1 report it.
    let own: Value = c
        .host(2)
        .meshctl_json(&["node", "inspect", "self"])
        .unwrap();
    let seen: Value = c
        .host(1)
        .meshctl_json(&["node", "inspect", &victim])
        .unwrap();
    assert!(own["key"].is_string(), "{own}");
    assert_eq!(own["key"], seen["key"]);
    assert_eq!(
        refused[0]["attributes"]["bound_key"], own["key"],
        "{refused:?}"
    );
    assert_ne!(refused[0]["attributes"]["key"], own["key"], "{refused:?}");
    // Long enough for the impostor's records to have spread, had they been taken.
    std::thread::sleep(Duration::from_secs(2));
    assert_still_itself(&c, 2);
    let r = probe.finish();
    eprintln!("while an impostor ran: {r}");
    r.assert_available("the routing mesh", MAX_GAP);
    // Still Ready, still serving from both nodes.
    let nodes: Value = c.host(1).meshctl_json(&["node", "ls"]).unwrap();
    let ready = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["status"] == "Ready")
        .count();
    assert_eq!(ready, 2, "{nodes}");
    drop(impostor);
}

/// A sealed datagram from the attacker's host to `to`, as a member with the cluster key
/// sends it.
fn send_as_member(c: &Cluster, to: SocketAddr, plaintext: Vec<u8>) {
    let keys = keyring::read_material(c.host(1).cluster_key()).unwrap();
    let ring = Keyring::new(vec![ClusterKey::new(&keys[0])]).unwrap();
    let auth = Arc::new(GossipAuth::new(ring, Path::new("stolen"), "mesh"));
    c.external_ns(ATTACKER)
        .unwrap()
        .run(move || {
            let ring = auth.keyring();
            let mut nonce = [0u8; NONCE_LEN];
            getrandom(&mut nonce);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            let mut d = Vec::new();
            seal(
                &ring,
                ring.primary().id,
                "mesh",
                now,
                nonce,
                &plaintext,
                &mut d,
            )
            .unwrap();
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.send_to(&d, to).unwrap();
        })
        .unwrap();
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(buf)
        .unwrap();
}

/// Writes `kv` as node `name`'s run `generation` (a newer run than the real one, so it
/// would speak for the name) straight into `to`'s gossip state.
fn inject(c: &Cluster, to: SocketAddr, name: &str, generation: u64, kv: &[(String, String)]) {
    let gossip_addr: SocketAddr = format!("{ATTACKER_IP}:7946").parse().unwrap();
    send_as_member(
        c,
        to,
        craft::syn_naming_at(
            "mesh",
            [name.to_owned()].into_iter(),
            generation,
            gossip_addr,
        ),
    );
    std::thread::sleep(Duration::from_millis(100));
    let mut ops = Vec::new();
    craft::node_op(&mut ops, name, generation, gossip_addr, 0);
    for (i, (k, v)) in kv.iter().enumerate() {
        craft::kv_op(&mut ops, k, v, 1 + i as u64);
    }
    send_as_member(c, to, craft::ack(&ops));
}

#[test]
fn a_member_cannot_publish_records_for_another_node() {
    let c = serving_cluster();
    let victim = c.host(2).node_name().to_owned();
    let target: SocketAddr = format!("{}:7946", c.host(1).ip).parse().unwrap();
    let addr: SocketAddr = format!("{}:8080", c.host(1).ip).parse().unwrap();
    let probe = Probe::start(c.external_ns("client").unwrap(), addr).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (invalid_before, refused_before) = origins(c.host(1));

    // host2's node record as the attacker wants it: its VXLAN endpoint moved to host3.
    let nodes: Value = c.host(1).meshctl_json(&["node", "ls"]).unwrap();
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == victim)
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let hijacked = |key: Option<String>| {
        let mut r = serde_json::json!({
            "name": victim, "hostname": victim, "address": ATTACKER_IP,
            "mtu": 1500, "agent_version": "evil",
        });
        if let Some(k) = key {
            r["key"] = k.into();
        }
        r.to_string()
    };

    // 1. Unsigned, as an agent without identities would write it.
    let generation = now + 60_000;
    inject(
        &c,
        target,
        &victim,
        generation,
        &[
            ("node".into(), hijacked(None)),
            ("obj:noderm:".to_owned() + &victim, "{}".into()),
        ],
    );
    // 2. Signed by the attacker's own key, naming that key (a claim on the name).
    let mallory = NodeIdentity::generate().unwrap();
    let generation2 = now + 120_000;
    let record = hijacked(Some(mallory.public().to_string()));
    inject(
        &c,
        target,
        &victim,
        generation2,
        &[(
            "node".into(),
            signed::seal(&mallory, &victim, generation2, "node", 1, &record),
        )],
    );
    // 3. Naming a key it is not signed by.
    let generation3 = now + 180_000;
    inject(
        &c,
        target,
        &victim,
        generation3,
        &[(
            "node".into(),
            signed::seal(
                &mallory,
                &victim,
                generation3,
                "node",
                1,
                &hijacked(Some(
                    // Any key but the attacker's: the record is not signed by it.
                    NodeIdentity::generate().unwrap().public().to_string(),
                )),
            ),
        )],
    );

    c.eventually(Duration::from_secs(10), "host1 counts every forgery", |c| {
        let (invalid, refused) = origins(c.host(1));
        Ok((invalid >= invalid_before + 2 && refused > refused_before).then_some(()))
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_still_itself(&c, 2);
    let r = probe.finish();
    eprintln!("while records were forged: {r}");
    r.assert_available("the routing mesh", MAX_GAP);
    // host2 was not removed: it is Ready and still runs its task.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let ps: Value = c.host(2).meshctl_json(&["ps"]).unwrap();
        assert!(
            ps.as_array().unwrap().iter().any(|t| t["name"] == "web-2"),
            "{ps}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A cluster with roles: host1 is an admin (it holds the admin key), host2 a worker (the
/// public half only). The key files live in each host's state dir, which goes with it.
fn cluster_with_roles() -> Cluster {
    let admin = AdminKey::generate().unwrap();
    serving_cluster_with(move |h| {
        let dir = h.state_dir().join("admin");
        let key = if h.index == 1 {
            AdminKey::from_secret(NodeIdentity::from_seed(&admin.secret().unwrap().seed()))
        } else {
            AdminKey::public_only(admin.public)
        };
        key.save(&dir).unwrap();
        vec!["--admin-key-dir".into(), dir.display().to_string()]
    })
}

fn roles_stats(h: &Host) -> (u64, u64) {
    let v: Value = h.meshctl_json(&["gossip", "stats"]).unwrap();
    (
        v["origins"]["worker_objects"].as_u64().unwrap(),
        v["origins"]["forged_grants"].as_u64().unwrap(),
    )
}

/// A member holding the cluster key and a node key of its own — what a compromised worker
/// holds — writes, under its own properly signed name, the objects only admins write: a
/// removal of host2, a service, a network; and a grant making itself an admin, signed with
/// its own key; and host1's own admin grant pasted into its record. Each is dropped and
/// counted everywhere (the pasted grant names host1's key, so it makes nobody else an admin), host2 keeps serving with 0 failed requests, and the forger stays
/// a worker.
#[test]
fn a_worker_cannot_write_the_clusters_objects_or_make_itself_an_admin() {
    let c = cluster_with_roles();
    let victim = c.host(2).node_name().to_owned();
    let target: SocketAddr = format!("{}:7946", c.host(1).ip).parse().unwrap();
    let addr: SocketAddr = format!("{}:8080", c.host(1).ip).parse().unwrap();
    let probe = Probe::start(c.external_ns("client").unwrap(), addr).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let roles =
        |h: &Host| -> Vec<(String, String)> { h.node_roles().unwrap().into_iter().collect() };
    assert_eq!(
        roles(c.host(2)),
        [
            (c.host(1).node_name().to_owned(), "admin".to_owned()),
            (victim.clone(), "worker".to_owned())
        ]
    );

    let mallory = NodeIdentity::generate().unwrap();
    let name = "mallory";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let stamp = serde_json::json!({"ms": now, "node": name});
    let record = serde_json::json!({
        "name": name, "hostname": name, "address": ATTACKER_IP, "mtu": 1500,
        "agent_version": "evil", "key": mallory.public().to_string(),
    })
    .to_string();
    let removal = serde_json::json!({
        "spec": {"node": victim, "generation": u64::MAX},
        "created": stamp, "updated": stamp,
    })
    .to_string();
    let network = serde_json::json!({
        "spec": {"name": "evil", "subnet": "10.66.0.0/24", "gateway": "10.66.0.1", "vni": 9999},
        "created": stamp, "updated": stamp,
    })
    .to_string();
    let self_made = Grant::sign(&mallory, name, mallory.public(), Role::Admin, now);
    // host1's own admin grant, as host1's state dir keeps it and its record carries it,
    // pasted into the forger's record and republished as is.
    let grants: Value =
        serde_json::from_slice(&std::fs::read(c.host(1).state_dir().join("roles.json")).unwrap())
            .unwrap();
    let pasted = grants[c.host(1).node_name()].clone();
    assert_eq!(pasted["role"], "admin", "{grants}");
    let mut record: Value = serde_json::from_str(&record).unwrap();
    record["grant"] = pasted.clone();
    let record = record.to_string();
    let kv: Vec<(String, String)> = [
        ("node".to_owned(), record),
        (format!("obj:noderm:{victim}"), removal),
        ("obj:net:evil".to_owned(), network),
        (
            format!("role:{name}"),
            serde_json::to_string(&self_made).unwrap(),
        ),
        ("role:x".to_owned(), pasted.to_string()),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (k, v))| {
        // `inject` writes the i-th key at version i + 1.
        let sealed = signed::seal(&mallory, name, now, &k, i as u64 + 1, &v);
        (k, sealed)
    })
    .collect();
    inject(&c, target, name, now, &kv);

    c.eventually(
        Duration::from_secs(10),
        "host1 and host2 drop the worker's objects and its grants",
        |c| {
            Ok([1, 2]
                .iter()
                .all(|i| {
                    let (objects, forged) = roles_stats(c.host(*i));
                    objects >= 2 && forged >= 1
                })
                .then_some(()))
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    for i in [1, 2] {
        let h = c.host(i);
        assert!(
            roles(h).contains(&(name.to_owned(), "worker".to_owned())),
            "host{i}: {:?}",
            roles(h)
        );
        let out = h.meshctl(&["network", "inspect", "evil"]).unwrap();
        assert!(!out.status.success(), "host{i} took the worker's network");
    }
    let r = probe.finish();
    eprintln!("while a worker forged objects: {r}");
    r.assert_available("the routing mesh", MAX_GAP);
    // host2 was not removed: Ready, still running its task.
    let ps: Value = c.host(2).meshctl_json(&["ps"]).unwrap();
    assert!(
        ps.as_array().unwrap().iter().any(|t| t["name"] == "web-2"),
        "{ps}"
    );
    assert!(roles(c.host(1)).contains(&(victim, "worker".to_owned())));
}

/// `inject`, as `name`'s run `generation` at gossip address `addr` and from `version` on:
/// what replaying that node's own records looks like.
fn inject_as(
    c: &Cluster,
    to: SocketAddr,
    (name, generation, addr): (&str, u64, SocketAddr),
    version: u64,
    kv: &[(String, String)],
) {
    send_as_member(
        c,
        to,
        craft::syn_naming_at("mesh", [name.to_owned()].into_iter(), generation, addr),
    );
    std::thread::sleep(Duration::from_millis(100));
    let mut ops = Vec::new();
    craft::node_op(&mut ops, name, generation, addr, 0);
    for (i, (k, v)) in kv.iter().enumerate() {
        craft::kv_op(&mut ops, k, v, version + i as u64);
    }
    send_as_member(c, to, craft::ack(&ops));
}

/// The admin's record of `web` as its state dir keeps it (the value, unwrapped from its
/// signature): what every member also sees on the wire.
fn admin_record_of_web(h: &Host) -> String {
    let kv: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&std::fs::read(h.state_dir().join("gossip-keys.json")).unwrap())
            .unwrap();
    let v = &kv["obj:svc:web"];
    signed::unchecked(v).unwrap_or(v).to_owned()
}

fn web_labels(h: &Host) -> Value {
    let s: Value = h.meshctl_json(&["service", "inspect", "web"]).unwrap();
    s["spec"]["labels"].clone()
}

/// A worker replays an admin's old record of a service (its spec before the admin's last
/// update): as its own object, as is and stamped anew; and as the admin's own signed record,
/// under the admin's name and run, at a newer gossip version. Nothing changes on any node,
/// the worker's copies are counted, and the cluster serves throughout with 0 failed requests.
#[test]
fn a_worker_replaying_an_admins_old_record_changes_nothing() {
    let c = cluster_with_roles();
    let admin = c.host(1).node_name().to_owned();
    c.host(1)
        .meshctl_ok(&["service", "update", "--label-add", "v=1", "web"])
        .unwrap();
    c.eventually(Duration::from_secs(10), "the admin keeps web v=1", |c| {
        Ok(admin_record_of_web(c.host(1))
            .contains("\"v\":\"1\"")
            .then_some(()))
    })
    .unwrap();
    let old = admin_record_of_web(c.host(1));
    c.host(1)
        .meshctl_ok(&["service", "update", "--label-add", "v=2", "web"])
        .unwrap();
    c.eventually(Duration::from_secs(10), "every node sees web v=2", |c| {
        Ok([1, 2]
            .iter()
            .all(|i| web_labels(c.host(*i))["v"] == "2")
            .then_some(()))
    })
    .unwrap();
    let before: Vec<(u64, u64)> = [1, 2].iter().map(|i| roles_stats(c.host(*i))).collect();

    let addr: SocketAddr = format!("{}:8080", c.host(2).ip).parse().unwrap();
    let probe = Probe::start(c.external_ns("client").unwrap(), addr).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // 1. From the worker's own keyspace: the old record as is, then stamped anew.
    let mallory = NodeIdentity::generate().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut restamped: Value = serde_json::from_str(&old).unwrap();
    restamped["updated"] = serde_json::json!({"ms": now + 60_000, "node": admin});
    let restamped = restamped.to_string();
    let record = serde_json::json!({
        "name": "mallory", "hostname": "mallory", "address": ATTACKER_IP, "mtu": 1500,
        "agent_version": "evil", "key": mallory.public().to_string(),
    })
    .to_string();
    for (i, value) in [&old, &restamped].into_iter().enumerate() {
        let generation = now + i as u64;
        let kv: Vec<(String, String)> = [
            ("node".to_owned(), record.clone()),
            ("obj:svc:web".to_owned(), value.clone()),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (k, v))| {
            let sealed = signed::seal(&mallory, "mallory", generation, &k, i as u64 + 1, &v);
            (k, sealed)
        })
        .collect();
        for h in [1, 2] {
            let to: SocketAddr = format!("{}:7946", c.host(h).ip).parse().unwrap();
            inject(&c, to, "mallory", generation, &kv);
        }
    }

    // 2. The admin's own signed record of the old spec (Ed25519 signs deterministically:
    // these are the bytes the admin sent, at a version it used in this run), under its name
    // and this run, at a gossip version past any it has used.
    let state = c.host(1).state_dir();
    let identity = NodeIdentity::load(&mesh_agent::identity::key_file(&state)).unwrap();
    let generation: u64 = std::fs::read_to_string(state.join("generation"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let envelope = signed::seal(&identity, &admin, generation, "obj:svc:web", 2, &old);
    let admin_gossip: SocketAddr = format!("{}:7946", c.host(1).ip).parse().unwrap();
    let target: SocketAddr = format!("{}:7946", c.host(2).ip).parse().unwrap();
    inject_as(
        &c,
        target,
        (&admin, generation, admin_gossip),
        1 << 40,
        &[("obj:svc:web".to_owned(), envelope)],
    );

    c.eventually(
        Duration::from_secs(10),
        "both nodes drop the worker's copies",
        |c| {
            Ok([1, 2]
                .iter()
                .zip(&before)
                .all(|(i, b)| roles_stats(c.host(*i)).0 >= b.0 + 2)
                .then_some(()))
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    for i in [1, 2] {
        let labels = web_labels(c.host(i));
        assert_eq!(labels["v"], "2", "host{i}: {labels}");
    }
    let r = probe.finish();
    eprintln!("while a worker replayed an admin's old record: {r}");
    r.assert_available("the routing mesh", MAX_GAP);
    // host2 refused the admin's record at a version the admin never signed it at before
    // chitchat saw it (so never relayed it back to the admin, which would refuse it as a
    // datagram about its own run).
    let refused: Value = c.host(2).meshctl_json(&["gossip", "stats"]).unwrap();
    assert!(
        refused["auth"]["dropped"]["invalid"].as_u64().unwrap() > 0,
        "{refused}"
    );
}

/// A member that sends a delta for another node's run at a version far past the real one
/// would make the receiver ignore that node's later writes (chitchat takes versions at their
/// word) until the node restarts: the version is signed with each record, so the transport
/// refuses the delta before chitchat sees it, counts it, and the admin's next update arrives.
#[test]
fn a_forged_gossip_version_does_not_deafen_a_node_to_the_admin() {
    let c = cluster_with_roles();
    let admin = c.host(1).node_name().to_owned();
    let state = c.host(1).state_dir();
    let generation: u64 = std::fs::read_to_string(state.join("generation"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let admin_gossip: SocketAddr = format!("{}:7946", c.host(1).ip).parse().unwrap();
    let target: SocketAddr = format!("{}:7946", c.host(2).ip).parse().unwrap();
    let invalid = |h: &Host| -> u64 {
        let v: Value = h.meshctl_json(&["gossip", "stats"]).unwrap();
        v["auth"]["dropped"]["invalid"].as_u64().unwrap()
    };
    let before = invalid(c.host(2));
    inject_as(
        &c,
        target,
        (&admin, generation, admin_gossip),
        1 << 40,
        &[("junk".to_owned(), "junk".to_owned())],
    );
    // The same through chitchat's other carriers of a version: a max version, and a reset
    // to a GC version.
    let mut ops = Vec::new();
    craft::node_op(&mut ops, &admin, generation, admin_gossip, 1);
    craft::max_version_op(&mut ops, 1 << 40);
    send_as_member(&c, target, craft::ack(&ops));
    let mut ops = Vec::new();
    craft::node_op_gc(&mut ops, &admin, generation, admin_gossip, 1 << 40, 0);
    send_as_member(&c, target, craft::ack(&ops));
    c.eventually(Duration::from_secs(10), "host2 refuses all three", |c| {
        Ok((invalid(c.host(2)) >= before + 3).then_some(()))
    })
    .unwrap();
    c.host(1)
        .meshctl_ok(&["service", "update", "--label-add", "v=3", "web"])
        .unwrap();
    c.eventually(Duration::from_secs(10), "host2 sees web v=3", |c| {
        Ok((web_labels(c.host(2))["v"] == "3").then_some(()))
    })
    .unwrap();
}

/// Honest gossip is never refused as forged: a cluster with roles goes through what signed
/// versions must survive — replicated objects updated and removed (signed tombstones), a
/// config large enough to cross as chunks created and removed, a worker's agent killed and
/// restarted (a new run that republishes its keys) — and no node drops a datagram as invalid
/// nor a record for its origin, while every change arrives everywhere.
#[test]
fn honest_gossip_is_never_refused_as_forged() {
    let mut c = cluster_with_roles();
    let big = c.log_dir().join("big.conf");
    // Larger than a chunk (16 KB): its value crosses as chunk keys and a manifest.
    std::fs::write(&big, "x".repeat(100_000)).unwrap();
    let h1 = c.host(1);
    h1.meshctl_ok(&["config", "create", "big", big.to_str().unwrap()])
        .unwrap();
    for v in ["1", "2"] {
        h1.meshctl_ok(&["service", "update", "--label-add", &format!("v={v}"), "web"])
            .unwrap();
    }
    c.eventually(Duration::from_secs(10), "host2 sees web v=2 and big", |c| {
        let configs: Value = c.host(2).meshctl_json(&["config", "ls"])?;
        let has_big = configs.to_string().contains("\"big\"");
        Ok((web_labels(c.host(2))["v"] == "2" && has_big).then_some(()))
    })
    .unwrap();
    c.host(1).meshctl_ok(&["config", "rm", "big"]).unwrap();
    c.host(1)
        .meshctl_ok(&["service", "update", "--label-rm", "v", "web"])
        .unwrap();
    c.host_mut(2).kill_agent().unwrap();
    c.host_mut(2).restart_agent().unwrap();
    c.host(1)
        .meshctl_ok(&["service", "update", "--label-add", "after=restart", "web"])
        .unwrap();
    c.eventually(Duration::from_secs(20), "host2 sees every change", |c| {
        let configs: Value = c.host(2).meshctl_json(&["config", "ls"])?;
        let no_big = !configs.to_string().contains("\"big\"");
        let labels = web_labels(c.host(2));
        Ok((no_big && labels.get("v").is_none() && labels["after"] == "restart").then_some(()))
    })
    .unwrap();
    for i in [1, 2] {
        let v: Value = c.host(i).meshctl_json(&["gossip", "stats"]).unwrap();
        assert_eq!(v["auth"]["dropped"]["invalid"], 0, "host{i}: {v}");
        assert_eq!(v["origins"]["invalid_records"], 0, "host{i}: {v}");
    }
}
