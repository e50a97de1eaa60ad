//! `meshctl --format json events` run in the background, as a user watching the cluster does,
//! and read with a deadline for every line.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{Host, cluster::bin};

/// A running `meshctl --format json events ARGS…` and the events it printed.
pub struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every event read so far, in order.
    pub seen: Vec<Value>,
}

impl Follower {
    pub fn start(h: &Host, args: &[&str]) -> Self {
        let mut child = Command::new(bin("meshctl"))
            .arg("--socket")
            .arg(h.socket())
            .args(["--format", "json", "events"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    fn push(&mut self, line: &str) -> Value {
        let e: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        self.seen.push(e.clone());
        e
    }

    /// Waits until `want` (`(type, action, actor)`, actor `*` for any) have been printed in
    /// this order, other events in between allowed; returns the matched ones.
    pub fn expect(&mut self, want: &[(&str, &str, &str)], timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut matched = Vec::new();
        let first = self.seen.len();
        while matched.len() < want.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "no {:?} within {timeout:?}; read {:#?}",
                    &want[matched.len()..],
                    &self.seen[first..]
                )
            });
            let e = self.push(&line);
            let (t, a, actor) = want[matched.len()];
            if e["type"] == t && e["action"] == a && (actor == "*" || e["actor"] == actor) {
                matched.push(e);
            }
        }
        matched
    }

    /// Reads what else arrives until nothing has for `quiet`.
    pub fn settle(&mut self, quiet: Duration) {
        while let Ok(line) = self.lines.recv_timeout(quiet) {
            self.push(&line);
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
