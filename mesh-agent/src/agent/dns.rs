//! Service DNS for this node's tasks: one mesh-dns server per node, one listener inside each
//! task's network namespace at 127.0.0.11:53 (Docker's address), scoped to the task's
//! networks, and answers that follow the merged view.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
};

use anyhow::{Context, Result};
use mesh_dns::{EndpointMode as DnsMode, Port, Protocol as DnsProtocol, Scope, Snapshot, Task};
use tracing::{debug, warn};

use super::Agent;
use crate::{
    cluster::View,
    netns,
    task::{CniAttachment, GATEWAY_NETWORK, ProcessState, TaskRecord},
};
use mesh_api::spec::{EndpointMode, Protocol};

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
        for attachment in s.spec.attachments() {
            if let Some(n) = networks.get_mut(attachment.target.as_str()) {
                add_service(n, view, s, &attachment);
            }
        }
    }
    Snapshot {
        networks: networks.into_values().collect(),
    }
}

/// Service `s` on one of its networks: its VIP there (or its tasks' addresses there), under
/// its name, its stack's short name and its aliases on that network.
fn add_service(
    n: &mut mesh_dns::Network,
    view: &View,
    s: &crate::cluster::Replicated<mesh_api::spec::ServiceSpec>,
    attachment: &mesh_api::spec::NetworkAttachment,
) {
    let endpoint_mode = match (s.spec.endpoint_mode, attachment.vip) {
        (EndpointMode::Vip, Some(vip)) => DnsMode::Vip(vip),
        _ => DnsMode::Dnsrr,
    };
    let service = mesh_dns::Service {
        name: s.spec.name.clone(),
        endpoint_mode,
        tasks: view
            .backends(&s.spec.name)
            .filter(|e| e.active && e.record.network == attachment.target)
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
    };
    // Swarm's alias: a stack's service also answers to its short name (`api` for
    // `shop_api`) on its network, unless a service of that very name is there too.
    let short = s
        .spec
        .labels
        .get(mesh_api::spec::STACK_LABEL)
        .and_then(|stack| s.spec.name.strip_prefix(&format!("{stack}_")))
        .filter(|short| {
            !view
                .services
                .values()
                .any(|o| o.spec.name == *short && o.spec.on_network(&attachment.target))
        })
        .map(str::to_owned);
    // Its aliases on the network (`--network name=N,alias=A`) answer like its name.
    for name in short.into_iter().chain(attachment.aliases.iter().cloned()) {
        n.services.push(mesh_dns::Service {
            name,
            ..service.clone()
        });
    }
    n.services.push(service);
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

    /// Opens the resolver inside a task's namespace and lets the socket hooks act there (VIP
    /// balancing, 127.0.0.11 → the listener), for every process in it. Idempotent.
    pub(crate) async fn serve_dns_for(&self, task: &TaskRecord) -> Result<()> {
        if task.state != ProcessState::Running {
            return Ok(());
        }
        self.serve_dns_before_start(task).await
    }

    /// [`Agent::serve_dns_for`] for a task whose namespace is ready and whose process has
    /// not started yet.
    pub(crate) async fn serve_dns_before_start(&self, task: &TaskRecord) -> Result<()> {
        let networks: Vec<&str> = task
            .spec
            .attachments
            .iter()
            .map(|a| a.network.as_str())
            .filter(|n| *n != GATEWAY_NETWORK)
            .collect();
        let scope = Scope::new(networks).with_upstreams(own_upstreams(&task.spec.run.dns));
        self.serve_dns_in(&task.spec.name, &netns::path(&task.netns), scope)
            .await
    }

    /// [`Agent::serve_dns_for`] in the namespace of a container attached through CNI.
    pub(crate) async fn serve_dns_for_cni(&self, cni: &CniAttachment) -> Result<()> {
        self.serve_dns_in(&cni.task, &cni.netns, Scope::new([cni.network()]))
            .await
    }

    /// The resolver for the task `name` (scoped to `networks`) in the namespace at `path`.
    async fn serve_dns_in(&self, name: &str, path: &Path, scope: Scope) -> Result<()> {
        let name = name.to_owned();
        if self
            .dns_listeners
            .lock()
            .expect("dns listeners lock")
            .contains_key(&name)
        {
            return Ok(());
        }
        // Sockets belong to the namespace they are created in: bind on a thread that entered
        // the task's namespace, then hand them to the runtime.
        let (udp, tcp, cookie) = netns::run_in(path, bind_resolver)??;
        let port = udp.local_addr()?.port();
        let Some(local) = self.local() else {
            anyhow::bail!("no dataplane on this node to steer 127.0.0.11 to the resolver");
        };
        {
            let mut dp = local.dataplane.lock().await;
            dp.steer_netns(cookie, mesh_common::lb::NETNS_TASK)?;
            dp.set_resolver(cookie, port)?;
        }
        let handle = self.dns.serve(
            tokio::net::UdpSocket::from_std(udp)?,
            tokio::net::TcpListener::from_std(tcp)?,
            scope,
        );
        debug!(
            task = name,
            port, "resolver for {RESOLVER_ADDRESS}:53 listening in the task"
        );
        self.dns_listeners
            .lock()
            .expect("dns listeners lock")
            .insert(name, (handle, cookie));
        Ok(())
    }

    pub(crate) async fn stop_dns_for(&self, task: &str) {
        let removed = self
            .dns_listeners
            .lock()
            .expect("dns listeners lock")
            .remove(task);
        if let Some((_, cookie)) = removed
            && let Some(local) = self.local()
        {
            let mut dp = local.dataplane.lock().await;
            if let Err(e) = dp.remove_resolver(cookie).and(dp.unsteer_netns(cookie)) {
                warn!(task, "{e:#}");
            }
        }
    }

    /// Listeners for every running task (after a restart adopted them); ports an earlier
    /// agent registered are forgotten first, their sockets died with it. Namespaces stay
    /// steered throughout (VIPs keep balancing across the restart); those of tasks that are
    /// gone are dropped afterwards.
    pub(crate) async fn serve_dns_for_all(&self) {
        let Some(local) = self.local() else {
            return;
        };
        if let Err(e) = local.dataplane.lock().await.clear_resolvers() {
            warn!("{e:#}");
        }
        for t in local.tasks.list() {
            if let Err(e) = self.serve_dns_for(&t).await {
                warn!(task = t.spec.name, "no DNS for the task: {e:#}");
            }
        }
        for c in local.tasks.cni_list() {
            if let Err(e) = self.serve_dns_for_cni(&c).await {
                warn!(task = c.task, "no DNS for the container: {e:#}");
            }
        }
        let live: std::collections::BTreeSet<u64> = self
            .dns_listeners
            .lock()
            .expect("dns listeners lock")
            .values()
            .map(|(_, cookie)| *cookie)
            .collect();
        let mut dp = local.dataplane.lock().await;
        match dp.steered_netns() {
            Ok(all) => {
                for (cookie, kind) in all {
                    if kind == mesh_common::lb::NETNS_TASK
                        && !live.contains(&cookie)
                        && let Err(e) = dp.unsteer_netns(cookie)
                    {
                        warn!("{e:#}");
                    }
                }
            }
            Err(e) => warn!("{e:#}"),
        }
    }
}

/// Binds the resolver listener (UDP and TCP on one port the kernel picks, on 127.0.0.11) in
/// the calling thread's namespace; also returns the namespace's cookie.
fn bind_resolver() -> Result<(std::net::UdpSocket, std::net::TcpListener, u64)> {
    // The UDP port is free for UDP; TCP may hold it already: retry with another.
    for _ in 0..16 {
        let udp = std::net::UdpSocket::bind(SocketAddr::from((RESOLVER_ADDRESS, 0)))
            .context("binding the task's resolver (udp)")?;
        let port = udp.local_addr()?.port();
        let Ok(tcp) = std::net::TcpListener::bind(SocketAddr::from((RESOLVER_ADDRESS, port)))
        else {
            continue;
        };
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        let cookie = netns_cookie(&udp)?;
        return Ok((udp, tcp, cookie));
    }
    anyhow::bail!("no port free for both UDP and TCP on {RESOLVER_ADDRESS}")
}

/// SO_NETNS_COOKIE: the kernel's id of a socket's network namespace, what eBPF sees.
fn netns_cookie(sock: &std::net::UdpSocket) -> Result<u64> {
    use std::os::fd::AsRawFd;
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("reading the namespace cookie");
    }
    Ok(cookie)
}

/// Where a task's foreign names go: its `--dns` servers, asked by the task's resolver at
/// 127.0.0.11 as Docker's embedded DNS asks them (service names keep resolving). Loopback
/// servers are the task's own (a cache inside it): the agent, outside the task, must not
/// ask its host's loopback for it, so those are listed in the task's resolv.conf instead.
fn own_upstreams(dns: &mesh_api::spec::DnsConfig) -> Vec<std::net::SocketAddr> {
    dns.nameservers
        .iter()
        .filter(|ip| !ip.is_loopback())
        .map(|ip| std::net::SocketAddr::new(*ip, 53))
        .collect()
}
