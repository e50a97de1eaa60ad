//! A cluster of namespace hosts on one machine.
//!
//! ```text
//!   [underlay ns: bridge br0, 192.0.2.254]
//!      |veth        |veth        |veth
//!   [host 1]     [host 2]     [host 3]      eth0 = 192.0.2.<i>/24, ip_forward on
//! ```

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    netns::{self, Netns},
    process,
};

/// Namespaces, pins, cgroups and sockets of test clusters start with one of these, then the
/// owning process's PID: `mt` for tests, `demo` for `cargo xtask demo`, `bench` for
/// `cargo xtask bench`.
const PREFIXES: [&str; 3] = ["mt", "demo", "bench"];
static SEQ: AtomicU32 = AtomicU32::new(0);

pub const UNDERLAY_PREFIX: &str = "192.0.2";

pub struct Cluster {
    name: String,
    underlay: Netns,
    hosts: Vec<Host>,
    extra: Vec<Netns>,
}

pub struct Host {
    pub index: usize,
    pub ns: Netns,
    pub ip: String,
    agent: Option<Agent>,
    agent_args: Vec<String>,
    agent_env: Vec<(String, String)>,
    /// The mesh-agent subcommand and its own arguments (`run`, or `init`/`join …`).
    agent_command: Vec<String>,
    log: PathBuf,
    /// The cluster key every `run` gets unless the test passes its own, `--insecure` or a
    /// config that names one: agents refuse to gossip without a key.
    cluster_key: PathBuf,
    /// The agent's stdout when it runs `init` or `join` (what those print for the user),
    /// kept apart from its log.
    out: PathBuf,
    peers: Vec<String>,
}

struct Agent {
    child: Child,
}

impl Cluster {
    /// Builds `n` hosts on a shared underlay. Names are unique per test so tests run in
    /// parallel.
    pub fn new(n: usize) -> Result<Self> {
        Self::with_prefix(PREFIXES[0], n)
    }

    /// A cluster whose names start with `prefix` (one of [`PREFIXES`]).
    pub fn with_prefix(prefix: &str, n: usize) -> Result<Self> {
        if !PREFIXES.contains(&prefix) {
            bail!("cluster prefix {prefix:?} is not one the stale sweep knows");
        }
        sweep_stale();
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let name = format!("{prefix}{}x{seq}", std::process::id());
        let underlay = Netns::create(&format!("{name}-u"))?;
        underlay.sh(&format!(
            "ip link add br0 type bridge && ip link set br0 up && \
             ip addr add {UNDERLAY_PREFIX}.254/24 dev br0"
        ))?;
        let mut cluster = Self {
            name,
            underlay,
            hosts: Vec::new(),
            extra: Vec::new(),
        };
        let logs = cluster.log_dir();
        fs::create_dir_all(&logs)?;
        let cluster_key = logs.join("harness-cluster.key");
        let keygen = Command::new(bin("mesh-agent"))
            .arg("keygen")
            .arg("--out")
            .arg(&cluster_key)
            .output()
            .context("running mesh-agent keygen")?;
        if !keygen.status.success() {
            bail!(
                "mesh-agent keygen failed: {}",
                String::from_utf8_lossy(&keygen.stderr)
            );
        }
        for i in 1..=n {
            let ns = Netns::create(&format!("{}-h{i}", cluster.name))?;
            let ip = format!("{UNDERLAY_PREFIX}.{i}");
            cluster.underlay.sh(&format!(
                "ip link add h{i} type veth peer name eth0 netns {host} && \
                 ip link set h{i} master br0 && ip link set h{i} up",
                host = ns.name()
            ))?;
            ns.sh(&format!(
                "ip addr add {ip}/24 dev eth0 && ip link set eth0 up && \
                 sysctl -qw net.ipv4.ip_forward=1"
            ))?;
            cluster.hosts.push(Host {
                index: i,
                log: logs.join(format!("agent-h{i}.log")),
                cluster_key: cluster_key.clone(),
                out: logs.join(format!("agent-h{i}.out")),
                agent_command: vec!["run".into()],
                ns,
                ip,
                agent: None,
                agent_args: Vec::new(),
                agent_env: Vec::new(),
                peers: (1..=n)
                    .filter(|j| *j != i)
                    .map(|j| format!("{UNDERLAY_PREFIX}.{j}"))
                    .collect(),
            });
        }
        Ok(cluster)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i - 1]
    }

    pub fn host_mut(&mut self, i: usize) -> &mut Host {
        &mut self.hosts[i - 1]
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }

    /// A machine outside the mesh on the underlay (a client of published ports).
    pub fn external(&mut self, name: &str, last_octet: u8) -> Result<&Netns> {
        let ns = Netns::create(&format!("{}-x{name}", self.name))?;
        self.underlay.sh(&format!(
            "ip link add x{name} type veth peer name eth0 netns {ns} && \
             ip link set x{name} master br0 && ip link set x{name} up",
            ns = ns.name()
        ))?;
        ns.sh(&format!(
            "ip addr add {UNDERLAY_PREFIX}.{last_octet}/24 dev eth0 && ip link set eth0 up"
        ))?;
        self.extra.push(ns);
        Ok(self.extra.last().expect("just pushed"))
    }

    /// A namespace made by [`Cluster::external`], by the name it was given.
    pub fn external_ns(&self, name: &str) -> Option<&Netns> {
        let full = format!("{}-x{name}", self.name);
        self.extra.iter().find(|ns| ns.name() == full)
    }

    /// A scratch directory of this cluster, removed with it.
    pub fn log_dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("{}-logs", self.name))
    }

    /// Gives a running cluster roles, as an operator who adds `admin.pub` to every node
    /// would: stops the agents of hosts `1..=n`, saves the admin key under each one's state
    /// dir (`admin/`; host1 holds the secret half, the others the public half) and returns
    /// those directories for `--admin-key-dir`, for the caller to restart the agents with.
    pub fn give_admin_keys(&mut self, n: usize) -> Result<Vec<String>> {
        use mesh_agent::{identity::NodeIdentity, roles::AdminKey};
        let admin = AdminKey::generate()?;
        for i in 1..=n {
            self.host_mut(i).stop_agent()?;
        }
        let mut dirs = Vec::new();
        for i in 1..=n {
            let dir = self.host(i).state_dir().join("admin");
            let key = if i == 1 {
                let secret = admin
                    .secret()
                    .context("a generated admin key has its secret")?;
                AdminKey::from_secret(NodeIdentity::from_seed(&secret.seed()))
            } else {
                AdminKey::public_only(admin.public)
            };
            key.save(&dir)?;
            dirs.push(dir.display().to_string());
        }
        Ok(dirs)
    }

    /// Starts an agent on every host; each joins the others.
    pub fn start_agents(&mut self) -> Result<()> {
        for i in 1..=self.hosts.len() {
            self.host_mut(i).start_agent(&[])?;
        }
        Ok(())
    }

    /// Creates a network from host1 and waits until every host knows it; its JSON.
    pub fn create_network(&self, name: &str, subnet: &str) -> Result<serde_json::Value> {
        let net = self
            .host(1)
            .meshctl_json(&["network", "create", name, "--subnet", subnet])?;
        self.known_everywhere(&["network", "inspect", name])?;
        Ok(net)
    }

    /// `meshctl service create NAME --network NETWORK ARGS…` from host1, then waits until
    /// every host knows the service; its JSON.
    pub fn create_service(
        &self,
        name: &str,
        network: &str,
        args: &[&str],
    ) -> Result<serde_json::Value> {
        let mut cmd = vec!["service", "create", name, "--network", network];
        cmd.extend_from_slice(args);
        let svc = self.host(1).meshctl_json(&cmd)?;
        self.known_everywhere(&["service", "inspect", name])?;
        Ok(svc)
    }

    /// Waits until a meshctl command (an inspect) succeeds on every host.
    fn known_everywhere(&self, args: &[&str]) -> Result<()> {
        self.eventually(Duration::from_secs(5), &args.join(" "), |c| {
            for h in c.hosts() {
                if !h.meshctl(args)?.status.success() {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })
    }

    /// Polls `check` until it returns `Some`, failing with `what` after `timeout`.
    pub fn eventually<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut(&Self) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut last_err = None;
        loop {
            match check(self) {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last_err = Some(e),
            }
            if Instant::now() > deadline {
                match last_err {
                    Some(e) => bail!("timed out after {timeout:?} waiting for {what}: {e:#}"),
                    None => bail!("timed out after {timeout:?} waiting for {what}"),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Host {
    /// The node name the agent runs under; also the prefix of everything it creates.
    pub fn node_name(&self) -> &str {
        self.ns.name()
    }

    pub fn socket(&self) -> PathBuf {
        PathBuf::from("/run/mesh")
            .join(self.node_name())
            .join("agent.sock")
    }

    pub fn bpffs(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf/mesh").join(self.node_name())
    }

    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from("/run/mesh")
            .join(self.node_name())
            .join("state")
    }

    /// Each node gets its own cgroup: all namespace hosts share this machine's cgroup tree.
    pub fn cgroup(&self) -> PathBuf {
        cgroup_base().join(self.node_name())
    }

    /// Starts `mesh-agent run` in this host's namespace and waits until its API answers.
    pub fn start_agent(&mut self, extra: &[&str]) -> Result<()> {
        self.start_agent_with_env(extra, &[])
    }

    /// Like [`Host::start_agent`], with extra environment variables.
    pub fn start_agent_with_env(&mut self, extra: &[&str], env: &[(&str, &str)]) -> Result<()> {
        if self.agent.is_some() {
            bail!("agent on {} already running", self.node_name());
        }
        self.agent_command = vec!["run".into()];
        self.agent_args = extra.iter().map(|s| s.to_string()).collect();
        self.agent_env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn_agent()
    }

    /// Starts `mesh-agent init` or `mesh-agent join …` (`command`) as this host's agent,
    /// with this host's paths, its config in [`Host::config_dir`] and no peers but those the
    /// command names; waits until its API answers. What it printed is in [`Host::output`].
    pub fn start_agent_command(&mut self, command: &[&str], extra: &[&str]) -> Result<()> {
        self.start_agent_command_with_env(command, extra, &[])
    }

    /// Like [`Host::start_agent_command`], with extra environment variables.
    pub fn start_agent_command_with_env(
        &mut self,
        command: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<()> {
        if self.agent.is_some() {
            bail!("agent on {} already running", self.node_name());
        }
        self.agent_command = command.iter().map(|s| s.to_string()).collect();
        let config = self.config_dir().join("agent.toml");
        self.agent_args = ["--config", config.to_str().context("utf-8 path")?]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        self.agent_env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn_agent()
    }

    /// Where `init`/`join` started by [`Host::start_agent_command`] write config and key.
    pub fn config_dir(&self) -> PathBuf {
        self.log
            .parent()
            .expect("log dir")
            .join(format!("etc-h{}", self.index))
    }

    /// What the agent command printed on stdout (init's join command).
    pub fn output(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// The arguments that give a mesh-agent command this host's paths (socket, state,
    /// bpffs, cgroup, interface, name).
    pub fn path_args(&self) -> Vec<String> {
        let mut args: Vec<String> = ["--interface", "eth0", "--node-name", self.ns.name()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (flag, path) in [
            ("--socket", self.socket()),
            ("--bpffs", self.bpffs()),
            ("--state-dir", self.state_dir()),
            ("--cgroup", self.cgroup()),
        ] {
            args.push(flag.into());
            args.push(path.display().to_string());
        }
        args
    }

    /// Runs a one-shot `mesh-agent` command in this host's namespace (killed after
    /// `timeout`, e.g. a join expected to fail that would otherwise run the agent).
    pub fn mesh_agent(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        self.ns
            .command("timeout")
            .arg(timeout.as_secs().max(1).to_string())
            .arg(bin("mesh-agent"))
            .args(args)
            .env("MESH_LOG", "info")
            .stdin(Stdio::null())
            .output()
            .context("running mesh-agent")
    }

    fn spawn_agent(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.out)?;
        let run = self.agent_command.first().is_none_or(|c| c == "run");
        let stdout = if run { log.try_clone()? } else { out };
        let child = self
            .ns
            .command(bin("mesh-agent").to_str().expect("utf-8 path"))
            .args(&self.agent_command)
            .args(["--interface", "eth0", "--node-name", self.ns.name()])
            .args(if run || self.agent_command[0] == "init" {
                vec!["--advertise", &self.ip]
            } else {
                Vec::new()
            })
            .args(
                self.peers
                    .iter()
                    .filter(|_| run)
                    .flat_map(|p| ["--join", p.as_str()]),
            )
            .arg("--socket")
            .arg(self.socket())
            .arg("--bpffs")
            .arg(self.bpffs())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--cgroup")
            .arg(self.cgroup())
            // Keep tests independent of this machine's /etc/mesh (a test may pass its own).
            .args(if self.agent_args.iter().any(|a| a == "--config") {
                &[][..]
            } else {
                &["--config", "/dev/null"][..]
            })
            .args(self.default_key_args(run))
            .args(&self.agent_args)
            .env("MESH_LOG", "info,mesh_agent=debug")
            .envs(self.agent_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .spawn()
            .context("spawning mesh-agent")?;
        self.agent = Some(Agent { child });
        self.wait_ready(Duration::from_secs(20))
    }

    /// `--cluster-key-file` with the cluster's key, for a `run` whose test chose no key (nor
    /// `--insecure`) itself, on the command line or in its config.
    fn default_key_args(&self, run: bool) -> Vec<String> {
        let flag = |f: &str| self.agent_args.iter().any(|a| a == f);
        let config_names_one = self
            .agent_args
            .iter()
            .position(|a| a == "--config")
            .and_then(|i| self.agent_args.get(i + 1))
            .and_then(|p| fs::read_to_string(p).ok())
            .is_some_and(|t| t.contains("cluster_key_file") || t.contains("insecure"));
        if !run || flag("--cluster-key-file") || flag("--insecure") || config_names_one {
            return Vec::new();
        }
        vec![
            "--cluster-key-file".into(),
            self.cluster_key.display().to_string(),
        ]
    }

    /// The key file agents of this cluster use unless a test gives them another.
    pub fn cluster_key(&self) -> &Path {
        &self.cluster_key
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(a) = &mut self.agent
                && let Some(status) = a.child.try_wait()?
            {
                self.agent = None;
                bail!(
                    "mesh-agent on {} exited ({status}):\n{}",
                    self.node_name(),
                    self.logs()
                );
            }
            // A control-plane-only agent has no dataplane to ask about: its API is enough.
            let probe: &[&str] = if self.agent_args.iter().any(|a| a == "--control-plane-only") {
                &["node", "ls"]
            } else {
                &["dataplane", "ports"]
            };
            // Ready means this agent answers: another process still serving the socket (an
            // old agent nobody stopped) answers meshctl just as well.
            let child = self.agent_pid();
            let server = self.api_pid();
            if server.is_some() && server == child && self.meshctl(probe)?.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "mesh-agent on {} not ready (its PID {child:?}, the API socket served by \
                     {server:?}):\n{}",
                    self.node_name(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the agent with SIGTERM (graceful) and waits for it.
    pub fn stop_agent(&mut self) -> Result<()> {
        if let Some(mut a) = self.agent.take() {
            process::kill_pid(a.child.id() as i32);
            a.child.wait()?;
        }
        Ok(())
    }

    /// SIGKILLs the agent, as a crash would.
    pub fn kill_agent(&mut self) -> Result<()> {
        if let Some(mut a) = self.agent.take() {
            a.child.kill()?;
            a.child.wait()?;
        }
        Ok(())
    }

    /// Waits for the agent to exit on its own (after `mesh-agent leave`); its exit status.
    pub fn wait_agent_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(a) = &mut self.agent else {
                bail!("no agent running on {}", self.node_name());
            };
            if let Some(status) = a.child.try_wait()? {
                self.agent = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent on {} did not exit in {timeout:?}",
                    self.node_name()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the agent again with the arguments it last ran with; the old one must have been
    /// stopped ([`Host::stop_agent`], [`Host::kill_agent`]) or have exited.
    pub fn restart_agent(&mut self) -> Result<()> {
        if let Some(a) = &mut self.agent
            && a.child.try_wait()?.is_none()
        {
            let pid = a.child.id();
            bail!(
                "the agent on {} (PID {pid}) still runs: stop it before starting another",
                self.node_name()
            );
        }
        self.agent = None;
        self.spawn_agent()
    }

    /// The PID of the process serving this host's API socket (SO_PEERCRED of a connection to
    /// it: the listener's), if one does.
    pub fn api_pid(&self) -> Option<u32> {
        use std::os::fd::AsRawFd;
        let s = std::os::unix::net::UnixStream::connect(self.socket()).ok()?;
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` and `len` are valid for writes of a `ucred`, the fd is open.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&raw mut cred).cast(),
                &mut len,
            )
        };
        (rc == 0 && cred.pid > 0).then_some(cred.pid as u32)
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|a| a.child.id())
    }

    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs meshctl against this host's agent.
    pub fn meshctl(&self, args: &[&str]) -> Result<Output> {
        Command::new(bin("meshctl"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .context("running meshctl")
    }

    /// Runs meshctl and fails with its stderr if it fails.
    pub fn meshctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.meshctl(args)?;
        if !out.status.success() {
            bail!(
                "meshctl {} on {} failed: {}",
                args.join(" "),
                self.node_name(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs meshctl with `input` on its standard input (`secret create NAME -`).
    pub fn meshctl_stdin(&self, args: &[&str], input: &[u8]) -> Result<Output> {
        use std::io::Write;
        let mut child = Command::new(bin("meshctl"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running meshctl")?;
        let mut stdin = child.stdin.take().context("meshctl's stdin")?;
        stdin.write_all(input).context("writing meshctl's stdin")?;
        drop(stdin);
        child.wait_with_output().context("waiting for meshctl")
    }

    /// meshctl with `--format json`, decoded.
    /// Each node's role as this host's `node ls` shows it: name → `admin` or `worker`.
    pub fn node_roles(&self) -> Result<std::collections::BTreeMap<String, String>> {
        let nodes: serde_json::Value = self.meshctl_json(&["node", "ls"])?;
        Ok(nodes
            .as_array()
            .context("node ls is a list")?
            .iter()
            .filter_map(|n| {
                Some((
                    n["name"].as_str()?.to_owned(),
                    n["role"].as_str()?.to_owned(),
                ))
            })
            .collect())
    }

    pub fn meshctl_json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> Result<T> {
        // Before the arguments: a trailing `-- command` must stay last.
        let mut all = vec!["--format", "json"];
        all.extend_from_slice(args);
        let out = self.meshctl_ok(&all)?;
        serde_json::from_str(&out).with_context(|| format!("decoding meshctl output: {out}"))
    }

    /// `meshctl run` of a mesh-whoami task named `name` on `network`, a task of `service` if
    /// one is given; mesh-whoami answers with `name` and gets `extra` after it. The task as
    /// `meshctl --format json run` prints it.
    pub fn run_whoami<T: serde::de::DeserializeOwned>(
        &self,
        network: &str,
        service: Option<&str>,
        name: &str,
        extra: &[&str],
    ) -> Result<T> {
        let whoami = bin("mesh-whoami");
        let whoami = whoami.to_str().context("mesh-whoami's path is not UTF-8")?;
        let mut args = vec!["run", "--network", network];
        if let Some(s) = service {
            args.extend(["--service", s]);
        }
        args.extend(["--name", name, "--", whoami, "--name", name]);
        args.extend_from_slice(extra);
        self.meshctl_json(&args)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for h in &mut self.hosts {
            if panicking {
                eprintln!("---- agent log of {} ----\n{}", h.node_name(), h.logs());
            }
            let _ = h.stop_agent();
        }
        remove_node_state(&self.name);
        // Namespaces the agents created (tasks) carry the cluster's name too.
        for ns in netns::list() {
            if ns.starts_with(&format!("{}-", self.name))
                && !self.hosts.iter().any(|h| h.ns.name() == ns)
                && !self.extra.iter().any(|x| x.name() == ns)
                && ns != self.underlay.name()
            {
                netns::delete_netns(&ns);
            }
        }
        self.extra.clear();
        self.hosts.clear();
        let _ = fs::remove_dir_all(self.log_dir());
    }
}

/// Removes bpffs pins, run directories, cgroups and podman containers of every node of a
/// cluster.
fn remove_node_state(cluster: &str) {
    remove_containers(cluster);
    for dir in ["/sys/fs/bpf/mesh", "/run/mesh"] {
        remove_children_with_prefix(Path::new(dir), cluster, |p| {
            let _ = fs::remove_dir_all(p);
        });
    }
    for base in cgroup_bases() {
        remove_children_with_prefix(&base, cluster, remove_cgroup);
    }
    // resolv.conf and friends of task namespaces (the `ip netns exec` convention).
    remove_children_with_prefix(Path::new("/etc/netns"), cluster, |p| {
        let _ = fs::remove_dir_all(p);
    });
}

/// Containers of image tasks are named after their namespace (`<cluster>-h<i>-<task>`);
/// agents stopped without removing their services leave them behind.
fn remove_containers(cluster: &str) {
    if !Path::new("/usr/bin/podman").exists() {
        return;
    }
    let Ok(out) = Command::new("podman")
        .args(["ps", "--all", "--format", "{{.Names}}"])
        .args(["--filter", &format!("name=^{cluster}-")])
        .output()
    else {
        return;
    };
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(&format!("{cluster}-")))
        .map(str::to_owned)
        .collect();
    if !names.is_empty() {
        let _ = Command::new("podman")
            .args(["rm", "--force", "--ignore", "--time", "0"])
            .args(&names)
            .output();
    }
}

fn remove_children_with_prefix(dir: &Path, prefix: &str, remove: impl Fn(&Path)) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(prefix) {
            remove(&e.path());
        }
    }
}

/// cgroup directories are removed leaves first; a cgroup with processes in it is killed by
/// PID before removal.
fn remove_cgroup(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    if let Ok(procs) = fs::read_to_string(path.join("cgroup.procs")) {
        for pid in procs.split_whitespace().filter_map(|p| p.parse().ok()) {
            process::kill_pid(pid);
        }
    }
    let _ = fs::remove_dir(path);
}

/// Removes what clusters of test processes that no longer exist left behind (a test run
/// killed with SIGKILL cannot run its destructors).
fn sweep_stale() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let mut dead = std::collections::BTreeSet::new();
        for ns in netns::list() {
            if let Some(pid) = owner_pid(&ns)
                && !process::alive(pid)
            {
                netns::delete_netns(&ns);
                dead.insert(ns.split('-').next().unwrap_or_default().to_owned());
            }
        }
        // A run killed after its namespaces were gone still left node state behind (pins,
        // runtime directories, cgroups): found by the owner in its name as well.
        let dirs = [
            PathBuf::from("/sys/fs/bpf/mesh"),
            PathBuf::from("/run/mesh"),
            PathBuf::from("/etc/netns"),
        ];
        for dir in dirs.into_iter().chain(cgroup_bases()) {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = owner_pid(&name)
                    && !process::alive(pid)
                {
                    dead.insert(name.split('-').next().unwrap_or_default().to_owned());
                }
            }
        }
        for cluster in dead {
            remove_node_state(&cluster);
        }
    });
}

/// `mt<pid>x<seq>-…` → pid.
fn owner_pid(ns: &str) -> Option<i32> {
    let rest = PREFIXES.iter().find_map(|p| ns.strip_prefix(p))?;
    let (pid, _) = rest.split_once('x')?;
    pid.parse().ok()
}

/// `mesh` under wherever this machine mounts cgroup v2 (the agent's default), the parent of
/// every test node's cgroup.
pub fn cgroup_base() -> PathBuf {
    mesh_agent::cgroup::cgroup2_mount()
        .expect("cgroup v2 is mounted")
        .join("mesh")
}

/// Every `mesh` directory task cgroups may be under: the v2 one, and on a hybrid host the
/// same path in each v1 hierarchy holding memory, cpu or pids (where the agent puts the
/// leaves of limited tasks).
pub fn cgroup_bases() -> Vec<PathBuf> {
    let mut bases = vec![cgroup_base()];
    if let Ok(layout) = mesh_agent::cgroup::Layout::discover() {
        bases.extend(layout.v1_mounts().into_iter().map(|m| m.join("mesh")));
    }
    bases
}

/// Path of a binary of this workspace, built once per test process so `cargo test` alone is
/// enough. `MESH_BIN_DIR` names a directory of binaries built elsewhere instead (a
/// benchmark of an older build beside the current one): nothing is built then.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        if let Some(dir) = std::env::var_os("MESH_BIN_DIR") {
            return PathBuf::from(dir);
        }
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> (tests) or target/<profile>/<bin> (xtask)
        let mut dir = exe.parent().expect("target directory").to_owned();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "--package",
            "mesh-agent",
            "--package",
            "meshctl",
            "--package",
            "mesh-cni",
            "--package",
            "mesh-tests",
            "--bins",
        ]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("running cargo build for the mesh binaries");
        assert!(status.success(), "building the mesh binaries failed");
        dir
    });
    dir.join(name)
}
