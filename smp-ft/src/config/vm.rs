//! The VM's configuration ([`VmConfig`]), built the same way whoever describes the VM: `smpft
//! run`, `smpft standby` or the QEMU persona. One set of defaults: 2 vCPUs and 256 MiB, unless a
//! snapshot being restored says otherwise.

use super::error::{ConfigError, Problem};
use super::names::{Names, Setting};
use crate::guest;
use crate::vmm::devices::channel::ChannelSpec;
use crate::vmm::devices::serial::{SerialLog, SerialSpec};
use crate::vmm::devices::DeviceConfig;
use crate::vmm::linux::LinuxBoot;
use crate::vmm::smbios::Smbios;
use crate::vmm::{Payload, VmConfig, DEFAULT_KVM_DEVICE};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// vCPUs of a VM that names none.
pub const DEFAULT_VCPUS: u32 = 2;
/// Memory of a VM that names none.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// The most vCPUs a VM may ask for (the host's KVM may allow fewer).
pub const MAX_VCPUS: u32 = 16;
/// The guest name of a VM built from a saved state (a standby's).
pub const STANDBY_NAME: &str = "(standby)";

/// What the VM boots, as the caller names it.
#[derive(Debug, Clone)]
enum Boot {
    /// Nothing: the VM is built from a saved state (a standby's, or a restore).
    Nothing,
    /// The built-in test guest, with its boot parameters.
    BuiltinGuest { args: String },
    /// A freestanding guest image (`--guest`).
    Guest { image: PathBuf, args: String },
    /// A Linux kernel (`--kernel`), its initrd and command line.
    Linux { kernel: PathBuf, initrd: Option<PathBuf>, cmdline: String },
    /// A Linux kernel or a freestanding guest, whichever the file is; `append` is the kernel's
    /// command line or the guest's parameters (QEMU's `-kernel`, `-initrd`, `-append`).
    Either { kernel: PathBuf, initrd: Option<PathBuf>, append: String },
    /// What disk `index` (of the VM's disks) says to boot, its command line with `extra`
    /// appended (`--boot disk`, a disk with the lowest `bootindex`).
    Disk { index: usize, extra: String, read_now: bool },
}

/// Builds a [`VmConfig`]: set what the caller was given, then [`VmBuilder::build`].
#[derive(Debug, Clone)]
pub struct VmBuilder {
    names: Names,
    vcpus: Option<u32>,
    memory: Option<u64>,
    /// The shape of a snapshot being restored: the default when vCPUs or memory are not given.
    snapshot: Option<(u32, u64)>,
    boot: Boot,
    serial: SerialSpec,
    serial_log: Option<SerialLog>,
    smbios: Smbios,
    console: Option<PathBuf>,
    kvm_device: PathBuf,
    devices: DeviceConfig,
    /// The virtio-serial ports (a virtio-serial device even without any, if `Some`).
    virtio_serial: Option<Vec<ChannelSpec>>,
    cpu: cpu_model::CpuSpec,
    no_reboot: bool,
    no_shutdown: bool,
}

impl VmBuilder {
    /// A VM with the defaults, its errors naming settings in `names`' words: it boots nothing
    /// (set [`Self::test_guest`], [`Self::linux`] or [`Self::kernel`]) and has no serial port
    /// (set [`Self::serial`]).
    pub fn new(names: Names) -> VmBuilder {
        VmBuilder {
            names,
            vcpus: None,
            memory: None,
            snapshot: None,
            boot: Boot::Nothing,
            serial: SerialSpec::Null,
            serial_log: None,
            smbios: Smbios::default(),
            console: None,
            kvm_device: DEFAULT_KVM_DEVICE.into(),
            devices: DeviceConfig::default(),
            virtio_serial: None,
            cpu: cpu_model::CpuSpec::default(),
            no_reboot: false,
            no_shutdown: false,
        }
    }

    pub fn vcpus(mut self, vcpus: Option<u32>) -> Self {
        self.vcpus = vcpus.or(self.vcpus);
        self
    }

    /// Memory in bytes.
    pub fn memory(mut self, bytes: Option<u64>) -> Self {
        self.memory = bytes.or(self.memory);
        self
    }

    /// The shape of the snapshot being restored, the default for vCPUs and memory not given.
    pub fn snapshot_shape(mut self, vcpus: u32, memory: u64) -> Self {
        self.snapshot = Some((vcpus, memory));
        self
    }

    /// Boot a freestanding guest image, or the built-in test guest without one.
    pub fn test_guest(mut self, image: Option<PathBuf>, args: String) -> Self {
        self.boot = match image {
            Some(image) => Boot::Guest { image, args },
            None => Boot::BuiltinGuest { args },
        };
        self
    }

    /// Boot a Linux kernel.
    pub fn linux(mut self, kernel: PathBuf, initrd: Option<PathBuf>, cmdline: String) -> Self {
        self.boot = Boot::Linux { kernel, initrd, cmdline };
        self
    }

    /// Boot `kernel` as a Linux kernel if it is one, as a freestanding guest otherwise (which
    /// takes no initrd); `append` is its command line or parameters.
    pub fn kernel(mut self, kernel: PathBuf, initrd: Option<PathBuf>, append: String) -> Self {
        self.boot = Boot::Either { kernel, initrd, append };
        self
    }

    /// Boot what the VM's disk `index` says (its default boot entry), with `extra` appended to
    /// the entry's command line. Only this copy reads the disk: a standby gets the booted VM.
    pub fn boot_disk(mut self, index: usize, extra: String) -> Self {
        self.boot = Boot::Disk { index, extra, read_now: true };
        self
    }

    /// As [`Self::boot_disk`] for a standby: the disk is not read now (the standby receives
    /// the booted VM), only by a reset once this copy runs the VM.
    pub fn boot_disk_later(mut self, index: usize, extra: String) -> Self {
        self.boot = Boot::Disk { index, extra, read_now: false };
        self
    }

    pub fn serial(mut self, serial: SerialSpec) -> Self {
        self.serial = serial;
        self
    }

    /// What the SMBIOS tables say the machine is.
    pub fn smbios(mut self, smbios: Smbios) -> Self {
        self.smbios = smbios;
        self
    }

    /// A file that receives every byte the serial port releases (created if missing).
    pub fn serial_log(mut self, log: Option<SerialLog>) -> Self {
        self.serial_log = log;
        self
    }

    /// Where guest log lines go (`None`: standard error).
    pub fn console(mut self, console: Option<PathBuf>) -> Self {
        self.console = console;
        self
    }

    pub fn kvm_device(mut self, device: PathBuf) -> Self {
        self.kvm_device = device;
        self
    }

    pub fn devices(mut self, devices: DeviceConfig) -> Self {
        self.devices = devices;
        self
    }

    /// A virtio-serial device with these ports (the guest agent's channel): ports without a
    /// number are numbered from 1 in order, and named `charchannelN` for QMP if unnamed.
    pub fn virtio_serial(mut self, ports: Option<Vec<ChannelSpec>>) -> Self {
        self.virtio_serial = ports;
        self
    }

    /// The guest's CPU model and features (default: the host's CPU as KVM offers it).
    pub fn cpu(mut self, cpu: cpu_model::CpuSpec) -> Self {
        self.cpu = cpu;
        self
    }

    /// A reset the guest asks for ends the VM instead of restarting it.
    pub fn no_reboot(mut self, no_reboot: bool) -> Self {
        self.no_reboot = no_reboot;
        self
    }

    /// A guest that powers off leaves the VM stopped until it is reset or told to quit.
    pub fn no_shutdown(mut self, no_shutdown: bool) -> Self {
        self.no_shutdown = no_shutdown;
        self
    }

    /// Checks the settings, reads the guest's files and gives the VM's configuration.
    pub fn build(self) -> Result<VmConfig, ConfigError> {
        let names = self.names;
        let vcpus = self.vcpus.or(self.snapshot.map(|s| s.0)).unwrap_or(DEFAULT_VCPUS);
        if !(1..=MAX_VCPUS).contains(&vcpus) {
            let range = Problem::Range { value: vcpus.into(), lo: 1, hi: MAX_VCPUS.into() };
            return Err(ConfigError::new(names, &[Setting::Vcpus], range));
        }
        let memory = self.memory.or(self.snapshot.map(|s| s.1)).unwrap_or(DEFAULT_MEMORY);
        if memory == 0 {
            return Err(ConfigError::new(names, &[Setting::Memory], Problem::Zero));
        }
        let (payload, guest_name) = match self.boot {
            Boot::Disk { index, extra, read_now } => {
                super::disk_boot::payload(names, &self.devices.disks, index, &extra, read_now)?
            }
            boot => payload(names, boot)?,
        };
        let mut devices = self.devices;
        if let Some(mut ports) = self.virtio_serial {
            for (i, p) in ports.iter_mut().enumerate() {
                if p.nr == 0 {
                    p.nr = i as u32 + 1;
                }
                if p.chardev.is_empty() {
                    p.chardev = format!("charchannel{i}");
                }
                if p.id.is_empty() {
                    p.id = format!("channel{i}");
                }
            }
            ChannelSpec::check_all(&ports)
                .map_err(|why| ConfigError::new(names, &[Setting::Channel], Problem::Invalid(why)))?;
            devices.virtio_serial = Some(ports);
        }
        Ok(VmConfig {
            vcpus,
            memory,
            payload,
            guest_name,
            serial: self.serial,
            serial_log: self.serial_log,
            console: self.console,
            kvm_device: self.kvm_device,
            devices,
            smbios: self.smbios,
            cpu: self.cpu,
            no_reboot: self.no_reboot,
            no_shutdown: self.no_shutdown,
        })
    }
}

/// The same VM as a standby builds it: from the state its primary sends. It keeps the payload,
/// which a reset boots again once this copy is the one running.
pub fn as_standby(config: VmConfig) -> VmConfig {
    VmConfig { guest_name: STANDBY_NAME.into(), ..config }
}

fn read(names: Names, setting: Setting, path: &Path) -> Result<Arc<[u8]>, ConfigError> {
    std::fs::read(path)
        .map(Arc::from)
        .map_err(|source| ConfigError::new(names, &[setting], Problem::Read { path: path.to_path_buf(), source }))
}

/// What the VM boots, and its name for messages.
fn payload(names: Names, boot: Boot) -> Result<(Payload, String), ConfigError> {
    let initrd = |p: &Option<PathBuf>| p.as_deref().map(|p| read(names, Setting::Initrd, p)).transpose();
    Ok(match boot {
        Boot::Nothing => (Payload::None, STANDBY_NAME.into()),
        Boot::Disk { .. } => unreachable!("disks are read by disk_boot::payload"),
        Boot::BuiltinGuest { args } => {
            (Payload::TestGuest { image: guest::BUILTIN.into(), args }, guest::BUILTIN_NAME.into())
        }
        Boot::Guest { image, args } => {
            let name = image.display().to_string();
            (Payload::TestGuest { image: read(names, Setting::Guest, &image)?, args }, name)
        }
        Boot::Linux { kernel, initrd: i, cmdline } => {
            let boot = LinuxBoot { kernel: read(names, Setting::Kernel, &kernel)?, initrd: initrd(&i)?, cmdline };
            (Payload::Linux(boot), kernel.display().to_string())
        }
        Boot::Either { kernel, initrd: i, append } => {
            let image = read(names, Setting::Kernel, &kernel)?;
            let name = kernel.display().to_string();
            if crate::vmm::linux::is_linux_kernel(&image) {
                (Payload::Linux(LinuxBoot { kernel: image, initrd: initrd(&i)?, cmdline: append }), name)
            } else if i.is_some() {
                let why = Problem::Invalid(format!("{name} is not a Linux kernel, so it takes no initrd"));
                return Err(ConfigError::new(names, &[Setting::Initrd], why));
            } else {
                (Payload::TestGuest { image, args: append }, name)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_default_shape_for_every_caller() {
        for names in [Names::Cli, Names::Qemu, Names::Libvirt] {
            let c = VmBuilder::new(names).build().unwrap();
            assert_eq!((c.vcpus, c.memory), (DEFAULT_VCPUS, DEFAULT_MEMORY));
            assert!(matches!(c.payload, Payload::None));
            assert_eq!(c.guest_name, STANDBY_NAME);
        }
        assert_eq!((DEFAULT_VCPUS, DEFAULT_MEMORY), (2, 256 << 20));
        let restored = VmBuilder::new(Names::Cli).snapshot_shape(4, 1 << 30).vcpus(Some(3)).build().unwrap();
        assert_eq!((restored.vcpus, restored.memory), (3, 1 << 30), "given beats the snapshot's");
    }

    #[test]
    fn errors_name_the_setting_in_the_callers_words() {
        for (names, vcpus, memory) in [(Names::Cli, "--vcpus", "--memory"), (Names::Qemu, "-smp", "-m")] {
            let e = VmBuilder::new(names).vcpus(Some(17)).build().unwrap_err();
            assert_eq!(e.setting(), Some(Setting::Vcpus));
            assert_eq!(e.to_string(), format!("{vcpus} 17 is not in 1..=16"));
            let e = VmBuilder::new(names).vcpus(Some(0)).build().unwrap_err();
            assert_eq!(e.to_string(), format!("{vcpus} 0 is not in 1..=16"));
            let e = VmBuilder::new(names).memory(Some(0)).build().unwrap_err();
            assert_eq!(e.to_string(), format!("{memory} must be above zero"));
        }
        let e = VmBuilder::new(Names::Qemu).kernel("/nonexistent/k".into(), None, String::new()).build().unwrap_err();
        assert_eq!(e.setting(), Some(Setting::Kernel));
        assert!(e.to_string().contains("cannot read /nonexistent/k (-kernel)"), "{e}");
        let e = VmBuilder::new(Names::Cli).test_guest(Some("/nonexistent/g".into()), String::new()).build();
        assert!(e.unwrap_err().to_string().contains("cannot read /nonexistent/g (--guest)"));
    }

    #[test]
    fn a_kernel_that_is_not_linux_takes_no_initrd() {
        let dir = tempfile::tempdir().unwrap();
        let (k, i) = (dir.path().join("guest"), dir.path().join("initrd"));
        std::fs::write(&k, b"\x7fELF not linux").unwrap();
        std::fs::write(&i, b"initrd").unwrap();
        let c = VmBuilder::new(Names::Qemu).kernel(k.clone(), None, "counter".into()).build().unwrap();
        assert!(matches!(c.payload, Payload::TestGuest { ref args, .. } if args == "counter"));
        let e = VmBuilder::new(Names::Qemu).kernel(k, Some(i), String::new()).build().unwrap_err();
        assert_eq!(e.setting(), Some(Setting::Initrd));
        assert!(e.to_string().starts_with("-initrd: "), "{e}");
    }
}
