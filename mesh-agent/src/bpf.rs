//! bpf(2) commands aya 0.14 does not expose: running a loaded program on a test packet
//! (BPF_PROG_TEST_RUN, for unit tests and ns/packet benchmarks), opening a pinned object and
//! swapping the program behind a link (BPF_LINK_UPDATE, for links aya cannot update).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// The BPF_PROG_TEST_RUN member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// The leading fields of `struct __sk_buff` a test run may set; the kernel requires the
/// others in this prefix to be zero and zero-fills the rest of the struct.
#[repr(C)]
#[derive(Default)]
struct SkBuffPrefix {
    len: u32,
    pkt_type: u32,
    mark: u32,
    queue_mapping: u32,
    protocol: u32,
    vlan_present: u32,
    vlan_tci: u32,
    vlan_proto: u32,
    priority: u32,
    ingress_ifindex: u32,
    ifindex: u32,
    tc_index: u32,
    cb: [u32; 5],
}

/// Where a test packet pretends to have arrived.
#[derive(Clone, Copy, Debug, Default)]
pub struct SkbContext {
    /// The device the program sees as `skb->ifindex`; 0 for loopback.
    pub ifindex: u32,
    pub mark: u32,
}

#[derive(Clone, Debug)]
pub struct TestRun {
    /// The program's return value (a TC action for classifiers).
    pub retval: u32,
    /// The packet as the program left it.
    pub data: Vec<u8>,
    /// Average run time per repetition, as the kernel measured it.
    pub duration_ns: u32,
}

/// Runs a loaded TC (sched_cls) program `repeat` times on an Ethernet `frame`. The packet is
/// not transmitted, whatever the verdict: a redirect only shows as the return value.
pub fn test_run_skb(
    prog: BorrowedFd<'_>,
    frame: &[u8],
    repeat: u32,
    ctx: SkbContext,
) -> io::Result<TestRun> {
    // Room for what a program may add (encapsulation) on top of the input.
    let mut out = vec![0u8; frame.len() + 256];
    let ctx_in = SkBuffPrefix {
        ifindex: ctx.ifindex,
        mark: ctx.mark,
        ..Default::default()
    };
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ctx_size_in: size_of::<SkBuffPrefix>() as u32,
        ctx_in: &ctx_in as *const SkBuffPrefix as u64,
        ..Default::default()
    };
    // SAFETY: `attr` points at buffers that outlive the call, with their true sizes.
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
    out.truncate(attr.data_size_out as usize);
    Ok(TestRun {
        retval: attr.retval,
        data: out,
        duration_ns: attr.duration,
    })
}

/// Opens a pinned map, program or link.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    #[derive(Default)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in pin path"))?;
    let mut attr = ObjAttr {
        pathname: c_path.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: `attr` points at a NUL-terminated path that outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) }?;
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Atomically replaces the program behind a link: the hook never runs without a program.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    #[derive(Default)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: plain attribute struct.
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }?;
    Ok(())
}

/// # Safety
/// `attr` must be the attribute struct of `cmd`, with every pointer in it valid.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i32> {
    // SAFETY: forwarded to the caller.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as i32)
}
