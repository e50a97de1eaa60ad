//! Containers of other runtimes on mesh networks, through the CNI plugin: ADD plumbs the
//! runtime's namespace like a task's (overlay veth, address from this node's blocks, egress
//! through the gateway bridge), serves DNS at 127.0.0.11 in it, lets the socket hooks act
//! there and publishes the container's endpoint; DEL undoes all of it and is idempotent.

use std::{net::Ipv4Addr, path::Path};

use tracing::{info, warn};

use super::{Agent, Error, Result, dns::RESOLVER_ADDRESS, validate_name};
use crate::{
    cluster::key,
    task::{Attachment, CniAttachment, CniRequest, GATEWAY_NETWORK},
};
use mesh_api::v1::{CniAdd, CniInfo, CniInterface};

/// The task name of a container: the runtime's name for it if that is a valid task name
/// once `_` and `.` become `-` (podman names like `happy_turing`), else from its id.
fn task_name(req: &CniAdd) -> String {
    if let Some(name) = &req.task {
        let cleaned: String = name
            .chars()
            .map(|c| if c == '_' || c == '.' { '-' } else { c })
            .collect();
        let cleaned = cleaned.trim_matches('-').to_owned();
        if validate_name("task", &cleaned).is_ok() {
            return cleaned;
        }
    }
    let id: String = req
        .container_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect();
    format!("cni-{}", id.to_ascii_lowercase())
}

/// A network namespace file: a bind mount of an nsfs inode (what runtimes pass).
fn is_netns(p: &Path) -> bool {
    nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

impl Agent {
    pub async fn cni_add(&self, req: &CniAdd) -> Result<CniInfo> {
        let local = self.require_local()?;
        if req.container_id.is_empty() || req.ifname.is_empty() {
            return Err(Error::Invalid(
                "CNI ADD needs a container id and an interface name".into(),
            ));
        }
        if req.ifname.len() > 12 || !req.ifname.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(Error::Invalid(format!(
                "interface name {:?}: use 1-12 letters and digits (e.g. eth0)",
                req.ifname
            )));
        }
        let netns = Path::new(&req.netns);
        if !is_netns(netns) {
            return Err(Error::Invalid(format!(
                "{} is not a network namespace (CNI_NETNS must name one the runtime created)",
                req.netns
            )));
        }
        // A repeated ADD for what is already plumbed (a runtime retrying after a timeout)
        // gets the same answer.
        if let Some(existing) = local.tasks.cni_get(&req.container_id, &req.ifname) {
            if existing.netns == netns && existing.network() == req.network {
                return Ok(self.cni_info(&existing));
            }
            return Err(Error::Conflict(format!(
                "container {} already has {} on network {}: DEL it first",
                req.container_id,
                req.ifname,
                existing.network()
            )));
        }
        let view = self.refresh().await;
        if !view.networks.contains_key(&req.network) {
            return Err(Error::NotFound(format!(
                "network {} not found: create it with `meshctl network create {} --cni`",
                req.network, req.network
            )));
        }
        let on_network = |s: &str| {
            view.services
                .get(s)
                .is_some_and(|svc| svc.spec.on_network(&req.network))
        };
        let service = match &req.service {
            Some(svc) => match view.services.get(svc) {
                None => {
                    return Err(Error::NotFound(format!(
                        "service {svc} not found: create it with `meshctl service create {svc} --network {} …` before starting its containers",
                        req.network
                    )));
                }
                Some(s) => {
                    super::attachments::check_task_network(
                        &s.spec,
                        &req.network,
                        "attach its containers to",
                    )?;
                    Some(svc.clone())
                }
            },
            None => req.aliases.iter().find(|a| on_network(a)).cloned(),
        };
        let task = task_name(req);
        if local.tasks.get(&task).is_some() || local.tasks.cni_list().iter().any(|c| c.task == task)
        {
            return Err(Error::Conflict(format!(
                "a task named {task} already exists on this node: name the container differently"
            )));
        }
        if let Some(other) = view.endpoints.iter().find(|e| e.record.task == task) {
            return Err(Error::Conflict(format!(
                "a task named {task} already runs on node {}: task names are cluster-wide (they resolve in DNS); name the container differently",
                other.node
            )));
        }

        let record = {
            // As for tasks: the network stays plumbed while the container is attached to it.
            let _converging = self.converging.lock().await;
            self.converge_locked(&view, Some(&req.network)).await?;
            let plumbing = self
                .plumbing(local, &view, &req.network)
                .await
                .ok_or_else(|| {
                    Error::Internal(anyhow::anyhow!(
                        "network {} could not be plumbed on this node (no address for the node yet); try again",
                        req.network
                    ))
                })?;
            let ip = self.allocate(&req.network).await?;
            // The first mesh interface of a container gets the default route through the
            // gateway bridge, like a task; a second mesh network in the same container keeps
            // the route the first one set.
            let has_egress = local
                .tasks
                .cni_list()
                .iter()
                .any(|c| c.container_id == req.container_id && c.attachments.len() > 1);
            let attached = local
                .tasks
                .cni_attach(CniRequest {
                    container_id: &req.container_id,
                    ifname: &req.ifname,
                    netns,
                    task: &task,
                    service: service.as_deref(),
                    overlay: Attachment::overlay(&plumbing, ip).without_default_route(),
                    node_address: plumbing.node_address,
                    egress: (!has_egress).then(|| local.gateway.clone()),
                })
                .await;
            let record = match attached {
                Ok(r) => r,
                Err(e) => {
                    self.release(&req.network, ip).await;
                    return Err(Error::Internal(e.context(format!(
                        "attaching container {} to network {}",
                        req.container_id, req.network
                    ))));
                }
            };
            self.publish_endpoint(&task, &req.network, service.as_deref(), ip)
                .await?;
            self.release(&req.network, ip).await;
            record
        };
        self.update_dns(&*self.refresh().await);
        if let Err(e) = self.serve_dns_for_cni(&record).await {
            warn!(task, "the container has no DNS: {e:#}");
        }
        info!(task, network = req.network, service = ?service, container = req.container_id, "container attached through CNI");
        self.poke();
        Ok(self.cni_info(&record))
    }

    /// CNI DEL: the endpoint leaves the cluster first (no new connections to a container
    /// going away), then DNS, then the veths. Nothing known is success.
    pub async fn cni_del(&self, container_id: &str, ifname: &str) -> Result<()> {
        let local = self.require_local()?;
        let Some(record) = local.tasks.cni_get(container_id, ifname) else {
            return Ok(());
        };
        self.forget_cni(&record).await;
        local.tasks.cni_detach(container_id, ifname).await?;
        self.poke();
        Ok(())
    }

    /// Removes what the cluster and DNS know of an attachment.
    pub(crate) async fn forget_cni(&self, record: &CniAttachment) {
        self.gossip
            .write([(format!("{}{}", key::ENDPOINT, record.task), None)])
            .await;
        self.stop_dns_for(&record.task).await;
    }

    pub async fn cni_check(&self, container_id: &str, ifname: &str) -> Result<CniInfo> {
        let local = self.require_local()?;
        let record = local
            .tasks
            .cni_check(container_id, ifname)
            .await
            .map_err(|e| Error::NotFound(format!("{e:#}")))?;
        let published =
            self.gossip
                .own_keys()
                .await
                .contains_key(&format!("{}{}", key::ENDPOINT, record.task));
        if !published {
            return Err(Error::NotFound(format!(
                "the endpoint of {} is not published",
                record.task
            )));
        }
        Ok(self.cni_info(&record))
    }

    /// Attachments whose namespace went away without a DEL leave the cluster too.
    pub(crate) async fn prune_cni(&self) {
        let Some(local) = self.local() else {
            return;
        };
        for record in local.tasks.cni_prune().await {
            self.forget_cni(&record).await;
        }
    }

    fn cni_info(&self, record: &CniAttachment) -> CniInfo {
        let interfaces: Vec<CniInterface> = record
            .interfaces
            .iter()
            .zip(&record.attachments)
            .map(|(i, a)| CniInterface {
                name: i.name.clone(),
                host_veth: i.host_veth.clone(),
                network: a.network.clone(),
                mac: i.mac.to_string(),
                address: i.address.to_string(),
                gateway: if a.network == GATEWAY_NETWORK {
                    a.gateway.unwrap_or(Ipv4Addr::UNSPECIFIED)
                } else {
                    record.node_address
                },
                mtu: a.mtu,
            })
            .collect();
        CniInfo {
            task: record.task.clone(),
            network: record.network().to_owned(),
            service: record.service.clone(),
            netns: record.netns.display().to_string(),
            default_gateway: record.attachments.iter().find_map(|a| a.gateway),
            interfaces,
            nameservers: vec![RESOLVER_ADDRESS],
        }
    }
}
