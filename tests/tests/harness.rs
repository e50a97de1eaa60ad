//! The harness itself: clusters leave nothing behind, even when a test panics.

use mesh_tests::{Cluster, netns};

fn leftovers(cluster: &str) -> Vec<String> {
    let mut left: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{cluster}-")))
        .collect();
    for dir in [
        "/sys/fs/bpf/mesh",
        "/run/mesh",
        "/sys/fs/cgroup/unified/mesh",
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
