//! Boot-protocol setup on synthetic kernels: what lands in guest memory, and every bad input.

use super::*;
use linux_loader::loader::bootparam::setup_header;
use vm_memory::ByteValued;

const MIB: u64 = 1 << 20;

/// A minimal bzImage: one setup sector after the boot sector, `payload` bytes of
/// protected-mode code.
fn bzimage(payload: usize) -> Vec<u8> {
    let mut k = vec![0u8; 2 * 512 + payload];
    let mut h = setup_header { setup_sects: 1, boot_flag: 0xaa55, header: HDRS, version: 0x20f, ..Default::default() };
    h.loadflags = 1;
    h.code32_start = 0x10_0000;
    h.initrd_addr_max = 0x7fff_ffff;
    h.cmdline_size = 2047;
    h.xloadflags = XLF_KERNEL_64;
    h.init_size = 4 << 20;
    h.syssize = (payload / 16) as u32;
    k[BZ_HEADER_OFFSET..BZ_HEADER_OFFSET + h.as_slice().len()].copy_from_slice(h.as_slice());
    k
}

/// A minimal vmlinux: one PT_LOAD of `code` at physical 16 MiB and, if `pvh`, a Xen
/// PHYS32_ENTRY note pointing 0x40 into it.
fn vmlinux(pvh: bool) -> Vec<u8> {
    let code = vec![0xf4u8; 0x1000];
    let note: Vec<u8> = [4u32, 4, 18]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .chain(*b"Xen\0")
        .chain(0x100_0040u32.to_le_bytes())
        .collect();
    let phnum = if pvh { 2 } else { 1 };
    let data_at = 64 + 56 * phnum;
    let mut e = vec![0u8; data_at];
    e[..4].copy_from_slice(&[0x7f, b'E', b'L', b'F']);
    (e[4], e[5], e[6]) = (2, 1, 1);
    e[16..18].copy_from_slice(&2u16.to_le_bytes());
    e[18..20].copy_from_slice(&62u16.to_le_bytes());
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
    e[32..40].copy_from_slice(&64u64.to_le_bytes());
    e[52..54].copy_from_slice(&64u16.to_le_bytes());
    e[54..56].copy_from_slice(&56u16.to_le_bytes());
    e[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
    let mut ph = |i: usize, kind: u32, off: usize, addr: u64, len: usize| {
        let p = 64 + 56 * i;
        e[p..p + 4].copy_from_slice(&kind.to_le_bytes());
        e[p + 8..p + 16].copy_from_slice(&(off as u64).to_le_bytes());
        e[p + 16..p + 24].copy_from_slice(&(addr | 0xffff_ffff_8000_0000).to_le_bytes());
        e[p + 24..p + 32].copy_from_slice(&addr.to_le_bytes());
        e[p + 32..p + 40].copy_from_slice(&(len as u64).to_le_bytes());
        e[p + 40..p + 48].copy_from_slice(&(len as u64).to_le_bytes());
        e[p + 48..p + 56].copy_from_slice(&4u64.to_le_bytes());
    };
    ph(0, 1, data_at, 0x100_0000, code.len());
    if pvh {
        ph(1, 4, data_at + code.len(), 0, note.len());
    }
    e.extend_from_slice(&code);
    e.extend_from_slice(&note);
    e
}

fn boot(kernel: Vec<u8>, initrd: Option<Vec<u8>>, cmdline: &str) -> LinuxBoot {
    LinuxBoot { kernel: kernel.into(), initrd: initrd.map(Arc::from), cmdline: cmdline.into() }
}

fn mem(size: u64) -> Arc<GuestMemory> {
    Arc::new(GuestMemory::new(size).unwrap())
}

fn read<T: ByteValued + Default>(m: &GuestMemory, addr: u64) -> T {
    let mut v = T::default();
    m.read(addr, v.as_mut_slice()).unwrap();
    v
}

fn cstr(m: &GuestMemory, addr: u64) -> String {
    let mut b = vec![0u8; 256];
    m.read(addr, &mut b).unwrap();
    String::from_utf8(b[..b.iter().position(|&c| c == 0).unwrap()].to_vec()).unwrap()
}

#[test]
fn bzimage_gets_a_zero_page_with_map_initrd_command_line_and_rsdp() {
    let m = mem(64 * MIB);
    let initrd = vec![0x5a; 3 * 4096 + 17];
    let entry = load(&m, 2, &boot(bzimage(0x2000), Some(initrd.clone()), "console=ttyS0 quiet"), false).unwrap();
    assert_eq!(entry, Entry { mode: Mode::Long, rip: 0x10_0200, info: ZERO_PAGE_ADDR });
    let p: boot_params = read(&m, ZERO_PAGE_ADDR);
    assert_eq!(p.hdr.type_of_loader, LOADER_UNDEFINED);
    assert_eq!(p.hdr.cmd_line_ptr as u64, CMDLINE_ADDR);
    assert_eq!(cstr(&m, CMDLINE_ADDR), "console=ttyS0 quiet");
    let map = e820::map(64 * MIB);
    assert_eq!(p.e820_entries as usize, map.len());
    for (got, want) in p.e820_table.iter().zip(&map) {
        let (addr, size, kind) = (got.addr, got.size, got.r#type);
        assert_eq!((addr, size, kind), (want.addr, want.size, want.kind as u32));
    }
    // The initrd sits page-aligned at the top of memory, byte for byte.
    let (addr, size) = (u64::from(p.hdr.ramdisk_image), u64::from(p.hdr.ramdisk_size));
    assert_eq!(size, initrd.len() as u64);
    assert_eq!(addr % 4096, 0);
    assert!(addr + size <= 64 * MIB && addr + size > 64 * MIB - 4096);
    let mut back = vec![0u8; initrd.len()];
    m.read(addr, &mut back).unwrap();
    assert_eq!(back, initrd);
    let rsdp = p.acpi_rsdp_addr;
    assert_eq!(rsdp, ACPI_START);
}

#[test]
fn vmlinux_gets_a_pvh_start_info() {
    let m = mem(64 * MIB);
    let entry = load(&m, 4, &boot(vmlinux(true), Some(vec![1; 100]), "root=/dev/vda"), false).unwrap();
    assert_eq!(entry, Entry { mode: Mode::Pvh, rip: 0x100_0040, info: PVH_INFO_ADDR });
    let info: hvm_start_info = read(&m, PVH_INFO_ADDR);
    assert_eq!((info.magic, info.version), (XEN_HVM_START_MAGIC, 1));
    assert_eq!(cstr(&m, info.cmdline_paddr), "root=/dev/vda");
    assert_eq!(info.rsdp_paddr, ACPI_START);
    let map = e820::map(64 * MIB);
    assert_eq!(info.memmap_entries as usize, map.len());
    for (i, want) in map.iter().enumerate() {
        let got: hvm_memmap_table_entry = read(&m, info.memmap_paddr + 24 * i as u64);
        assert_eq!((got.addr, got.size, got.type_), (want.addr, want.size, want.kind as u32));
    }
    assert_eq!(info.nr_modules, 1);
    let module: hvm_modlist_entry = read(&m, info.modlist_paddr);
    assert_eq!(module.size, 100);
    // The kernel's code is where its program header put it.
    let mut b = [0u8; 1];
    m.read(0x100_0000, &mut b).unwrap();
    assert_eq!(b[0], 0xf4);
    assert!(is_linux_kernel(&vmlinux(true)));
    assert!(is_linux_kernel(&bzimage(16)));
}

#[test]
fn bad_kernels_are_refused_with_the_reason() {
    let m = mem(64 * MIB);
    let err = |k: Vec<u8>| load(&m, 1, &boot(k, None, ""), false).unwrap_err().to_string();
    assert!(err(b"#!/bin/sh\n".to_vec()).contains("neither an ELF vmlinux"));
    assert!(err(vec![]).contains("neither"));
    assert!(err(vmlinux(false)).contains("without a PVH entry note"));
    assert!(!is_linux_kernel(&vmlinux(false)), "a freestanding ELF is not taken for a kernel");
    let mut truncated = vmlinux(true);
    truncated.truncate(200);
    assert!(err(truncated).contains("truncated or malformed"));
    let mut cut = bzimage(0x2000);
    cut.truncate(2 * 512 + 0x100);
    let why = err(cut);
    assert!(why.contains("truncated or malformed") && why.contains("of the"), "{why}");
    let mut old = bzimage(16);
    old[0x236] = 0; // no XLF_KERNEL_64
    assert!(err(old).contains("64-bit entry"));
}

#[test]
fn memory_initrd_and_command_line_limits() {
    // The bzImage decompresses into init_size (4 MiB) from 1 MiB.
    let small = mem(4 * MIB);
    let e = load(&small, 1, &boot(bzimage(16), None, ""), false).unwrap_err();
    assert!(matches!(e, LinuxError::MemoryTooSmall { have: 4, .. }), "{e}");
    let m = mem(16 * MIB);
    let e = load(&m, 1, &boot(bzimage(16), Some(vec![0; 12 << 20]), ""), false).unwrap_err();
    assert!(matches!(e, LinuxError::InitrdTooLarge { .. }), "{e}");
    assert!(e.to_string().contains("does not fit"), "{e}");
    let long = "x".repeat(2048);
    let e = load(&m, 1, &boot(bzimage(16), None, &long), false).unwrap_err();
    assert!(matches!(e, LinuxError::CmdlineTooLong { len: 2048, max: 2047 }), "{e}");
    let e = load(&m, 1, &boot(bzimage(16), None, "a\nb"), false).unwrap_err();
    assert!(matches!(e, LinuxError::Cmdline(_)), "{e}");
}
