//! The smpft test guest: a freestanding ring-3 program run by every vCPU (see the `boot-abi` crate
//! for how it is entered). Boot parameters pick the workloads (see `params.rs`); each vCPU runs its
//! share, the guest checks its invariants continuously, logs progress on the debug console and
//! reports its result through the exit port.

#![no_std]
#![no_main]

mod agent;
mod balloon;
mod blk;
mod churn;
mod counter;
mod db;
mod disk;
mod dma;
mod io;
mod kv;
mod net;
mod params;
mod pci;
mod rng;
mod scsi;
mod service;
mod smbios;
mod sync;
mod virtio;
mod vmgenid;

use abi::BootInfo;
use boot_abi as abi;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use params::{Fail, Params};
use sync::{Barrier, Locked};

pub const MAX_VCPUS: usize = 16;

/// Counter increments per loop iteration.
const COUNTER_BATCH: u32 = 64;
/// Full self-checks of churn pages and the counter, in milliseconds.
const CHECK_EVERY_MS: u64 = 500;
/// How long vCPU 0 waits, when it has nothing else to do, before looking for the rng completion.
const RNG_WAIT_US: u32 = 20;
/// How long vCPU 0 waits, when idle, before polling the network again (the VMM also wakes it when a
/// frame arrives); short, so that latency stays low.
const NET_WAIT_US: u32 = 200;

core::arch::global_asm!(
    ".globl _start",
    "_start:",
    "  and rsp, -16",
    "  call {main}",
    "  ud2",
    main = sym guest_main,
);

struct Shared {
    params: Params,
    vcpus: u32,
    tsc_khz: u64,
    start: u64,
}

static SHARED: Locked<Shared> = Locked::new(Shared { params: Params::DEFAULT, vcpus: 0, tsc_khz: 0, start: 0 });
static READY: AtomicBool = AtomicBool::new(false);
static STOP: AtomicBool = AtomicBool::new(false);
static FINAL: Barrier = Barrier::new();
static LOOPS: [AtomicU64; MAX_VCPUS] = [const { AtomicU64::new(0) }; MAX_VCPUS];

fn fail(what: core::fmt::Arguments) -> ! {
    log!("INVARIANT FAILED: {what}");
    io::exit(abi::EXIT_INVARIANT)
}

fn ms_since(start: u64, now: u64, tsc_khz: u64) -> u64 {
    now.saturating_sub(start) / tsc_khz.max(1)
}

/// Guest time since boot in milliseconds, from the TSC.
pub fn uptime_ms() -> u64 {
    let (start, khz) = SHARED.with(|s| (s.start, s.tsc_khz));
    ms_since(start, io::rdtsc(), khz)
}

/// (shared counter total, churn pages written) — for the service's `STAT`.
pub fn totals() -> (u64, u64) {
    let vcpus = SHARED.with(|s| s.vcpus) as usize;
    let counter = counter::check().unwrap_or_else(|(_, total)| total);
    (counter, (0..vcpus).map(churn::written).sum())
}

/// Record updates of the `kv` workload, all vCPUs.
pub fn kv_updates() -> u64 {
    let vcpus = SHARED.with(|s| s.vcpus) as usize;
    (0..vcpus).map(kv::updates).sum()
}

/// Validates the boot information and parameters and lays out memory; run by vCPU 0 alone.
fn init(bi: &BootInfo) -> Shared {
    if bi.magic != abi::BOOT_MAGIC || bi.version != abi::BOOT_VERSION {
        log!("bad boot info: magic {:#x} version {}", bi.magic, bi.version);
        io::exit(abi::EXIT_BAD_BOOT);
    }
    if bi.vcpus == 0 || bi.vcpus as usize > MAX_VCPUS || bi.tsc_khz == 0 {
        log!("bad boot info: {} vCPUs, TSC {} kHz", bi.vcpus, bi.tsc_khz);
        io::exit(abi::EXIT_BAD_BOOT);
    }
    // SAFETY: the VMM placed `cmdline_len` bytes of parameters at `cmdline_addr` (checked above to
    // be a boot info it wrote) and nothing writes them while we run.
    let cmdline = unsafe { core::slice::from_raw_parts(bi.cmdline_addr as *const u8, bi.cmdline_len as usize) };
    let params = match params::parse(cmdline) {
        Ok(p) => p,
        Err(bad) => {
            log!("{bad}");
            io::exit(abi::EXIT_BAD_PARAMS);
        }
    };
    // Free memory: the churn working set from the bottom, the device region at the top.
    let free = bi.free_end.saturating_sub(bi.free_start);
    if !bi.free_start.is_multiple_of(churn::PAGE) || free < dma::SIZE {
        log!("bad boot info: free memory {:#x}..{:#x}", bi.free_start, bi.free_end);
        io::exit(abi::EXIT_BAD_BOOT);
    }
    let dma_base = (bi.free_end - dma::SIZE) & !(churn::PAGE - 1);
    let churn_ws = params.churn_ws.max(churn::PAGE * u64::from(bi.vcpus));
    if params.churn && churn_ws > dma_base - bi.free_start {
        log!(
            "churn-ws={} bytes exceeds the {} bytes of free guest memory left beside {} KiB for devices",
            churn_ws,
            dma_base - bi.free_start,
            dma::SIZE >> 10
        );
        io::exit(abi::EXIT_BAD_PARAMS);
    }
    dma::init(dma_base);
    let start = io::rdtsc();
    if params.churn {
        let (rate, hz) = (params.churn_rate, bi.tsc_khz * 1000);
        churn::init(bi.free_start, churn_ws, bi.vcpus.into(), rate, hz, start, params.churn_zero);
    }
    // Free memory the workloads below leave, from the bottom.
    let mut unused = bi.free_start + if params.churn { churn_ws } else { 0 };
    if params.kv {
        // After the churn working set (if any), before the device area.
        let base = unused;
        let ws = params.kv_ws.max(64 * u64::from(bi.vcpus));
        if base + ws > dma_base {
            log!("kv-ws={} bytes does not fit in free guest memory beside the churn working set", ws);
            io::exit(abi::EXIT_BAD_PARAMS);
        }
        kv::init(base, ws, bi.vcpus.into(), params.kv_rate, bi.tsc_khz * 1000, start);
        unused = (base + ws).next_multiple_of(churn::PAGE);
    }
    if params.smbios {
        smbios::report();
    }
    if params.vmgenid {
        vmgenid::report();
    }
    if params.pci {
        for f in pci::functions() {
            log!("pci {f}");
        }
    }
    if params.rng {
        if let Err(status) = rng::init(bi.tsc_khz, start) {
            io::exit(status);
        }
    }
    if params.balloon {
        if let Err(status) = balloon::init(bi.tsc_khz, bi.mem_size, unused, dma_base.saturating_sub(unused)) {
            io::exit(status);
        }
    }
    if params.agent {
        if let Err(status) = agent::init(bi.tsc_khz) {
            io::exit(status);
        }
    }
    if params.disk {
        if let Err(status) = disk::init(bi.tsc_khz, bi.vcpus, params.disk_settings) {
            io::exit(status);
        }
    }
    if params.db {
        if let Err(status) = db::init(bi.tsc_khz, params.db_record) {
            io::exit(status);
        }
    }
    if let Some(net) = &params.net {
        if let Err(status) = net::init(net, bi.tsc_khz) {
            io::exit(status);
        }
    }
    if params.service {
        io::serial::init();
    }
    log!(
        "smpft-guest: {} vCPUs, {} MiB, counter={} churn={} (rate {} pages/s/vCPU, {} pages/vCPU) service={} net={} rng={} disk={} duration={}ms",
        bi.vcpus,
        bi.mem_size >> 20,
        params.counter,
        params.churn,
        params.churn_rate,
        if params.churn { churn::pages_per_cpu() } else { 0 },
        params.service,
        params.net.is_some(),
        params.rng,
        params.disk,
        params.duration_ms
    );
    Shared { params, vcpus: bi.vcpus, tsc_khz: bi.tsc_khz, start }
}

extern "C" fn guest_main(cpu: u64, bi: *const BootInfo) -> ! {
    let cpu = cpu as usize;
    if cpu == 0 {
        // SAFETY: the VMM passes the address of a BootInfo in identity-mapped memory.
        let shared = init(unsafe { &*bi });
        SHARED.with(|s| *s = shared);
        READY.store(true, Ordering::Release);
    } else {
        while !READY.load(Ordering::Acquire) {
            io::idle(100);
        }
    }
    let (p, vcpus, tsc_khz, start) = SHARED.with(|s| (s.params, s.vcpus, s.tsc_khz, s.start));
    if cpu >= vcpus as usize {
        log!("vCPU {cpu} is beyond the {vcpus} announced");
        io::exit(abi::EXIT_BAD_BOOT);
    }
    run(cpu, &p, tsc_khz, start);
    finish(cpu, &p, vcpus)
}

fn run(cpu: usize, p: &Params, tsc_khz: u64, start: u64) {
    let serves = p.service && cpu == 0;
    let networks = p.net.is_some() && cpu == 0;
    let drives_rng = p.rng && cpu == 0;
    let busy = p.counter || p.churn || p.disk || p.kv;
    let mut next_check = start + CHECK_EVERY_MS * tsc_khz;
    let mut next_report = start + p.report_ms * tsc_khz;
    let mut sabotaged = false;
    while !STOP.load(Ordering::Relaxed) {
        LOOPS[cpu].fetch_add(1, Ordering::Relaxed);
        if p.counter {
            counter::step(cpu, COUNTER_BATCH);
        }
        let now = io::rdtsc();
        if p.churn {
            churn::step(cpu, now);
        }
        if p.kv {
            kv::step(cpu, now);
        }
        let mut idle = !busy;
        if serves {
            match service::poll() {
                service::Poll::Exit => STOP.store(true, Ordering::Relaxed),
                service::Poll::Busy => idle = false,
                service::Poll::Idle => {}
            }
        }
        if networks {
            match net::poll() {
                service::Poll::Exit => STOP.store(true, Ordering::Relaxed),
                service::Poll::Busy => idle = false,
                service::Poll::Idle => {}
            }
        }
        if drives_rng && rng::step(now) {
            idle = false;
        }
        if p.balloon && cpu == 0 && balloon::step(now) {
            idle = false;
        }
        if p.agent && cpu == 0 {
            match agent::poll() {
                service::Poll::Exit => {
                    log!("agent: powering off");
                    STOP.store(true, Ordering::Relaxed);
                }
                service::Poll::Busy => idle = false,
                service::Poll::Idle => {}
            }
        }
        if p.disk {
            disk::step(cpu);
        }
        if cpu == 0 && !sabotaged && p.fail != Fail::None && ms_since(start, now, tsc_khz) > 200 {
            sabotaged = true;
            // Check at once: churn would soon rewrite the damaged page.
            next_check = now;
            match p.fail {
                Fail::Counter => counter::sabotage(),
                Fail::Churn => churn::sabotage(0),
                Fail::Disk => disk::sabotage(),
                Fail::Kv => kv::sabotage(0),
                Fail::Db => db::sabotage(),
                Fail::None => {}
            }
        }
        if now >= next_check {
            next_check = now + CHECK_EVERY_MS * tsc_khz;
            self_check(cpu, p);
            if cpu == 0 && p.vmgenid {
                vmgenid::check();
            }
            if cpu == 0 && io::inb(abi::POWER_PORT) == 1 {
                log!("power button pressed: shutting down");
                STOP.store(true, Ordering::Relaxed);
            }
            if cpu == 0 && p.duration_ms != 0 && ms_since(start, now, tsc_khz) >= p.duration_ms {
                STOP.store(true, Ordering::Relaxed);
            }
        }
        if p.report_ms != 0 && cpu == 0 && now >= next_report {
            next_report = now + p.report_ms * tsc_khz;
            log!("progress: t={}ms {}", ms_since(start, now, tsc_khz), Progress(cpu));
            if p.rng {
                let (requests, bytes) = rng::totals();
                log!("progress: t={}ms rng: requests={requests} bytes={bytes}", ms_since(start, now, tsc_khz));
            }
            if p.net.is_some() {
                log!("progress: t={}ms net: {}", ms_since(start, now, tsc_khz), net::totals());
            }
            if p.disk {
                let (writes, reads, flushes) = disk::totals();
                let (p50, p99) = disk::recent_latency();
                log!(
                    "progress: t={}ms disk: writes={writes} reads={reads} flushes={flushes} p50-us={p50} p99-us={p99}",
                    ms_since(start, now, tsc_khz)
                );
            }
        }
        if idle {
            // Nothing to do on this vCPU but wait for the device, the service or the end.
            let wait_ms = if p.duration_ms != 0 { p.duration_ms.min(CHECK_EVERY_MS) } else { CHECK_EVERY_MS };
            io::idle(if drives_rng {
                RNG_WAIT_US
            } else if networks {
                NET_WAIT_US
            } else if serves || (p.agent && cpu == 0) {
                1000
            } else {
                (wait_ms * 1000).min(100_000) as u32
            });
        }
    }
}

fn self_check(cpu: usize, p: &Params) {
    if p.kv {
        if let Err((slot, want, sum)) = kv::verify(cpu) {
            fail(format_args!("kv: vCPU {cpu} slot {slot}: record torn, or versions add up to {sum}, not {want}"));
        }
    }
    if p.counter {
        if let Err((sum, total)) = counter::check() {
            fail(format_args!("counter: sum of private counters {sum} != shared total {total}"));
        }
    }
    if p.churn {
        if let Err((page, want, found)) = churn::verify(cpu) {
            fail(format_args!(
                "churn: vCPU {cpu} page {page} expected generation {want}, found {found} (or its contents differ)"
            ));
        }
    }
}

struct Progress(usize);

impl core::fmt::Display for Progress {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let cpu = self.0;
        write!(
            f,
            "cpu{cpu}: loops={} counter={} churn={} kv={}",
            LOOPS[cpu].load(Ordering::Relaxed),
            counter::private(cpu),
            churn::written(cpu),
            kv::updates(cpu)
        )
    }
}

fn finish(cpu: usize, p: &Params, vcpus: u32) -> ! {
    FINAL.wait(vcpus);
    self_check(cpu, p);
    if p.disk {
        let units = disk::verify(cpu);
        log!("disk: vCPU {cpu} verified {units} units");
    }
    log!("{}", Progress(cpu));
    FINAL.wait(vcpus);
    if cpu != 0 {
        loop {
            io::idle(100_000);
        }
    }
    let (counter, churn) = totals();
    if p.service || p.net.is_some() {
        log!("service: value={} requests={}", service::value(), service::requests());
    }
    if p.net.is_some() {
        log!("net: {}", net::totals());
    }
    if p.agent {
        log!("agent: answered={}", agent::answered());
    }
    if p.rng {
        let (requests, bytes) = rng::finish();
        log!("rng: requests={requests} bytes={bytes}");
    }
    if p.disk {
        let (writes, reads, flushes) = disk::totals();
        let (p50, p99) = disk::latency();
        log!("disk: writes={writes} reads={reads} flushes={flushes} write-latency-p50-us={p50} write-latency-p99-us={p99}");
    }
    if p.db {
        let (records, repeats) = db::totals();
        log!("db: records={records} repeats={repeats}");
    }
    log!("RESULT: PASS counter_total={counter} churn_pages={churn}");
    io::exit(abi::EXIT_OK)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    log!("guest panic: {info}");
    io::exit(abi::EXIT_INVARIANT)
}

/// Referenced by the precompiled `core`; never called with `panic = "abort"`.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

// The memory intrinsics the compiler emits calls to; there is no libc underneath.

/// # Safety
/// `dst` and `src` are valid for `n` bytes and do not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; `rep movsb` copies exactly `n` bytes forward.
    unsafe {
        core::arch::asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// `dst` and `src` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: a forward copy is correct when dst starts before src or past its end.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: overlapping with dst after src: copy backwards from the last byte, then clear DF.
    unsafe {
        core::arch::asm!(
            "std", "rep movsb", "cld",
            inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _, inout("rcx") n => _,
            options(nostack)
        );
    }
    dst
}

/// # Safety
/// `dst` is valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; `rep stosb` writes exactly `n` bytes.
    unsafe {
        core::arch::asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
