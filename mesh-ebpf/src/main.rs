//! Map declarations and program entry points. Each entry point hands the packet to a
//! pipeline in a domain module and turns its result into one verdict at the boundary.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod underlay;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::xdp_action,
        macros::{map, xdp},
        maps::PerCpuArray,
        programs::XdpContext,
    };
    use mesh_common::stats::{PORT_COUNTERS_LEN, PortCounter};

    #[map(name = "PORT_COUNTERS")]
    pub static PORT_COUNTERS: PerCpuArray<PortCounter> = PerCpuArray::pinned(PORT_COUNTERS_LEN, 0);

    /// XDP on a node's underlay interface.
    #[xdp]
    pub fn mesh_underlay(ctx: XdpContext) -> u32 {
        // Counting never decides a verdict: anything we cannot parse is passed to the stack.
        let _ = crate::underlay::count(&ctx);
        xdp_action::XDP_PASS
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("mesh-ebpf holds eBPF programs; mesh-agent builds and loads them.");
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
