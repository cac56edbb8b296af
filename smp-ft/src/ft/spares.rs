//! The standbys a primary may protect itself with (`--ft-peer A,B,C`), tried in turn: after a
//! standby is lost, or when this copy went live after a failover, the VM is protected again by
//! the first one that answers and is accepted. Between two attempts on the same round the wait
//! is short; after a whole round without success it doubles, up to [`BACKOFF_MAX`].

use std::net::SocketAddr;
use std::time::Duration;

/// The wait between two spares of one round.
pub const RETRY: Duration = Duration::from_secs(1);
/// The longest wait after a round in which no spare could be used.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default)]
pub struct Spares {
    addrs: Vec<SocketAddr>,
    next: usize,
    /// Failed attempts since the last success.
    failures: u32,
}

impl Spares {
    pub fn new(addrs: Vec<SocketAddr>) -> Spares {
        Spares { addrs, next: 0, failures: 0 }
    }

    /// The spare to try (or that was last used).
    pub fn current(&self) -> Option<SocketAddr> {
        self.addrs.get(self.next).copied()
    }

    pub fn all(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The current spare could not be used: moves to the next and returns how long to wait.
    pub fn failed(&mut self) -> Duration {
        self.failures += 1;
        self.advance();
        let rounds = self.failures / self.addrs.len().max(1) as u32;
        if rounds == 0 || self.next != 0 {
            RETRY
        } else {
            (RETRY * 2u32.saturating_pow(rounds.min(8))).min(BACKOFF_MAX)
        }
    }

    /// The current spare is protecting the VM.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// The spare that protected the VM was lost: the next one is tried first.
    pub fn lost(&mut self) {
        self.advance();
    }

    /// New spares (QMP `x-smpft-protect`), tried from the first.
    pub fn set(&mut self, addrs: Vec<SocketAddr>) {
        *self = Spares::new(addrs);
    }

    fn advance(&mut self) {
        if !self.addrs.is_empty() {
            self.next = (self.next + 1) % self.addrs.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn spares_are_tried_in_turn_with_backoff_after_each_round() {
        let mut s = Spares::new(vec![a(1), a(2), a(3)]);
        assert_eq!(s.current(), Some(a(1)));
        assert_eq!(s.failed(), RETRY);
        assert_eq!(s.current(), Some(a(2)));
        assert_eq!(s.failed(), RETRY);
        assert_eq!(s.failed(), RETRY * 2, "a whole round failed: wait longer");
        assert_eq!(s.current(), Some(a(1)));
        for _ in 0..30 {
            assert!(s.failed() <= BACKOFF_MAX);
        }
        s.succeeded();
        let at = s.current();
        s.lost();
        assert_ne!(s.current(), at, "a lost standby is not the first tried again");
        s.set(vec![a(9)]);
        assert_eq!(s.current(), Some(a(9)));
        assert_eq!(Spares::default().current(), None);
    }
}
