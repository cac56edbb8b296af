//! A virtio-scsi driver (virtio 1.2 section 5.6), polled, one command at a time on the request
//! queue (the control and event queues are left unused, as the specification allows). It finds
//! the controller, asks target 0 for its LUNs (REPORT LUNS), checks that the first is a disk
//! (INQUIRY), reads its size (READ CAPACITY(16)), and then moves blocks with READ(16), WRITE(16)
//! and SYNCHRONIZE CACHE(10) for the disk workload.

use crate::abi::{virtio_pci_device_id, EXIT_DEVICE_FAILED, EXIT_NO_DEVICE, VIRTIO_PCI_VENDOR_ID, VIRTIO_TYPE_SCSI};
use crate::virtio::{self, Buf, Device, Queue};
use crate::{dma, log};
use core::fmt;

const REQUEST_QUEUE: u16 = 2;
const QUEUE_SIZE: u16 = 8;
/// The CDB and sense areas this driver uses (the defaults, written to the configuration).
const CDB_SIZE: u32 = 32;
const SENSE_SIZE: u32 = 96;
const CONFIG_SENSE_SIZE: u32 = 20;
const CONFIG_CDB_SIZE: u32 = 24;
/// The request header (lun, id, task attribute, priority, crn) then the CDB; the response
/// header (sense length, residual, status qualifier, status, response) then the sense.
const REQ_LEN: u64 = 19 + CDB_SIZE as u64;
const RESP_LEN: u64 = 12 + SENSE_SIZE as u64;
/// A buffer for what INQUIRY, REPORT LUNS and READ CAPACITY return.
const SCRATCH: u64 = 512;
/// How long a command may take (guest time).
const TIMEOUT_MS: u64 = 60_000;

const TEST_UNIT_READY: u8 = 0x00;
const INQUIRY: u8 = 0x12;
const SYNCHRONIZE_CACHE_10: u8 = 0x35;
const READ_16: u8 = 0x88;
const WRITE_16: u8 = 0x8a;
const SERVICE_ACTION_IN_16: u8 = 0x9e;
const READ_CAPACITY_16: u8 = 0x10;
const REPORT_LUNS: u8 = 0xa0;

/// Why a command failed.
#[derive(Clone, Copy, Debug)]
pub enum Error {
    Virtio(virtio::Error),
    /// The device's response code was not OK (1: overrun, 3: bad target, ...).
    Response(u8),
    /// CHECK CONDITION, with the sense key and additional sense code and qualifier.
    Check {
        key: u8,
        asc: u8,
        ascq: u8,
    },
    /// Another SCSI status.
    Status(u8),
    /// The device returned another chain, or less data than asked for.
    Protocol,
}

impl From<virtio::Error> for Error {
    fn from(e: virtio::Error) -> Error {
        Error::Virtio(e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Virtio(e) => write!(f, "{e}"),
            Error::Response(r) => write!(f, "virtio-scsi response {r}"),
            Error::Check { key, asc, ascq } => {
                write!(f, "CHECK CONDITION, sense key {key:#x}, ASC/ASCQ {asc:#04x}/{ascq:#04x}")
            }
            Error::Status(s) => write!(f, "SCSI status {s:#x}"),
            Error::Protocol => write!(f, "the device answered out of turn"),
        }
    }
}

/// The first disk of the controller.
pub struct Scsi {
    device: Device,
    queue: Queue,
    lun: u16,
    /// Blocks and their size.
    pub blocks: u64,
    pub block_size: u32,
    req: u64,
    resp: u64,
    scratch: u64,
}

/// Data a command moves: device memory the driver owns, and whether the device writes it.
pub struct Data {
    pub addr: u64,
    pub len: u32,
    pub from_device: bool,
}

impl Scsi {
    /// Finds the controller, sets it up and scans it; the error is the exit status.
    pub fn open(tsc_khz: u64) -> Result<Scsi, u32> {
        let Some(pci) = Device::find(VIRTIO_TYPE_SCSI) else {
            log!(
                "scsi: no virtio-scsi controller (PCI ID {:04x}:{:04x}) on bus 0",
                VIRTIO_PCI_VENDOR_ID,
                virtio_pci_device_id(VIRTIO_TYPE_SCSI)
            );
            return Err(EXIT_NO_DEVICE);
        };
        let failed = |e: &dyn fmt::Display| {
            log!("scsi: {pci}: {e}");
            EXIT_DEVICE_FAILED
        };
        let device = Device::new(pci, tsc_khz).map_err(|e| failed(&e))?;
        device.negotiate(0).map_err(|e| failed(&e))?;
        device.write_config32(CONFIG_CDB_SIZE, CDB_SIZE);
        device.write_config32(CONFIG_SENSE_SIZE, SENSE_SIZE);
        let queue = device.setup_queue(REQUEST_QUEUE, QUEUE_SIZE).map_err(|e| failed(&e))?;
        device.driver_ok();
        device.check().map_err(|e| failed(&e))?;
        let oom = || failed(&virtio::Error::OutOfMemory);
        let req = dma::alloc(REQ_LEN, 16).ok_or_else(oom)?;
        let resp = dma::alloc(RESP_LEN, 16).ok_or_else(oom)?;
        let scratch = dma::alloc(SCRATCH, 16).ok_or_else(oom)?;
        let mut s = Scsi { device, queue, lun: 0, blocks: 0, block_size: 0, req, resp, scratch };
        s.scan().map_err(|e| failed(&e))?;
        Ok(s)
    }

    /// REPORT LUNS, then INQUIRY, TEST UNIT READY and READ CAPACITY(16) on the first LUN.
    fn scan(&mut self) -> Result<(), Error> {
        let mut cdb = [0u8; 12];
        cdb[0] = REPORT_LUNS;
        cdb[6..10].copy_from_slice(&(SCRATCH as u32).to_be_bytes());
        let n = self.ask(&cdb)?;
        let listed = (self.scratch_be(0, 4) as usize / 8).min((n.saturating_sub(8)) / 8);
        if listed == 0 {
            log!("scsi: target 0 reports no LUNs");
            return Err(Error::Protocol);
        }
        // The first LUN, in single-level (peripheral or flat) addressing.
        self.lun = (self.scratch_be(8, 2) & 0x3fff) as u16;
        log!("scsi: target 0 has {listed} LUN(s); the disk workload uses LUN {}", self.lun);
        let n = self.ask(&[INQUIRY, 0, 0, 0, 96, 0])?;
        let kind = self.scratch_byte(0);
        if n < 36 || kind != 0 {
            log!("scsi: LUN {} is not a disk (peripheral {kind:#04x})", self.lun);
            return Err(Error::Protocol);
        }
        let mut id = [0u8; 28];
        for (i, b) in id.iter_mut().enumerate() {
            *b = self.scratch_byte(8 + i);
        }
        self.command(&[TEST_UNIT_READY, 0, 0, 0, 0, 0], None)?;
        let mut cdb = [0u8; 16];
        cdb[0] = SERVICE_ACTION_IN_16;
        cdb[1] = READ_CAPACITY_16;
        cdb[13] = 32;
        if self.ask(&cdb)? < 12 {
            return Err(Error::Protocol);
        }
        self.blocks = self.scratch_be(0, 8) + 1;
        self.block_size = self.scratch_be(8, 4) as u32;
        log!(
            "scsi: LUN {}: '{}', {} blocks of {} bytes",
            self.lun,
            core::str::from_utf8(&id).unwrap_or("?"),
            self.blocks,
            self.block_size
        );
        Ok(())
    }

    fn scratch_byte(&self, at: usize) -> u8 {
        // SAFETY: `at` < SCRATCH (callers read the first 36 bytes at most): the scratch buffer
        // is device memory this driver owns, and no command is in flight.
        unsafe { ((self.scratch + at as u64) as *const u8).read_volatile() }
    }

    fn scratch_be(&self, at: usize, len: usize) -> u64 {
        (at..at + len).fold(0, |v, i| v << 8 | u64::from(self.scratch_byte(i)))
    }

    /// A command that returns data into the scratch buffer: the bytes returned.
    fn ask(&mut self, cdb: &[u8]) -> Result<usize, Error> {
        let data = Data { addr: self.scratch, len: SCRATCH as u32, from_device: true };
        self.command(cdb, Some(data))
    }

    /// Reads or writes `blocks` blocks at `lba` from or to `data` (of `blocks` blocks).
    pub fn transfer(&mut self, write: bool, lba: u64, blocks: u32, addr: u64) -> Result<(), Error> {
        let mut cdb = [0u8; 16];
        cdb[0] = if write { WRITE_16 } else { READ_16 };
        cdb[2..10].copy_from_slice(&lba.to_be_bytes());
        cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
        let len = blocks * self.block_size;
        let n = self.command(&cdb, Some(Data { addr, len, from_device: !write }))?;
        if !write && n != len as usize {
            return Err(Error::Protocol);
        }
        Ok(())
    }

    /// SYNCHRONIZE CACHE(10) of the whole disk.
    pub fn flush(&mut self) -> Result<(), Error> {
        self.command(&[SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], None).map(|_| ())
    }

    /// Runs one command and waits for it: the bytes of data-in the device returned.
    pub fn command(&mut self, cdb: &[u8], data: Option<Data>) -> Result<usize, Error> {
        let mut req = [0u8; REQ_LEN as usize];
        req[..4].copy_from_slice(&[1, 0, 0x40 | (self.lun >> 8) as u8, self.lun as u8]);
        req[19..19 + cdb.len()].copy_from_slice(cdb);
        // SAFETY: the request and response buffers are device memory this driver owns; no
        // command is in flight.
        unsafe {
            core::ptr::copy_nonoverlapping(req.as_ptr(), self.req as *mut u8, req.len());
            core::ptr::write_bytes(self.resp as *mut u8, 0xff, RESP_LEN as usize);
        }
        let header = Buf { addr: self.req, len: REQ_LEN as u32, write: false };
        let response = Buf { addr: self.resp, len: RESP_LEN as u32, write: true };
        let head = match data {
            None => self.queue.submit(&[header, response])?,
            Some(d) if d.from_device => {
                self.queue.submit(&[header, response, Buf { addr: d.addr, len: d.len, write: true }])?
            }
            Some(d) => self.queue.submit(&[header, Buf { addr: d.addr, len: d.len, write: false }, response])?,
        };
        self.queue.notify();
        let used = self.queue.poll_used(&self.device, TIMEOUT_MS)?;
        let byte = |at: u64| {
            // SAFETY: the device returned the chain: it no longer writes the response.
            unsafe { ((self.resp + at) as *const u8).read_volatile() }
        };
        let (status, response) = (byte(10), byte(11));
        if used.head != head {
            return Err(Error::Protocol);
        }
        if response != 0 {
            return Err(Error::Response(response));
        }
        match status {
            0 => Ok((used.len as usize).saturating_sub(RESP_LEN as usize)),
            2 => Err(Error::Check { key: byte(12 + 2) & 0x0f, asc: byte(12 + 12), ascq: byte(12 + 13) }),
            s => Err(Error::Status(s)),
        }
    }
}

impl fmt::Display for Scsi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; virtio-scsi LUN {}", self.device, self.lun)
    }
}
