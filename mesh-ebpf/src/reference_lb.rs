//! The per-packet benchmark's reference load balancer (`cargo xtask bench reference`): the
//! least a TC load balancer does per packet, written for the bench the way Katran's and
//! Cilium's fast paths do it, so mesh's routing mesh is measured against it in the same
//! harness on the same frames. Never loaded by the agent; its own object (not `mesh`), so
//! no node pays for its maps.
//!
//! ```text
//! parse (IPv4, no options, not a fragment, TCP/UDP to the VIP; anything else passes)
//!   ─ REF_FLOWS[5-tuple]? ─ hit ──────────────────────────────────────┐
//!        └─ miss ─ REF_BACKENDS[hash(5-tuple) % count] ─ insert ───────┴─ DNAT ─ redirect
//! ```
//!
//! An established packet costs one map lookup (the LRU hash, whose value is the backend
//! itself, not an index into another table); a new flow costs the miss, one array lookup
//! and one insert. The DNAT writes the destination address and port and the Ethernet
//! addresses in place, then updates the checksums with the helpers (bpf_l3_csum_replace for
//! the IPv4 header, bpf_l4_csum_replace for the pseudo-header address and the port) and
//! redirects to one device. What it leaves out, and mesh does: TCP state, per-service and
//! per-backend counters, SNAT and the reply direction, a flood-proof embryo table, TTL,
//! checksum validation of new flows, per-packet path choice.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use core::ptr::read_volatile;

    use aya_ebpf::{
        bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
        helpers::bpf_redirect,
        macros::{classifier, map},
        maps::{Array, LruHashMap},
        programs::TcContext,
    };

    const ETH_HLEN: usize = 14;
    const IP_CHECK: usize = ETH_HLEN + 10;
    const IP_DADDR: usize = ETH_HLEN + 16;
    const L4: usize = ETH_HLEN + 20;
    const TCP_CHECK: usize = L4 + 16;
    const UDP_CHECK: usize = L4 + 6;
    const IPPROTO_TCP: u8 = 6;
    const IPPROTO_UDP: u8 = 17;

    /// The 5-tuple as the wire words, unconverted.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct FlowKey {
        src: u32,
        dst: u32,
        ports: u32,
        proto: u32,
    }

    /// A backend as the control plane writes it (`xtask/src/bench/reference.rs`): its
    /// address and port as on the wire, and the Ethernet destination and source a packet
    /// to it leaves with.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Backend {
        addr: u32,
        port: u16,
        _pad: u16,
        macs: [u8; 12],
    }

    /// Sizes are set by the loader.
    #[map(name = "REF_FLOWS")]
    static REF_FLOWS: LruHashMap<FlowKey, Backend> = LruHashMap::with_max_entries(1, 0);
    #[map(name = "REF_BACKENDS")]
    static REF_BACKENDS: Array<Backend> = Array::with_max_entries(1, 0);

    /// Read-only after load (set by the loader; read with read_volatile, or LLVM folds in
    /// these defaults): the VIP as its wire word, how many backends REF_BACKENDS holds, and
    /// the device packets leave by.
    #[unsafe(no_mangle)]
    static REF_VIP: u32 = 0;
    #[unsafe(no_mangle)]
    static REF_BACKEND_COUNT: u32 = 0;
    #[unsafe(no_mangle)]
    static REF_IFINDEX: u32 = 0;

    #[classifier]
    pub fn reference_lb(ctx: TcContext) -> i32 {
        balance(&ctx)
    }

    #[inline(always)]
    fn balance(ctx: &TcContext) -> i32 {
        let (data, end) = (ctx.data(), ctx.data_end());
        // Ethernet, IPv4 without options and the 8 bytes of ports and UDP checksum; TCP's
        // checksum field is checked below.
        if data + L4 + 8 > end {
            return TC_ACT_OK as i32;
        }
        // SAFETY (all packet reads and writes): within [data, end), checked above.
        let b = data as *mut u8;
        let (ethertype, version_ihl, frag, proto) = unsafe {
            (
                [*b.add(12), *b.add(13)],
                *b.add(ETH_HLEN),
                [*b.add(ETH_HLEN + 6), *b.add(ETH_HLEN + 7)],
                *b.add(ETH_HLEN + 9),
            )
        };
        if ethertype != [0x08, 0x00]
            || version_ihl != 0x45
            || u16::from_be_bytes(frag) & 0x3fff != 0
            || (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        {
            return TC_ACT_OK as i32;
        }
        let tcp = proto == IPPROTO_TCP;
        if tcp && data + L4 + 20 > end {
            return TC_ACT_OK as i32;
        }
        // SAFETY: offsets below L4 + 8, checked above.
        let word = |off: usize| unsafe { (b.add(off) as *const u32).read_unaligned() };
        // SAFETY: read-only globals.
        let (vip, count, ifindex) = unsafe {
            (
                read_volatile(&REF_VIP),
                read_volatile(&REF_BACKEND_COUNT),
                read_volatile(&REF_IFINDEX),
            )
        };
        let key = FlowKey {
            src: word(ETH_HLEN + 12),
            dst: word(IP_DADDR),
            ports: word(L4),
            proto: u32::from(proto),
        };
        if key.dst != vip {
            return TC_ACT_OK as i32;
        }
        let backend = match REF_FLOWS.get_ptr(&key) {
            // SAFETY: a pointer into the LRU, copied out.
            Some(found) => unsafe { *found },
            None => {
                if count == 0 {
                    return TC_ACT_SHOT as i32;
                }
                let Some(picked) = REF_BACKENDS.get(hash(&key) % count) else {
                    return TC_ACT_SHOT as i32;
                };
                let picked = *picked;
                // A full LRU evicts; a failed insert only costs the next packet a new pick.
                let _ = REF_FLOWS.insert(&key, &picked, 0);
                picked
            }
        };
        // SAFETY: as above.
        let old_port = u32::from(unsafe { (b.add(L4 + 2) as *const u16).read_unaligned() });
        // SAFETY: as above; written before any helper call, which may move packet data.
        unsafe {
            (b.add(IP_DADDR) as *mut u32).write_unaligned(backend.addr);
            (b.add(L4 + 2) as *mut u16).write_unaligned(backend.port);
            for i in 0..12 {
                *b.add(i) = backend.macs[i];
            }
        }
        let (check, mangled0) = if tcp {
            (TCP_CHECK, 0)
        } else {
            (UDP_CHECK, u64::from(BPF_F_MARK_MANGLED_0))
        };
        let new_port = u32::from(backend.port);
        let rewritten = ctx
            .l3_csum_replace(IP_CHECK, u64::from(key.dst), u64::from(backend.addr), 4)
            .and_then(|()| {
                ctx.l4_csum_replace(
                    check,
                    u64::from(key.dst),
                    u64::from(backend.addr),
                    u64::from(BPF_F_PSEUDO_HDR) | mangled0 | 4,
                )
            })
            .and_then(|()| {
                ctx.l4_csum_replace(
                    check,
                    u64::from(old_port),
                    u64::from(new_port),
                    mangled0 | 2,
                )
            });
        if rewritten.is_err() {
            return TC_ACT_SHOT as i32;
        }
        // SAFETY: a plain helper call.
        (unsafe { bpf_redirect(ifindex, 0) }) as i32
    }

    /// Spreads flows over backends: the 5-tuple mixed (murmur3's finaliser), cheap enough to
    /// stay out of the measurement, as Katran's jhash does.
    #[inline(always)]
    fn hash(key: &FlowKey) -> u32 {
        let mut h = key.src ^ key.dst.rotate_left(7) ^ key.ports.rotate_left(13) ^ key.proto;
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("reference-lb is the bench's reference eBPF program; `cargo xtask bench` loads it.");
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
