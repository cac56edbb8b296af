//! The primary's log of disk writes, per epoch, and what the standby does with it.
//!
//! A guest write completes as soon as the primary's own disk has it; the device then records it
//! here. While the VM is protected ([`Mode::Logging`]) the record keeps the data: the capture
//! that closes epoch N seals the log, and the ops travel inside checkpoint N, so the standby
//! holds epoch N's writes exactly when it holds N's memory, and acknowledges both at once. It
//! writes them to its own storage after acknowledging (the commit), in the order the guest's
//! requests completed; on go-live it has applied exactly the acknowledged epochs, and writes of
//! an epoch whose checkpoint never arrived whole never reach it.
//!
//! The log is bounded: past its budget the device stops taking requests (they wait in the
//! virtqueue, see [`WriteLog::full`]) until a checkpoint seals the log, and checkpoints wait for
//! the standby's acknowledgements, so a slow standby slows the guest's disk and loses nothing.
//!
//! The log runs from the start of the initial copy: the copy reads blocks (a [`BlockMap`] says
//! which are left) while the guest writes, and each pre-copy round carries the ops logged since
//! the previous round *before* the blocks it read. Blocks read after an op completed already hold
//! it, and ops that complete after the read come in a later round, replayed in order on top: the
//! standby ends with exactly the primary's disk, and a guest that writes faster than the copy
//! moves is held back by the log's budget instead of making the copy start over.

use block::{Backend, BackendError};
use parking_lot::Mutex;

/// The log's entries: block ops (re-exported: the FT layer names them through the log).
pub use block::op::{ArchivedOp, Op};

/// The unit of the initial copy's bitmap: a guest page, so a 4 KiB write costs the copy no
/// more than itself.
pub const BLOCK: u64 = 4096;

/// The most one op of the initial copy carries (runs of marked blocks are read together).
pub const MAX_RUN: u64 = 1 << 20;

/// Applies ops to the disks' backends, in order.
pub fn apply(backends: &[&dyn Backend], ops: &[(u32, Op)]) -> Result<(), BackendError> {
    for (disk, op) in ops {
        if let Some(b) = backends.get(*disk as usize) {
            op.apply(*b)?;
        }
    }
    Ok(())
}

/// What the log does with a completed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No standby: nothing is kept.
    Off,
    /// A standby is attached (copying or protected): every op is kept, with its data, until the
    /// next pre-copy round or checkpoint seals it.
    Logging,
}

/// Blocks of [`BLOCK`] bytes of one disk still to copy.
#[derive(Debug, Clone)]
pub struct BlockMap {
    words: Vec<u64>,
    blocks: u64,
    set: u64,
}

impl BlockMap {
    /// No block marked, for a disk of `size` bytes.
    pub fn new(size: u64) -> BlockMap {
        let blocks = size.div_ceil(BLOCK);
        BlockMap { words: vec![0; blocks.div_ceil(64) as usize], blocks, set: 0 }
    }

    /// Blocks marked.
    pub fn count(&self) -> u64 {
        self.set
    }

    /// Marks the blocks that `len` bytes at `offset` touch.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let last = ((offset + len - 1) / BLOCK).min(self.blocks.saturating_sub(1));
        for b in offset / BLOCK..=last {
            let (w, bit) = ((b / 64) as usize, 1u64 << (b % 64));
            if self.words[w] & bit == 0 {
                self.words[w] |= bit;
                self.set += 1;
            }
        }
    }

    /// Marks every block.
    pub fn set_all(&mut self) {
        for (i, w) in self.words.iter_mut().enumerate() {
            let left = self.blocks - i as u64 * 64;
            *w = if left >= 64 { u64::MAX } else { (1u64 << left) - 1 };
        }
        self.set = self.blocks;
    }

    /// Takes (clears) up to `max` marked blocks, lowest first.
    pub fn take(&mut self, max: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity((self.set as usize).min(max));
        for (i, w) in self.words.iter_mut().enumerate() {
            while *w != 0 && out.len() < max {
                let bit = w.trailing_zeros();
                out.push(i as u64 * 64 + u64::from(bit));
                *w &= !(1u64 << bit);
            }
            if out.len() >= max {
                break;
            }
        }
        self.set -= out.len() as u64;
        out
    }
}

struct Inner {
    mode: Mode,
    ops: Vec<(u32, Op)>,
    bytes: usize,
    /// Someone to tell when the log passes half its budget (the FT engine, to checkpoint early).
    notify: Option<crossbeam_channel::Sender<()>>,
}

/// The primary's log of completed disk requests, shared by the VM's disks.
pub struct WriteLog {
    inner: Mutex<Inner>,
    budget: usize,
    sizes: Vec<u64>,
}

impl WriteLog {
    /// A log for disks of these sizes, keeping at most about `budget` bytes of write data.
    pub fn new(sizes: &[u64], budget: usize) -> WriteLog {
        WriteLog {
            inner: Mutex::new(Inner { mode: Mode::Off, ops: Vec::new(), bytes: 0, notify: None }),
            budget,
            sizes: sizes.to_vec(),
        }
    }

    pub fn sizes(&self) -> &[u64] {
        &self.sizes
    }

    /// Who to wake when the log fills up.
    pub fn notify(&self, to: Option<crossbeam_channel::Sender<()>>) {
        self.inner.lock().notify = to;
    }

    /// Records `op`, already completed on the primary's `disk`.
    pub fn record(&self, disk: u32, op: Op) {
        let mut g = self.inner.lock();
        match g.mode {
            Mode::Off => {}
            Mode::Logging => {
                let before = g.bytes;
                g.bytes += op.bytes();
                g.ops.push((disk, op));
                if before < self.budget / 2 && g.bytes >= self.budget / 2 {
                    if let Some(n) = &g.notify {
                        let _ = n.try_send(());
                    }
                }
            }
        }
    }

    /// The log is at its budget: take no more requests until the next checkpoint seals it.
    pub fn full(&self) -> bool {
        let g = self.inner.lock();
        g.mode == Mode::Logging && g.bytes >= self.budget
    }

    /// Bytes of write data logged since the last seal.
    pub fn pending(&self) -> usize {
        self.inner.lock().bytes
    }

    /// Past half the budget: the FT engine should checkpoint soon.
    pub fn filling(&self) -> bool {
        self.inner.lock().bytes >= self.budget / 2
    }

    /// Takes the ops of the epoch that ends now (called while the vCPUs are paused).
    pub fn seal(&self) -> Vec<(u32, Op)> {
        let mut g = self.inner.lock();
        g.bytes = 0;
        std::mem::take(&mut g.ops)
    }

    /// A standby attached: every op from now on is kept.
    pub fn start_logging(&self) {
        let mut g = self.inner.lock();
        g.mode = Mode::Logging;
        g.ops.clear();
        g.bytes = 0;
    }

    /// No standby any more: nothing is kept.
    pub fn stop(&self) {
        let mut g = self.inner.lock();
        g.mode = Mode::Off;
        g.ops.clear();
        g.bytes = 0;
    }
}

/// Reads blocks of a disk (sorted, as [`BlockMap::take`] gives them) as write ops, a run
/// of consecutive blocks in one op of up to [`MAX_RUN`] bytes; blocks past the end are skipped
/// and the last block of a disk may be short.
pub fn read_blocks(disk: &dyn Backend, blocks: &[u64]) -> Result<Vec<Op>, BackendError> {
    let size = disk.size();
    let mut ops = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let first = blocks[i];
        let mut n = 1;
        while i + n < blocks.len() && blocks[i + n] == first + n as u64 && (n as u64 + 1) * BLOCK <= MAX_RUN {
            n += 1;
        }
        i += n;
        let offset = first * BLOCK;
        if offset >= size {
            continue;
        }
        let mut data = vec![0u8; (n as u64 * BLOCK).min(size - offset) as usize];
        disk.read_at(&mut data, offset)?;
        ops.push(Op::Write { offset, data });
    }
    Ok(ops)
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
    fn ops_apply_in_order() {
        let d0 = MemDisk(Mutex::new(vec![0xee; 32]));
        let d1 = MemDisk(Mutex::new(vec![0xee; 32]));
        let ops = vec![(0, w(0, 1, 8)), (0, w(4, 2, 8)), (1, w(0, 3, 8)), (0, Op::Zeroes { offset: 10, len: 2 })];
        apply(&[&d0, &d1], &ops).unwrap();
        let d0v = d0.0.lock().unwrap().clone();
        assert_eq!(&d0v[..13], &[1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0, 0xee]);
        assert_eq!(&d1.0.lock().unwrap()[..8], &[3; 8]);
    }

    #[test]
    fn the_log_keeps_ops_only_while_logging_and_is_bounded() {
        let log = WriteLog::new(&[4 * BLOCK + 100, BLOCK], 100);
        log.record(0, w(0, 1, 60));
        assert_eq!(log.pending(), 0, "off: nothing kept");
        log.start_logging();
        let (tx, rx) = crossbeam_channel::bounded(1);
        log.notify(Some(tx));
        log.record(0, w(0, 1, 60));
        assert!(rx.try_recv().is_ok(), "past half the budget wakes the engine");
        assert!(!log.full());
        log.record(1, w(0, 2, 60));
        assert!(log.full());
        assert_eq!(log.seal().len(), 2);
        assert!(!log.full());
        assert_eq!(log.pending(), 0);
        log.stop();
        log.record(0, w(0, 1, 60));
        assert!(log.seal().is_empty());
    }

    #[test]
    fn block_maps_hand_out_marked_blocks_lowest_first() {
        let mut m = BlockMap::new(4 * BLOCK + 100);
        m.mark(BLOCK - 1, 2);
        m.mark(4 * BLOCK, 100);
        assert_eq!(m.count(), 3);
        assert_eq!(m.take(2), vec![0, 1]);
        assert_eq!(m.take(9), vec![4]);
        assert_eq!(m.count(), 0);
        m.set_all();
        assert_eq!(m.count(), 5, "the last block is short");
        assert_eq!(m.take(99), vec![0, 1, 2, 3, 4]);
        let mut big = BlockMap::new(200 * BLOCK);
        big.set_all();
        assert_eq!(big.take(1000).len(), 200);
    }

    #[test]
    fn blocks_read_as_writes_in_runs() {
        let d = MemDisk(Mutex::new((0..(3 * BLOCK + 10)).map(|i| i as u8).collect()));
        let ops = read_blocks(&d, &[0, 1, 3, 9]).unwrap();
        assert_eq!(ops.len(), 2, "a run in one op; a block past the end is skipped");
        assert_eq!(ops[0].range(), Some((0, 2 * BLOCK)));
        assert_eq!(ops[1].range(), Some((3 * BLOCK, 10)), "the last block is short");
        let big: Vec<u64> = (0..(MAX_RUN / BLOCK) + 1).collect();
        let d = MemDisk(Mutex::new(vec![0; (MAX_RUN + BLOCK) as usize]));
        assert_eq!(read_blocks(&d, &big).unwrap().len(), 2, "runs are cut at MAX_RUN");
    }
}
