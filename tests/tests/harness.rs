//! The harness itself: clusters leave nothing behind, even when a test panics.

use mesh_tests::{Cluster, netns};

fn leftovers(cluster: &str) -> Vec<String> {
    let mut left: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{cluster}-")))
        .collect();
    let cgroups = mesh_tests::cluster::cgroup_base();
    for dir in [
        "/sys/fs/bpf/mesh",
        "/run/mesh",
        cgroups.to_str().unwrap(),
        "/etc/netns",
    ] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(cluster) {
                    left.push(format!("{dir}/{n}"));
                }
            }
        }
    }
    left
}

#[test]
fn a_dropped_cluster_leaves_no_namespaces_pins_or_processes() {
    let (name, agent_pid) = {
        let mut c = Cluster::new(2).unwrap();
        c.start_agents().unwrap();
        c.external("client", 100).unwrap();
        assert_eq!(
            netns::list()
                .iter()
                .filter(|n| n.starts_with(c.name()))
                .count(),
            4
        );
        (c.name().to_owned(), c.host(1).agent_pid().unwrap())
    };
    assert_eq!(leftovers(&name), Vec::<String>::new());
    assert!(
        !mesh_tests::process::alive(agent_pid as i32),
        "agent still running"
    );
}

#[test]
fn a_panicking_test_still_cleans_up() {
    let name = std::sync::Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        let mut c = Cluster::new(2).unwrap();
        c.start_agents().unwrap();
        *name.lock().unwrap() = c.name().to_owned();
        panic!("the scenario failed");
    });
    assert!(result.is_err());
    let name = name.into_inner().unwrap();
    assert!(!name.is_empty());
    assert_eq!(leftovers(&name), Vec::<String>::new());
}

#[test]
fn hosts_reach_each_other_over_the_underlay() {
    let c = Cluster::new(3).unwrap();
    for h in c.hosts() {
        for peer in c.hosts() {
            h.ns.sh(&format!("ping -c1 -W2 {}", peer.ip)).unwrap();
        }
    }
}

#[test]
fn a_dropped_cluster_takes_the_tasks_its_nodes_started_with_it() {
    use mesh_tests::overlay::{NetworkDef, Node, Placements};
    let app = NetworkDef::new("app", 4096, "10.10.0.0/24");
    let (name, pid) = {
        let c = Cluster::new(1).unwrap();
        let node = Node::start(c.host(1)).unwrap();
        let mut p = Placements::new(c.hosts());
        p.place(1, &app, "t", 11);
        node.reconcile(&p.desired(1)).unwrap();
        let task = node
            .run_task("t", &app, app.address(11), &["sleep", "3600"])
            .unwrap();
        assert!(
            std::path::Path::new("/etc/netns")
                .join(&task.netns)
                .exists()
        );
        (c.name().to_owned(), task.pid.unwrap() as i32)
    };
    assert_eq!(leftovers(&name), Vec::<String>::new());
    let gone = !mesh_tests::process::alive(pid)
        || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z"));
    assert!(gone, "task process {pid} outlived its cluster");
}
