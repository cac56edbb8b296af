//! COM1's I/O threads: one drains the output queue to the host side, one feeds host input into
//! the UART's FIFO as it has room.

use super::host::{Pty, Reserved, SerialHost};
use super::spec::SerialError;
use super::uart::{OutputQueue, SerialDevice};
use parking_lot::Mutex;
use shutdown::{Shutdown, WriteEnd};
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The host side of COM1: its I/O threads, stopped and joined by [`SerialBackend::stop`].
pub struct SerialBackend {
    stop: Shutdown,
    output: Arc<OutputQueue>,
    threads: Vec<JoinHandle<()>>,
    socket: Option<PathBuf>,
    pty: Option<Arc<Pty>>,
}

enum Source {
    Stdin,
    Listener(UnixListener),
    Pty(Arc<Pty>),
    Nothing,
}

enum Target {
    Stdout,
    File(std::fs::File),
    Client(Arc<Mutex<Option<UnixStream>>>),
    Pty(Arc<Pty>),
    Discard,
}

impl SerialBackend {
    /// Connects `device` to the host side `host` reserved; `on_input` runs whenever input
    /// reached the guest.
    pub fn start(
        host: SerialHost,
        device: Arc<SerialDevice>,
        on_input: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<Self, SerialError> {
        let client: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
        let mut socket = None;
        let mut pty = None;
        let (source, target) = match host.0 {
            Reserved::Stdio => (Source::Stdin, Target::Stdout),
            Reserved::Null => (Source::Nothing, Target::Discard),
            Reserved::File(f) => (Source::Nothing, Target::File(f)),
            Reserved::Pty(p) => {
                tracing::info!("serial: COM1 is the pseudo-terminal {}", p.path().display());
                pty = Some(p.clone());
                (Source::Pty(p.clone()), Target::Pty(p))
            }
            Reserved::Unix(bound) => {
                let (l, path) = bound.listen()?;
                socket = Some(path);
                (Source::Listener(l), Target::Client(client.clone()))
            }
        };
        let stop = Shutdown::new().map_err(SerialError::Event)?;
        let output = device.output().clone();
        if let Some(log) = host.1 {
            output.set_log(log);
        }
        let mut threads = Vec::new();
        let q = output.clone();
        let out_stop = stop.clone();
        threads.push(
            std::thread::Builder::new()
                .name("serial-out".into())
                .spawn(move || {
                    confine::enter(confine::Kind::Device);
                    output_loop(&q, target, &out_stop)
                })
                .expect("spawn serial-out thread"),
        );
        if !matches!(source, Source::Nothing) {
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("serial-in".into())
                    .spawn(move || {
                        confine::enter(confine::Kind::Device);
                        input_loop(&device, source, &client, &stop, &*on_input)
                    })
                    .expect("spawn serial-in thread"),
            );
        }
        Ok(SerialBackend { stop, output, threads, socket, pty })
    }

    /// The pseudo-terminal COM1 is connected to, for `SerialSpec::Pty`.
    pub fn pty_path(&self) -> Option<&Path> {
        self.pty.as_deref().map(Pty::path)
    }

    /// Writes out what the guest has produced (a reader gets [`DRAIN_GRACE`] to take it),
    /// then stops and joins the I/O threads.
    pub fn stop(mut self) {
        self.output.close();
        self.stop.fire();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(path) = self.socket.take() {
            let _ = std::fs::remove_file(path);
        }
        let dropped = self.output.dropped();
        if dropped > 0 {
            tracing::warn!("serial: {dropped} output bytes were dropped because the reader did not keep up");
        }
    }
}

/// How long a reader gets to take the guest's last output once the VM stops.
pub const DRAIN_GRACE: Duration = Duration::from_secs(1);

fn output_loop(q: &OutputQueue, mut target: Target, stop: &Shutdown) {
    while let Some(bytes) = q.take() {
        // The client's stream is duplicated so that a new client replacing it meanwhile cannot
        // close the descriptor under this write.
        let client = match &target {
            Target::Client(c) => c.lock().as_ref().and_then(|s| s.try_clone().ok()),
            _ => None,
        };
        if let Target::Pty(p) = &target {
            p.write(&bytes);
            continue;
        }
        let fd = match &target {
            Target::Stdout => Some(libc::STDOUT_FILENO),
            Target::File(f) => Some(f.as_raw_fd()),
            // No client: like a serial line with nothing plugged in.
            Target::Client(_) => client.as_ref().map(|s| s.as_raw_fd()),
            Target::Discard | Target::Pty(_) => None,
        };
        let Some(fd) = fd else { continue };
        match shutdown::write_all(fd, &bytes, stop, DRAIN_GRACE) {
            Ok(()) => {}
            Err(WriteEnd::Failed(e)) if matches!(target, Target::Client(_)) => {
                tracing::info!("serial: client went away ({e})");
                if let Target::Client(c) = &target {
                    *c.lock() = None;
                }
            }
            Err(WriteEnd::Failed(e)) => tracing::warn!("serial: output lost: {e}"),
            Err(WriteEnd::Abandoned(n)) => {
                tracing::warn!("serial: {n} output bytes were not taken by the reader before the VM stopped");
                target = Target::Discard;
            }
        }
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd { fd, events: libc::POLLIN, revents: 0 }
}

fn input_loop(
    device: &SerialDevice,
    source: Source,
    client: &Mutex<Option<UnixStream>>,
    stop: &Shutdown,
    on_input: &(dyn Fn() + Send + Sync),
) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 4096];
    let mut reader: Option<UnixStream> = None;
    let mut stdin_open = matches!(source, Source::Stdin);
    let stdin = std::io::stdin();
    loop {
        let mut fds = vec![pollfd(stop.fd()), pollfd(device.room_event().as_raw_fd())];
        let listener_at = if let Source::Listener(l) = &source {
            fds.push(pollfd(l.as_raw_fd()));
            Some(fds.len() - 1)
        } else {
            None
        };
        let mut input_at = None;
        if pending.is_empty() {
            if let Some(r) = &reader {
                fds.push(pollfd(r.as_raw_fd()));
                input_at = Some(fds.len() - 1);
            } else if let Source::Pty(p) = &source {
                fds.push(pollfd(p.master.as_raw_fd()));
                input_at = Some(fds.len() - 1);
            } else if stdin_open {
                fds.push(pollfd(stdin.as_raw_fd()));
                input_at = Some(fds.len() - 1);
            }
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds that outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("serial: poll failed: {e}");
            return;
        }
        let ready = |i: usize| fds[i].revents != 0;
        if ready(0) {
            return;
        }
        if ready(1) {
            let _ = device.room_event().read();
        }
        if let (Some(i), Source::Listener(l)) = (listener_at, &source) {
            if ready(i) {
                if let Ok((s, _)) = l.accept() {
                    if reader.is_some() {
                        tracing::info!("serial: new client replaces the previous one");
                    }
                    // Input the old client sent but the guest has not taken is the old client's.
                    pending.clear();
                    *client.lock() = s.try_clone().ok();
                    reader = Some(s);
                }
            }
        }
        if let (true, Source::Pty(p)) = (input_at.is_some_and(ready), &source) {
            let n = p.read(&mut buf);
            pending.extend_from_slice(&buf[..n]);
        } else if input_at.is_some_and(ready) {
            let r = match &mut reader {
                Some(s) => s.read(&mut buf),
                None => stdin.lock().read(&mut buf),
            };
            match r {
                Ok(0) | Err(_) => {
                    if reader.take().is_some() {
                        *client.lock() = None;
                        tracing::debug!("serial: client disconnected");
                    } else {
                        stdin_open = false;
                    }
                }
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        }
        if !pending.is_empty() {
            let n = device.enqueue(&pending);
            if n > 0 {
                pending.drain(..n);
                on_input();
            }
        }
    }
}
