//! Fault injection for the failover tests: the test hook `fault=POINT` (in `SMPFT_TEST_HOOKS`,
//! see `config::hooks`) names one point at which this process kills itself with SIGKILL (or
//! stalls), so a test can hit a precise moment of the protocol. Without it, every check is one
//! load of a value set once.
//!
//! | `POINT`              | where                                                        |
//! |----------------------|--------------------------------------------------------------|
//! | `kill-in-precopy`    | primary: right after sending the first pre-copy round        |
//! | `kill-after-send:K`  | primary: once the K-th epoch checkpoint is handed to QUIC    |
//! | `kill-after-ack:K`   | primary: on the K-th epoch ack, before its output is released |
//! | `kill-after-stream:K` | primary: once the K-th disk op streamed while protected is handed to the stream (queued on the channel, or gathered for its next frame), before a seal covers it |
//! | `stall-apply:K:MS`   | standby: sleeps MS after acking the K-th checkpoint, before applying it |

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    InPrecopy,
    AfterSend,
    AfterAck,
    AfterStream,
    StallApply,
}

/// An armed fault point: act on the `count`-th pass (sleeping `stall_ms` for a stall).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultSpec {
    pub point: Point,
    pub count: u64,
    pub stall_ms: u64,
}

impl FaultSpec {
    /// Parses `kill-after-ack:7`, `stall-apply:3:250`, `kill-in-precopy` (K is 1 if left out).
    pub fn parse(s: &str) -> Option<FaultSpec> {
        let mut w = s.split(':');
        let point = match w.next()? {
            "kill-in-precopy" => Point::InPrecopy,
            "kill-after-send" => Point::AfterSend,
            "kill-after-ack" => Point::AfterAck,
            "kill-after-stream" => Point::AfterStream,
            "stall-apply" => Point::StallApply,
            _ => return None,
        };
        let count = w.next().map_or(Some(1), |c| c.parse().ok())?;
        let stall_ms = w.next().map_or(Some(0), |c| c.parse().ok())?;
        Some(FaultSpec { point, count, stall_ms })
    }
}

/// Passes of the armed point so far.
static SEEN: AtomicU64 = AtomicU64::new(0);

/// The VM is protected (streamed ops before that belong to the initial copy's last round trip,
/// which a kill would turn into a failed copy, not a failover).
static PROTECTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The standby acknowledged the synchronising checkpoint: `kill-after-stream` counts from now.
pub fn protected() {
    PROTECTED.store(true, Ordering::Relaxed);
}

fn fault() -> Option<&'static FaultSpec> {
    crate::config::hooks::current().fault.as_ref()
}

/// Passes `point` once more; acts if this is the armed point's K-th pass.
pub fn hit(point: Point) {
    let Some(f) = fault() else { return };
    if point == Point::AfterStream && !PROTECTED.load(Ordering::Relaxed) {
        return;
    }
    if f.point != point || SEEN.fetch_add(1, Ordering::Relaxed) + 1 != f.count {
        return;
    }
    if point == Point::StallApply {
        std::thread::sleep(Duration::from_millis(f.stall_ms));
        return;
    }
    tracing::warn!("fault injection: SIGKILL at {point:?} #{}", f.count);
    // SAFETY: kill(2) on our own pid with a valid signal number.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fault_points() {
        let f = FaultSpec::parse("kill-after-ack:7").unwrap();
        assert_eq!((f.point, f.count), (Point::AfterAck, 7));
        let f = FaultSpec::parse("stall-apply:3:250").unwrap();
        assert_eq!((f.point, f.count, f.stall_ms), (Point::StallApply, 3, 250));
        assert_eq!(FaultSpec::parse("kill-in-precopy").unwrap().count, 1);
        assert_eq!(FaultSpec::parse("kill-after-stream:4").unwrap().point, Point::AfterStream);
        assert!(FaultSpec::parse("explode").is_none());
        assert!(FaultSpec::parse("kill-after-ack:x").is_none());
    }
}
