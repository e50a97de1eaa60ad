//! The snapshot compiled for lookups: per network, hash maps from lowercase names to what
//! they resolve to, and from addresses back to names.
//!
//! Compiling happens once per snapshot (when the table changes), so a query is a few hash
//! lookups on a string built from the question name.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use hickory_proto::rr::Name;
use tracing::warn;

use crate::snapshot::{EndpointMode, Network, Port, Protocol, Snapshot};

/// All networks of a snapshot, ready for lookups.
#[derive(Debug, Default)]
pub(crate) struct Zones {
    networks: HashMap<String, NetworkZone>,
}

#[derive(Debug)]
pub(crate) struct NetworkZone {
    services: HashMap<String, ServiceZone>,
    tasks: HashMap<String, TaskZone>,
    /// Reverse map for PTR: VIPs and task IPs to the name that owns them.
    owners: HashMap<Ipv4Addr, Name>,
    /// Names with no records of their own but names below them (`_tcp.web` above
    /// `_80._tcp.web`, `1.abc` above task `web.1.abc`). Under our network they are NODATA, not
    /// NXDOMAIN, which would tell RFC 8020 resolvers that nothing exists below them.
    interior: HashSet<String>,
}

#[derive(Debug)]
pub(crate) struct ServiceZone {
    pub(crate) endpoint_mode: EndpointMode,
    /// `<service>.<network>.`; `None` when the names do not form a valid DNS name.
    pub(crate) fqdn: Option<Name>,
    pub(crate) tasks: Vec<TaskEntry>,
    pub(crate) ports: Vec<Port>,
}

#[derive(Debug, Clone)]
pub(crate) struct TaskEntry {
    pub(crate) ip: Ipv4Addr,
    /// `<task>.<network>.`, the SRV target of this task in dnsrr mode.
    pub(crate) fqdn: Option<Name>,
}

#[derive(Debug)]
pub(crate) struct TaskZone {
    pub(crate) ips: Vec<Ipv4Addr>,
}

/// What a question name means to us, given the networks the asking task is on.
#[derive(Debug)]
pub(crate) enum Lookup<'z> {
    /// A service name: its VIP, or its task IPs in dnsrr mode.
    Service(&'z ServiceZone),
    /// `tasks.<service>`: every task IP whatever the endpoint mode.
    ServiceTasks(&'z ServiceZone),
    /// A task's name.
    Task(&'z TaskZone),
    /// `_<port>._<proto>.<service>`: the service's ports that match.
    Srv(&'z ServiceZone, Vec<Port>),
    /// The reverse name of an address we own.
    Ptr(&'z Name),
    /// A name under one of the task's networks with names below it but no records.
    Interior,
    /// Under one of the asking task's networks, but nothing is there: no upstream can own it.
    NoSuchName,
    /// Not ours: upstream resolvers answer it.
    Foreign,
}

impl Zones {
    pub(crate) fn compile(snapshot: &Snapshot) -> Self {
        let mut networks = HashMap::with_capacity(snapshot.networks.len());
        for network in &snapshot.networks {
            let key = network.name.to_ascii_lowercase();
            if networks.contains_key(&key) {
                warn!(network = %network.name, "network listed twice in the DNS snapshot; keeping the first");
                continue;
            }
            networks.insert(key, NetworkZone::compile(network));
        }
        Zones { networks }
    }

    /// Resolves a question name (already lowercased, no trailing dot) for a task on `scope`.
    ///
    /// Networks are tried in scope order and the first that knows the name wins, as Docker
    /// does for a container on several networks. `<name>.<network>` is tried before the bare
    /// name on each network, so a qualified question cannot be captured by a dotted task name.
    pub(crate) fn lookup<'z>(&'z self, scope: &[String], qname: &str) -> Lookup<'z> {
        if let Some(reverse) = qname.strip_suffix(".in-addr.arpa") {
            return match parse_reverse_v4(reverse) {
                Some(ip) => scope
                    .iter()
                    .filter_map(|n| self.networks.get(n))
                    .find_map(|zone| zone.owners.get(&ip))
                    .map_or(Lookup::Foreign, Lookup::Ptr),
                None => Lookup::Foreign,
            };
        }

        let mut under_our_network = false;
        for network in scope {
            let Some(zone) = self.networks.get(network) else {
                continue;
            };
            let qualified = qname
                .strip_suffix(network.as_str())
                .and_then(|rest| rest.strip_suffix('.'));
            if let Some(relative) = qualified {
                under_our_network = true;
                if let Some(found) = zone.lookup_relative(relative) {
                    return found;
                }
                if zone.interior.contains(relative) {
                    return Lookup::Interior;
                }
            }
            if let Some(found) = zone.lookup_relative(qname) {
                return found;
            }
        }
        if under_our_network {
            Lookup::NoSuchName
        } else {
            Lookup::Foreign
        }
    }
}

impl NetworkZone {
    fn compile(network: &Network) -> Self {
        let domain = Name::from_ascii(&network.name)
            .ok()
            .map(|n| n.to_lowercase());
        let fqdn = |label: &str| -> Option<Name> {
            let mut name = Name::from_ascii(label)
                .ok()?
                .to_lowercase()
                .append_domain(domain.as_ref()?)
                .ok()?;
            name.set_fqdn(true);
            Some(name)
        };

        let mut services = HashMap::with_capacity(network.services.len());
        let mut tasks: HashMap<String, TaskZone> = HashMap::new();
        let mut owners = HashMap::new();

        for service in &network.services {
            let key = service.name.to_ascii_lowercase();
            if services.contains_key(&key) {
                warn!(network = %network.name, service = %service.name,
                    "service listed twice on one network in the DNS snapshot; keeping the first");
                continue;
            }
            let service_fqdn = fqdn(&service.name);
            if let (EndpointMode::Vip(vip), Some(name)) = (service.endpoint_mode, &service_fqdn) {
                owners.entry(vip).or_insert_with(|| name.clone());
            }
            let entries = service
                .tasks
                .iter()
                .map(|task| TaskEntry {
                    ip: task.ip,
                    fqdn: fqdn(&task.name),
                })
                .collect();
            services.insert(
                key,
                ServiceZone {
                    endpoint_mode: service.endpoint_mode,
                    fqdn: service_fqdn,
                    tasks: entries,
                    ports: service.ports.clone(),
                },
            );
        }

        let all_tasks = network
            .services
            .iter()
            .flat_map(|s| s.tasks.iter())
            .chain(network.tasks.iter());
        for task in all_tasks {
            let zone = tasks
                .entry(task.name.to_ascii_lowercase())
                .or_insert_with(|| TaskZone { ips: Vec::new() });
            if !zone.ips.contains(&task.ip) {
                zone.ips.push(task.ip);
            }
            if let Some(name) = fqdn(&task.name) {
                owners.entry(task.ip).or_insert(name);
            }
        }

        // Every proper suffix of a name we answer for, that is not itself such a name.
        let mut interior = HashSet::new();
        let srv_parents = services.iter().flat_map(|(name, service)| {
            service
                .ports
                .iter()
                .map(move |port| format!("_{}.{name}", protocol_label(port.protocol)))
        });
        let leaves: Vec<String> = tasks.keys().cloned().chain(srv_parents).collect();
        for leaf in &leaves {
            let mut rest = leaf.as_str();
            while let Some((_, parent)) = rest.split_once('.') {
                if !services.contains_key(parent) && !tasks.contains_key(parent) {
                    interior.insert(parent.to_string());
                }
                rest = parent;
            }
        }
        for leaf in leaves.into_iter().filter(|l| l.starts_with('_')) {
            interior.insert(leaf);
        }

        NetworkZone {
            services,
            tasks,
            owners,
            interior,
        }
    }

    /// Looks a name up relative to this network (`web`, `tasks.web`, `_80._tcp.web`, a task
    /// name). `None` when this network has nothing by that name.
    fn lookup_relative(&self, name: &str) -> Option<Lookup<'_>> {
        if let Some(service) = self.services.get(name) {
            return Some(Lookup::Service(service));
        }
        if let Some(task) = self.tasks.get(name) {
            return Some(Lookup::Task(task));
        }
        if let Some(service) = name
            .strip_prefix("tasks.")
            .and_then(|s| self.services.get(s))
        {
            return Some(Lookup::ServiceTasks(service));
        }
        let (port, protocol, service) = parse_srv(name)?;
        let service = self.services.get(service)?;
        let ports: Vec<Port> = service
            .ports
            .iter()
            .filter(|p| p.protocol == protocol && (p.target == port || p.published == Some(port)))
            .copied()
            .collect();
        (!ports.is_empty()).then_some(Lookup::Srv(service, ports))
    }
}

fn protocol_label(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// `_<port>._<tcp|udp>.<service>` → (port, protocol, service).
fn parse_srv(name: &str) -> Option<(u16, Protocol, &str)> {
    let rest = name.strip_prefix('_')?;
    let (port, rest) = rest.split_once("._")?;
    let (protocol, service) = rest.split_once('.')?;
    let protocol = [Protocol::Tcp, Protocol::Udp]
        .into_iter()
        .find(|p| protocol_label(*p) == protocol)?;
    // u16::from_str accepts a leading '+', which would give one port two names.
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((port.parse().ok()?, protocol, service))
}

/// `4.3.2.1` (the part before `.in-addr.arpa`) → 1.2.3.4; `None` for partial or odd names.
fn parse_reverse_v4(reverse: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut labels = reverse.split('.');
    for slot in octets.iter_mut().rev() {
        let label = labels.next()?;
        // Leading zeros and signs are not how addresses are written in reverse names.
        if label.is_empty()
            || label.len() > 3
            || (label.len() > 1 && label.starts_with('0'))
            || !label.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        *slot = label.parse().ok()?;
    }
    labels.next().is_none().then(|| Ipv4Addr::from(octets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srv_names_parse_port_protocol_and_service() {
        assert_eq!(parse_srv("_80._tcp.web"), Some((80, Protocol::Tcp, "web")));
        assert_eq!(
            parse_srv("_53._udp.dns.frontend"),
            Some((53, Protocol::Udp, "dns.frontend"))
        );
        assert_eq!(parse_srv("_http._tcp.web"), None);
        assert_eq!(parse_srv("_+80._tcp.web"), None);
        assert_eq!(parse_srv("_80._sctp.web"), None);
        assert_eq!(parse_srv("_70000._tcp.web"), None);
    }

    #[test]
    fn reverse_names_need_exactly_four_plain_octets() {
        assert_eq!(
            parse_reverse_v4("4.3.2.10"),
            Some(Ipv4Addr::new(10, 2, 3, 4))
        );
        assert_eq!(parse_reverse_v4("3.2.10"), None);
        assert_eq!(parse_reverse_v4("5.4.3.2.10"), None);
        assert_eq!(parse_reverse_v4("04.3.2.10"), None);
        assert_eq!(parse_reverse_v4("256.3.2.10"), None);
    }
}
