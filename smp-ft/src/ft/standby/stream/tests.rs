use super::*;
use crate::ft::TestRng;
use block::backend::MemoryDisk;
use block::op::Op;
use bytes::Bytes;
use disk_mirror::log::{Stream, WriteLog};
use parking_lot::Mutex;

/// What travels on the ordered control stream, as the primary sends it.
enum Sent {
    Op(Bytes),
    Seal(Vec<u8>),
    /// Checkpoint `epoch`, with the ops it carries itself (kept before streaming started).
    Checkpoint(Epoch, Vec<(u32, Op)>),
}

/// The channel's ordered stream, with the primary's gathering of small ops.
#[derive(Default)]
struct Wire(Mutex<Vec<Sent>>, Mutex<wire::OpGather>);

impl Wire {
    fn out(&self, outs: impl IntoIterator<Item = wire::StreamOut>) {
        for o in outs {
            let f = match o {
                wire::StreamOut::Gathered(f) => f,
                wire::StreamOut::Alone(head, data) => [&head[..], &data[..]].concat().into(),
            };
            self.0.lock().push(Sent::Op(f));
        }
    }
}

impl Stream for Wire {
    fn send(&self, index: u64, disk: u32, op: Op) {
        let outs = self.1.lock().push(index, disk, op);
        self.out(outs);
    }

    fn flush(&self) {
        let outs = self.1.lock().take();
        self.out(outs);
    }
}

const SIZE: usize = 256 << 10;

/// A streamed op's data frame, as the standby receives it.
fn frame(index: u64, disk: u32, op: Op) -> Bytes {
    let (head, body) = wire::StreamedOp::encode(index, disk, op);
    [&head[..], &body[..]].concat().into()
}

/// A guest's random disk request, done on the primary's disk and recorded in the log.
fn guest_op(r: &mut TestRng, disk: &MemoryDisk, log: &WriteLog) {
    // Now and then a write large enough to go alone, past the small ones gathered before it.
    let max = if r.chance(10) { wire::GATHER as u64 } else { 4096 };
    let offset = r.next() % (SIZE as u64 - max);
    let len = 1 + r.next() % max;
    let op = match r.next() % 10 {
        0 => Op::Flush,
        1 => Op::Zeroes { offset, len },
        _ => Op::Write { offset, data: vec![r.next() as u8; len as usize] },
    };
    op.apply(disk).unwrap();
    log.record(0, op);
}

/// Randomised schedules of one session: guest writes, checkpoints (some of whose captures
/// fail and are retried), streaming switched on at a random moment (or never), and the
/// primary dying at a random point of what it sent. The standby, committing each checkpoint
/// it receives, holds exactly the primary's disk as of the last one; writes streamed for an
/// epoch that never committed are nowhere on it.
#[test]
fn the_standby_holds_exactly_the_last_committed_epoch_of_streamed_writes() {
    for seed in 1..300u64 {
        let mut r = TestRng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let primary = MemoryDisk::new(SIZE, 0);
        let standby: Arc<dyn Backend> = Arc::new(MemoryDisk::new(SIZE, 0));
        let log = WriteLog::new(&[SIZE as u64], 1 << 30);
        log.start_logging();
        let wire = Arc::new(Wire::default());
        let stream_from = r.next() % 80;
        let (mut epoch, mut unsent) = (1u64, Vec::new());
        let mut at_epoch = std::collections::HashMap::new();
        // The seal and the checkpoint leave after the vCPUs resumed (the checkpoint from the
        // sender thread, once encoded): ops of later epochs can go ahead of them.
        let mut later = std::collections::VecDeque::new();
        for step in 0..70 {
            if step == stream_from {
                log.stream_to(wire.clone());
            }
            while r.chance(40) {
                let Some(m) = later.pop_front() else { break };
                wire.0.lock().push(m);
            }
            if !r.chance(20) {
                guest_op(&mut r, &primary, &log);
                continue;
            }
            let sealed = log.seal_streamed();
            unsent.extend(sealed.ops);
            if r.chance(10) {
                continue; // the capture failed: its ops open the next attempt
            }
            at_epoch.insert(epoch, primary.contents());
            if let Some(through) = sealed.through {
                later.push_back(Sent::Seal(wire::encode_app(&DiskSeal { epoch, through })));
            }
            later.push_back(Sent::Checkpoint(epoch, std::mem::take(&mut unsent)));
            epoch += 1;
        }
        wire.0.lock().extend(later);
        let sent = std::mem::take(&mut *wire.0.lock());
        let cut = (r.next() % (sent.len() as u64 + 1)) as usize;
        let mut st = Streamed::default();
        let mut committed = None;
        for m in &sent[..cut] {
            match m {
                Sent::Op(d) => {
                    st.ops(d.clone(), &[SIZE as u64]).unwrap();
                }
                Sent::Seal(d) => st.seal(d).unwrap(),
                Sent::Checkpoint(e, inline) => {
                    let through = st.covers(*e).unwrap();
                    // Acknowledged; committed: its own ops, then the streamed ones it covers.
                    disk_mirror::log::apply(&[&*standby], inline).unwrap();
                    if let Some(t) = through {
                        st.commit(*e, t, std::slice::from_ref(&standby)).unwrap();
                        log.acked(t);
                    }
                    committed = Some(*e);
                }
            }
        }
        let want = committed.map_or_else(|| vec![0; SIZE], |e| at_epoch[&e].clone());
        let mut got = vec![0; SIZE];
        standby.read_at(&mut got, 0).unwrap();
        assert!(got == want, "seed {seed}: the standby's disk is not the primary's as of checkpoint {committed:?}");
    }
}

fn seal(epoch: u64, through: u64) -> Vec<u8> {
    wire::encode_app(&DiskSeal { epoch, through })
}

#[test]
fn streams_that_break_the_protocol_are_refused() {
    let w = |offset| Op::Write { offset, data: vec![1; 512] };
    let mut st = Streamed::default();
    let e = st.ops(frame(1, 0, w(0)), &[4096]).unwrap_err().to_string();
    assert!(e.contains("op 1 came where op 0 was due"), "{e}");
    let e = st.ops(frame(0, 0, w(4000)), &[4096]).unwrap_err().to_string();
    assert!(e.contains("outside disk 0"), "{e}");
    assert!(st.ops(frame(0, 1, w(0)), &[4096]).is_err(), "no disk 1");
    assert!(st.ops(Bytes::from_static(b"short"), &[4096]).unwrap_err().to_string().contains("malformed"));
    let mut long = frame(0, 0, w(0)).to_vec();
    long.push(0);
    assert!(st.ops(long.into(), &[4096]).unwrap_err().to_string().contains("1 bytes left"));
    let two = [frame(0, 0, w(0)), frame(2, 0, w(0))].concat();
    assert!(st.ops(two.into(), &[4096]).unwrap_err().to_string().contains("op 2 came where op 1 was due"));
    let mut kind = frame(0, 0, Op::Flush).to_vec();
    kind[12] = 9;
    assert!(st.ops(kind.into(), &[4096]).unwrap_err().to_string().contains("of kind 9"));
    assert_eq!(st.ops(frame(0, 0, w(0)), &[4096]).unwrap(), 512);
    assert_eq!(st.ops(frame(1, 0, Op::Flush), &[4096]).unwrap(), 0);
    st.seal(&seal(5, 2)).unwrap();
    assert_eq!(st.covers(5).unwrap(), Some(2));
    assert_eq!(st.covers(4).unwrap(), None, "no seal: nothing streamed");
    assert!(st.seal(&seal(6, 1)).unwrap_err().to_string().contains("fewer than"), "seals never go back");
    st.seal(&seal(6, 3)).unwrap();
    let e = st.covers(6).unwrap_err().to_string();
    assert!(e.contains("covers 3 streamed disk ops, only 2 arrived"), "{e}");
    assert!(st.seal(b"junk").is_err());
    let disk: Arc<dyn Backend> = Arc::new(MemoryDisk::new(4096, 0));
    assert_eq!(st.commit(5, 2, std::slice::from_ref(&disk)).unwrap(), 512);
    assert_eq!(st.staged_bytes, 0);
    let mut back = [0u8; 513];
    disk.read_at(&mut back, 0).unwrap();
    assert!(back[..512].iter().all(|&b| b == 1) && back[512] == 0, "the write, and nothing past it");
}
