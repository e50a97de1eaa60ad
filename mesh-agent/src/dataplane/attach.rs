//! Where the programs run: TC and XDP on the underlay, TC on network bridges, the socket
//! hooks at the cgroup v2 root; every link pinned, and replaced atomically on restart.

use super::*;

impl Dataplane {
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

    /// Attaches the overlay program to a network's VXLAN device, where other nodes send back
    /// the replies of client-address flows that came in here. Idempotent, like
    /// [`Dataplane::attach_network`]; [`Dataplane::detach_tc`] removes it.
    pub fn attach_overlay(&mut self, vxlan_ifindex: u32) -> Result<()> {
        let iface = ifname(vxlan_ifindex)?;
        let pin = self.pin_dir.join(format!("link_tc_{iface}"));
        self.attach_classifier(FROM_OVERLAY_PROGRAM, &iface, TcAttachType::Ingress, &pin)?;
        info!(iface, "routing mesh attached to network VXLAN device");
        Ok(())
    }

    /// Detaches the routing mesh from a network's bridge (a bridge that is deleted detaches
    /// by itself; this also drops the pin).
    pub fn detach_network(&mut self, bridge_ifindex: u32) -> Result<()> {
        let iface = ifname(bridge_ifindex)?;
        self.detach_tc(&iface)
    }

    /// Detaches the routing mesh from an interface by name (for bridges and VXLAN devices
    /// already gone).
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
            let program: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
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

    fn attach_tc(&mut self, iface: &str) -> Result<()> {
        let pin = self.pin_dir.join(format!("link_tc_{iface}"));
        self.attach_classifier(LB_INGRESS_PROGRAM, iface, TcAttachType::Ingress, &pin)
    }

    /// Attaches the TC program `name` to `iface` behind the link pinned at `pin` (updated
    /// in place when a previous agent left it).
    pub(super) fn attach_classifier(
        &mut self,
        name: &str,
        iface: &str,
        direction: TcAttachType,
        pin: &Path,
    ) -> Result<()> {
        let program: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let prog_fd = program.fd()?.as_fd().try_clone_to_owned()?;
        relink(pin, prog_fd.as_fd(), || {
            let id = program
                .attach(iface, direction)
                .with_context(|| format!("attaching {name} to {iface}"))?;
            Ok(program.take_link(id)?.try_into()?)
        })
    }

    fn attach_xdp(&mut self, iface: &str) -> Result<()> {
        let link_pin = self.pin_dir.join(format!("link_xdp_{iface}"));
        let program: &mut Xdp = program(&mut self.ebpf, UNDERLAY_PROGRAM)?;
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
}
