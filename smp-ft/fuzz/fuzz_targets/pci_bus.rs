//! A guest may do anything with the PCI bus's configuration mechanism (ports 0xCF8-0xCFF) and
//! with the memory BARs it finds: select any bus, device, function and register, write any
//! value of any width (BAR sizing probes, BARs moved anywhere, command bits, capabilities,
//! MSI-X's table and enable bits), read anywhere. The bus and its functions never panic; beyond
//! that:
//! - each function's identity (vendor, device, subsystem, revision, class) stays what it was;
//! - a memory access is routed to a function only if it falls inside one of its BARs as the
//!   guest programmed them, and within the BAR's size;
//! - a BAR's address is aligned to its size.
//!
//! The input is a list of operations: a kind byte, then its operands (see [`op`]).
#![no_main]

use libfuzzer_sys::fuzz_target;
use smp_ft::vmm::memory::GuestMemory;
use smp_ft::vmm::pci::{PciBus, PciDevice};
use smp_ft::vmm::virtio::balloon::{Balloon, BalloonSpec};
use smp_ft::vmm::virtio::VirtioPci;
use std::sync::Arc;

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

fn take<const N: usize>(input: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = input.split_first_chunk::<N>()?;
    *input = rest;
    Some(*head)
}

/// Identity fields of every function, as the guest reads them.
fn identities(bus: &PciBus) -> Vec<(u8, u16, u16, u16, u16, u8, [u8; 3])> {
    bus.functions()
        .iter()
        .map(|f| (f.slot, f.vendor, f.device, f.subsystem_vendor, f.subsystem, f.revision, f.class))
        .collect()
}

/// One operation; false when the input ran out.
fn op(bus: &PciBus, input: &mut &[u8]) -> bool {
    let Some([kind, width]) = take::<2>(input) else { return false };
    let len = 1usize << (width % 3);
    let Some(v) = take::<8>(input) else { return false };
    let v = u64::from_le_bytes(v);
    match kind % 5 {
        // Select a register: enable bit set most of the time, slot and register from the input.
        0 => {
            let address = (v as u32 & 0x00ff_fffc) | if width & 0x80 == 0 { 0x8000_0000 } else { 0 };
            bus.pio_write(CONFIG_ADDRESS, &address.to_le_bytes());
        }
        1 => {
            bus.pio_write(CONFIG_DATA + (width >> 3) as u16 % 4, &v.to_le_bytes()[..len]);
        }
        2 => {
            let mut data = vec![0u8; len];
            bus.pio_read(CONFIG_DATA + (width >> 3) as u16 % 4, &mut data);
        }
        // Memory at a BAR the guest programmed (plus an offset that may fall outside it).
        kind => {
            let bars: Vec<(u64, u64)> =
                bus.functions().iter().flat_map(|f| f.bars.iter().map(|b| (b.1, b.2))).collect();
            let addr = match bars.get((width >> 3) as usize % bars.len().max(1)) {
                Some((base, _)) => base.wrapping_add(v >> 40),
                None => v,
            };
            let routed = if kind == 3 {
                bus.mmio_write(addr, &v.to_le_bytes()[..len])
            } else {
                let mut data = vec![0u8; len];
                bus.mmio_read(addr, &mut data)
            };
            if routed {
                let inside = bars.iter().any(|&(base, size)| addr >= base && addr + len as u64 <= base + size);
                assert!(inside, "an access at {addr:#x} ({len} bytes) routed outside every BAR: {bars:x?}");
            }
        }
    }
    true
}

fuzz_target!(|data: &[u8]| {
    let mem = Arc::new(GuestMemory::new(64 << 10).expect("guest memory"));
    let mut bus = PciBus::new();
    let balloon = Balloon::new(BalloonSpec::default(), mem.clone());
    let dev = VirtioPci::new("virtio-balloon", balloon, 0xe000_0000, mem.device_view().expect("view"), None);
    bus.add(dev as Arc<dyn PciDevice>, &[]).expect("a free slot");
    let before = identities(&bus);
    let mut input = data;
    while op(&bus, &mut input) {
        assert_eq!(identities(&bus), before, "a function's identity changed");
    }
    for f in bus.functions() {
        for &(index, addr, size) in &f.bars {
            assert!(
                size.is_power_of_two() && addr % size == 0,
                "BAR {index} of slot {}: {addr:#x} size {size:#x}",
                f.slot
            );
        }
    }
});
