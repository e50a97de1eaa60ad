//! Records as they travel in gossip (JSON values under well-known key prefixes).

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, str::FromStr};

use ipnet::Ipv4Net;
use mesh_planner::{Placement, RestartPolicy, ServiceMode};
use serde::{Deserialize, Serialize};

/// Gossip keys. One place so that readers and writers cannot disagree.
pub mod key {
    /// The node's own record.
    pub const NODE: &str = "node";
    /// Set by an agent that is stopping with its dataplane and tasks left running: until the
    /// time it names, the node counts as up (see [`super::Restarting`]).
    pub const RESTARTING: &str = "restarting";
    /// `ep:<task>`: a task of this node.
    pub const ENDPOINT: &str = "ep:";
    /// `att:<network>`: this node's own address on a network it plumbs.
    pub const ATTACHMENT: &str = "att:";
    /// `blk:<network>:<index>`: a claim on a block of a network's subnet.
    pub const BLOCK: &str = "blk:";
    /// `obj:net:<name>`, replicated.
    pub const NETWORK: &str = "obj:net:";
    /// `obj:svc:<name>`, replicated.
    pub const SERVICE: &str = "obj:svc:";
    /// `obj:nodespec:<node>`, replicated: what an operator set on a node (drain, labels).
    pub const NODE_SPEC: &str = "obj:nodespec:";
    /// `tsk:<id>`: a task of a service on this node, with its state (mesh_planner::Task).
    pub const TASK: &str = "tsk:";
}

/// The first VXLAN network identifier mesh hands out (Docker's overlay driver starts at 4096
/// too, leaving lower ones to hand-made tunnels).
pub const FIRST_VNI: u32 = 4096;
/// The largest VNI a VXLAN header can carry.
pub const MAX_VNI: u32 = (1 << 24) - 1;

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

/// What a node says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub hostname: String,
    /// Underlay address: VXLAN tunnels end here and published ports answer here.
    pub address: Ipv4Addr,
    /// Underlay MTU; overlay networks use 50 bytes less.
    pub mtu: u32,
    pub agent_version: String,
    /// Task drivers this node runs; placement only picks nodes that have a task's driver.
    #[serde(default = "default_drivers")]
    pub drivers: Vec<String>,
}

/// Every agent runs processes; records from before drivers were advertised mean that.
fn default_drivers() -> Vec<String> {
    vec![DRIVER_PROCESS.to_owned()]
}

/// The driver that runs a command in the task's namespaces (no image).
pub const DRIVER_PROCESS: &str = "process";
/// OCI images run by podman; advertised only where podman works.
pub const DRIVER_PODMAN: &str = "podman";

/// An agent going down gracefully leaves its tasks and pinned dataplane serving; peers keep
/// counting the node (and its tasks) as up until `until_ms`, so a restart slower than the
/// failure detector does not evict tasks that never stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restarting {
    pub until_ms: u64,
}

/// Operator-set properties of a node, replicated so they can be changed from any node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub availability: Availability,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub name: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub vni: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    /// One virtual IP, balanced by the dataplane.
    #[default]
    Vip,
    /// DNS round robin: the name resolves to the task IPs, no VIP.
    Dnsrr,
}

impl fmt::Display for EndpointMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Vip => "vip",
            Self::Dnsrr => "dnsrr",
        })
    }
}

impl FromStr for EndpointMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vip" => Ok(Self::Vip),
            "dnsrr" => Ok(Self::Dnsrr),
            other => Err(format!("unknown endpoint mode {other:?}: use vip or dnsrr")),
        }
    }
}

/// A service port: `published` is answered on every node (the routing mesh), `target` is
/// where the tasks listen; a port with no published side is reachable through the VIP only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub published: Option<u16>,
    pub target: u16,
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.published {
            Some(p) => write!(f, "*:{p}->{}/{}", self.target, self.protocol),
            None => write!(f, "{}/{}", self.target, self.protocol),
        }
    }
}

impl FromStr for PortSpec {
    type Err = String;
    /// Docker's short syntax: `8080:80`, `8080:80/udp`, `80` (target only); and its long one:
    /// `published=8080,target=80[,protocol=udp][,mode=ingress]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
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
            }),
            None => Ok(Self {
                protocol,
                published: None,
                target: port(ports, "target")?,
            }),
        }
    }
}

impl PortSpec {
    fn from_long_syntax(s: &str) -> Result<Self, String> {
        let (mut published, mut target, mut protocol) = (None, None, Protocol::Tcp);
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
                    "invalid port {s:?}: expected published=PORT,target=PORT[,protocol=tcp|udp]"
                )
            })?;
            match k.trim() {
                "published" => published = Some(port(v.trim(), "published")?),
                "target" => target = Some(port(v.trim(), "target")?),
                "protocol" => protocol = v.trim().parse()?,
                // The routing mesh is what mesh publishes through.
                "mode" if v.trim() == "ingress" => {}
                "mode" => {
                    return Err(format!(
                        "publish mode {:?} in {s:?} is not supported: only mode=ingress (the routing mesh)",
                        v.trim()
                    ));
                }
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
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub network: String,
    pub endpoint_mode: EndpointMode,
    /// Set in vip mode, from the creating node's address block.
    pub vip: Option<Ipv4Addr>,
    pub ports: Vec<PortSpec>,
    /// replicated (N slots) or global (one task per eligible node).
    #[serde(default)]
    pub mode: ServiceMode,
    /// What each task runs. None: nothing is scheduled; the service's tasks are started by
    /// hand (`meshctl run --service`) or attached by another runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskTemplate>,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Counts every change of the spec (Swarm's spec version).
    #[serde(default)]
    pub version: u64,
    /// The version at which what a task runs last changed (or an update was forced): tasks
    /// created for an older one are replaced.
    #[serde(default)]
    pub template_version: u64,
}

impl ServiceSpec {
    /// The planner's view of this service, if it schedules tasks at all.
    pub fn planned(&self) -> Option<mesh_planner::Service<'_>> {
        let task = self.task.as_ref()?;
        Some(mesh_planner::Service {
            name: &self.name,
            mode: self.mode,
            placement: &self.placement,
            driver: task.driver(),
            template_version: self.template_version,
        })
    }
}

/// What a service's tasks run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskTemplate {
    /// The command line; with an image, the arguments that replace the image's CMD.
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The task's hostname; default: the task name (`web.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// An OCI image the tasks run as podman containers (the podman driver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl TaskTemplate {
    pub fn driver(&self) -> &'static str {
        if self.image.is_some() {
            DRIVER_PODMAN
        } else {
            DRIVER_PROCESS
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    #[default]
    Running,
    Exited,
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Exited => "exited",
        })
    }
}

/// A task's attachment to a network, owned by the node the task runs on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub task: String,
    pub network: String,
    pub service: Option<String>,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub state: TaskState,
}

/// A node's own address on a network (on its bridge): source of routing-mesh traffic to
/// tasks and of host-local connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub network: String,
    pub ip: Ipv4Addr,
    pub mac: String,
}

/// A claim on block `index` of a network's subnet; the oldest claim wins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockClaim {
    pub network: String,
    pub index: u32,
    pub stamp: super::Stamp,
}

/// Docker's habit for container MACs: a locally administered prefix followed by the IPv4
/// address, so the MAC is unique wherever the IP is.
pub fn mac_for_ip(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
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
                target: 80
            }
        );
        assert_eq!(
            "5353:53/udp".parse::<PortSpec>().unwrap(),
            PortSpec {
                protocol: Protocol::Udp,
                published: Some(5353),
                target: 53
            }
        );
        assert_eq!(
            "80".parse::<PortSpec>().unwrap(),
            PortSpec {
                protocol: Protocol::Tcp,
                published: None,
                target: 80
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
            ("published=8080,target=80,mode=host", "not supported"),
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
    }

    #[test]
    fn mac_follows_ip() {
        assert_eq!(mac_for_ip(Ipv4Addr::new(10, 0, 1, 5)), "02:42:0a:00:01:05");
    }
}
