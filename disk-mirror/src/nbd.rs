//! Disks served by an NBD server (`nbd://`, `nbd+unix://`): every format and store such a server
//! offers (qcow2 and VMDK through `qemu-nbd`, anything through `nbdkit`) becomes a disk.
//!
//! This first client is the `nbd` crate's: fixed-newstyle handshake, one request at a time,
//! simple replies; write-zeroes is sent as zeroes. The mirror's fast path (many requests in
//! flight, structured replies, NBD_CMD_WRITE_ZEROES) needs a client of its own, which comes with
//! it.

use crate::backend::{write_zeroes_by_writing, Backend, BackendError};
use crate::spec::Location;
use nbd::client::{handshake, NbdClient};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Mutex;

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// The most one request moves.
const MAX_IO: usize = 1 << 20;

pub struct Nbd {
    client: Mutex<NbdClient<Box<dyn Stream>>>,
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
            Location::Path(_) => unreachable!("refused above"),
        };
        let info = handshake(&mut stream, export.as_bytes()).map_err(err)?;
        let client = NbdClient::new(stream, &info);
        Ok(Nbd {
            client: Mutex::new(client),
            size: info.size,
            readonly: readonly || info.readonly,
            can_flush: info.send_flush,
        })
    }

    fn check(&self, what: &'static str, offset: u64, len: u64, write: bool) -> Result<(), BackendError> {
        if write && self.readonly {
            return Err(BackendError::ReadOnly);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BackendError::OutOfRange { what, offset, len, size: self.size }),
        }
    }
}

fn io(what: &'static str, offset: u64, len: usize) -> impl FnOnce(std::io::Error) -> BackendError {
    move |source| BackendError::Io { what, offset, len: len as u64, source }
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
        let mut c = self.client.lock().unwrap_or_else(|e| e.into_inner());
        for (i, chunk) in buf.chunks_mut(MAX_IO).enumerate() {
            let at = offset + (i * MAX_IO) as u64;
            c.seek(SeekFrom::Start(at)).and_then(|_| c.read_exact(chunk)).map_err(io("read", at, chunk.len()))?;
        }
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), BackendError> {
        self.check("write", offset, data.len() as u64, true)?;
        let mut c = self.client.lock().unwrap_or_else(|e| e.into_inner());
        for (i, chunk) in data.chunks(MAX_IO).enumerate() {
            let at = offset + (i * MAX_IO) as u64;
            c.seek(SeekFrom::Start(at)).and_then(|_| c.write_all(chunk)).map_err(io("write", at, chunk.len()))?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        if !self.can_flush {
            // A server that does not offer flush writes through.
            return Ok(());
        }
        let mut c = self.client.lock().unwrap_or_else(|e| e.into_inner());
        c.flush().map_err(io("flush", 0, 0))
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
