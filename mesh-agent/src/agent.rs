//! The agent: owns gossip, the local clock, address allocation and the reconcile loop, and
//! carries out what the API asks (create a network, a service, ...).

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::Ipv4Addr,
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use anyhow::Context;
use ipnet::Ipv4Net;
use tokio::sync::{Mutex, Notify, watch};
use tracing::{debug, info, warn};

use crate::{
    cluster::{
        BlockClaim, Clock, EndpointMode, NetworkSpec, NodeRecord, NodeSpec, PortSpec, Replicated,
        ServiceSpec, Stamp, View, ipam, key,
        record::{FIRST_VNI, MAX_VNI},
    },
    config::ResolvedConfig,
    dataplane::Dataplane,
    gossip::Gossip,
};

/// What went wrong, in terms the API maps to status codes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub struct Agent {
    pub config: ResolvedConfig,
    pub gossip: Gossip,
    clock: StdMutex<Clock>,
    view: watch::Sender<Arc<View>>,
    /// Serialises allocations on this node and remembers addresses handed out but not yet
    /// visible in gossip.
    ipam: Mutex<BTreeSet<(String, Ipv4Addr)>>,
    pub dataplane: Mutex<Dataplane>,
    reconcile_now: Notify,
    /// What was last written to the state file, to skip identical rewrites.
    persisted: Mutex<BTreeMap<String, String>>,
}

impl Agent {
    pub fn new(config: ResolvedConfig, gossip: Gossip, dataplane: Dataplane) -> Arc<Self> {
        let clock = Clock::new(&config.node_name);
        Arc::new(Self {
            clock: StdMutex::new(clock),
            view: watch::channel(Arc::new(View::default())).0,
            ipam: Mutex::new(BTreeSet::new()),
            dataplane: Mutex::new(dataplane),
            reconcile_now: Notify::new(),
            persisted: Mutex::new(BTreeMap::new()),
            gossip,
            config,
        })
    }

    pub fn node_name(&self) -> &str {
        &self.config.node_name
    }

    /// The node record this agent publishes.
    pub fn node_record(config: &ResolvedConfig, mtu: u32) -> NodeRecord {
        NodeRecord {
            name: config.node_name.clone(),
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            address: config.advertise,
            mtu,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn tick(&self) -> Stamp {
        self.clock.lock().expect("clock lock").tick()
    }

    /// The latest merged view.
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// Recomputes the view from gossip now (instead of waiting for the loop).
    pub async fn refresh(&self) -> Arc<View> {
        self.reconcile_once().await;
        self.view()
    }

    /// Runs forever: recompute the view whenever gossip changes (and at least every second,
    /// so time-based transitions such as settled block claims are picked up).
    pub async fn run(self: Arc<Self>) {
        let mut changes = self.gossip.changes().await;
        loop {
            self.reconcile_once().await;
            tokio::select! {
                _ = changes.next() => {}
                _ = self.reconcile_now.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn reconcile_once(&self) {
        let snapshot = self.gossip.snapshot().await;
        let view = View::compute(&snapshot);
        if let Some(s) = &view.newest_stamp {
            self.clock.lock().expect("clock lock").observe(s);
        }
        self.republish(&view).await;
        self.view.send_replace(Arc::new(view));
        if let Err(e) = self.persist().await {
            warn!("cannot save this node's state: {e:#}");
        }
    }

    /// Saves this node's gossip keys so a restarted agent re-asserts them (with their original
    /// stamps, so nothing it owned is lost or re-ordered).
    async fn persist(&self) -> anyhow::Result<()> {
        let own = self.gossip.own_keys().await;
        let mut last = self.persisted.lock().await;
        if *last == own {
            return Ok(());
        }
        let path = state_file(&self.config.state_dir);
        std::fs::create_dir_all(&self.config.state_dir)
            .with_context(|| format!("creating {}", self.config.state_dir.display()))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&own)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)?;
        *last = own;
        Ok(())
    }

    /// Makes this node's replicated keys equal the merged view, and drops block claims it
    /// lost.
    async fn republish(&self, view: &View) {
        let own = self.gossip.own_keys().await;
        let mut changes: Vec<(String, Option<String>)> = Vec::new();
        for (k, v) in &view.republish {
            if own.get(k) != Some(v) {
                changes.push((k.clone(), Some(v.clone())));
            }
        }
        for (k, v) in &own {
            if k.starts_with("obj:") && !view.republish.contains_key(k) {
                changes.push((k.clone(), None));
            }
            if k.starts_with(key::BLOCK)
                && let Ok(claim) = serde_json::from_str::<BlockClaim>(v)
            {
                let winner = view
                    .blocks
                    .get(&claim.network)
                    .and_then(|b| b.get(&claim.index));
                if winner.is_some_and(|w| *w != claim.stamp) {
                    info!(
                        network = claim.network,
                        block = claim.index,
                        "lost a block claim; releasing it"
                    );
                    changes.push((k.clone(), None));
                }
            }
        }
        if !changes.is_empty() {
            debug!(count = changes.len(), "republishing replicated keys");
            self.gossip.write(changes).await;
        }
    }

    /// Waits out the settle time, then recomputes: after this, a concurrent create on another
    /// node has reached us and the deterministic merge has picked a winner.
    async fn settle(&self) -> Arc<View> {
        tokio::time::sleep(self.config.settle()).await;
        self.refresh().await
    }

    // ---- networks ------------------------------------------------------------------------

    pub async fn create_network(
        &self,
        name: &str,
        subnet: Option<&str>,
    ) -> Result<Replicated<NetworkSpec>> {
        validate_name("network", name)?;
        let view = self.refresh().await;
        if view.networks.contains_key(name) {
            return Err(Error::Conflict(format!("network {name} already exists")));
        }
        let subnet = match subnet {
            Some(s) => {
                let net: Ipv4Net = s.parse().map_err(|_| {
                    Error::Invalid(format!(
                        "invalid subnet {s:?}: expected CIDR notation such as 10.10.0.0/24"
                    ))
                })?;
                ipam::validate_subnet(net).map_err(Error::Invalid)?;
                if let Some(other) = view
                    .networks
                    .values()
                    .find(|o| overlaps(o.spec.subnet, net))
                {
                    return Err(Error::Conflict(format!(
                        "subnet {net} overlaps {} of network {}: pick another --subnet",
                        other.spec.subnet, other.spec.name
                    )));
                }
                net
            }
            None => auto_subnet(&view).ok_or_else(|| {
                Error::Conflict(
                    "no free /24 left in 10.0.0.0/16 for a new network: pass --subnet".into(),
                )
            })?,
        };
        let used_vnis: HashSet<u32> = view
            .networks
            .values()
            .map(|n| n.spec.vni)
            .chain(view.network_conflicts.iter().map(|c| c.object.spec.vni))
            .collect();
        let vni = (FIRST_VNI..=MAX_VNI)
            .find(|v| !used_vnis.contains(v))
            .ok_or_else(|| Error::Conflict("every VXLAN network identifier is in use".into()))?;
        let spec = NetworkSpec {
            name: name.to_owned(),
            subnet,
            gateway: ipam::default_gateway(subnet),
            vni,
        };
        let stamp = self.tick();
        let record = Replicated::new(spec, stamp.clone());
        self.write_object(key::NETWORK, name, &record).await?;
        let view = self.settle().await;
        match view.networks.get(name) {
            Some(n) if n.created == stamp => {
                info!(network = name, %subnet, vni, "network created");
                Ok(n.clone())
            }
            Some(n) => Err(Error::Conflict(format!(
                "network {name} was created at the same time on node {}, whose create came first; \
                 it is the network {name} now (subnet {}). Use it, or pick another name.",
                n.created.node, n.spec.subnet
            ))),
            None => {
                let reason = view
                    .network_conflicts
                    .iter()
                    .find(|c| c.object.created == stamp)
                    .map(|c| c.reason.clone())
                    .unwrap_or_else(|| "it conflicted with a concurrent change".into());
                Err(Error::Conflict(format!(
                    "network {name} was not created: {reason}"
                )))
            }
        }
    }

    pub async fn remove_network(&self, name: &str) -> Result<()> {
        let view = self.refresh().await;
        let Some(net) = view.networks.get(name) else {
            return Err(Error::NotFound(format!(
                "network {name} not found (see `meshctl network ls`)"
            )));
        };
        let services: Vec<&str> = view
            .services
            .values()
            .filter(|s| s.spec.network == name)
            .map(|s| s.spec.name.as_str())
            .collect();
        if !services.is_empty() {
            return Err(Error::Conflict(format!(
                "network {name} is in use by service(s) {}: remove them first",
                services.join(", ")
            )));
        }
        let tasks: Vec<String> = view
            .endpoints
            .iter()
            .filter(|e| e.record.network == name)
            .map(|e| format!("{} on {}", e.record.task, e.node))
            .collect();
        if !tasks.is_empty() {
            return Err(Error::Conflict(format!(
                "network {name} has running task(s) {}: remove them first",
                tasks.join(", ")
            )));
        }
        let mut tomb = net.clone();
        tomb.deleted = Some(self.tick());
        self.write_object(key::NETWORK, name, &tomb).await?;
        self.refresh().await;
        info!(network = name, "network removed");
        Ok(())
    }

    // ---- services ------------------------------------------------------------------------

    pub async fn create_service(
        &self,
        name: &str,
        network: &str,
        mode: EndpointMode,
        ports: &[PortSpec],
    ) -> Result<Replicated<ServiceSpec>> {
        validate_name("service", name)?;
        let view = self.refresh().await;
        if view.services.contains_key(name) {
            return Err(Error::Conflict(format!("service {name} already exists")));
        }
        if !view.networks.contains_key(network) {
            return Err(Error::NotFound(format!(
                "network {network} not found: create it with `meshctl network create {network}`"
            )));
        }
        let mut seen = HashSet::new();
        for p in ports {
            if let Some(published) = p.published {
                if !seen.insert((p.protocol, published)) {
                    return Err(Error::Invalid(format!(
                        "port {published}/{} is published twice",
                        p.protocol
                    )));
                }
                if let Some(owner) = view.services.values().find(|s| {
                    s.spec
                        .ports
                        .iter()
                        .any(|q| q.protocol == p.protocol && q.published == Some(published))
                }) {
                    return Err(Error::Conflict(format!(
                        "port {published}/{} is already published by service {}",
                        p.protocol, owner.spec.name
                    )));
                }
            }
        }
        let vip = match mode {
            EndpointMode::Vip => Some(self.allocate(network).await?),
            EndpointMode::Dnsrr => None,
        };
        let spec = ServiceSpec {
            name: name.to_owned(),
            network: network.to_owned(),
            mode,
            vip,
            ports: ports.to_vec(),
        };
        let stamp = self.tick();
        let record = Replicated::new(spec, stamp.clone());
        self.write_object(key::SERVICE, name, &record).await?;
        let view = self.settle().await;
        if let Some(vip) = vip {
            self.release(network, vip).await;
        }
        match view.services.get(name) {
            Some(s) if s.created == stamp => {
                info!(service = name, network, ?vip, "service created");
                Ok(s.clone())
            }
            Some(s) => Err(Error::Conflict(format!(
                "service {name} was created at the same time on node {}, whose create came first",
                s.created.node
            ))),
            None => {
                let reason = view
                    .service_conflicts
                    .iter()
                    .find(|c| c.object.created == stamp)
                    .map(|c| c.reason.clone())
                    .unwrap_or_else(|| "it conflicted with a concurrent change".into());
                Err(Error::Conflict(format!(
                    "service {name} was not created: {reason}"
                )))
            }
        }
    }

    pub async fn remove_service(&self, name: &str) -> Result<()> {
        let view = self.refresh().await;
        let Some(svc) = view.services.get(name) else {
            return Err(Error::NotFound(format!(
                "service {name} not found (see `meshctl service ls`)"
            )));
        };
        let mut tomb = svc.clone();
        tomb.deleted = Some(self.tick());
        self.write_object(key::SERVICE, name, &tomb).await?;
        self.refresh().await;
        info!(service = name, "service removed");
        Ok(())
    }

    // ---- nodes ---------------------------------------------------------------------------

    /// Changes a node's operator settings (from any node).
    pub async fn update_node(
        &self,
        node: &str,
        change: impl FnOnce(&mut NodeSpec),
    ) -> Result<NodeSpec> {
        let view = self.refresh().await;
        if !view.nodes.contains_key(node) {
            return Err(Error::NotFound(format!(
                "node {node} not found (see `meshctl node ls`)"
            )));
        }
        let stamp = self.tick();
        let current = self
            .gossip
            .snapshot()
            .await
            .nodes
            .iter()
            .filter_map(|n| n.kv.get(&format!("{}{node}", key::NODE_SPEC)))
            .filter_map(|v| serde_json::from_str::<Replicated<NodeSpec>>(v).ok())
            .max_by(|a, b| a.updated.cmp(&b.updated));
        let mut record =
            current.unwrap_or_else(|| Replicated::new(NodeSpec::default(), stamp.clone()));
        change(&mut record.spec);
        record.updated = stamp;
        record.deleted = None;
        self.write_object(key::NODE_SPEC, node, &record).await?;
        let view = self.refresh().await;
        Ok(view
            .nodes
            .get(node)
            .map(|n| n.spec.clone())
            .unwrap_or(record.spec))
    }

    // ---- addresses -----------------------------------------------------------------------

    /// Hands out a free address of `network` from a block this node owns, claiming a new block
    /// when needed. The address is reserved until [`Agent::release`] — by then the record
    /// that uses it is visible in gossip.
    pub async fn allocate(&self, network: &str) -> Result<Ipv4Addr> {
        let mut pending = self.ipam.lock().await;
        for _attempt in 0..8 {
            let view = self.refresh().await;
            let net = view
                .networks
                .get(network)
                .ok_or_else(|| Error::NotFound(format!("network {network} not found")))?;
            let (subnet, gateway) = (net.spec.subnet, net.spec.gateway);
            let claimed = view.blocks.get(network).cloned().unwrap_or_default();
            let settle_ms = self.config.settle_ms;
            let now = Clock::now_ms();
            let mine: Vec<u32> = claimed
                .iter()
                .filter(|(_, s)| {
                    s.node == self.config.node_name && now.saturating_sub(s.ms) >= settle_ms
                })
                .map(|(i, _)| *i)
                .collect();
            let mut used: HashSet<Ipv4Addr> = view.used_addresses(network).into_iter().collect();
            used.extend(
                pending
                    .iter()
                    .filter(|(n, _)| n == network)
                    .map(|(_, ip)| *ip),
            );
            if let Some(ip) = ipam::allocate(subnet, gateway, &mine, &used) {
                pending.insert((network.to_owned(), ip));
                return Ok(ip);
            }
            // A claim of ours that has not settled yet: wait for it rather than claim more.
            if claimed
                .values()
                .any(|s| s.node == self.config.node_name && now.saturating_sub(s.ms) < settle_ms)
            {
                tokio::time::sleep(Duration::from_millis(settle_ms / 4 + 1)).await;
                continue;
            }
            let index =
                ipam::free_block(subnet, &self.config.node_name, &claimed).ok_or_else(|| {
                    Error::Conflict(format!(
                        "network {network} ({subnet}) has no free addresses left"
                    ))
                })?;
            let claim = BlockClaim {
                network: network.to_owned(),
                index,
                stamp: self.tick(),
            };
            info!(network, block = index, "claiming an address block");
            self.gossip
                .write([(
                    format!("{}{network}:{index}", key::BLOCK),
                    Some(serde_json::to_string(&claim).context("encoding block claim")?),
                )])
                .await;
            tokio::time::sleep(self.config.settle()).await;
        }
        Err(Error::Internal(anyhow::anyhow!(
            "could not allocate an address on network {network}: block claims kept conflicting"
        )))
    }

    /// Forgets a reservation once the address is published (or no longer needed).
    pub async fn release(&self, network: &str, ip: Ipv4Addr) {
        self.ipam.lock().await.remove(&(network.to_owned(), ip));
    }

    async fn write_object<T: serde::Serialize>(
        &self,
        prefix: &str,
        name: &str,
        record: &Replicated<T>,
    ) -> Result<()> {
        let json = serde_json::to_string(record).context("encoding record")?;
        self.gossip
            .write([(format!("{prefix}{name}"), Some(json))])
            .await;
        Ok(())
    }
}

fn state_file(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("gossip-keys.json")
}

/// The keys a previous run of this node owned, to publish again at start. The node record is
/// rebuilt fresh; a missing or unreadable file means a first start.
pub fn load_own_keys(state_dir: &std::path::Path) -> BTreeMap<String, String> {
    let path = state_file(state_dir);
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<BTreeMap<String, String>>(&bytes) {
            Ok(mut keys) => {
                keys.remove(key::NODE);
                keys
            }
            Err(e) => {
                warn!("ignoring unreadable {}: {e}", path.display());
                BTreeMap::new()
            }
        },
        Err(_) => BTreeMap::new(),
    }
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The first 10.0.N.0/24 (N ≥ 1) that overlaps no existing network.
fn auto_subnet(view: &View) -> Option<Ipv4Net> {
    (1..=255u8)
        .map(|n| Ipv4Net::new(Ipv4Addr::new(10, 0, n, 0), 24).expect("valid prefix"))
        .find(|s| view.networks.values().all(|o| !overlaps(o.spec.subnet, *s)))
}

/// Names end up in DNS (`web.app`), so they must be DNS labels.
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        return Err(Error::Invalid(format!(
            "invalid {kind} name {name:?}: use 1-63 letters, digits and dashes, not starting or ending with a dash"
        )));
    }
    if name.eq_ignore_ascii_case("tasks") {
        return Err(Error::Invalid(format!(
            "{kind} name \"tasks\" is reserved for DNS (tasks.<service>)"
        )));
    }
    Ok(())
}
