//! Putting a payload into a VM's memory and vCPUs: a test guest on smpft's boot ABI, or a Linux
//! kernel. The same code runs when the VM is created and each time it is reset in place
//! (`RunningVm::reset`), so a reset boots exactly what a start does.

use crate::error::kvm_err;
use crate::layout::*;
use crate::loader::Image;
use crate::memory::GuestMemory;
use crate::{boot, linux, Payload, VmConfig, VmError};
use kvm_bindings::{kvm_mp_state, kvm_xcrs, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;
use parking_lot::Mutex;
use std::sync::Arc;

/// What a payload is loaded into.
pub(crate) struct Target<'a> {
    pub memory: &'a Arc<GuestMemory>,
    pub vcpu_fds: &'a [Arc<Mutex<VcpuFd>>],
    /// XCR0 for the test guest (which never sets it itself), when the CPU has XSAVE.
    pub xcrs: Option<&'a kvm_xcrs>,
}

/// Checks what can be checked of the test guest before any KVM object exists: the image, the
/// arguments' length, and that memory holds the image and the guest's minimum free memory.
pub(crate) fn check_test_guest(config: &VmConfig, elf: &[u8], args: &str) -> Result<(), VmError> {
    let image = Image::parse(elf).map_err(|source| VmError::Image { guest: config.guest_name.clone(), source })?;
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
    Ok(())
}

/// Loads `config`'s payload: writes its memory (which the caller has cleared, or which is new)
/// and sets up every vCPU to enter it. The vCPUs must be in their power-on state.
pub(crate) fn load(config: &VmConfig, target: &Target) -> Result<(), VmError> {
    match &config.payload {
        Payload::TestGuest { image, args } => load_test_guest(config, target, image, args),
        Payload::Linux(boot) | Payload::FromDisk { boot: Some(boot), .. } => load_linux(config, target, boot),
        Payload::None | Payload::FromDisk { boot: None, .. } => Err(VmError::NothingToBoot),
    }
}

fn load_test_guest(config: &VmConfig, target: &Target, elf: &[u8], args: &str) -> Result<(), VmError> {
    let image_err = |source| VmError::Image { guest: config.guest_name.clone(), source };
    let image = Image::parse(elf).map_err(image_err)?;
    let memory = target.memory;
    boot::write_tables(memory, config.vcpus)?;
    config.smbios.write(memory)?;
    write_generation_id(config, memory)?;
    image.load(elf, memory).map_err(image_err)?;
    memory.write(CMDLINE_ADDR, args.as_bytes())?;
    let mut tsc_khz = 0;
    for (i, fd) in target.vcpu_fds.iter().enumerate() {
        let fd = fd.lock();
        let i = i as u32;
        let sregs = fd.get_sregs().map_err(kvm_err("get special registers"))?;
        fd.set_sregs(&boot::sregs(sregs, i, target.xcrs.is_some())).map_err(kvm_err("set special registers"))?;
        fd.set_regs(&boot::regs(image.entry, i)).map_err(kvm_err("set registers"))?;
        if let Some(x) = target.xcrs {
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
        "test guest loaded"
    );
    Ok(())
}

/// The boot vCPU at the kernel's entry, the others waiting for the kernel to start them
/// (INIT/SIPI through the in-kernel local APICs).
fn load_linux(config: &VmConfig, target: &Target, boot: &linux::LinuxBoot) -> Result<(), VmError> {
    let err = |source| VmError::Linux { kernel: config.guest_name.clone(), source };
    let vmgenid = config.devices.vmgenid.is_some();
    let entry = linux::load(target.memory, config.vcpus, boot, vmgenid).map_err(err)?;
    config.smbios.write(target.memory)?;
    write_generation_id(config, target.memory)?;
    for (i, fd) in target.vcpu_fds.iter().enumerate() {
        let fd = fd.lock();
        let lapic = fd.get_lapic().map_err(kvm_err("get local APIC"))?;
        fd.set_lapic(&linux::entry::wire_lints(lapic)).map_err(kvm_err("set local APIC"))?;
        if i == 0 {
            let sregs = fd.get_sregs().map_err(kvm_err("get special registers"))?;
            fd.set_sregs(&linux::entry::sregs(sregs, entry.mode)).map_err(kvm_err("set special registers"))?;
            fd.set_regs(&linux::entry::regs(&entry)).map_err(kvm_err("set registers"))?;
        }
    }
    for e in &linux::e820::map(config.memory) {
        tracing::debug!("e820 {}", e.linux_line());
    }
    tracing::info!(
        vcpus = config.vcpus,
        memory_mib = config.memory >> 20,
        kernel = %config.guest_name,
        entry = ?entry.mode,
        rip = format_args!("{:#x}", entry.rip),
        initrd_kib = boot.initrd.as_ref().map_or(0, |i| i.len().div_ceil(1024)),
        "Linux kernel loaded"
    );
    Ok(())
}

/// Writes the VM generation ID `config` asks for (a random one for `auto`), if any.
pub(crate) fn write_generation_id(config: &VmConfig, memory: &GuestMemory) -> Result<(), VmError> {
    if let Some(id) = config.devices.vmgenid {
        let guid = id.guid();
        crate::vmgenid::write(memory, guid)?;
        tracing::info!(%guid, "VM generation ID");
    }
    Ok(())
}
