//! Counting what a node's pinned load-balancer maps hold, straight from the kernel (the bpf
//! syscall), so a benchmark sees the kernel state and not the agent's idea of it.

use std::{os::fd::AsRawFd, path::Path};

use anyhow::{Context, Result};

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// Number of keys in the pinned map at `pin` (a hash map; an array always reports its size).
pub fn count(pin: &Path) -> Result<usize> {
    let fd = mesh_agent::bpf::obj_get(pin).with_context(|| format!("opening {}", pin.display()))?;
    // Large enough for any key of ours; the kernel copies key_size bytes.
    let mut key = [0u8; 64];
    let mut next = [0u8; 64];
    let mut n = 0;
    let mut first = true;
    loop {
        let attr = NextKeyAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: attr points at buffers that outlive the call and are big enough.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &attr as *const NextKeyAttr,
                std::mem::size_of::<NextKeyAttr>() as u32,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                return Ok(n);
            }
            return Err(e).context("BPF_MAP_GET_NEXT_KEY");
        }
        n += 1;
        first = false;
        key = next;
    }
}

/// Keys in a node's LB_SERVICES map: two per VIP, one per published port.
pub fn service_keys(bpffs: &Path) -> Result<usize> {
    count(&bpffs.join(mesh_common::lb::SERVICES_MAP))
}
