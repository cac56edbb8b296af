//! Bounded output latency (`--ft-max-latency`): when the standby's acknowledgements fall behind
//! the bound (a checkpoint waits longer than it for its acknowledgement), the vCPUs are slowed
//! in proportion to the excess, as QEMU's auto-converge does, and the brake is released as the
//! channel catches up. A guest that dirties memory faster than the channel drains then produces
//! less to send, and the output it waits on is released within about the bound.
//!
//! The controller is pure (time in, a percentage out); the FT engine applies it with
//! `VcpuControl::set_throttle` (each vCPU sleeps its share of every 10 ms slice).

use std::time::{Duration, Instant};

/// How often the throttle may change.
pub const STEP: Duration = Duration::from_millis(20);

#[derive(Debug, Clone)]
pub struct Throttle {
    bound: Duration,
    percent: u32,
    last: Option<Instant>,
}

impl Throttle {
    /// A throttle that keeps acknowledgements within `bound` (zero: never throttles).
    pub fn new(bound: Duration) -> Throttle {
        Throttle { bound, percent: 0, last: None }
    }

    pub fn percent(&self) -> u32 {
        self.percent
    }

    /// The throttle for a lag of `lag` at `now` (how long acknowledgements take: the age of the
    /// oldest output or checkpoint waiting, or the latest ack latency if more). Each step it
    /// rises by 15 points times the relative excess, `lag / bound - 1` (at most 3), while the
    /// lag exceeds the bound; it falls by 3 points a step only once the lag is under half the
    /// bound. Quick to brake and slow to release: a guest that dirties in bursts would
    /// otherwise get its brake off between bursts, and the bursts are what the tail is made of.
    pub fn update(&mut self, lag: Duration, now: Instant) -> u32 {
        if self.bound.is_zero() {
            return 0;
        }
        if self.last.is_some_and(|t| now.duration_since(t) < STEP) {
            return self.percent;
        }
        self.last = Some(now);
        let ratio = lag.as_secs_f64() / self.bound.as_secs_f64();
        if ratio > 1.0 {
            let step = (15.0 * (ratio - 1.0).min(3.0)).ceil() as u32;
            self.percent = (self.percent + step).min(crate::vmm::control::THROTTLE_MAX);
        } else if ratio < 0.5 {
            self.percent = self.percent.saturating_sub(3);
        }
        self.percent
    }

    /// No standby any more: no brake.
    pub fn reset(&mut self) {
        self.percent = 0;
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_brake_follows_the_lag_and_is_released_as_the_channel_catches_up() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Duration::from_millis(20));
        let ms = Duration::from_millis;
        assert_eq!(t.update(ms(20), t0), 0, "at the bound: no change");
        assert_eq!(t.update(ms(30), t0 + ms(20)), 8, "50% over: 7.5 points, rounded up");
        assert_eq!(t.update(ms(300), t0 + ms(25)), 8, "at most one change a step");
        assert_eq!(t.update(ms(300), t0 + ms(40)), 53, "far over: 45 points at most");
        for i in 3..10 {
            t.update(ms(300), t0 + ms(20 * i));
        }
        assert_eq!(t.percent(), crate::vmm::control::THROTTLE_MAX);
        assert_eq!(t.update(ms(15), t0 + ms(300)), 90, "under the bound but not under half: held");
        assert_eq!(t.update(ms(5), t0 + ms(320)), 87, "released slowly");
        t.reset();
        assert_eq!(t.percent(), 0);
        assert_eq!(t.update(ms(0), t0 + ms(400)), 0, "never below zero");
        let mut off = Throttle::new(Duration::ZERO);
        assert_eq!(off.update(ms(10_000), t0), 0, "no bound, no brake");
    }
}
