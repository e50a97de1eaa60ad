//! Address and port translation with incremental checksum updates.
//!
//! Checksums are never recomputed or zeroed: the differences of the rewritten words update
//! them incrementally. The IPv4 header's is updated in place; the TCP/UDP one by
//! bpf_l4_csum_replace, which also keeps `skb->csum` right for CHECKSUM_COMPLETE packets and
//! only touches the pseudo-header seed for CHECKSUM_PARTIAL ones (what veth hands us), a
//! state a program cannot read. A UDP checksum of 0 means "none" and stays 0
//! (BPF_F_MARK_MANGLED_0, which also turns a computed 0 into 0xffff).
//!
//! The new addresses and ports are written directly into the packet (the verifier makes a
//! cloned skb private first); the checksum helpers come after, since any helper that may
//! move packet data invalidates packet pointers.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use mesh_common::lb::{Flow, FlowKey};

use crate::packet::{ETH_HLEN, IPPROTO_UDP, Ipv4Hdr, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET, skb_ptr};

/// Rewrites the packet's 5-tuple from `key` to the flow's translation. `l4` is the offset of
/// the TCP/UDP header. On error the packet may be half rewritten and must be dropped.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, l4: usize, key: &FlowKey, flow: &Flow) -> Result<(), i64> {
    translate(ctx, l4, key, flow, None)
}

/// [`rewrite`] for a packet the node forwards: its TTL `ttl` (above 1) also loses one, as
/// through any router, in the same IP checksum update.
#[inline(always)]
pub fn forward(ctx: &TcContext, l4: usize, key: &FlowKey, flow: &Flow, ttl: u8) -> Result<(), i64> {
    translate(ctx, l4, key, flow, Some(ttl))
}

#[inline(always)]
fn translate(
    ctx: &TcContext,
    l4: usize,
    key: &FlowKey,
    flow: &Flow,
    ttl: Option<u8>,
) -> Result<(), i64> {
    let udp = key.proto == IPPROTO_UDP;
    let l4_check = l4
        + if udp {
            UDP_CHECK_OFFSET
        } else {
            TCP_CHECK_OFFSET
        };
    let mangled0 = if udp {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let addr_diff = diff2(
        [u32::from_ne_bytes(key.src), u32::from_ne_bytes(key.dst)],
        [
            u32::from_ne_bytes(flow.nat_src),
            u32::from_ne_bytes(flow.nat_dst),
        ],
    );
    let port_diff = diff2(
        [ports_word(key.sport, key.dport), 0],
        [ports_word(flow.nat_sport, flow.nat_dport), 0],
    );

    let mut ip_diff = addr_diff;
    let ip: *mut Ipv4Hdr = skb_ptr(ctx, ETH_HLEN).ok_or(-1i64)?;
    let ports: *mut [u8; 4] = skb_ptr(ctx, l4).ok_or(-1i64)?;
    let (s, d) = (flow.nat_sport.to_be_bytes(), flow.nat_dport.to_be_bytes());
    // SAFETY: bounds-checked pointers into the packet, written before any helper call.
    unsafe {
        (*ip).saddr = flow.nat_src;
        (*ip).daddr = flow.nat_dst;
        *ports = [s[0], s[1], d[0], d[1]];
        if let Some(ttl) = ttl {
            let new = ttl.wrapping_sub(1);
            (*ip).ttl = new;
            // The TTL is the high byte of its 16-bit word; the protocol, the low one, is
            // unchanged, so the word's difference is the TTL's alone.
            ip_diff = u64::from(add(
                add(addr_diff as u32, !u32::from(u16::from_ne_bytes([ttl, 0]))),
                u32::from(u16::from_ne_bytes([new, 0])),
            ));
        }
        // The IPv4 header checksum, updated here rather than by bpf_l3_csum_replace: that
        // helper does no more than this (the header's sum is unchanged by a correct update,
        // so `skb->csum` never needs it), and a helper call costs more than the arithmetic.
        let old = u16::from_ne_bytes((*ip).check);
        (*ip).check = fold(add(ip_diff as u32, !u32::from(old))).to_ne_bytes();
    }

    // The addresses are part of the TCP/UDP pseudo-header.
    ctx.l4_csum_replace(
        l4_check,
        0,
        addr_diff,
        u64::from(BPF_F_PSEUDO_HDR) | mangled0,
    )?;
    ctx.l4_csum_replace(l4_check, 0, port_diff, mangled0)?;
    Ok(())
}

/// The two ports as the 4 bytes they occupy on the wire, read as a native word.
#[inline(always)]
fn ports_word(sport: u16, dport: u16) -> u32 {
    let s = sport.to_be_bytes();
    let d = dport.to_be_bytes();
    u32::from_ne_bytes([s[0], s[1], d[0], d[1]])
}

/// One's-complement difference from two old words to two new ones, as bpf_csum_diff would
/// return it (a 32-bit partial sum the replace helpers accept with `from` = 0).
#[inline(always)]
fn diff2(old: [u32; 2], new: [u32; 2]) -> u64 {
    let sum = add(add(add(!old[0], !old[1]), new[0]), new[1]);
    u64::from(sum)
}

/// A 32-bit partial sum folded to 16 bits and complemented: a checksum field's value (what
/// the kernel's csum_fold does).
#[inline(always)]
pub fn fold(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    let s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[inline(always)]
fn add(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    s.wrapping_add(u32::from(carry))
}
