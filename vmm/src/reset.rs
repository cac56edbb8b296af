//! Resetting a VM in place: what a PC's reset line does, for `system_reset` and for a guest
//! that reboots (through the ACPI reset register, I/O port 0xcf9). The VM keeps its process,
//! its disks, NICs, serial port and QMP clients; everything the guest could see is as it was at
//! power-on: memory cleared and the payload loaded again, every vCPU, the in-kernel interrupt
//! controllers and timer, and every device in the state it had when the VM was built.
//!
//! The power-on state is read once, when the VM is built (before any payload is loaded, so it
//! serves a VM restored from a snapshot or a standby gone live just the same). Two things carry
//! on through a reset: the guest's clock (the TSC and the KVM clock only go forward, as a
//! protected VM's checkpoints expect) and output already produced, which leaves as it would
//! have. Every page of memory is marked dirty, so the next checkpoint carries the whole reset
//! machine to the standby: a protected VM stays protected.

use crate::machine::{ComponentState, MachineState};
use crate::payload::{self, Target};
use crate::state::{StateCaps, VcpuState, VmState};
use crate::{RunningVm, VmConfig, VmError};
use kvm_ioctls::{VcpuFd, VmFd};
use parking_lot::Mutex;
use std::sync::Arc;

/// MSRs a reset leaves alone: the TSC and its adjustment (time goes on).
const KEEP_MSRS: [u32; 2] = [0x10, 0x3b];

/// The machine as it was built, before anything ran or was loaded.
pub(crate) struct PowerOn {
    state: MachineState,
    /// XCR0 the test guest starts with (see `payload::Target`).
    xcrs: Option<kvm_bindings::kvm_xcrs>,
}

impl PowerOn {
    pub(crate) fn capture(
        vm: &VmFd,
        vcpu_fds: &[Arc<Mutex<VcpuFd>>],
        caps: &StateCaps,
        devices: &crate::devices::Devices,
        xcrs: Option<kvm_bindings::kvm_xcrs>,
    ) -> Result<PowerOn, VmError> {
        let mut cpus = Vec::with_capacity(vcpu_fds.len());
        for fd in vcpu_fds {
            let mut s = VcpuState::capture(&fd.lock(), caps)?;
            s.msrs.retain(|(index, _)| !KEEP_MSRS.contains(index));
            cpus.push(s);
        }
        let mut components = Vec::new();
        for c in devices.components() {
            components.push(ComponentState { name: c.name().into(), version: c.version(), data: c.save()? });
        }
        Ok(PowerOn { state: MachineState { cpus, vm: VmState::capture(vm)?, components }, xcrs })
    }
}

impl RunningVm {
    /// Resets the VM in place (see the module's description). A running VM is paused for it
    /// and resumed after; a paused one stays paused.
    pub fn reset(&self) -> Result<(), VmError> {
        let was_paused = self.is_paused();
        if !was_paused {
            self.pause()?;
        }
        let result = self.reset_paused();
        if !was_paused {
            self.resume();
        }
        match &result {
            Ok(()) => tracing::info!("the VM was reset"),
            Err(e) => {
                let mut why = e.to_string();
                let mut source = std::error::Error::source(e);
                while let Some(s) = source {
                    why = format!("{why}: {s}");
                    source = s.source();
                }
                tracing::error!("resetting the VM failed: {why}");
            }
        }
        result
    }

    fn reset_paused(&self) -> Result<(), VmError> {
        let config: &VmConfig = &self.boot_config;
        if matches!(config.payload, crate::Payload::None) {
            return Err(VmError::NothingToBoot);
        }
        let vm = self.vm.as_ref().ok_or(VmError::Stopped)?;
        let on = &self.power_on;
        // The interrupt controllers and the PIT as at power-on; the clock as it is now.
        let mut vm_state = on.state.vm.clone();
        vm_state.clock = VmState::capture(vm)?.clock;
        vm_state.restore(vm)?;
        for (i, (fd, cpu)) in self.vcpu_fds.iter().zip(&on.state.cpus).enumerate() {
            cpu.restore(&fd.lock(), self.early.caps())?;
            // Registers read as this vCPU stopped are no longer its registers.
            self.early.forget(i);
        }
        for c in self.devices.components() {
            let saved = on.state.component(c.name()).ok_or(VmError::MissingState(c.name()))?;
            c.restore(saved.version, &saved.data)?;
        }
        self.devices.reset();
        // A reset is the same VM going on: its generation ID stays what it is now.
        let generation = config.devices.vmgenid.map(|_| crate::vmgenid::read(&self.memory)).transpose()?;
        self.memory.discard(0, self.memory.size())?;
        let target = Target { memory: &self.memory, vcpu_fds: &self.vcpu_fds, xcrs: on.xcrs.as_ref() };
        let reread;
        let config = match &config.payload {
            // Booted from its disk: boot what the disk says now (a kernel updated in the guest).
            crate::Payload::FromDisk { reread: r, .. } => match (r.0)() {
                Ok(boot) => {
                    reread = VmConfig { payload: crate::Payload::Linux(boot), ..config.clone() };
                    &reread
                }
                Err(why) => {
                    tracing::warn!(
                        "cannot read the boot disk again ({why}); booting the kernel it booted before, if any"
                    );
                    config
                }
            },
            _ => config,
        };
        payload::load(config, &target)?;
        if let Some(guid) = generation {
            crate::vmgenid::write(&self.memory, guid)?;
        }
        Ok(())
    }
}
