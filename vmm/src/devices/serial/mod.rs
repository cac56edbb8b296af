//! COM1: a 16550 UART (vm-superio) and the host side it is wired to (`--serial`).
//!
//! - `spec`: what `--serial` names, and the errors.
//! - `uart`: the device the guest sees. Its output passes the output gate into an
//!   [`OutputQueue`] drained by its own thread, so a vCPU never blocks on a slow reader.
//! - `host`: the host side, claimed before the VM runs ([`SerialHost`]): a socket bound, a file
//!   open, a pseudo-terminal ([`Pty`]).
//! - `io`: the I/O threads ([`SerialBackend`]). Input is fed into the UART's 16-byte FIFO by a
//!   thread that stops reading from the host while the FIFO is full (no byte is dropped) and
//!   resumes when the guest reads.

mod host;
mod io;
mod spec;
mod uart;

pub use host::{Pty, SerialHost};
pub use io::{SerialBackend, DRAIN_GRACE};
pub use spec::{SerialError, SerialLog, SerialSpec};
pub use uart::{IrqTrigger, OutputQueue, SerialDevice, SerialSnapshot};
