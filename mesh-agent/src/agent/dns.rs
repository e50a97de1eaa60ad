//! Service DNS for this node's tasks: one mesh-dns server per node, one listener inside each
//! task's network namespace at 127.0.0.11:53 (Docker's address), scoped to the task's
//! networks, and answers that follow the merged view.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
};

use anyhow::{Context, Result};
use mesh_dns::{EndpointMode as DnsMode, Port, Protocol as DnsProtocol, Scope, Snapshot, Task};
use tracing::{debug, warn};

use super::Agent;
use crate::{
    cluster::{EndpointMode, Protocol, View},
    netns,
    task::{GATEWAY_NETWORK, TaskRecord, TaskState},
};

/// Where tasks find the resolver, as in Docker.
pub const RESOLVER_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);

/// What DNS answers from: per network, its services (VIP or tasks) and all its tasks. Only
/// tasks that take traffic are listed — DNS hands out whatever it is given.
pub fn snapshot(view: &View) -> Snapshot {
    let mut networks: BTreeMap<&str, mesh_dns::Network> = view
        .networks
        .keys()
        .map(|n| {
            (
                n.as_str(),
                mesh_dns::Network {
                    name: n.clone(),
                    ..Default::default()
                },
            )
        })
        .collect();
    for e in view.endpoints.iter().filter(|e| e.active) {
        if let Some(n) = networks.get_mut(e.record.network.as_str()) {
            n.tasks.push(Task {
                name: e.record.task.clone(),
                ip: e.record.ip,
            });
        }
    }
    for s in view.services.values() {
        let Some(n) = networks.get_mut(s.spec.network.as_str()) else {
            continue;
        };
        let endpoint_mode = match (s.spec.mode, s.spec.vip) {
            (EndpointMode::Vip, Some(vip)) => DnsMode::Vip(vip),
            _ => DnsMode::Dnsrr,
        };
        n.services.push(mesh_dns::Service {
            name: s.spec.name.clone(),
            endpoint_mode,
            tasks: view
                .backends(&s.spec.name)
                .filter(|e| e.active)
                .map(|e| Task {
                    name: e.record.task.clone(),
                    ip: e.record.ip,
                })
                .collect(),
            ports: s
                .spec
                .ports
                .iter()
                .map(|p| Port {
                    protocol: match p.protocol {
                        Protocol::Tcp => DnsProtocol::Tcp,
                        Protocol::Udp => DnsProtocol::Udp,
                    },
                    published: p.published,
                    target: p.target,
                })
                .collect(),
        });
    }
    Snapshot {
        networks: networks.into_values().collect(),
    }
}

impl Agent {
    /// Gives the DNS server the view's names, if they changed.
    pub(crate) fn update_dns(&self, view: &View) {
        let next = snapshot(view);
        let mut last = self.dns_last.lock().expect("dns snapshot lock");
        if last.as_ref() != Some(&next) {
            self.dns.update(&next);
            *last = Some(next);
        }
    }

    /// Opens the resolver inside a task's namespace. Idempotent.
    pub(crate) fn serve_dns_for(&self, task: &TaskRecord) -> Result<()> {
        if task.state != TaskState::Running {
            return Ok(());
        }
        let name = task.spec.name.clone();
        if self
            .dns_listeners
            .lock()
            .expect("dns listeners lock")
            .contains_key(&name)
        {
            return Ok(());
        }
        let networks: Vec<&str> = task
            .spec
            .attachments
            .iter()
            .map(|a| a.network.as_str())
            .filter(|n| *n != GATEWAY_NETWORK)
            .collect();
        // Sockets belong to the namespace they are created in: bind on a thread that entered
        // the task's namespace, then hand them to the runtime.
        let path = netns::path(&task.netns);
        let (udp, tcp) = netns::run_in(&path, || -> Result<_> {
            let addr = SocketAddr::from((RESOLVER_ADDRESS, 53));
            let udp =
                std::net::UdpSocket::bind(addr).context("binding the task's DNS socket (udp)")?;
            let tcp =
                std::net::TcpListener::bind(addr).context("binding the task's DNS socket (tcp)")?;
            udp.set_nonblocking(true)?;
            tcp.set_nonblocking(true)?;
            Ok((udp, tcp))
        })??;
        let handle = self.dns.serve(
            tokio::net::UdpSocket::from_std(udp)?,
            tokio::net::TcpListener::from_std(tcp)?,
            Scope::new(networks),
        );
        debug!(
            task = name,
            "resolver listening at {RESOLVER_ADDRESS}:53 in the task"
        );
        self.dns_listeners
            .lock()
            .expect("dns listeners lock")
            .insert(name, handle);
        Ok(())
    }

    pub(crate) fn stop_dns_for(&self, task: &str) {
        self.dns_listeners
            .lock()
            .expect("dns listeners lock")
            .remove(task);
    }

    /// Listeners for every running task (after a restart adopted them).
    pub(crate) fn serve_dns_for_all(&self) {
        for t in self.tasks.list() {
            if let Err(e) = self.serve_dns_for(&t) {
                warn!(task = t.spec.name, "no DNS for the task: {e:#}");
            }
        }
    }
}
