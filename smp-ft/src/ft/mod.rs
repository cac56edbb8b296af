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

use std::path::PathBuf;
use std::time::Duration;
use transport::{ChannelConfig, Identity, PeerTrust};

/// Goodbye codes between the FT peers (above the channel's own).
pub const GOODBYE_VM_ENDED: u32 = 100;
pub const GOODBYE_HALTED: u32 = 101;
/// The primary replaced this standby (it lagged): it must not go live, and cannot.
pub const GOODBYE_REPLACED: u32 = 102;

/// Settings shared by both roles.
#[derive(Clone)]
pub struct FtOptions {
    pub identity: Identity,
    pub trust: PeerTrust,
    /// The tie-breaker record on shared storage.
    pub tiebreak: PathBuf,
    /// This side's name in the tie-breaker record and in the peer's logs.
    pub owner: String,
    /// Checkpoint interval.
    pub interval: Duration,
    /// Shortest gap between checkpoints when output is waiting.
    pub min_gap: Duration,
    /// How long a tie-breaker claim may wait for the lock.
    pub claim_timeout: Duration,
    /// How checkpoint pages are encoded (`--ft-compress`).
    pub compression: encode::Compression,
    /// Bytes of pages last sent that the primary keeps for deltas (`--ft-compress-cache`).
    pub compression_cache: u64,
    /// Output latency bound: vCPUs are slowed while acknowledgements lag more (zero: never).
    pub max_latency: Duration,
    /// The lag policy: a standby whose acknowledgements lag more than this for at least half
    /// of `max_lag_for` is replaced (zero: never).
    pub max_lag: Duration,
    pub max_lag_for: Duration,
    pub channel: ChannelConfig,
}

/// The default owner name: host name and process id.
pub fn default_owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("{}:{}", if host.is_empty() { "host" } else { host }, std::process::id())
}
