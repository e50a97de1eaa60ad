//! A service's place on a network: which network, and the extra names it answers to there
//! (Docker's `--network name=N,alias=A`, compose's `networks: {N: {aliases: [A]}}`).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// One network a service's tasks join, and the aliases the service has on it. An alias
/// resolves like the service's own name, on that network only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAttachment {
    /// The network's name.
    pub target: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// The service's virtual IP on this network (vip mode), from its subnet; set by the
    /// agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<Ipv4Addr>,
}

impl NetworkAttachment {
    pub fn new(target: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            ..Default::default()
        }
    }

    /// The names the service answers to on this network: its own, then its aliases.
    pub fn names<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a str> {
        std::iter::once(service).chain(self.aliases.iter().map(String::as_str))
    }
}

#[cfg(test)]
mod tests {
    use crate::spec::{NetworkAttachment, ServiceSpec};

    #[test]
    fn a_spec_written_before_aliases_reads_the_same_and_keeps_its_template() {
        let old = ServiceSpec {
            name: "web".into(),
            network: "app".into(),
            ..Default::default()
        };
        let json = serde_json::to_string(&old).unwrap();
        assert!(!json.contains("aliases"), "{json}");
        let read: ServiceSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(read, old);
        assert_eq!(read.attachments(), vec![NetworkAttachment::new("app")]);
        // Aliases are names, not what the tasks run: they replace no task.
        let aliased = ServiceSpec {
            aliases: vec!["www".into()],
            ..old.clone()
        };
        assert_eq!(aliased.template_id(), old.template_id());
        let attachments = aliased.attachments();
        let names: Vec<&str> = attachments[0].names("web").collect();
        assert_eq!(names, ["web", "www"]);
    }
}
