//! What a VM is: its shape, what it boots, where its console and serial port go, its devices.

use crate::devices::serial::{SerialLog, SerialSpec};
use crate::devices::DeviceConfig;
use crate::linux;
use std::path::PathBuf;
use std::sync::Arc;

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
    /// A file that receives every byte the serial port releases, wherever it goes.
    pub serial_log: Option<SerialLog>,
    /// Where guest log lines (debug console) go: `None` for stderr.
    pub console: Option<PathBuf>,
    /// The KVM device, normally `/dev/kvm`.
    pub kvm_device: PathBuf,
    /// Optional devices.
    pub devices: DeviceConfig,
    /// What the SMBIOS tables say the machine is.
    pub smbios: crate::smbios::Smbios,
    /// The guest's CPU model and features (`host`: the host's CPU as KVM offers it).
    pub cpu: cpu_model::CpuSpec,
    /// A reset the guest asks for ends the VM instead (QEMU's `-no-reboot`); `system_reset`
    /// still resets it.
    pub no_reboot: bool,
    /// A guest that powers off leaves the VM stopped, not ended, until `system_reset` (and
    /// `cont`) or `quit` (QEMU's `-no-shutdown`, which libvirt's reboot through ACPI needs).
    pub no_shutdown: bool,
}

/// What a new VM boots.
#[derive(Debug, Clone)]
pub enum Payload {
    /// A freestanding guest on smpft's boot ABI (`boot-abi`): a static ELF started in ring 3 on
    /// every vCPU, with its boot parameters.
    TestGuest { image: Arc<[u8]>, args: String },
    /// A Linux kernel (see [`linux`]).
    Linux(linux::LinuxBoot),
    /// A Linux kernel read from the VM's disk, and how to read the disk again: a reset in place
    /// boots what the disk says then (or this kernel again, if the disk cannot be read). A
    /// standby's has no kernel: it never reads the disk, and reads it only at a reset once it
    /// runs the VM.
    FromDisk { boot: Option<linux::LinuxBoot>, reread: Reread },
    /// Nothing: the VM is built from a saved state ([`crate::Vm::from_state`]), as a standby's is.
    None,
}

/// Reads the boot disk again: the kernel, initrd and command line its default entry names now,
/// or why it cannot.
#[derive(Clone)]
pub struct Reread(pub Arc<dyn Fn() -> Result<linux::LinuxBoot, String> + Send + Sync>);

impl std::fmt::Debug for Reread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reread")
    }
}

pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";
