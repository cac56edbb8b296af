//! virtio-balloon driven as a guest driver would: inflating, deflating, statistics, free page
//! reporting and the queue numbering Linux uses, then drivers that break the rules.

use super::super::balloon::{Balloon, BalloonSpec, F_DEFLATE_ON_OOM, F_REPORTING, F_STATS_VQ};
use super::*;
use std::time::{Duration, Instant};

const QSIZE: u16 = 16;
const MEM: u64 = 1 << 20;
/// Pages the tests inflate and report (well clear of the rings at 0x1000..0xd000).
const AREA: u64 = 0x40000;

/// [`Driver`]'s registers, with a ring per queue.
struct B {
    d: Driver<Balloon>,
    mem: Arc<GuestMemory>,
    dev: Arc<VirtioPci<Balloon>>,
    avail: [u16; 4],
    next_desc: [u16; 4],
}

fn ring(q: usize) -> (u64, u64, u64) {
    let base = 0x1000 + 0x3000 * q as u64;
    (base, base + 0x1000, base + 0x2000)
}

impl B {
    fn new(spec: BalloonSpec) -> B {
        let mem = Arc::new(GuestMemory::new(MEM).unwrap());
        let dev = VirtioPci::new(
            "virtio-balloon",
            Balloon::new(spec, mem.clone()),
            0xe000_0000,
            mem.device_view().unwrap(),
            None,
        );
        let d = Driver { mem: mem.clone(), dev: dev.clone(), avail_idx: 0 };
        B { d, mem, dev, avail: [0; 4], next_desc: [0; 4] }
    }

    fn w(&self, off: u64, v: u64, len: usize) {
        self.d.w(off, v, len)
    }

    fn r(&self, off: u64, len: usize) -> u64 {
        self.d.r(off, len)
    }

    fn status(&self) -> u8 {
        self.d.status()
    }

    /// Negotiates `features` and sets up the first `queues` queues.
    fn init(&mut self, features: u64, queues: usize) {
        self.w(0x14, 0, 1);
        self.w(0x14, 1 | 2, 1);
        let all = features | F_VERSION_1;
        for sel in 0..2 {
            self.w(0x08, sel, 4);
            self.w(0x0c, (all >> (32 * sel)) & 0xffff_ffff, 4);
        }
        self.w(0x14, 1 | 2 | 8, 1);
        assert_eq!(self.status() & 8, 8, "FEATURES_OK accepted for {features:#x}");
        for q in 0..queues {
            self.d.setup_queue(q, QSIZE, ring(q));
        }
        self.w(0x14, 1 | 2 | 4 | 8, 1);
    }

    /// Offers one chain of (addr, len, writable) buffers on queue `q` and notifies it.
    fn put(&mut self, q: usize, bufs: &[(u64, u32, bool)]) {
        let (desc, avail, _) = ring(q);
        let head = self.next_desc[q];
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % QSIZE;
            let more = k + 1 < bufs.len();
            let flags = if write { WRITE } else { 0 } | if more { NEXT } else { 0 };
            let at = desc + 16 * u64::from(i);
            self.mem.write(at, &addr.to_le_bytes()).unwrap();
            self.mem.write(at + 8, &len.to_le_bytes()).unwrap();
            self.mem.write(at + 12, &flags.to_le_bytes()).unwrap();
            self.mem.write(at + 14, &((i + 1) % QSIZE).to_le_bytes()).unwrap();
        }
        self.next_desc[q] = (head + bufs.len() as u16) % QSIZE;
        let slot = avail + 4 + 2 * u64::from(self.avail[q] % QSIZE);
        self.mem.write(slot, &head.to_le_bytes()).unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem.write(avail + 2, &self.avail[q].to_le_bytes()).unwrap();
        self.w(NOTIFY + 4 * q as u64, 0, 2);
    }

    fn used(&self, q: usize) -> u16 {
        let mut b = [0u8; 2];
        self.mem.read(ring(q).2 + 2, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    /// Page numbers as the inflate and deflate queues carry them, written at `at`.
    fn pfns(&self, at: u64, pfns: &[u32]) -> (u64, u32, bool) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.mem.write(at, &bytes).unwrap();
        (at, bytes.len() as u32, false)
    }

    fn page_is_zero(&self, addr: u64) -> bool {
        let mut b = vec![0u8; 4096];
        self.mem.read(addr, &mut b).unwrap();
        b.iter().all(|&x| x == 0)
    }
}

#[test]
fn inflated_pages_are_released_and_read_as_zero_and_actual_follows_the_driver() {
    let mut b = B::new(BalloonSpec::default());
    assert_eq!(b.dev.device().features(), F_STATS_VQ, "statistics, and nothing not asked for");
    b.init(F_STATS_VQ, 3);
    b.mem.fill(AREA, 16 * 4096, 0x5a).unwrap();
    // The host asks for 64 KiB back; the driver reads num_pages and is told of the change.
    b.dev.set_target(MEM - (16 << 12));
    assert_eq!((b.r(DEVICE_CFG, 4), b.r(0x15, 1)), (16, 1), "num_pages, and a new config generation");
    assert_eq!(b.r(ISR, 1) & 2, 2, "a configuration interrupt");
    b.mem.take_vmm_dirty(&mut Bitmap::new(256));
    let pages: Vec<u32> = (0..16).map(|i| (AREA >> 12) as u32 + i).collect();
    let buf = b.pfns(0x20000, &pages);
    b.put(0, &[buf]);
    assert_eq!(b.used(0), 1);
    let data = b.mem.data_ranges();
    assert!(!data.iter().any(|&(s, e)| s < AREA + 16 * 4096 && e > AREA), "the host released them: {data:x?}");
    assert!((0..16).all(|i| b.page_is_zero(AREA + i * 4096)), "inflated pages read as zero");
    let mut dirty = Bitmap::new(256);
    b.mem.take_vmm_dirty(&mut dirty);
    assert!((0..16).all(|i| dirty.iter().any(|p| p == (AREA >> 12) + i)), "released pages are dirty");
    let changes = b.dev.device().changes();
    b.w(DEVICE_CFG + 4, 16, 4);
    assert_eq!(b.dev.device().actual(), MEM - (16 << 12));
    assert!(changes.try_recv().is_ok(), "a change of actual is announced");
    b.w(DEVICE_CFG + 4, 16, 4);
    assert!(changes.try_recv().is_err(), "the same value is no change");
    // Deflating: the pages come back (still zero), actual goes down.
    b.dev.set_target(MEM * 2);
    assert_eq!(b.r(DEVICE_CFG, 4), 0, "a target above the memory size asks for nothing");
    let buf = b.pfns(0x21000, &pages);
    b.put(1, &[buf]);
    assert_eq!(b.used(1), 1);
    b.w(DEVICE_CFG + 4, 0, 4);
    assert_eq!(b.dev.device().actual(), MEM);
    assert_eq!(b.status() & NEEDS_RESET, 0);
}

#[test]
fn queues_are_numbered_as_linux_numbers_them() {
    // Free page reporting without statistics: the reporting queue is the third.
    let spec = BalloonSpec { deflate_on_oom: true, free_page_reporting: true };
    let mut b = B::new(spec);
    assert_eq!(b.dev.device().features(), F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING);
    b.init(F_REPORTING, 3);
    b.mem.fill(AREA, 8 * 4096, 0x77).unwrap();
    b.put(2, &[(AREA, 4 * 4096, true), (AREA + 0x6000, 2 * 4096, true)]);
    assert_eq!((b.used(2), b.status() & NEEDS_RESET), (1, 0));
    for (page, zero) in [(0, true), (3, true), (4, false), (5, false), (6, true), (7, true)] {
        assert_eq!(b.page_is_zero(AREA + page * 4096), zero, "page {page}");
    }
    // With statistics too, reporting moves to the fourth queue.
    let mut b = B::new(spec);
    b.init(F_STATS_VQ | F_REPORTING, 4);
    b.mem.fill(AREA, 4096, 0x77).unwrap();
    b.put(3, &[(AREA, 4096, true)]);
    assert!(b.page_is_zero(AREA) && b.used(3) == 1);
}

fn stat(tag: u16, v: u64) -> Vec<u8> {
    let mut b = tag.to_le_bytes().to_vec();
    b.extend_from_slice(&v.to_le_bytes());
    b
}

#[test]
fn statistics_are_held_and_given_back_each_polling_interval_but_not_while_paused() {
    let mut b = B::new(BalloonSpec::default());
    b.init(F_STATS_VQ, 3);
    assert!(b.dev.device().stats().is_none(), "nothing reported yet");
    let body: Vec<u8> = [stat(5, 64 << 20), stat(4, 40 << 20), stat(99, 1)].concat();
    b.mem.write(0x30000, &body).unwrap();
    b.put(2, &[(0x30000, body.len() as u32, false)]);
    assert_eq!(b.used(2), 0, "the buffer is held");
    let s = b.dev.device().stats().unwrap();
    let get = |n: &str| s.values.iter().find(|(k, _)| *k == n).unwrap().1;
    assert_eq!(
        (get("stat-total-memory"), get("stat-free-memory"), get("stat-swap-in")),
        (Some(64 << 20), Some(40 << 20), None)
    );
    assert!(s.last_update > 0);
    // No polling yet: nothing is due.
    assert!(b.dev.device().due().is_none());
    b.dev.tick(Instant::now() + Duration::from_secs(3600));
    assert_eq!(b.used(2), 0);
    b.dev.device().set_poll_interval(2);
    let due = b.dev.device().due().expect("due once polling");
    b.dev.tick(due - Duration::from_millis(1));
    assert_eq!(b.used(2), 0, "not before its time");
    Component::pause(&*b.dev);
    assert!(b.dev.device().due().is_none(), "nothing is due while paused");
    b.dev.tick(due + Duration::from_secs(1));
    assert_eq!(b.used(2), 0, "nothing written while paused");
    Component::resume(&*b.dev);
    b.dev.tick(due);
    assert_eq!(b.used(2), 1, "given back for a refill");
    assert!(b.dev.device().due().is_none(), "nothing held, nothing due");
    b.put(2, &[(0x30000, body.len() as u32, false)]);
    assert!(b.dev.device().due().unwrap() > due, "the next poll is an interval later");
}

#[test]
fn the_balloon_state_travels_with_the_device() {
    let mut a = B::new(BalloonSpec { deflate_on_oom: true, free_page_reporting: false });
    a.init(F_STATS_VQ | F_DEFLATE_ON_OOM, 3);
    a.dev.set_target(MEM / 2);
    a.w(DEVICE_CFG + 4, 32, 4);
    a.dev.device().set_poll_interval(5);
    let body = stat(5, 1 << 20);
    a.mem.write(0x30000, &body).unwrap();
    a.put(2, &[(0x30000, 10, false)]);
    let state = a.dev.save().unwrap();
    // The standby's device was made without the options: the VM's come with its state.
    let b = B::new(BalloonSpec::default());
    b.dev.restore(a.dev.version(), &state).unwrap();
    let (da, db) = (a.dev.device(), b.dev.device());
    assert_eq!((db.target(), db.actual(), db.poll_interval()), (MEM / 2, MEM - (32 << 12), 5));
    assert_eq!((db.stats(), db.features()), (da.stats(), da.features()));
    assert!(db.due().is_some(), "the held buffer is given back at the next poll");
    b.dev.tick(Instant::now() + Duration::from_secs(6));
    assert_eq!(b.used(2), 1, "the restored device gives the held buffer back");
    // Free page reporting changes the queues: refused.
    let c = B::new(BalloonSpec { deflate_on_oom: false, free_page_reporting: true });
    let e = c.dev.restore(a.dev.version(), &state).unwrap_err().to_string();
    assert!(e.contains("3 queues, the device has 4"), "{e}");
}

#[test]
fn each_bad_request_gets_needs_reset_and_nothing_more() {
    type BreakIt<'a> = &'a dyn Fn(&mut B);
    let spec = BalloonSpec { deflate_on_oom: false, free_page_reporting: true };
    let cases: [(&str, BreakIt); 9] = [
        ("page outside memory", &|b| {
            let buf = b.pfns(0x20000, &[(MEM >> 12) as u32]);
            b.put(0, &[buf]);
        }),
        ("deflating a page outside memory", &|b| {
            let buf = b.pfns(0x20000, &[u32::MAX]);
            b.put(1, &[buf]);
        }),
        ("a short page number", &|b| b.put(0, &[(0x20000, 6, false)])),
        ("a writable buffer on the inflate queue", &|b| b.put(0, &[(0x20000, 8, true)])),
        ("a buffer outside memory", &|b| b.put(0, &[(1 << 40, 8, false)])),
        ("a stats buffer of 15 bytes", &|b| b.put(2, &[(0x30000, 15, false)])),
        ("a writable stats buffer", &|b| b.put(2, &[(0x30000, 10, true)])),
        ("a readable reporting buffer", &|b| b.put(3, &[(AREA, 4096, false)])),
        ("a reported range that is not whole pages", &|b| b.put(3, &[(AREA + 8, 4096, true)])),
    ];
    for (what, break_it) in cases {
        let mut b = B::new(spec);
        b.init(F_STATS_VQ | F_REPORTING, 4);
        b.mem.fill(AREA, 4096, 0x33).unwrap();
        break_it(&mut b);
        assert_eq!(b.status() & NEEDS_RESET, NEEDS_RESET, "{what}");
        let buf = b.pfns(0x21000, &[(AREA >> 12) as u32]);
        b.put(0, &[buf]);
        assert!(!b.page_is_zero(AREA), "{what}: a device that needs a reset does nothing");
    }
    // A queue the negotiated features leave without a role.
    let mut b = B::new(spec);
    b.init(F_STATS_VQ, 4);
    b.put(3, &[(AREA, 4096, true)]);
    assert_eq!(b.status() & NEEDS_RESET, NEEDS_RESET, "the fourth queue without reporting");
    // Reporting beyond memory.
    let mut b = B::new(spec);
    b.init(F_STATS_VQ | F_REPORTING, 4);
    b.put(3, &[(MEM - 4096, 2 * 4096, true)]);
    assert_eq!(b.status() & NEEDS_RESET, NEEDS_RESET, "a reported range beyond memory");
}
