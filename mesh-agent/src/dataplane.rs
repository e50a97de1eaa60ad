//! Loading the eBPF programs, attaching them, and reading their maps.
//!
//! Maps and links are pinned under the node's bpffs directory so the dataplane keeps
//! forwarding while the agent is down; a restarted agent reopens the pinned maps and swaps
//! its freshly loaded programs into the pinned links atomically.
//!
//! Attach points: XDP (port counters) and TC ingress (routing mesh) on the underlay
//! interface, TC ingress on every network's bridge (routing-mesh replies), TC on local tasks'
//! host veths (client-address replies, see task_ports.rs), and the socket load-balancing
//! hooks at the cgroup v2 root, scoped by network namespace.

mod task_ports;

pub use task_ports::{ReturnTimeouts, TaskVeth};

use std::{
    fs, io,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
    sys::SyscallError,
};
use mesh_common::{
    lb::NetnsEntry,
    stats::{PORT_COUNTERS_MAP, PortCounter},
};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::{
    bpf::{self, SkbContext, TestRun},
    lb::{LbLimits, LoadBalancer},
};

/// The object built from mesh-ebpf by this crate's build script.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

const UNDERLAY_PROGRAM: &str = "mesh_underlay";
/// The routing mesh (TC ingress on the underlay and on network bridges).
pub const LB_INGRESS_PROGRAM: &str = "mesh_lb_ingress";
/// Socket load balancing, attached at the cgroup v2 root.
/// Client-address flows on local tasks' host veths: learning (egress, towards the task) and
/// steering replies (ingress, from the task).
pub const TO_TASK_PROGRAM: &str = "mesh_to_task";
pub const FROM_TASK_PROGRAM: &str = "mesh_from_task";
const SOCK_PROGRAMS: [&str; 4] = [
    "mesh_lb_connect",
    "mesh_lb_sendmsg",
    "mesh_lb_recvmsg",
    "mesh_lb_peer",
];

pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    lb: LoadBalancer,
}

impl Dataplane {
    /// Loads the programs with maps pinned in `pin_dir` (reusing maps already pinned there)
    /// and attaches the underlay programs to `underlay_iface`.
    pub fn start(pin_dir: &Path, underlay_iface: &str) -> Result<Self> {
        Self::start_with_limits(pin_dir, underlay_iface, &LbLimits::default())
    }

    /// [`Dataplane::start`] with map sizes of the agent's `[dataplane]` config.
    pub fn start_with_limits(
        pin_dir: &Path,
        underlay_iface: &str,
        limits: &LbLimits,
    ) -> Result<Self> {
        let mut dp = Self::load(pin_dir, limits)?;
        dp.attach_underlay(underlay_iface)?;
        Ok(dp)
    }

    /// Loads every program into the kernel (so verifier errors surface here) and adopts the
    /// maps pinned in `pin_dir`, without attaching anything.
    pub fn load(pin_dir: &Path, limits: &LbLimits) -> Result<Self> {
        ensure_bpffs(pin_dir)?;
        fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating bpffs directory {}", pin_dir.display()))?;
        crate::lb::check_pinned_layouts(pin_dir)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        limits.size_maps(&mut loader, pin_dir);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the mesh eBPF object")?;
        spawn_ebpf_logger(&mut ebpf);
        load_programs(&mut ebpf)?;
        let lb = LoadBalancer::open(&mut ebpf)?;
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            lb,
        })
    }

    pub fn lb(&self) -> &LoadBalancer {
        &self.lb
    }

    pub fn lb_mut(&mut self) -> &mut LoadBalancer {
        &mut self.lb
    }

    /// Attaches the port counters (XDP) and the routing mesh (TC ingress) to the underlay.
    pub fn attach_underlay(&mut self, iface: &str) -> Result<()> {
        self.attach_xdp(iface)?;
        self.attach_tc(iface)?;
        info!(iface, "routing mesh attached");
        Ok(())
    }

    /// Attaches the routing mesh to a network's bridge, where replies from backends arrive.
    /// Idempotent; a program left by a previous agent is replaced in place.
    pub fn attach_network(&mut self, bridge_ifindex: u32) -> Result<()> {
        let iface = ifname(bridge_ifindex)?;
        self.attach_tc(&iface)?;
        info!(iface, "routing mesh attached to network bridge");
        Ok(())
    }

    /// Detaches the routing mesh from a network's bridge (a bridge that is deleted detaches
    /// by itself; this also drops the pin).
    pub fn detach_network(&mut self, bridge_ifindex: u32) -> Result<()> {
        let iface = ifname(bridge_ifindex)?;
        self.detach_tc(&iface)
    }

    /// Detaches the routing mesh from an interface by name (for bridges already gone).
    pub fn detach_tc(&mut self, iface: &str) -> Result<()> {
        let pin = self.pin_dir.join(format!("link_tc_{iface}"));
        match fs::remove_file(&pin) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", pin.display()))
            }
            _ => Ok(()),
        }
    }

    /// Attaches socket load balancing (and the 127.0.0.11 steering) at the root of the cgroup
    /// v2 hierarchy, so it sees every process whatever cgroup it lives in: tasks, containers
    /// of any runtime, `ip netns exec` shells. The programs act only on sockets of the
    /// namespaces in `LB_NETNS` (see [`Dataplane::steer_netns`]) and the node's own. Returns
    /// the cgroup attached to. Idempotent; links a previous agent left are updated in place.
    pub fn attach_sockets(&mut self) -> Result<PathBuf> {
        let root = crate::cgroup::cgroup2_mount()?;
        for name in SOCK_PROGRAMS {
            let pin = self.pin_dir.join(format!("link_{name}_root"));
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("{name} missing from the eBPF object"))?
                .try_into()?;
            let prog_fd = program.fd()?.as_fd().try_clone_to_owned()?;
            relink(&pin, prog_fd.as_fd(), || {
                let dir = fs::File::open(&root)
                    .with_context(|| format!("opening cgroup {}", root.display()))?;
                // Through a bpf_link (which aya uses on this kernel) the program always
                // coexists with others on the cgroup (other agents', systemd's); the link
                // API refuses the multi flag.
                let id = program
                    .attach(dir, CgroupAttachMode::Single)
                    .with_context(|| format!("attaching {name} to {}", root.display()))?;
                Ok(program.take_link(id)?.try_into()?)
            })?;
        }
        self.remove_cgroup_links_but_root()?;
        info!(cgroup = %root.display(), "socket load balancing attached");
        Ok(root)
    }

    /// Agents before the root attach pinned one link per program on their own cgroup
    /// (`link_<program>_<cgroup path>`); those links would balance a second time, so they go.
    fn remove_cgroup_links_but_root(&self) -> Result<()> {
        let Ok(entries) = fs::read_dir(&self.pin_dir) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stale = SOCK_PROGRAMS.iter().any(|p| {
                name.starts_with(&format!("link_{p}_")) && name != format!("link_{p}_root")
            });
            if stale {
                info!(
                    pin = name,
                    "removing a socket hook link of an earlier agent"
                );
                fs::remove_file(e.path())
                    .with_context(|| format!("removing {}", e.path().display()))?;
            }
        }
        Ok(())
    }

    /// Lets the socket hooks act in the network namespace `netns_cookie` (a task's or an
    /// endpoint's, `kind` one of mesh_common::lb::NETNS_*).
    pub fn steer_netns(&mut self, netns_cookie: u64, kind: u32) -> Result<()> {
        self.netns_map()?
            .insert(netns_cookie, NetnsEntry { kind }, 0)
            .context("adding a namespace to the socket hooks")
    }

    /// The socket hooks leave the namespace alone from now on. Absent is not an error.
    pub fn unsteer_netns(&mut self, netns_cookie: u64) -> Result<()> {
        match self.netns_map()?.remove(&netns_cookie) {
            Err(aya::maps::MapError::KeyNotFound) | Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(e).context("removing a namespace from the socket hooks"),
        }
    }

    /// The namespaces the socket hooks act in, by cookie.
    pub fn steered_netns(&mut self) -> Result<Vec<(u64, u32)>> {
        let map = self.netns_map()?;
        let mut out = Vec::new();
        for kv in map.iter() {
            let (k, v) = kv.context("reading the steered namespaces")?;
            out.push((k, v.kind));
        }
        Ok(out)
    }

    fn netns_map(&mut self) -> Result<BpfHashMap<&mut aya::maps::MapData, u64, NetnsEntry>> {
        let map = self
            .ebpf
            .map_mut(mesh_common::lb::NETNS_MAP)
            .context("namespace map missing from the eBPF object")?;
        Ok(BpfHashMap::try_from(map)?)
    }

    /// Runs the routing-mesh program on a test frame (BPF_PROG_TEST_RUN) against the live
    /// maps: for unit tests and ns/packet measurements.
    pub fn test_run_lb_ingress(
        &self,
        frame: &[u8],
        repeat: u32,
        ctx: SkbContext,
    ) -> Result<TestRun> {
        let fd = self.program_fd(LB_INGRESS_PROGRAM)?;
        bpf::test_run_skb(fd, frame, repeat, ctx).context("BPF_PROG_TEST_RUN")
    }

    fn program_fd(&self, name: &str) -> Result<BorrowedFd<'_>> {
        let program = self
            .ebpf
            .program(name)
            .with_context(|| format!("{name} missing from the eBPF object"))?;
        Ok(program.fd()?.as_fd())
    }

    fn attach_tc(&mut self, iface: &str) -> Result<()> {
        let pin = self.pin_dir.join(format!("link_tc_{iface}"));
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(LB_INGRESS_PROGRAM)
            .context("routing mesh program missing from the eBPF object")?
            .try_into()?;
        let prog_fd = program.fd()?.as_fd().try_clone_to_owned()?;
        relink(&pin, prog_fd.as_fd(), || {
            let id = program
                .attach(iface, TcAttachType::Ingress)
                .with_context(|| format!("attaching TC ingress to {iface}"))?;
            Ok(program.take_link(id)?.try_into()?)
        })
    }

    fn attach_xdp(&mut self, iface: &str) -> Result<()> {
        let link_pin = self.pin_dir.join(format!("link_xdp_{iface}"));
        let program: &mut Xdp = self
            .ebpf
            .program_mut(UNDERLAY_PROGRAM)
            .context("underlay program missing from the eBPF object")?
            .try_into()?;
        let link_id = match PinnedLink::from_pin(&link_pin) {
            Ok(pinned) => {
                // A previous agent left the program attached: replace it in place so no
                // packet is processed without a program.
                let fd_link: FdLink = pinned
                    .unpin()
                    .context("unpinning the previous underlay link")?;
                info!(iface, "replacing the pinned underlay program");
                program.attach_to_link(XdpLink::try_from(fd_link)?)?
            }
            Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                if io_error.kind() == io::ErrorKind::NotFound =>
            {
                program
                    .attach(iface, XdpMode::default())
                    .with_context(|| format!("attaching XDP to {iface}"))?
            }
            Err(e) => return Err(e).context("opening the pinned underlay link"),
        };
        let link = program.take_link(link_id)?;
        let fd_link: FdLink = link
            .try_into()
            .context("XDP attached through netlink, which cannot be pinned")?;
        fd_link
            .pin(&link_pin)
            .with_context(|| format!("pinning {}", link_pin.display()))?;
        Ok(())
    }

    /// Packets and bytes per destination port seen on the underlay, summed over CPUs; ports
    /// with no traffic are left out.
    pub fn port_counters(&self) -> Result<Vec<(u16, PortCounter)>> {
        let map = self
            .ebpf
            .map(PORT_COUNTERS_MAP)
            .context("port counter map missing")?;
        let counters: PerCpuArray<_, PortCounter> = PerCpuArray::try_from(map)?;
        let mut out = Vec::new();
        for (port, per_cpu) in counters.iter().enumerate() {
            let total = per_cpu?
                .iter()
                .fold(PortCounter::default(), |acc, c| PortCounter {
                    packets: acc.packets + c.packets,
                    bytes: acc.bytes + c.bytes,
                });
            if total.packets > 0 {
                out.push((port as u16, total));
            }
        }
        Ok(out)
    }

    /// Points 127.0.0.11:53 in the network namespace `netns_cookie` at the resolver
    /// listener on `port` (see mesh_common::dns).
    pub fn set_resolver(&mut self, netns_cookie: u64, port: u16) -> Result<()> {
        self.resolvers()?
            .insert(netns_cookie, port, 0)
            .context("adding a task's resolver port")
    }

    pub fn remove_resolver(&mut self, netns_cookie: u64) -> Result<()> {
        match self.resolvers()?.remove(&netns_cookie) {
            Err(aya::maps::MapError::KeyNotFound) | Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(e).context("removing a task's resolver port"),
        }
    }

    /// Forgets every resolver port (a restarted agent opens new listeners).
    pub fn clear_resolvers(&mut self) -> Result<()> {
        let mut map = self.resolvers()?;
        let keys: Vec<u64> = map.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = map.remove(&k);
        }
        Ok(())
    }

    fn resolvers(&mut self) -> Result<BpfHashMap<&mut aya::maps::MapData, u64, u16>> {
        let map = self
            .ebpf
            .map_mut(mesh_common::dns::RESOLVERS_MAP)
            .context("resolver map missing from the eBPF object")?;
        Ok(BpfHashMap::try_from(map)?)
    }

    /// Removes every pin, so the dataplane stops when this process exits. Used by
    /// `--cleanup-on-exit`; a plain stop leaves the pins so forwarding continues.
    pub fn remove_pins(&self) -> Result<()> {
        let dir = &self.pin_dir;
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
        }
    }
}

/// Loads every program so the verifier checks them all at start.
fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    let program: &mut Xdp = ebpf
        .program_mut(UNDERLAY_PROGRAM)
        .context("underlay program missing from the eBPF object")?
        .try_into()?;
    program
        .load()
        .context("verifier rejected the underlay program")?;
    let program: &mut SchedClassifier = ebpf
        .program_mut(LB_INGRESS_PROGRAM)
        .context("routing mesh program missing from the eBPF object")?
        .try_into()?;
    program
        .load()
        .context("verifier rejected the routing mesh program")?;
    for name in [TO_TASK_PROGRAM, FROM_TASK_PROGRAM] {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("{name} missing from the eBPF object"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("verifier rejected {name}"))?;
    }
    for name in SOCK_PROGRAMS {
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("{name} missing from the eBPF object"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("verifier rejected {name}"))?;
    }
    Ok(())
}

/// Points the link pinned at `pin` to `prog` (atomically: the hook never runs without a
/// program), or creates a link with `attach` and pins it.
fn relink(pin: &Path, prog: BorrowedFd<'_>, attach: impl FnOnce() -> Result<FdLink>) -> Result<()> {
    match bpf::obj_get(pin) {
        Ok(link) => match bpf::link_update(link.as_fd(), prog) {
            Ok(()) => return Ok(()),
            // A link whose device or cgroup is gone cannot be updated: start over.
            Err(e) => {
                warn!(pin = %pin.display(), "pinned link is stale ({e}); attaching anew");
                fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))?;
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("opening pinned link {}", pin.display())),
    }
    attach()?
        .pin(pin)
        .with_context(|| format!("pinning {}", pin.display()))?;
    Ok(())
}

fn ifname(ifindex: u32) -> Result<String> {
    let name = nix::net::if_::if_indextoname(ifindex)
        .with_context(|| format!("no interface with index {ifindex} in this namespace"))?;
    Ok(name.to_string_lossy().into_owned())
}

/// Mounts bpffs at its usual place when the host has not (this machine kind boots without).
fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(root) {
        return Ok(());
    }
    let st = nix::sys::statfs::statfs(root).context("statfs /sys/fs/bpf")?;
    if st.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .context("running mount -t bpf")?;
    if !status.success() {
        bail!("/sys/fs/bpf is not a bpf filesystem and mounting one failed ({status})");
    }
    Ok(())
}

/// Forwards aya-log records from the eBPF ring buffer into tracing. The programs only log on
/// rare events, never per packet.
fn spawn_ebpf_logger(ebpf: &mut Ebpf) {
    // Tests and tools load the dataplane outside a runtime; they have nobody to log to.
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => {
            // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd owns it.
            let registered =
                unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
            let Ok(mut fd) = registered else {
                warn!("cannot poll the eBPF log buffer; eBPF logs are off");
                return;
            };
            tokio::spawn(async move {
                loop {
                    let Ok(mut guard) = fd.readable_mut().await else {
                        break;
                    };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        // Programs that never log have no log map.
        Err(e) => tracing::debug!("eBPF logging not available: {e}"),
    }
}

/// The MTU of an interface in this process's network namespace. (sysfs would show the
/// namespace it was mounted in, which under `nsenter --net` is not ours.)
pub fn interface_mtu(iface: &str) -> Result<u32> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").context("opening a socket for SIOCGIFMTU")?;
    // SAFETY: ifreq is plain data; the name is NUL-terminated within IFNAMSIZ.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if iface.len() >= req.ifr_name.len() {
        bail!("interface name {iface:?} is too long");
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(iface.bytes()) {
        *dst = src as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: SIOCGIFMTU reads the name and writes ifru_mtu of a valid ifreq.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("reading the MTU of {iface}"));
    }
    // SAFETY: the kernel filled the mtu member.
    Ok(unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock bpf_ktime_get_coarse_ns reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and output pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
