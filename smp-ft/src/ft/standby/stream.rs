//! Disk ops the primary streamed as they completed, staged on the standby until the checkpoint
//! that covers them commits.
//!
//! The primary numbers streamed ops in the order they completed, and sends them on the
//! channel's ordered control stream; before checkpoint N it sends N's seal: N covers ops
//! `0..through`. Everything on that stream arrives in order and before N itself, so when N is
//! validated its ops are here, or the primary broke the protocol. When N commits (after its
//! acknowledgement), its memory is applied, then the ops it carried itself (kept before
//! streaming started), then the streamed ops below `through`, in their order. Ops past the last
//! commit stay staged, and are dropped with the session: a write streamed for an epoch that
//! never commits never reaches this copy's disks.

use crate::ft::protocol::Epoch;
#[cfg(test)]
use crate::ft::wire::StreamedOps;
use crate::ft::wire::{self, ArchivedStreamedOps, DiskSeal, WireError};
use block::Backend;
use std::collections::VecDeque;
use std::sync::Arc;

/// One validated message of streamed ops, kept as it arrived.
struct Batch {
    first: u64,
    count: u64,
    bytes: u64,
    buf: rkyv::util::AlignedVec<16>,
}

impl Batch {
    fn archived(&self) -> &ArchivedStreamedOps {
        // SAFETY: `Streamed::ops` validated this buffer with bytecheck, and it is never
        // modified after.
        unsafe { rkyv::access_unchecked::<ArchivedStreamedOps>(&self.buf) }
    }
}

/// The streamed ops of one session, staged, and the seals that say which checkpoint covers them.
#[derive(Default)]
pub(super) struct Streamed {
    /// The number the next streamed op must have.
    next: u64,
    /// Ops committed so far (streamed ops below this are on the disks).
    applied: u64,
    batches: VecDeque<Batch>,
    /// Seals of checkpoints not yet committed, in order.
    seals: VecDeque<DiskSeal>,
    /// Bytes of write data staged.
    pub(super) staged_bytes: u64,
}

impl Streamed {
    /// Stages a message of streamed ops, checked against the disks' sizes and the stream's
    /// order. Returns the bytes of write data it carries.
    pub(super) fn ops(&mut self, data: &[u8], disks: &[u64]) -> Result<u64, WireError> {
        let mut buf = rkyv::util::AlignedVec::<16>::with_capacity(data.len());
        buf.extend_from_slice(data);
        let bad = |why: String| WireError::Malformed { seq: self.next, why: format!("streamed disk ops: {why}") };
        let p = rkyv::access::<ArchivedStreamedOps, rkyv::rancor::Error>(&buf).map_err(|e| bad(e.to_string()))?;
        let first = p.first.to_native();
        if first != self.next {
            return Err(bad(format!("op {first} came where op {} was due", self.next)));
        }
        wire::check_ops(first, p.ops.iter().map(|e| (e.0.to_native(), &e.1)), disks)?;
        let count = p.ops.len() as u64;
        let bytes = wire::data_bytes(p.ops.iter().map(|e| &e.1));
        self.next += count;
        self.staged_bytes += bytes;
        self.batches.push_back(Batch { first, count, bytes, buf });
        Ok(bytes)
    }

    /// Notes the seal of the checkpoint that follows.
    pub(super) fn seal(&mut self, data: &[u8]) -> Result<(), WireError> {
        let s: DiskSeal = wire::decode_app(data, "disk seal")?;
        let last = self.seals.back().map_or(self.applied, |l| l.through);
        if s.through < last {
            return Err(WireError::Malformed {
                seq: s.epoch,
                why: format!("its disk seal covers {} streamed ops, fewer than the {last} before it", s.through),
            });
        }
        self.seals.push_back(s);
        Ok(())
    }

    /// Checks that everything checkpoint `epoch` covers has arrived: the streamed ops it covers,
    /// `None` if it has no seal (streaming not used).
    pub(super) fn covers(&self, epoch: Epoch) -> Result<Option<u64>, WireError> {
        let Some(s) = self.seals.iter().rev().find(|s| s.epoch == epoch) else { return Ok(None) };
        if s.through > self.next {
            return Err(WireError::Malformed {
                seq: epoch,
                why: format!("it covers {} streamed disk ops, only {} arrived", s.through, self.next),
            });
        }
        Ok(Some(s.through))
    }

    /// Checkpoint `epoch` committed: writes the streamed ops below `through` to `disks`, in
    /// order. Returns the bytes of write data written.
    pub(super) fn commit(&mut self, epoch: Epoch, through: u64, disks: &[Arc<dyn Backend>]) -> Result<u64, WireError> {
        while self.seals.front().is_some_and(|s| s.epoch <= epoch) {
            self.seals.pop_front();
        }
        let mut written = 0;
        while self.batches.front().is_some_and(|b| b.first + b.count <= through) {
            let Some(b) = self.batches.pop_front() else { break };
            wire::write_ops(epoch, b.archived().ops.iter().map(|e| (e.0.to_native(), &e.1)), disks)?;
            self.staged_bytes -= b.bytes;
            written += b.bytes;
        }
        if let Some(b) = self.batches.front().filter(|b| b.first < through) {
            // The primary sends an op's message before it seals past it: a seal inside one is
            // not this protocol.
            return Err(WireError::Malformed {
                seq: epoch,
                why: format!("its disk seal ({through}) falls inside streamed ops {}..{}", b.first, b.first + b.count),
            });
        }
        self.applied = self.applied.max(through);
        Ok(written)
    }
}

#[cfg(test)]
mod tests;
