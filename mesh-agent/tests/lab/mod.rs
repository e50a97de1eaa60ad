//! A load balancer loaded into this kernel with its own pinned maps, and frames to feed it.
#![allow(dead_code)] // each test binary uses part of it

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use etherparse::PacketBuilder;
use mesh_agent::{
    bpf::SkbContext,
    dataplane::Dataplane,
    lb::{BackendLb, LbLimits, NetworkLb, NodeLb, Protocol, PublishMode, PublishedPort, ServiceLb},
};
use mesh_common::lb::Reason;

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
/// The node's address on the service network: the routing mesh's SNAT source.
pub const NET_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 0, 0, 11),
    Ipv4Addr::new(10, 0, 0, 12),
    Ipv4Addr::new(10, 0, 0, 13),
];

/// Pin directories of labs start with this, then the test process's PID.
const PREFIX: &str = "mtlb";
static SEQ: AtomicU32 = AtomicU32::new(0);

pub struct Lab {
    pub dp: Dataplane,
    pin: PathBuf,
    limits: LbLimits,
    node: NodeLb,
}

impl Lab {
    pub fn new() -> Self {
        Self::build(small_limits(), |_| {})
    }

    pub fn with_node(f: impl FnOnce(&mut NodeLb)) -> Self {
        Self::build(small_limits(), f)
    }

    pub fn with_limits(limits: LbLimits) -> Self {
        Self::build(limits, |_| {})
    }

    fn build(limits: LbLimits, f: impl FnOnce(&mut NodeLb)) -> Self {
        Self::load_over(pin_dir(), limits, f).expect("loading the dataplane")
    }

    /// A lab loaded over `pin`, which may hold maps pinned beforehand (by an "older agent").
    pub fn over(pin: PathBuf) -> anyhow::Result<Self> {
        Self::load_over(pin, small_limits(), |_| {})
    }

    fn load_over(
        pin: PathBuf,
        limits: LbLimits,
        f: impl FnOnce(&mut NodeLb),
    ) -> anyhow::Result<Self> {
        let mut node = NodeLb::new(NODE_IP).expect("node settings");
        f(&mut node);
        let mut dp = match Dataplane::load(&pin, &limits) {
            Ok(dp) => dp,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&pin);
                return Err(e);
            }
        };
        dp.lb_mut().set_node(&node).expect("configuring the node");
        Ok(Self {
            dp,
            pin,
            limits,
            node,
        })
    }

    pub fn pin(&self) -> &std::path::Path {
        &self.pin
    }

    /// Loads the programs again over the same pins, as a restarted agent does.
    pub fn restart(&mut self) {
        let fresh = Dataplane::load(&self.pin, &self.limits).expect("reloading the dataplane");
        let old = std::mem::replace(&mut self.dp, fresh);
        drop(old);
        self.dp
            .lb_mut()
            .set_node(&self.node)
            .expect("configuring the node");
    }

    pub fn apply(&mut self, table: &[ServiceLb]) {
        self.dp.lb_mut().apply(table).expect("applying the table");
    }

    /// Runs the routing mesh on a frame arriving on loopback.
    pub fn run(&self, p: &Packet) -> (u32, Vec<u8>) {
        self.run_raw(&p.bytes())
    }

    pub fn run_on(&self, p: &Packet, ifindex: u32) -> (u32, Vec<u8>) {
        let r = self
            .dp
            .test_run_lb_ingress(&p.bytes(), 1, SkbContext { ifindex, mark: 0 })
            .expect("test run");
        (r.retval, r.data)
    }

    pub fn run_raw(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let r = self
            .dp
            .test_run_lb_ingress(frame, 1, SkbContext::default())
            .expect("test run");
        (r.retval, r.data)
    }

    /// Runs the learning program (towards a task) on a frame leaving by `ifindex`.
    pub fn run_to_task(&self, p: &Packet, ifindex: u32) -> (u32, Vec<u8>) {
        let r = self
            .dp
            .test_run_to_task(&p.bytes(), SkbContext { ifindex, mark: 0 })
            .expect("test run");
        (r.retval, r.data)
    }

    /// Runs the overlay program (a network's VXLAN device) on a frame.
    pub fn run_from_overlay(&self, p: &Packet) -> (u32, Vec<u8>) {
        let r = self
            .dp
            .test_run_from_overlay(&p.bytes(), SkbContext::default())
            .expect("test run");
        (r.retval, r.data)
    }

    /// Runs the steering program (from a task) on a frame.
    pub fn run_from_task(&self, p: &Packet) -> (u32, Vec<u8>) {
        self.run_from_task_raw(&p.bytes())
    }

    pub fn run_from_task_raw(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let r = self
            .dp
            .test_run_from_task(frame, 1, SkbContext::default())
            .expect("test run");
        (r.retval, r.data)
    }

    /// Registers `veth` as a local task's host veth on the lab's network: frames from the
    /// node's bridge MAC there were routed by this node, replies to other nodes go into
    /// `vxlan_ifindex`.
    pub fn task_port(&mut self, veth: u32, vxlan_ifindex: u32) {
        self.dp
            .put_task_port(
                veth,
                mesh_common::lb::TaskPort {
                    node_mac: mesh_common::lb::mac_for_ip(NET_ADDR.octets()),
                    _pad: [0; 2],
                    vxlan_ifindex,
                },
            )
            .expect("registering the task port");
    }

    pub fn reason(&self, r: Reason) -> u64 {
        reason(self, r)
    }
}

/// Checks a test run's outcome `(verdict, frame)` for a backend's reply to CLIENT:40000: it
/// leaves from the published address (NODE_IP:8080) with valid checksums, and is the only
/// reply counted so far.
pub fn assert_first_reply(lab: &Lab, (verdict, out): (u32, Vec<u8>)) -> Frame {
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = Frame::parse(&out);
    assert_eq!((p.src, p.sport), (NODE_IP, 8080));
    assert_eq!((p.dst, p.dport), (CLIENT, 40000));
    assert!(p.ip_checksum_ok() && p.l4_checksum_ok());
    assert_eq!(lab.reason(Reason::Replied), 1);
    p
}

pub fn reason(lab: &Lab, r: Reason) -> u64 {
    lab.dp
        .lb()
        .reasons()
        .expect("reading reasons")
        .into_iter()
        .find(|(x, _)| *x == r)
        .map_or(0, |(_, n)| n)
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

/// A new pin directory for a lab, not created yet (the lab that loads over it removes it).
pub fn pin_dir() -> PathBuf {
    sweep_stale();
    PathBuf::from("/sys/fs/bpf/mesh").join(format!(
        "{PREFIX}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ))
}

/// Map sizes of a lab: small, so tests that fill a table fill it fast.
pub fn small_limits() -> LbLimits {
    LbLimits {
        services: 64,
        backends: 256,
        flows: 4096,
        embryos: 1024,
        snat_reservations: 1024,
        sockets: 256,
        returns: 1024,
    }
}

/// Removes pin directories of lab processes that died without cleaning up.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf/mesh") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('x').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// `name` publishing `published` → `target` over TCP, VIP 10.0.0.2, on network 4096.
pub fn service(name: &str, published: u16, target: u16, backends: &[Ipv4Addr]) -> ServiceLb {
    ServiceLb {
        id: name.into(),
        name: name.into(),
        network: NetworkLb {
            id: 4096,
            node_addr: NET_ADDR,
            bridge_ifindex: 1,
            vxlan_ifindex: 0,
        },
        vip: Some(VIP),
        ports: vec![PublishedPort {
            proto: Protocol::Tcp,
            published,
            target,
            mode: PublishMode::Snat,
        }],
        backends: backends.iter().map(|ip| BackendLb::active(*ip)).collect(),
    }
}

/// [`service`] with its port in `mode`, and UDP `udp_published` → `udp_target` too.
pub fn service_in(
    name: &str,
    mode: PublishMode,
    published: u16,
    target: u16,
    backends: &[Ipv4Addr],
) -> ServiceLb {
    let mut s = service(name, published, target, backends);
    s.ports[0].mode = mode;
    s.ports.push(PublishedPort {
        proto: Protocol::Udp,
        published,
        target,
        mode,
    });
    s
}

#[derive(Clone, Debug)]
pub struct Packet {
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    udp: bool,
    syn: bool,
    fin: bool,
    rst: bool,
    ack: Option<u32>,
    payload: Vec<u8>,
    ip_options: Vec<u8>,
    no_udp_checksum: bool,
    patches: Vec<(usize, Vec<u8>)>,
    macs: ([u8; 6], [u8; 6]),
    ttl: u8,
}

pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Packet {
    Packet {
        src,
        sport,
        dst,
        dport,
        udp: false,
        syn: false,
        fin: false,
        rst: false,
        ack: None,
        payload: Vec::new(),
        ip_options: Vec::new(),
        no_udp_checksum: false,
        patches: Vec::new(),
        macs: ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]),
        ttl: 64,
    }
}

pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Packet {
    Packet {
        udp: true,
        ..tcp(src, sport, dst, dport)
    }
}

impl Packet {
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn syn(mut self) -> Self {
        self.syn = true;
        self
    }

    pub fn fin(mut self) -> Self {
        self.fin = true;
        self
    }

    pub fn rst(mut self) -> Self {
        self.rst = true;
        self
    }

    pub fn ack(mut self, n: u32) -> Self {
        self.ack = Some(n);
        self
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    /// Inserts IPv4 options (a multiple of 4 bytes) after the fixed header.
    pub fn with_ip_options(mut self, options: &[u8]) -> Self {
        assert_eq!(options.len() % 4, 0);
        self.ip_options = options.to_vec();
        self
    }

    /// The Ethernet source and destination.
    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.macs = (src, dst);
        self
    }

    pub fn without_udp_checksum(mut self) -> Self {
        self.no_udp_checksum = true;
        self
    }

    /// Overwrites a byte of the finished frame (checksums are not fixed up).
    pub fn patch(mut self, offset: usize, byte: u8) -> Self {
        self.patches.push((offset, vec![byte]));
        self
    }

    pub fn patch16(mut self, offset: usize, value: u16) -> Self {
        self.patches.push((offset, value.to_be_bytes().to_vec()));
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.macs.0, self.macs.1).ipv4(
            self.src.octets(),
            self.dst.octets(),
            self.ttl,
        );
        let mut out = Vec::new();
        if self.udp {
            eth.udp(self.sport, self.dport)
                .write(&mut out, &self.payload)
                .expect("building a UDP frame");
        } else {
            let mut b = eth.tcp(self.sport, self.dport, 1000, 64240);
            if self.syn {
                b = b.syn();
            }
            if self.fin {
                b = b.fin();
            }
            if self.rst {
                b = b.rst();
            }
            if let Some(n) = self.ack {
                b = b.ack(n);
            }
            b.write(&mut out, &self.payload)
                .expect("building a TCP frame");
        }
        if self.no_udp_checksum {
            out[14 + 20 + 6..14 + 20 + 8].fill(0);
        }
        if !self.ip_options.is_empty() {
            let n = self.ip_options.len();
            out.splice(14 + 20..14 + 20, self.ip_options.iter().copied());
            out[14] = 0x40 | ((20 + n) / 4) as u8;
            let tot = u16::from_be_bytes([out[16], out[17]]) + n as u16;
            out[16..18].copy_from_slice(&tot.to_be_bytes());
            out[24..26].fill(0);
            let c = !fold(sum16(&out[14..14 + 20 + n], 0));
            out[24..26].copy_from_slice(&c.to_be_bytes());
        }
        for (off, bytes) in &self.patches {
            out[*off..*off + bytes.len()].copy_from_slice(bytes);
        }
        out
    }
}

/// A TCP/UDP over IPv4 frame as the program left it.
#[derive(Clone, Debug)]
pub struct Frame {
    pub ttl: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub ihl: usize,
    pub l4_checksum: u16,
    raw: Vec<u8>,
}

impl Frame {
    pub fn parse(frame: &[u8]) -> Self {
        assert!(frame.len() >= 14 + 20, "frame too short: {frame:?}");
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let proto = ip[9];
        let l4 = &ip[ihl..];
        let check_at = if proto == 17 { 6 } else { 16 };
        Self {
            ttl: ip[8],
            src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            sport: u16::from_be_bytes([l4[0], l4[1]]),
            dport: u16::from_be_bytes([l4[2], l4[3]]),
            proto,
            ihl,
            l4_checksum: u16::from_be_bytes([l4[check_at], l4[check_at + 1]]),
            raw: frame.to_vec(),
        }
    }

    pub fn src_mac(&self) -> [u8; 6] {
        self.raw[6..12].try_into().unwrap()
    }

    pub fn dst_mac(&self) -> [u8; 6] {
        self.raw[0..6].try_into().unwrap()
    }

    pub fn ip_checksum_ok(&self) -> bool {
        fold(sum16(&self.raw[14..14 + self.ihl], 0)) == 0xffff
    }

    /// The TCP/UDP checksum over the pseudo-header and the segment verifies.
    pub fn l4_checksum_ok(&self) -> bool {
        let ip = &self.raw[14..];
        let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let segment = &ip[self.ihl..tot];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip[12..20]);
        pseudo.extend_from_slice(&[0, self.proto]);
        pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
        fold(sum16(segment, sum16(&pseudo, 0))) == 0xffff
    }
}

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// An ICMP error from `src` to `dst` about the packet `quoted` (as it was on the wire):
/// its IPv4 header and TCP/UDP header, as Linux quotes them. `kind`: fragmentation needed
/// (with a next-hop MTU) or port unreachable.
pub fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, kind: IcmpKind, quoted: &Packet) -> Vec<u8> {
    use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
    let q = quoted.bytes();
    let l4 = if quoted.udp { 8 } else { 20 };
    let quote = &q[14..14 + 20 + l4];
    let header = match kind {
        IcmpKind::FragmentationNeeded(mtu) => {
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu }
        }
        IcmpKind::PortUnreachable => DestUnreachableHeader::Port,
    };
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(header))
        .write(&mut out, quote)
        .expect("building an ICMP frame");
    out
}

#[derive(Clone, Copy, Debug)]
pub enum IcmpKind {
    FragmentationNeeded(u16),
    PortUnreachable,
}

/// An ICMP error frame as the program left it: outer addresses, the ICMP header, and the
/// quoted packet's addresses and ports.
#[derive(Clone, Debug)]
pub struct IcmpFrame {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub icmp_type: u8,
    pub code: u8,
    /// Bytes 4..8 of the ICMP header (the next-hop MTU in the low half for code 4).
    pub rest: [u8; 4],
    pub quoted: Frame,
    raw: Vec<u8>,
}

impl IcmpFrame {
    pub fn parse(frame: &[u8]) -> Self {
        let outer = &frame[14..];
        assert_eq!(outer[9], 1, "not ICMP: {frame:?}");
        let ihl = usize::from(outer[0] & 0x0f) * 4;
        let icmp = &outer[ihl..];
        let mut quoted = vec![0u8; 14];
        quoted.extend_from_slice(&icmp[8..]);
        Self {
            src: Ipv4Addr::new(outer[12], outer[13], outer[14], outer[15]),
            dst: Ipv4Addr::new(outer[16], outer[17], outer[18], outer[19]),
            icmp_type: icmp[0],
            code: icmp[1],
            rest: icmp[4..8].try_into().unwrap(),
            quoted: Frame::parse(&quoted),
            raw: frame.to_vec(),
        }
    }

    pub fn ip_checksum_ok(&self) -> bool {
        let ihl = usize::from(self.raw[14] & 0x0f) * 4;
        fold(sum16(&self.raw[14..14 + ihl], 0)) == 0xffff
    }

    /// The ICMP checksum (over the ICMP message, no pseudo-header) and the quoted IPv4
    /// header's checksum both verify.
    pub fn icmp_checksums_ok(&self) -> bool {
        let ihl = usize::from(self.raw[14] & 0x0f) * 4;
        let icmp = &self.raw[14 + ihl..];
        fold(sum16(icmp, 0)) == 0xffff && self.quoted.ip_checksum_ok()
    }
}
