//! virtio-console (device type 3) with VIRTIO_CONSOLE_F_MULTIPORT: QEMU's `virtio-serial-pci`
//! with `virtserialport`s, each a named byte stream between a guest program (the QEMU guest
//! agent, on `org.qemu.guest_agent.0`) and a host socket (virtio 1.2 §5.3).
//!
//! - **Queues**: 0/1 receive/transmit of port 0, 2/3 the control receive/transmit queues, then
//!   receive/transmit for ports 1, 2, ... up to the highest port number configured. Port 0 is
//!   QEMU's `virtconsole`, which smpft does not have: port numbers start at 1 and port 0's queues
//!   carry nothing (what the guest sends there is dropped).
//! - **Control** (§5.3.6.2): after the driver's DEVICE_READY the device announces each port
//!   (DEVICE_ADD); on the driver's PORT_READY it names the port (PORT_NAME) and says whether the
//!   host side is connected (PORT_OPEN); the driver's PORT_OPEN says whether a guest program has
//!   the port open. Messages to the driver wait in order for its control receive buffers.
//!   A message the driver must not send, for a port that does not exist, or shorter than its
//!   header, is a broken driver: the device needs a reset.
//! - **Guest to host**: what the guest transmits on a port is externally visible output: it
//!   passes the output gate as COM1's bytes do (held while the VM is protected until the
//!   checkpoint of its epoch is acknowledged), then goes to the port's host client, or nowhere
//!   if none is connected (QEMU drops it too). Held output is bounded by [`HOLD_MAX`]; beyond
//!   it bytes are dropped and counted.
//! - **Host to guest**: bytes from the host client are input: they wait in the device (at most
//!   [`INPUT_MAX`] per port; the host thread stops reading beyond that) until the guest has the
//!   port open and has given receive buffers, and enter guest memory only while the VM runs, so
//!   they reach the next checkpoint with the memory they were written to.
//! - **State**: whether the driver is ready, each port's readiness, guest-open and host-open
//!   state as the guest was told it, the input not yet delivered and the control messages not
//!   yet taken. The host connection itself is this host's: after a restore (a standby going
//!   live) the guest is told the connection state of the copy it now runs on.

use super::{serve_chains, serve_chains_upto, serve_chains_while, VirtioDevice, VirtioError};
use crate::devices::gate::{OutputGate, OutputPort};
use crate::memory::DeviceMemory;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const F_MULTIPORT: u64 = 1 << 1;
pub const CTRL_RX: usize = 2;
pub const CTRL_TX: usize = 3;
const QUEUE_SIZE: u16 = 128;
/// Input waiting for the guest, per port.
pub const INPUT_MAX: usize = 64 << 10;
/// Bytes of output (all devices) the gate may hold before a port's output is dropped.
pub const HOLD_MAX: u64 = 16 << 20;
/// The longest transmit chain (Linux sends at most 32 KiB at a time).
const TX_MAX: usize = 1 << 20;
/// Control messages waiting for the driver, at most (a driver that never takes them).
const CTRL_OUT_MAX: usize = 1024;
/// The most ports a device has, and the longest port name.
pub const MAX_PORTS: u32 = 31;
pub const NAME_MAX: usize = 255;

/// Control events (`struct virtio_console_control.event`).
pub mod event {
    pub const DEVICE_READY: u16 = 0;
    pub const DEVICE_ADD: u16 = 1;
    pub const DEVICE_REMOVE: u16 = 2;
    pub const PORT_READY: u16 = 3;
    pub const CONSOLE_PORT: u16 = 4;
    pub const RESIZE: u16 = 5;
    pub const PORT_OPEN: u16 = 6;
    pub const PORT_NAME: u16 = 7;
}

/// The receive queue of port `nr` (its transmit queue is the next).
pub fn rx_queue(nr: u32) -> usize {
    if nr == 0 {
        0
    } else {
        2 * nr as usize + 2
    }
}

/// A control message: id, event, value, then any data (a port's name).
pub fn control(id: u32, event: u16, value: u16, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + data.len());
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m.extend_from_slice(data);
    m
}

/// Where a port's released output goes: its host client, if one is connected.
pub trait PortLink: OutputPort {
    /// Whether a host client is connected now.
    fn connected(&self) -> bool;
}

/// A port with no host side (tests, and before the host side is started).
#[derive(Default)]
pub struct Unlinked;

impl OutputPort for Unlinked {
    fn deliver(&self, _data: &[u8]) {}
}

impl PortLink for Unlinked {
    fn connected(&self) -> bool {
        false
    }
}

/// A port as the VM defines it (both copies of a protected VM agree on these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortDef {
    pub nr: u32,
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct PortState {
    /// The driver answered PORT_READY 1.
    ready: bool,
    /// A guest program has the port open (the driver's PORT_OPEN).
    guest_open: bool,
    /// What the guest was last told of the host side (the device's PORT_OPEN).
    host_open: bool,
    /// Host input not yet in guest memory.
    input: Vec<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Saved {
    driver_ready: bool,
    ctrl_out: Vec<Vec<u8>>,
    /// (number, name, state) of each port.
    ports: Vec<(u32, String, PortState)>,
}

struct Inner {
    driver_ready: bool,
    ctrl_out: VecDeque<Vec<u8>>,
    ports: Vec<PortState>,
    paused: bool,
}

/// Counters, for logs.
#[derive(Debug, Default)]
pub struct ConsoleStats {
    /// Output dropped because the gate already held [`HOLD_MAX`] bytes.
    pub tx_dropped_held: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_bytes: AtomicU64,
}

/// (port index, open): a guest program opened or closed a port.
pub type PortEvent = (usize, bool);

pub struct Console {
    name: &'static str,
    defs: Vec<PortDef>,
    links: Vec<Arc<dyn PortLink>>,
    gate: Arc<OutputGate>,
    inner: Mutex<Inner>,
    stats: ConsoleStats,
    /// Tells the host threads that input can move (room was made, the pause ended, a port opened).
    kick: EventFd,
    /// Something changed that the host threads should look at (set with `kick`).
    changed: AtomicBool,
    /// (port, open): a guest program opened or closed a port (QMP's `VSERPORT_CHANGE`).
    opened: (crossbeam_channel::Sender<PortEvent>, crossbeam_channel::Receiver<PortEvent>),
}

impl Console {
    /// A device with `ports` (numbers 1 to [`MAX_PORTS`], distinct, names checked by the
    /// configuration) whose output goes through `gate` to `links` (one per port).
    pub fn new(
        name: &'static str,
        ports: Vec<PortDef>,
        links: Vec<Arc<dyn PortLink>>,
        gate: Arc<OutputGate>,
    ) -> std::io::Result<Console> {
        let n = ports.len();
        Ok(Console {
            name,
            defs: ports,
            links,
            gate,
            inner: Mutex::new(Inner {
                driver_ready: false,
                ctrl_out: VecDeque::new(),
                ports: vec![PortState::default(); n],
                paused: false,
            }),
            stats: ConsoleStats::default(),
            kick: EventFd::new(EFD_NONBLOCK)?,
            changed: AtomicBool::new(false),
            opened: crossbeam_channel::unbounded(),
        })
    }

    pub fn ports(&self) -> &[PortDef] {
        &self.defs
    }

    pub fn stats(&self) -> &ConsoleStats {
        &self.stats
    }

    pub fn kick_event(&self) -> &EventFd {
        &self.kick
    }

    /// Tells of every port a guest program opens or closes, as (port index, open); after a
    /// restore, of each port the guest has open (it is open on this host from then on).
    pub fn port_events(&self) -> &crossbeam_channel::Receiver<(usize, bool)> {
        &self.opened.1
    }

    fn max_nr_ports(&self) -> u32 {
        self.defs.iter().map(|p| p.nr + 1).max().unwrap_or(1)
    }

    fn port_of_queue(&self, index: usize) -> Option<usize> {
        if index < 4 {
            return None;
        }
        let nr = ((index - 2) / 2) as u32;
        self.defs.iter().position(|p| p.nr == nr)
    }

    fn port_of_id(&self, id: u32) -> Option<usize> {
        self.defs.iter().position(|p| p.nr == id)
    }

    fn signal(&self) {
        self.changed.store(true, Ordering::SeqCst);
        let _ = self.kick.write(1);
    }

    /// Whether a guest program has port `i` (in configuration order) open.
    pub fn guest_open(&self, i: usize) -> bool {
        self.inner.lock().ports.get(i).is_some_and(|p| p.guest_open)
    }

    /// Host input for port `i`: takes what fits (see [`INPUT_MAX`]) and returns how much.
    pub fn push_input(&self, i: usize, data: &[u8]) -> usize {
        let mut g = self.inner.lock();
        let Some(p) = g.ports.get_mut(i) else { return 0 };
        let n = data.len().min(INPUT_MAX.saturating_sub(p.input.len()));
        p.input.extend_from_slice(&data[..n]);
        n
    }

    /// Room for more input on port `i`.
    pub fn input_room(&self, i: usize) -> usize {
        self.inner.lock().ports.get(i).map_or(0, |p| INPUT_MAX.saturating_sub(p.input.len()))
    }

    /// The host side of port `i` connected or went away (the host threads call this; after a
    /// restore, with the state of this host). The guest is told if its driver has the port.
    /// Returns whether a control message now waits for the driver.
    pub fn host_changed(&self, i: usize) -> bool {
        let connected = self.links.get(i).is_some_and(|l| l.connected());
        let mut g = self.inner.lock();
        let Some(p) = g.ports.get_mut(i) else { return false };
        if !p.ready || p.host_open == connected {
            return false;
        }
        p.host_open = connected;
        let nr = self.defs[i].nr;
        if !connected {
            // Input from a client that is gone is not given to the next one's guest program.
            p.input.clear();
        }
        g.ctrl_out.push_back(control(nr, event::PORT_OPEN, u16::from(connected), &[]));
        true
    }

    /// Whether anything waits to enter guest memory that the host threads should deliver.
    pub fn deliverable(&self) -> Vec<usize> {
        let g = self.inner.lock();
        if g.paused {
            return Vec::new();
        }
        let mut v = Vec::new();
        if !g.ctrl_out.is_empty() {
            v.push(CTRL_RX);
        }
        for (p, d) in g.ports.iter().zip(&self.defs) {
            if p.guest_open && !p.input.is_empty() {
                v.push(rx_queue(d.nr));
            }
        }
        v
    }

    /// Clears the "changed" flag; true if it was set.
    pub fn take_changed(&self) -> bool {
        self.changed.swap(false, Ordering::SeqCst)
    }

    fn fill_ctrl(&self, queue: &mut Queue, mem: &DeviceMemory) -> Result<bool, VirtioError> {
        let mut g = self.inner.lock();
        if g.paused {
            return Ok(false);
        }
        let waiting = g.ctrl_out.len();
        serve_chains_upto(queue, mem, waiting, |chain| {
            let head = chain.head_index();
            let bad = |why: String| VirtioError::Buffer { head, why };
            let mut w = chain.writer(&**mem).map_err(|e| bad(e.to_string()))?;
            let msg = g.ctrl_out.front().cloned().unwrap_or_default();
            if w.available_bytes() < msg.len() {
                return Err(bad(format!(
                    "a control buffer of {} bytes cannot hold a message of {}",
                    w.available_bytes(),
                    msg.len()
                )));
            }
            w.write_all(&msg).map_err(|e| bad(e.to_string()))?;
            g.ctrl_out.pop_front();
            Ok(msg.len() as u32)
        })
    }

    fn fill_port(&self, i: usize, queue: &mut Queue, mem: &DeviceMemory) -> Result<bool, VirtioError> {
        let mut g = self.inner.lock();
        if g.paused || !g.ports[i].guest_open || g.ports[i].input.is_empty() {
            return Ok(false);
        }
        let before = g.ports[i].input.len();
        let more = std::cell::Cell::new(true);
        let used = serve_chains_while(
            queue,
            mem,
            || more.get(),
            |chain| {
                let head = chain.head_index();
                let bad = |why: String| VirtioError::Buffer { head, why };
                let mut w = chain.writer(&**mem).map_err(|e| bad(e.to_string()))?;
                if w.available_bytes() == 0 {
                    return Err(bad("a receive buffer the device cannot write".into()));
                }
                let input = &mut g.ports[i].input;
                let n = w.available_bytes().min(input.len());
                w.write_all(&input[..n]).map_err(|e| bad(e.to_string()))?;
                input.drain(..n);
                more.set(!input.is_empty());
                Ok(n as u32)
            },
        )?;
        let after = g.ports[i].input.len();
        drop(g);
        self.stats.rx_bytes.fetch_add((before - after) as u64, Ordering::Relaxed);
        if after < before {
            self.signal();
        }
        Ok(used)
    }

    fn send_port(&self, index: usize, queue: &mut Queue, mem: &DeviceMemory) -> Result<bool, VirtioError> {
        let port = self.port_of_queue(index);
        serve_chains(queue, mem, |chain| {
            let head = chain.head_index();
            let bad = |why: String| VirtioError::Buffer { head, why };
            let mut r = chain.reader(&**mem).map_err(|e| bad(e.to_string()))?;
            let len = r.available_bytes();
            if len > TX_MAX {
                return Err(bad(format!("a transmit buffer of {len} bytes exceeds {TX_MAX}")));
            }
            let mut buf = vec![0u8; len];
            r.read_exact(&mut buf).map_err(|e| bad(e.to_string()))?;
            let Some(i) = port else { return Ok(0) };
            if self.gate.held_bytes() >= HOLD_MAX {
                self.stats.tx_dropped_held.fetch_add(len as u64, Ordering::Relaxed);
                return Ok(0);
            }
            self.stats.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
            let link: Arc<dyn OutputPort> = self.links[i].clone();
            self.gate.emit(&link, &buf);
            Ok(0)
        })
    }

    fn control_in(&self, queue: &mut Queue, mem: &DeviceMemory) -> Result<bool, VirtioError> {
        serve_chains(queue, mem, |chain| {
            let head = chain.head_index();
            let bad = |why: String| VirtioError::Buffer { head, why };
            let mut r = chain.reader(&**mem).map_err(|e| bad(e.to_string()))?;
            let mut m = [0u8; 8];
            if r.available_bytes() < m.len() {
                return Err(bad(format!(
                    "a control message of {} bytes is shorter than its header",
                    r.available_bytes()
                )));
            }
            r.read_exact(&mut m).map_err(|e| bad(e.to_string()))?;
            let id = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
            let (ev, value) = (u16::from_le_bytes([m[4], m[5]]), u16::from_le_bytes([m[6], m[7]]));
            self.control_message(id, ev, value).map_err(bad)?;
            Ok(0)
        })
    }

    /// One message from the driver.
    fn control_message(&self, id: u32, ev: u16, value: u16) -> Result<(), String> {
        let port = self.port_of_id(id);
        // A link's lock is never taken under the device's (the host thread takes them the other
        // way round).
        let connected = port.is_some_and(|i| self.links[i].connected());
        let mut g = self.inner.lock();
        if ev == event::DEVICE_READY {
            if value != 1 {
                tracing::warn!("{}: the guest driver could not set the device up", self.name);
                return Ok(());
            }
            if !g.driver_ready {
                g.driver_ready = true;
                for d in &self.defs {
                    g.ctrl_out.push_back(control(d.nr, event::DEVICE_ADD, 1, &[]));
                }
            }
            return Ok(());
        }
        let i = port.ok_or_else(|| format!("control event {ev} for port {id}, which does not exist"))?;
        match ev {
            event::PORT_READY if value == 1 => {
                let def = &self.defs[i];
                let mut msgs = Vec::new();
                if !def.name.is_empty() {
                    msgs.push(control(def.nr, event::PORT_NAME, 1, def.name.as_bytes()));
                }
                if connected {
                    msgs.push(control(def.nr, event::PORT_OPEN, 1, &[]));
                }
                let p = &mut g.ports[i];
                p.ready = true;
                p.host_open = connected;
                g.ctrl_out.extend(msgs);
            }
            event::PORT_READY => {
                tracing::warn!("{}: the guest driver could not add port {id} ({})", self.name, self.defs[i].name);
                g.ports[i].ready = false;
            }
            event::PORT_OPEN => {
                let open = value != 0;
                let p = &mut g.ports[i];
                if p.guest_open != open {
                    let _ = self.opened.0.send((i, open));
                    tracing::info!(
                        "{}: port {} ({}) {} by the guest",
                        self.name,
                        id,
                        self.defs[i].name,
                        if open { "opened" } else { "closed" }
                    );
                }
                p.guest_open = open;
                drop(g);
                self.signal();
                return Ok(());
            }
            other => return Err(format!("control event {other} is not one a driver sends")),
        }
        if g.ctrl_out.len() > CTRL_OUT_MAX {
            return Err(format!("more than {CTRL_OUT_MAX} control messages wait for the driver"));
        }
        Ok(())
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u16 {
        boot_abi::VIRTIO_TYPE_CONSOLE
    }

    fn features(&self) -> u64 {
        F_MULTIPORT
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2 * self.max_nr_ports() as usize + 2]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows (no F_SIZE), max_nr_ports, emerg_wr (no F_EMERG_WRITE).
        let mut cfg = [0u8; 12];
        cfg[4..8].copy_from_slice(&self.max_nr_ports().to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn process(&self, index: usize, queue: &mut Queue, mem: &DeviceMemory) -> Result<bool, VirtioError> {
        match index {
            CTRL_RX => self.fill_ctrl(queue, mem),
            CTRL_TX => self.control_in(queue, mem),
            0 => Ok(false),
            i if i % 2 == 1 => self.send_port(i, queue, mem),
            i => match self.port_of_queue(i) {
                Some(p) => self.fill_port(p, queue, mem),
                None => Ok(false),
            },
        }
    }

    fn then_serve(&self, index: usize) -> Vec<usize> {
        if index == CTRL_TX {
            self.deliverable()
        } else {
            Vec::new()
        }
    }

    fn reset(&self) {
        let mut g = self.inner.lock();
        g.driver_ready = false;
        g.ctrl_out.clear();
        for p in &mut g.ports {
            *p = PortState::default();
        }
    }

    fn pause(&self) {
        // Taking the lock waits for a delivery in progress: nothing enters guest memory after.
        self.inner.lock().paused = true;
    }

    fn resume(&self) {
        self.inner.lock().paused = false;
        self.signal();
    }

    fn save(&self) -> Vec<u8> {
        let g = self.inner.lock();
        let saved = Saved {
            driver_ready: g.driver_ready,
            ctrl_out: g.ctrl_out.iter().cloned().collect(),
            ports: self.defs.iter().zip(&g.ports).map(|(d, p)| (d.nr, d.name.clone(), p.clone())).collect(),
        };
        drop(g);
        crate::component::encode(self.name, &saved).unwrap_or_else(|e| {
            tracing::error!("{e}");
            Vec::new()
        })
    }

    fn restore(&self, state: &[u8]) -> Result<(), String> {
        let s: Saved = crate::component::decode(self.name, state).map_err(|e| e.to_string())?;
        let ours: Vec<(u32, &str)> = self.defs.iter().map(|d| (d.nr, d.name.as_str())).collect();
        let theirs: Vec<(u32, &str)> = s.ports.iter().map(|(n, name, _)| (*n, name.as_str())).collect();
        if ours != theirs {
            return Err(format!("{}: the saved ports {theirs:?} are not this device's {ours:?}", self.name));
        }
        if s.ctrl_out.len() > CTRL_OUT_MAX || s.ports.iter().any(|(_, _, p)| p.input.len() > INPUT_MAX) {
            return Err(format!("{}: the saved state holds more than a device can", self.name));
        }
        {
            let mut g = self.inner.lock();
            g.driver_ready = s.driver_ready;
            g.ctrl_out = s.ctrl_out.into();
            g.ports = s.ports.into_iter().map(|(_, _, p)| p).collect();
        }
        // The guest learns the connection state of the host it now runs on, and whoever
        // watches this host's ports that the guest has them open.
        for i in 0..self.defs.len() {
            self.host_changed(i);
            if self.guest_open(i) {
                let _ = self.opened.0.send((i, true));
            }
        }
        self.signal();
        Ok(())
    }
}
