//! virtio-scsi's command emulation, command by command, on a disk in memory: what Linux's sd
//! driver sends, and what it must never get wrong (sense keys and codes, allocation lengths,
//! ranges past the end, read-only disks, failing storage).

use super::{MemDisk, Watcher};
use crate::devices::observer::ObserverSlot;
use crate::virtio::disk::DiskIo;
use crate::virtio::scsi::emulate::{Buffers, Reply, Target, BLOCK, MAX_BLOCKS};
use crate::virtio::scsi::sense::{self, Sense};
use crate::virtio::scsi::{Scsi, ScsiDisk};
use block::{BackendError, Op};
use std::sync::Arc;

/// 64 KiB: 128 blocks.
const BLOCKS: u64 = 128;

struct Bench {
    scsi: Scsi,
    disk: Arc<MemDisk>,
    watcher: Arc<Watcher>,
}

fn bench_with(readonly: bool, write_cache: bool) -> Bench {
    let disk = Arc::new(MemDisk {
        data: std::sync::Mutex::new(vec![0xee; (BLOCKS * BLOCK) as usize]),
        readonly,
        unmapped: Default::default(),
    });
    let slot = Arc::new(ObserverSlot::default());
    let watcher = slot.get_or_install(|| Arc::new(Watcher::default())).unwrap();
    let io = Arc::new(DiskIo::new(disk.clone(), 3, "disk3", slot.clone()));
    let unit = ScsiDisk { io, lun: 2, serial: "drive-scsi2".into(), write_cache };
    Bench { scsi: Scsi::new(vec![unit], slot).unwrap(), disk, watcher }
}

fn bench() -> Bench {
    bench_with(false, true)
}

impl Bench {
    fn target(&self) -> &Target {
        self.scsi.target()
    }

    /// `cdb` on LUN 2 with `out` as data-out and room for `in_len` bytes of data-in.
    fn run(&self, cdb: &[u8], out: &[u8], in_len: usize) -> Reply {
        self.run_at(2, cdb, out, in_len)
    }

    fn run_at(&self, lun: u16, cdb: &[u8], mut out: &[u8], in_len: usize) -> Reply {
        let out_len = out.len();
        self.target().command(lun, cdb, Buffers { out: &mut out, out_len, in_len })
    }

    fn ops(&self) -> Vec<Op> {
        self.watcher
            .take()
            .into_iter()
            .map(|(disk, op)| {
                assert_eq!(disk, 3, "reported under the disk's number in the VM");
                op
            })
            .collect()
    }
}

/// A CDB of `len` bytes (padded to 32, as the driver's CDB area is).
fn cdb(bytes: &[u8]) -> Vec<u8> {
    let mut c = bytes.to_vec();
    c.resize(32, 0);
    c
}

fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0x28, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&blocks.to_be_bytes());
    cdb(&c)
}

fn write16(lba: u64, blocks: u32, flags: u8) -> Vec<u8> {
    let mut c = vec![0x8a, flags];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&blocks.to_be_bytes());
    cdb(&c)
}

fn check(r: &Reply, want: Sense, what: &str) {
    assert_eq!((r.status, r.sense, r.overrun), (sense::CHECK_CONDITION, Some(want), false), "{what}: {r:?}");
    assert!(r.data.is_empty(), "{what}: no data with a check condition");
}

fn good(r: &Reply, what: &str) {
    assert_eq!((r.status, r.sense, r.overrun), (sense::GOOD, None, false), "{what}: {r:?}");
}

#[test]
fn inquiry_standard_data_and_vpd_pages() {
    let b = bench();
    let r = b.run(&cdb(&[0x12, 0, 0, 0, 96, 0]), &[], 96);
    good(&r, "standard INQUIRY");
    assert_eq!(r.data.len(), 36);
    assert_eq!(r.data[0], 0x00, "a direct-access block device, connected");
    assert_eq!(r.data[4] as usize + 5, 36, "additional length");
    assert_eq!(&r.data[8..16], b"SMPFT   ");
    assert_eq!(&r.data[16..26], b"smpft disk");
    assert_eq!(b.run(&cdb(&[0x12, 0, 0, 0, 5, 0]), &[], 96).data.len(), 5, "cut to the allocation length");
    assert!(b.run(&cdb(&[0x12, 0, 0, 0, 0, 0]), &[], 96).data.is_empty(), "an allocation length of zero");

    let vpd = |page: u8| b.run(&cdb(&[0x12, 1, page, 0x01, 0x00, 0]), &[], 256);
    let pages = vpd(0x00);
    good(&pages, "supported pages");
    assert_eq!(&pages.data[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    assert_eq!(&vpd(0x80).data[4..], b"drive-scsi2", "serial number");
    let id = vpd(0x83).data;
    assert_eq!((id[4] & 0x0f, id[5] & 0x0f), (2, 1), "an ASCII T10 vendor ID designator");
    assert_eq!(&id[8..], b"SMPFT   drive-scsi2");
    let limits = vpd(0xb0).data;
    assert_eq!((limits.len(), limits[4] & 1), (64, 1), "block limits with WSNZ");
    let be32 = |d: &[u8], at: usize| u32::from_be_bytes(d[at..at + 4].try_into().unwrap());
    assert_eq!(be32(&limits, 8), MAX_BLOCKS, "maximum transfer length");
    assert_eq!(be32(&limits, 20), MAX_BLOCKS, "maximum unmap LBA count");
    assert!(be32(&limits, 24) >= 1, "unmap block descriptors");
    assert_eq!(u64::from_be_bytes(limits[36..44].try_into().unwrap()), u64::from(MAX_BLOCKS), "write same");
    assert_eq!(vpd(0xb1).data.len(), 64, "block device characteristics");
    assert_eq!(vpd(0xb2).data[5] & 0xe4, 0xe4, "LBPU, LBPWS, LBPWS10, LBPRZ");

    check(&vpd(0x89), Sense::INVALID_FIELD, "a VPD page the disk does not have");
    check(&b.run(&cdb(&[0x12, 0, 0x80, 0, 96, 0]), &[], 96), Sense::INVALID_FIELD, "a page code without EVPD");
    check(&b.run(&cdb(&[0x12, 2, 0, 0, 96, 0]), &[], 96), Sense::INVALID_FIELD, "CMDDT");
}

#[test]
fn read_capacity_10_and_16() {
    let b = bench();
    let r = b.run(&cdb(&[0x25]), &[], 8);
    good(&r, "READ CAPACITY(10)");
    assert_eq!(r.data, [0, 0, 0, BLOCKS as u8 - 1, 0, 0, 2, 0], "last LBA, 512-byte blocks");
    check(&b.run(&cdb(&[0x25, 0, 0, 0, 0, 1]), &[], 8), Sense::INVALID_FIELD, "an LBA without PMI");
    let r = b.run(&cdb(&[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32]), &[], 32);
    good(&r, "READ CAPACITY(16)");
    assert_eq!(u64::from_be_bytes(r.data[..8].try_into().unwrap()), BLOCKS - 1);
    assert_eq!(u32::from_be_bytes(r.data[8..12].try_into().unwrap()), 512);
    assert_eq!(r.data[14] & 0xc0, 0xc0, "LBPME: the disk can unmap; LBPRZ: unmapped blocks read as zeroes");
    let r = b.run(&cdb(&[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12]), &[], 32);
    assert_eq!(r.data.len(), 12, "cut to the allocation length");
    check(&b.run(&cdb(&[0x9e, 0x11]), &[], 32), Sense::INVALID_FIELD, "another service action");
    let ro = bench_with(true, true);
    let r = ro.run(&cdb(&[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32]), &[], 32);
    assert_eq!(r.data[14] & 0x80, 0, "a read-only disk does not unmap");
}

#[test]
fn reads_and_writes_of_every_size_reach_the_disk_and_the_write_log() {
    let b = bench();
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 13) as u8).collect();
    good(&b.run(&write16(4, 2, 0), &data, 0), "WRITE(16)");
    assert_eq!(&b.disk.data.lock().unwrap()[2048..3072], &data[..]);
    assert_eq!(b.ops(), vec![Op::Write { offset: 2048, data: data.clone() }]);
    let r = b.run(&read10(4, 2), &[], 1024);
    good(&r, "READ(10)");
    assert_eq!(r.data, data);
    // READ(6) and READ(12), READ(16), and WRITE(6), WRITE(10), WRITE(12).
    assert_eq!(b.run(&cdb(&[0x08, 0, 0, 5, 1, 0]), &[], 512).data, &data[512..]);
    assert_eq!(b.run(&cdb(&[0xa8, 0, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0]), &[], 512).data, &data[..512]);
    assert_eq!(b.run(&cdb(&[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 2, 0, 0]), &[], 1024).data, data);
    for (c, lba) in [
        (cdb(&[0x0a, 0, 0, 9, 1, 0]), 9u64),
        (cdb(&[0x2a, 0, 0, 0, 0, 10, 0, 0, 1, 0]), 10),
        (cdb(&[0xaa, 0, 0, 0, 0, 11, 0, 0, 0, 1, 0, 0]), 11),
    ] {
        good(&b.run(&c, &[lba as u8; 512], 0), "WRITE");
        assert_eq!(b.disk.data.lock().unwrap()[(lba * 512) as usize], lba as u8);
    }
    assert_eq!(b.ops().len(), 3);
    // READ(6) with a length of zero moves 256 blocks: more than the disk has.
    check(&b.run(&cdb(&[0x08, 0, 0, 0, 0, 0]), &[], 1 << 20), Sense::LBA_OUT_OF_RANGE, "READ(6) of 256");
    good(&b.run(&read10(0, 0), &[], 0), "a transfer length of zero");
    // FUA: the write is flushed before it completes.
    good(&b.run(&write16(0, 1, 0x08), &[1; 512], 0), "WRITE(16) with FUA");
    assert_eq!(b.ops(), vec![Op::Write { offset: 0, data: vec![1; 512] }, Op::Flush]);
}

#[test]
fn bad_reads_and_writes_end_in_check_conditions_and_change_nothing() {
    let b = bench();
    let before = b.disk.data.lock().unwrap().clone();
    check(&b.run(&read10(BLOCKS as u32 - 1, 2), &[], 1024), Sense::LBA_OUT_OF_RANGE, "past the end");
    check(&b.run(&read10(BLOCKS as u32 + 1, 0), &[], 0), Sense::LBA_OUT_OF_RANGE, "no blocks, past the end");
    good(&b.run(&read10(BLOCKS as u32, 0), &[], 0), "no blocks, at the end");
    check(&b.run(&write16(u64::MAX, 2, 0), &[0; 1024], 0), Sense::LBA_OUT_OF_RANGE, "an LBA that overflows");
    check(&b.run(&write16(BLOCKS, 1, 0), &[0; 512], 0), Sense::LBA_OUT_OF_RANGE, "a write past the end");
    check(&b.run(&write16(0, MAX_BLOCKS + 1, 0), &[], 0), Sense::INVALID_FIELD, "more than a transfer may move");
    check(&b.run(&write16(0, 1, 0x20), &[0; 512], 0), Sense::INVALID_FIELD, "WRPROTECT: no protection info");
    let r = b.run(&write16(0, 2, 0), &[0; 1000], 0);
    assert!(r.overrun, "a write with less data than it says: {r:?}");
    let r = b.run(&read10(0, 2), &[], 1000);
    assert!(r.overrun && r.data.is_empty(), "a read into a smaller buffer: {r:?}");
    assert_eq!(*b.disk.data.lock().unwrap(), before, "nothing was written");
    assert!(b.ops().is_empty());
    let ro = bench_with(true, true);
    check(&ro.run(&write16(0, 1, 0), &[0; 512], 0), Sense::WRITE_PROTECTED, "a read-only disk");
    good(&ro.run(&read10(0, 1), &[], 512), "but it reads");
}

#[test]
fn synchronize_cache_flushes() {
    let b = bench();
    good(&b.run(&cdb(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]), &[], 0), "SYNCHRONIZE CACHE(10), the whole disk");
    good(&b.run(&cdb(&[0x91, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 8, 0, 0]), &[], 0), "(16), a range");
    assert_eq!(b.ops(), vec![Op::Flush, Op::Flush]);
    let past = cdb(&[0x35, 0, 0, 0, 0, BLOCKS as u8, 0, 0, 1, 0]);
    check(&b.run(&past, &[], 0), Sense::LBA_OUT_OF_RANGE, "a range past the end");
    assert!(b.ops().is_empty());
}

fn write_same(sixteen: bool, flags: u8, lba: u8, blocks: u8) -> Vec<u8> {
    if sixteen {
        cdb(&[0x93, flags, 0, 0, 0, 0, 0, 0, 0, lba, 0, 0, 0, blocks, 0, 0])
    } else {
        cdb(&[0x41, flags, 0, 0, 0, lba, 0, 0, blocks, 0])
    }
}

#[test]
fn write_same_becomes_write_zeroes_unmap_or_a_pattern() {
    let b = bench();
    good(&b.run(&write_same(true, 0x08, 2, 2), &[0; 512], 0), "WRITE SAME(16) of zeroes with UNMAP");
    good(&b.run(&write_same(false, 0, 6, 2), &[0; 512], 0), "WRITE SAME(10) of zeroes");
    good(&b.run(&write_same(true, 0x01, 10, 1), &[], 0), "WRITE SAME(16), NDOB: zeroes without data");
    assert_eq!(
        b.ops(),
        vec![
            Op::Zeroes { offset: 1024, len: 1024 },
            Op::Zeroes { offset: 3072, len: 1024 },
            Op::Zeroes { offset: 5120, len: 512 }
        ]
    );
    assert_eq!(*b.disk.unmapped.lock().unwrap(), vec![(1024, 1024)], "only the one with UNMAP may unmap");
    assert!(b.disk.data.lock().unwrap()[1024..2048].iter().all(|&x| x == 0));
    let pattern: Vec<u8> = (0..512u32).map(|i| i as u8).collect();
    good(&b.run(&write_same(false, 0, 20, 3), &pattern, 0), "a pattern");
    assert_eq!(b.ops(), vec![Op::Write { offset: 20 * 512, data: pattern.repeat(3) }]);
    assert_eq!(&b.disk.data.lock().unwrap()[22 * 512..23 * 512], &pattern[..]);

    check(&b.run(&write_same(true, 0, 0, 0), &[0; 512], 0), Sense::INVALID_FIELD, "zero blocks (WSNZ)");
    check(&b.run(&write_same(true, 0x10, 0, 1), &[0; 512], 0), Sense::INVALID_FIELD, "ANCHOR");
    check(&b.run(&write_same(false, 0x01, 0, 1), &[0; 512], 0), Sense::INVALID_FIELD, "NDOB in (10)");
    check(&b.run(&write_same(true, 0, 127, 2), &[0; 512], 0), Sense::LBA_OUT_OF_RANGE, "past the end");
    assert!(b.run(&write_same(true, 0, 0, 1), &[0; 100], 0).overrun, "less than a block of data");
    check(
        &bench_with(true, true).run(&write_same(true, 0x08, 0, 1), &[0; 512], 0),
        Sense::WRITE_PROTECTED,
        "read-only",
    );
    assert!(b.ops().is_empty());
}

/// UNMAP's parameter list: a header, then 16-byte descriptors.
fn unmap_list(descriptors: &[(u64, u32)]) -> Vec<u8> {
    let mut l = vec![0u8; 8];
    l[..2].copy_from_slice(&((6 + 16 * descriptors.len()) as u16).to_be_bytes());
    l[2..4].copy_from_slice(&((16 * descriptors.len()) as u16).to_be_bytes());
    for (lba, count) in descriptors {
        l.extend_from_slice(&lba.to_be_bytes());
        l.extend_from_slice(&count.to_be_bytes());
        l.extend_from_slice(&[0; 4]);
    }
    l
}

fn unmap(len: usize) -> Vec<u8> {
    cdb(&[0x42, 0, 0, 0, 0, 0, 0, (len >> 8) as u8, len as u8, 0])
}

#[test]
fn unmap_discards_every_range_or_none() {
    let b = bench();
    let list = unmap_list(&[(1, 2), (8, 1), (9, 0)]);
    good(&b.run(&unmap(list.len()), &list, 0), "UNMAP");
    assert_eq!(b.ops(), vec![Op::Discard { offset: 512, len: 1024 }, Op::Discard { offset: 4096, len: 512 }]);
    good(&b.run(&unmap(0), &[], 0), "an empty parameter list");
    let list = unmap_list(&[(1, 2), (BLOCKS, 1)]);
    check(&b.run(&unmap(list.len()), &list, 0), Sense::LBA_OUT_OF_RANGE, "the second past the end");
    let list = unmap_list(&[(0, 1); 17]);
    check(&b.run(&unmap(list.len()), &list, 0), Sense::INVALID_PARAMETER, "too many descriptors");
    let list = unmap_list(&[(0, MAX_BLOCKS), (0, 1)]);
    check(&b.run(&unmap(list.len()), &list, 0), Sense::INVALID_PARAMETER, "too many blocks");
    check(&b.run(&unmap(4), &[0; 4], 0), Sense::PARAMETER_LENGTH, "a list shorter than its header");
    let list = unmap_list(&[(0, 1)]);
    assert!(b.run(&unmap(list.len()), &list[..10], 0).overrun, "a list shorter than the CDB says");
    let anchor = {
        let mut c = unmap(list.len());
        c[1] = 1;
        c
    };
    check(&b.run(&anchor, &list, 0), Sense::INVALID_FIELD, "ANCHOR");
    check(&bench_with(true, true).run(&unmap(list.len()), &list, 0), Sense::WRITE_PROTECTED, "read-only");
    assert!(b.ops().is_empty(), "nothing was discarded");
}

#[test]
fn mode_sense_shows_the_write_cache() {
    let b = bench();
    let r = b.run(&cdb(&[0x1a, 0, 0x08, 0, 255, 0]), &[], 255);
    good(&r, "MODE SENSE(6), caching page");
    assert_eq!(r.data.len(), 4 + 8 + 20, "header, block descriptor, page");
    assert_eq!((r.data[0] as usize, r.data[2], r.data[3]), (r.data.len() - 1, 0, 8));
    assert_eq!(&r.data[4..8], &(BLOCKS as u32).to_be_bytes(), "blocks in the descriptor");
    assert_eq!((r.data[12], r.data[13], r.data[14] & 0x04), (0x08, 18, 0x04), "WCE");
    let r = b.run(&cdb(&[0x1a, 0x08, 0x3f, 0, 255, 0]), &[], 255);
    assert_eq!(r.data.len(), 4 + 20 + 12, "all pages, no block descriptor (DBD)");
    assert_eq!((r.data[4], r.data[24]), (0x08, 0x0a));
    let r = b.run(&cdb(&[0x5a, 0, 0x0a, 0, 0, 0, 0, 0, 255, 0]), &[], 255);
    good(&r, "MODE SENSE(10), control page");
    assert_eq!(r.data.len(), 8 + 8 + 12);
    assert_eq!(u16::from_be_bytes([r.data[0], r.data[1]]) as usize, r.data.len() - 2);
    assert_eq!(r.data[16], 0x0a);
    let r = b.run(&cdb(&[0x1a, 0, 0x48, 0, 255, 0]), &[], 255);
    assert_eq!(r.data[14] & 0x04, 0, "nothing is changeable");
    let r = b.run(&cdb(&[0x1a, 0, 0x08, 0, 4, 0]), &[], 255);
    assert_eq!((r.data.len(), r.data[0]), (4, 31), "cut, with the whole length in the header");
    check(&b.run(&cdb(&[0x1a, 0, 0xc8, 0, 255, 0]), &[], 255), Sense::SAVING_NOT_SUPPORTED, "saved values");
    check(&b.run(&cdb(&[0x1a, 0, 0x01, 0, 255, 0]), &[], 255), Sense::INVALID_FIELD, "a page it lacks");
    check(&b.run(&cdb(&[0x1a, 0, 0x08, 1, 255, 0]), &[], 255), Sense::INVALID_FIELD, "a subpage");
    good(&b.run(&cdb(&[0x1a, 0, 0x3f, 0xff, 255, 0]), &[], 255), "all pages and subpages");

    let ro = bench_with(true, false);
    let r = ro.run(&cdb(&[0x1a, 0, 0x08, 0, 255, 0]), &[], 255);
    assert_eq!((r.data[2] & 0x80, r.data[14] & 0x04), (0x80, 0), "write-protected, no write cache");
}

#[test]
fn without_a_write_cache_every_write_is_flushed() {
    let b = bench_with(false, false);
    good(&b.run(&write16(0, 1, 0), &[7; 512], 0), "WRITE(16)");
    good(&b.run(&write_same(true, 0, 1, 1), &[7; 512], 0), "WRITE SAME(16)");
    let ops = b.ops();
    assert_eq!(ops.len(), 4, "{ops:?}");
    assert_eq!((&ops[1], &ops[3]), (&Op::Flush, &Op::Flush));
}

#[test]
fn report_luns_and_luns_without_a_disk() {
    let b = bench();
    for lun in [2, 0, 7] {
        let r = b.run_at(lun, &cdb(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), &[], 256);
        good(&r, "REPORT LUNS at any LUN");
        assert_eq!(r.data, [0, 0, 0, 8, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0], "LUN 2");
    }
    let r = b.run(&cdb(&[0xa0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0]), &[], 256);
    assert_eq!(r.data, [0; 8], "no well-known LUNs");
    check(&b.run(&cdb(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]), &[], 256), Sense::INVALID_FIELD, "alloc < 16");
    check(&b.run(&cdb(&[0xa0, 0, 9, 0, 0, 0, 0, 0, 1, 0, 0, 0]), &[], 256), Sense::INVALID_FIELD, "select report 9");

    let r = b.run_at(0, &cdb(&[0x12, 0, 0, 0, 36, 0]), &[], 36);
    good(&r, "INQUIRY at a LUN without a disk");
    assert_eq!(r.data[0], 0x7f, "peripheral qualifier 3: nothing here");
    check(&b.run_at(0, &cdb(&[0x00]), &[], 0), Sense::LUN_NOT_SUPPORTED, "TEST UNIT READY");
    check(&b.run_at(0, &read10(0, 1), &[], 512), Sense::LUN_NOT_SUPPORTED, "READ(10)");
    let r = b.run_at(0, &cdb(&[0x03, 0, 0, 0, 18, 0]), &[], 18);
    good(&r, "REQUEST SENSE at a LUN without a disk");
    assert_eq!((r.data[2], r.data[12]), (sense::ILLEGAL_REQUEST, 0x25), "says LOGICAL UNIT NOT SUPPORTED");
}

#[test]
fn simple_commands_and_unknown_ones() {
    let b = bench();
    good(&b.run(&cdb(&[0x00]), &[], 0), "TEST UNIT READY");
    good(&b.run(&cdb(&[0x1b, 0, 0, 0, 1, 0]), &[], 0), "START STOP UNIT");
    let r = b.run(&cdb(&[0x03, 0, 0, 0, 252, 0]), &[], 252);
    good(&r, "REQUEST SENSE");
    assert_eq!((r.data.len(), r.data[0], r.data[2]), (18, 0x70, sense::NO_SENSE));
    assert_eq!(b.run(&cdb(&[0x03, 0, 0, 0, 8, 0]), &[], 252).data.len(), 8, "cut to the allocation length");
    check(&b.run(&cdb(&[0x03, 1, 0, 0, 252, 0]), &[], 252), Sense::INVALID_FIELD, "descriptor format");
    // PREVENT ALLOW MEDIUM REMOVAL, VERIFY, MODE SELECT, FORMAT UNIT, vendor-specific and
    // reserved groups, and an empty CDB area.
    for op in [0x1e, 0x2f, 0x15, 0x55, 0x04, 0x8f, 0xc0, 0xff, 0x60, 0xe0, 0x7f, 0x9e ^ 0x01] {
        check(&b.run(&cdb(&[op]), &[], 512), Sense::INVALID_OPCODE, &format!("opcode {op:#x}"));
    }
    check(
        &b.target().command(2, &[], Buffers { out: &mut &[][..], out_len: 0, in_len: 0 }),
        Sense::INVALID_OPCODE,
        "empty",
    );
    // A CDB area shorter than the command (a driver that set cdb_size to 6).
    check(&b.run_at(2, &read10(0, 1)[..6], &[], 512), Sense::INVALID_FIELD, "a 10-byte command in 6 bytes");
    assert!(b.ops().is_empty());
}

/// Storage that fails every request.
struct Broken;

impl block::Backend for Broken {
    fn size(&self) -> u64 {
        BLOCKS * BLOCK
    }
    fn readonly(&self) -> bool {
        false
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> Result<(), BackendError> {
        Err(BackendError::ReadOnly)
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<(), BackendError> {
        Err(BackendError::ReadOnly)
    }
    fn flush(&self) -> Result<(), BackendError> {
        Err(BackendError::ReadOnly)
    }
    fn write_zeroes(&self, _: u64, _: u64) -> Result<(), BackendError> {
        Err(BackendError::ReadOnly)
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), BackendError> {
        Err(BackendError::ReadOnly)
    }
}

#[test]
fn failing_storage_is_a_medium_error_and_nothing_is_reported() {
    let slot = Arc::new(ObserverSlot::default());
    let watcher = slot.get_or_install(|| Arc::new(Watcher::default())).unwrap();
    let io = Arc::new(DiskIo::new(Arc::new(Broken), 0, "disk0", slot.clone()));
    let scsi = Scsi::new(vec![ScsiDisk { io, lun: 0, serial: "x".into(), write_cache: true }], slot).unwrap();
    let run = |c: &[u8], mut out: &[u8], in_len| {
        let out_len = out.len();
        scsi.target().command(0, c, Buffers { out: &mut out, out_len, in_len })
    };
    check(&run(&read10(0, 1), &[], 512), Sense::READ_ERROR, "READ");
    check(&run(&write16(0, 1, 0), &[1; 512], 0), Sense::WRITE_ERROR, "WRITE");
    check(&run(&cdb(&[0x35]), &[], 0), Sense::WRITE_ERROR, "SYNCHRONIZE CACHE");
    check(&run(&write_same(true, 0x08, 0, 1), &[0; 512], 0), Sense::WRITE_ERROR, "WRITE SAME");
    let list = unmap_list(&[(0, 1)]);
    check(&run(&unmap(list.len()), &list, 0), Sense::WRITE_ERROR, "UNMAP");
    assert!(watcher.take().is_empty(), "a failed request changed nothing the standby must repeat");
}

#[test]
fn two_disks_at_one_lun_are_refused() {
    let slot = Arc::new(ObserverSlot::default());
    let unit = |lun| {
        let io = Arc::new(DiskIo::new(Arc::new(Broken), 0, "disk0", slot.clone()));
        ScsiDisk { io, lun, serial: String::new(), write_cache: true }
    };
    let e = Scsi::new(vec![unit(1), unit(1)], slot.clone()).err().unwrap();
    assert_eq!(e, "two disks at LUN 1");
    assert!(Scsi::new(vec![unit(256)], slot).is_err());
}
