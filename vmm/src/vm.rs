//! A VM built and ready to start: booting a test guest or a Linux kernel, or taking on a saved
//! machine state.

use crate::build::{build, CpuSetup, Parts};
use crate::error::kvm_err;
use crate::host::HostResources;
use crate::layout::*;
use crate::loader::Image;
use crate::memory::GuestMemory;
use crate::vcpu::Vcpu;
use crate::{boot, linux, machine, Payload, VmConfig, VmError};
use kvm_bindings::{kvm_mp_state, KVM_MP_STATE_RUNNABLE};
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
            Payload::Linux(boot) => {
                let boot = boot.clone();
                Vm::create_linux(config, &boot)
            }
            Payload::None => Err(VmError::NothingToBoot),
        }
    }

    fn create_test_guest(config: VmConfig, elf: &[u8], args: &str) -> Result<Vm, VmError> {
        let image_err = |source| VmError::Image { guest: config.guest_name.clone(), source };
        let image = Image::parse(elf).map_err(image_err)?;
        if args.len() > CMDLINE_MAX {
            return Err(VmError::ArgsTooLong { len: args.len() });
        }
        let need = image.end().next_multiple_of(0x1000) + MIN_FREE;
        if config.memory < need {
            return Err(VmError::MemoryTooSmall {
                have: config.memory >> 20,
                need: need.div_ceil(1 << 20),
                guest: config.guest_name.clone(),
            });
        }
        let host = HostResources::reserve(&config)?;
        let parts = build(&config, None, host, CpuSetup::TestGuest)?;
        let memory = &parts.memory;
        boot::write_tables(memory, config.vcpus)?;
        config.smbios.write(memory)?;
        write_generation_id(&config, memory)?;
        image.load(elf, memory).map_err(image_err)?;
        memory.write(CMDLINE_ADDR, args.as_bytes())?;

        let mut tsc_khz = 0;
        for (i, fd) in parts.vcpu_fds.iter().enumerate() {
            let fd = fd.lock();
            let i = i as u32;
            let sregs = fd.get_sregs().map_err(kvm_err("get special registers"))?;
            fd.set_sregs(&boot::sregs(sregs, i, parts.xcrs.is_some())).map_err(kvm_err("set special registers"))?;
            fd.set_regs(&boot::regs(image.entry, i)).map_err(kvm_err("set registers"))?;
            if let Some(x) = &parts.xcrs {
                fd.set_xcrs(x).map_err(kvm_err("set XCR0"))?;
            }
            // With the in-kernel irqchip, APs wait for INIT/SIPI; the test guest starts them all.
            fd.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE }).map_err(kvm_err("set MP state"))?;
            if i == 0 {
                tsc_khz = fd.get_tsc_khz().map_err(kvm_err("get TSC frequency"))?;
            }
        }
        let info = BootInfo {
            magic: BOOT_MAGIC,
            version: BOOT_VERSION,
            vcpus: config.vcpus,
            mem_size: memory.size(),
            free_start: image.end().next_multiple_of(0x1000),
            free_end: memory.size(),
            tsc_khz: tsc_khz.into(),
            cmdline_addr: CMDLINE_ADDR,
            cmdline_len: args.len() as u64,
        };
        memory.write(BOOT_INFO_ADDR, &info.to_bytes())?;
        tracing::info!(
            vcpus = config.vcpus,
            memory_mib = config.memory >> 20,
            guest = %config.guest_name,
            entry = format_args!("{:#x}", image.entry),
            tsc_khz,
            "VM created"
        );
        Ok(Vm::assemble(config, parts))
    }

    /// A VM that boots a Linux kernel: the boot vCPU at the kernel's entry, the others waiting
    /// for the kernel to start them (INIT/SIPI through the in-kernel local APICs).
    fn create_linux(config: VmConfig, boot: &linux::LinuxBoot) -> Result<Vm, VmError> {
        let err = |source| VmError::Linux { kernel: config.guest_name.clone(), source };
        let host = HostResources::reserve(&config)?;
        let parts = build(&config, None, host, CpuSetup::Linux)?;
        let vmgenid = config.devices.vmgenid.is_some();
        let entry = linux::load(&parts.memory, config.vcpus, boot, vmgenid).map_err(err)?;
        config.smbios.write(&parts.memory)?;
        write_generation_id(&config, &parts.memory)?;
        for (i, fd) in parts.vcpu_fds.iter().enumerate() {
            let fd = fd.lock();
            let lapic = fd.get_lapic().map_err(kvm_err("get local APIC"))?;
            fd.set_lapic(&linux::entry::wire_lints(lapic)).map_err(kvm_err("set local APIC"))?;
            if i == 0 {
                let sregs = fd.get_sregs().map_err(kvm_err("get special registers"))?;
                fd.set_sregs(&linux::entry::sregs(sregs, entry.mode)).map_err(kvm_err("set special registers"))?;
                fd.set_regs(&linux::entry::regs(&entry)).map_err(kvm_err("set registers"))?;
            }
        }
        let map = linux::e820::map(config.memory);
        for e in &map {
            tracing::debug!("e820 {}", e.linux_line());
        }
        tracing::info!(
            vcpus = config.vcpus,
            memory_mib = config.memory >> 20,
            kernel = %config.guest_name,
            entry = ?entry.mode,
            rip = format_args!("{:#x}", entry.rip),
            initrd_kib = boot.initrd.as_ref().map_or(0, |i| i.len().div_ceil(1024)),
            "Linux VM created"
        );
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
        write_generation_id(&self.config, &self.parts.memory)
    }
}

/// Writes the VM generation ID `config` asks for (a random one for `auto`), if any.
fn write_generation_id(config: &VmConfig, memory: &GuestMemory) -> Result<(), VmError> {
    if let Some(id) = config.devices.vmgenid {
        let guid = id.guid();
        crate::vmgenid::write(memory, guid)?;
        tracing::info!(%guid, "VM generation ID");
    }
    Ok(())
}
