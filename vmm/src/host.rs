//! The host resources a VM needs to run, claimed before it runs.
//!
//! A VM that cannot get its serial socket or console file must fail before anyone relies on it:
//! `smpft run` at start, and a standby at its start too, not at the moment it goes live. A
//! standby holds its [`HostResources`] for its whole watch and [`HostResources::check`]s them
//! again before it accepts a primary and before it claims the tie-breaker; a copy that could not
//! go live never claims. Devices that need a host resource (disks, taps) add it here.

use super::devices::serial::SerialHost;
use super::devices::Console;
use super::{open_kvm, VmConfig, VmError};
use std::path::PathBuf;

pub struct HostResources {
    pub(super) serial: SerialHost,
    pub(super) console: Console,
    kvm_device: PathBuf,
}

impl HostResources {
    /// Claims what `config` names: opens KVM to check it, creates the console file and binds
    /// the serial socket (which refuses connections until the VM runs) or opens its file.
    pub fn reserve(config: &VmConfig) -> Result<HostResources, VmError> {
        open_kvm(&config.kvm_device)?;
        let console = match &config.console {
            None => Console::Stderr,
            Some(p) => {
                Console::File(std::fs::File::create(p).map_err(|source| VmError::Console { path: p.clone(), source })?)
            }
        };
        let serial = SerialHost::reserve(&config.serial)?;
        Ok(HostResources { serial, console, kvm_device: config.kvm_device.clone() })
    }

    /// Verifies that everything is still held and usable: KVM opens, the serial socket is
    /// still bound (bound again if its file was removed).
    pub fn check(&mut self) -> Result<(), VmError> {
        open_kvm(&self.kvm_device)?;
        self.serial.check()?;
        Ok(())
    }
}
