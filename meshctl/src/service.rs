//! `meshctl service …`: Docker's service commands, spelled the same way.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use mesh_planner::ServiceMode;

use super::{
    Format,
    filters::{Filters, SERVICE_KEYS, TASK_KEYS},
    flags::{self, HealthArgs, LimitsArgs, ReserveArgs, RestartArgs, RolloutArgs},
    json, or_dash, print_tasks, progress, table,
};
use mesh_api::{
    Client,
    spec::{
        EndpointMode, Mount, NetworkAttachment, RunOptions, ServiceSpec, TaskResources,
        TaskTemplate, bytes_size, validate_mounts,
    },
    v1::{ServiceCreate, ServiceInfo, ServiceScale, ServiceTaskInfo, ServiceUpdate},
};

#[derive(Subcommand, Debug)]
pub enum ServiceCommand {
    /// Create a service: `meshctl service create --name web --replicas 3 -p 8080:80 IMAGE
    /// [COMMAND] [ARG...]` (podman containers), or `--process -- COMMAND [ARG...]`.
    Create(Box<CreateArgs>),
    /// Change a service's replicas, placement or restart policy; --force replaces every task.
    Update(Box<UpdateArgs>),
    /// Set the replicas of one or more services: `meshctl service scale web=5 api=2`.
    Scale {
        /// SERVICE=REPLICAS, one or more; all are checked before any changes.
        #[arg(required = true)]
        services: Vec<String>,
        /// Return at once instead of waiting for the tasks.
        #[arg(long, short = 'd')]
        detach: bool,
    },
    /// List services.
    #[command(alias = "list")]
    Ls {
        /// Only IDs.
        #[arg(long, short = 'q')]
        quiet: bool,
        /// id=, name= (prefixes), mode=replicated|global|replicated-job|global-job,
        /// label=KEY[=VALUE]; repeat a key
        /// for either value.
        #[arg(long, short = 'f')]
        filter: Vec<String>,
    },
    /// List the tasks of one or more services, with each slot's history.
    Ps {
        #[arg(required = true)]
        names: Vec<String>,
        /// Only task IDs.
        #[arg(long, short = 'q')]
        quiet: bool,
        /// id=, name= (prefixes), node=, desired-state=running|shutdown|accepted.
        #[arg(long, short = 'f')]
        filter: Vec<String>,
        /// Do not shorten errors.
        #[arg(long = "no-trunc")]
        no_trunc: bool,
    },
    /// Show one service.
    Inspect {
        name: String,
        /// Human-readable output instead of JSON.
        #[arg(long)]
        pretty: bool,
    },
    /// Remove one or more services (their tasks stop on every node).
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Go back to the service's previous spec, rolled out with its rollback config.
    Rollback {
        name: String,
        /// Return at once instead of following the rollback.
        #[arg(long, short = 'd')]
        detach: bool,
    },
    /// Fetch the logs of a service or task: every task's output, wherever it runs.
    Logs(crate::logs::LogsArgs),
}

/// `service create [OPTIONS] IMAGE [COMMAND] [ARG...]`, as Docker's: flags come before the
/// image, and everything after it is the command (so `redis redis-server --appendonly yes`
/// needs no `--`). `--process` runs COMMAND as a process instead of an image.
#[derive(Args, Debug, Clone)]
pub struct CreateArgs {
    /// Service name (default: one made from the image or program, e.g. nginx-3f2a1c).
    #[arg(long)]
    name: Option<String>,
    /// Run COMMAND as a process in the task's own namespaces (the process driver), not an
    /// image: `--process -- /usr/local/bin/backup --full`.
    #[arg(long)]
    process: bool,
    /// Network the tasks join (default: `ingress`, created on first use): NAME, or
    /// name=NAME,alias=ALIAS[,alias=...] to give the service more names on it.
    #[arg(long)]
    network: Vec<String>,
    /// Publish a port on every node: 8080:80[/udp][,mode=snat] or
    /// published=8080,target=80[,protocol=udp][,mode=ingress|snat|host].
    ///
    /// mode=ingress (the default): the tasks see the client's own address and port, through
    /// whichever node it connected to; replies go back through that node. mode=snat: they see
    /// the connecting node's address on the service's network (Swarm's routing mesh).
    /// mode=host: only nodes running a task answer, each with its own tasks (client address
    /// kept); the others refuse the connection.
    #[arg(long, short = 'p')]
    publish: Vec<String>,
    /// vip (one virtual IP, balanced) or dnsrr (the name resolves to the tasks).
    #[arg(long = "endpoint-mode", default_value = "vip", value_parser = |s: &str| s.parse::<EndpointMode>())]
    endpoint_mode: EndpointMode,
    /// replicated (default), global (one task on every eligible node), replicated-job (run
    /// --replicas tasks to completion) or global-job (run one task to completion on every
    /// eligible node).
    #[arg(long)]
    mode: Option<String>,
    /// Number of tasks (replicated mode; default 1), or of completions (replicated-job).
    #[arg(long, allow_negative_numbers = true)]
    replicas: Option<i64>,
    /// Number of job tasks to run concurrently (replicated-job; default equal to --replicas).
    #[arg(long = "max-concurrent", allow_negative_numbers = true)]
    max_concurrent: Option<i64>,
    /// Placement constraint, e.g. node.labels.env==production; repeat for more (all must hold).
    #[arg(long)]
    constraint: Vec<String>,
    /// Placement preference: spread=node.labels.<key>.
    #[arg(long = "placement-pref")]
    placement_pref: Vec<String>,
    /// At most this many tasks on one node (0: no limit).
    #[arg(long = "replicas-max-per-node", allow_negative_numbers = true)]
    replicas_max_per_node: Option<i64>,
    #[command(flatten)]
    restart: RestartArgs,
    #[command(flatten)]
    health: HealthArgs,
    #[command(flatten)]
    rollout: RolloutArgs,
    #[command(flatten)]
    reserve: ReserveArgs,
    #[command(flatten)]
    limits: LimitsArgs,
    /// Time between SIGTERM and SIGKILL when a task is stopped (default 10s).
    #[arg(long = "stop-grace-period", allow_hyphen_values = true)]
    stop_grace_period: Option<String>,
    /// Environment variable for the tasks (KEY=VALUE).
    #[arg(long, short = 'e')]
    env: Vec<String>,
    /// Read environment variables from a file (KEY=VALUE lines; --env wins).
    #[arg(long = "env-file")]
    env_file: Vec<String>,
    /// Replace the image's ENTRYPOINT (image tasks).
    #[arg(long)]
    entrypoint: Option<String>,
    /// The user the tasks run as: name, uid or uid:gid (process tasks: default nobody).
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// The working directory of the task's program.
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// The signal that stops a task (default SIGTERM, or the image's STOPSIGNAL).
    #[arg(long = "stop-signal")]
    stop_signal: Option<String>,
    /// A label on each task's container (key=value; image tasks).
    #[arg(long = "container-label")]
    container_label: Vec<String>,
    #[command(flatten)]
    security: flags::SecurityArgs,
    /// The tasks' hostname (default: the task name, e.g. web.1); Swarm's templates expand on
    /// the node, e.g. "{{.Service.Name}}-{{.Task.Slot}}" or "{{.Node.Hostname}}".
    #[arg(long)]
    hostname: Option<String>,
    #[command(flatten)]
    names: NamesArgs,
    /// Deprecated: the image is the first argument.
    #[arg(long, hide = true)]
    image: Option<String>,
    /// Give the tasks a secret at /run/secrets/TARGET: NAME or
    /// source=NAME[,target=T][,uid=U][,gid=G][,mode=0400].
    #[arg(long)]
    secret: Vec<String>,
    /// Give the tasks a config file: NAME or source=NAME[,target=/PATH][,uid=…][,gid=…][,mode=…].
    #[arg(long)]
    config: Vec<String>,
    /// Attach a filesystem mount to the service (Docker's syntax):
    /// type=volume|bind|tmpfs,source=…,target=/PATH[,readonly][,volume-label=k=v][,tmpfs-size=…].
    #[arg(long)]
    mount: Vec<String>,
    /// A service label (key=value).
    #[arg(long, short = 'l')]
    label: Vec<String>,
    /// Return at once instead of waiting for the tasks.
    #[arg(long, short = 'd')]
    detach: bool,
    /// IMAGE [COMMAND] [ARG...]: an OCI image (local or pullable by podman) the tasks run
    /// on nodes with podman, and the command that replaces its CMD; with --process, the
    /// COMMAND [ARG...] each task runs.
    #[arg(
        value_name = "IMAGE",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    words: Vec<String>,
    /// The command the tasks run: what follows the image, or (with --process) the words.
    #[arg(skip)]
    command: Vec<String>,
    /// Do not look the image up on this node or its registry first (each node pulls it).
    #[arg(long = "no-resolve-image")]
    no_resolve_image: bool,
    /// Send registry authentication details to swarm agents (your podman or docker login
    /// for the image's registry, sealed; nodes use it only to pull the image).
    #[arg(long = "with-registry-auth")]
    with_registry_auth: bool,
}

/// `--host`, `--dns*` and `--log-*` of `service create`.
#[derive(Args, Debug, Clone, Default)]
pub struct NamesArgs {
    /// Set one or more custom host-to-IP mappings (host:ip), added to the tasks' /etc/hosts.
    #[arg(long = "host")]
    host: Vec<String>,
    /// Set custom DNS servers: the tasks' resolver (127.0.0.11, which still answers service
    /// names) forwards other names to them.
    #[arg(long)]
    dns: Vec<String>,
    /// Set custom DNS search domains.
    #[arg(long = "dns-search")]
    dns_search: Vec<String>,
    /// Set DNS options (ndots:2, timeout:1, ...).
    #[arg(long = "dns-option")]
    dns_option: Vec<String>,
    /// Logging driver for service: json-file or local (the node keeps the logs; `service
    /// logs` reads them).
    #[arg(long = "log-driver")]
    log_driver: Option<String>,
    /// Logging driver options: max-size=10m, max-file=3 (at most what the node's agent.toml
    /// allows).
    #[arg(long = "log-opt")]
    log_opt: Vec<String>,
}

impl NamesArgs {
    fn is_set(&self) -> bool {
        !self.host.is_empty()
            || !self.dns.is_empty()
            || !self.dns_search.is_empty()
            || !self.dns_option.is_empty()
            || self.log_driver.is_some()
            || !self.log_opt.is_empty()
    }
}

/// `service create`'s arguments alone, to read the old `NAME [OPTIONS] -- COMMAND` form.
#[derive(clap::Parser, Debug)]
#[command(no_binary_name = true)]
struct OldCreate {
    #[command(flatten)]
    args: CreateArgs,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    name: String,
    #[arg(long, allow_negative_numbers = true)]
    replicas: Option<i64>,
    #[arg(long = "constraint-add")]
    constraint_add: Vec<String>,
    #[arg(long = "constraint-rm")]
    constraint_rm: Vec<String>,
    #[arg(long = "placement-pref-add")]
    placement_pref_add: Vec<String>,
    #[arg(long = "placement-pref-rm")]
    placement_pref_rm: Vec<String>,
    #[arg(long = "replicas-max-per-node", allow_negative_numbers = true)]
    replicas_max_per_node: Option<i64>,
    /// Publish another port (the --publish syntax); the tasks keep running.
    #[arg(long = "publish-add")]
    publish_add: Vec<String>,
    /// Stop publishing a port: PUBLISHED[/PROTOCOL] (tcp if left out). New connections are
    /// refused at once; established ones finish.
    #[arg(long = "publish-rm")]
    publish_rm: Vec<String>,
    /// Join a network: NAME or name=NAME,alias=ALIAS[,alias=...] (to change the aliases
    /// on a network, remove it with --network-rm and add it back).
    #[arg(long = "network-add")]
    network_add: Vec<String>,
    /// Leave a network, by name.
    #[arg(long = "network-rm")]
    network_rm: Vec<String>,
    #[command(flatten)]
    restart: RestartArgs,
    /// The tasks' arguments after the program, shell-quoted (replaces the old ones).
    #[arg(long, allow_hyphen_values = true)]
    args: Option<String>,
    /// The image the tasks run (a rolling update, like every template change).
    #[arg(long)]
    image: Option<String>,
    /// Do not look the new image up on this node or its registry first.
    #[arg(long = "no-resolve-image")]
    no_resolve_image: bool,
    /// Send registry authentication details to swarm agents (your podman or docker login
    /// for the image's registry, sealed; nodes use it only to pull the image).
    #[arg(long = "with-registry-auth")]
    with_registry_auth: bool,
    /// Replace the image's ENTRYPOINT ("" puts the image's back).
    #[arg(long, allow_hyphen_values = true)]
    entrypoint: Option<String>,
    /// The user the tasks run as ("" for the default).
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// The working directory of the task's program ("" for the default).
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// The signal that stops a task ("" for the default).
    #[arg(long = "stop-signal")]
    stop_signal: Option<String>,
    /// The tasks' hostname, templates allowed ("" for the default, the task name).
    #[arg(long)]
    hostname: Option<String>,
    /// Add a custom host-to-IP mapping ("host:ip").
    #[arg(long = "host-add")]
    host_add: Vec<String>,
    /// Remove a custom host-to-IP mapping ("host:ip", or "host" for all of its addresses).
    #[arg(long = "host-rm")]
    host_rm: Vec<String>,
    /// Add or update a custom DNS server.
    #[arg(long = "dns-add")]
    dns_add: Vec<String>,
    /// Remove a custom DNS server.
    #[arg(long = "dns-rm")]
    dns_rm: Vec<String>,
    /// Add or update a custom DNS search domain.
    #[arg(long = "dns-search-add")]
    dns_search_add: Vec<String>,
    /// Remove a DNS search domain.
    #[arg(long = "dns-search-rm")]
    dns_search_rm: Vec<String>,
    /// Add or update a DNS option.
    #[arg(long = "dns-option-add")]
    dns_option_add: Vec<String>,
    /// Remove a DNS option.
    #[arg(long = "dns-option-rm")]
    dns_option_rm: Vec<String>,
    /// Logging driver for service (json-file or local); replaces the log settings.
    #[arg(long = "log-driver")]
    log_driver: Option<String>,
    /// Logging driver options (max-size=10m, max-file=3); replaces the log settings.
    #[arg(long = "log-opt")]
    log_opt: Vec<String>,
    /// Add a Linux capability (NET_BIND_SERVICE, ALL, ...).
    #[arg(long = "cap-add")]
    cap_add: Vec<String>,
    /// Drop a Linux capability.
    #[arg(long = "cap-drop")]
    cap_drop: Vec<String>,
    /// Add or change a container label (key=value).
    #[arg(long = "container-label-add")]
    container_label_add: Vec<String>,
    /// Remove a container label (key).
    #[arg(long = "container-label-rm")]
    container_label_rm: Vec<String>,
    /// Add or change a service label (key=value); the tasks keep running.
    #[arg(long = "label-add")]
    label_add: Vec<String>,
    /// Remove a service label (key).
    #[arg(long = "label-rm")]
    label_rm: Vec<String>,
    /// Add or change an environment variable (KEY=VALUE).
    #[arg(long = "env-add")]
    env_add: Vec<String>,
    /// Remove an environment variable (KEY).
    #[arg(long = "env-rm")]
    env_rm: Vec<String>,
    #[command(flatten)]
    health: HealthArgs,
    #[command(flatten)]
    rollout: RolloutArgs,
    #[command(flatten)]
    reserve: ReserveArgs,
    #[command(flatten)]
    limits: LimitsArgs,
    #[arg(long = "stop-grace-period", allow_hyphen_values = true)]
    stop_grace_period: Option<String>,
    /// Replace every task even if nothing changed (re-spreads them over the nodes).
    #[arg(long)]
    force: bool,
    /// Go back to the previous spec (as `service rollback`).
    #[arg(long)]
    rollback: bool,
    /// Add or update a mount on a service (the --mount syntax); rolls the tasks.
    #[arg(long = "mount-add")]
    mount_add: Vec<String>,
    /// Remove a mount by its target path; rolls the tasks.
    #[arg(long = "mount-rm")]
    mount_rm: Vec<String>,
    /// Grant a secret (the --secret syntax); rolls the tasks.
    #[arg(long = "secret-add")]
    secret_add: Vec<String>,
    /// Revoke a secret, by name; rolls the tasks.
    #[arg(long = "secret-rm")]
    secret_rm: Vec<String>,
    /// Grant a config (the --config syntax); rolls the tasks.
    #[arg(long = "config-add")]
    config_add: Vec<String>,
    /// Revoke a config, by name; rolls the tasks.
    #[arg(long = "config-rm")]
    config_rm: Vec<String>,
    /// Return at once instead of waiting for the tasks.
    #[arg(long, short = 'd')]
    detach: bool,
}

pub async fn run(client: &Client, fmt: Format, cmd: ServiceCommand) -> Result<()> {
    match cmd {
        ServiceCommand::Create(args) => create(client, fmt, &args).await,
        ServiceCommand::Update(args) => {
            let mut req = update_request(&args)?;
            if args.with_registry_auth {
                let image = match &args.image {
                    Some(image) => Some(image.clone()),
                    None => {
                        let s: ServiceInfo =
                            client.get(&format!("/v1/services/{}", args.name)).await?;
                        s.spec.task.and_then(|t| t.image)
                    }
                };
                let Some(image) = image else {
                    bail!(
                        "--with-registry-auth: service {} runs no image (a process service \
                         pulls nothing)",
                        args.name
                    );
                };
                req.registry_auth = crate::registry_auth::for_image(&image)?;
            }
            if req == ServiceUpdate::default() {
                bail!(
                    "nothing to update: pass --replicas, --image, --args, --env-add/-rm, \
                     --constraint-add/-rm, --placement-pref-add/-rm, --publish-add/-rm, \
                     --secret-add/-rm, --config-add/-rm, --mount-add/-rm, --cap-add/-drop, --health-*, --update-*, \
                     --restart-*, --reserve-cpu/-memory, --hostname, --host-add/-rm, \
                     --dns*-add/-rm, --log-driver/--log-opt, --force or --rollback"
                );
            }
            update(client, fmt, &args.name, &req, args.detach).await
        }
        ServiceCommand::Scale { services, detach } => scale(client, fmt, &services, detach).await,
        ServiceCommand::Ls { quiet, filter } => ls(client, fmt, quiet, &filter).await,
        ServiceCommand::Ps {
            names,
            quiet,
            filter,
            no_trunc,
        } => ps(client, fmt, &names, quiet, &filter, no_trunc).await,
        ServiceCommand::Inspect { name, pretty } => {
            let s: ServiceInfo = client.get(&format!("/v1/services/{name}")).await?;
            if !pretty || fmt == Format::Json {
                return json(&s);
            }
            print_inspect(&s);
            Ok(())
        }
        ServiceCommand::Rm { names } => rm(client, &names).await,
        ServiceCommand::Rollback { name, detach } => {
            let req = ServiceUpdate {
                rollback: true,
                ..Default::default()
            };
            update(client, fmt, &name, &req, detach).await
        }
        ServiceCommand::Logs(a) => crate::logs::run(client, &a).await,
    }
}

async fn create(client: &Client, fmt: Format, a: &CreateArgs) -> Result<()> {
    let raw: Vec<String> = std::env::args()
        .skip_while(|w| w != "create")
        .skip(1)
        .collect();
    let a = &in_docker_order(a.clone(), &raw)?;
    let spec = create_spec(a)?;
    let registry_auth = match (
        a.with_registry_auth,
        spec.task.as_ref().and_then(|t| t.image.as_deref()),
    ) {
        (true, Some(image)) => crate::registry_auth::for_image(image)?,
        _ => None,
    };
    let req = ServiceCreate {
        spec,
        no_resolve_image: a.no_resolve_image,
        registry_auth,
    };
    let s: ServiceInfo = client.post("/v1/services", &req).await?;
    if fmt == Format::Json {
        return json(&s);
    }
    println!("{}", s.id);
    if !a.detach {
        converge(client, &s.name).await?;
    }
    Ok(())
}

/// `service scale web=5 api=2`: all or nothing.
async fn scale(client: &Client, fmt: Format, services: &[String], detach: bool) -> Result<()> {
    let mut req = ServiceScale::default();
    for s in services {
        let parsed = s
            .split_once('=')
            .and_then(|(n, r)| Some((n, r.trim().parse::<i64>().ok()?)))
            .filter(|(n, _)| !n.is_empty());
        let Some((name, n)) = parsed else {
            bail!("invalid scale {s:?}: expected SERVICE=REPLICAS, e.g. web=5");
        };
        let n = flags::replicas(&format!("replicas of {name}"), n).map_err(anyhow::Error::msg)?;
        if req.replicas.insert(name.to_owned(), n).is_some() {
            bail!("service {name} is named twice");
        }
    }
    let done: Vec<ServiceInfo> = client.post("/v1/scale", &req).await?;
    if fmt == Format::Json {
        return json(&done);
    }
    for s in &done {
        match s.mode {
            ServiceMode::Replicated { replicas: n }
            | ServiceMode::ReplicatedJob { completions: n, .. } => {
                println!("{} scaled to {n}", s.name)
            }
            ServiceMode::Global | ServiceMode::GlobalJob => {}
        }
    }
    if !detach {
        for s in &done {
            converge(client, &s.name).await?;
        }
    }
    Ok(())
}

async fn ls(client: &Client, fmt: Format, quiet: bool, filter: &[String]) -> Result<()> {
    let filters = Filters::parse(filter, SERVICE_KEYS)?;
    let svcs: Vec<ServiceInfo> = client.get("/v1/services").await?;
    let svcs: Vec<ServiceInfo> = svcs.into_iter().filter(|s| filters.service(s)).collect();
    if fmt == Format::Json {
        return json(&svcs);
    }
    if quiet {
        for s in &svcs {
            println!("{}", s.id);
        }
        return Ok(());
    }
    let rows = svcs.iter().map(|s| {
        [
            s.id.clone(),
            s.name.clone(),
            s.mode.display().into(),
            replicas(s),
            image(s),
            s.ports
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        ]
    });
    println!(
        "{}",
        table(&["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS"], rows)
    );
    Ok(())
}

/// `service ps a b`: each service's tasks, filtered; an unknown service fails the command
/// after the others are shown, as Docker's does.
async fn ps(
    client: &Client,
    fmt: Format,
    names: &[String],
    quiet: bool,
    filter: &[String],
    no_trunc: bool,
) -> Result<()> {
    let filters = Filters::parse(filter, TASK_KEYS)?;
    let mut shown = Vec::new();
    let mut missing = Vec::new();
    for name in names {
        let s: ServiceInfo = match client.get(&format!("/v1/services/{name}")).await {
            Ok(s) => s,
            Err(e) => {
                missing.push(format!("{e:#}"));
                continue;
            }
        };
        let rows: Vec<ServiceTaskInfo> = client.get(&format!("/v1/services/{name}/tasks")).await?;
        let rows: Vec<ServiceTaskInfo> = rows.into_iter().filter(|r| filters.task(r)).collect();
        shown.push((s, rows));
    }
    match fmt {
        Format::Json => json(&shown.iter().flat_map(|(_, r)| r).collect::<Vec<_>>())?,
        _ if quiet => {
            for r in shown
                .iter()
                .flat_map(|(_, r)| r)
                .filter(|r| !r.id.is_empty())
            {
                println!("{}", r.id);
            }
        }
        _ => {
            for (s, rows) in &shown {
                print_ps(s, rows, no_trunc);
            }
        }
    }
    if !missing.is_empty() {
        bail!("{}", missing.join("\n"));
    }
    Ok(())
}

/// `service rm a b c`: each one that exists is removed; the others are reported at the end.
async fn rm(client: &Client, names: &[String]) -> Result<()> {
    let mut failed = Vec::new();
    for name in names {
        match client
            .delete::<serde_json::Value>(&format!("/v1/services/{name}"))
            .await
        {
            Ok(_) => println!("{name}"),
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("\n"));
    }
    Ok(())
}

/// Logs stay on the node that runs the task: this node's, and where the others are.
/// The arguments with the name, image and command resolved from Docker's order (`--name N
/// IMAGE COMMAND…`, or `--process … COMMAND…`); the old `NAME [OPTIONS] [--image IMAGE] --
/// COMMAND` form is still read, with a note saying how to write it now.
fn in_docker_order(mut a: CreateArgs, raw: &[String]) -> Result<CreateArgs> {
    split_at_dashes(&mut a, raw);
    if a.name.is_none()
        && !a.process
        && let Some(old) = old_form(&a, raw)
    {
        eprintln!("{}", deprecation(&old));
        return Ok(old);
    }
    if a.name.is_some() && !a.process && a.image.is_none() && a.words.is_empty() {
        // `--name web -- COMMAND`: the old form's process, named by the flag.
        a.process = true;
        if !a.command.is_empty() {
            eprintln!("{}", deprecation(&a));
        }
    }
    let mut words = std::mem::take(&mut a.words);
    words.append(&mut a.command);
    match (a.process, a.image.take()) {
        (true, Some(_)) => bail!("--process runs a command, not an image: drop --image"),
        (true, None) => a.command = words,
        // The deprecated flag: the words are the container's command.
        (false, Some(image)) => {
            a.image = Some(image);
            a.command = words;
        }
        (false, None) => {
            let Some(image) = (!words.is_empty()).then(|| words.remove(0)) else {
                bail!(
                    "no image: `meshctl service create [OPTIONS] IMAGE [COMMAND] [ARG...]`, or \
                     `--process -- COMMAND [ARG...]` for a process"
                );
            };
            a.image = Some(image);
            a.command = words;
        }
    }
    if a.name.is_none() {
        a.name = Some(generated_name(&a));
    }
    Ok(a)
}

/// Moves what followed a `--` on the command line from the words to the command: the old
/// form needs to know where `--` stood (`web -- srv` names web; `web srv` runs image web).
fn split_at_dashes(a: &mut CreateArgs, raw: &[String]) {
    let Some(k) = raw.iter().position(|w| w == "--") else {
        return;
    };
    let after = &raw[k + 1..];
    if !a.words.ends_with(after) {
        return;
    }
    a.words.truncate(a.words.len() - after.len());
    if a.words.last().is_some_and(|w| w == "--") {
        a.words.pop();
    }
    a.command = after.to_vec();
}

/// `NAME [OPTIONS] -- COMMAND` or `NAME [OPTIONS] --image IMAGE`, as meshctl used to take
/// them: the first word is the name when what follows reads as this command's options (or
/// only `-- COMMAND` follows). `raw` is what followed `create` on the command line, so
/// options after the name are read as options again. Anything else is Docker's order.
fn old_form(a: &CreateArgs, raw: &[String]) -> Option<CreateArgs> {
    let (first, rest) = a.words.split_first()?;
    if first.starts_with('-') {
        return None;
    }
    let options_follow = rest.first().is_some_and(|w| w.starts_with('-'));
    let only_command = rest.is_empty() && (!a.command.is_empty() || a.image.is_some());
    if !(options_follow || only_command) {
        return None;
    }
    // The name is the first of the words, which run up to `--` (or the end).
    let dashes = raw.iter().position(|w| w == "--").unwrap_or(raw.len());
    let at = dashes.checked_sub(a.words.len())?;
    if raw.get(at) != Some(first) {
        return None;
    }
    let argv: Vec<&String> = raw[..at].iter().chain(&raw[at + 1..dashes]).collect();
    let mut old = <OldCreate as clap::Parser>::try_parse_from(argv).ok()?.args;
    if old.name.is_some() || old.process || !old.words.is_empty() {
        return None;
    }
    old.command = a.command.clone();
    old.name = Some(first.clone());
    old.process = old.image.is_none();
    Some(old)
}

fn deprecation(old: &CreateArgs) -> String {
    let name = old.name.as_deref().unwrap_or_default();
    match &old.image {
        Some(image) => format!(
            "meshctl: `service create {name} … --image {image}` is deprecated: write \
             `service create --name {name} … {image} [COMMAND]`, as Docker does"
        ),
        None if old.command.is_empty() => format!(
            "meshctl: `service create {name} …` is deprecated: write `service create --name \
             {name} --process …` for a service whose tasks are started by hand"
        ),
        None => format!(
            "meshctl: `service create {name} … -- COMMAND` is deprecated: write `service \
             create --name {name} --process … -- COMMAND`"
        ),
    }
}

/// A name for a service created without `--name`: the image's (or program's) base name and
/// a random suffix, so two creates of one image do not collide.
fn generated_name(a: &CreateArgs) -> String {
    let source = a
        .image
        .as_deref()
        .or(a.command.first().map(String::as_str))
        .unwrap_or("service");
    let base = source.rsplit('/').next().unwrap_or(source);
    let base = base.split(['@', ':']).next().unwrap_or(base);
    let mut clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    clean = clean.trim_matches('-').chars().take(40).collect();
    if clean.is_empty() {
        clean = "service".into();
    }
    let mut b = [0u8; 3];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut b)
    });
    format!("{clean}-{:02x}{:02x}{:02x}", b[0], b[1], b[2])
}

/// `--network`s in the spec, the first first: none leaves the agent's default.
fn set_networks(spec: &mut ServiceSpec, networks: Vec<NetworkAttachment>) {
    let mut networks = networks.into_iter();
    if let Some(first) = networks.next() {
        spec.network = first.target;
        spec.aliases = first.aliases;
    }
    // The others: eth1, eth2, …
    spec.networks = networks.collect();
}

/// `service create`'s flags as the spec the agent is asked for.
fn create_spec(a: &CreateArgs) -> Result<ServiceSpec> {
    let Some(name) = a.name.clone() else {
        bail!("no service name: pass --name NAME");
    };
    let msg = anyhow::Error::msg;
    let ports = flags::ports("--publish", &a.publish).map_err(msg)?;
    let task = task_template(a, &name)?;
    let mut spec = ServiceSpec {
        name,
        labels: flags::labels("--label", &a.label).map_err(msg)?,
        endpoint_mode: a.endpoint_mode,
        mode: mode(a, task.is_some())?,
        task,
        ..Default::default()
    };
    if spec.mode.is_job() && a.rollout.is_set() {
        // Docker's words: a job's tasks are not rolled, an update runs the job again.
        bail!("update and rollback configuration is not supported for jobs");
    }
    set_networks(
        &mut spec,
        flags::networks("--network", &a.network).map_err(msg)?,
    );
    spec.placement.constraints = flags::constraints("--constraint", &a.constraint).map_err(msg)?;
    spec.placement.preferences =
        flags::preferences("--placement-pref", &a.placement_pref).map_err(msg)?;
    spec.placement.max_replicas_per_node = a
        .replicas_max_per_node
        .map(|n| flags::per_node("--replicas-max-per-node", n))
        .transpose()
        .map_err(msg)?
        .filter(|n| *n > 0);
    spec.restart = a.restart.change().map_err(msg)?.apply(spec.restart);
    let (update, rollback) = a.rollout.changes().map_err(msg)?;
    spec.update = update.apply(spec.update);
    spec.rollback = rollback.apply(spec.rollback);
    if let Some(t) = spec.task.as_mut() {
        let health = a.health.change().map_err(msg)?;
        if health.probe.is_none() && !health.disable && !health.is_empty() {
            bail!(
                "--health-interval/-timeout/-retries/-start-period need a probe: pass \
                 --health-cmd, --health-http or --health-tcp"
            );
        }
        t.health = health
            .apply(None, &ports)
            .map_err(|e| anyhow::anyhow!("--health-http: {e}"))?;
    }
    spec.ports = ports;
    Ok(spec)
}

/// What the tasks run: a command, an image, or nothing (tasks started by hand).
fn task_template(a: &CreateArgs, name: &str) -> Result<Option<TaskTemplate>> {
    let msg = anyhow::Error::msg;
    if a.command.is_empty() && a.image.is_none() {
        if a.replicas.is_some() || a.mode.is_some() {
            bail!(
                "no command for the tasks to run: give an image, or --process and the command \
                 after `--`, e.g. meshctl service create --name {name} --process --replicas 3 \
                 -- /usr/bin/python3 -m http.server 80"
            );
        }
        if !a.secret.is_empty() || !a.config.is_empty() || !a.mount.is_empty() {
            bail!(
                "--secret, --config and --mount are for scheduled tasks: give an image or a command"
            );
        }
        if !a.limits.is_empty() {
            bail!("--limit-cpu/-memory/-pids are for scheduled tasks: give an image or a command");
        }
        if a.names.is_set() || a.hostname.is_some() {
            bail!(
                "--hostname, --host, --dns* and --log-* are for scheduled tasks: give an image or \
                 a command"
            );
        }
        let health = a.health.change().map_err(msg)?;
        if !health.is_empty() || a.stop_grace_period.is_some() {
            bail!(
                "health checks and --stop-grace-period are for scheduled tasks: give an image or \
                 a command"
            );
        }
        return Ok(None);
    }
    let template = TaskTemplate {
        command: a.command.clone(),
        env: task_env(a)?,
        hostname: a.hostname.clone(),
        health: None,
        stop_grace_ms: match &a.stop_grace_period {
            Some(g) => flags::duration_ms("--stop-grace-period", g).map_err(msg)?,
            None => TaskTemplate::default().stop_grace_ms,
        },
        image: a.image.clone(),
        secrets: flags::file_refs("--secret", &a.secret, false).map_err(msg)?,
        configs: flags::file_refs("--config", &a.config, true).map_err(msg)?,
        run: RunOptions {
            entrypoint: a.entrypoint.as_deref().map(entrypoint).transpose()?,
            user: a.user.clone(),
            workdir: a.workdir.clone(),
            stop_signal: a.stop_signal.clone(),
            container_labels: flags::labels("--container-label", &a.container_label)
                .map_err(msg)?,
            hosts: flags::hosts("--host", &a.names.host).map_err(msg)?,
            dns: flags::dns(&a.names.dns, &a.names.dns_search, &a.names.dns_option).map_err(msg)?,
            log: flags::log(a.names.log_driver.as_deref(), &a.names.log_opt)
                .map_err(msg)?
                .unwrap_or_default(),
        },
        resources: task_resources(a)?,
        security: a.security.security().map_err(msg)?,
        mounts: mounts("--mount", &a.mount)?,
    };
    // A template that names no field fails here, before anything is sent (the agent checks
    // again, for every other way a spec arrives).
    template
        .check_templates(&flags::labels("--label", &a.label).map_err(msg)?)
        .map_err(msg)?;
    Ok(Some(template))
}

/// `--mount` values, each parsed as Docker parses it; no two on one target.
fn mounts(flag: &str, values: &[String]) -> Result<Vec<Mount>> {
    let mounts = values
        .iter()
        .map(|v| {
            Mount::parse(v)
                .map_err(|e| anyhow::anyhow!("invalid argument {v:?} for \"{flag}\" flag: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    validate_mounts(&mounts).map_err(anyhow::Error::msg)?;
    Ok(mounts)
}

/// `--limit-*` (and the reservations, when given) as the template's resources.
fn task_resources(a: &CreateArgs) -> Result<TaskResources> {
    let resources = TaskResources {
        reservations: a.reserve.reservations().map_err(anyhow::Error::msg)?,
        limits: a.limits.limits().map_err(anyhow::Error::msg)?,
    };
    flags::within_reservations(&resources).map_err(anyhow::Error::msg)?;
    Ok(resources)
}

/// `--env-file`s in order, then `--env`, a later value of a key replacing an earlier one.
fn task_env(a: &CreateArgs) -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = Vec::new();
    for path in &a.env_file {
        let text =
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--env-file {path}: {e}"))?;
        let vars =
            flags::env_file(path, &text, |k| std::env::var(k).ok()).map_err(anyhow::Error::msg)?;
        env.extend(vars);
    }
    env.extend(flags::env("--env", &a.env).map_err(anyhow::Error::msg)?);
    let mut seen = std::collections::BTreeSet::new();
    let mut kept: Vec<(String, String)> = env
        .into_iter()
        .rev()
        .filter(|(k, _)| seen.insert(k.clone()))
        .collect();
    kept.reverse();
    Ok(kept)
}

/// `--entrypoint "cmd args"`, split as a shell would (Docker's reading of it).
fn entrypoint(s: &str) -> Result<Vec<String>> {
    shlex::split(s).ok_or_else(|| anyhow::anyhow!("--entrypoint {s:?} has an unclosed quote"))
}

/// `--mode` with `--replicas`, `--max-concurrent` and `--replicas-max-per-node`, refused in
/// Docker's words where they do not go together.
fn mode(a: &CreateArgs, has_task: bool) -> Result<ServiceMode> {
    let replicas = |flag: &str, n: Option<i64>| {
        n.map(|n| flags::replicas(flag, n).map_err(anyhow::Error::msg))
            .transpose()
    };
    let mode = a.mode.as_deref().unwrap_or("replicated");
    let global = matches!(mode, "global" | "global-job");
    if a.max_concurrent.is_some() && mode != "replicated-job" {
        bail!("max-concurrent can only be used with replicated-job mode");
    }
    if mode == "global-job" && a.replicas_max_per_node.is_some_and(|n| n > 0) {
        bail!("replicas-max-per-node can only be used with replicated or replicated-job mode");
    }
    if global && a.replicas.is_some() {
        bail!(
            "replicas can only be used with replicated or replicated-job mode: a {mode} service \
             runs one task on every eligible node (limit them with --constraint)"
        );
    }
    match mode {
        "replicated" => Ok(ServiceMode::Replicated {
            replicas: match replicas("--replicas", a.replicas)? {
                Some(n) => n,
                None if has_task => 1,
                None => 0,
            },
        }),
        "global" => Ok(ServiceMode::Global),
        "replicated-job" => {
            // Docker's defaults: max-concurrent is --replicas, and either alone sets both
            // (the daemon's TotalCompletions defaults to MaxConcurrent, which defaults to 1).
            let completions = replicas("--replicas", a.replicas)?;
            let concurrent = replicas("--max-concurrent", a.max_concurrent)?;
            let max_concurrent = concurrent.or(completions).unwrap_or(1);
            if max_concurrent == 0 {
                bail!("--max-concurrent 0 would never run a task of the job: use 1 or more");
            }
            Ok(ServiceMode::ReplicatedJob {
                completions: completions.unwrap_or(max_concurrent),
                max_concurrent,
            })
        }
        "global-job" => Ok(ServiceMode::GlobalJob),
        other => {
            bail!("unknown --mode {other:?}: use replicated, global, replicated-job or global-job")
        }
    }
}

/// Extra hosts, DNS settings (inside `ContainerSpec:`) and `Log Driver:`, as `docker service
/// inspect --pretty` lays its blocks out; nothing for what is not set.
fn names_pretty(run: &RunOptions) -> Vec<String> {
    let mut lines = Vec::new();
    if !run.hosts.is_empty() {
        lines.push(" Hosts:".to_owned());
        lines.extend(run.hosts.iter().map(|h| format!("  {} {}", h.ip, h.host)));
    }
    let dns = &run.dns;
    if !dns.is_empty() {
        lines.push(" DNS Config:".to_owned());
        if !dns.nameservers.is_empty() {
            let n: Vec<String> = dns.nameservers.iter().map(ToString::to_string).collect();
            lines.push(format!("  Nameservers:\t{}", n.join(" ")));
        }
        if !dns.search.is_empty() {
            lines.push(format!("  Search:\t{}", dns.search.join(" ")));
        }
        if !dns.options.is_empty() {
            lines.push(format!("  Options:\t{}", dns.options.join(" ")));
        }
    }
    if !run.log.is_empty() {
        lines.push("Log Driver:".to_owned());
        if !run.log.name.is_empty() {
            lines.push(format!(" Name:\t\t{}", run.log.name));
        }
        let opts = run.log.options();
        if !opts.is_empty() {
            lines.push(" LogOpts:".to_owned());
            lines.extend(opts.iter().map(|(k, v)| format!("  {k}:\t\t{v}")));
        }
    }
    lines
}

/// `Resources:` as `docker service inspect --pretty` prints it (nothing when none is set).
fn resources_pretty(r: &TaskResources) -> Vec<String> {
    let cpus = |nano: u64| (nano as f64 / 1e9).to_string();
    let mut lines = Vec::new();
    let res = &r.reservations;
    if res.nano_cpus > 0 || res.memory_bytes > 0 {
        lines.push(" Reservations:".to_owned());
        if res.nano_cpus > 0 {
            lines.push(format!("  CPU:\t\t{}", cpus(res.nano_cpus)));
        }
        if res.memory_bytes > 0 {
            lines.push(format!("  Memory:\t{}", bytes_size(res.memory_bytes)));
        }
    }
    let l = &r.limits;
    if l.nano_cpus > 0 || l.memory_bytes > 0 || l.pids > 0 {
        lines.push(" Limits:".to_owned());
        if l.nano_cpus > 0 {
            lines.push(format!("  CPU:\t\t{}", cpus(l.nano_cpus)));
        }
        if l.memory_bytes > 0 {
            lines.push(format!("  Memory:\t{}", bytes_size(l.memory_bytes)));
        }
        if l.pids > 0 {
            lines.push(format!("  PIDs:\t\t{}", l.pids));
        }
    }
    if !lines.is_empty() {
        lines.insert(0, "Resources:".to_owned());
    }
    lines
}

/// `service update`'s flags as the change the agent is asked for.
fn update_request(a: &UpdateArgs) -> Result<ServiceUpdate> {
    let msg = anyhow::Error::msg;
    let (update_config, rollback_config) = a.rollout.changes().map_err(msg)?;
    Ok(ServiceUpdate {
        no_resolve_image: a.no_resolve_image,
        // Read from the caller's login files by the command (it may need the current image).
        registry_auth: None,
        replicas: a
            .replicas
            .map(|n| flags::replicas("--replicas", n))
            .transpose()
            .map_err(msg)?,
        constraint_add: flags::constraints("--constraint-add", &a.constraint_add).map_err(msg)?,
        constraint_rm: flags::constraints("--constraint-rm", &a.constraint_rm).map_err(msg)?,
        placement_pref_add: flags::preferences("--placement-pref-add", &a.placement_pref_add)
            .map_err(msg)?,
        placement_pref_rm: flags::preferences("--placement-pref-rm", &a.placement_pref_rm)
            .map_err(msg)?,
        replicas_max_per_node: a
            .replicas_max_per_node
            .map(|n| flags::per_node("--replicas-max-per-node", n))
            .transpose()
            .map_err(msg)?,
        publish_add: flags::ports("--publish-add", &a.publish_add).map_err(msg)?,
        publish_rm: a
            .publish_rm
            .iter()
            .map(|p| flags::published_port("--publish-rm", p))
            .collect::<Result<_, _>>()
            .map_err(msg)?,
        network_add: flags::networks("--network-add", &a.network_add).map_err(msg)?,
        network_rm: a.network_rm.clone(),
        restart: a.restart.change().map_err(msg)?,
        args: a
            .args
            .as_deref()
            .map(|s| {
                shlex::split(s).ok_or_else(|| anyhow::anyhow!("--args {s:?} has an unclosed quote"))
            })
            .transpose()?,
        image: match a.image.as_deref() {
            Some("") => bail!("--image is empty: name the image, e.g. --image nginx:1.11"),
            i => i.map(str::to_owned),
        },
        entrypoint: a.entrypoint.as_deref().map(entrypoint).transpose()?,
        user: a.user.clone(),
        workdir: a.workdir.clone(),
        stop_signal: a.stop_signal.clone(),
        cap_add: flags::capabilities("--cap-add", &a.cap_add).map_err(msg)?,
        cap_drop: flags::capabilities("--cap-drop", &a.cap_drop).map_err(msg)?,
        container_label_add: flags::labels("--container-label-add", &a.container_label_add)
            .map_err(msg)?
            .into_iter()
            .collect(),
        container_label_rm: a.container_label_rm.clone(),
        label_add: flags::labels("--label-add", &a.label_add)
            .map_err(msg)?
            .into_iter()
            .collect(),
        label_rm: a.label_rm.clone(),
        env_add: flags::env("--env-add", &a.env_add).map_err(msg)?,
        env_rm: a.env_rm.clone(),
        health: a.health.change().map_err(msg)?,
        update_config,
        rollback_config,
        stop_grace_ms: a
            .stop_grace_period
            .as_deref()
            .map(|g| flags::duration_ms("--stop-grace-period", g))
            .transpose()
            .map_err(msg)?,
        reserve_cpu: a.reserve.cpu().map_err(msg)?,
        reserve_memory: a.reserve.memory().map_err(msg)?,
        force: a.force,
        rollback: a.rollback,
        secret_add: flags::file_refs("--secret-add", &a.secret_add, false).map_err(msg)?,
        secret_rm: a.secret_rm.clone(),
        config_add: flags::file_refs("--config-add", &a.config_add, true).map_err(msg)?,
        config_rm: a.config_rm.clone(),
        mount_add: mounts("--mount-add", &a.mount_add)?,
        mount_rm: a.mount_rm.clone(),
        limits: a.limits.change().map_err(msg)?,
        hostname: a.hostname.clone(),
        host_add: flags::hosts("--host-add", &a.host_add).map_err(msg)?,
        host_rm: a.host_rm.iter().map(|h| h.trim().to_owned()).collect(),
        dns_add: flags::nameservers("--dns-add", &a.dns_add).map_err(msg)?,
        dns_rm: flags::nameservers("--dns-rm", &a.dns_rm).map_err(msg)?,
        dns_search_add: flags::search_domains("--dns-search-add", &a.dns_search_add)
            .map_err(msg)?,
        dns_search_rm: a.dns_search_rm.clone(),
        dns_option_add: flags::dns_options("--dns-option-add", &a.dns_option_add).map_err(msg)?,
        dns_option_rm: a.dns_option_rm.clone(),
        log: match (&a.log_driver, a.log_opt.is_empty()) {
            (None, true) => None,
            _ => Some(
                flags::log(a.log_driver.as_deref(), &a.log_opt)
                    .map_err(msg)?
                    .unwrap_or_default(),
            ),
        },
    })
}

/// Sends an update and, unless detached, follows its rollout to the end.
async fn update(
    client: &Client,
    fmt: Format,
    name: &str,
    req: &ServiceUpdate,
    detach: bool,
) -> Result<()> {
    let before: ServiceInfo = client.get(&format!("/v1/services/{name}")).await?;
    if req.replicas.is_some() && before.mode.is_job() {
        // Docker's words; `service scale` sets a replicated job's completions.
        bail!("replicas can only be used with replicated mode");
    }
    let s: ServiceInfo = client.post(&format!("/v1/services/{name}"), req).await?;
    // This command started a rollout (which may have paused or rolled back already).
    let rolling = s.spec.update_status.as_ref().is_some_and(|st| {
        before.spec.update_status.as_ref().map(|b| b.started_ms) != Some(st.started_ms)
    });
    if fmt == Format::Json && (detach || !rolling) {
        return json(&s);
    }
    if fmt != Format::Json {
        println!("{}", s.name);
    }
    if detach {
        return Ok(());
    }
    if rolling {
        progress::follow(client, name, fmt, req.rollback).await
    } else {
        converge(client, name).await
    }
}

/// Copies a streamed answer (logs) to stdout as it arrives.
pub(crate) async fn print_stream(client: &Client, path: &str) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout();
    client
        .stream(path, |chunk| {
            let _ = stdout.write_all(chunk);
            let _ = stdout.flush();
        })
        .await
}

/// `3/3`, `2/3`, or for a service that schedules nothing, its running tasks.
/// A job: Docker's `running/desired (completed/total completed)`.
pub(crate) fn replicas(s: &ServiceInfo) -> String {
    match (s.desired, s.completed) {
        (Some(d), Some(c)) => format!("{}/{d} ({c}/{} completed)", s.running, total(s)),
        (Some(d), None) => format!("{}/{d}", s.running),
        (None, _) => format!("{} (started by hand)", s.running),
    }
}

/// The completions a job's run needs: a replicated job's, or for a global job the nodes
/// that are still to complete plus those that did (Docker's arithmetic).
fn total(s: &ServiceInfo) -> usize {
    match s.mode {
        ServiceMode::ReplicatedJob { completions, .. } => completions as usize,
        _ => s.desired.unwrap_or(0) + s.completed.unwrap_or(0),
    }
}

/// The image, or for the process driver the command that stands in for it.
fn image(s: &ServiceInfo) -> String {
    match &s.spec.task {
        Some(t) => {
            let mut c = t.image.clone().unwrap_or_else(|| t.command.join(" "));
            if c.len() > 40 {
                c.truncate(37);
                c.push_str("...");
            }
            c
        }
        None => "-".into(),
    }
}

fn ago(ms: u64) -> String {
    let now = mesh_api::id::now_ms();
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0 => "less than a second ago".into(),
        1 => "1 second ago".into(),
        s if s < 60 => format!("{s} seconds ago"),
        s if s < 120 => "about a minute ago".into(),
        s if s < 3600 => format!("{} minutes ago", s / 60),
        s => format!("{} hours ago", s / 3600),
    }
}

/// An error as `service ps` shows it: Docker cuts long ones unless `--no-trunc`.
fn shorten(e: &str, no_trunc: bool) -> String {
    const MAX: usize = 60;
    if no_trunc || e.chars().count() <= MAX {
        return e.to_owned();
    }
    let mut s: String = e.chars().take(MAX - 1).collect();
    s.push('…');
    s
}

fn print_ps(s: &ServiceInfo, rows: &[ServiceTaskInfo], no_trunc: bool) {
    let image = image(s);
    let ports = s
        .ports
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "{}",
        table(
            &[
                "ID",
                "NAME",
                "IMAGE",
                "NODE",
                "DESIRED STATE",
                "CURRENT STATE",
                "ERROR",
                "PORTS"
            ],
            rows.iter().map(|r| {
                [
                    r.id.clone(),
                    if r.history {
                        format!(" \\_ {}", r.name)
                    } else {
                        r.name.clone()
                    },
                    // An image task from a template older than the one kept for rollback
                    // has no image on record: say so rather than show today's.
                    r.image.clone().unwrap_or_else(|| {
                        if s.spec.task.as_ref().is_some_and(|t| t.image.is_some()) {
                            "-".into()
                        } else {
                            image.clone()
                        }
                    }),
                    r.node.clone().unwrap_or_default(),
                    r.desired.clone(),
                    if r.since_ms == 0 {
                        r.state.clone()
                    } else {
                        format!("{} {}", r.state, ago(r.since_ms))
                    },
                    r.error
                        .as_deref()
                        .map(|e| format!("\"{}\"", shorten(e, no_trunc)))
                        .unwrap_or_default(),
                    if r.history {
                        String::new()
                    } else {
                        ports.clone()
                    },
                ]
            })
        )
    );
}

/// Docker's `Resources:` block; a part that is zero is left out, and so is the block when
/// nothing is set.
fn print_inspect(s: &ServiceInfo) {
    let spec = &s.spec;
    println!(
        "ID:\t\t{}\nName:\t\t{}\nService Mode:\t{}",
        s.id,
        s.name,
        match spec.mode {
            ServiceMode::Replicated { .. } => "Replicated",
            ServiceMode::Global => "Global",
            ServiceMode::ReplicatedJob { .. } => "ReplicatedJob",
            ServiceMode::GlobalJob => "GlobalJob",
        }
    );
    match spec.mode {
        ServiceMode::Replicated { replicas } => println!(" Replicas:\t{replicas}"),
        ServiceMode::ReplicatedJob {
            completions,
            max_concurrent,
        } => println!(" Max Concurrent:\t{max_concurrent}\n Total Completions:\t{completions}"),
        ServiceMode::Global | ServiceMode::GlobalJob => {}
    }
    println!("Running:\t{}", replicas(s));
    if let Some(p) = &s.pending {
        println!("Pending:\t{p}");
    }
    println!("Version:\t{}", spec.version);
    if let Some(u) = &spec.update_status {
        println!(
            "UpdateStatus:\n State:\t\t{}\n Started:\t{}\n{} Message:\t{}",
            u.state,
            ago(u.started_ms),
            u.completed_ms
                .map(|c| format!(" Completed:\t{}\n", ago(c)))
                .unwrap_or_default(),
            u.message
        );
    }
    if let Some(c) = &s.coordinator {
        println!("Coordinator:\t{c}");
    }
    for (title, c) in [
        ("UpdateConfig", &spec.update),
        ("RollbackConfig", &spec.rollback),
    ] {
        println!(
            "{title}:\n Parallelism:\t{}\n Delay:\t\t{}\n On failure:\t{}\n Monitoring Period: {}\n Max failure ratio: {}\n Update order:\t{}",
            c.parallelism,
            humantime::format_duration(Duration::from_millis(c.delay_ms)),
            c.failure_action,
            humantime::format_duration(Duration::from_millis(c.monitor_ms)),
            c.max_failure_ratio,
            c.order
        );
    }
    let pl = &spec.placement;
    if !pl.constraints.is_empty()
        || !pl.preferences.is_empty()
        || pl.max_replicas_per_node.is_some()
    {
        println!("Placement:");
        if !pl.constraints.is_empty() {
            let c: Vec<String> = pl.constraints.iter().map(ToString::to_string).collect();
            println!(" Constraints:\t[{}]", c.join(", "));
        }
        for p in &pl.preferences {
            println!(" Preference:\t{p}");
        }
        if let Some(m) = pl.max_replicas_per_node {
            println!(" Max Replicas Per Node:\t{m}");
        }
    }
    let r = &spec.restart;
    println!(
        "RestartPolicy:\n Condition:\t{}\n Delay:\t\t{}\n Max attempts:\t{}\n Window:\t{}",
        r.condition,
        humantime::format_duration(Duration::from_millis(r.delay_ms)),
        r.max_attempts.map_or("unlimited".into(), |n| n.to_string()),
        r.window_ms
            .map_or("unbounded".into(), |w| humantime::format_duration(
                Duration::from_millis(w)
            )
            .to_string()),
    );
    if let Some(t) = &spec.task {
        println!("ContainerSpec:\n Driver:\t{}", t.driver());
        if let Some(i) = &t.image {
            println!(" Image:\t\t{i}");
        }
        println!(" Command:\t{}", t.command.join(" "));
        if !t.env.is_empty() {
            println!(" Env:");
            for (k, v) in &t.env {
                println!("  {k}={v}");
            }
        }
        if let Some(h) = &t.hostname {
            println!(" Hostname:\t{h}");
        }
        for line in names_pretty(&t.run) {
            println!("{line}");
        }
        println!(
            " StopGracePeriod: {}",
            humantime::format_duration(Duration::from_millis(t.stop_grace_ms))
        );
        // Docker's Mounts block, as `docker service inspect --pretty` prints it.
        if !t.mounts.is_empty() {
            println!("Mounts:");
        }
        for m in &t.mounts {
            println!(
                " Target:\t{}\n  Source:\t{}\n  ReadOnly:\t{}\n  Type:\t\t{}",
                m.target, m.source, m.read_only, m.kind
            );
        }
        match &t.health {
            Some(h) => println!(
                "Healthcheck:\n Probe:\t\t{}\n Interval:\t{}\n Timeout:\t{}\n Retries:\t{}\n Start period:\t{}",
                h.probe,
                humantime::format_duration(Duration::from_millis(h.interval_ms)),
                humantime::format_duration(Duration::from_millis(h.timeout_ms)),
                h.retries,
                humantime::format_duration(Duration::from_millis(h.start_period_ms)),
            ),
            None => println!("Healthcheck:\tnone"),
        }
        for line in resources_pretty(&t.resources) {
            println!("{line}");
        }
    }
    println!("Networks:");
    for n in s.spec.attachments() {
        let mut line = format!(" {}", n.target);
        if let Some(vip) = n.vip {
            line.push_str(&format!("\tVIP: {vip}"));
        }
        if !n.aliases.is_empty() {
            line.push_str(&format!("\taliases: {}", n.aliases.join(", ")));
        }
        println!("{line}");
    }
    println!(
        "Endpoint Mode:\t{}\nVIP:\t\t{}",
        s.endpoint_mode,
        or_dash(s.vip)
    );
    if !s.ports.is_empty() {
        println!("Ports:");
        for p in &s.ports {
            println!(" - {p}");
        }
    }
    println!("Tasks:");
    print_tasks(&s.tasks);
    if let Some(dp) = &s.dataplane {
        println!(
            "\nLoad balancer on this node: {} flows, {} packets, {} bytes, {} dropped (no backend)",
            dp.counters.flows, dp.counters.packets, dp.counters.bytes, dp.counters.dropped
        );
        println!(
            "{}",
            table(
                &["BACKEND", "STATE", "SLOT", "FLOWS", "PACKETS", "BYTES"],
                dp.backends.iter().map(|b| {
                    [
                        b.ip.to_string(),
                        format!("{:?}", b.state).to_lowercase(),
                        or_dash(b.slot),
                        b.counters.flows.to_string(),
                        b.counters.packets.to_string(),
                        b.counters.bytes.to_string(),
                    ]
                })
            )
        );
    }
}

/// Waits for the service's tasks as Docker's CLI does, printing progress; returns when it
/// converged, when the remaining slots cannot be placed (saying why), or after a minute.
async fn converge(client: &Client, name: &str) -> Result<()> {
    let start = Instant::now();
    let mut last = String::new();
    let mut pending_since: Option<Instant> = None;
    loop {
        let s: ServiceInfo = client.get(&format!("/v1/services/{name}")).await?;
        let Some(desired) = s.desired else {
            return Ok(());
        };
        if let Some(completed) = s.completed {
            // Docker's job progress: a job is done once its run completed, not when its
            // tasks run.
            let total = total(&s);
            let line = format!(
                "job progress: {completed} out of {total} complete\nactive tasks: {} out of {} tasks",
                s.running,
                desired.min(total - completed.min(total))
            );
            if line != last {
                println!("{line}");
                last = line;
            }
            if completed >= total && s.running == 0 {
                println!("job complete");
                return Ok(());
            }
        } else {
            let line = format!("overall progress: {} out of {desired} tasks", s.running);
            if line != last {
                println!("{line}");
                last = line;
            }
            if s.running == desired && s.pending.is_none() {
                println!("verify: Service {name} converged");
                return Ok(());
            }
        }
        if let Some(reason) = &s.pending {
            let since = *pending_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(3) {
                println!(
                    "{} of {desired} tasks are pending: {reason}\n(they start as soon as a node fits; \
                     follow with `meshctl service ps {name}`)",
                    desired.saturating_sub(s.running)
                );
                return Ok(());
            }
        } else {
            pending_since = None;
        }
        if start.elapsed() > Duration::from_secs(60) {
            println!("still converging after a minute; follow with `meshctl service ps {name}`");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `meshctl service create ARGS…`, resolved as `create` resolves it.
    fn create(args: &[&str]) -> Result<CreateArgs> {
        let mut argv = vec!["meshctl", "service", "create"];
        argv.extend_from_slice(args);
        let cli = crate::Cli::try_parse_from(&argv)?;
        let crate::Command::Service(ServiceCommand::Create(a)) = cli.command else {
            panic!("not a create");
        };
        let raw: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        in_docker_order(*a, &raw)
    }

    #[test]
    fn dockers_order_takes_the_image_first_and_the_command_after_it() {
        let a = create(&[
            "--name",
            "my-web",
            "--publish",
            "published=8080,target=80",
            "--replicas",
            "3",
            "nginx:latest",
        ])
        .unwrap();
        assert_eq!(a.name.as_deref(), Some("my-web"));
        assert_eq!(a.image.as_deref(), Some("nginx:latest"));
        assert!(a.command.is_empty());
        assert_eq!(a.replicas, Some(3));
        // Everything after the image is its command, dashes included, as Docker's.
        let a = create(&[
            "--name",
            "cache",
            "redis:7",
            "redis-server",
            "--appendonly",
            "yes",
        ])
        .unwrap();
        assert_eq!(a.image.as_deref(), Some("redis:7"));
        assert_eq!(a.command, ["redis-server", "--appendonly", "yes"]);
        let a = create(&["--name", "w", "nginx", "-g", "daemon off;"]).unwrap();
        assert_eq!(a.command, ["-g", "daemon off;"]);
    }

    #[test]
    fn limit_flags_reach_the_template_and_inspect_prints_them_as_docker() {
        let a = create(&[
            "--name",
            "api",
            "--limit-cpu",
            "1",
            "--limit-memory",
            "512M",
            "--limit-pids",
            "200",
            "my/api:1",
        ])
        .unwrap();
        let spec = create_spec(&a).unwrap();
        let r = &spec.task.as_ref().unwrap().resources;
        assert_eq!(
            r.limits,
            mesh_api::spec::Limits {
                nano_cpus: 1_000_000_000,
                memory_bytes: 512 << 20,
                pids: 200
            }
        );
        assert_eq!(
            resources_pretty(r),
            [
                "Resources:",
                " Limits:",
                "  CPU:\t\t1",
                "  Memory:\t512MiB",
                "  PIDs:\t\t200"
            ]
        );
        let bad = create(&["--name", "api", "--limit-memory", "512Q", "my/api:1"]).unwrap();
        let e = create_spec(&bad).unwrap_err().to_string();
        assert!(e.contains("--limit-memory") && e.contains("512Q"), "{e}");
        let none = create(&["--name", "api", "--limit-pids", "5"]).unwrap();
        assert!(create_spec(&none).is_err(), "no task to limit");
    }

    #[test]
    fn dns_host_and_log_flags_reach_the_template_and_inspect() {
        let a = create(&[
            "--name",
            "web",
            "--hostname",
            "{{.Service.Name}}-{{.Task.Slot}}",
            "--host",
            "db.local:10.0.0.5",
            "--dns",
            "192.0.2.53",
            "--dns-search",
            "corp.example",
            "--dns-option",
            "ndots:2",
            "--log-driver",
            "json-file",
            "--log-opt",
            "max-size=10m,max-file=3",
            "--process",
            "--",
            "sleep",
            "100",
        ])
        .unwrap();
        let spec = create_spec(&a).unwrap();
        let t = spec.task.unwrap();
        assert_eq!(
            t.hostname.as_deref(),
            Some("{{.Service.Name}}-{{.Task.Slot}}")
        );
        assert_eq!(t.run.hosts[0].to_string(), "db.local:10.0.0.5");
        assert_eq!(t.run.dns.search, ["corp.example"]);
        assert_eq!(t.run.log.max_file, Some(3));
        assert_eq!(
            names_pretty(&t.run),
            [
                " Hosts:",
                "  10.0.0.5 db.local",
                " DNS Config:",
                "  Nameservers:\t192.0.2.53",
                "  Search:\tcorp.example",
                "  Options:\tndots:2",
                "Log Driver:",
                " Name:\t\tjson-file",
                " LogOpts:",
                "  max-file:\t\t3",
                "  max-size:\t\t10MiB",
            ]
        );
        for (args, says) in [
            (&["--host", "db.local"][..], "bad format for add-host"),
            (
                &["--log-driver", "syslog"][..],
                "\"syslog\" is not supported",
            ),
            (
                &["--hostname", "{{.Nope}}"][..],
                "can't evaluate field Nope in type template.Context",
            ),
            (&["-e", "A={{.Task.Nope}}"][..], "can't evaluate field Nope"),
        ] {
            let mut all = vec!["--name", "web"];
            all.extend_from_slice(args);
            all.extend_from_slice(&["--process", "--", "true"]);
            let e = create_spec(&create(&all).unwrap()).unwrap_err().to_string();
            assert!(e.contains(says), "{args:?}: {e}");
        }
    }

    #[test]
    fn a_service_without_a_name_gets_one_from_its_image() {
        let a = create(&["localhost/shop/api:1.2"]).unwrap();
        let name = a.name.unwrap();
        assert!(
            name.starts_with("api-") && name.len() == "api-".len() + 6,
            "{name}"
        );
        assert!(mesh_api::spec::validate_name("service", &name).is_ok());
    }

    #[test]
    fn the_process_driver_is_spelled_out() {
        let a = create(&[
            "--name",
            "job1",
            "--process",
            "--",
            "/usr/local/bin/backup",
            "--full",
        ])
        .unwrap();
        assert!(a.image.is_none());
        assert_eq!(a.command, ["/usr/local/bin/backup", "--full"]);
        let old = create(&[
            "--name",
            "web",
            "--replicas",
            "3",
            "--",
            "python3",
            "-m",
            "http.server",
        ])
        .unwrap();
        assert!(old.image.is_none() && old.process);
        assert_eq!(old.command, ["python3", "-m", "http.server"]);
        let none = create(&["--name", "hand", "--process", "--network", "app"]).unwrap();
        assert!(none.command.is_empty() && none.image.is_none());
        assert!(create(&["--process", "--image", "x", "--", "y"]).is_err());
        assert!(
            create(&["--replicas", "2"])
                .unwrap_err()
                .to_string()
                .contains("no image")
        );
    }

    #[test]
    fn the_old_name_first_form_still_reads_as_it_did() {
        let a = create(&[
            "web",
            "--network",
            "app",
            "--replicas",
            "3",
            "--",
            "srv",
            "--port",
            "80",
        ])
        .unwrap();
        assert_eq!(a.name.as_deref(), Some("web"));
        assert!(a.image.is_none() && a.process);
        assert_eq!(a.command, ["srv", "--port", "80"]);
        assert_eq!(
            (a.network.as_slice(), a.replicas),
            (&["app".to_owned()][..], Some(3))
        );
        let a = create(&["web", "--", "srv"]).unwrap();
        assert_eq!(
            (a.name.as_deref(), a.command.as_slice()),
            (Some("web"), &["srv".to_owned()][..])
        );
        let a = create(&[
            "-d",
            "api",
            "--replicas",
            "2",
            "--image",
            "localhost/api:1",
            "-e",
            "A=b",
        ])
        .unwrap();
        assert_eq!(a.name.as_deref(), Some("api"));
        assert_eq!(a.image.as_deref(), Some("localhost/api:1"));
        assert!(a.detach && a.env == ["A=b"]);
        // A task-less service (its tasks started by `meshctl run --service`).
        let a = create(&["lb", "--network", "app"]).unwrap();
        assert_eq!(a.name.as_deref(), Some("lb"));
        assert!(a.image.is_none() && a.command.is_empty());
        assert!(deprecation(&a).contains("--name lb --process"));
    }

    #[test]
    fn network_flags_give_the_network_and_its_aliases() {
        let spec = |args: &[&str]| {
            let mut all = vec!["--name", "worker"];
            all.extend_from_slice(args);
            all.extend_from_slice(&["--process", "--", "true"]);
            create_spec(&create(&all)?)
        };
        let s = spec(&["--network", "name=backend,alias=jobs,alias=queue"]).unwrap();
        assert_eq!(
            (s.network.as_str(), s.aliases.as_slice()),
            ("backend", &["jobs".to_owned(), "queue".to_owned()][..])
        );
        let s = spec(&[]).unwrap();
        assert!(
            s.network.is_empty() && s.aliases.is_empty(),
            "the agent's default"
        );
        let s = spec(&[
            "--network",
            "frontend",
            "--network",
            "name=backend,alias=jobs",
        ])
        .unwrap();
        assert_eq!(s.network, "frontend");
        assert_eq!(
            s.networks,
            [NetworkAttachment {
                target: "backend".into(),
                aliases: vec!["jobs".into()],
                vip: None
            }]
        );
        let e = spec(&["--network", "alias=x"]).unwrap_err().to_string();
        assert!(e.contains("network name/id is not specified"), "{e}");
    }

    fn job_mode(args: &[&str]) -> Result<ServiceMode> {
        let mut all = vec!["--name", "migrate"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--process", "--", "true"]);
        Ok(create_spec(&create(&all)?)?.mode)
    }

    #[test]
    fn job_modes_take_dockers_defaults_and_refuse_what_docker_refuses() {
        let rj = |completions, max_concurrent| ServiceMode::ReplicatedJob {
            completions,
            max_concurrent,
        };
        let cases = [
            (&["--mode", "replicated-job"][..], rj(1, 1)),
            (
                &["--mode", "replicated-job", "--replicas", "3"][..],
                rj(3, 3),
            ),
            (
                &[
                    "--mode",
                    "replicated-job",
                    "--replicas",
                    "3",
                    "--max-concurrent",
                    "1",
                ][..],
                rj(3, 1),
            ),
            (
                &["--mode", "replicated-job", "--max-concurrent", "2"][..],
                rj(2, 2),
            ),
            (&["--mode", "global-job"][..], ServiceMode::GlobalJob),
        ];
        for (args, want) in cases {
            assert_eq!(job_mode(args).unwrap(), want, "{args:?}");
        }
        for (args, says) in [
            (
                &["--mode", "global-job", "--replicas", "2"][..],
                "replicas can only be used with replicated or replicated-job mode",
            ),
            (
                &["--max-concurrent", "2"][..],
                "max-concurrent can only be used with replicated-job mode",
            ),
            (
                &["--mode", "global-job", "--replicas-max-per-node", "1"][..],
                "replicas-max-per-node can only be used with replicated or replicated-job mode",
            ),
            (
                &["--mode", "replicated-job", "--update-parallelism", "2"][..],
                "update and rollback configuration is not supported for jobs",
            ),
            (
                &["--mode", "replicated-job", "--max-concurrent", "0"][..],
                "--max-concurrent 0",
            ),
            (&["--mode", "batch"][..], "unknown --mode \"batch\""),
        ] {
            let e = job_mode(args).unwrap_err().to_string();
            assert!(e.contains(says), "{args:?}: {e}");
        }
    }

    #[test]
    fn service_ls_shows_a_jobs_progress_as_docker_does() {
        let info = |mode, running, desired, completed| ServiceInfo {
            id: "x".into(),
            name: "migrate".into(),
            network: "ingress".into(),
            mode,
            endpoint_mode: EndpointMode::Vip,
            vip: None,
            ports: vec![],
            running,
            desired: Some(desired),
            completed,
            pending: None,
            coordinator: None,
            spec: ServiceSpec::default(),
            tasks: vec![],
            created_by: "n1".into(),
            dataplane: None,
        };
        let job = ServiceMode::ReplicatedJob {
            completions: 3,
            max_concurrent: 1,
        };
        assert_eq!(replicas(&info(job, 1, 1, Some(1))), "1/1 (1/3 completed)");
        assert_eq!(replicas(&info(job, 0, 1, Some(3))), "0/1 (3/3 completed)");
        assert_eq!(
            replicas(&info(ServiceMode::GlobalJob, 1, 2, Some(1))),
            "1/2 (1/3 completed)"
        );
        assert_eq!(
            replicas(&info(ServiceMode::Replicated { replicas: 3 }, 3, 3, None)),
            "3/3"
        );
        assert_eq!(job.display(), "replicated job");
        assert_eq!(ServiceMode::GlobalJob.display(), "global job");
    }
}
