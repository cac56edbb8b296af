//! `balloon`: vCPU 0 drives a virtio-balloon device (virtio 1.2 section 5.5) over an area of free
//! memory it reserves (every page written with a pattern first, so the host holds it):
//! - it follows `num_pages`: it inflates with pages from the bottom of the area (their numbers
//!   on the inflate queue) and deflates from the top of what it holds, then checks that every
//!   page it got back reads as zero (the host released it) and writes the pattern again;
//! - it sets `actual` to the pages it holds and logs `balloon: actual=N target=M` each time the
//!   two meet;
//! - with statistics negotiated it keeps a buffer on the statistics queue with its figures
//!   (total memory less the balloon, the free part of the area) and refills it each time the
//!   device gives it back;
//! - with free page reporting negotiated it reports the top half of the area as free once, and
//!   checks those pages then read as zero (one page of each report: reading takes the page back).
//!
//! Queues are numbered by presence, as Linux numbers them: inflate 0, deflate 1, then statistics
//! and reporting if negotiated.

use crate::abi::{EXIT_DEVICE_FAILED, EXIT_NO_DEVICE, VIRTIO_TYPE_BALLOON};
use crate::sync::Locked;
use crate::virtio::{self, Buf, Device, Queue};
use crate::{dma, fail, log};

const F_STATS_VQ: u64 = 1 << 1;
const F_DEFLATE_ON_OOM: u64 = 1 << 2;
const F_REPORTING: u64 = 1 << 5;
const PAGE: u64 = 4096;
const QUEUE_SIZE: u16 = 8;
/// Page numbers per inflate or deflate request (Linux's batch).
const BATCH: u64 = 256;
/// How often `num_pages` is read (each read is an exit to the VMM).
const CHECK_EVERY_MS: u64 = 20;
const TIMEOUT_MS: u64 = 30_000;
/// Statistic tags (5.5.6.3).
const S_SWAP_IN: u16 = 0;
const S_SWAP_OUT: u16 = 1;
const S_MEMFREE: u16 = 4;
const S_MEMTOT: u16 = 5;
const S_AVAIL: u16 = 6;
/// The largest range one report carries.
const REPORT_CHUNK: u64 = 1 << 20;

struct Balloon {
    device: Device,
    inflate: Queue,
    deflate: Queue,
    stats: Option<Queue>,
    reporting: Option<Queue>,
    /// The area: `pages` pages from `base`; the balloon holds the first `held`.
    base: u64,
    pages: u64,
    held: u64,
    mem_size: u64,
    /// A page for page numbers and one for statistics.
    pfns: u64,
    stats_buf: u64,
    refreshes: u64,
    tsc_khz: u64,
    next_check: u64,
    /// The last (actual, target) logged.
    logged: Option<(u64, u64)>,
}

static BALLOON: Locked<Option<Balloon>> = Locked::new(None);

fn pattern(page: u64) -> u64 {
    page.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

fn write_pattern(addr: u64) {
    // SAFETY: a page of the balloon's area, which this workload alone uses; it is not in the
    // balloon (the host has not been given it).
    let words = unsafe { core::slice::from_raw_parts_mut(addr as *mut u64, (PAGE / 8) as usize) };
    words.fill(pattern(addr / PAGE));
}

fn is_zero(addr: u64) -> bool {
    // SAFETY: as for `write_pattern`; reading a page the host released maps a fresh zero page.
    let words = unsafe { core::slice::from_raw_parts(addr as *const u64, (PAGE / 8) as usize) };
    words.iter().all(|&w| w == 0)
}

/// Finds and starts the device over `[base, base + len)` (run once, by vCPU 0); on failure, the
/// exit status to report.
pub fn init(tsc_khz: u64, mem_size: u64, base: u64, len: u64) -> Result<(), u32> {
    let Some(pci) = Device::find(VIRTIO_TYPE_BALLOON) else {
        log!("balloon: no virtio-balloon device on bus 0");
        return Err(EXIT_NO_DEVICE);
    };
    let failed = |e: virtio::Error| {
        log!("balloon: {pci}: {e}");
        EXIT_DEVICE_FAILED
    };
    let device = Device::new(pci, tsc_khz).map_err(failed)?;
    let features = device.negotiate(F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING).map_err(failed)?;
    let mut index = 0;
    let mut next = |on: bool| -> Result<Option<Queue>, virtio::Error> {
        if !on {
            return Ok(None);
        }
        index += 1;
        device.setup_queue(index - 1, QUEUE_SIZE).map(Some)
    };
    let queues =
        (|| Ok((next(true)?, next(true)?, next(features & F_STATS_VQ != 0)?, next(features & F_REPORTING != 0)?)))();
    let (Some(inflate), Some(deflate), stats, reporting) = queues.map_err(failed)? else {
        return Err(EXIT_DEVICE_FAILED);
    };
    device.driver_ok();
    let pfns = dma::alloc(PAGE, PAGE).ok_or_else(|| failed(virtio::Error::OutOfMemory))?;
    let stats_buf = dma::alloc(PAGE, PAGE).ok_or_else(|| failed(virtio::Error::OutOfMemory))?;
    let pages = len / PAGE;
    for p in 0..pages {
        write_pattern(base + p * PAGE);
    }
    log!(
        "balloon: {device}; {pages} pages at {base:#x}; stats={} deflate-on-oom={} reporting={}",
        stats.is_some(),
        features & F_DEFLATE_ON_OOM != 0,
        reporting.is_some()
    );
    let mut b = Balloon {
        device,
        inflate,
        deflate,
        stats,
        reporting,
        base,
        pages,
        held: 0,
        mem_size,
        pfns,
        stats_buf,
        refreshes: 0,
        tsc_khz,
        next_check: 0,
        logged: None,
    };
    b.send_stats();
    b.report_free();
    BALLOON.with(|s| *s = Some(b));
    Ok(())
}

/// Follows the target and refills the statistics; true if it did anything.
pub fn step(now: u64) -> bool {
    BALLOON.with(|b| b.as_mut().is_some_and(|b| b.step(now)))
}

impl Balloon {
    fn step(&mut self, now: u64) -> bool {
        let mut busy = false;
        if let Some(q) = &mut self.stats {
            match q.try_used() {
                Ok(Some(_)) => {
                    self.refreshes += 1;
                    self.send_stats();
                    busy = true;
                }
                Ok(None) => {}
                Err(e) => fail(format_args!("balloon: statistics queue: {e}")),
            }
        }
        if now < self.next_check {
            return busy;
        }
        self.next_check = now + CHECK_EVERY_MS * self.tsc_khz;
        if let Err(e) = self.device.check() {
            fail(format_args!("balloon: {e}"));
        }
        let num_pages = u64::from(self.device.read_config(|r| r.read32(0)).unwrap_or(0));
        let target = num_pages.min(self.pages);
        if self.held < target {
            let n = (target - self.held).min(BATCH);
            self.move_pages(self.held, n, true);
            self.held += n;
        } else if self.held > target {
            let n = (self.held - target).min(BATCH);
            self.held -= n;
            self.move_pages(self.held, n, false);
            for p in self.held..self.held + n {
                let addr = self.base + p * PAGE;
                if !is_zero(addr) {
                    fail(format_args!("balloon: page {:#x} came back from the host not zero", addr / PAGE));
                }
                write_pattern(addr);
            }
        } else {
            if self.logged != Some((self.held, num_pages)) {
                self.logged = Some((self.held, num_pages));
                log!("balloon: actual={} target={num_pages} refreshes={}", self.held, self.refreshes);
            }
            return busy;
        }
        self.device.write_config32(4, self.held as u32);
        true
    }

    /// Gives (`inflate`) or takes back `n` pages of the area from page `first`.
    fn move_pages(&mut self, first: u64, n: u64, inflate: bool) {
        let pfn0 = self.base / PAGE + first;
        for i in 0..n {
            // SAFETY: the page-number page is this workload's DMA memory; no request is in flight.
            unsafe { ((self.pfns + 4 * i) as *mut u32).write_volatile((pfn0 + i) as u32) };
        }
        let q = if inflate { &mut self.inflate } else { &mut self.deflate };
        let what = if inflate { "inflate" } else { "deflate" };
        let buf = Buf { addr: self.pfns, len: (4 * n) as u32, write: false };
        q.submit(&[buf]).unwrap_or_else(|e| fail(format_args!("balloon: {what}: {e}")));
        q.notify();
        if let Err(e) = q.poll_used(&self.device, TIMEOUT_MS) {
            fail(format_args!("balloon: {what} of {n} pages: {e}"));
        }
    }

    /// Puts this guest's figures on the statistics queue, if it has one.
    fn send_stats(&mut self) {
        let Some(q) = &mut self.stats else { return };
        let free = (self.pages - self.held) * PAGE;
        let stats = [
            (S_SWAP_IN, 0),
            (S_SWAP_OUT, 0),
            (S_MEMFREE, free),
            (S_MEMTOT, self.mem_size - self.held * PAGE),
            (S_AVAIL, free),
        ];
        for (i, (tag, value)) in stats.iter().enumerate() {
            let at = self.stats_buf + 10 * i as u64;
            // SAFETY: the statistics page is this workload's DMA memory, and the device gave the
            // buffer back (or never had it).
            unsafe {
                (at as *mut [u8; 2]).write_unaligned(tag.to_le_bytes());
                ((at + 2) as *mut [u8; 8]).write_unaligned(value.to_le_bytes());
            }
        }
        let buf = Buf { addr: self.stats_buf, len: 10 * stats.len() as u32, write: false };
        q.submit(&[buf]).unwrap_or_else(|e| fail(format_args!("balloon: statistics: {e}")));
        q.notify();
    }

    /// Reports the top half of the area as free (once), and checks it then reads as zero.
    fn report_free(&mut self) {
        let Some(q) = &mut self.reporting else { return };
        let (start, end) = (self.base + self.pages / 2 * PAGE, self.base + self.pages * PAGE);
        let mut at = start;
        while at < end {
            let len = (end - at).min(REPORT_CHUNK);
            let buf = Buf { addr: at, len: len as u32, write: true };
            q.submit(&[buf]).unwrap_or_else(|e| fail(format_args!("balloon: report: {e}")));
            q.notify();
            if let Err(e) = q.poll_used(&self.device, TIMEOUT_MS) {
                fail(format_args!("balloon: report of {len} bytes at {at:#x}: {e}"));
            }
            at += len;
        }
        // One page per report is read back (reading a released page takes host memory again).
        let mut page = start;
        while page < end {
            if !is_zero(page) {
                fail(format_args!("balloon: reported page {:#x} is not zero", page / PAGE));
            }
            page += REPORT_CHUNK;
        }
        log!("balloon: reported {} free pages", (end - start) / PAGE);
    }
}
