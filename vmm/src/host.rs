//! The host resources a VM needs to run, claimed before it runs.
//!
//! A VM that cannot get its serial socket or console file must fail before anyone relies on it:
//! `smpft run` at start, and a standby at its start too, not at the moment it goes live. A
//! standby holds its [`HostResources`] for its whole watch and [`HostResources::check`]s them
//! again before it accepts a primary and before it claims the tie-breaker; a copy that could not
//! go live never claims. Devices that need a host resource (disks, taps) are opened here.

use super::devices::channel::ChannelListener;
use super::devices::serial::SerialHost;
use super::devices::Console;
use super::net::tap::{Tap, TapError};
use super::{open_kvm, VmConfig, VmError};
use block::Backend;
use std::path::PathBuf;
use std::sync::Arc;

pub struct HostResources {
    pub(super) serial: SerialHost,
    pub(super) console: Console,
    /// The disks' storage, opened (for a standby: its own copy, which it writes as checkpoints
    /// commit).
    pub(super) disks: Vec<Arc<dyn Backend>>,
    disk_specs: Vec<String>,
    /// The NICs' taps, attached.
    pub(super) taps: Vec<Arc<Tap>>,
    /// The virtio-serial ports' listening sockets, in port order.
    pub(super) channels: Vec<ChannelListener>,
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
        let serial = SerialHost::reserve(&config.serial, config.serial_log.as_ref())?;
        // Disks in a format of QEMU's block layer are served by one qemu-storage-daemon, started
        // here, before the vCPUs, and stopped when the last of them goes (after the final flush).
        let disks = block::qsd::open_all(&config.devices.disks).map_err(|(i, source)| VmError::Disk {
            spec: config.devices.disks.get(i).map(|s| s.to_string()).unwrap_or_default(),
            source,
        })?;
        let disk_specs = config.devices.disks.iter().map(|s| s.to_string()).collect();
        let taps = config
            .devices
            .nets
            .iter()
            .map(|spec| {
                Tap::open(&spec.tap).map(Arc::new).map_err(|source| VmError::Net { spec: spec.to_string(), source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let channels = config
            .devices
            .virtio_serial
            .iter()
            .flatten()
            .map(ChannelListener::reserve)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(HostResources { serial, console, disks, disk_specs, taps, channels, kvm_device: config.kvm_device.clone() })
    }

    /// The pseudo-terminal reserved for COM1, if it is one.
    pub fn serial_pty(&self) -> Option<&std::path::Path> {
        self.serial.pty_path()
    }

    /// The disks' storage, in order.
    pub fn disks(&self) -> &[Arc<dyn Backend>] {
        &self.disks
    }

    /// Verifies that everything is still held and usable: KVM opens, the serial socket is
    /// still bound (bound again if its file was removed).
    pub fn check(&mut self) -> Result<(), VmError> {
        open_kvm(&self.kvm_device)?;
        self.serial.check()?;
        // Storage that stopped answering (an NBD server gone) cannot carry the VM.
        for (disk, spec) in self.disks.iter().zip(&self.disk_specs) {
            let mut sector = [0u8; 512];
            disk.read_at(&mut sector[..disk.size().min(512) as usize], 0)
                .map_err(|source| VmError::Disk { spec: spec.clone(), source })?;
        }
        for tap in &self.taps {
            tap.check().map_err(|source: TapError| VmError::Net { spec: format!("tap={}", tap.name()), source })?;
        }
        Ok(())
    }
}
