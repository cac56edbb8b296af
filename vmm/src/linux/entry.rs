//! The CPU state a Linux kernel is entered in: 32-bit protected mode without paging for the
//! PVH entry (`ebx` = start info), or 64-bit long mode on identity page tables for the 64-bit
//! boot protocol (`rsi` = zero page). Only the boot vCPU is set up; the others wait for the
//! kernel's INIT/SIPI in the state KVM creates them in.

use super::layout::*;
use crate::boot::{CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, PTE_HUGE, PTE_PRESENT, PTE_WRITE};
use crate::memory::{GuestMemory, MemoryError};
use kvm_bindings::{kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PVH: 32-bit flat protected mode, paging off, `ebx` = the `hvm_start_info`.
    Pvh,
    /// The 64-bit boot protocol: long mode, identity-mapped, `rsi` = the zero page.
    Long,
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub mode: Mode,
    pub rip: u64,
    /// The boot information's address (`ebx` for PVH, `rsi` for the 64-bit protocol).
    pub info: u64,
}

/// Flat 4 GiB descriptors (granularity 4 KiB, limit 0xfffff): 32-bit code, 64-bit code, data.
const GDT: [u64; 4] = [0, 0x00cf_9b00_0000_ffff, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
/// The TSS descriptor KVM needs for a valid TR (base 0, limit 0x67, busy 32-bit TSS).
const GDT_TSS_DESC: u64 = 0x0000_8b00_0000_0067;

/// Writes the boot GDT and the identity page tables (the first 4 GiB, 2 MiB pages).
pub fn write_tables(mem: &GuestMemory) -> Result<(), MemoryError> {
    for (i, d) in GDT.iter().chain([&GDT_TSS_DESC]).enumerate() {
        mem.write_u64(GDT_ADDR + 8 * i as u64, *d)?;
    }
    mem.write_u64(PML4_ADDR, PDPT_ADDR | PTE_PRESENT | PTE_WRITE)?;
    for g in 0..4u64 {
        let pd = PD_ADDR + g * 0x1000;
        mem.write_u64(PDPT_ADDR + 8 * g, pd | PTE_PRESENT | PTE_WRITE)?;
        for i in 0..512u64 {
            mem.write_u64(pd + 8 * i, (g << 30 | i << 21) | PTE_PRESENT | PTE_WRITE | PTE_HUGE)?;
        }
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The boot vCPU's special registers for `mode`.
pub fn sregs(mut s: kvm_sregs, mode: Mode) -> kvm_sregs {
    let data = segment(GDT_DATA, 0x3, false);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.tr = kvm_segment { base: 0, limit: 0x67, selector: GDT_TSS, type_: 0xb, present: 1, ..Default::default() };
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = (8 * 5 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    match mode {
        Mode::Pvh => {
            s.cs = segment(GDT_CODE32, 0xb, false);
            s.cr0 = CR0_PE | CR0_ET;
            s.cr3 = 0;
            s.cr4 = 0;
            s.efer = 0;
        }
        Mode::Long => {
            s.cs = segment(GDT_CODE64, 0xb, true);
            s.cr0 = CR0_PE | CR0_ET | CR0_PG;
            s.cr3 = PML4_ADDR;
            s.cr4 = CR4_PAE;
            s.efer = EFER_LME | EFER_LMA;
        }
    }
    s
}

/// The boot vCPU's general registers: interrupts off, the boot information where `mode`
/// wants it.
pub fn regs(entry: &Entry) -> kvm_regs {
    let mut r = kvm_regs { rip: entry.rip, rflags: 0x2, ..Default::default() };
    match entry.mode {
        Mode::Pvh => r.rbx = entry.info,
        Mode::Long => r.rsi = entry.info,
    }
    r
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const DELIVERY_EXTINT: u32 = 0b111 << 8;
const DELIVERY_NMI: u32 = 0b100 << 8;

/// Local interrupts wired as on a PC: LINT0 takes the 8259's interrupts (ExtINT), LINT1 is
/// NMI, for a kernel that runs with the PICs before it sets up the IOAPIC.
pub fn wire_lints(mut lapic: kvm_lapic_state) -> kvm_lapic_state {
    let mut set = |at: usize, mode: u32| {
        let b: [u8; 4] = std::array::from_fn(|i| lapic.regs[at + i] as u8);
        let v = (u32::from_le_bytes(b) & !(0b111 << 8)) | mode;
        for (i, byte) in v.to_le_bytes().into_iter().enumerate() {
            lapic.regs[at + i] = byte as _;
        }
    };
    set(APIC_LVT_LINT0, DELIVERY_EXTINT);
    set(APIC_LVT_LINT1, DELIVERY_NMI);
    lapic
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem = GuestMemory::new(1 << 20).unwrap();
        write_tables(&mem).unwrap();
        let read = |a: u64| {
            let mut b = [0u8; 8];
            mem.read(a, &mut b).unwrap();
            u64::from_le_bytes(b)
        };
        assert_eq!(read(PML4_ADDR), PDPT_ADDR | 3);
        assert_eq!(read(PDPT_ADDR + 24), (PD_ADDR + 0x3000) | 3);
        assert_eq!(read(PD_ADDR + 0x3000 + 8 * 511), (0xffe0_0000) | 0x83);
        assert_eq!(read(GDT_ADDR + u64::from(GDT_CODE64)), GDT[2]);
        assert_eq!(read(GDT_ADDR + u64::from(GDT_DATA)), GDT[3]);
    }

    #[test]
    fn pvh_entry_is_flat_32_bit_without_paging() {
        let e = Entry { mode: Mode::Pvh, rip: 0x100_0000, info: PVH_INFO_ADDR };
        let s = sregs(kvm_sregs::default(), e.mode);
        assert_eq!((s.cs.selector, s.cs.db, s.cs.l), (GDT_CODE32, 1, 0));
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.efer, 0);
        let r = regs(&e);
        assert_eq!((r.rip, r.rbx, r.rsi), (0x100_0000, PVH_INFO_ADDR, 0));
    }

    #[test]
    fn long_entry_follows_the_64_bit_boot_protocol() {
        let e = Entry { mode: Mode::Long, rip: 0x10_0200, info: ZERO_PAGE_ADDR };
        let s = sregs(kvm_sregs::default(), e.mode);
        assert_eq!((s.cs.selector, s.cs.l, s.ds.selector), (0x10, 1, 0x18), "__BOOT_CS and __BOOT_DS");
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_ADDR);
        let r = regs(&e);
        assert_eq!((r.rsi, r.rflags & (1 << 9)), (ZERO_PAGE_ADDR, 0));
    }

    #[test]
    fn lints_are_wired_for_the_pics_and_nmi() {
        let l = wire_lints(kvm_lapic_state::default());
        assert_eq!(l.regs[APIC_LVT_LINT0 + 1] as u8, 0b111);
        assert_eq!(l.regs[APIC_LVT_LINT1 + 1] as u8, 0b100);
    }
}
