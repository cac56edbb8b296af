//! The standby's FT engine: waits for a primary, keeps its own copy of the VM's memory and
//! machine state as of the last acknowledged checkpoint, and when the primary goes silent asks
//! the tie-breaker whether to go live. It never runs a vCPU before it has won.

use super::protocol::{Epoch, Standby, StandbyAction, StandbyEvent, StandbyState};
use super::tiebreak::{Outcome as Claim, TieBreakError, TieBreaker};

type ClaimResult = Result<Claim, TieBreakError>;
use super::error::FtError;
use super::wire::{MachineState, Meta, PayloadKind, Staged};

/// A primary connected, or why none can be.
type Accepted = Result<Channel, transport::ChannelError>;
use super::{FtOptions, GOODBYE_HALTED, GOODBYE_VM_ENDED};
use crate::error::error_chain;
use crate::vmm::host::HostResources;
use crate::vmm::memory::GuestMemory;
use crate::vmm::{Vm, VmConfig, VmError, VmEvent};
use block::export::Export;
use block::Backend;
use crossbeam_channel::{select, Receiver};
use disk_mirror::pit::Fleece;
use qemu_shim::qmp::{Command, QmpError, Request};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use transport::{Channel, Event, Listener, Message};

/// The most a point-in-time export may hold of blocks the primary rewrote since its snapshot.
const EXPORT_OVERLAY_LIMIT: u64 = 1 << 30;

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
    Live { vm: Box<Vm>, generation: u64, epoch: Epoch, handover: Option<super::wire::HandOver> },
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

/// One primary's session: the copy being kept.
struct Session {
    /// Shared with the threads that write snapshots of the committed copy (they report on it).
    chan: Arc<Channel>,
    proto: Standby,
    memory: Arc<GuestMemory>,
    state: Option<MachineState>,
    applied: Option<Epoch>,
    last_bytes: u64,
    checkpoints: u64,
    peer: SocketAddr,
    /// The most disk data one checkpoint carried (held in memory until written).
    disk_peak: u64,
    disk_bytes: u64,
}

impl Drop for Session {
    /// The channel is closed off the standby's path: closing waits for the peer (up to 200 ms
    /// while it is still connected, as after a switchover), and a copy going live must not.
    fn drop(&mut self) {
        let chan = self.chan.clone();
        let spawned = std::thread::Builder::new().name("ft-close".into()).spawn(move || {
            // The last holder closes it: wait for the session (and any snapshot writer) to let go.
            while Arc::strong_count(&chan) > 1 {
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(chan);
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot close the FT channel in the background: {e}");
        }
    }
}

/// Acknowledges `epoch`. If the channel is already closed the ack is lost, which the protocol
/// allows (the primary then holds that output until it wins the tie-breaker or dies); the copy
/// itself is still whole, and the closed channel is reported as an event of its own.
fn send_ack(chan: &Channel, epoch: Epoch) {
    if let Err(e) = chan.send(&Message::Ack { epoch }) {
        tracing::debug!(epoch, "ack not sent: {e}");
    }
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
    tiebreak: TieBreaker,
    generation: u64,
    qmp: Receiver<Request>,
    signals: Receiver<VmEvent>,
    /// Answers for commands the standby does not implement (the QEMU persona's).
    extension: parking_lot::Mutex<Option<Box<dyn crate::runner::Extension>>>,
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
        let tiebreak = TieBreaker::new(&opts.ft.tiebreak, &opts.ft.owner)?;
        let generation = tiebreak.read()?.map_or(0, |(g, _)| g);
        Ok(StandbyRunner {
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
        }
    }

    /// Whether this standby hashes its disks for the primary (`--disk-sync compare`).
    fn compares(&self) -> bool {
        self.opts.disk_sync == super::disk::DiskSync::Compare && !self.disks.is_empty()
    }

    fn disk_sizes(&self) -> Vec<u64> {
        self.disks.iter().map(|d| d.size()).collect()
    }

    /// Waits for primaries and keeps their VM until it goes live here or ends.
    pub fn run(&mut self) -> Result<StandbyEnd, FtError> {
        let ft = &self.opts.ft;
        let listener = Arc::new(Listener::bind(self.opts.listen, &ft.identity, &ft.trust, ft.channel.clone())?);
        // Whatever ends the watch, the address is let go: this process may listen on it again
        // (a copy that handed its VM over stands by once more), and the thread accepting on
        // it ends.
        struct CloseOnExit(Arc<Listener>);
        impl Drop for CloseOnExit {
            fn drop(&mut self) {
                self.0.close();
            }
        }
        let _close = CloseOnExit(listener.clone());
        tracing::info!(listen = %listener.local_addr(), vcpus = self.opts.config.vcpus, memory_mib = self.opts.config.memory >> 20, "standby waiting for a primary");
        let (atx, arx) = crossbeam_channel::bounded::<Accepted>(0);
        let meta = self.meta().encode();
        let l = listener.clone();
        std::thread::Builder::new()
            .name("ft-accept".into())
            .spawn(move || loop {
                let r = l.accept(None, std::process::id().into(), meta.clone());
                let stop = r.is_err();
                if atx.send(r).is_err() || stop {
                    return;
                }
            })
            .map_err(FtError::Thread)?;
        loop {
            let chan = select! {
                recv(arx) -> r => match r {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => return Err(FtError::Accept(e)),
                    Err(_) => return Err(FtError::AcceptEnded),
                },
                recv(self.qmp) -> req => {
                    if let Ok(req) = req {
                        if let Some(end) = self.qmp_request(req, None) {
                            return Ok(end);
                        }
                    }
                    continue;
                }
                recv(self.signals) -> ev => match ev {
                    Ok(VmEvent::Signal(s)) => return Ok(StandbyEnd::Signal(s)),
                    _ => continue,
                },
            };
            let end = self.session(chan, &arx);
            // The disks change hands (a VM of their own, or a new primary's initial copy):
            // their point-in-time exports end.
            self.release_exports(None);
            match end? {
                Some(end) => return Ok(end),
                None => tracing::info!("standby waiting for a primary again"),
            }
        }
    }

    /// Serves one primary. `None` means it went away before a whole copy was here: wait again.
    fn session(&mut self, chan: Channel, more: &Receiver<Accepted>) -> Result<Option<StandbyEnd>, FtError> {
        let peer = chan.peer_addr();
        let theirs = match chan.peer_hello() {
            Message::Hello { meta, .. } => Meta::decode(meta)?,
            _ => return Err(FtError::NoHello),
        };
        if let Some(why) = self.meta().mismatch(&theirs) {
            chan.close(transport::channel::code::PROTOCOL, &why);
            return Err(FtError::Refused { peer, why });
        }
        if let Err(e) = self.can_go_live() {
            let why = error_chain(&e);
            tracing::error!("FT: refusing primary {peer}: {why}");
            chan.close(transport::channel::code::PROTOCOL, &why);
            return Ok(None);
        }
        if self.compares() {
            if let Err(e) = self.send_digests(&chan) {
                let why = error_chain(&e);
                tracing::error!("FT: cannot offer the disks' digests: {why}; refusing primary {peer}");
                chan.close(transport::channel::code::PROTOCOL, &why);
                return Ok(None);
            }
        }
        self.generation = self.generation.max(theirs.generation);
        tracing::info!(primary = %peer, owner = %theirs.owner, generation = self.generation, "primary connected; receiving the initial copy");
        let memory = Arc::new(GuestMemory::new(self.opts.config.memory).map_err(VmError::from)?);
        let mut s = Session {
            chan: Arc::new(chan),
            proto: Standby::new(self.generation),
            memory,
            state: None,
            applied: None,
            last_bytes: 0,
            checkpoints: 0,
            peer,
            disk_peak: 0,
            disk_bytes: 0,
        };
        loop {
            let events = s.chan.events().clone();
            let ev = select! {
                recv(events) -> ev => match ev {
                    Ok(ev) => ev,
                    Err(_) => Event::Closed { reason: "channel gone".into() },
                },
                recv(more) -> r => {
                    if let Ok(Ok(other)) = r {
                        other.close(GOODBYE_HALTED, "this standby already serves a primary");
                    }
                    continue;
                }
                recv(self.qmp) -> req => {
                    if let Ok(req) = req {
                        if let Some(end) = self.qmp_request(req, Some(&s)) {
                            s.chan.close(GOODBYE_HALTED, "standby stopped");
                            return Ok(Some(end));
                        }
                    }
                    continue;
                }
                recv(self.signals) -> ev => {
                    if let Ok(VmEvent::Signal(sig)) = ev {
                        s.chan.close(GOODBYE_HALTED, "standby stopped");
                        return Ok(Some(StandbyEnd::Signal(sig)));
                    }
                    continue;
                }
            };
            match ev {
                Event::Checkpoint { epoch, data } => {
                    if let Err(e) = self.checkpoint(&mut s, epoch, &data) {
                        // A copy that missed a checkpoint is no copy: stand down, keep nothing.
                        let e = error_chain(&e);
                        tracing::error!("FT: {e}; standing down");
                        s.chan.close(GOODBYE_HALTED, &e);
                        return Ok(None);
                    }
                }
                Event::Message(Message::Goodbye { code: GOODBYE_VM_ENDED, reason }) => {
                    for (i, d) in self.disks.iter().enumerate() {
                        if let Err(e) = d.flush() {
                            tracing::error!("FT: flushing disk{i} failed: {}", error_chain(&e));
                        }
                    }
                    tracing::info!("FT: the primary ended the VM ({reason}); standby done");
                    return Ok(Some(StandbyEnd::PrimaryEnded(reason)));
                }
                Event::Message(Message::Goodbye { code: super::GOODBYE_REPLACED, reason }) => {
                    // Told, but not trusted: the claim below cannot win (the primary holds a
                    // newer generation), whatever the message says.
                    tracing::warn!("FT: the primary replaced this standby: {reason}");
                    if let Some(end) = self.primary_lost(&mut s)? {
                        return Ok(Some(end));
                    }
                    return Ok(None);
                }
                Event::Message(Message::Goodbye { reason, .. }) => {
                    tracing::warn!("FT: the primary said goodbye: {reason}");
                    if let Some(end) = self.primary_lost(&mut s)? {
                        return Ok(Some(end));
                    }
                    return Ok(None);
                }
                Event::PeerSilent { .. } | Event::Closed { .. } => {
                    if let Some(end) = self.primary_lost(&mut s)? {
                        return Ok(Some(end));
                    }
                    return Ok(None);
                }
                Event::Message(Message::App { kind: super::wire::APP_SNAPSHOT, data }) => {
                    self.snapshot_for_primary(&s, &data)
                }
                Event::Message(Message::App { kind: super::wire::APP_SWITCHOVER, data }) => {
                    let h = match super::wire::HandOver::decode(&data) {
                        Ok(h) => h,
                        Err(e) => {
                            tracing::error!("FT: a malformed switchover from the primary ({e}); ignored");
                            continue;
                        }
                    };
                    tracing::info!(
                        epoch = h.epoch,
                        generation = h.generation,
                        "FT: the primary hands the VM over (switchover)"
                    );
                    let event = StandbyEvent::HandOver { epoch: h.epoch, generation: h.generation };
                    match self.take_over(&mut s, event, Some(h))? {
                        Some(end) => return Ok(Some(end)),
                        None => {
                            tracing::error!("FT: the switchover came for a checkpoint this copy does not hold; ignored")
                        }
                    }
                }
                Event::Message(_) => {}
            }
        }
    }

    /// Hashes this copy's disks as they are now and sends the digests (`--disk-sync compare`).
    fn send_digests(&self, chan: &Channel) -> Result<(), FtError> {
        let started = Instant::now();
        let digests = self
            .disks
            .iter()
            .map(|d| disk_mirror::digest::digest(&**d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| FtError::Disk(error_chain(&e)))?;
        let bytes: u64 = self.disks.iter().map(|d| d.size()).sum();
        tracing::info!(
            disks = digests.len(),
            bytes,
            took_ms = started.elapsed().as_millis() as u64,
            "FT: hashed this copy's disks; the primary sends only blocks that differ"
        );
        let data = super::wire::encode_digests(&digests)?;
        chan.send(&Message::App { kind: super::wire::APP_DIGESTS, data })?;
        Ok(())
    }

    fn checkpoint(&mut self, s: &mut Session, seq: Epoch, data: &transport::CheckpointData) -> Result<(), FtError> {
        let sizes = self.disk_sizes();
        let staged = Staged::validate(data, seq, self.opts.config.vcpus, self.opts.config.memory, &sizes);
        let staged = match staged {
            Ok(st) => st,
            Err(e) => {
                let _ = s.proto.handle(StandbyEvent::Checkpoint { epoch: seq, valid: false });
                return Err(e.into());
            }
        };
        s.last_bytes = data.len() as u64;
        let disk_bytes = staged.disk_bytes();
        s.disk_peak = s.disk_peak.max(disk_bytes);
        s.disk_bytes += disk_bytes;
        if staged.kind() == PayloadKind::PreCopy {
            for a in s.proto.handle(StandbyEvent::PreCopy { seq }) {
                match a {
                    StandbyAction::ApplyPreCopy { .. } => {
                        staged.apply(&s.memory)?;
                        staged.apply_disk(&self.disks)?;
                    }
                    StandbyAction::Ack { epoch } => send_ack(&s.chan, epoch),
                    StandbyAction::Refuse { seq } => return Err(FtError::LatePreCopy(seq)),
                    _ => {}
                }
            }
            return Ok(());
        }
        for a in s.proto.handle(StandbyEvent::Checkpoint { epoch: seq, valid: true }) {
            match a {
                StandbyAction::Ack { epoch } => send_ack(&s.chan, epoch),
                StandbyAction::Apply { epoch } => {
                    super::fault::hit(super::fault::Point::StallApply);
                    let state = staged.apply(&s.memory)?.ok_or(FtError::NoState)?;
                    // Committed (acknowledged): its writes go to this copy's own storage.
                    staged.apply_disk(&self.disks)?;
                    tracing::debug!(epoch, pages = staged.pages(), "applied");
                    s.state = Some(state);
                    s.applied = Some(epoch);
                    s.checkpoints += 1;
                    if staged.kind() == PayloadKind::Sync {
                        tracing::info!(epoch, "FT: holding a complete copy of the VM");
                    }
                    let _ = s.proto.handle(StandbyEvent::Applied { epoch });
                }
                StandbyAction::Discard { epoch } => return Err(FtError::Stale(epoch)),
                _ => {}
            }
        }
        Ok(())
    }

    /// The primary is gone. Arbitrate if this copy is whole; go live if the tie-breaker agrees.
    fn primary_lost(&mut self, s: &mut Session) -> Result<Option<StandbyEnd>, FtError> {
        self.take_over(s, StandbyEvent::PeerSilent, None)
    }

    /// Runs the machine from `event` (the primary lost, or handing over) through the
    /// tie-breaker to going live, halting, or nothing (`None`: keep standing by).
    fn take_over(
        &mut self,
        s: &mut Session,
        event: StandbyEvent,
        handover: Option<super::wire::HandOver>,
    ) -> Result<Option<StandbyEnd>, FtError> {
        let noticed = Instant::now();
        let mut actions = s.proto.handle(event);
        loop {
            let mut next = Vec::new();
            for a in actions {
                match a {
                    StandbyAction::Halt if s.state.is_none() => {
                        tracing::warn!("FT: the primary went away before the copy was complete; discarding it");
                        return Ok(None);
                    }
                    StandbyAction::Halt => {
                        tracing::error!("FT: lost the tie-breaker: the primary keeps the VM; this standby halts");
                        return Ok(Some(StandbyEnd::Halted));
                    }
                    StandbyAction::Arbitrate { generation } => {
                        if let Err(e) = self.can_go_live() {
                            tracing::error!(
                                "FT: the primary is silent, but {}; not claiming the tie-breaker, discarding the copy",
                                error_chain(&e)
                            );
                            s.chan.close(GOODBYE_HALTED, "the standby cannot go live");
                            return Ok(None);
                        }
                        let claim = match self.claim_serving(s, generation) {
                            Ok(claim) => claim,
                            Err(end) => return Ok(Some(end)),
                        };
                        let ev = match claim {
                            Ok(Claim::Won { generation }) => StandbyEvent::TieBreakWon { generation },
                            Ok(Claim::Lost { generation, holder }) => {
                                tracing::warn!(generation, %holder, "FT: the tie-breaker is held by the primary");
                                StandbyEvent::TieBreakLost { generation }
                            }
                            Err(e) => {
                                tracing::error!("FT: {}; not going live, retrying", error_chain(&e));
                                if let Some(end) = self.pause_serving(s, Duration::from_millis(100)) {
                                    return Ok(Some(end));
                                }
                                StandbyEvent::TieBreakUnreachable
                            }
                        };
                        next.extend(s.proto.handle(ev));
                    }
                    StandbyAction::GoLive { epoch } => {
                        let generation = s.proto.generation();
                        let vm = self.build_live(s, epoch)?;
                        tracing::warn!(
                            epoch,
                            generation,
                            decided_ms = noticed.elapsed().as_millis() as u64,
                            "FT: won the tie-breaker; the VM goes live here from checkpoint {epoch}"
                        );
                        return Ok(Some(StandbyEnd::Live { vm: Box::new(vm), generation, epoch, handover }));
                    }
                    _ => {}
                }
            }
            if next.is_empty() {
                return Ok(None);
            }
            actions = next;
        }
    }

    /// Claims the tie-breaker in the background while answering QMP and watching for signals
    /// (a claim can wait seconds for the lock); `Err` if one of them ends the standby.
    fn claim_serving(&self, s: &Session, generation: u64) -> Result<ClaimResult, StandbyEnd> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.tiebreak.claim_in_background(generation, self.opts.ft.claim_timeout, tx, |r| r);
        loop {
            select! {
                recv(rx) -> r => {
                    return Ok(r.unwrap_or_else(|_| Err(TieBreakError::LockTimeout {
                        path: self.opts.ft.tiebreak.clone(),
                        timeout: self.opts.ft.claim_timeout,
                    })));
                }
                recv(self.qmp) -> req => {
                    if let Some(end) = req.ok().and_then(|r| self.qmp_request(r, Some(s))) {
                        return Err(end);
                    }
                }
                recv(self.signals) -> ev => {
                    if let Ok(VmEvent::Signal(sig)) = ev {
                        return Err(StandbyEnd::Signal(sig));
                    }
                }
            }
        }
    }

    /// Waits `d` while answering QMP and watching for signals; `Some` if one of them ends it.
    fn pause_serving(&self, s: &Session, d: Duration) -> Option<StandbyEnd> {
        let deadline = Instant::now() + d;
        loop {
            select! {
                recv(self.qmp) -> req => {
                    if let Some(end) = req.ok().and_then(|r| self.qmp_request(r, Some(s))) {
                        return Some(end);
                    }
                }
                recv(self.signals) -> ev => {
                    if let Ok(VmEvent::Signal(sig)) = ev {
                        return Some(StandbyEnd::Signal(sig));
                    }
                }
                recv(crossbeam_channel::at(deadline)) -> _ => return None,
            }
        }
    }

    fn build_live(&mut self, s: &mut Session, epoch: Epoch) -> Result<Vm, FtError> {
        if s.applied != Some(epoch) {
            return Err(FtError::NotApplied { epoch, applied: s.applied });
        }
        let state = s.state.take().ok_or(FtError::NoState)?;
        let host = self.host.take().ok_or(FtError::HostUsed)?;
        Vm::from_state(self.opts.config.clone(), s.memory.clone(), host, &state).map_err(FtError::GoLive)
    }

    fn query(&self, s: Option<&Session>) -> Value {
        let state = match s.map(|s| s.proto.state()) {
            None => "waiting",
            Some(StandbyState::Syncing) => "syncing",
            Some(StandbyState::Standby) => "standby",
            Some(StandbyState::Arbitrating) => "arbitrating",
            Some(StandbyState::Live) => "live-after-failover",
            Some(StandbyState::Halted) => "halted",
        };
        json!({
            "role": "standby",
            "state": state,
            "epoch": s.and_then(|s| s.proto.acked()),
            "generation": self.generation,
            "checkpoints": s.map_or(0, |s| s.checkpoints),
            "last-checkpoint-bytes": s.map_or(0, |s| s.last_bytes),
            "peer": s.map(|s| s.peer.to_string()),
            "disk-bytes-received": s.map_or(0, |s| s.disk_bytes),
            "disk-staged-peak-bytes": s.map_or(0, |s| s.disk_peak),
        })
    }

    /// A snapshot of the committed copy (the state as of the last acknowledged checkpoint),
    /// written to `file` on a thread of its own; `done` gets the QMP reply.
    fn snapshot_committed(
        &self,
        s: Option<&Session>,
        file: std::path::PathBuf,
        done: impl FnOnce(Result<Value, String>) + Send + 'static,
    ) {
        let Some((s, state)) = s.and_then(|s| s.state.as_ref().map(|st| (s, st))) else {
            return done(Err("this standby holds no committed copy of the VM yet".into()));
        };
        match crate::snapshot::committed::take(&s.memory, state, self.opts.config.vcpus) {
            Ok((snap, mut report)) => {
                report["epoch"] = json!(s.applied);
                // The disks as of the same instant, for backup tools to read.
                match self.export_disks(&file) {
                    Ok(uris) if uris.is_empty() => {}
                    Ok(uris) => report["exports"] = json!(uris),
                    Err(e) => return done(Err(e)),
                }
                crate::snapshot::committed::write_in_background(snap, file, report, done);
            }
            Err(e) => done(Err(error_chain(&e))),
        }
    }

    /// Read-only NBD exports of every disk as it is now, next to the snapshot `file` (one unix
    /// socket per disk, `FILE.diskN.nbd`), until released; their NBD URIs.
    fn export_disks(&self, file: &std::path::Path) -> Result<Vec<String>, String> {
        let mut exports = Vec::new();
        for (i, f) in self.fleeces.iter().enumerate() {
            let mut path = file.as_os_str().to_owned();
            path.push(format!(".disk{i}.nbd"));
            let e = Export::serve(f.view(EXPORT_OVERLAY_LIMIT), std::path::Path::new(&path))
                .map_err(|e| format!("cannot export disk{i} at {}: {e}", std::path::Path::new(&path).display()))?;
            exports.push(e);
        }
        let uris = exports.iter().map(Export::uri).collect();
        if !exports.is_empty() {
            self.release_exports(Some(file));
            self.exports.lock().push((file.to_path_buf(), exports));
        }
        Ok(uris)
    }

    /// Ends the exports of the snapshot at `file` (all of them if `None`); how many ended.
    fn release_exports(&self, file: Option<&std::path::Path>) -> usize {
        let mut exports = self.exports.lock();
        let before = exports.len();
        exports.retain(|(f, _)| file.is_some_and(|file| f != file));
        before - exports.len()
    }

    /// The primary asked for a snapshot of the committed copy: the outcome goes back to it.
    fn snapshot_for_primary(&self, s: &Session, data: &[u8]) {
        let req: super::wire::SnapshotRequest = match super::wire::decode_app(data, "snapshot request") {
            Ok(r) => r,
            Err(e) => return tracing::error!("FT: {e}; ignored"),
        };
        let (chan, id) = (s.chan.clone(), req.id);
        let report = move |result: Result<Value, String>| {
            let done = super::wire::SnapshotDone { id, result: result.map(|v| v.to_string()) };
            let msg = Message::App { kind: super::wire::APP_SNAPSHOT_DONE, data: super::wire::encode_app(&done) };
            if let Err(e) = chan.send(&msg) {
                tracing::warn!("FT: cannot report snapshot {id} to the primary: {e}");
            }
        };
        if req.release {
            let released = self.release_exports(Some(std::path::Path::new(&req.file)));
            report(Ok(json!({ "released": released })));
        } else {
            self.snapshot_committed(Some(s), req.file.into(), report);
        }
    }

    /// Answers QMP on a standby; `Some` when the request ends it (`quit`).
    fn qmp_request(&self, req: Request, s: Option<&Session>) -> Option<StandbyEnd> {
        if let Command::Other { name, args } = &req.command {
            if let Some(Ok(crate::qmp::SmpftCommand::ReleaseSnapshot { file })) =
                crate::qmp::SmpftCommand::parse(name, args)
            {
                let released = self.release_exports(Some(&file));
                req.reply.send(Ok(json!({ "released": released })));
                return None;
            }
            if let Some(Ok(crate::qmp::SmpftCommand::Snapshot { file, incremental })) =
                crate::qmp::SmpftCommand::parse(name, args)
            {
                if incremental {
                    req.reply.send(Err(QmpError::generic("a standby writes full snapshots of its committed copy")));
                } else {
                    let reply = req.reply;
                    self.snapshot_committed(s, file, move |r| reply.send(r.map_err(QmpError::generic)));
                }
                return None;
            }
        }
        let quit = req.command == Command::Quit;
        let reply = match &req.command {
            Command::QueryStatus => Ok(json!({"status": "inmigrate", "running": false, "singlestep": false})),
            Command::Quit => Ok(json!({})),
            Command::Other { name, args } => match crate::qmp::SmpftCommand::parse(name, args) {
                Some(Ok(crate::qmp::SmpftCommand::QueryFt)) => Ok(self.query(s)),
                Some(Ok(_)) => Err(QmpError::generic(STANDBY_REFUSES)),
                Some(Err(e)) => Err(e),
                None => {
                    let pty = self.serial_pty();
                    let answer =
                        self.extension.lock().as_mut().and_then(|e| e.answer(None, pty.as_deref(), name, args));
                    answer.unwrap_or_else(|| Err(qemu_shim::qmp::not_found(name)))
                }
            },
            Command::Stop | Command::Cont => Err(QmpError::generic(STANDBY_REFUSES)),
        };
        req.reply.send(reply);
        quit.then_some(StandbyEnd::Quit)
    }
}
