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
//! Once the VM is protected the log can *stream* instead ([`WriteLog::stream_to`]): each op
//! leaves for the standby as it completes, numbered in completion order, and the log keeps only
//! its size. Sealing an epoch then yields the number of ops streamed so far ([`Sealed::through`]),
//! which checkpoint N names: the standby stages streamed ops as they arrive and applies those
//! below N's number when N commits, exactly as if they had travelled inside it. Ops of an epoch
//! whose checkpoint never arrives stay staged and are never applied.
//!
//! The log is bounded: past its budget the device stops taking requests (they wait in the
//! virtqueue, see [`WriteLog::full`]) until a checkpoint seals the log, and checkpoints wait for
//! the standby's acknowledgements, so a slow standby slows the guest's disk and loses nothing.
//! Streamed ops count against the budget until the standby acknowledges the checkpoint that
//! names them ([`WriteLog::acked`]): the budget bounds what is in flight plus what is kept.
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

/// The least an op counts for against the log's budget (a flush or discard carries no data).
pub const OP_COST: usize = 64;

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

/// Where a streaming log sends each op as it completes (the FT channel).
pub trait Stream: Send + Sync {
    /// Op number `index` (counted from the moment streaming started), completed on `disk`.
    /// Called under the log's lock, so ops are sent in the order they are numbered.
    fn send(&self, index: u64, disk: u32, op: Op);

    /// The epoch is being sealed: anything the stream holds back must leave now, ahead of the
    /// seal. Called under the log's lock.
    fn flush(&self) {}
}

/// What sealing an epoch yields.
#[derive(Debug, Default)]
pub struct Sealed {
    /// Ops kept since the last seal (not streamed), in order.
    pub ops: Vec<(u32, Op)>,
    /// While streaming: ops streamed so far, in all (the epoch's checkpoint covers streamed
    /// ops `0..through`).
    pub through: Option<u64>,
}

struct Inner {
    mode: Mode,
    ops: Vec<(u32, Op)>,
    /// Bytes of write data in `ops`.
    kept: usize,
    /// Bytes of write data recorded since the last seal, kept or streamed.
    since_seal: usize,
    stream: Option<std::sync::Arc<dyn Stream>>,
    /// Ops streamed so far.
    streamed: u64,
    /// Streamed ops not yet covered by an acknowledged checkpoint: (index + 1, bytes).
    in_flight: std::collections::VecDeque<(u64, usize)>,
    in_flight_bytes: usize,
    /// Bytes of write data streamed to this standby, in all.
    streamed_bytes: u64,
    /// The most write data held at once (kept, or streamed and unacknowledged).
    peak: usize,
    /// Someone to tell when the log passes half its budget (the FT engine, to checkpoint early).
    notify: Option<crossbeam_channel::Sender<()>>,
}

impl Inner {
    fn reset(&mut self, mode: Mode) {
        self.mode = mode;
        self.ops.clear();
        self.kept = 0;
        self.since_seal = 0;
        self.stream = None;
        self.streamed = 0;
        self.in_flight.clear();
        self.in_flight_bytes = 0;
        self.streamed_bytes = 0;
        self.peak = 0;
    }
}

/// The primary's log of completed disk requests, shared by the VM's disks.
pub struct WriteLog {
    inner: Mutex<Inner>,
    budget: usize,
    sizes: Vec<u64>,
}

impl WriteLog {
    /// A log for disks of these sizes, keeping at most about `budget` bytes of write data
    /// (kept, or streamed and not yet acknowledged).
    pub fn new(sizes: &[u64], budget: usize) -> WriteLog {
        let inner = Inner {
            mode: Mode::Off,
            ops: Vec::new(),
            kept: 0,
            since_seal: 0,
            stream: None,
            streamed: 0,
            in_flight: Default::default(),
            in_flight_bytes: 0,
            streamed_bytes: 0,
            peak: 0,
            notify: None,
        };
        WriteLog { inner: Mutex::new(inner), budget, sizes: sizes.to_vec() }
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
        if g.mode == Mode::Off {
            return;
        }
        // What the op counts for against the budget: its data, and at least a nominal size, so
        // that flushes and discards are bounded too.
        let data = op.bytes();
        let bytes = data.max(OP_COST);
        let before = g.since_seal;
        g.since_seal += bytes;
        let index = g.streamed;
        match &g.stream {
            Some(stream) => {
                stream.send(index, disk, op);
                g.streamed += 1;
                let end = g.streamed;
                g.in_flight.push_back((end, bytes));
                g.in_flight_bytes += bytes;
                g.streamed_bytes += data as u64;
            }
            None => {
                g.kept += bytes;
                g.ops.push((disk, op));
            }
        }
        g.peak = g.peak.max(g.kept + g.in_flight_bytes);
        if before < self.budget / 2 && g.since_seal >= self.budget / 2 {
            if let Some(n) = &g.notify {
                let _ = n.try_send(());
            }
        }
    }

    /// The log is at its budget: take no more requests until a checkpoint seals the log, or
    /// the standby acknowledges streamed ops.
    pub fn full(&self) -> bool {
        let g = self.inner.lock();
        g.mode == Mode::Logging && g.kept + g.in_flight_bytes >= self.budget
    }

    /// Bytes of write data recorded since the last seal.
    pub fn pending(&self) -> usize {
        self.inner.lock().since_seal
    }

    /// Bytes of write data streamed and not yet covered by an acknowledged checkpoint.
    pub fn in_flight(&self) -> usize {
        self.inner.lock().in_flight_bytes
    }

    /// The budget, and the most write data held at once since the standby attached (kept, or
    /// streamed and not yet acknowledged): it passes the budget by at most the requests taken
    /// before the device saw it full.
    pub fn peak(&self) -> (usize, usize) {
        (self.budget, self.inner.lock().peak)
    }

    /// Bytes of write data streamed to this standby so far.
    pub fn streamed_bytes(&self) -> u64 {
        self.inner.lock().streamed_bytes
    }

    /// Past half the budget since the last seal: the FT engine should checkpoint soon.
    pub fn filling(&self) -> bool {
        self.inner.lock().since_seal >= self.budget / 2
    }

    /// Takes the ops kept for the epoch that ends now (called while the vCPUs are paused).
    pub fn seal(&self) -> Vec<(u32, Op)> {
        self.seal_streamed().ops
    }

    /// Ends the epoch (called while the vCPUs are paused): the ops kept, and how many were
    /// streamed so far.
    pub fn seal_streamed(&self) -> Sealed {
        let mut g = self.inner.lock();
        if let Some(s) = &g.stream {
            s.flush();
        }
        g.since_seal = 0;
        g.kept = 0;
        let through = g.stream.is_some().then_some(g.streamed);
        Sealed { ops: std::mem::take(&mut g.ops), through }
    }

    /// Whether ops are streamed as they complete.
    pub fn streaming(&self) -> bool {
        self.inner.lock().stream.is_some()
    }

    /// From now on each op goes to `stream` as it completes (numbered from 0), instead of being
    /// kept; ops kept so far stay for the next seal. Only while logging.
    pub fn stream_to(&self, stream: std::sync::Arc<dyn Stream>) {
        let mut g = self.inner.lock();
        if g.mode == Mode::Logging && g.stream.is_none() {
            g.stream = Some(stream);
            g.streamed = 0;
        }
    }

    /// The standby acknowledged a checkpoint that covers streamed ops `0..through`: their bytes
    /// leave the budget.
    pub fn acked(&self, through: u64) {
        let mut g = self.inner.lock();
        while let Some(&(end, bytes)) = g.in_flight.front() {
            if end > through {
                break;
            }
            g.in_flight.pop_front();
            g.in_flight_bytes -= bytes;
        }
    }

    /// A standby attached: every op from now on is kept.
    pub fn start_logging(&self) {
        self.inner.lock().reset(Mode::Logging);
    }

    /// No standby any more: nothing is kept or streamed.
    pub fn stop(&self) {
        self.inner.lock().reset(Mode::Off);
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

    use block::backend::MemoryDisk as MemDisk;

    fn w(offset: u64, byte: u8, len: usize) -> Op {
        Op::Write { offset, data: vec![byte; len] }
    }

    #[test]
    fn ops_apply_in_order() {
        let d0 = MemDisk::new(32, 0xee);
        let d1 = MemDisk::new(32, 0xee);
        let ops = vec![(0, w(0, 1, 8)), (0, w(4, 2, 8)), (1, w(0, 3, 8)), (0, Op::Zeroes { offset: 10, len: 2 })];
        apply(&[&d0, &d1], &ops).unwrap();
        let d0v = d0.contents();
        assert_eq!(&d0v[..13], &[1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0, 0xee]);
        assert_eq!(&d1.contents()[..8], &[3; 8]);
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

    /// A stream that remembers what it was sent.
    #[derive(Default)]
    struct Sent(Mutex<Vec<(u64, u32, Op)>>);

    impl Stream for Sent {
        fn send(&self, index: u64, disk: u32, op: Op) {
            self.0.lock().unwrap().push((index, disk, op));
        }
    }

    #[test]
    fn a_streaming_log_sends_ops_in_order_and_counts_them_until_acknowledged() {
        let log = WriteLog::new(&[1 << 20], 1000);
        let sent = std::sync::Arc::new(Sent::default());
        log.stream_to(sent.clone());
        assert!(!log.streaming(), "only while logging");
        log.start_logging();
        log.record(0, w(0, 1, 100));
        log.stream_to(sent.clone());
        log.record(0, w(8, 2, 300));
        log.record(0, Op::Flush);
        let s = log.seal_streamed();
        assert_eq!(s.ops.len(), 1, "the op kept before streaming started stays for the seal");
        assert_eq!(s.through, Some(2));
        let got: Vec<u64> = sent.0.lock().unwrap().iter().map(|e| e.0).collect();
        assert_eq!(got, vec![0, 1]);
        assert_eq!(log.in_flight(), 300 + OP_COST, "a flush counts for its nominal cost");
        log.record(0, w(0, 3, 600));
        assert!(!log.full());
        log.record(0, w(0, 4, 200));
        assert!(log.full(), "streamed and unacknowledged counts against the budget");
        assert_eq!(log.seal_streamed().through, Some(4));
        assert!(log.full(), "a seal frees nothing that is in flight");
        log.acked(2);
        assert_eq!(log.in_flight(), 800);
        assert!(!log.full(), "an acknowledgement frees what it covers");
        log.acked(4);
        assert_eq!(log.in_flight(), 0);
        assert_eq!(log.streamed_bytes(), 1100, "data streamed (a flush has none)");
        assert_eq!(log.peak(), (1000, 1164), "past the budget by the request taken before it was full");
        log.stop();
        assert!(!log.streaming());
        log.record(0, w(0, 5, 10));
        assert_eq!(sent.0.lock().unwrap().len(), 4, "stopped: nothing streamed");
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
        let d = MemDisk::from_vec((0..(3 * BLOCK + 10)).map(|i| i as u8).collect());
        let ops = read_blocks(&d, &[0, 1, 3, 9]).unwrap();
        assert_eq!(ops.len(), 2, "a run in one op; a block past the end is skipped");
        assert_eq!(ops[0].range(), Some((0, 2 * BLOCK)));
        assert_eq!(ops[1].range(), Some((3 * BLOCK, 10)), "the last block is short");
        let big: Vec<u64> = (0..(MAX_RUN / BLOCK) + 1).collect();
        let d = MemDisk::new((MAX_RUN + BLOCK) as usize, 0);
        assert_eq!(read_blocks(&d, &big).unwrap().len(), 2, "runs are cut at MAX_RUN");
    }
}
