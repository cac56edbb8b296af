//! Reads the VM generation ID the VMM keeps at `boot_abi::VMGENID_ADDR` (the `vmgenid` boot
//! parameter), as Windows and Linux read theirs: logs it at start (`vmgenid: GUID`, or
//! `vmgenid: none` without the device), then looks again at every self-check and logs a change
//! (`vmgenid: NEW (changed from OLD)`), which a restore from a snapshot makes.

use crate::log;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

/// The ID last seen (vCPU 0 only), in guest memory: a snapshot carries it, so a restored guest
/// compares the new ID with the one it saw before.
static SEEN: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// The 16 bytes in memory: the first three fields little-endian (Windows' GUID layout).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Guid([u8; 16]);

impl Guid {
    fn now() -> Guid {
        // SAFETY: the VMM identity-maps all guest memory user-readable, and the ID's 16 bytes lie
        // below 1 MiB inside it; volatile, as the VMM may rewrite them while the guest is stopped.
        Guid(unsafe { core::ptr::read_volatile(boot_abi::VMGENID_ADDR as *const [u8; 16]) })
    }

    fn seen() -> Guid {
        let (a, b) = (SEEN[0].load(Ordering::Relaxed), SEEN[1].load(Ordering::Relaxed));
        let mut g = [0u8; 16];
        g[..8].copy_from_slice(&a.to_le_bytes());
        g[8..].copy_from_slice(&b.to_le_bytes());
        Guid(g)
    }

    fn remember(self) {
        let half = |at: usize| u64::from_le_bytes(self.0[at..at + 8].try_into().unwrap_or([0; 8]));
        SEEN[0].store(half(0), Ordering::Relaxed);
        SEEN[1].store(half(8), Ordering::Relaxed);
    }
}

/// The usual text form, xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx.
impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == [0; 16] {
            return f.write_str("none");
        }
        let b = &self.0;
        let text = [b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6]];
        for (i, x) in text.iter().chain(&b[8..]).enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{x:02x}")?;
        }
        Ok(())
    }
}

/// Logs the ID at start.
pub fn report() {
    let id = Guid::now();
    id.remember();
    log!("vmgenid: {id}");
}

/// Logs the ID if it changed since last seen (vCPU 0, at each self-check).
pub fn check() {
    let (id, seen) = (Guid::now(), Guid::seen());
    if id != seen {
        id.remember();
        log!("vmgenid: {id} (changed from {seen})");
    }
}
