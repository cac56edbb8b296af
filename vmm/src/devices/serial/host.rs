//! COM1's host side, claimed ahead of use: a unix socket bound but not yet listening, an
//! output file, or a pseudo-terminal.

use super::spec::{SerialError, SerialSpec};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A pseudo-terminal in raw mode: smpft holds the master and keeps the slave open itself, so
/// the master never reports a hang-up when no console is attached.
pub struct Pty {
    pub(super) master: std::os::fd::OwnedFd,
    _slave: std::os::fd::OwnedFd,
    path: PathBuf,
}

impl Pty {
    fn open() -> std::io::Result<Pty> {
        use std::os::fd::FromRawFd;
        let (mut m, mut sl) = (0, 0);
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: openpty writes two descriptors and a NUL-terminated name of at most 128 bytes
        // (glibc uses ptsname_r into the buffer, which is large enough for /dev/pts/N).
        let r = unsafe { libc::openpty(&mut m, &mut sl, name.as_mut_ptr(), std::ptr::null(), std::ptr::null()) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nothing else.
        let (master, slave) = unsafe { (std::os::fd::OwnedFd::from_raw_fd(m), std::os::fd::OwnedFd::from_raw_fd(sl)) };
        // SAFETY: `name` was NUL-terminated by openpty.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
        // SAFETY: termios calls on the slave we own; `t` is fully written by tcgetattr first.
        unsafe {
            let mut t = std::mem::zeroed::<libc::termios>();
            if libc::tcgetattr(slave.as_raw_fd(), &mut t) == 0 {
                libc::cfmakeraw(&mut t);
                libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t);
            }
            let fl = libc::fcntl(master.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(master.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        Ok(Pty { master, _slave: slave, path: PathBuf::from(path) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes what the terminal takes now and drops the rest (nobody is reading).
    pub(super) fn write(&self, bytes: &[u8]) -> usize {
        // SAFETY: write reads `bytes` only.
        let n = unsafe { libc::write(self.master.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        n.max(0) as usize
    }

    pub(super) fn read(&self, buf: &mut [u8]) -> usize {
        // SAFETY: read writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(self.master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        n.max(0) as usize
    }
}

/// A unix socket bound at a path but not listening: connections are refused until
/// the VM runs. Removes its path when dropped unless it was started.
pub(super) struct BoundSocket {
    socket: Option<socket2::Socket>,
    path: PathBuf,
    /// Device and inode of the socket file we bound, to tell it from a file put there since.
    id: (u64, u64),
}

impl BoundSocket {
    fn bind(path: &Path) -> Result<BoundSocket, SerialError> {
        let err = |source| SerialError::Listen { path: path.to_path_buf(), source };
        // A stale socket from an earlier run would make bind fail; only remove sockets.
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(path);
        }
        let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).map_err(err)?;
        socket.bind(&socket2::SockAddr::unix(path).map_err(err)?).map_err(err)?;
        let m = std::fs::symlink_metadata(path).map_err(err)?;
        Ok(BoundSocket { socket: Some(socket), path: path.to_path_buf(), id: (m.dev(), m.ino()) })
    }

    fn is_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.id)
    }

    pub(super) fn listen(mut self) -> Result<(UnixListener, PathBuf), SerialError> {
        let socket = self.socket.take().expect("a bound socket is listened on once");
        let path = std::mem::take(&mut self.path);
        socket.listen(128).map_err(|source| SerialError::Listen { path: path.clone(), source })?;
        Ok((socket.into(), path))
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if self.socket.is_some() && self.is_ours() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub(super) enum Reserved {
    Stdio,
    Null,
    File(std::fs::File),
    Unix(BoundSocket),
    Pty(Arc<Pty>),
}

/// COM1's host side, claimed ahead of use: a unix socket is bound (connections are refused
/// until the VM runs), an output file is open. A standby holds one from its start, so that it
/// never accepts protection it could not honour, and [`SerialHost::check`]s it again before it
/// claims the tie-breaker.
/// The log file, if any, is opened (created) as well.
pub struct SerialHost(pub(super) Reserved, pub(super) Option<std::fs::File>);

impl SerialHost {
    pub fn reserve(spec: &SerialSpec, log: Option<&super::SerialLog>) -> Result<SerialHost, SerialError> {
        let log =
            log.map(|l| l.open().map_err(|source| SerialError::Log { what: l.describe(), source })).transpose()?;
        let reserved = match spec {
            SerialSpec::Stdio => Reserved::Stdio,
            SerialSpec::Null => Reserved::Null,
            SerialSpec::File(path) => Reserved::File(
                std::fs::File::create(path).map_err(|source| SerialError::File { path: path.clone(), source })?,
            ),
            SerialSpec::Unix(path) => Reserved::Unix(BoundSocket::bind(path)?),
            SerialSpec::Pty => Reserved::Pty(Arc::new(Pty::open().map_err(SerialError::Pty)?)),
        };
        Ok(SerialHost(reserved, log))
    }

    /// The pseudo-terminal reserved, for `SerialSpec::Pty`.
    pub fn pty_path(&self) -> Option<&Path> {
        match &self.0 {
            Reserved::Pty(p) => Some(p.path()),
            _ => None,
        }
    }

    /// Verifies the reservation still holds: a socket whose file was removed or replaced is
    /// bound again at its path, and if that fails the VM cannot go live with it.
    pub fn check(&mut self) -> Result<(), SerialError> {
        if let Reserved::Unix(b) = &mut self.0 {
            if !b.is_ours() {
                tracing::warn!(path = %b.path.display(), "serial socket file is gone; binding it again");
                *b = BoundSocket::bind(&b.path.clone())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;

    #[test]
    fn a_pty_passes_bytes_both_ways_raw_and_drops_what_nobody_reads() {
        let p = Pty::open().unwrap();
        assert!(p.path().starts_with("/dev/pts"), "{}", p.path().display());
        let mut console = std::fs::OpenOptions::new().read(true).write(true).open(p.path()).unwrap();
        assert_eq!(p.write(b"a\nb"), 3);
        let mut got = [0u8; 3];
        console.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"a\nb", "raw: no CR added");
        console.write_all(b"INCR 1\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut buf = [0u8; 16];
        let n = p.read(&mut buf);
        assert_eq!(&buf[..n], b"INCR 1\n", "raw: no echo, no line editing");
        drop(console);
        let big = vec![b'x'; 1 << 20];
        assert!(p.write(&big) < big.len(), "a full terminal takes no more; the write does not block");
    }
}
