//! `--on-event PROGRAM`: runs PROGRAM (directly, no shell) on each FT state change, with what
//! changed in its environment. One thread runs them in order, each in the background of the
//! VM (a change is queued, never waited for: going live is never delayed by a hook), killed at
//! its timeout; its exit status is logged.

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The environment a hook gets, from the event's fields.
pub const VARIABLES: &[(&str, &str)] = &[
    ("SMPFT_EVENT", "event"),
    ("SMPFT_VM", "vm"),
    ("SMPFT_UUID", "uuid"),
    ("SMPFT_ROLE", "role"),
    ("SMPFT_STATE", "state"),
    ("SMPFT_PREVIOUS_STATE", "previous-state"),
    ("SMPFT_PEER", "peer"),
    ("SMPFT_GENERATION", "generation"),
    ("SMPFT_EPOCH", "epoch"),
];

/// Hook runs queued or running, for [`drain`].
static PENDING: (parking_lot::Mutex<usize>, parking_lot::Condvar) =
    (parking_lot::Mutex::new(0), parking_lot::Condvar::new());

/// Starts the thread that runs `program` for each change the observer reports.
pub fn install(program: PathBuf, timeout: Duration) -> std::io::Result<()> {
    let (tx, rx) = crossbeam_channel::unbounded::<Value>();
    std::thread::Builder::new().name("event-hook".into()).spawn(move || {
        confine::enter(confine::Kind::Hook);
        for ev in rx {
            run(&program, &ev, timeout);
            *PENDING.0.lock() -= 1;
            PENDING.1.notify_all();
        }
    })?;
    super::get().on_change(move |_, data| {
        *PENDING.0.lock() += 1;
        if tx.send(data).is_err() {
            *PENDING.0.lock() -= 1;
        }
    });
    Ok(())
}

/// As the process ends: lets the hooks still queued run, for at most `within` (the last change,
/// e.g. a standby standing down, is told as the copy exits).
pub fn drain(within: Duration) {
    let deadline = std::time::Instant::now() + within;
    let mut n = PENDING.0.lock();
    while *n > 0 && !PENDING.1.wait_until(&mut n, deadline).timed_out() {}
}

fn env_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    }
}

/// Runs the program once for `ev`, up to `timeout`.
fn run(program: &PathBuf, ev: &Value, timeout: Duration) {
    let event = env_value(&ev["event"]);
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null());
    for (var, field) in VARIABLES {
        cmd.env(var, env_value(&ev[*field]));
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(event, "event hook {} cannot start: {e}", program.display());
            return;
        }
    };
    // A pidfd names this child for good: a kill after it was reaped cannot reach another
    // process that took its pid.
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    // SAFETY: a descriptor pidfd_open just returned, owned from here on.
    let pidfd = (fd >= 0).then(|| unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) });
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let waiter = std::thread::Builder::new().name("event-hook-wait".into()).spawn(move || {
        confine::enter(confine::Kind::Hook);
        let _ = done_tx.send(child.wait());
    });
    let Ok(waiter) = waiter else {
        tracing::warn!(event, "event hook {}: cannot wait for it", program.display());
        return;
    };
    let status = match done_rx.recv_timeout(timeout) {
        Ok(s) => s,
        Err(_) => {
            if let Some(fd) = &pidfd {
                // SAFETY: pidfd_send_signal on the child's pidfd, no siginfo.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        std::os::fd::AsRawFd::as_raw_fd(fd),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
            }
            tracing::warn!(
                event,
                timeout_ms = timeout.as_millis() as u64,
                "event hook {} killed at its timeout",
                program.display()
            );
            done_rx.recv().unwrap_or_else(|_| Err(std::io::Error::other("waiter gone")))
        }
    };
    let _ = waiter.join();
    match status {
        Ok(s) if s.success() => tracing::info!(event, "event hook {} exited with status 0", program.display()),
        Ok(s) => tracing::warn!(event, "event hook {} failed: {s}", program.display()),
        Err(e) => tracing::warn!(event, "event hook {}: {e}", program.display()),
    }
}
