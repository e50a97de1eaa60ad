//! Cluster events as `meshctl events` and `GET /v1/events` carry them, and their filters
//! (Docker's `--filter type=…`, OR within a key, AND across keys).

use std::{
    collections::BTreeMap,
    fmt,
    time::{Duration, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Wall-clock milliseconds since the epoch.
    pub time_ms: u64,
    #[serde(flatten)]
    pub kind: Kind,
    /// What the event is about: `web.1`, a node name, a service name.
    pub actor: String,
    /// The task ID or service ID, when the actor has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Details: exit code, error, spec version, replicas.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// `{"type": "task", "action": "running"}` on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "action", rename_all = "lowercase")]
pub enum Kind {
    Task(TaskAction),
    Node(NodeAction),
    Service(ServiceAction),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskAction {
    /// A node took the slot and is setting the task up.
    Started,
    /// Serving: a backend in every load balancer.
    Running,
    /// Exited non-zero or was killed.
    Failed,
    /// Could not be started at all.
    Rejected,
    /// Exited with status 0.
    Complete,
    /// Stopped because it was asked to (scale down, update, removal).
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeAction {
    Ready,
    Down,
    Drain,
    Active,
    /// A node was refused for claiming a name bound to another node's key (an impostor, or
    /// a host that lost its state dir: `meshctl node rm` lets it join again).
    Refused,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceAction {
    Created,
    /// Any spec change: scale, constraints, a new template (`version` says which).
    Updated,
    Removed,
    /// A rollout paused on failures (the message says which task).
    UpdatePaused,
    UpdateCompleted,
    /// A rollout went back to the previous spec (by hand, or on failures).
    RollbackStarted,
    RollbackPaused,
    RollbackCompleted,
}

impl Kind {
    pub fn type_name(self) -> &'static str {
        match self {
            Kind::Task(_) => "task",
            Kind::Node(_) => "node",
            Kind::Service(_) => "service",
        }
    }

    pub fn action_name(self) -> String {
        // The serde names, so text and JSON say the same word.
        let json = serde_json::to_value(self).expect("plain enum");
        json["action"].as_str().unwrap_or_default().to_owned()
    }
}

impl fmt::Display for Event {
    /// Docker's line: `2026-12-01T08:00:00.000000000Z task running web.1 (id=…, node=…)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = UNIX_EPOCH + Duration::from_millis(self.time_ms);
        write!(
            f,
            "{} {} {} {}",
            humantime::format_rfc3339_nanos(at),
            self.kind.type_name(),
            self.kind.action_name(),
            self.actor
        )?;
        let mut details: Vec<String> = Vec::new();
        if let Some(id) = &self.id {
            details.push(format!("id={id}"));
        }
        if let Some(s) = &self.service
            && *s != self.actor
        {
            details.push(format!("service={s}"));
        }
        if let Some(n) = &self.node
            && *n != self.actor
        {
            details.push(format!("node={n}"));
        }
        details.extend(self.attributes.iter().map(|(k, v)| format!("{k}={v}")));
        if !details.is_empty() {
            write!(f, " ({})", details.join(", "))?;
        }
        Ok(())
    }
}

/// Which events a reader wants, Docker's way: values of one key are alternatives (OR),
/// different keys must all match (AND).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub services: Vec<String>,
    pub nodes: Vec<String>,
    pub types: Vec<String>,
}

impl Filter {
    /// Adds one `key=value` (`service=web`, `node=n1`, `type=task`).
    pub fn add(&mut self, spec: &str) -> Result<(), String> {
        let (k, v) = spec.split_once('=').ok_or_else(|| {
            format!("invalid filter {spec:?}: expected key=value (service=, node= or type=)")
        })?;
        if v.is_empty() {
            return Err(format!("invalid filter {spec:?}: the value is empty"));
        }
        match k {
            "service" => self.services.push(v.to_owned()),
            "node" => self.nodes.push(v.to_owned()),
            "type" => {
                if !["task", "node", "service"].contains(&v) {
                    return Err(format!(
                        "invalid filter {spec:?}: type is one of task, node, service"
                    ));
                }
                self.types.push(v.to_owned())
            }
            other => {
                return Err(format!(
                    "unknown filter key {other:?} in {spec:?}: use service=, node= or type="
                ));
            }
        }
        Ok(())
    }

    pub fn matches(&self, e: &Event) -> bool {
        let any = |wanted: &[String], have: Option<&str>| {
            wanted.is_empty() || have.is_some_and(|h| wanted.iter().any(|w| w == h))
        };
        any(&self.types, Some(e.kind.type_name()))
            && any(&self.services, e.service.as_deref())
            && any(&self.nodes, e.node.as_deref())
    }
}

/// The query string of `GET /v1/events` for a start time and filters.
pub fn query(since_ms: Option<u64>, filter: &[String]) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(ms) = since_ms {
        parts.push(format!("since_ms={ms}"));
    }
    parts.extend(
        filter
            .iter()
            .map(|f| format!("filter={}", percent_encode(f))),
    );
    parts.join("&")
}

/// `since_ms` and `filter` from a query string made by [`query`] (or typed by hand).
pub fn parse_query(raw: &str) -> Result<(Option<u64>, Filter), String> {
    let mut since = None;
    let mut filter = Filter::default();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v).ok_or_else(|| format!("bad escape in {pair:?}"))?;
        match k {
            "since_ms" => {
                since = Some(v.parse().map_err(|_| {
                    format!("since_ms={v:?} is not a time: milliseconds since the epoch")
                })?)
            }
            "filter" => filter.add(&v)?,
            other => {
                return Err(format!(
                    "unknown parameter {other:?}: use since_ms= and filter="
                ));
            }
        }
    }
    Ok((since, filter))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_read_like_dockers_and_json_carries_type_and_action() {
        let mut e = Event {
            time_ms: 1_796_112_000_000,
            kind: Kind::Task(TaskAction::Running),
            actor: "web.1".into(),
            id: Some("abc".into()),
            service: Some("web".into()),
            node: Some("n1".into()),
            attributes: BTreeMap::new(),
        };
        e.attributes.insert("spec_version".into(), "1".into());
        assert_eq!(
            e.to_string(),
            "2026-12-01T08:00:00.000000000Z task running web.1 (id=abc, service=web, node=n1, spec_version=1)"
        );
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["type"], "task");
        assert_eq!(json["action"], "running");
        assert_eq!(serde_json::from_value::<Event>(json).unwrap(), e);
    }

    #[test]
    fn filters_or_within_a_key_and_and_across_keys() {
        let mut f = Filter::default();
        f.add("service=web").unwrap();
        f.add("service=api").unwrap();
        f.add("type=task").unwrap();
        let mut e = Event {
            time_ms: 0,
            kind: Kind::Task(TaskAction::Running),
            actor: "api.1".into(),
            id: None,
            service: Some("api".into()),
            node: Some("n1".into()),
            attributes: BTreeMap::new(),
        };
        assert!(f.matches(&e));
        e.kind = Kind::Service(ServiceAction::Created);
        assert!(!f.matches(&e));
        assert!(f.add("colour=red").unwrap_err().contains("use service="));
        assert!(f.add("type=volume").is_err());
    }

    #[test]
    fn queries_round_trip_and_bad_ones_say_why() {
        let q = query(Some(42), &["service=web".into(), "node=a b&c".into()]);
        assert_eq!(
            q,
            "since_ms=42&filter=service%3Dweb&filter=node%3Da%20b%26c"
        );
        let (since, f) = parse_query(&q).unwrap();
        assert_eq!(since, Some(42));
        assert_eq!(f.services, ["web"]);
        assert_eq!(f.nodes, ["a b&c"]);
        assert!(
            parse_query("since_ms=soon")
                .unwrap_err()
                .contains("milliseconds")
        );
        assert!(
            parse_query("follow=1")
                .unwrap_err()
                .contains("unknown parameter")
        );
    }
}
