//! Loading the eBPF programs, attaching them, and reading their maps.
//!
//! Maps and links are pinned under the node's bpffs directory so the dataplane keeps
//! forwarding while the agent is down; a restarted agent reopens the pinned maps and swaps
//! its freshly loaded programs into the pinned links atomically.

use std::{
    io,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::PerCpuArray,
    programs::{
        Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
    sys::SyscallError,
};
use mesh_common::stats::{PORT_COUNTERS_MAP, PortCounter};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

/// The object built from mesh-ebpf by this crate's build script.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

const UNDERLAY_PROGRAM: &str = "mesh_underlay";

pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl Dataplane {
    /// Loads the programs with maps pinned in `pin_dir` (reusing maps already pinned there)
    /// and attaches the underlay program to `underlay_iface`.
    pub fn start(pin_dir: &Path, underlay_iface: &str) -> Result<Self> {
        ensure_bpffs(pin_dir)?;
        std::fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating bpffs directory {}", pin_dir.display()))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(EBPF_OBJECT)
            .context("loading the mesh eBPF object")?;
        spawn_ebpf_logger(&mut ebpf);
        let mut dp = Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
        };
        dp.attach_underlay(underlay_iface)?;
        Ok(dp)
    }

    fn attach_underlay(&mut self, iface: &str) -> Result<()> {
        let link_pin = self.pin_dir.join(format!("link_xdp_{iface}"));
        let program: &mut Xdp = self
            .ebpf
            .program_mut(UNDERLAY_PROGRAM)
            .context("underlay program missing from the eBPF object")?
            .try_into()?;
        program
            .load()
            .context("verifier rejected the underlay program")?;
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
        info!(iface, "underlay program attached");
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
