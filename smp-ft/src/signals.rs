//! Termination signals: blocked in every thread and forwarded to the VM as events, so it stops
//! in order, with a bounded grace before smpft exits regardless.

use smp_ft::vmm::VmEvent;
use std::time::Duration;

/// How long an orderly stop may take after a termination signal before smpft exits at once.
const SIGNAL_GRACE: Duration = Duration::from_secs(10);

/// Blocks the termination signals in every thread and forwards them to the VM as events, so the
/// VM stops in order. A signal always ends the process: if the orderly stop has not finished
/// [`SIGNAL_GRACE`] after the first signal, or a second SIGINT arrives, smpft exits at once
/// (a standby copies nothing then and a primary releases nothing, as after SIGKILL).
pub(crate) fn forward_signals(tx: crossbeam_channel::Sender<VmEvent>) {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            confine::enter(confine::Kind::Signals);
            let set = termination_set();
            let sig = wait_signal(&set, None).unwrap_or(libc::SIGTERM);
            let _ = tx.send(VmEvent::Signal(sig));
            // The stop is under way; this thread keeps its bound.
            let deadline = std::time::Instant::now() + SIGNAL_GRACE;
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match wait_signal(&set, Some(left)) {
                    None => {
                        tracing::error!("the VM did not stop within {SIGNAL_GRACE:?} of signal {sig}: exiting now");
                        exit_now(sig);
                    }
                    // A second Ctrl-C is someone who will not wait. Repeated SIGTERMs are a
                    // supervisor's (libvirt sends more than one): the stop already under way,
                    // bounded by SIGNAL_GRACE, finishes and flushes the disks.
                    Some(libc::SIGINT) => {
                        tracing::warn!("signal {} while stopping: exiting now", libc::SIGINT);
                        exit_now(libc::SIGINT);
                    }
                    Some(_) => {}
                }
            }
        })
        .expect("spawn signal thread");
}

/// Waits for one of `set`'s signals, for at most `timeout` (none: for ever); `None` if the
/// time ran out.
fn wait_signal(set: &libc::sigset_t, timeout: Option<Duration>) -> Option<i32> {
    loop {
        let ts =
            timeout.map(|t| libc::timespec { tv_sec: t.as_secs() as libc::time_t, tv_nsec: t.subsec_nanos() as _ });
        let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: `set` is an initialised signal set, a null info pointer is allowed, and
        // `ts_ptr` is null or points at a timespec that outlives the call.
        let r = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), ts_ptr) };
        if r > 0 {
            return Some(r);
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) => return None,
            // Interrupted: wait again (the deadline's remainder is the caller's to recompute,
            // and an interruption comes long before it).
            _ => continue,
        }
    }
}

/// Ends the process with status 128 + `sig` without running destructors or flushing anything
/// that could block.
fn exit_now(sig: i32) -> ! {
    // SAFETY: _exit(2) ends the process; nothing runs after it.
    unsafe { libc::_exit(128 + sig) }
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

pub(crate) fn block_termination_signals() {
    let set = termination_set();
    // SAFETY: blocks signals for this thread (inherited by all threads spawned after this).
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// A termination signal that is pending (blocked and not yet taken), taken now; `None` if none
/// is. For waits that come before the signals are forwarded.
pub(crate) fn pending_termination() -> Option<i32> {
    wait_signal(&termination_set(), Some(Duration::ZERO))
}
