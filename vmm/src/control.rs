//! The vCPU run-state machine and the pause/resume handshake (shared by the controller and every
//! vCPU thread).
//!
//! Each vCPU is `Starting → Running ⇄ Paused → Exited`. To pause, the controller sets the request
//! (one atomic the vCPU loop checks before every `KVM_RUN`), then kicks every running vCPU with a
//! signal whose handler sets `immediate_exit`, so a vCPU inside `KVM_RUN` leaves it and one about
//! to enter it returns at once. A vCPU completes any pending port/MMIO access (one more `KVM_RUN`
//! with `immediate_exit = 1`) before it reports `Paused`, so saved state is never mid-instruction.
//! The controller blocks on a condition variable until every vCPU has acknowledged; nobody spins.

use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    Starting,
    Running,
    Paused,
    Exited,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Request {
    Run = 0,
    Pause = 1,
    Exit = 2,
}

impl Request {
    fn from_u8(v: u8) -> Request {
        match v {
            0 => Request::Run,
            1 => Request::Pause,
            _ => Request::Exit,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PauseError {
    #[error("vCPU {vcpu} did not stop within {timeout:?}")]
    Timeout { vcpu: usize, timeout: Duration },
    #[error("the VM is shutting down")]
    ShuttingDown,
}

/// How the controller makes a vCPU thread leave `KVM_RUN` (a signal in production).
pub trait Kick: Send + Sync {
    fn kick(&self, vcpu: usize);
}

struct Inner {
    states: Vec<VcpuState>,
}

pub struct VcpuControl {
    request: AtomicU8,
    inner: Mutex<Inner>,
    /// Controller → vCPUs: resume, exit, input for idle vCPUs.
    to_vcpus: Condvar,
    /// vCPUs → controller: a state changed.
    to_ctl: Condvar,
    /// Bumped whenever input for the guest arrives, so idle vCPUs wake up.
    input_seq: AtomicU64,
    /// Number of the current (or last) pause, bumped before each pause is requested.
    pause_seq: AtomicU64,
    /// Share of time (percent) each vCPU spends out of the guest, in [`THROTTLE_SLICE`]s.
    throttle: AtomicU32,
    kicker: Box<dyn Kick>,
    /// Each vCPU thread's id (0 until it runs), for tools that place or account threads.
    tids: Vec<std::sync::atomic::AtomicI32>,
}

/// Throttled vCPUs sleep their share of every slice this long.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);
/// The most a throttle takes (a guest always keeps some time to run).
pub const THROTTLE_MAX: u32 = 90;

/// A vCPU's place in its throttle slices.
#[derive(Debug, Clone, Copy, Default)]
pub struct ThrottleClock {
    /// When the running slice began (none while not throttled).
    slice_start: Option<Instant>,
    /// Sleep still owed (a pause cut it short).
    owed: Duration,
}

/// How often a waiting controller kicks again vCPUs that have not acknowledged.
const REKICK: Duration = Duration::from_millis(5);

impl VcpuControl {
    pub fn new(vcpus: usize, kicker: Box<dyn Kick>) -> Self {
        VcpuControl {
            request: AtomicU8::new(Request::Run as u8),
            inner: Mutex::new(Inner { states: vec![VcpuState::Starting; vcpus] }),
            to_vcpus: Condvar::new(),
            to_ctl: Condvar::new(),
            input_seq: AtomicU64::new(0),
            pause_seq: AtomicU64::new(0),
            throttle: AtomicU32::new(0),
            tids: (0..vcpus).map(|_| std::sync::atomic::AtomicI32::new(0)).collect(),
            kicker,
        }
    }

    pub fn vcpus(&self) -> usize {
        self.inner.lock().states.len()
    }

    pub fn states(&self) -> Vec<VcpuState> {
        self.inner.lock().states.clone()
    }

    /// Records the calling thread as vCPU `vcpu`'s.
    pub fn set_tid(&self, vcpu: usize, tid: i32) {
        if let Some(t) = self.tids.get(vcpu) {
            t.store(tid, Ordering::Relaxed);
        }
    }

    /// The vCPU threads' ids (0 for one not started).
    pub fn tids(&self) -> Vec<i32> {
        self.tids.iter().map(|t| t.load(Ordering::Relaxed)).collect()
    }

    /// The number of the current pause, or of the last one while the VM runs.
    pub fn pause_seq(&self) -> u64 {
        self.pause_seq.load(Ordering::SeqCst)
    }

    /// What the vCPU loop must do next (checked before every entry into the guest).
    pub fn request(&self) -> Request {
        Request::from_u8(self.request.load(Ordering::SeqCst))
    }

    fn kick_running(&self, inner: &Inner) {
        for (i, s) in inner.states.iter().enumerate() {
            if matches!(s, VcpuState::Running | VcpuState::Starting) {
                self.kicker.kick(i);
            }
        }
    }

    /// Asks the vCPUs to pause before their threads start: each parks before it first enters
    /// the guest (a VM started paused, as QEMU's `-S`). Completed by [`VcpuControl::pause`].
    pub fn pause_at_start(&self) {
        let _inner = self.inner.lock();
        self.pause_seq.fetch_add(1, Ordering::SeqCst);
        self.request.store(Request::Pause as u8, Ordering::SeqCst);
    }

    /// Stops every vCPU and returns once all have acknowledged (or exited).
    pub fn pause(&self, timeout: Duration) -> Result<(), PauseError> {
        let mut inner = self.inner.lock();
        match self.request() {
            Request::Exit => return Err(PauseError::ShuttingDown),
            Request::Pause => {}
            Request::Run => {
                // Numbered first: a vCPU that sees the request sees its number.
                self.pause_seq.fetch_add(1, Ordering::SeqCst);
                self.request.store(Request::Pause as u8, Ordering::SeqCst);
            }
        }
        self.to_vcpus.notify_all();
        self.kick_running(&inner);
        let deadline = Instant::now() + timeout;
        loop {
            let laggard = inner.states.iter().position(|s| matches!(s, VcpuState::Running | VcpuState::Starting));
            let Some(vcpu) = laggard else { return Ok(()) };
            if self.request() == Request::Exit {
                return Err(PauseError::ShuttingDown);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(PauseError::Timeout { vcpu, timeout });
            }
            if self.to_ctl.wait_until(&mut inner, (now + REKICK).min(deadline)).timed_out() {
                self.kick_running(&inner);
            }
        }
    }

    /// Throttles the vCPUs: each spends `percent` of its time out of the guest (capped at
    /// [`THROTTLE_MAX`]; 0 lifts it). A vCPU looks at the throttle each time it leaves the guest;
    /// [`Self::kick_running_vcpus`] makes sure that happens.
    pub fn set_throttle(&self, percent: u32) {
        self.throttle.store(percent.min(THROTTLE_MAX), Ordering::SeqCst);
    }

    pub fn throttle(&self) -> u32 {
        self.throttle.load(Ordering::SeqCst)
    }

    /// Makes every vCPU in the guest leave it once (it goes back in at once unless throttled).
    pub fn kick_running_vcpus(&self) {
        let inner = self.inner.lock();
        self.kick_running(&inner);
    }

    /// Called by a vCPU between guest entries: once a slice of running time has passed, sleeps
    /// the throttle's share of a slice, woken early by any request other than Run (a pause for
    /// a checkpoint: what was cut short is slept after it) or by input for the guest (the rest
    /// is forgiven and a fresh slice starts). True if it slept (the caller looks at the request
    /// again).
    pub fn throttle_point(&self, clock: &mut ThrottleClock) -> bool {
        // Not throttled (the usual case, on every guest exit): one atomic load, no clock read.
        let pct = self.throttle();
        if pct == 0 {
            clock.slice_start = None;
            clock.owed = Duration::ZERO;
            return false;
        }
        let now = Instant::now();
        let Some(slice_start) = clock.slice_start else {
            // The throttle just came on: this slice starts now.
            clock.slice_start = Some(now);
            return false;
        };
        if clock.owed.is_zero() {
            if now.duration_since(slice_start) < THROTTLE_SLICE {
                return false;
            }
            clock.owed = THROTTLE_SLICE * pct / (100 - pct).max(1);
        }
        let deadline = now + clock.owed;
        // Input for the guest (a request to serve) ends the sleep too: throttling is meant to
        // slow what the guest dirties, not how soon it answers.
        let seq = self.input_seq.load(Ordering::SeqCst);
        let mut inner = self.inner.lock();
        while self.request() == Request::Run && self.input_seq.load(Ordering::SeqCst) == seq {
            if self.to_vcpus.wait_until(&mut inner, deadline).timed_out() {
                break;
            }
        }
        let now = Instant::now();
        // Woken by input: the rest is forgiven and a fresh slice runs, so the request is served
        // at full speed. Woken by a pause: the rest is owed and slept after it.
        let input = self.input_seq.load(Ordering::SeqCst) != seq;
        clock.owed = if input { Duration::ZERO } else { deadline.saturating_duration_since(now) };
        clock.slice_start = Some(now);
        true
    }

    /// Lets paused vCPUs run again. Does not wait for them to re-enter the guest.
    pub fn resume(&self) {
        let _inner = self.inner.lock();
        if self.request() == Request::Pause {
            self.request.store(Request::Run as u8, Ordering::SeqCst);
            self.to_vcpus.notify_all();
        }
    }

    /// Resumes and waits until every vCPU that was paused is running again.
    pub fn resume_and_wait(&self, timeout: Duration) -> Result<(), PauseError> {
        self.resume();
        let mut inner = self.inner.lock();
        let deadline = Instant::now() + timeout;
        while let Some(vcpu) = inner.states.iter().position(|s| *s == VcpuState::Paused) {
            if self.to_ctl.wait_until(&mut inner, deadline).timed_out() {
                return Err(PauseError::Timeout { vcpu, timeout });
            }
        }
        Ok(())
    }

    /// Asks every vCPU to exit; they leave the guest at once.
    pub fn request_exit(&self) {
        let inner = self.inner.lock();
        self.request.store(Request::Exit as u8, Ordering::SeqCst);
        self.to_vcpus.notify_all();
        self.kick_running(&inner);
    }

    /// Blocks until every vCPU thread has exited.
    pub fn wait_exited(&self, timeout: Duration) -> bool {
        let mut inner = self.inner.lock();
        let deadline = Instant::now() + timeout;
        while inner.states.iter().any(|s| *s != VcpuState::Exited) {
            if self.to_ctl.wait_until(&mut inner, deadline).timed_out() {
                return false;
            }
        }
        true
    }

    /// Input for the guest arrived: wake vCPUs waiting on the idle port.
    pub fn input_arrived(&self) {
        let _inner = self.inner.lock();
        self.input_seq.fetch_add(1, Ordering::SeqCst);
        self.to_vcpus.notify_all();
    }

    // ---- vCPU side ----

    pub fn set_state(&self, vcpu: usize, state: VcpuState) {
        let mut inner = self.inner.lock();
        inner.states[vcpu] = state;
        self.to_ctl.notify_all();
    }

    /// Reports `vcpu` paused and blocks until the controller resumes or exits the VM.
    pub fn park(&self, vcpu: usize) -> Request {
        let mut inner = self.inner.lock();
        inner.states[vcpu] = VcpuState::Paused;
        self.to_ctl.notify_all();
        while self.request() == Request::Pause {
            self.to_vcpus.wait(&mut inner);
        }
        let req = self.request();
        if req == Request::Run {
            inner.states[vcpu] = VcpuState::Running;
            self.to_ctl.notify_all();
        }
        req
    }

    /// The guest has nothing to do for up to `max`: sleep until then, until input arrives, or
    /// until the controller wants something.
    pub fn idle(&self, max: Duration) {
        if max.is_zero() {
            std::thread::yield_now();
            return;
        }
        let seq = self.input_seq.load(Ordering::SeqCst);
        let deadline = Instant::now() + max;
        let mut inner = self.inner.lock();
        while self.request() == Request::Run && self.input_seq.load(Ordering::SeqCst) == seq {
            if self.to_vcpus.wait_until(&mut inner, deadline).timed_out() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoKick;
    impl Kick for NoKick {
        fn kick(&self, _: usize) {}
    }

    #[test]
    fn a_throttled_vcpu_sleeps_its_share_and_a_pause_cuts_the_sleep_short() {
        let ctl = Arc::new(VcpuControl::new(1, Box::new(NoKick)));
        let old = || ThrottleClock { slice_start: Some(Instant::now() - THROTTLE_SLICE), owed: Duration::ZERO };
        assert!(!ctl.throttle_point(&mut old()), "not throttled: no sleep");
        ctl.set_throttle(200);
        assert_eq!(ctl.throttle(), THROTTLE_MAX);
        ctl.set_throttle(50);
        let mut fresh = ThrottleClock::default();
        assert!(!ctl.throttle_point(&mut fresh), "when the throttle comes on, a slice runs first");
        let mut clock = old();
        let t = Instant::now();
        assert!(ctl.throttle_point(&mut clock));
        assert!(t.elapsed() >= THROTTLE_SLICE, "50%: a slice out for a slice in");
        assert!(!ctl.throttle_point(&mut clock), "not again before the next slice has run");
        ctl.set_throttle(THROTTLE_MAX);
        let mut start = old();
        let c = ctl.clone();
        let pauser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            c.request.store(Request::Pause as u8, Ordering::SeqCst);
            let _g = c.inner.lock();
            c.to_vcpus.notify_all();
        });
        let t = Instant::now();
        ctl.throttle_point(&mut start);
        assert!(t.elapsed() < THROTTLE_SLICE * 10, "a pause request ends the sleep ({:?})", t.elapsed());
        assert!(start.owed > THROTTLE_SLICE * 5, "the rest is owed: {:?}", start.owed);
        pauser.join().unwrap();
        ctl.request.store(Request::Run as u8, Ordering::SeqCst);
        let mut serving = old();
        let c = ctl.clone();
        let input = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            c.input_arrived();
        });
        let t = Instant::now();
        assert!(ctl.throttle_point(&mut serving));
        assert!(t.elapsed() < THROTTLE_SLICE * 9, "input ends the sleep ({:?})", t.elapsed());
        assert_eq!(serving.owed, Duration::ZERO, "and the rest is forgiven: the request is served at full speed");
        assert!(!ctl.throttle_point(&mut serving), "a fresh slice runs first");
        input.join().unwrap();
    }
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// Stand-in for the signal: vCPU threads poll a flag instead of running a guest.
    #[derive(Default)]
    struct FlagKick(Arc<Vec<AtomicBool>>);
    impl Kick for FlagKick {
        fn kick(&self, vcpu: usize) {
            self.0[vcpu].store(true, Ordering::SeqCst);
        }
    }

    fn spawn(n: usize) -> (Arc<VcpuControl>, Vec<std::thread::JoinHandle<u64>>) {
        let flags: Arc<Vec<AtomicBool>> = Arc::new((0..n).map(|_| AtomicBool::new(false)).collect());
        let ctl = Arc::new(VcpuControl::new(n, Box::new(FlagKick(flags.clone()))));
        let threads = (0..n)
            .map(|i| {
                let ctl = ctl.clone();
                let flags = flags.clone();
                std::thread::spawn(move || {
                    ctl.set_state(i, VcpuState::Running);
                    let mut work = 0u64;
                    loop {
                        match ctl.request() {
                            Request::Run => {}
                            Request::Pause => {
                                if ctl.park(i) == Request::Exit {
                                    break;
                                }
                                continue;
                            }
                            Request::Exit => break,
                        }
                        flags[i].store(false, Ordering::SeqCst);
                        work += 1;
                        std::hint::spin_loop();
                    }
                    ctl.set_state(i, VcpuState::Exited);
                    work
                })
            })
            .collect();
        (ctl, threads)
    }

    #[test]
    fn pause_waits_for_every_vcpu_and_resume_releases_them() {
        let (ctl, threads) = spawn(4);
        for i in 0..200 {
            ctl.pause(Duration::from_secs(5)).unwrap();
            assert!(ctl.states().iter().all(|s| *s == VcpuState::Paused));
            if i % 2 == 0 {
                ctl.resume();
            } else {
                ctl.resume_and_wait(Duration::from_secs(5)).unwrap();
                assert!(ctl.states().iter().all(|s| *s == VcpuState::Running));
            }
        }
        ctl.request_exit();
        assert!(ctl.wait_exited(Duration::from_secs(5)));
        for t in threads {
            assert!(t.join().unwrap() > 0);
        }
    }

    #[test]
    fn pause_times_out_naming_the_stuck_vcpu() {
        let ctl =
            VcpuControl::new(2, Box::new(FlagKick(Arc::new(vec![AtomicBool::new(false), AtomicBool::new(false)]))));
        ctl.set_state(0, VcpuState::Paused);
        ctl.set_state(1, VcpuState::Running);
        let err = ctl.pause(Duration::from_millis(20)).unwrap_err();
        assert_eq!(err, PauseError::Timeout { vcpu: 1, timeout: Duration::from_millis(20) });
    }

    #[test]
    fn exit_ends_a_pause_and_refuses_new_ones() {
        let (ctl, threads) = spawn(2);
        ctl.pause(Duration::from_secs(5)).unwrap();
        ctl.request_exit();
        assert!(ctl.wait_exited(Duration::from_secs(5)));
        assert_eq!(ctl.pause(Duration::from_secs(1)), Err(PauseError::ShuttingDown));
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn idle_returns_early_on_input() {
        let ctl = Arc::new(VcpuControl::new(1, Box::new(FlagKick(Arc::new(vec![AtomicBool::new(false)])))));
        let c = ctl.clone();
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            c.idle(Duration::from_secs(30));
            start.elapsed()
        });
        // Input may arrive before the vCPU starts waiting; keep announcing it until it returns.
        for _ in 0..2000 {
            ctl.input_arrived();
            if t.is_finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(t.is_finished(), "idle vCPU did not wake on input");
        assert!(t.join().unwrap() < Duration::from_secs(30));
    }
}
