//! Socket load balancing (east–west and host-local): cgroup sock_addr hooks rewrite the
//! address a socket connects or sends to, so packets leave already addressed to a backend
//! and need no per-packet NAT.
//!
//! The programs are attached at the cgroup v2 root, so they run for every process on the
//! kernel, whatever cgroup a container runtime, `ip netns exec` or `nsenter` left it in. They
//! act only on sockets of the namespaces this node steers (`LB_NETNS`: its tasks and CNI
//! endpoints, plus the node's own namespace) and leave every other socket untouched — other
//! agents sharing the kernel (the test clusters) and the host's other containers.
//!
//! What is balanced, in those namespaces:
//! - `VIP:any port` (tasks and the node itself);
//! - `<node underlay ip>:<published port>` from any namespace (a task reaching its own
//!   node's published port never crosses the underlay interface);
//! - `127.0.0.1:<published port>` (or 0.0.0.0) from the node's own namespace only: inside
//!   a task, loopback is the task's own.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use mesh_common::{
    dns::{DNS_PORT, RESOLVER_ADDR},
    lb::{Reason, ServiceEntry, SockKey, SockTarget},
};

use crate::{
    packet::{IPPROTO_TCP, IPPROTO_UDP},
    programs::{LB_CONFIG, LB_NETNS, LB_SOCK_FWD, LB_SOCK_REV, RESOLVERS},
    service,
    stats::{self, Traffic},
};

/// sock_addr programs return 1 to let the call proceed, 0 to fail it with EPERM.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

/// Whether the caller's socket is in a namespace this node steers.
#[inline(always)]
fn steered(ctx: &SockAddrContext) -> bool {
    // SAFETY: the context pointer the kernel passed.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if let Some(cfg) = LB_CONFIG.get(0)
        && cfg.host_netns_cookie != 0
        && cfg.host_netns_cookie == netns
    {
        return true;
    }
    // SAFETY: only presence is read.
    unsafe { LB_NETNS.get(netns).is_some() }
}

/// The address a call targets, as the application wrote it.
#[derive(Clone, Copy)]
struct Target {
    addr: [u8; 4],
    port: u16,
    proto: u8,
}

#[inline(always)]
fn target(sa: *mut bpf_sock_addr) -> Option<Target> {
    // SAFETY: the context pointer the kernel passed; these fields are readable in all
    // inet4 sock_addr hooks.
    let (ip, port, proto) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let proto = proto as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    Some(Target {
        addr: ip.to_ne_bytes(),
        // The port is in network order in the low 16 bits.
        port: u16::from_be(port as u16),
        proto,
    })
}

#[inline(always)]
fn set_target(sa: *mut bpf_sock_addr, addr: [u8; 4], port: u16) {
    // SAFETY: user_ip4 and user_port are writable in the hooks that call this.
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes(addr);
        (*sa).user_port = u32::from(port.to_be());
    }
}

/// The service a call to `t` reaches, if any, and the port on the backend.
#[inline(always)]
fn lookup(ctx: &SockAddrContext, t: &Target) -> Option<(ServiceEntry, u16)> {
    let cfg = LB_CONFIG.get(0)?;
    let node_ip = u32::from_ne_bytes(cfg.node_ip);
    if node_ip == 0 {
        return None;
    }
    let svc = if t.addr[0] == 127 || u32::from_ne_bytes(t.addr) == 0 {
        // SAFETY: the context pointer the kernel passed.
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        if netns != cfg.host_netns_cookie {
            return None;
        }
        service::published(t.proto, t.port)?
    } else if t.addr == cfg.node_ip {
        service::published(t.proto, t.port)?
    } else {
        service::vip(t.addr, t.proto)?
    };
    let port = if svc.target_port == 0 {
        t.port
    } else {
        svc.target_port
    };
    Some((svc, port))
}

/// Picks a backend for a call to `t` and remembers, for the socket, how to show the
/// backend's address to the application.
#[inline(always)]
fn balance(ctx: &SockAddrContext, cookie: u64, t: &Target) -> Option<Result<SockTarget, ()>> {
    let (svc, port) = lookup(ctx, t)?;
    let choice = match service::pick(svc.service) {
        Ok(c) => c,
        Err(_) => {
            stats::count(Reason::SockNoBackend);
            stats::traffic(svc.service, 0, Traffic::Dropped);
            return Some(Err(()));
        }
    };
    let chosen = SockTarget {
        addr: choice.backend.addr,
        port,
        _pad: 0,
        service: svc.service,
        backend: choice.id,
    };
    let rev_key = SockKey {
        cookie,
        addr: chosen.addr,
        port,
        proto: t.proto,
        _pad: 0,
    };
    let original = SockTarget {
        addr: t.addr,
        port: t.port,
        _pad: 0,
        service: svc.service,
        backend: choice.id,
    };
    let _ = LB_SOCK_REV.insert(rev_key, original, u64::from(BPF_ANY));
    stats::count(Reason::SockBalanced);
    stats::traffic(svc.service, choice.id, Traffic::Socket);
    Some(Ok(chosen))
}

/// The port of the resolver listener in the caller's namespace, if the agent opened one.
#[inline(always)]
fn resolver_port(ctx: &SockAddrContext) -> Option<u16> {
    // SAFETY: the context pointer the kernel passed.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: plain data copied out.
    unsafe { RESOLVERS.get(netns).copied() }
}

/// 127.0.0.11:53 → the namespace's resolver listener. Returns whether `t` was the resolver
/// (then nothing else applies to it).
#[inline(always)]
fn to_resolver(ctx: &SockAddrContext, t: &Target) -> bool {
    if t.addr != RESOLVER_ADDR {
        return false;
    }
    if t.port == DNS_PORT
        && let Some(port) = resolver_port(ctx)
    {
        set_target(ctx.sock_addr, RESOLVER_ADDR, port);
    }
    true
}

pub fn connect4(ctx: &SockAddrContext) -> i32 {
    if !steered(ctx) {
        return ALLOW;
    }
    let Some(t) = target(ctx.sock_addr) else {
        return ALLOW;
    };
    if to_resolver(ctx, &t) {
        return ALLOW;
    }
    // SAFETY: the context pointer the kernel passed.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match balance(ctx, cookie, &t) {
        None => ALLOW,
        Some(Ok(chosen)) => {
            set_target(ctx.sock_addr, chosen.addr, chosen.port);
            ALLOW
        }
        Some(Err(())) => REFUSE,
    }
}

/// Unconnected UDP: every datagram names its destination. The socket keeps the backend it
/// got first for that destination (as a flow would), as long as the backend exists.
pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    if !steered(ctx) {
        return ALLOW;
    }
    let Some(t) = target(ctx.sock_addr) else {
        return ALLOW;
    };
    if to_resolver(ctx, &t) {
        return ALLOW;
    }
    // SAFETY: the context pointer the kernel passed.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockKey {
        cookie,
        addr: t.addr,
        port: t.port,
        proto: t.proto,
        _pad: 0,
    };
    // SAFETY: plain data copied out.
    if let Some(pinned) = unsafe { LB_SOCK_FWD.get(key).copied() }
        && service::still_there(pinned.backend, pinned.addr)
    {
        set_target(ctx.sock_addr, pinned.addr, pinned.port);
        return ALLOW;
    }
    match balance(ctx, cookie, &t) {
        None => ALLOW,
        Some(Ok(chosen)) => {
            let _ = LB_SOCK_FWD.insert(key, chosen, u64::from(BPF_ANY));
            set_target(ctx.sock_addr, chosen.addr, chosen.port);
            ALLOW
        }
        Some(Err(())) => REFUSE,
    }
}

/// recvmsg4 and getpeername4: a backend's address becomes the address the application
/// asked for.
pub fn restore(ctx: &SockAddrContext) -> i32 {
    if !steered(ctx) {
        return ALLOW;
    }
    let Some(t) = target(ctx.sock_addr) else {
        return ALLOW;
    };
    // Answers from the resolver listener come from 127.0.0.11:53, where they were sent.
    if t.addr == RESOLVER_ADDR {
        if resolver_port(ctx) == Some(t.port) {
            set_target(ctx.sock_addr, RESOLVER_ADDR, DNS_PORT);
        }
        return ALLOW;
    }
    // SAFETY: the context pointer the kernel passed.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockKey {
        cookie,
        addr: t.addr,
        port: t.port,
        proto: t.proto,
        _pad: 0,
    };
    // SAFETY: plain data copied out.
    if let Some(original) = unsafe { LB_SOCK_REV.get(key).copied() } {
        set_target(ctx.sock_addr, original.addr, original.port);
        stats::count(Reason::SockRestored);
    }
    ALLOW
}
