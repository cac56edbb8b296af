//! Dirty-page tracking: KVM's bitmap log with manual re-protection
//! (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` + `KVM_CLEAR_DIRTY_LOG`), ORed with the pages the VMM
//! wrote itself. Bits are never lost: what a harvest collects stays pending until the consumer
//! takes it, and a consumer that fails puts it back.
//!
//! The dirty ring is deliberately not used: on PVM hosts it overflows when guest ring-0 code
//! writes memory.

use super::memory::GuestMemory;
use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use std::os::fd::AsRawFd;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

const KVMIO: u32 = 0xae;
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("KVM_GET_DIRTY_LOG failed")]
    Get(#[source] std::io::Error),
    #[error("KVM_CLEAR_DIRTY_LOG failed")]
    Clear(#[source] std::io::Error),
    #[error("cannot enable manual dirty-log protection")]
    EnableCap(#[source] kvm_ioctls::Error),
}

/// A set of guest pages, one bit per 4 KiB page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    pages: u64,
}

impl Bitmap {
    pub fn new(pages: u64) -> Bitmap {
        Bitmap { words: vec![0; pages.div_ceil(64) as usize], pages }
    }

    pub fn full(pages: u64) -> Bitmap {
        let mut b = Bitmap::new(pages);
        b.words.fill(!0);
        b.trim();
        b
    }

    fn trim(&mut self) {
        let extra = self.words.len() as u64 * 64 - self.pages;
        if extra > 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= !0u64 >> extra;
            }
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    pub fn get(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    pub fn or(&mut self, other: &Bitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The set pages in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros();
                w &= w - 1;
                Some(i as u64 * 64 + u64::from(bit))
            })
        })
    }
}

/// The dirty log of memory slot 0 (all guest memory).
pub struct DirtyLog {
    slot: u32,
    /// Harvested and VMM-written pages not yet taken by a consumer.
    pending: Bitmap,
    /// Transfer buffer for KVM.
    buf: Vec<u64>,
}

impl DirtyLog {
    /// Turns on manual protection (with all pages initially dirty when KVM offers it) for a VM
    /// whose memory slot is registered afterwards with `KVM_MEM_LOG_DIRTY_PAGES`.
    pub fn enable_manual_protect(vm: &VmFd) -> Result<(), DirtyError> {
        let supported = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) as u64;
        let want = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET) & supported;
        if want == 0 {
            return Ok(());
        }
        let mut cap = kvm_enable_cap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, ..Default::default() };
        cap.args[0] = want;
        vm.enable_cap(&cap).map_err(DirtyError::EnableCap)
    }

    /// A log for `mem` in `slot`. Every page starts out pending, so the first consumer sees all
    /// of memory.
    pub fn new(slot: u32, mem: &GuestMemory) -> DirtyLog {
        let pages = mem.size() / PAGE_SIZE;
        DirtyLog { slot, pending: Bitmap::full(pages), buf: vec![0; pages.div_ceil(64) as usize] }
    }

    /// Collects KVM's dirty bits (re-protecting those pages) and the VMM's own writes.
    pub fn harvest(&mut self, vm: &VmFd, mem: &GuestMemory) -> Result<(), DirtyError> {
        self.buf.fill(0);
        let log = kvm_dirty_log {
            slot: self.slot,
            padding1: 0,
            __bindgen_anon_1: kvm_bindings::kvm_dirty_log__bindgen_ty_1 { dirty_bitmap: self.buf.as_mut_ptr().cast() },
        };
        // SAFETY: KVM writes one bit per page of slot `slot` into `buf`, which holds that many
        // bits (sized from the slot's memory); the result is checked.
        let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_GET_DIRTY_LOG() as _, &log) };
        if r < 0 {
            return Err(DirtyError::Get(std::io::Error::last_os_error()));
        }
        if self.buf.iter().any(|&w| w != 0) {
            let clear = kvm_clear_dirty_log {
                slot: self.slot,
                num_pages: self.pending.pages() as u32,
                first_page: 0,
                __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: self.buf.as_mut_ptr().cast(),
                },
            };
            // SAFETY: as above: `buf` covers every page of the slot; KVM only reads it here.
            let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG() as _, &clear) };
            if r < 0 {
                // The bits are already in `buf`: keep them rather than lose them.
                self.merge_buf();
                return Err(DirtyError::Clear(std::io::Error::last_os_error()));
            }
        }
        self.merge_buf();
        mem.take_vmm_dirty(&mut self.pending);
        Ok(())
    }

    fn merge_buf(&mut self) {
        for (p, b) in self.pending.words.iter_mut().zip(&self.buf) {
            *p |= b;
        }
    }

    /// Takes every pending page; the caller puts them back with [`Self::put_back`] if it fails
    /// to use them.
    pub fn take(&mut self) -> Bitmap {
        let pages = self.pending.pages();
        std::mem::replace(&mut self.pending, Bitmap::new(pages))
    }

    pub fn put_back(&mut self, pages: &Bitmap) {
        self.pending.or(pages);
    }

    pub fn pending(&self) -> u64 {
        self.pending.count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_set_iter_count_and_trim() {
        let mut b = Bitmap::new(130);
        for p in [0, 63, 64, 129, 500] {
            b.set(p);
        }
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 63, 64, 129]);
        assert_eq!(b.count(), 4);
        assert!(b.get(129) && !b.get(128) && !b.get(500));
        let f = Bitmap::full(130);
        assert_eq!(f.count(), 130);
        let mut e = Bitmap::new(130);
        assert!(e.is_empty());
        e.or(&b);
        assert_eq!(e, b);
    }

    #[test]
    fn taken_bits_can_be_put_back() {
        let mem = GuestMemory::new(1 << 20).unwrap();
        let mut log = DirtyLog::new(0, &mem);
        assert_eq!(log.pending(), 256, "everything is pending at first");
        let all = log.take();
        assert_eq!(log.pending(), 0);
        log.put_back(&all);
        assert_eq!(log.pending(), 256);
    }
}
