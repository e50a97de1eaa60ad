//! Clusters made the way the README makes them: `mesh-agent init` on one host, `mesh-agent
//! join` with the printed command on the others (the token in a file only root reads), and
//! what `node ls` then says about who is Ready.

use std::{collections::BTreeSet, time::Duration};

use crate::Cluster;

/// Starts `mesh-agent init` on host `i`; the join command it printed.
pub fn init(c: &mut Cluster, i: usize) -> String {
    c.host_mut(i).start_agent_command(&["init"], &[]).unwrap();
    join_command(&c.host(i).output())
}

/// The `mesh-agent join --token …` line of what init or `meshctl join-token` printed.
pub fn join_command(printed: &str) -> String {
    printed
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("mesh-agent join --token "))
        .unwrap_or_else(|| panic!("no join command in {printed:?}"))
        .to_owned()
}

/// `mesh-agent join --token T ADDR` → (T, ADDR).
pub fn token_and_address(command: &str) -> (String, String) {
    let words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(words.len(), 5, "{command}");
    (words[3].to_owned(), words[4].to_owned())
}

/// Starts the agent of host `i` with `mesh-agent join` (the host's paths added), the token
/// in a file only root reads, as the README tells.
pub fn join(c: &mut Cluster, i: usize, command: &str, extra: &[&str]) {
    use std::os::unix::fs::OpenOptionsExt;
    let (token, address) = token_and_address(command);
    let file = c.log_dir().join(format!("join-token-h{i}"));
    let _ = std::fs::remove_file(&file);
    std::io::Write::write_all(
        &mut std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .unwrap(),
        format!("{token}\n").as_bytes(),
    )
    .unwrap();
    c.host_mut(i)
        .start_agent_command(
            &["join", "--token-file", file.to_str().unwrap(), &address],
            extra,
        )
        .unwrap();
}

/// The nodes host `i` sees Ready (none while its agent does not answer).
pub fn ready(c: &Cluster, i: usize) -> BTreeSet<String> {
    let nodes: serde_json::Value = c.host(i).meshctl_json(&["node", "ls"]).unwrap_or_default();
    nodes
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|n| n["status"] == "Ready")
                .filter_map(|n| n["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The node names of `hosts`.
pub fn names(c: &Cluster, hosts: &[usize]) -> BTreeSet<String> {
    hosts
        .iter()
        .map(|i| c.host(*i).node_name().to_owned())
        .collect()
}

/// Waits until each of `observers` sees exactly `expected` Ready.
pub fn wait_ready(c: &Cluster, observers: &[usize], expected: &[usize], timeout: Duration) {
    let want = names(c, expected);
    for i in observers {
        c.eventually(timeout, &format!("host{i} sees {want:?} Ready"), |c| {
            Ok((ready(c, *i) == want).then_some(()))
        })
        .unwrap();
    }
}
