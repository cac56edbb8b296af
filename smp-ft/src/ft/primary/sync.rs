//! The initial copy, as the shell carries it out: pre-copy rounds while the VM runs, the dirty
//! pages measured for the machine, which decides the rounds, and the final pause that makes
//! the standby whole. Its progress is shown as it goes.

use super::{Flow, PrimaryFt};
use crate::error::error_chain;
use crate::ft::disk::DiskCopy;
use crate::ft::protocol::{Epoch, PrimaryEvent};
use crate::ft::stats::Progress;
use crate::ft::wire::{Outgoing, PayloadKind};
use crate::vmm::capture::{Capture, PageSet};
use crate::vmm::RunningVm;
use std::time::{Duration, Instant};

/// The initial copy, as reported: the protocol core decides its rounds.
pub(super) struct SyncRun {
    started: Instant,
    pub(super) round: u32,
    /// Set once the synchronising checkpoint was sent.
    pub(super) final_seq: Option<Epoch>,
    final_pause: Duration,
    pub(super) bytes: u64,
    progress: Progress,
    /// The disks' copy (none without disks).
    disk: Option<DiskCopy>,
}

impl PrimaryFt {
    /// [`crate::ft::protocol::PrimaryAction::StartSync`].
    pub(super) fn start_sync(&mut self) -> Flow {
        let sizes = self.disk_log.sizes();
        let disk = (!sizes.is_empty()).then(|| match self.digests.take() {
            Some(d) => DiskCopy::compare(sizes, d),
            None => DiskCopy::full(sizes),
        });
        // From here every completed disk request is kept for the standby.
        self.disk_log.start_logging();
        self.disk_seals.clear();
        self.streamed_counted = 0;
        // Epochs start again with each standby: nothing of the last one is waited for.
        self.stats.new_session();
        self.sync = Some(SyncRun {
            started: Instant::now(),
            round: 0,
            final_seq: None,
            final_pause: Duration::ZERO,
            bytes: 0,
            progress: Progress::new("initial copy"),
            disk,
        });
        Flow::Continue
    }

    /// [`crate::ft::protocol::PrimaryAction::MeasureDirty`].
    pub(super) fn measure_dirty(&mut self, vm: &RunningVm) -> Flow {
        let pages = vm.dirty_pending().unwrap_or(u64::MAX);
        let copy = self.sync.as_ref().and_then(|s| s.disk.as_ref());
        let disk = copy.map_or(0, |d| d.pending_pages(&self.disk_log));
        let copying = copy.is_some_and(DiskCopy::copying);
        self.step(vm, PrimaryEvent::DirtyPending { pages: pages.saturating_add(disk), copying })
    }

    /// Carries out [`crate::ft::protocol::PrimaryAction::CopyRound`].
    pub(super) fn precopy_round(&mut self, vm: &RunningVm, seq: Epoch, all: bool) -> Flow {
        let disks = vm.devices().disk_backends();
        let disk = match self.sync.as_mut().and_then(|s| s.disk.as_mut()) {
            Some(copy) => copy.round(&self.disk_log, &disks),
            None => Ok(Vec::new()),
        };
        let disk = match disk {
            Ok(d) => d,
            Err(e) => {
                self.error(format!("reading the disks for the initial copy failed: {}", error_chain(&e)));
                return self.sync_failed(vm, "reading the disks failed");
            }
        };
        let memory = match vm.copy_running(if all { PageSet::All } else { PageSet::Dirty }) {
            Ok(m) => m,
            Err(e) => {
                self.error(format!("pre-copy failed: {}", error_chain(&e)));
                return self.sync_failed(vm, "pre-copy failed");
            }
        };
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
            crate::ft::fault::hit(crate::ft::fault::Point::InPrecopy);
        }
        Flow::Continue
    }

    /// The initial copy failed on this side: the machine drops the standby, the VM runs on
    /// unprotected.
    fn sync_failed(&mut self, vm: &RunningVm, why: &str) -> Flow {
        self.drop_reason = Some((transport::channel::code::PROTOCOL, why.to_string()));
        self.step(vm, PrimaryEvent::SyncFailed)
    }

    /// Carries out [`crate::ft::protocol::PrimaryAction::CaptureSync`]: the final pause of the
    /// initial copy, after which output is held.
    pub(super) fn final_sync(&mut self, vm: &RunningVm, seq: Epoch) -> Flow {
        let gate = vm.devices().gate.clone();
        let at = Instant::now();
        let (log, disks) = (&self.disk_log, vm.devices().disk_backends());
        let mut disk = Ok(Vec::new());
        let copy = self.sync.as_mut().and_then(|s| s.disk.as_mut());
        let stream = self.link.as_ref().and_then(|l| l.disk_stream());
        let r = vm.capture(PageSet::Dirty, || {
            gate.hold();
            // The last ops of the copy; every op after this pause belongs to an epoch, and
            // leaves for the standby as it completes if the standby takes a stream.
            if let Some(copy) = copy {
                disk = copy.last(log, &disks);
            }
            if let Some(stream) = stream {
                log.stream_to(stream);
            }
        });
        let r = match (r, disk) {
            (Ok(c), Ok(disk)) => Ok((c, disk)),
            (Err(e), _) => Err(error_chain(&e)),
            (_, Err(e)) => Err(format!("reading the disks: {}", error_chain(&e))),
        };
        let (Capture { memory, state, timings: t }, disk) = match r {
            Ok(c) => c,
            Err(e) => {
                self.error(format!("final sync pause failed: {e}"));
                return self.sync_failed(vm, "sync failed");
            }
        };
        if let Some(sh) = &self.shadow {
            sh.apply(&memory);
        }
        let pause = t.total();
        self.stats.pause(t);
        if let (Some(s), Some(l)) = (&mut self.sync, &self.link) {
            s.final_seq = Some(seq);
            s.final_pause = pause;
            s.bytes += memory.data.len() as u64 + disk.iter().map(|(_, op)| op.bytes() as u64).sum::<u64>();
            l.send(Outgoing { seq, kind: PayloadKind::Sync, memory, state: Some(state), disk });
        }
        self.step(vm, PrimaryEvent::SyncSent { epoch: seq, at })
    }

    /// The standby acknowledged the synchronising checkpoint: the VM is protected.
    pub(super) fn sync_done(&mut self) {
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
            crate::ft::fault::protected();
        }
    }
}
