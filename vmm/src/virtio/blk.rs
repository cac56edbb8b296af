//! virtio-blk (device type 2): one request queue over a disk's [`Backend`]. Requests are
//! handled as the driver notifies, on the notifying vCPU's thread: read, write, flush, get-id,
//! discard and write-zeroes. A request the device cannot serve completes with an error status
//! (IOERR, or UNSUPP for unknown types); a chain that breaks the rules marks the device
//! NEEDS_RESET.
//!
//! The disk is reached through [`DiskIo`]: every request that changes the disk (or flushes it)
//! is reported, once complete, to the VM's [`DiskObserver`](crate::devices::DiskObserver), if
//! one is installed. While the observer holds the disks the device stops taking requests: they
//! wait in the queue, and the VM owner serves them ([`Blk::take_deferred`]) once the observer
//! lets go.

use super::disk::{Deferral, DiskIo};
use super::{serve_chains_while, VirtioDevice, VirtioError};
use crate::devices::observer::ObserverSlot;
use crate::memory::DeviceMemory;
use block::Backend;
use std::io::{Read, Write};
use std::sync::Arc;
use virtio_queue::Queue;

pub use super::disk::BlkStats;

pub const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// The most one request moves.
const MAX_REQUEST: u64 = 4 << 20;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// The device's configuration space (virtio 1.2 §5.2.4), as far as smpft fills it.
const CONFIG_LEN: usize = 60;

pub struct Blk {
    io: Arc<DiskIo>,
    deferral: Deferral,
    /// The serial number GET_ID returns (at most 20 bytes).
    id: Vec<u8>,
}

impl Blk {
    /// Disk number `index` of the VM, on `disk`, reporting its changes to the observer in
    /// `observer`.
    pub fn new(disk: Arc<dyn Backend>, index: u32, observer: Arc<ObserverSlot>, id: &str) -> Blk {
        let io = Arc::new(DiskIo::new(disk, index, id, observer.clone()));
        Blk { io, deferral: Deferral::new(observer), id: id.as_bytes().iter().copied().take(20).collect() }
    }

    /// The disk as the VM's devices share it.
    pub fn io(&self) -> &Arc<DiskIo> {
        &self.io
    }

    pub fn stats(&self) -> &BlkStats {
        self.io.stats()
    }

    /// The disk's storage.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        self.io.backend()
    }

    /// Whether requests were left waiting (and clears the mark): the caller serves the queue.
    pub fn take_deferred(&self) -> bool {
        self.deferral.take()
    }

    /// Asks for the queue to be served again (after a restore: requests the driver made
    /// available before the cut may have no notification coming).
    pub fn defer(&self) {
        self.deferral.set();
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |at: usize, v: &[u8]| c[at..at + v.len()].copy_from_slice(v);
        put(0, &(self.io.size() / SECTOR).to_le_bytes()); // capacity
        put(12, &((QUEUE_SIZE - 2) as u32).to_le_bytes()); // seg_max
        put(20, &(SECTOR as u32).to_le_bytes()); // blk_size
        put(34, &1u16.to_le_bytes()); // num_queues
        let max_sectors = (MAX_REQUEST / SECTOR) as u32;
        put(36, &max_sectors.to_le_bytes()); // max_discard_sectors
        put(40, &1u32.to_le_bytes()); // max_discard_seg
        put(44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(48, &max_sectors.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    /// Serves one request: the status to report and how many bytes went to the driver.
    fn serve(
        &self,
        kind: u32,
        sector: u64,
        body: &mut dyn Read,
        out: &mut dyn Write,
        lens: (usize, usize),
    ) -> (u8, u32) {
        let (body_len, out_len) = lens;
        let ro = self.io.readonly();
        let range = |len: u64| {
            let at = sector.checked_mul(SECTOR)?;
            (len % SECTOR == 0 && len <= MAX_REQUEST && at.checked_add(len)? <= self.io.size()).then_some(at)
        };
        let status = |r: Result<(), block::BackendError>| if r.is_ok() { S_OK } else { S_IOERR };
        match kind {
            T_IN => {
                let Some(at) = range(out_len as u64) else { return (S_IOERR, 0) };
                let mut buf = vec![0u8; out_len];
                match self.io.read(&mut buf, at) {
                    Ok(()) if out.write_all(&buf).is_ok() => (S_OK, out_len as u32),
                    _ => (S_IOERR, 0),
                }
            }
            T_OUT if ro => (S_IOERR, 0),
            T_OUT => {
                let mut data = Vec::with_capacity(body_len.min(MAX_REQUEST as usize + 1));
                if body.take(MAX_REQUEST + 1).read_to_end(&mut data).is_err() {
                    return (S_IOERR, 0);
                }
                let Some(at) = range(data.len() as u64) else { return (S_IOERR, 0) };
                (status(self.io.write(data, at)), 0)
            }
            T_FLUSH => (status(self.io.flush()), 0),
            T_GET_ID => {
                let mut id = self.id.clone();
                id.resize(20.min(out_len), 0);
                match out.write_all(&id) {
                    Ok(()) => (S_OK, id.len() as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
            T_DISCARD | T_WRITE_ZEROES if ro => (S_IOERR, 0),
            T_DISCARD | T_WRITE_ZEROES => (self.discard_or_zeroes(kind, body), 0),
            _ => (S_UNSUPP, 0),
        }
    }

    /// DISCARD and WRITE_ZEROES: one segment (sector, count, flags).
    fn discard_or_zeroes(&self, kind: u32, body: &mut dyn Read) -> u8 {
        let mut seg = [0u8; 16];
        if body.read_exact(&mut seg).is_err() {
            return S_IOERR;
        }
        let first = u64::from_le_bytes(seg[..8].try_into().unwrap_or_default());
        let count = u64::from(u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default()));
        let Some(at) = first.checked_mul(SECTOR).filter(|_| count * SECTOR <= MAX_REQUEST) else {
            return S_IOERR;
        };
        let len = count * SECTOR;
        if at.checked_add(len).is_none_or(|end| end > self.io.size()) {
            return S_IOERR;
        }
        let r = if kind == T_DISCARD {
            self.io.discard(at, len)
        } else {
            // VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: the range's storage may be freed.
            self.io.write_zeroes(at, len, seg[12] & 1 != 0)
        };
        if r.is_ok() {
            S_OK
        } else {
            S_IOERR
        }
    }
}

impl VirtioDevice for Blk {
    fn device_type(&self) -> u16 {
        boot_abi::VIRTIO_TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        let ro = if self.io.readonly() { F_RO } else { 0 };
        F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES | ro
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config(), offset, data);
    }

    fn process(&self, _index: usize, queue: &mut Queue, mem: &DeviceMemory) -> Result<bool, VirtioError> {
        serve_chains_while(
            queue,
            mem,
            || self.deferral.more(),
            |chain| {
                let head = chain.head_index();
                let buffer = |why: String| VirtioError::Buffer { head, why };
                let mut reader = chain.clone().reader(&**mem).map_err(|e| buffer(e.to_string()))?;
                let mut writer = chain.writer(&**mem).map_err(|e| buffer(e.to_string()))?;
                let mut header = [0u8; 16];
                if reader.read_exact(&mut header).is_err() || writer.available_bytes() == 0 {
                    return Err(buffer("no request header or no status byte".into()));
                }
                let kind = u32::from_le_bytes(header[..4].try_into().unwrap_or_default());
                let sector = u64::from_le_bytes(header[8..].try_into().unwrap_or_default());
                // The last writable byte is the status; everything before it is the data.
                let out_len = writer.available_bytes() - 1;
                let mut status_byte = writer.split_at(out_len).map_err(|e| buffer(e.to_string()))?;
                let body_len = reader.available_bytes();
                let (status, written) = self.serve(kind, sector, &mut reader, &mut writer, (body_len, out_len));
                status_byte.write_all(&[status]).map_err(|e| buffer(e.to_string()))?;
                Ok(written + 1)
            },
        )
    }
}
