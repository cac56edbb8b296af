//! The primary's FT shell: carries out what the protocol core ([`Primary`]) decides and feeds
//! back what happened. It lives on the thread that owns the VM (see `runner.rs`), which calls
//! [`PrimaryFt::on_channel`], [`PrimaryFt::on_input`] and [`PrimaryFt::tick`] from its one
//! event loop; checkpoints are encoded and sent on a sender thread, and connects and
//! tie-breaker claims run on threads this shell owns, so the VM owner only pauses, captures
//! and resumes.

use super::disk::DiskLog;
use super::error::FtError;
use super::link::Link;
use super::protocol::{Epoch, Primary, PrimaryAction, PrimaryEvent, PrimaryState};
use super::stats::Stats;
use super::tiebreak::{Outcome as Claim, TieBreak, TieBreakError};
use super::wire::{self, Meta, Outgoing};
use super::{FtOptions, GOODBYE_HALTED, GOODBYE_VM_ENDED};
use crate::error::error_chain;
use crate::vmm::RunningVm;
use crossbeam_channel::{Receiver, Sender};
use shutdown::Workers;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use transport::{Channel, Event, Message};

mod capture;
mod connect;
mod forward;
mod pace;
mod report;
mod switchover;
mod sync;

use switchover::PendingSwitchover;
pub use switchover::Switched;
use sync::SyncRun;

/// What the VM owner must do after an FT step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// This copy lost the tie-breaker: stop the VM at once, showing nothing more.
    Halt,
    /// The VM was handed over to the standby (a switchover): stop it, running nothing more.
    SwitchedOver,
    /// The VM was ending ([`PrimaryFt::finish`]) and may end now.
    Finished,
}

impl Flow {
    /// The more pressing of two outcomes of one step.
    pub fn and(self, other: Flow) -> Flow {
        if self == Flow::Continue {
            other
        } else {
            self
        }
    }
}

/// Results of work done off the VM owner's thread.
pub enum Input {
    Connected(Result<Channel, transport::ChannelError>),
    SendFailed(String),
    /// A tie-breaker claim made in the background.
    Claimed(Result<Claim, TieBreakError>),
    /// A switchover's hand-over recorded (or not) in the background.
    HandedOver(Result<Claim, TieBreakError>),
}

pub struct PrimaryFt {
    opts: FtOptions,
    tiebreak: Arc<dyn TieBreak>,
    proto: Primary,
    meta: Meta,
    link: Option<Link>,
    sync: Option<SyncRun>,
    inputs: (Sender<Input>, Receiver<Input>),
    wake: Receiver<()>,
    gate: Arc<crate::vmm::devices::gate::OutputGate>,
    disk_log: Arc<disk_mirror::log::WriteLog>,
    /// The verify test hook: what the standby should hold, checked against memory at each
    /// checkpoint.
    shadow: Option<super::verify::Shadow>,
    /// A capture taken for the machine, waiting for its [`PrimaryAction::Send`].
    captured: Option<Outgoing>,
    /// The standby's digests, for the copy about to start.
    digests: Option<Vec<disk_mirror::digest::Digest>>,
    /// Disk ops sealed by a capture that then failed: they open the next checkpoint's.
    unsent_disk: Vec<(u32, disk_mirror::log::Op)>,
    /// Checkpoints sent and not yet acknowledged that cover streamed disk ops: (epoch, ops
    /// covered). An acknowledgement takes their bytes off the write log's budget.
    disk_seals: std::collections::VecDeque<(Epoch, u64)>,
    /// Bytes the write log had streamed to this standby when the last checkpoint counted them.
    streamed_counted: u64,
    /// When the standby was last declared lost (for the log of how long deciding took).
    lost_at: Option<Instant>,
    stats: Arc<Stats>,
    /// This copy went live after a failover (it started as a standby).
    took_over: bool,
    /// The brake on the vCPUs that keeps output latency bounded.
    throttle: super::throttle::Throttle,
    /// The lag policy: when a standby too slow for the brake is replaced.
    lag: super::lag::LagWatch,
    /// Why the standby is being dropped, told to it (a replacement).
    drop_reason: Option<(u32, String)>,
    last_error: Option<String>,
    /// The standby's name in the tie-breaker (from its Hello), for a switchover.
    peer_owner: Option<String>,
    /// A switchover asked for and not yet over.
    switchover: Option<PendingSwitchover>,
    /// Where this side waits as a standby after a switchover.
    return_to: Option<String>,
    /// Standbys replaced for lagging.
    replaced: u64,
    /// When the event loop runs this engine again at the latest ([`Self::next_deadline`]);
    /// running much later than that means this copy was stopped (see [`Self::woke`]).
    awake_by: Option<Instant>,
    /// Snapshots asked of the standby, waiting for its report: (id, the QMP reply).
    pending_snapshots: Vec<(u64, qemu_shim::qmp::Reply)>,
    next_snapshot: u64,
    /// Connects, claims and channels closing, in the background.
    workers: Workers,
}

impl PrimaryFt {
    /// An FT engine for `vm`: protects it with the first of `spares` that answers (none: the
    /// VM runs unprotected until QMP `x-smpft-protect` names one). `took_over`: the generation
    /// this copy won going live after a failover.
    pub fn new(
        opts: FtOptions,
        vm: &RunningVm,
        spares: Vec<SocketAddr>,
        took_over: Option<u64>,
    ) -> Result<PrimaryFt, FtError> {
        let tiebreak = super::tiebreak::open(&opts.tiebreak, &opts.owner)?;
        let generation = match took_over {
            Some(g) => g,
            // Claims must go above anything already recorded.
            None => tiebreak.read(opts.claim_timeout)?.map_or(0, |r| r.generation),
        };
        let (wtx, wake) = crossbeam_channel::bounded(1);
        vm.devices().gate.notify_on_output(Some(wtx.clone()));
        vm.devices().disk_log().notify(Some(wtx));
        let meta = Meta {
            vcpus: vm.vcpus(),
            mem_size: vm.memory().size(),
            generation,
            owner: opts.owner.clone(),
            devices: vm.device_config().summary(),
            disks: vm.devices().disk_log().sizes().to_vec(),
            digests: false,
            cpuid: super::wire::cpuid_words(vm.guest_cpuid()),
        };
        crate::observe::get().attach(vm);
        let mut proto = Primary::new(generation, opts.protocol.clone(), Instant::now());
        proto.handle(PrimaryEvent::Protect { spares, after: Duration::ZERO });
        Ok(PrimaryFt {
            tiebreak,
            proto,
            meta,
            link: None,
            sync: None,
            inputs: crossbeam_channel::unbounded(),
            wake,
            gate: vm.devices().gate.clone(),
            disk_log: vm.devices().disk_log().clone(),
            shadow: opts.verify.then(|| super::verify::Shadow::new(vm.memory().size())),
            captured: None,
            unsent_disk: Vec::new(),
            disk_seals: Default::default(),
            streamed_counted: 0,
            digests: None,
            lost_at: None,
            stats: Arc::new(Stats::default()),
            took_over: took_over.is_some(),
            throttle: super::throttle::Throttle::new(opts.max_latency),
            lag: super::lag::LagWatch::new(opts.max_lag, opts.max_lag_for),
            drop_reason: None,
            last_error: None,
            peer_owner: None,
            switchover: None,
            return_to: None,
            replaced: 0,
            awake_by: None,
            pending_snapshots: Vec::new(),
            next_snapshot: 0,
            workers: Workers::new(),
            opts,
        })
    }

    /// Receivers the VM owner waits on (besides the deadline of [`Self::next_deadline`]).
    pub fn receivers(&self) -> (Receiver<Event>, Receiver<Input>, Receiver<()>) {
        let events = self.link.as_ref().map_or_else(crossbeam_channel::never, |l| l.chan.events().clone());
        (events, self.inputs.1.clone(), self.wake.clone())
    }

    /// When [`Self::tick`] next has something to do.
    pub fn next_deadline(&mut self) -> Instant {
        let now = Instant::now();
        let mut at = now + Duration::from_secs(3600);
        // The machine's timers (no checkpoint while the window is full: the next
        // acknowledgement, an event on the channel, opens it).
        self.proto.set_output_waiting(self.output_waiting(self.disk_log.filling()));
        if let Some(t) = self.proto.poll_timeout() {
            at = at.min(t);
        }
        if self.throttle.percent() > 0 {
            // Throttled vCPUs are kicked out of the guest every slice, to take their sleep.
            at = at.min(now + crate::vmm::control::THROTTLE_SLICE);
        }
        self.awake_by = Some(at);
        at
    }

    /// Called by the event loop as it wakes, before it handles what woke it: if this copy runs
    /// long after it was due (the host stopped it, e.g. SIGSTOP or a stalled VM), for half the
    /// standby's silence timeout or more, the standby may have taken over meanwhile, and an
    /// acknowledgement that arrived during the stall proves nothing: the machine holds output
    /// until a checkpoint taken after it is acknowledged.
    pub fn woke(&mut self, vm: &RunningVm) -> Flow {
        let Some(due) = self.awake_by.take() else { return Flow::Continue };
        let late = Instant::now().saturating_duration_since(due);
        if late < self.opts.channel.silence_timeout / 2 || self.link.is_none() {
            return Flow::Continue;
        }
        tracing::warn!(
            late_ms = late.as_millis() as u64,
            "FT: this copy did not run for a while; output waits for the standby to acknowledge a new checkpoint"
        );
        self.step(vm, PrimaryEvent::Stalled)
    }

    fn error(&mut self, msg: String) {
        tracing::error!("FT: {msg}");
        self.last_error = Some(msg);
    }

    /// Periodic work: the brake on the vCPUs, released output, and the machine's timers.
    pub fn tick(&mut self, vm: &RunningVm) -> Flow {
        let now = Instant::now();
        self.workers.reap();
        let flow = self.throttle(vm, now);
        if self.proto.state() == PrimaryState::Protected {
            self.gate.deliver_releasable();
        }
        self.proto.set_output_waiting(self.output_waiting(self.disk_log.filling()));
        let actions = self.proto.handle_timeout(now);
        flow.and(self.act(vm, actions))
    }

    /// Feeds `event` to the machine and carries out what it says.
    fn step(&mut self, vm: &RunningVm, event: PrimaryEvent) -> Flow {
        let actions = self.proto.handle_at(Instant::now(), event);
        self.act(vm, actions)
    }

    pub fn on_input(&mut self, vm: &RunningVm, input: Input) -> Flow {
        match input {
            Input::Connected(r) => self.connected(vm, r),
            Input::Claimed(r) => self.claimed(vm, r),
            Input::HandedOver(r) => self.hand_over_recorded(vm, r),
            Input::SendFailed(e) if self.link.is_some() => {
                tracing::warn!("FT: sending to the standby failed: {e}");
                self.peer_lost(vm)
            }
            Input::SendFailed(_) => Flow::Continue,
        }
    }

    pub fn on_channel(&mut self, vm: &RunningVm, ev: Event) -> Flow {
        match ev {
            Event::Message(Message::App { kind: wire::APP_DIGESTS, data }) => self.digests_arrived(vm, &data),
            Event::Message(Message::Ack { epoch }) => {
                if self.proto.state() != PrimaryState::Syncing {
                    if self.sync.as_ref().is_some_and(|s| s.final_seq == Some(epoch)) {
                        self.sync_done();
                    }
                    self.stats.acked(epoch);
                    if self.sync.is_none() {
                        super::fault::hit(super::fault::Point::AfterAck);
                    }
                }
                self.disk_acked(epoch);
                self.step(vm, PrimaryEvent::Acked { epoch })
            }
            Event::Message(Message::App { kind: wire::APP_CHECKPOINT_TIMES, data }) => {
                // Figures only: a malformed report is not worth the standby.
                if let Ok(t) = wire::decode_app::<wire::CheckpointTimes>(&data, "checkpoint times") {
                    self.stats.validated(t.epoch, Duration::from_micros(t.validate_us));
                }
                Flow::Continue
            }
            Event::Message(Message::App { kind: wire::APP_SNAPSHOT_DONE, data }) => {
                self.snapshot_done(&data);
                Flow::Continue
            }
            Event::Message(Message::Goodbye { reason, .. }) => {
                tracing::warn!("FT: the standby left: {reason}");
                self.peer_lost(vm)
            }
            Event::PeerSilent { silent_for } => {
                tracing::warn!("FT: standby silent for {silent_for:?}");
                self.peer_lost(vm)
            }
            Event::Closed { reason } => {
                tracing::warn!("FT: channel to the standby closed: {reason}");
                self.peer_lost(vm)
            }
            _ => Flow::Continue,
        }
    }

    /// The standby holds checkpoint `epoch`: the streamed disk ops it covers leave the write
    /// log's budget. (Requests the budget held back are served by the event loop's next pass,
    /// after this acknowledgement's output is released.)
    fn disk_acked(&mut self, epoch: Epoch) {
        let mut through = None;
        while let Some((_, t)) = self.disk_seals.front().filter(|(e, _)| *e <= epoch) {
            through = Some(*t);
            self.disk_seals.pop_front();
        }
        if let Some(t) = through {
            self.disk_log.acked(t);
        }
    }

    /// No standby to log disk writes for: nothing is kept or streamed.
    fn stop_disk_log(&mut self) {
        self.disk_log.stop();
        self.unsent_disk.clear();
        self.disk_seals.clear();
    }

    fn peer_lost(&mut self, vm: &RunningVm) -> Flow {
        if self.link.is_none() {
            return Flow::Continue;
        }
        self.lost_at = Some(Instant::now());
        self.step(vm, PrimaryEvent::PeerSilent)
    }

    fn act(&mut self, vm: &RunningVm, actions: Vec<PrimaryAction>) -> Flow {
        let mut flow = Flow::Continue;
        for a in actions {
            flow = flow.and(match a {
                PrimaryAction::Connect { peer } => self.connect(peer),
                PrimaryAction::StartSync => self.start_sync(),
                PrimaryAction::CopyRound { seq, all } => self.precopy_round(vm, seq, all),
                PrimaryAction::MeasureDirty => self.measure_dirty(vm),
                PrimaryAction::CaptureSync { epoch } => self.final_sync(vm, epoch),
                PrimaryAction::Capture { epoch } => self.capture(vm, epoch),
                PrimaryAction::CaptureFinal { epoch } => self.capture_final(vm, epoch),
                PrimaryAction::Send { epoch } => {
                    match (self.captured.take(), &self.link) {
                        (Some(p), Some(l)) if p.seq == epoch => l.send(p),
                        _ => {}
                    }
                    Flow::Continue
                }
                PrimaryAction::Release { ids } => {
                    tracing::debug!(?ids, acked = ?self.proto.acked(), "release");
                    vm.devices().gate.release(&ids);
                    Flow::Continue
                }
                PrimaryAction::StopProtecting => {
                    self.stop_disk_log();
                    vm.devices().gate.open_all();
                    Flow::Continue
                }
                PrimaryAction::DropStandby => self.drop_standby(),
                PrimaryAction::Arbitrate { generation } => self.start_claim(vm, generation),
                PrimaryAction::HandOver { epoch, generation } => self.hand_over(vm, epoch, generation),
                PrimaryAction::ResumeVm => {
                    if vm.is_paused() {
                        vm.resume();
                    }
                    Flow::Continue
                }
                PrimaryAction::SwitchoverEnded { handed_over } => self.switchover_ended(handed_over),
                PrimaryAction::Finished => Flow::Finished,
                PrimaryAction::Halt => {
                    let dropped = vm.devices().gate.discard_all();
                    tracing::error!(
                        generation = self.proto.generation(),
                        "FT: halting: this copy may not run the VM ({dropped} held output bytes never shown)"
                    );
                    Flow::Halt
                }
            });
        }
        self.publish();
        flow
    }

    fn drop_standby(&mut self) -> Flow {
        self.fail_pending_snapshots();
        self.digests = None;
        if let Some(l) = self.link.take() {
            let (code, why) =
                self.drop_reason.take().unwrap_or((transport::channel::code::SILENT, "standby dropped".into()));
            self.close_in_background(l, code, why);
        }
        if self.sync.take().is_some() {
            tracing::warn!("FT: the standby went away during the initial copy; running unprotected");
        }
        Flow::Continue
    }

    /// Closes a channel on a thread of this shell's: a closing QUIC connection waits for its
    /// peer (up to ~200 ms when the peer is gone), and arbitration must not wait for that.
    fn close_in_background(&mut self, link: Link, code: u32, why: String) {
        let slot = Arc::new(parking_lot::Mutex::new(Some(link)));
        let (theirs, reason) = (slot.clone(), why.clone());
        let spawned = self.workers.spawn("ft-close", move || {
            confine::enter(confine::Kind::Channel);
            if let Some(l) = theirs.lock().take() {
                l.close(code, &reason);
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot close the standby's channel in the background ({e}); closing it here");
            if let Some(l) = slot.lock().take() {
                l.close(code, &why);
            }
        }
    }

    /// Asks the tie-breaker in the background; the answer comes back as [`Input::Claimed`].
    fn start_claim(&mut self, vm: &RunningVm, generation: u64) -> Flow {
        let (tiebreak, timeout, tx) = (self.tiebreak.clone(), self.opts.claim_timeout, self.inputs.0.clone());
        let spawned = self.workers.spawn("ft-claim", move || {
            let _ = tx.send(Input::Claimed(tiebreak.claim(generation, timeout)));
        });
        match spawned {
            Ok(()) => Flow::Continue,
            Err(e) => {
                // No claim was made: as if the tie-breaker could not be reached (asked again).
                self.error(format!("cannot start a tie-breaker claim: {e}; output stays held, retrying"));
                self.step(vm, PrimaryEvent::TieBreakUnreachable)
            }
        }
    }

    fn claimed(&mut self, vm: &RunningVm, result: Result<Claim, TieBreakError>) -> Flow {
        let decided_ms = self.lost_at.map_or(0, |t| t.elapsed().as_millis() as u64);
        crate::observe::get().claimed(&result);
        let event = match result {
            Ok(Claim::Won { generation }) => {
                tracing::warn!(generation, decided_ms, "FT: won the tie-breaker; continuing unprotected");
                PrimaryEvent::TieBreakWon { generation }
            }
            Ok(Claim::Lost { generation, holder }) => {
                tracing::error!(generation, %holder, decided_ms, "FT: the tie-breaker is held by the peer");
                PrimaryEvent::TieBreakLost { generation }
            }
            Err(e) => {
                self.error(format!("{}; output stays held, retrying", error_chain(&e)));
                PrimaryEvent::TieBreakUnreachable
            }
        };
        self.step(vm, event)
    }

    /// Whether a standby is attached (syncing or protected): the dirty log belongs to FT then.
    pub fn is_active(&self) -> bool {
        self.link.is_some() || !matches!(self.proto.state(), PrimaryState::Unprotected)
    }

    /// QMP `x-smpft-protect`: `peers` is one address or several, comma-separated (spares).
    pub fn protect(&mut self, vm: &RunningVm, peers: &str) -> Result<(), FtError> {
        let spares = super::error::resolve_all(peers)?;
        if !self.proto.may_protect() {
            return Err(FtError::Busy { state: self.state_name(), peer: self.proto.spares().current() });
        }
        self.step(vm, PrimaryEvent::Protect { spares, after: Duration::ZERO });
        // The first attempt is due now.
        let _ = self.tick(vm);
        Ok(())
    }

    /// Whether new standbys (or new settings) may be given now: no standby attached or being
    /// connected.
    pub fn may_protect(&self) -> bool {
        self.proto.may_protect()
    }

    /// QMP `x-smpft-unprotect`: no spare is tried any more, and the standby is dropped (told
    /// why), once this copy holds the tie-breaker above it if it may hold a complete copy.
    pub fn unprotect(&mut self, vm: &RunningVm) {
        tracing::info!(state = self.state_name(), "FT: protection turned off by the operator");
        if self.link.is_some() {
            self.drop_reason = Some((super::GOODBYE_REPLACED, "protection turned off by the operator".into()));
            self.lost_at = Some(Instant::now());
        }
        self.last_error = None;
        let _ = self.step(vm, PrimaryEvent::Unprotect);
    }

    /// Tries the first standby only after `wait` (a copy that just handed the VM over needs a
    /// moment to wait as a standby again; tried before that, it would cost a whole retry).
    pub fn first_attempt_after(&mut self, wait: Duration) {
        let spares = self.proto.spares().all().to_vec();
        self.proto.handle_at(Instant::now(), PrimaryEvent::Protect { spares, after: wait });
    }

    /// The VM is ending (guest exit, quit or signal). If protected, its last output is
    /// committed first: the owner goes on serving the FT receivers until a step returns
    /// [`Flow::Finished`] (or [`Flow::Halt`]), then calls [`Self::finished`].
    pub fn finish(&mut self, vm: &RunningVm) -> Flow {
        self.step(vm, PrimaryEvent::Finish)
    }

    /// The VM has ended: the standby is told to stand down, and every thread of this shell is
    /// joined within a bound.
    pub fn finished(&mut self, why: &str) {
        self.stop_disk_log();
        if let Some(l) = self.link.take() {
            // A second path for the order, written first: a standby that misses the message
            // below and claims finds the VM stopped, not failed.
            match self.tiebreak.record_stop(self.proto.generation(), self.opts.claim_timeout) {
                Ok(Claim::Won { generation }) => tracing::info!(generation, "FT: the tie-breaker records the stop"),
                Ok(Claim::Lost { generation, holder }) => {
                    tracing::warn!(generation, %holder, "FT: the tie-breaker is someone else's; the stop is not recorded")
                }
                Err(e) => tracing::warn!("FT: cannot record the stop in the tie-breaker: {}", error_chain(&e)),
            }
            if crate::config::hooks::current().drop_goodbye {
                tracing::warn!("FT: test hook drop-goodbye: the standby is not told");
                return self.join_workers();
            }
            tracing::info!("FT: telling the standby to stand down: {why}");
            l.close(GOODBYE_VM_ENDED, why);
        }
        self.join_workers();
    }

    /// Whether this copy handed the VM over to its standby (a switchover).
    pub fn handed_over(&self) -> bool {
        self.proto.state() == PrimaryState::SwitchedOver
    }

    /// Where this copy waits as a standby after a switchover, if the switchover said.
    pub fn return_to(&self) -> Option<String> {
        self.return_to.clone()
    }

    /// This copy handed the VM over: close the channel (the standby runs the VM already, or
    /// will on its own once this side is gone), without waiting for the peer to confirm: the
    /// client of the VM waits for this copy to let go of its serial line and taps.
    pub fn switched_over(&mut self) {
        self.stop_disk_log();
        if let Some(l) = self.link.take() {
            self.close_in_background(l, GOODBYE_HALTED, "switched over".into());
        }
        self.join_workers();
    }

    /// This copy halts (lost the tie-breaker): say so to a standby still connected.
    pub fn halt(&mut self) {
        if let Some(l) = self.link.take() {
            l.close(GOODBYE_HALTED, "primary halted");
        }
        self.join_workers();
    }

    fn join_workers(&mut self) {
        let left = self.workers.join_within(Duration::from_millis(500));
        if !left.is_empty() {
            tracing::warn!("FT: background work still ending as the VM stops: {left:?}");
        }
    }
}
