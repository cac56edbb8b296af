//! The snapshot file format.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "SMPFTSNP"
//!      8     4  format version (little endian)
//!     12     4  CRC-32 of the payload
//!     16     8  payload length
//!     24     …  payload: an rkyv archive of `Snapshot`, validated (bytecheck) before use
//! ```
//!
//! Memory is sparse: a full snapshot holds only pages that are not zero; an incremental one holds
//! the pages dirtied since its parent (pages that became zero are listed, not stored).

pub use crate::vmm::machine::MachineState;
pub use crate::vmm::pages::MemoryPages;
use std::path::Path;

pub const MAGIC: [u8; 8] = *b"SMPFTSNP";
/// 2: the machine state holds every component by name (1 had a fixed serial field).
pub const FORMAT_VERSION: u32 = 2;
const HEADER: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not an smpft snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot format version {found} is not supported (this smpft reads version {supported})", supported = FORMAT_VERSION)]
    Version { found: u32 },
    #[error("snapshot is truncated: {got} bytes of {want}")]
    Truncated { got: u64, want: u64 },
    #[error("snapshot is corrupt: checksum mismatch")]
    Checksum,
    #[error("snapshot is corrupt: {0}")]
    Invalid(String),
    #[error("cannot encode snapshot: {0}")]
    Encode(String),
}

/// One snapshot: a full one (`parent == None`) or an increment on top of `parent`.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Snapshot {
    /// Unique id of this snapshot.
    pub id: u64,
    /// The snapshot this one is an increment on, or `None` for a full snapshot.
    pub parent: Option<u64>,
    /// 0 for a full snapshot, n for the n-th increment in a chain.
    pub seq: u32,
    pub vcpus: u32,
    pub mem_size: u64,
    pub state: MachineState,
    pub memory: MemoryPages,
}

pub fn encode(s: &Snapshot) -> Result<Vec<u8>, FormatError> {
    let payload = rkyv::to_bytes::<rkyv::rancor::Error>(s).map_err(|e| FormatError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

pub fn decode(bytes: &[u8]) -> Result<Snapshot, FormatError> {
    if bytes.len() < 8 || bytes[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    if bytes.len() < HEADER {
        return Err(FormatError::Truncated { got: bytes.len() as u64, want: HEADER as u64 });
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or_default());
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { found: version });
    }
    let crc = u32_at(12);
    let len = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or_default());
    let have = (bytes.len() - HEADER) as u64;
    if have < len {
        return Err(FormatError::Truncated { got: bytes.len() as u64, want: (HEADER as u64).saturating_add(len) });
    }
    if have > len {
        return Err(FormatError::Invalid(format!("{} bytes of trailing data", have - len)));
    }
    let payload = &bytes[HEADER..];
    if crc32fast::hash(payload) != crc {
        return Err(FormatError::Checksum);
    }
    crate::vmm::component::from_archive::<Snapshot>(payload).map_err(|e| FormatError::Invalid(e.to_string()))
}

pub fn write_file(path: &Path, s: &Snapshot) -> Result<u64, std::io::Error> {
    let bytes = encode(s).map_err(std::io::Error::other)?;
    // Write to a temporary file and rename, so a crash never leaves a half-written snapshot
    // under the final name.
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, &bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(bytes.len() as u64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::vmm::state::VmState;

    pub(crate) fn sample(id: u64, parent: Option<u64>, seq: u32) -> Snapshot {
        Snapshot {
            id,
            parent,
            seq,
            vcpus: 2,
            mem_size: 1 << 20,
            state: MachineState {
                cpus: vec![],
                vm: VmState { pic_master: vec![1], pic_slave: vec![2], ioapic: vec![3], pit: vec![4], clock: vec![5] },
                components: vec![],
            },
            memory: MemoryPages { pages: vec![3], data: vec![7; 4096], zero_pages: vec![5] },
        }
    }

    #[test]
    fn round_trip() {
        let s = sample(1, None, 0);
        assert_eq!(decode(&encode(&s).unwrap()).unwrap(), s);
    }

    #[test]
    fn rejects_damaged_files() {
        let good = encode(&sample(1, None, 0)).unwrap();
        assert!(matches!(decode(b"hello world, not a snapshot"), Err(FormatError::BadMagic)));
        assert!(matches!(decode(&good[..10]), Err(FormatError::Truncated { .. })));
        assert!(matches!(decode(&good[..good.len() - 1]), Err(FormatError::Truncated { .. })));
        let mut v = good.clone();
        v[8] = 9;
        assert!(matches!(decode(&v), Err(FormatError::Version { found: 9 })));
        let mut c = good.clone();
        let last = c.len() - 1;
        c[last] ^= 0x40;
        assert!(matches!(decode(&c), Err(FormatError::Checksum)));
        let mut t = good.clone();
        t.push(0);
        assert!(matches!(decode(&t), Err(FormatError::Invalid(_))));
        // A payload with a valid checksum but garbage inside fails validation, not a panic.
        let mut g = good;
        let n = g.len();
        for b in &mut g[HEADER..n] {
            *b = 0xff;
        }
        let crc = crc32fast::hash(&g[HEADER..]);
        g[12..16].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&g), Err(FormatError::Invalid(_))));
    }

    /// Found by `cargo fuzz run snapshot_file`: a header claiming a payload of 2^64 - 1 bytes
    /// overflowed the length in the error.
    #[test]
    fn absurd_length_is_reported_not_overflowed() {
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        v.extend_from_slice(&[0xff; 4]);
        v.extend_from_slice(&u64::MAX.to_le_bytes());
        v.extend_from_slice(b"junk");
        assert!(matches!(decode(&v), Err(FormatError::Truncated { want: u64::MAX, .. })));
    }
}
