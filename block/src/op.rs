//! One completed change to a disk, as a value: what a device reports to whoever watches its
//! writes, and what a copy of the disk replays.

use crate::backend::{Backend, BackendError};

/// One change to a disk.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
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
    /// Bytes of data the op carries.
    pub fn bytes(&self) -> usize {
        match self {
            Op::Write { data, .. } => data.len(),
            _ => 0,
        }
    }

    /// The byte range the op changes, if any.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            Op::Write { offset, data } => Some((*offset, data.len() as u64)),
            Op::Zeroes { offset, len } | Op::Discard { offset, len } => Some((*offset, *len)),
            Op::Flush => None,
        }
    }

    /// Carries the op out on `disk`.
    pub fn apply(&self, disk: &dyn Backend) -> Result<(), BackendError> {
        match self {
            Op::Write { offset, data } => disk.write_at(data, *offset),
            Op::Zeroes { offset, len } => disk.write_zeroes(*offset, *len),
            Op::Discard { offset, len } => disk.discard(*offset, *len),
            Op::Flush => disk.flush(),
        }
    }
}

impl ArchivedOp {
    /// The byte range the op changes, if any.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            ArchivedOp::Write { offset, data } => Some((offset.to_native(), data.len() as u64)),
            ArchivedOp::Zeroes { offset, len } | ArchivedOp::Discard { offset, len } => {
                Some((offset.to_native(), len.to_native()))
            }
            ArchivedOp::Flush => None,
        }
    }

    /// Carries the op out on `disk`.
    pub fn apply(&self, disk: &dyn Backend) -> Result<(), BackendError> {
        match self {
            ArchivedOp::Write { offset, data } => disk.write_at(data.as_slice(), offset.to_native()),
            ArchivedOp::Zeroes { offset, len } => disk.write_zeroes(offset.to_native(), len.to_native()),
            ArchivedOp::Discard { offset, len } => disk.discard(offset.to_native(), len.to_native()),
            ArchivedOp::Flush => disk.flush(),
        }
    }
}

/// One change to a disk, borrowed from wherever it is held (an archive, a received frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpRef<'a> {
    Write { offset: u64, data: &'a [u8] },
    Zeroes { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
    Flush,
}

impl OpRef<'_> {
    /// Bytes of data the op carries.
    pub fn bytes(&self) -> usize {
        match self {
            OpRef::Write { data, .. } => data.len(),
            _ => 0,
        }
    }

    /// The byte range the op changes, if any.
    pub fn range(&self) -> Option<(u64, u64)> {
        match *self {
            OpRef::Write { offset, data } => Some((offset, data.len() as u64)),
            OpRef::Zeroes { offset, len } | OpRef::Discard { offset, len } => Some((offset, len)),
            OpRef::Flush => None,
        }
    }

    /// Carries the op out on `disk`.
    pub fn apply(&self, disk: &dyn Backend) -> Result<(), BackendError> {
        match *self {
            OpRef::Write { offset, data } => disk.write_at(data, offset),
            OpRef::Zeroes { offset, len } => disk.write_zeroes(offset, len),
            OpRef::Discard { offset, len } => disk.discard(offset, len),
            OpRef::Flush => disk.flush(),
        }
    }
}

impl Op {
    /// The op, borrowed.
    pub fn view(&self) -> OpRef<'_> {
        match self {
            Op::Write { offset, data } => OpRef::Write { offset: *offset, data },
            Op::Zeroes { offset, len } => OpRef::Zeroes { offset: *offset, len: *len },
            Op::Discard { offset, len } => OpRef::Discard { offset: *offset, len: *len },
            Op::Flush => OpRef::Flush,
        }
    }
}

impl ArchivedOp {
    /// The op, borrowed from the archive.
    pub fn view(&self) -> OpRef<'_> {
        match self {
            ArchivedOp::Write { offset, data } => OpRef::Write { offset: offset.to_native(), data: data.as_slice() },
            ArchivedOp::Zeroes { offset, len } => OpRef::Zeroes { offset: offset.to_native(), len: len.to_native() },
            ArchivedOp::Discard { offset, len } => OpRef::Discard { offset: offset.to_native(), len: len.to_native() },
            ArchivedOp::Flush => OpRef::Flush,
        }
    }
}

/// Whether an op's `range` fits a disk of `size` bytes.
pub fn fits(range: Option<(u64, u64)>, size: u64) -> bool {
    range.is_none_or(|(offset, len)| offset.checked_add(len).is_some_and(|end| end <= size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_against_the_disk() {
        assert_eq!(Op::Write { offset: 8, data: vec![1; 4] }.range(), Some((8, 4)));
        assert_eq!(Op::Flush.range(), None);
        assert!(fits(Some((0, 10)), 10));
        assert!(!fits(Some((5, 10)), 10));
        assert!(!fits(Some((u64::MAX, 2)), 10));
        assert!(fits(None, 0));
    }
}
