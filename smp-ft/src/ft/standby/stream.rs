//! Disk ops the primary streamed as they completed, staged on the standby until the checkpoint
//! that covers them commits.
//!
//! The primary numbers streamed ops in the order they completed, and sends them on the
//! channel's ordered control stream (small ones gathered into one frame, see
//! [`wire::OpGather`]); before checkpoint N it sends N's seal: N covers ops
//! `0..through`. Everything on that stream arrives in order and before N itself, so when N is
//! validated its ops are here, or the primary broke the protocol. When N commits (after its
//! acknowledgement), its memory is applied, then the ops it carried itself (kept before
//! streaming started), then the streamed ops below `through`, in their order. Ops past the last
//! commit stay staged, and are dropped with the session: a write streamed for an epoch that
//! never commits never reaches this copy's disks.

use crate::ft::protocol::Epoch;
use crate::ft::wire::{self, DiskSeal, StreamedOp, WireError};
use block::Backend;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Arc;

/// The streamed ops of one session, staged, and the seals that say which checkpoint covers them.
#[derive(Default)]
pub(super) struct Streamed {
    /// The number the next streamed op must have.
    next: u64,
    /// Ops committed so far (streamed ops below this are on the disks).
    applied: u64,
    staged: VecDeque<StreamedOp>,
    /// Seals of checkpoints not yet committed, in order.
    seals: VecDeque<DiskSeal>,
    /// Bytes of write data staged.
    pub(super) staged_bytes: u64,
}

impl Streamed {
    /// Stages the streamed ops of a data frame, checked against the disks' sizes and the
    /// stream's order (a frame is taken whole or not at all). Returns the bytes of write data
    /// they carry.
    pub(super) fn ops(&mut self, frame: Bytes, disks: &[u64]) -> Result<u64, WireError> {
        let bad = |why: String| WireError::Malformed { seq: self.next, why: format!("streamed disk ops: {why}") };
        let ops = StreamedOp::parse(frame).map_err(bad)?;
        for (i, op) in ops.iter().enumerate() {
            let due = self.next + i as u64;
            if op.index != due {
                return Err(bad(format!("op {} came where op {due} was due", op.index)));
            }
            wire::check_ops(op.index, std::iter::once((op.disk, op.op())), disks)?;
        }
        let bytes = wire::data_bytes(ops.iter().map(StreamedOp::op));
        self.next += ops.len() as u64;
        self.staged_bytes += bytes;
        self.staged.extend(ops);
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
    /// order (writes to one disk that do not overlap go as one batch). Returns the bytes of
    /// write data written.
    pub(super) fn commit(&mut self, epoch: Epoch, through: u64, disks: &[Arc<dyn Backend>]) -> Result<u64, WireError> {
        while self.seals.front().is_some_and(|s| s.epoch <= epoch) {
            self.seals.pop_front();
        }
        let n = self.staged.iter().take_while(|op| op.index < through).count();
        let ops: Vec<StreamedOp> = self.staged.drain(..n).collect();
        wire::write_ops(epoch, ops.iter().map(|op| (op.disk, op.op())), disks)?;
        let written = wire::data_bytes(ops.iter().map(StreamedOp::op));
        self.staged_bytes -= written;
        self.applied = self.applied.max(through);
        Ok(written)
    }
}

#[cfg(test)]
mod tests;
