//! Packet counters kept by the underlay program.

/// Map of per-destination-port packet counters on the underlay interface, indexed by port.
pub const PORT_COUNTERS_MAP: &str = "PORT_COUNTERS";

/// One entry per possible TCP/UDP port.
pub const PORT_COUNTERS_LEN: u32 = 65536;

/// Packets and bytes seen for one destination port, kept per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortCounter {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
// SAFETY: plain old data, no padding, every bit pattern valid.
unsafe impl aya::Pod for PortCounter {}
