//! `agent`: vCPU 0 drives a virtio-console device with VIRTIO_CONSOLE_F_MULTIPORT (virtio 1.2
//! section 5.3), finds the port named `org.qemu.guest_agent.0` and answers the QEMU guest agent's
//! basic commands there, as qemu-ga does:
//!
//! | request                                   | reply                                          |
//! |-------------------------------------------|------------------------------------------------|
//! | `guest-sync-delimited` `{"id": N}`        | the byte 0xFF, then `{"return": N}`            |
//! | `guest-sync` `{"id": N}`                  | `{"return": N}`                                |
//! | `guest-ping`                              | `{"return": {}}`                               |
//! | `guest-info`                              | version and supported commands                 |
//! | `guest-shutdown` `{"mode": M}`            | none: powerdown or halt ends the guest as the power button does, reboot writes 0x06 to the reset register (port 0xcf9) |
//! | anything else                             | `{"error": {"class": "CommandNotFound", ...}}` |
//!
//! Requests are JSON objects, one after another (a 0xFF byte from the client throws away what
//! was received so far, as qemu-ga's parser does); the JSON handling is only what these commands
//! need: a request's `execute`, and `id` or `mode` among its arguments.

use crate::abi::{EXIT_DEVICE_FAILED, EXIT_NO_DEVICE};
use crate::service::Poll;
use crate::sync::Locked;
use crate::virtio::{self, Buf, Device, Queue};
use crate::{dma, io, log};

const AGENT: &[u8] = b"org.qemu.guest_agent.0";
const F_MULTIPORT: u64 = 1 << 1;
const CTRL_RX: u16 = 2;
const CTRL_TX: u16 = 3;
const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;
const QUEUE_SIZE: u16 = 8;
const BUF: u32 = 512;
const RX_BUFS: u16 = 4;
/// A request longer than this is dropped whole.
const REQUEST_MAX: usize = 4096;
const REPLY_MAX: usize = 1024;
const TIMEOUT_MS: u64 = 5_000;
/// The reset control register: 0x06 asks for a hard reset.
const RESET_PORT: u16 = 0xcf9;
const VERSION: &str = "smpft-guest 1.0";
const COMMANDS: [&str; 5] = ["guest-sync-delimited", "guest-sync", "guest-ping", "guest-info", "guest-shutdown"];

struct Agent {
    device: Device,
    ctrl_rx: Queue,
    ctrl_tx: Queue,
    /// The agent's port: its number and queues, once the device has named it.
    port: Option<(u32, Queue, Queue)>,
    /// Each queue's buffers: control receive, control transmit, port receive, port transmit.
    bufs: [u64; 4],
    /// Which receive buffer each chain head of the control and port receive queues is.
    heads: [[u64; QUEUE_SIZE as usize]; 2],
    max_ports: u32,
    request: [u8; REQUEST_MAX],
    len: usize,
    /// JSON scanning state of the request being received: brace depth, in a string, after `\`.
    depth: u32,
    in_string: bool,
    escaped: bool,
    overflow: bool,
    answered: u64,
}

static AGENT_STATE: Locked<Option<Agent>> = Locked::new(None);

/// Finds and starts the device (by vCPU 0); on failure, the exit status to report.
pub fn init(tsc_khz: u64) -> Result<(), u32> {
    let Some(pci) = Device::find(crate::abi::VIRTIO_TYPE_CONSOLE) else {
        log!("agent: no virtio-console device on bus 0");
        return Err(EXIT_NO_DEVICE);
    };
    let failed = |e: virtio::Error| {
        log!("agent: {pci}: {e}");
        EXIT_DEVICE_FAILED
    };
    let device = Device::new(pci, tsc_khz).map_err(failed)?;
    if device.negotiate(F_MULTIPORT).map_err(failed)? & F_MULTIPORT == 0 {
        log!("agent: the device does not offer multiple ports");
        return Err(EXIT_DEVICE_FAILED);
    }
    let max_ports = device.read_config(|c| c.read32(4)).unwrap_or(1);
    let ctrl_rx = device.setup_queue(CTRL_RX, QUEUE_SIZE).map_err(failed)?;
    let ctrl_tx = device.setup_queue(CTRL_TX, QUEUE_SIZE).map_err(failed)?;
    let mut bufs = [0u64; 4];
    for b in &mut bufs {
        *b = dma::alloc(u64::from(BUF) * u64::from(RX_BUFS) * 2, 4096)
            .ok_or_else(|| failed(virtio::Error::OutOfMemory))?;
    }
    let mut a = Agent {
        device,
        ctrl_rx,
        ctrl_tx,
        port: None,
        bufs,
        heads: [[0; QUEUE_SIZE as usize]; 2],
        max_ports,
        request: [0; REQUEST_MAX],
        len: 0,
        depth: 0,
        in_string: false,
        escaped: false,
        overflow: false,
        answered: 0,
    };
    // The port queues are set up before DRIVER_OK; the agent's is chosen once it is named.
    let mut ports = [None, None, None, None];
    for (nr, p) in ports.iter_mut().enumerate().skip(1) {
        if (nr as u32) < max_ports {
            let rx = a.device.setup_queue(2 * nr as u16 + 2, QUEUE_SIZE).map_err(failed)?;
            let tx = a.device.setup_queue(2 * nr as u16 + 3, QUEUE_SIZE).map_err(failed)?;
            *p = Some((rx, tx));
        }
    }
    a.device.driver_ok();
    for i in 0..RX_BUFS {
        a.give(0, a.bufs[0] + u64::from(i) * u64::from(BUF));
    }
    a.control(0, DEVICE_READY, 1);
    log!("agent: {}; up to {} ports", a.device, a.max_ports);
    AGENT_STATE.with(|s| *s = Some(a));
    PORT_QUEUES.with(|q| *q = ports);
    Ok(())
}

/// The port queues set up at start, by port number (1 to 3), until the agent's is chosen.
static PORT_QUEUES: Locked<[Option<(Queue, Queue)>; 4]> = Locked::new([None, None, None, None]);

/// Takes control messages and requests, answers them.
pub fn poll() -> Poll {
    AGENT_STATE.with(|a| a.as_mut().map_or(Poll::Idle, Agent::poll))
}

/// Requests answered so far.
pub fn answered() -> u64 {
    AGENT_STATE.with(|a| a.as_ref().map_or(0, |a| a.answered))
}

fn check(r: Result<(), virtio::Error>) {
    if let Err(e) = r {
        crate::fail(format_args!("agent: {e}"));
    }
}

impl Agent {
    fn control(&mut self, id: u32, event: u16, value: u16) {
        let mut m = [0u8; 8];
        m[..4].copy_from_slice(&id.to_le_bytes());
        m[4..6].copy_from_slice(&event.to_le_bytes());
        m[6..].copy_from_slice(&value.to_le_bytes());
        // SAFETY: the control transmit buffer is this driver's and no message is in flight.
        unsafe { core::ptr::copy_nonoverlapping(m.as_ptr(), self.bufs[1] as *mut u8, m.len()) };
        let buf = Buf { addr: self.bufs[1], len: 8, write: false };
        check(self.ctrl_tx.submit(&[buf]).map(|_| ()));
        self.ctrl_tx.notify();
        check(self.ctrl_tx.poll_used(&self.device, TIMEOUT_MS).map(|_| ()));
    }

    fn poll(&mut self) -> Poll {
        let mut state = Poll::Idle;
        while let Some(u) = self.ctrl_rx.try_used().unwrap_or_else(|e| crate::fail(format_args!("agent: {e}"))) {
            state = Poll::Busy;
            let addr = self.heads[0][usize::from(u.head) % QUEUE_SIZE as usize];
            // SAFETY: the device returned this buffer and no longer writes it.
            let m = unsafe { core::slice::from_raw_parts(addr as *const u8, u.len.min(BUF) as usize) };
            let mut msg = [0u8; 8 + 255];
            let n = m.len().min(msg.len());
            msg[..n].copy_from_slice(&m[..n]);
            self.give(0, addr);
            self.on_control(&msg[..n]);
        }
        if let Some(Poll::Exit) = self.take_requests() {
            return Poll::Exit;
        }
        if self.port.as_ref().is_some_and(|_| self.len > 0) {
            state = Poll::Busy;
        }
        state
    }

    fn on_control(&mut self, m: &[u8]) {
        if m.len() < 8 {
            crate::fail(format_args!("agent: a control message of {} bytes", m.len()));
        }
        let id = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
        let (event, value) = (u16::from_le_bytes([m[4], m[5]]), u16::from_le_bytes([m[6], m[7]]));
        match event {
            DEVICE_ADD => self.control(id, PORT_READY, 1),
            PORT_NAME if &m[8..] == AGENT && self.port.is_none() => {
                let Some((rx, tx)) = PORT_QUEUES.with(|q| q.get_mut(id as usize).and_then(Option::take)) else {
                    crate::fail(format_args!("agent: port {id} has no queues set up"));
                };
                self.port = Some((id, rx, tx));
                self.post_rx();
                self.control(id, PORT_OPEN, 1);
                log!("agent: serving {} on port {id}", core::str::from_utf8(AGENT).unwrap_or(""));
            }
            PORT_OPEN => log!("agent: the host side of port {id} is {}", if value != 0 { "connected" } else { "gone" }),
            _ => {}
        }
    }

    fn post_rx(&mut self) {
        for i in 0..RX_BUFS {
            self.give(1, self.bufs[2] + u64::from(i) * u64::from(BUF));
        }
    }

    /// Gives the device a receive buffer at `addr`: on the control queue (0) or the port's (1).
    fn give(&mut self, which: usize, addr: u64) {
        let q = match which {
            0 => &mut self.ctrl_rx,
            _ => match self.port.as_mut() {
                Some((_, rx, _)) => rx,
                None => return,
            },
        };
        let head = q
            .submit(&[Buf { addr, len: BUF, write: true }])
            .unwrap_or_else(|e| crate::fail(format_args!("agent: {e}")));
        q.notify();
        self.heads[which][usize::from(head) % QUEUE_SIZE as usize] = addr;
    }

    /// Takes what the port received and answers every complete request.
    fn take_requests(&mut self) -> Option<Poll> {
        loop {
            let (_, rx, _) = self.port.as_mut()?;
            let u = rx.try_used().unwrap_or_else(|e| crate::fail(format_args!("agent: {e}")))?;
            let addr = self.heads[1][usize::from(u.head) % QUEUE_SIZE as usize];
            let mut data = [0u8; BUF as usize];
            let n = (u.len as usize).min(data.len());
            // SAFETY: the device returned this buffer and no longer writes it.
            data[..n].copy_from_slice(unsafe { core::slice::from_raw_parts(addr as *const u8, n) });
            self.give(1, addr);
            for &b in &data[..n] {
                if self.push(b) && self.answer() {
                    return Some(Poll::Exit);
                }
            }
        }
    }

    /// Adds a byte of the request; true once a whole JSON object is in.
    fn push(&mut self, b: u8) -> bool {
        if b == 0xff {
            self.reset_request();
            return false;
        }
        if self.depth == 0 && b != b'{' {
            return false; // whitespace between requests
        }
        if self.len < REQUEST_MAX {
            self.request[self.len] = b;
            self.len += 1;
        } else {
            self.overflow = true;
        }
        match b {
            _ if self.escaped => self.escaped = false,
            b'\\' if self.in_string => self.escaped = true,
            b'"' => self.in_string = !self.in_string,
            b'{' if !self.in_string => self.depth += 1,
            b'}' if !self.in_string => {
                self.depth -= 1;
                return self.depth == 0;
            }
            _ => {}
        }
        false
    }

    fn reset_request(&mut self) {
        (self.len, self.depth, self.in_string, self.escaped, self.overflow) = (0, 0, false, false, false);
    }

    /// Answers the request received; true if the guest is to power off.
    fn answer(&mut self) -> bool {
        let mut req = [0u8; REQUEST_MAX];
        let n = self.len;
        req[..n].copy_from_slice(&self.request[..n]);
        let overflow = self.overflow;
        self.reset_request();
        let req = &req[..n];
        let mut out = Reply::new();
        use core::fmt::Write as _;
        let command = if overflow { None } else { string_after(req, b"\"execute\"") };
        let _ = match command {
            None => {
                write!(out, "{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"a request without execute\"}}}}")
            }
            Some(b"guest-sync-delimited") | Some(b"guest-sync") => {
                if command == Some(b"guest-sync-delimited") {
                    out.byte(0xff);
                }
                match number_after(req, b"\"id\"") {
                    Some(id) => write!(out, "{{\"return\": {id}}}"),
                    None => write!(out, "{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"no id\"}}}}"),
                }
            }
            Some(b"guest-ping") => write!(out, "{{\"return\": {{}}}}"),
            Some(b"guest-info") => {
                let _ = write!(out, "{{\"return\": {{\"version\": \"{VERSION}\", \"supported_commands\": [");
                for (i, c) in COMMANDS.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    let _ = write!(
                        out,
                        "{sep}{{\"enabled\": true, \"name\": \"{c}\", \"success-response\": {}}}",
                        *c != "guest-shutdown"
                    );
                }
                write!(out, "]}}}}")
            }
            Some(b"guest-shutdown") => {
                let mode = string_after(req, b"\"mode\"").unwrap_or(b"powerdown");
                log!("agent: guest-shutdown, mode {}", core::str::from_utf8(mode).unwrap_or("?"));
                self.answered += 1;
                if mode == b"reboot" {
                    io::outb(RESET_PORT, 0x06);
                    return false;
                }
                return true;
            }
            Some(other) => write!(
                out,
                "{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"The command {} has not been found\"}}}}",
                core::str::from_utf8(other).unwrap_or("?")
            ),
        };
        out.byte(b'\n');
        self.send(out.bytes());
        self.answered += 1;
        false
    }

    fn send(&mut self, data: &[u8]) {
        let Some((_, _, tx)) = self.port.as_mut() else { return };
        // SAFETY: the port's transmit buffer is this driver's and nothing is in flight.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), self.bufs[3] as *mut u8, data.len()) };
        check(tx.submit(&[Buf { addr: self.bufs[3], len: data.len() as u32, write: false }]).map(|_| ()));
        tx.notify();
        check(tx.poll_used(&self.device, TIMEOUT_MS).map(|_| ()));
    }
}

/// A reply being written.
struct Reply {
    buf: [u8; REPLY_MAX],
    len: usize,
}

impl Reply {
    fn new() -> Reply {
        Reply { buf: [0; REPLY_MAX], len: 0 }
    }

    fn byte(&mut self, b: u8) {
        if self.len < REPLY_MAX {
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl core::fmt::Write for Reply {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        s.bytes().for_each(|b| self.byte(b));
        Ok(())
    }
}

/// What follows `key` and a colon, whitespace skipped.
fn value_after<'a>(req: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let at = req.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = req[at..].trim_ascii_start().strip_prefix(b":")?;
    Some(rest.trim_ascii_start())
}

/// The string value of `key` (without escapes).
fn string_after<'a>(req: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let v = value_after(req, key)?.strip_prefix(b"\"")?;
    Some(&v[..v.iter().position(|&b| b == b'"' || b == b'\\')?])
}

/// The unsigned integer value of `key`.
fn number_after(req: &[u8], key: &[u8]) -> Option<u64> {
    let v = value_after(req, key)?;
    let end = v.iter().position(|b| !b.is_ascii_digit()).unwrap_or(v.len());
    crate::params::number(&v[..end])
}
