//! What an operator sees of a copy without opening its QMP socket: Prometheus metrics
//! (`--metrics`), a program run on each FT state change (`--on-event`) and the same changes as
//! QMP events (`SMPFT_FT_STATE`), and `smpft status`.
//!
//! One [`Observer`] per process (a process is one copy of one VM, whatever role it moves
//! through), reached through [`get`] so the FT shells need only one-line hooks. The shells
//! record figures as they already do for `x-smpft-query-ft`: atomics and histograms (a few
//! atomic operations on the checkpoint path, no lock that serving waits on). The metrics thread
//! only reads them; it never asks the VM's owner anything.

pub mod hook;
pub mod metrics;
pub mod status;

use parking_lot::Mutex;
use prometheus_client::metrics::histogram::Histogram;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

/// The QMP event each FT state change is also published as.
pub const QMP_EVENT: &str = "SMPFT_FT_STATE";

/// What a copy is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Standby,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
        }
    }
}

/// The FT state names a role reports (as `x-smpft-query-ft` does), one gauge each.
pub const PRIMARY_STATES: &[&str] = &[
    "unprotected",
    "live-after-failover",
    "syncing",
    "protected",
    "switching-over",
    "replacing-standby",
    "arbitrating",
    "switched-over",
    "halted",
];
pub const STANDBY_STATES: &[&str] = &["waiting", "syncing", "standby", "arbitrating", "live-after-failover", "halted"];

/// The changes an operator is told of (`SMPFT_EVENT`, the QMP event's `event`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FtEvent {
    Protected,
    Unprotected,
    LiveAfterFailover,
    StandbyReplaced,
    SwitchedOver,
    LostTieBreaker,
    StoodDown,
}

impl FtEvent {
    pub fn name(self) -> &'static str {
        match self {
            FtEvent::Protected => "protected",
            FtEvent::Unprotected => "unprotected",
            FtEvent::LiveAfterFailover => "live-after-failover",
            FtEvent::StandbyReplaced => "standby-replaced",
            FtEvent::SwitchedOver => "switched-over",
            FtEvent::LostTieBreaker => "lost-tie-breaker",
            FtEvent::StoodDown => "stood-down",
        }
    }
}

/// A tie-breaker claim's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimOutcome {
    Won,
    Lost,
    Unreachable,
}

/// Where state changes go besides the metrics: QMP clients (through an emitter the QMP server
/// hands out) and the `--on-event` program.
type Emit = Box<dyn Fn(&str, Value) + Send + Sync>;

/// The role, state and peer now, and since when (for time protected / unprotected).
struct Now {
    role: Role,
    state: &'static str,
    peer: Option<String>,
    since: Instant,
    /// A role change just happened: the next state is the new role's first, not a change.
    fresh: bool,
}

/// Histogram buckets for pauses, holds and acknowledgements: 100 µs to ~6.5 s.
fn buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 17)
}

/// Every figure a scrape reads.
pub struct Figures {
    pub generation: AtomicU64,
    pub epoch: AtomicU64,
    pub checkpoints: AtomicU64,
    pub log_bytes: AtomicU64,
    pub dirty_bytes: AtomicU64,
    pub wire_bytes: AtomicU64,
    pub throttle_percent: AtomicU64,
    pub disk_mirrored: AtomicU64,
    pub disk_staged: AtomicU64,
    pub failovers: AtomicU64,
    pub switchovers: AtomicU64,
    pub replacements: AtomicU64,
    pub claims: [AtomicU64; 3],
    pub protected_ns: AtomicU64,
    pub unprotected_ns: AtomicU64,
    /// Nanoseconds since the observer's start: the last checkpoint, and the oldest one not yet
    /// acknowledged (-1: none).
    pub last_checkpoint_ns: AtomicI64,
    pub oldest_unacked_ns: AtomicI64,
    pub pause: Histogram,
    pub hold: Histogram,
    pub ack: Histogram,
}

impl Default for Figures {
    fn default() -> Self {
        let z = || AtomicU64::new(0);
        Figures {
            generation: z(),
            epoch: z(),
            checkpoints: z(),
            log_bytes: z(),
            dirty_bytes: z(),
            wire_bytes: z(),
            throttle_percent: z(),
            disk_mirrored: z(),
            disk_staged: z(),
            failovers: z(),
            switchovers: z(),
            replacements: z(),
            claims: [z(), z(), z()],
            protected_ns: z(),
            unprotected_ns: z(),
            last_checkpoint_ns: AtomicI64::new(-1),
            oldest_unacked_ns: AtomicI64::new(-1),
            pause: Histogram::new(buckets()),
            hold: Histogram::new(buckets()),
            ack: Histogram::new(buckets()),
        }
    }
}

/// A NIC's counters, read at scrape time.
pub type NicStats = (String, Arc<dyn Fn() -> [u64; 5] + Send + Sync>);

pub struct Observer {
    start: Instant,
    /// The VM's name and UUID (labels, environment, status).
    vm: Mutex<(String, String)>,
    now: Mutex<Now>,
    pub figures: Figures,
    nics: Mutex<Vec<NicStats>>,
    emitters: Mutex<Vec<Emit>>,
    /// The QMP server of the moment (a copy binds its socket again as its role changes).
    qmp: Mutex<Option<qemu_shim::qmp::Emitter>>,
}

static OBSERVER: LazyLock<Observer> = LazyLock::new(|| Observer {
    start: Instant::now(),
    vm: Mutex::new(("vm".into(), String::new())),
    now: Mutex::new(Now { role: Role::Primary, state: "unprotected", peer: None, since: Instant::now(), fresh: true }),
    figures: Figures::default(),
    nics: Mutex::new(Vec::new()),
    emitters: Mutex::new(Vec::new()),
    qmp: Mutex::new(None),
});

/// This process's observer.
pub fn get() -> &'static Observer {
    &OBSERVER
}

impl Observer {
    fn ns(&self, t: Instant) -> i64 {
        t.saturating_duration_since(self.start).as_nanos() as i64
    }

    fn age(&self, at: &AtomicI64) -> Option<Duration> {
        let at = at.load(Relaxed);
        (at >= 0).then(|| Duration::from_nanos((self.ns(Instant::now()) - at).max(0) as u64))
    }

    /// Names the VM (labels, `SMPFT_VM`, `smpft status`).
    pub fn set_vm(&self, name: &str, uuid: Option<&str>) {
        *self.vm.lock() = (name.to_string(), uuid.unwrap_or_default().to_string());
    }

    pub fn vm(&self) -> (String, String) {
        self.vm.lock().clone()
    }

    /// Adds a receiver of state changes (QMP clients' event queue, the event program).
    pub fn on_change(&self, emit: impl Fn(&str, Value) + Send + Sync + 'static) {
        self.emitters.lock().push(Box::new(emit));
    }

    /// QMP clients of `server` get each change as an `SMPFT_FT_STATE` event.
    pub fn set_qmp(&self, server: &qemu_shim::qmp::QmpServer) {
        *self.qmp.lock() = Some(server.emitter());
    }

    /// The VM's NICs, read at each scrape: (name, [tx, rx, tx dropped held, tx dropped at the
    /// tap, rx dropped]).
    pub fn set_nics(&self, nics: Vec<NicStats>) {
        *self.nics.lock() = nics;
    }

    /// A running VM's output gate and NICs, read from now on (a primary's, or a standby's
    /// once live).
    pub fn attach(&self, vm: &crate::vmm::RunningVm) {
        vm.devices().gate.observe_holds(Box::new(|d| get().hold(d)));
        let nics = vm
            .devices()
            .nets()
            .iter()
            .map(|n| {
                let name = n.device().tap().name().to_string();
                let n = n.clone();
                let read = move || {
                    let s = n.device().stats();
                    [&s.tx_frames, &s.rx_frames, &s.tx_dropped_held, &s.tx_dropped_tap, &s.rx_dropped]
                        .map(|a| a.load(Relaxed))
                };
                (name, Arc::new(read) as Arc<dyn Fn() -> [u64; 5] + Send + Sync>)
            })
            .collect();
        self.set_nics(nics);
    }

    pub(crate) fn nics(&self) -> Vec<NicStats> {
        self.nics.lock().clone()
    }

    /// The role, state and peer now.
    pub fn now(&self) -> (Role, &'static str, Option<String>) {
        let n = self.now.lock();
        (n.role, n.state, n.peer.clone())
    }

    /// Time protected and unprotected so far (the current stint included).
    pub fn protection_times(&self) -> (Duration, Duration) {
        let f = &self.figures;
        let (mut p, mut u) =
            (Duration::from_nanos(f.protected_ns.load(Relaxed)), Duration::from_nanos(f.unprotected_ns.load(Relaxed)));
        let n = self.now.lock();
        match stint(n.role, n.state) {
            Some(true) => p += n.since.elapsed(),
            Some(false) => u += n.since.elapsed(),
            None => {}
        }
        (p, u)
    }

    /// The copy's FT state now (called after every step; only changes do anything).
    pub fn state(&self, role: Role, state: &'static str, generation: u64, peer: Option<String>) {
        self.figures.generation.store(generation, Relaxed);
        let change = {
            let mut n = self.now.lock();
            if n.role == role && n.state == state && !n.fresh {
                if peer.is_some() {
                    n.peer = peer;
                }
                return;
            }
            let elapsed = n.since.elapsed().as_nanos() as u64;
            match stint(n.role, n.state) {
                Some(true) => self.figures.protected_ns.fetch_add(elapsed, Relaxed),
                Some(false) => self.figures.unprotected_ns.fetch_add(elapsed, Relaxed),
                None => 0,
            };
            let (prev, fresh) = (n.state, n.fresh || n.role != role);
            *n = Now { role, state, peer: peer.or(n.peer.take()), since: Instant::now(), fresh: false };
            (prev, fresh)
        };
        let (prev, fresh) = change;
        if let Some(ev) = transition(role, prev, state, fresh) {
            self.event(ev, prev);
        }
    }

    /// This copy (a standby) goes live: after a failover, or taking a switchover.
    pub fn went_live(&self, handover: bool, generation: u64) {
        self.figures.generation.store(generation, Relaxed);
        let ev = if handover { FtEvent::SwitchedOver } else { FtEvent::LiveAfterFailover };
        let prev = {
            let mut n = self.now.lock();
            let prev = n.state;
            let peer = n.peer.take();
            *n = Now { role: Role::Primary, state: "live-after-failover", peer, since: Instant::now(), fresh: true };
            prev
        };
        self.event(ev, prev);
    }

    /// A standby's watch ended without running the VM: the primary ended it, or told it to go.
    pub fn stood_down(&self) {
        let prev = self.now.lock().state;
        self.event(FtEvent::StoodDown, prev);
    }

    /// A tie-breaker claim's answer: counted by outcome; one lost to the peer is told as
    /// `lost-tie-breaker` (not one that finds the VM ended on purpose).
    pub fn claimed<T>(&self, r: &Result<crate::ft::tiebreak::Outcome, T>) {
        self.figures.claims[claim_outcome(r) as usize].fetch_add(1, Relaxed);
        if let Ok(crate::ft::tiebreak::Outcome::Lost { holder, .. }) = r {
            if !holder.ends_with(crate::ft::tiebreak::STOPPED) {
                let prev = self.now.lock().state;
                self.event(FtEvent::LostTieBreaker, prev);
            }
        }
    }

    fn event(&self, ev: FtEvent, prev: &str) {
        let f = &self.figures;
        match ev {
            FtEvent::LiveAfterFailover => f.failovers.fetch_add(1, Relaxed),
            FtEvent::SwitchedOver => f.switchovers.fetch_add(1, Relaxed),
            FtEvent::StandbyReplaced => f.replacements.fetch_add(1, Relaxed),
            _ => 0,
        };
        let (role, state, peer) = self.now();
        let (vm, uuid) = self.vm();
        let data = json!({
            "event": ev.name(),
            "vm": vm,
            "uuid": uuid,
            "role": role.name(),
            "state": state,
            "previous-state": prev,
            "peer": peer,
            "generation": f.generation.load(Relaxed),
            "epoch": f.epoch.load(Relaxed),
        });
        tracing::info!(event = ev.name(), state, previous = prev, "FT state change");
        if let Some(q) = &*self.qmp.lock() {
            q.emit(QMP_EVENT, Some(data.clone()));
        }
        for emit in self.emitters.lock().iter() {
            emit(QMP_EVENT, data.clone());
        }
    }

    // Figures recorded by the FT shells.

    pub fn pause(&self, d: Duration) {
        self.figures.pause.observe(d.as_secs_f64());
    }

    pub fn hold(&self, d: Duration) {
        self.figures.hold.observe(d.as_secs_f64());
    }

    /// A checkpoint was taken (primary) or received (standby).
    pub fn checkpoint(&self, oldest_unacked: Option<Instant>) {
        let f = &self.figures;
        f.checkpoints.fetch_add(1, Relaxed);
        let now = self.ns(Instant::now());
        f.last_checkpoint_ns.store(now, Relaxed);
        if let Some(t) = oldest_unacked {
            f.oldest_unacked_ns.store(self.ns(t), Relaxed);
        }
    }

    /// Checkpoints up to `epoch` are acknowledged (primary) or applied (standby).
    pub fn acked(&self, epoch: u64, latency: Option<Duration>, oldest_unacked: Option<Instant>) {
        let f = &self.figures;
        f.epoch.store(epoch, Relaxed);
        if let Some(l) = latency {
            f.ack.observe(l.as_secs_f64());
        }
        f.oldest_unacked_ns.store(oldest_unacked.map_or(-1, |t| self.ns(t)), Relaxed);
    }

    /// A standby received a checkpoint of `bytes`, with `disk` bytes of writes staged.
    pub fn received(&self, bytes: u64, disk: u64) {
        let f = &self.figures;
        f.log_bytes.fetch_add(bytes, Relaxed);
        f.disk_staged.fetch_add(disk, Relaxed);
        self.checkpoint(None);
    }

    pub fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// How far the standby trails: the oldest checkpoint not yet acknowledged (primary).
    pub fn lag(&self) -> Duration {
        self.age(&self.figures.oldest_unacked_ns).unwrap_or_default()
    }

    pub fn last_checkpoint_age(&self) -> Option<Duration> {
        self.age(&self.figures.last_checkpoint_ns)
    }

    /// What `smpft status` reads over QMP (added to `x-smpft-query-ft`).
    pub fn query(&self, v: &mut Value) {
        let (p, u) = self.protection_times();
        let (vm, uuid) = self.vm();
        v["vm"] = json!(vm);
        v["uuid"] = json!(uuid);
        v["lag-ms"] = json!(self.lag().as_millis() as u64);
        v["last-checkpoint-age-ms"] = json!(self.last_checkpoint_age().map(|d| d.as_millis() as u64));
        v["protected-s"] = json!(p.as_secs());
        v["unprotected-s"] = json!(u.as_secs());
        v["failovers"] = json!(self.figures.failovers.load(Relaxed));
    }
}

/// A claim's outcome, for the metrics.
fn claim_outcome<T>(r: &Result<crate::ft::tiebreak::Outcome, T>) -> ClaimOutcome {
    match r {
        Ok(crate::ft::tiebreak::Outcome::Won { .. }) => ClaimOutcome::Won,
        Ok(crate::ft::tiebreak::Outcome::Lost { .. }) => ClaimOutcome::Lost,
        Err(_) => ClaimOutcome::Unreachable,
    }
}

/// Whether time in `state` counts as protected (`Some(true)`), unprotected, or neither (a
/// standby's, or a copy that no longer runs the VM).
fn stint(role: Role, state: &str) -> Option<bool> {
    match (role, state) {
        (Role::Primary, "protected" | "switching-over") => Some(true),
        (Role::Primary, "switched-over" | "halted") | (Role::Standby, _) => None,
        (Role::Primary, _) => Some(false),
    }
}

/// The event a state change is, if any. `fresh`: the first state of a role (a copy just
/// started, or just went live, which [`Observer::went_live`] told already).
fn transition(role: Role, prev: &str, state: &str, fresh: bool) -> Option<FtEvent> {
    match (role, state) {
        (_, "protected") | (Role::Standby, "standby") => Some(FtEvent::Protected),
        (Role::Primary, "replacing-standby") => Some(FtEvent::StandbyReplaced),
        (Role::Primary, "switched-over") => Some(FtEvent::SwitchedOver),
        _ if fresh => None,
        (Role::Primary, "unprotected" | "live-after-failover")
            if matches!(prev, "protected" | "arbitrating" | "syncing" | "replacing-standby") =>
        {
            Some(FtEvent::Unprotected)
        }
        (Role::Standby, "waiting") if prev != "waiting" => Some(FtEvent::StoodDown),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_changes_become_events() {
        use Role::*;
        assert_eq!(transition(Primary, "syncing", "protected", false), Some(FtEvent::Protected));
        assert_eq!(transition(Primary, "protected", "arbitrating", false), None);
        assert_eq!(transition(Primary, "arbitrating", "unprotected", false), Some(FtEvent::Unprotected));
        assert_eq!(transition(Primary, "standby", "live-after-failover", true), None, "told by went_live");
        assert_eq!(transition(Primary, "unprotected", "unprotected", true), None);
        assert_eq!(transition(Primary, "protected", "replacing-standby", false), Some(FtEvent::StandbyReplaced));
        assert_eq!(transition(Standby, "arbitrating", "halted", false), None, "told by claimed");
        assert_eq!(transition(Standby, "standby", "waiting", false), Some(FtEvent::StoodDown));
        assert_eq!(transition(Standby, "syncing", "standby", false), Some(FtEvent::Protected));
        assert_eq!(stint(Primary, "protected"), Some(true));
        assert_eq!(stint(Primary, "live-after-failover"), Some(false));
        assert_eq!(stint(Standby, "standby"), None);
    }
}
