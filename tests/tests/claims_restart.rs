//! The README's restart policy, end to end ("Self-healing"): `--restart-condition
//! on-failure` restarts a task that fails and leaves one that exits 0 Complete,
//! `--restart-max-attempts` leaves the slot down with the reason in `service ps`,
//! `--restart-window` stops counting attempts older than the window, and
//! `--restart-condition none` keeps a failed task down. Every service runs on one cluster;
//! the checks are `service ps` rows as a user reads them.

use std::time::Duration;

use mesh_tests::{Cluster, Host};
use serde_json::Value;

/// `service create NAME --replicas 1 ARGS… -d -- /bin/sh -c SCRIPT` from host1.
fn create(c: &Cluster, name: &str, args: &[&str], script: &str) {
    let mut cmd = vec!["service", "create", name, "--replicas", "1"];
    cmd.extend_from_slice(args);
    cmd.extend(["-d", "--", "/bin/sh", "-c", script]);
    c.host(1).meshctl_ok(&cmd).unwrap();
}

fn ps(h: &Host, name: &str) -> Vec<Value> {
    h.meshctl_json(&["service", "ps", name]).unwrap()
}

fn states(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|r| r["state"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn restart_policies_do_what_the_readme_says() {
    let mut c = Cluster::new(2).unwrap();
    c.start_agents().unwrap();
    let delay = ["--restart-delay", "300ms"];
    // on-failure: exit 0 stays Complete; exit 3 is restarted (unbounded here).
    create(
        &c,
        "done",
        &[&["--restart-condition", "on-failure"][..], &delay].concat(),
        "sleep 0.5; exit 0",
    );
    create(
        &c,
        "flaky",
        &[&["--restart-condition", "on-failure"][..], &delay].concat(),
        "sleep 0.5; exit 3",
    );
    // At most 2 restarts: 3 tasks, then the slot stays down and says why.
    create(
        &c,
        "capped",
        &[&["--restart-max-attempts", "2"][..], &delay].concat(),
        "sleep 0.3; exit 3",
    );
    // One restart per 1 s window, but each task outlives the window: every failure starts a
    // new window, so restarts go on past the one attempt.
    create(
        &c,
        "windowed",
        &[
            &["--restart-max-attempts", "1", "--restart-window", "1s"][..],
            &delay,
        ]
        .concat(),
        "sleep 1.3; exit 3",
    );
    // none: a failed task stays down, well past the restart delay.
    create(
        &c,
        "once",
        &[&["--restart-condition", "none"][..], &delay].concat(),
        "sleep 0.3; exit 3",
    );

    let h2 = c.host(2);
    c.eventually(Duration::from_secs(20), "capped used its attempts", |_| {
        let rows = ps(h2, "capped");
        Ok((rows.len() == 3 && states(&rows).iter().all(|s| s == "Failed")).then_some(rows))
    })
    .unwrap();
    c.eventually(
        Duration::from_secs(20),
        "windowed restarted 3 times",
        |_| Ok((ps(h2, "windowed").len() >= 4).then_some(())),
    )
    .unwrap();
    // Several restart delays later: nothing more happened to the ones that stay down.
    std::thread::sleep(Duration::from_secs(2));

    let done = ps(h2, "done");
    assert_eq!(
        states(&done),
        ["Complete"],
        "exit 0 is not restarted: {done:?}"
    );
    let flaky = ps(h2, "flaky");
    assert!(
        flaky.len() >= 3
            && flaky
                .iter()
                .filter(|r| r["history"] == true)
                .all(|r| r["state"] == "Failed" && r["error"] == "task: non-zero exit (3)"),
        "exit 3 is restarted again and again: {flaky:?}"
    );

    let capped = ps(h2, "capped");
    assert_eq!(capped.len(), 3, "no third restart: {capped:?}");
    let current: Vec<&Value> = capped.iter().filter(|r| r["history"] == false).collect();
    assert_eq!(current.len(), 1, "{capped:?}");
    assert_eq!(
        current[0]["error"],
        "task: non-zero exit (3); not restarted: 2 restart attempts used (--restart-max-attempts)",
        "{capped:?}"
    );
    // The table cuts long errors as Docker's does; --no-trunc shows them whole.
    let table = c
        .host(1)
        .meshctl_ok(&["service", "ps", "--no-trunc", "capped"])
        .unwrap();
    assert!(table.contains("--restart-max-attempts"), "{table}");
    let ls = c.host(1).meshctl_ok(&["service", "ls"]).unwrap();
    assert!(
        ls.lines()
            .any(|l| l.contains("capped") && l.contains("0/1")),
        "{ls}"
    );

    let once = ps(h2, "once");
    assert_eq!(states(&once), ["Failed"], "{once:?}");
    assert_eq!(once[0]["error"], "task: non-zero exit (3)", "{once:?}");
}

/// A service whose tasks crash at once and restart without delay keeps getting addresses on
/// a small network: a dead task's endpoint (and so its address) leaves gossip as it exits.
/// Before, exits were handled one per reconcile pass and endpoints of dead tasks piled up
/// (25 s behind with eight tasks crash-looping), until the network had no free address and
/// every restart was rejected.
#[test]
fn a_crash_looping_service_does_not_run_its_network_out_of_addresses() {
    let mut c = Cluster::new(1).unwrap();
    c.start_agents().unwrap();
    let h = c.host(1);
    // 29 addresses for tasks: 8 crash-looping slots need at most 8 at a time.
    h.meshctl_ok(&["network", "create", "tight", "--subnet", "10.77.0.0/27"])
        .unwrap();
    h.meshctl_ok(&[
        "service",
        "create",
        "crashloop",
        "--network",
        "tight",
        "--replicas",
        "8",
        "--restart-delay",
        "0s",
        "-d",
        "--",
        "/bin/false",
    ])
    .unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let mut tasks = std::collections::BTreeSet::new();
    while std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_secs(2));
        let rows = ps(h, "crashloop");
        tasks.extend(
            rows.iter()
                .filter_map(|r| r["id"].as_str().map(str::to_owned)),
        );
        let attempts = tasks.len();
        let starved: Vec<&Value> = rows
            .iter()
            .filter(|r| {
                r["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("no free addresses"))
            })
            .collect();
        assert!(
            starved.is_empty(),
            "after {attempts} attempts, restarts found no address: {starved:#?}"
        );
    }
    // More tasks than the network has addresses: they were reused.
    assert!(tasks.len() > 29, "only {} tasks in 30 s", tasks.len());
}
