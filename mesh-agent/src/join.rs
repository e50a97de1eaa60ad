//! `mesh-agent init`, `join` and `leave`: Swarm's `swarm init / join / leave`.
//!
//! init and join check everything they can before they write anything (the token, the
//! labels, the addresses, and for join that the member answers under the token's key), so a
//! mistake leaves the host as it was. Both write the config and the key file and then run the
//! agent (in the foreground, or through its systemd unit); running them again with the same
//! arguments changes nothing.

use std::{
    net::{Ipv4Addr, SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_agent::{
    config::{AgentConfig, DEFAULT_CONFIG},
    gossip::auth::GossipAuth,
    gossip::keyring::{self, ClusterKey, Keyring, key_id},
    gossip::token::{JoinToken, TokenRole},
    gossip::transport::{ProbeAnswer, probe},
    roles::AdminKey,
};
use mesh_api::Client;
use mesh_api::spec::Availability;
use mesh_api::v1::{DropReason, NodeInfo, NodeUpdate, TaskInfo};
use zeroize::Zeroizing;

use crate::{InitArgs, JoinArgs, run_agent};

const UNIT: &str = "mesh-agent";
/// Where the unit may be: `mesh-agent install` writes the first, the Debian package
/// (`cargo xtask dist`) the others. An installed unit is never replaced by another copy.
const UNIT_FILES: &[&str] = &[
    "/etc/systemd/system/mesh-agent.service",
    "/lib/systemd/system/mesh-agent.service",
    "/usr/lib/systemd/system/mesh-agent.service",
];

fn unit_installed() -> bool {
    UNIT_FILES.iter().any(|f| Path::new(f).exists())
}
/// How long join waits for the member to answer its probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("mesh-agent {what} must run as root (it writes /etc/mesh and programs the kernel)");
    }
    Ok(())
}

pub async fn mesh_agent_init(args: InitArgs) -> Result<()> {
    require_root("init")?;
    let path = args.run.config_path();
    check_systemd_path(args.systemd, &path)?;
    let mut config = args.run.into_config_from(false)?;
    let key_file = key_file_for(&mut config, &path);
    // Everything is checked before anything is written.
    let resolved = config.clone().resolve()?;
    let key = match keyring::read_material(&key_file) {
        Ok(keys) => {
            eprintln!(
                "using the existing cluster key {} in {}",
                key_id(&keys[0]),
                key_file.display()
            );
            keys.into_iter().next().expect("a key file has a key")
        }
        Err(_) if !key_file.exists() => {
            let key = keyring::generate()?;
            keyring::write_key_file(&key_file, &[&key])?;
            eprintln!(
                "new cluster key {} written to {} (mode 0600)",
                key_id(&key),
                key_file.display()
            );
            key
        }
        Err(e) => return Err(e.context("an existing key file is in the way: fix or remove it")),
    };
    let admin = make_admin_key(&config)?;
    let changed = write_config(&path, &config)?;
    let token = JoinToken::new(&key, &config.cluster).with_role(TokenRole::Worker(admin));
    let address = match config.gossip_port {
        mesh_agent::gossip::DEFAULT_PORT => resolved.advertise.to_string(),
        port => format!("{}:{port}", resolved.advertise),
    };
    // The command's output, not a log line: it goes to stdout only, and never through
    // tracing.
    println!(
        "Cluster initialized; node {} is its first member and an admin.\n\n\
         To add a worker, run this on it as root:\n\n    mesh-agent join --token {} {address}\n\n\
         To add an admin, run `meshctl join-token admin` and follow the instructions.\n\
         (`meshctl join-token` prints the worker command again.)",
        resolved.node_name,
        token.encode().as_str()
    );
    if agent_answers(&config.socket).await {
        eprintln!(
            "the agent already runs on this host (socket {}): nothing more to do",
            config.socket.display()
        );
        return Ok(());
    }
    start(config, &path, args.systemd, changed).await
}

pub async fn mesh_agent_join(args: JoinArgs) -> Result<()> {
    require_root("join")?;
    let token = JoinToken::decode(&read_token(&args)?)?;
    let path = args.run.config_path();
    check_systemd_path(args.systemd, &path)?;
    let mut config = args.run.into_config_from(false)?;
    let member = resolve_member(&args.member, config.gossip_port)?;
    config.cluster = token.cluster.clone();
    let member_text = args.member.clone();
    config.join.retain(|p| p != &member_text);
    config.join.insert(0, member_text);
    if config.advertise.is_none() {
        config.advertise = Some(source_address_towards(member)?);
    }
    let key_file = key_file_for(&mut config, &path);
    let resolved = config.clone().resolve()?;

    if agent_answers(&config.socket).await {
        let same_key = keyring::read_material(&key_file)
            .is_ok_and(|k| k.iter().any(|k| key_id(k) == token.id()));
        if same_key {
            eprintln!(
                "node {} is already a member of this cluster (its agent runs): nothing to do",
                resolved.node_name
            );
            return Ok(());
        }
        bail!(
            "an agent already runs on this host (socket {}) as a member of another cluster: \
             run `mesh-agent leave` first",
            config.socket.display()
        );
    }

    let ring = Keyring::new(vec![ClusterKey::new(&token.key)])?;
    let auth = Arc::new(GossipAuth::new(
        ring,
        Path::new("join token"),
        &token.cluster,
    ));
    let local = SocketAddr::new(resolved.advertise.into(), 0);
    match probe(auth, &token.cluster, local, member, PROBE_TIMEOUT)
        .await
        .with_context(|| format!("cannot join through {}", args.member))?
    {
        ProbeAnswer::Member { primary } => {
            eprintln!(
                "{} is a member of cluster {:?} holding key {}",
                args.member,
                token.cluster,
                token.id()
            );
            if primary.is_some_and(|p| p != token.id()) {
                eprintln!(
                    "note: the cluster is rotating its key; this token's key is being retired \
                     (this node switches with the others)"
                );
            }
        }
        ProbeAnswer::Refused(r) if r.reason == DropReason::UnknownKey => bail!(
            "{} does not accept this join token (key {}): the token is stale (the cluster key \
             was rotated with `meshctl join-token --rotate`) or belongs to another cluster. \
             Print the current one with `meshctl join-token` on a member of the cluster you \
             want to join",
            args.member,
            token.id()
        ),
        ProbeAnswer::Refused(_) => bail!(
            "{} holds this token's key but is not in cluster {:?}: the token belongs to \
             another cluster. Print the right one with `meshctl join-token` on a member",
            args.member,
            token.cluster
        ),
    }

    if let Some(admin) = token.admin_key() {
        let dir = config
            .admin_key_dir()
            .context("no directory for the admin key (set admin_key_dir)")?;
        admin.save(&dir)?;
        eprintln!(
            "joining as {}: the admin key's {} written to {}",
            if admin.secret().is_some() {
                "an admin"
            } else {
                "a worker"
            },
            if admin.secret().is_some() {
                "public and secret halves"
            } else {
                "public half"
            },
            dir.display()
        );
    }
    let mut changed = match keyring::read_material(&key_file) {
        Ok(keys) if key_id(&keys[0]) == token.id() => false,
        _ => {
            keyring::write_key_file(&key_file, &[&token.key])?;
            eprintln!(
                "cluster key {} written to {} (mode 0600)",
                token.id(),
                key_file.display()
            );
            true
        }
    };
    changed |= write_config(&path, &config)?;
    if !args.systemd {
        return exec_run(&path);
    }
    start(config, &path, args.systemd, changed).await
}

/// The cluster's admin key, made by `init` (or the one already there, on a second `init`):
/// this node is the cluster's first admin. Returns its public half.
fn make_admin_key(config: &AgentConfig) -> Result<mesh_agent::identity::PublicKey> {
    let dir = config
        .admin_key_dir()
        .context("no directory for the admin key (set admin_key_dir)")?;
    if let Some(existing) = AdminKey::load(&dir)? {
        if existing.secret().is_none() {
            bail!(
                "{} holds another cluster's admin key without its secret (this host was a \
                 worker): `mesh-agent leave` that cluster first",
                dir.display()
            );
        }
        return Ok(existing.public);
    }
    let admin = AdminKey::generate()?;
    admin.save(&dir)?;
    eprintln!(
        "new admin key written to {} ({} and {}, mode 0600): admins hold it",
        dir.display(),
        mesh_agent::roles::ADMIN_PUB_FILE,
        mesh_agent::roles::ADMIN_KEY_FILE
    );
    Ok(admin.public)
}

/// Where the join token comes from: `--token-file`, `--token -` (stdin), MESH_JOIN_TOKEN, or
/// `--token VALUE` (with a warning: argv is readable by every local user).
fn read_token(args: &JoinArgs) -> Result<Zeroizing<String>> {
    const ENV: &str = "MESH_JOIN_TOKEN";
    let from_env = std::env::var(ENV).ok().map(Zeroizing::new);
    match (&args.token, &args.token_file, from_env) {
        (Some(_), None, Some(_)) | (None, Some(_), Some(_)) => bail!(
            "the join token is given twice ({ENV} and a flag): use one of --token-file, \
             `--token -` or {ENV}"
        ),
        (None, Some(path), None) => {
            let text = Zeroizing::new(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the join token from {}", path.display()))?,
            );
            Ok(text)
        }
        (Some(t), None, None) if t == "-" => {
            let mut text = Zeroizing::new(String::new());
            std::io::stdin()
                .read_line(&mut text)
                .context("reading the join token from stdin")?;
            Ok(text)
        }
        (Some(t), None, None) => {
            eprintln!(
                "warning: a join token on the command line is visible to every local user \
                 (ps, /proc/PID/cmdline) while join runs; pass it with --token-file FILE, \
                 `--token -` (stdin) or {ENV} instead"
            );
            Ok(Zeroizing::new(t.clone()))
        }
        (None, None, Some(t)) => Ok(t),
        (None, None, None) => bail!(
            "no join token: pass --token-file FILE, `--token -` (read from stdin) or set {ENV} \
             (`meshctl join-token` on a member prints it)"
        ),
        (Some(_), Some(_), _) => unreachable!("clap refuses --token with --token-file"),
    }
}

/// Runs the agent in the foreground as `mesh-agent run --config PATH`, replacing this
/// process: join's own command line (which may hold the token) and MESH_JOIN_TOKEN are gone
/// from /proc/PID/cmdline and environ while the agent runs, and the key lives in the key
/// file only.
fn exec_run(config: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the mesh-agent binary")?;
    let err = Command::new(&exe)
        .arg("run")
        .arg("--config")
        .arg(config)
        .env_remove("MESH_JOIN_TOKEN")
        .exec();
    Err(err).with_context(|| format!("starting {} run", exe.display()))
}

/// `--systemd` runs the unit, which reads the default config only.
fn check_systemd_path(systemd: bool, path: &Path) -> Result<()> {
    if systemd && path != Path::new(DEFAULT_CONFIG) {
        bail!(
            "--systemd uses the unit's config {DEFAULT_CONFIG}; leave out --config (or run the \
             agent in the foreground with --config)"
        );
    }
    Ok(())
}

/// The key file the config names, or `cluster.key` next to the config.
fn key_file_for(config: &mut AgentConfig, config_path: &Path) -> PathBuf {
    config
        .cluster_key_file
        .get_or_insert_with(|| {
            config_path
                .parent()
                .unwrap_or(Path::new("/etc/mesh"))
                .join("cluster.key")
        })
        .clone()
}

fn resolve_member(member: &str, default_port: u16) -> Result<SocketAddr> {
    let with_port = crate::with_port(member, default_port);
    with_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.find(SocketAddr::is_ipv4))
        .with_context(|| {
            format!("{member:?} is not a member's address: expected host[:port], e.g. 192.0.2.1")
        })
}

/// The address this host reaches `peer` from: the one to advertise when none is given.
fn source_address_towards(peer: SocketAddr) -> Result<Ipv4Addr> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket
        .connect(peer)
        .with_context(|| format!("no route to {peer}: check the address, or pass --advertise"))?;
    match socket.local_addr()?.ip() {
        std::net::IpAddr::V4(ip) => Ok(ip),
        other => bail!("this host reaches {peer} from {other}; pass --advertise <IPv4>"),
    }
}

async fn agent_answers(socket: &Path) -> bool {
    tokio::net::UnixStream::connect(socket).await.is_ok()
}

/// Writes the settings that differ from the defaults, so a later release's defaults still
/// apply. Returns whether the file changed.
fn write_config(path: &Path, config: &AgentConfig) -> Result<bool> {
    let mut table = match toml::Value::try_from(config).context("encoding the config")? {
        toml::Value::Table(t) => t,
        _ => unreachable!("a struct encodes as a table"),
    };
    let defaults = match toml::Value::try_from(AgentConfig::default())? {
        toml::Value::Table(t) => t,
        _ => unreachable!("a struct encodes as a table"),
    };
    table.retain(|k, v| defaults.get(k) != Some(v));
    let text = format!(
        "# Written by mesh-agent init/join; edit freely (every key is also a flag of \
         `mesh-agent run`).\n{}",
        toml::to_string(&table).context("encoding the config")?
    );
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    mesh_agent::state_files::write_atomic(path, text.as_bytes(), 0o644)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("config written to {}", path.display());
    Ok(true)
}

/// Runs the agent in the foreground, or through its systemd unit.
async fn start(config: AgentConfig, path: &Path, systemd: bool, changed: bool) -> Result<()> {
    if !systemd {
        return run_agent(config).await;
    }
    if !systemctl_available() {
        bail!(
            "the config is written to {}, but systemctl is not available (this host does not \
             run systemd): start the agent yourself with `mesh-agent run --config {}`",
            path.display(),
            path.display()
        );
    }
    if !unit_installed() {
        for p in mesh_agent::install::install(Path::new("/"))? {
            eprintln!("installed {}", p.display());
        }
        systemctl(&["daemon-reload"])?;
    }
    systemctl(&["enable", UNIT])?;
    // A restart is hitless (the dataplane stays pinned), and only a changed config needs it.
    systemctl(&[if changed { "restart" } else { "start" }, UNIT])?;
    eprintln!("{UNIT} is enabled and running (journalctl -u {UNIT} for its log)");
    Ok(())
}

fn systemctl_available() -> bool {
    Command::new("systemctl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        && Path::new("/run/systemd/system").exists()
}

fn systemctl(args: &[&str]) -> Result<()> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .context("running systemctl")?;
    if !out.status.success() {
        bail!(
            "systemctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `mesh-agent leave`: drains this node, waits (bounded) until none of its tasks serves a
/// service any more — the orchestrator moves a drained node's tasks — then tells the agent to
/// announce it leaves and stop, and waits until it has.
pub async fn leave(
    config: Option<PathBuf>,
    socket: Option<PathBuf>,
    timeout: u64,
    force: bool,
) -> Result<()> {
    let socket = match socket {
        Some(s) => s,
        None => {
            let explicit = config.is_some();
            let path = config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
            AgentConfig::load(&path, explicit)?.socket
        }
    };
    let client = Client::new(&socket);
    let me: NodeInfo = client.get("/v1/nodes/self").await?;
    if me.role == mesh_planner::Role::Worker {
        // Availability is the admins' to set: a worker leaves as it is, and its tasks start
        // elsewhere once peers see it left.
        eprintln!(
            "node {} is a worker and cannot drain itself: its tasks stop as it leaves and start \
             on other nodes. For a graceful move, run `meshctl node update --availability drain \
             {}` on an admin first",
            me.name, me.name
        );
    } else {
        let _: NodeInfo = client
            .post(
                "/v1/nodes/self",
                &NodeUpdate {
                    availability: Some(Availability::Drain),
                    ..Default::default()
                },
            )
            .await?;
        eprintln!("node {} drained: its tasks get no new connections", me.name);
    }

    let deadline = Instant::now() + Duration::from_secs(timeout);
    let mut last = String::new();
    loop {
        let tasks: Vec<TaskInfo> = client.get("/v1/tasks").await?;
        let serving: Vec<String> = tasks
            .iter()
            .filter(|t| t.node == me.name)
            .filter_map(|t| t.service.as_ref().map(|s| format!("{} ({s})", t.name)))
            .collect();
        if serving.is_empty() {
            break;
        }
        let progress = format!(
            "waiting for {} task(s) to move to other nodes: {}",
            serving.len(),
            serving.join(", ")
        );
        if progress != last {
            eprintln!("{progress}");
            last = progress;
        }
        if Instant::now() > deadline {
            if force {
                eprintln!("--force: leaving anyway; these tasks stop with the node");
                break;
            }
            bail!(
                "tasks still serve on this node after {timeout}s: {}. Tasks started by hand \
                 (`meshctl run`) are not moved: remove them with `meshctl rm`, or pass --force \
                 to stop them with the node. The node stays drained (`meshctl node update \
                 --availability active self` undoes that)",
                serving.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let _: serde_json::Value = client.post("/v1/local/leave", &()).await?;
    let stopped_by = Instant::now() + Duration::from_secs(30);
    while agent_answers(&socket).await {
        if Instant::now() > stopped_by {
            bail!(
                "peers were told node {} leaves, but its agent has not stopped after 30s: stop \
                 it (systemctl stop {UNIT}, or kill it)",
                me.name
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if systemctl_available() && unit_installed() {
        // Left for good: the unit must not bring the agent back at boot.
        let _ = systemctl(&["disable", UNIT]);
    }
    println!(
        "Node {} left the cluster. To join one again: mesh-agent join --token … (`meshctl \
         join-token` on a member prints it)",
        me.name
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_config_holds_what_differs_from_the_defaults_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("mesh-join-config-{}", std::process::id()));
        let path = dir.join("agent.toml");
        let mut config = AgentConfig {
            advertise: Some(Ipv4Addr::new(192, 0, 2, 2)),
            join: vec!["192.0.2.1".into()],
            ..Default::default()
        };
        config.labels.insert("type".into(), "low-memory".into());
        let key = key_file_for(&mut config, &path);
        assert_eq!(key, dir.join("cluster.key"));
        assert!(write_config(&path, &config).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("gossip_port"),
            "defaults are left out: {text}"
        );
        assert_eq!(AgentConfig::load(&path, true).unwrap(), config);
        assert!(
            !write_config(&path, &config).unwrap(),
            "writing the same config again changes nothing"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn systemd_runs_only_the_units_config() {
        assert!(check_systemd_path(true, Path::new(DEFAULT_CONFIG)).is_ok());
        assert!(check_systemd_path(false, Path::new("/tmp/x.toml")).is_ok());
        let e = check_systemd_path(true, Path::new("/tmp/x.toml")).unwrap_err();
        assert!(e.to_string().contains("leave out --config"), "{e}");
    }
}
