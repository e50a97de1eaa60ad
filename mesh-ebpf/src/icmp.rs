//! ICMP errors about routing-mesh flows, translated like the flow's own packets.
//!
//! ```text
//! ICMP error ─ quotes TCP/UDP? ─ flow entry for the quoted packet's reply? ─ rewrite ─ redirect
//!            └─ no ─ pass       └─ no ─ pass
//! ```
//!
//! An error quotes the packet that caused it, as that packet was on the wire: after our
//! translation. A router between the client and the node that cannot forward a backend's
//! reply (fragmentation needed) reports it to the published address, quoting
//! `node:published → client`; the backend must get it about the packet it sent, `backend →
//! node address` (or `→ client`), or its path-MTU discovery never learns and large replies
//! vanish. The other way, a backend's port-unreachable about `node address:SNAT port →
//! backend` must reach the client about `client → node:published`.
//!
//! The quoted packet reversed is the key of the flow entry that translates packets going
//! the error's way, so one lookup finds it, and the entry's translation gives both the new
//! outer addresses and, mirrored, the quoted packet's original ones. Only the addresses and
//! ports of the quoted header change (its IPv4 checksum is kept valid; the quoted TCP/UDP
//! checksum is left, as receivers do not check it). Quoted headers with IP options are
//! passed untranslated.

use aya_ebpf::{bindings::BPF_F_RECOMPUTE_CSUM, programs::TcContext};
use mesh_common::lb::{FlowKey, Reason};

use crate::{
    flow,
    packet::{ETH_HLEN, IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr},
    path,
    verdict::Verdict,
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// IPv4 `frag_off`: the fragment offset. A quoted later fragment has no ports (a first one,
/// with more-fragments set, does).
const IP_OFFSET: u16 = 0x1fff;

/// An ICMP error's header and the start of the packet it quotes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Quote {
    /// Type, code, checksum and the rest of the header (the next-hop MTU of
    /// fragmentation-needed).
    icmp: [u8; 8],
    ip: Ipv4Hdr,
    /// Source and destination port of the quoted TCP/UDP header.
    ports: [u8; 4],
}

/// The ICMP error at offset `l4`, quoting a TCP/UDP packet, and the 5-tuple of that
/// packet's answers: the key its flow entries (and return entries) know them by.
#[inline(always)]
pub fn quote(ctx: &TcContext, l4: usize) -> Option<(Quote, FlowKey)> {
    let q = ctx.load::<Quote>(l4).ok()?;
    if q.icmp[0] != ICMP_DEST_UNREACH && q.icmp[0] != ICMP_TIME_EXCEEDED {
        return None;
    }
    let quoted = q.ip;
    if quoted.version_ihl != 0x45
        || (quoted.protocol != IPPROTO_TCP && quoted.protocol != IPPROTO_UDP)
        || u16::from_be_bytes(quoted.frag_off) & IP_OFFSET != 0
    {
        return None;
    }
    // The quoted packet went from quoted.saddr to quoted.daddr; the error goes back the
    // other way, as that packet's answers would.
    let key = FlowKey {
        src: quoted.daddr,
        dst: quoted.saddr,
        sport: u16::from_be_bytes([q.ports[2], q.ports[3]]),
        dport: u16::from_be_bytes([q.ports[0], q.ports[1]]),
        proto: quoted.protocol,
        _pad: 0,
        _pad2: 0,
    };
    Some((q, key))
}

/// Relays the ICMP message at offset `l4` (after an IPv4 header without errors) when it
/// reports on a routing-mesh flow.
#[inline(always)]
pub fn relay(ctx: &TcContext, l4: usize) -> Verdict {
    match quote(ctx, l4) {
        Some((q, key)) => relay_quote(ctx, l4, q, &key),
        None => Verdict::PASS,
    }
}

/// [`relay`] of an error already read by [`quote`].
#[inline(always)]
pub fn relay_quote(ctx: &TcContext, l4: usize, mut q: Quote, key: &FlowKey) -> Verdict {
    let Some(entry) = flow::lookup(key) else {
        return Verdict::PASS;
    };
    // SAFETY: pointer into the flow table, copied out.
    let f = unsafe { *entry };
    let Ok(mut outer) = ctx.load::<Ipv4Hdr>(ETH_HLEN) else {
        return Verdict::PASS;
    };

    // The quoted packet as the other end sent it: the translation mirrored.
    let old_ports = q.ports;
    let (s, d) = (f.nat_dport.to_be_bytes(), f.nat_sport.to_be_bytes());
    q.ports = [s[0], s[1], d[0], d[1]];
    let old_fields = fields(&q.ip);
    q.ip.saddr = f.nat_dst;
    q.ip.daddr = f.nat_src;
    q.ip.check = replaced(q.ip.check, &old_fields, &fields(&q.ip));
    // The ICMP checksum covers the quote (and no pseudo-header): the quoted addresses,
    // checksum and ports changed.
    let check = replaced([q.icmp[2], q.icmp[3]], &old_fields, &fields(&q.ip));
    let check = replaced(check, &old_ports, &q.ports);
    q.icmp[2] = check[0];
    q.icmp[3] = check[1];

    let old_outer = fields(&outer);
    outer.saddr = f.nat_src;
    outer.daddr = f.nat_dst;
    outer.check = replaced(outer.check, &old_outer, &fields(&outer));

    // RECOMPUTE_CSUM keeps skb->csum right for CHECKSUM_COMPLETE packets.
    let flags = u64::from(BPF_F_RECOMPUTE_CSUM);
    if ctx.store(ETH_HLEN, &outer, flags).is_err() || ctx.store(l4, &q, flags).is_err() {
        return Verdict::drop(Reason::RewriteFailed);
    }
    Verdict::redirect(path::neigh(path::bridge(&f)), Reason::IcmpTranslated)
}

/// The checksum, source and destination of an IPv4 header: the 10 bytes a translation
/// changes (offsets 10 to 20).
#[inline(always)]
fn fields(ip: &Ipv4Hdr) -> [u8; 10] {
    let (c, s, d) = (ip.check, ip.saddr, ip.daddr);
    [c[0], c[1], s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3]]
}

/// A one's-complement checksum after the bytes `old` it covers became `new` (RFC 1624,
/// eqn. 3: HC' = ~(~HC + ~m + m')). `N` is even: whole 16-bit words at even offsets.
#[inline(always)]
fn replaced<const N: usize>(check: [u8; 2], old: &[u8; N], new: &[u8; N]) -> [u8; 2] {
    let mut acc = u32::from(!u16::from_be_bytes(check));
    let mut i = 0;
    while i + 1 < N {
        acc += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        acc += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
        i += 2;
    }
    // At most 1 + 2 × 7 words: two folds leave 16 bits.
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    (!(acc as u16)).to_be_bytes()
}
