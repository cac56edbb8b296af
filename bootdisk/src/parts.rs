//! Partition tables: GPT (its primary header and entries, CRC-checked) and MBR (four primary
//! entries and a bounded chain of logical ones). A disk with neither is one file system.

use crate::{BootError, Disk};

const SECTOR: u64 = 512;
/// Most GPT entries read (the usual table has 128).
const MAX_GPT_ENTRIES: u32 = 256;
/// Most logical partitions followed in an extended partition's chain.
const MAX_LOGICAL: u32 = 60;

/// One partition, in bytes from the start of the disk. Number 0 is a disk without a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub start: u64,
    pub len: u64,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn read(disk: &dyn Disk, offset: u64, len: usize) -> Result<Vec<u8>, BootError> {
    let mut buf = vec![0; len];
    disk.read_at(offset, &mut buf).map_err(BootError::Disk)?;
    Ok(buf)
}

/// The disk's partitions in table order (only those that lie within the disk).
pub fn partitions(disk: &dyn Disk) -> Result<Vec<Partition>, BootError> {
    let size = disk.size();
    if size < 2 * SECTOR {
        return Err(BootError::Invalid(format!("the disk is {size} bytes, too small to boot from")));
    }
    let mbr = read(disk, 0, SECTOR as usize)?;
    if mbr[510..512] != [0x55, 0xaa] {
        return Ok(vec![Partition { number: 0, start: 0, len: size }]);
    }
    let entries: Vec<(u8, u64, u64)> = (0..4)
        .map(|i| {
            let e = &mbr[446 + 16 * i..462 + 16 * i];
            (e[4], u64::from(le32(e, 8)), u64::from(le32(e, 12)))
        })
        .collect();
    if entries.iter().any(|e| e.0 == 0xee) {
        return gpt(disk, size);
    }
    let mut parts = Vec::new();
    for (i, &(kind, lba, count)) in entries.iter().enumerate() {
        match kind {
            0 => {}
            0x05 | 0x0f | 0x85 => logical(disk, lba, &mut parts)?,
            _ => parts.push(Partition { number: i as u32 + 1, start: lba * SECTOR, len: count * SECTOR }),
        }
    }
    Ok(within(parts, size))
}

/// The logical partitions of the extended partition at `base` (numbered from 5).
fn logical(disk: &dyn Disk, base: u64, parts: &mut Vec<Partition>) -> Result<(), BootError> {
    let mut ebr = base;
    for number in 5..5 + MAX_LOGICAL {
        let b = read(disk, ebr.saturating_mul(SECTOR), SECTOR as usize)?;
        if b[510..512] != [0x55, 0xaa] {
            return Ok(());
        }
        let (first, next) = (&b[446..462], &b[462..478]);
        if first[4] != 0 {
            let start = ebr.saturating_add(u64::from(le32(first, 8)));
            parts.push(Partition {
                number,
                start: start.saturating_mul(SECTOR),
                len: u64::from(le32(first, 12)) * SECTOR,
            });
        }
        let link = u64::from(le32(next, 8));
        if next[4] == 0 || link == 0 {
            return Ok(());
        }
        ebr = base.saturating_add(link);
    }
    Err(BootError::Invalid(format!("the extended partition chains more than {MAX_LOGICAL} logical partitions")))
}

fn gpt(disk: &dyn Disk, size: u64) -> Result<Vec<Partition>, BootError> {
    let bad = |why: &str| BootError::Invalid(format!("GPT header: {why}"));
    let h = read(disk, SECTOR, SECTOR as usize)?;
    if &h[0..8] != b"EFI PART" {
        return Err(bad("no EFI PART signature"));
    }
    let hsize = le32(&h, 12) as usize;
    if !(92..=SECTOR as usize).contains(&hsize) {
        return Err(bad("bad header size"));
    }
    let mut check = h[..hsize].to_vec();
    check[16..20].fill(0);
    if crc32fast::hash(&check) != le32(&h, 16) {
        return Err(bad("checksum mismatch"));
    }
    let (lba, count, esize) = (le64(&h, 72), le32(&h, 80), le32(&h, 84));
    if count > MAX_GPT_ENTRIES || !(128..=1024).contains(&esize) || esize % 8 != 0 {
        return Err(bad(&format!("{count} entries of {esize} bytes")));
    }
    let table = read(disk, lba.saturating_mul(SECTOR), (count * esize) as usize)?;
    if crc32fast::hash(&table) != le32(&h, 88) {
        return Err(bad("partition entries' checksum mismatch"));
    }
    let mut parts = Vec::new();
    for (i, e) in table.chunks_exact(esize as usize).enumerate() {
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        if last >= first {
            let len = (last - first + 1).saturating_mul(SECTOR);
            parts.push(Partition { number: i as u32 + 1, start: first.saturating_mul(SECTOR), len });
        }
    }
    Ok(within(parts, size))
}

fn within(parts: Vec<Partition>, size: u64) -> Vec<Partition> {
    parts.into_iter().filter(|p| p.len > 0 && p.start.checked_add(p.len).is_some_and(|end| end <= size)).collect()
}
