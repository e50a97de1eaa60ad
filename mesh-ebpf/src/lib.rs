//! Empty library target: lets mesh-agent name this crate as a build dependency so cargo
//! rebuilds the eBPF object whenever the programs change.
#![no_std]
