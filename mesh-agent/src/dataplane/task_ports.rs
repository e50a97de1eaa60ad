//! The client-address programs on local tasks' host veths, their per-port settings
//! (`LB_TASK_PORTS`) and the expiry of the return table (`LB_RETURNS`).
//!
//! Links are pinned under names that carry the veth's ifindex, so a veth re-created under
//! the same name (a task restarted in the same namespace) never inherits a dead link, and
//! pins of veths that are gone are found by name alone.

use std::{collections::BTreeSet, fs, io, time::Duration};

use anyhow::{Context, Result};
use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, MapData, MapError},
    programs::TcAttachType,
};
use mesh_common::lb::{
    FlowKey, IPPROTO_TCP, IPPROTO_UDP, LOCAL_TASKS_MAP, LocalTaskKey, RETURN_FIN_IN,
    RETURN_FIN_OUT, RETURN_RST, RETURNS_MAP, ReturnEntry, TASK_PORTS_MAP, TaskPort,
};
use serde::{Deserialize, Serialize};

use super::{Dataplane, FROM_TASK_PROGRAM, TO_TASK_PROGRAM};
use crate::bpf::{self, SkbContext, TestRun};

const PIN_PREFIX: &str = "link_task_";

/// One host veth of a local task, as the programs need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskVeth {
    pub name: String,
    pub ifindex: u32,
    /// Set for the task's port on an overlay network (where connections reach it); None for
    /// its gateway-bridge port (where replies to outside clients leave).
    pub overlay: Option<TaskPort>,
    /// The task's address on that overlay network: the routing mesh sends its flows
    /// straight into this veth's peer.
    pub task: Option<LocalTaskKey>,
}

impl TaskVeth {
    fn pin(&self, direction: &str) -> String {
        format!("{PIN_PREFIX}{direction}_{}_{}", self.name, self.ifindex)
    }
}

/// When return-table entries go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReturnTimeouts {
    pub udp_idle: Duration,
    /// After a RST, or FINs both ways.
    pub tcp_closed: Duration,
    /// An idle connection's entry is learned again from the client's next packet, so only a
    /// task that speaks first after this long loses its way back.
    pub tcp_idle: Duration,
}

impl Default for ReturnTimeouts {
    fn default() -> Self {
        Self {
            udp_idle: Duration::from_secs(120),
            tcp_closed: Duration::from_secs(10),
            tcp_idle: Duration::from_secs(7200),
        }
    }
}

/// Whether a return entry has outlived its connection.
pub fn return_expired(proto: u8, e: &ReturnEntry, now: u64, t: &ReturnTimeouts) -> bool {
    let idle = Duration::from_nanos(now.saturating_sub(e.last_seen));
    match proto {
        IPPROTO_UDP => idle > t.udp_idle,
        IPPROTO_TCP => {
            let closed = e.flags & RETURN_RST != 0
                || (e.flags & RETURN_FIN_IN != 0 && e.flags & RETURN_FIN_OUT != 0);
            idle > if closed { t.tcp_closed } else { t.tcp_idle }
        }
        _ => true,
    }
}

impl Dataplane {
    /// Attaches the client-address programs to a task's host veth: steering replies on every
    /// veth, learning (and its settings) on overlay ports. Idempotent.
    pub fn attach_task_veth(&mut self, veth: &TaskVeth) -> Result<()> {
        self.attach_task_program(veth, FROM_TASK_PROGRAM, TcAttachType::Ingress, "in")?;
        if let Some(port) = veth.overlay {
            self.task_ports()?
                .insert(veth.ifindex, port, 0)
                .with_context(|| format!("setting the task port of {}", veth.name))?;
            self.attach_task_program(veth, TO_TASK_PROGRAM, TcAttachType::Egress, "out")?;
        }
        // Last: the learning program must be in place before flows skip it (path.rs learns
        // for them, but an older agent's flows may still take the bridge).
        if let Some(task) = veth.task {
            self.local_tasks()?
                .insert(task, veth.ifindex, 0)
                .with_context(|| format!("setting the local task of {}", veth.name))?;
        }
        Ok(())
    }

    fn attach_task_program(
        &mut self,
        veth: &TaskVeth,
        name: &str,
        direction: TcAttachType,
        pin: &str,
    ) -> Result<()> {
        let pin = self.pin_dir.join(veth.pin(pin));
        self.attach_classifier(name, &veth.name, direction, &pin)
    }

    /// Detaches the programs from every task veth not in `keep` (by name and ifindex) and
    /// forgets their settings; pins of veths that are gone go too.
    pub fn retain_task_veths(&mut self, keep: &[TaskVeth]) -> Result<()> {
        let pins: BTreeSet<String> = keep
            .iter()
            .flat_map(|v| [v.pin("in"), v.pin("out")])
            .collect();
        if let Ok(entries) = fs::read_dir(&self.pin_dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(PIN_PREFIX) && !pins.contains(&name) {
                    match fs::remove_file(e.path()) {
                        Err(err) if err.kind() != io::ErrorKind::NotFound => {
                            return Err(err)
                                .with_context(|| format!("removing {}", e.path().display()));
                        }
                        _ => {}
                    }
                }
            }
        }
        let ports: BTreeSet<u32> = keep
            .iter()
            .filter(|v| v.overlay.is_some())
            .map(|v| v.ifindex)
            .collect();
        retain(
            &mut self.task_ports()?,
            |k, _| ports.contains(k),
            "a task port",
        )?;
        let tasks: BTreeSet<(LocalTaskKey, u32)> = keep
            .iter()
            .filter_map(|v| Some((v.task?, v.ifindex)))
            .collect();
        retain(
            &mut self.local_tasks()?,
            |k, ifindex| tasks.contains(&(*k, *ifindex)),
            "a local task",
        )?;
        Ok(())
    }

    /// Sets one local task (for tests of the programs, which run on no real veth).
    pub fn put_local_task(&mut self, task: LocalTaskKey, ifindex: u32) -> Result<()> {
        self.local_tasks()?
            .insert(task, ifindex, 0)
            .context("writing a local task")
    }

    /// Every local task the routing mesh sends flows to directly, with its host veth.
    pub fn local_tasks_table(&mut self) -> Result<Vec<(LocalTaskKey, u32)>> {
        Ok(self.local_tasks()?.iter().filter_map(Result::ok).collect())
    }

    /// Removes return-table entries whose connection is over; returns how many.
    pub fn sweep_returns(&mut self, timeouts: &ReturnTimeouts) -> Result<usize> {
        let now = super::monotonic_ns();
        retain(
            &mut self.returns()?,
            |k, e| !return_expired(k.proto, e, now, timeouts),
            "a return entry",
        )
    }

    /// Every entry of the return table (for tests and inspection).
    pub fn returns_table(&mut self) -> Result<Vec<(FlowKey, ReturnEntry)>> {
        Ok(self.returns()?.iter().filter_map(Result::ok).collect())
    }

    /// Sets or replaces one return entry (for tests of the programs).
    pub fn put_return(&mut self, key: FlowKey, entry: ReturnEntry) -> Result<()> {
        self.returns()?
            .insert(key, entry, 0)
            .context("writing a return entry")
    }

    /// Sets one task port (for tests of the programs, which run on no real veth).
    pub fn put_task_port(&mut self, ifindex: u32, port: TaskPort) -> Result<()> {
        self.task_ports()?
            .insert(ifindex, port, 0)
            .context("writing a task port")
    }

    /// Runs the learning program (towards a task) on a test frame.
    pub fn test_run_to_task(&self, frame: &[u8], ctx: SkbContext) -> Result<TestRun> {
        let fd = self.program_fd(TO_TASK_PROGRAM)?;
        bpf::test_run_skb(fd, frame, 1, ctx).context("BPF_PROG_TEST_RUN")
    }

    /// Runs the steering program (from a task) on a test frame.
    pub fn test_run_from_task(
        &self,
        frame: &[u8],
        repeat: u32,
        ctx: SkbContext,
    ) -> Result<TestRun> {
        let fd = self.program_fd(FROM_TASK_PROGRAM)?;
        bpf::test_run_skb(fd, frame, repeat, ctx).context("BPF_PROG_TEST_RUN")
    }

    fn task_ports(&mut self) -> Result<BpfHashMap<&mut MapData, u32, TaskPort>> {
        let map = self
            .ebpf
            .map_mut(TASK_PORTS_MAP)
            .context("task port map missing from the eBPF object")?;
        Ok(BpfHashMap::try_from(map)?)
    }

    fn local_tasks(&mut self) -> Result<BpfHashMap<&mut MapData, LocalTaskKey, u32>> {
        let map = self
            .ebpf
            .map_mut(LOCAL_TASKS_MAP)
            .context("local task map missing from the eBPF object")?;
        Ok(BpfHashMap::try_from(map)?)
    }

    fn returns(&mut self) -> Result<BpfHashMap<&mut MapData, FlowKey, ReturnEntry>> {
        let map = self
            .ebpf
            .map_mut(RETURNS_MAP)
            .context("return map missing from the eBPF object")?;
        Ok(BpfHashMap::try_from(map)?)
    }
}

/// Removes the entries of `map` that `keep` refuses (`what` one is, for errors); returns how
/// many went. Listed first, deleted after: deleting while walking restarts the walk.
fn retain<K: Pod, V: Pod>(
    map: &mut BpfHashMap<&mut MapData, K, V>,
    keep: impl Fn(&K, &V) -> bool,
    what: &str,
) -> Result<usize> {
    let doomed: Vec<K> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| !keep(k, v))
        .map(|(k, _)| k)
        .collect();
    for k in &doomed {
        match map.remove(k) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("removing {what}")),
        }
    }
    Ok(doomed.len())
}

#[cfg(test)]
mod tests {
    use mesh_common::lb::RETURN_LOCAL;

    use super::*;

    const S: u64 = 1_000_000_000;
    const NOW: u64 = 100_000 * S;

    fn entry(age_s: u64, flags: u16) -> ReturnEntry {
        ReturnEntry {
            last_seen: NOW - age_s * S,
            flags,
            ..Default::default()
        }
    }

    #[test]
    fn return_entries_go_when_their_connection_is_over_or_long_idle() {
        let t = ReturnTimeouts::default();
        let tcp = |e: ReturnEntry| return_expired(IPPROTO_TCP, &e, NOW, &t);
        assert!(
            !tcp(entry(3600, 0)),
            "an idle connection keeps its way back"
        );
        assert!(tcp(entry(7201, RETURN_LOCAL)));
        assert!(!tcp(entry(5, RETURN_RST)), "within the grace after a RST");
        assert!(tcp(entry(11, RETURN_RST)));
        assert!(!tcp(entry(60, RETURN_FIN_IN)), "half closed stays");
        assert!(tcp(entry(11, RETURN_FIN_IN | RETURN_FIN_OUT)));
        assert!(!return_expired(IPPROTO_UDP, &entry(100, 0), NOW, &t));
        assert!(return_expired(IPPROTO_UDP, &entry(121, 0), NOW, &t));
    }
}
