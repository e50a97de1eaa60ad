//! A task's network: its namespace, one veth pair per attachment (host end on the network's
//! bridge, task end `eth<i>`), addresses and routes inside, and its resolv.conf.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use rtnetlink::{
    Handle, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        link::{InfoData, InfoVeth},
        route::{RouteAttribute, RouteMetric},
    },
};

use super::{Attachment, Interface, ResolvConf};
use crate::{netlink, netns, overlay::MacAddr};

/// Host-side veth names: `mve` + 8 hex digits of a hash of the task's namespace + the
/// attachment index; short enough for IFNAMSIZ, stable across agent restarts.
pub const HOST_VETH_PREFIX: &str = "mve";

pub(super) fn host_veth_name(netns: &str, index: usize) -> String {
    // FNV-1a: tiny, stable across Rust versions (unlike DefaultHasher).
    let mut h: u32 = 0x811c_9dc5;
    for b in netns.bytes() {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    format!("{HOST_VETH_PREFIX}{h:08x}{index}")
}

/// The directory whose files the task sees over /etc (the `ip netns exec` convention).
pub(super) fn etc_dir(netns_etc: &Path, netns: &str) -> PathBuf {
    netns_etc.join(netns)
}

pub(super) fn write_resolv_conf(dir: &Path, resolv: &ResolvConf) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut text = String::new();
    for ns in &resolv.nameservers {
        text.push_str(&format!("nameserver {ns}\n"));
    }
    if !resolv.search.is_empty() {
        text.push_str(&format!("search {}\n", resolv.search.join(" ")));
    }
    if !resolv.options.is_empty() {
        text.push_str(&format!("options {}\n", resolv.options.join(" ")));
    }
    let path = dir.join("resolv.conf");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// The task's /etc/hosts, as Docker writes a container's: loopback names, the `--host`
/// entries, then the task's own addresses with its hostname.
pub(super) fn write_hosts(
    dir: &Path,
    hostname: &str,
    own: &[Ipv4Addr],
    extra: &[mesh_api::spec::ExtraHost],
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("hosts");
    std::fs::write(&path, hosts_text(hostname, own, extra))
        .with_context(|| format!("writing {}", path.display()))
}

fn hosts_text(hostname: &str, own: &[Ipv4Addr], extra: &[mesh_api::spec::ExtraHost]) -> String {
    let mut text = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\n\
         ff02::2\tip6-allrouters\n",
    );
    for h in extra {
        // Checked again here: a spec from any node must not write lines of its own.
        if h.validate().is_ok() {
            text.push_str(&format!("{}\t{}\n", h.ip, h.host));
        }
    }
    for ip in own {
        text.push_str(&format!("{ip}\t{hostname}\n"));
    }
    text
}

/// Creates the veth pair of attachment `index` with its task end already inside the task's
/// namespace, and the host end on the network's bridge.
pub(super) async fn attach(
    host: &Handle,
    netns_name: &str,
    index: usize,
    attachment: &Attachment,
) -> Result<Interface> {
    attach_in(
        host,
        &netns::path(netns_name),
        host_veth_name(netns_name, index),
        format!("eth{index}"),
        attachment,
    )
    .await
}

/// [`attach`] into any namespace (one a container runtime made, for the CNI plugin), with
/// the host and task ends named by the caller.
pub(super) async fn attach_in(
    host: &Handle,
    ns_path: &Path,
    host_veth: String,
    name: String,
    attachment: &Attachment,
) -> Result<Interface> {
    let netns_name = ns_path.display();
    let Some(bridge) = netlink::link_by_name(host, &attachment.bridge).await? else {
        bail!(
            "network {} is not plumbed on this node: bridge {} is missing (reconcile the \
             overlay before starting tasks on it)",
            attachment.network,
            attachment.bridge
        );
    };
    let mac = MacAddr::for_ip(attachment.address.addr());
    let ns =
        File::open(ns_path).with_context(|| format!("opening the namespace of {netns_name}"))?;
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(name.clone())
        .mtu(attachment.mtu)
        .address(mac.0.to_vec())
        .setns_by_fd(ns.as_raw_fd())
        .build();
    let pair = LinkVeth::new(&host_veth, &name)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .mtu(attachment.mtu)
        .controller(bridge.index)
        .up()
        .build();
    host.link().add(pair).execute().await.with_context(|| {
        format!(
            "creating veth {host_veth} on {} for {netns_name} (network {})",
            attachment.bridge, attachment.network
        )
    })?;
    drop(ns);
    if attachment.isolated {
        isolate_port(host, &host_veth).await?;
    }
    Ok(Interface {
        name,
        host_veth,
        network: attachment.network.clone(),
        mac,
        address: attachment.address,
    })
}

/// Addresses, links up and routes inside the task's namespace.
pub(super) async fn configure_inside(
    netns_name: &str,
    interfaces: &[Interface],
    gateway: Option<(usize, Ipv4Addr)>,
) -> Result<()> {
    configure_in(&netns::path(netns_name), interfaces, gateway).await
}

/// [`configure_inside`] in the namespace mounted at `ns_path`.
pub(super) async fn configure_in(
    ns_path: &Path,
    interfaces: &[Interface],
    gateway: Option<(usize, Ipv4Addr)>,
) -> Result<()> {
    let netns_name = ns_path.display();
    let inside = netlink::connect_in(ns_path)?;
    set_up(&inside, "lo").await?;
    for iface in interfaces {
        let link = netlink::link_by_name(&inside, &iface.name)
            .await?
            .with_context(|| format!("{} missing inside {netns_name}", iface.name))?;
        inside
            .address()
            .add(
                link.index,
                IpAddr::V4(iface.address.addr()),
                iface.address.prefix_len(),
            )
            .execute()
            .await
            .with_context(|| {
                format!("adding {} to {} in {netns_name}", iface.address, iface.name)
            })?;
        set_up(&inside, &iface.name).await?;
    }
    if let Some((i, via)) = gateway {
        let iface = &interfaces[i];
        let link = netlink::link_by_name(&inside, &iface.name)
            .await?
            .with_context(|| format!("{} missing inside {netns_name}", iface.name))?;
        // Replies to routing-mesh clients that kept their address leave by the default route
        // but are sent back into the overlay (mesh-ebpf task.rs): the route carries the
        // smallest MTU of the task's networks, so they (and the MSS the task advertises to
        // those clients) fit the tunnel.
        let mut smallest = link.mtu;
        for other in interfaces.iter().filter(|o| o.name != iface.name) {
            if let Some(l) = netlink::link_by_name(&inside, &other.name).await? {
                smallest = smallest.min(l.mtu);
            }
        }
        let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(via)
            .output_interface(link.index)
            .build();
        if smallest < link.mtu {
            route
                .attributes
                .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(smallest)]));
        }
        inside
            .route()
            .add(route)
            .execute()
            .await
            .with_context(|| format!("adding the default route via {via} in {netns_name}"))?;
    }
    netns::run_in(ns_path, loose_reverse_path)?
        .with_context(|| format!("setting rp_filter in {netns_name}"))?;
    Ok(())
}

/// Packets of routing-mesh clients that kept their address arrive on the task's overlay
/// interface, while its route back to them is the default one: strict reverse-path
/// filtering (rp_filter 1, inherited from the host) would drop them. Loose (2) still drops
/// sources with no route at all. The effective value is the larger of `all` and the
/// interface's, so raising `all` is enough.
fn loose_reverse_path() -> Result<()> {
    let dir = Path::new("/proc/sys/net/ipv4/conf");
    let read = |p: &Path| -> Option<u8> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let strict = std::fs::read_dir(dir)
        .context("listing /proc/sys/net/ipv4/conf")?
        .flatten()
        .any(|e| read(&e.path().join("rp_filter")) == Some(1));
    if strict {
        std::fs::write(dir.join("all/rp_filter"), "2").context("writing conf/all/rp_filter")?;
    }
    Ok(())
}

async fn set_up(handle: &Handle, name: &str) -> Result<()> {
    handle
        .link()
        .set(LinkUnspec::new_with_name(name).up().build())
        .execute()
        .await
        .with_context(|| format!("setting {name} up"))
}

/// Marks a bridge port isolated: it reaches the bridge itself but no other isolated port.
async fn isolate_port(host: &Handle, veth: &str) -> Result<()> {
    let link = netlink::link_by_name(host, veth)
        .await?
        .with_context(|| format!("{veth} vanished right after it was created"))?;
    host.link()
        .set_port(LinkBridgePort::new(link.index).isolated(true).build())
        .execute()
        .await
        .with_context(|| format!("isolating bridge port {veth}"))
}

/// Puts a host veth back on its bridge (after the bridge was re-created) and up.
pub(super) async fn reattach(
    host: &Handle,
    iface: &Interface,
    attachment: &Attachment,
) -> Result<bool> {
    let bridge = &attachment.bridge;
    let Some(veth) = netlink::link_by_name(host, &iface.host_veth).await? else {
        return Ok(false);
    };
    let Some(br) = netlink::link_by_name(host, bridge).await? else {
        return Ok(false);
    };
    if veth.controller == Some(br.index) && veth.up {
        return Ok(false);
    }
    host.link()
        .set(
            LinkUnspec::new_with_index(veth.index)
                .controller(br.index)
                .up()
                .build(),
        )
        .execute()
        .await
        .with_context(|| format!("putting {} back on {bridge}", iface.host_veth))?;
    // Port flags do not survive leaving the bridge.
    if attachment.isolated {
        isolate_port(host, &iface.host_veth).await?;
    }
    Ok(true)
}

/// Removes what `attach` and `write_resolv_conf` made; anything already gone is fine.
pub(super) async fn detach(
    host: &Handle,
    netns_name: &str,
    host_veths: &[String],
    etc: &Path,
) -> Result<()> {
    delete_veths(host, host_veths).await?;
    netns::delete(netns_name)?;
    match std::fs::remove_dir_all(etc) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", etc.display())),
    }
}

/// Deletes host veths (their peers go with them); ones already gone are fine.
pub(super) async fn delete_veths(host: &Handle, host_veths: &[String]) -> Result<()> {
    for veth in host_veths {
        if let Some(link) = netlink::link_by_name(host, veth).await? {
            match host.link().del(link.index).execute().await {
                Ok(()) => {}
                Err(e) if netlink::errno(&e) == Some(netlink::ENODEV) => {}
                Err(e) => return Err(e).with_context(|| format!("deleting {veth}")),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_are_short_stable_and_distinct() {
        let a = host_veth_name("mt1x0-h1-web.1", 0);
        assert_eq!(a, host_veth_name("mt1x0-h1-web.1", 0));
        assert!(a.len() <= 15, "{a} exceeds IFNAMSIZ");
        assert!(a.starts_with(HOST_VETH_PREFIX));
        assert_ne!(a, host_veth_name("mt1x0-h1-web.2", 0));
        assert_ne!(a, host_veth_name("mt1x0-h1-web.1", 1));
    }

    #[test]
    fn resolv_conf_points_at_the_embedded_resolver() {
        let dir = std::env::temp_dir().join(format!("mesh-resolv-{}", std::process::id()));
        write_resolv_conf(&dir, &ResolvConf::default()).unwrap();
        let text = std::fs::read_to_string(dir.join("resolv.conf")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(text, "nameserver 127.0.0.11\noptions ndots:0\n");
    }

    #[test]
    fn a_tasks_dns_settings_keep_the_embedded_resolver_first() {
        let dns = mesh_api::spec::DnsConfig {
            nameservers: vec!["192.0.2.53".parse().unwrap(), "127.0.0.53".parse().unwrap()],
            search: vec!["corp.example".into()],
            options: vec!["ndots:2".into(), "timeout:1".into()],
        };
        let r = ResolvConf::default().for_task(&dns);
        // 192.0.2.53 is asked by the embedded resolver (see the agent's dns); only the
        // task's own loopback cache is listed, after it.
        assert_eq!(
            r.nameservers,
            [Ipv4Addr::new(127, 0, 0, 11), Ipv4Addr::new(127, 0, 0, 53)]
        );
        assert_eq!(r.search, ["corp.example"]);
        assert_eq!(r.options, ["ndots:2", "timeout:1"]);
        assert_eq!(
            ResolvConf::default().for_task(&Default::default()),
            ResolvConf::default()
        );
    }

    #[test]
    fn hosts_have_the_extra_entries_before_the_tasks_own() {
        let extra: Vec<mesh_api::spec::ExtraHost> = vec![
            "db.local:10.0.0.5".parse().unwrap(),
            mesh_api::spec::ExtraHost {
                host: "evil\n6.6.6.6 bank".into(),
                ip: "10.0.0.6".parse().unwrap(),
            },
        ];
        let text = hosts_text("web-1", &[Ipv4Addr::new(10, 0, 1, 7)], &extra);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "127.0.0.1\tlocalhost");
        assert_eq!(lines[lines.len() - 2], "10.0.0.5\tdb.local");
        assert_eq!(lines[lines.len() - 1], "10.0.1.7\tweb-1");
        assert!(!text.contains("bank"), "{text}");
    }
}
