//! The failure detector: when is a peer that has gone quiet dead?
//!
//! A fixed timeout is wrong on a busy host both ways: the peer's messages arrive in bursts when
//! either copy is short of CPU, and a copy that was not scheduled for a while sees a silence
//! that was its own. So the detector judges silence against two things it has observed, with
//! the configured timeout as the floor and a ceiling:
//!
//! - **The peer's rhythm:** the gaps between the messages it heard recently. The threshold is
//!   the floor, or if longer the mean of the last [`WINDOW`] gaps plus [`SIGMAS`] standard
//!   deviations (a phi-accrual detector's reasoning with a normal approximation), or
//!   [`MAX_GAP_FACTOR`] times the longest gap of the last [`HISTORY`] (after which the peer
//!   was heard again: it was alive), each plus a heartbeat, and never more than the ceiling. A
//!   peer that has been bursty is given the room its bursts took; a steady one is judged at
//!   the floor.
//! - **Its own scheduling:** the detector is ticked at a fixed period; a tick that comes late
//!   means this copy itself was not running, and that time does not count as the peer's
//!   silence. The first tick after such a stall never declares anything: what the peer sent
//!   meanwhile may be waiting to be read.
//!
//! - **Packets in flight:** a message can be late while the peer's packets are still coming:
//!   a lost packet holds up the ordered stream behind it until it is sent again, while later
//!   datagrams (and the peer's acknowledgements) still arrive; or what came waits unread in
//!   this copy's socket because the task that reads it has not run yet. Either is evidence the
//!   peer is alive ([`Evidence`]): while the last of it is more recent than the threshold,
//!   the silence is not declared, up to the ceiling.
//!
//! A peer is declared dead when its silence, less this copy's own stalls since it was last
//! heard, is above the threshold on two ticks in a row and no evidence speaks against it: a
//! real death is found within the threshold plus two ticks (a dead peer sends nothing, so no
//! evidence holds it up). The detector only reads the clock it is given: it is pure, and
//! tested with schedules of its own and, with the protocol's machines, in `ft::protocol`'s
//! pause schedules.
//!
//! [`Mode::Fixed`] is the plain timeout (silence over the floor is death, nothing else
//! considered), kept to measure the detector against (`--ft-detector fixed`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Gaps remembered.
pub const WINDOW: usize = 128;
/// Standard deviations of the gaps a silence may reach before it counts.
pub const SIGMAS: f64 = 6.0;
/// A silence this many times the longest recent gap is allowed before it counts.
pub const MAX_GAP_FACTOR: f64 = 1.25;
/// How long the longest gap is remembered.
pub const HISTORY: Duration = Duration::from_secs(30);
/// Ticks in a row a silence must be above the threshold.
const CONFIRM: u32 = 2;

/// How silence is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Against the peer's rhythm, this copy's own stalls and the packets still arriving.
    #[default]
    Adaptive,
    /// Silence over the floor is death.
    Fixed,
}

/// What this copy sees of the peer besides its messages, at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Evidence {
    /// Datagrams received from the peer so far (a count that only grows).
    pub datagrams: u64,
    /// Something waits unread in this copy's socket.
    pub unread: bool,
}

/// What one tick found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Heard from recently enough.
    Alive,
    /// Silent beyond the threshold on this tick, not yet on enough ticks to be declared dead.
    Suspect,
    /// Dead: silent for `silent_for` (of which this copy was itself stalled `own_stall`).
    Dead { silent_for: Duration, own_stall: Duration },
}

/// The detector's state, for reports (`x-smpft-query-ft`) and logs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    /// The threshold in effect now.
    pub threshold: Duration,
    /// Time since the peer was last heard.
    pub silent_for: Duration,
    /// This copy's own stalls since then (not counted as the peer's silence).
    pub own_stall: Duration,
    /// Counted silence over the threshold: 1.0 is the threshold.
    pub suspicion: f64,
    /// Mean and standard deviation of the recent gaps, and the longest of the last [`HISTORY`].
    pub mean_gap: Duration,
    pub gap_deviation: Duration,
    pub longest_gap: Duration,
    /// Time since the last packet from the peer (see [`Evidence`]), message or not.
    pub packet_age: Duration,
    /// A silence over the threshold is being held back by packets still arriving.
    pub withheld: bool,
}

#[derive(Debug, Clone)]
pub struct Detector {
    floor: Duration,
    ceiling: Duration,
    heartbeat: Duration,
    period: Duration,
    last_heard: Instant,
    last_tick: Option<Instant>,
    /// Own stalls since the peer was last heard.
    own_stall: Duration,
    gaps: VecDeque<f64>,
    sum: f64,
    sum_sq: f64,
    /// The longest gap heard in each second of the last [`HISTORY`]: (second, gap in ms).
    longest: VecDeque<(u64, f64)>,
    origin: Instant,
    over: u32,
    mode: Mode,
    /// The datagram count last seen, and when it last grew (or something waited unread).
    datagrams: u64,
    packet_at: Instant,
    withheld: bool,
}

impl Detector {
    /// A detector for a peer heard at `now`, sending at least every `heartbeat`, declared dead
    /// after no less than `floor` and no more than `ceiling` of silence; ticked every `period`.
    pub fn new(floor: Duration, ceiling: Duration, heartbeat: Duration, period: Duration, now: Instant) -> Detector {
        Detector {
            floor,
            ceiling: ceiling.max(floor),
            heartbeat,
            period,
            last_heard: now,
            last_tick: None,
            own_stall: Duration::ZERO,
            gaps: VecDeque::with_capacity(WINDOW),
            sum: 0.0,
            sum_sq: 0.0,
            longest: VecDeque::new(),
            origin: now,
            over: 0,
            mode: Mode::Adaptive,
            datagrams: 0,
            packet_at: now,
            withheld: false,
        }
    }

    /// The same detector judging silence the `mode` way.
    pub fn with_mode(mut self, mode: Mode) -> Detector {
        self.mode = mode;
        self
    }

    /// Something arrived from the peer at `now`.
    pub fn heard(&mut self, now: Instant) {
        // A stall of this copy's that no tick has seen yet (the message is read first after
        // it): the watchdog's lateness says how long this copy was not running.
        if let Some(late) = self.late(now).filter(|l| *l > self.period) {
            self.own_stall += late.min(self.silent_for(now));
            self.last_tick = Some(now);
        }
        // The gap as the peer made it: this copy's own stalls are not the peer's rhythm.
        let gap = now.saturating_duration_since(self.last_heard).saturating_sub(self.own_stall).as_secs_f64() * 1e3;
        if self.gaps.len() == WINDOW {
            let old = self.gaps.pop_front().unwrap_or_default();
            self.sum -= old;
            self.sum_sq -= old * old;
        }
        self.gaps.push_back(gap);
        self.sum += gap;
        self.sum_sq += gap * gap;
        let second = now.saturating_duration_since(self.origin).as_secs();
        match self.longest.back_mut() {
            Some((s, g)) if *s == second => *g = g.max(gap),
            _ => self.longest.push_back((second, gap)),
        }
        while self.longest.front().is_some_and(|(s, _)| s + HISTORY.as_secs() < second) {
            self.longest.pop_front();
        }
        self.last_heard = self.last_heard.max(now);
        self.packet_at = self.packet_at.max(now);
        self.own_stall = Duration::ZERO;
        self.over = 0;
        self.withheld = false;
    }

    /// How much later than its period the watchdog would tick at `now`.
    fn late(&self, now: Instant) -> Option<Duration> {
        self.last_tick.map(|t| now.saturating_duration_since(t).saturating_sub(self.period))
    }

    /// Time since the peer was last heard, at `now`.
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_heard)
    }

    fn mean_and_deviation(&self) -> (f64, f64) {
        let n = self.gaps.len() as f64;
        if n == 0.0 {
            return (0.0, 0.0);
        }
        let mean = self.sum / n;
        (mean, (self.sum_sq / n - mean * mean).max(0.0).sqrt())
    }

    fn longest_gap(&self) -> f64 {
        self.longest.iter().map(|(_, g)| *g).fold(0.0, f64::max)
    }

    /// The silence a peer may keep now before it counts as dead.
    pub fn threshold(&self) -> Duration {
        if self.mode == Mode::Fixed {
            return self.floor;
        }
        let (mean, sd) = self.mean_and_deviation();
        let ms = (mean + SIGMAS * sd).max(MAX_GAP_FACTOR * self.longest_gap());
        let rhythm = Duration::from_secs_f64(ms / 1e3) + self.heartbeat;
        rhythm.clamp(self.floor, self.ceiling)
    }

    /// The periodic look at the silence, at `now`, with no evidence but messages.
    pub fn tick(&mut self, now: Instant) -> Verdict {
        self.tick_with(now, Evidence { datagrams: self.datagrams, unread: false })
    }

    /// The periodic look at the silence, at `now`, with what else is seen of the peer.
    pub fn tick_with(&mut self, now: Instant, evidence: Evidence) -> Verdict {
        if self.mode == Mode::Fixed {
            let silent_for = self.silent_for(now);
            return match silent_for > self.floor {
                true => Verdict::Dead { silent_for, own_stall: Duration::ZERO },
                false => Verdict::Alive,
            };
        }
        if evidence.datagrams > self.datagrams || evidence.unread {
            self.packet_at = now;
        }
        self.datagrams = self.datagrams.max(evidence.datagrams);
        let late = self.late(now).unwrap_or_default();
        self.last_tick = Some(now);
        // Late by more than a period: this copy was not running. That time is not the peer's
        // silence, and what the peer sent meanwhile may not have been read yet.
        if late > self.period {
            self.own_stall += late.min(self.silent_for(now));
            self.over = 0;
            return Verdict::Alive;
        }
        let silent_for = self.silent_for(now);
        let counted = silent_for.saturating_sub(self.own_stall);
        let threshold = self.threshold();
        if counted <= threshold {
            self.over = 0;
            self.withheld = false;
            return Verdict::Alive;
        }
        // Packets still come (or wait to be read): the peer is alive and its messages late,
        // up to the ceiling.
        self.withheld = self.packet_age(now) <= threshold && counted <= self.ceiling;
        if self.withheld {
            self.over = 0;
            return Verdict::Suspect;
        }
        self.over += 1;
        if self.over < CONFIRM {
            return Verdict::Suspect;
        }
        Verdict::Dead { silent_for, own_stall: self.own_stall }
    }

    /// Time since the last packet from the peer, message or not.
    fn packet_age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.packet_at)
    }

    pub fn report(&self, now: Instant) -> Report {
        let (mean, sd) = self.mean_and_deviation();
        let silent_for = self.silent_for(now);
        let threshold = self.threshold();
        let counted = silent_for.saturating_sub(self.own_stall);
        Report {
            threshold,
            silent_for,
            own_stall: self.own_stall,
            suspicion: counted.as_secs_f64() / threshold.as_secs_f64().max(1e-9),
            mean_gap: Duration::from_secs_f64(mean / 1e3),
            gap_deviation: Duration::from_secs_f64(sd / 1e3),
            longest_gap: Duration::from_secs_f64(self.longest_gap() / 1e3),
            packet_age: self.packet_age(now),
            withheld: self.withheld,
        }
    }
}

#[cfg(test)]
mod tests;
