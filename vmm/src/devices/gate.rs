//! The output gate: where everything the outside world could see leaves the VM.
//!
//! Unprotected, the gate is open and output goes straight to its port. Protected, output is held
//! until the checkpoint that produced it is acknowledged by the standby:
//! - devices [`OutputGate::emit`] into the current batch;
//! - at each checkpoint, with the vCPUs stopped, the FT engine [`OutputGate::seal`]s the batch
//!   (so it holds exactly the output of the epoch being captured) and gets an id for it;
//! - once the standby acknowledges that checkpoint, the engine [`OutputGate::release`]s the id.
//!
//! A port is anything that can deliver bytes onward: the serial output queue today, a
//! virtio-net transmit path next (each frame one `emit`, so frames are never merged).

use parking_lot::Mutex;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where released output goes.
pub trait OutputPort: Send + Sync {
    fn deliver(&self, data: &[u8]);
    /// Whether consecutive emits may be merged into one delivery (a byte stream: yes; frames: no).
    fn is_stream(&self) -> bool {
        true
    }
}

struct Batch {
    items: Vec<(Arc<dyn OutputPort>, Vec<u8>)>,
    /// When the oldest byte in it was produced.
    since: Instant,
    /// When the newest was.
    last: Instant,
}

#[derive(Default)]
struct Inner {
    holding: bool,
    open: Option<Batch>,
    sealed: BTreeMap<u64, Batch>,
    /// Released, not yet delivered: the lease lapsed while delivering (oldest first).
    releasable: VecDeque<(Arc<dyn OutputPort>, Vec<u8>)>,
    next_id: u64,
    /// Hold times of recently released batches (oldest byte to release), for statistics.
    latencies: VecDeque<Duration>,
    held_bytes: u64,
}

/// Whether released output may leave now (see [`OutputGate::set_lease`]).
pub type Lease = Arc<dyn Fn() -> bool + Send + Sync>;

/// See the module documentation.
#[derive(Default)]
pub struct OutputGate {
    inner: Mutex<Inner>,
    lease: Mutex<Option<Lease>>,
    /// Told (without blocking) when output starts waiting, so a checkpoint can be taken early.
    waiting: Mutex<Option<crossbeam_channel::Sender<()>>>,
    /// Told each released batch's hold time (the metrics' histogram).
    on_hold: std::sync::OnceLock<HoldObserver>,
}

/// Receives each released batch's hold time.
pub type HoldObserver = Box<dyn Fn(std::time::Duration) + Send + Sync>;

const LATENCY_SAMPLES: usize = 4096;

fn deliver(batch: Batch) {
    for (port, data) in batch.items {
        port.deliver(&data);
    }
}

impl OutputGate {
    pub fn new() -> Arc<Self> {
        Arc::new(OutputGate::default())
    }

    /// Registers where to signal that output is waiting (replacing any earlier one).
    pub fn notify_on_output(&self, tx: Option<crossbeam_channel::Sender<()>>) {
        *self.waiting.lock() = tx;
    }

    pub fn emit(&self, port: &Arc<dyn OutputPort>, data: &[u8]) {
        let mut g = self.inner.lock();
        if !g.holding {
            drop(g);
            port.deliver(data);
            return;
        }
        g.held_bytes += data.len() as u64;
        let first = g.open.is_none();
        let now = Instant::now();
        let batch = g.open.get_or_insert_with(|| Batch { items: Vec::new(), since: now, last: now });
        batch.last = now;
        match batch.items.last_mut() {
            Some((p, buf)) if Arc::ptr_eq(p, port) && port.is_stream() => buf.extend_from_slice(data),
            _ => batch.items.push((port.clone(), data.to_vec())),
        }
        drop(g);
        if first {
            if let Some(tx) = &*self.waiting.lock() {
                let _ = tx.try_send(());
            }
        }
    }

    /// Starts holding output (the VM is now protected). Call with the vCPUs stopped.
    pub fn hold(&self) {
        self.inner.lock().holding = true;
    }

    /// When the output not yet sealed started and when it last grew, if there is any.
    pub fn open_times(&self) -> Option<(Instant, Instant)> {
        self.inner.lock().open.as_ref().map(|b| (b.since, b.last))
    }

    /// Closes the current batch and returns its id, or `None` if nothing was produced. Call with
    /// the vCPUs stopped, as part of capturing a checkpoint.
    pub fn seal(&self) -> Option<u64> {
        let mut g = self.inner.lock();
        let batch = g.open.take()?;
        let id = g.next_id;
        g.next_id += 1;
        g.sealed.insert(id, batch);
        Some(id)
    }

    /// Released output leaves only while `lease` says so (the FT engine: while the standby has
    /// been heard from recently enough that it cannot have taken over). A process frozen in the
    /// middle of a release (SIGSTOP, a long stall) wakes with a lapsed lease and sends the rest
    /// only once its standby is heard again; if the standby took over meanwhile, this copy
    /// loses the tie-breaker and [`OutputGate::discard_all`] drops it. `None`: no condition.
    pub fn set_lease(&self, lease: Option<Lease>) {
        *self.lease.lock() = lease;
    }

    /// Tells `f` the hold time of every batch released from now on (set once).
    pub fn observe_holds(&self, f: HoldObserver) {
        let _ = self.on_hold.set(f);
    }

    /// Lets the sealed batches `ids` out, in the order given, after anything released earlier
    /// and not yet delivered.
    pub fn release(&self, ids: &[u64]) {
        {
            let mut g = self.inner.lock();
            for id in ids {
                if let Some(b) = g.sealed.remove(id) {
                    if g.latencies.len() == LATENCY_SAMPLES {
                        g.latencies.pop_front();
                    }
                    let held = b.since.elapsed();
                    g.latencies.push_back(held);
                    if let Some(f) = self.on_hold.get() {
                        f(held);
                    }
                    g.releasable.extend(b.items);
                }
            }
        }
        self.deliver_releasable();
    }

    /// Delivers released output, one item at a time, while the lease holds.
    pub fn deliver_releasable(&self) {
        if self.inner.lock().releasable.is_empty() {
            return;
        }
        let lease = self.lease.lock().clone();
        loop {
            if lease.as_ref().is_some_and(|l| !l()) {
                return;
            }
            let next = {
                let mut g = self.inner.lock();
                let item = g.releasable.pop_front();
                if let Some((_, data)) = &item {
                    g.held_bytes -= data.len() as u64;
                }
                item
            };
            let Some((port, data)) = next else { return };
            port.deliver(&data);
        }
    }

    /// Stops holding and lets everything out, oldest first (nothing survives elsewhere any more).
    pub fn open_all(&self) {
        let (released, batches): (Vec<_>, Vec<Batch>) = {
            let mut g = self.inner.lock();
            g.holding = false;
            g.held_bytes = 0;
            let mut v: Vec<Batch> = std::mem::take(&mut g.sealed).into_values().collect();
            v.extend(g.open.take());
            (std::mem::take(&mut g.releasable).into(), v)
        };
        *self.lease.lock() = None;
        for (port, data) in released {
            port.deliver(&data);
        }
        batches.into_iter().for_each(deliver);
    }

    /// Throws away everything held (this copy lost the tie-breaker and must show nothing more);
    /// the gate stays shut.
    pub fn discard_all(&self) -> u64 {
        let mut g = self.inner.lock();
        g.sealed.clear();
        g.releasable.clear();
        g.open = None;
        g.holding = true;
        std::mem::take(&mut g.held_bytes)
    }

    pub fn held_bytes(&self) -> u64 {
        self.inner.lock().held_bytes
    }

    /// How long output has been waiting: the oldest byte held or not yet sealed, or else the hold
    /// time of the latest release.
    pub fn output_lag(&self) -> Duration {
        let g = self.inner.lock();
        let oldest = g.sealed.values().map(|b| b.since).chain(g.open.as_ref().map(|b| b.since)).min();
        if !g.releasable.is_empty() && oldest.is_none() {
            return g.latencies.back().copied().unwrap_or_default();
        }
        match oldest {
            Some(t) => t.elapsed(),
            None => g.latencies.back().copied().unwrap_or_default(),
        }
    }

    /// Hold-time percentiles (p50, p99) over recent releases.
    pub fn hold_latency(&self) -> Option<(Duration, Duration)> {
        let mut v: Vec<Duration> = self.inner.lock().latencies.iter().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Some((at(0.5), at(0.99)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect(Mutex<Vec<Vec<u8>>>, bool);
    impl OutputPort for Collect {
        fn deliver(&self, data: &[u8]) {
            self.0.lock().push(data.to_vec());
        }
        fn is_stream(&self) -> bool {
            self.1
        }
    }

    fn port(stream: bool) -> (Arc<Collect>, Arc<dyn OutputPort>) {
        let c = Arc::new(Collect(Mutex::new(vec![]), stream));
        (c.clone(), c)
    }

    #[test]
    fn open_gate_passes_output_at_once() {
        let g = OutputGate::new();
        let (c, p) = port(true);
        g.emit(&p, b"hi");
        assert_eq!(*c.0.lock(), vec![b"hi".to_vec()]);
        assert_eq!(g.seal(), None);
    }

    #[test]
    fn held_output_leaves_only_when_its_batch_is_released() {
        let g = OutputGate::new();
        let (tx, rx) = crossbeam_channel::bounded(1);
        g.notify_on_output(Some(tx));
        g.hold();
        let (c, p) = port(true);
        g.emit(&p, b"a");
        g.emit(&p, b"b");
        assert!(rx.try_recv().is_ok(), "the first held byte asks for an early checkpoint");
        let first = g.seal().unwrap();
        g.emit(&p, b"c");
        let second = g.seal().unwrap();
        assert!(c.0.lock().is_empty(), "nothing leaves before an acknowledgement");
        assert_eq!(g.held_bytes(), 3);
        g.release(&[first]);
        assert_eq!(*c.0.lock(), vec![b"ab".to_vec()], "stream output is merged within a batch");
        g.release(&[first]);
        assert_eq!(c.0.lock().len(), 1, "a batch is released once");
        g.release(&[second]);
        assert_eq!(c.0.lock().len(), 2);
        assert_eq!(g.held_bytes(), 0);
        assert!(g.hold_latency().is_some());
    }

    #[test]
    fn released_output_waits_while_the_lease_has_lapsed() {
        let g = OutputGate::new();
        let lease = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let l = lease.clone();
        g.set_lease(Some(Arc::new(move || l.load(std::sync::atomic::Ordering::SeqCst))));
        g.hold();
        let (c, p) = port(false);
        g.emit(&p, b"f1");
        let first = g.seal().unwrap();
        g.emit(&p, b"f2");
        let second = g.seal().unwrap();
        lease.store(false, std::sync::atomic::Ordering::SeqCst);
        g.release(&[first]);
        assert!(c.0.lock().is_empty(), "a lapsed lease holds released output back");
        assert_eq!(g.held_bytes(), 4);
        lease.store(true, std::sync::atomic::Ordering::SeqCst);
        g.release(&[second]);
        assert_eq!(*c.0.lock(), vec![b"f1".to_vec(), b"f2".to_vec()], "in order once the lease holds");
        g.emit(&p, b"f3");
        let third = g.seal().unwrap();
        lease.store(false, std::sync::atomic::Ordering::SeqCst);
        g.release(&[third]);
        assert_eq!(g.discard_all(), 2, "a copy that lost drops what it could not send");
        assert_eq!(c.0.lock().len(), 2);
    }

    #[test]
    fn frames_stay_frames_and_discard_shows_nothing() {
        let g = OutputGate::new();
        g.hold();
        let (c, p) = port(false);
        g.emit(&p, b"f1");
        g.emit(&p, b"f2");
        let id = g.seal().unwrap();
        g.emit(&p, b"f3");
        assert_eq!(g.discard_all(), 6);
        g.release(&[id]);
        g.open_all();
        assert!(c.0.lock().is_empty(), "discarded output never appears");
        g.hold();
        g.emit(&p, b"f4");
        g.emit(&p, b"f5");
        let id = g.seal().unwrap();
        g.emit(&p, b"f6");
        g.open_all();
        assert_eq!(*c.0.lock(), vec![b"f4".to_vec(), b"f5".to_vec(), b"f6".to_vec()]);
        let _ = id;
        g.emit(&p, b"f7");
        assert_eq!(c.0.lock().len(), 4, "an opened gate passes output at once");
    }
}
