//! What DNS answers from: the agent's view of the service table, network by network.
//!
//! The agent builds a [`Snapshot`] from the gossiped table and hands it to
//! [`DnsServer::update`](crate::DnsServer::update) whenever the table changes. The types are
//! plain data on purpose: the agent owns the table, mesh-dns only reads a copy of it.

use std::net::Ipv4Addr;

/// Everything mesh-dns answers from, grouped by network.
///
/// A service attached to two networks appears in both networks' lists, each time with the
/// VIP and task IPs it has on that network (as in Swarm, where a service gets one VIP per
/// network).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub networks: Vec<Network>,
}

/// One overlay network and the names on it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Network {
    /// The network's name, as `meshctl network create` was given it. Names are matched
    /// case-insensitively; `<service>.<network>` names hang below it.
    pub name: String,
    pub services: Vec<Service>,
    /// Tasks on this network that belong to no service (`meshctl run --network`). Tasks of a
    /// service are listed in [`Service::tasks`] and resolve by name too; do not repeat them here.
    pub tasks: Vec<Task>,
}

/// A service as seen on one network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub endpoint_mode: EndpointMode,
    /// The service's running tasks on this network. Leave out tasks that are not healthy:
    /// DNS hands out what is listed here.
    pub tasks: Vec<Task>,
    pub ports: Vec<Port>,
}

/// How clients reach a service's tasks, as `docker service create --endpoint-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointMode {
    /// The service name resolves to this virtual IP; the dataplane balances across tasks.
    Vip(Ipv4Addr),
    /// DNS round robin: the service name resolves to every task IP, shuffled per answer.
    Dnsrr,
}

/// A task (a workload's network namespace) with its address on one network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// The task's name, e.g. `web.1.x7f3k2` for a service task or `db` for a plain one.
    /// Dots are allowed: the whole name is matched, not its labels.
    pub name: String,
    pub ip: Ipv4Addr,
}

/// A port a service exposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Port {
    pub protocol: Protocol,
    /// The port published on every node's underlay address (routing mesh), if any.
    pub published: Option<u16>,
    /// The port the tasks listen on; inside the overlay, VIP:target reaches them.
    pub target: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}
