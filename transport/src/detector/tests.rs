use super::*;

const FLOOR: Duration = Duration::from_millis(150);
const CEILING: Duration = Duration::from_millis(600);
const HEARTBEAT: Duration = Duration::from_millis(20);
const PERIOD: Duration = Duration::from_millis(5);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn detector(t0: Instant) -> Detector {
    Detector::new(FLOOR, CEILING, HEARTBEAT, PERIOD, t0)
}

/// Ticks every period from `from` to `to` (exclusive); the first verdict other than Alive.
fn ticks(d: &mut Detector, from: Instant, to: Instant) -> Option<(Instant, Verdict)> {
    let mut t = from;
    while t < to {
        match d.tick(t) {
            Verdict::Alive => {}
            v => return Some((t, v)),
        }
        t += PERIOD;
    }
    None
}

#[test]
fn a_steady_peer_is_judged_at_the_floor_and_a_dead_one_found_within_it_plus_two_ticks() {
    let t0 = Instant::now();
    let mut d = detector(t0);
    let mut t = t0;
    for _ in 0..200 {
        t += HEARTBEAT;
        d.heard(t);
        assert_eq!(ticks(&mut d, t, t + HEARTBEAT), None);
    }
    assert_eq!(d.threshold(), FLOOR, "steady 20 ms gaps: the floor");
    // The peer dies at `t`.
    let (at, v) = ticks(&mut d, t, t + ms(2000)).expect("a dead peer is found");
    assert!(matches!(v, Verdict::Suspect), "suspected first: {v:?}");
    let (dead_at, v) = ticks(&mut d, at + PERIOD, t + ms(2000)).unwrap();
    assert!(matches!(v, Verdict::Dead { .. }), "{v:?}");
    let took = dead_at - t;
    assert!(took > FLOOR && took <= FLOOR + 2 * PERIOD, "declared after {took:?}");
}

#[test]
fn its_own_stall_is_not_the_peers_silence() {
    let t0 = Instant::now();
    let mut d = detector(t0);
    let mut t = t0;
    for _ in 0..50 {
        t += HEARTBEAT;
        d.heard(t);
        ticks(&mut d, t, t + HEARTBEAT);
    }
    let last = t;
    let _ = d.tick(last + PERIOD);
    // This copy is not scheduled for two seconds; the peer's heartbeats wait in the socket.
    let woke = last + ms(2000);
    assert_eq!(d.tick(woke), Verdict::Alive, "the first tick after a stall judges nothing");
    assert!(d.report(woke).own_stall >= ms(1900), "{:?}", d.report(woke));
    // The queued messages are read; the peer goes on.
    d.heard(woke + ms(1));
    assert_eq!(ticks(&mut d, woke + ms(1), woke + ms(100)), None);
    assert_eq!(d.threshold(), FLOOR, "the stall was not taken as the peer's gap");
    // A peer that really died during the stall is found once the stall is discounted.
    let mut d2 = detector(t0);
    d2.heard(t0 + HEARTBEAT);
    let _ = d2.tick(t0 + HEARTBEAT + PERIOD);
    let woke = t0 + ms(1000);
    assert_eq!(d2.tick(woke), Verdict::Alive);
    let (at, _) = ticks(&mut d2, woke + PERIOD, woke + ms(1000)).expect("found dead after the stall");
    assert!(at - woke <= FLOOR + 3 * PERIOD, "{:?}", at - woke);
}

#[test]
fn a_peer_seen_to_pause_is_given_the_room_its_pauses_took_up_to_the_ceiling() {
    let t0 = Instant::now();
    let mut d = detector(t0);
    let mut t = t0;
    for i in 0..300 {
        // Every 50th gap is a 200 ms pause (the peer short of CPU), the rest 20 ms.
        t += if i % 50 == 49 { ms(200) } else { HEARTBEAT };
        d.heard(t);
    }
    let th = d.threshold();
    assert!(th >= ms(250) && th <= CEILING, "{th:?}");
    assert_eq!(ticks(&mut d, t, t + ms(240)), None, "a 240 ms pause is within what it has shown");
    // Pauses beyond the ceiling are never allowed (the watchdog ticks all along).
    for _ in 0..5 {
        for _ in 0..2000 / PERIOD.as_millis() {
            t += PERIOD;
            let _ = d.tick(t);
        }
        d.heard(t);
    }
    assert_eq!(d.threshold(), CEILING);
    let found = ticks(&mut d, t, t + ms(5000)).map(|(at, _)| at - t);
    assert!(found.is_some_and(|f| f <= CEILING + PERIOD), "{found:?}");
}

#[test]
fn packets_still_arriving_hold_a_late_message_back_up_to_the_ceiling() {
    let t0 = Instant::now();
    let mut d = detector(t0);
    let mut t = t0;
    let mut datagrams = 0;
    for _ in 0..100 {
        t += HEARTBEAT;
        datagrams += 1;
        d.heard(t);
        let _ = d.tick_with(t, Evidence { datagrams, unread: false });
    }
    // A lost packet holds the stream up; later datagrams (and the peer's acks) keep coming.
    let stalled = t;
    let mut now = t;
    while now < stalled + ms(500) {
        now += PERIOD;
        datagrams += 1;
        let v = d.tick_with(now, Evidence { datagrams, unread: false });
        assert!(!matches!(v, Verdict::Dead { .. }), "declared dead at {:?} with packets arriving", now - stalled);
    }
    assert!(d.report(now).withheld, "{:?}", d.report(now));
    // The retransmission arrives: the stream moves again, and nothing was declared.
    d.heard(now);
    assert!(!d.report(now).withheld);
    // Packets that keep coming while no message ever does are not enough past the ceiling.
    let stuck = now;
    let found = loop {
        now += PERIOD;
        datagrams += 1;
        if let Verdict::Dead { .. } = d.tick_with(now, Evidence { datagrams, unread: false }) {
            break now - stuck;
        }
        assert!(now - stuck < ms(5000), "never declared");
    };
    assert!(found > CEILING && found <= CEILING + 2 * PERIOD, "{found:?}");
}

#[test]
fn a_message_waiting_unread_is_not_silence_and_a_dead_peer_sends_no_evidence() {
    let t0 = Instant::now();
    let mut d = detector(t0);
    d.heard(t0 + HEARTBEAT);
    let last = t0 + HEARTBEAT;
    // The reading task lags: something waits in the socket from 100 ms on.
    let mut now = last;
    while now < last + ms(400) {
        now += PERIOD;
        let unread = now >= last + ms(100);
        let v = d.tick_with(now, Evidence { datagrams: 1, unread });
        assert!(!matches!(v, Verdict::Dead { .. }), "declared with a message waiting, at {:?}", now - last);
    }
    // With nothing arriving, the floor holds: found within it plus two ticks.
    let mut d = detector(t0);
    d.heard(t0);
    let mut now = t0;
    let found = loop {
        now += PERIOD;
        if let Verdict::Dead { .. } = d.tick_with(now, Evidence { datagrams: 7, unread: false }) {
            break now - t0;
        }
    };
    assert!(found > FLOOR && found <= FLOOR + 2 * PERIOD + PERIOD, "{found:?}");
}

#[test]
fn the_fixed_mode_is_the_plain_timeout() {
    let t0 = Instant::now();
    let mut d = detector(t0).with_mode(Mode::Fixed);
    d.heard(t0);
    assert_eq!(d.tick(t0 + FLOOR), Verdict::Alive);
    // Its own stall, or packets waiting, change nothing: silence over the floor is death.
    let v = d.tick_with(t0 + FLOOR + ms(1), Evidence { datagrams: 9, unread: true });
    assert!(matches!(v, Verdict::Dead { .. }), "{v:?}");
    assert_eq!(d.threshold(), FLOOR);
}

/// xorshift, seeded.
fn rng(mut x: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n.max(1)
    }
}

/// Randomized schedules in 1 ms steps: the peer sends a heartbeat every 20 ms (with jitter
/// and, sometimes, pauses of its own shorter than the floor); this copy is descheduled now and
/// then for 50 ms to 2 s (no tick, nothing read: what arrived waits and is read, before or
/// after the first tick, when it runs again). A live peer is never declared dead; a peer that
/// dies is declared within the threshold plus this copy's stalls plus two ticks.
#[test]
fn randomized_schedules_with_descheduling_pauses_of_both_copies() {
    let seeds: u64 = std::env::var("SMPFT_DETECTOR_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    for seed in 1..=seeds {
        let mut r = rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let t0 = Instant::now();
        let mut d = detector(t0);
        let dies_at = if seed % 2 == 0 { Some(3_000 + r(20_000)) } else { None };
        let end = 30_000u64;
        let (mut next_send, mut next_tick, mut stalled_until) = (20u64, 5u64, 0u64);
        let mut queued: Vec<u64> = Vec::new();
        let mut dead_at = None;
        // This copy's stalls after the peer died (they do not count as its silence).
        let mut stalled_after_death = 0;
        for now in 1..end {
            let alive = dies_at.is_none_or(|t| now < t);
            if alive && now >= next_send {
                queued.push(now);
                // 20 ms ± 10, and now and then a pause of the peer's own below the floor.
                next_send = now + 10 + r(21) + if r(100) == 0 { 50 + r(60) } else { 0 };
            }
            if now < stalled_until {
                continue;
            }
            if r(2000) == 0 {
                let stall = 50 + r(1950);
                stalled_until = now + stall;
                if !alive {
                    stalled_after_death += stall;
                }
                continue;
            }
            let read_first = r(2) == 0;
            if read_first && !queued.is_empty() {
                d.heard(t0 + ms(now));
                queued.clear();
            }
            if now >= next_tick {
                next_tick = now + 5;
                if let Verdict::Dead { .. } = d.tick(t0 + ms(now)) {
                    dead_at = Some(now);
                    break;
                }
            }
            if !queued.is_empty() {
                d.heard(t0 + ms(now));
                queued.clear();
            }
        }
        match (dies_at, dead_at) {
            (None, Some(at)) => panic!("seed {seed}: a live peer was declared dead at {at} ms"),
            (Some(died), Some(at)) => {
                assert!(at > died, "seed {seed}: declared dead at {at} before it died at {died}");
                let bound = CEILING.as_millis() as u64 + stalled_after_death + 2_000 + 15;
                assert!(at - died <= bound, "seed {seed}: died at {died}, found at {at}");
            }
            (Some(died), None) => panic!("seed {seed}: the peer died at {died} ms and was never declared dead"),
            (None, None) => {}
        }
    }
}
