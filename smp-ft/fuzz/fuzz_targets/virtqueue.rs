//! A guest driver may put anything in its descriptor table and available ring: the device must
//! answer with used entries or DEVICE_NEEDS_RESET, never a panic, a hang or a write outside
//! guest memory. The input becomes the available ring and the descriptor table of virtio-rng's
//! queue (and the queue size), the ring first so that short inputs reach it; the device is then
//! notified a few times.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smp_ft::vmm::memory::GuestMemory;
use smp_ft::vmm::pci::PciDevice;
use smp_ft::vmm::virtio::rng::Rng;
use smp_ft::vmm::virtio::VirtioPci;
use std::sync::Arc;

const MEM: u64 = 64 << 10;
const AVAIL: u64 = 0x1000;
const DESC: u64 = 0x1400;
const USED: u64 = 0x2400;

fuzz_target!(|data: &[u8]| {
    let Some((&size_sel, rest)) = data.split_first() else { return };
    let mem = Arc::new(GuestMemory::new(MEM).expect("guest memory"));
    let dev = VirtioPci::new("virtio-rng", Rng, 0xe000_0000, mem.device_view().expect("view"), None);
    let w = |off: u64, v: u64, len: usize| dev.bar_write(0, off, &v.to_le_bytes()[..len]);
    w(0x14, 3, 1);
    w(0x08, 1, 4);
    w(0x0c, 1, 4);
    w(0x14, 11, 1);
    w(0x16, 0, 2);
    w(0x18, 1 << (size_sel % 9), 2);
    w(0x20, DESC, 8);
    w(0x28, AVAIL, 8);
    w(0x30, USED, 8);
    w(0x1c, 1, 2);
    w(0x14, 15, 1);
    let n = rest.len().min((USED - AVAIL) as usize);
    mem.write(AVAIL, &rest[..n]).expect("in range");
    for _ in 0..3 {
        w(0x3000, 0, 2);
    }
});
