//! `-daemonize` as QEMU does it, which libvirt relies on: the process forks, the child starts a
//! new session and sets everything up (the monitor socket listening, the pidfile written), and
//! only then tells the parent, which exits 0. If the child fails first, the parent exits 1: the
//! error the child printed on the shared stderr is what libvirt shows. Once ready, the child
//! points its standard streams at /dev/null.
//!
//! Call [`daemonize`] before any thread is started: only the calling thread survives a fork.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub struct Daemon {
    /// The write end of the pipe the parent waits on.
    ready: Option<std::fs::File>,
}

/// Forks. Returns in the child only; the parent waits for [`Daemon::ready`] (exit 0) or for the
/// child to end without saying so (exit 1).
pub fn daemonize() -> std::io::Result<Daemon> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other thread runs yet (see the module documentation), so the child is whole.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(r);
            // SAFETY: setsid has no memory effects; failure (already a leader) is harmless.
            unsafe { libc::setsid() };
            Ok(Daemon { ready: Some(std::fs::File::from(w)) })
        }
        _ => {
            drop(w);
            let mut byte = [0u8; 1];
            let mut r = std::fs::File::from(r);
            let ok = matches!(r.read(&mut byte), Ok(1));
            std::process::exit(if ok { 0 } else { 1 });
        }
    }
}

impl Daemon {
    /// Everything is set up: the parent may exit, and the standard streams go to /dev/null.
    pub fn ready(&mut self) {
        self.release(None);
    }

    /// As [`Self::ready`], with standard error (smpft's log) appended to `log` instead, if it
    /// can be opened: a VM that runs for months keeps saying what happened to it.
    pub fn ready_logging_to(&mut self, log: &std::path::Path) {
        if let Some(dir) = log.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(log).ok();
        if file.is_some() {
            tracing::info!(log = %log.display(), "running in the background; the log continues in this file");
        }
        self.release(file);
    }

    fn release(&mut self, log: Option<std::fs::File>) {
        if let Some(mut w) = self.ready.take() {
            let _ = w.write_all(&[1]);
        }
        if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
            for fd in 0..3 {
                let to = match (&log, fd) {
                    (Some(l), 2) => l.as_raw_fd(),
                    _ => null.as_raw_fd(),
                };
                // SAFETY: dup2 onto the standard descriptors, which this process owns.
                unsafe { libc::dup2(to, fd) };
            }
        }
    }
}

/// Where a daemonized VM's log goes: `$SMPFT_DAEMON_LOG`, or `/var/log/smpft/KEY.log` (KEY the
/// VM's name, or `pve-ID` for a Proxmox VM).
pub fn log_path(key: &str) -> std::path::PathBuf {
    match std::env::var_os("SMPFT_DAEMON_LOG") {
        Some(p) => p.into(),
        None => std::path::Path::new("/var/log/smpft").join(format!("{}.log", key.replace('/', "_"))),
    }
}

/// Writes this process's id to `path` (as QEMU's `-pidfile`), replacing what was there.
pub fn write_pidfile(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::write(path, format!("{}\n", std::process::id()))
}
