//! MSI-X: the vector table and pending-bit array a device exposes in a BAR, and delivery of a
//! vector as the MSI the guest programmed (synchronously, see `vmm::irq`).

use crate::irq::Irq;
use std::sync::Arc;

/// MSI-X capability ID.
pub const CAP_ID: u8 = 0x11;
/// Message Control bits (in the capability, offset 2).
pub const ENABLE: u16 = 1 << 15;
pub const FUNCTION_MASK: u16 = 1 << 14;
/// "No vector" in virtio's vector registers.
pub const NO_VECTOR: u16 = 0xffff;
const ENTRY: usize = 16;
const MASKED: u32 = 1;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Entry {
    pub address: u64,
    pub data: u32,
    pub control: u32,
}

/// A device's MSI-X table and pending bits.
#[derive(Debug)]
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    irq: Option<Arc<Irq>>,
}

/// What MSI-X saves: the table and the pending bits (the enable and mask bits live in the
/// configuration space, saved with it).
#[derive(Debug, Clone, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct MsixState {
    pub entries: Vec<Entry>,
    pub pending: Vec<bool>,
}

impl Msix {
    pub fn new(vectors: u16, irq: Option<Arc<Irq>>) -> Msix {
        let n = usize::from(vectors);
        Msix { entries: vec![Entry { control: MASKED, ..Default::default() }; n], pending: vec![false; n], irq }
    }

    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// The capability body (after ID and next pointer) for a table at `table` and pending bits
    /// at `pba` in BAR `bar`, with its write masks (only Message Control's enable and mask).
    pub fn capability(vectors: u16, bar: u8, table: u32, pba: u32) -> (Vec<u8>, Vec<u8>) {
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&(vectors - 1).to_le_bytes());
        body.extend_from_slice(&(table | u32::from(bar)).to_le_bytes());
        body.extend_from_slice(&(pba | u32::from(bar)).to_le_bytes());
        let mut writable = vec![0u8; body.len()];
        writable[1] = ((ENABLE | FUNCTION_MASK) >> 8) as u8;
        (body, writable)
    }

    pub fn table_len(&self) -> usize {
        self.entries.len() * ENTRY
    }

    pub fn read_table(&self, offset: usize, data: &mut [u8]) {
        let mut bytes = [0u8; ENTRY];
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i;
            *b = match self.entries.get(at / ENTRY) {
                Some(e) => {
                    bytes[..8].copy_from_slice(&e.address.to_le_bytes());
                    bytes[8..12].copy_from_slice(&e.data.to_le_bytes());
                    bytes[12..].copy_from_slice(&e.control.to_le_bytes());
                    bytes[at % ENTRY]
                }
                None => 0xff,
            };
        }
    }

    /// A table write; unmasking a vector with its pending bit set delivers it.
    pub fn write_table(&mut self, offset: usize, data: &[u8], active: bool) {
        for (i, &b) in data.iter().enumerate() {
            let at = offset + i;
            let Some(e) = self.entries.get_mut(at / ENTRY) else { continue };
            let mut bytes = [0u8; ENTRY];
            bytes[..8].copy_from_slice(&e.address.to_le_bytes());
            bytes[8..12].copy_from_slice(&e.data.to_le_bytes());
            bytes[12..].copy_from_slice(&e.control.to_le_bytes());
            bytes[at % ENTRY] = b;
            e.address = u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default());
            e.data = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
            e.control = u32::from_le_bytes(bytes[12..].try_into().unwrap_or_default()) & MASKED;
        }
        if active {
            self.deliver_pending();
        }
    }

    pub fn read_pba(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let first = (offset + i) * 8;
            *b = (0..8)
                .filter(|bit| self.pending.get(first + bit).copied().unwrap_or(false))
                .fold(0, |acc, bit| acc | 1 << bit);
        }
    }

    /// Raises `vector`: delivered if MSI-X is `active` (enabled, function not masked) and the
    /// vector is unmasked, else left pending. False if there is no such vector.
    pub fn signal(&mut self, vector: u16, active: bool) -> bool {
        let v = usize::from(vector);
        let Some(e) = self.entries.get(v) else { return false };
        if active && e.control & MASKED == 0 {
            if let Some(irq) = &self.irq {
                irq.msi(e.address, e.data);
            }
        } else {
            self.pending[v] = true;
        }
        true
    }

    /// Delivers every pending vector that is now unmasked (after an unmask or enable).
    pub fn deliver_pending(&mut self) {
        for v in 0..self.entries.len() {
            if self.pending[v] && self.entries[v].control & MASKED == 0 {
                self.pending[v] = false;
                if let Some(irq) = &self.irq {
                    irq.msi(self.entries[v].address, self.entries[v].data);
                }
            }
        }
    }

    pub fn save(&self) -> MsixState {
        MsixState { entries: self.entries.clone(), pending: self.pending.clone() }
    }

    pub fn restore(&mut self, s: &MsixState) -> Result<(), String> {
        if s.entries.len() != self.entries.len() || s.pending.len() != self.pending.len() {
            return Err(format!("MSI-X state has {} vectors, the device {}", s.entries.len(), self.entries.len()));
        }
        self.entries.clone_from(&s.entries);
        self.pending.clone_from(&s.pending);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips_and_masked_vectors_stay_pending() {
        let mut m = Msix::new(2, None);
        let mut b = [0u8; 4];
        m.read_table(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1, "vectors start masked");
        m.write_table(16, &0xfee0_0000u32.to_le_bytes(), true);
        m.write_table(24, &0x4041u32.to_le_bytes(), true);
        m.read_table(16, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xfee0_0000);
        assert!(m.signal(1, true));
        let mut pba = [0u8; 1];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10, "masked: pending");
        m.write_table(28, &0u32.to_le_bytes(), true);
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0, "unmasking delivered it");
        assert!(!m.signal(7, true), "no such vector");
        let mut other = Msix::new(2, None);
        other.restore(&m.save()).unwrap();
        assert_eq!(other.save(), m.save());
        assert!(Msix::new(3, None).restore(&m.save()).is_err());
        m.read_table(1000, &mut b);
        assert_eq!(b, [0xff; 4]);
    }
}
