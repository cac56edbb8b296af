//! The PCI bus: a host bridge and the devices on bus 0.
//!
//! Configuration space is reached through mechanism #1 (write the address to port 0xCF8, then
//! access 0xCFC-0xCFF), which the ring-3 test guest can use as well as Linux. Memory BARs are
//! assigned at build time inside [`PCI_MMIO_BASE`]..+[`PCI_MMIO_SIZE`] (below the LAPIC and
//! IOAPIC), as firmware would; a driver may move them within that window. Interrupts are MSI-X
//! (`msix.rs`), delivered synchronously (`vmm::irq`).
//!
//! The bus is a component: a vCPU may be stopped between writing 0xCF8 and using 0xCFC, so the
//! address latch is part of the machine state. Each device saves its own configuration space.

pub mod config;
pub mod msix;

use super::component::{self, Component, ComponentError};
use config::{ConfigSpace, Ids};
use parking_lot::Mutex;
use std::sync::Arc;

pub use boot_abi::{
    PCI_CONFIG_ADDRESS as CONFIG_ADDRESS, PCI_CONFIG_DATA as CONFIG_DATA, PCI_MMIO_BASE, PCI_MMIO_SIZE,
};
pub const SLOTS: usize = 32;

/// A function on the bus (function 0 of its slot).
pub trait PciDevice: Send + Sync {
    fn config_read(&self, offset: usize, data: &mut [u8]);
    fn config_write(&self, offset: usize, data: &[u8]);
    /// The BAR and offset that decode `len` bytes at `addr`, if this function's do.
    fn decode(&self, addr: u64, len: usize) -> Option<(usize, u64)>;
    fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&self, bar: usize, offset: u64, data: &[u8]);
    /// The name the VMM gives the function (its saved state's), if it has one.
    fn name(&self) -> Option<&'static str> {
        None
    }
    /// Its memory BARs.
    fn bars(&self) -> Vec<config::Bar> {
        Vec::new()
    }
}

/// A function on the bus as the guest sees it now (what `query-pci` reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunction {
    pub slot: u8,
    /// The VMM's name for it (`disk0`, `net0`, `virtio-balloon`, `host-bridge`, ...).
    pub name: Option<&'static str>,
    pub vendor: u16,
    pub device: u16,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
    pub revision: u8,
    /// Class, subclass, programming interface.
    pub class: [u8; 3],
    /// The interrupt pin (1 = INTA; 0: none) and line the driver wrote.
    pub irq_pin: u8,
    pub irq_line: u8,
    /// Each memory BAR: its index, the address programmed in it, and its size.
    pub bars: Vec<(usize, u64, u64)>,
}

/// The host bridge at 00:00.0: identification only.
struct HostBridge(Mutex<ConfigSpace>);

impl PciDevice for HostBridge {
    fn config_read(&self, offset: usize, data: &mut [u8]) {
        self.0.lock().read(offset, data);
    }
    fn config_write(&self, offset: usize, data: &[u8]) {
        self.0.lock().write(offset, data);
    }
    fn decode(&self, _: u64, _: usize) -> Option<(usize, u64)> {
        None
    }
    fn bar_read(&self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&self, _: usize, _: u64, _: &[u8]) {}
    fn name(&self) -> Option<&'static str> {
        Some("host-bridge")
    }
}

pub struct PciBus {
    address: Mutex<u32>,
    slots: Vec<Option<Arc<dyn PciDevice>>>,
    /// Next free address in the BAR window.
    next_bar: u64,
}

impl Default for PciBus {
    fn default() -> Self {
        PciBus::new()
    }
}

impl PciBus {
    pub fn new() -> PciBus {
        let bridge = ConfigSpace::new(Ids {
            vendor: 0x8086,
            device: 0x0d57,
            revision: 0,
            class: [0x06, 0x00, 0x00],
            subsystem_vendor: 0,
            subsystem: 0,
        });
        let mut slots: Vec<Option<Arc<dyn PciDevice>>> = vec![None; SLOTS];
        slots[0] = Some(Arc::new(HostBridge(Mutex::new(bridge))));
        PciBus { address: Mutex::new(0), slots, next_bar: PCI_MMIO_BASE }
    }

    /// Reserves `size` bytes (a power of two) of the BAR window, aligned to its size.
    pub fn allocate_bar(&mut self, size: u64) -> Option<u64> {
        let at = self.next_bar.next_multiple_of(size);
        (at + size <= PCI_MMIO_BASE + PCI_MMIO_SIZE).then(|| {
            self.next_bar = at + size;
            at
        })
    }

    /// Puts `device` in the next free slot that is not in `reserved`; returns the slot.
    pub fn add(&mut self, device: Arc<dyn PciDevice>, reserved: &[u8]) -> Option<usize> {
        let slot = (0..self.slots.len()).find(|&s| self.slots[s].is_none() && !reserved.contains(&(s as u8)))?;
        self.slots[slot] = Some(device);
        Some(slot)
    }

    /// Puts `device` in `slot`; `false` if that slot does not exist or is taken.
    pub fn add_at(&mut self, device: Arc<dyn PciDevice>, slot: u8) -> bool {
        match self.slots.get_mut(slot as usize) {
            Some(s @ None) => {
                *s = Some(device);
                true
            }
            _ => false,
        }
    }

    /// Every function on the bus, read from its configuration space as the guest sees it.
    pub fn functions(&self) -> Vec<PciFunction> {
        let mut out = Vec::new();
        for (slot, dev) in self.slots.iter().enumerate() {
            let Some(dev) = dev else { continue };
            let mut h = [0u8; 0x40];
            for (i, dword) in h.chunks_mut(4).enumerate() {
                dev.config_read(4 * i, dword);
            }
            let u16_at = |at: usize| u16::from_le_bytes([h[at], h[at + 1]]);
            let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
            let bars = dev
                .bars()
                .iter()
                .map(|b| {
                    let at = config::BAR0 + 4 * b.index;
                    let addr = u64::from(u32_at(at) & !0xf) | (u64::from(u32_at(at + 4)) << 32);
                    (b.index, addr, b.size)
                })
                .collect();
            out.push(PciFunction {
                slot: slot as u8,
                name: dev.name(),
                vendor: u16_at(config::VENDOR_ID),
                device: u16_at(config::VENDOR_ID + 2),
                subsystem_vendor: u16_at(config::SUBSYSTEM_VENDOR_ID),
                subsystem: u16_at(config::SUBSYSTEM_VENDOR_ID + 2),
                revision: h[config::REVISION],
                class: [h[config::REVISION + 3], h[config::REVISION + 2], h[config::REVISION + 1]],
                irq_pin: h[config::INTERRUPT_PIN],
                irq_line: h[config::INTERRUPT_PIN - 1],
                bars,
            });
        }
        out
    }

    /// The device and register offset the latched address selects, if any.
    fn selected(&self) -> Option<(&Arc<dyn PciDevice>, usize)> {
        let a = *self.address.lock();
        let (enabled, bus, slot, function) = (a >> 31 == 1, (a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 7);
        if !enabled || bus != 0 || function != 0 {
            return None;
        }
        Some((self.slots[slot as usize].as_ref()?, (a & 0xfc) as usize))
    }

    /// Port I/O on 0xCF8-0xCFF; false if `port` is not the bus's.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        match port {
            CONFIG_ADDRESS if data.len() == 4 => data.copy_from_slice(&self.address.lock().to_le_bytes()),
            CONFIG_DATA..=0xcff => match self.selected() {
                Some((dev, reg)) if usize::from(port - CONFIG_DATA) + data.len() <= 4 => {
                    dev.config_read(reg + usize::from(port - CONFIG_DATA), data)
                }
                _ => data.fill(0xff),
            },
            CONFIG_ADDRESS..=0xcfb => data.fill(0xff),
            _ => return false,
        }
        true
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match port {
            CONFIG_ADDRESS if data.len() == 4 => {
                *self.address.lock() = u32::from_le_bytes(data.try_into().unwrap_or_default()) & 0x80ff_fffc;
            }
            CONFIG_DATA..=0xcff => {
                if let Some((dev, reg)) = self.selected() {
                    if usize::from(port - CONFIG_DATA) + data.len() <= 4 {
                        dev.config_write(reg + usize::from(port - CONFIG_DATA), data);
                    }
                }
            }
            CONFIG_ADDRESS..=0xcfb => {}
            _ => return false,
        }
        true
    }

    /// The device, BAR and offset that decode `addr`.
    fn decode(&self, addr: u64, len: usize) -> Option<(&Arc<dyn PciDevice>, usize, u64)> {
        self.slots.iter().flatten().find_map(|d| d.decode(addr, len).map(|(bar, off)| (d, bar, off)))
    }

    /// An MMIO access; false if no BAR decodes it.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.decode(addr, data.len()) {
            Some((d, bar, off)) => {
                d.bar_read(bar, off, data);
                true
            }
            None => false,
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.decode(addr, data.len()) {
            Some((d, bar, off)) => {
                d.bar_write(bar, off, data);
                true
            }
            None => false,
        }
    }
}

impl Component for PciBus {
    fn name(&self) -> &'static str {
        "pci"
    }

    fn save(&self) -> Result<Vec<u8>, ComponentError> {
        Ok(self.address.lock().to_le_bytes().to_vec())
    }

    fn restore(&self, version: u32, state: &[u8]) -> Result<(), ComponentError> {
        component::expect_version(self.name(), version, self.version())?;
        let bytes: [u8; 4] = state
            .try_into()
            .map_err(|_| ComponentError::Malformed { component: "pci", why: format!("{} bytes", state.len()) })?;
        *self.address.lock() = u32::from_le_bytes(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dummy;

    impl PciDevice for Dummy {
        fn config_read(&self, _: usize, data: &mut [u8]) {
            data.fill(0);
        }
        fn config_write(&self, _: usize, _: &[u8]) {}
        fn decode(&self, _: u64, _: usize) -> Option<(usize, u64)> {
            None
        }
        fn bar_read(&self, _: usize, _: u64, _: &mut [u8]) {}
        fn bar_write(&self, _: usize, _: u64, _: &[u8]) {}
    }

    #[test]
    fn devices_go_where_asked_and_free_slots_skip_those_asked_for() {
        let mut bus = PciBus::new();
        let dev = || -> Arc<dyn PciDevice> { Arc::new(Dummy) };
        assert!(bus.add_at(dev(), 1));
        assert!(!bus.add_at(dev(), 1), "taken");
        assert!(!bus.add_at(dev(), 0), "the host bridge's");
        assert!(!bus.add_at(dev(), 40), "no such slot");
        assert_eq!(bus.add(dev(), &[2, 3]), Some(4));
        assert_eq!(cfg_read(&bus, 4, 0), 0, "the guest finds it there");
    }

    fn cfg_read(bus: &PciBus, slot: u32, reg: u32) -> u32 {
        assert!(bus.pio_write(CONFIG_ADDRESS, &(0x8000_0000 | slot << 11 | reg).to_le_bytes()));
        let mut b = [0u8; 4];
        assert!(bus.pio_read(CONFIG_DATA, &mut b));
        u32::from_le_bytes(b)
    }

    #[test]
    fn enumeration_sees_the_bridge_and_nothing_else() {
        let bus = PciBus::new();
        assert_eq!(cfg_read(&bus, 0, 0), 0x0d57_8086);
        assert_eq!(cfg_read(&bus, 0, 8) >> 8, 0x06_00_00, "a host bridge");
        assert_eq!(cfg_read(&bus, 1, 0), 0xffff_ffff, "empty slot");
        // Disabled, other bus, other function: all ones.
        for a in [0x0000_0000u32, 0x8001_0000, 0x8000_0100] {
            bus.pio_write(CONFIG_ADDRESS, &a.to_le_bytes());
            let mut b = [0u8; 4];
            bus.pio_read(CONFIG_DATA, &mut b);
            assert_eq!(b, [0xff; 4], "{a:#x}");
        }
        let mut b = [0u8; 2];
        bus.pio_write(CONFIG_ADDRESS, &0x8000_0000u32.to_le_bytes());
        bus.pio_read(CONFIG_DATA + 2, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x0d57, "sub-dword access at an offset");
        let mut odd = [0u8; 4];
        bus.pio_read(CONFIG_DATA + 2, &mut odd);
        assert_eq!(odd, [0xff; 4], "an access crossing the dword is refused");
        assert!(!bus.pio_read(0x3f8, &mut b), "not the bus's port");
        let state = bus.save().unwrap();
        let other = PciBus::new();
        other.restore(1, &state).unwrap();
        assert_eq!(*other.address.lock(), 0x8000_0000);
        assert!(other.restore(1, &[1, 2]).is_err());
    }

    #[test]
    fn functions_are_described_as_the_guest_sees_them() {
        let mut bus = PciBus::new();
        assert!(bus.add_at(Arc::new(Dummy), 5));
        let f = bus.functions();
        assert_eq!(f.len(), 2);
        assert_eq!((f[0].slot, f[0].name, f[0].vendor, f[0].device), (0, Some("host-bridge"), 0x8086, 0x0d57));
        assert_eq!(f[0].class, [0x06, 0, 0]);
        assert_eq!((f[1].slot, f[1].name, f[1].vendor), (5, None, 0));
    }

    #[test]
    fn bar_window_allocation_is_aligned_and_bounded() {
        let mut bus = PciBus::new();
        assert_eq!(bus.allocate_bar(0x8000), Some(PCI_MMIO_BASE));
        assert_eq!(bus.allocate_bar(0x1000), Some(PCI_MMIO_BASE + 0x8000));
        assert_eq!(bus.allocate_bar(0x10000), Some(PCI_MMIO_BASE + 0x10000));
        assert_eq!(bus.allocate_bar(PCI_MMIO_SIZE), None);
    }
}
