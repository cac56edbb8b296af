//! Where smpft puts what a Linux guest is handed at boot (the test guest's layout is
//! `crate::layout`; the two never share a VM).
//!
//! ```text
//! 0x0000_0500  GDT: null, 32-bit code (0x08), 64-bit code (0x10), data (0x18), TSS (0x20)
//! 0x0000_6000  PVH start info, its module list and memory map
//! 0x0000_7000  zero page (boot_params) for the 64-bit boot protocol
//! 0x0000_9000  identity page tables for the 64-bit entry: PML4, PDPT, 4 page directories
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  reserved (where firmware keeps its EBDA) up to 1 MiB, with the ACPI tables
//!              at 0x000e_0000, the VM generation ID at 0x000e_f000 (`crate::vmgenid`) and
//!              the SMBIOS tables at 0x000f_0000 (`crate::smbios`)
//! 0x0010_0000  a bzImage's protected-mode kernel; an ELF vmlinux loads at its own physical
//!              addresses (16 MiB for distribution kernels)
//! top of RAM   the initrd, page-aligned, as high as the kernel allows
//! ```

pub const GDT_ADDR: u64 = 0x500;
pub const GDT_CODE32: u16 = 0x08;
/// `__BOOT_CS` of the 64-bit boot protocol.
pub const GDT_CODE64: u16 = 0x10;
/// `__BOOT_DS`.
pub const GDT_DATA: u16 = 0x18;
pub const GDT_TSS: u16 = 0x20;
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x6080;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Largest command line with its terminating NUL when the kernel does not say (PVH); a
/// bzImage gives its own limit in `cmdline_size`. x86 Linux's `COMMAND_LINE_SIZE` is 2048.
pub const CMDLINE_MAX: usize = 2048;
pub const EBDA_START: u64 = 0x9_fc00;
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// The ACPI tables end below the VM generation ID.
pub const ACPI_TABLES_END: u64 = crate::layout::VMGENID_ADDR;
pub const HIGH_MEMORY: u64 = 0x10_0000;

const _: () = assert!(PVH_MEMMAP_ADDR + 16 * 24 <= ZERO_PAGE_ADDR);
const _: () = assert!(PD_ADDR + 4 * 0x1000 <= CMDLINE_ADDR);
const _: () = assert!(CMDLINE_ADDR + CMDLINE_MAX as u64 <= EBDA_START);
const _: () = assert!(ACPI_END == HIGH_MEMORY);
const _: () = assert!(ACPI_START < ACPI_TABLES_END && ACPI_TABLES_END < ACPI_END);
