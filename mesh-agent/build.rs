//! Builds the eBPF programs (mesh-ebpf) for the BPF target with the pinned stable toolchain.
//! `-Z build-std=core` needs RUSTC_BOOTSTRAP=1; it is set for the nested eBPF build only
//! (aya-build reads it from this process), so the rest of the workspace stays plain stable.

fn main() -> anyhow::Result<()> {
    // SAFETY: build scripts are single-threaded until aya-build spawns its child.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let ebpf = aya_build::Package {
        name: "mesh-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom("1.95.0"))
}
