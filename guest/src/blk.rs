//! A virtio-blk disk (virtio 1.2 section 5.2), driven one request at a time through one queue:
//! what the `disk` and `db` workloads share. The caller owns the data buffers (device memory from
//! [`crate::dma`]) and holds a lock around each request.

use crate::abi::{virtio_pci_device_id, EXIT_DEVICE_FAILED, EXIT_NO_DEVICE, VIRTIO_PCI_VENDOR_ID, VIRTIO_TYPE_BLOCK};
use crate::virtio::{self, Buf, Device, Queue};
use crate::{dma, log};
use core::fmt;

const QUEUE_SIZE: u16 = 8;
pub const SECTOR: u64 = 512;
const F_FLUSH: u64 = 1 << 9;
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
/// How long a request may take (guest time).
const TIMEOUT_MS: u64 = 60_000;

/// A started virtio-blk, with its request header and status byte.
pub struct Blk {
    device: Device,
    queue: Queue,
    header: u64,
    status: u64,
    /// The disk's size in bytes.
    pub size: u64,
    /// VIRTIO_BLK_F_FLUSH was negotiated: `T_FLUSH` requests are allowed.
    pub flush: bool,
}

/// Why a request failed. The chain may still be in the device's hands after a timeout, so the
/// caller stops using the disk.
pub enum Failed {
    Submit(virtio::Error),
    Incomplete(virtio::Error),
    Status { head: u16, status: u8 },
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failed::Submit(e) => write!(f, "not submitted: {e}"),
            Failed::Incomplete(e) => write!(f, "did not complete: {e}"),
            Failed::Status { head, status } => write!(f, "completed as head {head} with status {status}"),
        }
    }
}

impl Blk {
    /// Finds and starts the first virtio-blk on bus 0; `who` prefixes the log lines.
    pub fn open(tsc_khz: u64, who: &str) -> Result<Blk, u32> {
        let Some(pci) = Device::find(VIRTIO_TYPE_BLOCK) else {
            log!(
                "{who}: no virtio-blk device (PCI ID {:04x}:{:04x}) on bus 0",
                VIRTIO_PCI_VENDOR_ID,
                virtio_pci_device_id(VIRTIO_TYPE_BLOCK)
            );
            return Err(EXIT_NO_DEVICE);
        };
        let failed = |e: virtio::Error| {
            log!("{who}: {pci}: {e}");
            EXIT_DEVICE_FAILED
        };
        let device = Device::new(pci, tsc_khz).map_err(failed)?;
        let features = device.negotiate(F_FLUSH).map_err(failed)?;
        let queue = device.setup_queue(0, QUEUE_SIZE).map_err(failed)?;
        device.driver_ok();
        device.check().map_err(failed)?;
        let sectors = device.read_config(|r| u64::from(r.read32(0)) | u64::from(r.read32(4)) << 32).unwrap_or(0);
        let oom = || failed(virtio::Error::OutOfMemory);
        let header = dma::alloc(16, 16).ok_or_else(oom)?;
        let status = dma::alloc(1, 1).ok_or_else(oom)?;
        let flush = features & F_FLUSH != 0;
        log!("{who}: {device}; flush={flush}");
        Ok(Blk { device, queue, header, status, size: sectors * SECTOR, flush })
    }

    /// Runs one request of `kind` at `sector` (`len` bytes at `data`; none for a flush) and waits
    /// for it.
    pub fn request(&mut self, kind: u32, sector: u64, data: u64, len: u32) -> Result<(), Failed> {
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        // SAFETY: the header and status bytes are device memory owned by this driver, and no
        // request is in flight (one at a time, under the caller's lock).
        unsafe {
            core::ptr::copy_nonoverlapping(hdr.as_ptr(), self.header as *mut u8, 16);
            (self.status as *mut u8).write_volatile(0xff);
        }
        let header = Buf { addr: self.header, len: 16, write: false };
        let status = Buf { addr: self.status, len: 1, write: true };
        let data = Buf { addr: data, len, write: kind == T_IN };
        let r = match kind {
            T_FLUSH => self.queue.submit(&[header, status]),
            _ => self.queue.submit(&[header, data, status]),
        };
        let head = r.map_err(Failed::Submit)?;
        self.queue.notify();
        let used = self.queue.poll_used(&self.device, TIMEOUT_MS).map_err(Failed::Incomplete)?;
        // SAFETY: the device returned the chain, so it no longer writes the status byte.
        let st = unsafe { (self.status as *const u8).read_volatile() };
        if used.head != head || st != 0 {
            return Err(Failed::Status { head: used.head, status: st });
        }
        Ok(())
    }
}
