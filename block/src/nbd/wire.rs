//! The transmission phase of one connection: requests framed whole and up to [`IN_FLIGHT`] of
//! them sent before their replies are read (matched by cookie, in whatever order the server
//! answers), simple replies or, where negotiated, structured replies in chunks.
//!
//! A reply that carries an error fails its request only; the connection goes on. A reply that
//! breaks the protocol (unknown cookie, a chunk outside its request or over another, an
//! over-long error message, a read not covered) or a connection that ends makes the connection
//! unusable.

use std::collections::BTreeMap;
use std::io::{Error, ErrorKind, Read, Write};

/// Requests sent before their replies are read.
pub const IN_FLIGHT: usize = 16;

const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_MAGIC: u32 = 0x668e_33ef;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_ERROR: u16 = (1 << 15) + 1;
pub const CHUNK_ERROR_OFFSET: u16 = (1 << 15) + 2;
/// The longest error message the protocol allows.
const MAX_MESSAGE: usize = 4096;

/// One request of a batch.
pub enum Request<'a> {
    Read {
        offset: u64,
        buf: &'a mut [u8],
    },
    Write {
        offset: u64,
        data: &'a [u8],
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
    },
    /// `no_hole`: the server must not deallocate the range.
    WriteZeroes {
        offset: u64,
        len: u32,
        no_hole: bool,
    },
}

impl Request<'_> {
    /// Command, flags, offset, length.
    fn header(&self) -> (u16, u16, u64, u32) {
        match self {
            Request::Read { offset, buf } => (CMD_READ, 0, *offset, buf.len() as u32),
            Request::Write { offset, data } => (CMD_WRITE, 0, *offset, data.len() as u32),
            Request::Flush => (CMD_FLUSH, 0, 0, 0),
            Request::Trim { offset, len } => (CMD_TRIM, 0, *offset, *len),
            Request::WriteZeroes { offset, len, no_hole } => {
                (CMD_WRITE_ZEROES, if *no_hole { CMD_FLAG_NO_HOLE } else { 0 }, *offset, *len)
            }
        }
    }

    /// The byte range the request names.
    pub fn place(&self) -> (u64, u64) {
        let (_, _, offset, len) = self.header();
        (offset, u64::from(len))
    }
}

/// Why a batch failed.
#[derive(Debug)]
pub enum Failure {
    /// Request `index` failed (the server said so); the connection is fine.
    Request(usize, Error),
    /// The connection is unusable (it ended, or the server broke the protocol) while request
    /// `index` was due.
    Broken(usize, Error),
}

fn protocol(what: String) -> Error {
    Error::new(ErrorKind::InvalidData, format!("NBD protocol error: {what}"))
}

/// An NBD error value as an I/O error (the protocol's values are Linux's errno values).
pub fn nbd_errno(value: u32) -> Error {
    match value {
        1 | 5 | 12 | 22 | 28 | 75 | 95 | 108 => Error::from_raw_os_error(value as i32),
        _ => Error::from_raw_os_error(libc::EIO),
    }
}

/// Where one request stands while its replies come in.
#[derive(Default)]
struct Due {
    done: bool,
    /// Bytes of a read the chunks covered.
    covered: u64,
    /// The ranges of a read the chunks covered (start → end), which may not overlap: otherwise
    /// two chunks for the same bytes would count as covering bytes no chunk sent.
    chunks: BTreeMap<u64, u64>,
    error: Option<Error>,
}

impl Due {
    /// Notes that a chunk covered `n` bytes at `offset`; an error if an earlier chunk covered
    /// any of them.
    fn cover(&mut self, offset: u64, n: u64) -> std::io::Result<()> {
        let end = offset + n;
        let before = self.chunks.range(..end).next_back();
        if let Some((&start, &stop)) = before.filter(|(_, &stop)| stop > offset) {
            return Err(protocol(format!(
                "a chunk at {offset:#x}+{n:#x} overlaps another at {start:#x}+{:#x}",
                stop - start
            )));
        }
        self.chunks.insert(offset, end);
        self.covered += n;
        Ok(())
    }
}

pub struct Conn<R, W> {
    pub tx: W,
    pub rx: R,
    pub structured: bool,
}

impl<R: Read, W: Write> Conn<R, W> {
    /// Runs `reqs`, [`IN_FLIGHT`] at a time; returns the first failure.
    pub fn run(&mut self, reqs: &mut [Request<'_>]) -> Result<(), Failure> {
        let mut base = 0;
        let mut first: Option<Failure> = None;
        for window in reqs.chunks_mut(IN_FLIGHT) {
            for (i, r) in window.iter().enumerate() {
                self.send(r, (base + i) as u64).map_err(|e| Failure::Broken(base + i, e))?;
            }
            self.tx.flush().map_err(|e| Failure::Broken(base, e))?;
            let mut due: Vec<Due> = window.iter().map(|_| Due::default()).collect();
            while let Some(waiting) = due.iter().position(|d| !d.done) {
                self.reply(window, base, &mut due).map_err(|e| Failure::Broken(base + waiting, e))?;
            }
            for (i, d) in due.into_iter().enumerate() {
                if let (Some(e), None) = (d.error, &first) {
                    first = Some(Failure::Request(base + i, e));
                }
            }
            base += window.len();
        }
        first.map_or(Ok(()), Err)
    }

    fn send(&mut self, r: &Request<'_>, cookie: u64) -> std::io::Result<()> {
        let (cmd, flags, offset, len) = r.header();
        let mut h = [0u8; 28];
        h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&cmd.to_be_bytes());
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        self.tx.write_all(&h)?;
        if let Request::Write { data, .. } = r {
            self.tx.write_all(data)?;
        }
        Ok(())
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        self.rx.read_exact(buf).map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => Error::new(ErrorKind::UnexpectedEof, "the server closed the connection"),
            _ => e,
        })
    }

    /// The request of the window `cookie` names, if it is still due.
    fn find(cookie: u64, base: usize, due: &[Due]) -> std::io::Result<usize> {
        let i = cookie.wrapping_sub(base as u64) as usize;
        if i >= due.len() || due[i].done {
            return Err(protocol(format!("a reply with cookie {cookie}, which no request in flight has")));
        }
        Ok(i)
    }

    /// Reads one reply (simple) or one chunk (structured).
    fn reply(&mut self, window: &mut [Request<'_>], base: usize, due: &mut [Due]) -> std::io::Result<()> {
        let mut magic = [0u8; 4];
        self.read_exact(&mut magic)?;
        match u32::from_be_bytes(magic) {
            SIMPLE_MAGIC => self.simple(window, base, due),
            STRUCTURED_MAGIC if self.structured => self.chunk(window, base, due),
            STRUCTURED_MAGIC => Err(protocol("a structured reply, which was not negotiated".into())),
            m => Err(protocol(format!("reply magic {m:#x}"))),
        }
    }

    fn simple(&mut self, window: &mut [Request<'_>], base: usize, due: &mut [Due]) -> std::io::Result<()> {
        let mut h = [0u8; 12];
        self.read_exact(&mut h)?;
        let error = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap_or_default());
        let i = Self::find(cookie, base, due)?;
        due[i].done = true;
        if error != 0 {
            due[i].error = Some(nbd_errno(error));
            return Ok(());
        }
        if let Request::Read { buf, .. } = &mut window[i] {
            if self.structured {
                return Err(protocol("a simple reply with data to a read, with structured replies negotiated".into()));
            }
            self.read_exact(buf)?;
        }
        Ok(())
    }

    fn chunk(&mut self, window: &mut [Request<'_>], base: usize, due: &mut [Due]) -> std::io::Result<()> {
        let mut h = [0u8; 16];
        self.read_exact(&mut h)?;
        let flags = u16::from_be_bytes([h[0], h[1]]);
        let kind = u16::from_be_bytes([h[2], h[3]]);
        let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap_or_default());
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]) as usize;
        let i = Self::find(cookie, base, due)?;
        let (start, size) = window[i].place();
        let within = |offset: u64, n: u64| offset >= start && offset.checked_add(n).is_some_and(|e| e <= start + size);
        let beyond = |offset: u64, n: u64| {
            protocol(format!("a chunk at {offset:#x}+{n:#x}, beyond its request at {start:#x}+{size:#x}"))
        };
        match (kind, &mut window[i]) {
            (CHUNK_NONE, _) if len != 0 || flags & REPLY_FLAG_DONE == 0 => {
                return Err(protocol(format!("an NBD_REPLY_TYPE_NONE chunk of {len} bytes, flags {flags:#x}")))
            }
            (CHUNK_NONE, _) => {}
            (CHUNK_OFFSET_DATA, Request::Read { buf, .. }) => {
                if len <= 8 || len - 8 > buf.len() {
                    return Err(protocol(format!(
                        "an NBD_REPLY_TYPE_OFFSET_DATA chunk of {len} bytes for a {size}-byte read"
                    )));
                }
                let mut o = [0u8; 8];
                self.read_exact(&mut o)?;
                let (offset, n) = (u64::from_be_bytes(o), (len - 8) as u64);
                if !within(offset, n) {
                    return Err(beyond(offset, n));
                }
                due[i].cover(offset, n)?;
                let at = (offset - start) as usize;
                self.read_exact(&mut buf[at..at + n as usize])?;
            }
            (CHUNK_OFFSET_HOLE, Request::Read { buf, .. }) => {
                if len != 12 {
                    return Err(protocol(format!("an NBD_REPLY_TYPE_OFFSET_HOLE chunk of {len} bytes")));
                }
                let mut o = [0u8; 12];
                self.read_exact(&mut o)?;
                let offset = u64::from_be_bytes(o[..8].try_into().unwrap_or_default());
                let n = u64::from(u32::from_be_bytes([o[8], o[9], o[10], o[11]]));
                if n == 0 || !within(offset, n) {
                    return Err(beyond(offset, n));
                }
                due[i].cover(offset, n)?;
                let at = (offset - start) as usize;
                buf[at..at + n as usize].fill(0);
            }
            (k, _) if k & (1 << 15) != 0 => {
                let e = self.error_chunk(k, len, |o| within(o, 1))?;
                due[i].error.get_or_insert(e);
            }
            (k, _) => return Err(protocol(format!("a chunk of type {k} to a request that cannot have one"))),
        }
        if flags & REPLY_FLAG_DONE != 0 {
            due[i].done = true;
            let covered = due[i].covered;
            if matches!(window[i], Request::Read { .. }) && due[i].error.is_none() && covered != size {
                return Err(protocol(format!("a read of {size:#x} bytes at {start:#x} ended with {covered:#x} bytes")));
            }
        }
        Ok(())
    }

    /// An error chunk's payload: the error value, the server's message and (NBD_REPLY_TYPE_ERROR_OFFSET)
    /// the offset, which `inside` checks against the request.
    fn error_chunk(&mut self, kind: u16, len: usize, inside: impl Fn(u64) -> bool) -> std::io::Result<Error> {
        if !(6..=6 + MAX_MESSAGE + 8).contains(&len) {
            return Err(protocol(format!("an error chunk of {len} bytes")));
        }
        let mut b = vec![0u8; len];
        self.read_exact(&mut b)?;
        let value = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let mlen = usize::from(u16::from_be_bytes([b[4], b[5]]));
        let rest = len - 6;
        if mlen > MAX_MESSAGE || mlen > rest {
            return Err(protocol(format!("an error message of {mlen} bytes in a {len}-byte chunk")));
        }
        if kind == CHUNK_ERROR_OFFSET {
            if rest != mlen + 8 {
                return Err(protocol(format!(
                    "an NBD_REPLY_TYPE_ERROR_OFFSET chunk of {len} bytes with a {mlen}-byte message"
                )));
            }
            let offset = u64::from_be_bytes(b[6 + mlen..].try_into().unwrap_or_default());
            if !inside(offset) {
                return Err(protocol(format!("an error at {offset:#x}, outside its request")));
            }
        } else if kind == CHUNK_ERROR && rest != mlen {
            return Err(protocol(format!("an NBD_REPLY_TYPE_ERROR chunk of {len} bytes with a {mlen}-byte message")));
        }
        let errno = nbd_errno(if value == 0 { libc::EIO as u32 } else { value });
        let message = String::from_utf8_lossy(&b[6..6 + mlen]).trim().to_string();
        if message.is_empty() {
            return Ok(errno);
        }
        Ok(Error::new(errno.kind(), format!("{errno}; the server says: {message}")))
    }
}
