use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
mod join;

use join::{mesh_agent_init, mesh_agent_join};
use mesh_agent::{
    agent::{Agent, NodeParts, Parts, Shutdown},
    cluster::key,
    config::{AgentConfig, DEFAULT_CONFIG},
    dataplane::{self, Dataplane},
    gossip::{Gossip, GossipConfig, auth::GossipAuth, keyring, transport::SealedTransport},
    http, netlink,
    overlay::{GatewayPlumbing, Overlay, Underlay},
    task::{ProcessState, TaskConfig, Tasks},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(name = "mesh-agent", version, about = "The mesh per-node agent")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent in the foreground.
    Run(Box<RunArgs>),
    /// Start a new cluster on this host: makes the cluster key, writes the config and runs
    /// the agent (or starts its systemd unit); prints the command that joins other hosts.
    #[command(long_about = INIT_HELP)]
    Init(Box<InitArgs>),
    /// Join this host to a cluster with the command `mesh-agent init` or `meshctl join-token`
    /// printed on a member.
    Join(Box<JoinArgs>),
    /// Leave the cluster: drain this node, tell peers it leaves, stop the agent and clean up.
    Leave(LeaveArgs),
    /// Install the binaries, the systemd unit and a default config.
    Install {
        /// Install under this directory instead of / (for packaging).
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Create a cluster key, which authenticates and encrypts gossip.
    #[command(long_about = KEYGEN_HELP)]
    Keygen {
        /// Write a new key file (mode 0600) instead of printing the key.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Stamp and store a process task's output (started by the agent, one per task).
    #[command(hide = true)]
    LogWriter {
        /// Rotate the log file when it would grow past this many bytes.
        #[arg(long)]
        max_size: u64,
        /// Files kept, the current one included.
        #[arg(long, default_value_t = mesh_agent::task::DEFAULT_LOG_MAX_FILE)]
        max_file: u32,
        log: PathBuf,
    },
}

const INIT_HELP: &str = "\
Start a new cluster on this host.

Writes the config (default /etc/mesh/agent.toml, --config to choose) with the flags given, and
a new cluster key next to it (cluster.key, mode 0600; an existing one is kept, so running init
again changes nothing), then prints the command that joins other hosts and runs the agent in
the foreground. With --systemd it starts the mesh-agent unit instead.

The join command carries the cluster key: treat it like the key file. Print it again with
`meshctl join-token` (as root, on any member); `meshctl join-token --rotate` replaces the key
on every node, after which older join commands no longer work.";

const KEYGEN_HELP: &str = "\
Create a cluster key, which authenticates and encrypts gossip.

With --out, writes a new key file (mode 0600; an existing file is never overwritten): copy it
to every node and set `cluster_key_file` in agent.toml (or pass --cluster-key-file). Without
--out, prints one key line, for adding to existing key files.

A key file holds one base64 key per line; the first is the primary (gossip is sealed with it),
every key listed is accepted, `#` starts a comment.

Any cluster with a key file rotates with one command, `meshctl join-token --rotate` (each agent
rewrites its own key file). Once that was used, keep using it: agents put the key it spread
back first, undoing a hand edit. Key files managed by hand rotate without downtime this way:
  1. mesh-agent keygen            # prints NEW
  2. on each node in turn: put NEW as the first line, keep the old key after it, and
     reload (systemctl reload mesh-agent, i.e. SIGHUP) or restart the agent
  3. on each node in turn: remove the old line and reload
`meshctl gossip stats` shows which keys each node holds and which its peers use.";

#[derive(clap::Args, Debug)]
struct InitArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Write the config, then enable and start the mesh-agent systemd unit instead of
    /// running the agent in the foreground.
    #[arg(long)]
    systemd: bool,
}

#[derive(clap::Args, Debug)]
struct JoinArgs {
    /// The join token (`meshctl join-token` on a member prints it), or `-` to read it from
    /// stdin. A token on the command line is visible to every local user while join checks
    /// it: prefer --token-file, `--token -` or the MESH_JOIN_TOKEN environment variable.
    #[arg(long, conflicts_with = "token_file")]
    token: Option<String>,
    /// A file holding the join token (e.g. one only root can read).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// A member's address, host[:port].
    member: String,
    #[command(flatten)]
    run: RunArgs,
    /// Write the config, then enable and start the mesh-agent systemd unit instead of
    /// running the agent in the foreground.
    #[arg(long)]
    systemd: bool,
}

#[derive(clap::Args, Debug)]
struct LeaveArgs {
    /// Config file (to find the agent's socket).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The agent's API socket (default: from the config).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// How long to wait for this node's tasks to move elsewhere, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Leave even if tasks of services still run here after the wait (they stop).
    #[arg(long)]
    force: bool,
}

/// Flags override the config file; each has a config key of the same name.
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Unique node name (default: hostname).
    #[arg(long)]
    node_name: Option<String>,
    /// Underlay IPv4 address of this node.
    #[arg(long)]
    advertise: Option<std::net::Ipv4Addr>,
    /// Underlay interface (default: the one holding --advertise).
    #[arg(long)]
    interface: Option<String>,
    /// A peer to join, host[:port]; repeat for more.
    #[arg(long)]
    join: Vec<String>,
    #[arg(long)]
    cluster: Option<String>,
    #[arg(long)]
    gossip_port: Option<u16>,
    #[arg(long)]
    cluster_key_file: Option<PathBuf>,
    /// Where admin.pub (and on admins admin.key) are; default: beside --cluster-key-file.
    #[arg(long)]
    admin_key_dir: Option<PathBuf>,
    /// Run without a cluster key: gossip is then open to any host that reaches its port.
    #[arg(long)]
    insecure: bool,
    /// A label of this node, key=value (or key); repeat for more. Added to `labels` of the
    /// config file.
    #[arg(long = "label")]
    label: Vec<String>,
    #[arg(long)]
    gossip_interval_ms: Option<u64>,
    #[arg(long)]
    phi_threshold: Option<f64>,
    #[arg(long)]
    settle_ms: Option<u64>,
    #[arg(long)]
    restart_grace_ms: Option<u64>,
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Serve the Docker Engine API (swarm endpoints) on this socket; default: docker.sock
    /// beside --socket; "" turns it off.
    #[arg(long)]
    docker_socket: Option<PathBuf>,
    /// The group that may use the Docker API socket besides root (as dockerd's `docker`
    /// group); default: root's only.
    #[arg(long)]
    docker_socket_group: Option<String>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long)]
    bpffs: Option<PathBuf>,
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// An upstream resolver for names outside the mesh, ip[:port]; repeat for more.
    #[arg(long)]
    dns_upstream: Vec<String>,
    /// On exit, detach the dataplane instead of leaving it forwarding.
    #[arg(long)]
    cleanup_on_exit: bool,
    /// Gossip, the merged view and the API only: no eBPF, overlay, tasks or DNS listeners
    /// (for control-plane benchmarks; such a node forwards nothing).
    #[arg(long)]
    control_plane_only: bool,
    /// Serve the read-only cluster visualizer on this address, e.g. 127.0.0.1:8090.
    #[arg(long)]
    ui_listen: Option<SocketAddr>,
    /// Serve Prometheus metrics at /metrics on this address, e.g. 127.0.0.1:9464.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

impl RunArgs {
    fn config_path(&self) -> PathBuf {
        self.config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
    }

    fn into_config(self) -> Result<AgentConfig> {
        let explicit = self.config.is_some();
        self.into_config_from(explicit)
    }

    /// The config file (a missing one is empty unless `must_exist`) with the flags applied.
    fn into_config_from(self, must_exist: bool) -> Result<AgentConfig> {
        let path = self.config_path();
        let mut c = AgentConfig::load(&path, must_exist)?;
        for l in &self.label {
            let (k, v) =
                mesh_api::spec::parse_label(l).map_err(|e| anyhow::anyhow!("--label: {e}"))?;
            c.labels.insert(k, v);
        }
        macro_rules! over {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v.into(); } )* };
        }
        over!(
            node_name,
            advertise,
            interface,
            cluster_key_file,
            admin_key_dir
        );
        if let Some(v) = self.cluster {
            c.cluster = v;
        }
        if let Some(v) = self.gossip_port {
            c.gossip_port = v;
        }
        if let Some(v) = self.gossip_interval_ms {
            c.gossip_interval_ms = v;
        }
        if let Some(v) = self.phi_threshold {
            c.phi_threshold = v;
        }
        if let Some(v) = self.restart_grace_ms {
            c.restart_grace_ms = v;
        }
        if let Some(v) = self.settle_ms {
            c.settle_ms = v;
        }
        if let Some(v) = self.socket {
            c.socket = v;
        }
        if let Some(v) = self.docker_socket {
            c.docker_socket = Some(v);
        }
        if let Some(v) = self.docker_socket_group {
            c.docker_socket_group = Some(v);
        }
        if let Some(v) = self.state_dir {
            c.state_dir = v;
        }
        if let Some(v) = self.bpffs {
            c.bpffs = v;
        }
        if let Some(v) = self.cgroup {
            c.cgroup = Some(v);
        }
        if !self.join.is_empty() {
            c.join = self.join;
        }
        if !self.dns_upstream.is_empty() {
            c.dns_upstreams = self
                .dns_upstream
                .iter()
                .map(|s| parse_upstream(s))
                .collect::<Result<_>>()?;
        }
        if self.cleanup_on_exit {
            c.cleanup_on_exit = true;
        }
        if self.control_plane_only {
            c.control_plane_only = true;
        }
        if self.insecure {
            c.insecure = true;
        }
        if self.ui_listen.is_some() {
            c.ui_listen = self.ui_listen;
        }
        if self.metrics_listen.is_some() {
            c.metrics_listen = self.metrics_listen;
        }
        Ok(c)
    }
}

fn parse_upstream(s: &str) -> Result<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip: std::net::IpAddr = s
        .parse()
        .with_context(|| format!("invalid --dns-upstream {s:?}: expected ip or ip:port"))?;
    Ok(SocketAddr::new(ip, 53))
}

fn main() {
    // A process task's init is this binary too: it must start before any runtime thread.
    mesh_agent::task::init::run_if_asked();
    // More runtime threads than CPUs: a task start or stop makes blocking calls on them
    // (namespaces made and unmounted, /proc scanned, the process forked), and with tasks
    // started side by side and a service's tasks stopped together, one thread per CPU
    // left none for gossip and the convergence loop — a node went silent for seconds and
    // its peers called it down. Blocked threads cost no CPU.
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpus.max(8))
        .enable_all()
        .build()
        .expect("starting the async runtime")
        .block_on(agent_main());
}

async fn agent_main() {
    mesh_agent::logging::init("info");
    let args = Args::parse();
    let result = match args.command {
        Command::Run(run) => match (*run).into_config() {
            Ok(c) => run_agent(c).await,
            Err(e) => Err(e),
        },
        Command::Init(a) => mesh_agent_init(*a).await,
        Command::Join(a) => mesh_agent_join(*a).await,
        Command::Leave(a) => join::leave(a.config, a.socket, a.timeout, a.force).await,
        Command::Install { root } => install(&root),
        Command::Keygen { out } => keygen(out.as_deref()),
        Command::LogWriter {
            max_size,
            max_file,
            log,
        } => mesh_agent::task::write_log(std::io::stdin(), &log, max_size, max_file)
            .with_context(|| format!("writing {}", log.display())),
    };
    if let Err(e) = result {
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
}

fn install(root: &std::path::Path) -> Result<()> {
    for path in mesh_agent::install::install(root)? {
        println!("installed {}", path.display());
    }
    println!(
        "next: set `advertise` (and `join`) in /etc/mesh/agent.toml, then\n  \
         systemctl daemon-reload && systemctl enable --now mesh-agent"
    );
    Ok(())
}

fn keygen(out: Option<&std::path::Path>) -> Result<()> {
    match out {
        Some(path) => {
            let id = keyring::write_new_key_file(path)?;
            eprintln!(
                "wrote cluster key {id} to {}: copy it to every node (mode 0600) and set cluster_key_file",
                path.display()
            );
        }
        None => {
            let key = keyring::generate()?;
            println!("{}", keyring::encode(&key).as_str());
            eprintln!("cluster key {}", keyring::key_id(&key));
        }
    }
    Ok(())
}

/// Seals gossip with the cluster key; without one (only with `insecure`, checked when the
/// config was resolved) says loudly what that opens.
fn gossip_auth(config: &mesh_agent::config::ResolvedConfig) -> Result<Option<Arc<GossipAuth>>> {
    let Some(path) = &config.cluster_key_file else {
        warn!(
            "--insecure: gossip is NOT authenticated: any host that reaches port {}/udp can join \
             this cluster, read its state and inject records. Create a key with `mesh-agent keygen --out \
             /etc/mesh/cluster.key`, copy it to every node and set cluster_key_file",
            config.gossip_port
        );
        return Ok(None);
    };
    let auth = GossipAuth::load(path, &config.cluster)?;
    let ids = auth.keyring().ids();
    info!(
        primary = %ids[0],
        accepted = ?ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "gossip is authenticated and encrypted with the cluster key"
    );
    Ok(Some(auth))
}

/// SIGHUP re-reads the cluster key file, so keys rotate without a restart.
fn reload_keys_on_sighup(auth: Option<Arc<GossipAuth>>) -> Result<()> {
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match &auth {
                Some(auth) => {
                    if let Err(e) = auth.reload() {
                        error!("SIGHUP: keeping the current cluster keys: {e:#}");
                    }
                }
                None => warn!(
                    "SIGHUP: no cluster key file configured; restart the agent with \
                     --cluster-key-file to authenticate gossip"
                ),
            }
        }
    });
    Ok(())
}

/// This node's key pair, made the first time the agent runs (init and join run it), kept in
/// the state dir.
pub(crate) fn node_identity(
    state_dir: &std::path::Path,
) -> Result<mesh_agent::identity::NodeIdentity> {
    use mesh_agent::identity;
    let path = identity::key_file(state_dir);
    let (id, made) = identity::NodeIdentity::load_or_create(&path)?;
    identity::check_mode(&path)?;
    if made {
        info!(key = %id.public(), path = %path.display(), "new node key pair");
    }
    Ok(id)
}

/// Roles, when the cluster has an admin key: the grants kept from earlier runs, and this
/// node's own admin grant made now if it holds the admin key and was never demoted.
fn node_roles(
    config: &mesh_agent::config::ResolvedConfig,
    identity: &mesh_agent::identity::NodeIdentity,
) -> Result<Option<mesh_agent::gossip::admins::Admins>> {
    use mesh_agent::roles::{AdminKey, GRANTS_FILE, Registry, Role};
    let Some(dir) = config.admin_key_dir() else {
        return Ok(None);
    };
    let Some(admin) = AdminKey::load(&dir)? else {
        return Ok(None);
    };
    let registry = Registry::new(admin.public, Some(config.state_dir.join(GRANTS_FILE)));
    let me = (config.node_name.as_str(), identity.public());
    let known = registry.grant(me.0).is_some_and(|g| g.key == me.1);
    let holds_secret = admin.secret().is_some();
    let mut admins = mesh_agent::gossip::admins::Admins::new(admin, dir, registry, me);
    if holds_secret && !known {
        admins.grant(
            me.0,
            me.1,
            Role::Admin,
            mesh_agent::cluster::Clock::now_ms(),
        )?;
        admins.settle_own_role(me);
    }
    info!(role = %admins.own_role(), "node roles on: admins write the cluster's objects");
    Ok(Some(admins))
}

fn with_port(peer: &str, default: u16) -> String {
    if peer.parse::<SocketAddr>().is_ok()
        || peer
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        peer.to_owned()
    } else {
        format!("{peer}:{default}")
    }
}

pub(crate) async fn run_agent(config: AgentConfig) -> Result<()> {
    let config = config.resolve()?;
    // A bad key file or socket group stops the agent before it touches the kernel.
    let auth = gossip_auth(&config)?;
    let docker_group = config
        .docker_socket_group
        .as_deref()
        .map(mesh_agent::docker::socket_group)
        .transpose()?;
    let identity = std::sync::Arc::new(node_identity(&config.state_dir)?);
    let gossip_config = GossipConfig {
        node: config.node_name.clone(),
        cluster: config.cluster.clone(),
        listen: SocketAddr::new(config.advertise.into(), config.gossip_port),
        advertise: SocketAddr::new(config.advertise.into(), config.gossip_port),
        seeds: config
            .join
            .iter()
            .map(|p| with_port(p, config.gossip_port))
            .collect(),
        interval: config.gossip_interval(),
        phi_threshold: config.phi_threshold,
        dead_node_grace: std::time::Duration::from_secs(3600),
        tombstone_grace: std::time::Duration::from_secs(3600),
        // Large values travel over the node-to-node channel, which only a cluster key opens.
        carry_payloads: auth.is_some(),
    };
    let (node, podman) = if config.control_plane_only {
        warn!("control plane only: this node gossips and answers the API but forwards nothing");
        (None, false)
    } else {
        // Asking podman takes a few hundred ms: done while the dataplane loads.
        let (parts, podman) =
            tokio::join!(node_parts(&config), mesh_agent::task::podman_available());
        (Some(parts?), podman)
    };
    let mtu = match &node {
        Some(n) => n.underlay.mtu,
        None => dataplane::interface_mtu(&config.interface).unwrap_or(1500),
    };
    let mut record = Agent::node_record(&config, mtu);
    if podman {
        record
            .drivers
            .push(mesh_api::spec::DRIVER_PODMAN.to_owned());
    }
    info!(drivers = ?record.drivers, "task drivers");
    // Re-assert what this node owned before a restart, endpoints only for tasks that are
    // still running and containers still attached through CNI.
    let mut initial: Vec<(String, String)> = mesh_agent::agent::load_own_keys(&config.state_dir)
        .into_iter()
        .filter(|(k, _)| {
            key::endpoint_task(k).is_none_or(|(task, _)| {
                node.as_ref().is_some_and(|n| {
                    n.tasks
                        .get(task)
                        .is_some_and(|t| t.state == ProcessState::Running)
                        || n.tasks.cni_list().iter().any(|c| c.task == task)
                })
            })
        })
        .collect();
    record.key = Some(identity.public());
    let pins = Some(config.state_dir.join(mesh_agent::gossip::origin::PINS_FILE));
    let admins = node_roles(&config, &identity)?;
    record.grant = admins
        .as_ref()
        .and_then(|a| a.registry().grant(&config.node_name).cloned());
    initial.push((key::NODE.to_owned(), serde_json::to_string(&record)?));
    let gossip = match &auth {
        Some(auth) => Gossip::start(
            &gossip_config,
            identity,
            pins,
            admins,
            initial,
            &SealedTransport::new(auth.clone()),
        )
        .await?
        .with_auth(auth.clone()),
        None => {
            Gossip::start(
                &gossip_config,
                identity,
                pins,
                admins,
                initial,
                &chitchat::transport::UdpTransport,
            )
            .await?
        }
    };
    reload_keys_on_sighup(auth)?;
    info!(
        node = config.node_name,
        advertise = %config.advertise,
        failure_detection = ?gossip_config.failure_detection_time(),
        "gossip started"
    );

    let upstreams = if config.dns_upstreams.is_empty() {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        mesh_agent::config::upstreams_from_resolv_conf(&text)
    } else {
        config.dns_upstreams.clone()
    };
    if upstreams.is_empty() {
        tracing::warn!("no upstream resolvers: tasks resolve only mesh names (set dns_upstreams)");
    }
    let dns = mesh_dns::DnsServer::new(mesh_dns::Config {
        upstreams,
        ..Default::default()
    })
    .context("configuring the embedded DNS server")?;
    let parts = Parts { dns, node };
    let gossip_stopped = gossip.stopped();
    let agent = Agent::new(config.clone(), gossip, parts);
    tokio::spawn(agent.clone().run());
    tokio::spawn(agent.clone().sweep_flows());
    tokio::spawn(agent.clone().watch_events());
    // Bound before the agent reports ready, so a taken port is an error at start.
    if let Some(addr) = config.ui_listen {
        let listener = mesh_agent::ui::bind(addr).await?;
        info!(%addr, "cluster visualizer at http://{addr}/");
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = mesh_agent::ui::serve(listener, agent).await {
                error!("{e:#}");
            }
        });
    }
    // Agents read each other's task output (`service logs`) only when they share a key.
    if let Some(auth) = agent.gossip.auth().cloned() {
        use mesh_agent::http::peer_logs;
        let listener = peer_logs::bind((config.advertise, config.gossip_port).into()).await?;
        tokio::spawn(peer_logs::serve(listener, agent.clone(), auth.clone()));
        tokio::spawn(mesh_agent::http::peer_payloads::fetch_wanted(
            agent.clone(),
            auth,
        ));
    }
    if let Some(addr) = config.metrics_listen {
        let listener = mesh_agent::metrics::bind(addr).await?;
        info!(%addr, "Prometheus metrics at http://{addr}/metrics");
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = mesh_agent::metrics::serve(listener, agent).await {
                error!("{e:#}");
            }
        });
    }

    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let docker_socket = config.docker_socket();
    if let Some(path) = &docker_socket {
        let listener = mesh_agent::docker::bind(path, docker_group)?;
        info!(socket = %path.display(), "Docker API (swarm endpoints) ready");
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = mesh_agent::docker::serve(listener, agent).await {
                error!("{e:#}");
            }
        });
    }
    let api = http::serve(http::bind(&config.socket)?, agent.clone());
    info!(socket = %config.socket.display(), "agent ready");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let mut leaving = None;
    tokio::select! {
        r = api => r?,
        why = agent.shutdown_requested() => leaving = Some(why),
        _ = term.recv() => {
            info!("SIGTERM: stopping; the dataplane keeps forwarding");
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
            if !config.cleanup_on_exit {
                agent.announce_restart(config.restart_grace()).await;
            }
        }
        _ = int.recv() => info!("SIGINT: stopping"),
        // Without gossip the node would keep serving a view that never changes again, and
        // peers would evict it: better to end and be restarted (systemd's Restart=), while
        // the pinned dataplane keeps forwarding.
        e = gossip_stopped => {
            error!("{e:#}; exiting so the agent is restarted (the dataplane keeps forwarding)");
            return Err(e);
        }
    }
    if let Some(why) = leaving {
        if let Err(e) = agent.clean_up_after_leaving().await {
            error!("cleaning up after leaving: {e:#}");
        }
        if let Some(local) = agent.local() {
            local.dataplane.lock().await.remove_pins()?;
        }
        let _ = std::fs::remove_file(&config.socket);
        if let Some(p) = &docker_socket {
            let _ = std::fs::remove_file(p);
        }
        match why {
            Shutdown::Leave => {
                info!("left the cluster; tasks stopped, networks unplumbed, dataplane detached")
            }
            Shutdown::Removed => {
                warn!("removed from the cluster by another node; stopped and cleaned up")
            }
        }
        return Ok(());
    }
    let _ = std::fs::remove_file(&config.socket);
    if let Some(p) = &docker_socket {
        let _ = std::fs::remove_file(p);
    }
    if config.cleanup_on_exit
        && let Some(local) = agent.local()
    {
        local.dataplane.lock().await.remove_pins()?;
        info!("dataplane detached and unpinned");
    }
    Ok(())
}

/// Loads the dataplane, opens the task store (adopting what an earlier run left) and gets
/// the overlay's netlink handle: everything that touches this node's kernel.
async fn node_parts(config: &mesh_agent::config::ResolvedConfig) -> Result<NodeParts> {
    let node_bpffs = config.bpffs.clone();
    let limits = config.dataplane.limits();
    info!(
        max_flows = config.dataplane.max_flows,
        max_embryonic_flows = config.dataplane.max_embryonic_flows,
        max_snat_reservations = config.dataplane.max_snat_reservations,
        max_return_paths = config.dataplane.max_return_paths,
        mib = limits.flow_table_bytes() / (1 << 20),
        "flow tables"
    );
    let mut dataplane = Dataplane::start_with_limits(&node_bpffs, &config.interface, &limits)?;
    let mut node_lb = mesh_agent::lb::NodeLb::new(config.advertise)?;
    node_lb.snat_ports = config.dataplane.snat_ports();
    dataplane.lb_mut().set_node(&node_lb)?;
    let cgroup_root = dataplane.attach_sockets()?;
    let mtu = dataplane::interface_mtu(&config.interface)?;

    // Adopt the tasks an earlier run left (running ones keep running; gone ones are cleaned).
    let host = netlink::connect()?;
    let task_cgroup = config
        .cgroup
        .clone()
        .unwrap_or_else(|| cgroup_root.join("mesh"))
        .join("tasks");
    std::fs::create_dir_all(&task_cgroup).with_context(|| {
        format!(
            "creating cgroup {} (is cgroup v2 mounted there?)",
            task_cgroup.display()
        )
    })?;
    let mut task_config = TaskConfig::new(&config.node_name, config.state_dir.clone());
    task_config.cgroup = Some(task_cgroup);
    (task_config.log_max_size, task_config.log_max_file) = config.task_logs.limits()?;
    // Where memory, cpu and pids live (v2, or v1 hierarchies on a hybrid host): read once;
    // a host's layout does not change under a running agent.
    task_config.cgroup_layout = Some(mesh_agent::cgroup::Layout::discover()?);
    // Beside the API socket, on the run-time file system: never under the state directory.
    if let Some(run) = config.socket.parent() {
        task_config.files_dir = run.join("task-files");
    }
    // What a compromised process task would want first: the key that admits it to gossip,
    // the state with the node's own key, the API socket that commands the cluster, the
    // dataplane's maps.
    task_config.masked = [
        Some(config.state_dir.clone()),
        config.cluster_key_file.clone(),
        Some(config.socket.clone()),
        config.socket.parent().map(Path::to_path_buf),
        // The Docker socket commands the cluster as the API socket does.
        config.docker_socket(),
        config
            .docker_socket()
            .and_then(|p| p.parent().map(Path::to_path_buf)),
        Some(PathBuf::from("/run/mesh")),
        Some(PathBuf::from("/etc/mesh")),
        // The dataplane's pinned maps: a task running as root must not open them.
        Some(config.bpffs.clone()),
    ]
    .into_iter()
    .flatten()
    .collect();
    let tasks = Tasks::open(task_config, host.clone()).await?;

    let gw = config.gateway_subnet;
    Ok(NodeParts {
        dataplane,
        tasks,
        overlay: Overlay::new(host),
        underlay: Underlay {
            interface: config.interface.clone(),
            address: config.advertise,
            mtu,
        },
        gateway: GatewayPlumbing {
            subnet: gw,
            address: gw
                .hosts()
                .next()
                .context("gateway_subnet has no host addresses")?,
            mtu,
        },
    })
}
