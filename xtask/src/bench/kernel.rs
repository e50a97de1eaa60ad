//! Timing what a node's kernel holds, not what its agent says it programmed.
//!
//! One reader per node for the whole bench: a thread of this process that entered the node's
//! network namespace once, keeps the node's pinned load-balancer maps open (bpf syscalls
//! through aya, the same lookups the programs make: published port → service → slots →
//! backends) and a netlink socket in the namespace (the VXLAN devices' FDB). A bench hands it
//! a condition and the instant its clock started; the reader evaluates every pending
//! condition every `every` and answers with the time at which one first held. No agent is
//! asked and no process is spawned per read, so a timing is the kernel's, with a resolution
//! of the polling interval plus one read (both reported by [`KernelWatch::resolution`]).
//! Nothing of this lives in the agent.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{Array, HashMap, Map, MapData};
use futures_util::TryStreamExt;
use mesh_common::lb::{
    BACKEND_ACTIVE, BACKENDS_MAP, Backend, IPPROTO_TCP, SERVICE_STATE_MAP, SERVICES_MAP, SLOTS_MAP,
    ServiceEntry, ServiceKey, ServiceState, SlotKey,
};
use mesh_tests::Host;
use rtnetlink::packet_route::{
    AddressFamily,
    neighbour::{NeighbourAddress, NeighbourAttribute},
};

/// What one node's kernel holds, read on demand by its reader thread.
pub struct NodeKernel {
    pin_dir: PathBuf,
    maps: Option<LbMaps>,
    rt: tokio::runtime::Runtime,
    netlink: rtnetlink::Handle,
}

/// The pinned maps a published port's lookup goes through.
struct LbMaps {
    services: HashMap<MapData, ServiceKey, ServiceEntry>,
    state: Array<MapData, ServiceState>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: Array<MapData, Backend>,
}

impl LbMaps {
    fn open(pin_dir: &std::path::Path) -> Result<Self> {
        let open = |name: &str| -> Result<Map> {
            let pin = pin_dir.join(name);
            let data =
                MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
            Map::from_map_data(data).with_context(|| format!("reading {}", pin.display()))
        };
        Ok(Self {
            services: HashMap::try_from(open(SERVICES_MAP)?)?,
            state: Array::try_from(open(SERVICE_STATE_MAP)?)?,
            slots: HashMap::try_from(open(SLOTS_MAP)?)?,
            backends: Array::try_from(open(BACKENDS_MAP)?)?,
        })
    }
}

impl NodeKernel {
    /// Must run on the thread that entered the node's namespace: the netlink socket is
    /// created in the calling thread's namespace.
    fn new(pin_dir: PathBuf) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the reader's runtime")?;
        let netlink = rt.block_on(async {
            let (conn, handle, _) =
                rtnetlink::new_connection().context("opening a netlink socket")?;
            tokio::spawn(conn);
            Ok::<_, anyhow::Error>(handle)
        })?;
        Ok(Self {
            pin_dir,
            maps: None,
            rt,
            netlink,
        })
    }

    /// The maps, opened on first use (an agent that is starting may not have pinned them
    /// yet); kept open after, as the pins outlive agent restarts.
    fn maps(&mut self) -> Result<&LbMaps> {
        if self.maps.is_none() {
            self.maps = Some(LbMaps::open(&self.pin_dir)?);
        }
        Ok(self.maps.as_ref().expect("just opened"))
    }

    /// The active backends the programs pick from for TCP `port` published on the node, or
    /// None when the port is not in the maps at all.
    pub fn published_backends(&mut self, port: u16) -> Result<Option<Vec<Ipv4Addr>>> {
        let maps = self.maps()?;
        let entry = match maps
            .services
            .get(&ServiceKey::published(IPPROTO_TCP, port), 0)
        {
            Ok(e) => e,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(e).context("LB_SERVICES lookup"),
        };
        let state = maps
            .state
            .get(&entry.service, 0)
            .context("LB_SVC_STATE lookup")?;
        let mut active = Vec::new();
        for slot in 0..state.backends {
            let key = SlotKey {
                service: entry.service,
                slot,
            };
            let id = match maps.slots.get(&key, 0) {
                Ok(id) => id,
                // The agent rewrites slots one by one: a hole is a slot the programs skip too.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(e).context("LB_SLOTS lookup"),
            };
            let b = maps.backends.get(&id, 0).context("LB_BACKENDS lookup")?;
            if b.state == BACKEND_ACTIVE && b.service == entry.service {
                active.push(Ipv4Addr::from(b.addr));
            }
        }
        Ok(Some(active))
    }

    /// The static (MAC → VTEP) entries of the node's VXLAN devices' forwarding databases.
    pub fn fdb(&mut self) -> Result<BTreeSet<(String, Ipv4Addr)>> {
        let handle = self.netlink.clone();
        let dump = self.rt.block_on(async move {
            handle
                .neighbours()
                .get()
                .set_address_family(AddressFamily::Bridge)
                .execute()
                .try_collect::<Vec<_>>()
                .await
        });
        let mut entries = BTreeSet::new();
        for msg in dump.context("listing FDB entries")? {
            let mut mac = None;
            let mut vtep = None;
            for attr in &msg.attributes {
                match attr {
                    NeighbourAttribute::LinkLayerAddress(a) if a.len() == 6 => {
                        mac = Some(
                            a.iter()
                                .map(|b| format!("{b:02x}"))
                                .collect::<Vec<_>>()
                                .join(":"),
                        )
                    }
                    // AF_BRIDGE messages carry the VTEP as raw bytes.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                        vtep = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => vtep = Some(*ip),
                    _ => {}
                }
            }
            if let (Some(mac), Some(vtep)) = (mac, vtep) {
                entries.insert((mac, vtep));
            }
        }
        Ok(entries)
    }
}

type Check = Box<dyn FnMut(&mut NodeKernel) -> Result<bool> + Send>;

struct Wait {
    since: Instant,
    check: Check,
    done: mpsc::Sender<Duration>,
}

/// How long the reader's rounds took: what a timing may be late by, beyond the interval.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadTimes {
    pub rounds: u64,
    pub total: Duration,
    pub max: Duration,
}

/// A node's reader thread (see the module docs). Dropping it stops the thread.
pub struct KernelWatch {
    node: String,
    every: Duration,
    waits: Option<mpsc::Sender<Wait>>,
    stop: Arc<AtomicBool>,
    times: Arc<Mutex<ReadTimes>>,
    last_error: Arc<Mutex<Option<String>>>,
    /// Its Result only says whether it entered the namespace; it reports through channels.
    thread: Option<JoinHandle<Result<()>>>,
}

impl KernelWatch {
    /// Starts the reader of `host`'s kernel, evaluating pending conditions every `every`.
    pub fn start(host: &Host, every: Duration) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Wait>();
        let stop = Arc::new(AtomicBool::new(false));
        let times = Arc::new(Mutex::new(ReadTimes::default()));
        let last_error = Arc::new(Mutex::new(None));
        let (ready_tx, ready_rx) = mpsc::channel();
        let pin_dir = host.bpffs();
        let thread = {
            let (stop, times, last_error) = (stop.clone(), times.clone(), last_error.clone());
            host.ns.spawn_thread(move || {
                let node = match NodeKernel::new(pin_dir) {
                    Ok(n) => {
                        let _ = ready_tx.send(Ok(()));
                        n
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                read_loop(node, rx, every, &stop, &times, &last_error);
            })?
        };
        ready_rx
            .recv()
            .map_err(|_| anyhow!("the kernel reader of {} died", host.node_name()))??;
        Ok(Self {
            node: host.node_name().to_owned(),
            every,
            waits: Some(tx),
            stop,
            times,
            last_error,
            thread: Some(thread),
        })
    }

    /// Starts waiting for `check` to hold in this node's kernel; the clock runs from `since`.
    pub fn when(
        &self,
        since: Instant,
        check: impl FnMut(&mut NodeKernel) -> Result<bool> + Send + 'static,
    ) -> Result<Pending> {
        let (done, rx) = mpsc::channel();
        self.waits
            .as_ref()
            .expect("open until dropped")
            .send(Wait {
                since,
                check: Box::new(check),
                done,
            })
            .map_err(|_| anyhow!("the kernel reader of {} is gone", self.node))?;
        Ok(Pending {
            rx,
            node: self.node.clone(),
            last_error: self.last_error.clone(),
        })
    }

    /// The polling interval and how long a round of reads took (mean, max).
    pub fn resolution(&self) -> (Duration, Duration, Duration) {
        let t = *self.times.lock().expect("lock");
        let mean = if t.rounds == 0 {
            Duration::ZERO
        } else {
            t.total / t.rounds as u32
        };
        (self.every, mean, t.max)
    }
}

impl Drop for KernelWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        drop(self.waits.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A condition handed to a reader: [`Pending::wait`] for the time it first held.
pub struct Pending {
    rx: mpsc::Receiver<Duration>,
    node: String,
    last_error: Arc<Mutex<Option<String>>>,
}

impl Pending {
    /// The time from the clock's start to the first read that found the condition true, or
    /// an error after `timeout` (counted from now).
    pub fn wait(self, timeout: Duration, what: &str) -> Result<Duration> {
        match self.rx.recv_timeout(timeout) {
            Ok(d) => Ok(d),
            Err(_) => {
                let why = self.last_error.lock().expect("lock").clone();
                bail!(
                    "{what} on {}: not within {timeout:?}{}",
                    self.node,
                    why.map(|e| format!(" (last read error: {e})"))
                        .unwrap_or_default()
                )
            }
        }
    }
}

fn read_loop(
    mut node: NodeKernel,
    rx: mpsc::Receiver<Wait>,
    every: Duration,
    stop: &AtomicBool,
    times: &Mutex<ReadTimes>,
    last_error: &Mutex<Option<String>>,
) {
    let mut pending: Vec<Wait> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        // Idle (nothing to wait for): block until a condition comes, reading nothing.
        if pending.is_empty() {
            match rx.recv() {
                Ok(w) => pending.push(w),
                Err(_) => return,
            }
        }
        pending.extend(rx.try_iter());
        let round = Instant::now();
        pending.retain_mut(|w| match (w.check)(&mut node) {
            Ok(true) => {
                let _ = w.done.send(w.since.elapsed());
                false
            }
            Ok(false) => true,
            Err(e) => {
                // An agent restarting, a map not pinned yet: not there yet, but said on
                // timeout.
                *last_error.lock().expect("lock") = Some(format!("{e:#}"));
                node.maps = None;
                true
            }
        });
        let took = round.elapsed();
        {
            let mut t = times.lock().expect("lock");
            t.rounds += 1;
            t.total += took;
            t.max = t.max.max(took);
        }
        std::thread::sleep(every.saturating_sub(took));
    }
}

/// The time until `check` holds on every one of `watches`, from `since`: the slowest node's.
pub fn until_all(
    watches: &[&KernelWatch],
    since: Instant,
    timeout: Duration,
    what: &str,
    check: impl Fn(&mut NodeKernel) -> Result<bool> + Send + Clone + 'static,
) -> Result<Vec<Duration>> {
    let pending: Vec<Pending> = watches
        .iter()
        .map(|w| w.when(since, check.clone()))
        .collect::<Result<_>>()?;
    let deadline = since + timeout;
    pending
        .into_iter()
        .map(|p| p.wait(deadline.saturating_duration_since(Instant::now()), what))
        .collect()
}
