//! The face smpft shows to QEMU tooling: a QMP server ([`qmp`]). The server knows nothing of the
//! VMM: it parses commands into typed [`qmp::Command`]s, hands them over a channel to whoever owns
//! the VM, and writes back the typed replies; it broadcasts the events it is given.

pub mod qmp;
