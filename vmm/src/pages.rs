//! Sets of guest memory pages as they travel in snapshots and checkpoints: captured from memory,
//! validated against a VM's size, and applied to a memory copy. Written once here for both.

use super::dirty::{Bitmap, PAGE_SIZE};
use super::memory::{GuestMemory, MemoryError};

/// Pages of guest memory, by page frame number.
#[derive(Debug, Clone, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct MemoryPages {
    /// Page numbers whose 4 KiB contents follow in `data`, in this order.
    pub pages: Vec<u64>,
    pub data: Vec<u8>,
    /// Page numbers that are all zeroes.
    pub zero_pages: Vec<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PagesError {
    #[error("{pages} pages but {bytes} bytes of data")]
    DataLength { pages: usize, bytes: usize },
    #[error("page {page} is beyond the {mib} MiB of memory")]
    Beyond { page: u64, mib: u64 },
}

/// Checks that page data and page numbers fit a VM of `mem_size` bytes.
fn validate(
    pages: usize,
    data: usize,
    mut numbers: impl Iterator<Item = u64>,
    mem_size: u64,
) -> Result<(), PagesError> {
    if data as u64 != pages as u64 * PAGE_SIZE {
        return Err(PagesError::DataLength { pages, bytes: data });
    }
    let limit = mem_size / PAGE_SIZE;
    match numbers.find(|&p| p >= limit) {
        Some(page) => Err(PagesError::Beyond { page, mib: mem_size >> 20 }),
        None => Ok(()),
    }
}

/// Writes `data` (page after page) at `pages` and zeroes `zero`; the caller validated them.
fn apply(
    mem: &GuestMemory,
    pages: impl Iterator<Item = u64>,
    data: &[u8],
    zero: impl Iterator<Item = u64>,
) -> Result<(), MemoryError> {
    for (page, bytes) in pages.zip(data.chunks_exact(PAGE_SIZE as usize)) {
        mem.write(page * PAGE_SIZE, bytes)?;
    }
    for page in zero {
        mem.fill(page * PAGE_SIZE, PAGE_SIZE, 0)?;
    }
    Ok(())
}

impl MemoryPages {
    pub fn validate(&self, mem_size: u64) -> Result<(), PagesError> {
        let numbers = self.pages.iter().chain(&self.zero_pages).copied();
        validate(self.pages.len(), self.data.len(), numbers, mem_size)
    }

    /// Applies the pages to `mem` (validated first).
    pub fn apply(&self, mem: &GuestMemory) -> Result<(), MemoryError> {
        apply(mem, self.pages.iter().copied(), &self.data, self.zero_pages.iter().copied())
    }

    /// How many pages this set names, with data or zero.
    pub fn count(&self) -> usize {
        self.pages.len() + self.zero_pages.len()
    }
}

impl ArchivedMemoryPages {
    pub fn validate(&self, mem_size: u64) -> Result<(), PagesError> {
        let numbers = self.pages.iter().chain(self.zero_pages.iter()).map(|p| p.to_native());
        validate(self.pages.len(), self.data.len(), numbers, mem_size)
    }

    /// Applies the pages to `mem` in place, without deserializing (validated first).
    pub fn apply(&self, mem: &GuestMemory) -> Result<(), MemoryError> {
        let pages = self.pages.iter().map(|p| p.to_native());
        apply(mem, pages, self.data.as_slice(), self.zero_pages.iter().map(|p| p.to_native()))
    }

    pub fn count(&self) -> usize {
        self.pages.len() + self.zero_pages.len()
    }
}

pub fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: reinterpreting initialised bytes as u64 words; align_to handles alignment.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Copies the pages in `set` (or every non-zero page when `set` is `None`) into `out`.
pub fn copy_pages(mem: &GuestMemory, set: Option<&Bitmap>, out: &mut MemoryPages) -> Result<(), MemoryError> {
    if let Some(set) = set {
        out.data.reserve(set.count() as usize * PAGE_SIZE as usize);
    }
    let mut one = |page: u64, sparse: bool| -> Result<(), MemoryError> {
        let data = mem.page(page)?;
        if is_zero(data) {
            if !sparse {
                out.zero_pages.push(page);
            }
        } else {
            out.pages.push(page);
            out.data.extend_from_slice(data);
        }
        Ok(())
    };
    match set {
        Some(set) => set.iter().try_for_each(|p| one(p, false)),
        None => mem
            .data_ranges()
            .into_iter()
            .try_for_each(|(s, e)| (s / PAGE_SIZE..e.div_ceil(PAGE_SIZE)).try_for_each(|p| one(p, true))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_and_application_agree_for_both_forms() {
        let page = |b: u8| vec![b; PAGE_SIZE as usize];
        let m = MemoryPages { pages: vec![1, 3], data: [page(1), page(3)].concat(), zero_pages: vec![0] };
        assert_eq!(m.validate(4 * PAGE_SIZE), Ok(()));
        assert_eq!(m.validate(3 * PAGE_SIZE), Err(PagesError::Beyond { page: 3, mib: 0 }));
        let mut short = m.clone();
        short.data.truncate(100);
        assert_eq!(short.validate(1 << 20), Err(PagesError::DataLength { pages: 2, bytes: 100 }));

        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&m).unwrap();
        let archived = rkyv::access::<ArchivedMemoryPages, rkyv::rancor::Error>(&bytes).unwrap();
        assert_eq!(archived.validate(3 * PAGE_SIZE), m.validate(3 * PAGE_SIZE));
        for apply_one in [
            |m: &MemoryPages, a: &ArchivedMemoryPages, mem: &GuestMemory| {
                let _ = a;
                m.apply(mem)
            },
            |_: &MemoryPages, a: &ArchivedMemoryPages, mem: &GuestMemory| a.apply(mem),
        ] {
            let mem = GuestMemory::new(1 << 20).unwrap();
            mem.fill(0, PAGE_SIZE, 9).unwrap();
            apply_one(&m, archived, &mem).unwrap();
            let mut b = [0u8; 1];
            mem.read(0, &mut b).unwrap();
            assert_eq!(b[0], 0, "zero pages are zeroed");
            mem.read(3 * PAGE_SIZE, &mut b).unwrap();
            assert_eq!(b[0], 3);
        }
    }
}
