//! The routing mesh and service VIPs on this node: which bridges carry the load balancer, and
//! what the load balancer's maps hold, derived from the merged view.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use tracing::{info, warn};

use super::{Agent, Local};
use crate::{
    cluster::{EndpointView, Replicated, View},
    dataplane::{Dataplane, ReturnTimeouts, TaskVeth},
    lb::{self, BackendLb, FlowTimeouts, NetworkLb, PublishedPort, ServiceLb},
    overlay::{MacAddr, NetworkPlumbing},
    task::{GATEWAY_NETWORK, Interface, TaskRecord},
};
use mesh_api::id::short_id;
use mesh_api::spec::{EndpointMode, Protocol, PublishMode, ServiceSpec};
use mesh_common::lb::{LocalTaskKey, TaskPort};

/// Services removed while their tasks still run (they stop with a drain, or were started
/// by hand): each stays programmed under the id it had, with no published port and no VIP
/// and every task a draining backend, so its established connections finish where they
/// are instead of being reset; new ones are refused. It goes when its last task does. A
/// service never programmed here has no connections here to finish.
fn removed_services(
    view: &View,
    plumbed: &[NetworkPlumbing],
    networks: &BTreeMap<u32, NetworkLb>,
    lb: &lb::LoadBalancer,
    node: &str,
) -> Vec<ServiceLb> {
    let mut orphans: BTreeMap<&str, Vec<&EndpointView>> = BTreeMap::new();
    for e in view.removed_service_endpoints() {
        if let Some(service) = e.record.service.as_deref() {
            orphans.entry(service).or_default().push(e);
        }
    }
    let mut out = Vec::new();
    for (name, tasks) in orphans {
        let ids = lb.programmed_ids(name);
        // `<id>@<network>`: its VIP on a further network; the others are on its first.
        let further: Vec<&str> = ids
            .iter()
            .filter_map(|id| id.rsplit_once('@').map(|(_, n)| n))
            .collect();
        let Some(first) = tasks
            .iter()
            .map(|e| e.record.network.as_str())
            .find(|n| !further.contains(n))
        else {
            continue;
        };
        for id in &ids {
            let network = id.rsplit_once('@').map_or(first, |(_, n)| n);
            let Some(net) = plumbed.iter().find(|n| n.name == network) else {
                continue;
            };
            let host_only = id.ends_with("/host");
            out.push(ServiceLb {
                id: id.clone(),
                name: name.to_owned(),
                network: networks[&net.vni],
                vip: None,
                ports: Vec::new(),
                backends: tasks
                    .iter()
                    .filter(|e| e.record.network == network)
                    .filter(|e| !host_only || e.node == node)
                    .map(|e| BackendLb {
                        ip: e.record.ip,
                        draining: true,
                    })
                    .collect(),
            });
        }
    }
    out
}

impl Agent {
    /// Puts the load balancer on every plumbed network's bridge (replies from tasks arrive
    /// there) and programs every service of those networks.
    pub(crate) async fn converge_routing(
        &self,
        local: &Local,
        view: &View,
        plumbed: &[NetworkPlumbing],
    ) -> Result<()> {
        let mut dp = local.dataplane.lock().await;
        let mut devices = local.network_devices.lock().await;
        let networks = attach_network_devices(&mut dp, &mut devices, plumbed)?;
        detach_gone_devices(&mut dp, &mut devices, plumbed)?;
        let mut desired = desired_services(view, plumbed, &networks, self.node_name());
        desired.extend(removed_services(
            view,
            plumbed,
            &networks,
            dp.lb(),
            self.node_name(),
        ));
        // Before the load balancer: a local task's first flow must find it among the local
        // tasks (a flow that does not is sent to other nodes; see FLOW_REMOTE).
        converge_task_veths(local, &mut dp, plumbed).await?;
        program_load_balancer(&mut dp, &desired)?;
        drop(devices);
        drop(dp);
        self.lb_applied(view).await;
        Ok(())
    }

    /// Puts the client-address programs on a new task's veths before it becomes a backend
    /// anywhere, so its first client's replies already find their way back.
    pub(crate) async fn attach_task_veths(
        &self,
        local: &Local,
        task: &TaskRecord,
        plumbed: &[NetworkPlumbing],
    ) -> Result<()> {
        let mut dp = local.dataplane.lock().await;
        for v in task_veths(task.interfaces.iter(), plumbed) {
            dp.attach_task_veth(&v)?;
        }
        Ok(())
    }

    /// Removes finished and orphaned flows and return entries, forever (every few seconds).
    pub async fn sweep_flows(self: std::sync::Arc<Self>) {
        let Some(local) = self.local() else {
            return;
        };
        let timeouts: FlowTimeouts = self.config.dataplane.flow_timeouts();
        let returns = ReturnTimeouts::default();
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            let mut dp = local.dataplane.lock().await;
            match dp.sweep_returns(&returns) {
                Ok(n) if n > 0 => tracing::debug!(removed = n, "return entry sweep"),
                Ok(_) => {}
                Err(e) => warn!("sweeping return entries: {e:#}"),
            }
            match dp.lb_mut().sweep(&timeouts) {
                Ok(r) if r.removed > 0 => {
                    tracing::debug!(removed = r.removed, scanned = r.scanned, "flow sweep")
                }
                Ok(_) => {}
                Err(e) => warn!("sweeping flows: {e:#}"),
            }
        }
    }
}

/// Attaches the routing mesh to each plumbed network's bridge and VXLAN device (again to
/// one that was re-created), and returns the networks as the load balancer sees them.
fn attach_network_devices(
    dp: &mut Dataplane,
    devices: &mut BTreeMap<String, u32>,
    plumbed: &[NetworkPlumbing],
) -> Result<BTreeMap<u32, NetworkLb>> {
    let mut networks = BTreeMap::new();
    for n in plumbed {
        let name = n.bridge();
        let bridge = nix::net::if_::if_nametoindex(name.as_str())
            .with_context(|| format!("looking up bridge {name}"))?;
        if must_attach(devices, dp, &name, bridge)? {
            dp.attach_network(bridge)?;
            devices.insert(name, bridge);
        }
        // Without it, flows to other nodes' tasks and their replies take the bridge.
        let vxlan_name = n.vxlan();
        let vxlan = nix::net::if_::if_nametoindex(vxlan_name.as_str()).unwrap_or(0);
        if vxlan != 0 && must_attach(devices, dp, &vxlan_name, vxlan)? {
            dp.attach_overlay(vxlan)?;
            devices.insert(vxlan_name, vxlan);
        }
        networks.insert(
            n.vni,
            NetworkLb {
                id: n.vni,
                node_addr: n.node_address,
                bridge_ifindex: bridge,
                vxlan_ifindex: vxlan,
            },
        );
    }
    Ok(networks)
}

/// Takes the routing mesh off the devices of networks no longer plumbed here.
fn detach_gone_devices(
    dp: &mut Dataplane,
    devices: &mut BTreeMap<String, u32>,
    plumbed: &[NetworkPlumbing],
) -> Result<()> {
    let gone: Vec<String> = devices
        .keys()
        .filter(|d| {
            !plumbed
                .iter()
                .any(|n| n.bridge() == **d || n.vxlan() == **d)
        })
        .cloned()
        .collect();
    for d in gone {
        dp.detach_tc(&d)?;
        devices.remove(&d);
    }
    Ok(())
}

/// Every service of a plumbed network as the load balancer should hold it.
fn desired_services(
    view: &View,
    plumbed: &[NetworkPlumbing],
    networks: &BTreeMap<u32, NetworkLb>,
    node: &str,
) -> Vec<ServiceLb> {
    let mut desired = Vec::new();
    for s in view.services.values() {
        if let Some(net) = plumbed.iter().find(|n| n.name == s.spec.network) {
            desired.extend(service_lbs(view, s, networks[&net.vni], node));
        }
        // Its VIP on each further network balances over its tasks' addresses there.
        for a in s.spec.networks.iter() {
            let Some(net) = plumbed.iter().find(|n| n.name == a.target) else {
                continue;
            };
            desired.push(ServiceLb {
                id: format!("{}@{}", short_id(&s.spec.name, &s.created), a.target),
                name: s.spec.name.clone(),
                network: networks[&net.vni],
                vip: match s.spec.endpoint_mode {
                    EndpointMode::Vip => a.vip,
                    EndpointMode::Dnsrr => None,
                },
                ports: Vec::new(),
                backends: service_backends(view, &s.spec.name, &a.target)
                    .map(backend_lb)
                    .collect(),
            });
        }
    }
    desired
}

/// One service's entries: its host-mode ports when it has a task on this node, then its
/// VIP and routing-mesh ports over every backend.
fn service_lbs(
    view: &View,
    s: &Replicated<ServiceSpec>,
    network: NetworkLb,
    node: &str,
) -> Vec<ServiceLb> {
    let mut out = Vec::new();
    let id = short_id(&s.spec.name, &s.created);
    let host_ports = published_ports(&s.spec, true);
    let own: Vec<BackendLb> = service_backends(view, &s.spec.name, &s.spec.network)
        .filter(|e| e.node == node)
        .map(backend_lb)
        .collect();
    // Swarm's mode=host: a node without a task of the service does not answer the
    // port at all (the kernel refuses the connection).
    if !host_ports.is_empty() && !own.is_empty() {
        out.push(ServiceLb {
            id: format!("{id}/host"),
            name: s.spec.name.clone(),
            network,
            vip: None,
            ports: host_ports,
            backends: own,
        });
    }
    out.push(ServiceLb {
        id,
        name: s.spec.name.clone(),
        network,
        vip: match s.spec.endpoint_mode {
            EndpointMode::Vip => s.spec.vip,
            EndpointMode::Dnsrr => None,
        },
        ports: published_ports(&s.spec, false),
        backends: service_backends(view, &s.spec.name, &s.spec.network)
            .map(backend_lb)
            .collect(),
    });
    out
}

/// The service's published ports of mode host (`host`) or of the routing mesh.
fn published_ports(spec: &ServiceSpec, host: bool) -> Vec<PublishedPort> {
    spec.ports
        .iter()
        .filter(|p| (p.mode == PublishMode::Host) == host)
        .filter_map(|p| {
            Some(PublishedPort {
                proto: match p.protocol {
                    Protocol::Tcp => lb::Protocol::Tcp,
                    Protocol::Udp => lb::Protocol::Udp,
                },
                published: p.published?,
                target: p.target,
                mode: match p.mode {
                    // Host ports reach this node's own tasks only (service_lbs), with the
                    // client's address kept.
                    PublishMode::Ingress | PublishMode::Host => lb::PublishMode::Ingress,
                    PublishMode::Snat => lb::PublishMode::Snat,
                },
            })
        })
        .collect()
}

/// The service's backends on `network`, active or not. Tasks of drained nodes, stopping
/// tasks and tasks of nodes called down keep their connections but get no new ones: a node
/// that only stalled keeps serving what it has.
fn service_backends<'a>(
    view: &'a View,
    service: &'a str,
    network: &'a str,
) -> impl Iterator<Item = &'a EndpointView> {
    view.backends(service)
        .chain(
            view.down_endpoints
                .iter()
                .filter(move |e| e.record.service.as_deref() == Some(service)),
        )
        .filter(move |e| e.record.network == network)
}

fn backend_lb(e: &EndpointView) -> BackendLb {
    BackendLb {
        ip: e.record.ip,
        draining: !e.active,
    }
}

/// Puts the client-address programs on the host veths of this node's tasks and CNI
/// containers, and takes them off veths that went; nothing when the set is unchanged.
async fn converge_task_veths(
    local: &Local,
    dp: &mut Dataplane,
    plumbed: &[NetworkPlumbing],
) -> Result<()> {
    let tasks = local.tasks.list();
    let containers = local.tasks.cni_list();
    let veths = task_veths(
        tasks
            .iter()
            .flat_map(|t| &t.interfaces)
            .chain(containers.iter().flat_map(|c| &c.interfaces)),
        plumbed,
    );
    let mut attached = local.task_veths.lock().await;
    if *attached != veths {
        for v in veths.iter().filter(|v| !attached.contains(v)) {
            dp.attach_task_veth(v)?;
        }
        dp.retain_task_veths(&veths)?;
        *attached = veths;
    }
    Ok(())
}

fn program_load_balancer(dp: &mut Dataplane, desired: &[ServiceLb]) -> Result<()> {
    let ops = dp
        .lb_mut()
        .apply(desired)
        .context("programming the load balancer")?;
    if ops.total() > 0 {
        info!(
            updates = ops.updates,
            deletes = ops.deletes,
            "load balancer programmed"
        );
    }
    Ok(())
}

/// Whether the routing mesh must be attached to the network device `name`, now `ifindex`:
/// it is new to this agent (a restarted agent's attach replaces the pinned link in place,
/// so no packet goes unseen), or was re-created (its old link died with it and goes).
fn must_attach(
    attached: &BTreeMap<String, u32>,
    dp: &mut Dataplane,
    name: &str,
    ifindex: u32,
) -> Result<bool> {
    match attached.get(name) {
        Some(&seen) if seen == ifindex => Ok(false),
        Some(_) => {
            dp.detach_tc(name)?;
            Ok(true)
        }
        None => Ok(true),
    }
}

/// The host veths of tasks' (and CNI containers') `interfaces` that exist, with the
/// settings of their overlay ports.
fn task_veths<'a>(
    interfaces: impl Iterator<Item = &'a Interface>,
    plumbed: &[NetworkPlumbing],
) -> Vec<TaskVeth> {
    let index = |name: &str| nix::net::if_::if_nametoindex(name).ok();
    let mut out = Vec::new();
    for iface in interfaces {
        let Some(ifindex) = index(&iface.host_veth) else {
            continue;
        };
        let (overlay, task) = if iface.network == GATEWAY_NETWORK {
            (None, None)
        } else {
            let Some(n) = plumbed.iter().find(|n| n.name == iface.network) else {
                continue;
            };
            let Some(vxlan_ifindex) = index(&n.vxlan()) else {
                continue;
            };
            let port = TaskPort {
                node_mac: MacAddr::for_ip(n.node_address).0,
                _pad: [0; 2],
                vxlan_ifindex,
            };
            let task = LocalTaskKey {
                network: n.vni,
                addr: iface.address.addr().octets(),
            };
            (Some(port), Some(task))
        };
        out.push(TaskVeth {
            name: iface.host_veth.clone(),
            ifindex,
            overlay,
            task,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::EndpointRecord;
    use mesh_api::{
        id::Stamp,
        spec::{EndpointState, PortSpec},
    };

    fn port(published: Option<u16>, target: u16, mode: PublishMode) -> PortSpec {
        PortSpec {
            protocol: Protocol::Tcp,
            published,
            target,
            mode,
        }
    }

    fn lb_port(published: u16, target: u16, mode: lb::PublishMode) -> PublishedPort {
        PublishedPort {
            proto: lb::Protocol::Tcp,
            published,
            target,
            mode,
        }
    }

    #[test]
    fn host_ports_keep_the_clients_address_and_target_only_ports_are_vip_only() {
        let spec = ServiceSpec {
            ports: vec![
                port(Some(80), 8080, PublishMode::Host),
                port(Some(443), 8443, PublishMode::Snat),
                port(None, 9000, PublishMode::Ingress),
            ],
            ..ServiceSpec::default()
        };
        assert_eq!(
            published_ports(&spec, true),
            [lb_port(80, 8080, lb::PublishMode::Ingress)]
        );
        assert_eq!(
            published_ports(&spec, false),
            [lb_port(443, 8443, lb::PublishMode::Snat)]
        );
    }

    #[test]
    fn only_a_node_with_a_task_answers_a_host_port() {
        let spec = ServiceSpec {
            name: "web".into(),
            network: "app".into(),
            ports: vec![port(Some(80), 8080, PublishMode::Host)],
            ..ServiceSpec::default()
        };
        let service = Replicated::new(
            spec,
            Stamp {
                ms: 1,
                node: "a".into(),
            },
        );
        let endpoint = |node: &str, ip: &str, active| EndpointView {
            node: node.into(),
            vtep: "192.0.2.1".parse().unwrap(),
            record: EndpointRecord {
                task: format!("web-{node}"),
                network: "app".into(),
                service: Some("web".into()),
                ip: ip.parse().unwrap(),
                mac: String::new(),
                state: EndpointState::Running,
            },
            active,
        };
        let view = View {
            endpoints: vec![endpoint("a", "10.1.0.2", true)],
            down_endpoints: vec![endpoint("b", "10.1.0.3", false)],
            ..View::default()
        };
        let network = NetworkLb {
            id: 4096,
            node_addr: "10.1.0.1".parse().unwrap(),
            bridge_ifindex: 1,
            vxlan_ifindex: 2,
        };
        let on_a = service_lbs(&view, &service, network, "a");
        assert_eq!(on_a.len(), 2);
        assert!(on_a[0].id.ends_with("/host"));
        assert_eq!(on_a[0].backends.len(), 1);
        // Every node balances to every task; a down node's keep their flows only.
        assert_eq!(
            on_a[1]
                .backends
                .iter()
                .map(|b| b.draining)
                .collect::<Vec<_>>(),
            [false, true]
        );
        let on_c = service_lbs(&view, &service, network, "c");
        assert_eq!(on_c.len(), 1);
        assert!(!on_c[0].id.ends_with("/host"));
    }
}
