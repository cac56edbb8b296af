//! virtio-net driven as a guest driver would, with a SOCK_SEQPACKET pair standing in for the
//! tap: frames held by the output gate until released, received frames in guest buffers and
//! never during a pause, bad buffers refused, the MAC and learned addresses carried in state.

use super::super::net::{Net, HDR_LEN, RX, RX_QUEUE_MAX};
use super::*;
use crate::devices::gate::OutputGate;
use crate::net::announce::gratuitous_arp;
use crate::net::tap::Tap;
use crate::net::Mac;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const DESC1: u64 = 0x5000;
const AVAIL1: u64 = 0x6000;
const USED1: u64 = 0x7000;
const MAC: Mac = Mac([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);

struct NetDriver {
    d: Driver<Net>,
    gate: Arc<OutputGate>,
    /// The far end of the "tap".
    wire: OwnedFd,
    tx_idx: u16,
}

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) };
    assert_eq!(r, 0);
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl NetDriver {
    fn new() -> NetDriver {
        let (tap, wire) = seqpacket_pair();
        let gate = OutputGate::new();
        let net = Net::new("net0", Arc::new(Tap::from_fd(tap, "test0")), MAC, gate.clone()).unwrap();
        let d = Driver::with("net0", net);
        d.w(0x14, 0, 1);
        d.w(0x14, 1 | 2, 1);
        d.w(0x00, 0, 4);
        assert_eq!(d.r(0x04, 4), super::super::net::F_MAC | super::super::net::F_STATUS);
        d.w(0x08, 0, 4);
        d.w(0x0c, super::super::net::F_MAC, 4);
        d.w(0x08, 1, 4);
        d.w(0x0c, 1, 4);
        d.w(0x14, 1 | 2 | 8, 1);
        d.setup_queue(0, SIZE, (DESC, AVAIL, USED));
        d.setup_queue(1, SIZE, (DESC1, AVAIL1, USED1));
        d.w(0x14, 1 | 2 | 4 | 8, 1);
        NetDriver { d, gate, wire, tx_idx: 0 }
    }

    /// Offers a receive buffer of `len` bytes at `addr` as descriptor `i`.
    fn rx_buffer(&mut self, i: u16, addr: u64, len: u32) {
        self.d.desc(i, addr, len, WRITE, 0);
        self.d.offer(i);
    }

    /// Transmits `frame` (header first) from buffer `addr` through descriptor `i`.
    fn transmit(&mut self, i: u16, addr: u64, frame: &[u8]) {
        let mut b = vec![0u8; HDR_LEN];
        b.extend_from_slice(frame);
        self.d.mem.write(addr, &b).unwrap();
        self.tx_desc(i, addr, b.len() as u32, 0, 0);
        self.tx_offer(i);
    }

    fn tx_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC1 + 16 * u64::from(i);
        self.d.mem.write(at, &addr.to_le_bytes()).unwrap();
        self.d.mem.write(at + 8, &len.to_le_bytes()).unwrap();
        self.d.mem.write(at + 12, &flags.to_le_bytes()).unwrap();
        self.d.mem.write(at + 14, &next.to_le_bytes()).unwrap();
    }

    fn tx_offer(&mut self, head: u16) {
        let slot = AVAIL1 + 4 + 2 * u64::from(self.tx_idx % SIZE);
        self.d.mem.write(slot, &head.to_le_bytes()).unwrap();
        self.tx_idx = self.tx_idx.wrapping_add(1);
        self.d.mem.write(AVAIL1 + 2, &self.tx_idx.to_le_bytes()).unwrap();
        self.d.w(NOTIFY + 4, 0, 2);
    }

    fn tx_used(&self) -> u16 {
        let mut b = [0u8; 2];
        self.d.mem.read(USED1 + 2, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    /// Frames that reached the wire so far.
    fn wire_frames(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let mut b = [0u8; 2048];
            // SAFETY: recv writes at most b.len() bytes into b.
            let n = unsafe { libc::recv(self.wire.as_raw_fd(), b.as_mut_ptr().cast(), b.len(), libc::MSG_DONTWAIT) };
            if n <= 0 {
                return out;
            }
            out.push(b[..n as usize].to_vec());
        }
    }
}

fn frame(n: u8, len: usize) -> Vec<u8> {
    let mut f = vec![n; len];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&MAC.0);
    f
}

#[test]
fn transmitted_frames_complete_at_once_and_leave_only_when_released() {
    let mut n = NetDriver::new();
    n.transmit(0, BUF, &frame(1, 60));
    assert_eq!(n.tx_used(), 1);
    assert_eq!(n.wire_frames(), vec![frame(1, 60)], "unprotected: straight out");
    n.gate.hold();
    let arp = gratuitous_arp(MAC, Ipv4Addr::new(192, 0, 2, 2));
    n.transmit(1, BUF, &arp);
    n.transmit(2, BUF + 0x1000, &frame(2, 1514));
    assert_eq!(n.tx_used(), 3, "the guest's ring never waits for the standby");
    assert!(n.wire_frames().is_empty(), "held while protected");
    let id = n.gate.seal().unwrap();
    n.transmit(3, BUF, &frame(3, 100));
    n.gate.release(&[id]);
    assert_eq!(n.wire_frames(), vec![arp, frame(2, 1514)], "released in order, frame by frame");
    n.gate.open_all();
    assert_eq!(n.wire_frames(), vec![frame(3, 100)]);
    assert_eq!(n.d.dev.device().learned(), vec![Ipv4Addr::new(192, 0, 2, 2)], "its own ARP taught its address");
}

#[test]
fn received_frames_fill_guest_buffers_but_never_during_a_pause() {
    let mut n = NetDriver::new();
    n.rx_buffer(0, BUF, 2048);
    n.d.dev.device().receive(frame(7, 64));
    n.d.dev.process_queue(RX);
    assert_eq!(n.d.used(), (1, vec![(0, (HDR_LEN + 64) as u32)]));
    let mut got = vec![0u8; HDR_LEN + 64];
    n.d.mem.read(BUF, &mut got).unwrap();
    assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers");
    assert_eq!(&got[HDR_LEN..], &frame(7, 64)[..]);
    n.rx_buffer(1, BUF + 0x1000, 2048);
    Component::pause(&*n.d.dev);
    n.d.dev.device().receive(frame(8, 64));
    n.d.dev.process_queue(RX);
    assert_eq!(n.d.used().0, 1, "nothing enters guest memory while paused");
    Component::resume(&*n.d.dev);
    assert!(n.d.dev.device().kick_event().read().is_ok(), "the receive thread is told to deliver");
    n.d.dev.process_queue(RX);
    assert_eq!(n.d.used().0, 2, "delivered once resumed");
}

#[test]
fn small_buffers_a_full_queue_and_bad_transmits_are_refused_without_harm() {
    let mut n = NetDriver::new();
    n.rx_buffer(0, BUF, 100);
    n.d.dev.device().receive(frame(1, 200));
    n.d.dev.process_queue(RX);
    assert_eq!(n.d.used(), (1, vec![(0, 0)]), "a frame that does not fit is dropped, not cut");
    for _ in 0..RX_QUEUE_MAX + 5 {
        n.d.dev.device().receive(frame(2, 60));
    }
    let s = n.d.dev.device().stats();
    assert_eq!(s.rx_dropped.load(std::sync::atomic::Ordering::Relaxed), 6, "1 too big + 5 over the queue");
    n.transmit(0, BUF, &frame(3, 4000));
    assert_eq!(n.d.status() & NEEDS_RESET, NEEDS_RESET, "an oversized frame breaks the device");
    assert!(n.wire_frames().is_empty());
    let mut n = NetDriver::new();
    n.tx_desc(0, BUF, 60, NEXT, 1);
    n.tx_desc(1, BUF, 60, NEXT, 0);
    n.tx_offer(0);
    assert_eq!(n.d.status() & NEEDS_RESET, NEEDS_RESET, "a looped chain breaks the device");
    let mut n = NetDriver::new();
    n.tx_desc(0, 1 << 40, 60, 0, 0);
    n.tx_offer(0);
    assert_eq!(n.d.status() & NEEDS_RESET, NEEDS_RESET, "a buffer outside memory breaks the device");
}

#[test]
fn the_mac_and_learned_addresses_travel_in_state() {
    let mut n = NetDriver::new();
    n.transmit(0, BUF, &gratuitous_arp(MAC, Ipv4Addr::new(192, 0, 2, 9)));
    let saved = n.d.dev.save().unwrap();
    let (tap, _wire) = seqpacket_pair();
    let other = Net::new("net0", Arc::new(Tap::from_fd(tap, "t1")), Mac::random(), OutputGate::new()).unwrap();
    let copy = VirtioPci::new("net0", other, 0xe000_0000, n.d.mem.device_view().unwrap(), None);
    copy.restore(1, &saved).unwrap();
    assert_eq!(copy.device().mac(), MAC, "a standby keeps the guest's MAC");
    assert_eq!(copy.device().learned(), vec![Ipv4Addr::new(192, 0, 2, 9)]);
    let mut cfg = [0u8; 8];
    copy.bar_read(0, DEVICE_CFG, &mut cfg);
    assert_eq!(&cfg[..6], &MAC.0);
    assert_eq!(&cfg[6..], &1u16.to_le_bytes(), "link up");
    assert!(copy.device().restore(&saved[..5]).is_err(), "a truncated state is refused");
}
