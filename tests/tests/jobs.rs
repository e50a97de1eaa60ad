//! Jobs as Swarm 20.10 runs them, end to end on real agents: a replicated job of 3 with
//! `--max-concurrent 1` runs its tasks one at a time until 3 completed (`service ls` ends at
//! Docker's `0/1 (3/3 completed)`), a global job completes once on every node, a failing
//! job task is retried by the restart policy until its attempts are used, `service update
//! --force` runs a job again, and what Docker refuses for jobs is refused in its words.
//! Concurrency is checked twice: in `service ps` and in the kernel's process table.

use std::{
    collections::BTreeSet,
    process::{Child, Command},
    time::{Duration, Instant},
};

use mesh_tests::{Cluster, Host, cluster::bin};
use serde_json::Value;

fn ls(h: &Host, name: &str) -> Value {
    let all: Vec<Value> = h.meshctl_json(&["service", "ls"]).unwrap();
    all.into_iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no service {name} in service ls"))
}

fn ps(h: &Host, name: &str) -> Vec<Value> {
    h.meshctl_json(&["service", "ps", name]).unwrap()
}

/// The `service ls` table row of `name`.
fn ls_row(h: &Host, name: &str) -> String {
    h.meshctl_ok(&["service", "ls"])
        .unwrap()
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no row for {name}"))
        .to_owned()
}

/// Live shells whose command line holds `token`: the job's tasks as the kernel runs them.
fn shells_with(token: &str) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // The state follows the command's closing parenthesis; a zombie has ended.
            let zombie = stat
                .rsplit_once(") ")
                .is_some_and(|(_, s)| s.starts_with('Z'));
            args.first().is_some_and(|a| a.ends_with("sh"))
                && args.iter().any(|a| a.contains(token))
                && !zombie
        })
        .count()
}

/// Current rows of `service ps` in state Running.
fn running_rows(rows: &[Value]) -> usize {
    rows.iter()
        .filter(|r| r["history"] == false && r["state"] == "Running")
        .count()
}

/// Polls `service ps` and the process table until `done` says the job is over (or
/// `timeout`), returning the most tasks each showed running at once.
fn watch(
    h: &Host,
    name: &str,
    token: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
) -> (usize, usize) {
    let deadline = Instant::now() + timeout;
    let (mut in_ps, mut in_kernel) = (0, 0);
    loop {
        in_kernel = in_kernel.max(shells_with(token));
        in_ps = in_ps.max(running_rows(&ps(h, name)));
        if done() {
            return (in_ps, in_kernel);
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not finish in {timeout:?}: {:#?}",
            ps(h, name)
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}

fn meshctl_child(h: &Host, args: &[&str]) -> Child {
    Command::new(bin("meshctl"))
        .arg("--socket")
        .arg(h.socket())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn jobs_run_to_completion_as_swarm_runs_them() {
    let mut c = Cluster::new(3).unwrap();
    c.start_agents().unwrap();
    let h1 = c.host(1);
    let token = format!("mesh-jobs-test-{}", std::process::id());

    // --- A replicated job: 3 completions, one at a time. ---
    let migrate = format!(": {token}-migrate; sleep 1; exit 0");
    h1.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "migrate",
        "--mode",
        "replicated-job",
        "--replicas",
        "3",
        "--max-concurrent",
        "1",
        "-d",
        "--process",
        "--",
        "/bin/sh",
        "-c",
        &migrate,
    ])
    .unwrap();
    let (in_ps, in_kernel) = watch(
        h1,
        "migrate",
        &format!("{token}-migrate"),
        Duration::from_secs(40),
        || ls(h1, "migrate")["completed"] == 3,
    );
    assert_eq!(in_ps, 1, "service ps never shows more than 1 running");
    assert_eq!(in_kernel, 1, "the kernel never runs more than 1 task");
    let s = ls(h1, "migrate");
    assert_eq!(
        (s["running"].clone(), s["desired"].clone()),
        (0.into(), 1.into())
    );
    let row = ls_row(h1, "migrate");
    assert!(
        row.contains("replicated job") && row.contains("0/1 (3/3 completed)"),
        "Docker's MODE and REPLICAS: {row}"
    );
    let rows = ps(h1, "migrate");
    assert_eq!(
        rows.len(),
        3,
        "one task per completion, none restarted: {rows:#?}"
    );
    let slots: BTreeSet<&str> = rows.iter().map(|r| r["slot"].as_str().unwrap()).collect();
    assert_eq!(slots, BTreeSet::from(["1", "2", "3"]));
    for r in &rows {
        assert_eq!(
            (&r["state"], &r["desired"]),
            (&"Complete".into(), &"Complete".into())
        );
    }
    let table = h1.meshctl_ok(&["service", "ps", "migrate"]).unwrap();
    assert!(
        table
            .lines()
            .skip(1)
            .all(|l| l.contains("Complete") && l.contains("ago")),
        "Docker's `Complete 2 seconds ago`: {table}"
    );
    // Every node sees the same: the job is done, nothing starts again.
    std::thread::sleep(Duration::from_secs(2));
    for h in c.hosts() {
        assert!(
            ls_row(h, "migrate").contains("0/1 (3/3 completed)"),
            "{}",
            h.node_name()
        );
        assert_eq!(ps(h, "migrate").len(), 3);
    }
    assert_eq!(shells_with(&format!("{token}-migrate")), 0);

    // --- A global job: once on every node. ---
    let backup = format!(": {token}-backup; sleep 0.5");
    h1.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "backup",
        "--mode",
        "global-job",
        "-d",
        "--process",
        "--",
        "/bin/sh",
        "-c",
        &backup,
    ])
    .unwrap();
    c.eventually(
        Duration::from_secs(30),
        "backup completed on 3 nodes",
        |_| Ok((ls(h1, "backup")["completed"] == 3).then_some(())),
    )
    .unwrap();
    let rows = ps(h1, "backup");
    let nodes: BTreeSet<&str> = rows.iter().map(|r| r["node"].as_str().unwrap()).collect();
    let all: BTreeSet<&str> = c.hosts().iter().map(|h| h.node_name()).collect();
    assert_eq!(nodes, all, "one task on each node: {rows:#?}");
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["state"] == "Complete"));
    let row = ls_row(h1, "backup");
    assert!(
        row.contains("global job") && row.contains("0/0 (3/3 completed)"),
        "{row}"
    );

    // --- A failing job task: retried by the restart policy, up to its attempts. ---
    h1.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "flaky",
        "--mode",
        "replicated-job",
        "--restart-max-attempts",
        "2",
        "--restart-delay",
        "300ms",
        "-d",
        "--process",
        "--",
        "/bin/sh",
        "-c",
        "sleep 0.3; exit 3",
    ])
    .unwrap();
    c.eventually(Duration::from_secs(20), "flaky used its attempts", |_| {
        let rows = ps(h1, "flaky");
        Ok((rows.len() == 3 && rows.iter().all(|r| r["state"] == "Failed")).then_some(()))
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let rows = ps(h1, "flaky");
    assert_eq!(
        rows.len(),
        3,
        "no restart past --restart-max-attempts: {rows:#?}"
    );
    assert!(
        rows.iter().all(|r| r["error"]
            .as_str()
            .unwrap()
            .starts_with("task: non-zero exit (3)")),
        "{rows:#?}"
    );
    assert!(ls_row(h1, "flaky").contains("0/1 (0/1 completed)"));

    // --- update --force runs the job again, followed to Docker's `job complete`. ---
    let mut update = meshctl_child(h1, &["service", "update", "--force", "migrate"]);
    let mut finished = None;
    let (in_ps, in_kernel) = watch(
        h1,
        "migrate",
        &format!("{token}-migrate"),
        Duration::from_secs(60),
        || {
            finished = finished.take().or_else(|| update.try_wait().unwrap());
            finished.is_some()
        },
    );
    let out = update.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("job progress: 3 out of 3 complete"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("job complete"), "{stdout}");
    assert!(
        in_ps <= 1 && in_kernel == 1,
        "ps {in_ps}, kernel {in_kernel}"
    );
    let rows = ps(h1, "migrate");
    let complete = rows.iter().filter(|r| r["state"] == "Complete").count();
    assert_eq!(
        complete, 6,
        "the first run's 3 and the new run's 3: {rows:#?}"
    );
    assert!(ls_row(h1, "migrate").contains("0/1 (3/3 completed)"));

    // --- What Docker refuses for jobs, refused in its words, and nothing changes. ---
    let version = |h: &Host| ls(h, "migrate")["spec"]["version"].clone();
    let before = version(h1);
    for (args, says) in [
        (
            &[
                "service",
                "create",
                "--name",
                "bad",
                "--mode",
                "global-job",
                "--replicas",
                "2",
                "--process",
                "--",
                "true",
            ][..],
            "replicas can only be used with replicated or replicated-job mode",
        ),
        (
            &[
                "service",
                "create",
                "--name",
                "bad",
                "--mode",
                "replicated-job",
                "--update-parallelism",
                "2",
                "--process",
                "--",
                "true",
            ][..],
            "update and rollback configuration is not supported for jobs",
        ),
        (
            &["service", "scale", "backup=2"][..],
            "scale can only be used with replicated or replicated-job mode",
        ),
        (
            &["service", "update", "--replicas", "4", "migrate"][..],
            "replicas can only be used with replicated mode",
        ),
        (
            &["service", "update", "--update-parallelism", "2", "migrate"][..],
            "update and rollback configuration is not supported for jobs",
        ),
    ] {
        let out = h1.meshctl(args).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{args:?}: {stderr}"
        );
    }
    let names: Vec<Value> = h1.meshctl_json(&["service", "ls"]).unwrap();
    assert!(names.iter().all(|s| s["name"] != "bad"));
    assert_eq!(version(h1), before, "a refused command changes nothing");
}

/// Compose's `deploy.mode: replicated-job|global-job` through `stack deploy`: the jobs run
/// to completion; the same file again runs nothing, a changed one runs the job again.
#[test]
fn a_stack_deploys_jobs() {
    let mut c = Cluster::new(2).unwrap();
    c.start_agents().unwrap();
    let h1 = c.host(1);
    let token = format!("mesh-jobs-stack-{}", std::process::id());
    let file = c.log_dir().join("jobs-compose.yml");
    let write = |step: &str| {
        let text = format!(
            r#"services:
  migrate:
    command: ["/bin/sh", "-c", ": {token}; sleep 0.5"]
    environment: {{ STEP: "{step}" }}
    deploy: {{ mode: replicated-job, replicas: 2 }}
  warm:
    command: ["/bin/sh", "-c", ": {token}; sleep 0.3"]
    deploy: {{ mode: global-job }}
"#
        );
        std::fs::write(&file, text).unwrap();
    };
    write("1");
    let f = file.to_str().unwrap();
    h1.meshctl_ok(&["stack", "deploy", "-c", f, "st"]).unwrap();
    // Completed, and nothing of them still running anywhere (a copy of a slot that two
    // nodes started while their views differed stops once the slot completed).
    let over = |name: &str| {
        ps(h1, name)
            .iter()
            .all(|r| ["Complete", "Shutdown", "Failed"].contains(&r["state"].as_str().unwrap()))
    };
    c.eventually(Duration::from_secs(30), "both jobs completed", |_| {
        Ok((ls(h1, "st_migrate")["completed"] == 2
            && ls(h1, "st_warm")["completed"] == 2
            && over("st_migrate")
            && over("st_warm"))
        .then_some(()))
    })
    .unwrap();
    assert!(ls_row(h1, "st_migrate").contains("replicated job"));
    let services = h1.meshctl_ok(&["stack", "services", "st"]).unwrap();
    assert!(
        services.contains("0/2 (2/2 completed)") && services.contains("0/0 (2/2 completed)"),
        "{services}"
    );
    // The same file: nothing runs again.
    let before = ps(h1, "st_migrate");
    let out = h1.meshctl_ok(&["stack", "deploy", "-c", f, "st"]).unwrap();
    assert!(!out.contains("Updating service"), "{out}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ps(h1, "st_migrate"), before);
    assert_eq!(ps(h1, "st_warm").len(), 2);
    // A changed job runs again; the unchanged one does not.
    write("2");
    h1.meshctl_ok(&["stack", "deploy", "-c", f, "st"]).unwrap();
    c.eventually(Duration::from_secs(30), "migrate ran again", |_| {
        let complete = ps(h1, "st_migrate")
            .iter()
            .filter(|r| r["state"] == "Complete")
            .count();
        Ok(
            (complete >= 4 && ls(h1, "st_migrate")["completed"] == 2 && over("st_migrate"))
                .then_some(()),
        )
    })
    .unwrap();
    assert_eq!(ps(h1, "st_warm").len(), 2);
    assert_eq!(shells_with(&token), 0);
}
