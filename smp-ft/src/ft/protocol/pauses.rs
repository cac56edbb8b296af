//! Pause schedules: a protected primary and its standby, each judging the other's silence with
//! the failure detector its channel runs (`transport::detector`), in 1 ms steps. They exchange
//! heartbeats over a link that delays them and now and then loses one (the ordered stream then
//! waits for it to be sent again, while later datagrams still arrive); either copy is
//! descheduled for 50 ms to 2 s at random (it sends, reads and ticks nothing; what reaches it
//! waits in its socket), and its reading task may lag behind its watchdog. Half the schedules
//! kill one copy for real. A copy that declares its peer dead hands `PeerSilent` to its
//! protocol machine, which claims the tie-breaker; the peer learns of it as the connection
//! closes and claims as well.
//!
//! Checked on every schedule, with the same schedules run through the plain timeout to show
//! they are not easy:
//! - **no false claim where the evidence says so:** a copy declares its peer dead only after
//!   it has itself been running for longer than the floor since the peer's last packet
//!   reached it, or (a stream held up for good) for longer than the ceiling since the last
//!   message;
//! - **a real death is found in time:** within the floor plus a heartbeat and two ticks for a
//!   peer whose rhythm was steady (the threshold at the floor), within the ceiling plus two
//!   ticks in any case, plus what this copy itself was descheduled or its reader lagged;
//! - **one copy runs the VM:** one claim wins; a standby that loses to a live primary stands
//!   down (it never ran the VM); a primary that loses halts.

use super::*;
use crate::ft::tiebreak::memory::{MemoryTieBreaker, Store};
use crate::ft::tiebreak::{Outcome, TieBreak};
use crate::ft::TestRng as Rng;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use transport::detector::{Detector, Evidence, Mode, Verdict};

const FLOOR: u64 = 150;
const CEILING: u64 = 600;
const HEARTBEAT: u64 = 20;
const PERIOD: u64 = 5;
const END: u64 = 12_000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// One copy: its machine, its detector, and what the schedule does to it.
struct Copy {
    det: Detector,
    /// Descheduled in [start, end) (ms).
    pauses: Vec<(u64, u64)>,
    /// Its reading task does not run in [start, end), while its watchdog may.
    lags: Vec<(u64, u64)>,
    died_at: Option<u64>,
    next_send: u64,
    next_tick: u64,
    sent: u64,
    /// Packets on their way to this copy: sequence number → (arrival, sent again) in ms.
    wire: BTreeMap<u64, (u64, bool)>,
    /// Arrived, not yet read: sequence numbers.
    socket: Vec<u64>,
    /// Read, waiting for an earlier one: the stream delivers in order.
    read: BTreeMap<u64, ()>,
    next_deliver: u64,
    datagrams: u64,
    /// When the last packet reached its socket, and the last message was delivered.
    last_arrival: u64,
    last_message: u64,
    declared: Option<u64>,
    threshold_at_peer_death: Option<Duration>,
}

impl Copy {
    fn new(t0: Instant, mode: Mode) -> Copy {
        Copy {
            det: Detector::new(ms(FLOOR), ms(CEILING), ms(HEARTBEAT), ms(PERIOD), t0).with_mode(mode),
            pauses: Vec::new(),
            lags: Vec::new(),
            died_at: None,
            next_send: HEARTBEAT,
            next_tick: PERIOD,
            sent: 0,
            wire: BTreeMap::new(),
            socket: Vec::new(),
            read: BTreeMap::new(),
            next_deliver: 0,
            datagrams: 0,
            last_arrival: 0,
            last_message: 0,
            declared: None,
            threshold_at_peer_death: None,
        }
    }

    fn alive(&self, now: u64) -> bool {
        self.died_at.is_none_or(|d| now < d)
    }

    fn paused(&self, now: u64) -> bool {
        self.pauses.iter().any(|&(a, b)| a <= now && now < b)
    }

    fn lagging(&self, now: u64) -> bool {
        self.lags.iter().any(|&(a, b)| a <= now && now < b)
    }

    /// Milliseconds in [from, to) this copy was scheduled (alive and not paused).
    fn running(&self, from: u64, to: u64) -> u64 {
        (from..to).filter(|&t| !self.paused(t)).count() as u64
    }

    /// Its reading task runs: arrived packets are read, the stream delivers what is in order.
    fn read_socket(&mut self, t0: Instant, now: u64) {
        for seq in self.socket.drain(..) {
            self.datagrams += 1;
            self.read.insert(seq, ());
        }
        while self.read.remove(&self.next_deliver).is_some() {
            self.next_deliver += 1;
            self.last_message = now;
            self.det.heard(t0 + ms(now));
        }
    }
}

/// A schedule: pauses, reader lags, losses and perhaps a death, drawn from the seed.
struct Schedule {
    rng: Rng,
    t0: Instant,
    copies: [Copy; 2],
    lossy: bool,
}

impl Schedule {
    fn new(seed: u64, mode: Mode) -> Schedule {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let t0 = Instant::now();
        let mut copies = [Copy::new(t0, mode), Copy::new(t0, mode)];
        // One schedule in four is calm: no pauses, lags or losses; a death there is judged at
        // the floor.
        let calm = seed % 4 == 0;
        for c in copies.iter_mut().filter(|_| !calm) {
            let mut at = 500;
            while at < END - 3_000 {
                at += 300 + rng.next() % 3_000;
                match rng.next() % 8 {
                    0 => c.pauses.push((at, at + 50 + rng.next() % 1_951)),
                    1..=4 => c.lags.push((at, at + 20 + rng.next() % 181)),
                    _ => {}
                }
            }
        }
        if seed % 2 == 0 {
            let who = (rng.next() % 2) as usize;
            copies[who].died_at = Some(2_000 + rng.next() % (END - 5_000));
        }
        Schedule { rng, t0, copies, lossy: !calm }
    }

    /// Copy `k` sends a heartbeat at `now`: it arrives after 0–2 ms, or, lost (one in 50),
    /// when it is sent again 50–250 ms later.
    fn send(&mut self, k: usize, now: u64) {
        let lost = self.lossy && self.rng.chance(2);
        let delay = if lost { 50 + self.rng.next() % 201 } else { self.rng.next() % 3 };
        let seq = self.copies[k].sent;
        self.copies[1 - k].wire.insert(seq, (now + delay, lost));
        self.copies[k].sent += 1;
        // 20 ms ± 5.
        self.copies[k].next_send = now + HEARTBEAT - 5 + self.rng.next() % 11;
    }

    /// One millisecond of copy `k`; its verdict if it declared its peer dead.
    fn step(&mut self, k: usize, now: u64) -> bool {
        let peer_alive = self.copies[1 - k].alive(now);
        let c = &mut self.copies[k];
        if !peer_alive && c.threshold_at_peer_death.is_none() {
            c.threshold_at_peer_death = Some(c.det.threshold());
        }
        // The kernel takes what arrives, whether the copy runs or not; a lost packet arrives
        // only if its sender lived to send it again.
        let arrived: Vec<(u64, bool)> =
            c.wire.iter().filter(|(_, &(at, _))| at <= now).map(|(&s, &(_, lost))| (s, lost)).collect();
        for (s, lost) in arrived {
            c.wire.remove(&s);
            if !lost || peer_alive {
                c.socket.push(s);
                c.last_arrival = now;
            }
        }
        if !c.alive(now) || c.paused(now) {
            return false;
        }
        let read_first = self.rng.chance(50);
        let c = &mut self.copies[k];
        if read_first && !c.lagging(now) {
            c.read_socket(self.t0, now);
        }
        if now >= c.next_tick {
            c.next_tick = now + PERIOD;
            let evidence = Evidence { datagrams: c.datagrams, unread: !c.socket.is_empty() };
            if let Verdict::Dead { .. } = c.det.tick_with(self.t0 + ms(now), evidence) {
                c.declared = Some(now);
                return true;
            }
        }
        if !c.lagging(now) {
            c.read_socket(self.t0, now);
        }
        if now >= self.copies[k].next_send {
            self.send(k, now);
        }
        false
    }

    /// Runs until a copy declares its peer dead; who did and when.
    fn run(&mut self) -> Option<(usize, u64)> {
        for now in 1..END {
            let order = if self.rng.chance(50) { [0, 1] } else { [1, 0] };
            for k in order {
                if self.step(k, now) {
                    return Some((k, now));
                }
            }
        }
        None
    }
}

/// The protocol's answer to a declaration by copy `k` (0: the primary, 1: the standby): both
/// machines claim (the peer on the closed connection, if alive), the first claim first. What
/// each machine did, as (primary live, standby live, standby stood down).
fn arbitrate(first: usize, peer_alive: bool) -> (bool, bool, bool) {
    let t = Instant::now();
    let store = Store::new();
    let tb = [MemoryTieBreaker::new(&store, "primary"), MemoryTieBreaker::new(&store, "standby")];
    let mut p = Primary::new(0, PrimaryConfig::default(), t);
    p.handle(PrimaryEvent::Connected { digests: false });
    p.handle(PrimaryEvent::SyncSent { epoch: 0, at: t });
    p.handle(PrimaryEvent::Acked { epoch: 0 });
    let mut s = Standby::new(0, ms(100), t);
    s.handle(StandbyEvent::Checkpoint { epoch: 0, valid: true });
    // A dead primary runs nothing.
    let (mut p_live, mut s_live, mut s_down) = (first == 0 || peer_alive, false, false);
    let order = if first == 0 { [0, 1] } else { [1, 0] };
    for k in order {
        if k != first && !peer_alive {
            continue;
        }
        let answer = |g: u64| tb[k].claim(g, ms(1000)).expect("the model answers");
        if k == 0 {
            let Some(g) = p.handle(PrimaryEvent::PeerSilent).iter().find_map(|a| match a {
                PrimaryAction::Arbitrate { generation } => Some(*generation),
                _ => None,
            }) else {
                continue;
            };
            let ev = match answer(g) {
                Outcome::Won { generation } => PrimaryEvent::TieBreakWon { generation },
                Outcome::Lost { generation, .. } => PrimaryEvent::TieBreakLost { generation },
            };
            p_live = !p.handle(ev).contains(&PrimaryAction::Halt);
        } else {
            let Some(StandbyAction::Arbitrate { generation }) = s.handle(StandbyEvent::PeerSilent).first().cloned()
            else {
                continue;
            };
            let ev = match answer(generation) {
                Outcome::Won { generation } => StandbyEvent::TieBreakWon { generation },
                Outcome::Lost { generation, .. } => StandbyEvent::TieBreakLost { generation },
            };
            let a = s.handle(ev);
            s_live = a.iter().any(|a| matches!(a, StandbyAction::GoLive { .. }));
            s_down = a.contains(&StandbyAction::StandDown);
        }
    }
    (p_live, s_live, s_down)
}

/// How a schedule that kept the properties ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Ending {
    /// Nobody declared anything.
    Quiet,
    /// A live peer that sent nothing for long enough (paused itself) was declared dead.
    SilentPeerClaimed,
    /// A dead peer was found, at the floor's bound (steady) or the threshold's.
    DeathFound { steady: bool },
}

/// Runs schedule `seed` through detectors of `mode`; an error says what broke.
fn check(seed: u64, mode: Mode) -> Result<Ending, String> {
    let mut sch = Schedule::new(seed, mode);
    let found = sch.run();
    let fail = |what: String| Err(format!("seed {seed} ({mode:?}): {what}"));
    let dead = (0..2).find(|&k| sch.copies[k].died_at.is_some());
    let Some((k, at)) = found else {
        return match dead {
            Some(d) => fail(format!("copy {d} died and was never found dead")),
            None => Ok(Ending::Quiet),
        };
    };
    let c = &sch.copies[k];
    let peer = &sch.copies[1 - k];
    let ending = match peer.died_at.filter(|&d| d <= at) {
        None => {
            // The peer is alive: the evidence must have said it was gone.
            let since_packet = c.running(c.last_arrival, at);
            let since_message = c.running(c.last_message, at);
            if since_packet <= FLOOR && since_message <= CEILING {
                return fail(format!(
                    "copy {k} declared its live peer dead at {at} ms, {since_packet} ms of its own running after \
                     the peer's last packet reached it"
                ));
            }
            Ending::SilentPeerClaimed
        }
        Some(died) => {
            // What this copy still read after the death counts from when it was read.
            let from = died.max(c.last_message);
            let own = at - from - c.running(from, at);
            let lag: u64 = c.lags.iter().filter(|&&(a, b)| b > from && a < at).map(|(a, b)| b - a).sum();
            let threshold = c.det.threshold().as_millis() as u64;
            // Two ticks to confirm, and one for the packet evidence, counted at a tick.
            let mut allowed = threshold + 3 * PERIOD + own + lag;
            let steady = own == 0 && lag == 0 && threshold == FLOOR;
            if steady {
                // A steady peer, and nothing in the way: the floor plus a heartbeat.
                allowed = allowed.min(FLOOR + HEARTBEAT + 2 * PERIOD + from - died);
            }
            if threshold > CEILING || at - from > allowed {
                return fail(format!(
                    "copy {k} found its peer dead {} ms after it died at {died} (allowed {allowed} from {from}: own \
                     pauses {own}, reader lags {lag}, threshold {threshold} ms, {:?} at the death; last packet at \
                     {}, last message at {})",
                    at - died,
                    c.threshold_at_peer_death,
                    c.last_arrival,
                    c.last_message
                ));
            }
            Ending::DeathFound { steady }
        }
    };
    let (p_live, s_live, s_down) = arbitrate(k, peer.alive(at));
    if p_live == s_live {
        return fail(format!("after the claims, primary live {p_live}, standby live {s_live}"));
    }
    if !s_live && peer.alive(at) && !s_down {
        return fail("a standby that lost to a live primary did not stand down".into());
    }
    Ok(ending)
}

fn seeds() -> u64 {
    std::env::var("SMPFT_PAUSE_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(300)
}

#[test]
fn pauses_of_either_copy_bring_no_false_claim_and_a_death_is_still_found() {
    let mut endings: std::collections::HashMap<Ending, u64> = Default::default();
    let mut failures = Vec::new();
    for seed in 1..=seeds() {
        match check(seed, Mode::Adaptive) {
            Ok(e) => *endings.entry(e).or_default() += 1,
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} schedules failed, e.g. {:?}",
        failures.len(),
        seeds(),
        &failures[..3.min(failures.len())]
    );
    // Each kind of ending happens in many schedules: the checks above were exercised.
    for e in [
        Ending::Quiet,
        Ending::SilentPeerClaimed,
        Ending::DeathFound { steady: true },
        Ending::DeathFound { steady: false },
    ] {
        assert!(endings.get(&e).copied().unwrap_or(0) * 50 >= seeds(), "{e:?} in too few schedules: {endings:?}");
    }
}

#[test]
fn the_plain_timeout_fails_the_same_schedules() {
    // The schedules are hard: a fixed timeout claims against live peers in many of them.
    let n = seeds().min(100);
    let false_claims = (1..=n).filter(|&s| check(s, Mode::Fixed).is_err_and(|e| e.contains("live peer"))).count();
    assert!(false_claims * 4 >= n as usize, "only {false_claims} of {n} schedules caught the plain timeout");
}
