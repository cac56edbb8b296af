//! Fault injection for the failover tests: `SMPFT_FAULT` names one point at which this process
//! kills itself with SIGKILL (or stalls), so a test can hit a precise moment of the protocol.
//! Unset, every check is one relaxed atomic load.
//!
//! | `SMPFT_FAULT`        | where                                                        |
//! |----------------------|--------------------------------------------------------------|
//! | `kill-in-precopy`    | primary: right after sending the first pre-copy round        |
//! | `kill-after-send:K`  | primary: once the K-th epoch checkpoint is handed to QUIC    |
//! | `kill-after-ack:K`   | primary: on the K-th epoch ack, before its output is released |
//! | `stall-apply:K:MS`   | standby: sleeps MS after acking the K-th checkpoint, before applying it |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    InPrecopy,
    AfterSend,
    AfterAck,
    StallApply,
}

struct Fault {
    point: Point,
    count: u64,
    stall_ms: u64,
    seen: AtomicU64,
}

fn parse(s: &str) -> Option<Fault> {
    let mut w = s.split(':');
    let point = match w.next()? {
        "kill-in-precopy" => Point::InPrecopy,
        "kill-after-send" => Point::AfterSend,
        "kill-after-ack" => Point::AfterAck,
        "stall-apply" => Point::StallApply,
        _ => return None,
    };
    let count = w.next().map_or(Some(1), |c| c.parse().ok())?;
    let stall_ms = w.next().map_or(Some(0), |c| c.parse().ok())?;
    Some(Fault { point, count, stall_ms, seen: AtomicU64::new(0) })
}

fn fault() -> Option<&'static Fault> {
    static F: OnceLock<Option<Fault>> = OnceLock::new();
    F.get_or_init(|| {
        let s = std::env::var("SMPFT_FAULT").ok()?;
        let f = parse(&s);
        if f.is_none() {
            tracing::warn!("SMPFT_FAULT={s:?} is not a fault point; ignored");
        } else {
            tracing::warn!("fault injection armed: {s}");
        }
        f
    })
    .as_ref()
}

/// Passes `point` once more; acts if this is the armed point's K-th pass.
pub fn hit(point: Point) {
    let Some(f) = fault() else { return };
    if f.point != point || f.seen.fetch_add(1, Ordering::Relaxed) + 1 != f.count {
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
        let f = parse("kill-after-ack:7").unwrap();
        assert_eq!((f.point, f.count), (Point::AfterAck, 7));
        let f = parse("stall-apply:3:250").unwrap();
        assert_eq!((f.point, f.count, f.stall_ms), (Point::StallApply, 3, 250));
        assert_eq!(parse("kill-in-precopy").unwrap().count, 1);
        assert!(parse("explode").is_none());
        assert!(parse("kill-after-ack:x").is_none());
    }
}
