//! How smpft's threads stop.
//!
//! Every thread that can block on something outside the process (a socket, a pipe, a client that
//! never reads, a reply that never comes) blocks on that *and* on a [`Shutdown`]:
//! - in `poll(2)`, through [`Shutdown::fd`], which becomes readable when the shutdown fires and
//!   stays readable;
//! - in `crossbeam_channel::select!`, through [`Shutdown::channel`], which disconnects when it
//!   fires;
//! - in writes, through [`write_all`], which waits for the fd to take the bytes or the shutdown
//!   to fire, and after it fires gives the reader a bounded grace to drain what is left.
//!
//! So whatever ends the VM (guest exit, `quit`, a signal, a lost tie-breaker, an error), the owner
//! fires the shutdown and every thread it then joins has already returned or is about to: no
//! join waits on a peer.

mod workers;
pub use workers::Workers;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A one-shot, level-triggered stop signal, cheap to clone and to poll.
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

struct Inner {
    fired: AtomicBool,
    /// Notified once when the shutdown fires and never cleared, so it stays readable.
    wake: Wake,
    /// Dropped when the shutdown fires, which disconnects `rx`.
    tx: Mutex<Option<Sender<()>>>,
    rx: Receiver<()>,
}

impl Shutdown {
    pub fn new() -> io::Result<Shutdown> {
        let wake = Wake::new()?;
        let (tx, rx) = crossbeam_channel::bounded(0);
        Ok(Shutdown { inner: Arc::new(Inner { fired: AtomicBool::new(false), wake, tx: Mutex::new(Some(tx)), rx }) })
    }

    /// Fires the shutdown (again is harmless): every waiter wakes and every later wait returns.
    pub fn fire(&self) {
        if self.inner.fired.swap(true, Ordering::SeqCst) {
            return;
        }
        self.inner.wake.notify();
        self.inner.tx.lock().take();
    }

    pub fn is_fired(&self) -> bool {
        self.inner.fired.load(Ordering::SeqCst)
    }

    /// Readable (`POLLIN`) once the shutdown has fired. Poll it; never read it.
    pub fn fd(&self) -> RawFd {
        self.inner.wake.fd()
    }

    /// Disconnected once the shutdown has fired: `recv(shutdown.channel())` in a `select!`
    /// returns then. Nothing is ever sent on it.
    pub fn channel(&self) -> &Receiver<()> {
        &self.inner.rx
    }

    /// Blocks until the shutdown fires or `timeout` passes; true if it fired.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let _ = self.inner.rx.recv_timeout(timeout);
        self.is_fired()
    }
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown").field("fired", &self.is_fired()).finish()
    }
}

/// A wakeup for one thread that polls: [`Wake::notify`] makes [`Wake::fd`] readable until the
/// thread calls [`Wake::clear`].
pub struct Wake {
    fd: OwnedFd,
}

impl Wake {
    pub fn new() -> io::Result<Wake> {
        // SAFETY: eventfd(2) has no memory arguments; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(Wake { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    pub fn notify(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to the eventfd this value owns.
        unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    pub fn clear(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live buffer from the eventfd this value owns.
        unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Polls `fds` (retrying on `EINTR`) for at most `timeout` (`None`: no limit); returns how many
/// are ready.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let ms = match deadline {
            None => -1,
            Some(d) => d.saturating_duration_since(Instant::now()).as_millis().min(i32::MAX as u128) as i32,
        };
        // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// What a write that [`write_all`] could not finish ran into.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteEnd {
    /// The reader did not take the rest within the grace after the shutdown fired; that many
    /// bytes were not written.
    Abandoned(usize),
    /// The fd failed (the peer went away, for instance).
    Failed(io::ErrorKind),
}

/// The largest write made at once: a pipe that polls writable takes at least this much without
/// blocking, so even a blocking fd never blocks here.
const CHUNK: usize = 4096;

/// Writes all of `buf` to `fd` (a socket, pipe, terminal or file, blocking or not) without ever
/// blocking past a fired `shutdown` by more than `grace`: it waits for the fd to be writable and
/// writes at most [`CHUNK`] bytes at a time (sockets with `MSG_DONTWAIT`).
pub fn write_all(fd: RawFd, mut buf: &[u8], shutdown: &Shutdown, grace: Duration) -> Result<(), WriteEnd> {
    let mut deadline: Option<Instant> = None;
    let is_socket = is_socket(fd);
    while !buf.is_empty() {
        if deadline.is_none() && shutdown.is_fired() {
            deadline = Some(Instant::now() + grace);
        }
        let mut fds = [
            libc::pollfd { fd, events: libc::POLLOUT, revents: 0 },
            libc::pollfd { fd: shutdown.fd(), events: libc::POLLIN, revents: 0 },
        ];
        let (watched, timeout) = match deadline {
            None => (2, None),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(WriteEnd::Abandoned(buf.len()));
                }
                (1, Some(left))
            }
        };
        poll(&mut fds[..watched], timeout).map_err(|e| WriteEnd::Failed(e.kind()))?;
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 && fds[0].revents & libc::POLLOUT == 0
        {
            return Err(WriteEnd::Failed(io::ErrorKind::BrokenPipe));
        }
        if fds[0].revents & libc::POLLOUT == 0 {
            continue;
        }
        let len = buf.len().min(CHUNK);
        let n = if is_socket {
            // SAFETY: sends `len` bytes from the live slice `buf`.
            unsafe { libc::send(fd, buf.as_ptr().cast(), len, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) }
        } else {
            // SAFETY: writes `len` bytes from the live slice `buf`.
            unsafe { libc::write(fd, buf.as_ptr().cast(), len) }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => continue,
                k => return Err(WriteEnd::Failed(k)),
            }
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

fn is_socket(fd: RawFd) -> bool {
    // SAFETY: fstat(2) fills the zeroed stat buffer we own.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn fire_wakes_poll_select_and_waiters() {
        let s = Shutdown::new().unwrap();
        assert!(!s.wait_timeout(Duration::from_millis(1)));
        let mut fds = [libc::pollfd { fd: s.fd(), events: libc::POLLIN, revents: 0 }];
        assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 0);
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait_timeout(Duration::from_secs(60)));
        s.fire();
        s.fire();
        assert!(t.join().unwrap());
        assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 1, "the fd stays readable");
        assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 1);
        crossbeam_channel::select! {
            recv(s.channel()) -> r => assert!(r.is_err()),
            default(Duration::from_secs(5)) => panic!("the channel did not disconnect"),
        }
    }

    #[test]
    fn write_to_a_reader_that_never_reads_gives_up_after_the_grace() {
        let (a, _b) = UnixStream::pair().unwrap();
        let s = Shutdown::new().unwrap();
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            let big = vec![7u8; 16 << 20];
            write_all(a.as_raw_fd(), &big, &s2, Duration::from_millis(50))
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "the write waits while the reader is slow");
        s.fire();
        match t.join().unwrap() {
            Err(WriteEnd::Abandoned(n)) => assert!(n > 0 && n < 16 << 20),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn write_reaches_a_reader_byte_for_byte_and_reports_a_gone_peer() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let s = Shutdown::new().unwrap();
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let expect = data.clone();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            got
        });
        write_all(a.as_raw_fd(), &data, &s, Duration::ZERO).unwrap();
        drop(a);
        assert_eq!(reader.join().unwrap(), expect);

        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        assert!(matches!(write_all(a.as_raw_fd(), b"x", &s, Duration::ZERO), Err(WriteEnd::Failed(_))));
    }

    #[test]
    fn pipes_never_block_past_the_grace() {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills the two-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both fds are new and owned here.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let s = Shutdown::new().unwrap();
        s.fire();
        let start = Instant::now();
        let r2 = write_all(w.as_raw_fd(), &vec![1u8; 1 << 20], &s, Duration::from_millis(20));
        assert!(matches!(r2, Err(WriteEnd::Abandoned(_))), "{r2:?}");
        assert!(start.elapsed() < Duration::from_secs(10));
        drop(r);
    }
}
