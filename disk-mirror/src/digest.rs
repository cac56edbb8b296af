//! Block digests for `--disk-sync compare`: a standby that already holds a copy of the disk
//! (an earlier standby's, or an image copied by hand) hashes it, block by block, and sends the
//! hashes; the primary hashes its own blocks during the initial copy and sends only those that
//! differ. Hashes are BLAKE3, 128 bits of it per block.

use block::{Backend, BackendError};

/// The smallest hashed block; larger disks use larger blocks so a digest stays small.
pub const MIN_BLOCK: u64 = 64 << 10;
/// At most this many hashes per disk (so a digest is at most 1 MiB).
pub const MAX_HASHES: u64 = 1 << 16;
/// How much one read covers.
const READ: u64 = 4 << 20;

pub type Hash = [u8; 16];

/// One disk's block hashes.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Digest {
    pub size: u64,
    pub block: u64,
    pub hashes: Vec<Hash>,
}

/// The hashed block size for a disk of `size` bytes: a power of two.
pub fn block_size(size: u64) -> u64 {
    size.div_ceil(MAX_HASHES).next_power_of_two().max(MIN_BLOCK)
}

fn hash(data: &[u8]) -> Hash {
    let mut h = [0u8; 16];
    h.copy_from_slice(&blake3::hash(data).as_bytes()[..16]);
    h
}

/// Hashes blocks `first..first + count` of `disk` (block size `block`); the last block of the
/// disk may be short.
pub fn hash_blocks(disk: &dyn Backend, block: u64, first: u64, count: u64) -> Result<Vec<Hash>, BackendError> {
    let size = disk.size();
    let mut out = Vec::with_capacity(count as usize);
    let per_read = (READ / block).max(1);
    let mut buf = vec![0u8; (per_read * block) as usize];
    let mut b = first;
    while b < first + count {
        let offset = b * block;
        if offset >= size {
            break;
        }
        let n = per_read.min(first + count - b);
        let len = (n * block).min(size - offset) as usize;
        disk.read_at(&mut buf[..len], offset)?;
        out.extend(buf[..len].chunks(block as usize).map(hash));
        b += n;
    }
    Ok(out)
}

/// The digest of a whole disk.
pub fn digest(disk: &dyn Backend) -> Result<Digest, BackendError> {
    let size = disk.size();
    let block = block_size(size);
    let hashes = hash_blocks(disk, block, 0, size.div_ceil(block))?;
    Ok(Digest { size, block, hashes })
}

impl Digest {
    /// Whether the digest is well formed for a disk of `size` bytes (it comes from the peer).
    pub fn fits(&self, size: u64) -> bool {
        self.size == size
            && self.block.is_power_of_two()
            && self.block >= MIN_BLOCK
            && self.hashes.len() as u64 == size.div_ceil(self.block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::backend::RawFile;

    #[test]
    fn digests_find_exactly_the_blocks_that_differ() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let size = 10 * MIN_BLOCK + 100;
        for p in [&a, &b] {
            std::fs::write(p, vec![7u8; size as usize]).unwrap();
        }
        let (da, db) = (RawFile::open(&a, false).unwrap(), RawFile::open(&b, false).unwrap());
        db.write_at(&[1], 3 * MIN_BLOCK + 5).unwrap();
        db.write_at(&[1], 10 * MIN_BLOCK + 99).unwrap();
        let (ga, gb) = (digest(&da).unwrap(), digest(&db).unwrap());
        assert_eq!((ga.block, ga.hashes.len()), (MIN_BLOCK, 11), "the last block is short");
        assert!(ga.fits(size) && !ga.fits(size + 1));
        let differ: Vec<usize> = (0..11).filter(|&i| ga.hashes[i] != gb.hashes[i]).collect();
        assert_eq!(differ, vec![3, 10]);
        assert_eq!(hash_blocks(&db, MIN_BLOCK, 3, 2).unwrap(), gb.hashes[3..5].to_vec());
        assert_eq!(block_size(1 << 40), (1 << 40) / MAX_HASHES);
        assert_eq!(block_size(1 << 20), MIN_BLOCK);
    }
}
