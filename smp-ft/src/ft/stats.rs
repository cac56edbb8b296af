//! FT figures for QMP (`x-smpft-query-ft`) and the progress display of the initial copy.

use crate::snapshot::PauseTimings;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

const SAMPLES: usize = 4096;

/// One part of a pause.
type Phase = fn(&PauseTimings) -> Duration;

#[derive(Default)]
struct Inner {
    pauses: VecDeque<PauseTimings>,
    /// Checkpoint taken to its acknowledgement.
    ack_latency: VecDeque<Duration>,
    /// Checkpoints taken and not yet acknowledged: (epoch, when).
    in_flight: VecDeque<(u64, Instant)>,
    checkpoints: u64,
    /// The channel's UDP datagrams and send calls so far (this standby's).
    udp: transport::UdpSent,
    last_epoch: u64,
    last_bytes: u64,
    acked: u64,
    /// (when, total bytes sent), a sample a checkpoint, for the recent bandwidth.
    sent: VecDeque<(Instant, u64)>,
    total_sent: u64,
    protected_since: Option<Instant>,
    /// Bytes of disk writes mirrored in checkpoints.
    disk_bytes: u64,
    /// Dirty page bytes captured (4 KiB a page, zero pages included) and what encoding made of
    /// them.
    pages_raw: u64,
    pages_wire: u64,
    encode_cpu: Duration,
    /// The vCPU throttle now, since when it is on, and the time it was on before.
    throttle: u32,
    throttled_since: Option<Instant>,
    throttled: Duration,
    /// Where each checkpoint's time went, up to its acknowledgement.
    timeline: super::timeline::Timeline,
}

/// Counters shared by the VM owner and the sender thread.
#[derive(Default)]
pub struct Stats {
    inner: Mutex<Inner>,
}

/// p50 and p99 of `v` (which it sorts).
pub fn percentiles(v: &mut [Duration]) -> Option<(Duration, Duration)> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Some((at(0.5), at(0.99)))
}

impl Stats {
    pub fn pause(&self, t: PauseTimings) {
        crate::observe::get().pause(t.total());
        let mut g = self.inner.lock();
        if g.pauses.len() == SAMPLES {
            g.pauses.pop_front();
        }
        g.pauses.push_back(t);
    }

    /// A new standby: its epochs start again, so checkpoints sent to the last one are no
    /// longer waited for (they would hold the oldest-unacknowledged age, which paces the vCPUs,
    /// and the reply phases, forever).
    pub fn new_session(&self) {
        let mut g = self.inner.lock();
        g.in_flight.clear();
        g.timeline.clear();
    }

    /// Checkpoint `epoch` was captured (its pause, just recorded by [`Self::pause`], is over).
    pub fn checkpoint(&self, epoch: u64, bytes: u64) {
        let mut g = self.inner.lock();
        let now = Instant::now();
        let pause = g.pauses.back().map_or(Duration::ZERO, PauseTimings::total);
        g.timeline.captured(epoch, pause, now);
        g.in_flight.push_back((epoch, now));
        g.checkpoints += 1;
        g.last_epoch = epoch;
        g.last_bytes = bytes;
        crate::observe::get().checkpoint(g.in_flight.front().map(|&(_, t)| t));
    }

    /// Checkpoints up to `epoch` were acknowledged.
    pub fn acked(&self, epoch: u64) {
        let mut g = self.inner.lock();
        g.acked += 1;
        g.timeline.acked(epoch, Instant::now());
        let mut newest = None;
        while g.in_flight.front().is_some_and(|&(e, _)| e <= epoch) {
            newest = g.in_flight.pop_front();
        }
        if let Some((_, t)) = newest {
            if g.ack_latency.len() == SAMPLES {
                g.ack_latency.pop_front();
            }
            g.ack_latency.push_back(t.elapsed());
        }
        let latency = newest.map(|(_, t)| t.elapsed());
        crate::observe::get().acked(epoch, latency, g.in_flight.front().map(|&(_, t)| t));
    }

    /// The vCPU throttle changed.
    pub fn throttle(&self, percent: u32) {
        let mut g = self.inner.lock();
        match (g.throttled_since, percent) {
            (None, p) if p > 0 => g.throttled_since = Some(Instant::now()),
            (Some(t), 0) => {
                g.throttled += t.elapsed();
                g.throttled_since = None;
            }
            _ => {}
        }
        g.throttle = percent;
        crate::observe::get().figures.throttle_percent.store(percent.into(), std::sync::atomic::Ordering::Relaxed);
    }

    /// How long the latest acknowledged checkpoint waited for its acknowledgement.
    pub fn last_ack_latency(&self) -> Option<Duration> {
        self.inner.lock().ack_latency.back().copied()
    }

    /// When the oldest checkpoint not yet acknowledged was taken.
    pub fn oldest_unacked(&self) -> Option<Instant> {
        self.inner.lock().in_flight.front().map(|&(_, t)| t)
    }

    /// The standby spent `d` validating checkpoint `epoch`.
    pub fn validated(&self, epoch: u64, d: Duration) {
        self.inner.lock().timeline.validated(epoch, d);
    }

    /// The sender encoded payload `seq`'s pages.
    pub fn encoded(&self, seq: u64, e: super::encode::EncodeStats) {
        let mut g = self.inner.lock();
        g.timeline.encoded(seq, e.cpu);
        let o = crate::observe::get();
        o.add(&o.figures.dirty_bytes, e.raw);
        o.add(&o.figures.wire_bytes, e.encoded);
        g.pages_raw += e.raw;
        g.pages_wire += e.encoded;
        g.encode_cpu += e.cpu;
    }

    /// A checkpoint carries `bytes` of disk writes.
    pub fn disk(&self, bytes: u64) {
        let o = crate::observe::get();
        o.add(&o.figures.disk_mirrored, bytes);
        self.inner.lock().disk_bytes += bytes;
    }

    /// Payload `seq`, of `bytes`, was handed to QUIC; `udp` is what the channel has sent so far.
    pub fn sent(&self, seq: u64, bytes: u64, udp: transport::UdpSent) {
        let mut g = self.inner.lock();
        g.timeline.sent(seq, Instant::now());
        let o = crate::observe::get();
        o.add(&o.figures.log_bytes, bytes);
        g.udp = udp;
        g.total_sent += bytes;
        let total = g.total_sent;
        g.sent.push_back((Instant::now(), total));
        while g.sent.len() > 2 && g.sent.front().is_some_and(|(t, _)| t.elapsed() > Duration::from_secs(2)) {
            g.sent.pop_front();
        }
    }

    pub fn protected_since(&self, t: Instant) {
        self.inner.lock().protected_since = Some(t);
    }

    /// Pause p50/p99 over recent checkpoints.
    pub fn pause_percentiles(&self) -> Option<(Duration, Duration)> {
        self.phase_percentiles(PauseTimings::total)
    }

    fn phase_percentiles(&self, phase: impl Fn(&PauseTimings) -> Duration) -> Option<(Duration, Duration)> {
        let mut v: Vec<Duration> = self.inner.lock().pauses.iter().map(phase).collect();
        percentiles(&mut v)
    }

    /// Where pauses went: p50/p99 of each phase, in µs.
    fn pause_phases(&self) -> Value {
        let phases: [(&str, Phase); 5] = [
            ("stop", |t| t.stop),
            ("harvest", |t| t.harvest),
            ("copy", |t| t.copy),
            ("state", |t| t.state),
            ("resume", |t| t.resume),
        ];
        let mut out = serde_json::Map::new();
        for (name, f) in phases {
            if let Some((p50, p99)) = self.phase_percentiles(f) {
                out.insert(name.into(), json!([p50.as_micros() as u64, p99.as_micros() as u64]));
            }
        }
        Value::Object(out)
    }

    /// Bytes per second sent over the last two seconds or so.
    pub fn bandwidth(&self) -> f64 {
        let g = self.inner.lock();
        match (g.sent.front(), g.sent.back()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => (b1 - b0) as f64 / (*t1 - *t0).as_secs_f64(),
            _ => 0.0,
        }
    }

    pub fn to_json(&self) -> Value {
        let p = self.pause_percentiles();
        let a = {
            let mut v: Vec<Duration> = self.inner.lock().ack_latency.iter().copied().collect();
            percentiles(&mut v)
        };
        let bw = self.bandwidth();
        let phases = self.pause_phases();
        let g = self.inner.lock();
        let reply = g.timeline.to_json();
        json!({
            "checkpoints": g.checkpoints,
            "last-checkpoint-epoch": g.last_epoch,
            "last-checkpoint-bytes": g.last_bytes,
            "pause-p50-us": p.map(|p| p.0.as_micros() as u64),
            "pause-p99-us": p.map(|p| p.1.as_micros() as u64),
            "pause-phases-p50-p99-us": phases,
            "reply-phases-p50-p99-us": reply,
            "ack-latency-p50-us": a.map(|p| p.0.as_micros() as u64),
            "ack-latency-p99-us": a.map(|p| p.1.as_micros() as u64),
            "log-bandwidth-bytes-per-s": bw as u64,
            "log-bytes-total": g.total_sent,
            "disk-write-bytes-mirrored": g.disk_bytes,
            "page-bytes-captured": g.pages_raw,
            "page-bytes-sent": g.pages_wire,
            "page-encode-ms": g.encode_cpu.as_millis() as u64,
            "channel-datagrams": g.udp.datagrams,
            "channel-datagrams-per-send": (g.udp.datagrams as f64 / g.udp.calls.max(1) as f64 * 10.0).round() / 10.0,
            "throttle-percent": g.throttle,
            "throttled-ms": (g.throttled + g.throttled_since.map_or(Duration::ZERO, |t| t.elapsed())).as_millis() as u64,
            "protected-for-ms": g.protected_since.map(|t| t.elapsed().as_millis() as u64),
        })
    }
}

/// The NICs' counters, for `x-smpft-query-ft`.
pub fn nics(vm: &crate::vmm::RunningVm) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let nics: Vec<Value> = vm
        .devices()
        .nets()
        .iter()
        .map(|n| {
            let (d, s) = (n.device(), n.device().stats());
            json!({
                "tap": d.tap().name(),
                "mac": d.mac().to_string(),
                "addresses": d.learned().iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
                "rx-frames": s.rx_frames.load(Relaxed),
                "rx-dropped": s.rx_dropped.load(Relaxed),
                "tx-frames": s.tx_frames.load(Relaxed),
                "tx-dropped-held": s.tx_dropped_held.load(Relaxed),
                "tx-dropped-tap": s.tx_dropped_tap.load(Relaxed),
            })
        })
        .collect();
    Value::Array(nics)
}

/// Progress of the initial copy: an `indicatif` spinner on a terminal, a log line per round
/// otherwise (no terminal control in a log).
pub struct Progress {
    what: &'static str,
    started: Instant,
    /// The spinner, when stderr is a terminal.
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(what: &'static str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| spinner(what));
        Progress { what, started: Instant::now(), bar }
    }

    /// Round `round` started; `total` bytes so far, `this` of them in this round.
    pub fn update(&self, round: u32, total: u64, this: u64) {
        let r = Rate::new(self.started.elapsed(), total, this);
        match &self.bar {
            Some(bar) => bar.set_message(r.line(round, total)),
            None => tracing::info!(
                round,
                sent_bytes = total,
                round_bytes = this,
                rate_mib_s = format_args!("{:.1}", r.mib_s()),
                eta_s = format_args!("{:.2}", r.eta_s),
                "{}",
                self.what
            ),
        }
    }

    /// The copy is done: the spinner stays on its line with the last figures.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// A spinner on stderr: `what`, its figures and the time taken.
fn spinner(what: &'static str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{spinner} {prefix}: {msg} [{elapsed}]")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    bar.set_style(style);
    bar.set_prefix(what);
    bar.set_message("starting");
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The copy's rate so far and the time this round should take at it.
struct Rate {
    bytes_s: f64,
    eta_s: f64,
}

impl Rate {
    fn new(elapsed: Duration, total: u64, this: u64) -> Rate {
        let bytes_s = total as f64 / elapsed.as_secs_f64().max(1e-3);
        Rate { bytes_s, eta_s: this as f64 / bytes_s.max(1.0) }
    }

    fn mib_s(&self) -> f64 {
        self.bytes_s / 1048576.0
    }

    /// The spinner's message: round, bytes sent, rate and ETA.
    fn line(&self, round: u32, total: u64) -> String {
        format!(
            "round {round}, {:.1} MiB sent, {:.1} MiB/s, ETA {:.1} s",
            total as f64 / 1048576.0,
            self.mib_s(),
            self.eta_s
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_bandwidth() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(percentiles(&mut v), Some((Duration::from_millis(51), Duration::from_millis(99))));
        assert_eq!(percentiles(&mut []), None);
        let s = Stats::default();
        s.sent(1, 1000, Default::default());
        std::thread::sleep(Duration::from_millis(20));
        s.sent(2, 1000, transport::UdpSent { datagrams: 25, bytes: 36000, calls: 4 });
        assert!(s.bandwidth() > 0.0);
        s.pause(PauseTimings {
            stop: Duration::from_micros(500),
            copy: Duration::from_micros(200),
            ..Default::default()
        });
        let j = s.to_json();
        assert_eq!(j["pause-p50-us"], 700);
        assert_eq!(j["channel-datagrams-per-send"], 6.3);
        assert_eq!(j["pause-phases-p50-p99-us"]["copy"], json!([200, 200]));
        s.checkpoint(9, 100);
        assert!(s.oldest_unacked().is_some());
        s.new_session();
        assert!(s.oldest_unacked().is_none(), "a new standby waits for none of the last one's checkpoints");
    }

    #[test]
    fn progress_figures_and_a_quiet_progress_off_a_terminal() {
        let r = Rate::new(Duration::from_secs(2), 8 << 20, 2 << 20);
        assert_eq!(r.mib_s(), 4.0);
        assert_eq!(r.eta_s, 0.5);
        assert_eq!(r.line(3, 8 << 20), "round 3, 8.0 MiB sent, 4.0 MiB/s, ETA 0.5 s");
        // No time yet, nothing sent: finite figures, no division by zero.
        let r = Rate::new(Duration::ZERO, 0, 4096);
        assert!(r.mib_s() == 0.0 && r.eta_s.is_finite());
        // The test harness captures stderr: no terminal, so no bar, and updates only log.
        let p = Progress { what: "initial copy", started: Instant::now(), bar: None };
        p.update(1, 4096, 4096);
        p.finish();
        // A bar drawn nowhere takes the same calls.
        let p = Progress { bar: Some(ProgressBar::hidden()), ..p };
        p.update(2, 8192, 4096);
        p.finish();
        assert!(p.bar.as_ref().is_some_and(|b| b.is_finished() && b.message().starts_with("round 2,")));
    }
}
