//! Disk ops streamed by the primary as they complete, as they travel in data frames: each op a
//! fixed head and, for a write, its data. A write of [`GATHER`] bytes or more goes in a frame of
//! its own, at once, its data not copied; smaller ops are gathered, in order, into one frame that
//! leaves when it holds [`GATHER`] bytes or when the epoch is sealed (a frame per small op costs
//! both sides a wake-up each, more than the few bytes are worth).

use block::op::{Op, OpRef};
use bytes::{Bytes, BytesMut};

/// Ops of this many bytes and more leave alone; smaller ones are gathered up to this many.
pub const GATHER: usize = 64 << 10;

/// A disk op the primary streamed as it completed, as the standby received it: number
/// `index` of the stream, on `disk`; a write's data stays in the frame it came in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamedOp {
    pub index: u64,
    pub disk: u32,
    kind: u8,
    offset: u64,
    len: u64,
    data: Bytes,
}

/// Bytes before a streamed op's data: index (u64), disk (u32), kind (u8: write, zeroes,
/// discard, flush), offset and length (u64), little-endian.
pub const STREAM_HEAD: usize = 29;

impl StreamedOp {
    /// Op number `index` of the stream, on `disk`, as a data frame's head and body (a write's
    /// data, not copied).
    pub fn encode(index: u64, disk: u32, op: Op) -> ([u8; STREAM_HEAD], Bytes) {
        let (kind, offset, len, data) = match op {
            Op::Write { offset, data } => (0u8, offset, data.len() as u64, Bytes::from(data)),
            Op::Zeroes { offset, len } => (1, offset, len, Bytes::new()),
            Op::Discard { offset, len } => (2, offset, len, Bytes::new()),
            Op::Flush => (3, 0, 0, Bytes::new()),
        };
        let mut head = [0u8; STREAM_HEAD];
        head[..8].copy_from_slice(&index.to_le_bytes());
        head[8..12].copy_from_slice(&disk.to_le_bytes());
        head[12] = kind;
        head[13..21].copy_from_slice(&offset.to_le_bytes());
        head[21..29].copy_from_slice(&len.to_le_bytes());
        (head, data)
    }

    /// Reads the streamed ops of a data frame (each a head and its data, as [`Self::encode`]
    /// made them; one op alone, or several gathered by [`OpGather`]). Data is not copied.
    pub fn parse(mut frame: Bytes) -> Result<Vec<StreamedOp>, String> {
        let mut ops = Vec::new();
        while !frame.is_empty() {
            if frame.len() < STREAM_HEAD {
                return Err(format!("{} bytes left where a streamed disk op's head must be", frame.len()));
            }
            let head = frame.split_to(STREAM_HEAD);
            let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().unwrap_or_default());
            let disk = u32::from_le_bytes(head[8..12].try_into().unwrap_or_default());
            let (kind, len) = (head[12], u64_at(21));
            let want = if kind == 0 { len } else { 0 };
            if kind > 3 || (frame.len() as u64) < want {
                return Err(format!(
                    "a streamed disk op of kind {kind}, length {len}, with {} bytes of data",
                    frame.len()
                ));
            }
            let data = frame.split_to(want as usize);
            ops.push(StreamedOp { index: u64_at(0), disk, kind, offset: u64_at(13), len, data });
        }
        Ok(ops)
    }

    /// The op, borrowed.
    pub fn op(&self) -> OpRef<'_> {
        let (offset, len) = (self.offset, self.len);
        match self.kind {
            0 => OpRef::Write { offset, data: &self.data },
            1 => OpRef::Zeroes { offset, len },
            2 => OpRef::Discard { offset, len },
            _ => OpRef::Flush,
        }
    }
}

/// What the stream sends for an op.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamOut {
    /// A frame of gathered ops.
    Gathered(Bytes),
    /// One op alone: its head, then its data.
    Alone([u8; STREAM_HEAD], Bytes),
}

/// Small ops gathered for the next frame.
#[derive(Debug, Default)]
pub struct OpGather(BytesMut);

impl OpGather {
    /// Op number `index`, completed on `disk`: what to send now, in order (nothing while it is
    /// gathered).
    pub fn push(&mut self, index: u64, disk: u32, op: Op) -> Vec<StreamOut> {
        let (head, data) = StreamedOp::encode(index, disk, op);
        if data.len() >= GATHER {
            return self.take().into_iter().chain([StreamOut::Alone(head, data)]).collect();
        }
        self.0.extend_from_slice(&head);
        self.0.extend_from_slice(&data);
        match self.0.len() >= GATHER {
            true => self.take().into_iter().collect(),
            false => Vec::new(),
        }
    }

    /// The ops gathered so far, as one frame (the epoch is being sealed).
    pub fn take(&mut self) -> Option<StreamOut> {
        (!self.0.is_empty()).then(|| StreamOut::Gathered(self.0.split().freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(out: &StreamOut) -> Bytes {
        match out {
            StreamOut::Gathered(b) => b.clone(),
            StreamOut::Alone(head, data) => [&head[..], &data[..]].concat().into(),
        }
    }

    #[test]
    fn small_ops_are_gathered_and_large_ones_go_alone_in_order() {
        let w = |len: usize| Op::Write { offset: 0, data: vec![7; len] };
        let mut g = OpGather::default();
        assert!(g.push(0, 0, w(4096)).is_empty());
        assert!(g.push(1, 0, Op::Flush).is_empty());
        let out = g.push(2, 1, w(GATHER));
        assert_eq!(out.len(), 2, "what was gathered, then the large op");
        let ops: Vec<StreamedOp> = out.iter().flat_map(|o| StreamedOp::parse(frame(o)).unwrap()).collect();
        assert_eq!(ops.iter().map(|o| o.index).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(ops[0].op(), OpRef::Write { offset: 0, data: &[7; 4096] });
        assert_eq!((ops[1].op(), ops[2].disk, ops[2].op().bytes()), (OpRef::Flush, 1, GATHER));
        assert!(g.take().is_none());
        let mut sent = Vec::new();
        for i in 0..20 {
            sent.extend(g.push(i, 0, w(4000)));
        }
        assert_eq!(sent.len(), 1, "a frame once {GATHER} bytes have gathered");
        assert_eq!(StreamedOp::parse(frame(&sent[0])).unwrap().len(), 17);
        assert_eq!(StreamedOp::parse(frame(&g.take().unwrap())).unwrap().len(), 3, "the rest at the seal");
    }

    #[test]
    fn frames_that_do_not_hold_whole_ops_are_refused() {
        let (head, data) = StreamedOp::encode(0, 0, Op::Write { offset: 8, data: vec![1; 100] });
        let whole = [&head[..], &data[..]].concat();
        assert!(StreamedOp::parse(Bytes::from(whole[..whole.len() - 1].to_vec()))
            .unwrap_err()
            .contains("with 99 bytes"));
        let mut extra = whole.clone();
        extra.push(0);
        assert!(StreamedOp::parse(extra.into()).unwrap_err().contains("1 bytes left"));
        let mut kind = whole;
        kind[12] = 4;
        assert!(StreamedOp::parse(kind.into()).unwrap_err().contains("of kind 4"));
        assert_eq!(StreamedOp::parse(Bytes::new()).unwrap(), vec![]);
    }
}
