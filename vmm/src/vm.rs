//! A VM built and ready to start: booting a test guest or a Linux kernel, or taking on a saved
//! machine state.

use crate::build::{build, CpuSetup, Parts};
use crate::host::HostResources;
use crate::memory::GuestMemory;
use crate::vcpu::Vcpu;
use crate::{machine, payload, Payload, VmConfig, VmError};
use std::sync::Arc;

/// A VM built and ready to start.
pub struct Vm {
    pub(crate) config: VmConfig,
    pub(crate) parts: Parts,
    pub(crate) vcpus: Vec<Vcpu>,
}

impl Vm {
    /// Validates the configuration and builds a VM that boots `config.payload`.
    pub fn create(config: VmConfig) -> Result<Vm, VmError> {
        match &config.payload {
            Payload::TestGuest { image, args } => {
                let (image, args) = (image.clone(), args.clone());
                Vm::create_test_guest(config, &image, &args)
            }
            Payload::Linux(_) | Payload::FromDisk { boot: Some(_), .. } => Vm::create_linux(config),
            Payload::None | Payload::FromDisk { boot: None, .. } => Err(VmError::NothingToBoot),
        }
    }

    fn create_test_guest(config: VmConfig, elf: &[u8], args: &str) -> Result<Vm, VmError> {
        payload::check_test_guest(&config, elf, args)?;
        let host = HostResources::reserve(&config)?;
        let parts = build(&config, None, host, CpuSetup::TestGuest)?;
        payload::load(&config, &parts.target())?;
        tracing::info!(vcpus = config.vcpus, memory_mib = config.memory >> 20, "VM created");
        Ok(Vm::assemble(config, parts))
    }

    /// A VM that boots a Linux kernel.
    fn create_linux(config: VmConfig) -> Result<Vm, VmError> {
        let host = HostResources::reserve(&config)?;
        let parts = build(&config, None, host, CpuSetup::Linux)?;
        payload::load(&config, &parts.target())?;
        Ok(Vm::assemble(config, parts))
    }

    /// Builds a VM in `state`, on `memory` as it is (a snapshot chain applied to fresh memory,
    /// or a standby's copy). The one way back from a snapshot or a checkpoint.
    pub fn from_state(
        config: VmConfig,
        memory: Arc<GuestMemory>,
        host: HostResources,
        state: &machine::MachineState,
    ) -> Result<Vm, VmError> {
        let parts = build(&config, Some(memory), host, CpuSetup::TestGuest)?;
        if state.cpus.len() != parts.vcpu_fds.len() {
            return Err(VmError::VcpuCount { got: state.cpus.len(), want: parts.vcpu_fds.len() });
        }
        for (fd, cpu) in parts.vcpu_fds.iter().zip(&state.cpus) {
            cpu.restore(&fd.lock(), parts.early.caps())?;
        }
        state.vm.restore(&parts.vm)?;
        let components = parts.devices.components();
        for c in components {
            let saved = state.component(c.name()).ok_or(VmError::MissingState(c.name()))?;
            c.restore(saved.version, &saved.data)?;
        }
        if let Some(extra) = state.components.iter().find(|s| !components.iter().any(|c| c.name() == s.name)) {
            return Err(VmError::UnknownState(extra.name.clone()));
        }
        parts.devices.disks_restored();
        tracing::info!(vcpus = config.vcpus, memory_mib = config.memory >> 20, "VM restored");
        Ok(Vm::assemble(config, parts))
    }

    fn assemble(config: VmConfig, parts: Parts) -> Vm {
        let vcpus = parts
            .vcpu_fds
            .iter()
            .enumerate()
            .map(|(i, fd)| Vcpu::new(i, fd.clone(), parts.control.clone(), parts.devices.clone(), parts.early.clone()))
            .collect();
        Vm { config, parts, vcpus }
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.parts.memory
    }

    /// Starts a new generation of this VM (it was restored from a snapshot: another copy of
    /// the same state may run, or did): writes a new VM generation ID, `config`'s GUID if it
    /// gives one, a random one otherwise. Nothing without the device.
    pub fn new_generation(&self) -> Result<(), VmError> {
        payload::write_generation_id(&self.config, &self.parts.memory)
    }
}
