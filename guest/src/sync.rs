//! Spinlocks and a barrier that give the host CPU away when they wait long, so that more vCPUs than
//! host cores (lock-holder preemption) still make progress.

use crate::io::{cpu_relax, idle};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

const SPINS_BEFORE_YIELD: u32 = 256;

pub struct SpinLock {
    locked: AtomicU32,
}

impl SpinLock {
    pub const fn new() -> Self {
        SpinLock { locked: AtomicU32::new(0) }
    }

    pub fn lock(&self) {
        let mut spins = 0u32;
        loop {
            if self.locked.compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                return;
            }
            while self.locked.load(Ordering::Relaxed) != 0 {
                spins += 1;
                if spins.is_multiple_of(SPINS_BEFORE_YIELD) {
                    idle(0);
                } else {
                    cpu_relax();
                }
            }
        }
    }

    pub fn unlock(&self) {
        self.locked.store(0, Ordering::Release);
    }

    pub fn with<R>(&self, f: impl FnOnce() -> R) -> R {
        self.lock();
        let r = f();
        self.unlock();
        r
    }
}

pub static LOG_LOCK: SpinLock = SpinLock::new();

/// A value behind a [`SpinLock`].
pub struct Locked<T> {
    lock: SpinLock,
    value: UnsafeCell<T>,
}

// SAFETY: `value` is only reached through `with`, which holds `lock`.
unsafe impl<T: Send> Sync for Locked<T> {}

impl<T> Locked<T> {
    pub const fn new(value: T) -> Self {
        Locked { lock: SpinLock::new(), value: UnsafeCell::new(value) }
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        self.lock.lock();
        // SAFETY: the lock is held, so this is the only reference to `value`.
        let r = f(unsafe { &mut *self.value.get() });
        self.lock.unlock();
        r
    }
}

/// Memory handed out once, as a `&'static mut`: storage that a library keeps borrowing for the rest
/// of the run (the network stack's sockets and their buffers), without an allocator and without
/// `static mut`. A second [`TakeOnce::take`] gets `None`.
pub struct TakeOnce<T> {
    taken: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: `value` is reached only through `take`, which hands out one reference, once.
unsafe impl<T: Send> Sync for TakeOnce<T> {}

impl<T> TakeOnce<T> {
    pub const fn new(value: T) -> Self {
        TakeOnce { taken: AtomicBool::new(false), value: UnsafeCell::new(value) }
    }

    #[allow(clippy::mut_from_ref, reason = "the flag makes the one mutable reference unique")]
    pub fn take(&'static self) -> Option<&'static mut T> {
        if self.taken.swap(true, Ordering::AcqRel) {
            return None;
        }
        // SAFETY: the flag was clear and is now set, so this is the only reference ever made.
        Some(unsafe { &mut *self.value.get() })
    }
}

/// A reusable barrier for `n` vCPUs.
pub struct Barrier {
    arrived: AtomicU32,
    generation: AtomicU64,
}

impl Barrier {
    pub const fn new() -> Self {
        Barrier { arrived: AtomicU32::new(0), generation: AtomicU64::new(0) }
    }

    pub fn wait(&self, n: u32) {
        let gen = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == n {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.store(gen + 1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == gen {
            spins += 1;
            if spins.is_multiple_of(SPINS_BEFORE_YIELD) {
                idle(100);
            } else {
                cpu_relax();
            }
        }
    }
}
