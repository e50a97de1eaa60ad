//! Joining and leaving as Swarm does it: `mesh-agent init` on one host, `mesh-agent join` with
//! the printed command on the others (no key file copied by hand), `meshctl join-token
//! --rotate` without downtime, `meshctl node rm` of a node that is gone, `mesh-agent leave`.

use std::{
    collections::BTreeSet,
    os::unix::fs::PermissionsExt,
    process::{Command, Output},
    time::Duration,
};

use mesh_agent::gossip::token::JoinToken;
use mesh_tests::membership::{
    init, join, join_command, names, ready, token_and_address, wait_ready,
};
use mesh_tests::{Cluster, Host, availability::Probe, cluster::bin};
use serde_json::Value;

/// Like [`join`], the token in MESH_JOIN_TOKEN.
fn join_env(c: &mut Cluster, i: usize, command: &str, extra: &[&str]) {
    let (token, address) = token_and_address(command);
    c.host_mut(i)
        .start_agent_command_with_env(&["join", &address], extra, &[("MESH_JOIN_TOKEN", &token)])
        .unwrap();
}

/// What every local user can read of a process: its command line; and what root can: its
/// environment.
fn proc_text(pid: u32, what: &str) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/{what}")).unwrap()).into_owned()
}

/// A join that must fail: run once, with the host's paths, expecting a quick error.
fn failed_join(h: &Host, token: &str, address: &str, extra: &[&str]) -> String {
    let config = h.config_dir().join("agent.toml");
    let mut args = vec![
        "join".to_owned(),
        "--token".into(),
        token.into(),
        address.into(),
        "--config".into(),
        config.display().to_string(),
    ];
    args.extend(h.path_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = h.mesh_agent(&args, Duration::from_secs(30)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the join must fail at once: {out:?}"
    );
    assert!(
        !h.config_dir().exists(),
        "a failed join wrote {}: {stderr}",
        h.config_dir().display()
    );
    stderr
}

fn listed(c: &Cluster, i: usize) -> BTreeSet<String> {
    let nodes: Value = c.host(i).meshctl_json(&["node", "ls"]).unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Nodes with a running task of `service`, from `service ps`.
fn running_nodes(h: &Host, service: &str) -> BTreeSet<String> {
    let rows: Value = h.meshctl_json(&["service", "ps", service]).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .filter(|r| r["history"] == false && r["state"] == "Running")
        .map(|r| r["node"].as_str().unwrap().to_owned())
        .collect()
}

fn fails(out: Output) -> String {
    assert!(!out.status.success(), "expected a failure: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn hosts_join_with_the_printed_command_and_their_labels_show_at_once() {
    let mut c = Cluster::new(4).unwrap();
    let command = init(&mut c, 1);
    let (token, address) = token_and_address(&command);
    assert_eq!(address, c.host(1).ip);
    join(&mut c, 2, &command, &[]);
    join_env(&mut c, 3, &command, &["--label", "type=low-memory"]);
    wait_ready(&c, &[1, 2, 3], &[1, 2, 3], Duration::from_secs(10));

    // The token is in no joined agent's command line, environment or log: the key lives in
    // the key file only.
    for i in [2, 3] {
        let pid = c.host(i).agent_pid().unwrap();
        let cmdline = proc_text(pid, "cmdline");
        assert!(
            cmdline.starts_with(&format!("{}\0run\0", bin("mesh-agent").display())),
            "{cmdline:?}"
        );
        assert!(!cmdline.contains(&token), "host{i}: {cmdline:?}");
        assert!(
            !proc_text(pid, "environ").contains(&token),
            "host{i}'s environment"
        );
        assert!(
            !c.host(i).logs().contains(&token),
            "host{i}'s log has the token"
        );
        assert!(
            !c.host(i).output().contains(&token),
            "host{i}'s output has the token"
        );
    }

    // The label is there as soon as the node is.
    let n: Value = c
        .host(1)
        .meshctl_json(&["node", "inspect", c.host(3).node_name()])
        .unwrap();
    assert_eq!(n["labels"]["type"], "low-memory", "{n}");
    assert_eq!(n["engine_labels"]["type"], "low-memory", "{n}");
    // Placement sees it: a global service constrained to the label runs on host3 only.
    let whoami = bin("mesh-whoami");
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "small",
            "--mode",
            "global",
            "--constraint",
            "node.labels.type==low-memory",
            "--",
            whoami.to_str().unwrap(),
        ])
        .unwrap();
    let h3 = c.host(3).node_name().to_owned();
    c.eventually(Duration::from_secs(10), "small runs on host3 only", |c| {
        Ok((running_nodes(c.host(2), "small") == BTreeSet::from([h3.clone()])).then_some(()))
    })
    .unwrap();

    // The init token makes workers: they run tasks (above) but change nothing, and say
    // where to go instead.
    let e = fails(
        c.host(2)
            .meshctl(&[
                "node",
                "update",
                c.host(3).node_name(),
                "--label-add",
                "type=big",
            ])
            .unwrap(),
    );
    assert!(
        e.contains("is a worker") && e.contains(c.host(1).node_name()),
        "{e}"
    );
    let roles: BTreeSet<(String, String)> = c.host(2).node_roles().unwrap().into_iter().collect();
    assert_eq!(
        roles,
        BTreeSet::from([
            (c.host(1).node_name().to_owned(), "admin".to_owned()),
            (c.host(2).node_name().to_owned(), "worker".to_owned()),
            (c.host(3).node_name().to_owned(), "worker".to_owned()),
        ])
    );

    // Operator labels win over the node's own, and inspect says which is which.
    c.host(1)
        .meshctl_ok(&[
            "node",
            "update",
            c.host(3).node_name(),
            "--label-add",
            "type=big",
        ])
        .unwrap();
    let n: Value = c
        .eventually(
            Duration::from_secs(3),
            "host1 sees the operator label",
            |c| {
                let n: Value =
                    c.host(1)
                        .meshctl_json(&["node", "inspect", c.host(3).node_name()])?;
                Ok((n["labels"]["type"] == "big").then_some(n))
            },
        )
        .unwrap();
    assert_eq!(n["engine_labels"]["type"], "low-memory", "{n}");
    assert_eq!(n["operator_labels"]["type"], "big", "{n}");
    let pretty = c
        .host(1)
        .meshctl_ok(&["node", "inspect", c.host(3).node_name(), "--pretty"])
        .unwrap();
    assert!(
        pretty.contains("type=big\t(operator, overrides"),
        "{pretty}"
    );
    let table = c.host(2).meshctl_ok(&["node", "ls"]).unwrap();
    assert!(
        table.contains("AGENT VERSION") && table.contains("ROLE"),
        "{table}"
    );

    // Config and key were written with safe modes; the token never reached a log.
    for i in [1, 2, 3] {
        let key = c.host(i).config_dir().join("cluster.key");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "host{i}");
        assert!(
            !c.host(i).logs().contains(&token),
            "host{i}'s log has the token"
        );
    }
    let config = std::fs::read_to_string(c.host(2).config_dir().join("agent.toml")).unwrap();
    assert!(config.contains(&c.host(1).ip), "{config}");

    // Running init again on a member changes nothing and prints the same command.
    let h1 = c.host(1);
    let config = h1.config_dir().join("agent.toml");
    let mut args = vec![
        "init".to_owned(),
        "--config".into(),
        config.display().to_string(),
    ];
    args.extend(h1.path_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = h1.mesh_agent(&args, Duration::from_secs(20)).unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(join_command(&String::from_utf8_lossy(&out.stdout)), command);

    // join-token prints the same, as root, on an admin; a worker prints none.
    let printed = c.host(1).meshctl_ok(&["join-token"]).unwrap();
    assert!(printed.contains(&token), "{printed}");
    let quiet = c
        .host(1)
        .meshctl_ok(&["join-token", "worker", "-q"])
        .unwrap();
    assert_eq!(quiet.trim(), token);
    let e = fails(c.host(3).meshctl(&["join-token"]).unwrap());
    assert!(e.contains("is a worker"), "{e}");

    // Only root gets the token: meshctl says so, and the agent refuses other users even when
    // the socket lets them in.
    let nobody = ["--reuid=65534", "--regid=65534", "--clear-groups"];
    let out = Command::new("setpriv")
        .args(nobody)
        .arg(bin("meshctl"))
        .arg("--socket")
        .arg(c.host(2).socket())
        .arg("join-token")
        .output()
        .unwrap();
    assert!(fails(out).contains("only root"));
    let socket = c.host(2).socket();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new("setpriv")
        .args(nobody)
        .args(["curl", "-s", "--unix-socket"])
        .arg(&socket)
        .arg("http://mesh-agent/v1/join-token")
        .output()
        .unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660)).unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.contains("only root"), "{out:?}");
    assert!(!answer.contains(&token), "{answer}");

    // Bad input fails at once, says how to fix it and writes nothing.
    let h4 = c.host(4);
    let e = failed_join(h4, "SWMTKN-1-abc", &address, &[]);
    assert!(e.contains("not a mesh join token"), "{e}");
    // One key digit changed in copying (position 10 is inside the key).
    let mut damaged = token.clone().into_bytes();
    damaged[10] = if damaged[10] == b'0' { b'1' } else { b'0' };
    let damaged = String::from_utf8(damaged).unwrap();
    let e = failed_join(h4, &damaged, &address, &[]);
    assert!(e.contains("damaged"), "{e}");
    let other = JoinToken::new(&[7u8; 32], "mesh").encode().to_string();
    let e = failed_join(h4, &other, &address, &[]);
    assert!(
        e.contains("does not accept this join token") && e.contains("meshctl join-token"),
        "{e}"
    );
    let e = failed_join(h4, &token, "192.0.2.77", &[]);
    assert!(e.contains("no answer from 192.0.2.77:7946"), "{e}");
    // A token on the command line still works, with a warning that it is visible.
    assert!(e.contains("visible to every local user"), "{e}");
    // `--token -` reads it from stdin (a damaged one, so the join stops right after).
    let mut child = h4
        .ns
        .command(bin("mesh-agent").to_str().unwrap())
        .args(["join", "--token", "-", &address, "--config", "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        format!("{damaged}\n").as_bytes(),
    )
    .unwrap();
    let e = fails(child.wait_with_output().unwrap());
    assert!(e.contains("damaged") && !e.contains("visible"), "{e}");
    // No token at all says where one may come from.
    let out = h4
        .mesh_agent(
            &["join", &address, "--config", "/dev/null"],
            Duration::from_secs(10),
        )
        .unwrap();
    let e = fails(out);
    assert!(
        e.contains("no join token") && e.contains("--token-file") && e.contains("MESH_JOIN_TOKEN"),
        "{e}"
    );
    for bad in ["=x", "a b=c"] {
        let e = failed_join(h4, &token, &address, &["--label", bad]);
        assert!(
            e.contains("invalid label") && e.contains("key=value"),
            "{e}"
        );
    }
    assert_eq!(listed(&c, 1), names(&c, &[1, 2, 3]));
}

#[test]
fn a_rotated_token_keeps_members_serving_and_stops_old_token_joins() {
    let mut c = Cluster::new(4).unwrap();
    let old = init(&mut c, 1);
    join(&mut c, 2, &old, &[]);
    join(&mut c, 3, &old, &[]);
    wait_ready(&c, &[1, 2, 3], &[1, 2, 3], Duration::from_secs(10));
    // Host4 has no agent yet: create on host1 and wait on the members only.
    c.host(1)
        .meshctl_ok(&["network", "create", "app", "--subnet", "10.10.0.0/24"])
        .unwrap();
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "web",
            "--network",
            "app",
            "-p",
            "8080:80",
        ])
        .unwrap();
    c.eventually(Duration::from_secs(5), "members know web", |c| {
        Ok([1, 2, 3]
            .iter()
            .all(|i| {
                c.host(*i)
                    .meshctl(&["service", "inspect", "web"])
                    .is_ok_and(|o| o.status.success())
            })
            .then_some(()))
    })
    .unwrap();
    c.host(2)
        .run_whoami::<Value>("app", Some("web"), "web-1", &[])
        .unwrap();
    c.host(3)
        .run_whoami::<Value>("app", Some("web"), "web-2", &[])
        .unwrap();
    c.eventually(Duration::from_secs(5), "both tasks serve", |c| {
        let s: Value = c.host(1).meshctl_json(&["service", "inspect", "web"])?;
        Ok((s["tasks"].as_array().map_or(0, Vec::len) == 2).then_some(()))
    })
    .unwrap();
    c.external("client", 100).unwrap();
    let target = format!("{}:8080", c.host(1).ip).parse().unwrap();
    let client = Probe::start(c.external_ns("client").unwrap(), target).unwrap();

    let rotated = c.host(1).meshctl(&["join-token", "--rotate"]).unwrap();
    let stderr = String::from_utf8_lossy(&rotated.stderr);
    assert!(rotated.status.success(), "{stderr}");
    assert!(stderr.contains("3/3 nodes use the new key"), "{stderr}");
    let new = join_command(&String::from_utf8_lossy(&rotated.stdout));
    assert_ne!(new, old);
    std::thread::sleep(Duration::from_secs(1));
    // Rotating the gossip key touches no load balancer and no task: nothing may stall an
    // answer for half a second (a dropped SYN shows as a failure). Measured: gaps ≤ 40 ms.
    client
        .finish()
        .assert_available("during the rotation", Duration::from_millis(500));
    wait_ready(&c, &[1, 2, 3], &[1, 2, 3], Duration::from_secs(10));
    for i in [1, 2, 3] {
        let stats: Value = c.host(i).meshctl_json(&["gossip", "stats"]).unwrap();
        let keys = stats["auth"]["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1, "host{i} retired the old key: {stats}");
        let token = token_and_address(&new).0;
        assert!(token.contains(keys[0]["id"].as_str().unwrap()), "host{i}");
    }

    let (old_token, address) = token_and_address(&old);
    let e = failed_join(c.host(4), &old_token, &address, &[]);
    assert!(
        e.contains("does not accept this join token") && e.contains("rotated"),
        "{e}"
    );
    join(&mut c, 4, &new, &[]);
    wait_ready(&c, &[1, 4], &[1, 2, 3, 4], Duration::from_secs(10));
}

#[test]
fn node_rm_forgets_a_dead_node_everywhere_and_refuses_a_live_or_unknown_one() {
    let mut c = Cluster::new(4).unwrap();
    c.start_agents().unwrap();
    wait_ready(&c, &[1, 2], &[1, 2, 3, 4], Duration::from_secs(10));
    let h = c.host(1);
    let e = fails(h.meshctl(&["node", "rm", c.host(3).node_name()]).unwrap());
    assert!(e.contains("is up") && e.contains("--force"), "{e}");
    let e = fails(h.meshctl(&["node", "rm", "no-such-node"]).unwrap());
    assert!(e.contains("not found"), "{e}");
    let e = fails(h.meshctl(&["node", "rm", h.node_name()]).unwrap());
    assert!(e.contains("mesh-agent leave"), "{e}");
    assert_eq!(listed(&c, 2), names(&c, &[1, 2, 3, 4]));

    c.host_mut(3).kill_agent().unwrap();
    c.eventually(Duration::from_secs(10), "host3 is Down", |c| {
        Ok(
            (ready(c, 1) == names(c, &[1, 2, 4]) && ready(c, 2) == names(c, &[1, 2, 4]))
                .then_some(()),
        )
    })
    .unwrap();
    c.host(1)
        .meshctl_ok(&["node", "rm", c.host(3).node_name()])
        .unwrap();
    c.eventually(Duration::from_secs(3), "host3 is gone everywhere", |c| {
        Ok([1, 2, 4]
            .iter()
            .all(|i| listed(c, *i) == names(c, &[1, 2, 4]))
            .then_some(()))
    })
    .unwrap();

    // --force removes a live node; its agent stops when it sees it.
    c.host(1)
        .meshctl_ok(&["node", "rm", "--force", c.host(4).node_name()])
        .unwrap();
    let status = c
        .host_mut(4)
        .wait_agent_exit(Duration::from_secs(10))
        .unwrap();
    assert!(status.success(), "{status}");
    c.eventually(Duration::from_secs(3), "host4 is gone everywhere", |c| {
        Ok([1, 2]
            .iter()
            .all(|i| listed(c, *i) == names(c, &[1, 2]))
            .then_some(()))
    })
    .unwrap();
}

fn leave(h: &Host, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin("mesh-agent"));
    cmd.arg("leave").arg("--socket").arg(h.socket()).args(extra);
    cmd
}

#[test]
fn leave_drains_stops_the_agent_and_peers_drop_the_node_at_once() {
    let mut c = Cluster::new(3).unwrap();
    c.start_agents().unwrap();
    c.create_network("app", "10.10.0.0/24").unwrap();
    c.create_service("web", "app", &["-p", "8080:80"]).unwrap();
    c.host(3)
        .run_whoami::<Value>("app", Some("web"), "web-3", &[])
        .unwrap();
    wait_ready(&c, &[1], &[1, 2, 3], Duration::from_secs(10));
    let me = c.host(3).node_name().to_owned();

    // A task started by hand is not moved: a short leave says so and stops nothing.
    let out = leave(c.host(3), &["--timeout", "1"]).output().unwrap();
    let e = fails(out);
    assert!(e.contains("web-3 (web)") && e.contains("meshctl rm"), "{e}");
    assert!(c.host(3).agent_pid().is_some());
    let n: Value = c.host(1).meshctl_json(&["node", "inspect", &me]).unwrap();
    assert_eq!(n["availability"], "drain", "{n}");

    // A leave waits, with progress, until the node serves nothing.
    let waiting = leave(c.host(3), &["--timeout", "30"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    c.host(3).meshctl_ok(&["rm", "web-3"]).unwrap();
    let out = waiting.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("waiting for 1 task(s)"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("left the cluster"));
    let status = c
        .host_mut(3)
        .wait_agent_exit(Duration::from_secs(5))
        .unwrap();
    assert!(status.success(), "{status}");

    // Peers drop it at once: gone from the list, not merely Down after failure detection.
    c.eventually(Duration::from_secs(1), "host3 is gone everywhere", |c| {
        Ok([1, 2]
            .iter()
            .all(|i| listed(c, *i) == names(c, &[1, 2]))
            .then_some(()))
    })
    .unwrap();
    // Its kernel state went with it.
    assert!(!c.host(3).bpffs().exists(), "pins left behind");
    let links = c.host(3).ns.sh("ip -o link show").unwrap();
    assert!(
        !links.contains("mbr4096"),
        "the network is still plumbed: {links}"
    );
}

#[test]
fn leaving_hands_a_services_tasks_over_while_clients_are_served() {
    let mut c = Cluster::new(3).unwrap();
    c.start_agents().unwrap();
    c.external("client", 100).unwrap();
    let whoami = bin("mesh-whoami");
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "web",
            "--replicas",
            "3",
            "-p",
            "8080:80",
            "--",
            whoami.to_str().unwrap(),
        ])
        .unwrap();
    let h3 = c.host(3).node_name().to_owned();
    c.eventually(Duration::from_secs(15), "web runs on every node", |c| {
        Ok((running_nodes(c.host(1), "web").len() == 3).then_some(()))
    })
    .unwrap();
    let target = format!("{}:8080", c.host(1).ip).parse().unwrap();
    let client = Probe::start(c.external_ns("client").unwrap(), target).unwrap();

    let out = leave(c.host(3), &["--timeout", "60"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let status = c
        .host_mut(3)
        .wait_agent_exit(Duration::from_secs(5))
        .unwrap();
    assert!(status.success(), "{status}");
    c.eventually(
        Duration::from_secs(15),
        "web runs 3 tasks on hosts 1-2",
        |c| {
            let s: Value = c.host(1).meshctl_json(&["service", "inspect", "web"])?;
            Ok((s["running"] == 3 && !running_nodes(c.host(1), "web").contains(&h3)).then_some(()))
        },
    )
    .unwrap();
    // Leaving drains host3's task first: its peers take it out of their load balancers
    // before it stops, and the other two keep serving, so nothing should stall for half a
    // SYN retransmit (1 s). Measured: gaps ≤ 25 ms.
    client
        .finish()
        .assert_available("while host3 left", Duration::from_millis(500));
}

/// The role each host's `node ls` gives every host, as (name, role).
fn roles(c: &Cluster, observer: usize) -> BTreeSet<(String, String)> {
    c.host(observer).node_roles().unwrap().into_iter().collect()
}

fn wait_roles(c: &Cluster, observers: &[usize], want: &[(usize, &str)]) {
    let want: BTreeSet<(String, String)> = want
        .iter()
        .map(|(i, r)| (c.host(*i).node_name().to_owned(), r.to_string()))
        .collect();
    for i in observers {
        c.eventually(
            Duration::from_secs(10),
            &format!("host{i} sees roles {want:?}"),
            |c| Ok((roles(c, *i) == want).then_some(())),
        )
        .unwrap();
    }
}

/// Swarm's worker/manager split without a quorum: an admin token makes an admin that
/// changes the cluster and grants roles; workers run tasks and are refused every change (a
/// refusal changes nothing); the last admin cannot be demoted; with every admin gone the
/// workers keep serving and changes wait.
#[test]
fn admins_change_the_cluster_workers_run_tasks_and_serve_without_admins() {
    let mut c = Cluster::new(3).unwrap();
    let worker_command = init(&mut c, 1);
    join(&mut c, 2, &worker_command, &[]);
    let admin_command = join_command(&c.host(1).meshctl_ok(&["join-token", "admin"]).unwrap());
    assert_ne!(admin_command, worker_command);
    join(&mut c, 3, &admin_command, &[]);
    wait_ready(&c, &[1, 2, 3], &[1, 2, 3], Duration::from_secs(10));
    wait_roles(&c, &[1, 2, 3], &[(1, "admin"), (2, "worker"), (3, "admin")]);
    // The admin token handed the admin key on; the worker token its public half only.
    assert!(c.host(3).config_dir().join("admin.key").exists());
    assert!(!c.host(2).config_dir().join("admin.key").exists());
    assert!(c.host(2).config_dir().join("admin.pub").exists());

    // The joined admin changes the cluster; the worker runs its share of the tasks.
    let whoami = bin("mesh-whoami");
    c.host(3)
        .meshctl_ok(&[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "3",
            "-p",
            "8080:80",
            "--process",
            "--",
            whoami.to_str().unwrap(),
        ])
        .unwrap();
    c.eventually(Duration::from_secs(15), "web runs on every node", |c| {
        Ok((running_nodes(c.host(2), "web").len() == 3).then_some(()))
    })
    .unwrap();

    // The worker is refused every change, with the admins to use; nothing changes.
    let h2 = c.host(2).node_name().to_owned();
    for args in [
        &[
            "service",
            "create",
            "--name",
            "evil",
            "--process",
            "--",
            "/bin/true",
        ][..],
        &["service", "scale", "web=1"],
        &["service", "rm", "web"],
        &["network", "create", "evil", "--subnet", "10.99.0.0/24"],
        &["node", "update", "--availability", "drain", &h2],
        &["node", "promote", &h2],
    ] {
        let e = fails(c.host(2).meshctl(args).unwrap());
        assert!(
            e.contains("is a worker")
                && e.contains(c.host(1).node_name())
                && e.contains(c.host(3).node_name()),
            "{args:?}: {e}"
        );
    }
    let web: Value = c
        .host(1)
        .meshctl_json(&["service", "inspect", "web"])
        .unwrap();
    assert_eq!(web["spec"]["mode"]["replicated"]["replicas"], 3, "{web}");
    assert!(
        c.host(1)
            .meshctl(&["network", "inspect", "evil"])
            .unwrap()
            .status
            .code()
            != Some(0)
    );
    // Docker's clients hear Swarm's answer from a worker's Docker socket.
    let out = c
        .host(2)
        .ns
        .sh(&format!(
            "curl -s -X POST -H 'Content-Type: application/json' -d '{{\"Name\":\"evil\"}}' \
             --unix-socket {} http://docker/v1.41/networks/create",
            c.host(2).socket().with_file_name("docker.sock").display()
        ))
        .unwrap();
    assert!(out.contains("This node is not a swarm manager"), "{out}");

    // Promote and demote: the worker becomes an admin and back, and acts accordingly.
    let out = c.host(1).meshctl_ok(&["node", "promote", &h2]).unwrap();
    assert!(
        out.contains(&format!("Node {h2} promoted to a manager")),
        "{out}"
    );
    wait_roles(&c, &[1, 2, 3], &[(1, "admin"), (2, "admin"), (3, "admin")]);
    c.host(2)
        .meshctl_ok(&["network", "create", "promoted", "--subnet", "10.98.0.0/24"])
        .unwrap();
    // The promoting admin handed it the admin key, sealed to its node key: it prints admin
    // tokens and grants roles like the others.
    c.eventually(Duration::from_secs(10), "host2 holds the admin key", |c| {
        Ok(c.host(2)
            .config_dir()
            .join("admin.key")
            .exists()
            .then_some(()))
    })
    .unwrap();
    let printed = c
        .host(2)
        .meshctl_ok(&["join-token", "admin", "-q"])
        .unwrap();
    assert_eq!(
        join_command(&format!("mesh-agent join --token {} x", printed.trim())),
        format!(
            "mesh-agent join --token {} x",
            token_and_address(&admin_command).0
        ),
        "the same admin token as host1's"
    );
    c.host(3).meshctl_ok(&["node", "demote", &h2]).unwrap();
    wait_roles(&c, &[1, 2, 3], &[(1, "admin"), (2, "worker"), (3, "admin")]);
    c.eventually(
        Duration::from_secs(10),
        "demoted host2 dropped the admin key",
        |c| Ok((!c.host(2).config_dir().join("admin.key").exists()).then_some(())),
    )
    .unwrap();
    let e = fails(c.host(2).meshctl(&["network", "rm", "promoted"]).unwrap());
    assert!(e.contains("is a worker"), "{e}");

    // The last admin that is up cannot be demoted.
    let h3 = c.host(3).node_name().to_owned();
    c.host(1).meshctl_ok(&["node", "demote", &h3]).unwrap();
    wait_roles(
        &c,
        &[1, 2, 3],
        &[(1, "admin"), (2, "worker"), (3, "worker")],
    );
    let h1 = c.host(1).node_name().to_owned();
    let e = fails(c.host(1).meshctl(&["node", "demote", &h1]).unwrap());
    assert!(e.contains("last admin"), "{e}");
    // Demoted, host3 dropped the admin key it joined with.
    assert!(!c.host(3).config_dir().join("admin.key").exists());

    // Every admin gone: the workers keep every task and keep serving; changes wait.
    c.external("client", 100).unwrap();
    let target = format!("{}:8080", c.host(2).ip).parse().unwrap();
    let client = Probe::start(c.external_ns("client").unwrap(), target).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    c.host_mut(1).kill_agent().unwrap();
    c.eventually(Duration::from_secs(10), "host1 is Down", |c| {
        Ok((ready(c, 2) == names(c, &[2, 3])).then_some(()))
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    client
        .finish()
        .assert_available("with no admin up", Duration::from_millis(500));
    let web: Value = c
        .host(2)
        .meshctl_json(&["service", "inspect", "web"])
        .unwrap();
    assert_eq!(web["spec"]["mode"]["replicated"]["replicas"], 3, "{web}");
    let e = fails(c.host(3).meshctl(&["service", "scale", "web=5"]).unwrap());
    assert!(e.contains("No admin is up"), "{e}");
}
