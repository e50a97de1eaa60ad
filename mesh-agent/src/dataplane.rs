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
//!
//! Here: loading, pins and test runs. `attach.rs` puts the programs on their hooks,
//! `steering.rs` keeps the per-namespace maps of the socket hooks and DNS, `task_ports.rs`
//! the programs on tasks' veths and the return table.

mod attach;
mod steering;
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

/// The per-packet bench's reference load balancer (mesh-ebpf's `reference-lb`), built by
/// the same build script. The agent never loads it; `cargo xtask bench reference` times
/// the routing mesh against it.
pub static REFERENCE_LB_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reference-lb"));

const UNDERLAY_PROGRAM: &str = "mesh_underlay";
/// The routing mesh (TC ingress on the underlay and on network bridges).
pub const LB_INGRESS_PROGRAM: &str = "mesh_lb_ingress";
/// Replies of client-address flows from other nodes (TC ingress on networks' VXLAN devices).
pub const FROM_OVERLAY_PROGRAM: &str = "mesh_from_overlay";
/// Client-address flows on local tasks' host veths: learning (egress, towards the task) and
/// steering replies (ingress, from the task).
pub const TO_TASK_PROGRAM: &str = "mesh_to_task";
pub const FROM_TASK_PROGRAM: &str = "mesh_from_task";
/// Socket load balancing, attached at the cgroup v2 root.
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
        let sizes = limits.map_sizes(pin_dir)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        sizes.apply(&mut loader);
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

    /// Runs the overlay program (a network's VXLAN device) on a test frame.
    pub fn test_run_from_overlay(&self, frame: &[u8], ctx: SkbContext) -> Result<TestRun> {
        let fd = self.program_fd(FROM_OVERLAY_PROGRAM)?;
        bpf::test_run_skb(fd, frame, 1, ctx).context("BPF_PROG_TEST_RUN")
    }

    fn program_fd(&self, name: &str) -> Result<BorrowedFd<'_>> {
        let program = self
            .ebpf
            .program(name)
            .with_context(|| format!("{name} missing from the eBPF object"))?;
        Ok(program.fd()?.as_fd())
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
    program::<Xdp>(ebpf, UNDERLAY_PROGRAM)?
        .load()
        .with_context(|| format!("verifier rejected {UNDERLAY_PROGRAM}"))?;
    for name in [
        LB_INGRESS_PROGRAM,
        FROM_OVERLAY_PROGRAM,
        TO_TASK_PROGRAM,
        FROM_TASK_PROGRAM,
    ] {
        program::<SchedClassifier>(ebpf, name)?
            .load()
            .with_context(|| format!("verifier rejected {name}"))?;
    }
    for name in SOCK_PROGRAMS {
        program::<CgroupSockAddr>(ebpf, name)?
            .load()
            .with_context(|| format!("verifier rejected {name}"))?;
    }
    Ok(())
}

/// The program `name` of the object, as the kind it is declared as.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("{name} missing from the eBPF object"))?;
    Ok(program.try_into()?)
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

/// CLOCK_MONOTONIC in nanoseconds: the clock bpf_ktime_get_coarse_ns reads (and `perf
/// record -k CLOCK_MONOTONIC` stamps samples with, which the reference bench matches).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and output pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
