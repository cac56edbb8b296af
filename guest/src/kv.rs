//! `kv`: records of 8 to 64 bytes updated at random across each vCPU's share of a working set,
//! as a database's buffer pool sees them. A record lives in a 64-byte slot: a header word
//! (version, length) written last, then `length - 8` bytes that are a function of (slot, version).
//! Each update raises one slot's version by one, so the versions of a vCPU's slots add up to its
//! update counter: a restore that mixes two instants, or a torn record, fails the check. (The
//! check runs between updates, on the vCPU that owns the slots.)

use crate::sync::Locked;
use crate::MAX_VCPUS;
use core::sync::atomic::{AtomicU64, Ordering};

const SLOT: u64 = 64;
/// At most this many updates per call to [`step`].
const BATCH: u64 = 64;

struct Layout {
    base: u64,
    slots_per_cpu: u64,
    period: u64,
    max_lag: u64,
}

static LAYOUT: Locked<Layout> = Locked::new(Layout { base: 0, slots_per_cpu: 0, period: 0, max_lag: 0 });

#[repr(align(64))]
struct PerCpu {
    updates: AtomicU64,
    next_due: AtomicU64,
    random: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const PER_CPU_INIT: PerCpu =
    PerCpu { updates: AtomicU64::new(0), next_due: AtomicU64::new(0), random: AtomicU64::new(0) };
static PER_CPU: [PerCpu; MAX_VCPUS] = [PER_CPU_INIT; MAX_VCPUS];

pub fn init(base: u64, ws_bytes: u64, vcpus: u64, rate: u64, tsc_hz: u64, now: u64) {
    LAYOUT.with(|l| {
        l.base = base;
        l.slots_per_cpu = (ws_bytes / SLOT / vcpus).max(1);
        l.period = tsc_hz.checked_div(rate).map_or(0, |p| p.max(1));
        l.max_lag = tsc_hz / 10;
    });
    for (i, p) in PER_CPU.iter().enumerate() {
        p.next_due.store(now, Ordering::Relaxed);
        p.random.store(0x2545_f491_4f6c_dd1d ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15), Ordering::Relaxed);
    }
}

fn mix(slot: u64, version: u64, word: u64) -> u64 {
    let mut x = slot.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) ^ word;
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^ (x >> 29)
}

fn slot_ptr(base: u64, slot: u64) -> *mut u64 {
    (base + slot * SLOT) as *mut u64
}

/// Makes the updates that are due for `cpu` at TSC `now`; returns how many.
pub fn step(cpu: usize, now: u64) -> u64 {
    let (base, spc, period, max_lag) = LAYOUT.with(|l| (l.base, l.slots_per_cpu, l.period, l.max_lag));
    let me = &PER_CPU[cpu];
    let mut due = me.next_due.load(Ordering::Relaxed);
    if period != 0 && now.saturating_sub(due) > max_lag {
        due = now - max_lag;
    }
    let mut x = me.random.load(Ordering::Relaxed);
    let mut done = 0;
    while done < BATCH && (period == 0 || due <= now) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let slot = cpu as u64 * spc + x % spc;
        let words = 1 + (x >> 32) % 8;
        let p = slot_ptr(base, slot);
        // SAFETY: the slot is inside this vCPU's share of the working set, which lies in free
        // memory reported by the VMM and is written by no one else.
        let version = (unsafe { p.read_volatile() } >> 8) + 1;
        for w in 1..words {
            // SAFETY: as above (words < 8, inside the 64-byte slot).
            unsafe { p.add(w as usize).write_volatile(mix(slot, version, w)) };
        }
        // SAFETY: as above.
        unsafe { p.write_volatile(version << 8 | words) };
        me.updates.fetch_add(1, Ordering::Relaxed);
        due = due.wrapping_add(period);
        done += 1;
    }
    me.random.store(x, Ordering::Relaxed);
    me.next_due.store(due, Ordering::Relaxed);
    done
}

pub fn updates(cpu: usize) -> u64 {
    PER_CPU[cpu].updates.load(Ordering::Relaxed)
}

/// Raises a version without writing its record (`fail=kv`).
pub fn sabotage(cpu: usize) {
    let (base, spc) = LAYOUT.with(|l| (l.base, l.slots_per_cpu));
    let p = slot_ptr(base, cpu as u64 * spc);
    // SAFETY: this vCPU's first slot.
    unsafe { p.write_volatile(p.read_volatile() + (1 << 8)) };
}

/// Checks `cpu`'s slots: every record matches its header, and the versions add up to the
/// update counter. Returns the records held, or the first bad slot (0 if only the sum is off)
/// with the sum expected and found.
pub fn verify(cpu: usize) -> Result<u64, (u64, u64, u64)> {
    let (base, spc) = LAYOUT.with(|l| (l.base, l.slots_per_cpu));
    let want = updates(cpu);
    let (mut sum, mut held) = (0u64, 0u64);
    for slot in cpu as u64 * spc..(cpu as u64 + 1) * spc {
        let p = slot_ptr(base, slot);
        // SAFETY: inside this vCPU's share, only read.
        let head = unsafe { p.read_volatile() };
        let (version, words) = (head >> 8, head & 0xff);
        if head == 0 {
            continue;
        }
        held += 1;
        sum += version;
        // SAFETY: as above; words is checked to stay in the slot.
        let torn = words == 0
            || words > 8
            || (1..words).any(|w| unsafe { p.add(w as usize).read_volatile() } != mix(slot, version, w));
        if torn {
            return Err((slot, want, sum));
        }
    }
    if sum != want {
        return Err((0, want, sum));
    }
    Ok(held)
}
