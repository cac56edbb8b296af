//! The standby's staging of the primary's disk writes.
//!
//! Writes arrive in the FT log tagged with the epoch they belong to, before the checkpoint that
//! closes it. The standby stages them here and acknowledges checkpoint N only once everything of
//! epoch N is staged; after N commits it applies N's writes to its own storage, in the order the
//! guest issued them. On go-live it applies exactly the committed epochs and drops the rest, so
//! its disk matches the memory it resumes from: not one write more, not one less.
//!
//! Staging is bounded: [`Staging::stage`] refuses what would pass the limit, and the caller
//! holds off (which slows the primary through the channel's flow control); nothing is dropped.

use crate::backend::{Backend, BackendError};
use std::collections::BTreeMap;

pub type Epoch = u64;

/// One change to a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Zeroes {
        offset: u64,
        len: u64,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    /// Flush what came before on this disk to stable storage.
    Flush,
}

impl Op {
    fn bytes(&self) -> usize {
        match self {
            Op::Write { data, .. } => data.len(),
            _ => 0,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StagingError {
    #[error("staging is full ({bytes} of {limit} bytes): wait for a commit")]
    Full { bytes: usize, limit: usize },
    #[error("a write for epoch {epoch}, which is already committed (up to {committed})")]
    Stale { epoch: Epoch, committed: Epoch },
    #[error("disk {disk} does not exist (the VM has {disks})")]
    NoDisk { disk: u32, disks: u32 },
}

/// Writes staged per epoch, oldest epoch first, each epoch in arrival order.
#[derive(Debug)]
pub struct Staging {
    disks: u32,
    limit: usize,
    bytes: usize,
    peak: usize,
    epochs: BTreeMap<Epoch, Vec<(u32, Op)>>,
    committed: Option<Epoch>,
}

impl Staging {
    /// Staging for `disks` disks, holding at most `limit` bytes of write data.
    pub fn new(disks: u32, limit: usize) -> Staging {
        Staging { disks, limit, bytes: 0, peak: 0, epochs: BTreeMap::new(), committed: None }
    }

    /// Stages `op` on `disk` as part of `epoch`. A single write larger than the whole limit is
    /// taken when nothing else is staged, so it can always pass eventually.
    pub fn stage(&mut self, epoch: Epoch, disk: u32, op: Op) -> Result<(), StagingError> {
        if disk >= self.disks {
            return Err(StagingError::NoDisk { disk, disks: self.disks });
        }
        if let Some(committed) = self.committed.filter(|&c| epoch <= c) {
            return Err(StagingError::Stale { epoch, committed });
        }
        let n = op.bytes();
        if n > 0 && self.bytes > 0 && self.bytes + n > self.limit {
            return Err(StagingError::Full { bytes: self.bytes, limit: self.limit });
        }
        self.bytes += n;
        self.peak = self.peak.max(self.bytes);
        self.epochs.entry(epoch).or_default().push((disk, op));
        Ok(())
    }

    /// Checkpoint `epoch` committed: takes every staged op of epochs up to it, in order, to be
    /// applied to the standby's storage.
    pub fn commit(&mut self, epoch: Epoch) -> Vec<(u32, Op)> {
        let later = self.epochs.split_off(&(epoch + 1));
        let done = std::mem::replace(&mut self.epochs, later);
        self.committed = Some(self.committed.map_or(epoch, |c| c.max(epoch)));
        let ops: Vec<(u32, Op)> = done.into_values().flatten().collect();
        self.bytes -= ops.iter().map(|(_, op)| op.bytes()).sum::<usize>();
        ops
    }

    /// Going live from `epoch`: everything staged after it is dropped (the guest's memory does
    /// not know it was written). Returns how many bytes of writes were dropped.
    pub fn drop_after(&mut self, epoch: Epoch) -> usize {
        let later = self.epochs.split_off(&(epoch + 1));
        let dropped: usize = later.values().flatten().map(|(_, op)| op.bytes()).sum();
        self.bytes -= dropped;
        dropped
    }

    pub fn committed(&self) -> Option<Epoch> {
        self.committed
    }

    /// Bytes of write data staged now, and the most ever staged at once.
    pub fn bytes(&self) -> (usize, usize) {
        (self.bytes, self.peak)
    }
}

/// Applies committed ops to the disks' backends, in order.
pub fn apply(backends: &[&dyn Backend], ops: &[(u32, Op)]) -> Result<(), BackendError> {
    for (disk, op) in ops {
        let Some(b) = backends.get(*disk as usize) else { continue };
        match op {
            Op::Write { offset, data } => b.write_at(data, *offset)?,
            Op::Zeroes { offset, len } => b.write_zeroes(*offset, *len)?,
            Op::Discard { offset, len } => b.discard(*offset, *len)?,
            Op::Flush => b.flush()?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A disk in memory, for checking what reaches storage.
    struct MemDisk(Mutex<Vec<u8>>);

    impl Backend for MemDisk {
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn readonly(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
            let d = self.0.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, data: &[u8], offset: u64) -> Result<(), BackendError> {
            self.0.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn flush(&self) -> Result<(), BackendError> {
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
            self.0.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
            self.write_zeroes(offset, len)
        }
    }

    fn w(offset: u64, byte: u8, len: usize) -> Op {
        Op::Write { offset, data: vec![byte; len] }
    }

    #[test]
    fn commits_apply_exactly_the_committed_epochs_in_order() {
        let mut s = Staging::new(2, 1 << 20);
        s.stage(1, 0, w(0, 1, 8)).unwrap();
        s.stage(1, 0, w(4, 2, 8)).unwrap(); // overlaps: the later write wins
        s.stage(2, 1, w(0, 3, 8)).unwrap();
        s.stage(3, 0, w(0, 9, 16)).unwrap();
        s.stage(2, 0, Op::Zeroes { offset: 10, len: 2 }).unwrap();
        let d0 = MemDisk(Mutex::new(vec![0xee; 32]));
        let d1 = MemDisk(Mutex::new(vec![0xee; 32]));
        let ops = s.commit(2);
        assert_eq!(ops.len(), 4);
        apply(&[&d0, &d1], &ops).unwrap();
        let d0v = d0.0.lock().unwrap().clone();
        assert_eq!(&d0v[..12], &[1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0]);
        assert_eq!(d0v[12], 0xee, "epoch 3 is not applied before it commits");
        assert_eq!(&d1.0.lock().unwrap()[..8], &[3; 8]);
        assert_eq!(s.bytes().0, 16, "epoch 3 stays staged");
        assert_eq!(s.stage(2, 0, w(0, 5, 1)), Err(StagingError::Stale { epoch: 2, committed: 2 }));
        // Going live from 2: epoch 3 is dropped, never applied.
        assert_eq!(s.drop_after(2), 16);
        assert!(s.commit(3).is_empty());
        assert_eq!(s.bytes(), (0, 40), "the peak was all four writes at once");
    }

    #[test]
    fn staging_is_bounded_and_a_commit_makes_room() {
        let mut s = Staging::new(1, 100);
        s.stage(1, 0, w(0, 1, 60)).unwrap();
        assert_eq!(s.stage(1, 0, w(0, 1, 60)), Err(StagingError::Full { bytes: 60, limit: 100 }));
        s.commit(1);
        s.stage(2, 0, w(0, 1, 60)).unwrap();
        let mut big = Staging::new(1, 100);
        big.stage(1, 0, w(0, 1, 500)).unwrap();
        assert_eq!(big.stage(1, 0, Op::Flush), Ok(()), "ops without data always fit");
        assert_eq!(s.stage(3, 4, Op::Flush), Err(StagingError::NoDisk { disk: 4, disks: 1 }));
    }
}
