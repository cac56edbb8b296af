//! One primary's session on the standby: the channel, the copy being kept, and the checkpoints
//! that keep it (validated in staging, acknowledged, then applied to memory and disks).

use super::StandbyRunner;
use crate::error::error_chain;
use crate::ft::error::FtError;
use crate::ft::protocol::{Epoch, Standby, StandbyAction, StandbyEvent};
use crate::ft::wire::{MachineState, Meta, PayloadKind, Staged};
use crate::vmm::memory::GuestMemory;
use crossbeam_channel::Receiver;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use transport::{Channel, Event, Message};

/// One primary's session: the copy being kept.
pub(super) struct Session {
    /// Numbers this session (a claim's answer names the session it was made in).
    pub(super) id: u64,
    /// Shared with the threads that write snapshots of the committed copy (they report on it).
    pub(super) chan: Arc<Channel>,
    pub(super) proto: Standby,
    pub(super) memory: Arc<GuestMemory>,
    pub(super) state: Option<MachineState>,
    pub(super) last_bytes: u64,
    pub(super) checkpoints: u64,
    pub(super) peer: SocketAddr,
    /// The most disk data held in memory until written (one checkpoint's, and the streamed
    /// ops staged).
    pub(super) disk_peak: u64,
    pub(super) disk_bytes: u64,
    /// Disk ops streamed by the primary, staged until the checkpoint that covers them commits.
    pub(super) stream: super::stream::Streamed,
    /// The primary's hand-over, when it handed the VM over.
    pub(super) handover: Option<crate::ft::wire::HandOver>,
    /// When the primary was found gone (or handed over), for the log of how long deciding took.
    pub(super) noticed: Option<Instant>,
}

impl Session {
    /// The channel's events, while there can be any.
    pub(super) fn events(&self) -> Option<Receiver<Event>> {
        self.noticed.is_none().then(|| self.chan.events().clone())
    }

    /// The primary is gone: nothing more is read from its channel.
    pub(super) fn lost(&mut self) {
        self.noticed.get_or_insert_with(Instant::now);
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

/// Tells the primary how long checkpoint `epoch` took to validate (for its figures), if it
/// speaks a wire version that knows the message.
fn send_times(chan: &Channel, epoch: Epoch, validate: std::time::Duration) {
    if chan.version() >= crate::ft::wire::STREAM_VERSION {
        let t = crate::ft::wire::CheckpointTimes { epoch, validate_us: validate.as_micros() as u64 };
        let data = crate::ft::wire::encode_app(&t);
        let _ = chan.send(&Message::App { kind: crate::ft::wire::APP_CHECKPOINT_TIMES, data });
    }
}

impl StandbyRunner<'_> {
    /// A primary connected: checks it is this VM's and that this host can go live, offers the
    /// disks' digests if comparing, and starts the session (`None`: refused, keep waiting).
    pub(super) fn open_session(&mut self, chan: Channel) -> Result<Option<Session>, FtError> {
        let peer = chan.peer_addr();
        let theirs = match chan.peer_hello() {
            Message::Hello { version, meta, .. } => Meta::from_hello(*version, meta)?,
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
        self.sessions += 1;
        Ok(Some(Session {
            id: self.sessions,
            chan: Arc::new(chan),
            proto: self.machine(),
            memory: self.memory()?,
            state: None,
            last_bytes: 0,
            checkpoints: 0,
            peer,
            disk_peak: 0,
            disk_bytes: 0,
            stream: Default::default(),
            handover: None,
            noticed: None,
        }))
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
        let data = crate::ft::wire::encode_digests(&digests)?;
        chan.send(&Message::App { kind: crate::ft::wire::APP_DIGESTS, data })?;
        Ok(())
    }

    pub(super) fn checkpoint(
        &mut self,
        s: &mut Session,
        seq: Epoch,
        data: &transport::CheckpointData,
    ) -> Result<(), FtError> {
        let sizes = self.disk_sizes();
        let validating = Instant::now();
        let staged = Staged::validate(data, seq, self.opts.config.vcpus, self.opts.config.memory, &sizes);
        // Valid, and every streamed disk op it covers is here.
        let staged = staged.and_then(|st| Ok((s.stream.covers(seq)?, st)));
        let (through, staged) = match staged {
            Ok(st) => st,
            Err(e) => {
                let _ = s.proto.handle(StandbyEvent::Checkpoint { epoch: seq, valid: false });
                return Err(e.into());
            }
        };
        let validated = validating.elapsed();
        s.last_bytes = data.len() as u64;
        let disk_bytes = staged.disk_bytes();
        s.disk_peak = s.disk_peak.max(disk_bytes + s.stream.staged_bytes);
        s.disk_bytes += disk_bytes;
        crate::observe::get().received(data.len() as u64, disk_bytes);
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
                StandbyAction::Ack { epoch } => {
                    send_times(&s.chan, epoch, validated);
                    send_ack(&s.chan, epoch)
                }
                StandbyAction::Apply { epoch } => {
                    crate::ft::fault::hit(crate::ft::fault::Point::StallApply);
                    let state = staged.apply(&s.memory)?.ok_or(FtError::NoState)?;
                    // Committed (acknowledged): its writes go to this copy's own storage.
                    staged.apply_disk(&self.disks)?;
                    if let Some(through) = through {
                        s.stream.commit(epoch, through, &self.disks)?;
                    }
                    tracing::debug!(epoch, pages = staged.pages(), "applied");
                    s.state = Some(state);
                    s.checkpoints += 1;
                    crate::observe::get().acked(epoch, None, None);
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

    /// A disk op the primary streamed as it completed: staged for the checkpoint that will
    /// cover it. A message that breaks the stream ends the session (this copy could no
    /// longer say what it holds).
    pub(super) fn streamed_ops(&self, s: &mut Session, data: bytes::Bytes) -> Result<(), FtError> {
        let len = data.len() as u64;
        let bytes = s.stream.ops(data, &self.disk_sizes())?;
        s.disk_bytes += bytes;
        s.disk_peak = s.disk_peak.max(s.stream.staged_bytes);
        crate::observe::get().received(len, bytes);
        Ok(())
    }

    /// The seal of the checkpoint that follows.
    pub(super) fn disk_seal(&self, s: &mut Session, data: &[u8]) -> Result<(), FtError> {
        Ok(s.stream.seal(data)?)
    }
}
