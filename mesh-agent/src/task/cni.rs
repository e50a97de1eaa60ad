//! Attachments the agent makes for another container runtime, asked by the CNI plugin
//! (`mesh-cni`): the runtime owns the namespace and everything in it; the agent owns what it
//! plumbs into it — the veth on the network's bridge, the address, the gateway-bridge egress
//! and the routes — exactly as for its own tasks, so the overlay, VIPs, DNS and the routing
//! mesh cannot tell the two apart.
//!
//! Records persist under `<state dir>/cni`, one per container and interface, so DEL works
//! after an agent restart and a restarted agent serves DNS in the namespaces again. DEL
//! deletes the host veth (its peer inside goes with it) and never touches the namespace:
//! that is the runtime's.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Attachment, Interface, Tasks, free_gateway_address, plumbing};
use crate::{netlink, overlay::GatewayPlumbing};

/// What the agent plumbed for one (container, interface) pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniAttachment {
    pub container_id: String,
    pub ifname: String,
    /// The namespace the runtime made (`CNI_NETNS`).
    pub netns: PathBuf,
    /// The name the attachment has in the cluster (endpoint, DNS).
    pub task: String,
    pub service: Option<String>,
    /// The node's address on the overlay network (the container's gateway into it).
    pub node_address: std::net::Ipv4Addr,
    /// The overlay attachment, then the gateway-bridge egress if this attachment has one.
    pub attachments: Vec<Attachment>,
    pub interfaces: Vec<Interface>,
}

impl CniAttachment {
    pub fn key(&self) -> String {
        key(&self.container_id, &self.ifname)
    }

    pub fn network(&self) -> &str {
        &self.attachments[0].network
    }

    pub fn host_veths(&self) -> Vec<String> {
        self.interfaces
            .iter()
            .map(|i| i.host_veth.clone())
            .collect()
    }
}

/// Container ids are hex (podman, containerd) but the spec allows more: the key is what a
/// file name and an error message can carry.
pub fn key(container_id: &str, ifname: &str) -> String {
    format!("{container_id}/{ifname}")
}

/// What to plumb.
pub struct CniRequest<'a> {
    pub container_id: &'a str,
    pub ifname: &'a str,
    pub netns: &'a Path,
    pub task: &'a str,
    pub service: Option<&'a str>,
    pub overlay: Attachment,
    pub node_address: std::net::Ipv4Addr,
    /// The node's gateway bridge, for the default route; None: the container gets none from
    /// mesh (another of its mesh attachments already has it).
    pub egress: Option<GatewayPlumbing>,
}

fn record_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("cni")
}

fn record_path(state_dir: &Path, key: &str) -> PathBuf {
    record_dir(state_dir).join(format!("{}.json", key.replace('/', "_")))
}

impl Tasks {
    /// Every CNI attachment of this node.
    pub fn cni_list(&self) -> Vec<CniAttachment> {
        self.inner
            .cni
            .lock()
            .expect("cni table poisoned")
            .values()
            .cloned()
            .collect()
    }

    pub fn cni_get(&self, container_id: &str, ifname: &str) -> Option<CniAttachment> {
        self.inner
            .cni
            .lock()
            .expect("cni table poisoned")
            .get(&key(container_id, ifname))
            .cloned()
    }

    /// Plumbs a veth into the runtime's namespace, configures it and saves the record. On
    /// failure nothing is left behind.
    pub async fn cni_attach(&self, req: CniRequest<'_>) -> Result<CniAttachment> {
        let k = key(req.container_id, req.ifname);
        let mut record = {
            let tasks = self.inner.entries.lock().expect("task table poisoned");
            let mut cni = self.inner.cni.lock().expect("cni table poisoned");
            if cni.contains_key(&k) {
                bail!(
                    "container {} already has interface {} on mesh: DEL it first",
                    req.container_id,
                    req.ifname
                );
            }
            let mut attachments = vec![req.overlay];
            // Picked under both locks: no task and no other container gets the same address.
            if let Some(gw) = &req.egress {
                let records: Vec<&super::TaskRecord> = tasks.values().map(|e| &e.record).collect();
                let taken: Vec<std::net::Ipv4Addr> = cni
                    .values()
                    .flat_map(|c| &c.attachments)
                    .filter(|a| a.bridge == crate::overlay::GATEWAY_BRIDGE)
                    .map(|a| a.address.addr())
                    .collect();
                let ip = free_gateway_address(gw, records.into_iter(), &taken)?;
                attachments.push(Attachment::egress(gw, ip));
            }
            let record = CniAttachment {
                container_id: req.container_id.to_owned(),
                ifname: req.ifname.to_owned(),
                netns: req.netns.to_owned(),
                task: req.task.to_owned(),
                service: req.service.map(str::to_owned),
                node_address: req.node_address,
                attachments,
                interfaces: Vec::new(),
            };
            cni.insert(k.clone(), record.clone());
            record
        };
        match self.cni_build(&mut record).await {
            Ok(()) => {
                self.inner
                    .cni
                    .lock()
                    .expect("cni table poisoned")
                    .insert(k, record.clone());
                info!(task = %record.task, container = %record.container_id, netns = %record.netns.display(), "CNI attachment made");
                Ok(record)
            }
            Err(e) => {
                if let Err(te) = self.cni_teardown(&record).await {
                    warn!(task = %record.task, "cleaning up a failed CNI ADD: {te:#}");
                }
                self.inner
                    .cni
                    .lock()
                    .expect("cni table poisoned")
                    .remove(&k);
                Err(e)
            }
        }
    }

    async fn cni_build(&self, record: &mut CniAttachment) -> Result<()> {
        for (i, att) in record.attachments.iter().enumerate() {
            // The host end is named after the container and interface (stable, so a record
            // lost in a crash still leaves a name to find); the egress end inside after the
            // interface the runtime asked for, so two mesh networks in one container do not
            // collide.
            let host_veth = plumbing::host_veth_name(&format!("cni:{}", record.key()), i);
            let inside = if i == 0 {
                record.ifname.clone()
            } else {
                let mut n = format!("gw-{}", record.ifname);
                n.truncate(15);
                n
            };
            let iface =
                plumbing::attach_in(&self.inner.host, &record.netns, host_veth, inside, att)
                    .await?;
            record.interfaces.push(iface);
        }
        let gateway = record
            .attachments
            .iter()
            .enumerate()
            .find_map(|(i, a)| a.gateway.map(|g| (i, g)));
        plumbing::configure_in(&record.netns, &record.interfaces, gateway).await?;
        self.cni_save(record)
    }

    fn cni_save(&self, record: &CniAttachment) -> Result<()> {
        let dir = record_dir(&self.inner.config.state_dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = record_path(&self.inner.config.state_dir, &record.key());
        let bytes = serde_json::to_vec_pretty(record).context("encoding a CNI record")?;
        crate::state_files::write_atomic(&path, &bytes, 0o600)
            .with_context(|| format!("saving CNI record {}", path.display()))
    }

    /// Removes an attachment; one this node does not know is already gone (CNI DEL must
    /// succeed when called twice). Returns the record it removed.
    pub async fn cni_detach(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<CniAttachment>> {
        let k = key(container_id, ifname);
        let Some(record) = self.cni_get(container_id, ifname) else {
            return Ok(None);
        };
        self.cni_teardown(&record).await?;
        self.inner
            .cni
            .lock()
            .expect("cni table poisoned")
            .remove(&k);
        info!(task = %record.task, container = %container_id, "CNI attachment removed");
        Ok(Some(record))
    }

    async fn cni_teardown(&self, record: &CniAttachment) -> Result<()> {
        let mut veths = record.host_veths();
        for i in 0..record.attachments.len() {
            let v = plumbing::host_veth_name(&format!("cni:{}", record.key()), i);
            if !veths.contains(&v) {
                veths.push(v);
            }
        }
        plumbing::delete_veths(&self.inner.host, &veths).await?;
        let path = record_path(&self.inner.config.state_dir, &record.key());
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }

    /// CNI CHECK: the host veth is on its bridge and the interface inside has its address.
    pub async fn cni_check(&self, container_id: &str, ifname: &str) -> Result<CniAttachment> {
        let record = self.cni_get(container_id, ifname).with_context(|| {
            format!(
                "container {container_id} has no interface {ifname} on mesh (no ADD, or DEL ran)"
            )
        })?;
        for (iface, att) in record.interfaces.iter().zip(&record.attachments) {
            let veth = netlink::link_by_name(&self.inner.host, &iface.host_veth)
                .await?
                .with_context(|| {
                    format!(
                        "the host end {} of {} is gone (was the namespace deleted?)",
                        iface.host_veth, iface.name
                    )
                })?;
            let bridge = netlink::link_by_name(&self.inner.host, &att.bridge).await?;
            if bridge.is_none_or(|b| veth.controller != Some(b.index)) {
                bail!("{} is not on bridge {}", iface.host_veth, att.bridge);
            }
        }
        let inside = netlink::connect_in(&record.netns)
            .with_context(|| format!("entering {}", record.netns.display()))?;
        for iface in &record.interfaces {
            let link = netlink::link_by_name(&inside, &iface.name)
                .await?
                .with_context(|| {
                    format!("{} is missing in {}", iface.name, record.netns.display())
                })?;
            let addrs = netlink::ipv4_addresses(&inside, link.index).await?;
            if !addrs.iter().any(|(_, ip)| *ip == iface.address.addr()) {
                bail!(
                    "{} in {} lost its address {}",
                    iface.name,
                    record.netns.display(),
                    iface.address
                );
            }
        }
        Ok(record)
    }

    /// Loads the records an earlier agent saved; those whose namespace or veth is gone (the
    /// runtime deleted it while the agent was away) are removed.
    pub(super) async fn cni_adopt(&self) {
        let dir = record_dir(&self.inner.config.state_dir);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let record: CniAttachment = match std::fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|b| serde_json::from_slice(&b).map_err(anyhow::Error::from))
            {
                Ok(r) => r,
                Err(e) => {
                    crate::state_files::quarantine(&path, &format!("{e:#}"));
                    continue;
                }
            };
            self.inner
                .cni
                .lock()
                .expect("cni table poisoned")
                .insert(record.key(), record);
        }
        self.cni_prune().await;
    }

    /// Forgets attachments whose namespace the runtime deleted without a DEL (killed, or it
    /// crashed): its mount is gone, or the veth pair went with the namespace. The mount is
    /// what tells: the agent's own resolver sockets keep the namespace (and the veth) alive
    /// until they are closed. Returns the removed records, so their endpoints can leave the
    /// cluster.
    pub async fn cni_prune(&self) -> Vec<CniAttachment> {
        let mut gone = Vec::new();
        for record in self.cni_list() {
            let Some(first) = record.interfaces.first() else {
                continue;
            };
            let mounted = nix::sys::statfs::statfs(&record.netns)
                .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC);
            let veth = if mounted {
                netlink::link_by_name(&self.inner.host, &first.host_veth).await
            } else {
                Ok(None)
            };
            match veth {
                Ok(Some(_)) => {
                    for (iface, att) in record.interfaces.iter().zip(&record.attachments) {
                        if let Err(e) = plumbing::reattach(&self.inner.host, iface, att).await {
                            warn!(task = %record.task, "{e:#}");
                        }
                    }
                }
                Ok(None) => {
                    info!(task = %record.task, container = %record.container_id, "the namespace of a CNI attachment is gone; forgetting it");
                    match self.cni_detach(&record.container_id, &record.ifname).await {
                        Ok(Some(r)) => gone.push(r),
                        Ok(None) => {}
                        Err(e) => warn!(task = %record.task, "{e:#}"),
                    }
                }
                Err(e) => warn!(task = %record.task, "{e:#}"),
            }
        }
        gone
    }
}
