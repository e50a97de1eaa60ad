//! `service logs` across the cluster, as a user reads it: three tasks on three nodes, read
//! from a fourth that runs none; Docker's prefixes, `--details`, `--tail`, `--since`, `-t`,
//! `--raw`, `-f` with a line written after it started; a node that does not answer gives a
//! warning, not a hang; and nobody without the cluster key gets anything from the
//! node-to-node path.

use std::{
    io::{Read, Write},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::{Cluster, cluster::bin};
use serde_json::Value;

const SCRIPT: &str = "echo first from $MESH_TASK_SLOT; echo second from $MESH_TASK_SLOT; \
     sleep 1.5; echo third from $MESH_TASK_SLOT; \
     while [ ! -e $TRIGGER ]; do sleep 0.2; done; echo late from $MESH_TASK_SLOT; exec sleep 1000";

fn logs(c: &Cluster, host: usize, args: &[&str]) -> (String, String) {
    let mut all = vec!["service", "logs"];
    all.extend_from_slice(args);
    let out = c.host(host).meshctl(&all).unwrap();
    assert!(out.status.success(), "{out:?}");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn service_logs_reads_every_node() {
    let mut c = Cluster::new(4).unwrap();
    // Sealed by the harness's cluster key, like every test cluster.
    c.start_agents().unwrap();
    // Placed once every node is Ready, so the tasks spread over three nodes and stay there.
    c.eventually(Duration::from_secs(20), "4 nodes Ready", |c| {
        let nodes: Vec<Value> = c.host(1).meshctl_json(&["node", "ls"])?;
        Ok((nodes.iter().filter(|n| n["status"] == "Ready").count() == 4).then_some(()))
    })
    .unwrap();
    let trigger = c.log_dir().join("trigger");
    let reader = c.host(4).node_name().to_owned();
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "--name",
            "talk",
            "--replicas",
            "3",
            "--constraint",
            &format!("node.id!={reader}"),
            "--env",
            &format!("TRIGGER={}", trigger.display()),
            "--env",
            "REGION=eu west",
            "--env",
            "UNLISTED=x",
            // What each line carries, for --details (json-file's options).
            "--log-opt",
            "env=REGION",
            "--log-opt",
            "env-regex=^TRIG",
            "-d",
            "--process",
            "--",
            "/bin/sh",
            "-c",
            SCRIPT,
        ])
        .unwrap();
    // Every task has written its third line.
    let tasks: Vec<Value> = c
        .eventually(Duration::from_secs(30), "3 tasks wrote 3 lines", |c| {
            let rows: Vec<Value> = c.host(4).meshctl_json(&["service", "ps", "talk"])?;
            let rows: Vec<Value> = rows.into_iter().filter(|r| r["history"] == false).collect();
            let running = rows.iter().filter(|r| r["state"] == "Running").count();
            let (out, _) = logs(c, 4, &["talk"]);
            Ok((running == 3 && out.matches("third from").count() == 3).then_some(rows))
        })
        .unwrap();
    let mut nodes: Vec<&str> = tasks.iter().map(|t| t["node"].as_str().unwrap()).collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), 3, "one task per node: {tasks:?}");
    assert!(!nodes.contains(&reader.as_str()));

    // Docker's prefix and every task's lines, those of the tasks that run now and of any
    // that ran before (Docker shows both), each with its own node.
    let (out, err) = logs(&c, 4, &["talk"]);
    assert!(err.is_empty(), "no warning: {err}");
    let all: Vec<Value> = c.host(4).meshctl_json(&["service", "ps", "talk"]).unwrap();
    let prefix = |t: &Value| {
        let id = t["id"].as_str().unwrap();
        format!(
            "talk.{}.{}@{}    | ",
            t["slot"].as_str().unwrap(),
            &id[..id.len().min(12)],
            t["node"].as_str().unwrap()
        )
    };
    let lines: Vec<&str> = out.lines().collect();
    for t in &tasks {
        let slot = t["slot"].as_str().unwrap();
        for word in ["first", "second", "third"] {
            let want = format!("{}{word} from {slot}", prefix(t));
            assert!(
                lines.contains(&want.as_str()),
                "{want:?} in\n{out}\nps: {all:?}"
            );
        }
    }
    let printed: Vec<&Value> = all
        .iter()
        .filter(|t| lines.iter().any(|l| l.starts_with(&prefix(t))))
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| printed.iter().any(|t| l.starts_with(&prefix(t)))),
        "every line is a task's of `service ps`:\n{out}\nps: {all:?}"
    );

    // --details: the variables the log options name, after the prefix, from every node.
    let (out, _) = logs(&c, 4, &["--details", "talk"]);
    for t in &tasks {
        let want = format!(
            "{}REGION=eu west,TRIGGER={} first from {}",
            prefix(t),
            trigger.display(),
            t["slot"].as_str().unwrap()
        );
        assert!(out.lines().any(|l| l == want), "{want:?} in\n{out}");
    }
    assert!(!out.contains("UNLISTED"), "{out}");

    // --tail 1: the last line of each task.
    let (out, _) = logs(&c, 4, &["--tail", "1", "talk"]);
    assert_eq!(out.lines().count(), printed.len(), "{out}");
    for t in &tasks {
        let want = format!("{}third from {}", prefix(t), t["slot"].as_str().unwrap());
        assert!(out.lines().any(|l| l == want), "{want:?} in\n{out}");
    }

    // -t: Docker's RFC3339 nanos first; --since the third lines' time leaves the rest out.
    let (out, _) = logs(&c, 4, &["-t", "talk"]);
    let third_at = out
        .lines()
        .filter(|l| l.contains("third from"))
        .map(|l| l.split_once(' ').unwrap().0.to_owned())
        .max()
        .unwrap();
    assert_eq!(
        third_at.len(),
        "2014-09-16T06:17:46.000000000Z".len(),
        "{out}"
    );
    assert!(third_at.ends_with('Z'), "{third_at}");
    // Merged by time across the nodes (the format sorts as text).
    let times: Vec<&str> = out.lines().map(|l| l.split_once(' ').unwrap().0).collect();
    assert_eq!(times.len(), lines.len(), "{out}");
    assert!(times.is_sorted(), "merged by time:\n{out}");
    // The last task's third line is the last line written: --since its time shows it alone.
    let (out, _) = logs(&c, 4, &["--since", &third_at, "talk"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("| third from"), "{out}");

    // --raw: the lines alone; a task id: that task alone, with its prefix.
    let (out, _) = logs(&c, 4, &["--raw", "talk"]);
    assert_eq!(out.lines().count(), lines.len(), "{out}");
    assert!(
        out.lines()
            .all(|l| l.contains(" from ") && !l.contains('|')),
        "{out}"
    );
    let one = tasks[0]["id"].as_str().unwrap();
    let (out, _) = logs(&c, 4, &["--no-trunc", one]);
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(
        out.lines().all(|l| l.contains(&format!(".{one}@"))),
        "{out}"
    );

    // -f: a line written after it started shows up, from every node.
    let mut follow = Command::new(bin("meshctl"))
        .arg("--socket")
        .arg(c.host(4).socket())
        .args(["service", "logs", "-f", "--tail", "0", "talk"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    std::fs::write(&trigger, "").unwrap();
    // A task that starts while following joins the stream.
    c.host(1)
        .meshctl_ok(&["service", "scale", "-d", "talk=4"])
        .unwrap();
    let mut stdout = follow.stdout.take().unwrap();
    let seen = std::thread::spawn(move || {
        let mut got = String::new();
        let mut buf = [0u8; 4096];
        while got.matches("late from").count() < 4 {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        got
    });
    let deadline = Instant::now() + Duration::from_secs(25);
    while !seen.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let got = seen.join().unwrap();
    assert_eq!(got.matches("late from").count(), 4, "followed:\n{got}");
    assert!(
        !got.contains("first from 1") && got.contains("| first from 4"),
        "--tail 0 shows no old line, a new task all of its own:\n{got}"
    );

    // A node that stops answering: its task is left out with a warning, within a deadline.
    let stopped = c.host(3).node_name().to_owned();
    let pid = c.host(3).agent_pid().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let started = Instant::now();
    let (out, err) = logs(&c, 4, &["talk"]);
    let took = started.elapsed();
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(
        err.contains("warning:") && err.contains(&stopped),
        "a warning naming {stopped}: {err}"
    );
    assert!(!out.contains(&format!("@{stopped} ")), "{out}");
    for t in tasks.iter().filter(|t| t["node"] != stopped.as_str()) {
        assert!(
            out.contains(&prefix(t)),
            "the other tasks still show: {out}"
        );
    }
}

/// Someone on the underlay without the key: a plain request, garbage, or a frame in the
/// sealed format under another key get nothing back but a closed connection.
#[test]
fn outsiders_cannot_read_logs() {
    let mut c = Cluster::new(2).unwrap();
    // Sealed by the harness's cluster key, like every test cluster.
    c.start_agents().unwrap();
    c.host(1)
        .meshctl_ok(&[
            "service",
            "create",
            "--name",
            "secret",
            "--replicas",
            "2",
            "-d",
            "--process",
            "--",
            "/bin/sh",
            "-c",
            "echo the-secret-line; exec sleep 1000",
        ])
        .unwrap();
    // Members read each other's tasks through the path.
    c.eventually(Duration::from_secs(30), "both tasks' lines", |c| {
        let (out, _) = logs(c, 1, &["--raw", "secret"]);
        Ok((out.matches("the-secret-line").count() == 2).then_some(()))
    })
    .unwrap();
    let addr: std::net::SocketAddr = format!("{}:7946", c.host(2).ip).parse().unwrap();
    let plain = serde_json::json!({
        "service": "secret", "tasks": [], "query": {"follow": false}
    })
    .to_string();
    // 'm', 1, a key id, a sender id, a time, a nonce, then bytes no key of ours sealed.
    let mut forged = vec![b'm', 1];
    forged.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0xde, 0xad, 0xbe, 0xef]);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    forged.extend_from_slice(&now_ms.to_be_bytes());
    forged.extend_from_slice(&[7u8; 24]);
    forged.extend_from_slice(plain.as_bytes());
    forged.extend_from_slice(&[0u8; 16]);
    let spy = c.external("spy", 200).unwrap();
    for attempt in [plain.clone().into_bytes(), vec![0xff; 64], forged] {
        let answer = spy
            .run(move || {
                let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                    .expect("the node-to-node API listens");
                s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                s.write_all(&(attempt.len() as u32).to_be_bytes()).unwrap();
                s.write_all(&attempt).unwrap();
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got);
                got
            })
            .unwrap();
        assert!(answer.is_empty(), "an outsider got {} bytes", answer.len());
    }
}
