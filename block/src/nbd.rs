//! Disks served by an NBD server (`nbd://`, `nbd+unix://`): every format and store such a server
//! offers (qcow2 and VMDK through `qemu-nbd`, anything through `nbdkit`) becomes a disk.
//!
//! The `nbd` crate does the handshake (fixed newstyle, NBD_OPT_EXPORT_NAME). Its client sends one
//! request at a time, writes each 4-byte header field with a syscall of its own and reads replies
//! the same way, which leaves the link idle for a round trip per request; the transmission phase
//! here is smpft's own: requests are framed whole, up to [`IN_FLIGHT`] of them go out before the
//! replies are read (matched by handle, in whatever order the server sends them), so a large read
//! or a batch of writes keeps the server busy. Replies are simple replies (no structured replies
//! are negotiated); write-zeroes is sent as zeroes, as the handshake does not tell whether the
//! server has NBD_CMD_WRITE_ZEROES.

use crate::backend::{write_zeroes_by_writing, Backend, BackendError};
use crate::spec::Location;
use nbd::client::handshake;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::Mutex;

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

/// The most one request moves.
const MAX_IO: usize = 1 << 20;
/// Requests sent before their replies are read.
pub const IN_FLIGHT: usize = 16;

const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;

/// One request of a batch.
enum Request<'a> {
    Read { offset: u64, buf: &'a mut [u8] },
    Write { offset: u64, data: &'a [u8] },
    Flush,
}

/// The transmission phase of one connection.
struct Conn {
    tx: BufWriter<Box<dyn Stream>>,
    rx: BufReader<Box<dyn Stream>>,
}

impl Conn {
    /// Runs `reqs`, [`IN_FLIGHT`] at a time; returns the first failure (with the request's index).
    fn run(&mut self, reqs: &mut [Request<'_>]) -> Result<(), (usize, std::io::Error)> {
        let mut base = 0;
        for window in reqs.chunks_mut(IN_FLIGHT) {
            for (i, r) in window.iter().enumerate() {
                let (cmd, offset, len, data): (u16, u64, usize, &[u8]) = match r {
                    Request::Read { offset, buf } => (CMD_READ, *offset, buf.len(), &[]),
                    Request::Write { offset, data } => (CMD_WRITE, *offset, data.len(), data),
                    Request::Flush => (CMD_FLUSH, 0, 0, &[]),
                };
                let mut h = [0u8; 28];
                h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
                h[6..8].copy_from_slice(&cmd.to_be_bytes());
                h[8..16].copy_from_slice(&((base + i) as u64).to_be_bytes());
                h[16..24].copy_from_slice(&offset.to_be_bytes());
                h[24..28].copy_from_slice(&(len as u32).to_be_bytes());
                let sent = self.tx.write_all(&h).and_then(|()| self.tx.write_all(data));
                sent.map_err(|e| (base + i, e))?;
            }
            self.tx.flush().map_err(|e| (base, e))?;
            let mut done = vec![false; window.len()];
            for _ in 0..window.len() {
                let mut h = [0u8; 16];
                self.rx.read_exact(&mut h).map_err(|e| (base, e))?;
                let magic = u32::from_be_bytes(h[..4].try_into().unwrap_or_default());
                let error = u32::from_be_bytes(h[4..8].try_into().unwrap_or_default());
                let handle = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
                let i = handle.wrapping_sub(base as u64) as usize;
                if magic != REPLY_MAGIC || i >= window.len() || done[i] {
                    let why = format!("bad reply (magic {magic:#x}, handle {handle})");
                    return Err((base, std::io::Error::new(std::io::ErrorKind::InvalidData, why)));
                }
                done[i] = true;
                if error != 0 {
                    // Replies of the window are still due: the connection is given up.
                    return Err((base + i, std::io::Error::from_raw_os_error(error as i32)));
                }
                if let Request::Read { buf, .. } = &mut window[i] {
                    self.rx.read_exact(buf).map_err(|e| (base + i, e))?;
                }
            }
            base += window.len();
        }
        Ok(())
    }
}

pub struct Nbd {
    /// `None` once the connection failed mid-batch (its replies can no longer be matched).
    conn: Mutex<Option<Conn>>,
    what: String,
    size: u64,
    readonly: bool,
    can_flush: bool,
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
        let info = handshake(&mut stream, export.as_bytes()).map_err(err)?;
        let rx = BufReader::with_capacity(256 << 10, stream.try_clone_box().map_err(err)?);
        let tx = BufWriter::with_capacity(256 << 10, stream);
        Ok(Nbd {
            conn: Mutex::new(Some(Conn { tx, rx })),
            what,
            size: info.size,
            readonly: readonly || info.readonly,
            can_flush: info.send_flush,
        })
    }

    fn check(&self, what: &'static str, offset: u64, len: u64, write: bool) -> Result<(), BackendError> {
        crate::backend::check_access(what, offset, len, write, self.size, self.readonly)
    }

    /// Runs a batch; on failure says which request (`what` at its offset) failed. A connection
    /// that failed is not used again: later requests fail at once, with the first cause.
    fn run(&self, what: &'static str, reqs: &mut [Request<'_>]) -> Result<(), BackendError> {
        let place = |r: &Request<'_>| match r {
            Request::Read { offset, buf } => (*offset, buf.len() as u64),
            Request::Write { offset, data } => (*offset, data.len() as u64),
            Request::Flush => (0, 0),
        };
        let mut g = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let Some(conn) = g.as_mut() else {
            let (offset, len) = reqs.first().map(place).unwrap_or_default();
            let source = std::io::Error::new(std::io::ErrorKind::NotConnected, format!("{} failed before", self.what));
            return Err(BackendError::Io { what, offset, len, source });
        };
        conn.run(reqs).map_err(|(i, source)| {
            *g = None;
            let (offset, len) = reqs.get(i).map(place).unwrap_or_default();
            BackendError::Io { what, offset, len, source }
        })
    }

    /// Writes several ranges with their requests in flight together.
    pub fn write_many(&self, writes: &[(u64, &[u8])]) -> Result<(), BackendError> {
        for &(offset, data) in writes {
            self.check("write", offset, data.len() as u64, true)?;
        }
        let mut reqs: Vec<Request<'_>> = writes
            .iter()
            .flat_map(|&(offset, data)| {
                data.chunks(MAX_IO)
                    .enumerate()
                    .map(move |(i, d)| Request::Write { offset: offset + (i * MAX_IO) as u64, data: d })
            })
            .collect();
        self.run("write", &mut reqs)
    }
}

impl Backend for Nbd {
    fn size(&self) -> u64 {
        self.size
    }

    fn readonly(&self) -> bool {
        self.readonly
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        self.check("read", offset, buf.len() as u64, false)?;
        let mut reqs: Vec<Request<'_>> = buf
            .chunks_mut(MAX_IO)
            .enumerate()
            .map(|(i, b)| Request::Read { offset: offset + (i * MAX_IO) as u64, buf: b })
            .collect();
        self.run("read", &mut reqs)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), BackendError> {
        self.write_many(&[(offset, data)])
    }

    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Result<(), BackendError> {
        self.write_many(writes)
    }

    fn flush(&self) -> Result<(), BackendError> {
        if !self.can_flush {
            // A server that does not offer flush writes through.
            return Ok(());
        }
        self.run("flush", &mut [Request::Flush])
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.check("write-zeroes", offset, len, true)?;
        write_zeroes_by_writing(self, offset, len)
    }

    /// Sent as zeroes: NBD_CMD_TRIM leaves the range's contents to the server, and the
    /// primary's and the standby's disks must stay identical.
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.write_zeroes(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::RawFile;
    use std::process::{Child, Command};
    use std::time::{Duration, Instant};

    struct Server(Child);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn qemu(tool: &str) -> Command {
        assert!(
            Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success()),
            "{tool} is missing: install qemu-utils (scripts/setup does)"
        );
        Command::new(tool)
    }

    /// `qemu-nbd` serving `image` (of `format`) as export `vm1` on a unix socket in `dir`.
    fn serve(dir: &std::path::Path, image: &std::path::Path, format: &str) -> (Server, Location) {
        let socket = dir.join("nbd.sock");
        let child = qemu("qemu-nbd")
            .args(["--persistent", "--export-name", "vm1", "--format", format, "--socket"])
            .arg(&socket)
            .arg(image)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        (Server(child), Location::NbdUnix { socket, export: "vm1".into() })
    }

    fn apply_all(disk: &dyn Backend) {
        let pattern = |len: usize, seed: u8| -> Vec<u8> { (0..len).map(|i| (i as u8) ^ seed).collect() };
        disk.write_at(&pattern(65536, 1), 0).unwrap();
        disk.write_at(&pattern(3 << 20, 2), 512 * 1024).unwrap();
        disk.write_at(&pattern(4096, 3), (4 << 20) - 4096).unwrap();
        disk.write_zeroes(8192, 4096).unwrap();
        disk.discard(1 << 20, 65536).unwrap();
        disk.flush().unwrap();
        let mut back = vec![0u8; 65536];
        disk.read_at(&mut back, 0).unwrap();
        assert_eq!(&back[..8192], &pattern(65536, 1)[..8192]);
        assert!(back[8192..12288].iter().all(|&b| b == 0));
    }

    /// The same writes through qemu-nbd to a qcow2 image and through io_uring to a raw file:
    /// `qemu-img compare` finds the two images identical.
    #[test]
    fn a_qcow2_image_served_by_qemu_nbd_ends_up_identical_to_a_raw_file() {
        let dir = tempfile::tempdir().unwrap();
        let qcow2 = dir.path().join("disk.qcow2");
        let o = qemu("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&qcow2).arg("4M").output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (server, location) = serve(dir.path(), &qcow2, "qcow2");
        let disk = Nbd::connect(&location, false).unwrap();
        assert_eq!(disk.size(), 4 << 20);
        apply_all(&disk);
        assert!(matches!(disk.write_at(&[1], 4 << 20), Err(BackendError::OutOfRange { .. })));
        drop(disk);
        drop(server);

        let raw = dir.path().join("disk.raw");
        std::fs::File::create(&raw).unwrap().set_len(4 << 20).unwrap();
        apply_all(&RawFile::open(&raw, false).unwrap());
        let o = qemu("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw"]).arg(&qcow2).arg(&raw).output().unwrap();
        assert!(o.status.success(), "qemu-img compare: {}", String::from_utf8_lossy(&o.stdout));
    }

    /// Many writes in flight together, and a large read split into pipelined requests, against
    /// qemu-nbd: what is read back is what was written.
    #[test]
    fn pipelined_writes_and_reads_round_trip_through_qemu_nbd() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("d.raw");
        std::fs::File::create(&raw).unwrap().set_len(8 << 20).unwrap();
        let (_server, location) = serve(dir.path(), &raw, "raw");
        let disk = Nbd::connect(&location, false).unwrap();
        let data: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i + 1; 64 << 10]).collect();
        let writes: Vec<(u64, &[u8])> =
            data.iter().enumerate().map(|(i, d)| ((i as u64) * (128 << 10), &d[..])).collect();
        disk.write_batch(&writes).unwrap();
        disk.write_at(&vec![0xaa; 3 << 20], 5 << 20).unwrap();
        let mut back = vec![0u8; 8 << 20];
        disk.read_at(&mut back, 0).unwrap();
        for (i, d) in data.iter().enumerate() {
            let at = i * (128 << 10);
            assert_eq!(&back[at..at + d.len()], &d[..], "write {i}");
            assert!(back[at + d.len()..at + (128 << 10)].iter().all(|&b| b == 0));
        }
        assert!(back[5 << 20..].iter().all(|&b| b == 0xaa));
    }

    /// A server that negotiates, then answers the first request with `reply` (and closes).
    fn bad_server(dir: &std::path::Path, reply: Vec<u8>) -> Location {
        use std::os::unix::net::UnixListener;
        let socket = dir.join("bad.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            c.write_all(b"NBDMAGICIHAVEOPT\x00\x01").unwrap();
            let mut head = [0u8; 4 + 8 + 4 + 4];
            c.read_exact(&mut head).unwrap();
            let mut name = vec![0u8; u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize];
            c.read_exact(&mut name).unwrap();
            let mut info = (1u64 << 20).to_be_bytes().to_vec();
            info.extend_from_slice(&1u16.to_be_bytes()); // NBD_FLAG_HAS_FLAGS
            info.extend_from_slice(&[0u8; 124]);
            c.write_all(&info).unwrap();
            let mut req = [0u8; 28];
            c.read_exact(&mut req).unwrap();
            let _ = c.write_all(&reply);
        });
        Location::NbdUnix { socket, export: "vm1".into() }
    }

    #[test]
    fn corrupt_and_short_replies_are_errors_and_the_connection_is_given_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut wrong_magic = 0x1234_5678u32.to_be_bytes().to_vec();
        wrong_magic.extend_from_slice(&[0u8; 12]);
        let disk = Nbd::connect(&bad_server(dir.path(), wrong_magic), false).unwrap();
        let e = disk.read_at(&mut [0u8; 512], 0).unwrap_err();
        assert!(crate::error_chain(&e).contains("bad reply"), "{}", crate::error_chain(&e));
        let e = disk.read_at(&mut [0u8; 512], 0).unwrap_err();
        assert!(crate::error_chain(&e).contains("failed before"), "{}", crate::error_chain(&e));

        let dir = tempfile::tempdir().unwrap();
        let disk = Nbd::connect(&bad_server(dir.path(), REPLY_MAGIC.to_be_bytes().to_vec()), false).unwrap();
        let e = disk.read_at(&mut [0u8; 512], 0).unwrap_err();
        assert!(matches!(e, BackendError::Io { what: "read", .. }), "a short reply: {e:?}");

        let dir = tempfile::tempdir().unwrap();
        let mut eio = REPLY_MAGIC.to_be_bytes().to_vec();
        eio.extend_from_slice(&5u32.to_be_bytes());
        eio.extend_from_slice(&0u64.to_be_bytes());
        let disk = Nbd::connect(&bad_server(dir.path(), eio), false).unwrap();
        let e = disk.write_at(&[1u8; 512], 512).unwrap_err();
        assert!(crate::error_chain(&e).contains("Input/output error"), "{}", crate::error_chain(&e));
    }

    #[test]
    fn unreachable_servers_and_unknown_exports_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Location::NbdUnix { socket: dir.path().join("none.sock"), export: "vm1".into() };
        let e = Nbd::connect(&missing, false).err().expect("no server there");
        assert!(e.to_string().contains("none.sock"), "{e}");
        let raw = dir.path().join("d.raw");
        std::fs::File::create(&raw).unwrap().set_len(1 << 20).unwrap();
        let (_server, location) = serve(dir.path(), &raw, "raw");
        let Location::NbdUnix { socket, .. } = location else { unreachable!() };
        let wrong = Location::NbdUnix { socket, export: "nope".into() };
        assert!(Nbd::connect(&wrong, false).is_err(), "an export the server does not have");
        assert!(matches!(Nbd::connect(&Location::Path("/x".into()), false), Err(BackendError::NotADisk { .. })));
    }
}
