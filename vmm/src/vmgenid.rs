//! The VM generation ID (Microsoft's "Virtual Machine Generation ID", QEMU's `-device vmgenid`):
//! a 16-byte GUID in guest memory that changes when the VM is started again from a snapshot, so
//! a guest that was copied or rolled back reseeds its random number generator and its
//! directory services notice (Windows; Linux's `vmgenid` driver feeds it to the RNG).
//!
//! The GUID in guest memory is the truth: it travels with memory in every checkpoint and
//! snapshot, so it stays the same across a failover or switchover (the same VM goes on), and
//! smpft writes a new one when a snapshot is restored (`--restore`). It lives at
//! [`ADDR`] (`boot_abi::VMGENID_ADDR`) in both guest layouts: where the test guest reads it,
//! and where a Linux guest's DSDT device `VGEN` says it is (see `linux::acpi`).
//!
//! In memory the GUID is laid out as Windows' `GUID` structure: the first three fields
//! (32, 16, 16 bits) little-endian, the last eight bytes as written. The text form is the
//! usual `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (QEMU's `guid=`, libvirt's `<genid>`).

use crate::component::Component;
use crate::memory::{GuestMemory, MemoryError};
use std::fmt;
use std::str::FromStr;

/// Where the GUID is in guest memory.
pub const ADDR: u64 = crate::layout::VMGENID_ADDR;
/// Its size.
pub const SIZE: usize = 16;

/// A GUID, its bytes in text order (big-endian fields, as the string reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid(pub [u8; 16]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx, hexadecimal) or auto")]
pub struct GuidError(pub String);

/// Swaps a GUID between text order and the in-memory order (first three fields little-endian);
/// its own inverse. SMBIOS stores the system UUID the same way.
pub fn swap_fields(mut b: [u8; 16]) -> [u8; 16] {
    b[..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b
}

impl Guid {
    /// A random GUID (version 4, RFC 4122 variant), from getrandom(2).
    pub fn random() -> Guid {
        let mut b = [0u8; 16];
        let mut at = 0;
        while at < b.len() {
            // SAFETY: getrandom writes at most `b.len() - at` bytes at `b[at..]`.
            let n = unsafe { libc::getrandom(b[at..].as_mut_ptr().cast(), b.len() - at, 0) };
            if n > 0 {
                at += n as usize;
            } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                // No getrandom (never on Linux ≥ 3.17): the clock and the process id still
                // make a GUID no other start gives.
                let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                b[..8].copy_from_slice(&(t.as_nanos() as u64).to_le_bytes());
                b[8..12].copy_from_slice(&std::process::id().to_le_bytes());
                break;
            }
        }
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Guid(b)
    }

    /// The bytes a guest reads.
    pub fn to_memory(self) -> [u8; 16] {
        swap_fields(self.0)
    }

    pub fn from_memory(b: [u8; 16]) -> Guid {
        Guid(swap_fields(b))
    }

    /// All zero: what memory holds where no GUID was written.
    pub fn is_nil(self) -> bool {
        self.0 == [0; 16]
    }
}

impl FromStr for Guid {
    type Err = GuidError;

    fn from_str(s: &str) -> Result<Guid, GuidError> {
        crate::smbios::parse_uuid(s).map(Guid).map_err(|_| GuidError(s.to_string()))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The VM generation ID device asked for: a given GUID, or `auto` (a random one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmGenId {
    Auto,
    Guid(Guid),
}

impl FromStr for VmGenId {
    type Err = GuidError;

    fn from_str(s: &str) -> Result<VmGenId, GuidError> {
        if s == "auto" {
            Ok(VmGenId::Auto)
        } else {
            s.parse().map(VmGenId::Guid)
        }
    }
}

impl VmGenId {
    /// The GUID to write: the one given, or a new random one.
    pub fn guid(self) -> Guid {
        match self {
            VmGenId::Auto => Guid::random(),
            VmGenId::Guid(g) => g,
        }
    }
}

/// Writes `guid` where the guest reads it (marked dirty, so the next checkpoint carries it).
pub fn write(mem: &GuestMemory, guid: Guid) -> Result<(), MemoryError> {
    mem.write(ADDR, &guid.to_memory())
}

/// The GUID the guest sees now.
pub fn read(mem: &GuestMemory) -> Result<Guid, MemoryError> {
    let mut b = [0u8; SIZE];
    mem.read(ADDR, &mut b)?;
    Ok(Guid::from_memory(b))
}

/// The device as a component: no state of its own (the GUID is in guest memory), but its
/// entry in a snapshot or checkpoint says the VM has the device, so a restore or a standby
/// builds the same VM.
pub struct VmGenIdDevice;

impl Component for VmGenIdDevice {
    fn name(&self) -> &'static str {
        "vmgenid"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "c773c261-d800-4348-9f5d-167fadd53cf8";

    #[test]
    fn text_and_memory_orders_are_qemus() {
        let g: Guid = TEXT.parse().unwrap();
        assert_eq!(g.0[..4], [0xc7, 0x73, 0xc2, 0x61]);
        // The first three fields little-endian, the rest as written (QEMU's qemu_uuid_bswap).
        let mem = [0x61, 0xc2, 0x73, 0xc7, 0x00, 0xd8, 0x48, 0x43, 0x9f, 0x5d, 0x16, 0x7f, 0xad, 0xd5, 0x3c, 0xf8];
        assert_eq!(g.to_memory(), mem);
        assert_eq!(Guid::from_memory(mem), g);
        assert_eq!(g.to_string(), TEXT);
        assert_eq!("C773C261-D800-4348-9F5D-167FADD53CF8".parse::<Guid>().unwrap(), g, "either case");
    }

    #[test]
    fn malformed_guids_are_refused_naming_them() {
        for bad in [
            "",
            "c773c261d80043489f5d167fadd53cf8",
            "c773c261-d800-4348-9f5d-167fadd53cf",
            "c773c261-d800-4348-9f5d-167fadd53cf8a",
            "c773c261-d800-4348-9f5d1-67fadd53cf8",
            "g773c261-d800-4348-9f5d-167fadd53cf8",
            "+773c261-d800-4348-9f5d-167fadd53cf8",
            "AUTO",
        ] {
            let e = bad.parse::<VmGenId>().unwrap_err().to_string();
            assert!(e.starts_with(&format!("'{bad}' is not a GUID")), "{bad}: {e}");
        }
        assert_eq!("auto".parse::<VmGenId>().unwrap(), VmGenId::Auto);
        assert_eq!(TEXT.parse::<VmGenId>().unwrap(), VmGenId::Guid(TEXT.parse().unwrap()));
    }

    #[test]
    fn random_guids_are_version_4_and_differ() {
        let (a, b) = (Guid::random(), Guid::random());
        assert_ne!(a, b);
        for g in [a, b] {
            let s = g.to_string();
            assert_eq!(s.as_bytes()[14], b'4', "{s}");
            assert!(matches!(s.as_bytes()[19], b'8' | b'9' | b'a' | b'b'), "{s}");
            assert_eq!(s.parse::<Guid>().unwrap(), g);
        }
        assert_eq!(VmGenId::Guid(a).guid(), a);
        assert_ne!(VmGenId::Auto.guid(), VmGenId::Auto.guid());
    }

    #[test]
    fn the_guid_is_written_and_read_where_the_guest_looks() {
        let mem = GuestMemory::new(2 << 20).unwrap();
        assert!(read(&mem).unwrap().is_nil(), "no device: zeroes");
        let g: Guid = TEXT.parse().unwrap();
        write(&mem, g).unwrap();
        let mut raw = [0u8; 16];
        mem.read(boot_abi::VMGENID_ADDR, &mut raw).unwrap();
        assert_eq!(raw, g.to_memory());
        assert_eq!(read(&mem).unwrap(), g);
    }
}
