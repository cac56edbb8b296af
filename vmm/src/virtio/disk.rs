//! What every virtio device that serves disks shares (virtio-blk, and each LUN of
//! virtio-scsi): the disk's storage, its statistics, its number in the VM, and the report of
//! each completed change to the VM's [`DiskObserver`](crate::devices::DiskObserver), which the
//! FT engine mirrors to the standby epoch by epoch. A device never reaches the storage but
//! through a [`DiskIo`], so every write, write-zeroes, discard and flush of every bus is in the
//! same log.
//!
//! While the observer holds the disks a device takes no new requests ([`Deferral::more`]): they
//! wait in its queue, and the VM owner serves them (`Devices::kick_disks`) once it lets go.

use crate::devices::observer::ObserverSlot;
use block::{Backend, BackendError, Op};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What a disk has served, for QMP's `query-blockstats` (not replicated: each copy counts its own).
#[derive(Debug, Default)]
pub struct BlkStats {
    pub rd_bytes: AtomicU64,
    pub wr_bytes: AtomicU64,
    pub rd_ops: AtomicU64,
    pub wr_ops: AtomicU64,
    pub flush_ops: AtomicU64,
    pub rd_ns: AtomicU64,
    pub wr_ns: AtomicU64,
    pub flush_ns: AtomicU64,
}

/// One disk of the VM as a device serves it.
pub struct DiskIo {
    disk: Arc<dyn Backend>,
    stats: BlkStats,
    /// This disk's number in the VM (as its observer knows it).
    index: u32,
    /// For log lines ("disk0").
    name: String,
    observer: Arc<ObserverSlot>,
}

impl DiskIo {
    /// Disk number `index` of the VM (named `name` in logs), on `disk`, reporting its changes
    /// to the observer in `observer`.
    pub fn new(disk: Arc<dyn Backend>, index: u32, name: &str, observer: Arc<ObserverSlot>) -> DiskIo {
        DiskIo { disk, stats: BlkStats::default(), index, name: name.to_string(), observer }
    }

    /// The disk's storage.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.disk
    }

    pub fn stats(&self) -> &BlkStats {
        &self.stats
    }

    pub fn size(&self) -> u64 {
        self.disk.size()
    }

    pub fn readonly(&self) -> bool {
        self.disk.readonly()
    }

    fn count(&self, ops: &AtomicU64, bytes: Option<(&AtomicU64, u64)>, ns: &AtomicU64, since: Instant) {
        ops.fetch_add(1, Ordering::Relaxed);
        if let Some((b, n)) = bytes {
            b.fetch_add(n, Ordering::Relaxed);
        }
        ns.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn record(&self, op: Op) {
        self.observer.completed(self.index, op);
    }

    /// Fills `buf` from byte `at`.
    pub fn read(&self, buf: &mut [u8], at: u64) -> Result<(), BackendError> {
        let t = Instant::now();
        self.disk.read_at(buf, at).inspect_err(|e| self.failed("read", e))?;
        let s = &self.stats;
        self.count(&s.rd_ops, Some((&s.rd_bytes, buf.len() as u64)), &s.rd_ns, t);
        Ok(())
    }

    /// Writes `data` at byte `at`, and reports it.
    pub fn write(&self, data: Vec<u8>, at: u64) -> Result<(), BackendError> {
        let t = Instant::now();
        self.disk.write_at(&data, at).inspect_err(|e| self.failed("write", e))?;
        let s = &self.stats;
        self.count(&s.wr_ops, Some((&s.wr_bytes, data.len() as u64)), &s.wr_ns, t);
        self.record(Op::Write { offset: at, data });
        Ok(())
    }

    /// Puts everything written so far on stable storage, and reports it.
    pub fn flush(&self) -> Result<(), BackendError> {
        let t = Instant::now();
        self.disk.flush().inspect_err(|e| self.failed("flush", e))?;
        self.count(&self.stats.flush_ops, None, &self.stats.flush_ns, t);
        self.record(Op::Flush);
        Ok(())
    }

    /// The range no longer matters (the storage may free it), and reports it.
    pub fn discard(&self, at: u64, len: u64) -> Result<(), BackendError> {
        self.disk.discard(at, len).inspect_err(|e| self.failed("discard", e))?;
        self.record(Op::Discard { offset: at, len });
        Ok(())
    }

    /// The range reads as zeroes (with `unmap`, its storage may be freed), and reports it.
    pub fn write_zeroes(&self, at: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        let r = if unmap { self.disk.write_zeroes_may_unmap(at, len) } else { self.disk.write_zeroes(at, len) };
        r.inspect_err(|e| self.failed("write-zeroes", e))?;
        self.record(Op::Zeroes { offset: at, len });
        Ok(())
    }

    /// The storage failed a request: the guest gets an I/O error, and the host a log line
    /// (rate limited: a dead NBD server fails every request).
    fn failed(&self, what: &str, e: &BackendError) {
        static FAILURES: AtomicU64 = AtomicU64::new(0);
        let n = FAILURES.fetch_add(1, Ordering::Relaxed);
        if n < 8 || n % 1000 == 0 {
            tracing::error!(
                "{}: {what} failed, the guest gets an I/O error: {} ({} failures so far)",
                self.name,
                block::error_chain(e),
                n + 1
            );
        }
    }
}

/// A device's requests left waiting in its queue while the disks' observer holds the disks.
pub struct Deferral {
    observer: Arc<ObserverSlot>,
    deferred: AtomicBool,
}

impl Deferral {
    pub fn new(observer: Arc<ObserverSlot>) -> Deferral {
        Deferral { observer, deferred: AtomicBool::new(false) }
    }

    /// Whether the device may take another request now; if not, it is marked as having
    /// requests waiting.
    pub fn more(&self) -> bool {
        let hold = self.observer.hold();
        if hold {
            self.deferred.store(true, Ordering::Release);
        }
        !hold
    }

    /// Whether requests were left waiting (and clears the mark): the caller serves the queue.
    pub fn take(&self) -> bool {
        self.deferred.swap(false, Ordering::AcqRel)
    }

    /// Asks for the queue to be served again (after a restore: requests the driver made
    /// available before the cut may have no notification coming).
    pub fn set(&self) {
        self.deferred.store(true, Ordering::Release);
    }
}
