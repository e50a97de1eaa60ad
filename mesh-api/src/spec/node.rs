//! What an operator sets on a node, and how it is seen.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    /// Takes part in load balancing.
    #[default]
    Active,
    /// Its tasks receive no new connections; established ones finish.
    Drain,
}

impl fmt::Display for Availability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Active => "Active",
            Self::Drain => "Drain",
        })
    }
}

/// Whether the cluster hears from a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeStatus {
    Ready,
    Down,
}

/// A node label as `--label` and `--label-add` take it: `key=value`, or `key` for an empty
/// value. Keys are what constraints name (`node.labels.KEY`), so no spaces or `=` in them.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').unwrap_or((s, ""));
    if k.is_empty() {
        return Err(format!(
            "invalid label {s:?}: the key is empty; use key=value, e.g. type=low-memory"
        ));
    }
    if k.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "invalid label {s:?}: the key {k:?} contains spaces; use key=value with a key of \
             letters, digits, '.', '-' or '_', e.g. type=low-memory"
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(format!(
            "invalid label {s:?}: the value contains control characters"
        ));
    }
    Ok((k.to_owned(), v.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_like_docker_and_bad_ones_say_how_to_fix() {
        assert_eq!(
            parse_label("type=low-memory").unwrap(),
            ("type".into(), "low-memory".into())
        );
        assert_eq!(parse_label("ssd").unwrap(), ("ssd".into(), "".into()));
        assert_eq!(parse_label("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        let e = parse_label("=x").unwrap_err();
        assert!(e.contains("key is empty") && e.contains("key=value"), "{e}");
        let e = parse_label("a b=c").unwrap_err();
        assert!(e.contains("contains spaces"), "{e}");
        assert!(parse_label("").is_err());
    }
}
