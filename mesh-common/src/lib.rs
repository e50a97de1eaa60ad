//! Types shared by the eBPF programs (`mesh-ebpf`) and the agent (`mesh-agent`).
//!
//! Every BPF map key and value is defined here once, `#[repr(C)]` with explicit padding, so
//! both sides agree on the layout byte for byte.
#![cfg_attr(not(test), no_std)]

pub mod dns;
pub mod lb;
pub mod stats;
