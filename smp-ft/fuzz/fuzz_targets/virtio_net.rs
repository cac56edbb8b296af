//! A guest driver may put anything in virtio-net's receive and transmit queues: chains of any
//! shape, frames of any length and content (ARP the device learns addresses from included),
//! while the host delivers frames of its own. The device answers with used entries or marks
//! itself DEVICE_NEEDS_RESET, never panics, hangs or touches guest memory outside the
//! buffers. Beyond that:
//! - output commit: while the VM is protected no frame reaches the tap before the checkpoint
//!   it belongs to is acknowledged; then every frame the device counted as sent does, whole,
//!   in order, each an Ethernet frame (14 to 1522 bytes), never two merged;
//! - received frames enter guest buffers or are counted as dropped, never more than arrived;
//! - at most 8 learned addresses are kept, and the device's state saves and restores to the
//!   same state.
//!
//! The input: a flags byte (bit 0: protected; bits 1-2: how many frames the host receives;
//! bit 7: the rest are bit flips on memory holding two receive buffers and two frames to
//! send, one an ARP announcement), the queue size selector, two bytes of received frame
//! length, then guest memory (see `guest.rs`), whose first bytes are also the received
//! frames' contents.
#![no_main]

#[path = "common.rs"]
#[allow(dead_code)]
mod common;
#[path = "guest.rs"]
mod guest;

use libfuzzer_sys::fuzz_target;
use smp_ft::vmm::component::Component;
use smp_ft::vmm::devices::gate::OutputGate;
use smp_ft::vmm::net::tap::{Tap, FRAME_MAX};
use smp_ft::vmm::net::Mac;
use smp_ft::vmm::virtio::net::{Net, F_MAC, RX, TX};
use smp_ft::vmm::virtio::VirtioPci;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

const MAC: Mac = Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

/// Memory with two receive buffers, and two frames to send: an ARP request from the guest's
/// MAC (header and frame in two descriptors) and a frame in one.
fn valid() -> &'static [u8] {
    static V: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        let mut t = guest::Template::new();
        t.desc(RX as u64, 0, (0x3000, 1600), guest::WRITE, 0);
        t.desc(RX as u64, 1, (0x3800, 1600), guest::WRITE, 0);
        t.avail(RX as u64, &[0, 1]);
        let arp = [
            &[0xff; 6][..],
            &MAC.0,
            &[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1],
            &MAC.0,
            &[10, 0, 0, 5],
            &[0; 6],
            &[10, 0, 0, 1],
        ]
        .concat();
        t.put(0x2010, &arp);
        t.put(0x2100 + 12, &[&[0x33; 12][..], &[0x86, 0xdd], &[0x60; 46]].concat());
        t.desc(TX as u64, 0, (0x2000, 12), guest::NEXT, 1);
        t.desc(TX as u64, 1, (0x2010, arp.len() as u32), 0, 0);
        t.desc(TX as u64, 2, (0x2100, 12 + 60), 0, 0);
        t.avail(TX as u64, &[0, 2]);
        t.0
    })
}

/// Every frame waiting at the far end of the tap.
fn drain(wire: &OwnedFd) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::recv(wire.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            return frames;
        }
        frames.push(buf[..n as usize].to_vec());
    }
}

/// The device, on one end of a SOCK_SEQPACKET pair (which keeps frames apart, as a tap does);
/// the other end is returned.
fn net(gate: &Arc<OutputGate>) -> (Net, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) };
    assert_eq!(r, 0, "socketpair");
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (tap, wire) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let net = Net::new("net0", Arc::new(Tap::from_fd(tap, "fuzz0")), MAC, gate.clone()).expect("eventfd");
    (net, wire)
}

fuzz_target!(|data: &[u8]| {
    let [flags, size_sel, len_hi, len_lo, rest @ ..] = data else { return };
    let protected = flags & 1 != 0;
    let gate = OutputGate::new();
    if protected {
        gate.hold();
    }
    let (device, wire) = net(&gate);
    let memory = match flags & 0x80 {
        0 => rest.to_vec(),
        _ => common::flipped(valid(), 0, rest),
    };
    let (mem, dev) = guest::start("virtio-net", device, 2, *size_sel, F_MAC as u32, &memory);
    let received = u64::from(flags >> 1 & 3);
    let len = usize::from(u16::from_be_bytes([*len_hi, *len_lo])) % 1600;
    for i in 0..received {
        let frame: Vec<u8> = rest.iter().copied().cycle().skip(i as usize).take(len).collect();
        dev.device().receive(frame);
    }
    for _ in 0..3 {
        guest::notify(&dev, TX as u64);
        guest::notify(&dev, RX as u64);
        dev.process_queue(RX);
    }
    let stats = dev.device().stats();
    let mut frames = drain(&wire);
    if protected {
        assert!(frames.is_empty(), "{} frames left before their checkpoint was acknowledged", frames.len());
        if let Some(id) = gate.seal() {
            gate.release(&[id]);
        }
        frames = drain(&wire);
    }
    let sent = stats.tx_frames.load(Ordering::Relaxed);
    assert_eq!(frames.len() as u64, sent, "frames counted as sent and frames at the tap");
    assert!(frames.iter().all(|f| (14..=FRAME_MAX).contains(&f.len())), "a frame that is not one");
    let entered = stats.rx_frames.load(Ordering::Relaxed) + stats.rx_dropped.load(Ordering::Relaxed);
    assert!(entered <= received, "{entered} frames received of {received}");
    assert!(dev.device().learned().len() <= 8);
    let saved = dev.save().expect("state saves");
    let (device, _wire) = net(&OutputGate::new());
    let copy = VirtioPci::new("virtio-net", device, 0xe000_0000, mem.device_view().expect("view"), None);
    copy.restore(dev.version(), &saved).expect("state restores");
    assert_eq!(copy.save().expect("state saves"), saved, "a restored state saves differently");
});
