//! Loader for the static, non-PIE x86-64 ELF executables smpft runs as guests.

use super::layout::IMAGE_MIN;
use super::memory::GuestMemory;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoaderError {
    #[error("not an ELF file")]
    NotElf,
    #[error("not a 64-bit little-endian x86-64 ELF file")]
    WrongArch,
    #[error("not a static executable (ELF type {0}); build the guest non-PIE with -C relocation-model=static")]
    NotExecutable(u16),
    #[error("ELF file is truncated or has out-of-range headers")]
    Truncated,
    #[error("ELF file has no loadable segments")]
    NoSegments,
    #[error("segment at {vaddr:#x} is below {min:#x}, which smpft reserves for page tables and stacks", min = IMAGE_MIN)]
    BelowImageMin { vaddr: u64 },
    #[error("segment at {vaddr:#x}+{memsz:#x} has a file size larger than its memory size")]
    BadSegment { vaddr: u64, memsz: u64 },
    #[error("entry point {0:#x} is not inside a loadable segment")]
    BadEntry(u64),
    #[error("guest memory of {have} MiB is too small for the guest image, which needs {need} MiB")]
    TooSmall { need: u64, have: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// A parsed, validated guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub entry: u64,
    pub segments: Vec<Segment>,
}

fn field<const N: usize>(b: &[u8], off: usize) -> Result<[u8; N], LoaderError> {
    let end = off.checked_add(N).ok_or(LoaderError::Truncated)?;
    b.get(off..end).and_then(|s| s.try_into().ok()).ok_or(LoaderError::Truncated)
}
fn u16_at(b: &[u8], off: usize) -> Result<u16, LoaderError> {
    field(b, off).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], off: usize) -> Result<u32, LoaderError> {
    field(b, off).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], off: usize) -> Result<u64, LoaderError> {
    field(b, off).map(u64::from_le_bytes)
}

const PT_LOAD: u32 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;

impl Image {
    pub fn parse(elf: &[u8]) -> Result<Image, LoaderError> {
        if elf.len() < 4 || &elf[..4] != b"\x7fELF" {
            return Err(LoaderError::NotElf);
        }
        if elf.len() < 64 {
            return Err(LoaderError::Truncated);
        }
        if elf[4] != 2 || elf[5] != 1 || u16_at(elf, 18)? != EM_X86_64 {
            return Err(LoaderError::WrongArch);
        }
        let etype = u16_at(elf, 16)?;
        if etype != ET_EXEC {
            return Err(LoaderError::NotExecutable(etype));
        }
        let entry = u64_at(elf, 24)?;
        let phoff = u64_at(elf, 32)?;
        let phentsize = u64::from(u16_at(elf, 54)?);
        let phnum = u64::from(u16_at(elf, 56)?);
        if phentsize < 56 {
            return Err(LoaderError::Truncated);
        }
        let mut segments = Vec::new();
        for i in 0..phnum {
            let at = phoff
                .checked_add(i * phentsize)
                .filter(|&a| a.checked_add(phentsize).is_some())
                .ok_or(LoaderError::Truncated)?;
            let at = usize::try_from(at).map_err(|_| LoaderError::Truncated)?;
            if u32_at(elf, at)? != PT_LOAD {
                continue;
            }
            let seg = Segment {
                offset: u64_at(elf, at + 8)?,
                vaddr: u64_at(elf, at + 16)?,
                filesz: u64_at(elf, at + 32)?,
                memsz: u64_at(elf, at + 40)?,
            };
            if seg.memsz == 0 {
                continue;
            }
            if seg.filesz > seg.memsz || seg.vaddr.checked_add(seg.memsz).is_none() {
                return Err(LoaderError::BadSegment { vaddr: seg.vaddr, memsz: seg.memsz });
            }
            match seg.offset.checked_add(seg.filesz) {
                Some(end) if end <= elf.len() as u64 => {}
                _ => return Err(LoaderError::Truncated),
            }
            if seg.vaddr < IMAGE_MIN {
                return Err(LoaderError::BelowImageMin { vaddr: seg.vaddr });
            }
            segments.push(seg);
        }
        if segments.is_empty() {
            return Err(LoaderError::NoSegments);
        }
        if !segments.iter().any(|s| entry >= s.vaddr && entry < s.vaddr + s.memsz) {
            return Err(LoaderError::BadEntry(entry));
        }
        Ok(Image { entry, segments })
    }

    /// One past the highest byte the image occupies.
    pub fn end(&self) -> u64 {
        self.segments.iter().map(|s| s.vaddr + s.memsz).max().unwrap_or(IMAGE_MIN)
    }

    /// Copies the segments into guest memory and zeroes their BSS.
    pub fn load(&self, elf: &[u8], mem: &GuestMemory) -> Result<(), LoaderError> {
        let have = mem.size();
        let too_small = || LoaderError::TooSmall { need: self.end().div_ceil(1 << 20), have: have >> 20 };
        for s in &self.segments {
            let file = &elf[s.offset as usize..(s.offset + s.filesz) as usize];
            mem.write(s.vaddr, file).map_err(|_| too_small())?;
            mem.fill(s.vaddr + s.filesz, s.memsz - s.filesz, 0).map_err(|_| too_small())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF with one PT_LOAD segment of `code` at `vaddr`.
    pub(crate) fn tiny_elf(vaddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[6] = 1;
        e[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        e[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        e[24..32].copy_from_slice(&vaddr.to_le_bytes());
        e[32..40].copy_from_slice(&64u64.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        e[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        e[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
        e[ph + 16..ph + 24].copy_from_slice(&vaddr.to_le_bytes());
        e[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        e[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        e.extend_from_slice(code);
        e
    }

    #[test]
    fn parses_and_loads_with_bss_zeroed() {
        let elf = tiny_elf(0x20_0000, &[0x90, 0xf4], 0x2000);
        let img = Image::parse(&elf).unwrap();
        assert_eq!(img.entry, 0x20_0000);
        assert_eq!(img.end(), 0x20_2000);
        let mem = GuestMemory::new(4 << 20).unwrap();
        mem.fill(0x20_0000, 0x2000, 0xaa).unwrap();
        img.load(&elf, &mem).unwrap();
        let mut b = [0u8; 4];
        mem.read(0x20_0000, &mut b).unwrap();
        assert_eq!(b, [0x90, 0xf4, 0, 0]);
    }

    #[test]
    fn rejects_bad_files() {
        assert_eq!(Image::parse(b"hello"), Err(LoaderError::NotElf));
        assert_eq!(Image::parse(b"\x7fELF"), Err(LoaderError::Truncated));
        let good = tiny_elf(0x20_0000, &[0x90], 0x1000);
        let mut bad = good.clone();
        bad[4] = 1;
        assert_eq!(Image::parse(&bad), Err(LoaderError::WrongArch));
        let mut pie = good.clone();
        pie[16] = 3;
        assert_eq!(Image::parse(&pie), Err(LoaderError::NotExecutable(3)));
        assert_eq!(Image::parse(&good[..good.len() - 1]), Err(LoaderError::Truncated));
        let low = tiny_elf(0x1000, &[0x90], 0x1000);
        assert_eq!(Image::parse(&low), Err(LoaderError::BelowImageMin { vaddr: 0x1000 }));
        let mut entry = good.clone();
        entry[24..32].copy_from_slice(&0x90_0000u64.to_le_bytes());
        assert_eq!(Image::parse(&entry), Err(LoaderError::BadEntry(0x90_0000)));
        let mut phoff = good;
        phoff[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(Image::parse(&phoff), Err(LoaderError::Truncated));
    }

    #[test]
    fn too_small_memory_is_reported_in_mib() {
        let elf = tiny_elf(0x30_0000, &[0x90], 0x10_0000);
        let img = Image::parse(&elf).unwrap();
        let mem = GuestMemory::new(2 << 20).unwrap();
        assert_eq!(img.load(&elf, &mem), Err(LoaderError::TooSmall { need: 4, have: 2 }));
    }
}
