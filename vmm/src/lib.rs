//! The VMM: builds a KVM VM with guest memory, devices and vCPUs, either booting a guest image
//! ([`Vm::create`]) or taking on a saved machine state ([`Vm::from_state`]), runs it
//! ([`Vm::start`]) and gives the caller a handle to pause, resume, capture and stop it
//! ([`RunningVm`]). It knows nothing of snapshot files or fault tolerance, which build on it.

pub mod boot;
pub mod capture;
pub mod component;
pub mod control;
pub mod devices;
pub mod dirty;
pub mod host;
pub mod irq;
pub mod layout;
pub mod linux;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod net;
pub mod pages;
pub mod pci;
pub mod state;
pub mod vcpu;
pub mod virtio;

use control::{PauseError, VcpuControl};
use crossbeam_channel::{Receiver, Sender};
use devices::serial::{SerialBackend, SerialError, SerialHost, SerialSpec};
use devices::{DeviceConfig, Devices};
use dirty::DirtyLog;
use host::HostResources;
use kvm_bindings::{
    kvm_mp_state, kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use layout::*;
use loader::Image;
use memory::GuestMemory;
use parking_lot::Mutex;
use state::{EarlyStates, StateCaps};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vcpu::{SignalKick, Vcpu, VcpuEnd};

/// What to run and how.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vcpus: u32,
    pub memory: u64,
    /// What the VM boots (unused when restoring).
    pub payload: Payload,
    /// Where the payload came from, for messages.
    pub guest_name: String,
    pub serial: SerialSpec,
    /// Where guest log lines (debug console) go: `None` for stderr.
    pub console: Option<PathBuf>,
    /// The KVM device, normally `/dev/kvm`.
    pub kvm_device: PathBuf,
    /// Optional devices.
    pub devices: DeviceConfig,
}

/// What a new VM boots.
#[derive(Debug, Clone)]
pub enum Payload {
    /// A freestanding guest on smpft's boot ABI (`boot-abi`): a static ELF started in ring 3 on
    /// every vCPU, with its boot parameters.
    TestGuest { image: Arc<[u8]>, args: String },
    /// A Linux kernel (see [`linux`]).
    Linux(linux::LinuxBoot),
    /// Nothing: the VM is built from a saved state ([`Vm::from_state`]), as a standby's is.
    None,
}

pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0} is not present: this host has no KVM (load kvm_intel, kvm_amd or kvm_pvm)")]
    NoKvm(PathBuf),
    #[error("permission denied on {0}: run as root or as a member of the kvm group")]
    KvmDenied(PathBuf),
    #[error("{0} is not a KVM device")]
    NotKvm(PathBuf),
    #[error("cannot open {path}")]
    KvmOpen { path: PathBuf, source: kvm_ioctls::Error },
    #[error("--vcpus {asked} is out of range: this host runs 1 to {max} vCPUs per VM")]
    Vcpus { asked: u32, max: u32 },
    #[error("--memory {asked} MiB is larger than {limit} MiB ({why})")]
    MemoryTooLarge { asked: u64, limit: u64, why: &'static str },
    #[error("--memory {have} MiB is too small for guest {guest}: it needs at least {need} MiB")]
    MemoryTooSmall { have: u64, need: u64, guest: String },
    #[error("guest {guest}")]
    Image { guest: String, source: loader::LoaderError },
    #[error("kernel {kernel}")]
    Linux { kernel: String, source: linux::LinuxError },
    #[error("nothing to boot: a VM without a guest or kernel is built from a saved state")]
    NothingToBoot,
    #[error("--guest-args is {len} bytes; at most {max} fit", max = CMDLINE_MAX)]
    ArgsTooLong { len: usize },
    #[error("KVM: {what}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Serial(#[from] SerialError),
    #[error(transparent)]
    Devices(#[from] devices::DeviceError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Dirty(#[from] dirty::DirtyError),
    #[error("cannot open console file {path}")]
    Console { path: PathBuf, source: std::io::Error },
    #[error("disk {spec}")]
    Disk { spec: String, source: block::BackendError },
    #[error("--net {spec}")]
    Net { spec: String, source: net::tap::TapError },
    #[error("cannot start the network receive thread")]
    NetThread(#[source] std::io::Error),
    #[error("cannot start vCPU threads")]
    Thread(#[source] std::io::Error),
    #[error("cannot park the vCPUs")]
    Pause(#[from] PauseError),
    #[error("vCPU threads did not exit within {0:?}")]
    ExitTimeout(Duration),
    #[error("the VM has stopped")]
    Stopped,
    #[error(transparent)]
    Component(#[from] component::ComponentError),
    #[error("the saved state has no state for device '{0}', which this VM has")]
    MissingState(&'static str),
    #[error("the saved state has state for device '{0}', which this VM lacks")]
    UnknownState(String),
    #[error("the saved state has {got} vCPU states for {want} vCPUs")]
    VcpuCount { got: usize, want: usize },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

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

/// A VM built and ready to start.
pub struct Vm {
    config: VmConfig,
    parts: Parts,
    vcpus: Vec<Vcpu>,
}

/// What a VM is made of, shared by the boot and the restore paths.
struct Parts {
    vm: VmFd,
    memory: Arc<GuestMemory>,
    vcpu_fds: Vec<Arc<Mutex<VcpuFd>>>,
    devices: Arc<Devices>,
    control: Arc<VcpuControl>,
    kick: Arc<SignalKick>,
    /// The host's state capabilities, and where vCPUs leave their registers at a pause.
    early: Arc<EarlyStates>,
    dirty: DirtyLog,
    /// XCR0 to start vCPUs with, when the CPU has XSAVE.
    xcrs: Option<kvm_bindings::kvm_xcrs>,
    /// COM1's host side, reserved; connected when the VM starts.
    serial_host: SerialHost,
    _kvm: Kvm,
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest wrote its exit status.
    GuestExit(u32),
    /// A vCPU failed; the message says how.
    VcpuFailed(String),
    /// The host asked smpft to stop (signal number).
    Signal(i32),
}

/// Creates the VM, memory (with dirty logging), devices and vCPUs (with CPUID set).
/// `memory`, when given, is used as the guest's memory as it is (a standby's copy); `host`
/// holds the host resources reserved for it.
/// How vCPUs' CPUID and XCR0 are set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CpuSetup {
    /// The test guest runs with XSAVE enabled by smpft (it never sets CR4 itself). Restored
    /// VMs are built this way too; their CR4 and XCR0 come from the saved state.
    TestGuest,
    /// A kernel enables XSAVE itself if it wants it.
    Linux,
}

fn build(
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
    let HostResources { serial: serial_host, console, disks, taps, .. } = host;

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
    let xcrs = if setup == CpuSetup::TestGuest { boot::xcrs(&supported) } else { None };
    let xsave = xcrs.is_some();
    let mut vcpu_fds = Vec::new();
    for i in 0..config.vcpus {
        let fd = vm.create_vcpu(u64::from(i)).map_err(kvm_err("create vCPU"))?;
        fd.set_cpuid2(&boot::cpuid_for(supported.clone(), i, config.vcpus, xsave)).map_err(kvm_err("set CPUID"))?;
        vcpu_fds.push(Arc::new(Mutex::new(fd)));
    }
    let caps = StateCaps::probe(&kvm, &vm, &vcpu_fds[0].lock())?;
    let early = Arc::new(EarlyStates::new(caps, vcpu_fds.len()));
    Ok(Parts { vm, memory, vcpu_fds, devices, control, kick, early, dirty, xcrs, serial_host, _kvm: kvm })
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
        let entry = linux::load(&parts.memory, config.vcpus, boot).map_err(err)?;
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

    /// As [`Vm::start`], with every vCPU parked before it runs a single guest instruction (and
    /// every component paused), until [`RunningVm::resume`].
    pub fn start_paused(self) -> Result<RunningVm, VmError> {
        self.parts.control.pause_at_start();
        let running = self.start()?;
        running.pause()?;
        Ok(running)
    }

    /// Starts the serial backend and one thread per vCPU.
    pub fn start(self) -> Result<RunningVm, VmError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let Vm { config, parts, vcpus } = self;
        let control = parts.control.clone();
        let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(move || control.input_arrived());
        let serial = SerialBackend::start(parts.serial_host, parts.devices.serial.clone(), wake.clone())?;
        let nets = parts
            .devices
            .nets()
            .iter()
            .map(|n| net::backend::NetBackend::start(n.clone(), wake.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VmError::NetThread)?;
        let mut threads = Vec::new();
        for mut v in vcpus {
            let tx: Sender<VmEvent> = tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{}", v.index))
                .spawn(move || {
                    v.run(|i, end| match end {
                        VcpuEnd::Requested => {}
                        VcpuEnd::GuestExit(status) => {
                            tracing::debug!(vcpu = i, status, "guest exit");
                            let _ = tx.send(VmEvent::GuestExit(*status));
                        }
                        VcpuEnd::Failed(e) => {
                            let _ = tx.send(VmEvent::VcpuFailed(e.to_string()));
                        }
                    })
                })
                .map_err(VmError::Thread)?;
            use std::os::unix::thread::JoinHandleExt;
            parts.kick.set_thread(threads.len(), Some(t.as_pthread_t()));
            threads.push(t);
        }
        Ok(RunningVm {
            threads,
            events: rx,
            sender: tx,
            serial: Some(serial),
            nets,
            control: parts.control,
            kick: parts.kick,
            devices: parts.devices,
            vcpu_fds: parts.vcpu_fds,
            early: parts.early,
            dirty: Mutex::new(parts.dirty),
            harvests: AtomicU64::new(0),
            vm: Some(parts.vm),
            memory: parts.memory,
            vcpus: config.vcpus,
            device_config: config.devices.clone(),
            _kvm: parts._kvm,
        })
    }
}

/// A running VM. Dropping it without [`RunningVm::shutdown`] also stops it.
pub struct RunningVm {
    threads: Vec<JoinHandle<VcpuEnd>>,
    events: Receiver<VmEvent>,
    sender: Sender<VmEvent>,
    serial: Option<SerialBackend>,
    /// The NICs' receive threads.
    nets: Vec<net::backend::NetBackend>,
    control: Arc<VcpuControl>,
    kick: Arc<SignalKick>,
    devices: Arc<Devices>,
    vcpu_fds: Vec<Arc<Mutex<VcpuFd>>>,
    early: Arc<EarlyStates>,
    dirty: Mutex<DirtyLog>,
    /// Times the dirty log was harvested (see [`RunningVm::harvests`]).
    harvests: AtomicU64,
    vm: Option<VmFd>,
    memory: Arc<GuestMemory>,
    vcpus: u32,
    device_config: DeviceConfig,
    _kvm: Kvm,
}

/// How long a stop may take before smpft gives up on a vCPU thread.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long vCPUs may take to acknowledge a pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl RunningVm {
    pub fn control(&self) -> &Arc<VcpuControl> {
        &self.control
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    pub fn devices(&self) -> &Arc<Devices> {
        &self.devices
    }

    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    /// The optional devices the VM was built with.
    pub fn device_config(&self) -> &DeviceConfig {
        &self.device_config
    }

    pub fn vcpu_fds(&self) -> &[Arc<Mutex<VcpuFd>>] {
        &self.vcpu_fds
    }

    pub fn early_states(&self) -> &Arc<EarlyStates> {
        &self.early
    }

    /// Whether the VM is paused (by [`RunningVm::pause`]).
    pub fn is_paused(&self) -> bool {
        self.control.request() == control::Request::Pause
    }

    /// Pauses the VM's parts in order: every vCPU (blocking until all have acknowledged), then
    /// every component in list order (see [`component`]).
    pub fn pause(&self) -> Result<(), PauseError> {
        self.control.pause(PAUSE_TIMEOUT)?;
        for c in self.devices.components() {
            c.pause();
        }
        Ok(())
    }

    /// Resumes in the reverse order of [`RunningVm::pause`].
    pub fn resume(&self) {
        for c in self.devices.components().iter().rev() {
            c.resume();
        }
        self.control.resume();
    }

    /// A sender other parts (signal handling, control sockets) use to stop the VM.
    pub fn event_sender(&self) -> Sender<VmEvent> {
        self.sender.clone()
    }

    /// The events the VM reports (guest exit, vCPU failure, signals sent through
    /// [`RunningVm::event_sender`]).
    pub fn events(&self) -> &Receiver<VmEvent> {
        &self.events
    }

    /// Waits for the next event, up to `timeout` if given.
    pub fn wait_event(&self, timeout: Option<Duration>) -> Option<VmEvent> {
        match timeout {
            Some(t) => self.events.recv_timeout(t).ok(),
            None => self.events.recv().ok(),
        }
    }

    /// The pseudo-terminal COM1 is connected to, if it is one.
    pub fn serial_pty(&self) -> Option<PathBuf> {
        self.serial.as_ref().and_then(|s| s.pty_path()).map(|p| p.to_path_buf())
    }

    /// The vCPU threads' ids, in vCPU order.
    pub fn vcpu_tids(&self) -> Vec<i32> {
        self.control.tids()
    }

    /// Tells the network this VM's NICs are here now (after a failover): RARP and gratuitous
    /// ARP announcements, a round at once and four more over the next ~350 ms, on a thread of
    /// their own.
    pub fn announce_network(&self) {
        let nets: Vec<_> = self.devices.nets().to_vec();
        if nets.is_empty() {
            return;
        }
        for n in &nets {
            let (mac, ips) = (n.device().mac(), n.device().learned());
            tracing::info!(
                "{}: announcing MAC {mac} and {ips:?} on tap {}",
                component::Component::name(&**n),
                n.device().tap().name()
            );
        }
        let spawned = std::thread::Builder::new().name("net-announce".into()).spawn(move || {
            for delay in net::announce::SCHEDULE {
                std::thread::sleep(delay);
                nets.iter().for_each(|n| n.device().announce());
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot announce the VM's network addresses: {e}");
        }
    }

    /// Stops every vCPU, joins every thread, and flushes serial output.
    pub fn shutdown(mut self) -> Result<(), VmError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), VmError> {
        for c in self.devices.components().iter().rev() {
            c.resume();
        }
        self.control.request_exit();
        let exited = self.control.wait_exited(STOP_TIMEOUT);
        if exited {
            for (i, t) in self.threads.drain(..).enumerate() {
                self.kick.set_thread(i, None);
                let _ = t.join();
            }
        }
        if let Some(s) = self.serial.take() {
            s.stop();
        }
        self.nets.drain(..).for_each(net::backend::NetBackend::stop);
        if exited {
            // Whatever the guest wrote reaches stable storage before smpft reports the VM ended.
            self.devices.flush_disks();
        }
        self.vm.take();
        if exited {
            Ok(())
        } else {
            Err(VmError::ExitTimeout(STOP_TIMEOUT))
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if !self.threads.is_empty() || self.serial.is_some() {
            if let Err(e) = self.stop() {
                tracing::error!("stopping the VM: {e}");
            }
        }
    }
}
