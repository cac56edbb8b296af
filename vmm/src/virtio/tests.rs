//! The transport and virtio-rng driven as a guest driver would, through BAR accesses and guest
//! memory, including drivers that break the rules.

use super::rng::Rng;
use super::*;
use crate::devices::observer::ObserverSlot;
use crate::devices::DiskObserver;
use crate::dirty::{Bitmap, PAGE_SIZE};
use crate::memory::GuestMemory;
use block::{BackendError, Op};
use std::sync::atomic::{AtomicBool, Ordering};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUF: u64 = 0x10000;
const SIZE: u16 = 16;

struct Driver<D = Rng> {
    mem: Arc<GuestMemory>,
    dev: Arc<VirtioPci<D>>,
    avail_idx: u16,
}

impl Driver {
    fn new() -> Driver {
        Driver::with("virtio-rng", Rng)
    }
}

impl<D: VirtioDevice> Driver<D> {
    fn with(name: &'static str, device: D) -> Driver<D> {
        let mem = Arc::new(GuestMemory::new(1 << 20).unwrap());
        let dev = VirtioPci::new(name, device, 0xe000_0000, mem.device_view().unwrap(), None);
        Driver { mem, dev, avail_idx: 0 }
    }

    fn w(&self, off: u64, v: u64, len: usize) {
        self.dev.bar_write(0, off, &v.to_le_bytes()[..len]);
    }

    fn r(&self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn status(&self) -> u8 {
        self.r(0x14, 1) as u8
    }

    /// The standard init sequence, with a queue of SIZE entries.
    fn init(&mut self) {
        self.w(0x14, 0, 1);
        self.w(0x14, 1 | 2, 1);
        self.w(0x00, 1, 4);
        assert_eq!(self.r(0x04, 4), 1, "VIRTIO_F_VERSION_1 offered");
        self.w(0x08, 1, 4);
        self.w(0x0c, 1, 4);
        self.w(0x14, 1 | 2 | 8, 1);
        assert_eq!(self.status() & 8, 8, "FEATURES_OK accepted");
        self.w(0x16, 0, 2);
        assert_eq!(self.r(0x18, 2), 256, "the queue's largest size");
        self.w(0x18, u64::from(SIZE), 2);
        self.w(0x20, DESC, 8);
        self.w(0x28, AVAIL, 4);
        self.w(0x2c, 0, 4);
        self.w(0x30, USED, 8);
        self.w(0x1c, 1, 2);
        self.w(0x14, 1 | 2 | 4 | 8, 1);
        self.avail_idx = 0;
    }

    /// Sets up queue `q` with `size` entries and its rings at (descriptors, available, used).
    fn setup_queue(&self, q: usize, size: u16, (desc, avail, used): (u64, u64, u64)) {
        self.w(0x16, q as u64, 2);
        self.w(0x18, u64::from(size), 2);
        self.w(0x20, desc, 8);
        self.w(0x28, avail, 8);
        self.w(0x30, used, 8);
        self.w(0x1c, 1, 2);
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + 16 * u64::from(i);
        self.mem.write(at, &addr.to_le_bytes()).unwrap();
        self.mem.write(at + 8, &len.to_le_bytes()).unwrap();
        self.mem.write(at + 12, &flags.to_le_bytes()).unwrap();
        self.mem.write(at + 14, &next.to_le_bytes()).unwrap();
    }

    fn offer(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % SIZE);
        self.mem.write(slot, &head.to_le_bytes()).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.write(AVAIL + 2, &self.avail_idx.to_le_bytes()).unwrap();
        self.w(NOTIFY, 0, 2);
    }

    fn used(&self) -> (u16, Vec<(u32, u32)>) {
        let mut b = [0u8; 2];
        self.mem.read(USED + 2, &mut b).unwrap();
        let idx = u16::from_le_bytes(b);
        let entries = (0..idx.min(SIZE))
            .map(|i| {
                let mut e = [0u8; 8];
                self.mem.read(USED + 4 + 8 * u64::from(i), &mut e).unwrap();
                (u32::from_le_bytes(e[..4].try_into().unwrap()), u32::from_le_bytes(e[4..].try_into().unwrap()))
            })
            .collect();
        (idx, entries)
    }
}

const WRITE: u16 = 2;
const NEXT: u16 = 1;

mod balloon;
mod console;
mod net;
mod scsi;
mod scsi_cdb;

#[test]
fn entropy_reaches_guest_buffers_and_marks_them_dirty() {
    let mut d = Driver::new();
    d.init();
    d.mem.take_vmm_dirty(&mut Bitmap::new(256));
    d.mem.fill(BUF, 0x3000, 0xaa).unwrap();
    d.mem.take_vmm_dirty(&mut Bitmap::new(256));
    d.desc(0, BUF, 100, WRITE | NEXT, 1);
    d.desc(1, BUF + 0x1000, 0x1000, WRITE, 0);
    d.offer(0);
    assert_eq!(d.used(), (1, vec![(0, 100 + 0x1000)]));
    let mut got = vec![0u8; 0x1000];
    d.mem.read(BUF + 0x1000, &mut got).unwrap();
    assert!(got.iter().filter(|&&b| b == 0xaa).count() < 100, "filled with entropy");
    let mut after = [0u8; 1];
    d.mem.read(BUF + 100, &mut after).unwrap();
    assert_eq!(after[0], 0xaa, "nothing written past the first buffer's length");
    let mut dirty = Bitmap::new(256);
    d.mem.take_vmm_dirty(&mut dirty);
    let pages: Vec<u64> = dirty.iter().collect();
    for p in [BUF / PAGE_SIZE, BUF / PAGE_SIZE + 1, USED / PAGE_SIZE] {
        assert!(pages.contains(&p), "page {p} written by the device is dirty: {pages:?}");
    }
    assert_eq!(d.r(ISR, 1), 1, "queue interrupt reason");
    assert_eq!(d.r(ISR, 1), 0, "reading the ISR clears it");
}

#[test]
fn rule_breaking_drivers_get_needs_reset_and_recover_after_a_reset() {
    type BreakIt<'a> = &'a dyn Fn(&mut Driver<Rng>);
    let cases: [(&str, BreakIt); 4] = [
        ("buffer outside memory", &|d| {
            d.desc(0, 1 << 40, 64, WRITE, 0);
            d.offer(0);
        }),
        ("descriptor loop", &|d| {
            d.desc(0, BUF, 64, WRITE | NEXT, 1);
            d.desc(1, BUF + 64, 64, WRITE | NEXT, 0);
            d.offer(0);
        }),
        ("next index outside the table", &|d| {
            d.desc(0, BUF, 64, WRITE | NEXT, 999);
            d.offer(0);
        }),
        ("available index far ahead of the ring", &|d| {
            d.mem.write(AVAIL + 2, &500u16.to_le_bytes()).unwrap();
            d.w(NOTIFY, 0, 2);
        }),
    ];
    for (what, break_it) in cases {
        let mut d = Driver::new();
        d.init();
        break_it(&mut d);
        assert_eq!(d.status() & NEEDS_RESET, NEEDS_RESET, "{what}");
        // Nothing more is processed until a reset...
        d.desc(2, BUF, 8, WRITE, 0);
        let before = d.used().0;
        d.offer(2);
        assert_eq!(d.used().0, before, "{what}: a broken device processes nothing");
        // ...after which the device works again.
        d.mem.fill(0, 0x10000, 0).unwrap();
        d.init();
        assert_eq!(d.status() & NEEDS_RESET, 0, "{what}");
        d.desc(0, BUF, 8, WRITE, 0);
        d.offer(0);
        assert_eq!(d.used(), (1, vec![(0, 8)]), "{what}");
    }
}

#[test]
fn nonsense_registers_and_features_are_refused_without_harm() {
    let mut d = Driver::new();
    d.w(0x14, 1 | 2, 1);
    d.w(0x08, 1, 4);
    d.w(0x0c, 0, 4); // no VERSION_1
    d.w(0x08, 0, 4);
    d.w(0x0c, 0xffff_ffff, 4); // features never offered
    d.w(0x14, 1 | 2 | 8, 1);
    assert_eq!(d.status() & 8, 0, "FEATURES_OK refused");
    d.w(0x16, 7, 2); // no such queue
    assert_eq!(d.r(0x18, 2), 0);
    d.w(0x18, 16, 2);
    d.w(0x16, 0, 2);
    d.w(0x18, 3, 2); // not a power of two
    assert_eq!(d.r(0x18, 2), 256, "size unchanged");
    d.w(NOTIFY + 4 * 9, 0, 2); // notify a queue that does not exist
    d.w(0x7ff0, 0, 4); // nothing there
    d.w(0x20, 0xf_ff00, 8); // a table running past the end of memory, enabled, then DRIVER_OK
    d.w(0x1c, 1, 2);
    d.w(0x14, 1 | 2 | 4, 1);
    assert_eq!(d.status() & NEEDS_RESET, NEEDS_RESET, "an invalid enabled queue at DRIVER_OK");
    d.init();
    assert_eq!(d.status() & NEEDS_RESET, 0);
}

#[test]
fn state_survives_save_and_restore_mid_use() {
    let mut d = Driver::new();
    d.init();
    d.desc(0, BUF, 32, WRITE, 0);
    d.offer(0);
    let saved = d.dev.save().unwrap();
    let copy = Driver {
        mem: d.mem.clone(),
        dev: VirtioPci::new("virtio-rng", Rng, 0xe000_0000, d.mem.device_view().unwrap(), None),
        avail_idx: d.avail_idx,
    };
    copy.dev.restore(1, &saved).unwrap();
    assert_eq!(copy.dev.save().unwrap(), saved);
    let mut copy = copy;
    copy.desc(1, BUF + 64, 16, WRITE, 0);
    copy.offer(1);
    assert_eq!(copy.used(), (2, vec![(0, 32), (1, 16)]), "the restored device carries on where it was");
    assert!(copy.dev.restore(1, &saved[..saved.len() / 2]).is_err(), "truncated state is refused");
    assert!(copy.dev.restore(2, &saved).is_err(), "unknown version is refused");
}

// ---- virtio-blk ----

/// A disk in memory.
struct MemDisk {
    data: std::sync::Mutex<Vec<u8>>,
    readonly: bool,
    /// Write-zeroes the guest allowed to unmap.
    unmapped: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl block::Backend for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn readonly(&self) -> bool {
        self.readonly
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), BackendError> {
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn write_zeroes_may_unmap(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.unmapped.lock().unwrap().push((offset, len));
        self.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.write_zeroes(offset, len)
    }
}

const HDR: u64 = 0x20000;
const DATA: u64 = 0x21000;
const STATUS: u64 = 0x30000;

/// An observer that keeps what it is told and holds the disks when asked to.
#[derive(Default)]
struct Watcher {
    ops: std::sync::Mutex<Vec<(u32, Op)>>,
    hold: AtomicBool,
}

impl DiskObserver for Watcher {
    fn completed(&self, disk: u32, op: Op) {
        self.ops.lock().unwrap().push((disk, op));
    }
    fn hold(&self) -> bool {
        self.hold.load(Ordering::SeqCst)
    }
}

impl Watcher {
    fn take(&self) -> Vec<(u32, Op)> {
        std::mem::take(&mut *self.ops.lock().unwrap())
    }
}

/// A disk, and the slot its observer goes in (empty).
fn blk_with_slot(readonly: bool) -> (Driver<super::blk::Blk>, Arc<MemDisk>, Arc<ObserverSlot>) {
    let disk =
        Arc::new(MemDisk { data: std::sync::Mutex::new(vec![0xee; 64 << 10]), readonly, unmapped: Default::default() });
    let slot = Arc::new(ObserverSlot::default());
    let mut d = Driver::with("virtio-blk", super::blk::Blk::new(disk.clone(), 0, slot.clone(), "smpft-disk0"));
    d.init();
    (d, disk, slot)
}

fn blk(readonly: bool) -> (Driver<super::blk::Blk>, Arc<MemDisk>) {
    let (d, disk, _) = blk_with_slot(readonly);
    (d, disk)
}

/// One request: header, then the data buffer (device-readable for writes, writable for
/// reads), then the status byte. Returns (status, used length).
fn request(d: &mut Driver<super::blk::Blk>, kind: u32, sector: u64, data: Option<(&[u8], bool)>) -> (u8, u32) {
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    d.mem.write(HDR, &hdr).unwrap();
    d.mem.write(STATUS, &[0xff]).unwrap();
    let head = (d.avail_idx * 3) % SIZE;
    let next = |i: u16| (head + i) % SIZE;
    match data {
        Some((bytes, device_writes)) => {
            d.desc(next(0), HDR, 16, NEXT, next(1));
            d.mem.write(DATA, bytes).unwrap();
            d.desc(next(1), DATA, bytes.len() as u32, NEXT | if device_writes { WRITE } else { 0 }, next(2));
            d.desc(next(2), STATUS, 1, WRITE, 0);
        }
        None => {
            d.desc(next(0), HDR, 16, NEXT, next(1));
            d.desc(next(1), STATUS, 1, WRITE, 0);
        }
    }
    let before = d.used().0;
    d.offer(head);
    let (idx, entries) = d.used();
    assert_eq!(idx, before + 1, "the request completed");
    let mut st = [0u8; 1];
    d.mem.read(STATUS, &mut st).unwrap();
    (st[0], entries.last().map_or(0, |e| e.1))
}

#[test]
fn blk_reads_writes_flushes_and_identifies_itself() {
    let (mut d, disk) = blk(false);
    assert_eq!(d.r(DEVICE_CFG, 8), (64 << 10) / 512, "capacity in sectors");
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(request(&mut d, 1, 4, Some((&data, false))), (0, 1), "write: only the status byte is written back");
    assert_eq!(&disk.data.lock().unwrap()[2048..3072], &data[..]);
    d.mem.fill(DATA, 1024, 0).unwrap();
    assert_eq!(request(&mut d, 0, 4, Some((&[0u8; 1024], true))), (0, 1025));
    let mut back = vec![0u8; 1024];
    d.mem.read(DATA, &mut back).unwrap();
    assert_eq!(back, data, "read returns what was written");
    assert_eq!(request(&mut d, 4, 0, None), (0, 1), "flush");
    assert_eq!(request(&mut d, 8, 0, Some((&[0u8; 20], true))), (0, 21), "get-id");
    let mut id = [0u8; 11];
    d.mem.read(DATA, &mut id).unwrap();
    assert_eq!(&id, b"smpft-disk0");
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&4u64.to_le_bytes());
    seg[8..12].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(request(&mut d, 13, 0, Some((&seg, false))), (0, 1), "write-zeroes");
    assert!(disk.data.lock().unwrap()[2048..2560].iter().all(|&b| b == 0));
    assert_eq!(&disk.data.lock().unwrap()[2560..2570], &data[512..522], "only the one sector");
}

#[test]
fn blk_refuses_bad_requests_with_a_status_and_carries_on() {
    let (mut d, disk) = blk(false);
    let before = disk.data.lock().unwrap().clone();
    assert_eq!(request(&mut d, 1, 127, Some((&[1u8; 1024], false))).0, 1, "past the end");
    assert_eq!(request(&mut d, 1, u64::MAX / 2, Some((&[1u8; 512], false))).0, 1, "sector overflow");
    assert_eq!(request(&mut d, 1, 0, Some((&[1u8; 100], false))).0, 1, "not whole sectors");
    assert_eq!(request(&mut d, 0, 200, Some((&[0u8; 512], true))).0, 1, "read past the end");
    assert_eq!(request(&mut d, 99, 0, None).0, 2, "unknown type: unsupported");
    assert_eq!(*disk.data.lock().unwrap(), before, "nothing was written");
    assert_eq!(d.status() & NEEDS_RESET, 0, "a bad request is not a broken driver");
    assert_eq!(request(&mut d, 1, 0, Some((&[5u8; 512], false))), (0, 1), "and the device still works");

    let (mut ro, rodisk) = blk(true);
    ro.w(0x00, 0, 4);
    assert_eq!(ro.r(0x04, 4) & (1 << 5), 1 << 5, "VIRTIO_BLK_F_RO offered");
    assert_eq!(request(&mut ro, 1, 0, Some((&[1u8; 512], false))).0, 1, "a read-only disk refuses writes");
    assert_eq!(rodisk.data.lock().unwrap()[0], 0xee);
}

/// Writes one sector without waiting for its completion; returns the head.
fn offer_write(d: &mut Driver<super::blk::Blk>, sector: u64, byte: u8) {
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&1u32.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    let head = (d.avail_idx * 3) % SIZE;
    let at = 0x40000 + u64::from(head) * 0x400;
    d.mem.write(at, &hdr).unwrap();
    d.mem.write(at + 0x100, &[byte; 512]).unwrap();
    d.desc(head, at, 16, NEXT, (head + 1) % SIZE);
    d.desc((head + 1) % SIZE, at + 0x100, 512, NEXT, (head + 2) % SIZE);
    d.desc((head + 2) % SIZE, at + 0x3f0, 1, WRITE, 0);
    d.offer(head);
}

/// VIRTIO_BLK_T_WRITE_ZEROES with VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP lets the disk free the
/// range; without it the disk must keep it allocated. Both read as zeroes.
#[test]
fn blk_write_zeroes_passes_the_guests_unmap_flag_on() {
    let (mut d, disk, _slot) = blk_with_slot(false);
    for (sector, flags) in [(2u64, 0u32), (4, 1)] {
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&2u32.to_le_bytes());
        seg[12..].copy_from_slice(&flags.to_le_bytes());
        assert_eq!(request(&mut d, 13, 0, Some((&seg, false))), (0, 1), "write-zeroes, flags {flags}");
    }
    assert_eq!(*disk.unmapped.lock().unwrap(), vec![(2048, 1024)], "only the request with the flag may unmap");
    assert!(disk.data.lock().unwrap()[1024..3072].iter().all(|&b| b == 0));
}

#[test]
fn blk_reports_what_it_changes_and_waits_while_held() {
    let (mut d, disk, slot) = blk_with_slot(false);
    offer_write(&mut d, 0, 1);
    assert_eq!(disk.data.lock().unwrap()[0], 1, "without an observer the disk just serves");
    let watcher = slot.get_or_install(|| Arc::new(Watcher::default())).unwrap();
    offer_write(&mut d, 1, 2);
    assert_eq!(request(&mut d, 4, 0, None), (0, 1));
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&2u64.to_le_bytes());
    seg[8..12].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(request(&mut d, 11, 0, Some((&seg, false))), (0, 1), "discard");
    assert_eq!(
        watcher.take(),
        vec![
            (0, Op::Write { offset: 512, data: vec![2; 512] }),
            (0, Op::Flush),
            (0, Op::Discard { offset: 1024, len: 512 })
        ]
    );
    watcher.hold.store(true, Ordering::SeqCst);
    let done = d.used().0;
    offer_write(&mut d, 4, 5);
    assert_eq!(d.used().0, done, "the request waits while the observer holds the disk");
    assert_eq!(disk.data.lock().unwrap()[4 * 512], 0xee, "and has not reached the disk");
    assert!(watcher.take().is_empty());
    assert!(d.dev.device().take_deferred());
    watcher.hold.store(false, Ordering::SeqCst);
    d.dev.process_queue(0);
    assert_eq!(d.used().0, done + 1, "served once the observer lets go");
    assert_eq!(disk.data.lock().unwrap()[4 * 512], 5);
    assert_eq!(watcher.take(), vec![(0, Op::Write { offset: 4 * 512, data: vec![5; 512] })]);
}

#[test]
fn blk_chains_without_a_status_byte_break_the_device() {
    let (mut d, _disk) = blk(false);
    d.mem.write(HDR, &[0u8; 16]).unwrap();
    d.desc(0, HDR, 16, 0, 0); // a header and nothing the device may write
    d.offer(0);
    assert_eq!(d.status() & NEEDS_RESET, NEEDS_RESET);
}
