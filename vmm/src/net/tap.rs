//! A Linux tap interface (`/dev/net/tun`, IFF_TAP): Ethernet frames in and out, non-blocking.
//!
//! By name, the interface must already exist (made by the operator or libvirt, and attached to
//! a bridge): smpft attaches to it and never creates one, so a typo cannot give the VM a NIC on
//! no network. By descriptor, the tap was opened by whoever started smpft; if it was opened
//! with IFF_VNET_HDR, each frame carries that header, which smpft strips and fills with zeroes
//! (no offloads are offered to the guest).

use super::spec::{TapSource, IFNAME_MAX};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNGETVNETHDRSZ: libc::c_ulong = 0x8004_54d7;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Largest frame read from the tap (no GSO is negotiated: 1514 bytes plus a VLAN tag is the
/// most a frame carries; the slack keeps oversized frames recognisable rather than cut).
pub const FRAME_MAX: usize = 1522;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new() -> IfReq {
        IfReq { name: [0; 16], flags: 0, _pad: [0; 22] }
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "there is no network interface '{0}': create the tap first (ip tuntap add {0} mode tap) and attach it to a bridge"
    )]
    Missing(String),
    #[error("network interface '{0}' is not a tap")]
    NotTap(String),
    #[error("tap '{0}' is in use by another process")]
    Busy(String),
    #[error("cannot open /dev/net/tun")]
    Tun(#[source] io::Error),
    #[error("cannot attach to tap '{name}'")]
    Attach { name: String, source: io::Error },
    #[error("tap-fd={fd} is not an open tap descriptor")]
    BadFd { fd: RawFd, source: io::Error },
    #[error("tap-fd={fd} is a tun (IP) device, not a tap (Ethernet)")]
    FdNotTap { fd: RawFd },
}

/// An open tap.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    /// Bytes of virtio-net header on each frame (0 without IFF_VNET_HDR).
    vnet_hdr: usize,
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor this process owns; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Tap {
    pub fn open(source: &TapSource) -> Result<Tap, TapError> {
        match source {
            TapSource::Name(name) => Tap::attach(name),
            TapSource::Fd(fd) => Tap::adopt(*fd),
        }
    }

    fn attach(name: &str) -> Result<Tap, TapError> {
        let sys = std::path::Path::new("/sys/class/net").join(name);
        if !sys.exists() {
            return Err(TapError::Missing(name.into()));
        }
        if !sys.join("tun_flags").exists() {
            return Err(TapError::NotTap(name.into()));
        }
        Ok(Tap { fd: Tap::set_iff(name)?, name: name.into(), vnet_hdr: 0 })
    }

    /// Opens the tap `name`, creating it if it does not exist (as QEMU's `-netdev
    /// tap,ifname=NAME` does): a tap created here goes away when the descriptor is closed.
    pub fn create(name: &str) -> Result<OwnedFd, TapError> {
        Tap::set_iff(name)
    }

    /// A descriptor on the tap `name` (non-blocking, without packet information).
    fn set_iff(name: &str) -> Result<OwnedFd, TapError> {
        // SAFETY: a plain open of a device node; the result is checked.
        let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(TapError::Tun(io::Error::last_os_error()));
        }
        // SAFETY: `raw` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq::new();
        req.name[..name.len().min(IFNAME_MAX)].copy_from_slice(&name.as_bytes()[..name.len().min(IFNAME_MAX)]);
        req.flags = IFF_TAP | IFF_NO_PI;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is laid out as.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name.into()),
                Some(libc::EINVAL) => TapError::NotTap(name.into()),
                _ => TapError::Attach { name: name.into(), source: e },
            });
        }
        Ok(fd)
    }

    fn adopt(fd: RawFd) -> Result<Tap, TapError> {
        let mut req = IfReq::new();
        // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`; a descriptor that is not a
        // tun device makes it fail, which is checked.
        if unsafe { libc::ioctl(fd, TUNGETIFF, &mut req) } < 0 {
            return Err(TapError::BadFd { fd, source: io::Error::last_os_error() });
        }
        if req.flags & IFF_TAP == 0 {
            return Err(TapError::FdNotTap { fd });
        }
        let mut vnet_hdr = 0;
        if req.flags & IFF_VNET_HDR != 0 {
            let mut size: libc::c_int = 0;
            // SAFETY: TUNGETVNETHDRSZ writes one int.
            if unsafe { libc::ioctl(fd, TUNGETVNETHDRSZ, &mut size) } < 0 {
                return Err(TapError::BadFd { fd, source: io::Error::last_os_error() });
            }
            vnet_hdr = size.max(0) as usize;
        }
        set_nonblocking(fd).map_err(|source| TapError::BadFd { fd, source })?;
        // SAFETY: the descriptor was handed to this process for the VM's use (tap-fd=N); from
        // here the tap owns it and closes it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Tap { fd, name: req.name(), vnet_hdr })
    }

    /// A stand-in for unit tests and fuzz targets: any descriptor that keeps message boundaries
    /// (one end of a SOCK_SEQPACKET pair) behaves as a tap does.
    #[doc(hidden)]
    pub fn from_fd(fd: OwnedFd, name: &str) -> Tap {
        set_nonblocking(fd.as_raw_fd()).expect("non-blocking test descriptor");
        Tap { fd, name: name.into(), vnet_hdr: 0 }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Whether the tap is still there (its interface may have been deleted under it).
    pub fn check(&self) -> Result<(), TapError> {
        let mut req = IfReq::new();
        // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNGETIFF, &mut req) } < 0 {
            return Err(TapError::Attach { name: self.name.clone(), source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Reads one frame into `buf` (at least [`FRAME_MAX`] bytes); `None` when none is waiting.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut hdr = [0u8; 16];
        let mut iov = [
            libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: self.vnet_hdr.min(hdr.len()) },
            libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() },
        ];
        // SAFETY: both iovecs point into buffers this function owns or borrows mutably, with
        // their lengths.
        let n = unsafe { libc::readv(self.fd.as_raw_fd(), iov.as_mut_ptr(), 2) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some((n as usize).saturating_sub(iov[0].iov_len)))
    }

    /// Writes one frame; false if the tap's queue is full (the frame is dropped, as a full NIC
    /// queue would).
    pub fn write(&self, frame: &[u8]) -> io::Result<bool> {
        let hdr = [0u8; 16];
        let iov = [
            libc::iovec { iov_base: hdr.as_ptr() as *mut _, iov_len: self.vnet_hdr.min(hdr.len()) },
            libc::iovec { iov_base: frame.as_ptr() as *mut _, iov_len: frame.len() },
        ];
        // SAFETY: writev only reads the two buffers, which live for the call.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(false),
                _ => Err(e),
            };
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_interface_or_a_bad_descriptor_is_a_clear_error() {
        let e = Tap::open(&TapSource::Name("smpft-nosuch0".into())).unwrap_err();
        assert!(e.to_string().contains("no network interface 'smpft-nosuch0'"), "{e}");
        let e = Tap::open(&TapSource::Name("lo".into())).unwrap_err();
        assert!(matches!(e, TapError::NotTap(_)), "{e}");
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = Tap::open(&TapSource::Fd(f.as_raw_fd())).unwrap_err();
        assert!(e.to_string().contains("is not an open tap descriptor"), "{e}");
    }
}
