//! `rng`: vCPU 0 drives a virtio-rng device (virtio 1.2 section 5.4: one request queue, no feature
//! bits of its own, no configuration) with one request in flight at a time. Each request is a
//! single device-writable buffer of 16..=4096 bytes placed somewhere in a three-page area that is
//! filled with a pattern (a function of the request number) before it is submitted. A completion
//! must name the chain in flight and report 0 < used length <= requested, and then:
//! - every byte of the area outside the used length still holds the pattern (the device wrote
//!   exactly where and as much as it said; stricter than 2.7.8.1, which lets a device write more
//!   than it reports, but this is what smpft's device does);
//! - a result of 16 bytes or more is not all zero;
//! - no two adjacent 64-byte blocks of a result are equal, and the first 64 bytes of a result
//!   differ from those of the result before.
//!
//! Across a snapshot, restore or failover the loop simply continues: the request in flight at the
//! cut is completed by the restored device, or still pending and completed later. A request not
//! completed within [`TIMEOUT_MS`], or a device that needs a reset or is no longer live, fails the
//! run.

use crate::abi::{virtio_pci_device_id, EXIT_DEVICE_FAILED, EXIT_NO_DEVICE, VIRTIO_PCI_VENDOR_ID, VIRTIO_TYPE_RNG};
use crate::sync::Locked;
use crate::virtio::{self, Buf, Device, Queue, Used};
use crate::{dma, fail, log};

/// The request queue.
const REQUESTQ: u16 = 0;
/// One request is in flight at a time; a few entries are plenty.
const QUEUE_SIZE: u16 = 8;
const MIN_REQUEST: u32 = 16;
const MAX_REQUEST: u32 = 4096;
const PAGE: u64 = 4096;
/// The buffers move about in this area, so that they often straddle a page boundary.
const AREA: u64 = 3 * PAGE;
/// A buffer starts at `GUARD + (0..SPREAD)` in the area, so at least `GUARD` bytes before it and a
/// page after it must keep the pattern.
const GUARD: u64 = 64;
const SPREAD: u64 = PAGE - GUARD;
/// How long a request may stay in flight (guest time, which stands still while the VM is stopped).
const TIMEOUT_MS: u64 = 30_000;
/// How often the device status is read while requests flow.
const STATUS_EVERY_MS: u64 = 100;
const BLOCK: usize = 64;
/// Results at least this long must not be all zero (chance 2^-128 for a good source).
const NONZERO_MIN: u32 = 16;

const _: () = assert!(GUARD + SPREAD + MAX_REQUEST as u64 <= AREA - PAGE);

#[derive(Clone, Copy)]
struct Pending {
    head: u16,
    off: u64,
    len: u32,
    since: u64,
}

struct Rng {
    device: Device,
    queue: Queue,
    area: u64,
    tsc_khz: u64,
    /// xorshift state for request sizes and places.
    random: u64,
    /// Number of the request last submitted (its pattern is in the area).
    seq: u64,
    pending: Option<Pending>,
    requests: u64,
    bytes: u64,
    last_block: Option<[u8; BLOCK]>,
    next_status: u64,
}

static RNG: Locked<Option<Rng>> = Locked::new(None);

fn pattern(seq: u64, i: u64) -> u8 {
    (seq.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(i.wrapping_mul(0xbf58_476d_1ce4_e5b9)) >> 56) as u8
}

/// Finds and starts the device (run once, by vCPU 0); on failure, the exit status to report.
pub fn init(tsc_khz: u64, now: u64) -> Result<(), u32> {
    let Some(pci) = Device::find(VIRTIO_TYPE_RNG) else {
        log!(
            "rng: no virtio-rng device (PCI ID {:04x}:{:04x}) on bus 0",
            VIRTIO_PCI_VENDOR_ID,
            virtio_pci_device_id(VIRTIO_TYPE_RNG)
        );
        return Err(EXIT_NO_DEVICE);
    };
    let failed = |e: virtio::Error| {
        log!("rng: {pci}: {e}");
        EXIT_DEVICE_FAILED
    };
    let device = Device::new(pci, tsc_khz).map_err(failed)?;
    let queue = start(&device).map_err(|e| {
        device.set_failed();
        failed(e)
    })?;
    let area = dma::alloc(AREA, PAGE).ok_or_else(|| failed(virtio::Error::OutOfMemory))?;
    log!("rng: {device}; request queue of {} entries", queue.size());
    let rng = Rng {
        device,
        queue,
        area,
        tsc_khz,
        random: 0x2545_f491_4f6c_dd1d,
        seq: 0,
        pending: None,
        requests: 0,
        bytes: 0,
        last_block: None,
        next_status: now,
    };
    RNG.with(|r| *r = Some(rng));
    Ok(())
}

/// Steps 2 to 8 of device initialisation once the device is reset.
fn start(device: &Device) -> Result<Queue, virtio::Error> {
    device.negotiate(0)?;
    let queue = device.setup_queue(REQUESTQ, QUEUE_SIZE)?;
    device.driver_ok();
    device.check()?;
    Ok(queue)
}

/// Takes the completed request, if any, and submits the next. Returns whether it did anything
/// (false: a request is still with the device).
pub fn step(now: u64) -> bool {
    RNG.with(|r| r.as_mut().is_some_and(|r| r.step(now)))
}

/// Completes the request still in flight, if any (it must complete), and checks the device a last
/// time. Returns (requests, bytes) completed in all.
pub fn finish() -> (u64, u64) {
    RNG.with(|r| {
        let Some(r) = r.as_mut() else { return (0, 0) };
        if let Some(p) = r.pending {
            match r.queue.poll_used(&r.device, TIMEOUT_MS) {
                Ok(u) => r.complete(p, u),
                Err(e) => fail(format_args!("rng: request {} ({} bytes) did not complete: {e}", r.seq, p.len)),
            }
        }
        if let Err(e) = r.device.check() {
            fail(format_args!("rng: {e}"));
        }
        (r.requests, r.bytes)
    })
}

/// (requests, bytes) completed so far.
pub fn totals() -> (u64, u64) {
    RNG.with(|r| r.as_ref().map_or((0, 0), |r| (r.requests, r.bytes)))
}

impl Rng {
    fn step(&mut self, now: u64) -> bool {
        if now >= self.next_status {
            if let Err(e) = self.device.check() {
                fail(format_args!("rng: {e}"));
            }
            self.next_status = now + STATUS_EVERY_MS * self.tsc_khz;
        }
        if let Some(p) = self.pending {
            match self.queue.try_used() {
                Ok(Some(u)) => self.complete(p, u),
                Ok(None) if now.saturating_sub(p.since) > TIMEOUT_MS * self.tsc_khz => fail(format_args!(
                    "rng: request {} ({} bytes) not completed within {TIMEOUT_MS} ms",
                    self.seq, p.len
                )),
                Ok(None) => return false,
                Err(e) => fail(format_args!("rng: {e}")),
            }
        }
        self.submit(now);
        true
    }

    fn next_random(&mut self) -> u64 {
        let mut x = self.random;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.random = x;
        x
    }

    fn submit(&mut self, now: u64) {
        let x = self.next_random();
        let len = MIN_REQUEST + (x % u64::from(MAX_REQUEST - MIN_REQUEST + 1)) as u32;
        let off = GUARD + (x >> 32) % SPREAD;
        self.seq += 1;
        // SAFETY: the area is device memory owned by this workload, and no request is in flight,
        // so the device does not write it now.
        let area = unsafe { core::slice::from_raw_parts_mut(self.area as *mut u8, AREA as usize) };
        for (i, b) in area.iter_mut().enumerate() {
            *b = pattern(self.seq, i as u64);
        }
        let buf = Buf { addr: self.area + off, len, write: true };
        let head = self.queue.submit(&[buf]).unwrap_or_else(|e| fail(format_args!("rng: submit: {e}")));
        self.queue.notify();
        self.pending = Some(Pending { head, off, len, since: now });
    }

    fn complete(&mut self, p: Pending, u: Used) {
        let seq = self.seq;
        if u.head != p.head || u.len == 0 || u.len > p.len {
            fail(format_args!(
                "rng: request {seq} (head {}, {} bytes) completed as head {} with {} bytes",
                p.head, p.len, u.head, u.len
            ));
        }
        // SAFETY: the device returned the only chain in flight, so it no longer writes the area.
        let area = unsafe { core::slice::from_raw_parts(self.area as *const u8, AREA as usize) };
        let (start, end) = (p.off as usize, p.off as usize + u.len as usize);
        let mut outside = (0..start).chain(end..area.len());
        if let Some(i) = outside.find(|&i| area[i] != pattern(seq, i as u64)) {
            fail(format_args!(
                "rng: request {seq} ({} bytes at +{start}, {} used): byte +{i} of its area changed",
                p.len, u.len
            ));
        }
        let data = &area[start..end];
        if u.len >= NONZERO_MIN && data.iter().all(|&b| b == 0) {
            fail(format_args!("rng: request {seq}: all {} bytes are zero", u.len));
        }
        let blocks = data.chunks_exact(BLOCK);
        if let Some(k) = blocks.clone().zip(blocks.skip(1)).position(|(a, b)| a == b) {
            fail(format_args!("rng: request {seq}: 64-byte blocks {k} and {} are equal", k + 1));
        }
        if let Some(first) = data.first_chunk::<BLOCK>() {
            if self.last_block.as_ref() == Some(first) {
                fail(format_args!("rng: request {seq}: first 64 bytes equal those of the result before"));
            }
            self.last_block = Some(*first);
        }
        self.requests += 1;
        self.bytes += u64::from(u.len);
        self.pending = None;
    }
}
