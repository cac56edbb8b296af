//! The guest-physical layout smpft builds. The boot ABI it shares with the test guest (`BootInfo`,
//! the platform's ports, the PCI window) comes from the `boot-abi` crate, which both build against.
//!
//! ```text
//! 0x0000_1000  GDT (null, kernel code/data, user data/code, one TSS descriptor per vCPU)
//! 0x0000_2000  (unused)
//! 0x0000_3000  BootInfo
//! 0x0000_4000  boot parameters (up to 4 KiB)
//! 0x0001_0000  page tables: PML4, PDPT, page directories (2 MiB pages, identity, user-accessible;
//!              memory, and the PCI BAR window 0xe000_0000..0xf000_0000 uncached)
//! 0x0002_0000  TSS with a full I/O permission bitmap, one 12 KiB slot per vCPU
//! 0x000e_f000  VM generation ID (16 bytes, `boot_abi::VMGENID_ADDR`; see `crate::vmgenid`)
//! 0x000f_0000  SMBIOS entry point and tables (`crate::smbios`)
//! 0x0010_0000  vCPU stacks, 64 KiB each
//! 0x0020_0000  guest image (ELF PT_LOAD segments)
//! image end .. end of memory: free for the guest
//! 0xe000_0000  PCI memory window (device BARs), boot_abi::PCI_MMIO_SIZE bytes
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

/// Ports of the platform (COM1 is eight ports from `COM1_BASE`).
pub use boot_abi::{COM1 as COM1_BASE, DEBUGCON as DEBUGCON_PORT, EXIT_PORT, IDLE_PORT, POWER_PORT};
pub const COM1_IRQ: u32 = 4;

pub use boot_abi::{BootInfo, BOOT_MAGIC, BOOT_VERSION, VMGENID_ADDR};

// The fixed area fits below the image, checked at compile time.
const _: () = assert!(STACKS_ADDR + STACK_SIZE * MAX_VCPUS as u64 <= IMAGE_MIN);
const _: () = assert!(TSS_ADDR + TSS_SLOT * MAX_VCPUS as u64 <= STACKS_ADDR);
const _: () = assert!(TSS_LIMIT < TSS_SLOT);
// The VM generation ID sits between the TSSs and the SMBIOS tables, below the stacks.
const _: () = assert!(TSS_ADDR + TSS_SLOT * MAX_VCPUS as u64 <= VMGENID_ADDR);
const _: () = assert!(VMGENID_ADDR + 16 <= crate::smbios::ADDR);
const _: () = assert!(GDT_TSS0 as u64 + 16 * MAX_VCPUS as u64 <= 0x1000);
// Page directories for memory and, in the 4th GiB, the PCI window.
const _: () = assert!(PD_ADDR + 0x1000 * 4 <= TSS_ADDR);
// Memory ends below the PCI window, which ends below the LAPIC/IOAPIC, inside the 4th GiB.
const _: () = assert!(MAX_MEMORY <= boot_abi::PCI_MMIO_BASE);
const _: () = assert!(boot_abi::PCI_MMIO_BASE + boot_abi::PCI_MMIO_SIZE <= 0xfec0_0000);
const _: () = assert!(boot_abi::PCI_MMIO_BASE >> 30 == 3);

pub fn stack_top(vcpu: u32) -> u64 {
    STACKS_ADDR + STACK_SIZE * (u64::from(vcpu) + 1)
}
