//! Task lifecycle on a namespace host: what a task sees, how it ends, and how a restarted
//! agent finds its tasks again.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mesh_agent::task::{ProcessState, TaskExit};
use mesh_tests::{
    Cluster,
    netns::command_in,
    overlay::{NetworkDef, Node, Placements},
    process::alive,
};

fn app() -> NetworkDef {
    NetworkDef::new("app", 4096, "10.10.0.0/24")
}

/// A one-host cluster whose node has network app plumbed.
fn host_with_app(cluster: &Cluster, node: &Node) {
    let mut placements = Placements::new(cluster.hosts());
    placements.place(1, &app(), "any", 11);
    node.reconcile(&placements.desired(1)).unwrap();
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn link_exists(cluster: &Cluster, name: &str) -> bool {
    cluster
        .host(1)
        .ns
        .sh_output(&format!("ip link show {name}"))
        .unwrap()
        .status
        .success()
}

fn next_exit(
    node: &Node,
    rx: tokio::sync::broadcast::Receiver<TaskExit>,
    within: Duration,
) -> TaskExit {
    let mut rx = rx;
    node.block_on(async move { tokio::time::timeout(within, rx.recv()).await })
        .expect("no task exit reported in time")
        .unwrap()
}

#[test]
fn a_task_sees_its_own_address_route_hostname_resolver_and_cgroup() {
    let cluster = Cluster::new(1).unwrap();
    let cgroup = mesh_tests::cluster::cgroup_base().join(cluster.host(1).node_name());
    std::fs::create_dir_all(&cgroup).unwrap();
    let node = Node::start_with(cluster.host(1), |c| c.cgroup = Some(cgroup.clone())).unwrap();
    host_with_app(&cluster, &node);
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap();

    let task = node
        .run_task(
            "web",
            &app(),
            app().address(11),
            &["sh", "-c", "cat /etc/resolv.conf; hostname; cat /proc/self/cgroup; echo READY; exec sleep 3600"],
        )
        .unwrap();
    wait_for("the task's output", Duration::from_secs(5), || {
        std::fs::read_to_string(&task.log).is_ok_and(|l| l.contains("READY"))
    });
    let log = std::fs::read_to_string(&task.log).unwrap();
    let node_name = cluster.host(1).node_name();
    assert!(
        log.contains("nameserver 127.0.0.11\noptions ndots:0\n"),
        "{log}"
    );
    assert!(
        log.contains("\nweb\n"),
        "hostname is not the task name: {log}"
    );
    assert!(
        log.contains(&format!("0::/mesh/{node_name}\n")),
        "not in the agent's cgroup: {log}"
    );
    // The resolv.conf bind mount stayed inside the task's mount namespace.
    assert_eq!(
        std::fs::read_to_string("/etc/resolv.conf").unwrap(),
        host_resolv
    );

    let pid = task.pid.unwrap();
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
    assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");
    // Its own session: it survives the agent's process group and terminal going away.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let session: u32 = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(3)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(session, pid);

    let out = command_in(&task.netns, "ip")
        .args(["-o", "addr", "show", "eth0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("inet 10.10.0.11/24"));
    let out = command_in(&task.netns, "ip")
        .args(["-o", "link", "show", "eth0"])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        link.contains("mtu 1450") && link.contains("link/ether 02:42:0a:0a:00:0b"),
        "{link}"
    );
    let out = command_in(&task.netns, "ip")
        .args(["route"])
        .output()
        .unwrap();
    let routes = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        routes.contains("default via 10.10.0.1 dev eth0"),
        "{routes}"
    );
    // `ip netns exec` users get the same resolv.conf, by the same convention.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &task.netns, "cat", "/etc/resolv.conf"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("127.0.0.11"));
    // The host side sits on the network's bridge.
    let veth = &task.interfaces[0].host_veth;
    assert!(
        cluster
            .host(1)
            .ns
            .sh(&format!("ip -o link show {veth}"))
            .unwrap()
            .contains("master mbr4096")
    );
    node.stop_task("web").unwrap();
}

#[test]
fn an_exited_task_is_reported_at_once_and_loses_its_network() {
    let cluster = Cluster::new(1).unwrap();
    let node = Node::start(cluster.host(1)).unwrap();
    host_with_app(&cluster, &node);
    let exits = node.tasks.subscribe();

    let task = node
        .run_task(
            "batch",
            &app(),
            app().address(12),
            &["sh", "-c", "sleep 0.3; exit 3"],
        )
        .unwrap();
    let started = Instant::now();
    let exit = next_exit(&node, exits, Duration::from_secs(5));
    let took = started.elapsed();
    assert_eq!(
        exit,
        TaskExit {
            name: "batch".into(),
            code: Some(3),
            signal: None
        }
    );
    // 0.3 s of sleep, then the pidfd wakes the watcher: far below the 1 s convergence goal.
    assert!(
        took < Duration::from_millis(800),
        "exit reported after {took:?}"
    );

    let record = node.tasks.get("batch").unwrap();
    assert_eq!(
        record.state,
        ProcessState::Exited {
            code: Some(3),
            signal: None,
            out_of_memory: None
        }
    );
    assert!(!netns_exists(&task.netns));
    assert!(!link_exists(&cluster, &task.interfaces[0].host_veth));
    assert!(!Path::new("/etc/netns").join(&task.netns).exists());
    // A command that is done before the agent even looks is an ordinary exit too.
    let exits = node.tasks.subscribe();
    node.run_task("instant", &app(), app().address(13), &["true"])
        .unwrap();
    let exit = next_exit(&node, exits, Duration::from_secs(5));
    assert_eq!(
        exit,
        TaskExit {
            name: "instant".into(),
            code: Some(0),
            signal: None
        }
    );

    // Listed as exited until removed; removing forgets record and log.
    node.stop_task("batch").unwrap();
    assert!(node.tasks.get("batch").is_none());
    assert!(!task.log.exists());
    assert!(!node.state_dir.join("tasks/batch.json").exists());
}

#[test]
fn stopping_a_task_ends_it_and_everything_it_left_in_its_namespace() {
    let cluster = Cluster::new(1).unwrap();
    let node = Node::start_with(cluster.host(1), |c| {
        c.stop_timeout = Duration::from_millis(500)
    })
    .unwrap();
    host_with_app(&cluster, &node);

    // Ignores SIGTERM and leaves a background child: SIGKILL after the timeout, and the
    // child is found through the namespace.
    let task = node
        .run_task(
            "stubborn",
            &app(),
            app().address(13),
            &[
                "sh",
                "-c",
                "trap '' TERM; sleep 3600 & while :; do sleep 0.1; done",
            ],
        )
        .unwrap();
    let pid = task.pid.unwrap() as i32;
    // The task's init, the shell (its trap set once it forks) and the background child.
    wait_for("the background child", Duration::from_secs(5), || {
        mesh_agent::netns::pids(&mesh_agent::netns::path(&task.netns)).len() >= 3
    });
    let inside = mesh_agent::netns::pids(&mesh_agent::netns::path(&task.netns));

    let started = Instant::now();
    node.stop_task("stubborn").unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "SIGTERM should have been ignored"
    );
    for p in inside.iter().copied().chain([pid]) {
        assert!(
            !alive(p) || is_zombie(p),
            "process {p} of the task survived"
        );
    }
    assert!(!netns_exists(&task.netns));
    assert!(!link_exists(&cluster, &task.interfaces[0].host_veth));
    assert!(node.tasks.list().is_empty());

    // Mistakes are refused with what to do about them.
    let err = node.run_task(
        "web",
        &NetworkDef::new("nope", 4999, "10.99.0.0/24"),
        "10.99.0.2".parse().unwrap(),
        &["true"],
    );
    let err = format!("{:#}", err.unwrap_err());
    assert!(
        err.contains("network nope is not plumbed on this node"),
        "{err}"
    );
    node.run_task("web", &app(), app().address(14), &["sleep", "3600"])
        .unwrap();
    let err = format!(
        "{:#}",
        node.run_task("web", &app(), app().address(15), &["sleep", "1"])
            .unwrap_err()
    );
    assert!(err.contains("already exists"), "{err}");
    let err = format!(
        "{:#}",
        node.run_task("../x", &app(), app().address(15), &["true"])
            .unwrap_err()
    );
    assert!(err.contains("invalid task name"), "{err}");
    // A failed start leaves nothing behind.
    assert!(!netns_exists(&format!("{}-nope", node.name)));
    assert_eq!(node.tasks.list().len(), 1);
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

#[test]
fn a_restarted_agent_adopts_running_tasks_and_notices_the_ones_that_exited() {
    let cluster = Cluster::new(1).unwrap();
    let host = cluster.host(1);
    let (kept, ended) = {
        let first = Node::start(host).unwrap();
        host_with_app(&cluster, &first);
        let kept = first
            .run_task("kept", &app(), app().address(21), &["sleep", "3600"])
            .unwrap();
        let ended = first
            .run_task("ended", &app(), app().address(22), &["sleep", "3600"])
            .unwrap();
        (kept, ended)
        // The first agent goes away here; its tasks do not.
    };
    assert!(alive(kept.pid.unwrap() as i32));
    // While no agent runs: one task dies, and a creation that was cut short is left over.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ended.pid.unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Signals land asynchronously: wait until it is dead (a zombie: this test process is
    // its parent and nobody reaps it while no agent runs).
    wait_for("the killed task to die", Duration::from_secs(2), || {
        is_zombie(ended.pid.unwrap() as i32)
    });
    let half = format!("{}-half", host.node_name());
    mesh_agent::netns::create(&half).unwrap();
    let state_dir = PathBuf::from("/run/mesh")
        .join(host.node_name())
        .join("state");
    std::fs::write(
        state_dir.join("tasks/half.json"),
        serde_json::json!({
            "spec": {"name": "half", "attachments": [], "command": ["true"]},
            "netns": half, "interfaces": [], "pid": null, "start_time": null,
            "state": {"state": "creating"}, "log": state_dir.join("tasks/half.log"),
        })
        .to_string(),
    )
    .unwrap();

    let second = Node::start(host).unwrap();
    let now = node_states(&second);
    assert_eq!(
        now,
        vec![
            (
                "ended".to_string(),
                ProcessState::Exited {
                    code: None,
                    signal: Some(9),
                    out_of_memory: None
                }
            ),
            ("kept".to_string(), ProcessState::Running),
        ]
    );
    assert_eq!(
        second.tasks.get("kept").unwrap().pid,
        kept.pid,
        "adopted, not restarted"
    );
    assert!(
        !netns_exists(&ended.netns),
        "the exited task kept its namespace"
    );
    assert!(
        !netns_exists(&half),
        "the half-created task was not cleaned up"
    );
    assert!(!state_dir.join("tasks/half.json").exists());
    // The adopted task still answers on the overlay, and the second pass of the overlay
    // finds nothing to change.
    host.ns.sh("ping -c1 -W2 10.10.0.21").unwrap();
    let mut placements = Placements::new(cluster.hosts());
    placements.place(1, &app(), "kept", 21);
    assert_eq!(
        second.reconcile(&placements.desired(1)).unwrap(),
        Vec::new()
    );

    // Its exit is still seen although this agent did not start it.
    let exits = second.tasks.subscribe();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(kept.pid.unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let exit = next_exit(&second, exits, Duration::from_secs(2));
    assert_eq!(exit.name, "kept");
    assert!(!netns_exists(&kept.netns));
}

fn node_states(node: &Node) -> Vec<(String, ProcessState)> {
    node.tasks
        .list()
        .into_iter()
        .map(|r| (r.spec.name.clone(), r.state))
        .collect()
}

#[test]
fn a_namespace_left_by_an_agent_that_lost_its_records_is_replaced() {
    let cluster = Cluster::new(1).unwrap();
    let node = Node::start(cluster.host(1)).unwrap();
    host_with_app(&cluster, &node);
    let stale = format!("{}-web", node.name);
    mesh_agent::netns::create(&stale).unwrap();
    let mut squatter = command_in(&stale, "sleep").arg("3600").spawn().unwrap();
    // nsenter enters the namespace a moment after spawn returns: a task created before then
    // finds an empty namespace, and the squatter lands in it afterwards.
    let pid = squatter.id().to_string();
    wait_for(
        "the squatter to enter its namespace",
        Duration::from_secs(5),
        || {
            std::process::Command::new("ip")
                .args(["netns", "pids", &stale])
                .output()
                .is_ok_and(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .any(|p| p == pid)
                })
        },
    );

    let task = node
        .run_task("web", &app(), app().address(11), &["sleep", "3600"])
        .unwrap();
    assert_eq!(task.netns, stale);
    wait_for(
        "the stale namespace's process to be killed",
        Duration::from_secs(2),
        || squatter.try_wait().unwrap().is_some(),
    );
    cluster.host(1).ns.sh("ping -c1 -W2 10.10.0.11").unwrap();
}
