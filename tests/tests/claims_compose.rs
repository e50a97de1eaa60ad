//! The README's compose errors, end to end ("Secrets, configs and stacks"): unknown keys,
//! a key mesh cannot honour (volumes), a second network, an undefined network or secret, a
//! port published twice and an unset `${VAR:?message}` are refused by `meshctl stack
//! deploy` with an error naming the key path, and "the whole file is checked before
//! anything is created": every bad file also defines a network, a secret, a config and a
//! good service, and no node lists any of them afterwards. The same file without its fault
//! then deploys, so the objects the bad ones would have made are real.

use std::{collections::BTreeSet, time::Duration};

use mesh_tests::{Cluster, Host, cluster::bin};
use serde_json::Value;

const STACK: &str = "claims";

/// A sealed cluster (secrets need a cluster key: the harness's) of `n` hosts.
fn sealed_cluster(n: usize) -> Cluster {
    let mut c = Cluster::new(n).unwrap();
    c.start_agents().unwrap();
    c
}

/// A compose file with a network, a secret, a config and a good service `ok` publishing
/// 8080, then service `bad` with `fault` (lines indented under it) added.
fn file(c: &Cluster, fault: &str) -> String {
    let w = bin("mesh-whoami");
    let dir = c.log_dir();
    std::fs::write(dir.join("pw.txt"), "s3cret").unwrap();
    std::fs::write(dir.join("conf.txt"), "listen 80").unwrap();
    let text = format!(
        "services:
  ok:
    command: [\"{w}\"]
    networks: [front]
    ports: [\"8080:80\"]
    secrets: [pw]
    configs: [conf]
  bad:
    command: [\"{w}\", \"--name\", \"bad\"]
{fault}
networks:
  front:
    driver: overlay
    ipam:
      config:
        - subnet: 10.77.0.0/24
  back:
    driver: overlay
secrets:
  pw:
    file: ./pw.txt
configs:
  conf:
    file: ./conf.txt
",
        w = w.display()
    );
    let path = dir.join("docker-compose.yml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// What `ls` lists of each kind on `h`, by name.
fn objects(h: &Host) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for kind in ["service", "network", "secret", "config"] {
        let ls: Vec<Value> = h.meshctl_json(&[kind, "ls"]).unwrap();
        for o in ls {
            out.insert(format!("{kind} {}", o["name"].as_str().unwrap()));
        }
    }
    out
}

#[test]
fn bad_compose_files_name_the_key_and_create_nothing() {
    let c = sealed_cluster(2);
    let before: Vec<BTreeSet<String>> = c.hosts().iter().map(objects).collect();
    let cases = [
        (
            "unknown key",
            "    colour: red",
            "services.bad: unknown key \"colour\"",
        ),
        (
            "unknown deploy key",
            "    deploy:\n      replicas: 1\n      colour: red",
            "services.bad.deploy: unknown key \"colour\"",
        ),
        (
            "undefined volume",
            "    volumes: [\"data:/data\"]",
            "services.bad.volumes[0]: undefined volume \"data\"",
        ),
        (
            "a fixed address on a network",
            "    networks: { front: { ipv4_address: 10.0.0.9 } }",
            "services.bad.networks.front.ipv4_address: mesh cannot honour it",
        ),
        (
            "undefined network",
            "    networks: [nope]",
            "services.bad.networks: network nope is not defined under the top-level networks",
        ),
        (
            "undefined secret",
            "    secrets: [nope]",
            "services.bad.secrets[0]: secret nope is not defined under the top-level secrets",
        ),
        (
            "port published twice",
            "    ports: [\"8080:81\"]",
            "services.bad.ports[0]: port 8080/tcp is published twice (also by services.ok)",
        ),
        (
            "unset ${VAR:?}",
            "    environment: [\"TOKEN=${CLAIMS_UNSET_TOKEN:?set the token}\"]",
            "required variable CLAIMS_UNSET_TOKEN is missing a value: set the token",
        ),
    ];
    for (what, fault, says) in cases {
        let path = file(&c, fault);
        let out = c
            .host(1)
            .meshctl(&["stack", "deploy", "-c", &path, STACK])
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: deployed");
        assert!(err.contains(says), "{what}: the error names the key: {err}");
        if what.starts_with("unset") {
            assert!(
                err.contains("services.bad.environment"),
                "{what}: the error names the key: {err}"
            );
        }
    }
    // Give anything a refused deploy might have written a few gossip rounds to show.
    std::thread::sleep(Duration::from_secs(1));
    for (h, before) in c.hosts().iter().zip(&before) {
        assert_eq!(&objects(h), before, "host{}: nothing created", h.index);
    }
    let stacks = c.host(1).meshctl_ok(&["stack", "ls"]).unwrap();
    assert!(!stacks.contains(STACK), "{stacks}");

    // The same file without a fault deploys all of it, seen from the other node.
    let path = file(&c, "    environment: [\"TOKEN=x\"]");
    c.host(1)
        .meshctl_ok(&["stack", "deploy", "-c", &path, STACK])
        .unwrap();
    let want: BTreeSet<String> = [
        "service claims_ok",
        "service claims_bad",
        "network claims_front",
        "secret claims_pw",
        "config claims_conf",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    c.eventually(Duration::from_secs(15), "the stack on host2", |c| {
        let now = objects(c.host(2));
        let added: BTreeSet<String> = now.difference(&before[1]).cloned().collect();
        // An unused network (`back`) may or may not be created; the rest must be.
        Ok(want.is_subset(&added).then_some(()))
    })
    .unwrap();
}
