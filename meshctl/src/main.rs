//! meshctl: Docker-style commands that talk to the local agent's API. Flags and compose
//! files are parsed here, into `mesh_api` specs, with errors that name the flag or key.

mod compose;
mod events;
mod filters;
mod flags;
mod logs;
mod objects;
mod progress;
mod registry_auth;
mod service;
mod stack;
mod volume;

pub use service::ServiceCommand;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use comfy_table::{Table, presets::NOTHING};
use serde::Serialize;

use mesh_api::Client;
use mesh_api::spec::Availability;
use mesh_api::v1::{
    DEFAULT_SOCKET, ExecOutput, ExecRequest, GossipInfo, JoinTokenInfo, LocalTaskInfo,
    NetworkCreate, NetworkInfo, NodeInfo, NodeUpdate, PortStats, RotateInfo, TaskInfo, TaskRun,
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
    /// Manage secrets (sealed under the cluster key; tasks see them at /run/secrets).
    #[command(subcommand)]
    Secret(objects::SecretCommand),
    /// Manage configs (files given to tasks at a path of their choosing).
    #[command(subcommand)]
    Config(objects::ConfigCommand),
    /// Manage volumes (local to their node, as Swarm's `local` driver).
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Deploy and manage stacks of services from compose files.
    #[command(subcommand)]
    Stack(stack::StackCommand),
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
    /// The output of a task of this node (a process task's log file, `podman logs` of a
    /// container).
    Logs {
        task: String,
        /// Keep printing what the task writes.
        #[arg(long, short = 'f')]
        follow: bool,
    },
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
    /// Print the command that joins another host to this cluster (root only: the token
    /// carries the cluster key).
    JoinToken {
        /// Who the token joins: `worker` (the default) or `admin` (Docker's `manager`).
        #[arg(value_parser = ["worker", "admin", "manager"])]
        role: Option<String>,
        /// Replace the cluster key on every node first: tokens printed before stop working
        /// for new joins; members keep running throughout.
        #[arg(long)]
        rotate: bool,
        /// Print the token only.
        #[arg(long, short = 'q')]
        quiet: bool,
        /// How long --rotate waits for every node to switch, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
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
    /// Forget a node that is gone (its records leave every node). Refused while it is up.
    #[command(alias = "remove")]
    Rm {
        node: String,
        /// Remove it even though it is up; its agent stops when it sees it was removed.
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Make nodes admins (Docker's managers): they accept commands and write the cluster's
    /// objects. Admins only.
    Promote {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Make nodes workers: they run tasks and accept no commands. Admins only; the last admin
    /// that is up cannot be demoted.
    Demote {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Change a node's availability, labels or role.
    Update {
        node: String,
        /// manager (an admin) or worker.
        #[arg(long, value_parser = parse_role)]
        role: Option<mesh_planner::Role>,
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
        /// Also write a CNI config list for podman and other CNI runtimes (see `network cni`).
        #[arg(long)]
        cni: bool,
        #[command(flatten)]
        cni_opts: CniOpts,
    },
    /// Write the CNI config list that attaches containers of podman (CNI backend) and other
    /// CNI runtimes to the network: `podman run --network <name> …`.
    Cni {
        network: String,
        #[command(flatten)]
        opts: CniOpts,
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

#[derive(clap::Args, Debug)]
pub struct CniOpts {
    /// Where the runtime reads CNI configs.
    #[arg(long = "cni-dir", default_value = "/etc/cni/net.d")]
    pub cni_dir: PathBuf,
    /// The name containers use (`podman run --network NAME`); default: the network's.
    #[arg(long = "cni-name")]
    pub cni_name: Option<String>,
    /// Make every container on this config a backend of a service (per container:
    /// `CNI_ARGS=MESH_SERVICE=<service>` or `--network-alias <service>`).
    #[arg(long = "cni-service")]
    pub cni_service: Option<String>,
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

/// Docker's `Resources:` block of `node inspect --pretty`, with what the node's tasks
/// reserve and what is left for more.
fn print_node_resources(r: &mesh_api::v1::NodeResources) {
    let cpus = |n: u64| mesh_planner::cpus(n);
    let memory = |n: u64| mesh_planner::bytes_size(n);
    let unlimited = "not advertised (reservations do not limit it)";
    println!("Resources:");
    let c = r.capacity;
    println!(
        " CPUs:\t\t\t{}",
        if c.nano_cpus == 0 {
            unlimited.into()
        } else {
            cpus(c.nano_cpus)
        }
    );
    println!(
        " Memory:\t\t{}",
        if c.memory_bytes == 0 {
            unlimited.into()
        } else {
            memory(c.memory_bytes)
        }
    );
    println!(" Reserved by tasks:");
    println!("  CPUs:\t\t\t{}", cpus(r.reserved.nano_cpus));
    println!("  Memory:\t\t{}", memory(r.reserved.memory_bytes));
    println!(" Available:");
    let available = |cap: u64, left: u64, show: &dyn Fn(u64) -> String| {
        if cap == 0 {
            "unlimited".to_owned()
        } else {
            show(left)
        }
    };
    println!(
        "  CPUs:\t\t\t{}",
        available(c.nano_cpus, r.available.nano_cpus, &cpus)
    );
    println!(
        "  Memory:\t\t{}",
        available(c.memory_bytes, r.available.memory_bytes, &memory)
    );
}

pub(crate) fn json<T: Serialize>(v: &T) -> Result<()> {
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
                    if t.active || t.state != mesh_api::spec::EndpointState::Running {
                        t.state.to_string()
                    } else {
                        format!("{} (draining)", t.state)
                    },
                ]
            })
        )
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let client = Client::new(&cli.socket);
    let fmt = cli.format;
    match cli.command {
        Command::Node(cmd) => node(&client, fmt, cmd).await,
        Command::Network(cmd) => network(&client, &cli.socket, fmt, cmd).await,
        Command::Service(cmd) => service::run(&client, fmt, cmd).await,
        Command::Secret(cmd) => objects::secret(&client, fmt, cmd).await,
        Command::Volume(cmd) => volume::run(&client, fmt, cmd).await,
        Command::Config(cmd) => objects::config(&client, fmt, cmd).await,
        Command::Stack(cmd) => stack::run(&client, fmt, cmd).await,
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
        Command::Logs { task, follow } => {
            service::print_stream(
                &client,
                &format!("/v1/local/tasks/{task}/logs?follow={follow}"),
            )
            .await
        }
        Command::Gossip(GossipCommand::Stats) => {
            let info: GossipInfo = client.get("/v1/gossip").await?;
            if fmt == Format::Json {
                return json(&info);
            }
            print_gossip(&info);
            Ok(())
        }
        Command::JoinToken {
            role,
            rotate,
            quiet,
            timeout,
        } => {
            let path = match role.as_deref() {
                Some("admin" | "manager") => "/v1/join-token?role=admin",
                _ => "/v1/join-token?role=worker",
            };
            join_token(&client, fmt, path, rotate, quiet, timeout).await
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
    println!(
        "Refused:\t{} records not signed by their node, {} nodes under a name bound to \
         another key",
        info.origins.invalid_records, info.origins.nodes_refused
    );
    if info.origins.payloads_refused > 0 {
        println!(
            "\t\t{} bodies of large values that did not match their manifest",
            info.origins.payloads_refused
        );
    }
    if info.origins.secret_copies_refused > 0 {
        println!(
            "\t\t{} copies of secrets sealed to this node that did not open",
            info.origins.secret_copies_refused
        );
    }
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
            warn_insecure(&nodes);
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
                        "AVAILABILITY",
                        "ROLE",
                        "AGENT VERSION"
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
                            n.role.to_string(),
                            or_dash(n.agent_version.clone()),
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
            println!("Drivers:\t{}", n.drivers.join(", "));
            println!("Role:\t\t{} (node.role=={})", n.role, n.role.docker_name());
            println!(
                "Platform:\n Operating System:\t{}\n Architecture:\t\t{}",
                or_dash(Some(&n.platform.os).filter(|s| !s.is_empty())),
                or_dash(Some(&n.platform.arch).filter(|s| !s.is_empty()))
            );
            print_node_resources(&n.resources);
            if let Some(k) = &n.key {
                println!("Node key:\t{k}");
            }
            if n.insecure {
                println!("Gossip:\t\tNOT authenticated (--insecure)");
            }
            if !n.labels.is_empty() {
                println!("Labels:");
                for (k, v) in &n.labels {
                    let from = if n.operator_labels.contains_key(k) {
                        if n.engine_labels.contains_key(k) {
                            "operator, overrides the node's own"
                        } else {
                            "operator"
                        }
                    } else {
                        "engine"
                    };
                    println!(" - {k}={v}\t({from})");
                }
            }
        }
        NodeCommand::Rm { node, force } => {
            let path = if force {
                format!("/v1/nodes/{node}?force=true")
            } else {
                format!("/v1/nodes/{node}")
            };
            let _: serde_json::Value = client.delete(&path).await?;
            println!("{node}");
        }
        NodeCommand::Promote { nodes } => {
            set_roles(client, &nodes, mesh_planner::Role::Admin).await?
        }
        NodeCommand::Demote { nodes } => {
            set_roles(client, &nodes, mesh_planner::Role::Worker).await?
        }
        NodeCommand::Update {
            node,
            role,
            availability,
            label_add,
            label_rm,
        } => {
            if role.is_none()
                && availability.is_none()
                && label_add.is_empty()
                && label_rm.is_empty()
            {
                anyhow::bail!(
                    "nothing to update: pass --availability, --label-add, --label-rm or --role"
                );
            }
            let req = NodeUpdate {
                availability,
                role,
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

/// `node promote`/`demote`, Docker's output: a line per node, stopping at the first refusal.
async fn set_roles(client: &Client, nodes: &[String], role: mesh_planner::Role) -> Result<()> {
    let word = role.docker_name();
    for node in nodes {
        let before: NodeInfo = client.get(&format!("/v1/nodes/{node}")).await?;
        if before.role == role {
            println!("Node {node} is already a {word} in the cluster.");
            continue;
        }
        let req = NodeUpdate {
            role: Some(role),
            ..NodeUpdate::default()
        };
        let _: NodeInfo = client.post(&format!("/v1/nodes/{node}"), &req).await?;
        match role {
            mesh_planner::Role::Admin => {
                println!("Node {node} promoted to a {word} in the cluster.")
            }
            mesh_planner::Role::Worker => println!("Manager {node} demoted in the cluster."),
        }
    }
    Ok(())
}

fn parse_role(s: &str) -> Result<mesh_planner::Role, String> {
    s.parse()
}

/// Like `docker info`'s warnings: on stderr, so scripts reading the table or JSON are not
/// disturbed.
fn warn_insecure(nodes: &[NodeInfo]) {
    let open: Vec<&str> = nodes
        .iter()
        .filter(|n| n.insecure)
        .map(|n| n.name.as_str())
        .collect();
    if !open.is_empty() {
        eprintln!(
            "WARNING: gossip is not authenticated on {} (started with --insecure): any host \
             that reaches the gossip port can join the cluster, read its state and inject \
             records. Give every node a cluster key (`mesh-agent keygen --help`)",
            open.join(", ")
        );
    }
}

/// The join token carries the cluster key: refuse before asking, with the reason (the agent
/// refuses too, from the socket's peer credentials).
fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "only root may see or rotate the join token (it carries the cluster key): run it \
             with sudo on a member"
        );
    }
    Ok(())
}

async fn join_token(
    client: &Client,
    fmt: Format,
    path: &str,
    rotate: bool,
    quiet: bool,
    timeout: u64,
) -> Result<()> {
    require_root()?;
    if rotate {
        let started: RotateInfo = client.post("/v1/join-token/rotate", &()).await?;
        eprintln!(
            "rotating the cluster key to {}: every node switches, then the old key is retired",
            started.key
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
        let mut last = String::new();
        loop {
            let info: JoinTokenInfo = client.get("/v1/join-token").await?;
            let status = info.rotation.as_ref().filter(|r| r.key == started.key);
            let Some(status) = status else {
                anyhow::bail!(
                    "another rotation replaced this one (key {}): run `meshctl join-token` to \
                     print the current token",
                    info.rotation.map(|r| r.key.to_string()).unwrap_or_default()
                );
            };
            let progress = format!(
                "{}/{} nodes use the new key, old key retired on {}/{}",
                status.switched.len(),
                status.ready.len(),
                status.retired.len(),
                status.ready.len()
            );
            if progress != last {
                eprintln!("{progress}");
                last = progress;
            }
            if status.done() && info.key == started.key {
                if !status.down.is_empty() {
                    eprintln!(
                        "warning: down nodes kept the old key: {} (members let them back in \
                         for 7 days; after that, join them again with the new token, or \
                         `meshctl node rm` them)",
                        status.down.join(", ")
                    );
                }
                let info: JoinTokenInfo = client.get(path).await?;
                return print_join_token(&info, fmt, quiet);
            }
            if std::time::Instant::now() > deadline {
                let waiting: Vec<&String> = status
                    .ready
                    .iter()
                    .filter(|n| !status.retired.contains(n))
                    .collect();
                anyhow::bail!(
                    "the rotation is not finished after {timeout}s: nodes {waiting:?} still hold \
                     the old key (see their agent logs and `meshctl gossip stats`); it goes on in \
                     the background and old tokens still work until it ends. Run `meshctl \
                     join-token` later for the new token"
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    let info: JoinTokenInfo = client.get(path).await?;
    print_join_token(&info, fmt, quiet)
}

fn print_join_token(info: &JoinTokenInfo, fmt: Format, quiet: bool) -> Result<()> {
    if fmt == Format::Json {
        return json(info);
    }
    if quiet {
        println!("{}", info.token);
    } else {
        println!(
            "To add a host to this cluster, run this on it as root:\n\n    {}\n",
            info.command
        );
    }
    Ok(())
}

/// Writes `<dir>/<name>.conflist`: one mesh-cni plugin pointed at this agent's socket. The
/// list is cniVersion 1.0.0, which podman 4.3's CNI library reads; `aliases` lets
/// `--network-alias <service>` reach the plugin.
pub fn write_conflist(network: &str, socket: &Path, opts: &CniOpts) -> Result<PathBuf> {
    let name = opts.cni_name.as_deref().unwrap_or(network);
    mesh_api::spec::validate_name("CNI network", name).map_err(anyhow::Error::msg)?;
    let mut plugin = serde_json::json!({
        "type": mesh_api::v1::CNI_PLUGIN_TYPE,
        "network": network,
        "socket": socket,
        "capabilities": { "aliases": true },
    });
    if let Some(s) = &opts.cni_service {
        plugin["service"] = serde_json::json!(s);
    }
    let list = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [plugin],
    });
    std::fs::create_dir_all(&opts.cni_dir)
        .with_context(|| format!("creating {} (run as root?)", opts.cni_dir.display()))?;
    let path = opts.cni_dir.join(format!("{name}.conflist"));
    let tmp = opts.cni_dir.join(format!(".{name}.conflist.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&list)?)
        .with_context(|| format!("writing {} (run as root?)", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

async fn network(client: &Client, socket: &Path, fmt: Format, cmd: NetworkCommand) -> Result<()> {
    match cmd {
        NetworkCommand::Create {
            name,
            subnet,
            cni,
            cni_opts,
        } => {
            let n: NetworkInfo = client
                .post(
                    "/v1/networks",
                    &NetworkCreate {
                        name: name.clone(),
                        subnet,
                    },
                )
                .await?;
            let conflist = if cni {
                Some(write_conflist(&name, socket, &cni_opts)?)
            } else {
                None
            };
            if fmt == Format::Json {
                return json(&n);
            }
            println!("{}", n.id);
            if let Some(p) = conflist {
                eprintln!("wrote {}", p.display());
            }
        }
        NetworkCommand::Cni { network, opts } => {
            // The network must exist: a conflist for a typo would fail every container.
            let n: NetworkInfo = client.get(&format!("/v1/networks/{network}")).await?;
            let path = write_conflist(&n.name, socket, &opts)?;
            if fmt == Format::Json {
                return json(&serde_json::json!({ "conflist": path }));
            }
            println!("{}", path.display());
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arguments_never_panic(args in prop::collection::vec(".{0,16}", 0..6)) {
            let mut argv = vec!["meshctl".to_owned()];
            argv.extend(args);
            let _ = Cli::try_parse_from(argv);
        }
    }
}
