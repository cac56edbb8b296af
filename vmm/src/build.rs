//! The parts every VM has, whether it boots or resumes: KVM's VM with its in-kernel irqchip and
//! PIT, guest memory registered with dirty logging, the devices, and vCPUs with CPUID set.

use crate::control::VcpuControl;
use crate::devices::serial::{SerialError, SerialHost};
use crate::devices::Devices;
use crate::dirty::DirtyLog;
use crate::error::kvm_err;
use crate::host::HostResources;
use crate::layout::{MAX_MEMORY, MAX_VCPUS};
use crate::memory::GuestMemory;
use crate::payload::Target;
use crate::reset::PowerOn;
use crate::state::{EarlyStates, StateCaps};
use crate::vcpu::{self, SignalKick};
use crate::{boot, irq, VmConfig, VmError};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use parking_lot::Mutex;
use std::sync::Arc;

/// Memory the host could give the guest now (MemAvailable), in bytes.
fn host_available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn open_kvm(path: &std::path::Path) -> Result<Kvm, VmError> {
    let p = || path.to_path_buf();
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| VmError::NoKvm(p()))?;
    let kvm = Kvm::new_with_path(&cpath).map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => VmError::NoKvm(p()),
        libc::EACCES | libc::EPERM => VmError::KvmDenied(p()),
        libc::ENOTTY | libc::EINVAL => VmError::NotKvm(p()),
        _ => VmError::KvmOpen { path: p(), source: e },
    })?;
    // A device that is not KVM fails KVM_GET_API_VERSION (-1).
    if kvm.get_api_version() != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(VmError::NotKvm(p()));
    }
    Ok(kvm)
}

/// Largest vCPU count usable on this host.
pub fn max_vcpus(kvm: &Kvm) -> u32 {
    (kvm.get_max_vcpus() as u32).min(MAX_VCPUS)
}

/// Checks memory against the layout's and the host's limits.
fn check_memory(memory: u64) -> Result<(), VmError> {
    if memory > MAX_MEMORY {
        return Err(VmError::MemoryTooLarge {
            asked: memory >> 20,
            limit: MAX_MEMORY >> 20,
            why: "the test-guest memory map ends below the 32-bit MMIO hole",
        });
    }
    if let Some(avail) = host_available_memory() {
        if memory > avail {
            return Err(VmError::MemoryTooLarge {
                asked: memory >> 20,
                limit: avail >> 20,
                why: "memory available on this host",
            });
        }
    }
    Ok(())
}

/// What a VM is made of, shared by the boot and the restore paths.
pub(crate) struct Parts {
    pub(crate) vm: VmFd,
    pub(crate) memory: Arc<GuestMemory>,
    pub(crate) vcpu_fds: Vec<Arc<Mutex<VcpuFd>>>,
    pub(crate) devices: Arc<Devices>,
    pub(crate) control: Arc<VcpuControl>,
    pub(crate) kick: Arc<SignalKick>,
    /// The host's state capabilities, and where vCPUs leave their registers at a pause.
    pub(crate) early: Arc<EarlyStates>,
    pub(crate) dirty: DirtyLog,
    /// XCR0 to start vCPUs with, when the CPU has XSAVE.
    pub(crate) xcrs: Option<kvm_bindings::kvm_xcrs>,
    /// COM1's host side, reserved; connected when the VM starts.
    pub(crate) serial_host: SerialHost,
    /// The virtio-serial ports' listening sockets; served when the VM starts.
    pub(crate) channels: Vec<crate::devices::channel::ChannelListener>,
    /// The guest's CPUID before per-vCPU details (see [`crate::cpuid::guest`]).
    pub(crate) cpuid: Vec<cpu_model::Leaf>,
    /// The machine as built, before anything was loaded: what a reset goes back to.
    pub(crate) power_on: PowerOn,
    pub(crate) _kvm: Kvm,
}

impl Parts {
    /// Where a payload is loaded.
    pub(crate) fn target(&self) -> Target<'_> {
        Target { memory: &self.memory, vcpu_fds: &self.vcpu_fds, xcrs: self.xcrs.as_ref() }
    }
}

/// How vCPUs' CPUID and XCR0 are set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CpuSetup {
    /// The test guest runs with XSAVE enabled by smpft (it never sets CR4 itself). Restored
    /// VMs are built this way too; their CR4 and XCR0 come from the saved state.
    TestGuest,
    /// A kernel enables XSAVE itself if it wants it.
    Linux,
}

/// Creates the VM, memory (with dirty logging), devices and vCPUs (with CPUID set).
/// `memory`, when given, is used as the guest's memory as it is (a standby's copy); `host`
/// holds the host resources reserved for it.
pub(crate) fn build(
    config: &VmConfig,
    memory: Option<Arc<GuestMemory>>,
    host: HostResources,
    setup: CpuSetup,
) -> Result<Parts, VmError> {
    check_memory(config.memory)?;
    let kvm = open_kvm(&config.kvm_device)?;
    let max = max_vcpus(&kvm);
    if config.vcpus == 0 || config.vcpus > max {
        return Err(VmError::Vcpus { asked: config.vcpus, max });
    }
    let HostResources { serial: serial_host, console, disks, taps, channels, .. } = host;

    let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
    vm.create_irq_chip().map_err(kvm_err("create in-kernel irqchip"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm_err("create PIT"))?;

    let memory = match memory {
        Some(m) if m.size() == config.memory => m,
        Some(m) => {
            return Err(VmError::MemoryTooLarge {
                asked: m.size() >> 20,
                limit: config.memory >> 20,
                why: "the VM's size",
            })
        }
        None => Arc::new(GuestMemory::new(config.memory)?),
    };
    DirtyLog::enable_manual_protect(&vm)?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: 0,
        memory_size: memory.size(),
        userspace_addr: memory.host_addr(),
    };
    // SAFETY: the region maps `memory`, which outlives the VM fd: `Parts`/`RunningVm` hold an
    // Arc to it and drop the VM fd first (explicitly in `RunningVm::stop`).
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("register guest memory"))?;
    let dirty = DirtyLog::new(0, &memory);

    let irq = Arc::new(irq::Irq::new(&vm).map_err(|e| VmError::Serial(SerialError::Event(e)))?);
    let devices = Arc::new(Devices::new(&config.devices, disks, taps, console, &memory, &irq)?);

    vcpu::register_kick_handler().map_err(|e| VmError::Kvm { what: "install vCPU kick signal handler", source: e })?;
    let kick = SignalKick::new(config.vcpus as usize);
    let control = Arc::new(VcpuControl::new(config.vcpus as usize, Box::new(kick.clone())));

    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("get supported CPUID"))?;
    let cpuid = crate::cpuid::guest(&kvm, &config.cpu)?;
    let supported = crate::cpuid::to_cpuid(&cpuid, &supported)?;
    let xcrs = if setup == CpuSetup::TestGuest { boot::xcrs(&supported) } else { None };
    let xsave = xcrs.is_some();
    let mut vcpu_fds = Vec::new();
    for i in 0..config.vcpus {
        let fd = vm.create_vcpu(u64::from(i)).map_err(kvm_err("create vCPU"))?;
        fd.set_cpuid2(&boot::cpuid_for(supported.clone(), i, config.vcpus, xsave)).map_err(kvm_err("set CPUID"))?;
        vcpu_fds.push(Arc::new(Mutex::new(fd)));
    }
    let caps = StateCaps::probe(&kvm, &vm, &vcpu_fds[0].lock())?;
    let power_on = PowerOn::capture(&vm, &vcpu_fds, &caps, &devices, xcrs)?;
    let early = Arc::new(EarlyStates::new(caps, vcpu_fds.len()));
    Ok(Parts {
        vm,
        memory,
        vcpu_fds,
        devices,
        control,
        kick,
        early,
        dirty,
        xcrs,
        serial_host,
        channels,
        cpuid,
        power_on,
        _kvm: kvm,
    })
}
