//! Which network namespaces the socket hooks balance and where their DNS goes: the
//! per-namespace maps (`LB_NETNS`, the resolver ports), written as tasks come and go.

use super::*;

impl Dataplane {
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
}
