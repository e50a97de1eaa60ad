//! Agent configuration: /etc/mesh/agent.toml, overridden by command-line flags. Every flag has
//! a config key of the same name (dashes become underscores).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG: &str = "/etc/mesh/agent.toml";

/// The agent's settings, after file and flags are merged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Unique name of this node in the cluster (default: the hostname).
    pub node_name: Option<String>,
    /// Underlay address peers reach this node at: VXLAN endpoint, gossip, published ports.
    pub advertise: Option<Ipv4Addr>,
    /// Underlay interface (default: the one holding the advertise address).
    pub interface: Option<String>,
    /// Peers to join, `host[:port]`.
    pub join: Vec<String>,
    /// Cluster name: agents with different names ignore each other.
    pub cluster: String,
    pub gossip_port: u16,
    /// File holding the cluster key(s) that authenticate gossip.
    pub cluster_key_file: Option<PathBuf>,
    /// Where the cluster's admin key lives (`admin.pub` on every node, `admin.key` on admins
    /// that can grant roles; see `crate::roles`). Default: beside `cluster_key_file`. Without
    /// an `admin.pub` there the cluster has no roles and every node is an admin.
    pub admin_key_dir: Option<PathBuf>,
    /// Gossip without a cluster key: any host that reaches the gossip port can join, read
    /// the cluster's state and inject records. Without a key the agent refuses to start
    /// unless this is set (`--insecure`).
    pub insecure: bool,
    /// This node's own labels (Swarm's engine labels), e.g. `{ type = "low-memory" }`;
    /// operator labels (`meshctl node update --label-add`) win over them.
    pub labels: BTreeMap<String, String>,
    pub gossip_interval_ms: u64,
    /// A silent peer is declared dead after about phi_threshold × gossip_interval.
    pub phi_threshold: f64,
    /// How long a create waits for concurrent creates elsewhere before it is final; 0 (the
    /// default): a few gossip rounds, as many as news takes to reach every live node and
    /// come back (see `Agent::settle_time`).
    pub settle_ms: u64,
    /// After a graceful stop (SIGTERM) peers keep this node's tasks this long before evicting
    /// them: its tasks and dataplane keep serving while the agent restarts.
    pub restart_grace_ms: u64,
    pub socket: PathBuf,
    /// The Docker Engine API socket (`docker` with `DOCKER_HOST=unix://…`). Default:
    /// `docker.sock` beside `socket`; an empty path turns it off.
    pub docker_socket: Option<PathBuf>,
    /// The group that may use the Docker API socket besides root (dockerd's `docker` group):
    /// its members can do what root can with services, so give it to admins only.
    pub docker_socket_group: Option<String>,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    /// cgroup v2 directory the agent places its process tasks in (under `tasks/`). Default:
    /// `mesh` below wherever cgroup v2 is mounted. The socket hooks do not depend on it: they
    /// are attached at the cgroup v2 root and select by network namespace.
    pub cgroup: Option<PathBuf>,
    /// Subnet of the node-local gateway bridge tasks reach the outside through (masqueraded;
    /// the same on every node is fine).
    pub gateway_subnet: ipnet::Ipv4Net,
    /// Resolvers for names outside the mesh (default: the host's /etc/resolv.conf at start).
    pub dns_upstreams: Vec<SocketAddr>,
    /// On exit, tear the dataplane down instead of leaving it forwarding.
    pub cleanup_on_exit: bool,
    /// Run gossip, the merged view and the API only: no eBPF, overlay, tasks or DNS
    /// listeners. For control-plane benchmarks with many agents on one machine; such a node
    /// forwards nothing.
    pub control_plane_only: bool,
    /// Serve the read-only cluster visualizer on this address (e.g. 127.0.0.1:8090); off
    /// when unset. It shows the whole cluster and has no authentication: keep it on
    /// loopback or a management network.
    pub ui_listen: Option<SocketAddr>,
    /// Serve Prometheus metrics at /metrics on this address (e.g. 127.0.0.1:9464); off when
    /// unset.
    pub metrics_listen: Option<SocketAddr>,
    /// The routing mesh's flow tables and SNAT ports (`[dataplane]`; file only, no flags).
    pub dataplane: DataplaneConfig,
    /// CPUs this node offers to tasks' reservations, e.g. 2 or 1.5 (default: the CPUs the
    /// agent may run on). File only.
    pub cpus: Option<f64>,
    /// Memory this node offers to tasks' reservations, e.g. "4g" (Docker's sizes; default:
    /// the kernel's MemTotal). File only.
    pub memory: Option<String>,
    /// How much output a task may keep on this node (`[task_logs]`; file only).
    pub task_logs: TaskLogsConfig,
}

/// `[task_logs]`: the rotation of every task's log on this node, and the most a service's
/// `--log-opt max-size/max-file` may ask for (it may only ask for less), so no service can
/// fill the node's disk. At most `max_size × max_file` bytes per task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskLogsConfig {
    /// Rotate a task's log file before it grows past this (Docker's sizes: "10m").
    pub max_size: String,
    /// Files kept per task, the current one included.
    pub max_file: u32,
}

impl Default for TaskLogsConfig {
    fn default() -> Self {
        Self {
            max_size: "10m".into(),
            max_file: crate::task::DEFAULT_LOG_MAX_FILE,
        }
    }
}

impl TaskLogsConfig {
    /// (bytes, files), or what is wrong with them.
    pub fn limits(&self) -> Result<(u64, u32)> {
        let size = mesh_api::spec::bytes("[task_logs] max_size", &self.max_size)
            .map_err(anyhow::Error::msg)?;
        if size < 4096 {
            bail!(
                "[task_logs] max_size = {:?} is too small: use 4k or more (default 10m)",
                self.max_size
            );
        }
        let most = crate::task::MAX_LOG_FILES;
        if !(1..=most).contains(&self.max_file) {
            bail!(
                "[task_logs] max_file = {} is out of range: use 1 to {most} (default {})",
                self.max_file,
                crate::task::DEFAULT_LOG_MAX_FILE
            );
        }
        Ok((size, self.max_file))
    }
}

/// `[dataplane]`: sizes of the flow tables and the SNAT port policy. Sizes take effect when
/// the maps are created (first start, or after their pins are removed): pinned maps keep
/// their size across restarts so established flows survive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataplaneConfig {
    /// Established routing-mesh connections the node holds (two entries each).
    pub max_flows: u32,
    /// New connections whose client has not yet answered the backend (two entries each).
    /// A flood of spoofed SYNs or UDP datagrams fills only this table, evicting its oldest
    /// entries; legitimate connections need a place here for one round trip.
    pub max_embryonic_flows: u32,
    /// SNAT ports held after their connection closed (one per closed connection within
    /// `snat_reuse_delay_s`): about the peak closed connections per second × the delay.
    pub max_snat_reservations: u32,
    /// Source ports of routing-mesh SNAT; keep them below the kernel's ephemeral range
    /// (net.ipv4.ip_local_port_range).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Seconds a closed TCP connection's SNAT port stays reserved towards its backend:
    /// longer than the backend's TIME_WAIT (60 s on Linux). 0 turns reservations off.
    pub snat_reuse_delay_s: u64,
    /// Client-address connections to this node's own tasks whose replies it sends back
    /// through the node they came in by (one entry each). When full, the least recently
    /// used goes and its connection's next reply takes the task's own route.
    pub max_return_paths: u32,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        let limits = crate::lb::LbLimits::default();
        let timeouts = crate::lb::FlowTimeouts::default();
        Self {
            max_flows: limits.flows / 2,
            max_embryonic_flows: limits.embryos / 2,
            max_snat_reservations: limits.snat_reservations,
            snat_port_min: mesh_common::lb::DEFAULT_SNAT_PORT_MIN,
            snat_port_max: mesh_common::lb::DEFAULT_SNAT_PORT_MAX,
            snat_reuse_delay_s: timeouts.snat_reuse_delay.as_secs(),
            max_return_paths: limits.returns,
        }
    }
}

impl DataplaneConfig {
    /// Checks the values; errors name the key and what would be accepted.
    pub fn validate(&self) -> Result<()> {
        let max_flows = u32::MAX / 2;
        if !(1024..=max_flows).contains(&self.max_flows) {
            bail!(
                "[dataplane] max_flows = {} is out of range: use 1024 to {max_flows} \
                 (default {})",
                self.max_flows,
                Self::default().max_flows
            );
        }
        if !(256..=self.max_flows).contains(&self.max_embryonic_flows) {
            bail!(
                "[dataplane] max_embryonic_flows = {} is out of range: use 256 to max_flows ({}) \
                 (default {})",
                self.max_embryonic_flows,
                self.max_flows,
                Self::default().max_embryonic_flows
            );
        }
        if self.max_snat_reservations < 256 {
            bail!(
                "[dataplane] max_snat_reservations = {} is too small: use at least 256 \
                 (default {})",
                self.max_snat_reservations,
                Self::default().max_snat_reservations
            );
        }
        if self.snat_port_min == 0 || self.snat_port_min > self.snat_port_max {
            bail!(
                "[dataplane] SNAT ports {}-{} are not a range: snat_port_min must be at least 1 \
                 and at most snat_port_max",
                self.snat_port_min,
                self.snat_port_max
            );
        }
        // Each embryo holds a SNAT port towards its backend. A table larger than half the
        // range lets a flood at a one-task service hold every port before the LRU evicts
        // anything, and new connections then find no port at all.
        let ports = u32::from(self.snat_port_max - self.snat_port_min) + 1;
        if self.max_embryonic_flows > ports / 2 {
            bail!(
                "[dataplane] max_embryonic_flows = {} is more than half the {ports} SNAT ports \
                 ({}-{}): a flood would hold every port of a single backend in embryos; use at \
                 most {} or widen the range",
                self.max_embryonic_flows,
                self.snat_port_min,
                self.snat_port_max,
                ports / 2
            );
        }
        if !(1024..=1 << 24).contains(&self.max_return_paths) {
            bail!(
                "[dataplane] max_return_paths = {} is out of range: use 1024 to {} (default {})",
                self.max_return_paths,
                1 << 24,
                Self::default().max_return_paths
            );
        }
        if self.snat_reuse_delay_s > 3600 {
            bail!(
                "[dataplane] snat_reuse_delay_s = {} is out of range: use 0 to 3600 (default {}; \
                 Linux holds TIME_WAIT for 60 s)",
                self.snat_reuse_delay_s,
                Self::default().snat_reuse_delay_s
            );
        }
        Ok(())
    }

    /// The map sizes these settings ask for.
    pub fn limits(&self) -> crate::lb::LbLimits {
        crate::lb::LbLimits {
            flows: 2 * self.max_flows,
            embryos: 2 * self.max_embryonic_flows,
            snat_reservations: self.max_snat_reservations,
            returns: self.max_return_paths,
            ..crate::lb::LbLimits::default()
        }
    }

    pub fn snat_ports(&self) -> std::ops::RangeInclusive<u16> {
        self.snat_port_min..=self.snat_port_max
    }

    pub fn flow_timeouts(&self) -> crate::lb::FlowTimeouts {
        crate::lb::FlowTimeouts {
            snat_reuse_delay: Duration::from_secs(self.snat_reuse_delay_s),
            ..crate::lb::FlowTimeouts::default()
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            node_name: None,
            advertise: None,
            interface: None,
            join: Vec::new(),
            cluster: "mesh".into(),
            gossip_port: crate::gossip::DEFAULT_PORT,
            cluster_key_file: None,
            admin_key_dir: None,
            insecure: false,
            labels: BTreeMap::new(),
            gossip_interval_ms: 100,
            phi_threshold: 8.0,
            settle_ms: 0,
            restart_grace_ms: 10_000,
            socket: mesh_api::v1::DEFAULT_SOCKET.into(),
            docker_socket: None,
            docker_socket_group: None,
            state_dir: "/var/lib/mesh".into(),
            bpffs: "/sys/fs/bpf/mesh".into(),
            cgroup: None,
            gateway_subnet: "172.31.0.0/16".parse().expect("valid subnet"),
            dns_upstreams: Vec::new(),
            cleanup_on_exit: false,
            control_plane_only: false,
            ui_listen: None,
            metrics_listen: None,
            dataplane: DataplaneConfig::default(),
            cpus: None,
            memory: None,
            task_logs: TaskLogsConfig::default(),
        }
    }
}

impl AgentConfig {
    /// Where the Docker API is served, if it is: beside the API socket unless set; an
    /// empty path turns it off.
    pub fn docker_socket(&self) -> Option<PathBuf> {
        match &self.docker_socket {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p.clone()),
            None => Some(
                self.socket
                    .parent()
                    .unwrap_or(Path::new("/run/mesh"))
                    .join("docker.sock"),
            ),
        }
    }

    /// Reads a config file; a missing default file is an empty config, a missing explicit one
    /// an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .with_context(|| format!("{} is not a valid agent config", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn gossip_interval(&self) -> Duration {
        Duration::from_millis(self.gossip_interval_ms)
    }

    pub fn restart_grace(&self) -> Duration {
        Duration::from_millis(self.restart_grace_ms)
    }

    pub fn settle(&self) -> Duration {
        Duration::from_millis(self.settle_ms)
    }

    /// Fills what was left out from the host, and checks the rest.
    pub fn resolve(mut self) -> Result<ResolvedConfig> {
        let advertise = match self.advertise {
            Some(a) => a,
            None => bail!(
                "no advertise address: pass --advertise <underlay IPv4> or set advertise in {DEFAULT_CONFIG}"
            ),
        };
        let interface = match self.interface.take() {
            Some(i) => i,
            None => interface_with_address(advertise)?.with_context(|| {
                format!("no interface holds {advertise}: pass --interface or fix --advertise")
            })?,
        };
        let node_name = match self.node_name.take() {
            Some(n) => n,
            None => nix::unistd::gethostname()
                .context("reading the hostname")?
                .to_string_lossy()
                .into_owned(),
        };
        if node_name.is_empty()
            || node_name.len() > 64
            || node_name.contains(|c: char| c.is_whitespace() || c == '/')
        {
            bail!(
                "node name {node_name:?} is not valid: use up to 64 characters without spaces or slashes"
            );
        }
        if !(1.0..=1000.0).contains(&self.phi_threshold) {
            bail!(
                "phi_threshold {} is out of range: use 1 to 1000 (8 is typical)",
                self.phi_threshold
            );
        }
        if self.gossip_interval_ms == 0 {
            bail!("gossip_interval_ms must be positive");
        }
        for (k, v) in &self.labels {
            mesh_api::spec::parse_label(&format!("{k}={v}"))
                .map_err(|e| anyhow::anyhow!("labels in the agent config: {e}"))?;
        }
        self.dataplane.validate()?;
        self.task_logs.limits()?;
        let capacity = self.capacity().map_err(anyhow::Error::msg)?;
        if self.cluster_key_file.is_none() && !self.insecure {
            bail!(
                "no cluster key: gossip would be open to any host that reaches port {}/udp. \
                 Create one with `mesh-agent keygen --out /etc/mesh/cluster.key`, copy it to \
                 every node and set cluster_key_file in {DEFAULT_CONFIG} (or pass \
                 --cluster-key-file); `mesh-agent init` and `join` do this for you. To run \
                 without one anyway, pass --insecure (insecure = true)",
                self.gossip_port
            );
        }
        Ok(ResolvedConfig {
            node_name,
            advertise,
            interface,
            capacity,
            config: self,
        })
    }

    /// What the node advertises for reservations: the kernel's numbers, each replaced by
    /// `cpus` or `memory` when set.
    fn capacity(&self) -> Result<mesh_api::spec::Resources, String> {
        let mut r = crate::capacity::detect();
        if let Some(cpus) = self.cpus {
            r.nano_cpus = crate::capacity::cpus_setting(cpus)?;
        }
        if let Some(memory) = &self.memory {
            r.memory_bytes = crate::capacity::memory_setting(memory)?;
        }
        Ok(r)
    }
}

#[derive(Clone, Debug)]
pub struct ResolvedConfig {
    pub node_name: String,
    pub advertise: Ipv4Addr,
    pub interface: String,
    /// What the node offers to tasks' reservations (see [`AgentConfig::cpus`]).
    pub capacity: mesh_api::spec::Resources,
    pub config: AgentConfig,
}

impl AgentConfig {
    /// The directory of the admin key: `admin_key_dir`, else beside the cluster key file.
    pub fn admin_key_dir(&self) -> Option<PathBuf> {
        self.admin_key_dir.clone().or_else(|| {
            self.cluster_key_file
                .as_deref()
                .and_then(|f| f.parent())
                .map(|d| d.to_path_buf())
        })
    }
}

impl std::ops::Deref for ResolvedConfig {
    type Target = AgentConfig;
    fn deref(&self) -> &AgentConfig {
        &self.config
    }
}

/// The interface that holds `addr`, from getifaddrs.
fn interface_with_address(addr: Ipv4Addr) -> Result<Option<String>> {
    let addrs = nix::ifaddrs::getifaddrs().context("listing interfaces")?;
    for ifa in addrs {
        if let Some(sa) = ifa.address
            && let Some(sin) = sa.as_sockaddr_in()
            && sin.ip() == addr
        {
            return Ok(Some(ifa.interface_name));
        }
    }
    Ok(None)
}

/// Upstream resolvers from a resolv.conf, skipping loopback ones (they would be ourselves or
/// a local stub that cannot be reached from task namespaces).
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
        .filter(|ip| !ip.is_loopback())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_a_default_and_unknown_keys_are_errors() {
        let c: AgentConfig =
            toml::from_str("advertise = \"192.0.2.1\"\njoin = [\"192.0.2.2\"]").unwrap();
        assert_eq!(c.advertise, Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(c.gossip_port, 7946);
        let e = toml::from_str::<AgentConfig>("advertize = \"192.0.2.1\"").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn task_logs_cap_reads_dockers_sizes_and_refuses_what_cannot_be() {
        let c: AgentConfig =
            toml::from_str("[task_logs]\nmax_size = \"1m\"\nmax_file = 3").unwrap();
        assert_eq!(c.task_logs.limits().unwrap(), (1 << 20, 3));
        assert_eq!(
            AgentConfig::default().task_logs.limits().unwrap(),
            (10 << 20, 2)
        );
        for bad in ["max_size = \"1\"", "max_file = 0", "max_size = \"lots\""] {
            let c: AgentConfig = toml::from_str(&format!("[task_logs]\n{bad}")).unwrap();
            let e = c.task_logs.limits().unwrap_err().to_string();
            assert!(e.contains("max_"), "{bad}: {e}");
        }
    }

    #[test]
    fn no_key_is_refused_unless_insecure() {
        let base = "advertise = \"127.0.0.1\"\ninterface = \"lo\"\nnode_name = \"n\"\n";
        let c: AgentConfig = toml::from_str(base).unwrap();
        let e = format!("{:#}", c.resolve().unwrap_err());
        assert!(
            e.contains("no cluster key") && e.contains("--insecure"),
            "{e}"
        );
        let c: AgentConfig = toml::from_str(&format!("{base}insecure = true")).unwrap();
        c.resolve().unwrap();
        let c: AgentConfig = toml::from_str(&format!(
            "{base}cluster_key_file = \"/etc/mesh/cluster.key\""
        ))
        .unwrap();
        c.resolve().unwrap();
    }

    #[test]
    fn labels_come_from_a_toml_table() {
        let c: AgentConfig = toml::from_str("labels = { type = \"low-memory\" }").unwrap();
        assert_eq!(c.labels["type"], "low-memory");
        let bad: AgentConfig = toml::from_str(
            "advertise = \"127.0.0.1\"\ninterface = \"lo\"\nlabels = { \"a b\" = \"c\" }",
        )
        .unwrap();
        let e = format!("{:#}", bad.resolve().unwrap_err());
        assert!(e.contains("contains spaces"), "{e}");
    }

    #[test]
    fn capacity_comes_from_the_kernel_unless_the_config_sets_it() {
        let base = "advertise = \"127.0.0.1\"\ninterface = \"lo\"\nnode_name = \"n1\"\n\
                    insecure = true\n";
        let c: AgentConfig = toml::from_str(base).unwrap();
        let detected = c.resolve().unwrap().capacity;
        assert_eq!(detected, crate::capacity::detect());
        let c: AgentConfig = toml::from_str(&format!("{base}cpus = 2\nmemory = \"1g\"")).unwrap();
        let r = c.resolve().unwrap().capacity;
        assert_eq!((r.nano_cpus, r.memory_bytes), (2_000_000_000, 1 << 30));
        let c: AgentConfig = toml::from_str(&format!("{base}cpus = 0.5")).unwrap();
        let r = c.resolve().unwrap().capacity;
        assert_eq!(r.nano_cpus, 500_000_000);
        assert_eq!(
            r.memory_bytes, detected.memory_bytes,
            "memory stays the kernel's"
        );
        for (bad, says) in [
            ("cpus = -1", "cpus = -1 in the agent config"),
            ("memory = \"512Q\"", "invalid memory \"512Q\""),
        ] {
            let c: AgentConfig = toml::from_str(&format!("{base}{bad}")).unwrap();
            let e = format!("{:#}", c.resolve().unwrap_err());
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_dataplane_section_has_defaults_and_refuses_bad_values() {
        let c: AgentConfig = toml::from_str("[dataplane]\nmax_embryonic_flows = 4096").unwrap();
        assert_eq!(c.dataplane.max_embryonic_flows, 4096);
        assert_eq!(c.dataplane.max_flows, 65_536);
        assert_eq!(c.dataplane.limits().embryos, 8192);
        let defaults = AgentConfig::default().dataplane;
        assert_eq!(defaults.max_embryonic_flows, 8192);
        // What the README promises the defaults cost: about 30 MB.
        assert_eq!(defaults.limits().flow_table_bytes() / 1_000_000, 30);
        c.dataplane.validate().unwrap();
        let e = toml::from_str::<AgentConfig>("[dataplane]\nmax_flow = 1").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        for (text, says) in [
            ("max_flows = 10", "max_flows = 10 is out of range"),
            (
                "max_return_paths = 10",
                "max_return_paths = 10 is out of range",
            ),
            (
                "max_flows = 2048\nmax_embryonic_flows = 4096",
                "max_embryonic_flows = 4096 is out of range",
            ),
            (
                "snat_port_min = 5000\nsnat_port_max = 4000",
                "are not a range",
            ),
            ("max_snat_reservations = 1", "too small"),
            (
                "snat_port_min = 20000\nsnat_port_max = 21999",
                "more than half the 2000 SNAT ports",
            ),
        ] {
            let c: AgentConfig = toml::from_str(&format!("[dataplane]\n{text}")).unwrap();
            let e = c.dataplane.validate().unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn resolv_conf_upstreams_skip_loopback() {
        let text = "search example\nnameserver 127.0.0.53\nnameserver 192.0.2.53\nnameserver 2001:db8::1\n";
        let got = upstreams_from_resolv_conf(text);
        assert_eq!(
            got,
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "[2001:db8::1]:53".parse().unwrap()
            ]
        );
    }
}
