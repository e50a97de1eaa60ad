//! Ports a service publishes, in Docker's short and long syntaxes.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            other => Err(format!("unknown protocol {other:?}: use tcp or udp")),
        }
    }
}

/// Where the cluster picks a published port when a service publishes only a target
/// (`--publish 80`): Swarm's dynamic range.
pub const DYNAMIC_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

/// A service port: `published` is answered on every node (the routing mesh), `target` is
/// where the tasks listen. A port asked for with no published side gets one from
/// [`DYNAMIC_PORTS`] when the service is written, as Swarm does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub published: Option<u16>,
    pub target: u16,
    /// Records written before modes existed have none: the default.
    #[serde(default)]
    pub mode: PublishMode,
}

/// How a published port reaches the tasks, and what source address they see.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// The routing mesh, keeping the client's own address and port.
    #[default]
    Ingress,
    /// The routing mesh with the ingress node's address as the source (Swarm's behaviour).
    Snat,
    /// Only the node's own tasks answer, with the client's address kept; nodes without a
    /// task of the service refuse the port (Swarm's `mode=host`).
    Host,
}

impl fmt::Display for PublishMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Snat => "snat",
            Self::Host => "host",
        })
    }
}

impl FromStr for PublishMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ingress" => Ok(Self::Ingress),
            "snat" => Ok(Self::Snat),
            "host" => Ok(Self::Host),
            other => Err(format!(
                "unknown publish mode {other:?}: use ingress (the default: every node, the task \
                 sees the client's address), snat (the task sees the ingress node's) or host \
                 (only nodes running a task answer)"
            )),
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.published {
            Some(p) => write!(f, "*:{p}->{}/{}", self.target, self.protocol)?,
            None => write!(f, "{}/{}", self.target, self.protocol)?,
        }
        if self.mode != PublishMode::default() {
            write!(f, " ({})", self.mode)?;
        }
        Ok(())
    }
}

impl FromStr for PortSpec {
    type Err = String;
    /// Docker's short syntax: `8080:80`, `8080:80/udp`, `80` (target only); and its long one:
    /// `published=8080,target=80[,protocol=udp][,mode=ingress]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // `8080:80,mode=snat`: the short syntax with a mode.
        if let Some((short, rest)) = s.split_once(',')
            && !short.contains('=')
        {
            let mut port: Self = short.parse()?;
            port.mode = match rest.trim().split_once('=') {
                Some(("mode", m)) => m.trim().parse().map_err(|e| format!("{e} (in {s:?})"))?,
                _ => {
                    return Err(format!(
                        "invalid port {s:?}: after PUBLISHED:TARGET only ,mode=ingress|snat|host may follow"
                    ));
                }
            };
            return Ok(port);
        }
        if s.contains('=') {
            return Self::from_long_syntax(s);
        }
        let (ports, protocol) = match s.split_once('/') {
            Some((p, proto)) => (p, proto.parse()?),
            None => (s, Protocol::Tcp),
        };
        let port = |p: &str, what: &str| -> Result<u16, String> {
            match p.parse::<u32>() {
                Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
                Ok(n) => Err(format!("{what} port {n} is out of range: use 1-65535")),
                Err(_) => Err(format!(
                    "invalid {what} port {p:?} in {s:?}: expected PUBLISHED:TARGET[/tcp|udp], e.g. 8080:80"
                )),
            }
        };
        match ports.split_once(':') {
            Some((published, target)) => Ok(Self {
                protocol,
                published: Some(port(published, "published")?),
                target: port(target, "target")?,
                mode: PublishMode::default(),
            }),
            None => Ok(Self {
                protocol,
                published: None,
                target: port(ports, "target")?,
                mode: PublishMode::default(),
            }),
        }
    }
}

impl PortSpec {
    /// One `--publish` value, which Docker lets name ranges: `8000-8010:80-90` (as many
    /// published ports as targets, paired in order) or `80-90` (targets, each published on a
    /// port the cluster picks).
    pub fn parse_many(s: &str) -> Result<Vec<Self>, String> {
        let short = !s.contains('=') && !s.contains(',');
        let (ports, proto) = s.split_once('/').unwrap_or((s, ""));
        if !short || !ports.contains('-') {
            return Ok(vec![s.parse()?]);
        }
        let suffix = if proto.is_empty() {
            String::new()
        } else {
            format!("/{proto}")
        };
        let range =
            |r: &str, what: &str| -> Result<Vec<u16>, String> {
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                let bound =
                    |x: &str| {
                        x.trim().parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                    format!(
                        "invalid {what} port range {r:?} in {s:?}: write FIRST-LAST, e.g. \
                         8000-8010:80-90"
                    )
                })
                    };
                let (a, b) = (bound(a)?, bound(b)?);
                if a > b {
                    return Err(format!(
                        "invalid {what} port range {r:?} in {s:?}: the first port is above the last"
                    ));
                }
                Ok((a..=b).collect())
            };
        let pairs: Vec<String> = match ports.split_once(':') {
            Some((published, target)) => {
                let (published, target) =
                    (range(published, "published")?, range(target, "target")?);
                if published.len() != target.len() {
                    return Err(format!(
                        "invalid port range {s:?}: {} published ports for {} targets; give \
                         ranges of the same length",
                        published.len(),
                        target.len()
                    ));
                }
                published
                    .iter()
                    .zip(&target)
                    .map(|(p, t)| format!("{p}:{t}{suffix}"))
                    .collect()
            }
            None => range(ports, "target")?
                .iter()
                .map(|t| format!("{t}{suffix}"))
                .collect(),
        };
        pairs.iter().map(|p| p.parse()).collect()
    }

    fn from_long_syntax(s: &str) -> Result<Self, String> {
        let (mut published, mut target, mut protocol) = (None, None, Protocol::Tcp);
        let mut mode = PublishMode::default();
        let port = |v: &str, what: &str| -> Result<u16, String> {
            match v.parse::<u32>() {
                Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
                _ => Err(format!(
                    "invalid {what} port {v:?} in {s:?}: use a number from 1 to 65535"
                )),
            }
        };
        for field in s.split(',') {
            let (k, v) = field.split_once('=').ok_or_else(|| {
                format!(
                    "invalid port {s:?}: expected published=PORT,target=PORT[,protocol=tcp|udp][,mode=ingress|snat|host]"
                )
            })?;
            match k.trim() {
                "published" => published = Some(port(v.trim(), "published")?),
                "target" => target = Some(port(v.trim(), "target")?),
                "protocol" => protocol = v.trim().parse()?,
                "mode" => mode = v.trim().parse().map_err(|e| format!("{e} (in {s:?})"))?,
                other => {
                    return Err(format!(
                        "unknown key {other:?} in port {s:?}: use published, target, protocol or mode"
                    ));
                }
            }
        }
        let target = target.ok_or_else(|| format!("port {s:?} has no target=PORT"))?;
        Ok(Self {
            protocol,
            published,
            target,
            mode,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_like_docker() {
        assert_eq!(
            "8080:80".parse::<PortSpec>().unwrap(),
            PortSpec {
                protocol: Protocol::Tcp,
                published: Some(8080),
                target: 80,
                mode: PublishMode::Ingress,
            }
        );
        assert_eq!(
            "5353:53/udp".parse::<PortSpec>().unwrap(),
            PortSpec {
                protocol: Protocol::Udp,
                published: Some(5353),
                target: 53,
                mode: PublishMode::Ingress,
            }
        );
        assert_eq!(
            "80".parse::<PortSpec>().unwrap(),
            PortSpec {
                protocol: Protocol::Tcp,
                published: None,
                target: 80,
                mode: PublishMode::Ingress,
            }
        );
        let e = "8080:70000".parse::<PortSpec>().unwrap_err();
        assert!(e.contains("target port 70000 is out of range"), "{e}");
        let e = "8080:80/sctp".parse::<PortSpec>().unwrap_err();
        assert!(e.contains("unknown protocol"), "{e}");
        let e = "web:80".parse::<PortSpec>().unwrap_err();
        assert!(e.contains("expected PUBLISHED:TARGET"), "{e}");
        assert!("0:80".parse::<PortSpec>().is_err());
    }

    #[test]
    fn port_ranges_expand_in_order() {
        let ports = PortSpec::parse_many("8000-8002:80-82/udp").unwrap();
        let pairs: Vec<_> = ports
            .iter()
            .map(|p| (p.published, p.target, p.protocol))
            .collect();
        assert_eq!(
            pairs,
            vec![
                (Some(8000), 80, Protocol::Udp),
                (Some(8001), 81, Protocol::Udp),
                (Some(8002), 82, Protocol::Udp)
            ]
        );
        let targets = PortSpec::parse_many("80-81").unwrap();
        assert!(targets.iter().all(|p| p.published.is_none()));
        assert_eq!(targets.len(), 2);
        assert_eq!(PortSpec::parse_many("8080:80").unwrap().len(), 1);
        for (bad, says) in [
            ("8000-8010:80-81", "same length"),
            ("8010-8000:80-90", "first port is above"),
            ("80-x", "invalid target port range"),
        ] {
            let e = PortSpec::parse_many(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn ports_parse_in_dockers_long_syntax_too() {
        assert_eq!(
            "published=8080,target=80".parse::<PortSpec>().unwrap(),
            "8080:80".parse::<PortSpec>().unwrap()
        );
        assert_eq!(
            "published=5353,target=53,protocol=udp,mode=ingress"
                .parse::<PortSpec>()
                .unwrap(),
            "5353:53/udp".parse::<PortSpec>().unwrap()
        );
        for (bad, says) in [
            ("published=8080", "no target"),
            ("published=8080,target=0", "invalid target port"),
            ("published=8080,target=80,mode=dsr", "unknown publish mode"),
            ("8080:80,mode=nat", "unknown publish mode"),
            ("8080:80,protocol=udp", "only ,mode="),
            ("published=8080,dest=80", "unknown key"),
        ] {
            let e = bad.parse::<PortSpec>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn port_display_matches_docker_service_ls() {
        let p: PortSpec = "8080:80".parse().unwrap();
        assert_eq!(p.to_string(), "*:8080->80/tcp");
        let p: PortSpec = "8080:80,mode=snat".parse().unwrap();
        assert_eq!(p.to_string(), "*:8080->80/tcp (snat)");
    }

    #[test]
    fn the_publish_mode_defaults_to_ingress_and_snat_is_spelled_both_ways() {
        let snat = PortSpec {
            protocol: Protocol::Udp,
            published: Some(5353),
            target: 53,
            mode: PublishMode::Snat,
        };
        assert_eq!("5353:53/udp,mode=snat".parse::<PortSpec>().unwrap(), snat);
        assert_eq!(
            "published=5353,target=53,protocol=udp,mode=snat"
                .parse::<PortSpec>()
                .unwrap(),
            snat
        );
        assert_eq!(
            "8080:80".parse::<PortSpec>().unwrap().mode,
            PublishMode::Ingress
        );
        // A record written before modes existed.
        let old: PortSpec =
            serde_json::from_str(r#"{"protocol":"tcp","published":8080,"target":80}"#).unwrap();
        assert_eq!(old.mode, PublishMode::Ingress);
    }
}
