//! Address and port translation with incremental checksum updates.
//!
//! Checksums are never recomputed or zeroed: the differences of the rewritten words are fed
//! to bpf_l3_csum_replace / bpf_l4_csum_replace, which also keep `skb->csum` right for
//! CHECKSUM_COMPLETE packets and only touch the pseudo-header seed for CHECKSUM_PARTIAL ones
//! (what veth hands us). A UDP checksum of 0 means "none" and stays 0
//! (BPF_F_MARK_MANGLED_0, which also turns a computed 0 into 0xffff).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use mesh_common::lb::{Flow, FlowKey};

use crate::packet::{
    ETH_HLEN, IP_CHECK_OFFSET, IP_SADDR_OFFSET, IPPROTO_UDP, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET,
};

/// Rewrites the packet's 5-tuple from `key` to the flow's translation. `l4` is the offset of
/// the TCP/UDP header. On error the packet may be half rewritten and must be dropped.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, l4: usize, key: &FlowKey, flow: &Flow) -> Result<(), i64> {
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

    // Source and destination addresses are adjacent: one 8-byte store, one difference.
    let mut old_addrs = [u32::from_ne_bytes(key.src), u32::from_ne_bytes(key.dst)];
    let mut new_addrs = [
        u32::from_ne_bytes(flow.nat_src),
        u32::from_ne_bytes(flow.nat_dst),
    ];
    let addr_diff = csum_diff(&mut old_addrs, &mut new_addrs)?;
    ctx.store(ETH_HLEN + IP_SADDR_OFFSET, &new_addrs, 0)?;
    ctx.l3_csum_replace(ETH_HLEN + IP_CHECK_OFFSET, 0, addr_diff, 0)?;
    // The addresses are part of the TCP/UDP pseudo-header.
    ctx.l4_csum_replace(
        l4_check,
        0,
        addr_diff,
        u64::from(BPF_F_PSEUDO_HDR) | mangled0,
    )?;

    // Ports are adjacent too (source, destination), in network order in the packet.
    let mut old_ports = [ports_word(key.sport, key.dport)];
    let mut new_ports = [ports_word(flow.nat_sport, flow.nat_dport)];
    let port_diff = csum_diff(&mut old_ports, &mut new_ports)?;
    ctx.store(l4, &new_ports, 0)?;
    ctx.l4_csum_replace(l4_check, 0, port_diff, mangled0)?;
    Ok(())
}

/// The two ports as the 4 bytes they occupy on the wire.
#[inline(always)]
fn ports_word(sport: u16, dport: u16) -> u32 {
    let s = sport.to_be_bytes();
    let d = dport.to_be_bytes();
    u32::from_ne_bytes([s[0], s[1], d[0], d[1]])
}

/// One's-complement difference between two equally long word arrays.
#[inline(always)]
fn csum_diff<const N: usize>(from: &mut [u32; N], to: &mut [u32; N]) -> Result<u64, i64> {
    let size = (N * 4) as u32;
    // SAFETY: both buffers are on our stack and `size` bytes long.
    let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), size, to.as_mut_ptr(), size, 0) };
    if diff < 0 {
        return Err(diff);
    }
    // The helper returns a 32-bit partial sum; l3/l4_csum_replace take it with `from` = 0.
    Ok(diff as u64 & 0xffff_ffff)
}
