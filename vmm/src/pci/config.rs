//! A type-0 PCI configuration space: the 256-byte header and capability area, with per-byte
//! write masks (so BAR sizing, read-only fields and reserved bits behave as on hardware), BARs,
//! and a capability list.

/// Offsets in the header.
pub const VENDOR_ID: usize = 0x00;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION: usize = 0x08;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const CAPABILITIES: usize = 0x34;
pub const INTERRUPT_PIN: usize = 0x3d;

/// Command register: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
const STATUS_CAPABILITIES: u16 = 1 << 4;

pub const SIZE: usize = 256;

/// A 64-bit, non-prefetchable memory BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// Index of its lower dword (0..=4).
    pub index: usize,
    pub size: u64,
}

/// Identity of a function.
#[derive(Debug, Clone, Copy)]
pub struct Ids {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class, subclass, programming interface.
    pub class: [u8; 3],
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSpace {
    bytes: [u8; SIZE],
    writable: [u8; SIZE],
    bars: Vec<Bar>,
    /// Where the last capability's "next" pointer is.
    last_cap_next: usize,
    /// First free byte of the capability area.
    cap_end: usize,
}

impl ConfigSpace {
    pub fn new(ids: Ids) -> ConfigSpace {
        let mut c = ConfigSpace {
            bytes: [0; SIZE],
            writable: [0; SIZE],
            bars: Vec::new(),
            last_cap_next: CAPABILITIES,
            cap_end: 0x40,
        };
        c.set_u16(VENDOR_ID, ids.vendor);
        c.set_u16(VENDOR_ID + 2, ids.device);
        c.bytes[REVISION] = ids.revision;
        c.bytes[REVISION + 1] = ids.class[2];
        c.bytes[REVISION + 2] = ids.class[1];
        c.bytes[REVISION + 3] = ids.class[0];
        c.bytes[HEADER_TYPE] = 0;
        c.set_u16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        c.set_u16(SUBSYSTEM_VENDOR_ID + 2, ids.subsystem);
        // Command: I/O space, memory space, bus master, interrupt disable.
        c.writable[COMMAND] = 0x07;
        c.writable[COMMAND + 1] = 0x04;
        // Interrupt line is a scratch register for the driver.
        c.writable[INTERRUPT_PIN - 1] = 0xff;
        c
    }

    fn set_u16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_u32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub fn u16_at(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().unwrap_or_default())
    }

    /// Adds a 64-bit memory BAR of `size` bytes (a power of two, at least 4 KiB) at `addr`.
    pub fn add_bar(&mut self, index: usize, size: u64, addr: u64) {
        assert!(index <= 4 && size.is_power_of_two() && size >= 0x1000 && addr % size == 0);
        let at = BAR0 + 4 * index;
        // Type 64-bit (bits 2:1 = 10), not prefetchable.
        let low = (addr as u32 & !0xf) | 0b100;
        self.set_u32(at, low);
        self.set_u32(at + 4, (addr >> 32) as u32);
        let mask = !(size - 1);
        self.writable[at..at + 4].copy_from_slice(&((mask as u32) & !0xf).to_le_bytes());
        self.writable[at + 4..at + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        self.bars.push(Bar { index, size });
    }

    pub fn bars(&self) -> &[Bar] {
        &self.bars
    }

    /// Where BAR `index` is decoded now, if memory decoding is on.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        if self.u16_at(COMMAND) & COMMAND_MEMORY == 0 {
            return None;
        }
        let at = BAR0 + 4 * index;
        let addr = u64::from(self.u32_at(at) & !0xf) | (u64::from(self.u32_at(at + 4)) << 32);
        Some(addr)
    }

    /// The BAR (its index) and the offset in it that decode `len` bytes at `addr`, if any.
    pub fn decode(&self, addr: u64, len: usize) -> Option<(usize, u64)> {
        self.bars.iter().find_map(|bar| {
            let at = self.bar_address(bar.index)?;
            let end = addr.checked_add(len as u64)?;
            // A driver may program a BAR anywhere, even where its end overflows.
            (addr >= at && end <= at.checked_add(bar.size)?).then(|| (bar.index, addr - at))
        })
    }

    /// Appends a capability: `id`, then `body` (the bytes after id and next pointer), with
    /// `writable` masks for the body. Returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        let at = self.cap_end;
        let len = (2 + body.len()).next_multiple_of(4);
        assert!(at + len <= SIZE && writable.len() == body.len());
        self.bytes[at] = id;
        self.bytes[at + 2..at + 2 + body.len()].copy_from_slice(body);
        self.writable[at + 2..at + 2 + body.len()].copy_from_slice(writable);
        self.bytes[self.last_cap_next] = at as u8;
        self.last_cap_next = at + 1;
        self.cap_end = at + len;
        let status = self.u16_at(STATUS) | STATUS_CAPABILITIES;
        self.set_u16(STATUS, status);
        at
    }

    /// Reads `data.len()` bytes (1, 2 or 4) at `offset`; outside the space reads as ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    /// Writes through the masks: read-only bits keep their value.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let at = offset + i;
            if at < SIZE {
                let m = self.writable[at];
                self.bytes[at] = (self.bytes[at] & !m) | (b & m);
            }
        }
    }

    /// The raw bytes, for saving; [`ConfigSpace::load`] takes them back.
    pub fn bytes(&self) -> &[u8; SIZE] {
        &self.bytes
    }

    /// Takes saved bytes back. Only what a driver could have written is taken; the rest (IDs,
    /// layout) stays as this device defines it.
    pub fn load(&mut self, saved: &[u8]) -> Result<(), String> {
        if saved.len() != SIZE {
            return Err(format!("configuration space of {} bytes, not {SIZE}", saved.len()));
        }
        for (at, &b) in saved.iter().enumerate() {
            let m = self.writable[at];
            self.bytes[at] = (self.bytes[at] & !m) | (b & m);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        let ids = Ids {
            vendor: 0x1af4,
            device: 0x1044,
            revision: 1,
            class: [0xff, 0, 0],
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        };
        let mut c = ConfigSpace::new(ids);
        c.add_bar(0, 0x8000, 0xe000_0000);
        c
    }

    fn read32(c: &ConfigSpace, at: usize) -> u32 {
        let mut b = [0; 4];
        c.read(at, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn bar_sizing_and_moving_work_as_on_hardware() {
        let mut c = space();
        assert_eq!(read32(&c, BAR0), 0xe000_0004);
        c.write(BAR0, &0xffff_ffffu32.to_le_bytes());
        c.write(BAR0 + 4, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(read32(&c, BAR0), 0xffff_8004, "size 32 KiB, 64-bit, memory");
        assert_eq!(read32(&c, BAR0 + 4), 0xffff_ffff);
        c.write(BAR0, &0xe001_0000u32.to_le_bytes());
        c.write(BAR0 + 4, &0u32.to_le_bytes());
        assert_eq!(c.bar_address(0), None, "memory decoding is off until the command register says");
        c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0xe001_0000));
        assert_eq!(c.decode(0xe001_7ffc, 4), Some((0, 0x7ffc)));
        assert_eq!(c.decode(0xe001_7ffe, 4), None, "an access running past the BAR");
        assert_eq!(c.decode(0xe000_0000, 4), None, "the old address, below the BAR");
        c.write(BAR0 + 4, &0xffff_ffffu32.to_le_bytes());
        c.write(BAR0, &0xffff_8000u32.to_le_bytes());
        assert_eq!(c.decode(u64::MAX - 3, 4), None, "a BAR whose end overflows decodes nothing");
    }

    #[test]
    fn read_only_fields_and_capabilities() {
        let mut c = space();
        c.write(VENDOR_ID, &[0, 0, 0, 0]);
        assert_eq!(read32(&c, VENDOR_ID), 0x1044_1af4);
        let cap = c.add_capability(0x09, &[1, 2, 3], &[0, 0xff, 0]);
        let second = c.add_capability(0x11, &[0; 10], &[0; 10]);
        assert_eq!(c.bytes()[CAPABILITIES] as usize, cap);
        assert_eq!(c.bytes()[cap + 1] as usize, second);
        assert_eq!(c.u16_at(STATUS) & STATUS_CAPABILITIES, STATUS_CAPABILITIES);
        c.write(cap + 2, &[9, 9, 9]);
        assert_eq!(&c.bytes()[cap + 2..cap + 5], &[1, 9, 3]);
        let mut far = [0u8; 4];
        c.read(254, &mut far);
        assert_eq!(far, [0, 0, 0xff, 0xff], "beyond the space reads as ones");
        let saved = *c.bytes();
        let mut d = space();
        d.add_capability(0x09, &[1, 2, 3], &[0, 0xff, 0]);
        d.add_capability(0x11, &[0; 10], &[0; 10]);
        d.load(&saved).unwrap();
        assert_eq!(d, c);
        assert!(d.load(&[0; 3]).is_err());
    }
}
