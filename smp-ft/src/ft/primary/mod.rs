//! The primary's FT engine: drives [`Primary`] with real events. It lives on the thread that owns
//! the VM (see `runner.rs`), which calls [`PrimaryFt::on_channel`], [`PrimaryFt::on_input`] and
//! [`PrimaryFt::tick`]; checkpoints are encoded and sent on a sender thread so the VM owner only
//! pauses, captures and resumes.

use super::disk::{DiskCopy, DiskLog};
use super::error::FtError;
use super::link::Link;
use super::protocol::{Epoch, Primary, PrimaryAction, PrimaryConfig, PrimaryEvent, PrimaryState};
use super::stats::{Progress, Stats};
use super::tiebreak::{Outcome as Claim, TieBreaker};
use super::wire::{self, Meta, Outgoing, PayloadKind};
use super::{FtOptions, GOODBYE_HALTED, GOODBYE_VM_ENDED};
use crate::error::error_chain;
use crate::vmm::capture::{Capture, PageSet};
use crate::vmm::RunningVm;
use crossbeam_channel::{Receiver, Sender};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use transport::{Channel, Event, Message};

mod forward;
mod pace;
mod report;
mod switchover;
pub use switchover::Switched;

/// What the VM owner must do after an FT step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// This copy lost the tie-breaker: stop the VM at once, showing nothing more.
    Halt,
}

/// Results of work done off the VM owner's thread.
pub enum Input {
    Connected(Result<Channel, transport::ChannelError>),
    SendFailed(String),
    /// A tie-breaker claim made in the background.
    Claimed(Result<Claim, super::tiebreak::TieBreakError>),
}

/// The initial copy, as reported: the protocol core decides its rounds.
struct SyncRun {
    started: Instant,
    round: u32,
    /// Set once the synchronising checkpoint was sent.
    final_seq: Option<Epoch>,
    final_pause: Duration,
    bytes: u64,
    progress: Progress,
    /// The disks' copy (none without disks).
    disk: Option<DiskCopy>,
}

/// How soon to try a standby again, and the tie-breaker again when it could not be reached.
const RETRY_CONNECT: Duration = Duration::from_secs(1);
const RETRY_ARBITRATE: Duration = Duration::from_millis(100);

pub struct PrimaryFt {
    opts: FtOptions,
    tiebreak: TieBreaker,
    proto: Primary,
    meta: Meta,
    /// The standbys to protect the VM with, tried in turn.
    spares: super::spares::Spares,
    link: Option<Link>,
    connecting: bool,
    sync: Option<SyncRun>,
    inputs: (Sender<Input>, Receiver<Input>),
    wake: Receiver<()>,
    gate: Arc<crate::vmm::devices::gate::OutputGate>,
    disk_log: Arc<disk_mirror::log::WriteLog>,
    /// `SMPFT_VERIFY=1`: what the standby should hold, checked against memory at each checkpoint.
    shadow: Option<super::verify::Shadow>,
    /// A capture taken for the machine, waiting for its [`PrimaryAction::Send`].
    captured: Option<Outgoing>,
    /// A standby that offers its disks' digests connected; the copy starts when they arrive.
    awaiting_digests: bool,
    /// The standby's digests, for the copy about to start.
    digests: Option<Vec<disk_mirror::digest::Digest>>,
    /// Disk ops sealed by a capture that then failed: they open the next checkpoint's.
    unsent_disk: Vec<(u32, disk_mirror::log::Op)>,
    next_connect: Instant,
    next_arbitrate: Option<Instant>,
    /// A tie-breaker claim is running in the background.
    claiming: bool,
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
    /// Where this side waits as a standby after a switchover.
    return_to: Option<String>,
    /// Standbys replaced for lagging.
    replaced: u64,
    /// Snapshots asked of the standby, waiting for its report: (id, the QMP reply).
    pending_snapshots: Vec<(u64, qemu_shim::qmp::Reply)>,
    next_snapshot: u64,
    /// The VM was handed over to the standby (a switchover).
    switched: bool,
}

impl PrimaryFt {
    /// An FT engine for `vm`: protects it with the first of `spares` that answers (none: the
    /// VM runs unprotected until QMP `x-smpft-protect` names one).
    pub fn new(
        opts: FtOptions,
        vm: &RunningVm,
        spares: Vec<SocketAddr>,
        took_over: Option<u64>,
    ) -> Result<PrimaryFt, FtError> {
        let tiebreak = TieBreaker::new(&opts.tiebreak, &opts.owner)?;
        let generation = match took_over {
            Some(g) => g,
            // Claims must go above anything already recorded.
            None => tiebreak.read()?.map_or(0, |(g, _)| g),
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
        };
        Ok(PrimaryFt {
            tiebreak,
            proto: Primary::new(
                generation,
                PrimaryConfig { interval: opts.interval, min_gap: opts.min_gap, ..PrimaryConfig::default() },
            ),
            meta,
            spares: super::spares::Spares::new(spares),
            link: None,
            connecting: false,
            sync: None,
            inputs: crossbeam_channel::unbounded(),
            wake,
            gate: vm.devices().gate.clone(),
            disk_log: vm.devices().disk_log().clone(),
            shadow: std::env::var_os("SMPFT_VERIFY").map(|_| super::verify::Shadow::new(vm.memory().size())),
            captured: None,
            unsent_disk: Vec::new(),
            awaiting_digests: false,
            digests: None,
            next_connect: Instant::now(),
            next_arbitrate: None,
            claiming: false,
            lost_at: None,
            stats: Arc::new(Stats::default()),
            took_over: took_over.is_some(),
            throttle: super::throttle::Throttle::new(opts.max_latency),
            lag: super::lag::LagWatch::new(opts.max_lag, opts.max_lag_for),
            drop_reason: None,
            last_error: None,
            peer_owner: None,
            return_to: None,
            replaced: 0,
            pending_snapshots: Vec::new(),
            next_snapshot: 0,
            switched: false,
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
        let far = now + Duration::from_secs(3600);
        let mut at = far;
        if self.spares.current().is_some()
            && self.link.is_none()
            && !self.connecting
            && self.proto.state() == PrimaryState::Unprotected
        {
            at = at.min(self.next_connect);
        }
        // The machine's checkpoint timer (none while the window is full: the next
        // acknowledgement, an event on the channel, opens it).
        self.proto.set_output_waiting(self.output_waiting(self.disk_log.filling()));
        if let Some(t) = self.proto.poll_timeout() {
            at = at.min(t);
        }
        if let Some(t) = self.next_arbitrate {
            at = at.min(t);
        }
        if self.throttle.percent() > 0 {
            // Throttled vCPUs are kicked out of the guest every slice, to take their sleep.
            at = at.min(now + crate::vmm::control::THROTTLE_SLICE);
        }
        at
    }

    fn error(&mut self, msg: String) {
        tracing::error!("FT: {msg}");
        self.last_error = Some(msg);
    }

    /// Periodic work: connecting, checkpoints, retrying the tie-breaker.
    pub fn tick(&mut self, vm: &RunningVm) -> Flow {
        let now = Instant::now();
        if let Some(t) = self.next_arbitrate {
            if now >= t {
                self.next_arbitrate = None;
                self.start_claim();
                return Flow::Continue;
            }
        }
        match self.proto.state() {
            PrimaryState::Unprotected => {
                self.throttle(vm, now);
                if let Some(peer) = self.spares.current() {
                    if self.link.is_none() && !self.connecting && now >= self.next_connect {
                        self.connect(peer);
                    }
                }
            }
            PrimaryState::Protected => {
                self.throttle(vm, now);
                self.gate.deliver_releasable();
                self.proto.set_output_waiting(self.output_waiting(vm.devices().disk_log().filling()));
                let actions = self.proto.handle_timeout(now);
                return self.act(vm, actions);
            }
            _ => self.throttle(vm, now),
        }
        Flow::Continue
    }

    fn connect(&mut self, peer: SocketAddr) {
        self.connecting = true;
        let (id, trust, cfg) = (self.opts.identity.clone(), self.opts.trust.clone(), self.opts.channel.clone());
        // A new standby must claim above every generation this copy has won since it started
        // (a standby that read an older record would lose a claim it should win).
        self.meta.generation = self.proto.generation();
        let meta = self.meta.encode();
        let tx = self.inputs.0.clone();
        let session = std::process::id() as u64;
        std::thread::Builder::new()
            .name("ft-connect".into())
            .spawn(move || {
                let r = Channel::connect(peer, &id, &trust, cfg, session, meta);
                let _ = tx.send(Input::Connected(r));
            })
            .expect("spawn ft-connect thread");
    }

    pub fn on_input(&mut self, vm: &RunningVm, input: Input) -> Flow {
        match input {
            Input::Connected(Err(e)) => {
                self.connecting = false;
                let tried = self.spares.current().map(|a| a.to_string()).unwrap_or_default();
                self.next_connect = Instant::now() + self.spares.failed();
                let next = self.spares.current().map(|a| a.to_string()).unwrap_or_default();
                self.error(format!(
                    "cannot reach the standby {tried}: {}; the VM runs unprotected, trying {next} next",
                    error_chain(&e)
                ));
            }
            Input::Connected(Ok(chan)) => {
                self.connecting = false;
                let mut digests_follow = false;
                let problem = match chan.peer_hello() {
                    Message::Hello { meta, .. } => match Meta::decode(meta) {
                        Err(e) => Some(e.to_string()),
                        Ok(m) => {
                            digests_follow = m.digests;
                            self.peer_owner = Some(m.owner.clone());
                            self.meta.mismatch(&m)
                        }
                    },
                    _ => Some("no Hello".to_string()),
                };
                if let Some(p) = problem {
                    chan.close(transport::channel::code::PROTOCOL, &p);
                    self.next_connect = Instant::now() + self.spares.failed().max(RETRY_CONNECT * 5);
                    self.error(format!("standby {} refused: {p}", chan.peer_addr()));
                    return Flow::Continue;
                }
                if self.proto.state() != PrimaryState::Unprotected {
                    chan.close(transport::channel::code::PROTOCOL, "already protected");
                    return Flow::Continue;
                }
                self.last_error = None;
                self.spares.succeeded();
                let link = Link::start(chan, self.inputs.0.clone(), self.stats.clone(), &self.opts);
                self.gate.set_lease(Some(link.lease(self.opts.channel.silence_timeout)));
                self.link = Some(link);
                self.digests = None;
                if digests_follow {
                    tracing::info!("standby connected; it is hashing its disks to compare");
                    self.awaiting_digests = true;
                    return Flow::Continue;
                }
                return self.attach(vm);
            }
            Input::Claimed(r) => return self.claimed(vm, r),
            Input::SendFailed(e) => {
                if self.link.is_some() {
                    tracing::warn!("FT: sending to the standby failed: {e}");
                    return self.peer_lost(vm);
                }
            }
        }
        Flow::Continue
    }

    /// The standby is ready for the initial copy.
    fn attach(&mut self, vm: &RunningVm) -> Flow {
        let peer = self.link.as_ref().map(|l| l.peer.to_string()).unwrap_or_default();
        tracing::info!(standby = %peer, compare = self.digests.is_some(), "standby connected; starting the initial copy");
        let actions = self.proto.handle(PrimaryEvent::StandbyAttached);
        self.act(vm, actions)
    }

    pub fn on_channel(&mut self, vm: &RunningVm, ev: Event) -> Flow {
        match ev {
            Event::Message(Message::App { kind: wire::APP_DIGESTS, data }) if self.awaiting_digests => {
                self.awaiting_digests = false;
                match wire::decode_digests(&data, self.disk_log.sizes()) {
                    Ok(d) => {
                        self.digests = Some(d);
                        self.attach(vm)
                    }
                    Err(e) => {
                        self.error(format!("standby refused: {e}"));
                        self.sync_failed("bad disk digests");
                        Flow::Continue
                    }
                }
            }
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
                let actions = self.proto.handle(PrimaryEvent::Acked { epoch });
                self.act(vm, actions)
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

    fn peer_lost(&mut self, vm: &RunningVm) -> Flow {
        if self.link.is_none() {
            return Flow::Continue;
        }
        if std::mem::take(&mut self.awaiting_digests) {
            // Nothing was sent yet: just drop it.
            self.sync_failed("the standby left before its digests came");
            return Flow::Continue;
        }
        self.lost_at = Some(Instant::now());
        self.spares.lost();
        let actions = self.proto.handle(PrimaryEvent::PeerSilent);
        self.act(vm, actions)
    }

    fn act(&mut self, vm: &RunningVm, actions: Vec<PrimaryAction>) -> Flow {
        for a in actions {
            match a {
                PrimaryAction::StartSync => self.start_sync(),
                PrimaryAction::CopyRound { seq, all } => self.precopy_round(vm, seq, all),
                PrimaryAction::MeasureDirty => {
                    let pages = vm.dirty_pending().unwrap_or(u64::MAX);
                    let sync = self.sync.as_ref().and_then(|s| s.disk.as_ref());
                    let disk = sync.map_or(0, |d| d.pending_pages(&self.disk_log));
                    let copying = self.sync.as_ref().and_then(|s| s.disk.as_ref()).is_some_and(DiskCopy::copying);
                    let next =
                        self.proto.handle(PrimaryEvent::DirtyPending { pages: pages.saturating_add(disk), copying });
                    if self.act(vm, next) == Flow::Halt {
                        return Flow::Halt;
                    }
                }
                PrimaryAction::CaptureSync { epoch } => {
                    if self.final_sync(vm, epoch) == Flow::Halt {
                        return Flow::Halt;
                    }
                }
                PrimaryAction::Capture { epoch } => {
                    if self.capture(vm, epoch) == Flow::Halt {
                        return Flow::Halt;
                    }
                }
                PrimaryAction::Send { epoch } => match (self.captured.take(), &self.link) {
                    (Some(p), Some(l)) if p.seq == epoch => l.send(p),
                    _ => {}
                },
                PrimaryAction::Release { ids } => {
                    tracing::debug!(?ids, acked = ?self.proto.acked(), "release");
                    vm.devices().gate.release(&ids)
                }
                PrimaryAction::DropStandby => {
                    self.fail_pending_snapshots();
                    self.disk_log.stop();
                    self.unsent_disk.clear();
                    if let Some(l) = self.link.take() {
                        let (code, why) = self
                            .drop_reason
                            .take()
                            .unwrap_or((transport::channel::code::SILENT, "standby dropped".into()));
                        l.close_in_background(code, &why);
                    }
                    if self.sync.take().is_some() {
                        tracing::warn!("FT: the standby went away during the initial copy; running unprotected");
                    }
                    if self.proto.state() == PrimaryState::Unprotected {
                        vm.devices().gate.open_all();
                        self.next_connect = Instant::now() + RETRY_CONNECT;
                    }
                }
                PrimaryAction::Arbitrate { .. } => self.start_claim(),
                PrimaryAction::CaptureFinal { epoch } => {
                    if self.capture_final(vm, epoch) == Flow::Halt {
                        return Flow::Halt;
                    }
                }
                PrimaryAction::HandOver { epoch, generation } => {
                    if self.hand_over(vm, epoch, generation) == Flow::Halt {
                        return Flow::Halt;
                    }
                }
                PrimaryAction::ResumeVm => {
                    if vm.is_paused() {
                        vm.resume();
                    }
                }
                PrimaryAction::Halt => {
                    let dropped = vm.devices().gate.discard_all();
                    tracing::error!(
                        generation = self.proto.generation(),
                        "FT: lost the tie-breaker: the standby runs this VM now; halting ({dropped} held output bytes never shown)"
                    );
                    return Flow::Halt;
                }
            }
        }
        Flow::Continue
    }

    /// Asks the tie-breaker in the background; the answer comes back as [`Input::Claimed`].
    fn start_claim(&mut self) {
        if self.claiming {
            return;
        }
        self.claiming = true;
        let (generation, timeout) = (self.proto.generation(), self.opts.claim_timeout);
        self.tiebreak.claim_in_background(generation, timeout, self.inputs.0.clone(), Input::Claimed);
    }

    /// Asks the tie-breaker and waits for it (the VM is ending: nothing else to serve).
    fn arbitrate_now(&mut self, vm: &RunningVm) -> Flow {
        let r = self.tiebreak.claim(self.proto.generation(), self.opts.claim_timeout);
        self.claimed(vm, r)
    }

    fn claimed(&mut self, vm: &RunningVm, result: Result<Claim, super::tiebreak::TieBreakError>) -> Flow {
        self.claiming = false;
        let decided_ms = self.lost_at.map_or(0, |t| t.elapsed().as_millis() as u64);
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
                self.next_arbitrate = Some(Instant::now() + RETRY_ARBITRATE);
                PrimaryEvent::TieBreakUnreachable
            }
        };
        let retrying = matches!(event, PrimaryEvent::TieBreakUnreachable);
        let actions = self.proto.handle(event);
        if retrying {
            // The retry is already scheduled; the machine only restates the request.
            return Flow::Continue;
        }
        let flow = self.act(vm, actions);
        if self.proto.state() == PrimaryState::Unprotected {
            self.disk_log.stop();
            vm.devices().gate.open_all();
            self.next_connect = Instant::now() + RETRY_CONNECT;
        }
        flow
    }

    fn start_sync(&mut self) {
        let sizes = self.disk_log.sizes();
        let disk = (!sizes.is_empty()).then(|| match self.digests.take() {
            Some(d) => DiskCopy::compare(sizes, d),
            None => DiskCopy::full(sizes),
        });
        // From here every completed disk request is kept for the standby.
        self.disk_log.start_logging();
        self.sync = Some(SyncRun {
            started: Instant::now(),
            round: 0,
            final_seq: None,
            final_pause: Duration::ZERO,
            bytes: 0,
            progress: Progress::new("initial copy"),
            disk,
        });
    }

    /// Carries out [`PrimaryAction::CopyRound`].
    fn precopy_round(&mut self, vm: &RunningVm, seq: Epoch, all: bool) {
        let disks = vm.devices().disk_backends();
        let disk = match self.sync.as_mut().and_then(|s| s.disk.as_mut()) {
            Some(copy) => copy.round(&self.disk_log, &disks),
            None => Ok(Vec::new()),
        };
        let disk = match disk {
            Ok(d) => d,
            Err(e) => {
                self.error(format!("reading the disks for the initial copy failed: {}", error_chain(&e)));
                return self.sync_failed("reading the disks failed");
            }
        };
        match vm.copy_running(if all { PageSet::All } else { PageSet::Dirty }) {
            Ok(memory) => {
                let bytes = memory.data.len() as u64 + disk.iter().map(|(_, op)| op.bytes() as u64).sum::<u64>();
                if let Some(sh) = &self.shadow {
                    if all {
                        sh.reset();
                    }
                    sh.apply(&memory);
                }
                if let (Some(s), Some(l)) = (&mut self.sync, &self.link) {
                    s.round += 1;
                    s.bytes += bytes;
                    s.progress.update(s.round, s.bytes, bytes);
                    l.send(Outgoing { seq, kind: PayloadKind::PreCopy, memory, state: None, disk });
                }
                if all {
                    super::fault::hit(super::fault::Point::InPrecopy);
                }
            }
            Err(e) => {
                self.error(format!("pre-copy failed: {}", error_chain(&e)));
                self.sync_failed("pre-copy failed");
            }
        }
    }

    /// The initial copy failed on this side: drop the standby, carry on unprotected.
    fn sync_failed(&mut self, why: &str) {
        self.sync = None;
        self.disk_log.stop();
        if let Some(l) = self.link.take() {
            l.close(transport::channel::code::PROTOCOL, why);
        }
        let _ = self.proto.handle(PrimaryEvent::SyncFailed);
        self.next_connect = Instant::now() + RETRY_CONNECT;
    }

    /// Carries out [`PrimaryAction::CaptureSync`]: the final pause of the initial copy, after
    /// which output is held.
    fn final_sync(&mut self, vm: &RunningVm, seq: Epoch) -> Flow {
        let gate = vm.devices().gate.clone();
        let at = Instant::now();
        let (log, disks) = (&self.disk_log, vm.devices().disk_backends());
        let mut disk = Ok(Vec::new());
        let copy = self.sync.as_mut().and_then(|s| s.disk.as_mut());
        let r = vm.capture(PageSet::Dirty, || {
            gate.hold();
            // The last ops of the copy; every op after this pause belongs to an epoch.
            if let Some(copy) = copy {
                disk = copy.last(log, &disks);
            }
        });
        let r = match (r, disk) {
            (Ok(c), Ok(disk)) => Ok((c, disk)),
            (Err(e), _) => Err(error_chain(&e)),
            (_, Err(e)) => Err(format!("reading the disks: {}", error_chain(&e))),
        };
        match r {
            Ok((Capture { memory, state, timings: t }, disk)) => {
                if let Some(sh) = &self.shadow {
                    sh.apply(&memory);
                }
                let pause = t.total();
                self.stats.pause(t);
                let actions = self.proto.handle(PrimaryEvent::SyncSent { epoch: seq, at });
                if let (Some(s), Some(l)) = (&mut self.sync, &self.link) {
                    s.final_seq = Some(seq);
                    s.final_pause = pause;
                    s.bytes += memory.data.len() as u64 + disk.iter().map(|(_, op)| op.bytes() as u64).sum::<u64>();
                    l.send(Outgoing { seq, kind: PayloadKind::Sync, memory, state: Some(state), disk });
                }
                self.act(vm, actions)
            }
            Err(e) => {
                gate.open_all();
                self.error(format!("final sync pause failed: {e}"));
                self.sync_failed("sync failed");
                Flow::Continue
            }
        }
    }

    fn sync_done(&mut self) {
        if let Some(s) = self.sync.take() {
            s.progress.finish();
            let (disk_bytes, disk_same) = s.disk.as_ref().map_or((0, 0), |d| (d.bytes, d.same));
            tracing::info!(
                rounds = s.round,
                bytes = s.bytes,
                disk_bytes,
                disk_same,
                took_ms = s.started.elapsed().as_millis() as u64,
                final_pause_us = s.final_pause.as_micros() as u64,
                "FT: the VM is protected"
            );
            self.stats.protected_since(Instant::now());
        }
    }

    /// Carries out [`PrimaryAction::Capture`]: pauses, seals the epoch's output, captures,
    /// resumes, and tells the machine.
    fn capture(&mut self, vm: &RunningVm, epoch: u64) -> Flow {
        let at = Instant::now();
        let gate = vm.devices().gate.clone();
        let mut sealed = None;
        let mut changed = Vec::new();
        let shadow = self.shadow.as_ref();
        let log = &self.disk_log;
        let mut disk = Vec::new();
        let r = vm.capture(PageSet::Dirty, || {
            sealed = gate.seal();
            disk = log.seal();
            if let Some(sh) = shadow {
                changed = sh.differing(vm.memory());
            }
        });
        if let (Some(sh), Ok(Capture { memory: m, .. })) = (&self.shadow, &r) {
            let sent: std::collections::HashSet<u64> = m.pages.iter().chain(&m.zero_pages).copied().collect();
            let missed: Vec<u64> = changed.iter().copied().filter(|p| !sent.contains(p)).collect();
            if !missed.is_empty() {
                tracing::error!("VERIFY: checkpoint misses changed pages {missed:?} (changed {})", changed.len());
            }
            sh.apply(m);
        }
        let Capture { memory, state, timings: t } = match r {
            Ok(c) => c,
            Err(e) => {
                self.error(format!("checkpoint {epoch} failed: {}", error_chain(&e)));
                // Whatever was sealed stays held under this epoch's next attempt.
                self.unsent_disk.append(&mut disk);
                if let Some(id) = sealed {
                    let _ = self.proto.handle(PrimaryEvent::Output { id });
                }
                let actions = self.proto.handle(PrimaryEvent::CaptureFailed { epoch, at });
                return self.act(vm, actions);
            }
        };
        self.stats.pause(t);
        self.stats.checkpoint(epoch, memory.data.len() as u64);
        tracing::debug!(epoch, pages = memory.count(), output = ?sealed, "checkpoint");
        if !self.unsent_disk.is_empty() {
            disk.splice(0..0, std::mem::take(&mut self.unsent_disk));
        }
        self.stats.disk(disk.iter().map(|(_, op)| op.bytes() as u64).sum());
        self.captured = Some(Outgoing { seq: epoch, kind: PayloadKind::Epoch, memory, state: Some(state), disk });
        let actions = self.proto.handle(PrimaryEvent::Captured { epoch, output: sealed, at });
        let flow = self.act(vm, actions);
        self.captured = None;
        flow
    }

    /// Tries the first standby only after `wait` (a copy that just handed the VM over needs a
    /// moment to wait as a standby again; tried before that, it would cost a whole retry).
    pub fn first_attempt_after(&mut self, wait: Duration) {
        self.next_connect = Instant::now() + wait;
    }

    /// Whether a standby is attached (syncing or protected): the dirty log belongs to FT then.
    pub fn is_active(&self) -> bool {
        self.link.is_some() || !matches!(self.proto.state(), PrimaryState::Unprotected)
    }

    /// QMP `x-smpft-protect`: `peers` is one address or several, comma-separated (spares).
    pub fn protect(&mut self, peers: &str) -> Result<(), FtError> {
        let addrs = super::error::resolve_all(peers)?;
        if self.proto.state() != PrimaryState::Unprotected || self.link.is_some() || self.connecting {
            return Err(FtError::Busy { state: self.state_name(), peer: self.spares.current() });
        }
        self.spares.set(addrs);
        self.next_connect = Instant::now();
        Ok(())
    }

    /// The VM is ending (guest exit, quit or signal). If protected, the last output is committed
    /// first (a final checkpoint, acknowledged), then the standby is told to stand down.
    pub fn finish(&mut self, vm: &RunningVm, why: &str) {
        if self.proto.state() == PrimaryState::Protected {
            let actions = self.proto.handle(PrimaryEvent::Finish);
            if self.act(vm, actions) == Flow::Halt {
                return;
            }
            let want = self.proto.epoch() - 1;
            let deadline = Instant::now() + self.opts.channel.silence_timeout * 2;
            while self.proto.acked().is_none_or(|a| a < want) && Instant::now() < deadline {
                let (events, _, _) = self.receivers();
                match events.recv_deadline(deadline) {
                    Ok(ev) => {
                        if self.on_channel(vm, ev) == Flow::Halt {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            if self.proto.state() == PrimaryState::Protected && self.proto.acked().is_none_or(|a| a < want) {
                // The standby did not confirm: it may still go live, so only the tie-breaker
                // decides whether the last output may be shown.
                let _ = self.proto.handle(PrimaryEvent::PeerSilent);
                if self.arbitrate_now(vm) == Flow::Halt {
                    return;
                }
            }
        }
        vm.devices().gate.open_all();
        self.disk_log.stop();
        if let Some(l) = self.link.take() {
            tracing::info!("FT: telling the standby to stand down: {why}");
            l.close(GOODBYE_VM_ENDED, why);
        }
    }

    /// Whether this copy handed the VM over to its standby (a switchover).
    pub fn handed_over(&self) -> bool {
        self.switched
    }

    /// This copy handed the VM over: close the channel (the standby runs the VM already, or
    /// will on its own once this side is gone), without waiting for the peer to confirm: the
    /// client of the VM waits for this copy to let go of its serial line and taps.
    pub fn switched_over(&mut self) {
        self.disk_log.stop();
        if let Some(l) = self.link.take() {
            l.close_in_background(GOODBYE_HALTED, "switched over");
        }
    }

    /// This copy halts (lost the tie-breaker): say so to a standby still connected.
    pub fn halt(&mut self) {
        if let Some(l) = self.link.take() {
            l.close(GOODBYE_HALTED, "primary halted");
        }
    }
}
