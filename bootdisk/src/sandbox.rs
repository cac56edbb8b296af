//! Reading the disk in a child process: smpft runs itself again with [`SUBCOMMAND`]; the child
//! reads its limits, drops every privilege (user and group `nobody`, no capabilities, no new
//! privileges, no file descriptors but its two pipes, memory and CPU limits) and installs a
//! seccomp filter that lets it read its standard input, write its standard output and manage
//! its memory, nothing else. It asks the parent for the disk's blocks on its standard output
//! and gets them on its input; the parent reads them through the disk's own backend
//! (read-only), counts them, and kills the child when it overruns its time.
//!
//! Messages from the child: `R` offset:u64 len:u32 (a read), `K`/`I` len:u32 bytes (kernel or
//! initrd data), `M` len:u32 text (what was booted, `key=value` lines), `E` kind:u8 len:u32
//! text (an error). The parent answers an `R` with status:u8 (0: the bytes follow; 1: len:u32
//! and an error text). Integers are little-endian.

use crate::{BootError, Booted, Limits};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The hidden first argument that makes smpft the disk reader.
pub const SUBCOMMAND: &str = "__boot-disk-reader";
/// Largest read the child may ask for at once.
const MAX_READ: u32 = 1 << 20;
/// Largest message of metadata or error text.
const MAX_TEXT: u32 = 1 << 20;

mod child;
pub use child::main as child_main;

/// Reads what `disk` boots, in a sandboxed child of `exe` (the smpft binary).
pub fn read(exe: &std::path::Path, disk: &dyn block::Backend, limits: &Limits) -> Result<Booted, BootError> {
    let reader = |why: String| BootError::Reader(why);
    let mut child = Command::new(exe)
        .arg(SUBCOMMAND)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| reader(format!("cannot start {}: {e}", exe.display())))?;
    let deadline = Instant::now() + limits.time;
    let mut to = Timed { fd: child.stdin.take().expect("piped"), deadline, out: true };
    let mut from = Timed { fd: child.stdout.take().expect("piped"), deadline, out: false };
    let result = serve(&mut to, &mut from, disk, limits);
    drop((to, from));
    // The child is done or is ended now: never left running.
    let _ = child.kill();
    let status = child.wait().map_err(|e| reader(format!("cannot wait for it: {e}")))?;
    match result {
        Err(Served::Boot(e)) => Err(e),
        Err(Served::Pipe(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
            Err(BootError::Limit(format!("reading the disk took longer than {} s", limits.time.as_secs())))
        }
        Err(Served::Pipe(e)) => Err(reader(match std::os::unix::process::ExitStatusExt::signal(&status) {
            Some(sig) => format!("it was killed by signal {sig} ({e})"),
            None => format!("{e} ({status})"),
        })),
        Ok(b) => Ok(b),
    }
}

enum Served {
    Boot(BootError),
    Pipe(std::io::Error),
}

impl From<std::io::Error> for Served {
    fn from(e: std::io::Error) -> Served {
        Served::Pipe(e)
    }
}

fn serve(
    to: &mut Timed<impl AsRawFd + Write>,
    from: &mut Timed<impl AsRawFd + Read>,
    disk: &dyn block::Backend,
    limits: &Limits,
) -> Result<Booted, Served> {
    let limit = |why: String| Served::Boot(BootError::Limit(why));
    let mut header = disk.size().to_le_bytes().to_vec();
    for v in [
        limits.kernel,
        limits.initrd,
        limits.config,
        limits.entries as u64,
        limits.path_depth as u64,
        limits.total,
        limits.memory,
        limits.time.as_secs(),
    ] {
        header.extend_from_slice(&v.to_le_bytes());
    }
    to.write_all(&header)?;
    let (mut booted, mut read) = (Booted::default(), 0u64);
    loop {
        let tag = u8s::<1>(from)?[0];
        match tag {
            b'R' => {
                let offset = u64::from_le_bytes(u8s(from)?);
                let len = u32::from_le_bytes(u8s(from)?);
                read += u64::from(len);
                if len > MAX_READ || read > limits.total {
                    return Err(limit(format!(
                        "the reader asked for more than the {} bytes of the disk it may read",
                        limits.total
                    )));
                }
                let mut buf = vec![0; len as usize];
                match disk.read_at(&mut buf, offset) {
                    Ok(()) => {
                        to.write_all(&[0])?;
                        to.write_all(&buf)?;
                    }
                    Err(e) => {
                        let e = block::error_chain(&e);
                        to.write_all(&[1])?;
                        to.write_all(&(e.len() as u32).to_le_bytes())?;
                        to.write_all(e.as_bytes())?;
                    }
                }
            }
            b'K' | b'I' => {
                let (dst, max, what) = match tag {
                    b'K' => (&mut booted.kernel, limits.kernel, "kernel"),
                    _ => (&mut booted.initrd, limits.initrd + 64, "initrd"),
                };
                let len = u32::from_le_bytes(u8s(from)?);
                if dst.len() as u64 + u64::from(len) > max {
                    return Err(limit(format!("the {what} is larger than the {max} bytes smpft reads")));
                }
                let start = dst.len();
                dst.resize(start + len as usize, 0);
                from.read_exact(&mut dst[start..])?;
            }
            b'M' => {
                let meta = text(from)?;
                return Ok(with_meta(booted, &meta));
            }
            b'E' => {
                let kind = u8s::<1>(from)?[0];
                let why = text(from)?;
                return Err(Served::Boot(match kind {
                    0 => BootError::Disk(why),
                    1 => BootError::Invalid(why),
                    2 => BootError::Refused(why),
                    3 => BootError::NotFound(why),
                    4 => BootError::Limit(why),
                    _ => BootError::Reader(why),
                }));
            }
            t => return Err(Served::Boot(BootError::Reader(format!("it sent a message of unknown type {t}")))),
        }
    }
}

fn u8s<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn text(r: &mut impl Read) -> Result<String, Served> {
    let len = u32::from_le_bytes(u8s(r)?);
    if len > MAX_TEXT {
        return Err(Served::Boot(BootError::Reader(format!("it sent a message of {len} bytes"))));
    }
    let mut b = vec![0; len as usize];
    r.read_exact(&mut b)?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

/// The `key=value` lines of an `M` message, for a [`Booted`].
pub(crate) fn meta_text(b: &Booted) -> String {
    let clean = |s: &str| s.replace(['\n', '\r'], " ");
    let mut s = format!(
        "partition={}\nconfig={}\ntitle={}\nkernel={}\ncmdline={}\n",
        b.partition,
        clean(&b.config),
        clean(&b.title),
        clean(&b.kernel_path),
        clean(&b.cmdline)
    );
    for i in &b.initrd_paths {
        s.push_str(&format!("initrd={}\n", clean(i)));
    }
    s
}

fn with_meta(mut b: Booted, meta: &str) -> Booted {
    for line in meta.lines() {
        let (k, v) = line.split_once('=').unwrap_or((line, ""));
        match k {
            "partition" => b.partition = v.parse().unwrap_or(0),
            "config" => b.config = v.into(),
            "title" => b.title = v.into(),
            "kernel" => b.kernel_path = v.into(),
            "cmdline" => b.cmdline = v.into(),
            "initrd" => b.initrd_paths.push(v.into()),
            _ => {}
        }
    }
    b
}

/// A pipe end whose reads and writes fail with `TimedOut` after `deadline`.
struct Timed<F> {
    fd: F,
    deadline: Instant,
    out: bool,
}

impl<F: AsRawFd> Timed<F> {
    fn wait(&self) -> std::io::Result<()> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left == Duration::ZERO {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            let events = if self.out { libc::POLLOUT } else { libc::POLLIN };
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events, revents: 0 };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r > 0 {
                return Ok(());
            }
            if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
}

impl<F: AsRawFd + Read> Read for Timed<F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.wait()?;
        match self.fd.read(buf)? {
            0 => Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "it ended without an answer")),
            n => Ok(n),
        }
    }
}

impl<F: AsRawFd + Write> Write for Timed<F> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.wait()?;
        // POLLOUT promises room for PIPE_BUF bytes: a larger write could block past the deadline.
        self.fd.write(&buf[..buf.len().min(4096)])
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.fd.flush()
    }
}

/// Standard input and output as files (the child's pipes).
fn stdio() -> (std::fs::File, std::fs::File) {
    // SAFETY: descriptors 0 and 1 are the child's pipes, open for its whole life, and owned
    // from here on only by these two files.
    unsafe { (std::fs::File::from_raw_fd(0), std::fs::File::from_raw_fd(1)) }
}
