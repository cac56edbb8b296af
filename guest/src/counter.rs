//! `counter`: every vCPU increments its private counter and a shared total under one spinlock.
//! Any consistent view of memory has `sum(private) == total`; a torn snapshot breaks it.

use crate::sync::Locked;
use crate::MAX_VCPUS;

pub struct Counters {
    total: u64,
    private: [u64; MAX_VCPUS],
}

static COUNTERS: Locked<Counters> = Locked::new(Counters { total: 0, private: [0; MAX_VCPUS] });

/// `n` increments on behalf of `cpu`.
pub fn step(cpu: usize, n: u32) {
    for _ in 0..n {
        COUNTERS.with(|c| {
            c.private[cpu] += 1;
            c.total += 1;
        });
    }
}

/// Bumps the total alone: the invariant is broken on purpose.
pub fn sabotage() {
    COUNTERS.with(|c| c.total += 1);
}

pub fn private(cpu: usize) -> u64 {
    COUNTERS.with(|c| c.private[cpu])
}

/// `Ok(total)` if the invariant holds, else `Err((sum of private counters, total))`.
pub fn check() -> Result<u64, (u64, u64)> {
    COUNTERS.with(|c| {
        let sum: u64 = c.private.iter().sum();
        if sum == c.total {
            Ok(sum)
        } else {
            Err((sum, c.total))
        }
    })
}
