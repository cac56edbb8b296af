//! Read-only NBD exports on a unix socket: backup tools (`qemu-img convert`, `nbdcopy`) read an
//! [`Image`] through them. The handshake is fixed newstyle with the options clients use to find
//! the one unnamed export; the `nbd` crate serves the transmission phase.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What an [`Export`] serves: `size` bytes, read by every client's thread.
pub trait Image: Clone + Send + 'static {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

/// An [`Image`] as the NBD server reads it: a read-only file.
struct ImageFile<I> {
    image: I,
    pos: u64,
}

impl<I: Image> Read for ImageFile<I> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.image.size().saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        self.image.read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<I> Write for ImageFile<I> {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "the export is read-only"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<I: Image> Seek for ImageFile<I> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let size = self.image.size() as i128;
        let at = match to {
            SeekFrom::Start(o) => o as i128,
            SeekFrom::End(d) => size + d as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if !(0..=size).contains(&at) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek outside the disk"));
        }
        self.pos = at as u64;
        Ok(self.pos)
    }
}

const NBD_OPT_EXPORT_NAME: u32 = 1;
const NBD_OPT_ABORT: u32 = 2;
const NBD_OPT_LIST: u32 = 3;
const NBD_OPT_INFO: u32 = 6;
const NBD_OPT_GO: u32 = 7;
const NBD_REP_ACK: u32 = 1;
const NBD_REP_SERVER: u32 = 2;
const NBD_REP_INFO: u32 = 3;
const NBD_REP_ERR_UNSUP: u32 = 0x8000_0001;
const NBD_INFO_EXPORT: u16 = 0;
/// Transmission flags: flags are meaningful; the export is read-only.
const TRANSMISSION_FLAGS: u16 = 1 | 2;
const NBD_FLAG_NO_ZEROES: u32 = 2;

/// The fixed-newstyle handshake for the one (unnamed) export of `size` bytes, with the options
/// clients use to find it (`GO`/`INFO`, `LIST`, the old `EXPORT_NAME`); any other option gets
/// "unsupported" (so simple replies, no structured ones). `Ok(true)` once the client goes to
/// transmission, `Ok(false)` if it aborted.
fn handshake(c: &mut (impl Read + Write), size: u64) -> std::io::Result<bool> {
    c.write_all(b"NBDMAGICIHAVEOPT")?;
    c.write_all(&(1u16 | 2).to_be_bytes())?;
    let mut b4 = [0u8; 4];
    c.read_exact(&mut b4)?;
    let client_flags = u32::from_be_bytes(b4);
    let reply = |c: &mut dyn Write, opt: u32, kind: u32, data: &[u8]| -> std::io::Result<()> {
        let mut m = Vec::with_capacity(20 + data.len());
        m.extend_from_slice(&0x0003_e889_0455_65a9_u64.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        c.write_all(&m)
    };
    loop {
        let mut head = [0u8; 16];
        c.read_exact(&mut head)?;
        if &head[..8] != b"IHAVEOPT" {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "bad option magic"));
        }
        let opt = u32::from_be_bytes(head[8..12].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap_or_default());
        if len > 64 << 10 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "option too long"));
        }
        let mut data = vec![0u8; len as usize];
        c.read_exact(&mut data)?;
        match opt {
            NBD_OPT_EXPORT_NAME => {
                c.write_all(&size.to_be_bytes())?;
                c.write_all(&TRANSMISSION_FLAGS.to_be_bytes())?;
                if client_flags & NBD_FLAG_NO_ZEROES == 0 {
                    c.write_all(&[0u8; 124])?;
                }
                return Ok(true);
            }
            NBD_OPT_ABORT => {
                reply(c, opt, NBD_REP_ACK, &[])?;
                return Ok(false);
            }
            NBD_OPT_LIST => {
                reply(c, opt, NBD_REP_SERVER, &0u32.to_be_bytes())?;
                reply(c, opt, NBD_REP_ACK, &[])?;
            }
            NBD_OPT_INFO | NBD_OPT_GO => {
                let mut info = NBD_INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                reply(c, opt, NBD_REP_INFO, &info)?;
                reply(c, opt, NBD_REP_ACK, &[])?;
                if opt == NBD_OPT_GO {
                    return Ok(true);
                }
            }
            _ => reply(c, opt, NBD_REP_ERR_UNSUP, &[])?,
        }
    }
}

/// One client's connection: the handshake, then its requests until it disconnects (what each
/// client's thread runs; public for the fuzz targets in `smp-ft/fuzz`).
#[doc(hidden)]
pub fn serve_client<I: Image>(c: &mut (impl Read + Write), image: I) -> std::io::Result<()> {
    if handshake(c, image.size())? {
        nbd::server::transmission(c, ImageFile { image, pos: 0 })?;
    }
    Ok(())
}

/// An image served read-only over NBD on a unix socket, one thread per client, until dropped.
pub struct Export {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Export {
    /// Serves `image` at `path` (replacing a stale socket there).
    pub fn serve<I: Image>(image: I, path: &Path) -> std::io::Result<Export> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new().name("nbd-export".into()).spawn(move || {
            confine::enter(confine::Kind::Storage);
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let image = image.clone();
                let _ = std::thread::Builder::new().name("nbd-client".into()).spawn(move || {
                    if let Err(e) = serve_client(&mut &conn, image) {
                        tracing::debug!("NBD export client: {e}");
                    }
                });
            }
        })?;
        Ok(Export { path: path.to_path_buf(), stop, thread: Some(thread) })
    }

    /// The NBD URI backup tools open it with.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.path.display())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct Bytes(Arc<Vec<u8>>);

    impl Image for Bytes {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn the_export_serves_the_image_over_nbd_until_dropped() {
        let d = tempfile::tempdir().unwrap();
        let image = Bytes(Arc::new((0..128u32 << 10).map(|i| i as u8).collect()));
        let export = Export::serve(image.clone(), &d.path().join("e.sock")).unwrap();
        assert!(export.uri().starts_with("nbd+unix:///?socket="));
        let mut c = std::os::unix::net::UnixStream::connect(export.path()).unwrap();
        let info = nbd::client::handshake(&mut c, b"").unwrap();
        assert_eq!(info.size, 128 << 10);
        assert!(info.readonly);
        let mut client = nbd::client::NbdClient::new(&mut c, &info);
        let mut b = [0u8; 64];
        client.seek(SeekFrom::Start(1000)).unwrap();
        client.read_exact(&mut b).unwrap();
        assert_eq!(&b[..], &image.0[1000..1064]);
        drop(c);
        drop(export);
        assert!(!d.path().join("e.sock").exists());
    }
}
