//! Packet header layouts and bounds-checked access, the only place that touches raw packet
//! pointers. All fields are byte arrays, so the structs have alignment 1 and can be copied
//! out of any offset.

use aya_ebpf::programs::{TcContext, XdpContext};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// IPv4 `frag_off`: more-fragments flag and fragment offset; either set means a fragment.
pub const IP_MF_AND_OFFSET: u16 = 0x3fff;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Offsets of the checksum fields inside their headers.
pub const TCP_CHECK_OFFSET: usize = 16;
pub const UDP_CHECK_OFFSET: usize = 6;

/// A pointer to a `T` at `offset` in the packet, or `None` when the packet is too short.
/// The explicit end check is what the verifier needs to accept later reads.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// The same for TC programs, within the skb's linear part (see [`pull_headers`]).
#[inline(always)]
pub fn skb_ptr<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Writes the frame's destination and source MACs; returns whether it could. Direct stores,
/// byte by byte: no helper call, and no call into the BPF copy routines (which loop over
/// bytes) that a slice copy would compile to.
#[inline(always)]
pub fn set_macs(ctx: &TcContext, dst: [u8; 6], src: [u8; 6]) -> bool {
    let Some(eth) = skb_ptr::<EthHdr>(ctx, 0) else {
        return false;
    };
    // SAFETY: a bounds-checked pointer into the packet; the verifier makes a cloned skb
    // private before a program that writes packet data runs.
    unsafe {
        let d = (*eth).dst.as_mut_ptr();
        let s = (*eth).src.as_mut_ptr();
        for i in 0..6 {
            *d.add(i) = dst[i];
            *s.add(i) = src[i];
        }
    }
    true
}

/// The six bytes of a MAC address in the packet, read one by one for the same reason.
#[inline(always)]
pub fn read_mac(mac: *const [u8; 6]) -> [u8; 6] {
    let b = mac.cast::<u8>();
    // SAFETY: the caller's pointer is bounds-checked and six bytes long.
    unsafe { [*b, *b.add(1), *b.add(2), *b.add(3), *b.add(4), *b.add(5)] }
}

/// Ethernet, the longest IPv4 header and a TCP header without options.
const MAX_HEADERS: u32 = (ETH_HLEN + 60 + 20) as u32;

/// Makes the headers directly readable when they are not in the skb's linear part (rare on
/// veth and bridges; a fragmented GSO skb can do it). Returns whether anything could change.
#[inline(always)]
pub fn pull_headers(ctx: &TcContext) -> bool {
    let want = if ctx.len() < MAX_HEADERS {
        ctx.len()
    } else {
        MAX_HEADERS
    };
    ctx.pull_data(want).is_ok()
}

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

/// The first four bytes of TCP and UDP headers: the ports.
#[repr(C)]
pub struct L4Ports {
    pub source: [u8; 2],
    pub dest: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdr {
    pub source: [u8; 2],
    pub dest: [u8; 2],
    pub seq: [u8; 4],
    pub ack_seq: [u8; 4],
    /// Data offset in the upper nibble, in 32-bit words.
    pub doff: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urg_ptr: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub source: [u8; 2],
    pub dest: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}
