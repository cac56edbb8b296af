//! Where a reply's wait goes: per checkpoint, the time from the end of the previous pause to
//! the acknowledgement that releases the epoch's output, in phases (`x-smpft-query-ft`'s
//! `reply-phases-p50-p99-us`).
//!
//! | phase      | from                                   | to                                      |
//! |------------|----------------------------------------|-----------------------------------------|
//! | `epoch`    | the previous pause's end               | this pause's start (a reply produced in the epoch waits part of it) |
//! | `pause`    | the pause's start                      | the vCPUs running again                 |
//! | `encode`   | (the sender thread's time encoding the pages)                                    |
//! | `send`     | the pause's end                        | the checkpoint handed to QUIC, less `encode` (queueing behind the previous checkpoint, the channel's in-flight budget) |
//! | `validate` | (the standby's time checking the checkpoint, reported back)                      |
//! | `ack`      | the checkpoint handed to QUIC          | its acknowledgement here, less `validate` (the bytes on the wire and the way back) |

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

const SAMPLES: usize = 1024;

/// The phases' names, in order.
pub const PHASES: [&str; 6] = ["epoch", "pause", "encode", "send", "validate", "ack"];

/// One checkpoint on its way.
struct Record {
    epoch: u64,
    /// When its pause ended.
    resumed: Instant,
    epoch_len: Duration,
    pause: Duration,
    encode: Duration,
    handed: Option<Instant>,
    validate: Duration,
}

/// The phases of recent checkpoints.
#[derive(Default)]
pub struct Timeline {
    open: VecDeque<Record>,
    last_resume: Option<Instant>,
    done: VecDeque<[Duration; 6]>,
}

impl Timeline {
    /// Checkpoint `epoch` was captured in a pause of `pause` that ended at `now`.
    pub fn captured(&mut self, epoch: u64, pause: Duration, now: Instant) {
        let started = now.checked_sub(pause).unwrap_or(now);
        let epoch_len = self.last_resume.map_or(Duration::ZERO, |t| started.saturating_duration_since(t));
        self.last_resume = Some(now);
        if self.open.len() == SAMPLES {
            self.open.pop_front();
        }
        let r = Record {
            epoch,
            resumed: now,
            epoch_len,
            pause,
            encode: Duration::ZERO,
            handed: None,
            validate: Duration::ZERO,
        };
        self.open.push_back(r);
    }

    fn find(&mut self, epoch: u64) -> Option<&mut Record> {
        self.open.iter_mut().rev().find(|r| r.epoch == epoch)
    }

    /// The sender spent `cpu` encoding checkpoint `epoch`'s pages.
    pub fn encoded(&mut self, epoch: u64, cpu: Duration) {
        if let Some(r) = self.find(epoch) {
            r.encode = cpu;
        }
    }

    /// Checkpoint `epoch` was handed to QUIC at `now`.
    pub fn sent(&mut self, epoch: u64, now: Instant) {
        if let Some(r) = self.find(epoch) {
            r.handed = Some(now);
        }
    }

    /// The standby spent `d` validating checkpoint `epoch`.
    pub fn validated(&mut self, epoch: u64, d: Duration) {
        if let Some(r) = self.find(epoch) {
            r.validate = d;
        }
    }

    /// Checkpoints up to `epoch` were acknowledged at `now`; `epoch`'s phases are complete.
    pub fn acked(&mut self, epoch: u64, now: Instant) {
        while let Some(r) = self.open.front().filter(|r| r.epoch <= epoch) {
            if r.epoch == epoch {
                let handed = r.handed.unwrap_or(now);
                let send = handed.saturating_duration_since(r.resumed).saturating_sub(r.encode);
                let ack = now.saturating_duration_since(handed).saturating_sub(r.validate);
                if self.done.len() == SAMPLES {
                    self.done.pop_front();
                }
                self.done.push_back([r.epoch_len, r.pause, r.encode, send, r.validate, ack]);
            }
            self.open.pop_front();
        }
    }

    /// No standby: checkpoints on their way will not be acknowledged.
    pub fn clear(&mut self) {
        self.open.clear();
        self.last_resume = None;
    }

    /// p50 and p99 of each phase over recent checkpoints, in µs.
    pub fn to_json(&self) -> Value {
        let mut out = serde_json::Map::new();
        for (i, name) in PHASES.iter().enumerate() {
            let mut v: Vec<Duration> = self.done.iter().map(|p| p[i]).collect();
            if let Some((p50, p99)) = super::stats::percentiles(&mut v) {
                out.insert((*name).into(), json!([p50.as_micros() as u64, p99.as_micros() as u64]));
            }
        }
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoints_wait_is_split_into_its_phases() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut t = Timeline::default();
        t.captured(1, ms(1), t0);
        t.captured(2, ms(2), t0 + ms(22));
        t.encoded(2, ms(3));
        t.sent(2, t0 + ms(27));
        t.validated(2, ms(1));
        t.validated(9, ms(1));
        t.acked(2, t0 + ms(31));
        let j = t.to_json();
        let us = |name: &str| j[name][0].as_u64().unwrap();
        assert_eq!(us("epoch"), 20_000, "from the previous pause's end to this pause's start");
        assert_eq!(us("pause"), 2_000);
        assert_eq!(us("encode"), 3_000);
        assert_eq!(us("send"), 2_000, "handed 5 ms after the pause, 3 of them encoding");
        assert_eq!(us("validate"), 1_000);
        assert_eq!(us("ack"), 3_000, "4 ms after it was handed, 1 of them validating");
        assert_eq!(t.done.len(), 1, "checkpoint 1, acknowledged with 2, is not counted twice");
        assert!(t.open.is_empty());
    }
}
