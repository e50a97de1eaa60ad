//! Docker's `--filter key=value` for `service ls` and `service ps`: values of one key are
//! alternatives (OR), different keys must all hold (AND), and an unknown key is an error
//! that lists the known ones.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use mesh_api::v1::{ServiceInfo, ServiceTaskInfo, Volume};

/// The filters given, by key.
#[derive(Debug, Default)]
pub struct Filters(BTreeMap<String, Vec<String>>);

impl Filters {
    /// `raw` as given on the command line; `keys` are the ones the command knows.
    pub fn parse(raw: &[String], keys: &[&str]) -> Result<Self> {
        let mut f = BTreeMap::<String, Vec<String>>::new();
        for r in raw {
            let Some((k, v)) = r.split_once('=') else {
                bail!("bad format of filter {r:?}: expected KEY=VALUE, e.g. name=web");
            };
            let k = k.trim().to_ascii_lowercase();
            if !keys.contains(&k.as_str()) {
                bail!(
                    "invalid filter {k:?}: use one of {}",
                    keys.iter()
                        .map(|k| format!("{k}="))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            f.entry(k).or_default().push(v.trim().to_owned());
        }
        Ok(Self(f))
    }

    /// Whether every key given has a value that `holds`.
    fn all(&self, holds: impl Fn(&str, &str) -> bool) -> bool {
        self.0
            .iter()
            .all(|(k, values)| values.iter().any(|v| holds(k, v)))
    }

    /// `service ls`: id and name by prefix (as Docker's), mode, label `KEY` or `KEY=VALUE`.
    pub fn service(&self, s: &ServiceInfo) -> bool {
        self.all(|k, v| match k {
            "id" => s.id.starts_with(v),
            "name" => s.name.starts_with(v),
            "mode" => s.mode.name() == v,
            "label" => match v.split_once('=') {
                Some((lk, lv)) => s.spec.labels.get(lk).is_some_and(|x| x == lv),
                None => s.spec.labels.contains_key(v),
            },
            _ => false,
        })
    }

    /// `service ps`: id and name by prefix, node, desired-state (`running`, `shutdown`, or
    /// `accepted` for either).
    pub fn task(&self, t: &ServiceTaskInfo) -> bool {
        self.all(|k, v| match k {
            "id" => t.id.starts_with(v),
            "name" => t.name.starts_with(v),
            "node" => t.node.as_deref() == Some(v),
            "desired-state" => {
                v.eq_ignore_ascii_case("accepted") || t.desired.eq_ignore_ascii_case(v)
            }
            _ => false,
        })
    }
}

impl Filters {
    /// `volume ls`: name by substring (as Docker's), driver, label `KEY` or `KEY=VALUE`, and
    /// mesh's node.
    pub fn volume(&self, vol: &Volume) -> bool {
        self.all(|k, v| match k {
            "name" => vol.name.contains(v),
            "driver" => vol.driver == v,
            "node" => vol.node == v,
            "label" => match v.split_once('=') {
                Some((lk, lv)) => vol.labels.get(lk).is_some_and(|x| x == lv),
                None => vol.labels.contains_key(v),
            },
            _ => false,
        })
    }
}

pub const VOLUME_KEYS: &[&str] = &["driver", "label", "name", "node"];
pub const SERVICE_KEYS: &[&str] = &["id", "label", "mode", "name"];
pub const TASK_KEYS: &[&str] = &["desired-state", "id", "name", "node"];

#[cfg(test)]
mod tests {
    use super::*;

    fn task(name: &str, node: &str, desired: &str) -> ServiceTaskInfo {
        ServiceTaskInfo {
            id: format!("id-{name}"),
            name: name.into(),
            slot: "1".into(),
            node: Some(node.into()),
            desired: desired.into(),
            state: "Running".into(),
            created_ms: 0,
            since_ms: 0,
            error: None,
            spec_version: 1,
            updated: true,
            history: false,
            image: None,
        }
    }

    #[test]
    fn values_of_one_key_are_alternatives_and_keys_all_hold() {
        let f = Filters::parse(
            &[
                "node=n1".into(),
                "node=n2".into(),
                "desired-state=running".into(),
            ],
            TASK_KEYS,
        )
        .unwrap();
        assert!(f.task(&task("web.1", "n1", "Running")));
        assert!(f.task(&task("web.2", "n2", "Running")));
        assert!(!f.task(&task("web.3", "n3", "Running")));
        assert!(!f.task(&task("web.1", "n1", "Shutdown")));
        let accepted = Filters::parse(&["desired-state=accepted".into()], TASK_KEYS).unwrap();
        assert!(accepted.task(&task("web.1", "n1", "Shutdown")));
        assert!(
            Filters::parse(&[], TASK_KEYS)
                .unwrap()
                .task(&task("a", "b", "Running"))
        );
    }

    #[test]
    fn bad_filters_say_what_is_known() {
        let e = Filters::parse(&["colour=red".into()], SERVICE_KEYS).unwrap_err();
        assert!(e.to_string().contains("id=, label=, mode=, name="), "{e}");
        let e = Filters::parse(&["name".into()], SERVICE_KEYS).unwrap_err();
        assert!(e.to_string().contains("KEY=VALUE"), "{e}");
    }
}
