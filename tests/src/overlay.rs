//! Overlay networks and tasks on a namespace cluster, driven in-process through mesh-agent's
//! library (no gossip): each host gets a [`Node`] whose runtime, netlink socket and task
//! manager live in the host's namespace, and [`Placements`] computes for every host the
//! desired overlay an agent would derive from the cluster's endpoint table.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use mesh_agent::{
    netlink,
    overlay::{
        self, Change, DesiredOverlay, GatewayPlumbing, MacAddr, NetworkPlumbing, Overlay, PeerVtep,
        RemoteEndpoint, Underlay,
    },
    task::{Attachment, TaskConfig, TaskRecord, TaskSpec, Tasks},
};

use crate::{Host, NsRuntime};

pub const UNDERLAY_MTU: u32 = 1500;

/// A network as the cluster knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkDef {
    pub name: &'static str,
    pub vni: u32,
    pub subnet: Ipv4Net,
}

impl NetworkDef {
    pub fn new(name: &'static str, vni: u32, subnet: &str) -> Self {
        Self {
            name,
            vni,
            subnet: subnet.parse().expect("subnet"),
        }
    }

    /// The address of host `index` on the network: .1 for host 1, .2 for host 2, ...
    pub fn node_address(&self, host: usize) -> Ipv4Addr {
        self.address(host as u8)
    }

    /// The address with last octet `last` in the network's /24.
    pub fn address(&self, last: u8) -> Ipv4Addr {
        let [a, b, c, _] = self.subnet.network().octets();
        Ipv4Addr::new(a, b, c, last)
    }

    pub fn plumbing(&self, host: usize) -> NetworkPlumbing {
        NetworkPlumbing {
            name: self.name.into(),
            vni: self.vni,
            subnet: self.subnet,
            node_address: self.node_address(host),
            mtu: overlay::network_mtu(UNDERLAY_MTU),
        }
    }
}

/// One host of the cluster as an in-process node.
pub struct Node {
    pub index: usize,
    pub name: String,
    pub underlay: Underlay,
    pub overlay: Overlay,
    pub tasks: Tasks,
    pub state_dir: PathBuf,
    rt: NsRuntime,
}

impl Node {
    /// Opens the host's overlay and task manager (adopting whatever an earlier node left
    /// under the same name).
    pub fn start(host: &Host) -> Result<Self> {
        Self::start_with(host, |_| {})
    }

    /// Like [`Node::start`], with a chance to adjust the task configuration.
    pub fn start_with(host: &Host, tweak: impl FnOnce(&mut TaskConfig)) -> Result<Self> {
        let rt = host.ns.runtime()?;
        let name = host.node_name().to_owned();
        let state_dir = PathBuf::from("/run/mesh").join(&name).join("state");
        let mut config = TaskConfig::new(name.clone(), state_dir.clone());
        config.stop_timeout = Duration::from_secs(3);
        // This test binary is not the agent: the tasks' init is the built mesh-agent.
        config.init = crate::cluster::bin("mesh-agent");
        tweak(&mut config);
        let (overlay, tasks) = rt.block_on(async move {
            let handle = netlink::connect()?;
            let tasks = Tasks::open(config, handle.clone()).await?;
            anyhow::Ok((Overlay::new(handle), tasks))
        })?;
        Ok(Self {
            index: host.index,
            name,
            underlay: Underlay {
                interface: "eth0".into(),
                address: host.ip.parse().context("host underlay address")?,
                mtu: UNDERLAY_MTU,
            },
            overlay,
            tasks,
            state_dir,
            rt,
        })
    }

    /// Runs a future on the node's runtime (inside the host's namespace).
    pub fn block_on<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        self.rt.block_on(fut)
    }

    pub fn reconcile(&self, desired: &DesiredOverlay) -> Result<Vec<Change>> {
        let overlay = self.overlay.clone();
        let desired = desired.clone();
        self.block_on(async move { overlay.reconcile(&desired).await })
    }

    /// Starts `command` as task `name` on `network` at `ip` (the network must be plumbed).
    pub fn run_task(
        &self,
        name: &str,
        network: &NetworkDef,
        ip: Ipv4Addr,
        command: &[&str],
    ) -> Result<TaskRecord> {
        self.run_spec(TaskSpec {
            name: name.into(),
            attachments: vec![Attachment::overlay(&network.plumbing(self.index), ip)],
            egress: None,
            command: command.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            hostname: None,
            image: None,
            run: Default::default(),
            limits: Default::default(),
            security: Default::default(),
            mounts: Vec::new(),
        })
    }

    /// Like [`Node::run_task`], with a way out through the node's gateway bridge (which
    /// then carries the default route).
    pub fn run_task_with_egress(
        &self,
        name: &str,
        network: &NetworkDef,
        ip: Ipv4Addr,
        command: &[&str],
    ) -> Result<TaskRecord> {
        self.run_spec(TaskSpec {
            name: name.into(),
            attachments: vec![
                Attachment::overlay(&network.plumbing(self.index), ip).without_default_route(),
            ],
            egress: Some(gateway()),
            command: command.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            hostname: None,
            image: None,
            run: Default::default(),
            limits: Default::default(),
            security: Default::default(),
            mounts: Vec::new(),
        })
    }

    pub fn run_spec(&self, spec: TaskSpec) -> Result<TaskRecord> {
        let tasks = self.tasks.clone();
        // No agent here: nothing to set up in the namespace before the process starts.
        self.block_on(async move {
            tasks
                .create(spec, Default::default(), &|_| Box::pin(async { Ok(()) }))
                .await
        })
    }

    pub fn stop_task(&self, name: &str) -> Result<()> {
        let tasks = self.tasks.clone();
        let name = name.to_owned();
        self.block_on(async move { tasks.stop(&name).await })
    }
}

/// The gateway bridge every node gets when [`Placements::gateway`] is on: the same
/// node-local subnet everywhere, like docker_gwbridge.
pub fn gateway() -> GatewayPlumbing {
    GatewayPlumbing {
        subnet: "172.18.0.0/16".parse().expect("subnet"),
        address: Ipv4Addr::new(172, 18, 0, 1),
        mtu: UNDERLAY_MTU,
    }
}

/// A task's place in the cluster: which host, which network, which address.
#[derive(Clone, Debug)]
pub struct Placement {
    pub host: usize,
    pub network: NetworkDef,
    pub task: String,
    pub ip: Ipv4Addr,
}

/// The cluster's endpoint table, reduced to what the overlay needs.
#[derive(Clone, Debug, Default)]
pub struct Placements {
    /// (host index, underlay address)
    pub hosts: Vec<(usize, Ipv4Addr)>,
    pub tasks: Vec<Placement>,
    /// Every node has the gateway bridge of [`gateway`].
    pub gateway: bool,
}

impl Placements {
    pub fn new(hosts: &[Host]) -> Self {
        Self {
            hosts: hosts
                .iter()
                .map(|h| (h.index, h.ip.parse().expect("host ip")))
                .collect(),
            tasks: Vec::new(),
            gateway: false,
        }
    }

    pub fn place(
        &mut self,
        host: usize,
        network: &NetworkDef,
        task: &str,
        last_octet: u8,
    ) -> Ipv4Addr {
        let ip = network.address(last_octet);
        self.tasks.push(Placement {
            host,
            network: network.clone(),
            task: task.into(),
            ip,
        });
        ip
    }

    pub fn remove(&mut self, task: &str) {
        self.tasks.retain(|p| p.task != task);
    }

    fn networks_of(&self, host: usize) -> Vec<NetworkDef> {
        let mut nets: Vec<NetworkDef> = Vec::new();
        for p in self.tasks.iter().filter(|p| p.host == host) {
            if !nets.contains(&p.network) {
                nets.push(p.network.clone());
            }
        }
        nets
    }

    /// What an agent on `host` would program: its networks (those with a local task), the
    /// other hosts' tasks and node addresses on them, and the other hosts that have them.
    pub fn desired(&self, host: usize) -> DesiredOverlay {
        let vtep = |h: usize| self.hosts.iter().find(|(i, _)| *i == h).expect("host").1;
        let mine = self.networks_of(host);
        let mut desired = DesiredOverlay {
            underlay: Underlay {
                interface: "eth0".into(),
                address: vtep(host),
                mtu: UNDERLAY_MTU,
            },
            networks: mine.iter().map(|n| n.plumbing(host)).collect(),
            gateway: self.gateway.then(gateway),
            ..Default::default()
        };
        for net in &mine {
            for &(other, other_ip) in self.hosts.iter().filter(|(i, _)| *i != host) {
                if !self.networks_of(other).contains(net) {
                    continue;
                }
                desired.peers.push(PeerVtep {
                    vni: net.vni,
                    vtep: other_ip,
                });
                let node_ip = net.node_address(other);
                desired.remote_endpoints.push(RemoteEndpoint {
                    vni: net.vni,
                    ip: node_ip,
                    mac: MacAddr::for_ip(node_ip),
                    vtep: other_ip,
                });
            }
            for p in self
                .tasks
                .iter()
                .filter(|p| p.host != host && &p.network == net)
            {
                desired.remote_endpoints.push(RemoteEndpoint {
                    vni: net.vni,
                    ip: p.ip,
                    mac: MacAddr::for_ip(p.ip),
                    vtep: vtep(p.host),
                });
            }
        }
        desired
    }
}
