//! The README's stack lifecycle claims, end to end ("Secrets, configs and stacks"):
//! `stack deploy --prune` removes the stack's services the file no longer has (and a deploy
//! without it keeps them), and `stack rm` removes what carries the stack's label and nothing
//! else — a service named like the stack's but created by hand survives it.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use mesh_tests::{Cluster, Host, cluster::bin};
use serde_json::Value;

/// A compose file with the given services, each a mesh-whoami.
fn compose(c: &Cluster, services: &[&str]) -> PathBuf {
    let w = bin("mesh-whoami");
    let mut text = String::from("services:\n");
    for s in services {
        text.push_str(&format!(
            "  {s}:\n    command: [\"{}\", \"--name\", \"{s}\"]\n",
            w.display()
        ));
    }
    let path = c.log_dir().join("docker-compose.yml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The services `service ls` names on a host.
fn services(h: &Host) -> BTreeSet<String> {
    let ls: Vec<Value> = h.meshctl_json(&["service", "ls"]).unwrap();
    ls.iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until every host lists exactly `want`.
fn listed_everywhere(c: &Cluster, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    c.eventually(
        Duration::from_secs(15),
        &format!("services {want:?}"),
        |c| Ok(c.hosts().iter().all(|h| services(h) == want).then_some(())),
    )
    .unwrap();
}

fn running(h: &Host, name: &str) -> usize {
    let s: Value = h.meshctl_json(&["service", "inspect", name]).unwrap();
    s["running"].as_u64().unwrap() as usize
}

#[test]
fn prune_and_stack_rm_remove_only_the_stacks_own_services() {
    let mut c = Cluster::new(2).unwrap();
    c.start_agents().unwrap();
    let h1 = c.host(1);
    // Outside the stack, one of them with a name in the stack's style.
    let w = bin("mesh-whoami");
    for name in ["shop_extra", "outsider"] {
        h1.meshctl_ok(&["service", "create", name, "-d", "--", w.to_str().unwrap()])
            .unwrap();
    }
    let file = compose(&c, &["api", "web"]);
    let f = file.to_str().unwrap();
    h1.meshctl_ok(&["stack", "deploy", "-c", f, "shop"])
        .unwrap();
    listed_everywhere(&c, &["outsider", "shop_api", "shop_extra", "shop_web"]);
    let stack: Vec<Value> = h1.meshctl_json(&["stack", "services", "shop"]).unwrap();
    let names: BTreeSet<&str> = stack.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["shop_api", "shop_web"]),
        "shop_extra has no stack label: {stack:?}"
    );

    // web leaves the file: a plain redeploy keeps it, --prune removes it.
    compose(&c, &["api"]);
    c.host(2)
        .meshctl_ok(&["stack", "deploy", "-c", f, "shop"])
        .unwrap();
    listed_everywhere(&c, &["outsider", "shop_api", "shop_extra", "shop_web"]);
    c.host(2)
        .meshctl_ok(&["stack", "deploy", "-c", f, "shop", "--prune"])
        .unwrap();
    listed_everywhere(&c, &["outsider", "shop_api", "shop_extra"]);

    // stack rm: the labelled ones go, the others keep running.
    c.host(2).meshctl_ok(&["stack", "rm", "shop"]).unwrap();
    listed_everywhere(&c, &["outsider", "shop_extra"]);
    for name in ["outsider", "shop_extra"] {
        c.eventually(Duration::from_secs(10), &format!("{name} running"), |c| {
            Ok((running(c.host(1), name) == 1).then_some(()))
        })
        .unwrap();
    }
    // The stack's network goes last (once its tasks have left it), and reaches host1 by
    // gossip like every change.
    c.eventually(Duration::from_secs(10), "shop gone from stack ls", |c| {
        let stacks = c.host(1).meshctl_ok(&["stack", "ls"])?;
        Ok((!stacks.contains("shop")).then_some(()))
    })
    .unwrap();
}
