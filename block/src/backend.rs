//! Storage behind a disk. [`RawFile`] serves raw images and block devices through io_uring,
//! with O_DIRECT where the file system allows it (requests aligned to 4 KiB go through an aligned
//! bounce buffer on the O_DIRECT descriptor; the rest, and file systems without O_DIRECT, use the
//! page cache). NBD exports ([`crate::nbd`]) are disks behind the same trait.
//!
//! Guarantees: a completed `write_at` is in the backend (a later `read_at` sees it); a completed
//! `flush` means every write completed before it is on stable storage.

use io_uring::{opcode, squeue, types, IoUring};
use std::alloc::Layout;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot open {path}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot set up io_uring")]
    Ring(#[source] std::io::Error),
    #[error("{what} at {offset:#x}+{len:#x} failed")]
    Io { what: &'static str, offset: u64, len: u64, source: std::io::Error },
    #[error("{what} at {offset:#x}+{len:#x} is past the end of the {size}-byte disk")]
    OutOfRange { what: &'static str, offset: u64, len: u64, size: u64 },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("{path} is neither a regular file nor a block device")]
    NotADisk { path: PathBuf },
    #[error(transparent)]
    Daemon(#[from] crate::qsd::QsdError),
    #[error("a disk in a format of QEMU's block layer is opened through qemu-storage-daemon (block::qsd::open_all)")]
    NeedsDaemon,
}

/// One disk's storage.
pub trait Backend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    fn readonly(&self) -> bool;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError>;
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), BackendError>;
    /// Several writes, in order (a backend may have them in flight together; the ranges of one
    /// batch do not overlap).
    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Result<(), BackendError> {
        writes.iter().try_for_each(|&(offset, data)| self.write_at(data, offset))
    }
    /// Everything written before is on stable storage when this returns.
    fn flush(&self) -> Result<(), BackendError>;
    /// The range reads as zeroes afterwards.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError>;
    /// As `write_zeroes`, and the backend may free the range's storage (a guest's write-zeroes
    /// with its unmap flag). Backends that cannot tell the two apart keep the default.
    fn write_zeroes_may_unmap(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.write_zeroes(offset, len)
    }
    /// The range's contents no longer matter (the backend may free them; they read as zeroes).
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError>;
}

/// Refuses a write to a read-only disk and a range past the end of a `size`-byte disk.
pub fn check_access(
    what: &'static str,
    offset: u64,
    len: u64,
    write: bool,
    size: u64,
    readonly: bool,
) -> Result<(), BackendError> {
    if write && readonly {
        return Err(BackendError::ReadOnly);
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BackendError::OutOfRange { what, offset, len, size }),
    }
}

/// Write-zeroes for backends that cannot do better: writes the zeroes, a chunk at a time.
pub fn write_zeroes_by_writing(b: &dyn Backend, offset: u64, len: u64) -> Result<(), BackendError> {
    let chunk = vec![0u8; len.min(MAX_IO as u64) as usize];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(chunk.len() as u64) as usize;
        b.write_at(&chunk[..n], offset + at)?;
        at += n as u64;
    }
    Ok(())
}

const ALIGN: usize = 4096;
/// The largest piece one io_uring request moves.
const MAX_IO: usize = 1 << 20;

/// A raw image file or a block device.
pub struct RawFile {
    buffered: File,
    direct: Option<File>,
    /// `None` once the ring failed.
    ring: Mutex<Option<IoUring>>,
    size: u64,
    readonly: bool,
    block_device: bool,
}

impl RawFile {
    pub fn open(path: &Path, readonly: bool) -> Result<RawFile, BackendError> {
        let open = |flags: i32| OpenOptions::new().read(true).write(!readonly).custom_flags(flags).open(path);
        let err = |source| BackendError::Open { path: path.to_path_buf(), source };
        let buffered = open(0).map_err(err)?;
        let meta = buffered.metadata().map_err(err)?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(BackendError::NotADisk { path: path.to_path_buf() });
        }
        // Some file systems (tmpfs) refuse O_DIRECT: the page cache serves then.
        let direct = open(libc::O_DIRECT).ok();
        let size = if block_device {
            // SAFETY: lseek on a descriptor we own; the result is checked.
            let end = unsafe { libc::lseek(buffered.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(err(std::io::Error::last_os_error()));
            }
            end as u64
        } else {
            meta.len()
        };
        let ring = IoUring::new(8).map_err(BackendError::Ring)?;
        Ok(RawFile { buffered, direct, ring: Mutex::new(Some(ring)), size, readonly, block_device })
    }

    fn check(&self, what: &'static str, offset: u64, len: u64, write: bool) -> Result<(), BackendError> {
        check_access(what, offset, len, write, self.size, self.readonly)
    }

    /// Submits one request and waits for it; returns the result (bytes, or 0).
    ///
    /// It returns only once the completion is in: the kernel may use the caller's buffer until
    /// then. A signal (the vCPU threads that serve disk requests are kicked with one) can end the
    /// wait after the submission and before the completion, so the wait is repeated.
    fn run(&self, entry: squeue::Entry) -> std::io::Result<u32> {
        let mut guard = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ring) = guard.as_mut() else {
            return Err(std::io::Error::other("the io_uring failed before: the disk is unusable"));
        };
        // SAFETY: every buffer an entry points to is borrowed by the caller for the whole call,
        // and the call waits for the completion before returning.
        unsafe { ring.submission().push(&entry) }.map_err(|_| std::io::Error::other("io_uring queue full"))?;
        loop {
            if let Some(cqe) = ring.completion().next() {
                if cqe.result() < 0 {
                    return Err(std::io::Error::from_raw_os_error(-cqe.result()));
                }
                return Ok(cqe.result() as u32);
            }
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {}
                Err(e) => {
                    // The ring itself is broken, and the request may or may not be with the
                    // kernel: the ring is never used again (the caller's buffer stays safe).
                    std::mem::forget(guard.take());
                    return Err(e);
                }
            }
        }
    }

    /// Reads or writes all of `len` bytes at `ptr`, resubmitting after short transfers.
    fn transfer(&self, fd: &File, write: bool, ptr: *mut u8, len: usize, offset: u64) -> std::io::Result<()> {
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(MAX_IO) as u32;
            let fd = types::Fd(fd.as_raw_fd());
            // SAFETY: `done < len`, so the result stays inside the caller's `len`-byte buffer.
            let p = unsafe { ptr.add(done) };
            let entry = if write {
                opcode::Write::new(fd, p, n).offset(offset + done as u64).build()
            } else {
                opcode::Read::new(fd, p, n).offset(offset + done as u64).build()
            };
            let got = self.run(entry)? as usize;
            if got == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            done += got;
        }
        Ok(())
    }

    /// The O_DIRECT descriptor, when `offset` and `len` suit it.
    fn direct_for(&self, offset: u64, len: usize) -> Option<&File> {
        self.direct.as_ref().filter(|_| offset % ALIGN as u64 == 0 && len % ALIGN == 0 && len > 0)
    }
}

/// An aligned buffer for O_DIRECT.
struct Bounce {
    ptr: *mut u8,
    layout: Layout,
}

impl Bounce {
    fn new(len: usize) -> Bounce {
        let layout = Layout::from_size_align(len.max(ALIGN), ALIGN).expect("a valid layout");
        // Not zeroed: a write fills it before the kernel reads it, and a read's bytes are used
        // only once the kernel has filled all of them.
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Bounce { ptr, layout }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

impl Backend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn readonly(&self) -> bool {
        self.readonly
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        let len = buf.len();
        self.check("read", offset, len as u64, false)?;
        let io = |source| BackendError::Io { what: "read", offset, len: len as u64, source };
        match self.direct_for(offset, len) {
            Some(fd) => {
                let b = Bounce::new(len);
                self.transfer(fd, false, b.ptr, len, offset).map_err(io)?;
                // SAFETY: `b` holds `len` initialised bytes.
                buf.copy_from_slice(unsafe { std::slice::from_raw_parts(b.ptr, len) });
                Ok(())
            }
            None => self.transfer(&self.buffered, false, buf.as_mut_ptr(), len, offset).map_err(io),
        }
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), BackendError> {
        let len = data.len();
        self.check("write", offset, len as u64, true)?;
        let io = |source| BackendError::Io { what: "write", offset, len: len as u64, source };
        match self.direct_for(offset, len) {
            Some(fd) => {
                let b = Bounce::new(len);
                // SAFETY: `b` has room for `len` bytes and does not overlap `data`.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), b.ptr, len) };
                self.transfer(fd, true, b.ptr, len, offset).map_err(io)
            }
            // The kernel only reads from the buffer of a write.
            None => self.transfer(&self.buffered, true, data.as_ptr().cast_mut(), len, offset).map_err(io),
        }
    }

    fn flush(&self) -> Result<(), BackendError> {
        let fd = types::Fd(self.buffered.as_raw_fd());
        let entry = opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build();
        self.run(entry).map(|_| ()).map_err(|source| BackendError::Io { what: "flush", offset: 0, len: 0, source })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.check("write-zeroes", offset, len, true)?;
        let mode = if self.block_device {
            libc::FALLOC_FL_ZERO_RANGE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        let fd = types::Fd(self.buffered.as_raw_fd());
        match self.run(opcode::Fallocate::new(fd, len).offset(offset).mode(mode).build()) {
            Ok(_) => Ok(()),
            // Not every file system zeroes ranges: write the zeroes.
            Err(_) => write_zeroes_by_writing(self, offset, len),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.check("discard", offset, len, true)?;
        let fd = types::Fd(self.buffered.as_raw_fd());
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.run(opcode::Fallocate::new(fd, len).offset(offset).mode(mode).build()) {
            Ok(_) => Ok(()),
            // A discard is advice; where holes cannot be punched, zeroes keep "reads as zero".
            Err(_) => self.write_zeroes(offset, len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(size: u64) -> (tempfile::TempDir, PathBuf) {
        // Not /tmp (often tmpfs, which refuses O_DIRECT): the build directory's file system.
        let exe = std::env::current_exe().unwrap();
        let dir = tempfile::Builder::new().prefix("disk-mirror-").tempdir_in(exe.parent().unwrap()).unwrap();
        let path = dir.path().join("disk.raw");
        File::create(&path).unwrap().set_len(size).unwrap();
        (dir, path)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn writes_read_back_aligned_or_not_and_survive_reopening() {
        let (_d, path) = image(4 << 20);
        let disk = RawFile::open(&path, false).unwrap();
        assert_eq!(disk.size(), 4 << 20);
        let cases = [(0u64, 4096usize, 1u8), (8192, 3 << 20, 2), (513, 1000, 3), (4096 * 7 + 17, 9000, 4)];
        for &(off, len, seed) in &cases {
            disk.write_at(&pattern(len, seed), off).unwrap();
        }
        disk.flush().unwrap();
        drop(disk);
        let disk = RawFile::open(&path, true).unwrap();
        // Later writes win where they overlap: check in reverse order of writing.
        let mut expect = vec![0u8; 4 << 20];
        for &(off, len, seed) in &cases {
            expect[off as usize..off as usize + len].copy_from_slice(&pattern(len, seed));
        }
        let mut got = vec![0u8; 4 << 20];
        disk.read_at(&mut got, 0).unwrap();
        assert!(got == expect, "the image holds exactly what was written");
        let mut part = vec![0u8; 4096];
        disk.read_at(&mut part, 8192).unwrap();
        assert_eq!(part, expect[8192..8192 + 4096]);
    }

    #[test]
    fn zeroes_discards_and_bounds() {
        let (_d, path) = image(1 << 20);
        let disk = RawFile::open(&path, false).unwrap();
        disk.write_at(&[0xaa; 65536], 0).unwrap();
        disk.write_zeroes(4096, 8192).unwrap();
        disk.discard(32768, 4096).unwrap();
        let mut got = vec![0u8; 65536];
        disk.read_at(&mut got, 0).unwrap();
        assert!(got[..4096].iter().all(|&b| b == 0xaa));
        assert!(got[4096..12288].iter().all(|&b| b == 0), "zeroed");
        assert!(got[12288..32768].iter().all(|&b| b == 0xaa));
        assert!(got[32768..36864].iter().all(|&b| b == 0), "discarded reads as zeroes");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20, "the size is kept");
        assert!(matches!(disk.write_at(&[1; 10], (1 << 20) - 5), Err(BackendError::OutOfRange { .. })));
        assert!(matches!(disk.read_at(&mut [0; 1], 1 << 20), Err(BackendError::OutOfRange { .. })));
        assert!(matches!(disk.discard(u64::MAX, 2), Err(BackendError::OutOfRange { .. })));
        let ro = RawFile::open(&path, true).unwrap();
        assert!(matches!(ro.write_at(&[1], 0), Err(BackendError::ReadOnly)));
    }

    #[test]
    fn what_is_not_a_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(RawFile::open(dir.path(), true), Err(BackendError::NotADisk { .. })));
        assert!(matches!(RawFile::open(&dir.path().join("missing"), true), Err(BackendError::Open { .. })));
    }
}

/// A disk held in memory: for tests, and wherever a scratch disk is wanted.
#[derive(Debug, Default)]
pub struct MemoryDisk(Mutex<Vec<u8>>);

impl MemoryDisk {
    /// A disk of `size` bytes, every byte `fill`.
    pub fn new(size: usize, fill: u8) -> MemoryDisk {
        MemoryDisk(Mutex::new(vec![fill; size]))
    }

    /// A disk holding `data`.
    pub fn from_vec(data: Vec<u8>) -> MemoryDisk {
        MemoryDisk(Mutex::new(data))
    }

    /// A copy of what the disk holds.
    pub fn contents(&self) -> Vec<u8> {
        self.data().clone()
    }

    fn data(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn range(&self, what: &'static str, offset: u64, len: u64) -> Result<std::ops::Range<usize>, BackendError> {
        let size = self.data().len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(BackendError::OutOfRange { what, offset, len, size }),
        }
    }
}

impl Backend for MemoryDisk {
    fn size(&self) -> u64 {
        self.data().len() as u64
    }
    fn readonly(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        let r = self.range("read", offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.data()[r]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), BackendError> {
        let r = self.range("write", offset, data.len() as u64)?;
        self.data()[r].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        let r = self.range("write-zeroes", offset, len)?;
        self.data()[r].fill(0);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.write_zeroes(offset, len)
    }
}
