//! Serves a hosts file through mesh-dns on one address: the benchmark's server
//! (`cargo xtask bench dns` runs dnsmasq on the same file next to it).
//!
//! ```text
//! serve --listen 127.53.0.1:5353 --hosts FILE [--network bench] [--threads 1] [--upstream ADDR]...
//! ```
//!
//! Each hosts line `IP NAME [NAME...]` becomes table entries on one network:
//! - a NAME without dots is a service in vip mode with IP as its VIP;
//! - `tasks.SVC` adds a task with IP to service SVC (a dnsrr service, unless SVC has a VIP);
//! - names ending in `.<network>` are skipped: mesh-dns answers them from the bare name.
//!
//! It answers until killed, and prints its counters to stderr when stdin closes.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use mesh_dns::{Config, DnsServer, EndpointMode, Network, Scope, Service, Snapshot, Task};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, UdpSocket};

struct Args {
    listen: SocketAddr,
    hosts: String,
    network: String,
    threads: usize,
    upstreams: Vec<SocketAddr>,
}

fn parse_args() -> Result<Args, String> {
    let mut listen = None;
    let mut hosts = None;
    let mut network = "bench".to_string();
    let mut threads = 1;
    let mut upstreams = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = Some(value()?.parse().map_err(|e| format!("--listen: {e}"))?),
            "--hosts" => hosts = Some(value()?),
            "--network" => network = value()?,
            "--threads" => threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?,
            "--upstream" => {
                upstreams.push(value()?.parse().map_err(|e| format!("--upstream: {e}"))?)
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen ADDR:PORT is required")?,
        hosts: hosts.ok_or("--hosts FILE is required")?,
        network,
        threads,
        upstreams,
    })
}

fn snapshot_from_hosts(text: &str, network: &str) -> Result<Snapshot, String> {
    let mut vips: BTreeMap<String, Ipv4Addr> = BTreeMap::new();
    let mut tasks: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    let suffix = format!(".{network}");
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace();
        let Some(ip) = words.next() else { continue };
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|e| format!("line {}: {ip}: {e}", number + 1))?;
        for name in words.filter(|n| !n.ends_with(&suffix)) {
            match name.strip_prefix("tasks.") {
                Some(service) => tasks.entry(service.to_string()).or_default().push(ip),
                None if !name.contains('.') => {
                    vips.insert(name.to_string(), ip);
                }
                None => return Err(format!("line {}: cannot place {name}", number + 1)),
            }
        }
    }
    let names: std::collections::BTreeSet<&String> = vips.keys().chain(tasks.keys()).collect();
    let services = names
        .into_iter()
        .map(|name| Service {
            name: name.clone(),
            endpoint_mode: vips
                .get(name)
                .map_or(EndpointMode::Dnsrr, |v| EndpointMode::Vip(*v)),
            tasks: tasks
                .get(name)
                .into_iter()
                .flatten()
                .enumerate()
                .map(|(i, ip)| Task {
                    name: format!("{name}.{}", i + 1),
                    ip: *ip,
                })
                .collect(),
            ports: Vec::new(),
        })
        .collect();
    Ok(Snapshot {
        networks: vec![Network {
            name: network.to_string(),
            services,
            tasks: Vec::new(),
        }],
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("serve: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("serve: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let text = std::fs::read_to_string(&args.hosts).map_err(|e| format!("{}: {e}", args.hosts))?;
    let snapshot = snapshot_from_hosts(&text, &args.network)?;
    let server = DnsServer::new(Config {
        upstreams: args.upstreams,
        ..Config::default()
    })
    .map_err(|e| e.to_string())?;
    server.update(&snapshot);
    let udp = UdpSocket::bind(args.listen)
        .await
        .map_err(|e| format!("udp {}: {e}", args.listen))?;
    let tcp = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("tcp {}: {e}", args.listen))?;
    let _handle = server.serve(udp, tcp, Scope::new([&args.network]));
    eprintln!(
        "serve: {} services on {} at {}",
        snapshot.networks[0].services.len(),
        args.network,
        args.listen
    );
    // Serve until stdin closes (or the process is killed).
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    eprintln!("serve: {:?}", server.counters());
    Ok(())
}
