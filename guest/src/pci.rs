//! PCI configuration space through configuration mechanism #1 (ports 0xcf8/0xcfc), bus 0 only.
//! The VMM programs every memory BAR inside its PCI window before the guest starts, as firmware
//! would; the guest reads the BARs, sizes them and walks capability lists, and reaches the BARs
//! directly at their (identity-mapped) addresses.

use crate::abi::{PciAddress, PCI_CONFIG_ADDRESS, PCI_CONFIG_DATA, PCI_MMIO_BASE, PCI_MMIO_SIZE};
use crate::io::{inb, inl, inw, outl, outw};
use crate::sync::SpinLock;

/// Vendor ID (low 16 bits) and device ID (high 16 bits), read as one dword.
const VENDOR_ID: u8 = 0x00;
const COMMAND: u8 = 0x04;
const STATUS: u8 = 0x06;
const HEADER_TYPE: u8 = 0x0e;
const BAR0: u8 = 0x10;
const CAPABILITIES_POINTER: u8 = 0x34;

const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_BUS_MASTER: u16 = 1 << 2;
const STATUS_CAPABILITIES: u16 = 1 << 4;
const HEADER_MULTI_FUNCTION: u8 = 0x80;
const HEADER_GENERAL: u8 = 0x00;
/// What an absent function reads as its vendor ID.
const NO_VENDOR: u16 = 0xffff;

const BAR_IO: u32 = 1;
const BAR_TYPE_MASK: u32 = 0b110;
const BAR_TYPE_64: u32 = 0b100;
const BAR_TYPE_32: u32 = 0b000;
const BAR_ADDRESS_MASK: u32 = !0xf;

/// Capabilities start after the 64-byte header; a list longer than the space can hold loops.
const FIRST_CAPABILITY: u8 = 0x40;
const MAX_CAPABILITIES: u32 = (256 - 0x40) / 4;

/// The address and data ports are one cursor shared by all vCPUs: one access at a time.
static CONFIG: SpinLock = SpinLock::new();

/// One function of a device on bus 0.
#[derive(Clone, Copy)]
pub struct Function {
    pub device: u8,
    pub function: u8,
    pub vendor_id: u16,
    pub device_id: u16,
}

/// A memory BAR as the VMM programmed it.
#[derive(Clone, Copy)]
pub struct Bar {
    pub base: u64,
    pub size: u64,
}

#[derive(Clone, Copy, Debug)]
pub enum BarError {
    /// The index is past BAR5, or names the upper half of a 64-bit BAR.
    NoSuchBar,
    /// An I/O-space BAR, or a memory BAR of the reserved type.
    NotMemory,
    /// The BAR decodes nothing (sizing read back zero).
    Unimplemented,
    /// The BAR does not lie wholly inside the PCI window, so it is not mapped for the guest.
    OutsideWindow { base: u64, size: u64 },
    /// The BAR is smaller than a structure a capability places in it.
    TooSmall { size: u64, need: u64 },
}

impl core::fmt::Display for BarError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            BarError::NoSuchBar => write!(f, "no such BAR"),
            BarError::NotMemory => write!(f, "not a 32- or 64-bit memory BAR"),
            BarError::Unimplemented => write!(f, "BAR not implemented (sizes to 0)"),
            BarError::OutsideWindow { base, size } => write!(
                f,
                "BAR at {base:#x} ({size:#x} bytes) is outside the PCI window {PCI_MMIO_BASE:#x}+{PCI_MMIO_SIZE:#x}"
            ),
            BarError::TooSmall { size, need } => write!(f, "BAR of {size:#x} bytes, a structure needs {need:#x}"),
        }
    }
}

impl core::fmt::Display for Function {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "00:{:02x}.{} [{:04x}:{:04x}]", self.device, self.function, self.vendor_id, self.device_id)
    }
}

fn select(device: u8, function: u8, register: u8) {
    outl(PCI_CONFIG_ADDRESS, PciAddress { bus: 0, device, function, register }.encode());
}

fn read32(device: u8, function: u8, register: u8) -> u32 {
    CONFIG.with(|| {
        select(device, function, register);
        inl(PCI_CONFIG_DATA)
    })
}

/// Every function present on bus 0 (function 0 first; functions 1..8 only of multi-function devices).
pub fn functions() -> impl Iterator<Item = Function> {
    (0..32u8).flat_map(|device| {
        let first = Function::probe(device, 0);
        let count = if first.is_some_and(|f| f.header_type() & HEADER_MULTI_FUNCTION != 0) { 8 } else { 1 };
        first.into_iter().chain((1..count).filter_map(move |function| Function::probe(device, function)))
    })
}

/// The first function on bus 0 with a general (type 0) header and these IDs.
pub fn find(vendor_id: u16, device_id: u16) -> Option<Function> {
    functions().find(|f| {
        f.vendor_id == vendor_id
            && f.device_id == device_id
            && f.header_type() & !HEADER_MULTI_FUNCTION == HEADER_GENERAL
    })
}

impl Function {
    fn probe(device: u8, function: u8) -> Option<Function> {
        let ids = read32(device, function, VENDOR_ID);
        let vendor_id = ids as u16;
        (vendor_id != NO_VENDOR).then_some(Function { device, function, vendor_id, device_id: (ids >> 16) as u16 })
    }

    pub fn read8(&self, register: u8) -> u8 {
        CONFIG.with(|| {
            select(self.device, self.function, register);
            inb(PCI_CONFIG_DATA + u16::from(register & 3))
        })
    }

    pub fn read16(&self, register: u8) -> u16 {
        debug_assert!(register.is_multiple_of(2));
        CONFIG.with(|| {
            select(self.device, self.function, register);
            inw(PCI_CONFIG_DATA + u16::from(register & 2))
        })
    }

    pub fn read32(&self, register: u8) -> u32 {
        debug_assert!(register.is_multiple_of(4));
        read32(self.device, self.function, register)
    }

    pub fn write16(&self, register: u8, v: u16) {
        debug_assert!(register.is_multiple_of(2));
        CONFIG.with(|| {
            select(self.device, self.function, register);
            outw(PCI_CONFIG_DATA + u16::from(register & 2), v);
        })
    }

    pub fn write32(&self, register: u8, v: u32) {
        debug_assert!(register.is_multiple_of(4));
        CONFIG.with(|| {
            select(self.device, self.function, register);
            outl(PCI_CONFIG_DATA, v);
        })
    }

    fn header_type(&self) -> u8 {
        self.read8(HEADER_TYPE)
    }

    /// Lets the function decode its memory BARs and read and write guest memory (bus mastering),
    /// as a driver does before it starts the device.
    pub fn enable_memory_and_dma(&self) {
        let command = self.read16(COMMAND);
        self.write16(COMMAND, command | COMMAND_MEMORY | COMMAND_BUS_MASTER);
    }

    /// Memory BAR `index` (0..6): its address as programmed and its size, found the standard way
    /// (write all ones, read back the size mask, restore) with memory decoding off meanwhile.
    pub fn memory_bar(&self, index: u8) -> Result<Bar, BarError> {
        if index >= 6 {
            return Err(BarError::NoSuchBar);
        }
        let reg = BAR0 + 4 * index;
        let low = self.read32(reg);
        if low & BAR_IO != 0 {
            return Err(BarError::NotMemory);
        }
        let wide = match low & BAR_TYPE_MASK {
            BAR_TYPE_32 => false,
            BAR_TYPE_64 if index < 5 => true,
            BAR_TYPE_64 => return Err(BarError::NoSuchBar),
            _ => return Err(BarError::NotMemory),
        };
        let high = if wide { self.read32(reg + 4) } else { 0 };
        let command = self.read16(COMMAND);
        self.write16(COMMAND, command & !COMMAND_MEMORY);
        self.write32(reg, !0);
        let mask_low = self.read32(reg) & BAR_ADDRESS_MASK;
        self.write32(reg, low);
        let mask_high = if wide {
            self.write32(reg + 4, !0);
            let m = self.read32(reg + 4);
            self.write32(reg + 4, high);
            m
        } else {
            // A 32-bit BAR decodes nothing above 4 GiB.
            !0
        };
        self.write16(COMMAND, command);
        let mask = u64::from(mask_high) << 32 | u64::from(mask_low);
        if mask_low == 0 && (!wide || mask_high == 0) {
            return Err(BarError::Unimplemented);
        }
        let size = (!mask).wrapping_add(1);
        let base = u64::from(high) << 32 | u64::from(low & BAR_ADDRESS_MASK);
        let end = base.checked_add(size);
        if base < PCI_MMIO_BASE || end.is_none_or(|e| e > PCI_MMIO_BASE + PCI_MMIO_SIZE) {
            return Err(BarError::OutsideWindow { base, size });
        }
        Ok(Bar { base, size })
    }

    /// The capability list: (offset in configuration space, capability ID) of each entry.
    pub fn capabilities(&self) -> Capabilities {
        let next =
            if self.read16(STATUS) & STATUS_CAPABILITIES != 0 { self.read8(CAPABILITIES_POINTER) & 0xfc } else { 0 };
        Capabilities { function: *self, next, left: MAX_CAPABILITIES }
    }
}

pub struct Capabilities {
    function: Function,
    next: u8,
    left: u32,
}

impl Iterator for Capabilities {
    type Item = (u8, u8);

    fn next(&mut self) -> Option<(u8, u8)> {
        if self.next < FIRST_CAPABILITY || self.left == 0 {
            return None;
        }
        self.left -= 1;
        let at = self.next;
        let id = self.function.read8(at);
        self.next = self.function.read8(at + 1) & 0xfc;
        Some((at, id))
    }
}
