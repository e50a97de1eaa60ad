//! meshctl: Docker-style commands that talk to the local agent's API.

mod events;
mod service;

pub use service::ServiceCommand;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use comfy_table::{Table, presets::NOTHING};
use serde::Serialize;

use crate::{
    api::{
        DEFAULT_SOCKET, ExecOutput, ExecRequest, GossipInfo, LocalTaskInfo, NetworkCreate,
        NetworkInfo, NodeInfo, NodeUpdate, PortStats, TaskInfo, TaskRun, client::Client,
    },
    cluster::Availability,
};

#[derive(Parser, Debug)]
#[command(
    name = "meshctl",
    version,
    about = "Control a mesh cluster through the local agent"
)]
pub struct Cli {
    /// Path of the local agent's API socket.
    #[arg(long, global = true, env = "MESH_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Manage overlay networks.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Manage services.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Start a task on this node: a process in its own network namespace on a network.
    Run {
        /// Task name (unique in the cluster; it resolves in DNS).
        #[arg(long)]
        name: String,
        #[arg(long)]
        network: String,
        /// Make it a task of this service: it receives the service's traffic.
        #[arg(long)]
        service: Option<String>,
        /// Environment variable for the task (KEY=VALUE).
        #[arg(long, short = 'e')]
        env: Vec<String>,
        /// The command, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List this node's tasks.
    Ps {
        /// Include exited tasks.
        #[arg(long, short = 'a')]
        all: bool,
    },
    /// Stop and remove a task of this node.
    Rm { name: String },
    /// Run a command inside a task of this node (its network, DNS and load balancing).
    Exec {
        task: String,
        /// Kill the command after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// The command, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Inspect the node's eBPF dataplane.
    #[command(subcommand)]
    Dataplane(DataplaneCommand),
    /// Inspect the node's gossip.
    #[command(subcommand)]
    Gossip(GossipCommand),
    /// Stream cluster events (tasks, nodes, services) as they happen, like `docker events`.
    Events {
        /// Start with the remembered events since then: a duration ago (5m), an RFC 3339
        /// time or Unix seconds.
        #[arg(long)]
        since: Option<String>,
        /// service=NAME, node=NAME or type=task|node|service; repeat a key for any of its
        /// values, different keys must all match.
        #[arg(long, short = 'f')]
        filter: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum GossipCommand {
    /// Cluster keys in use and gossip datagrams sent, received and dropped (by reason).
    Stats,
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List nodes in the cluster.
    #[command(alias = "list")]
    Ls,
    /// Show one node (`self` for this one).
    Inspect {
        node: String,
        /// Human-readable output instead of JSON.
        #[arg(long)]
        pretty: bool,
    },
    /// Change a node's availability or labels.
    Update {
        node: String,
        /// active: takes new connections; drain: its tasks get none, established ones finish.
        #[arg(long, value_parser = parse_availability)]
        availability: Option<Availability>,
        /// Add or update a label (key=value).
        #[arg(long = "label-add")]
        label_add: Vec<String>,
        /// Remove a label.
        #[arg(long = "label-rm")]
        label_rm: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum NetworkCommand {
    /// Create an overlay network.
    Create {
        name: String,
        /// Subnet in CIDR notation (default: a free 10.0.N.0/24).
        #[arg(long)]
        subnet: Option<String>,
    },
    /// List networks.
    #[command(alias = "list")]
    Ls,
    /// Show one network.
    Inspect { name: String },
    /// Remove a network that no service or task uses.
    #[command(alias = "remove")]
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
pub enum DataplaneCommand {
    /// Packets seen on the underlay interface, per destination port.
    Ports,
}

fn parse_availability(s: &str) -> Result<Availability, String> {
    match s {
        "active" => Ok(Availability::Active),
        "drain" => Ok(Availability::Drain),
        other => Err(format!(
            "unknown availability {other:?}: use active or drain"
        )),
    }
}

/// A table in Docker's style: upper-case headers, no borders, columns aligned.
pub fn table<I, R>(headers: &[&str], rows: I) -> String
where
    I: IntoIterator<Item = R>,
    R: IntoIterator<Item = String>,
{
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(headers.iter().map(|h| h.to_string()));
    for r in rows {
        t.add_row(r.into_iter().collect::<Vec<_>>());
    }
    // comfy-table pads the first column with a leading space; Docker's tables start flush.
    t.to_string()
        .lines()
        .map(|l| l.strip_prefix(' ').unwrap_or(l).trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn print_tasks(tasks: &[TaskInfo]) {
    println!(
        "{}",
        table(
            &["NAME", "SERVICE", "NETWORK", "IP", "NODE", "STATE"],
            tasks.iter().map(|t| {
                [
                    t.name.clone(),
                    or_dash(t.service.clone()),
                    t.network.clone(),
                    t.ip.to_string(),
                    t.node.clone(),
                    if t.active || t.state != crate::cluster::TaskState::Running {
                        t.state.to_string()
                    } else {
                        format!("{} (draining)", t.state)
                    },
                ]
            })
        )
    );
}

pub async fn run(cli: Cli) -> Result<()> {
    let client = Client::new(&cli.socket);
    let fmt = cli.format;
    match cli.command {
        Command::Node(cmd) => node(&client, fmt, cmd).await,
        Command::Network(cmd) => network(&client, fmt, cmd).await,
        Command::Service(cmd) => service::run(&client, fmt, cmd).await,
        Command::Events { since, filter } => events::run(&client, fmt, since, filter).await,
        Command::Run {
            name,
            network,
            service,
            env,
            command,
        } => {
            let env = env
                .iter()
                .map(|e| match e.split_once('=') {
                    Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
                    _ => Err(anyhow::anyhow!("invalid --env {e:?}: expected KEY=VALUE")),
                })
                .collect::<Result<Vec<_>>>()?;
            let req = TaskRun {
                name,
                network,
                service,
                command,
                env,
            };
            let t: LocalTaskInfo = client.post("/v1/tasks", &req).await?;
            if fmt == Format::Json {
                return json(&t);
            }
            println!("{}\t{}", t.name, or_dash(t.ip));
            Ok(())
        }
        Command::Ps { all } => {
            let mut tasks: Vec<LocalTaskInfo> = client.get("/v1/local/tasks").await?;
            if !all {
                tasks.retain(|t| t.state != "exited");
            }
            if fmt == Format::Json {
                return json(&tasks);
            }
            println!(
                "{}",
                table(
                    &[
                        "NAME", "SERVICE", "NETWORK", "IP", "NODE", "STATE", "COMMAND"
                    ],
                    tasks.iter().map(|t| {
                        [
                            t.name.clone(),
                            or_dash(t.service.clone()),
                            t.network.clone(),
                            or_dash(t.ip),
                            t.node.clone(),
                            match t.exit_code {
                                Some(c) => format!("{} ({c})", t.state),
                                None => t.state.clone(),
                            },
                            t.command.join(" "),
                        ]
                    })
                )
            );
            Ok(())
        }
        Command::Exec {
            task,
            timeout,
            command,
        } => {
            let req = ExecRequest {
                command,
                env: Vec::new(),
                timeout_secs: timeout,
            };
            let out: ExecOutput = client
                .post(&format!("/v1/local/tasks/{task}/exec"), &req)
                .await?;
            if fmt == Format::Json {
                return json(&out);
            }
            print!("{}", out.stdout);
            eprint!("{}", out.stderr);
            std::process::exit(out.exit_code.unwrap_or(128));
        }
        Command::Rm { name } => {
            let _: serde_json::Value = client.delete(&format!("/v1/local/tasks/{name}")).await?;
            println!("{name}");
            Ok(())
        }
        Command::Gossip(GossipCommand::Stats) => {
            let info: GossipInfo = client.get("/v1/gossip").await?;
            if fmt == Format::Json {
                return json(&info);
            }
            print_gossip(&info);
            Ok(())
        }
        Command::Dataplane(DataplaneCommand::Ports) => {
            let stats: Vec<PortStats> = client.get("/v1/dataplane/ports").await?;
            if fmt == Format::Json {
                return json(&stats);
            }
            println!(
                "{}",
                table(
                    &["PORT", "PACKETS", "BYTES"],
                    stats.iter().map(|s| [
                        s.port.to_string(),
                        s.packets.to_string(),
                        s.bytes.to_string()
                    ])
                )
            );
            Ok(())
        }
    }
}

fn ago(ms: u64) -> String {
    format!("{:.1}s ago", ms as f64 / 1000.0)
}

fn print_gossip(info: &GossipInfo) {
    println!("Node:\t\t{}\nCluster:\t{}", info.node, info.cluster);
    let Some(auth) = &info.auth else {
        println!(
            "Authenticated:\tNO: anyone who reaches the gossip port can join, read and inject state.\n\
             \t\tCreate a key with `mesh-agent keygen --out FILE` and set cluster_key_file."
        );
        return;
    };
    println!(
        "Authenticated:\tyes ({}), keys from {}\nReplay window:\t{}s\nSent:\t\t{}\nReceived:\t{}",
        auth.cipher,
        auth.key_file.display(),
        auth.replay_window_ms / 1000,
        auth.sent,
        auth.received
    );
    if let Some(r) = &auth.last_reload {
        match &r.error {
            Some(e) => println!(
                "Last reload:\t{}, FAILED (keys unchanged): {e}",
                ago(r.ms_ago)
            ),
            None => println!("Last reload:\t{}", ago(r.ms_ago)),
        }
    }
    println!(
        "\n{}",
        table(
            &["KEY", "ROLE", "SENT", "RECEIVED", "LAST RECEIVED"],
            auth.keys.iter().map(|k| [
                k.id.to_string(),
                if k.primary { "primary" } else { "secondary" }.into(),
                k.sent.to_string(),
                k.received.to_string(),
                or_dash(k.last_received_ms_ago.map(ago)),
            ])
        )
    );
    if !auth.peers.is_empty() {
        println!(
            "\n{}",
            table(
                &["PEER", "PRIMARY KEY", "LAST KEY", "LAST SEEN"],
                auth.peers.iter().map(|p| [
                    p.address.to_string(),
                    p.primary_key.to_string(),
                    p.last_key.to_string(),
                    ago(p.last_seen_ms_ago),
                ])
            )
        );
    }
    println!(
        "\n{}",
        table(
            &["DROPPED", "DATAGRAMS"],
            auth.dropped
                .iter()
                .map(|(reason, n)| [reason.clone(), n.to_string()])
        )
    );
    if let Some(d) = &auth.last_drop {
        println!(
            "\nLast drop:\t{} from {}, {}",
            d.reason.name(),
            d.from,
            ago(d.ms_ago)
        );
    }
}

async fn node(client: &Client, fmt: Format, cmd: NodeCommand) -> Result<()> {
    match cmd {
        NodeCommand::Ls => {
            let nodes: Vec<NodeInfo> = client.get("/v1/nodes").await?;
            if fmt == Format::Json {
                return json(&nodes);
            }
            println!(
                "{}",
                table(
                    &[
                        "ID",
                        "NAME",
                        "HOSTNAME",
                        "ADDRESS",
                        "STATUS",
                        "AVAILABILITY"
                    ],
                    nodes.iter().map(|n| {
                        [
                            if n.is_self {
                                format!("{} *", n.id)
                            } else {
                                n.id.clone()
                            },
                            n.name.clone(),
                            n.hostname.clone(),
                            or_dash(n.address),
                            format!("{:?}", n.status),
                            n.availability.to_string(),
                        ]
                    })
                )
            );
        }
        NodeCommand::Inspect { node, pretty } => {
            let n: NodeInfo = client.get(&format!("/v1/nodes/{node}")).await?;
            if !pretty || fmt == Format::Json {
                return json(&n);
            }
            println!(
                "ID:\t\t{}\nName:\t\t{}\nHostname:\t{}\nAddress:\t{}\nStatus:\t\t{:?}\nAvailability:\t{}\nAgent:\t\t{}",
                n.id,
                n.name,
                n.hostname,
                or_dash(n.address),
                n.status,
                n.availability,
                or_dash(n.agent_version)
            );
            if !n.labels.is_empty() {
                println!("Labels:");
                for (k, v) in &n.labels {
                    println!(" - {k}={v}");
                }
            }
        }
        NodeCommand::Update {
            node,
            availability,
            label_add,
            label_rm,
        } => {
            if availability.is_none() && label_add.is_empty() && label_rm.is_empty() {
                anyhow::bail!("nothing to update: pass --availability, --label-add or --label-rm");
            }
            let req = NodeUpdate {
                availability,
                label_add,
                label_rm,
            };
            let n: NodeInfo = client.post(&format!("/v1/nodes/{node}"), &req).await?;
            if fmt == Format::Json {
                return json(&n);
            }
            println!("{}", n.name);
        }
    }
    Ok(())
}

async fn network(client: &Client, fmt: Format, cmd: NetworkCommand) -> Result<()> {
    match cmd {
        NetworkCommand::Create { name, subnet } => {
            let n: NetworkInfo = client
                .post("/v1/networks", &NetworkCreate { name, subnet })
                .await?;
            if fmt == Format::Json {
                return json(&n);
            }
            println!("{}", n.id);
        }
        NetworkCommand::Ls => {
            let nets: Vec<NetworkInfo> = client.get("/v1/networks").await?;
            if fmt == Format::Json {
                return json(&nets);
            }
            println!(
                "{}",
                table(
                    &["NETWORK ID", "NAME", "VNI", "SUBNET", "NODES"],
                    nets.iter().map(|n| {
                        [
                            n.id.clone(),
                            n.name.clone(),
                            n.vni.to_string(),
                            n.subnet.clone(),
                            n.nodes.len().to_string(),
                        ]
                    })
                )
            );
        }
        NetworkCommand::Inspect { name } => {
            let n: NetworkInfo = client.get(&format!("/v1/networks/{name}")).await?;
            json(&n)?;
        }
        NetworkCommand::Rm { name } => {
            let _: serde_json::Value = client.delete(&format!("/v1/networks/{name}")).await?;
            println!("{name}");
        }
    }
    Ok(())
}
