//! The boot ABI between smpft and the guests it starts: what a vCPU finds on entry, the platform's
//! ports, the statuses the test guest exits with, and where devices sit on the PCI bus. The VMM
//! (`smp-ft`) and the test guest (`guest/`) both build against this crate, so every number exists
//! once.
//!
//! Every vCPU enters the guest's entry point in 64-bit ring 3 with IOPL=3 and interrupts disabled,
//! on an identity mapping of all guest memory, with:
//! - `rdi` = the vCPU index (0-based),
//! - `rsi` = the guest-physical (= virtual) address of [`BootInfo`],
//! - `rsp` = the top of a stack private to that vCPU.
//!
//! The PCI memory window [`PCI_MMIO_BASE`]..+[`PCI_MMIO_SIZE`] is mapped the same way (identity,
//! user-accessible) but uncached, so ring-3 code reaches device registers directly.

#![no_std]

use core::mem::offset_of;

/// "SMPFTBI1" as a little-endian u64.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"SMPFTBI1");
pub const BOOT_VERSION: u32 = 1;

/// What every vCPU finds at `rsi` on entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    pub magic: u64,
    pub version: u32,
    pub vcpus: u32,
    pub mem_size: u64,
    /// First byte of memory the guest may use freely (page aligned, above the image and stacks).
    pub free_start: u64,
    /// One past the last free byte.
    pub free_end: u64,
    /// TSC frequency in kHz, for turning `rdtsc` into time.
    pub tsc_khz: u64,
    pub cmdline_addr: u64,
    pub cmdline_len: u64,
}

// No padding anywhere, so the bytes `to_bytes` yields are every byte of the struct.
const _: () = assert!(size_of::<BootInfo>() == 2 * 4 + 7 * 8);

impl BootInfo {
    /// Size of the structure in guest memory.
    pub const SIZE: usize = size_of::<BootInfo>();

    /// The structure as the guest reads it: its `repr(C)` layout, little-endian.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(offset_of!(BootInfo, magic), &self.magic.to_le_bytes());
        put(offset_of!(BootInfo, version), &self.version.to_le_bytes());
        put(offset_of!(BootInfo, vcpus), &self.vcpus.to_le_bytes());
        put(offset_of!(BootInfo, mem_size), &self.mem_size.to_le_bytes());
        put(offset_of!(BootInfo, free_start), &self.free_start.to_le_bytes());
        put(offset_of!(BootInfo, free_end), &self.free_end.to_le_bytes());
        put(offset_of!(BootInfo, tsc_khz), &self.tsc_khz.to_le_bytes());
        put(offset_of!(BootInfo, cmdline_addr), &self.cmdline_addr.to_le_bytes());
        put(offset_of!(BootInfo, cmdline_len), &self.cmdline_len.to_le_bytes());
        b
    }
}

// Platform ports.

/// COM1: a 16550 UART (eight ports from here).
pub const COM1: u16 = 0x3f8;
/// Debug console: each byte written is a byte of the guest's log (shown by the VMM).
pub const DEBUGCON: u16 = 0xe9;
/// 32-bit write: the guest is done; the value is its exit status.
pub const EXIT_PORT: u16 = 0xf4;
/// 32-bit write: nothing to do for up to this many microseconds (0 = just yield the host CPU).
/// The VMM returns early when serial input arrives.
pub const IDLE_PORT: u16 = 0xf5;
/// Power button: an 8-bit read returns 1 once the host asked the guest to power down (QMP
/// `system_powerdown`), 0 before. The guest is expected to shut down cleanly.
pub const POWER_PORT: u16 = 0xf6;
/// Reset control, as on a PC's chipset (and the ACPI FADT's reset register): an 8-bit write
/// of [`RESET_VALUE`] resets the machine in place; the guest boots again.
pub const RESET_PORT: u16 = 0xcf9;
pub const RESET_VALUE: u8 = 0x06;

// Exit statuses the test guest reports through `EXIT_PORT`.

pub const EXIT_OK: u32 = 0;
/// A boot parameter was not understood or cannot be met.
pub const EXIT_BAD_PARAMS: u32 = 2;
/// A check failed: memory, a counter or a device broke an invariant.
pub const EXIT_INVARIANT: u32 = 3;
/// The boot information is missing or inconsistent.
pub const EXIT_BAD_BOOT: u32 = 4;
/// A workload needs a device that is not on the PCI bus.
pub const EXIT_NO_DEVICE: u32 = 5;
/// A device is present but could not be initialised (it refused the driver or lacks a part).
pub const EXIT_DEVICE_FAILED: u32 = 6;

// PCI: configuration mechanism #1, bus 0 only.

/// 32-bit write: the configuration register the next data access reaches (see [`PciAddress`]).
pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
/// The register selected through [`PCI_CONFIG_ADDRESS`]: 1-, 2- and 4-byte accesses at
/// `PCI_CONFIG_DATA + (register & 3)`, i.e. ports 0xcfc..=0xcff.
pub const PCI_CONFIG_DATA: u16 = 0xcfc;
/// Bit 31 of a configuration address: the data ports reach configuration space only when it is set.
pub const PCI_CONFIG_ENABLE: u32 = 1 << 31;

/// The memory window in which the VMM places every device's memory BARs, programmed before the
/// guest starts (as firmware would). It is mapped identity, user-accessible and uncached.
pub const PCI_MMIO_BASE: u64 = 0xe000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;

/// Where the VM generation ID is, when the VM has one (`smpft run --vmgenid`, QEMU's `-device
/// vmgenid`): 16 bytes, a GUID with its first three fields little-endian (as Windows and Linux
/// read it; the string c773c261-d800-... is the bytes 61 c2 73 c7 00 d8 ...). All zero without
/// the device. Below 1 MiB, outside the guest's free memory and outside a Linux guest's RAM. It
/// changes when the VM is started again from a snapshot (`--restore`), never while it runs.
pub const VMGENID_ADDR: u64 = 0xe_f000;

/// One configuration register as named through [`PCI_CONFIG_ADDRESS`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciAddress {
    pub bus: u8,
    /// 0..32.
    pub device: u8,
    /// 0..8.
    pub function: u8,
    /// Byte offset in the 256-byte configuration space; the address names its aligned dword.
    pub register: u8,
}

impl PciAddress {
    /// The value to write to [`PCI_CONFIG_ADDRESS`]: enable | bus << 16 | device << 11 |
    /// function << 8 | (register & 0xfc).
    pub const fn encode(self) -> u32 {
        PCI_CONFIG_ENABLE
            | (self.bus as u32) << 16
            | ((self.device & 0x1f) as u32) << 11
            | ((self.function & 7) as u32) << 8
            | (self.register & 0xfc) as u32
    }

    /// The register a value written to [`PCI_CONFIG_ADDRESS`] selects (`register` dword aligned),
    /// or `None` when the enable bit is clear.
    pub const fn decode(v: u32) -> Option<PciAddress> {
        if v & PCI_CONFIG_ENABLE == 0 {
            return None;
        }
        Some(PciAddress {
            bus: (v >> 16) as u8,
            device: ((v >> 11) & 0x1f) as u8,
            function: ((v >> 8) & 7) as u8,
            register: (v & 0xfc) as u8,
        })
    }
}

// Virtio over PCI ("modern" devices only, virtio 1.x).

pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// A modern virtio device's PCI device ID is this plus its virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
pub const VIRTIO_TYPE_NET: u16 = 1;
pub const VIRTIO_TYPE_BLOCK: u16 = 2;
pub const VIRTIO_TYPE_CONSOLE: u16 = 3;
pub const VIRTIO_TYPE_RNG: u16 = 4;
pub const VIRTIO_TYPE_BALLOON: u16 = 5;
pub const VIRTIO_TYPE_SCSI: u16 = 8;

/// The PCI device ID of a modern virtio device of `device_type` (rng: 0x1044).
pub const fn virtio_pci_device_id(device_type: u16) -> u16 {
    VIRTIO_PCI_DEVICE_ID_BASE + device_type
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_bytes_match_the_repr_c_layout() {
        let b = BootInfo {
            magic: BOOT_MAGIC,
            version: 1,
            vcpus: 2,
            mem_size: 3,
            free_start: 4,
            free_end: 5,
            tsc_khz: 6,
            cmdline_addr: 7,
            cmdline_len: 8,
        };
        let bytes = b.to_bytes();
        assert_eq!(bytes.len(), size_of::<BootInfo>());
        assert_eq!(&bytes[0..8], b"SMPFTBI1");
        assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(bytes[56..64].try_into().unwrap()), 8);
        // SAFETY: `b` is a live, fully initialised `BootInfo` without padding (checked at compile
        // time), so all of its `size_of` bytes may be read as `u8`.
        let raw = unsafe { core::slice::from_raw_parts((&b as *const BootInfo).cast::<u8>(), size_of::<BootInfo>()) };
        if cfg!(target_endian = "little") {
            assert_eq!(&bytes[..], raw);
        }
    }

    #[test]
    fn pci_addresses_round_trip() {
        let a = PciAddress { bus: 0, device: 3, function: 0, register: 0x10 };
        assert_eq!(a.encode(), 0x8000_1810);
        assert_eq!(PciAddress::decode(a.encode()), Some(a));
        let b = PciAddress { bus: 1, device: 31, function: 7, register: 0xfe };
        assert_eq!(PciAddress::decode(b.encode()), Some(PciAddress { register: 0xfc, ..b }));
        assert_eq!(PciAddress::decode(0x1810), None);
    }

    #[test]
    fn virtio_device_ids() {
        assert_eq!(virtio_pci_device_id(VIRTIO_TYPE_RNG), 0x1044);
        assert_eq!(virtio_pci_device_id(VIRTIO_TYPE_BLOCK), 0x1042);
        assert_eq!(virtio_pci_device_id(VIRTIO_TYPE_NET), 0x1041);
    }
}
