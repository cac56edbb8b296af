//! The platform's devices and the port/MMIO dispatch for vCPU exits.
//!
//! | port            | device                                                     |
//! |-----------------|------------------------------------------------------------|
//! | 0x3f8..=0x3ff   | COM1, a 16550 UART (`serial.rs`)                           |
//! | 0xe9            | debug console: the guest's log, one byte per write          |
//! | 0xf4            | exit: a 32-bit write ends the VM with that status          |
//! | 0xf5            | idle: a 32-bit write yields the host CPU for up to N µs    |

pub mod gate;
pub mod serial;

use super::component::Component;
use super::layout::{COM1_BASE, DEBUGCON_PORT, EXIT_PORT, IDLE_PORT};
use parking_lot::Mutex;
use serial::SerialDevice;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What a port write asks of the vCPU loop.
#[derive(Debug, PartialEq, Eq)]
pub enum PioAction {
    None,
    /// The guest is done, with this exit status.
    Exit(u32),
    /// Nothing to do for up to this many microseconds.
    Idle(u32),
}

/// The longest a guest may idle in one call, so a stuck guest stays responsive to the VMM.
const IDLE_MAX_US: u32 = 1_000_000;

/// Where the guest's debug-console lines go.
pub enum Console {
    Stderr,
    File(std::fs::File),
    Discard,
}

struct DebugCon {
    line: Vec<u8>,
    out: Console,
}

impl DebugCon {
    fn byte(&mut self, b: u8) {
        if b != b'\n' && self.line.len() < 4096 {
            self.line.push(b);
            return;
        }
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        match &mut self.out {
            Console::Stderr => {
                let _ = writeln!(std::io::stderr().lock(), "[guest] {line}");
            }
            Console::File(f) => {
                let _ = writeln!(f, "{line}");
            }
            Console::Discard => {}
        }
        tracing::debug!(target: "guest", "{line}");
    }
}

pub struct Devices {
    pub serial: Arc<SerialDevice>,
    /// Where all externally visible output passes (held while the VM is protected).
    pub gate: Arc<gate::OutputGate>,
    /// Every device with replicated state, in pause order (see [`crate::vmm::component`]).
    components: Vec<Arc<dyn Component>>,
    debugcon: Mutex<DebugCon>,
    unhandled: AtomicU64,
}

impl Devices {
    pub fn new(serial: Arc<SerialDevice>, gate: Arc<gate::OutputGate>, console: Console) -> Self {
        // The registration list: one line per device with replicated state.
        let components: Vec<Arc<dyn Component>> = vec![serial.clone()];
        Devices {
            serial,
            gate,
            components,
            debugcon: Mutex::new(DebugCon { line: Vec::new(), out: console }),
            unhandled: AtomicU64::new(0),
        }
    }

    /// The VM's components, in pause order.
    pub fn components(&self) -> &[Arc<dyn Component>] {
        &self.components
    }

    fn note_unhandled(&self, what: &str, addr: u64) {
        // A guest can hit this in a loop: log the first few, then every 10,000th.
        let n = self.unhandled.fetch_add(1, Ordering::Relaxed);
        if n < 8 || n % 10_000 == 0 {
            tracing::warn!("guest accessed unhandled {what} {addr:#x} ({} such accesses so far)", n + 1);
        }
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1_BASE..=0x3ff if data.len() == 1 => data[0] = self.serial.read((port - COM1_BASE) as u8),
            _ => {
                self.note_unhandled("port read", port.into());
                data.fill(0xff);
            }
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioAction {
        let word = || {
            let mut b = [0u8; 4];
            let n = data.len().min(4);
            b[..n].copy_from_slice(&data[..n]);
            u32::from_le_bytes(b)
        };
        match port {
            COM1_BASE..=0x3ff if data.len() == 1 => self.serial.write((port - COM1_BASE) as u8, data[0]),
            DEBUGCON_PORT => {
                let mut con = self.debugcon.lock();
                for &b in data {
                    con.byte(b);
                }
            }
            EXIT_PORT => return PioAction::Exit(word()),
            IDLE_PORT => return PioAction::Idle(word().min(IDLE_MAX_US)),
            _ => self.note_unhandled("port write", port.into()),
        }
        PioAction::None
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.note_unhandled("MMIO read", addr);
        data.fill(0xff);
    }

    pub fn mmio_write(&self, addr: u64, _data: &[u8]) {
        self.note_unhandled("MMIO write", addr);
    }
}
