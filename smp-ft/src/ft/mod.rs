//! The fault-tolerance engine. `protocol` is its core: the primary and standby roles as pure
//! state machines (events in, actions out; no sockets, clocks or KVM), so every ordering of
//! crashes, acknowledgements and timeouts can be tested directly. `primary` and `standby` drive
//! them with the VM, the logging channel (`transport`) and the tie-breaker.

pub mod disk;
pub mod encode;
pub mod error;
pub mod fault;
pub mod lag;
pub mod link;
pub mod primary;
pub mod protocol;
pub mod spares;
pub mod standby;
pub mod stats;
pub mod throttle;
pub mod tiebreak;
pub mod timeline;
pub mod verify;
pub mod wire;

/// A small seeded generator for the FT engine's randomised unit tests (xorshift64).
#[cfg(test)]
pub(crate) struct TestRng(pub u64);

#[cfg(test)]
impl TestRng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Goodbye codes between the FT peers (above the channel's own).
pub const GOODBYE_VM_ENDED: u32 = 100;
pub const GOODBYE_HALTED: u32 = 101;
/// The primary replaced this standby (it lagged): it must not go live, and cannot.
pub const GOODBYE_REPLACED: u32 = 102;

/// Settings shared by both roles: built and checked by [`crate::config::FtBuilder`].
pub use crate::config::ft::{default_owner, FtOptions};
