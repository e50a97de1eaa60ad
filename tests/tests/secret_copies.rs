//! Secrets reach only the nodes that run a task granted them (issue 30), in a cluster made
//! by `mesh-agent init` and `join`: host1 an admin, host2 and host3 workers. A service whose
//! secret is constrained to host2 reads it there; host3 — holding the cluster key, its node
//! key and every object gossip carries — opens none of the secret's sealed forms with any
//! key it has, and a task started by hand on it into the service is refused, saying why.
//! Placed on host3, the task gets host3's own copy and reads the secret; the copies go once
//! no node runs a task of the service.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_agent::{
    cluster::Sealed,
    gossip::{
        keyring::{self, ClusterKey, Keyring},
        sealed, signed,
    },
    identity::{self, NodeIdentity},
};
use mesh_tests::{
    Cluster, Host,
    cluster::bin,
    membership::{init, join, wait_ready},
    workload::http_get,
};
use serde_json::Value;

const PASSWORD: &str = "only-for-the-granted-node";
const SECRET: &str = "db_password";

/// FNV-1a 64 in hex, as `mesh-whoami --hash` answers.
fn fnv(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h = (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}\n")
}

fn roles(h: &Host) -> BTreeMap<String, String> {
    h.node_roles().unwrap_or_default()
}

/// The nodes whose task of `service` is Running, as host `h` sees them.
fn running_on(h: &Host, service: &str) -> Vec<String> {
    let rows: Value = h.meshctl_json(&["service", "ps", service]).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .filter(|r| r["history"] == false && r["state"] == "Running")
        .map(|r| r["node"].as_str().unwrap().to_owned())
        .collect()
}

/// Every value of the node's own gossip keys as its state dir keeps them, unwrapped from
/// their signatures: every replicated object, since every node republishes them.
fn gossip_state(h: &Host) -> BTreeMap<String, String> {
    let path = h.state_dir().join("gossip-keys.json");
    let kv: BTreeMap<String, String> =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    kv.into_iter()
        .map(|(k, v)| {
            let v = signed::unchecked(&v).unwrap_or(&v).to_owned();
            (k, v)
        })
        .collect()
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Every key the worker's files give: each cluster key it has (a keyring per key, and all
/// together), and every Ed25519 key pair among its files (its node key; an admin key, were
/// there one).
fn keys_of(h: &Host) -> (Vec<Keyring>, Vec<NodeIdentity>) {
    let mut files = Vec::new();
    files_under(&h.config_dir(), &mut files);
    files_under(&h.state_dir(), &mut files);
    let mut rings = Vec::new();
    let mut identities = Vec::new();
    for f in &files {
        if let Ok(material) = keyring::read_material(f) {
            for m in &material {
                rings.push(Keyring::new(vec![ClusterKey::new(m)]).unwrap());
            }
        }
        if let Ok(id) = NodeIdentity::load(f) {
            identities.push(id);
        }
    }
    (rings, identities)
}

/// Tries every key `h` holds on every sealed form of the secret in its state: each must fail.
/// Returns how many forms were tried.
fn nothing_opens(h: &Host, cluster: &str, nodes: &[String]) -> usize {
    let (rings, identities) = keys_of(h);
    assert!(!rings.is_empty(), "{} holds a cluster key", h.node_name());
    assert!(
        identities.iter().any(|i| i.public()
            == NodeIdentity::load(&identity::key_file(&h.state_dir()))
                .unwrap()
                .public()),
        "its node key was found"
    );
    assert!(
        !h.config_dir().join("admin.key").exists() && !h.state_dir().join("admin.key").exists(),
        "a worker holds no admin key"
    );
    let state = gossip_state(h);
    let mut tried = 0;
    for (k, v) in &state {
        let Ok(record) = serde_json::from_str::<Value>(v) else {
            continue;
        };
        let spec = &record["spec"];
        if k.starts_with("obj:secret:") {
            let name = spec["name"].as_str().unwrap();
            if let Ok(cluster_form) = serde_json::from_value::<Sealed>(spec["sealed"].clone()) {
                for ring in &rings {
                    assert!(sealed::open(ring, cluster, name, &cluster_form).is_err());
                    tried += 1;
                }
            }
            if let Some(to_admins) = spec["admins"].as_str() {
                for id in &identities {
                    assert!(sealed::open_for_admins(id, cluster, name, to_admins).is_err());
                    tried += 1;
                }
            }
        } else if k.starts_with("obj:secretcopy:") {
            let Some(data) = spec["data"].as_str() else {
                continue;
            };
            let secret = spec["secret"].as_str().unwrap();
            // Under every node's name: a copy renamed to this node opens no better.
            for node in nodes {
                for id in &identities {
                    assert!(
                        sealed::open_copy(id, cluster, secret, node, data).is_none(),
                        "{k} opened as {node}"
                    );
                    tried += 1;
                }
            }
        }
    }
    // Nor is the plaintext anywhere in its files.
    let mut files = Vec::new();
    files_under(&h.config_dir(), &mut files);
    files_under(&h.state_dir(), &mut files);
    for f in files {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(
            !bytes
                .windows(PASSWORD.len())
                .any(|w| w == PASSWORD.as_bytes()),
            "{} holds the secret in the clear",
            f.display()
        );
    }
    tried
}

fn get(c: &Cluster, addr: SocketAddr) -> anyhow::Result<String> {
    c.external_ns("client")
        .unwrap()
        .run(move || http_get(addr))?
}

#[test]
fn a_secret_reaches_only_the_workers_that_run_its_tasks() {
    let mut c = Cluster::new(3).unwrap();
    let worker_command = init(&mut c, 1);
    join(&mut c, 2, &worker_command, &[]);
    join(&mut c, 3, &worker_command, &[]);
    wait_ready(&c, &[1, 2, 3], &[1, 2, 3], Duration::from_secs(15));
    let (h1, h2, h3) = (
        c.host(1).node_name().to_owned(),
        c.host(2).node_name().to_owned(),
        c.host(3).node_name().to_owned(),
    );
    c.eventually(Duration::from_secs(10), "roles settle", |c| {
        let r = roles(c.host(3));
        Ok((r.get(&h1).map(String::as_str) == Some("admin")
            && r.get(&h2).map(String::as_str) == Some("worker")
            && r.get(&h3).map(String::as_str) == Some("worker"))
        .then_some(()))
    })
    .unwrap();
    c.external("client", 100).unwrap();
    let cluster: String = {
        let g: Value = c.host(1).meshctl_json(&["gossip", "stats"]).unwrap();
        g["cluster"].as_str().unwrap().to_owned()
    };

    let out = c
        .host(1)
        .meshctl_stdin(&["secret", "create", SECRET, "-"], PASSWORD.as_bytes())
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Sealed to the admin key: no cluster key id to show.
    let inspect: Value = c
        .host(1)
        .meshctl_json(&["secret", "inspect", SECRET])
        .unwrap();
    let inspect = if inspect.is_array() {
        inspect[0].clone()
    } else {
        inspect
    };
    assert!(inspect["key"].is_null(), "{inspect}");

    c.host(1)
        .meshctl_ok(&["network", "create", "app", "--subnet", "10.20.0.0/24"])
        .unwrap();
    c.host(1)
        .meshctl_ok(&["node", "update", "--label-add", "db=yes", &h2])
        .unwrap();
    let whoami = bin("mesh-whoami");
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "--name",
            "db",
            "--network",
            "app",
            "--replicas",
            "1",
            "-p",
            "8080:80",
            "--constraint",
            "node.labels.db==yes",
            "--user",
            "1000",
            "--secret",
            &format!("source={SECRET},uid=1000,gid=1000,mode=0400"),
            "--process",
            "--",
            whoami.to_str().unwrap(),
            "--hash",
            &format!("/run/secrets/{SECRET}"),
        ])
        .unwrap();
    c.eventually(Duration::from_secs(30), "db runs on host2", |c| {
        Ok((running_on(c.host(1), "db") == [h2.clone()]).then_some(()))
    })
    .unwrap();
    let addr: SocketAddr = format!("{}:8080", c.host(3).ip).parse().unwrap();
    assert_eq!(get(&c, addr).unwrap(), fnv(PASSWORD.as_bytes()));

    // host3 holds every object gossip carries, host2's copy included, and opens none.
    c.eventually(Duration::from_secs(10), "host3 keeps host2's copy", |c| {
        let state = gossip_state(c.host(3));
        Ok((state.contains_key(&format!("obj:secret:{SECRET}"))
            && state.contains_key(&format!("obj:secretcopy:{SECRET}@{h2}")))
        .then_some(()))
    })
    .unwrap();
    let names = vec![h1.clone(), h2.clone(), h3.clone()];
    let tried = nothing_opens(c.host(3), &cluster, &names);
    eprintln!("host3 tried {tried} key/form pairs; none opened");
    assert!(tried >= 2 * names.len(), "{tried}");

    // A task started by hand into the service on host3 is refused, saying why.
    let out = c
        .host(3)
        .meshctl(&[
            "run",
            "--network",
            "app",
            "--service",
            "db",
            "--name",
            "grab",
            "--",
            whoami.to_str().unwrap(),
            "--hash",
            &format!("/run/secrets/{SECRET}"),
        ])
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains(SECRET) && e.contains("has no copy") && e.contains("service scale"),
        "{e}"
    );

    // Placed on host3 too: host3 gets its copy and reads the secret.
    c.host(1)
        .meshctl_ok(&["node", "update", "--label-add", "db=yes", &h3])
        .unwrap();
    c.host(1).meshctl_ok(&["service", "scale", "db=2"]).unwrap();
    c.eventually(Duration::from_secs(30), "db runs on host2 and host3", |c| {
        let mut on = running_on(c.host(1), "db");
        on.sort();
        let mut want = vec![h2.clone(), h3.clone()];
        want.sort();
        Ok((on == want).then_some(()))
    })
    .unwrap();
    for _ in 0..10 {
        assert_eq!(get(&c, addr).unwrap(), fnv(PASSWORD.as_bytes()));
    }
    // Once no node runs a task of db, every copy is removed.
    c.host(1).meshctl_ok(&["service", "rm", "db"]).unwrap();
    c.eventually(Duration::from_secs(30), "the copies are removed", |c| {
        let state = gossip_state(c.host(1));
        let removed = |node: &str| {
            state
                .get(&format!("obj:secretcopy:{SECRET}@{node}"))
                .and_then(|v| serde_json::from_str::<Value>(v).ok())
                .is_some_and(|c| !c["deleted"].is_null())
        };
        Ok((removed(&h2) && removed(&h3)).then_some(()))
    })
    .unwrap();
    // The copies' stats: nothing refused anywhere.
    for h in c.hosts() {
        let g: Value = h.meshctl_json(&["gossip", "stats"]).unwrap();
        assert_eq!(g["origins"]["secret_copies_refused"], 0, "{g}");
    }
}

/// A cluster made before roles gets them: a secret sealed under the cluster key (which every
/// member opens) is resealed to the admin key by the admin once the agents restart with an
/// admin key; the worker's task gets a copy of its own and, replaced, still reads the secret.
#[test]
fn a_secret_from_before_roles_is_resealed_to_the_admins_and_keeps_serving() {
    let mut c = Cluster::new(2).unwrap();
    // Sealed by the harness's cluster key, without roles (no admin key yet).
    c.start_agents().unwrap();
    let key = c.host(1).cluster_key().to_str().unwrap().to_owned();
    c.external("client", 100).unwrap();
    let (h1, h2) = (
        c.host(1).node_name().to_owned(),
        c.host(2).node_name().to_owned(),
    );
    let out = c
        .host(1)
        .meshctl_stdin(&["secret", "create", SECRET, "-"], PASSWORD.as_bytes())
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    c.host(1)
        .meshctl_ok(&["network", "create", "app", "--subnet", "10.21.0.0/24"])
        .unwrap();
    c.host(1)
        .meshctl_ok(&["node", "update", "--label-add", "db=yes", &h2])
        .unwrap();
    let whoami = bin("mesh-whoami");
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "--name",
            "db",
            "--network",
            "app",
            "-p",
            "8080:80",
            "--constraint",
            "node.labels.db==yes",
            "--secret",
            SECRET,
            "--process",
            "--",
            whoami.to_str().unwrap(),
            "--hash",
            &format!("/run/secrets/{SECRET}"),
        ])
        .unwrap();
    c.eventually(Duration::from_secs(30), "db runs on host2", |c| {
        Ok((running_on(c.host(1), "db") == [h2.clone()]).then_some(()))
    })
    .unwrap();
    let addr: SocketAddr = format!("{}:8080", c.host(1).ip).parse().unwrap();
    assert_eq!(get(&c, addr).unwrap(), fnv(PASSWORD.as_bytes()));
    let sealed_under_cluster_key = |h: &Host| {
        let state = gossip_state(h);
        let v: Value = serde_json::from_str(&state[&format!("obj:secret:{SECRET}")]).unwrap();
        (
            !v["spec"]["sealed"].is_null(),
            !v["spec"]["admins"].is_null(),
        )
    };
    assert_eq!(sealed_under_cluster_key(c.host(2)), (true, false));

    // Roles arrive: host1 holds the admin key, host2 its public half.
    let admin_dirs = c.give_admin_keys(2).unwrap();
    for (i, dir) in (1..=2).zip(&admin_dirs) {
        c.host_mut(i)
            .start_agent(&["--cluster-key-file", &key, "--admin-key-dir", dir])
            .unwrap();
    }
    c.eventually(Duration::from_secs(20), "roles settle", |c| {
        let r = roles(c.host(2));
        Ok((r.get(&h1).map(String::as_str) == Some("admin")
            && r.get(&h2).map(String::as_str) == Some("worker"))
        .then_some(()))
    })
    .unwrap();
    c.eventually(
        Duration::from_secs(20),
        "the admin reseals the secret and host2 holds its copy",
        |c| {
            let state = gossip_state(c.host(2));
            let copy = state
                .get(&format!("obj:secretcopy:{SECRET}@{h2}"))
                .and_then(|v| serde_json::from_str::<Value>(v).ok());
            Ok((sealed_under_cluster_key(c.host(2)) == (false, true)
                && copy.is_some_and(|c| c["deleted"].is_null()))
            .then_some(()))
        },
    )
    .unwrap();
    // A new task on host2 opens host2's copy: the cluster key opens nothing any more.
    c.host(1)
        .meshctl_ok(&["service", "update", "--force", "db"])
        .unwrap();
    c.eventually(Duration::from_secs(30), "a new db task serves", |c| {
        let rows: Value = c.host(1).meshctl_json(&["service", "ps", "db"])?;
        let replaced = rows
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["history"] == true)
            .count()
            > 0;
        Ok((replaced && running_on(c.host(1), "db") == [h2.clone()]).then_some(()))
    })
    .unwrap();
    assert_eq!(get(&c, addr).unwrap(), fnv(PASSWORD.as_bytes()));
}

/// In a cluster with roles a key rotation travels sealed to each node's key, not under the
/// old cluster key: the rotation record carries no key any state file or old-key holder could
/// read, each node opens only its own copy, and every node switches and retires the old key.
#[test]
fn a_rotated_cluster_key_travels_sealed_to_each_node() {
    let mut c = Cluster::new(3).unwrap();
    let worker_command = init(&mut c, 1);
    join(&mut c, 2, &worker_command, &[]);
    join(&mut c, 3, &worker_command, &[]);
    wait_ready(&c, &[1, 2, 3], &[1, 2, 3], Duration::from_secs(15));
    let names: Vec<String> = (1..=3).map(|i| c.host(i).node_name().to_owned()).collect();
    let cluster: String = {
        let g: Value = c.host(1).meshctl_json(&["gossip", "stats"]).unwrap();
        g["cluster"].as_str().unwrap().to_owned()
    };
    let rotated = c.host(1).meshctl(&["join-token", "--rotate"]).unwrap();
    let stderr = String::from_utf8_lossy(&rotated.stderr);
    assert!(rotated.status.success(), "{stderr}");
    assert!(stderr.contains("3/3 nodes use the new key"), "{stderr}");
    let material = keyring::read_material(&c.host(1).config_dir().join("cluster.key")).unwrap();
    assert_eq!(material.len(), 1, "the old key is retired");
    let new_key = keyring::encode(&material[0]).to_string();
    for i in 1..=3 {
        let state = gossip_state(c.host(i));
        let record: Value = serde_json::from_str(&state["obj:clusterkey:primary"]).unwrap();
        assert!(record["spec"]["key"].is_null(), "host{i}: {record}");
        let sealed = record["spec"]["sealed"].as_object().unwrap();
        assert_eq!(
            sealed.keys().cloned().collect::<Vec<_>>(),
            {
                let mut n = names.clone();
                n.sort();
                n
            },
            "host{i}"
        );
        let text = std::fs::read_to_string(c.host(i).state_dir().join("gossip-keys.json")).unwrap();
        assert!(
            !text.contains(&new_key),
            "host{i} keeps the new key in gossip state"
        );
        // Its own copy opens with its node key; another node's does not.
        let me = NodeIdentity::load(&identity::key_file(&c.host(i).state_dir())).unwrap();
        let mine = sealed[&names[i - 1]].as_str().unwrap();
        let opened = sealed::open_cluster_key(&me, &cluster, &names[i - 1], mine).unwrap();
        assert_eq!(*opened, *material[0], "host{i}");
        let other = (i % 3) + 1;
        let theirs = sealed[&names[other - 1]].as_str().unwrap();
        assert!(sealed::open_cluster_key(&me, &cluster, &names[other - 1], theirs).is_none());
        assert!(sealed::open_cluster_key(&me, &cluster, &names[i - 1], theirs).is_none());
    }
    for i in 1..=3 {
        let stats: Value = c.host(i).meshctl_json(&["gossip", "stats"]).unwrap();
        assert_eq!(
            stats["auth"]["keys"].as_array().unwrap().len(),
            1,
            "host{i}"
        );
    }
}
