//! virtio-scsi (device type 8, PCI 0x1048; virtio 1.2 §5.6): a SCSI host adapter with one
//! target (0) whose logical units are the VM's disks on this bus. Three queues: control (task
//! management, asynchronous notification queries), event (buffers the driver lends for events;
//! none are sent: no hot-plug) and one request queue. Commands are emulated in [`emulate`] on
//! each disk's [`DiskIo`], the same path as virtio-blk's, so every change is reported to the
//! VM's disk observer and mirrored to the standby epoch by epoch; while the observer holds the
//! disks, requests wait in the queue ([`Scsi::deferral`]).
//!
//! Every command completes on the notifying vCPU's thread before its chain is returned, so a
//! task management function never finds a task in flight. A request whose headers do not fit
//! its buffers breaks the rules: the device is marked NEEDS_RESET, as virtio-blk's is.

pub mod emulate;
mod pages;
pub mod sense;

use super::disk::{Deferral, DiskIo};
use super::{serve_chains, serve_chains_while, Chain, VirtioDevice, VirtioError};
use crate::devices::observer::ObserverSlot;
use crate::memory::DeviceMemory;
use emulate::{Buffers, Lun, Target, MAX_BLOCKS, MAX_LUN};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use virtio_queue::Queue;

pub const CONTROL_QUEUE: usize = 0;
pub const EVENT_QUEUE: usize = 1;
pub const REQUEST_QUEUE: usize = 2;
const QUEUE_SIZES: [u16; 3] = [64, 64, 256];

/// The sizes a driver finds in the configuration (and may change).
const DEFAULT_CDB_SIZE: u32 = 32;
const DEFAULT_SENSE_SIZE: u32 = 96;
/// The largest CDB and sense areas a driver may ask for.
const MAX_AREA: u32 = 256;
/// The configuration (virtio 1.2 §5.6.4).
const CONFIG_LEN: usize = 36;
const CONFIG_SENSE_SIZE: u64 = 20;
const CONFIG_CDB_SIZE: u64 = 24;

/// The request's readable header before the CDB: lun[8], id, task_attr, prio, crn.
const REQ_HEADER: usize = 19;
/// The response's writable header before the sense: sense_len, residual, status_qualifier,
/// status, response.
const RESP_HEADER: usize = 12;

/// Response codes (virtio 1.2 §5.6.6.1).
const S_OK: u8 = 0;
const S_OVERRUN: u8 = 1;
const S_BAD_TARGET: u8 = 3;
const S_FUNCTION_REJECTED: u8 = 11;

/// Control queue request types and task management functions.
const T_TMF: u32 = 0;
const T_AN_QUERY: u32 = 1;
const T_AN_SUBSCRIBE: u32 = 2;
const TMF_QUERY_TASK_SET: u32 = 7;

/// One disk to put on the bus: its storage as the VM's devices share it, and how the guest
/// sees it.
pub struct ScsiDisk {
    pub io: Arc<DiskIo>,
    pub lun: u16,
    /// The serial number (VPD 0x80) and identifier (VPD 0x83).
    pub serial: String,
    pub write_cache: bool,
}

pub struct Scsi {
    target: Target,
    deferral: Deferral,
    /// The CDB and sense areas' sizes, as the driver set them.
    cdb_size: AtomicU32,
    sense_size: AtomicU32,
}

impl Scsi {
    /// A controller with `disks` as its LUNs, reporting their changes to the observer in
    /// `observer`; refused if two disks share a LUN or one is above 255.
    pub fn new(disks: Vec<ScsiDisk>, observer: Arc<ObserverSlot>) -> Result<Scsi, String> {
        let luns = disks
            .into_iter()
            .map(|d| Lun { io: d.io, lun: d.lun, serial: d.serial, write_cache: d.write_cache })
            .collect();
        Ok(Scsi {
            target: Target::new(luns)?,
            deferral: Deferral::new(observer),
            cdb_size: AtomicU32::new(DEFAULT_CDB_SIZE),
            sense_size: AtomicU32::new(DEFAULT_SENSE_SIZE),
        })
    }

    /// The logical units (to run commands on directly).
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Requests left waiting on the request queue while the disks' observer held the disks.
    pub fn deferral(&self) -> &Deferral {
        &self.deferral
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |at: usize, v: &[u8]| c[at..at + v.len()].copy_from_slice(v);
        put(0, &1u32.to_le_bytes()); // num_queues (request queues)
        put(4, &u32::from(QUEUE_SIZES[REQUEST_QUEUE] - 2).to_le_bytes()); // seg_max
        put(8, &MAX_BLOCKS.to_le_bytes()); // max_sectors
        put(12, &128u32.to_le_bytes()); // cmd_per_lun
        put(16, &16u32.to_le_bytes()); // event_info_size
        put(20, &self.sense_size.load(Ordering::Relaxed).to_le_bytes());
        put(24, &self.cdb_size.load(Ordering::Relaxed).to_le_bytes());
        put(28, &0u16.to_le_bytes()); // max_channel
        put(30, &0u16.to_le_bytes()); // max_target
        put(32, &u32::from(MAX_LUN).to_le_bytes()); // max_lun
        c
    }

    /// One command from the request queue: bytes written for the driver.
    fn command(&self, chain: Chain, mem: &DeviceMemory) -> Result<u32, VirtioError> {
        let head = chain.head_index();
        let buffer = |why: String| VirtioError::Buffer { head, why };
        let (cdb_size, sense_size) =
            (self.cdb_size.load(Ordering::Relaxed) as usize, self.sense_size.load(Ordering::Relaxed) as usize);
        let mut reader = chain.clone().reader(&**mem).map_err(|e| buffer(e.to_string()))?;
        let mut writer = chain.writer(&**mem).map_err(|e| buffer(e.to_string()))?;
        let mut req = vec![0u8; REQ_HEADER + cdb_size];
        let resp_len = RESP_HEADER + sense_size;
        if reader.read_exact(&mut req).is_err() || writer.available_bytes() < resp_len {
            return Err(buffer(format!(
                "a command needs {} readable and {resp_len} writable bytes of headers",
                req.len()
            )));
        }
        let mut data_in = writer.split_at(resp_len).map_err(|e| buffer(e.to_string()))?;
        let (out_len, in_len) = (reader.available_bytes(), data_in.available_bytes());
        let mut resp = vec![0u8; resp_len];
        let Some(lun) = lun(&req[..8]) else {
            resp[11] = S_BAD_TARGET;
            writer.write_all(&resp).map_err(|e| buffer(e.to_string()))?;
            return Ok(resp_len as u32);
        };
        let bufs = Buffers { out: &mut reader, out_len, in_len };
        let reply = self.target.command(lun, &req[REQ_HEADER..], bufs);
        let mut written = 0;
        if reply.overrun || reply.data.len() > in_len {
            resp[11] = S_OVERRUN;
        } else {
            data_in.write_all(&reply.data).map_err(|e| buffer(e.to_string()))?;
            written = reply.data.len();
            // What the command did not transfer: of the data-in buffers if it read, else of
            // the data-out ones.
            let residual = if in_len > 0 { in_len - written } else { reader.available_bytes() };
            resp[4..8].copy_from_slice(&(residual as u32).to_le_bytes());
            resp[10] = reply.status;
            if let Some(s) = reply.sense {
                let sense = s.fixed();
                let n = sense.len().min(sense_size);
                resp[..4].copy_from_slice(&(n as u32).to_le_bytes());
                resp[RESP_HEADER..RESP_HEADER + n].copy_from_slice(&sense[..n]);
            }
        }
        writer.write_all(&resp).map_err(|e| buffer(e.to_string()))?;
        Ok((resp_len + written) as u32)
    }

    /// One request from the control queue: task management (nothing is ever in flight, so
    /// every function is complete) and asynchronous notification (no events are offered).
    fn control(&self, chain: Chain, mem: &DeviceMemory) -> Result<u32, VirtioError> {
        let head = chain.head_index();
        let buffer = |why: String| VirtioError::Buffer { head, why };
        let mut reader = chain.clone().reader(&**mem).map_err(|e| buffer(e.to_string()))?;
        let mut writer = chain.writer(&**mem).map_err(|e| buffer(e.to_string()))?;
        let mut kind = [0u8; 4];
        reader.read_exact(&mut kind).map_err(|_| buffer("no control request type".into()))?;
        let (body_len, reply) = match u32::from_le_bytes(kind) {
            T_TMF => (20, 1),
            T_AN_QUERY | T_AN_SUBSCRIBE => (12, 5),
            other => return Err(buffer(format!("control request type {other} does not exist"))),
        };
        let mut body = [0u8; 20];
        if reader.read_exact(&mut body[..body_len]).is_err() || writer.available_bytes() < reply {
            return Err(buffer("a control request shorter than its type's".into()));
        }
        let mut out = vec![0u8; reply];
        let response = if u32::from_le_bytes(kind) == T_TMF {
            let subtype = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
            match lun(&body[4..12]) {
                None => S_BAD_TARGET,
                Some(_) if subtype > TMF_QUERY_TASK_SET => S_FUNCTION_REJECTED,
                Some(_) => S_OK, // FUNCTION COMPLETE
            }
        } else if lun(&body[..8]).is_none() {
            S_BAD_TARGET
        } else {
            S_OK // event_actual stays 0: no events
        };
        out[reply - 1] = response;
        writer.write_all(&out).map_err(|e| buffer(e.to_string()))?;
        Ok(reply as u32)
    }
}

/// The LUN a request addresses (virtio 1.2 §5.6.6.1: 1, the target, then the LUN in the
/// single-level structure); `None` for another target.
fn lun(addr: &[u8]) -> Option<u16> {
    (addr[0] == 1 && addr[1] == 0).then(|| u16::from_be_bytes([addr[2], addr[3]]) & 0x3fff)
}

impl VirtioDevice for Scsi {
    fn device_type(&self) -> u16 {
        boot_abi::VIRTIO_TYPE_SCSI
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        QUEUE_SIZES.to_vec()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&self, offset: u64, data: &[u8]) {
        let field = match offset {
            CONFIG_SENSE_SIZE => &self.sense_size,
            CONFIG_CDB_SIZE => &self.cdb_size,
            _ => return,
        };
        match <[u8; 4]>::try_from(data).map(u32::from_le_bytes) {
            Ok(v) if v <= MAX_AREA => field.store(v, Ordering::Relaxed),
            _ => tracing::debug!("virtio-scsi: configuration write {data:?} at {offset} ignored"),
        }
    }

    fn process(&self, index: usize, queue: &mut Queue, mem: &DeviceMemory) -> Result<bool, VirtioError> {
        match index {
            CONTROL_QUEUE => serve_chains(queue, mem, |chain| self.control(chain, mem)),
            REQUEST_QUEUE => serve_chains_while(queue, mem, || self.deferral.more(), |chain| self.command(chain, mem)),
            // The event queue's buffers stay with the device: no events are sent.
            _ => Ok(false),
        }
    }

    fn reset(&self) {
        self.cdb_size.store(DEFAULT_CDB_SIZE, Ordering::Relaxed);
        self.sense_size.store(DEFAULT_SENSE_SIZE, Ordering::Relaxed);
    }

    fn save(&self) -> Vec<u8> {
        let mut b = self.cdb_size.load(Ordering::Relaxed).to_le_bytes().to_vec();
        b.extend_from_slice(&self.sense_size.load(Ordering::Relaxed).to_le_bytes());
        b
    }

    fn restore(&self, state: &[u8]) -> Result<(), String> {
        let sizes: [u8; 8] = state.try_into().map_err(|_| format!("{} bytes of state, not 8", state.len()))?;
        let (cdb, sense) = (
            u32::from_le_bytes([sizes[0], sizes[1], sizes[2], sizes[3]]),
            u32::from_le_bytes([sizes[4], sizes[5], sizes[6], sizes[7]]),
        );
        if cdb > MAX_AREA || sense > MAX_AREA {
            return Err(format!("CDB size {cdb} or sense size {sense} above {MAX_AREA}"));
        }
        self.cdb_size.store(cdb, Ordering::Relaxed);
        self.sense_size.store(sense, Ordering::Relaxed);
        Ok(())
    }
}
