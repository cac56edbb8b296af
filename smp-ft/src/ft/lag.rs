//! The lag policy (`--ft-max-lag`): a standby whose acknowledgements stay too far behind is
//! replaced. The output-latency throttle (`--ft-max-latency`) acts first: it slows the vCPUs so
//! that a guest dirtying memory faster than the channel drains produces less to send. When
//! the standby itself is the slow side (a host short of CPU, a stalled disk, a link that
//! degraded), no brake on the guest brings its acknowledgements back, and this watch decides to
//! replace it: it fires once the lag has been above `bound` for at least half of the last
//! `window` (bursts of lag count, not only an unbroken stretch), and the primary then takes
//! the tie-breaker at a new generation, drops the standby and protects the VM with a spare.
//!
//! Pure: lags and times in, a decision out.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Samples are kept at most this often.
const SAMPLE: Duration = Duration::from_millis(5);

#[derive(Debug, Clone)]
pub struct LagWatch {
    bound: Duration,
    window: Duration,
    /// (when, lag above the bound), oldest first, covering the last `window`.
    samples: VecDeque<(Instant, bool)>,
    /// When the watch (re)started: it decides only over whole windows.
    since: Option<Instant>,
}

impl LagWatch {
    /// A watch for lags above `bound` over `window`; a zero bound never fires.
    pub fn new(bound: Duration, window: Duration) -> LagWatch {
        LagWatch { bound, window, samples: VecDeque::new(), since: None }
    }

    /// Records the lag at `now`; true when the standby should be replaced.
    pub fn update(&mut self, lag: Duration, now: Instant) -> bool {
        if self.bound.is_zero() {
            return false;
        }
        let since = *self.since.get_or_insert(now);
        if self.samples.back().is_none_or(|&(t, _)| now.saturating_duration_since(t) >= SAMPLE) {
            self.samples.push_back((now, lag > self.bound));
        }
        while self.samples.front().is_some_and(|&(t, _)| now.saturating_duration_since(t) > self.window) {
            self.samples.pop_front();
        }
        if now.saturating_duration_since(since) < self.window {
            return false;
        }
        let over = self.samples.iter().filter(|(_, o)| *o).count();
        over * 2 >= self.samples.len() && over > 0
    }

    /// A new standby (or none): start over.
    pub fn reset(&mut self) {
        self.samples.clear();
        self.since = None;
    }

    /// The share of the last window spent above the bound, for reports.
    pub fn share_over(&self) -> f64 {
        let over = self.samples.iter().filter(|(_, o)| *o).count();
        over as f64 / self.samples.len().max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(w: &mut LagWatch, t0: Instant, from_ms: u64, to_ms: u64, lag: impl Fn(u64) -> u64) -> Option<u64> {
        (from_ms..to_ms).step_by(5).find(|&ms| w.update(Duration::from_millis(lag(ms)), t0 + Duration::from_millis(ms)))
    }

    #[test]
    fn fires_after_a_window_mostly_over_the_bound() {
        let t0 = Instant::now();
        let mut w = LagWatch::new(Duration::from_millis(50), Duration::from_secs(1));
        assert_eq!(run(&mut w, t0, 0, 3000, |_| 10), None, "a standby in step is kept");
        let mut w = LagWatch::new(Duration::from_millis(50), Duration::from_secs(1));
        let fired = run(&mut w, t0, 0, 3000, |_| 80).unwrap();
        assert!((1000..1010).contains(&fired), "after one whole window: {fired}");
    }

    #[test]
    fn bursts_count_and_short_stalls_do_not() {
        let t0 = Instant::now();
        // 120 ms behind, 20 ms caught up: behind most of the time.
        let mut w = LagWatch::new(Duration::from_millis(50), Duration::from_secs(1));
        assert!(run(&mut w, t0, 0, 3000, |ms| if ms % 140 < 120 { 120 } else { 0 }).is_some());
        // One 300 ms stall a second: under half of every window.
        let mut w = LagWatch::new(Duration::from_millis(50), Duration::from_secs(1));
        assert_eq!(run(&mut w, t0, 0, 5000, |ms| if ms % 1000 < 300 { 400 } else { 5 }), None);
    }

    #[test]
    fn off_and_reset() {
        let t0 = Instant::now();
        let mut w = LagWatch::new(Duration::ZERO, Duration::from_secs(1));
        assert_eq!(run(&mut w, t0, 0, 3000, |_| 1000), None, "zero bound: never");
        let mut w = LagWatch::new(Duration::from_millis(50), Duration::from_secs(1));
        assert_eq!(run(&mut w, t0, 0, 900, |_| 100), None);
        w.reset();
        assert_eq!(run(&mut w, t0, 900, 1800, |_| 100), None, "a new standby gets a whole window");
        assert!(w.share_over() > 0.99);
    }
}
