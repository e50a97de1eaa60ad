//! `service logs SERVICE|TASK`: the flags read as Docker reads them, and each line printed
//! with Docker's prefix (`web.1.<task id>@<node>    | `).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use clap::Args;
use mesh_api::{
    Client,
    v1::{LogEvent, LogLine, LogsQuery, ServiceTaskInfo, format_timestamp, parse_timestamp},
};

#[derive(Args, Clone, Debug)]
pub struct LogsArgs {
    /// A service, or a task id (`service ps` shows them).
    pub name: String,
    /// Follow log output.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Number of lines to show from the end of each task's logs (`all`, or a number).
    #[arg(long, short = 'n', default_value = "all")]
    pub tail: String,
    /// Show logs since a time (2013-01-02T13:23:37Z), for a duration (42m), or since a Unix
    /// timestamp (1360000000).
    #[arg(long)]
    pub since: Option<String>,
    /// Show timestamps.
    #[arg(long, short = 't')]
    pub timestamps: bool,
    /// Do not neatly format logs.
    #[arg(long)]
    pub raw: bool,
    /// Do not include task IDs in output.
    #[arg(long)]
    pub no_task_ids: bool,
    /// Do not truncate output.
    #[arg(long)]
    pub no_trunc: bool,
    /// Show extra details provided to logs (the labels and environment variables the
    /// service's `--log-opt labels=…,env=…` name).
    #[arg(long)]
    pub details: bool,
}

/// `--tail`: `all` or a count; a negative count means all, as for Docker.
pub fn parse_tail(s: &str) -> Result<Option<u64>> {
    if s == "all" {
        return Ok(None);
    }
    match s.parse::<i64>() {
        Ok(n) if n < 0 => Ok(None),
        Ok(n) => Ok(Some(n as u64)),
        Err(_) => bail!("invalid value {s:?} for --tail: give a number of lines or `all`"),
    }
}

/// `--since`: an RFC3339 time, a duration before `now`, or a Unix timestamp (seconds, with an
/// optional fraction), as ns since the epoch.
pub fn parse_since(s: &str, now: SystemTime) -> Result<i64> {
    let ns_of = |t: SystemTime| t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64);
    if let Some((secs, frac)) = unix_timestamp(s) {
        return Ok(secs * 1_000_000_000 + frac);
    }
    if let Some(t) = parse_timestamp(s) {
        return Ok(t);
    }
    if let Ok(d) = humantime::parse_duration(s) {
        let t = now.checked_sub(d).unwrap_or(UNIX_EPOCH);
        return Ok(ns_of(t).unwrap_or(0));
    }
    bail!(
        "invalid value {s:?} for --since: give a duration (10m, 1h30m), an RFC3339 time \
         (2026-01-02T15:04:05Z) or a Unix timestamp (1767366245)"
    )
}

/// `1360000000` or `1360000000.5`: seconds and nanoseconds.
fn unix_timestamp(s: &str) -> Option<(i64, i64)> {
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos = format!("{frac:0<9}").parse::<i64>().ok()?;
    Some((secs.parse().ok()?, nanos))
}

/// How lines are printed.
pub struct Format {
    pub timestamps: bool,
    pub raw: bool,
    pub task_ids: bool,
    pub trunc: bool,
    /// Docker's `--details`: each line's attributes, `key=value` sorted and joined by commas,
    /// then a space (also when there are none, as Docker prints it).
    pub details: bool,
    /// The width slots are padded to (Docker pads to the widest slot number).
    pub slot_width: usize,
}

impl Format {
    pub fn prefix(&self, l: &LogLine) -> String {
        let mut name = format!("{}.{}", l.service, l.slot);
        if self.task_ids {
            name.push('.');
            name.push_str(if self.trunc && l.task.len() > 12 {
                &l.task[..12]
            } else {
                &l.task
            });
        }
        let pad = self.slot_width.saturating_sub(l.slot.len());
        format!("{name}@{}{}", l.node, " ".repeat(pad))
    }

    pub fn line(&self, l: &LogLine) -> String {
        let mut out = String::new();
        if self.timestamps {
            out.push_str(&format_timestamp(l.time_ns));
            out.push(' ');
        }
        if !self.raw {
            out.push_str(&self.prefix(l));
            out.push_str("    | ");
        }
        if self.details {
            let attrs: Vec<String> = l.attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&attrs.join(","));
            out.push(' ');
        }
        out.push_str(&l.line);
        out
    }
}

pub async fn run(client: &Client, a: &LogsArgs) -> Result<()> {
    let query = LogsQuery {
        follow: a.follow,
        tail: parse_tail(&a.tail)?,
        since_ns: a
            .since
            .as_deref()
            .map(|s| parse_since(s, SystemTime::now()))
            .transpose()?,
    };
    // Slot numbers line up as Docker's do; a task id (not a service) has one slot.
    let rows: Vec<ServiceTaskInfo> = client
        .get(&format!("/v1/services/{}/tasks", a.name))
        .await
        .unwrap_or_default();
    let format = Format {
        timestamps: a.timestamps,
        raw: a.raw,
        task_ids: !a.no_task_ids,
        trunc: !a.no_trunc,
        details: a.details,
        slot_width: rows
            .iter()
            .filter(|r| r.slot.bytes().all(|b| b.is_ascii_digit()))
            .map(|r| r.slot.len())
            .max()
            .unwrap_or(0),
    };
    let mut path = format!("/v1/services/{}/logs?follow={}", a.name, query.follow);
    if let Some(n) = query.tail {
        path.push_str(&format!("&tail={n}"));
    }
    if let Some(t) = query.since_ns {
        path.push_str(&format!("&since_ns={t}"));
    }
    let mut partial: Vec<u8> = Vec::new();
    let mut failed = None;
    client
        .stream(&path, |chunk| {
            use std::io::Write;
            partial.extend_from_slice(chunk);
            let Some(end) = partial.iter().rposition(|b| *b == b'\n') else {
                return;
            };
            let rest = partial.split_off(end + 1);
            let mut out = std::io::stdout().lock();
            for raw in partial.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                match serde_json::from_slice::<LogEvent>(raw) {
                    Ok(LogEvent::Line(l)) => {
                        let _ = writeln!(out, "{}", format.line(&l));
                    }
                    Ok(LogEvent::Warning(w)) => eprintln!("warning: {w}"),
                    Err(e) => failed = Some(e),
                }
            }
            let _ = out.flush();
            partial = rest;
        })
        .await?;
    if let Some(e) = failed {
        bail!("the agent sent a log event this meshctl cannot read ({e}): is it the same version?");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn line() -> LogLine {
        LogLine {
            service: "my-web".into(),
            slot: "1".into(),
            task: "0123456789abcdef".into(),
            node: "node-2".into(),
            time_ns: 1_410_848_266_000_000_000,
            line: "hello".into(),
            attrs: Default::default(),
        }
    }

    fn format() -> Format {
        Format {
            timestamps: false,
            raw: false,
            task_ids: true,
            trunc: true,
            details: false,
            slot_width: 2,
        }
    }

    #[test]
    fn prefix_is_dockers() {
        let f = format();
        assert_eq!(f.line(&line()), "my-web.1.0123456789ab@node-2     | hello");
        let mut l = line();
        l.slot = "10".into();
        assert_eq!(f.line(&l), "my-web.10.0123456789ab@node-2    | hello");
        let f = Format {
            trunc: false,
            slot_width: 1,
            ..format()
        };
        assert_eq!(
            f.line(&line()),
            "my-web.1.0123456789abcdef@node-2    | hello"
        );
        let f = Format {
            task_ids: false,
            slot_width: 1,
            ..format()
        };
        assert_eq!(f.line(&line()), "my-web.1@node-2    | hello");
    }

    #[test]
    fn timestamps_lead_and_raw_drops_the_prefix() {
        let f = Format {
            timestamps: true,
            slot_width: 1,
            ..format()
        };
        assert_eq!(
            f.line(&line()),
            "2014-09-16T06:17:46.000000000Z my-web.1.0123456789ab@node-2    | hello"
        );
        let f = Format {
            raw: true,
            ..format()
        };
        assert_eq!(f.line(&line()), "hello");
        let f = Format {
            raw: true,
            timestamps: true,
            ..format()
        };
        assert_eq!(f.line(&line()), "2014-09-16T06:17:46.000000000Z hello");
    }

    #[test]
    fn details_follow_the_prefix_as_dockers_do() {
        let f = Format {
            details: true,
            slot_width: 1,
            ..format()
        };
        // None: Docker still prints the (empty) details and their space.
        assert_eq!(f.line(&line()), "my-web.1.0123456789ab@node-2    |  hello");
        let mut l = line();
        l.attrs = [("team", "web"), ("REGION", "eu")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        assert_eq!(
            f.line(&l),
            "my-web.1.0123456789ab@node-2    | REGION=eu,team=web hello"
        );
        assert_eq!(
            Format {
                details: false,
                ..f
            }
            .line(&l),
            "my-web.1.0123456789ab@node-2    | hello",
            "without --details, nothing shows"
        );
    }

    #[test]
    fn since_reads_durations_times_and_unix_timestamps() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(parse_since("10m", now).unwrap(), 9_400 * 1_000_000_000);
        assert_eq!(parse_since("1h30m", now).unwrap(), 4_600 * 1_000_000_000);
        assert_eq!(
            parse_since("1360000000", now).unwrap(),
            1_360_000_000 * 1_000_000_000
        );
        assert_eq!(
            parse_since("1360000000.25", now).unwrap(),
            1_360_000_000 * 1_000_000_000 + 250_000_000
        );
        assert_eq!(
            parse_since("2014-09-16T06:17:46Z", now).unwrap(),
            1_410_848_266 * 1_000_000_000
        );
        assert_eq!(
            parse_since("2014-09-16T08:17:46+02:00", now).unwrap(),
            1_410_848_266 * 1_000_000_000
        );
        let e = parse_since("yesterday", now).unwrap_err().to_string();
        assert!(e.contains("--since"), "{e}");
    }

    #[test]
    fn tail_is_all_or_a_count() {
        assert_eq!(parse_tail("all").unwrap(), None);
        assert_eq!(parse_tail("-1").unwrap(), None);
        assert_eq!(parse_tail("5").unwrap(), Some(5));
        assert!(parse_tail("five").is_err());
    }
}
