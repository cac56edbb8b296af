//! The primary's side of disk mirroring in the FT engine: the initial copy of the disks, carried
//! in the pre-copy rounds beside memory, and the hand-over to the write log when the synchronising
//! pause ends it.
//!
//! The copy works on the write log's block bitmap: every block starts marked (or, with `compare`,
//! only the blocks whose hash differs from the standby's); each round takes marked blocks, lowest
//! first, and reads them while the guest runs. A guest write marks its blocks again once it has
//! completed, so a block read while it changed is sent again in a later round. The synchronising
//! pause reads what is still marked with the vCPUs stopped and switches the log to keeping every
//! op: from that checkpoint on, the standby's disk follows the epochs exactly.

use disk_mirror::backend::{Backend, BackendError};
use disk_mirror::digest::{self, Digest};
use disk_mirror::log::{self, Op, WriteLog, BLOCK};
use std::sync::Arc;

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

/// Disk data per pre-copy round (a round is acknowledged before the next is read, so this is
/// also about the most disk data in flight during the copy).
pub const ROUND_BYTES: u64 = 32 << 20;

/// Pages a disk block counts for when the copy decides whether to iterate again.
pub const PAGES_PER_BLOCK: u64 = BLOCK / 4096;

/// The initial copy of the disks.
pub struct DiskCopy {
    /// Blocks of the first pass not yet sent.
    first_pass_left: u64,
    /// Bytes of disk data sent.
    pub bytes: u64,
    /// Bytes found identical on the standby (`compare`).
    pub same: u64,
    comparing: Option<Comparing>,
}

impl DiskCopy {
    /// Starts copying every block of every disk.
    pub fn full(log: &WriteLog) -> DiskCopy {
        log.start_tracking(true);
        DiskCopy { first_pass_left: log.dirty_blocks(), bytes: 0, same: 0, comparing: None }
    }

    /// Starts copying the blocks that differ from the standby's `digests` (checked to match
    /// the disks): they are found a round at a time, while the guest runs.
    pub fn compare(log: &WriteLog, digests: Vec<Digest>) -> DiskCopy {
        log.start_tracking(false);
        DiskCopy { first_pass_left: 0, bytes: 0, same: 0, comparing: Some(Comparing { digests, disk: 0, next: 0 }) }
    }

    /// Whether the first pass over the disks is still under way.
    pub fn copying(&self) -> bool {
        self.first_pass_left > 0 || self.comparing.is_some()
    }

    /// Hashes up to [`COMPARE_BYTES`] of the primary's disks and marks the blocks whose hash
    /// differs from the standby's. A block written after it was hashed is marked by the write.
    fn compare_some(&mut self, log: &WriteLog, disks: &[Arc<dyn Backend>]) -> Result<(), BackendError> {
        let Some(c) = self.comparing.as_mut() else { return Ok(()) };
        let mut budget = COMPARE_BYTES;
        while budget > 0 {
            let (Some(d), Some(disk)) = (c.digests.get(c.disk), disks.get(c.disk)) else {
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
            let per = d.block / BLOCK;
            for (i, h) in mine.iter().enumerate() {
                let b = c.next + i as u64;
                if *h == d.hashes[b as usize] {
                    self.same += d.block.min(d.size - b * d.block);
                } else {
                    let blocks: Vec<u64> = (b * per..(b + 1) * per).filter(|&x| x * BLOCK < d.size).collect();
                    self.first_pass_left += blocks.len() as u64;
                    log.mark(c.disk as u32, &blocks);
                }
            }
            c.next += count;
            budget = budget.saturating_sub(count * d.block);
        }
        Ok(())
    }

    /// What is left, as pages (for the decision to iterate).
    pub fn pending_pages(log: &WriteLog) -> u64 {
        log.dirty_blocks().saturating_mul(PAGES_PER_BLOCK)
    }

    /// A round's share of the copy: up to [`ROUND_BYTES`] of marked blocks, read now.
    pub fn round(&mut self, log: &WriteLog, disks: &[Arc<dyn Backend>]) -> Result<Vec<(u32, Op)>, BackendError> {
        self.compare_some(log, disks)?;
        let ops = read_marked(log, disks, (ROUND_BYTES / BLOCK) as usize)?;
        let bytes: u64 = ops.iter().map(|(_, op)| op.bytes() as u64).sum();
        self.first_pass_left = self.first_pass_left.saturating_sub(bytes.div_ceil(BLOCK));
        self.bytes += bytes;
        Ok(ops)
    }
}

/// Reads up to `max` marked blocks (over all disks, in order), clearing their marks.
pub fn read_marked(log: &WriteLog, disks: &[Arc<dyn Backend>], max: usize) -> Result<Vec<(u32, Op)>, BackendError> {
    let mut out = Vec::new();
    for (i, disk) in disks.iter().enumerate() {
        let left = max - out.len();
        if left == 0 {
            break;
        }
        let blocks = log.take_dirty(i as u32, left);
        match log::read_blocks(&**disk, &blocks) {
            Ok(ops) => out.extend(ops.into_iter().map(|op| (i as u32, op))),
            Err(e) => {
                // Not copied: still to do if the copy is tried again.
                log.mark(i as u32, &blocks);
                return Err(e);
            }
        }
    }
    Ok(out)
}
