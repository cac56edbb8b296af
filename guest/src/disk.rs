//! `disk`: every vCPU writes units of its own region of a virtio-blk disk (virtio 1.2 section
//! 5.2), or with `disk-bus=scsi` of the first disk of a virtio-scsi controller ([`crate::scsi`]),
//! and keeps, in guest memory, the generation each unit was last written with. A unit's
//! contents are a function of (unit, generation): every 8-byte word mixes the two with the word's
//! place, so a unit that holds another generation, another unit's data, or a torn write does not
//! match. After a write completes the vCPU records the new generation, reads the unit back (every
//! `disk-check` writes) and compares; every `flush-every` writes it flushes; at the end it reads its
//! whole region and compares every written unit.
//!
//! So a disk that lags the guest's memory (a write the memory knows of is missing) or leads it (a
//! write the memory does not know of is there) fails the check. The one write that may be either
//! way is the one in flight at a cut (submitted, completion not yet seen): the vCPU notes it in
//! memory before submitting, and its unit may hold the old or the new generation until the
//! completion is seen. Units never written (generation 0) are not checked: the disk may start with
//! any contents.
//!
//! Requests go one at a time through one queue, under a lock; the data buffer is shared.

use crate::abi::EXIT_DEVICE_FAILED;
use crate::blk::{Blk, SECTOR, T_FLUSH, T_IN, T_OUT};
use crate::scsi::Scsi;
use crate::sync::Locked;
use crate::virtio;
use crate::{dma, fail, log, MAX_VCPUS};

/// The largest unit, and so the data buffer.
pub const MAX_IO: u64 = 1 << 20;
/// The most units tracked (their generations live in device memory).
const MAX_UNITS: u64 = 64 << 10;

/// How the workload runs (boot parameters `disk-io`, `disk-ws`, `disk-seq`, `disk-check`,
/// `flush-every`).
#[derive(Clone, Copy)]
pub struct Settings {
    /// Bytes per unit (and per request): a multiple of 512 up to [`MAX_IO`].
    pub io: u64,
    /// Bytes of the disk used (0: all of it, up to [`MAX_UNITS`] units).
    pub ws: u64,
    /// Units in order rather than at random.
    pub sequential: bool,
    /// Read back every this many writes (0: never, for benchmarks).
    pub check_every: u64,
    /// Flush every this many writes (0: never).
    pub flush_every: u64,
    /// The disk is on virtio-scsi (`disk-bus=scsi`), not virtio-blk.
    pub scsi: bool,
}

#[derive(Clone, Copy, Default)]
struct Cpu {
    /// Next unit (sequential) or random state.
    cursor: u64,
    /// The write in flight: (unit, generation).
    pending: Option<(u64, u32)>,
    /// The unit last written.
    last: u64,
    writes: u64,
    reads: u64,
    flushes: u64,
}

/// The device the disk is on.
enum Port {
    Blk(Blk),
    Scsi(Scsi),
}

struct Disk {
    port: Port,
    settings: Settings,
    /// The data buffer.
    data: u64,
    /// One generation per unit.
    gens: u64,
    units_per_cpu: u64,
    cpus: [Cpu; MAX_VCPUS],
    /// Broken on purpose (`fail=disk`).
    sabotaged: bool,
    /// Write latencies: [`bucket`] of the microseconds, over the run and since the last report.
    latency: [u32; BUCKETS],
    recent: [u32; BUCKETS],
    tsc_khz: u64,
}

/// Latency buckets: four per power of two of microseconds, up to ~2^31 µs.
const BUCKETS: usize = 128;

fn bucket(us: u64) -> usize {
    if us < 4 {
        return us as usize;
    }
    let log = 63 - us.leading_zeros() as usize;
    let sub = ((us >> (log - 2)) & 3) as usize;
    (log * 4 + sub).min(BUCKETS - 1)
}

/// The smallest latency (µs) of bucket `b`.
fn bucket_floor(b: usize) -> u64 {
    if b < 4 {
        return b as u64;
    }
    let (log, sub) = (b / 4, (b % 4) as u64);
    (4 + sub) << (log - 2)
}

static DISK: Locked<Option<Disk>> = Locked::new(None);

/// The word at `word` of unit `unit` written with generation `generation`.
fn word(unit: u64, generation: u32, word: u64) -> u64 {
    let mut x = unit.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(generation).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= word.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 29)
}

/// Finds and starts the device, lays out the regions (run once, by vCPU 0).
pub fn init(tsc_khz: u64, vcpus: u32, settings: Settings) -> Result<(), u32> {
    let (port, size) = if settings.scsi {
        let s = Scsi::open(tsc_khz)?;
        log!("disk: {s}");
        let size = s.blocks * u64::from(s.block_size);
        if u64::from(s.block_size) != SECTOR {
            log!("disk: the SCSI disk's blocks are {} bytes, not {SECTOR}", s.block_size);
            return Err(EXIT_DEVICE_FAILED);
        }
        (Port::Scsi(s), size)
    } else {
        let b = Blk::open(tsc_khz, "disk")?;
        let size = b.size;
        (Port::Blk(b), size)
    };
    let io = settings.io;
    if io == 0 || !io.is_multiple_of(SECTOR) || io > MAX_IO {
        log!("disk: disk-io={io} must be a multiple of 512 up to {MAX_IO}");
        return Err(crate::abi::EXIT_BAD_PARAMS);
    }
    let ws = if settings.ws == 0 { size } else { settings.ws.min(size) };
    let units = (ws / io).min(MAX_UNITS);
    let units_per_cpu = units / u64::from(vcpus);
    if units_per_cpu == 0 {
        log!("disk: a {size}-byte disk has too few {io}-byte units for {vcpus} vCPUs");
        return Err(crate::abi::EXIT_BAD_PARAMS);
    }
    let oom = || {
        log!("disk: {}", virtio::Error::OutOfMemory);
        EXIT_DEVICE_FAILED
    };
    let data = dma::alloc(io, 4096).ok_or_else(oom)?;
    let gens = dma::alloc(units * 4, 8).ok_or_else(oom)?;
    log!(
        "disk: {size} bytes; {units_per_cpu} units of {io} bytes per vCPU, {}",
        if settings.sequential { "sequential" } else { "random" }
    );
    let mut cpus = [Cpu::default(); MAX_VCPUS];
    for (i, c) in cpus.iter_mut().enumerate() {
        c.cursor = if settings.sequential { 0 } else { 0x2545_f491_4f6c_dd1d ^ (i as u64 + 1) };
    }
    let d = Disk {
        port,
        settings,
        data,
        gens,
        units_per_cpu,
        cpus,
        sabotaged: false,
        latency: [0; BUCKETS],
        recent: [0; BUCKETS],
        tsc_khz,
    };
    DISK.with(|s| *s = Some(d));
    Ok(())
}

/// One write (and perhaps a read-back and a flush) by `cpu`.
pub fn step(cpu: usize) {
    DISK.with(|d| {
        if let Some(d) = d.as_mut() {
            d.step(cpu);
        }
    })
}

/// Reads back every unit of `cpu`'s region that was written and checks it.
pub fn verify(cpu: usize) -> u64 {
    DISK.with(|d| d.as_mut().map_or(0, |d| d.verify_all(cpu)))
}

/// Makes the guest's memory claim a write that never reached the disk (`fail=disk`), and checks
/// that unit at once.
pub fn sabotage() {
    DISK.with(|d| {
        if let Some(d) = d.as_mut() {
            let unit = d.cpus[0].last;
            d.set_gen(unit, d.gen(unit).wrapping_add(1).max(1));
            d.sabotaged = true;
            log!("disk: sabotaged unit {unit}");
            d.check(0, unit);
        }
    })
}

/// (p50, p99) in microseconds of a latency histogram.
fn percentiles(h: &[u32; BUCKETS]) -> (u64, u64) {
    let total: u64 = h.iter().map(|&n| u64::from(n)).sum();
    let at = |q: u64| {
        let want = (total * q).div_ceil(100).max(1);
        let mut seen = 0;
        for (b, &n) in h.iter().enumerate() {
            seen += u64::from(n);
            if seen >= want {
                return bucket_floor(b);
            }
        }
        0
    };
    (at(50), at(99))
}

/// Write latency percentiles (p50, p99) in microseconds over the whole run.
pub fn latency() -> (u64, u64) {
    DISK.with(|d| d.as_ref().map_or((0, 0), |d| percentiles(&d.latency)))
}

/// Write latency percentiles since the last call (for progress reports).
pub fn recent_latency() -> (u64, u64) {
    DISK.with(|d| {
        d.as_mut().map_or((0, 0), |d| {
            let p = percentiles(&d.recent);
            d.recent = [0; BUCKETS];
            p
        })
    })
}

/// (writes, reads, flushes) of all vCPUs so far.
pub fn totals() -> (u64, u64, u64) {
    DISK.with(|d| {
        d.as_ref().map_or((0, 0, 0), |d| {
            d.cpus.iter().fold((0, 0, 0), |(w, r, f), c| (w + c.writes, r + c.reads, f + c.flushes))
        })
    })
}

impl Disk {
    fn gen(&self, unit: u64) -> u32 {
        // SAFETY: `unit` < units, and the array was allocated for all units in device memory
        // that only this workload touches (under the lock).
        unsafe { ((self.gens + unit * 4) as *const u32).read_volatile() }
    }

    fn set_gen(&self, unit: u64, g: u32) {
        // SAFETY: as in `gen`.
        unsafe { ((self.gens + unit * 4) as *mut u32).write_volatile(g) }
    }

    fn buffer(&mut self) -> &mut [u64] {
        // SAFETY: the data buffer is `io` bytes of device memory owned by this workload; no
        // request is in flight while the lock is held outside `request`.
        unsafe { core::slice::from_raw_parts_mut(self.data as *mut u64, (self.settings.io / 8) as usize) }
    }

    /// Runs one request and waits for it; fails the run on an error status or a timeout.
    fn request(&mut self, kind: u32, unit: u64) {
        let io = self.settings.io;
        let data = self.data;
        let r = match &mut self.port {
            Port::Blk(b) => b.request(kind, unit * io / SECTOR, data, io as u32),
            Port::Scsi(s) => {
                let r = match kind {
                    T_FLUSH => s.flush(),
                    _ => s.transfer(kind == T_OUT, unit * io / SECTOR, (io / SECTOR) as u32, data),
                };
                if let Err(e) = r {
                    fail(format_args!("disk: SCSI request (type {kind}, unit {unit}) failed: {e}"));
                }
                return;
            }
        };
        if let Err(e) = r {
            fail(format_args!("disk: request (type {kind}, unit {unit}) {e}"));
        }
    }

    fn next_unit(&mut self, cpu: usize) -> u64 {
        let n = self.units_per_cpu;
        let c = &mut self.cpus[cpu];
        let i = if self.settings.sequential {
            let i = c.cursor % n;
            c.cursor += 1;
            i
        } else {
            let mut x = c.cursor;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.cursor = x;
            x % n
        };
        cpu as u64 * n + i
    }

    fn step(&mut self, cpu: usize) {
        let unit = self.next_unit(cpu);
        let g = self.gen(unit).wrapping_add(1).max(1);
        for (i, w) in self.buffer().iter_mut().enumerate() {
            *w = word(unit, g, i as u64);
        }
        // Noted before the device can see it: after a cut, this write may or may not be there.
        self.cpus[cpu].pending = Some((unit, g));
        let t0 = crate::io::rdtsc();
        self.request(T_OUT, unit);
        let us = (crate::io::rdtsc() - t0) * 1000 / self.tsc_khz.max(1);
        self.latency[bucket(us)] = self.latency[bucket(us)].saturating_add(1);
        self.recent[bucket(us)] = self.recent[bucket(us)].saturating_add(1);
        self.set_gen(unit, g);
        self.cpus[cpu].pending = None;
        self.cpus[cpu].last = unit;
        let c = &mut self.cpus[cpu];
        c.writes += 1;
        let (writes, s) = (c.writes, self.settings);
        if s.check_every != 0 && writes % s.check_every == 0 {
            self.check(cpu, unit);
        }
        if s.flush_every != 0 && writes % s.flush_every == 0 {
            self.request(T_FLUSH, 0);
            self.cpus[cpu].flushes += 1;
        }
    }

    /// Reads `unit` and compares it with the generation memory records for it.
    fn check(&mut self, cpu: usize, unit: u64) {
        let g = self.gen(unit);
        if g == 0 {
            return;
        }
        self.buffer().fill(0);
        self.request(T_IN, unit);
        self.cpus[cpu].reads += 1;
        let bad = self.buffer().iter().enumerate().position(|(i, &w)| w != word(unit, g, i as u64));
        if let Some(i) = bad {
            let found = self.buffer()[i];
            // Which generation is there, if any nearby: ahead of or behind memory.
            let near = (g.saturating_sub(3)..=g.saturating_add(3)).find(|&o| word(unit, o, i as u64) == found);
            fail(format_args!(
                "disk: vCPU {cpu} unit {unit}: memory says generation {g}, word {i} of the disk holds {}{}",
                Gen(near),
                if self.sabotaged { " (sabotaged on purpose)" } else { "" }
            ));
        }
    }

    fn verify_all(&mut self, cpu: usize) -> u64 {
        let n = self.units_per_cpu;
        let mut checked = 0;
        for unit in cpu as u64 * n..(cpu as u64 + 1) * n {
            if self.gen(unit) != 0 {
                self.check(cpu, unit);
                checked += 1;
            }
        }
        checked
    }
}

/// A generation for the failure message ("generation N", or "other data").
struct Gen(Option<u32>);

impl core::fmt::Display for Gen {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(g) => write!(f, "generation {g}'s data"),
            None => write!(f, "other data"),
        }
    }
}
