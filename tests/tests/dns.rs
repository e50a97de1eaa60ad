//! Service names resolve from inside tasks, through the resolver the agent opens in every
//! task's namespace at 127.0.0.11; other names go to the node's upstream resolvers.

use std::time::Duration;

use mesh_tests::{Cluster, Host};
use serde_json::Value;

const UPSTREAM: &str = "192.0.2.53";

fn whoami(h: &Host, name: &str, service: Option<&str>) -> Value {
    h.run_whoami("app", service, name, &[]).unwrap()
}

/// getent run inside the task with `meshctl exec`: the task's resolv.conf (127.0.0.11), its
/// namespace and its cgroup, exactly what the task's own processes get.
fn getent(c: &Cluster, task: &Value, args: &str) -> String {
    let node = task["node"].as_str().unwrap();
    let h = c.hosts().iter().find(|h| h.node_name() == node).unwrap();
    let mut cmd = vec!["exec", task["name"].as_str().unwrap(), "--", "getent"];
    cmd.extend(args.split_whitespace());
    let out = h.meshctl(&cmd).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ips(getent_out: &str) -> Vec<String> {
    let mut v: Vec<String> = getent_out
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    v.sort();
    v.dedup();
    v
}

#[test]
fn tasks_resolve_services_tasks_and_outside_names() {
    let mut c = Cluster::new(3).unwrap();
    // A resolver outside the mesh, on the underlay, that knows one external name.
    let upstream = c.external("dns", 53).unwrap();
    let _dnsmasq = upstream
        .spawn_resolver(UPSTREAM, "outside.example", "203.0.113.7")
        .unwrap();
    for i in 1..=3 {
        c.host_mut(i)
            .start_agent(&["--dns-upstream", UPSTREAM])
            .unwrap();
    }
    c.create_network("app", "10.10.0.0/24").unwrap();
    let web = c.create_service("web", "app", &["-p", "8080:80"]).unwrap();
    let vip = web["vip"].as_str().unwrap().to_owned();
    let w1 = whoami(c.host(1), "web-1", Some("web"));
    let w2 = whoami(c.host(2), "web-2", Some("web"));
    let client = whoami(c.host(3), "client", None);

    // The service name is its VIP, with or without the network as a domain.
    c.eventually(Duration::from_secs(2), "web resolves to its VIP", |_| {
        Ok(ips(&getent(&c, &client, "ahostsv4 web"))
            .contains(&vip)
            .then_some(()))
    })
    .unwrap();
    assert_eq!(
        ips(&getent(&c, &client, "ahostsv4 web.app")),
        vec![vip.clone()]
    );
    // tasks.web lists every task.
    let want = {
        let mut v = vec![
            w1["ip"].as_str().unwrap().to_owned(),
            w2["ip"].as_str().unwrap().to_owned(),
        ];
        v.sort();
        v
    };
    c.eventually(Duration::from_secs(2), "tasks.web lists both tasks", |_| {
        Ok((ips(&getent(&c, &client, "ahostsv4 tasks.web")) == want).then_some(()))
    })
    .unwrap();
    // A task's name, and the reverse of its address.
    assert_eq!(
        ips(&getent(&c, &client, "ahostsv4 web-2")),
        vec![w2["ip"].as_str().unwrap().to_owned()]
    );
    let ptr = getent(
        &c,
        &client,
        &format!("hosts {}", w1["ip"].as_str().unwrap()),
    );
    assert!(ptr.contains("web-1"), "PTR of web-1's address: {ptr:?}");
    // Anything else goes upstream.
    assert_eq!(
        ips(&getent(&c, &client, "ahostsv4 outside.example")),
        vec!["203.0.113.7".to_owned()]
    );

    // Scaling the service changes tasks.web within a second.
    let w3 = whoami(c.host(1), "web-3", Some("web"));
    let t = std::time::Instant::now();
    c.eventually(Duration::from_secs(1), "tasks.web has web-3", |_| {
        Ok(ips(&getent(&c, &client, "ahostsv4 tasks.web"))
            .contains(&w3["ip"].as_str().unwrap().to_owned())
            .then_some(()))
    })
    .unwrap();
    eprintln!("scale-up visible in DNS after {:?}", t.elapsed());
    c.host(2).meshctl_ok(&["rm", "web-2"]).unwrap();
    c.eventually(Duration::from_secs(1), "tasks.web loses web-2", |_| {
        Ok((!ips(&getent(&c, &client, "ahostsv4 tasks.web"))
            .contains(&w2["ip"].as_str().unwrap().to_owned()))
        .then_some(()))
    })
    .unwrap();
}

#[test]
fn a_dnsrr_service_resolves_to_its_tasks() {
    let mut c = Cluster::new(2).unwrap();
    c.start_agents().unwrap();
    c.create_network("app", "10.10.0.0/24").unwrap();
    let rr = c
        .create_service("rr", "app", &["--endpoint-mode", "dnsrr"])
        .unwrap();
    assert!(rr["vip"].is_null());
    let a = whoami(c.host(1), "rr-1", Some("rr"));
    let b = whoami(c.host(2), "rr-2", Some("rr"));
    let mut want = vec![
        a["ip"].as_str().unwrap().to_owned(),
        b["ip"].as_str().unwrap().to_owned(),
    ];
    want.sort();
    c.eventually(Duration::from_secs(2), "rr resolves to both tasks", |_| {
        Ok((ips(&getent(&c, &a, "ahostsv4 rr")) == want).then_some(()))
    })
    .unwrap();
}
