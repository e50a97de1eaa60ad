//! Services and backend selection: which backend a new flow or socket goes to.

use mesh_common::lb::{
    BACKEND_ACTIVE, Backend, Reason, SERVICE_IN_USE, ServiceEntry, ServiceKey, ServiceState,
    SlotKey,
};

use crate::{
    atomic,
    programs::{LB_BACKENDS, LB_RR, LB_SERVICES, LB_SLOTS, LB_SVC_STATE},
};

#[inline(always)]
pub fn published(proto: u8, port: u16) -> Option<ServiceEntry> {
    // SAFETY: values are plain data; a concurrent update at worst yields a stale copy.
    unsafe { LB_SERVICES.get(ServiceKey::published(proto, port)).copied() }
}

#[inline(always)]
pub fn vip(addr: [u8; 4], proto: u8) -> Option<ServiceEntry> {
    // SAFETY: as above.
    unsafe { LB_SERVICES.get(ServiceKey::vip(addr, proto)).copied() }
}

/// The backend a new flow of `service` goes to.
pub struct Choice {
    pub id: u32,
    pub backend: Backend,
    pub network: u32,
}

/// Round robin over the service's active backends. The cursor is one u64 per service shared
/// by all CPUs and advanced atomically, so consecutive new flows get consecutive slots
/// whichever CPU they land on (per-CPU cursors would interleave unevenly).
#[inline(always)]
pub fn pick(service: u32) -> Result<Choice, Reason> {
    let state: ServiceState = *LB_SVC_STATE.get(service).ok_or(Reason::NoBackend)?;
    if state.flags & SERVICE_IN_USE == 0 || state.backends == 0 {
        return Err(Reason::NoBackend);
    }
    let cursor = LB_RR.get_ptr_mut(service).ok_or(Reason::NoBackend)?;
    // SAFETY: `cursor` is an 8-byte array map value.
    let turn = unsafe { atomic::fetch_add(cursor, 1) };
    let slot = (turn % u64::from(state.backends)) as u32;
    // Userspace shrinks a service by moving the last slot into the hole, lowering the count,
    // then deleting the last slot: a reader holding the old count can miss the last slot.
    // Slot 0 is the last one ever removed, so it is the fallback.
    // SAFETY (both): plain u32 values.
    let id = unsafe {
        match LB_SLOTS.get(SlotKey { service, slot }) {
            Some(id) => *id,
            None => *LB_SLOTS
                .get(SlotKey { service, slot: 0 })
                .ok_or(Reason::NoBackend)?,
        }
    };
    let backend: Backend = *LB_BACKENDS.get(id).ok_or(Reason::NoBackend)?;
    if backend.state != BACKEND_ACTIVE || backend.service != service {
        return Err(Reason::NoBackend);
    }
    Ok(Choice {
        id,
        backend,
        network: state.network,
    })
}

/// Whether a backend a flow or socket was pinned to still exists (active or draining) with
/// the same address; a freed or reused id means the pinned choice is gone.
#[inline(always)]
pub fn still_there(id: u32, addr: [u8; 4]) -> bool {
    match LB_BACKENDS.get(id) {
        Some(b) => b.state != 0 && b.addr == addr,
        None => false,
    }
}
