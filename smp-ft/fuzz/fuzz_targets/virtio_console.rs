//! A guest driver may send anything on virtio-serial's control queue and give any buffers: the
//! device must answer with used entries or DEVICE_NEEDS_RESET, never a panic, a hang or a write
//! outside guest memory, and its state must still save and restore. The input becomes the
//! rings, descriptor tables and buffers of the control queues and of a port's queues (see
//! `guest.rs`; the first byte picks the queue size, the second how host events interleave),
//! then every queue is notified a few times while a host client comes and goes and sends
//! input.
#![no_main]

#[path = "guest.rs"]
#[allow(dead_code)]
mod guest;

use libfuzzer_sys::fuzz_target;
use smp_ft::vmm::component::Component;
use smp_ft::vmm::devices::gate::{OutputGate, OutputPort};
use smp_ft::vmm::virtio::console::{Console, PortDef, PortLink, CTRL_RX, CTRL_TX};
use smp_ft::vmm::virtio::VirtioPci;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The control queues and a port's queues (see `guest.rs` for their rings).
const QUEUES: u64 = 6;

#[derive(Default)]
struct Link(AtomicBool);

impl OutputPort for Link {
    fn deliver(&self, _data: &[u8]) {}
}

impl PortLink for Link {
    fn connected(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

fn device(link: &Arc<Link>) -> Console {
    let ports = vec![PortDef { nr: 1, name: "org.qemu.guest_agent.0".into() }, PortDef { nr: 2, name: String::new() }];
    let links: Vec<Arc<dyn PortLink>> = vec![link.clone(), link.clone()];
    Console::new("virtio-serial", ports, links, OutputGate::new()).expect("eventfd")
}

fuzz_target!(|data: &[u8]| {
    let [size_sel, events, rest @ ..] = data else { return };
    let link = Arc::new(Link::default());
    // VIRTIO_CONSOLE_F_MULTIPORT (bit 1) accepted.
    let (mem, dev) = guest::start("virtio-serial", device(&link), QUEUES, *size_sel, 2, rest);
    let console = dev.device();
    for round in 0..4u8 {
        for q in [CTRL_TX, CTRL_RX, 4, 5, 6, 7, 0, 1] {
            guest::notify(&dev, q as u64);
        }
        if events >> round & 1 != 0 {
            link.0.store(!link.0.load(Ordering::SeqCst), Ordering::SeqCst);
            console.host_changed(0);
            console.push_input(0, &rest[..rest.len().min(64)]);
            for q in console.deliverable() {
                dev.process_queue(q);
            }
        }
    }
    let saved = dev.save().expect("state saves");
    let copy = VirtioPci::new("virtio-serial", device(&link), 0xe000_0000, mem.device_view().expect("view"), None);
    copy.restore(1, &saved).expect("state restores");
});
