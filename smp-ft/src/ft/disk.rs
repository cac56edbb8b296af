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
use disk_mirror::log::{self, Op, WriteLog, BLOCK};
use std::sync::Arc;

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
}

impl DiskCopy {
    /// Starts copying every block of every disk.
    pub fn full(log: &WriteLog) -> DiskCopy {
        log.start_tracking(true);
        DiskCopy { first_pass_left: log.dirty_blocks(), bytes: 0 }
    }

    /// Whether the first pass over the disks is still under way.
    pub fn copying(&self) -> bool {
        self.first_pass_left > 0
    }

    /// What is left, as pages (for the decision to iterate).
    pub fn pending_pages(log: &WriteLog) -> u64 {
        log.dirty_blocks().saturating_mul(PAGES_PER_BLOCK)
    }

    /// A round's share of the copy: up to [`ROUND_BYTES`] of marked blocks, read now.
    pub fn round(&mut self, log: &WriteLog, disks: &[Arc<dyn Backend>]) -> Result<Vec<(u32, Op)>, BackendError> {
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
