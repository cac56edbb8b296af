//! The face smpft shows to QEMU tooling: a QMP server ([`qmp`]) and QEMU's command line
//! ([`argv`]), so that libvirt can run smpft as its emulator. Neither knows anything of the VMM:
//! the server parses commands into typed [`qmp::Command`]s, hands them over a channel to whoever
//! owns the VM, and writes back the typed replies; the command line becomes a neutral
//! [`argv::Launch`] that smp-ft turns into a VM.

pub mod argv;
pub mod blockdev;
pub mod cpu;
pub mod platform;
pub mod probe;
pub mod qm;
pub mod qmp;
pub mod readconfig;
