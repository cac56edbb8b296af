//! The UART the guest sees: registers and receive FIFO (vm-superio's), its interrupt, its
//! output queue behind the output gate, and its saved state.

use super::spec::SerialError;
use crate::component::{self, Component, ComponentError};
use crate::devices::gate::{OutputGate, OutputPort};
use crate::irq::Irq;
use crate::layout::COM1_IRQ;
use parking_lot::{Condvar, Mutex};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Serial output not yet written to the host side.
pub struct OutputQueue {
    inner: Mutex<OutputInner>,
    cv: Condvar,
    /// The serial log: every byte released to the port, whether or not anyone reads it.
    log: Mutex<Option<std::fs::File>>,
}

struct OutputInner {
    bytes: Vec<u8>,
    closed: bool,
    dropped: u64,
}

/// Bytes beyond this (a reader that does not keep up) are dropped and counted.
const OUTPUT_MAX: usize = 4 << 20;

impl OutputQueue {
    fn new() -> Arc<Self> {
        Arc::new(OutputQueue {
            inner: Mutex::new(OutputInner { bytes: Vec::new(), closed: false, dropped: 0 }),
            cv: Condvar::new(),
            log: Mutex::new(None),
        })
    }

    /// From now on, every byte pushed is also written to `log`.
    pub fn set_log(&self, log: std::fs::File) {
        *self.log.lock() = Some(log);
    }

    pub fn push(&self, data: &[u8]) {
        let mut log = self.log.lock();
        if let Some(f) = log.as_mut() {
            if let Err(e) = std::io::Write::write_all(f, data) {
                tracing::error!("serial log: {e}; it is not written any more");
                *log = None;
            }
        }
        drop(log);
        let mut q = self.inner.lock();
        let room = OUTPUT_MAX.saturating_sub(q.bytes.len());
        if data.len() > room {
            q.dropped += (data.len() - room) as u64;
        }
        let was_empty = q.bytes.is_empty();
        q.bytes.extend_from_slice(&data[..data.len().min(room)]);
        if was_empty {
            self.cv.notify_one();
        }
    }

    /// Blocks until there is output (returned) or the queue is closed and drained (`None`).
    pub(super) fn take(&self) -> Option<Vec<u8>> {
        let mut q = self.inner.lock();
        while q.bytes.is_empty() && !q.closed {
            self.cv.wait(&mut q);
        }
        if q.bytes.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut q.bytes))
        }
    }

    pub(super) fn close(&self) {
        self.inner.lock().closed = true;
        self.cv.notify_all();
    }

    pub fn dropped(&self) -> u64 {
        self.inner.lock().dropped
    }
}

impl OutputPort for OutputQueue {
    fn deliver(&self, data: &[u8]) {
        self.push(data);
    }
}

/// The UART's transmit side: every byte passes the output gate on its way to the queue.
struct Sink {
    gate: Arc<OutputGate>,
    port: Arc<dyn OutputPort>,
}

impl Sink {
    fn new(gate: &Arc<OutputGate>, output: &Arc<OutputQueue>) -> Sink {
        Sink { gate: gate.clone(), port: output.clone() }
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.gate.emit(&self.port, buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Raises COM1's interrupt (an edge on IRQ 4), synchronously (see `vmm::irq`). `None` in
/// tests and fuzzing, where no VM takes interrupts.
#[derive(Clone)]
pub struct IrqTrigger(Option<Arc<Irq>>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        if let Some(irq) = &self.0 {
            irq.pulse(COM1_IRQ);
        }
        Ok(())
    }
}

/// Tells the input thread when the guest has made room in the receive FIFO.
struct InputRoom {
    event: EventFd,
    /// The input thread is waiting for room.
    waiting: AtomicBool,
}

impl SerialEvents for InputRoom {
    fn buffer_read(&self) {
        if self.waiting.swap(false, Ordering::SeqCst) {
            let _ = self.event.write(1);
        }
    }
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {}
}

type Uart = Serial<IrqTrigger, Arc<InputRoom>, Sink>;

/// The UART's registers and receive FIFO, as saved in a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SerialSnapshot {
    pub registers: [u8; 9],
    pub in_buffer: Vec<u8>,
}

impl SerialSnapshot {
    fn from_state(s: &SerialState) -> Self {
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer.clone(),
        }
    }

    fn to_state(&self) -> SerialState {
        let r = self.registers;
        SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: self.in_buffer.clone(),
        }
    }
}

pub struct SerialDevice {
    uart: Mutex<Uart>,
    irq: IrqTrigger,
    room: Arc<InputRoom>,
    output: Arc<OutputQueue>,
    gate: Arc<OutputGate>,
    received: AtomicU64,
    /// While the VM is paused no input enters the FIFO, so saved state is one instant.
    input_paused: AtomicBool,
}

impl SerialDevice {
    pub fn new(irq: Option<Arc<Irq>>, gate: Arc<OutputGate>) -> Result<Arc<Self>, SerialError> {
        let irq = IrqTrigger(irq);
        let room = Arc::new(InputRoom {
            event: EventFd::new(EFD_NONBLOCK).map_err(SerialError::Event)?,
            waiting: AtomicBool::new(false),
        });
        let output = OutputQueue::new();
        let trigger = irq.clone();
        let uart = Serial::with_events(trigger, room.clone(), Sink::new(&gate, &output));
        Ok(Arc::new(SerialDevice {
            uart: Mutex::new(uart),
            irq,
            room,
            output,
            gate,
            received: AtomicU64::new(0),
            input_paused: AtomicBool::new(false),
        }))
    }

    pub fn snapshot(&self) -> SerialSnapshot {
        SerialSnapshot::from_state(&self.uart.lock().state())
    }

    pub fn restore_snapshot(&self, snap: &SerialSnapshot) -> Result<(), SerialError> {
        let trigger = self.irq.clone();
        let uart =
            Serial::from_state(&snap.to_state(), trigger, self.room.clone(), Sink::new(&self.gate, &self.output))
                .map_err(|e| SerialError::State(format!("{e:?}")))?;
        *self.uart.lock() = uart;
        Ok(())
    }

    pub fn read(&self, offset: u8) -> u8 {
        self.uart.lock().read(offset)
    }

    pub fn write(&self, offset: u8, value: u8) {
        if let Err(e) = self.uart.lock().write(offset, value) {
            tracing::warn!("serial: {e:?}");
        }
    }

    /// Puts as much of `bytes` into the receive FIFO as fits; returns how much that was.
    /// When not all fit, [`Self::room_event`] fires once the guest has read.
    pub fn enqueue(&self, bytes: &[u8]) -> usize {
        let mut uart = self.uart.lock();
        let n = if uart.fifo_capacity() == 0 || self.input_paused.load(Ordering::SeqCst) {
            0
        } else {
            uart.enqueue_raw_bytes(bytes).unwrap_or(0)
        };
        if n < bytes.len() {
            self.room.waiting.store(true, Ordering::SeqCst);
        }
        self.received.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    pub fn room_event(&self) -> &EventFd {
        &self.room.event
    }

    pub fn output(&self) -> &Arc<OutputQueue> {
        &self.output
    }
}

/// COM1's registers and receive FIFO are replicated; while paused, no host input enters the FIFO,
/// so the saved state is one instant.
impl Component for SerialDevice {
    fn name(&self) -> &'static str {
        "serial"
    }

    fn pause(&self) {
        self.input_paused.store(true, Ordering::SeqCst);
    }

    /// Lets input flow again and wakes the input thread if it was held back.
    fn resume(&self) {
        // Under the UART lock, so an `enqueue` that saw "paused" has already asked for a wakeup.
        let _uart = self.uart.lock();
        self.input_paused.store(false, Ordering::SeqCst);
        if self.room.waiting.swap(false, Ordering::SeqCst) {
            let _ = self.room.event.write(1);
        }
    }

    fn save(&self) -> Result<Vec<u8>, ComponentError> {
        component::encode(self.name(), &self.snapshot())
    }

    fn restore(&self, version: u32, state: &[u8]) -> Result<(), ComponentError> {
        component::expect_version(self.name(), version, self.version())?;
        let snap: SerialSnapshot = component::decode(self.name(), state)?;
        self.restore_snapshot(&snap).map_err(|e| ComponentError::Failed { component: "serial", why: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_receives_exactly_what_the_gate_releases() {
        let gate = OutputGate::new();
        let dev = SerialDevice::new(None, gate.clone()).unwrap();
        let path = std::env::temp_dir().join(format!("smpft-serial-log-{}", std::process::id()));
        let log = super::super::SerialLog::File { path: path.clone(), append: false };
        dev.output().set_log(log.open().unwrap());
        let read = || std::fs::read(&path).unwrap();
        gate.hold();
        b"held".iter().for_each(|&b| dev.write(0, b));
        assert_eq!(read(), b"", "held output is not logged");
        let id = gate.seal().expect("a sealed batch");
        b" later".iter().for_each(|&b| dev.write(0, b));
        gate.release(&[id]);
        assert_eq!(read(), b"held", "released output is, and only that");
        gate.open_all();
        b"!".iter().for_each(|&b| dev.write(0, b));
        assert_eq!(read(), b"held later!");
        let again = super::super::SerialLog::File { path: path.clone(), append: true };
        dev.output().set_log(again.open().unwrap());
        let f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        let passed = super::super::SerialLog::Fd(std::os::fd::AsRawFd::as_raw_fd(&f));
        dev.output().set_log(passed.open().unwrap());
        drop(f);
        b"=".iter().for_each(|&b| dev.write(0, b));
        assert_eq!(read(), b"held later!=", "a passed descriptor is written through its duplicate");
        dev.output().set_log(again.open().unwrap());
        b"+".iter().for_each(|&b| dev.write(0, b));
        assert_eq!(read(), b"held later!=+", "an appending log keeps what was there");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn input_waits_for_room_and_nothing_is_lost() {
        let dev = SerialDevice::new(None, OutputGate::new()).unwrap();
        let data: Vec<u8> = (0..100u8).collect();
        let mut sent = dev.enqueue(&data);
        assert!(sent < data.len(), "a 16550 FIFO holds fewer than 100 bytes");
        let mut got = Vec::new();
        while got.len() < data.len() {
            // Guest side: read while data is ready (LSR bit 0).
            while dev.read(5) & 1 != 0 {
                got.push(dev.read(0));
            }
            assert_eq!(dev.room_event().read().unwrap(), 1, "a read after a full FIFO signals room");
            sent += dev.enqueue(&data[sent..]);
            if sent == data.len() {
                while dev.read(5) & 1 != 0 {
                    got.push(dev.read(0));
                }
            }
        }
        assert_eq!(got, data);
    }

    #[test]
    fn output_is_queued_in_order_and_bounded() {
        let dev = SerialDevice::new(None, OutputGate::new()).unwrap();
        for &b in b"hello\n" {
            dev.write(0, b);
        }
        assert_eq!(dev.output().take().unwrap(), b"hello\n");
        dev.output().push(&vec![0; OUTPUT_MAX + 10]);
        assert_eq!(dev.output().dropped(), 10);
    }
}
