//! A task's view, end to end: a network namespace whose resolv.conf names 127.0.0.11, mesh-dns
//! serving there on sockets bound inside the namespace (as the agent will bind them), and
//! glibc's own resolver (`getent`) asking. The server runs on this process's runtime in the
//! host namespace and forwards from there to an upstream on the host's loopback.

mod support;

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mesh_dns::Scope;
use mesh_tests::Netns;
use support::*;

/// The address Docker gives every container's resolver; inside its own namespace each task
/// can have it.
const TASK_RESOLVER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11)), 53);

/// `/etc/netns/<ns>/resolv.conf`, which `ip netns exec` mounts over /etc/resolv.conf; removed
/// on drop.
struct ResolvConf(PathBuf);

impl ResolvConf {
    fn write(ns: &Netns, text: &str) -> Result<Self> {
        let dir = PathBuf::from("/etc/netns").join(ns.name());
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let conf = ResolvConf(dir);
        fs::write(conf.0.join("resolv.conf"), text)?;
        Ok(conf)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `getent <args>` with the task's libc resolver; async, so this runtime keeps serving.
async fn getent(ns: &Netns, args: &[&str]) -> Result<String> {
    let output = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("ip")
            .args(["netns", "exec", ns.name(), "getent"])
            .args(args)
            .output(),
    )
    .await
    .context("getent hung")??;
    if !output.status.success() {
        bail!(
            "getent {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The first column of every line: the addresses getent printed.
fn addresses(out: &str) -> Vec<String> {
    let mut list: Vec<String> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect();
    list.sort();
    list.dedup();
    list
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glibc_in_a_task_namespace_resolves_through_127_0_0_11() -> Result<()> {
    let ns = Netns::create(&format!("mt{}xdns-task", std::process::id()))?;
    let _resolv = ResolvConf::write(
        &ns,
        "nameserver 127.0.0.11\noptions ndots:0 attempts:1 timeout:5\n",
    )?;

    // A task has its overlay address; without a non-loopback address getaddrinfo's
    // AI_ADDRCONFIG would not even ask for A records.
    ns.sh("ip addr add 10.0.1.50/32 dev lo")?;
    // Bound inside the namespace on its own thread, served from this runtime.
    let (udp, tcp) = ns.run(|| -> std::io::Result<_> {
        let udp = std::net::UdpSocket::bind(TASK_RESOLVER)?;
        let tcp = std::net::TcpListener::bind(TASK_RESOLVER)?;
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        Ok((udp, tcp))
    })??;
    let upstream = Upstream::zone().await?;
    let server = server_with(vec![upstream.addr], Duration::from_secs(2));
    server.update(&stack());
    let _listener = server.serve(
        tokio::net::UdpSocket::from_std(udp)?,
        tokio::net::TcpListener::from_std(tcp)?,
        Scope::new(["frontend"]),
    );

    // `getent hosts` asks AAAA first, then A: the empty AAAA must not stall or leak it.
    let out = getent(&ns, &["hosts", "web"]).await?;
    assert_eq!(addresses(&out), ["10.0.1.2"], "{out}");
    let out = getent(&ns, &["ahostsv4", "tasks.web"]).await?;
    assert_eq!(
        addresses(&out),
        ["10.0.1.11", "10.0.1.12", "10.0.1.13"],
        "{out}"
    );
    let out = getent(&ns, &["hosts", "10.0.1.12"]).await?;
    assert!(out.contains("web.2.bbb.frontend"), "reverse lookup: {out}");
    let out = getent(&ns, &["hosts", "www.example.test"]).await?;
    assert_eq!(addresses(&out), ["192.0.2.80"], "forwarded: {out}");
    assert!(
        getent(&ns, &["hosts", "db.backend"]).await.is_err(),
        "another network's name resolved"
    );

    assert!(
        upstream.queries() > 0,
        "www.example.test reached the upstream"
    );
    let counters = server.counters();
    assert_eq!(counters.malformed, 0);
    assert_eq!(counters.unanswered, 0);
    Ok(())
}
