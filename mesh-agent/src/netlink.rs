//! What the overlay and task plumbing need from rtnetlink beyond its builders: links decoded
//! into the few fields we compare, errno matching, and a connection bound to a namespace.

use std::{net::Ipv4Addr, os::fd::IntoRawFd};

use anyhow::{Context, Result};
use futures_util::{StreamExt, TryStreamExt};
use rtnetlink::{
    Handle,
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        address::{AddressAttribute, AddressMessage},
        link::{
            InfoBridge, InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo,
            LinkMessage,
        },
    },
    sys::TokioSocket,
};

pub const ENOENT: i32 = libc::ENOENT;
pub const EEXIST: i32 = libc::EEXIST;
pub const ENODEV: i32 = libc::ENODEV;
pub const EADDRNOTAVAIL: i32 = libc::EADDRNOTAVAIL;

/// A link as the kernel reports it, reduced to what reconciliation compares.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Option<InfoKind>,
    pub mtu: u32,
    pub up: bool,
    pub controller: Option<u32>,
    pub mac: Option<[u8; 6]>,
    pub vxlan: Vec<InfoVxlan>,
    pub bridge: Vec<InfoBridge>,
}

impl Link {
    fn from_message(msg: LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
            controller: None,
            mac: None,
            vxlan: Vec::new(),
            bridge: Vec::new(),
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n,
                LinkAttribute::Mtu(m) => link.mtu = m,
                LinkAttribute::Controller(c) if c != 0 => link.controller = Some(c),
                LinkAttribute::Address(a) => link.mac = a.try_into().ok(),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => link.kind = Some(k),
                            LinkInfo::Data(InfoData::Vxlan(v)) => link.vxlan = v,
                            LinkInfo::Data(InfoData::Bridge(b)) => link.bridge = b,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    pub fn is_kind(&self, kind: InfoKind) -> bool {
        self.kind.as_ref() == Some(&kind)
    }
}

/// Every link of the namespace the handle's socket lives in.
pub async fn links(handle: &Handle) -> Result<Vec<Link>> {
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .context("listing links")?;
    Ok(msgs.into_iter().map(Link::from_message).collect())
}

/// The link called `name`, if there is one.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<Link>> {
    let result: Result<Vec<LinkMessage>, _> = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_collect()
        .await;
    match result {
        Ok(msgs) => Ok(msgs.into_iter().next().map(Link::from_message)),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("looking up link {name}")),
    }
}

/// IPv4 addresses (with prefix length) configured on the link with `index`.
pub async fn ipv4_addresses(
    handle: &Handle,
    index: u32,
) -> Result<Vec<(AddressMessage, Ipv4Addr)>> {
    let msgs: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .with_context(|| format!("listing addresses of link {index}"))?;
    Ok(msgs
        .into_iter()
        .filter(|m| m.header.family == AddressFamily::Inet && m.header.index == index)
        .filter_map(|m| {
            let ip = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(std::net::IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            })?;
            Some((m, ip))
        })
        .collect())
}

/// The errno of a failed netlink request, as a positive number.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Sends one request that is answered by an acknowledgement only (no dump), for messages the
/// rtnetlink builders cannot express (e.g. NLM_F_APPEND of VXLAN flood entries).
pub async fn request(
    handle: &Handle,
    payload: RouteNetlinkMessage,
    flags: u16,
) -> Result<(), rtnetlink::Error> {
    let mut req = NetlinkMessage::from(payload);
    req.header.flags = flags;
    let mut responses = handle.clone().request(req)?;
    while let Some(msg) = responses.next().await {
        if let NetlinkPayload::Error(e) = msg.payload {
            return Err(rtnetlink::Error::NetlinkError(e));
        }
    }
    Ok(())
}

/// Starts an rtnetlink connection on the current tokio runtime, bound to the network namespace
/// of the calling thread.
pub fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Starts an rtnetlink connection on the current tokio runtime whose socket lives in the
/// network namespace mounted at `netns` (a netlink socket belongs to the namespace it was
/// created in, so it is created on a short-lived thread that entered it).
pub fn connect_in(netns: &std::path::Path) -> Result<Handle> {
    let socket = crate::netns::run_in(netns, || {
        rtnetlink::sys::Socket::new(rtnetlink::sys::protocols::NETLINK_ROUTE)
            .context("opening a netlink socket")
    })??;
    // SAFETY: the fd comes from a socket we own and hand over whole.
    let socket =
        unsafe { <TokioSocket as std::os::fd::FromRawFd>::from_raw_fd(socket.into_raw_fd()) };
    let (conn, handle, _) = rtnetlink::from_socket(socket);
    tokio::spawn(conn);
    Ok(handle)
}
