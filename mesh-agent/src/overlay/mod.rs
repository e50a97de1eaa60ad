//! The kernel half of overlay networks: turns a desired state (computed from the gossiped
//! tables) into bridges, VXLAN devices, FDB and neighbour entries, and keeps them matching.
//!
//! Per network on this node:
//!
//! ```text
//!   task eth0 ── veth ──┐
//!   task eth0 ── veth ──┤ mbr<vni> (node address/prefix) ── mvx<vni> ── UDP 4789 over the underlay
//!                       │                                   VNI, nolearning, no ARP proxy,
//!                                                           static FDB: task MAC → node VTEP
//! ```
//!
//! Nothing is learned and nothing is multicast: every remote endpoint gets a permanent FDB
//! entry (MAC → its node's underlay IP) on the VXLAN device and permanent neighbour entries
//! (IP → MAC) on the VXLAN device and on the bridge (the host and eBPF redirects resolve
//! without ARP); every peer node gets an all-zeros flood entry for broadcasts. Tasks' ARP
//! requests flood to the peers and are answered by the task itself: an ARP proxy would
//! answer only for endpoints already programmed here and drop the rest, which cut off a
//! task for as long as its endpoint took to reach every node. Reconciliation diffs against what the kernel holds, touches only
//! objects named with our prefixes, and is idempotent, so a restarted agent adopts what a
//! previous one left.
//!
//! The agent calls [`Overlay::reconcile`] whenever its view of the cluster changes, with
//! the networks that have a local task, the endpoints of those networks on other nodes (the
//! other nodes' own addresses on them too, with [`MacAddr::for_ip`] as their bridges use),
//! and the peers; a task is created once its network is plumbed.

mod fdb;
mod firewall;
mod links;

use std::{collections::BTreeSet, fmt, net::Ipv4Addr, str::FromStr, sync::Arc};

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use rtnetlink::Handle;
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

pub use firewall::NFT_TABLE;

/// Prefix of the per-network bridges (`mbr<vni>`); names with it are owned by the agent.
pub const BRIDGE_PREFIX: &str = "mbr";
/// Prefix of the per-network VXLAN devices (`mvx<vni>`); names with it are owned by the agent.
pub const VXLAN_PREFIX: &str = "mvx";
pub use mesh_common::lb::VXLAN_PORT;
/// Outer Ethernet (14) + IPv4 (20) + UDP (8) + VXLAN (8) headers.
pub const VXLAN_OVERHEAD: u32 = 50;
/// VNIs below this are left to other tools (Docker Swarm starts at 4096 too).
pub const MIN_VNI: u32 = 4096;
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// The per-node gateway bridge (the docker_gwbridge role). It shares the bridge prefix so
/// the isolation rules treat it as one more network.
pub const GATEWAY_BRIDGE: &str = "mbrgw";

pub fn bridge_name(vni: u32) -> String {
    format!("{BRIDGE_PREFIX}{vni}")
}

pub fn vxlan_name(vni: u32) -> String {
    format!("{VXLAN_PREFIX}{vni}")
}

/// The MTU of an overlay network on an underlay of `underlay_mtu`.
pub fn network_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu - VXLAN_OVERHEAD
}

/// The VNI in one of our device names (`mbr4096` → 4096), or None for names not ours.
fn vni_of(name: &str, prefix: &str) -> Option<u32> {
    let digits = name.strip_prefix(prefix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What this node's overlay should look like.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredOverlay {
    pub underlay: Underlay,
    /// Networks with at least one local task (or that the node must serve).
    pub networks: Vec<NetworkPlumbing>,
    /// Endpoints on other nodes. Those of networks not in `networks` are ignored.
    pub remote_endpoints: Vec<RemoteEndpoint>,
    /// Per network, the VTEPs of the other nodes that have it (broadcast flooding). Those of
    /// networks not in `networks` are ignored.
    pub peers: Vec<PeerVtep>,
    /// The node's gateway bridge, through which tasks reach the outside, masqueraded.
    #[serde(default)]
    pub gateway: Option<GatewayPlumbing>,
}

/// The node-local bridge tasks leave the cluster through (Docker's docker_gwbridge).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayPlumbing {
    /// Local to this node; the same subnet on every node is fine (it never leaves the node).
    pub subnet: Ipv4Net,
    /// The node's address on the bridge: the tasks' default gateway.
    pub address: Ipv4Addr,
    /// Traffic on it leaves the node unencapsulated: the underlay's MTU.
    pub mtu: u32,
}

impl GatewayPlumbing {
    pub fn bridge_address(&self) -> Ipv4Net {
        Ipv4Net::new(self.address, self.subnet.prefix_len()).expect("prefix of a valid net")
    }
}

/// The node's interface on the network that carries the VXLAN traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Underlay {
    pub interface: String,
    pub address: Ipv4Addr,
    pub mtu: u32,
}

impl Default for Underlay {
    fn default() -> Self {
        Self {
            interface: String::new(),
            address: Ipv4Addr::UNSPECIFIED,
            mtu: 1500,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPlumbing {
    pub name: String,
    pub vni: u32,
    pub subnet: Ipv4Net,
    /// This node's own address on the network; it goes on the bridge and is the tasks'
    /// gateway.
    pub node_address: Ipv4Addr,
    /// At most the underlay MTU − 50, or packets would be fragmented or lost in the tunnel.
    pub mtu: u32,
}

impl NetworkPlumbing {
    pub fn bridge(&self) -> String {
        bridge_name(self.vni)
    }

    pub fn vxlan(&self) -> String {
        vxlan_name(self.vni)
    }

    /// The node address with the network's prefix length, as configured on the bridge.
    pub fn bridge_address(&self) -> Ipv4Net {
        Ipv4Net::new(self.node_address, self.subnet.prefix_len()).expect("prefix of a valid net")
    }
}

/// A task (or node address) on another node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RemoteEndpoint {
    pub vni: u32,
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    /// The underlay address of the node the endpoint lives on.
    pub vtep: Ipv4Addr,
}

/// Another node that has the network: broadcasts on it are copied to `vtep`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerVtep {
    pub vni: u32,
    pub vtep: Ipv4Addr,
}

/// An Ethernet address, written `02:42:0a:0a:00:05`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The FDB key of flood entries.
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// A locally administered MAC derived from an IPv4 address, as Docker does
    /// (02:42:a:b:c:d), so a task's MAC is known from its IP without asking its node.
    pub fn for_ip(ip: Ipv4Addr) -> Self {
        let [a, b, c, d] = ip.octets();
        MacAddr([0x02, 0x42, a, b, c, d])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().filter(|p| p.len() == 2);
            *byte = part
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| {
                    anyhow::anyhow!("{s:?} is not a MAC address like 02:42:0a:00:00:05")
                })?;
        }
        if parts.next().is_some() {
            bail!("{s:?} is not a MAC address like 02:42:0a:00:00:05");
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One change reconciliation made to the kernel. An empty list means the kernel already
/// matched the desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    LinkCreated(String),
    LinkDeleted {
        name: String,
        why: &'static str,
    },
    LinkUpdated {
        name: String,
        what: String,
    },
    AddressAdded {
        link: String,
        address: Ipv4Net,
    },
    AddressRemoved {
        link: String,
        address: Ipv4Addr,
    },
    FdbAdded {
        link: String,
        mac: MacAddr,
        vtep: Ipv4Addr,
    },
    FdbRemoved {
        link: String,
        mac: MacAddr,
        vtep: Ipv4Addr,
    },
    NeighbourSet {
        link: String,
        ip: Ipv4Addr,
        mac: MacAddr,
    },
    NeighbourRemoved {
        link: String,
        ip: Ipv4Addr,
    },
    FirewallInstalled,
    FirewallRemoved,
    ForwardingEnabled,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::LinkCreated(n) => write!(f, "created {n}"),
            Change::LinkDeleted { name, why } => write!(f, "deleted {name} ({why})"),
            Change::LinkUpdated { name, what } => write!(f, "updated {name}: {what}"),
            Change::AddressAdded { link, address } => write!(f, "added {address} to {link}"),
            Change::AddressRemoved { link, address } => {
                write!(f, "removed {address} from {link}")
            }
            Change::FdbAdded { link, mac, vtep } => write!(f, "fdb {mac} → {vtep} on {link}"),
            Change::FdbRemoved { link, mac, vtep } => {
                write!(f, "removed fdb {mac} → {vtep} from {link}")
            }
            Change::NeighbourSet { link, ip, mac } => write!(f, "neighbour {ip} → {mac} on {link}"),
            Change::NeighbourRemoved { link, ip } => {
                write!(f, "removed neighbour {ip} from {link}")
            }
            Change::FirewallInstalled => write!(f, "installed nftables table inet {NFT_TABLE}"),
            Change::FirewallRemoved => write!(f, "removed nftables table inet {NFT_TABLE}"),
            Change::ForwardingEnabled => write!(f, "turned IPv4 forwarding on"),
        }
    }
}

/// The overlay of one node: reconciles the kernel objects of the network namespace its
/// netlink handle was opened in.
#[derive(Clone)]
pub struct Overlay {
    handle: Handle,
    /// Two passes interleaving would each see the other's half-done work as stale.
    pass: Arc<tokio::sync::Mutex<()>>,
}

impl Overlay {
    /// `handle` must come from a connection opened in the namespace to program (the node's
    /// own; see [`crate::netlink::connect`]).
    pub fn new(handle: Handle) -> Self {
        Self {
            handle,
            pass: Arc::default(),
        }
    }

    /// Makes the kernel match `desired` and returns what it changed. Concurrent calls run
    /// one after the other.
    pub async fn reconcile(&self, desired: &DesiredOverlay) -> Result<Vec<Change>> {
        validate(desired)?;
        let _pass = self.pass.lock().await;
        let mut changes = Vec::new();
        let plumbed = links::reconcile(&self.handle, desired, &mut changes).await?;
        fdb::reconcile(&self.handle, desired, &plumbed, &mut changes).await?;
        if desired.networks.is_empty() && desired.gateway.is_none() {
            firewall::remove(&mut changes).await?;
        } else {
            let mut bridges: Vec<String> = desired
                .networks
                .iter()
                .map(NetworkPlumbing::bridge)
                .collect();
            if desired.gateway.is_some() {
                bridges.push(GATEWAY_BRIDGE.into());
            }
            let want = firewall::Firewall {
                bridges,
                gateway: desired
                    .gateway
                    .as_ref()
                    .map(|g| (GATEWAY_BRIDGE.to_owned(), g.subnet)),
            };
            firewall::ensure(want, &mut changes).await?;
        }
        if desired.gateway.is_some() {
            ensure_forwarding(&mut changes)?;
        }
        if changes.is_empty() {
            debug!("overlay already matches the desired state");
        }
        for c in &changes {
            info!("overlay: {c}");
        }
        Ok(changes)
    }

    /// Removes every overlay object of this node (what `--cleanup` does on exit).
    pub async fn remove_all(&self, underlay: &Underlay) -> Result<Vec<Change>> {
        self.reconcile(&DesiredOverlay {
            underlay: underlay.clone(),
            ..Default::default()
        })
        .await
    }
}

/// Egress through the gateway bridge is routed: the node must forward. Docker turns it on
/// for the same reason; it is left on when the gateway goes (other users may rely on it).
fn ensure_forwarding(changes: &mut Vec<Change>) -> Result<()> {
    // /proc/sys/net shows the namespace of the reading thread: the runtime's, the node's.
    let path = "/proc/sys/net/ipv4/ip_forward";
    let now = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    if now.trim() != "1" {
        std::fs::write(path, "1")
            .with_context(|| format!("turning IPv4 forwarding on ({path})"))?;
        changes.push(Change::ForwardingEnabled);
    }
    Ok(())
}

fn validate(desired: &DesiredOverlay) -> Result<()> {
    let underlay = &desired.underlay;
    if underlay.interface.is_empty() {
        bail!("the desired overlay names no underlay interface");
    }
    let mut vnis = BTreeSet::new();
    for n in &desired.networks {
        if !(MIN_VNI..=MAX_VNI).contains(&n.vni) {
            bail!(
                "network {} has VNI {}, outside {MIN_VNI}..={MAX_VNI}",
                n.name,
                n.vni
            );
        }
        if !vnis.insert(n.vni) {
            bail!(
                "VNI {} is given to more than one network (network {})",
                n.vni,
                n.name
            );
        }
        if !n.subnet.contains(&n.node_address) {
            bail!(
                "network {}: node address {} is outside its subnet {}",
                n.name,
                n.node_address,
                n.subnet
            );
        }
        if underlay.mtu < VXLAN_OVERHEAD + 68 || n.mtu > network_mtu(underlay.mtu) {
            bail!(
                "network {}: MTU {} does not fit the underlay {} (MTU {}): at most {} leaves room \
                 for the {VXLAN_OVERHEAD} bytes of VXLAN headers",
                n.name,
                n.mtu,
                underlay.interface,
                underlay.mtu,
                underlay.mtu.saturating_sub(VXLAN_OVERHEAD)
            );
        }
    }
    if let Some(gw) = &desired.gateway {
        if gw.mtu > underlay.mtu {
            bail!(
                "gateway bridge MTU {} exceeds the underlay's ({})",
                gw.mtu,
                underlay.mtu
            );
        }
        if !gw.subnet.contains(&gw.address) {
            bail!(
                "gateway bridge address {} is outside its subnet {}",
                gw.address,
                gw.subnet
            );
        }
        let overlaps = |n: &&NetworkPlumbing| {
            n.subnet.contains(&gw.subnet.network()) || gw.subnet.contains(&n.subnet.network())
        };
        if let Some(n) = desired.networks.iter().find(overlaps) {
            bail!(
                "gateway subnet {} overlaps network {} ({}); pick a gateway subnet outside every \
                 overlay network",
                gw.subnet,
                n.name,
                n.subnet
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_carry_the_vni_and_nothing_else_is_ours() {
        assert_eq!(bridge_name(4096), "mbr4096");
        assert_eq!(vxlan_name(16777215), "mvx16777215");
        assert!(vxlan_name(MAX_VNI).len() <= 15, "fits IFNAMSIZ");
        assert_eq!(vni_of("mbr4096", BRIDGE_PREFIX), Some(4096));
        assert_eq!(vni_of("mbr", BRIDGE_PREFIX), None);
        assert_eq!(vni_of("mbr-lan", BRIDGE_PREFIX), None);
        assert_eq!(vni_of("docker0", BRIDGE_PREFIX), None);
    }

    #[test]
    fn task_macs_follow_their_ip_like_docker() {
        let mac = MacAddr::for_ip("10.10.0.5".parse().unwrap());
        assert_eq!(mac.to_string(), "02:42:0a:0a:00:05");
        assert_eq!("02:42:0a:0a:00:05".parse::<MacAddr>().unwrap(), mac);
        assert!("02:42:0a:0a:00".parse::<MacAddr>().is_err());
        assert!("02:42:0a:0a:00:05:07".parse::<MacAddr>().is_err());
        let json = serde_json::to_string(&mac).unwrap();
        assert_eq!(json, "\"02:42:0a:0a:00:05\"");
    }

    fn network(vni: u32, mtu: u32) -> NetworkPlumbing {
        NetworkPlumbing {
            name: "app".into(),
            vni,
            subnet: "10.10.0.0/24".parse().unwrap(),
            node_address: "10.10.0.1".parse().unwrap(),
            mtu,
        }
    }

    fn desired(networks: Vec<NetworkPlumbing>) -> DesiredOverlay {
        DesiredOverlay {
            underlay: Underlay {
                interface: "eth0".into(),
                address: "192.0.2.1".parse().unwrap(),
                mtu: 1500,
            },
            networks,
            ..Default::default()
        }
    }

    #[test]
    fn an_mtu_that_would_not_fit_the_tunnel_is_refused_with_the_limit() {
        assert!(validate(&desired(vec![network(4096, 1450)])).is_ok());
        let err = validate(&desired(vec![network(4096, 1451)])).unwrap_err();
        assert!(err.to_string().contains("at most 1450"), "{err}");
    }

    #[test]
    fn vnis_below_4096_or_shared_are_refused() {
        assert!(validate(&desired(vec![network(100, 1450)])).is_err());
        assert!(validate(&desired(vec![network(4096, 1450), network(4096, 1450)])).is_err());
    }
}
