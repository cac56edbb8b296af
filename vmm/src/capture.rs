//! Capturing a VM: one consistent cut of memory and [`MachineState`] with the VM paused, and
//! pre-copy rounds of memory while it runs. Snapshots and FT checkpoints both use these; what
//! they do with the result is theirs.

use super::control::PauseError;
use super::dirty::Bitmap;
use super::machine::{ComponentState, MachineState};
use super::pages::{copy_pages, MemoryPages};
use super::state::VmState;
use super::{RunningVm, VmError};
use std::time::{Duration, Instant};

/// Where the time of one capture pause went.
#[derive(Debug, Clone, Copy, Default)]
pub struct PauseTimings {
    pub stop: Duration,
    pub harvest: Duration,
    pub copy: Duration,
    pub state: Duration,
    pub resume: Duration,
    pub pages: u64,
}

impl PauseTimings {
    pub fn total(&self) -> Duration {
        self.stop + self.harvest + self.copy + self.state + self.resume
    }
}

/// Which pages a capture takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSet {
    /// Those dirtied since the previous harvest of the dirty log.
    Dirty,
    /// Every non-zero page (the dirty log is harvested and reset too).
    All,
}

/// One consistent cut.
#[derive(Debug)]
pub struct Capture {
    pub memory: MemoryPages,
    pub state: MachineState,
    pub timings: PauseTimings,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot pause the VM")]
    Pause(#[from] PauseError),
    #[error(transparent)]
    Vm(#[from] VmError),
}

impl RunningVm {
    /// Pauses the VM (unless it is paused already), runs `on_paused`, captures `set` and the
    /// machine state, and resumes it (unless it was paused before). If the capture fails, the
    /// dirty pages it harvested are put back in the log.
    pub fn capture(&self, set: PageSet, on_paused: impl FnOnce()) -> Result<Capture, CaptureError> {
        let was_paused = self.is_paused();
        let mut t = PauseTimings::default();
        let t0 = Instant::now();
        if !was_paused {
            self.pause()?;
        }
        on_paused();
        t.stop = t0.elapsed();
        let result = self.capture_paused(set, &mut t);
        let t4 = Instant::now();
        if !was_paused {
            self.resume();
        }
        t.resume = t4.elapsed();
        let (memory, state) = result?;
        Ok(Capture { memory, state, timings: t })
    }

    fn capture_paused(&self, set: PageSet, t: &mut PauseTimings) -> Result<(MemoryPages, MachineState), VmError> {
        let t1 = Instant::now();
        let pages = self.harvest()?;
        let t2 = Instant::now();
        t.harvest = t2 - t1;
        let mut memory = MemoryPages::default();
        let result = (|| {
            match set {
                PageSet::Dirty => copy_pages(&self.memory, Some(&pages), &mut memory)?,
                // Every page, including what the log had collected.
                PageSet::All => copy_pages(&self.memory, None, &mut memory)?,
            }
            t.pages = memory.count() as u64;
            let t3 = Instant::now();
            t.copy = t3 - t2;
            let state = self.machine_state()?;
            t.state = t3.elapsed();
            Ok(state)
        })();
        match result {
            Ok(state) => Ok((memory, state)),
            Err(e) => {
                self.dirty.lock().put_back(&pages);
                Err(e)
            }
        }
    }

    /// Takes the pages dirtied since the previous harvest out of the log.
    fn harvest(&self) -> Result<Bitmap, VmError> {
        let vm = self.vm.as_ref().ok_or(VmError::Stopped)?;
        let mut dirty = self.dirty.lock();
        dirty.harvest(vm, &self.memory)?;
        self.harvests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(dirty.take())
    }

    /// How many times the dirty log has been harvested: a capture of dirty pages holds every
    /// change since the previous capture only if nobody else harvested in between.
    pub fn harvests(&self) -> u64 {
        self.harvests.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The machine state: every vCPU (registers read as each stopped), the in-kernel devices,
    /// and every component in order. The VM must be paused.
    fn machine_state(&self) -> Result<MachineState, VmError> {
        let vm = self.vm.as_ref().ok_or(VmError::Stopped)?;
        let pause = self.control.pause_seq();
        let cpus = self
            .vcpu_fds
            .iter()
            .enumerate()
            .map(|(i, fd)| self.early.capture(i, pause, &fd.lock()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut components = Vec::with_capacity(self.devices.components().len());
        for c in self.devices.components() {
            components.push(ComponentState { name: c.name().into(), version: c.version(), data: c.save()? });
        }
        Ok(MachineState { cpus, vm: VmState::capture(vm)?, components })
    }

    /// A pre-copy round, with the VM running: the pages dirtied since the previous harvest, or
    /// (`PageSet::All`) every non-zero page, with the dirty log reset first.
    pub fn copy_running(&self, set: PageSet) -> Result<MemoryPages, VmError> {
        let pages = self.harvest()?;
        let mut memory = MemoryPages::default();
        match set {
            PageSet::All => copy_pages(&self.memory, None, &mut memory)?,
            PageSet::Dirty => copy_pages(&self.memory, Some(&pages), &mut memory)?,
        }
        Ok(memory)
    }

    /// Pages dirtied since the last harvest, without taking them.
    pub fn dirty_pending(&self) -> Result<u64, VmError> {
        let vm = self.vm.as_ref().ok_or(VmError::Stopped)?;
        let mut dirty = self.dirty.lock();
        dirty.harvest(vm, &self.memory)?;
        Ok(dirty.pending())
    }
}
