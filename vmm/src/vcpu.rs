//! One thread per vCPU: enters the guest, dispatches exits to the devices, and follows the
//! run-state machine in `control.rs`.

use super::control::{Kick, Request, VcpuControl, VcpuState};
use super::devices::{Devices, PioAction};
use super::state::EarlyStates;
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use parking_lot::Mutex;
use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

/// Nice value of vCPU threads (see `Vcpu::run`).
const VCPU_NICE: libc::c_int = 19;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {vcpu}: KVM_RUN failed")]
    Run { vcpu: usize, source: kvm_ioctls::Error },
    #[error("vCPU {vcpu}: guest triple-faulted (rip {rip:#x}, rsp {rsp:#x}); the test guest must not fault")]
    TripleFault { vcpu: usize, rip: u64, rsp: u64 },
    #[error("vCPU {vcpu}: VM entry failed (hardware reason {reason:#x})")]
    FailEntry { vcpu: usize, reason: u64 },
    #[error("vCPU {vcpu}: KVM internal error ({}) at rip {rip:#x}", internal_error_name(*.suberror))]
    Internal { vcpu: usize, suberror: u32, rip: u64 },
    #[error("vCPU {vcpu}: unexpected exit {exit}")]
    Unexpected { vcpu: usize, exit: String },
}

/// Set as the exit reason before each `KVM_RUN` (KVM never uses it).
const EXIT_REASON_NONE: u32 = 0xffff_fff0;
/// `KVM_RUN`s that returned EINTR with an exit filled in.
static EINTR_WITH_EXIT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler; null when the thread has no vCPU.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal's handler: make the current `KVM_RUN` (or the next one) return `EINTR`.
extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: `run` is this thread's mapped kvm_run, valid while the pointer is set (it is
        // cleared before the VcpuFd is dropped); a volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick handler (once per process).
pub fn register_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick).map_err(|e| e.errno())
    })
    .map_err(vmm_sys_util::errno::Error::new)
}

/// Kicks vCPU threads with the kick signal.
pub struct SignalKick {
    threads: parking_lot::Mutex<Vec<Option<libc::pthread_t>>>,
}

impl SignalKick {
    pub fn new(vcpus: usize) -> Arc<Self> {
        Arc::new(SignalKick { threads: parking_lot::Mutex::new(vec![None; vcpus]) })
    }
    pub fn set_thread(&self, vcpu: usize, t: Option<libc::pthread_t>) {
        self.threads.lock()[vcpu] = t;
    }
}

impl Kick for Arc<SignalKick> {
    fn kick(&self, vcpu: usize) {
        if let Some(t) = self.threads.lock()[vcpu] {
            // SAFETY: `t` is a live, not yet joined thread (cleared before join); the signal has a
            // handler installed, so it cannot kill the process.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }
}

/// Why the vCPU loop ended.
#[derive(Debug)]
pub enum VcpuEnd {
    /// The controller asked for it.
    Requested,
    Failed(VcpuError),
}

pub struct Vcpu {
    pub index: usize,
    /// Held by the vCPU thread only around `KVM_RUN` and exit handling, so the controller can
    /// read and write the vCPU's state while it is paused.
    pub fd: Arc<Mutex<VcpuFd>>,
    control: Arc<VcpuControl>,
    devices: Arc<Devices>,
    /// Where this vCPU leaves its own registers when it stops for a pause.
    early: Arc<EarlyStates>,
    /// The last exit was port I/O or MMIO that `KVM_RUN` has not yet completed.
    pending_io: bool,
}

impl Vcpu {
    pub fn new(
        index: usize,
        fd: Arc<Mutex<VcpuFd>>,
        control: Arc<VcpuControl>,
        devices: Arc<Devices>,
        early: Arc<EarlyStates>,
    ) -> Self {
        Vcpu { index, fd, control, devices, early, pending_io: false }
    }

    /// Runs the guest until the controller asks the vCPU to exit or the guest ends.
    /// The thread's kick target is set up and torn down around the loop.
    pub fn run(&mut self, on_end: impl FnOnce(usize, &VcpuEnd)) -> VcpuEnd {
        // vCPU threads yield to the VMM's own threads (device I/O, checkpoints, the FT channel)
        // when the host is short of CPUs: those are short and sit on the guest's I/O latency.
        // (Raising kicked threads to nice 0 or SCHED_FIFO for the pause was measured: pauses
        // were no shorter.)
        // SAFETY: setpriority on this thread's id; failure only leaves the default priority.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, VCPU_NICE) };
        // SAFETY: gettid has no preconditions.
        self.control.set_tid(self.index, unsafe { libc::gettid() });
        KVM_RUN.with(|c| c.set(self.fd.lock().get_kvm_run() as *mut kvm_run));
        self.control.set_state(self.index, VcpuState::Running);
        let end = self.run_loop();
        if let Err(e) = self.complete_pending_io() {
            tracing::warn!(vcpu = self.index, "completing I/O at exit: {e}");
        }
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        on_end(self.index, &end);
        self.control.set_state(self.index, VcpuState::Exited);
        end
    }

    /// Re-enters `KVM_RUN` once with `immediate_exit` set, so KVM finishes a port/MMIO
    /// instruction whose data was just supplied, without running any further guest code.
    fn complete_pending_io(&mut self) -> Result<(), VcpuError> {
        if !self.pending_io {
            return Ok(());
        }
        self.pending_io = false;
        let mut fd = self.fd.lock();
        fd.set_kvm_immediate_exit(1);
        let r = fd.run().map(|_| ());
        fd.set_kvm_immediate_exit(0);
        match r {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Ok(()) => Ok(()),
            Err(e) => Err(VcpuError::Run { vcpu: self.index, source: e }),
        }
    }

    fn run_loop(&mut self) -> VcpuEnd {
        let vcpu = self.index;
        let mut throttle = crate::control::ThrottleClock::default();
        loop {
            match self.control.request() {
                Request::Run => {
                    if self.control.throttle_point(&mut throttle) {
                        continue;
                    }
                }
                Request::Pause => {
                    if let Err(e) = self.complete_pending_io() {
                        return VcpuEnd::Failed(e);
                    }
                    // Read this vCPU's registers now, in parallel with the others stopping,
                    // rather than in the pause, after all have.
                    self.early.record(vcpu, self.control.pause_seq(), &self.fd.lock());
                    match self.control.park(vcpu) {
                        Request::Exit => return VcpuEnd::Requested,
                        _ => continue,
                    }
                }
                Request::Exit => return VcpuEnd::Requested,
            }
            match self.enter_guest() {
                Step::Continue => {}
                Step::Idle(us) => self.control.idle(Duration::from_micros(us.into())),
                Step::AwaitOwner => {
                    while self.control.request() == Request::Run {
                        self.control.idle(Duration::from_millis(1));
                    }
                }
                Step::End(end) => return end,
            }
        }
    }
}

/// KVM's `KVM_INTERNAL_ERROR_*` sub-reasons.
fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        1 => "emulation failure: KVM cannot emulate the instruction",
        2 => "simultaneous exceptions",
        3 => "delivery event",
        4 => "unexpected exit reason",
        _ => "unknown reason",
    }
}

/// What one entry into the guest asks of the vCPU loop.
enum Step {
    Continue,
    Idle(u32),
    /// Run no more guest code until the VM's owner pauses the vCPUs (it resets the VM).
    AwaitOwner,
    End(VcpuEnd),
}

impl Vcpu {
    /// One `KVM_RUN` and the handling of its exit, with the vCPU fd held throughout.
    fn enter_guest(&mut self) -> Step {
        let vcpu = self.index;
        let fd = self.fd.clone();
        let mut fd = fd.lock();
        // A sentinel exit reason: after an EINTR, anything else means KVM filled in an exit.
        fd.get_kvm_run().exit_reason = EXIT_REASON_NONE;
        let (step, kicked) = match fd.run() {
            Ok(exit) => {
                self.pending_io = matches!(
                    exit,
                    VcpuExit::IoIn(..) | VcpuExit::IoOut(..) | VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)
                );
                let step = match exit {
                    VcpuExit::IoIn(port, data) => {
                        self.devices.pio_read(port, data);
                        Step::Continue
                    }
                    VcpuExit::IoOut(port, data) => match self.devices.pio_write(port, data) {
                        PioAction::None => Step::Continue,
                        PioAction::Idle(us) => Step::Idle(us),
                        PioAction::AwaitOwner => Step::AwaitOwner,
                    },
                    VcpuExit::MmioRead(addr, data) => {
                        self.devices.mmio_read(addr, data);
                        Step::Continue
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        self.devices.mmio_write(addr, data);
                        Step::Continue
                    }
                    VcpuExit::Shutdown => Step::End(VcpuEnd::Failed(VcpuError::TripleFault { vcpu, rip: 0, rsp: 0 })),
                    VcpuExit::FailEntry(reason, _) => Step::End(VcpuEnd::Failed(VcpuError::FailEntry { vcpu, reason })),
                    VcpuExit::InternalError => {
                        Step::End(VcpuEnd::Failed(VcpuError::Internal { vcpu, suberror: 0, rip: 0 }))
                    }
                    other => Step::End(VcpuEnd::Failed(VcpuError::Unexpected { vcpu, exit: format!("{other:?}") })),
                };
                (step, false)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.pending_io = false;
                let reason = fd.get_kvm_run().exit_reason;
                if reason != EXIT_REASON_NONE && reason != kvm_bindings::KVM_EXIT_INTR {
                    let n = EINTR_WITH_EXIT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n < 8 {
                        tracing::warn!(vcpu, reason, "KVM_RUN returned EINTR with an exit filled in");
                    }
                }
                (Step::Continue, true)
            }
            Err(e) => (Step::End(VcpuEnd::Failed(VcpuError::Run { vcpu, source: e })), false),
        };
        if kicked {
            // Clear the flag before the loop looks at the request again: a kick that lands
            // after this store is for a request the loop is about to see.
            fd.set_kvm_immediate_exit(0);
        }
        match step {
            Step::End(VcpuEnd::Failed(VcpuError::TripleFault { vcpu, .. })) => {
                let (rip, rsp) = fd.get_regs().map(|r| (r.rip, r.rsp)).unwrap_or_default();
                Step::End(VcpuEnd::Failed(VcpuError::TripleFault { vcpu, rip, rsp }))
            }
            Step::End(VcpuEnd::Failed(VcpuError::Internal { vcpu, .. })) => {
                // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit, KVM filled in the `internal`
                // member of the exit union.
                let suberror = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let rip = fd.get_regs().map(|r| r.rip).unwrap_or_default();
                Step::End(VcpuEnd::Failed(VcpuError::Internal { vcpu, suberror, rip }))
            }
            step => step,
        }
    }
}
