//! Booting a Linux kernel: an ELF `vmlinux` through its PVH entry note, or a `bzImage` through
//! the x86 boot protocol's 64-bit entry, with an initrd and a command line, on the platform
//! Linux expects (an e820 memory map, ACPI tables, the in-kernel PIC/IOAPIC/PIT, COM1 on IRQ 4
//! and the PCI bus). The rust-vmm `linux-loader` crate parses and loads the kernel and writes
//! the boot structures; `acpi_tables` builds the tables.
//!
//! Nothing here is about fault tolerance: a Linux guest is checkpointed like any other.

pub mod acpi;
pub mod e820;
pub mod entry;
pub mod layout;

use crate::memory::{GuestMemory, MemoryError};
use entry::{Entry, Mode};
use layout::*;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, Cmdline, KernelLoader};
use std::io::Cursor;
use std::sync::Arc;
use vm_memory::GuestAddress;

/// What to boot.
#[derive(Debug, Clone)]
pub struct LinuxBoot {
    pub kernel: Arc<[u8]>,
    pub initrd: Option<Arc<[u8]>>,
    pub cmdline: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error("is neither an ELF vmlinux with a PVH entry note nor a bzImage")]
    UnknownFormat,
    #[error("is an ELF kernel without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): give its bzImage instead, or build it with CONFIG_PVH")]
    NoPvhNote,
    #[error("is a bzImage without a 64-bit entry point (boot protocol 2.12+ with XLF_KERNEL_64)")]
    No64BitEntry,
    #[error("is truncated or malformed: {0}")]
    Load(String),
    #[error("needs {need} MiB of guest memory (the VM has {have} MiB)")]
    MemoryTooSmall { need: u64, have: u64 },
    #[error("initrd of {size} KiB does not fit in guest memory above the kernel ({room} KiB free between {lo:#x} and {hi:#x}); give the VM more memory")]
    InitrdTooLarge { size: u64, room: u64, lo: u64, hi: u64 },
    #[error("command line is {len} bytes; this kernel takes at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("command line is not valid: {0}")]
    Cmdline(String),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// The boot protocol's `HdrS` magic at 0x202, its version at 0x206.
const HDRS: u32 = 0x5372_6448;
const BZ_HEADER_OFFSET: usize = 0x1f1;
const XLF_KERNEL_64: u16 = 1;
/// Boot protocol `loadflags`: the heap end pointer is valid.
const CAN_USE_HEAP: u8 = 0x80;
const LOADER_UNDEFINED: u8 = 0xff;
/// Offset of the 64-bit entry point from the protected-mode kernel's start.
const ENTRY_64_OFFSET: u64 = 0x200;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

enum Format {
    Elf,
    BzImage,
}

fn format(kernel: &[u8]) -> Result<Format, LinuxError> {
    if kernel.starts_with(b"\x7fELF") {
        return Ok(Format::Elf);
    }
    let magic = kernel.get(0x202..0x206).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    if magic == Some(HDRS) {
        return Ok(Format::BzImage);
    }
    Err(LinuxError::UnknownFormat)
}

/// Whether `kernel` is a Linux kernel smpft can boot (an ELF with a PVH note, or a bzImage)
/// rather than a freestanding test-guest ELF.
pub fn is_linux_kernel(kernel: &[u8]) -> bool {
    match format(kernel) {
        Ok(Format::BzImage) => true,
        Ok(Format::Elf) => pvh_entry(kernel).is_some(),
        Err(_) => false,
    }
}

/// The PVH entry point of an ELF kernel, found by loading it into scratch memory as large as
/// its segments need (linux-loader finds the note while loading).
fn pvh_entry(kernel: &[u8]) -> Option<u64> {
    let end = elf_end(kernel)?;
    let scratch = Arc::new(GuestMemory::new(end.next_multiple_of(0x1000)).ok()?);
    let view = scratch.device_view().ok()?;
    match Elf::load(&*view, None, &mut Cursor::new(kernel), Some(GuestAddress(HIGH_MEMORY))) {
        Ok(r) => match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
            _ => None,
        },
        Err(_) => None,
    }
}

/// One past the highest physical address an ELF kernel's loadable segments occupy.
fn elf_end(elf: &[u8]) -> Option<u64> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(32)?).ok()?;
    let (entsize, count) = (usize::from(u16_at(54)?), usize::from(u16_at(56)?));
    let mut end = 0u64;
    for i in 0..count {
        let at = phoff.checked_add(i.checked_mul(entsize)?)?;
        if u32_at(at)? == 1 {
            end = end.max(u64_at(at + 24)?.checked_add(u64_at(at + 40)?)?);
        }
    }
    (end > 0).then_some(end)
}

/// Loads `boot` into `mem` for `vcpus` vCPUs and returns how to enter it; the ACPI tables
/// describe a VM generation ID device if `vmgenid` (its GUID is the caller's to write).
pub fn load(mem: &Arc<GuestMemory>, vcpus: u32, boot: &LinuxBoot, vmgenid: bool) -> Result<Entry, LinuxError> {
    let have = mem.size();
    let too_small = |need: u64| LinuxError::MemoryTooSmall { need: need.div_ceil(1 << 20), have: have >> 20 };
    let view = mem.device_view()?;
    let load_err = |e: linux_loader::loader::Error| LinuxError::Load(e.to_string());
    let (entry, kernel_end, header) = match format(&boot.kernel)? {
        Format::Elf => {
            let end = elf_end(&boot.kernel).ok_or(LinuxError::Load("no loadable segments".into()))?;
            if end > have {
                return Err(too_small(end + (16 << 20)));
            }
            let r = Elf::load(&*view, None, &mut Cursor::new(&boot.kernel), Some(GuestAddress(HIGH_MEMORY)))
                .map_err(load_err)?;
            let PvhBootCapability::PvhEntryPresent(rip) = r.pvh_boot_cap else {
                return Err(LinuxError::NoPvhNote);
            };
            (Entry { mode: Mode::Pvh, rip: rip.0, info: PVH_INFO_ADDR }, r.kernel_end, None)
        }
        Format::BzImage => {
            let hdr = bz_header(&boot.kernel)?;
            // The kernel decompresses itself in place: it needs init_size from its load address.
            let end = u64::from(hdr.code32_start).max(HIGH_MEMORY) + u64::from(hdr.init_size);
            if end > have {
                return Err(too_small(end + (16 << 20)));
            }
            let r = BzImage::load(&*view, None, &mut Cursor::new(&boot.kernel), Some(GuestAddress(HIGH_MEMORY)))
                .map_err(load_err)?;
            let hdr = r.setup_header.ok_or(LinuxError::UnknownFormat)?;
            let entry = Entry { mode: Mode::Long, rip: r.kernel_load.0 + ENTRY_64_OFFSET, info: ZERO_PAGE_ADDR };
            (entry, r.kernel_load.0 + u64::from(hdr.init_size), Some(hdr))
        }
    };
    let max_cmdline = header.map_or(CMDLINE_MAX, |h| (h.cmdline_size as usize + 1).min(CMDLINE_MAX));
    let cmdline = command_line(&boot.cmdline, max_cmdline)?;
    linux_loader::loader::load_cmdline(&*view, GuestAddress(CMDLINE_ADDR), &cmdline).map_err(load_err)?;
    let initrd_max = header.map_or(u64::from(u32::MAX), |h| u64::from(h.initrd_addr_max));
    let initrd = boot.initrd.as_deref().map(|i| place_initrd(mem, i, kernel_end, initrd_max)).transpose()?;
    let map = e820::map(have);
    let rsdp = acpi::write(mem, vcpus, vmgenid)?;
    entry::write_tables(mem)?;
    match header {
        None => write_start_info(&view, &map, initrd, rsdp)?,
        Some(hdr) => write_zero_page(&view, hdr, &map, initrd, rsdp)?,
    }
    Ok(entry)
}

fn bz_header(kernel: &[u8]) -> Result<linux_loader::loader::bootparam::setup_header, LinuxError> {
    use vm_memory::ByteValued;
    let mut hdr = linux_loader::loader::bootparam::setup_header::default();
    let len = hdr.as_slice().len();
    let bytes = kernel
        .get(BZ_HEADER_OFFSET..BZ_HEADER_OFFSET + len)
        .ok_or(LinuxError::Load("setup header cut short".into()))?;
    hdr.as_mut_slice().copy_from_slice(bytes);
    if hdr.version < 0x20c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LinuxError::No64BitEntry);
    }
    // The protected-mode kernel follows the setup sectors; syssize counts it in 16-byte units.
    let setup = (usize::from(hdr.setup_sects.max(4 * u8::from(hdr.setup_sects == 0))) + 1) * 512;
    let need = setup + hdr.syssize as usize * 16;
    if kernel.len() < need {
        return Err(LinuxError::Load(format!(
            "the bzImage has {} bytes of the {need} its header states",
            kernel.len()
        )));
    }
    Ok(hdr)
}

fn command_line(raw: &str, max: usize) -> Result<Cmdline, LinuxError> {
    if raw.len() + 1 > max {
        return Err(LinuxError::CmdlineTooLong { len: raw.len(), max: max - 1 });
    }
    if let Some(c) = raw.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(LinuxError::Cmdline(format!("it holds {c:?}; only printable ASCII is passed to the kernel")));
    }
    Cmdline::try_from(raw, max).map_err(|e| LinuxError::Cmdline(e.to_string()))
}

/// Puts the initrd as high as both memory and the kernel allow, above the kernel; returns
/// its address and size.
fn place_initrd(mem: &GuestMemory, initrd: &[u8], kernel_end: u64, max: u64) -> Result<(u64, u64), LinuxError> {
    let size = initrd.len() as u64;
    let hi = mem.size().min(max.saturating_add(1));
    let lo = kernel_end.next_multiple_of(0x1000);
    let addr = hi.checked_sub(size).map(|a| a & !0xfff).filter(|&a| a >= lo);
    let Some(addr) = addr else {
        return Err(LinuxError::InitrdTooLarge {
            size: size.div_ceil(1024),
            room: hi.saturating_sub(lo) / 1024,
            lo,
            hi,
        });
    };
    mem.write(addr, initrd)?;
    Ok((addr, size))
}

type View = crate::memory::DeviceMemory;

fn write_start_info(view: &View, map: &[e820::Entry], initrd: Option<(u64, u64)>, rsdp: u64) -> Result<(), LinuxError> {
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind as u32, reserved: 0 })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    if initrd.is_some() {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if let Some((paddr, size)) = initrd {
        params.set_modules(&[hvm_modlist_entry { paddr, size, ..Default::default() }], GuestAddress(PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, &**view).map_err(|e| LinuxError::Load(e.to_string()))
}

fn write_zero_page(
    view: &View,
    hdr: linux_loader::loader::bootparam::setup_header,
    map: &[e820::Entry],
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), LinuxError> {
    let mut p = boot_params { hdr, ..Default::default() };
    p.hdr.type_of_loader = LOADER_UNDEFINED;
    p.hdr.loadflags |= CAN_USE_HEAP;
    p.hdr.heap_end_ptr = 0xfe00;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    for (slot, e) in p.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind as u32 };
    }
    p.e820_entries = map.len() as u8;
    p.acpi_rsdp_addr = rsdp;
    let params = BootParams::new(&p, GuestAddress(ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams(&params, &**view).map_err(|e| LinuxError::Load(e.to_string()))
}

#[cfg(test)]
mod tests;
