//! virtio-console with multiport driven as Linux's virtio_console driver would: the control
//! handshake, a port's bytes both ways (output through the gate, input only while running and
//! the port is open), its state across save and restore, and drivers that break the rules.

use super::super::console::{control, event, rx_queue, Console, PortDef, PortLink, CTRL_RX, CTRL_TX, F_MULTIPORT};
use super::*;
use crate::devices::gate::OutputGate;
use parking_lot::Mutex;

const AGENT: &str = "org.qemu.guest_agent.0";
const QS: u16 = 16;

#[derive(Default)]
struct Link {
    connected: AtomicBool,
    got: Mutex<Vec<u8>>,
}

impl crate::devices::gate::OutputPort for Link {
    fn deliver(&self, data: &[u8]) {
        self.got.lock().extend_from_slice(data);
    }
}

impl PortLink for Link {
    fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }
}

struct Con {
    d: Driver<Console>,
    gate: Arc<OutputGate>,
    link: Arc<Link>,
    /// Per queue: next available index, next used index read.
    avail: [u16; 6],
    seen: [u16; 6],
}

fn base(q: usize) -> u64 {
    0x10000 + q as u64 * 0x4000
}

fn buf(q: usize, slot: u16) -> u64 {
    0x40000 + q as u64 * 0x8000 + u64::from(slot) * 0x800
}

fn device(ports: &[(u32, &str)], link: &Arc<Link>, gate: &Arc<OutputGate>) -> Console {
    let defs = ports.iter().map(|&(nr, name)| PortDef { nr, name: name.into() }).collect();
    let links = ports.iter().map(|_| link.clone() as Arc<dyn PortLink>).collect();
    Console::new("virtio-serial", defs, links, gate.clone()).unwrap()
}

impl Con {
    fn new() -> Con {
        let gate = OutputGate::new();
        let link = Arc::new(Link::default());
        let d = Driver::with("virtio-serial", device(&[(1, AGENT)], &link, &gate));
        let mut c = Con { d, gate, link, avail: [0; 6], seen: [0; 6] };
        c.init();
        c
    }

    fn init(&mut self) {
        let d = &self.d;
        d.w(0x14, 0, 1);
        d.w(0x14, 1 | 2, 1);
        d.w(0x00, 0, 4);
        assert_eq!(d.r(0x04, 4), F_MULTIPORT);
        assert_eq!(d.r(DEVICE_CFG + 4, 4), 2, "max_nr_ports: port 0 and port 1");
        assert_eq!(d.r(0x12, 2), 6, "queues: port 0, control, port 1");
        d.w(0x08, 0, 4);
        d.w(0x0c, F_MULTIPORT, 4);
        d.w(0x08, 1, 4);
        d.w(0x0c, 1, 4);
        d.w(0x14, 1 | 2 | 8, 1);
        for q in 0..6u64 {
            d.w(0x16, q, 2);
            d.w(0x18, u64::from(QS), 2);
            d.w(0x20, base(q as usize), 8);
            d.w(0x28, base(q as usize) + 0x1000, 8);
            d.w(0x30, base(q as usize) + 0x2000, 8);
            d.w(0x1c, 1, 2);
        }
        d.w(0x14, 1 | 2 | 4 | 8, 1);
        self.d.mem.fill(0x10000, 0x70000, 0).unwrap();
        self.avail = [0; 6];
        self.seen = [0; 6];
    }

    /// Offers one buffer of `len` bytes on queue `q` (holding `data` if the device reads it).
    fn offer(&mut self, q: usize, data: Option<&[u8]>, len: u32) {
        let addr = buf(q, self.avail[q] % QS);
        let flags = match data {
            Some(b) => {
                self.d.mem.write(addr, b).unwrap();
                0
            }
            None => WRITE,
        };
        self.offer_at(q, addr, len, flags);
    }

    fn offer_at(&mut self, q: usize, addr: u64, len: u32, flags: u16) {
        let slot = self.avail[q] % QS;
        let at = base(q) + 16 * u64::from(slot);
        self.d.mem.write(at, &addr.to_le_bytes()).unwrap();
        self.d.mem.write(at + 8, &len.to_le_bytes()).unwrap();
        self.d.mem.write(at + 12, &flags.to_le_bytes()).unwrap();
        self.d.mem.write(at + 14, &0u16.to_le_bytes()).unwrap();
        let ring = base(q) + 0x1000;
        self.d.mem.write(ring + 4 + 2 * u64::from(slot), &slot.to_le_bytes()).unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.d.mem.write(ring + 2, &self.avail[q].to_le_bytes()).unwrap();
        self.d.w(NOTIFY + 4 * q as u64, 0, 2);
    }

    /// What the device gave back on queue `q` since the last look: each buffer's bytes.
    fn take(&mut self, q: usize) -> Vec<Vec<u8>> {
        let used = base(q) + 0x2000;
        let mut b = [0u8; 2];
        self.d.mem.read(used + 2, &mut b).unwrap();
        let idx = u16::from_le_bytes(b);
        let mut out = Vec::new();
        while self.seen[q] != idx {
            let mut e = [0u8; 8];
            self.d.mem.read(used + 4 + 8 * u64::from(self.seen[q] % QS), &mut e).unwrap();
            let (id, len) =
                (u32::from_le_bytes(e[..4].try_into().unwrap()), u32::from_le_bytes(e[4..].try_into().unwrap()));
            let mut data = vec![0u8; len as usize];
            self.d.mem.read(buf(q, id as u16), &mut data).unwrap();
            out.push(data);
            self.seen[q] = self.seen[q].wrapping_add(1);
        }
        out
    }

    fn send_control(&mut self, id: u32, ev: u16, value: u16) {
        let m = control(id, ev, value, &[]);
        self.offer(CTRL_TX, Some(&m), m.len() as u32);
    }

    /// Gives the driver's control buffers, and takes what the device put in them.
    fn control_out(&mut self) -> Vec<Vec<u8>> {
        for _ in 0..4 {
            self.offer(CTRL_RX, None, 4096);
        }
        self.take(CTRL_RX)
    }

    fn broken(&self) -> bool {
        self.d.status() & NEEDS_RESET != 0
    }

    /// The handshake up to a ready port the guest has opened.
    fn open_port(&mut self) {
        self.send_control(0, event::DEVICE_READY, 1);
        assert_eq!(self.control_out(), vec![control(1, event::DEVICE_ADD, 1, &[])]);
        self.send_control(1, event::PORT_READY, 1);
        self.send_control(1, event::PORT_OPEN, 1);
    }
}

#[test]
fn console_handshake_names_the_port_and_tells_host_connections() {
    let mut c = Con::new();
    c.open_port();
    let mut out = c.take(CTRL_RX);
    out.extend(c.control_out());
    assert_eq!(out, vec![control(1, event::PORT_NAME, 1, AGENT.as_bytes())], "no client yet: not open");
    assert!(c.d.dev.device().guest_open(0));
    c.link.connected.store(true, Ordering::SeqCst);
    assert!(c.d.dev.device().host_changed(0));
    c.d.dev.process_queue(CTRL_RX);
    assert_eq!(c.take(CTRL_RX), vec![control(1, event::PORT_OPEN, 1, &[])]);
    assert!(!c.d.dev.device().host_changed(0), "told once");
    c.link.connected.store(false, Ordering::SeqCst);
    assert!(c.d.dev.device().host_changed(0));
    c.d.dev.process_queue(CTRL_RX);
    assert_eq!(c.take(CTRL_RX), vec![control(1, event::PORT_OPEN, 0, &[])]);
    assert!(!c.broken());
}

#[test]
fn console_output_passes_the_gate_and_input_waits_for_the_guest() {
    let mut c = Con::new();
    let rx = rx_queue(1);
    c.gate.hold();
    c.d.dev.device().push_input(0, b"{\"execute\":\"guest-ping\"}\n");
    c.offer(rx, None, 8);
    assert!(c.take(rx).is_empty(), "input waits until the guest opens the port");
    c.open_port();
    assert_eq!(c.take(rx), vec![b"{\"execut".to_vec()], "a buffer takes what fits, when the port opens");
    c.d.dev.device().pause();
    c.offer(rx, None, 64);
    assert!(c.take(rx).is_empty(), "nothing enters guest memory while paused");
    c.d.dev.device().resume();
    c.d.dev.process_queue(rx);
    assert_eq!(c.take(rx), vec![b"e\":\"guest-ping\"}\n".to_vec()]);
    c.offer(rx + 1, Some(b"{\"return\": {}}\n"), 15);
    assert_eq!(c.take(rx + 1).len(), 1, "a transmit buffer is completed at once");
    assert!(c.link.got.lock().is_empty(), "and its bytes are held while protected");
    let id = c.gate.seal().unwrap();
    c.gate.release(&[id]);
    assert_eq!(*c.link.got.lock(), b"{\"return\": {}}\n", "released with their checkpoint");
    c.offer(1, Some(b"port 0"), 6);
    c.gate.open_all();
    assert_eq!(c.link.got.lock().len(), 15, "port 0 (no virtconsole) carries nothing");
}

#[test]
fn console_state_survives_save_and_restore() {
    let mut c = Con::new();
    c.link.connected.store(true, Ordering::SeqCst);
    c.open_port();
    c.d.dev.device().push_input(0, b"pending");
    let saved = c.d.dev.save().unwrap();
    let (gate, link) = (OutputGate::new(), Arc::new(Link::default()));
    let copy = VirtioPci::new(
        "virtio-serial",
        device(&[(1, AGENT)], &link, &gate),
        0xe000_0000,
        c.d.mem.device_view().unwrap(),
        None,
    );
    copy.restore(1, &saved).unwrap();
    assert!(copy.device().guest_open(0), "the guest's open port");
    // This host has no client: the guest is told so, after what waited before.
    let mut c2 =
        Con { d: Driver { mem: c.d.mem.clone(), dev: copy, avail_idx: 0 }, gate, link, avail: c.avail, seen: c.seen };
    let out = c2.control_out();
    assert_eq!(out.last(), Some(&control(1, event::PORT_OPEN, 0, &[])), "{out:?}");
    assert_eq!(c2.d.dev.device().input_room(0), super::super::console::INPUT_MAX, "a gone client's input is dropped");
    let other = VirtioPci::new(
        "virtio-serial",
        device(&[(2, AGENT)], &c2.link, &c2.gate),
        0xe000_0000,
        c.d.mem.device_view().unwrap(),
        None,
    );
    assert!(other.restore(1, &saved).is_err(), "another device's ports are refused");
    assert!(other.restore(1, &saved[..saved.len() / 2]).is_err(), "a truncated state is refused");
}

#[test]
fn console_drivers_that_break_the_rules_get_needs_reset() {
    type BreakIt<'a> = &'a dyn Fn(&mut Con);
    let cases: [(&str, BreakIt); 6] = [
        ("a control message shorter than its header", &|c| c.offer(CTRL_TX, Some(&[0, 0, 0, 0]), 4)),
        ("a port that does not exist", &|c| c.send_control(7, event::PORT_READY, 1)),
        ("an event only a device sends", &|c| c.send_control(1, event::DEVICE_ADD, 1)),
        ("a control buffer too small for the port's name", &|c| {
            c.send_control(0, event::DEVICE_READY, 1);
            c.offer(CTRL_RX, None, 4096);
            c.send_control(1, event::PORT_READY, 1);
            c.offer(CTRL_RX, None, 8);
        }),
        ("a transmit buffer outside memory", &|c| c.offer_at(rx_queue(1) + 1, 1 << 40, 1, 0)),
        ("a device-readable receive buffer", &|c| {
            c.open_port();
            c.d.dev.device().push_input(0, b"in");
            c.offer(rx_queue(1), Some(b"ro"), 2);
        }),
    ];
    for (what, break_it) in cases {
        let mut c = Con::new();
        break_it(&mut c);
        assert!(c.broken(), "{what}");
        c.init();
        assert!(!c.broken(), "{what}: a reset clears it");
        c.send_control(0, event::DEVICE_READY, 1);
        assert_eq!(c.control_out(), vec![control(1, event::DEVICE_ADD, 1, &[])], "{what}: and the device works again");
    }
}
