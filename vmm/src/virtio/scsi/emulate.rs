//! The SCSI commands of a direct-access block device (SBC-3, SPC-4), as Linux's sd driver and
//! its SCSI scan use them, on a disk reached through [`DiskIo`] (so every change is in the
//! VM's write log, as virtio-blk's are). One target holds the disks as its logical units.
//!
//! | opcode      | command                        | what it does here                               |
//! |-------------|--------------------------------|-------------------------------------------------|
//! | 0x00        | TEST UNIT READY                | GOOD: the disk is always ready                  |
//! | 0x03        | REQUEST SENSE                  | NO SENSE (sense always comes with the response) |
//! | 0x08/0x0a   | READ(6) / WRITE(6)             | the disk's blocks                               |
//! | 0x12        | INQUIRY                        | standard data; VPD 0x00 0x80 0x83 0xb0 0xb1 0xb2|
//! | 0x1a/0x5a   | MODE SENSE(6) / (10)           | caching (WCE) and control pages, or all (0x3f)  |
//! | 0x1b        | START STOP UNIT                | GOOD: nothing to spin                           |
//! | 0x25        | READ CAPACITY(10)              | last LBA and the block size                     |
//! | 0x28/0x2a   | READ(10) / WRITE(10)           | the disk's blocks (FUA flushes after the write) |
//! | 0xa8/0xaa   | READ(12) / WRITE(12)           | as (10)                                         |
//! | 0x88/0x8a   | READ(16) / WRITE(16)           | as (10)                                         |
//! | 0x35/0x91   | SYNCHRONIZE CACHE(10) / (16)   | flushes the disk                                |
//! | 0x41/0x93   | WRITE SAME(10) / (16)          | write-zeroes (UNMAP: may unmap), or a pattern   |
//! | 0x42        | UNMAP                          | discard                                         |
//! | 0x9e/0x10   | READ CAPACITY(16)              | with LBPME and LBPRZ (unmapped reads as zeroes) |
//! | 0xa0        | REPORT LUNS                    | the target's LUNs (at any LUN address)          |
//!
//! Anything else ends in CHECK CONDITION with ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE;
//! a bad field is INVALID FIELD IN CDB, a range past the end LOGICAL BLOCK ADDRESS OUT OF RANGE,
//! a write to a read-only disk DATA PROTECT / WRITE PROTECTED, and a storage failure MEDIUM
//! ERROR. A LUN with no disk answers INQUIRY (peripheral qualifier 3), REPORT LUNS and REQUEST
//! SENSE, and LOGICAL UNIT NOT SUPPORTED to the rest, as SPC-4 asks.

use super::sense::{Sense, CHECK_CONDITION, GOOD};
use crate::virtio::disk::DiskIo;
use std::io::Read;
use std::sync::Arc;

/// The logical block size.
pub const BLOCK: u64 = 512;
/// The most blocks one command moves, unmaps or writes the same (4 MiB, as virtio-blk).
pub const MAX_BLOCKS: u32 = 8192;
/// The most block descriptors one UNMAP takes.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 16;
/// The highest LUN a disk may have.
pub const MAX_LUN: u16 = 255;

const VENDOR: &[u8; 8] = b"SMPFT   ";
const PRODUCT: &[u8; 16] = b"smpft disk      ";

/// What a command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// GOOD or CHECK CONDITION.
    pub status: u8,
    /// With CHECK CONDITION: why.
    pub sense: Option<Sense>,
    /// What goes to the driver's data-in buffers (already cut to the allocation length).
    pub data: Vec<u8>,
    /// The command needs more data than the driver's buffers hold (virtio-scsi's OVERRUN
    /// response): nothing was done.
    pub overrun: bool,
}

impl Reply {
    fn good(data: Vec<u8>) -> Reply {
        Reply { status: GOOD, sense: None, data, overrun: false }
    }

    fn check(sense: Sense) -> Reply {
        Reply { status: CHECK_CONDITION, sense: Some(sense), data: Vec::new(), overrun: false }
    }

    fn overrun() -> Reply {
        Reply { overrun: true, ..Reply::good(Vec::new()) }
    }

    /// Data cut to the allocation length `alloc`.
    pub(super) fn data_cut(mut data: Vec<u8>, alloc: usize) -> Reply {
        data.truncate(alloc);
        Reply::good(data)
    }
}

/// The driver's buffers around a command: data-out to read from, room for data-in.
pub struct Buffers<'a> {
    pub out: &'a mut dyn Read,
    pub out_len: usize,
    pub in_len: usize,
}

/// One disk as a logical unit.
pub struct Lun {
    pub(super) io: Arc<DiskIo>,
    pub(super) lun: u16,
    /// VPD 0x80's serial number and VPD 0x83's identifier.
    pub(super) serial: String,
    /// The write cache (MODE SENSE's WCE): without it every write is flushed before it
    /// completes.
    pub(super) write_cache: bool,
}

/// The one target: its logical units, by LUN.
pub struct Target {
    luns: Vec<Lun>,
}

/// A big-endian field of `len` bytes at `at` of the CDB (the caller checked its length).
fn be(cdb: &[u8], at: usize, len: usize) -> u64 {
    cdb[at..at + len].iter().fold(0u64, |v, &b| v << 8 | u64::from(b))
}

/// The length of a CDB by its operation code's group (SPC-4 §4.2.5.1); `None` for the
/// reserved and vendor-specific groups.
fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

pub const REPORT_LUNS: u8 = 0xa0;
const TEST_UNIT_READY: u8 = 0x00;
const REQUEST_SENSE: u8 = 0x03;
const READ_6: u8 = 0x08;
const WRITE_6: u8 = 0x0a;
pub const INQUIRY: u8 = 0x12;
const MODE_SENSE_6: u8 = 0x1a;
const START_STOP_UNIT: u8 = 0x1b;
const READ_CAPACITY_10: u8 = 0x25;
const READ_10: u8 = 0x28;
const WRITE_10: u8 = 0x2a;
const SYNCHRONIZE_CACHE_10: u8 = 0x35;
const WRITE_SAME_10: u8 = 0x41;
const UNMAP: u8 = 0x42;
const MODE_SENSE_10: u8 = 0x5a;
const READ_16: u8 = 0x88;
const WRITE_16: u8 = 0x8a;
const SYNCHRONIZE_CACHE_16: u8 = 0x91;
const WRITE_SAME_16: u8 = 0x93;
const SERVICE_ACTION_IN_16: u8 = 0x9e;
const READ_CAPACITY_16: u8 = 0x10;
const READ_12: u8 = 0xa8;
const WRITE_12: u8 = 0xaa;

impl Target {
    /// A target with these LUNs; refused if two share a number or one is above [`MAX_LUN`].
    pub fn new(luns: Vec<Lun>) -> Result<Target, String> {
        for (i, l) in luns.iter().enumerate() {
            if l.lun > MAX_LUN {
                return Err(format!("LUN {} is above {MAX_LUN}", l.lun));
            }
            if luns[..i].iter().any(|o| o.lun == l.lun) {
                return Err(format!("two disks at LUN {}", l.lun));
            }
        }
        Ok(Target { luns })
    }

    pub fn luns(&self) -> &[Lun] {
        &self.luns
    }

    /// Runs `cdb` (the driver's CDB buffer, at least as long as the command) on LUN `lun`.
    pub fn command(&self, lun: u16, cdb: &[u8], bufs: Buffers) -> Reply {
        let Some(&opcode) = cdb.first() else { return Reply::check(Sense::INVALID_OPCODE) };
        let Some(len) = cdb_len(opcode) else { return Reply::check(Sense::INVALID_OPCODE) };
        let Some(cdb) = cdb.get(..len) else { return Reply::check(Sense::INVALID_FIELD) };
        if opcode == REPORT_LUNS {
            return self.report_luns(cdb);
        }
        match self.luns.iter().find(|l| l.lun == lun) {
            Some(l) => l.command(cdb, bufs),
            None => no_lun(cdb),
        }
    }

    /// REPORT LUNS: the LUN list (single-level, peripheral or flat addressing).
    fn report_luns(&self, cdb: &[u8]) -> Reply {
        let alloc = be(cdb, 6, 4) as usize;
        let select = cdb[2];
        if alloc < 16 || !matches!(select, 0x00..=0x02) {
            return Reply::check(Sense::INVALID_FIELD);
        }
        // 0x01: the well-known LUNs only, of which there are none.
        let mut luns: Vec<u16> = if select == 0x01 { Vec::new() } else { self.luns.iter().map(|l| l.lun).collect() };
        luns.sort_unstable();
        let mut data = vec![0u8; 8];
        data[..4].copy_from_slice(&(luns.len() as u32 * 8).to_be_bytes());
        for lun in luns {
            let first = if lun < 256 { 0 } else { 0x40 | (lun >> 8) as u8 };
            data.extend_from_slice(&[first, lun as u8, 0, 0, 0, 0, 0, 0]);
        }
        Reply::data_cut(data, alloc)
    }
}

/// A command to a LUN with no disk (SPC-4 §5.8.1).
fn no_lun(cdb: &[u8]) -> Reply {
    match cdb[0] {
        INQUIRY if cdb[1] & 3 == 0 && cdb[2] == 0 => {
            let mut data = standard_inquiry();
            data[0] = 0x7f; // peripheral qualifier 3: no logical unit here; device type unknown
            Reply::data_cut(data, be(cdb, 3, 2) as usize)
        }
        REQUEST_SENSE => Reply::data_cut(Sense::LUN_NOT_SUPPORTED.fixed().to_vec(), usize::from(cdb[4])),
        _ => Reply::check(Sense::LUN_NOT_SUPPORTED),
    }
}

/// Standard INQUIRY data (36 bytes): a direct-access block device, SPC-3, hierarchical LUNs,
/// command queueing.
pub(super) fn standard_inquiry() -> Vec<u8> {
    let mut d = vec![0u8; 36];
    d[2] = 0x05; // SPC-3
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = 36 - 5;
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(VENDOR);
    d[16..32].copy_from_slice(PRODUCT);
    let mut rev = [b' '; 4];
    for (r, c) in rev.iter_mut().zip(env!("CARGO_PKG_VERSION").bytes()) {
        *r = c;
    }
    d[32..36].copy_from_slice(&rev);
    d
}

/// A range of blocks, checked against the disk: its byte offset and length.
struct Range {
    at: u64,
    len: u64,
}

impl Lun {
    fn blocks(&self) -> u64 {
        self.io.size() / BLOCK
    }

    /// Blocks `lba..lba + count` as bytes, or LBA OUT OF RANGE.
    fn range(&self, lba: u64, count: u64) -> Result<Range, Sense> {
        match lba.checked_add(count) {
            Some(end) if end <= self.blocks() => Ok(Range { at: lba * BLOCK, len: count * BLOCK }),
            _ => Err(Sense::LBA_OUT_OF_RANGE),
        }
    }

    fn command(&self, cdb: &[u8], bufs: Buffers) -> Reply {
        let r = match cdb[0] {
            TEST_UNIT_READY | START_STOP_UNIT => Ok(Reply::good(Vec::new())),
            REQUEST_SENSE if cdb[1] & 1 != 0 => Err(Sense::INVALID_FIELD), // descriptor format
            REQUEST_SENSE => Ok(Reply::data_cut(Sense::NONE.fixed().to_vec(), usize::from(cdb[4]))),
            INQUIRY => self.inquiry(cdb),
            MODE_SENSE_6 | MODE_SENSE_10 => self.mode_sense(cdb),
            READ_CAPACITY_10 => self.read_capacity_10(cdb),
            SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == READ_CAPACITY_16 => Ok(self.read_capacity_16(cdb)),
            SERVICE_ACTION_IN_16 => Err(Sense::INVALID_FIELD),
            READ_6 | READ_10 | READ_12 | READ_16 | WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16 => self.rw(cdb, bufs),
            SYNCHRONIZE_CACHE_10 => self.synchronize(be(cdb, 2, 4), be(cdb, 7, 2)),
            SYNCHRONIZE_CACHE_16 => self.synchronize(be(cdb, 2, 8), be(cdb, 10, 4)),
            WRITE_SAME_10 | WRITE_SAME_16 => self.write_same(cdb, bufs),
            UNMAP => self.unmap(cdb, bufs),
            _ => Err(Sense::INVALID_OPCODE),
        };
        r.unwrap_or_else(Reply::check)
    }

    fn read_capacity_10(&self, cdb: &[u8]) -> Result<Reply, Sense> {
        // Without PMI the LBA field must be zero (SBC-3 §5.15).
        if cdb[8] & 1 == 0 && be(cdb, 2, 4) != 0 {
            return Err(Sense::INVALID_FIELD);
        }
        let last = self.blocks().saturating_sub(1).min(u64::from(u32::MAX)) as u32;
        let mut d = last.to_be_bytes().to_vec();
        d.extend_from_slice(&(BLOCK as u32).to_be_bytes());
        Ok(Reply::good(d))
    }

    fn read_capacity_16(&self, cdb: &[u8]) -> Reply {
        let mut d = vec![0u8; 32];
        d[..8].copy_from_slice(&self.blocks().saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&(BLOCK as u32).to_be_bytes());
        if self.can_unmap() {
            d[14] = 0x80 | 0x40; // LBPME: UNMAP and WRITE SAME's UNMAP work; LBPRZ: unmapped reads 0
        }
        Reply::data_cut(d, be(cdb, 10, 4) as usize)
    }

    pub(super) fn can_unmap(&self) -> bool {
        !self.io.readonly()
    }

    /// READ and WRITE (6, 10, 12, 16).
    fn rw(&self, cdb: &[u8], bufs: Buffers) -> Result<Reply, Sense> {
        let (lba, count) = match cdb[0] {
            READ_6 | WRITE_6 => {
                let count = u64::from(cdb[4]);
                (be(cdb, 1, 3) & 0x1f_ffff, if count == 0 { 256 } else { count })
            }
            READ_10 | WRITE_10 => (be(cdb, 2, 4), be(cdb, 7, 2)),
            READ_12 | WRITE_12 => (be(cdb, 2, 4), be(cdb, 6, 4)),
            _ => (be(cdb, 2, 8), be(cdb, 10, 4)),
        };
        let write = matches!(cdb[0], WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16);
        // RDPROTECT/WRPROTECT: the disk has no protection information.
        let short = matches!(cdb[0], READ_6 | WRITE_6);
        if (!short && cdb[1] & 0xe0 != 0) || count > u64::from(MAX_BLOCKS) {
            return Err(Sense::INVALID_FIELD);
        }
        if write && self.io.readonly() {
            return Err(Sense::WRITE_PROTECTED);
        }
        let range = self.range(lba, count)?;
        let len = range.len as usize;
        if len > if write { bufs.out_len } else { bufs.in_len } {
            return Ok(Reply::overrun());
        }
        if !write {
            let mut data = vec![0u8; len];
            self.io.read(&mut data, range.at).map_err(|_| Sense::READ_ERROR)?;
            return Ok(Reply::good(data));
        }
        let mut data = vec![0u8; len];
        if bufs.out.read_exact(&mut data).is_err() {
            return Ok(Reply::overrun());
        }
        if len > 0 {
            self.io.write(data, range.at).map_err(|_| Sense::WRITE_ERROR)?;
        }
        // FUA (or no write cache): on stable storage before the command completes.
        let fua = !short && cdb[1] & 0x08 != 0;
        if len > 0 && (fua || !self.write_cache) {
            self.io.flush().map_err(|_| Sense::WRITE_ERROR)?;
        }
        Ok(Reply::good(Vec::new()))
    }

    /// SYNCHRONIZE CACHE: the range is checked; the whole disk is flushed.
    fn synchronize(&self, lba: u64, count: u64) -> Result<Reply, Sense> {
        // A count of zero means "to the end".
        self.range(lba, count)?;
        self.io.flush().map_err(|_| Sense::WRITE_ERROR)?;
        Ok(Reply::good(Vec::new()))
    }

    /// WRITE SAME (10, 16): one block written over the range; zeroes become a write-zeroes
    /// (with the UNMAP bit, one that may unmap).
    fn write_same(&self, cdb: &[u8], bufs: Buffers) -> Result<Reply, Sense> {
        let sixteen = cdb[0] == WRITE_SAME_16;
        let (lba, count) = if sixteen { (be(cdb, 2, 8), be(cdb, 10, 4)) } else { (be(cdb, 2, 4), be(cdb, 7, 2)) };
        let (unmap, ndob) = (cdb[1] & 0x08 != 0, sixteen && cdb[1] & 0x01 != 0);
        // WRPROTECT, ANCHOR and the obsolete PBDATA/LBDATA (and NDOB in WRITE SAME(10)) are not
        // supported; a count of zero is not either (WSNZ in the block limits page).
        let unsupported = if sixteen { 0xf6 } else { 0xf7 };
        if cdb[1] & unsupported != 0 || count == 0 || count > u64::from(MAX_BLOCKS) {
            return Err(Sense::INVALID_FIELD);
        }
        if self.io.readonly() {
            return Err(Sense::WRITE_PROTECTED);
        }
        let range = self.range(lba, count)?;
        let mut block = vec![0u8; BLOCK as usize];
        if !ndob && (bufs.out_len < block.len() || bufs.out.read_exact(&mut block).is_err()) {
            return Ok(Reply::overrun());
        }
        let r = if block.iter().all(|&b| b == 0) {
            self.io.write_zeroes(range.at, range.len, unmap)
        } else {
            self.io.write(block.repeat(count as usize), range.at)
        };
        r.map_err(|_| Sense::WRITE_ERROR)?;
        if !self.write_cache {
            self.io.flush().map_err(|_| Sense::WRITE_ERROR)?;
        }
        Ok(Reply::good(Vec::new()))
    }

    /// UNMAP: each block descriptor's range discarded, all checked before any is.
    fn unmap(&self, cdb: &[u8], bufs: Buffers) -> Result<Reply, Sense> {
        if cdb[1] & 0x01 != 0 {
            return Err(Sense::INVALID_FIELD); // ANCHOR
        }
        let len = be(cdb, 7, 2) as usize;
        if len == 0 {
            return Ok(Reply::good(Vec::new()));
        }
        if len < 8 {
            return Err(Sense::PARAMETER_LENGTH);
        }
        if self.io.readonly() {
            return Err(Sense::WRITE_PROTECTED);
        }
        let mut list = vec![0u8; len];
        if bufs.out_len < len || bufs.out.read_exact(&mut list).is_err() {
            return Ok(Reply::overrun());
        }
        let described = (be(&list, 2, 2) as usize).min(len - 8) / 16;
        if described > MAX_UNMAP_DESCRIPTORS as usize {
            return Err(Sense::INVALID_PARAMETER);
        }
        let descriptors: Vec<(u64, u64)> =
            list[8..8 + 16 * described].chunks_exact(16).map(|d| (be(d, 0, 8), be(d, 8, 4))).collect();
        if descriptors.iter().map(|&(_, count)| count).sum::<u64>() > u64::from(MAX_BLOCKS) {
            return Err(Sense::INVALID_PARAMETER);
        }
        let ranges = descriptors.iter().map(|&(lba, count)| self.range(lba, count)).collect::<Result<Vec<_>, _>>()?;
        for r in ranges.iter().filter(|r| r.len > 0) {
            self.io.discard(r.at, r.len).map_err(|_| Sense::WRITE_ERROR)?;
        }
        Ok(Reply::good(Vec::new()))
    }
}
