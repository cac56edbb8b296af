//! Why a VM could not be built, started or stopped.

use crate::control::PauseError;
use crate::devices::serial::SerialError;
use crate::layout::CMDLINE_MAX;
use crate::{component, devices, dirty, linux, loader, memory, net, state};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Cpu(cpu_model::CpuError),
    #[error("{0} is not present: this host has no KVM (load kvm_intel, kvm_amd or kvm_pvm)")]
    NoKvm(PathBuf),
    #[error("permission denied on {0}: run as root or as a member of the kvm group")]
    KvmDenied(PathBuf),
    #[error("{0} is not a KVM device")]
    NotKvm(PathBuf),
    #[error("cannot open {path}")]
    KvmOpen { path: PathBuf, source: kvm_ioctls::Error },
    #[error("a vCPU count of {asked} is out of range: this host runs 1 to {max} vCPUs per VM")]
    Vcpus { asked: u32, max: u32 },
    #[error("a memory size of {asked} MiB is larger than {limit} MiB ({why})")]
    MemoryTooLarge { asked: u64, limit: u64, why: &'static str },
    #[error("a memory size of {have} MiB is too small for guest {guest}: it needs at least {need} MiB")]
    MemoryTooSmall { have: u64, need: u64, guest: String },
    #[error("guest {guest}")]
    Image { guest: String, source: loader::LoaderError },
    #[error("kernel {kernel}")]
    Linux { kernel: String, source: linux::LinuxError },
    #[error("nothing to boot: a VM without a guest or kernel is built from a saved state")]
    NothingToBoot,
    #[error("SMBIOS tables")]
    Smbios(#[source] crate::smbios::SmbiosError),
    #[error("the guest's arguments are {len} bytes; at most {max} fit", max = CMDLINE_MAX)]
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
    #[error("network device {spec}")]
    Net { spec: String, source: net::tap::TapError },
    #[error(transparent)]
    Channel(#[from] devices::channel::ChannelError),
    #[error("cannot start the virtio-serial thread")]
    ChannelThread(#[source] std::io::Error),
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

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}
