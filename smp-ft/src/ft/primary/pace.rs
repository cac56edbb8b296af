//! Pacing: the brake on the vCPUs that keeps output latency bounded (`--ft-max-latency`), the
//! lag policy that replaces a standby too slow for any brake (`--ft-max-lag`), and what the
//! machine's checkpoint timer counts as output waiting.

use super::{Flow, PrimaryFt};
use crate::ft::protocol::{PrimaryEvent, PrimaryState};
use crate::vmm::RunningVm;
use std::time::{Duration, Instant};

impl PrimaryFt {
    /// Adjusts the brake on the vCPUs to how far acknowledgements lag (while protected).
    pub(super) fn throttle(&mut self, vm: &RunningVm, now: Instant) -> Flow {
        let before = self.throttle.percent();
        // What output waits (the bound is on that), or what a checkpoint waits for its ack.
        let waiting = self.stats.oldest_unacked().map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        let lag = self.gate.output_lag().max(waiting).max(self.stats.last_ack_latency().unwrap_or_default());
        let after = if self.proto.state() == PrimaryState::Protected {
            self.throttle.update(lag, now)
        } else {
            self.throttle.reset();
            0
        };
        let protected = self.proto.state() == PrimaryState::Protected && self.sync.is_none();
        let mut flow = Flow::Continue;
        if protected && self.lag.update(lag, now) {
            flow = self.replace_lagging(vm, lag);
        } else if !protected {
            self.lag.reset();
        }
        if after != before {
            vm.control().set_throttle(after);
            self.stats.throttle(after);
            if before == 0 || after == 0 || after.abs_diff(before) >= 25 {
                tracing::info!(
                    percent = after,
                    lag_ms = lag.as_millis() as u64,
                    bound_ms = self.opts.max_latency.as_millis() as u64,
                    "FT: vCPU throttle {}",
                    if after == 0 { "released" } else { "set: the standby's acknowledgements lag" }
                );
            }
        }
        if after > 0 {
            vm.control().kick_running_vcpus();
        }
        flow
    }

    /// The lag policy fired: take the tie-breaker from the standby, then drop it.
    fn replace_lagging(&mut self, vm: &RunningVm, lag: Duration) -> Flow {
        let peer = self.link.as_ref().map(|l| l.peer.to_string()).unwrap_or_default();
        let why = format!(
            "replaced: acknowledgements lagged more than {:?} for {:.0}% of {:?} (now {} ms), with the vCPU throttle at {}%",
            self.opts.max_lag,
            self.lag.share_over() * 100.0,
            self.opts.max_lag_for,
            lag.as_millis(),
            self.throttle.percent()
        );
        self.error(format!("standby {peer} {why}; taking the tie-breaker, then protecting with the next spare"));
        self.lag.reset();
        self.drop_reason = Some((crate::ft::GOODBYE_REPLACED, why));
        self.replaced += 1;
        self.lost_at = Some(Instant::now());
        // A claim (in the background); its answer drops the standby.
        self.step(vm, PrimaryEvent::Lagging)
    }

    /// Output waiting to be committed, for the machine's timer; a disk log past half its budget
    /// counts as output that has waited long enough (the disks stall when it is full).
    pub(super) fn output_waiting(&self, disk_filling: bool) -> Option<(Instant, Instant)> {
        let out = self.gate.open_times();
        if !disk_filling {
            return out;
        }
        let long_ago = Instant::now().checked_sub(Duration::from_secs(1)).unwrap_or_else(Instant::now);
        Some(out.map_or((long_ago, long_ago), |(first, _)| (first.min(long_ago), long_ago)))
    }
}
