//! A test's probe of the filters: with `SMPFT_SECCOMP_PROBE=KIND[,KIND...]` in its environment,
//! the first thread of each kind named makes, right after its filter is installed, a call the filter
//! refuses (and that does nothing if it is let through: it names no valid file or descriptor).
//! With `--seccomp kill` the process dies of SIGSYS; with `log` the kernel logs the call under
//! the thread's name and the thread goes on.

use crate::Kind;
use std::sync::atomic::{AtomicU32, Ordering};

/// The environment variable that names the kind to probe.
pub const VAR: &str = "SMPFT_SECCOMP_PROBE";

/// The kinds probed already, one bit each (by their place in [`Kind::ALL`]).
static DONE: AtomicU32 = AtomicU32::new(0);

/// The call [`after_enter`] makes on a thread of `kind`: one its filter refuses.
pub fn refused_call(kind: Kind) -> &'static str {
    if kind.denies() {
        "kexec_file_load"
    } else {
        "execve"
    }
}

pub(crate) fn after_enter(kind: Kind) {
    let bit = 1 << Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
    if DONE.load(Ordering::Relaxed) & bit != 0 {
        return;
    }
    let Ok(named) = std::env::var(VAR) else { return };
    if !named.split(',').any(|k| k == kind.name()) || DONE.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
        return;
    }
    let call = refused_call(kind);
    tracing::warn!(kind = kind.name(), call, "seccomp probe: this thread makes a call its filter refuses");
    // SAFETY: both calls fail harmlessly when let through: kexec_file_load on descriptors -1
    // (EBADF or EPERM), execve of a null path (EFAULT); neither touches this process's memory.
    let r = unsafe {
        if kind.denies() {
            libc::syscall(libc::SYS_kexec_file_load, -1i32, -1i32, 0usize, std::ptr::null::<u8>(), 0usize)
        } else {
            libc::syscall(libc::SYS_execve, std::ptr::null::<u8>(), std::ptr::null::<u8>(), std::ptr::null::<u8>())
        }
    };
    tracing::warn!(kind = kind.name(), call, result = r, "seccomp probe: the call returned (the filter logged it)");
}
