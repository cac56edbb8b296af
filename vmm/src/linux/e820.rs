//! The memory map a Linux guest is given (as e820 entries in the zero page for the 64-bit boot
//! protocol, or as the PVH start info's memory map: the same ranges either way).
//!
//! Guest memory is one KVM slot from address 0, so the map describes holes rather than
//! leaving them: the top of conventional memory (an EBDA's place), and the legacy VGA/BIOS
//! area where smpft keeps the ACPI tables (see `layout`).

use super::layout::{ACPI_END, EBDA_START, HIGH_MEMORY};

/// e820 entry types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ram = 1,
    Reserved = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: Kind,
}

impl Entry {
    pub fn end(&self) -> u64 {
        self.addr + self.size
    }

    /// The line Linux prints for this entry at boot (`BIOS-e820: [mem A-B] usable`).
    pub fn linux_line(&self) -> String {
        let what = match self.kind {
            Kind::Ram => "usable",
            Kind::Reserved => "reserved",
        };
        format!("[mem {:#018x}-{:#018x}] {what}", self.addr, self.end() - 1)
    }
}

/// The map for `memory` bytes of guest memory (at least [`HIGH_MEMORY`] plus one page).
pub fn map(memory: u64) -> Vec<Entry> {
    vec![
        Entry { addr: 0, size: EBDA_START, kind: Kind::Ram },
        Entry { addr: EBDA_START, size: ACPI_END - EBDA_START, kind: Kind::Reserved },
        Entry { addr: HIGH_MEMORY, size: memory - HIGH_MEMORY, kind: Kind::Ram },
    ]
}

/// Bytes of RAM in `map`.
pub fn ram(map: &[Entry]) -> u64 {
    map.iter().filter(|e| e.kind == Kind::Ram).map(|e| e.size).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_sorted_disjoint_and_cover_memory() {
        for memory in [2 << 20, 256 << 20, 3 << 30] {
            let m = map(memory);
            assert_eq!(m[0].addr, 0);
            for w in m.windows(2) {
                assert_eq!(w[0].end(), w[1].addr, "{m:?}: contiguous, no overlap");
            }
            assert_eq!(m.last().unwrap().end(), memory);
            assert!(m.iter().all(|e| e.size > 0 && e.addr % 0x400 == 0));
        }
    }

    #[test]
    fn the_legacy_hole_is_reserved_and_the_rest_is_ram() {
        let m = map(256 << 20);
        let at = |a: u64| m.iter().find(|e| e.addr <= a && a < e.end()).unwrap().kind;
        assert_eq!(at(0x7000), Kind::Ram);
        assert_eq!(at(0x9_fc00), Kind::Reserved);
        assert_eq!(at(0xa_0000), Kind::Reserved, "VGA");
        assert_eq!(at(0xe_0000), Kind::Reserved, "ACPI tables");
        assert_eq!(at(crate::layout::VMGENID_ADDR), Kind::Reserved, "VM generation ID");
        assert_eq!(at(crate::layout::VMGENID_ADDR + 15), Kind::Reserved);
        assert_eq!(at(0xf_ffff), Kind::Reserved);
        assert_eq!(at(0x10_0000), Kind::Ram);
        assert_eq!(ram(&m), (256 << 20) - (0x10_0000 - 0x9_fc00));
    }

    #[test]
    fn lines_match_what_linux_prints() {
        let m = map(256 << 20);
        assert_eq!(m[0].linux_line(), "[mem 0x0000000000000000-0x000000000009fbff] usable");
        assert_eq!(m[2].linux_line(), "[mem 0x0000000000100000-0x000000000fffffff] usable");
    }
}
