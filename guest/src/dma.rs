//! Guest memory for devices: virtqueue rings and the buffers devices read and write. It is a fixed
//! region, [`SIZE`] bytes at the top of the free memory the VMM reports, reserved whether or not a
//! device workload runs, so the rest of free memory (the churn working set, from the bottom) is the
//! same for every combination of workloads. Memory is handed out once, never freed, zero-filled;
//! guest memory is identity mapped, so an address here is also what a device is given.

use crate::sync::Locked;

/// Rings and buffers for a few devices (each queue of up to 256 entries takes 3 pages), the disk
/// workload's data buffer (up to 1 MiB) and generations (up to 256 KiB), and the network's frame
/// buffers (384 KiB for receiving, 192 KiB for sending).
pub const SIZE: u64 = 2 << 20;

struct Pool {
    next: u64,
    end: u64,
}

static POOL: Locked<Pool> = Locked::new(Pool { next: 0, end: 0 });

/// Reserves `[base, base + SIZE)`; `base` is page aligned and inside free memory.
pub fn init(base: u64) {
    POOL.with(|p| *p = Pool { next: base, end: base + SIZE });
}

/// `len` zeroed bytes aligned to `align` (a power of two), or `None` once the region is used up.
pub fn alloc(len: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    let at = POOL.with(|p| {
        let at = p.next.checked_next_multiple_of(align)?;
        let end = at.checked_add(len).filter(|&e| e <= p.end)?;
        p.next = end;
        Some(at)
    })?;
    // SAFETY: `[at, at + len)` lies in the device region, which `init` carved out of free memory
    // that nothing else uses, and the pool hands each byte out once.
    unsafe { core::ptr::write_bytes(at as *mut u8, 0, len as usize) };
    Some(at)
}
