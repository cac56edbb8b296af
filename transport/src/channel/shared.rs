//! State a connection's tasks share: the in-flight budget and checkpoint assembly.

use super::{code, ChannelError, CheckpointData, Event};
use bytes::Bytes;
use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex};
use quinn::{Connection, VarInt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// Checkpoint bytes in flight, released by acks.
pub(super) struct Budget {
    max: u64,
    state: Mutex<BudgetState>,
    cv: Condvar,
}

struct BudgetState {
    in_flight: u64,
    by_epoch: HashMap<u64, u64>,
    closed: bool,
}

impl Budget {
    pub(super) fn new(max: u64) -> Budget {
        Budget {
            max,
            state: Mutex::new(BudgetState { in_flight: 0, by_epoch: HashMap::new(), closed: false }),
            cv: Condvar::new(),
        }
    }

    pub(super) fn acquire(&self, epoch: u64, len: u64) -> Result<(), ChannelError> {
        let mut s = self.state.lock();
        // A checkpoint larger than the whole budget goes alone.
        while !s.closed && s.in_flight > 0 && s.in_flight + len > self.max {
            self.cv.wait(&mut s);
        }
        if s.closed {
            return Err(ChannelError::Closed("while waiting for acknowledgements".into()));
        }
        s.in_flight += len;
        *s.by_epoch.entry(epoch).or_default() += len;
        Ok(())
    }

    pub(super) fn release_through(&self, epoch: u64) {
        let mut s = self.state.lock();
        let done: Vec<u64> = s.by_epoch.keys().copied().filter(|&e| e <= epoch).collect();
        for e in done {
            let n = s.by_epoch.remove(&e).unwrap_or(0);
            s.in_flight -= n;
        }
        self.cv.notify_all();
    }

    pub(super) fn close(&self) {
        self.state.lock().closed = true;
        self.cv.notify_all();
    }

    pub(super) fn in_flight(&self) -> u64 {
        self.state.lock().in_flight
    }
}

/// State shared by a connection's tasks.
pub(super) struct Shared {
    pub(super) peer: SocketAddr,
    pub(super) events: Sender<Event>,
    /// When the peer was last heard, and whether its silence means it is dead.
    pub(super) detector: Mutex<crate::detector::Detector>,
    pub(super) closed: AtomicBool,
    pub(super) budget: Budget,
    pub(super) assembly: Mutex<Assembly>,
    pub(super) heartbeat_seq: AtomicU64,
    pub(super) max_checkpoint: u64,
    pub(super) max_frame: usize,
}

/// Checkpoints being received: chunks by epoch, and the order the sender announced them in.
#[derive(Default)]
pub(super) struct Assembly {
    /// Highest epoch announced so far.
    pub(super) announced_max: Option<u64>,
    /// Announced and not yet delivered: (epoch, chunks, bytes), in order.
    pub(super) announced: std::collections::VecDeque<(u64, u32, u64)>,
    pub(super) partial: HashMap<u64, Partial>,
    /// Bytes held in `partial`.
    pub(super) held: u64,
}

pub(super) struct Partial {
    pub(super) count: u32,
    pub(super) chunks: Vec<Option<Vec<Bytes>>>,
    pub(super) received: u32,
    pub(super) bytes: u64,
}

impl Assembly {
    /// Removes and returns every checkpoint at the head of the announced order that is whole.
    pub(super) fn deliverable(&mut self) -> Result<Vec<(u64, CheckpointData)>, String> {
        let mut out = Vec::new();
        while let Some(&(epoch, chunks, bytes)) = self.announced.front() {
            let Some(p) = self.partial.get(&epoch) else { break };
            if p.received < p.count {
                break;
            }
            let p = self.partial.remove(&epoch).unwrap_or(Partial { count: 0, chunks: vec![], received: 0, bytes: 0 });
            self.announced.pop_front();
            self.held -= p.bytes;
            if p.count != chunks || p.bytes != bytes {
                return Err(format!(
                    "checkpoint {epoch} arrived as {} chunks / {} bytes, announced {chunks} / {bytes}",
                    p.count, p.bytes
                ));
            }
            let segments = p.chunks.into_iter().flatten().flatten().collect();
            out.push((epoch, CheckpointData { segments }));
        }
        Ok(out)
    }
}

impl Shared {
    pub(super) fn heard(&self) {
        self.detector.lock().heard(Instant::now());
    }

    pub(super) fn deliver(&self, conn: &Connection) {
        let ready = self.assembly.lock().deliverable();
        match ready {
            Ok(list) => {
                for (epoch, data) in list {
                    let _ = self.events.send(Event::Checkpoint { epoch, data });
                }
            }
            Err(e) => self.violation(conn, code::PROTOCOL, &e),
        }
    }

    /// Reports a protocol violation once and closes the connection.
    pub(super) fn violation(&self, conn: &Connection, code: u32, reason: &str) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            tracing::warn!(peer = %self.peer, code, "closing FT channel: {reason}");
            conn.close(VarInt::from_u32(code), reason.as_bytes());
            self.budget.close();
            let _ = self.events.send(Event::Closed { reason: reason.to_string() });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembly_delivers_in_announced_order_only_when_whole() {
        let mut a = Assembly::default();
        let part = |count, chunks: Vec<Option<Vec<Bytes>>>, bytes| Partial {
            received: chunks.iter().flatten().count() as u32,
            count,
            chunks,
            bytes,
        };
        a.announced.push_back((1, 2, 6));
        a.announced.push_back((2, 1, 3));
        a.partial.insert(2, part(1, vec![Some(vec![Bytes::from_static(b"two")])], 3));
        a.partial.insert(1, part(2, vec![Some(vec![Bytes::from_static(b"one")]), None], 3));
        assert!(a.deliverable().unwrap().is_empty(), "epoch 2 waits for epoch 1");
        let p = a.partial.get_mut(&1).unwrap();
        p.chunks[1] = Some(vec![Bytes::from_static(b"ONE")]);
        p.received = 2;
        p.bytes = 6;
        a.held = 9;
        let out = a.deliverable().unwrap();
        assert_eq!(
            out.iter().map(|(e, d)| (*e, d.to_vec())).collect::<Vec<_>>(),
            vec![(1, b"oneONE".to_vec()), (2, b"two".to_vec())]
        );
        assert_eq!(a.held, 0);
    }
}
