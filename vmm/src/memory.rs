//! Guest memory: one shared mapping of a memfd, so that later stages can snapshot it, hand it to
//! another process, or back it with huge pages. Guest-physical address 0 is offset 0.

use super::dirty::{Bitmap, PAGE_SIZE};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vm_memory::bitmap::{Bitmap as VmBitmap, BitmapSlice, NewBitmap, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest memory file")]
    Memfd(#[source] std::io::Error),
    #[error("cannot size guest memory to {size} bytes")]
    Truncate { size: u64, source: std::io::Error },
    #[error("cannot map {size} bytes of guest memory")]
    Mmap { size: u64, source: std::io::Error },
    #[error("guest range {addr:#x}+{len:#x} is outside the {size:#x} bytes of guest memory")]
    OutOfRange { addr: u64, len: u64, size: u64 },
    #[error("cannot build the device view of guest memory: {0}")]
    DeviceView(String),
    #[error("cannot give guest range {addr:#x}+{len:#x} back to the host")]
    Discard { addr: u64, len: u64, source: std::io::Error },
}

pub struct GuestMemory {
    fd: OwnedFd,
    host: *mut u8,
    size: u64,
    /// Pages the VMM itself wrote (device emulation, loaders): KVM's dirty log does not see
    /// these, so the dirty log ORs them in. Shared with the device view.
    vmm_dirty: Arc<[AtomicU64]>,
}

// SAFETY: the mapping lives as long as `GuestMemory` and is only reached through bounds-checked
// methods; guest memory is shared with the vCPUs by design, so concurrent access is expected and
// done with copies, never with Rust references that claim exclusivity.
unsafe impl Send for GuestMemory {}
// SAFETY: as above.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        // SAFETY: the name is a valid NUL-terminated string; the result is checked.
        let raw = unsafe { libc::memfd_create(c"smpft-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on a descriptor we own; the result is checked.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } < 0 {
            return Err(MemoryError::Truncate { size, source: std::io::Error::last_os_error() });
        }
        // SAFETY: a new shared mapping of `size` bytes of our memfd; the result is checked.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(MemoryError::Mmap { size, source: std::io::Error::last_os_error() });
        }
        // Best effort: THP for shmem depends on the host's shmem_enabled setting.
        // SAFETY: advice on a mapping we own; failure is harmless.
        unsafe { libc::madvise(host, size as usize, libc::MADV_HUGEPAGE) };
        // Guest memory is the guest's data, and can be most of the host's memory: it is left out
        // of smpft's core dumps (QEMU's dump-guest-core=off, libvirt's default).
        // SAFETY: advice on a mapping we own; failure only leaves it in core dumps.
        unsafe { libc::madvise(host, size as usize, libc::MADV_DONTDUMP) };
        let vmm_dirty: Arc<[AtomicU64]> = (0..(size / PAGE_SIZE).div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Ok(GuestMemory { fd, host: host.cast(), size, vmm_dirty })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn host_addr(&self) -> u64 {
        self.host as u64
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    fn check(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        match addr.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(MemoryError::OutOfRange { addr, len, size: self.size }),
        }
    }

    fn mark_dirty(&self, addr: u64, len: u64) {
        mark(&self.vmm_dirty, addr, len);
    }

    /// Guest memory as devices see it: the same mapping, through vm-memory (which
    /// `virtio-queue` works on), where every write marks its pages dirty like
    /// [`GuestMemory::write`] does, so device DMA is never missing from a checkpoint.
    pub fn device_view(self: &Arc<Self>) -> Result<DeviceMemory, MemoryError> {
        let err = |e: &dyn std::fmt::Display| MemoryError::DeviceView(e.to_string());
        let bitmap = DirtyPages { words: Some(self.vmm_dirty.clone()), base: 0 };
        // SAFETY: `host` and `size` describe this value's own shared read-write mapping, which
        // outlives the view: `DeviceMemory` holds an `Arc` to `self`.
        let builder =
            unsafe { MmapRegionBuilder::new_with_bitmap(self.size as usize, bitmap).with_raw_mmap_pointer(self.host) };
        let region = builder
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| err(&e))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or_else(|| err(&"region overflows"))?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(|e| err(&e))?;
        Ok(DeviceMemory { mem, _owner: self.clone() })
    }

    /// Moves the pages the VMM wrote since the last call into `into`.
    pub fn take_vmm_dirty(&self, into: &mut Bitmap) {
        for (i, w) in self.vmm_dirty.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::Relaxed);
            while bits != 0 {
                into.set(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
    }

    /// Byte ranges of memory that may hold data; everything else has never been written and
    /// reads as zeroes. Asked of the memfd (SEEK_DATA/SEEK_HOLE), so a scan for non-zero pages
    /// skips the holes without faulting them in.
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        let fd = self.fd.as_raw_fd();
        let mut out = Vec::new();
        let mut at: u64 = 0;
        while at < self.size {
            // SAFETY: lseek on a descriptor we own; results are checked.
            let start = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
            if start < 0 {
                // ENXIO: no data beyond `at`. Anything else: assume everything may be data.
                if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                    return vec![(0, self.size)];
                }
                break;
            }
            // SAFETY: as above.
            let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
            let end = if end < 0 { self.size } else { (end as u64).min(self.size) };
            if end <= start as u64 {
                break;
            }
            out.push((start as u64, end));
            at = end;
        }
        out
    }

    /// A read-only view of one page, for copying it out while the vCPUs are paused.
    pub fn page(&self, page: u64) -> Result<&[u8], MemoryError> {
        let addr = page * PAGE_SIZE;
        self.check(addr, PAGE_SIZE)?;
        // SAFETY: in range (checked). Callers read it only while the vCPUs are paused and no
        // device writes guest memory, so nothing changes the bytes under the shared reference.
        Ok(unsafe { std::slice::from_raw_parts(self.host.add(addr as usize), PAGE_SIZE as usize) })
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.check(addr, data.len() as u64)?;
        self.mark_dirty(addr, data.len() as u64);
        // SAFETY: the range is inside the mapping (checked); `data` cannot overlap guest memory
        // because no Rust reference into guest memory is ever handed out.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.host.add(addr as usize), data.len()) };
        Ok(())
    }

    pub fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), MemoryError> {
        self.check(addr, out.len() as u64)?;
        // SAFETY: as for `write`, in the other direction.
        unsafe { std::ptr::copy_nonoverlapping(self.host.add(addr as usize), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    pub fn write_u64(&self, addr: u64, v: u64) -> Result<(), MemoryError> {
        self.write(addr, &v.to_le_bytes())
    }

    /// Gives a range back to the host (a balloon's pages, a reset's memory): whole pages are
    /// punched out of the memory file, so they take no host memory until the guest touches them
    /// again, and read as zero; the ragged ends are zeroed. The range is marked dirty, so the
    /// next checkpoint or snapshot carries the zeroes to the other copy.
    pub fn discard(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        self.check(addr, len)?;
        let (start, end) = (addr.next_multiple_of(PAGE_SIZE), (addr + len) / PAGE_SIZE * PAGE_SIZE);
        if start >= end {
            return self.fill(addr, len, 0);
        }
        self.fill(addr, start - addr, 0)?;
        self.fill(end, addr + len - end, 0)?;
        self.mark_dirty(start, end - start);
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: plain syscall on the memory file we own, inside its size (checked); the
        // mapping stays valid and reads the punched range as zeroes.
        let r =
            unsafe { libc::fallocate(self.fd.as_raw_fd(), mode, start as libc::off_t, (end - start) as libc::off_t) };
        if r < 0 {
            let source = std::io::Error::last_os_error();
            return Err(MemoryError::Discard { addr: start, len: end - start, source });
        }
        Ok(())
    }

    pub fn fill(&self, addr: u64, len: u64, byte: u8) -> Result<(), MemoryError> {
        self.check(addr, len)?;
        self.mark_dirty(addr, len);
        // SAFETY: the range is inside the mapping (checked).
        unsafe { std::ptr::write_bytes(self.host.add(addr as usize), byte, len as usize) };
        Ok(())
    }
}

fn mark(words: &[AtomicU64], addr: u64, len: u64) {
    if len == 0 {
        return;
    }
    for page in addr / PAGE_SIZE..=(addr + len - 1) / PAGE_SIZE {
        if let Some(w) = words.get((page / 64) as usize) {
            w.fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
    }
}

/// vm-memory's dirty tracking, feeding the VMM's own dirty bitmap.
#[derive(Clone, Debug, Default)]
pub struct DirtyPages {
    words: Option<Arc<[AtomicU64]>>,
    /// Offset of this slice in guest memory.
    base: usize,
}

impl WithBitmapSlice<'_> for DirtyPages {
    type S = Self;
}

impl BitmapSlice for DirtyPages {}

impl VmBitmap for DirtyPages {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some(w) = &self.words {
            mark(w, (self.base + offset) as u64, len as u64);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let page = (self.base + offset) as u64 / PAGE_SIZE;
        self.words
            .as_ref()
            .and_then(|w| w.get((page / 64) as usize))
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (page % 64)) != 0)
    }

    fn slice_at(&self, offset: usize) -> Self {
        DirtyPages { words: self.words.clone(), base: self.base + offset }
    }
}

impl NewBitmap for DirtyPages {
    fn with_len(_len: usize) -> Self {
        DirtyPages::default()
    }
}

/// Guest memory for devices (see [`GuestMemory::device_view`]).
pub struct DeviceMemory {
    mem: GuestMemoryMmap<DirtyPages>,
    _owner: Arc<GuestMemory>,
}

impl std::ops::Deref for DeviceMemory {
    type Target = GuestMemoryMmap<DirtyPages>;
    fn deref(&self) -> &Self::Target {
        &self.mem
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping created in `new`; no references into it outlive `self`.
        unsafe { libc::munmap(self.host.cast(), self.size as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_ranges_skip_holes() {
        let m = GuestMemory::new(64 << 20).unwrap();
        assert!(m.data_ranges().is_empty(), "fresh memory is all hole");
        m.write(40 << 20, &[1]).unwrap();
        let r = m.data_ranges();
        assert!(r.iter().any(|&(s, e)| s <= 40 << 20 && e > 40 << 20), "{r:?}");
        assert!(r.iter().map(|(s, e)| e - s).sum::<u64>() < 64 << 20, "{r:?}");
    }

    #[test]
    fn discarded_ranges_read_zero_take_no_host_memory_and_are_dirty() {
        let m = GuestMemory::new(8 << 20).unwrap();
        m.fill(0, 8 << 20, 0xa5).unwrap();
        m.take_vmm_dirty(&mut Bitmap::new(2048));
        // Two whole pages and a ragged page on each side.
        m.discard(0x1800, 0x3000).unwrap();
        let mut all = vec![0u8; 0x6000];
        m.read(0, &mut all).unwrap();
        assert!(all[..0x1800].iter().all(|&b| b == 0xa5));
        assert!(all[0x1800..0x4800].iter().all(|&b| b == 0), "the range reads as zero");
        assert!(all[0x4800..].iter().all(|&b| b == 0xa5), "nothing beyond it changed");
        let mut dirty = Bitmap::new(2048);
        m.take_vmm_dirty(&mut dirty);
        assert_eq!(dirty.iter().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        // A whole huge page's worth leaves the memory file (the host may back guest memory
        // with huge pages, from which single pages are only zeroed).
        m.discard(2 << 20, 2 << 20).unwrap();
        let data = m.data_ranges();
        assert!(!data.iter().any(|&(s, e)| s < 4 << 20 && e > 2 << 20), "2..4 MiB is punched out: {data:?}");
        assert!(m.discard(8 << 20, 1).is_err(), "outside memory");
    }

    #[test]
    fn reads_back_what_was_written_and_rejects_out_of_range() {
        let m = GuestMemory::new(1 << 20).unwrap();
        m.write(0x1000, b"hello").unwrap();
        let mut b = [0u8; 5];
        m.read(0x1000, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert!(matches!(m.write((1 << 20) - 2, b"abc"), Err(MemoryError::OutOfRange { .. })));
        assert!(m.read(u64::MAX, &mut b).is_err());
        let mut dirty = Bitmap::new(256);
        m.take_vmm_dirty(&mut dirty);
        assert_eq!(dirty.iter().collect::<Vec<_>>(), vec![1]);
        m.fill(0x1000, 5, 0).unwrap();
        m.read(0x1000, &mut b).unwrap();
        assert_eq!(b, [0; 5]);
    }

    #[test]
    fn device_writes_mark_pages_dirty() {
        use vm_memory::Bytes;
        let m = Arc::new(GuestMemory::new(1 << 20).unwrap());
        let view = m.device_view().unwrap();
        view.write_slice(b"dma", GuestAddress(5 * PAGE_SIZE + 4094)).unwrap();
        view.write_obj(7u32, GuestAddress(9 * PAGE_SIZE)).unwrap();
        let mut dirty = Bitmap::new(256);
        m.take_vmm_dirty(&mut dirty);
        assert_eq!(dirty.iter().collect::<Vec<_>>(), vec![5, 6, 9]);
        let mut b = [0u8; 3];
        m.read(5 * PAGE_SIZE + 4094, &mut b).unwrap();
        assert_eq!(&b, b"dma", "the view is the same memory");
        assert!(view.write_slice(b"x", GuestAddress(1 << 20)).is_err(), "bounds are checked");
    }
}
