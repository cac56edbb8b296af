//! The guest-physical layout smpft builds, and the boot ABI shared with the test guest
//! (`guest/src/abi.rs` mirrors the constants and `BootInfo`; keep them in step).
//!
//! ```text
//! 0x0000_1000  GDT (null, kernel code/data, user data/code, one TSS descriptor per vCPU)
//! 0x0000_2000  (unused)
//! 0x0000_3000  BootInfo
//! 0x0000_4000  boot parameters (up to 4 KiB)
//! 0x0001_0000  page tables: PML4, PDPT, page directories (2 MiB pages, identity, user-accessible;
//!              memory, and the PCI BAR window 0xe000_0000..0xf000_0000 uncached)
//! 0x0002_0000  TSS with a full I/O permission bitmap, one 12 KiB slot per vCPU
//! 0x0010_0000  vCPU stacks, 64 KiB each
//! 0x0020_0000  guest image (ELF PT_LOAD segments)
//! image end .. end of memory: free for the guest
//! ```

pub const GDT_ADDR: u64 = 0x1000;
pub const TSS_ADDR: u64 = 0x2_0000;
/// 104-byte TSS + 8 KiB I/O permission bitmap + terminator, rounded to pages.
pub const TSS_SLOT: u64 = 0x3000;
/// Offset of the I/O permission bitmap in the TSS.
pub const TSS_IOMAP: u64 = 0x68;
/// TSS limit: covers the whole I/O bitmap and its terminating byte.
pub const TSS_LIMIT: u64 = TSS_IOMAP + 8192;
pub const BOOT_INFO_ADDR: u64 = 0x3000;
pub const CMDLINE_ADDR: u64 = 0x4000;
pub const CMDLINE_MAX: usize = 4096;
pub const PML4_ADDR: u64 = 0x1_0000;
pub const PDPT_ADDR: u64 = 0x1_1000;
pub const PD_ADDR: u64 = 0x1_2000;
pub const STACKS_ADDR: u64 = 0x10_0000;
pub const STACK_SIZE: u64 = 0x1_0000;
/// The lowest address a guest image may load at.
pub const IMAGE_MIN: u64 = 0x20_0000;

/// Largest vCPU count the layout (and the test guest) supports.
pub const MAX_VCPUS: u32 = 16;
/// Guest memory is one region below the 32-bit MMIO hole (LAPIC/IOAPIC live at 0xfec0_0000+).
pub const MAX_MEMORY: u64 = 3 << 30;
/// The guest image and the guest's own needs come on top of the fixed area below `IMAGE_MIN`.
pub const MIN_FREE: u64 = 1 << 20;

pub const GDT_KERNEL_CODE: u16 = 0x08;
pub const GDT_KERNEL_DATA: u16 = 0x10;
pub const GDT_USER_DATA: u16 = 0x18 | 3;
pub const GDT_USER_CODE: u16 = 0x20 | 3;
pub const GDT_TSS0: u16 = 0x28;

/// Ports of the platform (besides COM1 at 0x3f8).
pub const DEBUGCON_PORT: u16 = 0xe9;
pub const EXIT_PORT: u16 = 0xf4;
pub const IDLE_PORT: u16 = 0xf5;
pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

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
    pub free_start: u64,
    pub free_end: u64,
    pub tsc_khz: u64,
    pub cmdline_addr: u64,
    pub cmdline_len: u64,
}

impl BootInfo {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&self.magic.to_le_bytes());
        v.extend_from_slice(&self.version.to_le_bytes());
        v.extend_from_slice(&self.vcpus.to_le_bytes());
        for x in [self.mem_size, self.free_start, self.free_end, self.tsc_khz, self.cmdline_addr, self.cmdline_len] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }
}

// The fixed area fits below the image, checked at compile time.
const _: () = assert!(STACKS_ADDR + STACK_SIZE * MAX_VCPUS as u64 <= IMAGE_MIN);
const _: () = assert!(TSS_ADDR + TSS_SLOT * MAX_VCPUS as u64 <= STACKS_ADDR);
const _: () = assert!(TSS_LIMIT < TSS_SLOT);
const _: () = assert!(GDT_TSS0 as u64 + 16 * MAX_VCPUS as u64 <= 0x1000);
const _: () = assert!(PD_ADDR + 0x1000 * 4 <= TSS_ADDR);
const _: () = assert!(MAX_MEMORY <= crate::vmm::pci::PCI_MMIO_BASE);
const _: () = assert!(crate::vmm::pci::PCI_MMIO_BASE >> 30 == 3 && crate::vmm::pci::PCI_MMIO_SIZE <= 1 << 30);

pub fn stack_top(vcpu: u32) -> u64 {
    STACKS_ADDR + STACK_SIZE * (u64::from(vcpu) + 1)
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
        assert_eq!(bytes.len(), std::mem::size_of::<BootInfo>());
        assert_eq!(&bytes[0..8], b"SMPFTBI1");
        assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(bytes[56..64].try_into().unwrap()), 8);
    }
}
