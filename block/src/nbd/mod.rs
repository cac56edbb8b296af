//! Disks served by an NBD server (`nbd://`, `nbd+unix://`): every format and store such a server
//! offers (qcow2 and VMDK through `qemu-nbd`, anything through `nbdkit`) becomes a disk.
//!
//! The client is smpft's own (the `nbd` crate's client negotiates with NBD_OPT_EXPORT_NAME only
//! and sends one request at a time): [`handshake`] negotiates structured replies and the export
//! with NBD_OPT_GO, learning its size, transmission flags and block sizes (NBD_OPT_EXPORT_NAME
//! for an old server); [`wire`] keeps up to [`IN_FLIGHT`] requests in flight.
//!
//! What the export says is honoured: requests are aligned to its minimum block size (a write
//! that is not becomes a read-modify-write of the blocks at its ends) and split at its maximum;
//! NBD_CMD_WRITE_ZEROES and NBD_CMD_TRIM are sent when offered (zeroes are written otherwise);
//! NBD_CMD_FLUSH only to an export with a write cache; a read-only export refuses writes. No
//! request carries NBD_CMD_FLAG_FUA: smpft's disks have no forced-unit-access write (virtio-blk
//! flushes instead).

mod handshake;
mod wire;

pub use handshake::Export;
pub use wire::IN_FLIGHT;

/// The client's readers of what a server sends (its handshake, its replies), for the fuzz
/// targets in `smp-ft/fuzz`.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::handshake::negotiate;
    pub use super::wire::{Conn, Failure, Request};
}

use crate::backend::{Backend, BackendError};
use crate::spec::Location;
use handshake::{READ_ONLY, SEND_FLUSH, SEND_TRIM, SEND_WRITE_ZEROES};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::Mutex;
use wire::{Conn, Failure, Request};

trait Stream: Read + Write + Send {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>>;
}

impl Stream for std::net::TcpStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl Stream for std::os::unix::net::UnixStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
}

/// The most one read or write request moves.
const MAX_IO: u32 = 1 << 20;

type Link = Conn<BufReader<Box<dyn Stream>>, BufWriter<Box<dyn Stream>>>;

pub struct Nbd {
    /// `None` once the connection failed (its replies can no longer be matched).
    conn: Mutex<Option<Link>>,
    what: String,
    export: Export,
    readonly: bool,
    /// The export itself is read-only (not only the disk as configured).
    export_readonly: bool,
}

/// What is done to a range without data.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Blank {
    /// Zeroes; the server must keep the range allocated.
    Zeroes,
    /// Zeroes; the server may free the range.
    ZeroesMayUnmap,
}

impl Nbd {
    /// Connects to the export `location` names (TCP or unix socket) and negotiates it.
    pub fn connect(location: &Location, readonly: bool) -> Result<Nbd, BackendError> {
        let (what, export): (String, &str) = match location {
            Location::NbdTcp { host, port, export } => (format!("nbd://{host}:{port}/{export}"), export),
            Location::NbdUnix { socket, export } => {
                (format!("nbd+unix:///{export}?socket={}", socket.display()), export)
            }
            Location::Path(p) => return Err(BackendError::NotADisk { path: p.clone() }),
        };
        let err = |source| BackendError::Open { path: PathBuf::from(&what), source };
        let mut stream: Box<dyn Stream> = match location {
            Location::NbdTcp { host, port, .. } => {
                let s = std::net::TcpStream::connect((host.as_str(), *port)).map_err(err)?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Location::NbdUnix { socket, .. } => Box::new(std::os::unix::net::UnixStream::connect(socket).map_err(err)?),
            Location::Path(_) => return Err(BackendError::NotADisk { path: PathBuf::from(&what) }),
        };
        let info = handshake::negotiate(&mut stream, export).map_err(err)?;
        tracing::debug!(
            "{what}: {} bytes, flags {:#x}, blocks {}/{}/{}, {} replies{}",
            info.size,
            info.flags,
            info.min_block,
            info.preferred_block,
            info.max_block,
            if info.structured { "structured" } else { "simple" },
            if info.go { "" } else { " (NBD_OPT_EXPORT_NAME)" }
        );
        let rx = BufReader::with_capacity(256 << 10, stream.try_clone_box().map_err(err)?);
        let tx = BufWriter::with_capacity(256 << 10, stream);
        let export_readonly = info.has(READ_ONLY);
        Ok(Nbd {
            conn: Mutex::new(Some(Conn { tx, rx, structured: info.structured })),
            what,
            readonly: readonly || export_readonly,
            export_readonly,
            export: info,
        })
    }

    /// What the handshake learnt of the export.
    pub fn export(&self) -> &Export {
        &self.export
    }

    fn check(&self, what: &'static str, offset: u64, len: u64, write: bool) -> Result<(), BackendError> {
        if write && self.export_readonly {
            let source = std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{} is exported read-only by its server", self.what),
            );
            return Err(BackendError::Io { what, offset, len, source });
        }
        crate::backend::check_access(what, offset, len, write, self.export.size, self.readonly)
    }

    /// Runs `f` on the connection. A connection that broke is not used again: later requests
    /// fail at once, with the first cause, and the breakage is logged once.
    fn with_conn(
        &self,
        what: &'static str,
        at: (u64, u64),
        f: impl FnOnce(&mut Link) -> Result<(), (Failure, (u64, u64))>,
    ) -> Result<(), BackendError> {
        let mut g = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let Some(conn) = g.as_mut() else {
            let source = std::io::Error::new(std::io::ErrorKind::NotConnected, format!("{} failed before", self.what));
            return Err(BackendError::Io { what, offset: at.0, len: at.1, source });
        };
        f(conn).map_err(|(failure, (offset, len))| {
            let source = match failure {
                Failure::Request(_, e) => e,
                Failure::Broken(_, e) => {
                    *g = None;
                    tracing::error!("{}: {e}; the connection is closed and the disk's later requests fail", self.what);
                    e
                }
            };
            BackendError::Io { what, offset, len, source }
        })
    }

    /// Runs a batch; on failure says which request (`what` at its offset) failed.
    fn run(&self, what: &'static str, reqs: &mut [Request<'_>]) -> Result<(), BackendError> {
        let at = reqs.first().map(Request::place).unwrap_or_default();
        self.with_conn(what, at, |c| run_on(c, reqs))
    }

    /// The minimum block size as a u64.
    fn align(&self) -> u64 {
        u64::from(self.export.min_block.max(1))
    }

    /// The most one read or write moves: the export's maximum, at most [`MAX_IO`], a multiple of
    /// its minimum block size.
    fn max_io(&self) -> usize {
        let a = self.export.min_block.max(1);
        let m = self.export.max_block.min(MAX_IO).max(a);
        (m - m % a) as usize
    }

    /// The most one trim or write-zeroes request names.
    fn max_blank(&self) -> u64 {
        let a = self.align();
        let m = u64::from(self.export.max_block).max(a);
        m - m % a
    }

    /// Reads `buf` at `offset` (aligned, or ending at the end of the export) in pipelined pieces.
    fn read_whole(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        let max = self.max_io();
        let mut reqs: Vec<Request<'_>> = buf
            .chunks_mut(max)
            .enumerate()
            .map(|(i, b)| Request::Read { offset: offset + (i * max) as u64, buf: b })
            .collect();
        self.run("read", &mut reqs)
    }

    fn aligned(&self, offset: u64, len: u64) -> bool {
        offset % self.align() == 0 && len % self.align() == 0
    }

    /// Writes several ranges with their requests in flight together.
    pub fn write_many(&self, writes: &[(u64, &[u8])]) -> Result<(), BackendError> {
        for &(offset, data) in writes {
            self.check("write", offset, data.len() as u64, true)?;
        }
        if !writes.iter().all(|&(o, d)| self.aligned(o, d.len() as u64)) {
            return writes.iter().try_for_each(|&(o, d)| self.patch("write", o, Some(d), d.len() as u64));
        }
        let max = self.max_io();
        let mut reqs: Vec<Request<'_>> = writes
            .iter()
            .flat_map(|&(offset, data)| {
                data.chunks(max)
                    .enumerate()
                    .map(move |(i, d)| Request::Write { offset: offset + (i * max) as u64, data: d })
            })
            .collect();
        self.run("write", &mut reqs)
    }

    /// Writes `data` (or zeroes) at a range that is not aligned to the export's minimum block
    /// size: the blocks at its ends are read, patched and written back whole, under the lock (so
    /// no other request of this client comes between).
    fn patch(&self, what: &'static str, offset: u64, data: Option<&[u8]>, len: u64) -> Result<(), BackendError> {
        let a = self.align();
        let start = offset - offset % a;
        let end = (offset + len).div_ceil(a).saturating_mul(a).min(self.export.size);
        if len == 0 {
            return Ok(());
        }
        let mut buf = vec![0u8; (end - start) as usize];
        let max = self.max_io();
        self.with_conn(what, (offset, len), |c| {
            let a = a as usize;
            if buf.len() <= 2 * a {
                run_on(c, &mut [Request::Read { offset: start, buf: &mut buf }])?;
            } else {
                // The first block, and the last one if the range ends inside it.
                let tail = ((offset + len) / a as u64 * a as u64 - start) as usize;
                let (head, rest) = buf.split_at_mut(a);
                let mut reads = vec![Request::Read { offset: start, buf: head }];
                if tail < a + rest.len() {
                    reads.push(Request::Read { offset: start + tail as u64, buf: &mut rest[tail - a..] });
                }
                run_on(c, &mut reads)?;
            }
            let at = (offset - start) as usize;
            match data {
                Some(d) => buf[at..at + d.len()].copy_from_slice(d),
                None => buf[at..at + len as usize].fill(0),
            }
            let mut writes: Vec<Request<'_>> = buf
                .chunks(max)
                .enumerate()
                .map(|(i, d)| Request::Write { offset: start + (i * max) as u64, data: d })
                .collect();
            run_on(c, &mut writes)
        })
    }

    /// Zeroes a range (or, with `trim`, trims it first): NBD_CMD_WRITE_ZEROES where the export
    /// has it, written zeroes otherwise; the unaligned ends by [`Nbd::patch`].
    fn blank(&self, what: &'static str, offset: u64, len: u64, how: Blank, trim: bool) -> Result<(), BackendError> {
        self.check(what, offset, len, true)?;
        let a = self.align();
        let (start, end) = (offset.div_ceil(a) * a, (offset + len) / a * a);
        if start >= end {
            return self.patch(what, offset, None, len);
        }
        if start > offset {
            self.patch(what, offset, None, start - offset)?;
        }
        if end < offset + len {
            self.patch(what, end, None, offset + len - end)?;
        }
        let pieces = || {
            let max = self.max_blank().min(u64::from(u32::MAX) / a * a);
            (start..end).step_by(max as usize).map(move |o| (o, (end - o).min(max) as u32))
        };
        if trim {
            // Its own batch, answered before the zeroes go out: in flight together, the server
            // could run them in either order, and a trim after the zeroes leaves the contents
            // undefined.
            let mut trims: Vec<Request<'_>> = pieces().map(|(offset, len)| Request::Trim { offset, len }).collect();
            self.run(what, &mut trims)?;
        }
        if !self.export.has(SEND_WRITE_ZEROES) {
            return crate::backend::write_zeroes_by_writing(self, start, end - start);
        }
        let no_hole = how == Blank::Zeroes;
        let mut zeroes: Vec<Request<'_>> =
            pieces().map(|(offset, len)| Request::WriteZeroes { offset, len, no_hole }).collect();
        self.run(what, &mut zeroes)
    }
}

/// Runs a batch on a connection, saying which request's range failed.
fn run_on(c: &mut Link, reqs: &mut [Request<'_>]) -> Result<(), (Failure, (u64, u64))> {
    c.run(reqs).map_err(|f| {
        let (Failure::Request(i, _) | Failure::Broken(i, _)) = &f;
        let at = reqs.get(*i).map(Request::place).unwrap_or_default();
        (f, at)
    })
}

impl Backend for Nbd {
    fn size(&self) -> u64 {
        self.export.size
    }

    fn readonly(&self) -> bool {
        self.readonly
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        self.check("read", offset, buf.len() as u64, false)?;
        if !self.aligned(offset, buf.len() as u64) {
            let a = self.align();
            let start = offset - offset % a;
            let end = (offset + buf.len() as u64).div_ceil(a).saturating_mul(a).min(self.export.size);
            let mut whole = vec![0u8; (end - start) as usize];
            self.read_whole(&mut whole, start)?;
            let at = (offset - start) as usize;
            buf.copy_from_slice(&whole[at..at + buf.len()]);
            return Ok(());
        }
        self.read_whole(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), BackendError> {
        self.write_many(&[(offset, data)])
    }

    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Result<(), BackendError> {
        self.write_many(writes)
    }

    fn flush(&self) -> Result<(), BackendError> {
        if !self.export.has(SEND_FLUSH) {
            // An export without a write cache has every completed write on stable storage.
            return Ok(());
        }
        self.run("flush", &mut [Request::Flush])
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.blank("write-zeroes", offset, len, Blank::Zeroes, false)
    }

    fn write_zeroes_may_unmap(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.blank("write-zeroes", offset, len, Blank::ZeroesMayUnmap, false)
    }

    /// NBD_CMD_TRIM leaves the range's contents to the server, and a disk's copies must stay
    /// identical: the trim (which lets the server free the range) is followed by zeroes the
    /// server may leave unallocated. An export without NBD_CMD_WRITE_ZEROES gets written zeroes
    /// and no trim (its zeroes would undo the trim).
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        let trim = self.export.has(SEND_TRIM) && self.export.has(SEND_WRITE_ZEROES);
        self.blank("discard", offset, len, Blank::ZeroesMayUnmap, trim)
    }
}

#[cfg(test)]
mod servers;
#[cfg(test)]
mod tests;
