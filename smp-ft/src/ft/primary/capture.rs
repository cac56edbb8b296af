//! Checkpoints, as the shell takes them: pause, seal the epoch's output and disk writes,
//! capture, resume, and tell the machine.

use super::{Flow, PrimaryFt};
use crate::error::error_chain;
use crate::ft::protocol::{Epoch, PrimaryEvent};
use crate::ft::wire::{Outgoing, PayloadKind};
use crate::vmm::capture::{Capture, PageSet};
use crate::vmm::RunningVm;
use std::time::Instant;

impl PrimaryFt {
    /// Carries out [`crate::ft::protocol::PrimaryAction::Capture`].
    pub(super) fn capture(&mut self, vm: &RunningVm, epoch: Epoch) -> Flow {
        let at = Instant::now();
        let gate = vm.devices().gate.clone();
        let mut sealed = None;
        let mut changed = Vec::new();
        let shadow = self.shadow.as_ref();
        let log = &self.disk_log;
        let mut disk = disk_mirror::log::Sealed::default();
        let r = vm.capture(PageSet::Dirty, || {
            sealed = gate.seal();
            disk = log.seal_streamed();
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
        let disk_mirror::log::Sealed { ops: mut disk, through } = disk;
        let Capture { memory, state, timings: t } = match r {
            Ok(c) => c,
            Err(e) => {
                self.error(format!("checkpoint {epoch} failed: {}", error_chain(&e)));
                // Whatever was sealed stays held under this epoch's next attempt.
                self.unsent_disk.append(&mut disk);
                let mut flow = Flow::Continue;
                if let Some(id) = sealed {
                    flow = self.step(vm, PrimaryEvent::Output { id });
                }
                return flow.and(self.step(vm, PrimaryEvent::CaptureFailed { epoch, at }));
            }
        };
        self.stats.pause(t);
        self.stats.checkpoint(epoch, memory.data.len() as u64);
        tracing::debug!(epoch, pages = memory.count(), output = ?sealed, "checkpoint");
        if !self.unsent_disk.is_empty() {
            disk.splice(0..0, std::mem::take(&mut self.unsent_disk));
        }
        if let Some(through) = through {
            // The epoch's streamed ops are on the channel already: the seal names them.
            if let Some(l) = &self.link {
                l.disk_seal(epoch, through);
            }
            self.disk_seals.push_back((epoch, through));
        }
        // Bytes mirrored with this checkpoint: those it carries, and those streamed since the last.
        let streamed = self.disk_log.streamed_bytes();
        let streamed_now = streamed.saturating_sub(std::mem::replace(&mut self.streamed_counted, streamed));
        self.stats.disk(disk.iter().map(|(_, op)| op.bytes() as u64).sum::<u64>() + streamed_now);
        self.captured = Some(Outgoing { seq: epoch, kind: PayloadKind::Epoch, memory, state: Some(state), disk });
        let flow = self.step(vm, PrimaryEvent::Captured { epoch, output: sealed, at });
        self.captured = None;
        flow
    }

    /// [`crate::ft::protocol::PrimaryAction::CaptureFinal`]: the VM stays paused after it
    /// (a switchover's final checkpoint).
    pub(super) fn capture_final(&mut self, vm: &RunningVm, epoch: Epoch) -> Flow {
        if let Err(e) = vm.pause() {
            self.error(format!("switchover: cannot pause the VM: {e}"));
            return self.step(vm, PrimaryEvent::CaptureFailed { epoch, at: Instant::now() });
        }
        // If it fails, the machine ends the switchover and resumes the VM.
        self.capture(vm, epoch)
    }
}
