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
            let mut first: Option<i32> = None;
            loop {
                let set = termination_set();
                let mut sig = 0;
                // SAFETY: `set` is an initialised signal set and `sig` a valid out pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                if first.is_some() {
                    // A second Ctrl-C is someone who will not wait. Repeated SIGTERMs are a
                    // supervisor's (libvirt sends more than one): the stop already under way,
                    // bounded by SIGNAL_GRACE, finishes and flushes the disks.
                    if sig == libc::SIGINT {
                        tracing::warn!("signal {sig} while stopping: exiting now");
                        exit_now(sig);
                    }
                    continue;
                }
                first = Some(sig);
                let _ = tx.send(VmEvent::Signal(sig));
                let _ = std::thread::Builder::new().name("signal-grace".into()).spawn(move || {
                    std::thread::sleep(SIGNAL_GRACE);
                    tracing::error!("the VM did not stop within {SIGNAL_GRACE:?} of signal {sig}: exiting now");
                    exit_now(sig);
                });
            }
        })
        .expect("spawn signal thread");
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
