//! What the node's underlay interface sees: per-destination-port counters.

use aya_ebpf::programs::XdpContext;

use crate::packet::{
    ETH_HLEN, ETH_P_IP, EthHdr, IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr, L4Ports, ptr_at,
};
use crate::programs::PORT_COUNTERS;

/// Counts one IPv4 TCP/UDP packet against its destination port. Non-first fragments carry no
/// L4 header and are skipped rather than misread.
#[inline(always)]
pub fn count(ctx: &XdpContext) -> Option<()> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    if u16::from_be_bytes(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return None;
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
    let (vihl, proto, frag) = unsafe { ((*ip).version_ihl, (*ip).protocol, (*ip).frag_off) };
    if vihl >> 4 != 4 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return None;
    }
    if u16::from_be_bytes(frag) & 0x1fff != 0 {
        return None;
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    let ports: *const L4Ports = ptr_at(ctx, ETH_HLEN + ihl)?;
    let port = u16::from_be_bytes(unsafe { (*ports).dest });
    let counter = PORT_COUNTERS.get_ptr_mut(u32::from(port))?;
    // Per-CPU slot: no other CPU writes it, so plain adds are safe.
    unsafe {
        (*counter).packets += 1;
        (*counter).bytes += (ctx.data_end() - ctx.data()) as u64;
    }
    Some(())
}
