//! The standby's FT shell: waits for a primary, keeps its own copy of the VM's memory and
//! machine state as of the last acknowledged checkpoint, and carries out what the protocol
//! core ([`Standby`]) decides when the primary goes silent or hands the VM over: claim the
//! tie-breaker (in the background, again while it cannot be reached), go live, halt, or stand
//! down and wait for a primary again. It never runs a vCPU before it has won. One event loop
//! serves the listener, the session, QMP, signals, claims and the core's timer.

use super::error::FtError;
use super::protocol::{Epoch, Standby, StandbyAction, StandbyEvent};
use super::tiebreak::{Outcome as Claim, TieBreak, TieBreakError};
use super::wire::{MachineState, Meta};
use super::{FtOptions, GOODBYE_HALTED, GOODBYE_VM_ENDED};
use crate::error::error_chain;
use crate::vmm::host::HostResources;
use crate::vmm::memory::GuestMemory;
use crate::vmm::{Vm, VmConfig, VmEvent};
use block::export::Export;
use block::Backend;
use crossbeam_channel::{select, Receiver, Sender};
use disk_mirror::pit::Fleece;
use qemu_shim::qmp::Request;
use shutdown::Workers;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use transport::{Channel, Event, Listener, Message};

mod qmp;
mod session;
mod snapshots;
mod stream;

use session::Session;

/// A primary connected, or why none can be.
type Accepted = Result<Channel, transport::ChannelError>;

/// A claim's answer, for the session it was made in.
type Claimed = (u64, Result<Claim, TieBreakError>);

/// The most a point-in-time export may hold of blocks the primary rewrote since its snapshot.
const EXPORT_OVERLAY_LIMIT: u64 = 1 << 30;

/// How soon a claim that could not reach the tie-breaker is made again.
const ARBITRATE_RETRY: Duration = Duration::from_millis(100);

pub struct StandbyOptions {
    pub ft: FtOptions,
    pub listen: SocketAddr,
    /// The VM to become: vCPUs, memory, serial and console (the guest image is not used).
    pub config: VmConfig,
    /// Whether the disks already hold a copy worth comparing against.
    pub disk_sync: super::disk::DiskSync,
}

/// How a standby's watch ended.
pub enum StandbyEnd {
    /// Won the tie-breaker at `generation`: this VM (not yet started) is the live copy now;
    /// `handover` if the primary handed it over (a planned switchover), not failed.
    /// `background`: the watch's threads still ending (the old channel closing, a snapshot
    /// being written), for the new owner to join when it stops.
    Live { vm: Box<Vm>, generation: u64, epoch: Epoch, handover: Option<super::wire::HandOver>, background: Workers },
    /// The primary shut its VM down on purpose.
    PrimaryEnded(String),
    /// Lost the tie-breaker: the primary runs the VM.
    Halted,
    /// The host asked smpft to stop (signal number).
    Signal(i32),
    /// QMP `quit`.
    Quit,
}

/// What a standby says to commands for a running VM.
const STANDBY_REFUSES: &str = "this is an FT standby: the VM does not run here unless the primary fails";

/// What one step of the watch leads to.
enum Step {
    Continue,
    /// The session is over; wait for a primary again.
    SessionOver,
    End(StandbyEnd),
}

pub struct StandbyRunner<'a> {
    opts: &'a StandbyOptions,
    /// Everything the VM needs on this host to go live, held from the start.
    host: Option<HostResources>,
    /// This copy's own disks (the host resources' storage, through `fleeces`), written as
    /// checkpoints commit.
    disks: Vec<Arc<dyn Backend>>,
    fleeces: Vec<Arc<Fleece>>,
    /// Point-in-time disk exports of snapshots of the committed copy: (snapshot file, one per
    /// disk). They end when released, or when the session that took them ends.
    exports: parking_lot::Mutex<Vec<(std::path::PathBuf, Vec<Export>)>>,
    tiebreak: Arc<dyn TieBreak>,
    generation: u64,
    qmp: Receiver<Request>,
    signals: Receiver<VmEvent>,
    /// Answers for commands the standby does not implement (the QEMU persona's).
    extension: parking_lot::Mutex<Option<Box<dyn crate::runner::Extension>>>,
    /// Claims, channels closing and snapshots being written, in the background.
    workers: parking_lot::Mutex<Workers>,
    claims: (Sender<Claimed>, Receiver<Claimed>),
    /// Numbers the sessions, so that a claim's late answer finds only its own.
    sessions: u64,
    /// The disks held a whole copy when the last session ended: the next initial copy compares
    /// them rather than copying every block (as `--disk-sync compare`).
    resync_compare: bool,
    /// The guest's CPUID as this host would present it (see `wire::Meta::cpuid`).
    cpuid: Vec<[u32; 6]>,
}

impl<'a> StandbyRunner<'a> {
    /// Adds answers for commands the standby does not implement (asked with no VM).
    pub fn with_extension(self, extension: Box<dyn crate::runner::Extension>) -> Self {
        *self.extension.lock() = Some(extension);
        self
    }

    /// The extension, for the runner that takes over once this copy is live.
    pub fn take_extension(&mut self) -> Option<Box<dyn crate::runner::Extension>> {
        self.extension.get_mut().take()
    }

    /// The pseudo-terminal reserved for the VM's serial port, if it is one (the same once live).
    pub fn serial_pty(&self) -> Option<std::path::PathBuf> {
        self.host.as_ref().and_then(|h| h.serial_pty()).map(|p| p.to_path_buf())
    }

    pub fn new(
        opts: &'a StandbyOptions,
        qmp: Option<Receiver<Request>>,
        signals: Receiver<VmEvent>,
    ) -> Result<Self, FtError> {
        let host = HostResources::reserve(&opts.config).map_err(FtError::CannotGoLive)?;
        // Writes reach the disks through a fleece, which keeps the point-in-time views that
        // snapshots of the committed copy export.
        let fleeces: Vec<Arc<Fleece>> = host.disks().iter().map(|d| Fleece::new(d.clone())).collect();
        let disks: Vec<Arc<dyn Backend>> = fleeces.iter().map(|f| f.clone() as Arc<dyn Backend>).collect();
        // The standby writes every disk as checkpoints commit; its own copy is never read-only.
        if let Some((spec, _)) = opts.config.devices.disks.iter().zip(&disks).find(|(_, d)| d.readonly()) {
            return Err(FtError::Disk(format!(
                "{spec} is read-only: a standby's disk receives the primary's writes (give the primary ',readonly' instead)"
            )));
        }
        // The CPU the VM would have here: a model this host cannot give means it cannot go live.
        let cpuid =
            crate::vmm::cpuid::guest_at(&opts.config.kvm_device, &opts.config.cpu).map_err(FtError::CannotGoLive)?;
        let tiebreak = super::tiebreak::open(&opts.ft.tiebreak, &opts.ft.owner)?;
        let generation = tiebreak.read(opts.ft.claim_timeout)?.map_or(0, |r| r.generation);
        Ok(StandbyRunner {
            cpuid: super::wire::cpuid_words(&cpuid),
            opts,
            host: Some(host),
            disks,
            fleeces,
            exports: parking_lot::Mutex::new(Vec::new()),
            tiebreak,
            generation,
            qmp: qmp.unwrap_or_else(crossbeam_channel::never),
            signals,
            extension: parking_lot::Mutex::new(None),
            workers: parking_lot::Mutex::new(Workers::new()),
            claims: crossbeam_channel::unbounded(),
            sessions: 0,
            resync_compare: false,
        })
    }

    /// Whether this copy could go live now; why not otherwise.
    fn can_go_live(&mut self) -> Result<(), FtError> {
        match &mut self.host {
            None => Err(FtError::HostUsed),
            Some(h) => h.check().map_err(FtError::CannotGoLive),
        }
    }

    fn meta(&self) -> Meta {
        Meta {
            vcpus: self.opts.config.vcpus,
            mem_size: self.opts.config.memory,
            generation: self.generation,
            owner: self.opts.ft.owner.clone(),
            devices: self.opts.config.devices.summary(),
            disks: self.disk_sizes(),
            digests: self.compares(),
            cpuid: self.cpuid.clone(),
        }
    }

    /// Whether this standby hashes its disks for the primary (`--disk-sync compare`).
    fn compares(&self) -> bool {
        (self.opts.disk_sync == super::disk::DiskSync::Compare || self.resync_compare) && !self.disks.is_empty()
    }

    fn disk_sizes(&self) -> Vec<u64> {
        self.disks.iter().map(|d| d.size()).collect()
    }

    /// Waits for primaries and keeps their VM until it goes live here or ends.
    pub fn run(&mut self) -> Result<StandbyEnd, FtError> {
        let ft = &self.opts.ft;
        let listener = Arc::new(Listener::bind(self.opts.listen, &ft.identity, &ft.trust, ft.channel.clone())?);
        tracing::info!(listen = %listener.local_addr(), vcpus = self.opts.config.vcpus, memory_mib = self.opts.config.memory >> 20, "standby waiting for a primary");
        let (atx, arx) = crossbeam_channel::bounded::<Accepted>(0);
        let meta = self.meta().encode();
        let l = listener.clone();
        let accept = std::thread::Builder::new()
            .name("ft-accept".into())
            .spawn(move || {
                confine::enter(confine::Kind::Channel);
                loop {
                    let r = l.accept(None, std::process::id().into(), meta.clone());
                    let stop = r.is_err();
                    if atx.send(r).is_err() || stop {
                        return;
                    }
                }
            })
            .map_err(FtError::Thread)?;
        let end = self.watch(&arx);
        // Whatever ended the watch, the address is let go: this process may listen on it again
        // (a copy that handed its VM over stands by once more), and the thread accepting on it
        // ends.
        listener.close();
        drop(arx);
        let _ = accept.join();
        let mut end = end?;
        if let StandbyEnd::Live { background, .. } = &mut end {
            // The new owner of the VM joins what is still ending.
            *background = std::mem::take(&mut self.workers.lock());
        }
        Ok(end)
    }

    /// The one event loop of the watch.
    fn watch(&mut self, accepted: &Receiver<Accepted>) -> Result<StandbyEnd, FtError> {
        let mut session: Option<Session> = None;
        loop {
            let never = crossbeam_channel::never();
            let events = session.as_ref().and_then(Session::events).unwrap_or(never);
            let timeout = session.as_ref().and_then(|s| s.proto.poll_timeout());
            let timer = timeout.map_or_else(crossbeam_channel::never, crossbeam_channel::at);
            let claims = self.claims.1.clone();
            let step = select! {
                recv(accepted) -> r => match r {
                    Ok(Ok(chan)) => match &session {
                        Some(_) => {
                            chan.close(GOODBYE_HALTED, "this standby already serves a primary");
                            Step::Continue
                        }
                        None => {
                            session = self.open_session(chan)?;
                            Step::Continue
                        }
                    },
                    Ok(Err(e)) => return Err(FtError::Accept(e)),
                    Err(_) => return Err(FtError::AcceptEnded),
                },
                recv(events) -> ev => match &mut session {
                    Some(s) => {
                        let ev = ev.unwrap_or_else(|_| Event::Closed { reason: "channel gone".into() });
                        self.on_event(s, ev)?
                    }
                    None => Step::Continue,
                },
                recv(claims) -> r => match (&mut session, r) {
                    (Some(s), Ok((id, r))) if id == s.id => self.claimed(s, r)?,
                    _ => Step::Continue,
                },
                recv(timer) -> _ => match &mut session {
                    Some(s) => {
                        let actions = s.proto.handle_timeout(Instant::now());
                        self.act(s, actions)?
                    }
                    None => Step::Continue,
                },
                recv(self.qmp) -> req => match req {
                    Ok(req) => match self.qmp_request(req, session.as_ref()) {
                        Some(end) => Step::End(end),
                        None => Step::Continue,
                    },
                    Err(_) => Step::Continue,
                },
                recv(self.signals) -> ev => match ev {
                    Ok(VmEvent::Signal(sig)) => Step::End(StandbyEnd::Signal(sig)),
                    _ => Step::Continue,
                },
            };
            match &step {
                Step::End(StandbyEnd::Halted) => self.publish(session.as_ref(), "halted"),
                Step::End(StandbyEnd::PrimaryEnded(_)) => crate::observe::get().stood_down(),
                Step::End(_) => {}
                _ => self.publish(session.as_ref(), qmp::state_name(session.as_ref())),
            }
            match step {
                Step::Continue => {}
                Step::SessionOver => {
                    if let Some(s) = session.take() {
                        self.end_session(s, GOODBYE_HALTED, "standby stood down");
                    }
                    tracing::info!("standby waiting for a primary again");
                }
                Step::End(end) => {
                    if let Some(s) = session.take() {
                        self.end_session(s, GOODBYE_HALTED, "standby stopped");
                    }
                    return Ok(end);
                }
            }
        }
    }

    /// A session's end: its channel is closed in the background (closing waits for the peer,
    /// up to 200 ms while it is still connected, and a copy going live must not), and the
    /// disks change hands (a VM of their own, or a new primary's initial copy), so their
    /// point-in-time exports end.
    fn end_session(&self, s: Session, code: u32, why: &str) {
        let chan = s.chan.clone();
        drop(s);
        let why = why.to_string();
        let spawned = self.workers.lock().spawn("ft-close", move || {
            confine::enter(confine::Kind::Channel);
            // The last holder closes it: wait for any snapshot writer to let go.
            while Arc::strong_count(&chan) > 1 {
                std::thread::sleep(Duration::from_millis(5));
            }
            chan.close(code, &why);
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot close the FT channel in the background: {e}");
        }
        self.release_exports(None);
    }

    /// An event on the session's channel.
    fn on_event(&mut self, s: &mut Session, ev: Event) -> Result<Step, FtError> {
        match ev {
            Event::Checkpoint { epoch, data } => Ok(match self.checkpoint(s, epoch, &data) {
                Ok(()) => Step::Continue,
                Err(e) => {
                    // A copy that missed a checkpoint is no copy: stand down, keep nothing.
                    tracing::error!("FT: {}; standing down", error_chain(&e));
                    Step::SessionOver
                }
            }),
            Event::Message(Message::Goodbye { code: GOODBYE_VM_ENDED, reason }) => {
                for (i, d) in self.disks.iter().enumerate() {
                    if let Err(e) = d.flush() {
                        tracing::error!("FT: flushing disk{i} failed: {}", error_chain(&e));
                    }
                }
                tracing::info!("FT: the primary ended the VM ({reason}); standby done");
                Ok(Step::End(StandbyEnd::PrimaryEnded(reason)))
            }
            Event::Message(Message::Goodbye { code, reason }) => {
                // A replacement is told, but not trusted: the claim that follows cannot win (the
                // primary holds a newer generation), whatever the message says.
                match code {
                    super::GOODBYE_REPLACED => tracing::warn!("FT: the primary replaced this standby: {reason}"),
                    _ => tracing::warn!("FT: the primary said goodbye: {reason}"),
                }
                self.primary_lost(s)
            }
            Event::PeerSilent { .. } | Event::Closed { .. } => self.primary_lost(s),
            Event::Message(Message::App { kind: super::wire::APP_SNAPSHOT, data }) => {
                self.snapshot_for_primary(s, &data);
                Ok(Step::Continue)
            }
            Event::Message(Message::App { kind: super::wire::APP_SWITCHOVER, data }) => self.handed_over(s, &data),
            Event::Data { kind: super::wire::APP_DISK_OPS, data } => Ok(stream_step(self.streamed_ops(s, data))),
            Event::Data { kind, .. } => {
                tracing::debug!(kind, "FT: data of a kind this build does not know; ignored");
                Ok(Step::Continue)
            }
            Event::Message(Message::App { kind: super::wire::APP_DISK_SEAL, data }) => {
                Ok(stream_step(self.disk_seal(s, &data)))
            }
            Event::Message(_) => Ok(Step::Continue),
        }
    }

    /// The primary is gone: the machine decides (claim, or stand down).
    fn primary_lost(&mut self, s: &mut Session) -> Result<Step, FtError> {
        s.lost();
        let actions = s.proto.handle_at(Instant::now(), StandbyEvent::PeerSilent);
        self.act(s, actions)
    }

    /// The primary handed the VM over (a planned switchover).
    fn handed_over(&mut self, s: &mut Session, data: &[u8]) -> Result<Step, FtError> {
        let h = match super::wire::HandOver::decode(data) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("FT: a malformed switchover from the primary ({e}); ignored");
                return Ok(Step::Continue);
            }
        };
        tracing::info!(epoch = h.epoch, generation = h.generation, "FT: the primary hands the VM over (switchover)");
        let event = StandbyEvent::HandOver { epoch: h.epoch, generation: h.generation };
        let actions = s.proto.handle_at(Instant::now(), event);
        if actions.is_empty() {
            tracing::error!("FT: the switchover came for a checkpoint this copy does not hold; ignored");
            return Ok(Step::Continue);
        }
        s.noticed = Some(Instant::now());
        s.handover = Some(h);
        self.act(s, actions)
    }

    /// Carries out the machine's actions about the session's fate.
    fn act(&mut self, s: &mut Session, actions: Vec<StandbyAction>) -> Result<Step, FtError> {
        for a in actions {
            match a {
                StandbyAction::Arbitrate { generation } => {
                    if let Err(e) = self.can_go_live() {
                        tracing::error!(
                            "FT: the primary is gone, but {}; not claiming the tie-breaker, discarding the copy",
                            error_chain(&e)
                        );
                        let next = s.proto.handle(StandbyEvent::CannotGoLive);
                        return self.act(s, next);
                    }
                    self.start_claim(s, generation);
                }
                StandbyAction::GoLive { epoch } => {
                    let generation = s.proto.generation();
                    let vm = self.build_live(s, epoch)?;
                    tracing::warn!(
                        epoch,
                        generation,
                        decided_ms = s.noticed.map_or(0, |t| t.elapsed().as_millis() as u64),
                        "FT: won the tie-breaker; the VM goes live here from checkpoint {epoch}"
                    );
                    let handover = s.handover.take();
                    crate::observe::get().went_live(handover.is_some(), generation);
                    let background = Workers::new();
                    return Ok(Step::End(StandbyEnd::Live {
                        vm: Box::new(vm),
                        generation,
                        epoch,
                        handover,
                        background,
                    }));
                }
                StandbyAction::Halt => {
                    tracing::error!("FT: lost the tie-breaker: the primary keeps the VM; this standby halts");
                    return Ok(Step::End(StandbyEnd::Halted));
                }
                StandbyAction::StandDown => {
                    tracing::warn!("FT: no copy this host can go live from; discarding it");
                    return Ok(Step::SessionOver);
                }
                // The checkpoint path carries these out as the data arrives.
                StandbyAction::Ack { .. }
                | StandbyAction::ApplyPreCopy { .. }
                | StandbyAction::Apply { .. }
                | StandbyAction::Refuse { .. }
                | StandbyAction::Discard { .. } => {}
            }
        }
        Ok(Step::Continue)
    }

    /// Asks the tie-breaker in the background (a claim can wait seconds for the lock) while
    /// the loop answers QMP and watches for signals.
    fn start_claim(&mut self, s: &Session, generation: u64) {
        let (tiebreak, timeout) = (self.tiebreak.clone(), self.opts.ft.claim_timeout);
        let (tx, id) = (self.claims.0.clone(), s.id);
        let spawned = self.workers.lock().spawn("ft-claim", move || {
            let _ = tx.send((id, tiebreak.claim(generation, timeout)));
        });
        if let Err(e) = spawned {
            // No claim was made: as if the tie-breaker could not be reached (asked again).
            let at = self.opts.ft.tiebreak.to_string();
            let source = std::io::Error::other(format!("cannot start a claim: {e}"));
            let _ = self.claims.0.send((id, Err(TieBreakError::Unreachable { at, source })));
        }
    }

    fn claimed(&mut self, s: &mut Session, r: Result<Claim, TieBreakError>) -> Result<Step, FtError> {
        crate::observe::get().claimed(&r);
        let ev = match r {
            Ok(Claim::Won { generation }) => StandbyEvent::TieBreakWon { generation },
            Ok(Claim::Lost { holder, .. }) if holder.ends_with(super::tiebreak::STOPPED) => {
                // The primary ended the VM on purpose; its message did not arrive.
                tracing::info!(%holder, "FT: the tie-breaker records that the primary ended the VM; standby done");
                return Ok(Step::End(StandbyEnd::PrimaryEnded(format!(
                    "stopped, as the tie-breaker records ({holder})"
                ))));
            }
            Ok(Claim::Lost { generation, holder }) => {
                tracing::warn!(generation, %holder, "FT: the tie-breaker is held by the primary");
                let actions = s.proto.handle_at(Instant::now(), StandbyEvent::TieBreakLost { generation });
                if actions == [StandbyAction::StandDown] {
                    tracing::warn!(
                        generation,
                        "FT: lost to a live primary (a false alarm: this copy never ran the VM); discarding \
                         the copy and waiting for the primary to protect the VM again"
                    );
                    self.generation = self.generation.max(generation);
                    // Its disks hold all but the last moments: the next initial copy compares them.
                    self.resync_compare = true;
                }
                return self.act(s, actions);
            }
            Err(e) => {
                tracing::error!("FT: {}; not going live, retrying", error_chain(&e));
                StandbyEvent::TieBreakUnreachable
            }
        };
        let actions = s.proto.handle_at(Instant::now(), ev);
        self.act(s, actions)
    }

    fn build_live(&mut self, s: &mut Session, epoch: Epoch) -> Result<Vm, FtError> {
        if s.proto.applied() != Some(epoch) {
            return Err(FtError::NotApplied { epoch, applied: s.proto.applied() });
        }
        let state: MachineState = s.state.take().ok_or(FtError::NoState)?;
        let host = self.host.take().ok_or(FtError::HostUsed)?;
        Vm::from_state(self.opts.config.clone(), s.memory.clone(), host, &state).map_err(FtError::GoLive)
    }

    /// A new session's copy of the VM's memory.
    fn memory(&self) -> Result<Arc<GuestMemory>, FtError> {
        Ok(Arc::new(GuestMemory::new(self.opts.config.memory).map_err(crate::vmm::VmError::from)?))
    }

    /// A new session's machine.
    fn machine(&self) -> Standby {
        Standby::new(self.generation, ARBITRATE_RETRY, Instant::now()).halt_on_loss(self.opts.ft.halt_on_loss)
    }
}

/// After a streamed disk op or seal: one the stream cannot take ends the session, as a
/// checkpoint that cannot be used does.
fn stream_step(r: Result<(), FtError>) -> Step {
    match r {
        Ok(()) => Step::Continue,
        Err(e) => {
            tracing::error!("FT: {}; standing down", error_chain(&e));
            Step::SessionOver
        }
    }
}
