//! A debugging aid (the test hook `verify` on the primary, see `config::hooks`): a copy of guest
//! memory built only from what was sent to the standby. At each checkpoint, with the vCPUs
//! stopped, every page where it differs from the real memory must be in that checkpoint; a page
//! that is not was missed by the dirty log, and is reported. It costs a full memory compare per
//! checkpoint.

use crate::vmm::dirty::PAGE_SIZE;
use crate::vmm::memory::GuestMemory;
use crate::vmm::pages::MemoryPages;

pub struct Shadow {
    mem: GuestMemory,
}

impl Shadow {
    pub fn new(size: u64) -> Shadow {
        Shadow { mem: GuestMemory::new(size).expect("shadow memory") }
    }

    pub fn reset(&self) {
        let _ = self.mem.fill(0, self.mem.size(), 0);
    }

    pub fn apply(&self, m: &MemoryPages) {
        let _ = m.apply(&self.mem);
    }

    /// Pages where `real` differs from the shadow.
    pub fn differing(&self, real: &GuestMemory) -> Vec<u64> {
        (0..real.size() / PAGE_SIZE)
            .filter(|&p| match (real.page(p), self.mem.page(p)) {
                (Ok(a), Ok(b)) => a != b,
                _ => false,
            })
            .collect()
    }
}
