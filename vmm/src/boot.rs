//! Builds the 64-bit ring-3 environment every vCPU starts in: identity page tables, GDT, TSS, and
//! the register state (see `layout.rs` for addresses and the boot ABI).

use super::layout::*;
use super::memory::{GuestMemory, MemoryError};
use super::pci::{PCI_MMIO_BASE, PCI_MMIO_SIZE};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs, kvm_xcrs, CpuId};

pub(crate) const PTE_PRESENT: u64 = 1;
pub(crate) const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_PWT: u64 = 1 << 3;
const PTE_PCD: u64 = 1 << 4;
pub(crate) const PTE_HUGE: u64 = 1 << 7;

pub(crate) const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
pub(crate) const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
pub(crate) const CR0_PG: u64 = 1 << 31;
pub(crate) const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
pub(crate) const EFER_LME: u64 = 1 << 8;
pub(crate) const EFER_LMA: u64 = 1 << 10;
/// IOPL=3 (port I/O from ring 3 exits to the VMM) and the always-one bit; interrupts off.
pub const RFLAGS_BOOT: u64 = (3 << 12) | 0x2;

/// XCR0 components smpft enables when the CPU has them: x87, SSE, AVX.
const XCR0_WANTED: u64 = 0b111;

/// Writes the page tables, GDT and TSSs for `vcpus` vCPUs into guest memory.
pub fn write_tables(mem: &GuestMemory, vcpus: u32) -> Result<(), MemoryError> {
    let size = mem.size();
    let gibs = size.div_ceil(1 << 30);
    mem.write_u64(PML4_ADDR, PDPT_ADDR | PTE_PRESENT | PTE_WRITE | PTE_USER)?;
    for g in 0..gibs {
        let pd = PD_ADDR + g * 0x1000;
        mem.write_u64(PDPT_ADDR + g * 8, pd | PTE_PRESENT | PTE_WRITE | PTE_USER)?;
        for i in 0..512u64 {
            let addr = (g << 30) | (i << 21);
            if addr >= size {
                break;
            }
            mem.write_u64(pd + i * 8, addr | PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_HUGE)?;
        }
    }
    // The PCI BAR window, identity, user-accessible and uncached, in the 4th GiB (memory ends
    // below it: see MAX_MEMORY).
    let g = PCI_MMIO_BASE >> 30;
    let pd = PD_ADDR + g * 0x1000;
    mem.write_u64(PDPT_ADDR + g * 8, pd | PTE_PRESENT | PTE_WRITE | PTE_USER)?;
    for addr in (PCI_MMIO_BASE..PCI_MMIO_BASE + PCI_MMIO_SIZE).step_by(1 << 21) {
        let i = (addr >> 21) & 511;
        mem.write_u64(pd + i * 8, addr | PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_HUGE | PTE_PWT | PTE_PCD)?;
    }
    let gdt: [u64; 5] = [
        0,
        0x00af_9b00_0000_ffff, // kernel code, 64-bit
        0x00cf_9300_0000_ffff, // kernel data
        0x00cf_f300_0000_ffff, // user data, DPL 3
        0x00af_fb00_0000_ffff, // user code, 64-bit, DPL 3
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_u64(GDT_ADDR + i as u64 * 8, *d)?;
    }
    for v in 0..vcpus {
        let tss = TSS_ADDR + TSS_SLOT * u64::from(v);
        let (lo, hi) = tss_descriptor(tss);
        let at = GDT_ADDR + u64::from(GDT_TSS0) + 16 * u64::from(v);
        mem.write_u64(at, lo)?;
        mem.write_u64(at + 8, hi)?;
        // rsp0: ring-0 entry would use the bottom of this vCPU's stack (the guest never enters
        // ring 0; a fault ends in a triple fault that the VMM reports).
        mem.write_u64(tss + 4, stack_top(v) - STACK_SIZE / 2)?;
        // Every port allowed: a zeroed I/O permission bitmap (PVM checks the bitmap, not IOPL,
        // for port I/O from ring 3), then the all-ones terminator byte.
        mem.write(tss + 0x66, &(TSS_IOMAP as u16).to_le_bytes())?;
        mem.fill(tss + TSS_IOMAP, 8192, 0)?;
        mem.write(tss + TSS_LIMIT, &[0xff])?;
    }
    Ok(())
}

fn tss_descriptor(base: u64) -> (u64, u64) {
    let limit = TSS_LIMIT;
    let lo = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40) // present, 64-bit available TSS
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    (lo, base >> 32)
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: (selector & 3) as u8,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers for `vcpu`: long mode, paging on, ring 3 segments, its own TSS.
pub fn sregs(mut s: kvm_sregs, vcpu: u32, xsave: bool) -> kvm_sregs {
    s.cs = segment(GDT_USER_CODE, true);
    let data = segment(GDT_USER_DATA, false);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: TSS_ADDR + TSS_SLOT * u64::from(vcpu),
        limit: TSS_LIMIT as u32,
        selector: GDT_TSS0 + 16 * vcpu as u16,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        s: 0,
        ..Default::default()
    };
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = (u64::from(GDT_TSS0) + 16 * u64::from(MAX_VCPUS) - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    s.cr3 = PML4_ADDR;
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | if xsave { CR4_OSXSAVE } else { 0 };
    s.efer = EFER_LME | EFER_LMA;
    s
}

/// General registers at entry: see the boot ABI in `layout.rs`.
pub fn regs(entry: u64, vcpu: u32) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: stack_top(vcpu),
        rdi: u64::from(vcpu),
        rsi: BOOT_INFO_ADDR,
        rflags: RFLAGS_BOOT,
        ..Default::default()
    }
}

/// XCR0 to set, if the CPU supports XSAVE: x87 | SSE | AVX as far as available.
pub fn xcrs(cpuid: &CpuId) -> Option<kvm_xcrs> {
    let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1)?;
    if leaf1.ecx & (1 << 26) == 0 {
        return None;
    }
    let supported =
        cpuid.as_slice().iter().find(|e| e.function == 0xd && e.index == 0).map_or(0b11, |e| u64::from(e.eax));
    let mut xcrs = kvm_xcrs { nr_xcrs: 1, ..Default::default() };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = XCR0_WANTED & supported | 1;
    Some(xcrs)
}

/// The host-supported CPUID adjusted for `vcpu` of `vcpus`: its APIC id, OSXSAVE reflecting
/// CR4, and a topology of one package with one single-threaded core per vCPU (leaves 1, 4, 0xB
/// and 0x1F), whatever the host's own is: a kernel sizes its CPU maps and scheduler domains
/// from these, and they must agree with the MADT.
pub fn cpuid_for(mut cpuid: CpuId, vcpu: u32, vcpus: u32, xsave: bool) -> CpuId {
    let core_bits = 32 - (vcpus.max(1) - 1).leading_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (vcpu << 24);
                e.ebx = (e.ebx & 0xff00_ffff) | (vcpus.min(255) << 16);
                if vcpus > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical processor in the package
                }
                if xsave {
                    e.ecx |= 1 << 27;
                } else {
                    e.ecx &= !(1 << 27);
                }
            }
            // Deterministic cache parameters: cores per package, and who shares each cache
            // (a core's own L1/L2, the package's L3).
            4 if e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { vcpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing.min(0xfff) << 14) | ((vcpus.min(64) - 1) << 26);
            }
            0xb | 0x1f => {
                e.edx = vcpu;
                (e.eax, e.ebx, e.ecx) = match e.index {
                    0 => (0, 1, 1 << 8),                 // SMT: one thread per core
                    1 => (core_bits, vcpus, 2 << 8 | 1), // core: the package's vCPUs
                    i => (0, 0, i),                      // no further levels
                };
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_maps_all_memory_with_user_huge_pages() {
        let mem = GuestMemory::new(1 << 30 | 4 << 20).unwrap();
        write_tables(&mem, 4).unwrap();
        let mut b = [0u8; 8];
        mem.read(PDPT_ADDR + 8, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), (PD_ADDR + 0x1000) | 7);
        mem.read(PD_ADDR + 0x1000 + 8, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), (1 << 30 | 2 << 20) | 0x87);
        // Nothing mapped past the end of memory.
        mem.read(PD_ADDR + 0x1000 + 16, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0);
    }

    #[test]
    fn tss_descriptor_splits_the_base() {
        let (lo, hi) = tss_descriptor(0x1234_5678_9abc_def0);
        assert_eq!(hi, 0x1234_5678);
        assert_eq!((lo >> 16) & 0xff_ffff, 0xbc_def0);
        assert_eq!(lo >> 56, 0x9a);
        assert_eq!((lo >> 40) & 0xff, 0x89);
    }

    #[test]
    fn cpuid_describes_one_core_per_vcpu() {
        use kvm_bindings::kvm_cpuid_entry2;
        let leaf = |function, index, eax| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx: 0xff,
            ecx: 0xff,
            ..Default::default()
        };
        let host = CpuId::from_entries(&[
            leaf(1, 0, 0),
            leaf(4, 0, 0x21),
            leaf(4, 3, 0x63),
            leaf(0xb, 0, 1),
            leaf(0xb, 1, 4),
            leaf(0xb, 2, 0),
        ])
        .unwrap();
        let c = cpuid_for(host, 5, 6, false);
        let get = |f, i| *c.as_slice().iter().find(|e| e.function == f && e.index == i).unwrap();
        assert_eq!(get(1, 0).ebx >> 24, 5, "initial APIC id");
        assert_eq!((get(1, 0).ebx >> 16) & 0xff, 6);
        assert_eq!((get(0xb, 0).eax, get(0xb, 0).ebx, get(0xb, 0).ecx, get(0xb, 0).edx), (0, 1, 0x100, 5));
        assert_eq!((get(0xb, 1).eax, get(0xb, 1).ebx, get(0xb, 1).ecx), (3, 6, 0x201), "6 vCPUs need 3 id bits");
        assert_eq!(get(0xb, 2).ecx, 2, "no level past the core");
        assert_eq!((get(4, 0).eax >> 26, (get(4, 0).eax >> 14) & 0xfff), (5, 0), "L1: per core");
        assert_eq!((get(4, 3).eax >> 14) & 0xfff, 5, "L3: shared by the package");
        assert_eq!(get(4, 3).eax & 0x3fff, 0x63);
    }

    #[test]
    fn entry_registers_follow_the_boot_abi() {
        let r = regs(0x20_1000, 3);
        assert_eq!((r.rip, r.rdi, r.rsi), (0x20_1000, 3, BOOT_INFO_ADDR));
        assert_eq!(r.rsp, stack_top(3));
        assert_eq!(r.rflags & (1 << 9), 0, "interrupts must stay off");
        let s = sregs(kvm_sregs::default(), 3, true);
        assert_eq!(s.cs.dpl, 3);
        assert_eq!(s.tr.selector, GDT_TSS0 + 48);
    }
}
