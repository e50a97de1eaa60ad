//! `service logs`: what a client asks for and the lines it gets back, one JSON object per
//! line of the response body. The same types travel between agents (sealed, see the agent's
//! `http::peer_logs`), so an agent answers for tasks on any node.

use serde::{Deserialize, Serialize};

/// Which output to send. Query string of `GET /v1/services/{name}/logs` (NAME may be a task
/// id, as Docker accepts one).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsQuery {
    #[serde(default)]
    pub follow: bool,
    /// The last N lines of each task (None: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<u64>,
    /// Only lines written at or after this time, ns since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ns: Option<i64>,
}

/// One line of a task's output, or a word about why some output is missing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogEvent {
    Line(LogLine),
    /// A node whose tasks' output could not be read (down, unreachable, refused).
    Warning(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub service: String,
    pub slot: String,
    /// The task's full id.
    pub task: String,
    pub node: String,
    /// When the line was written, ns since the Unix epoch.
    pub time_ns: i64,
    /// Without its newline; invalid UTF-8 is replaced.
    pub line: String,
    /// The container labels and environment variables the service's log options name
    /// (`--log-opt labels=…,env=…`): what `--details` shows.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub attrs: std::collections::BTreeMap<String, String>,
}

/// Docker's `-t` format (RFC3339 with nine fraction digits, UTC): `2014-09-16T06:17:46.000000000Z`.
pub fn format_timestamp(ns: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_nanos(t).to_string()
}

/// An RFC3339 time with `Z` or a `±HH:MM` offset (what podman's `--timestamps` prints), as ns
/// since the Unix epoch.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let ns = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_nanos() as i64)
    };
    if s.ends_with('Z') || s.ends_with('z') {
        return ns(humantime::parse_rfc3339_weak(&s[..s.len() - 1]).ok()?);
    }
    let (base, sign, offset) = match s.len().checked_sub(6).map(|at| (at, s.as_bytes()[at])) {
        Some((at, b'+')) => (&s[..at], 1, &s[at + 1..]),
        Some((at, b'-')) => (&s[..at], -1, &s[at + 1..]),
        _ => return None,
    };
    let (h, m) = offset.split_once(':')?;
    let offset_s = h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60;
    let local = ns(humantime::parse_rfc3339_weak(base).ok()?)?;
    Some(local - sign * offset_s * 1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_in_dockers_format() {
        let ns = 1_410_848_266_000_000_123;
        assert_eq!(format_timestamp(ns), "2014-09-16T06:17:46.000000123Z");
        assert_eq!(parse_timestamp(&format_timestamp(ns)), Some(ns));
    }

    #[test]
    fn podman_offsets_are_read_as_utc() {
        let utc = parse_timestamp("2023-05-01T10:00:00.5Z").unwrap();
        assert_eq!(
            parse_timestamp("2023-05-01T12:00:00.500000000+02:00"),
            Some(utc)
        );
        assert_eq!(parse_timestamp("2023-05-01T05:00:00.5-05:00"), Some(utc));
        assert_eq!(parse_timestamp("yesterday"), None);
        assert_eq!(parse_timestamp("2023-05-01T10:00:00"), None);
    }
}
