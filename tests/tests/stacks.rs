//! `stack deploy` the way Swarm users run it: a compose file of two services on an overlay
//! (web published, api reached by web under its short name), redeployed with changed
//! replicas and a changed environment (only the changed template rolls), a file that is
//! wrong deploys nothing, and `stack rm` leaves nothing behind.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use mesh_tests::{Cluster, Host, cluster::bin, workload::http_get};
use serde_json::Value;

fn compose(c: &Cluster, web_replicas: u32, api_version: &str) -> PathBuf {
    let w = bin("mesh-whoami");
    let w = w.to_str().unwrap();
    let text = format!(
        r#"version: "3.8"
services:
  web:
    command: ["{w}", "--name", "web"]
    ports: ["8080:80"]
    networks: [app]
    container_name: ignored-by-swarm
    deploy:
      replicas: {web_replicas}
  api:
    command: ["{w}", "--name", "api"]
    environment:
      VERSION: "{api_version}"
    networks: [app]
    deploy:
      replicas: 2
      update_config: {{ order: start-first, monitor: 1s }}
networks:
  app:
    driver: overlay
    ipam:
      config: [ {{ subnet: 10.77.0.0/24 }} ]
"#
    );
    let path = c.log_dir().join("docker-compose.yml");
    std::fs::write(&path, text).unwrap();
    path
}

fn converged(c: &Cluster, name: &str, n: usize) {
    c.eventually(
        Duration::from_secs(40),
        &format!("{name} at {n}/{n}"),
        |c| {
            for h in c.hosts() {
                let s: Value = h.meshctl_json(&["service", "inspect", name])?;
                let done = s["spec"]["update_status"]["state"]
                    .as_str()
                    .is_none_or(|s| s == "completed");
                if s["running"] != n || s["desired"] != n || !done {
                    anyhow::bail!("{}: {}/{}", h.node_name(), s["running"], s["desired"]);
                }
            }
            Ok(Some(()))
        },
    )
    .unwrap();
}

/// Ids of the running tasks of a service.
fn running(h: &Host, name: &str) -> BTreeSet<String> {
    let rows: Vec<Value> = h.meshctl_json(&["service", "ps", name]).unwrap();
    rows.iter()
        .filter(|r| r["history"] == false && r["state"] == "Running")
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_compose_stack_deploys_redeploys_only_what_changed_and_is_removed_whole() {
    let mut c = Cluster::new(3).unwrap();
    c.start_agents().unwrap();
    c.external("client", 100).unwrap();
    let file = compose(&c, 2, "1");
    let f = file.to_str().unwrap();
    let out = c
        .host(1)
        .meshctl(&["stack", "deploy", "-c", f, "mystack"])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("Creating service mystack_web"), "{stdout}");
    assert_eq!(
        stderr.trim(),
        "Ignoring unsupported option services.web.container_name"
    );
    converged(&c, "mystack_web", 2);
    converged(&c, "mystack_api", 2);
    let ls = c.host(2).meshctl_ok(&["stack", "ls"]).unwrap();
    assert!(ls.contains("mystack") && ls.contains('2'), "{ls}");
    let net: Value = c
        .host(3)
        .meshctl_json(&["network", "inspect", "mystack_app"])
        .unwrap();
    assert_eq!(net["subnet"], "10.77.0.0/24");

    // web is published on every node.
    let ns = c.external_ns("client").unwrap();
    for h in c.hosts() {
        let addr = format!("{}:8080", h.ip).parse().unwrap();
        assert_eq!(ns.run(move || http_get(addr)).unwrap().unwrap(), "web\n");
    }
    // web reaches api by its short name, inside the stack's network.
    let (host, task) = c
        .hosts()
        .iter()
        .find_map(|h| {
            let tasks: Vec<Value> = h.meshctl_json(&["ps"]).ok()?;
            tasks
                .iter()
                .find(|t| t["service"] == "mystack_web" && t["state"] == "running")
                .map(|t| (h, t["name"].as_str().unwrap().to_owned()))
        })
        .unwrap();
    let answer = host
        .meshctl_ok(&[
            "exec",
            &task,
            "--",
            "curl",
            "-sS",
            "--max-time",
            "3",
            "http://api/",
        ])
        .unwrap();
    assert_eq!(answer, "api\n");

    // Redeploy: web scaled, api's environment changed. Only api's tasks are replaced.
    let web_before = running(c.host(1), "mystack_web");
    let api_before = running(c.host(1), "mystack_api");
    compose(&c, 3, "2");
    let out = c
        .host(2)
        .meshctl_ok(&["stack", "deploy", "-c", f, "mystack"])
        .unwrap();
    assert!(out.contains("Updating service mystack_api"), "{out}");
    converged(&c, "mystack_web", 3);
    converged(&c, "mystack_api", 2);
    let web_after = running(c.host(1), "mystack_web");
    let api_after = running(c.host(1), "mystack_api");
    assert!(
        web_before.is_subset(&web_after),
        "web's tasks were kept: {web_before:?} → {web_after:?}"
    );
    assert!(
        api_before.is_disjoint(&api_after),
        "api's tasks were replaced: {api_before:?} → {api_after:?}"
    );
    // The same file again changes nothing.
    let out = c
        .host(3)
        .meshctl_ok(&["stack", "deploy", "-c", f, "mystack"])
        .unwrap();
    assert!(!out.contains("Updating"), "{out}");

    // A file that names an undefined network deploys nothing.
    let bad = c.log_dir().join("bad.yml");
    std::fs::write(
        &bad,
        "services:\n  x:\n    command: [sleep, '100']\n    networks: [nope]\n",
    )
    .unwrap();
    let out = c
        .host(1)
        .meshctl(&["stack", "deploy", "-c", bad.to_str().unwrap(), "other"])
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("services.x.networks: network nope is not defined"),
        "{e}"
    );
    std::fs::write(&bad, "services: [unclosed\n").unwrap();
    let out = c
        .host(1)
        .meshctl(&["stack", "deploy", "-c", bad.to_str().unwrap(), "other"])
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("line 1") || e.contains("line 2"), "{e}");
    let stacks = c.host(1).meshctl_ok(&["stack", "ls"]).unwrap();
    assert!(!stacks.contains("other"), "{stacks}");

    // stack rm: nothing of it is left on any node.
    c.host(1).meshctl_ok(&["stack", "rm", "mystack"]).unwrap();
    c.eventually(Duration::from_secs(30), "the stack gone", |c| {
        for h in c.hosts() {
            let services: Vec<Value> = h.meshctl_json(&["service", "ls"])?;
            let networks: Vec<Value> = h.meshctl_json(&["network", "ls"])?;
            if !services.is_empty()
                || networks
                    .iter()
                    .any(|n| n["name"].as_str().unwrap().starts_with("mystack_"))
            {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .unwrap();
}
