//! A guest driver for the virtio device targets: guest memory whose rings, descriptor tables
//! and buffers are the input, and a device set up through its PCI BAR as a driver does.
//!
//! The input fills memory from 0x1000 (at most 0xb000 bytes): queue `q`'s available ring at
//! `0x1000 + q * 0x40` (the rings first, so that short inputs reach them), its descriptors at
//! `0x1200 + q * 0x100`, then anything descriptors may point at; the used rings are at
//! `0xc000 + q * 0x400`, above the input. Queues have at most 16 entries; at most 8 queues.

use smp_ft::vmm::memory::GuestMemory;
use smp_ft::vmm::pci::PciDevice;
use smp_ft::vmm::virtio::{VirtioDevice, VirtioPci};
use std::sync::Arc;

pub const MEM: u64 = 64 << 10;

/// `device` driven with `queues` queues of `1 << (size_sel % 5)` entries, device features
/// `features` accepted, memory filled with `input`.
pub fn start<D: VirtioDevice>(
    name: &'static str,
    device: D,
    queues: u64,
    size_sel: u8,
    features: u32,
    input: &[u8],
) -> (Arc<GuestMemory>, Arc<VirtioPci<D>>) {
    let mem = Arc::new(GuestMemory::new(MEM).expect("guest memory"));
    start_with_memory(name, mem, device, queues, size_sel, features, input)
}

/// As [`start`], in `mem` (of [`MEM`] bytes), which the device may hold too (the balloon).
pub fn start_with_memory<D: VirtioDevice>(
    name: &'static str,
    mem: Arc<GuestMemory>,
    device: D,
    queues: u64,
    size_sel: u8,
    features: u32,
    input: &[u8],
) -> (Arc<GuestMemory>, Arc<VirtioPci<D>>) {
    assert!(queues <= 8, "the layout has room for 8 queues");
    let dev = VirtioPci::new(name, device, 0xe000_0000, mem.device_view().expect("view"), None);
    let w = |off: u64, v: u64, len: usize| dev.bar_write(0, off, &v.to_le_bytes()[..len]);
    w(0x14, 3, 1);
    w(0x08, 0, 4);
    w(0x0c, u64::from(features), 4);
    w(0x08, 1, 4);
    w(0x0c, 1, 4);
    w(0x14, 11, 1);
    for q in 0..queues {
        w(0x16, q, 2);
        w(0x18, 1 << (size_sel % 5), 2);
        w(0x20, 0x1200 + q * 0x100, 8);
        w(0x28, 0x1000 + q * 0x40, 8);
        w(0x30, 0xc000 + q * 0x400, 8);
        w(0x1c, 1, 2);
    }
    w(0x14, 15, 1);
    let n = input.len().min(0xb000);
    mem.write(0x1000, &input[..n]).expect("in range");
    (mem, dev)
}

/// The driver notifies queue `q`.
pub fn notify<D: VirtioDevice>(dev: &VirtioPci<D>, q: u64) {
    dev.bar_write(0, 0x3000 + 4 * q, &0u16.to_le_bytes());
}

/// Descriptor flags.
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;

/// Memory from 0x1000 laid out as a driver that makes valid requests would (for the targets
/// that start from such requests and flip bits in them).
pub struct Template(pub Vec<u8>);

impl Template {
    pub fn new() -> Template {
        Template(Vec::new())
    }

    /// `bytes` at guest address `addr` (at least 0x1000).
    pub fn put(&mut self, addr: u64, bytes: &[u8]) {
        let at = (addr - 0x1000) as usize;
        if self.0.len() < at + bytes.len() {
            self.0.resize(at + bytes.len(), 0);
        }
        self.0[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// Descriptor `i` of queue `q`.
    pub fn desc(&mut self, q: u64, i: u16, (addr, len): (u64, u32), flags: u16, next: u16) {
        let d = [&addr.to_le_bytes()[..], &len.to_le_bytes(), &flags.to_le_bytes(), &next.to_le_bytes()].concat();
        self.put(0x1200 + q * 0x100 + 16 * u64::from(i), &d);
    }

    /// Queue `q`'s available ring: the chains at `heads`.
    pub fn avail(&mut self, q: u64, heads: &[u16]) {
        let mut ring = [0u16.to_le_bytes(), (heads.len() as u16).to_le_bytes()].concat();
        ring.extend(heads.iter().flat_map(|h| h.to_le_bytes()));
        self.put(0x1000 + q * 0x40, &ring);
    }
}
