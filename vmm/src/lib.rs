//! The VMM: builds a KVM VM with guest memory, devices and vCPUs, either booting a guest image
//! ([`Vm::create`]) or taking on a saved machine state ([`Vm::from_state`]), runs it
//! ([`Vm::start`]) and gives the caller a handle to pause, resume, capture and stop it
//! ([`RunningVm`]). It knows nothing of snapshot files or fault tolerance, which build on it.
//!
//! What to build is a [`VmConfig`] (`config`); `build` makes the KVM VM, memory, devices and
//! vCPUs every VM has, `vm` sets them up to boot or to resume, `running` runs them; `error` is
//! what can go wrong on the way.

pub mod boot;
pub mod capture;
pub mod component;
pub mod control;
pub mod cpuid;
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
pub mod smbios;
pub mod state;
pub mod vcpu;
pub mod virtio;
pub mod vmgenid;

mod build;
mod config;
mod error;
mod payload;
mod reset;
mod running;
mod vm;

pub use build::{max_vcpus, open_kvm};
pub use config::{Payload, Reread, VmConfig, DEFAULT_KVM_DEVICE};
pub use error::VmError;
pub use running::{RunningVm, VmEvent};
pub use vm::Vm;
