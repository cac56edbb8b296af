//! A disk in memory for the targets that serve disks: it records every change made to it, in
//! order, and fails the target on a read or change past its end, or a change to a read-only
//! disk.

use block::{Backend, BackendError, Op};
use std::sync::Mutex;

pub struct MemDisk {
    data: Mutex<Vec<u8>>,
    readonly: bool,
    /// Every change, in order.
    pub changes: Mutex<Vec<Op>>,
}

impl MemDisk {
    pub fn new(size: usize, readonly: bool) -> MemDisk {
        MemDisk { data: Mutex::new(vec![0; size]), readonly, changes: Mutex::default() }
    }

    fn range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let size = self.data.lock().unwrap().len() as u64;
        assert!(offset.checked_add(len).is_some_and(|e| e <= size), "{len} bytes at {offset:#x}: past the disk's end");
        offset as usize..(offset + len) as usize
    }

    fn change(&self, op: Op) {
        assert!(!self.readonly, "a read-only disk was changed: {op:?}");
        self.changes.lock().unwrap().push(op);
    }
}

impl Backend for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn readonly(&self) -> bool {
        self.readonly
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        let r = self.range(offset, buf.len() as u64);
        buf.copy_from_slice(&self.data.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), BackendError> {
        let r = self.range(offset, data.len() as u64);
        self.change(Op::Write { offset, data: data.to_vec() });
        self.data.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), BackendError> {
        // (Flushing a read-only disk changes nothing.)
        self.changes.lock().unwrap().push(Op::Flush);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        let r = self.range(offset, len);
        self.change(Op::Zeroes { offset, len });
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        let r = self.range(offset, len);
        self.change(Op::Discard { offset, len });
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
}
