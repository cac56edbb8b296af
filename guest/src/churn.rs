//! `churn`: each vCPU rewrites the pages of its share of a working set at a set rate. Page `j` of a
//! vCPU that has written `n` pages in all has been written `n / P + (j < n % P)` times (P = pages per
//! vCPU), and its words are a function of (page number, generation), so memory and the counter `n`
//! can be checked against each other: a restore that mixes two instants fails the check.
//!
//! With `churn-zero`, every even generation of a page is all zeroes (pages cleared and reused,
//! as allocators do), so half the pages written are zero pages.

use crate::sync::Locked;
use crate::MAX_VCPUS;
use core::sync::atomic::{AtomicU64, Ordering};

pub const PAGE: u64 = 4096;
const WORDS: usize = (PAGE / 8) as usize;
/// At most this many pages per call to [`step`], so other work interleaves.
const BATCH: u64 = 32;

struct Layout {
    base: u64,
    pages_per_cpu: u64,
    /// TSC ticks between two page writes (0: unlimited).
    period: u64,
    /// How far behind schedule a vCPU may fall before it stops trying to catch up.
    max_lag: u64,
    /// Even generations are zero pages.
    zero: bool,
}

static LAYOUT: Locked<Layout> = Locked::new(Layout { base: 0, pages_per_cpu: 0, period: 0, max_lag: 0, zero: false });

#[repr(align(64))]
struct PerCpu {
    /// Pages written so far.
    written: AtomicU64,
    /// TSC value at which the next page is due.
    next_due: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const PER_CPU_INIT: PerCpu = PerCpu { written: AtomicU64::new(0), next_due: AtomicU64::new(0) };
static PER_CPU: [PerCpu; MAX_VCPUS] = [PER_CPU_INIT; MAX_VCPUS];

pub fn init(base: u64, ws_bytes: u64, vcpus: u64, rate: u64, tsc_hz: u64, now: u64, zero: bool) {
    LAYOUT.with(|l| {
        l.zero = zero;
        l.base = base;
        l.pages_per_cpu = (ws_bytes / PAGE / vcpus).max(1);
        l.period = tsc_hz.checked_div(rate).map_or(0, |p| p.max(1));
        l.max_lag = tsc_hz / 10;
    });
    for p in &PER_CPU {
        p.next_due.store(now, Ordering::Relaxed);
    }
}

pub fn pages_per_cpu() -> u64 {
    LAYOUT.with(|l| l.pages_per_cpu)
}

fn mix(page: u64, gen: u64, word: u64) -> u64 {
    let mut x = page.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ gen.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) ^ word;
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^ (x >> 29)
}

fn page_ptr(base: u64, global_page: u64) -> *mut u64 {
    (base + global_page * PAGE) as *mut u64
}

/// Writes the pages that are due for `cpu` at TSC `now`; returns how many it wrote.
pub fn step(cpu: usize, now: u64) -> u64 {
    let (base, ppc, period, max_lag, zero) = LAYOUT.with(|l| (l.base, l.pages_per_cpu, l.period, l.max_lag, l.zero));
    let me = &PER_CPU[cpu];
    let mut due = me.next_due.load(Ordering::Relaxed);
    if period != 0 && now.saturating_sub(due) > max_lag {
        due = now - max_lag;
    }
    let mut n = me.written.load(Ordering::Relaxed);
    let mut done = 0;
    while done < BATCH && (period == 0 || due <= now) {
        let (j, gen) = (n % ppc, n / ppc + 1);
        let global = cpu as u64 * ppc + j;
        let p = page_ptr(base, global);
        let cleared = zero && gen.is_multiple_of(2);
        for w in 2..WORDS {
            let v = if cleared { 0 } else { mix(global, gen, w as u64) };
            // SAFETY: `p` is inside this vCPU's share of the working set, which lies in free memory
            // reported by the VMM and is written by no one else.
            unsafe { p.add(w).write_volatile(v) };
        }
        // SAFETY: as above.
        unsafe {
            p.add(1).write_volatile(if cleared { 0 } else { global });
            p.write_volatile(if cleared { 0 } else { gen });
        }
        n += 1;
        me.written.store(n, Ordering::Relaxed);
        due = due.wrapping_add(period);
        done += 1;
    }
    me.next_due.store(due, Ordering::Relaxed);
    done
}

pub fn written(cpu: usize) -> u64 {
    PER_CPU[cpu].written.load(Ordering::Relaxed)
}

/// Breaks page 0 of `cpu` on purpose.
pub fn sabotage(cpu: usize) {
    let (base, ppc) = LAYOUT.with(|l| (l.base, l.pages_per_cpu));
    // SAFETY: word 100 of this vCPU's first page, inside its share of the working set.
    unsafe { page_ptr(base, cpu as u64 * ppc).add(100).write_volatile(0xbad) };
}

/// Checks every page of `cpu`'s share against its write counter. Returns the number of pages that
/// hold data, or the first bad page with what was expected and found in its generation word.
pub fn verify(cpu: usize) -> Result<u64, (u64, u64, u64)> {
    let (base, ppc, zero) = LAYOUT.with(|l| (l.base, l.pages_per_cpu, l.zero));
    let n = written(cpu);
    let mut checked = 0;
    for j in 0..ppc {
        let global = cpu as u64 * ppc + j;
        let gen = n / ppc + u64::from(j < n % ppc);
        let p = page_ptr(base, global);
        // A page never written, or cleared in this generation, is all zeroes.
        let cleared = gen == 0 || (zero && gen.is_multiple_of(2));
        // SAFETY: inside this vCPU's share, only read.
        let found = unsafe { p.read_volatile() };
        if found != if cleared { 0 } else { gen } {
            return Err((global, gen, found));
        }
        for w in 1..WORDS {
            let want = match (cleared, w) {
                (true, _) => 0,
                (_, 1) => global,
                _ => mix(global, gen, w as u64),
            };
            // SAFETY: as above.
            if unsafe { p.add(w).read_volatile() } != want {
                return Err((global, gen, found));
            }
        }
        checked += u64::from(gen != 0);
    }
    Ok(checked)
}
