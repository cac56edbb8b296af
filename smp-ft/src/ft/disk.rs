//! The primary's side of disk mirroring in the FT engine: the initial copy of the disks, carried
//! in the pre-copy rounds beside memory.
//!
//! The write log keeps every op from the moment a standby attaches. Each pre-copy round seals the
//! ops logged since the previous one, then reads blocks still to copy (every block at first, or
//! with `compare` only those whose hash differs from the standby's), and sends the ops before the
//! blocks; the standby applies them in that order, so it ends with exactly what the primary's
//! disk holds (see `disk_mirror::log`). The synchronising pause seals the last ops; from that
//! checkpoint on, each checkpoint carries its epoch's ops.
//!
//! The log watches the VM's disks as their [`DiskObserver`]: the disks report every completed
//! change to it, and wait while it is full. [`DiskLog::disk_log`] installs it.

use crate::vmm::devices::{Devices, DiskObserver};
use block::{Backend, BackendError};
use disk_mirror::digest::{self, Digest};
use disk_mirror::log::{self, BlockMap, Op, WriteLog, BLOCK};
use std::sync::Arc;

/// How much write data the disk log holds before the disks wait for a checkpoint.
pub const DISK_LOG_BUDGET: usize = 32 << 20;

/// The write log as the disks' observer: it keeps what they change, and holds them while full.
struct LogObserver(Arc<WriteLog>);

impl DiskObserver for LogObserver {
    fn completed(&self, disk: u32, op: Op) {
        self.0.record(disk, op);
    }

    fn hold(&self) -> bool {
        self.0.full()
    }
}

/// The write log of a VM's disks.
pub trait DiskLog {
    /// The log of the disks' changes, installed as their observer the first time it is asked
    /// for: the FT engine asks when it starts protecting the VM (after a boot, a restore or a
    /// go-live alike). Until then nothing watches the disks, as a log that keeps nothing would.
    fn disk_log(&self) -> Arc<WriteLog>;
}

impl DiskLog for Devices {
    fn disk_log(&self) -> Arc<WriteLog> {
        let new_log = || {
            let sizes: Vec<u64> = self.disk_backends().iter().map(|d| d.size()).collect();
            let budget = crate::config::hooks::current().disk_log_budget.unwrap_or(DISK_LOG_BUDGET);
            Arc::new(WriteLog::new(&sizes, budget))
        };
        match self.disk_observer(|| Arc::new(LogObserver(new_log()))) {
            Some(observer) => observer.0.clone(),
            None => {
                // Only this module installs disk observers: this is not reached.
                tracing::error!(
                    "the disks have an observer other than the FT write log: their writes are not mirrored"
                );
                new_log()
            }
        }
    }
}

/// How the initial copy treats the standby's disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DiskSync {
    /// Copy every block.
    #[default]
    Full,
    /// The standby hashes its disks and sends the digests; only blocks that differ are copied.
    Compare,
}

/// Bytes of the primary's disks hashed per pre-copy round in `compare` mode.
pub const COMPARE_BYTES: u64 = 256 << 20;

/// Where the comparison with the standby's digests is.
struct Comparing {
    digests: Vec<Digest>,
    disk: usize,
    /// The next hashed block of `disk`.
    next: u64,
}

/// Blocks read per pre-copy round (a round is acknowledged before the next is read, so this and
/// the log's budget bound the disk data in flight during the copy).
pub const ROUND_BYTES: u64 = 32 << 20;

/// Pages a disk block counts for when the copy decides whether to iterate again.
pub const PAGES_PER_BLOCK: u64 = BLOCK / 4096;

/// The initial copy of the disks.
pub struct DiskCopy {
    /// Blocks still to copy, per disk.
    maps: Vec<BlockMap>,
    /// Bytes of disk data sent (blocks and ops).
    pub bytes: u64,
    /// Bytes found identical on the standby (`compare`).
    pub same: u64,
    comparing: Option<Comparing>,
}

impl DiskCopy {
    /// Copies every block of disks of these sizes.
    pub fn full(sizes: &[u64]) -> DiskCopy {
        let mut maps: Vec<BlockMap> = sizes.iter().map(|&s| BlockMap::new(s)).collect();
        maps.iter_mut().for_each(BlockMap::set_all);
        DiskCopy { maps, bytes: 0, same: 0, comparing: None }
    }

    /// Copies the blocks that differ from the standby's `digests` (checked to match the disks):
    /// they are found a round at a time, while the guest runs.
    pub fn compare(sizes: &[u64], digests: Vec<Digest>) -> DiskCopy {
        let maps = sizes.iter().map(|&s| BlockMap::new(s)).collect();
        DiskCopy { maps, bytes: 0, same: 0, comparing: Some(Comparing { digests, disk: 0, next: 0 }) }
    }

    /// Whether blocks are still to be found or sent (those rounds do not count towards the
    /// round limit: the final pause must not copy a disk).
    pub fn copying(&self) -> bool {
        self.comparing.is_some() || self.maps.iter().any(|m| m.count() > 0)
    }

    /// What is left, as pages (for the decision to iterate): blocks to copy and ops logged.
    pub fn pending_pages(&self, log: &WriteLog) -> u64 {
        let blocks: u64 = self.maps.iter().map(BlockMap::count).sum();
        blocks.saturating_mul(PAGES_PER_BLOCK) + log.pending().div_ceil(4096) as u64
    }

    /// Hashes up to [`COMPARE_BYTES`] of the primary's disks and marks the blocks whose hash
    /// differs from the standby's. (A block written after it was hashed: the op is in the log.)
    fn compare_some(&mut self, disks: &[Arc<dyn Backend>]) -> Result<(), BackendError> {
        let Some(c) = self.comparing.as_mut() else { return Ok(()) };
        let mut budget = COMPARE_BYTES;
        while budget > 0 {
            let (Some(d), Some(disk), Some(map)) =
                (c.digests.get(c.disk), disks.get(c.disk), self.maps.get_mut(c.disk))
            else {
                self.comparing = None;
                return Ok(());
            };
            let total = d.hashes.len() as u64;
            if c.next >= total {
                c.disk += 1;
                c.next = 0;
                continue;
            }
            let count = (budget / d.block).clamp(1, total - c.next);
            let mine = digest::hash_blocks(&**disk, d.block, c.next, count)?;
            for (i, h) in mine.iter().enumerate() {
                let b = c.next + i as u64;
                let len = d.block.min(d.size - b * d.block);
                if *h == d.hashes[b as usize] {
                    self.same += len;
                } else {
                    map.mark(b * d.block, len);
                }
            }
            c.next += count;
            budget = budget.saturating_sub(count * d.block);
        }
        Ok(())
    }

    /// A pre-copy round's disk changes: the ops logged since the last round, then up to
    /// [`ROUND_BYTES`] of blocks still to copy, read now.
    pub fn round(&mut self, log: &WriteLog, disks: &[Arc<dyn Backend>]) -> Result<Vec<(u32, Op)>, BackendError> {
        let mut ops = log.seal();
        self.compare_some(disks)?;
        ops.extend(self.read(disks, (ROUND_BYTES / BLOCK) as usize)?);
        self.bytes += ops.iter().map(|(_, op)| op.bytes() as u64).sum::<u64>();
        Ok(ops)
    }

    /// The synchronising pause's disk changes (vCPUs stopped): the last ops, and any block still
    /// to copy.
    pub fn last(&mut self, log: &WriteLog, disks: &[Arc<dyn Backend>]) -> Result<Vec<(u32, Op)>, BackendError> {
        let mut ops = log.seal();
        self.comparing = None;
        ops.extend(self.read(disks, usize::MAX)?);
        self.bytes += ops.iter().map(|(_, op)| op.bytes() as u64).sum::<u64>();
        Ok(ops)
    }

    /// Reads up to `max` blocks still to copy (over all disks, in order).
    fn read(&mut self, disks: &[Arc<dyn Backend>], max: usize) -> Result<Vec<(u32, Op)>, BackendError> {
        let mut out = Vec::new();
        let mut left = max;
        for (i, (disk, map)) in disks.iter().zip(&mut self.maps).enumerate() {
            if left == 0 {
                break;
            }
            let blocks = map.take(left);
            left -= blocks.len();
            match log::read_blocks(&**disk, &blocks) {
                Ok(ops) => out.extend(ops.into_iter().map(|op| (i as u32, op))),
                Err(e) => {
                    // Not copied: still to do if the copy is tried again.
                    blocks.iter().for_each(|&b| map.mark(b * BLOCK, 1));
                    return Err(e);
                }
            }
        }
        Ok(out)
    }
}
