//! The ACPI tables smpft gives a Linux guest, built with the rust-vmm `acpi_tables` crate (the
//! table layouts, checksums and the AML encoder Cloud Hypervisor uses) rather than by hand:
//!
//! - RSDP → XSDT → FADT, MADT (and DSDT from the FADT);
//! - FADT: a hardware-reduced platform (no SCI, PM timer or fixed event registers: the
//!   machine has none), with a sleep control register at [`SLEEP_CONTROL_PORT`] through which
//!   the guest powers off;
//! - MADT: one local APIC per vCPU (APIC id = vCPU index, as CPUID says), KVM's IOAPIC, and the
//!   PC-AT compatible flag (KVM's in-kernel dual 8259 is there);
//! - FADT: the reset register ([`RESET_PORT`], the PC's reset control register at 0xCF9, and
//!   [`RESET_VALUE`]), through which the guest reboots;
//! - DSDT: the PCI host bridge (bus 0, configuration mechanism #1 at 0xCF8, the BAR window),
//!   COM1 with IRQ 4, `\_S5` for power-off, and the power button: a Generic Event Device
//!   (ACPI0013, the hardware-reduced way to signal events) on [`GED_IRQ`] whose `_EVT` reads
//!   the pending events at [`GED_PORT`] and notifies the power button device (PNP0C0C), which
//!   Linux's ACPI button driver turns into a KEY_POWER press; with a VM generation ID, the
//!   device `VGEN` Linux's `vmgenid` driver and Windows bind to (`_CID` "VM_Gen_Counter",
//!   `ADDR` giving the GUID's address as a package of two 32-bit halves, see `crate::vmgenid`).
//!
//! No MCFG: the PCI bus offers no ECAM, only port I/O configuration.

use super::layout::{ACPI_END, ACPI_START, ACPI_TABLES_END};
use crate::memory::{GuestMemory, MemoryError};
use crate::pci::{CONFIG_ADDRESS, PCI_MMIO_BASE, PCI_MMIO_SIZE};
use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, And, Device, EISAName, Field, FieldAccessType, FieldEntry, FieldLockRule,
    FieldUpdateRule, If, Interrupt, Local, Method, Name, Notify, OpRegion, OpRegionSpace, Package, Path,
    ResourceTemplate, Return, Store, Zero, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

const OEM_ID: [u8; 6] = *b"SMPFT ";
const OEM_TABLE: [u8; 8] = *b"SMPFTVM ";
const OEM_REVISION: u32 = 1;

/// The guest writes `SLP_TYP << 2 | SLP_EN` here to enter a sleep state (S5 = power off).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// Sleep status (reads as zero: the machine never wakes).
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// `SLP_TYP` of S5 in `\_S5` (and what a power-off writes).
pub const S5_SLP_TYP: u8 = 5;
/// `SLP_EN` in the sleep control register.
pub const SLP_EN: u8 = 1 << 5;

/// The reset control register, as on a PC's chipset: writing [`RESET_VALUE`] (bit 2: reset
/// the CPU; bit 1: a hard reset) resets the machine.
pub use boot_abi::{RESET_PORT, RESET_VALUE};
/// The Generic Event Device's event register: reading it returns the pending events and
/// clears them.
pub const GED_PORT: u16 = 0x610;
/// The GED's interrupt (an IOAPIC pin no other device uses).
pub const GED_IRQ: u32 = 9;
/// GED event bit: the power button was pressed.
pub const GED_POWER_BUTTON: u8 = 1;

pub const LAPIC_BASE: u32 = 0xfee0_0000;
pub const IOAPIC_BASE: u32 = 0xfec0_0000;
/// MADT flag: the machine also has dual 8259 PICs.
const MADT_PCAT_COMPAT: u32 = 1;
const COM1_IRQ: u32 = crate::layout::COM1_IRQ;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables need {need} bytes; {have} fit between {ACPI_START:#x} and {ACPI_TABLES_END:#x}")]
    TooLarge { need: usize, have: u64 },
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The tables as they are laid out from [`ACPI_START`]: (address, bytes), RSDP first; the
/// DSDT has the VM generation ID device if `vmgenid`.
pub fn tables(vcpus: u32, vmgenid: bool) -> Vec<(u64, Vec<u8>)> {
    let mut at = ACPI_START;
    let mut out = Vec::new();
    let mut place = |t: Vec<u8>| {
        let addr = at;
        at = (at + t.len() as u64).next_multiple_of(16);
        out.push((addr, t));
        addr
    };
    // The RSDP goes first (at a 16-byte boundary, where a scan of the BIOS area finds it);
    // its XSDT address is known once the others are placed, and patched in below.
    let rsdp_addr = place(vec![0; Rsdp::len()]);
    let dsdt = place(dsdt(vmgenid));
    let fadt = place(fadt(dsdt));
    let madt = place(madt(vcpus));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    let xsdt = place(bytes(&xsdt));
    out[0] = (rsdp_addr, bytes(&Rsdp::new(OEM_ID, xsdt)));
    out
}

/// Writes the tables into guest memory and returns the RSDP's address.
pub fn write(mem: &GuestMemory, vcpus: u32, vmgenid: bool) -> Result<u64, AcpiError> {
    let tables = tables(vcpus, vmgenid);
    let (last, t) = tables.last().expect("the RSDP at least");
    let end = last + t.len() as u64;
    if end > ACPI_TABLES_END {
        return Err(AcpiError::TooLarge { need: (end - ACPI_START) as usize, have: ACPI_TABLES_END - ACPI_START });
    }
    mem.fill(ACPI_START, ACPI_END - ACPI_START, 0)?;
    for (addr, t) in &tables {
        mem.write(*addr, t)?;
    }
    Ok(tables[0].0)
}

fn io_port(port: u16) -> GAS {
    GAS::new(GasSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(port))
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup)
        .preferred_pm_profile(PmProfile::EnterpriseServer);
    f.sleep_control_reg = io_port(SLEEP_CONTROL_PORT);
    f.sleep_status_reg = io_port(SLEEP_STATUS_PORT);
    f.reset_reg = io_port(RESET_PORT);
    f.reset_value = RESET_VALUE;
    bytes(&f.finalize())
}

fn madt(vcpus: u32) -> Vec<u8> {
    let mut m = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE, OEM_REVISION);
    m.write_u32(36, LAPIC_BASE);
    m.write_u32(40, MADT_PCAT_COMPAT);
    for i in 0..vcpus {
        // APIC ids and processor UIDs fit a byte: smpft runs at most 16 vCPUs.
        ProcessorLocalApic::new(i as u8, i as u8, EnabledStatus::Enabled).to_aml_bytes(&mut m);
    }
    // The IOAPIC's id follows the local APICs' (ids share one space); GSIs from 0.
    IoApic::new(vcpus as u8, IOAPIC_BASE, 0).to_aml_bytes(&mut m);
    m.update_checksum();
    m.as_slice().to_vec()
}

fn dsdt(vmgenid: bool) -> Vec<u8> {
    let mut d = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, OEM_REVISION);
    let mmio_end = (PCI_MMIO_BASE + PCI_MMIO_SIZE - 1) as u32;
    // Each object is encoded in the statement that builds it (the builders borrow their parts).
    Device::new(
        "_SB_.PCI0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_ADR".into(), &0u8),
            &Name::new("_SEG".into(), &0u8),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_BBN".into(), &0u8),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &AddressSpace::<u16>::new_bus_number(0, 0),
                    &IO::new(CONFIG_ADDRESS, CONFIG_ADDRESS, 1, 8),
                    &AddressSpace::<u16>::new_io(0, CONFIG_ADDRESS - 1, None),
                    &AddressSpace::<u16>::new_io(0xd00, 0xffff, None),
                    &AddressSpace::<u32>::new_memory(
                        AddressSpaceCacheable::NotCacheable,
                        true,
                        PCI_MMIO_BASE as u32,
                        mmio_end,
                        None,
                    ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut d);
    Device::new(
        "_SB_.COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &1u8),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &IO::new(crate::layout::COM1_BASE, crate::layout::COM1_BASE, 1, 8),
                    &Interrupt::new(true, true, false, false, COM1_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut d);
    Name::new("_S5_".into(), &Package::new(vec![&S5_SLP_TYP])).to_aml_bytes(&mut d);
    power_button(&mut d);
    if vmgenid {
        vmgenid_device(&mut d);
    }
    d.update_checksum();
    d.as_slice().to_vec()
}

/// The power button (PNP0C0C) and the Generic Event Device that signals it.
fn power_button(d: &mut Sdt) {
    Device::new(
        "_SB_.PWRB".into(),
        vec![&Name::new("_HID".into(), &EISAName::new("PNP0C0C")), &Name::new("_UID".into(), &0u8)],
    )
    .to_aml_bytes(d);
    let (port, bit) = (u64::from(GED_PORT), u64::from(GED_POWER_BUTTON));
    let (local, pressed) = (Local(0), And::new(&Zero {}, &Local(0), &bit));
    Device::new(
        "_SB_.GED_".into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_CRS".into(), &ResourceTemplate::new(vec![&Interrupt::new(true, true, false, false, GED_IRQ)])),
            &OpRegion::new("GDST".into(), OpRegionSpace::SystemIO, &port, &1u8),
            &Field::new(
                "GDST".into(),
                FieldAccessType::Byte,
                FieldLockRule::NoLock,
                FieldUpdateRule::WriteAsZeroes,
                vec![FieldEntry::Named(*b"GDAT", 8)],
            ),
            &Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &Store::new(&local, &Path::new("GDAT")),
                    &If::new(&pressed, vec![&Notify::new(&Path::new("\\_SB_.PWRB"), &0x80u8)]),
                ],
            ),
        ],
    )
    .to_aml_bytes(d);
}

/// The VM generation ID device (Microsoft's "Virtual Machine Generation ID" device: `_CID`
/// "VM_Gen_Counter", which ACPICA upper-cases to the "VM_GEN_COUNTER" Linux matches, and an
/// `ADDR` method returning the GUID's address as two 32-bit halves, low first). The GUID's place
/// is fixed, so `ADDR` returns constants; nothing notifies the guest, since the ID only changes
/// while the VM is not running (a restore).
fn vmgenid_device(d: &mut Sdt) {
    let addr = crate::vmgenid::ADDR;
    let (lo, hi) = (addr as u32, (addr >> 32) as u32);
    Device::new(
        "_SB_.VGEN".into(),
        vec![
            &Name::new("_HID".into(), &"SMPF0001"),
            &Name::new("_CID".into(), &"VM_Gen_Counter"),
            &Name::new("_DDN".into(), &"VM_Gen_Counter"),
            &Method::new("_STA".into(), 0, false, vec![&Return::new(&0xfu8)]),
            &Method::new("ADDR".into(), 0, false, vec![&Return::new(&Package::new(vec![&lo, &hi]))]),
        ],
    )
    .to_aml_bytes(d);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }
    fn find<'a>(t: &'a [(u64, Vec<u8>)], sig: &[u8]) -> &'a (u64, Vec<u8>) {
        t.iter().find(|(_, b)| &b[..sig.len()] == sig).unwrap()
    }

    #[test]
    fn every_table_sums_to_zero_and_states_its_length() {
        let t = tables(4, true);
        let (_, rsdp) = &t[0];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(rsdp), 0, "extended checksum");
        assert_eq!(u32_at(rsdp, 20) as usize, rsdp.len());
        for (addr, b) in &t[1..] {
            assert_eq!(u32_at(b, 4) as usize, b.len(), "{}", String::from_utf8_lossy(&b[..4]));
            assert_eq!(sum(b), 0, "{} checksum", String::from_utf8_lossy(&b[..4]));
            assert_eq!(addr % 16, 0);
            assert_eq!(&b[10..16], &OEM_ID);
        }
    }

    #[test]
    fn the_pointers_lead_from_the_rsdp_to_every_table() {
        let t = tables(2, true);
        assert_eq!(t[0].0, ACPI_START, "the RSDP is where a scan of the BIOS area starts");
        let xsdt = find(&t, b"XSDT");
        assert_eq!(u64_at(&t[0].1, 24), xsdt.0);
        let entries: Vec<u64> = (36..xsdt.1.len()).step_by(8).map(|o| u64_at(&xsdt.1, o)).collect();
        assert_eq!(entries, vec![find(&t, b"FACP").0, find(&t, b"APIC").0]);
        let fadt = &find(&t, b"FACP").1;
        assert_eq!(u64_at(fadt, 140), find(&t, b"DSDT").0, "X_DSDT");
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0, "hardware-reduced");
        // SLEEP_CONTROL_REG (GAS at 244): system I/O at the port the VMM serves.
        assert_eq!((fadt[244], u64_at(fadt, 248)), (1, u64::from(SLEEP_CONTROL_PORT)));
        // RESET_REG (GAS at 116), RESET_VALUE (128), and the flag that says they are there.
        assert_eq!((fadt[116], u64_at(fadt, 120), fadt[128]), (1, u64::from(RESET_PORT), RESET_VALUE));
        assert_ne!(u32_at(fadt, 112) & (1 << 10), 0, "RESET_REG_SUP");
        assert!(t.iter().all(|(a, b)| a + b.len() as u64 <= ACPI_END));
    }

    #[test]
    fn madt_has_one_enabled_local_apic_per_vcpu_and_the_ioapic() {
        for vcpus in [1, 2, 7, 16] {
            let t = tables(vcpus, false);
            let m = &find(&t, b"APIC").1;
            assert_eq!(u32_at(m, 36), LAPIC_BASE);
            assert_eq!(u32_at(m, 40), MADT_PCAT_COMPAT);
            let mut at = 44;
            let mut lapics = Vec::new();
            let mut ioapics = Vec::new();
            while at < m.len() {
                let (kind, len) = (m[at], m[at + 1] as usize);
                match kind {
                    0 => lapics.push((m[at + 2], m[at + 3], u32_at(m, at + 4))),
                    1 => ioapics.push((m[at + 2], u32_at(m, at + 4), u32_at(m, at + 8))),
                    other => panic!("unexpected MADT entry {other}"),
                }
                at += len;
            }
            assert_eq!(at, m.len());
            let want: Vec<_> = (0..vcpus as u8).map(|i| (i, i, 1)).collect();
            assert_eq!(lapics, want);
            assert_eq!(ioapics, vec![(vcpus as u8, IOAPIC_BASE, 0)]);
        }
    }

    #[test]
    fn dsdt_names_the_pci_bridge_com1_and_s5() {
        let t = tables(1, false);
        let d = &find(&t, b"DSDT").1;
        let has = |s: &[u8]| d.windows(s.len()).any(|w| w == s);
        for name in [&b"PCI0"[..], b"COM1", b"_S5_", b"_CRS", b"_HID"] {
            assert!(has(name), "{}", String::from_utf8_lossy(name));
        }
        assert!(!has(b"VGEN") && !has(b"VM_Gen_Counter"), "no VM generation ID unless asked for");
        // PNP0A03 and PNP0501 as compressed EISA ids.
        assert!(has(&[0x41, 0xd0, 0x0a, 0x03]));
        assert!(has(&[0x41, 0xd0, 0x05, 0x01]));
    }

    #[test]
    fn dsdt_has_the_power_button_and_the_generic_event_device_that_signals_it() {
        let t = tables(1, false);
        let d = &find(&t, b"DSDT").1;
        let has = |s: &[u8]| d.windows(s.len()).any(|w| w == s);
        for name in [&b"PWRB"[..], b"GED_", b"ACPI0013\0", b"GDST", b"GDAT", b"_EVT"] {
            assert!(has(name), "{}", String::from_utf8_lossy(name));
        }
        assert!(has(&[0x41, 0xd0, 0x0c, 0x0c]), "PNP0C0C as a compressed EISA id");
        // The GED's interrupt: an extended IRQ descriptor (edge, active high) for GED_IRQ.
        assert!(has(&[0x89, 6, 0, 0x03, 1, GED_IRQ as u8, 0, 0, 0]));
        // OperationRegion (GDST, SystemIO, GED_PORT, 1).
        let port = GED_PORT.to_le_bytes();
        assert!(has(&[0x5b, 0x80, b'G', b'D', b'S', b'T', 0x01, 0x0b, port[0], port[1], 0x01]));
        // Notify (\_SB_.PWRB, 0x80).
        assert!(has(&[0x86, b'\\', 0x2e, b'_', b'S', b'B', b'_', b'P', b'W', b'R', b'B', 0x0a, 0x80]));
    }

    #[test]
    fn dsdt_has_the_vm_generation_id_device_linux_binds_to() {
        let t = tables(2, true);
        let d = &find(&t, b"DSDT").1;
        let has = |s: &[u8]| d.windows(s.len()).any(|w| w == s);
        assert!(has(b"VGEN"));
        // _CID "VM_Gen_Counter" (a string: 0x0d ... NUL), and _HID a string too.
        assert!(has(b"_CID\x0dVM_Gen_Counter\0"));
        assert!(has(b"_HID\x0dSMPF0001\0"));
        // Method ADDR, no arguments: Return (Package (2) { 0xef000 (a DWord), 0 }).
        let addr = crate::vmgenid::ADDR as u32;
        let mut ret = vec![0xa4, 0x12, 0x08, 0x02, 0x0c];
        ret.extend(addr.to_le_bytes());
        ret.push(0x00);
        assert!(has(b"ADDR\x00"), "a method with no arguments, not serialized");
        assert!(has(&ret), "ADDR returns the GUID's address in two halves");
        assert_eq!(sum(d), 0);
    }

    #[test]
    fn tables_fit_and_are_written_where_they_say() {
        let mem = GuestMemory::new(4 << 20).unwrap();
        let rsdp = write(&mem, 16, true).unwrap();
        let mut b = [0u8; 8];
        mem.read(rsdp, &mut b).unwrap();
        assert_eq!(&b, b"RSD PTR ");
    }
}
