//! How checkpoint pages travel: fewer bytes for the same pages.
//!
//! - A page of zeroes is a page number only (the capture already finds them).
//! - A page sent before is sent as a *delta*: the byte ranges that changed since the version last
//!   sent, as runs of `[offset: u16][len: u16][bytes]`, unchanged stretches skipped. The standby
//!   holds exactly the version last sent (its copy of memory), so it patches the ranges in place.
//!   The primary keeps the versions it sent in a bounded cache ([`PageCache`], CLOCK eviction, an
//!   approximation of least recently used); a page not in the cache goes whole.
//! - LZ4 then compresses a page, or its delta, where that pays (at least 1/8 smaller).
//!
//! Encoding runs on the sender thread, after the vCPUs resumed, on the pages the capture copied.
//! The standby decodes everything when it validates a checkpoint, before acknowledging it: a
//! malformed page (a bad LZ4 block, runs out of order or past the page) makes the checkpoint
//! invalid, never a panic, and an acknowledged checkpoint always applies.

use crate::vmm::dirty::PAGE_SIZE;
use crate::vmm::memory::{GuestMemory, MemoryError};
use crate::vmm::pages::MemoryPages;
use std::collections::HashMap;

const PAGE: usize = PAGE_SIZE as usize;

/// `--ft-compress`: how pages are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Compression {
    /// Whole pages (zero pages are still only numbers).
    None,
    /// Whole pages, LZ4-compressed where it pays.
    Lz4,
    /// Deltas against the version last sent, then LZ4 where it pays.
    #[default]
    Delta,
}

const PLAIN: u8 = 0;
const LZ4: u8 = 1;
const DELTA: u8 = 2;
const DELTA_LZ4: u8 = 3;

/// Pages as they travel in a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct EncodedPages {
    /// Page numbers, each with its encoding and encoded length; the encoded bytes follow one
    /// another in `data`.
    pub pages: Vec<u64>,
    pub kinds: Vec<u8>,
    pub lens: Vec<u32>,
    pub data: Vec<u8>,
    /// Pages that are all zeroes.
    pub zero_pages: Vec<u64>,
}

impl EncodedPages {
    /// Pages as they are, unencoded.
    pub fn plain(m: MemoryPages) -> EncodedPages {
        let n = m.pages.len();
        EncodedPages {
            pages: m.pages,
            kinds: vec![PLAIN; n],
            lens: vec![PAGE as u32; n],
            data: m.data,
            zero_pages: m.zero_pages,
        }
    }

    pub fn count(&self) -> usize {
        self.pages.len() + self.zero_pages.len()
    }
}

/// The versions of pages last sent, up to a fixed number, evicted by CLOCK.
pub struct PageCache {
    data: Vec<u8>,
    owner: Vec<u64>,
    referenced: Vec<bool>,
    slot: HashMap<u64, usize>,
    hand: usize,
}

const FREE: u64 = u64::MAX;

impl PageCache {
    /// A cache of `bytes` bytes (whole pages; at least one).
    pub fn new(bytes: u64) -> PageCache {
        let n = (bytes / PAGE_SIZE).max(1) as usize;
        PageCache {
            data: vec![0; n * PAGE],
            owner: vec![FREE; n],
            referenced: vec![false; n],
            slot: HashMap::with_capacity(n),
            hand: 0,
        }
    }

    fn get(&mut self, page: u64) -> Option<&[u8]> {
        let s = *self.slot.get(&page)?;
        self.referenced[s] = true;
        Some(&self.data[s * PAGE..(s + 1) * PAGE])
    }

    fn put(&mut self, page: u64, bytes: &[u8]) {
        let s = match self.slot.get(&page) {
            Some(&s) => s,
            None => {
                // CLOCK: pass over recently used slots once, take the first that was not.
                while self.referenced[self.hand] {
                    self.referenced[self.hand] = false;
                    self.hand = (self.hand + 1) % self.owner.len();
                }
                let s = self.hand;
                self.hand = (self.hand + 1) % self.owner.len();
                if self.owner[s] != FREE {
                    self.slot.remove(&self.owner[s]);
                }
                self.owner[s] = page;
                self.slot.insert(page, s);
                s
            }
        };
        self.referenced[s] = true;
        self.data[s * PAGE..(s + 1) * PAGE].copy_from_slice(bytes);
    }

    fn remove(&mut self, page: u64) {
        if let Some(s) = self.slot.remove(&page) {
            self.owner[s] = FREE;
            self.referenced[s] = false;
        }
    }
}

/// Appends the ranges where `new` differs from `old` as runs; `None` once that is no smaller
/// than the page.
fn delta(old: &[u8], new: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    const BLOCK: usize = 64;
    // Most of a page rewritten: a delta would not pay (and comparing 64-byte blocks is cheap).
    let changed = old.chunks_exact(BLOCK).zip(new.chunks_exact(BLOCK)).filter(|(a, b)| a != b).count();
    if changed > PAGE / BLOCK * 3 / 4 {
        return None;
    }
    let start = out.len();
    let word = |b: &[u8], i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or_default());
    let differs = |i: usize| word(old, i) != word(new, i);
    let n = PAGE / 8;
    let mut i = 0;
    while i < n {
        // Whole unchanged blocks are skipped at memcmp speed.
        if i % (BLOCK / 8) == 0 && old[i * 8..i * 8 + BLOCK] == new[i * 8..i * 8 + BLOCK] {
            i += BLOCK / 8;
            continue;
        }
        if !differs(i) {
            i += 1;
            continue;
        }
        // A run of changed words; a gap of one unchanged word is cheaper inside the run than as
        // a new run's 4-byte header.
        let first = i;
        let mut last = i;
        while i < n && (differs(i) || (i + 1 < n && differs(i + 1))) {
            if differs(i) {
                last = i;
            }
            i += 1;
        }
        let (off, end) = (first * 8, (last + 1) * 8);
        out.extend_from_slice(&(off as u16).to_le_bytes());
        out.extend_from_slice(&((end - off) as u16).to_le_bytes());
        out.extend_from_slice(&new[off..end]);
        if out.len() - start >= PAGE {
            out.truncate(start);
            return None;
        }
    }
    Some(out.len() - start)
}

/// Replaces `out[start..]` by its LZ4 block if that is at least 1/8 smaller; whether it did.
fn lz4_in_place(out: &mut Vec<u8>, start: usize, scratch: &mut Vec<u8>) -> bool {
    let len = out.len() - start;
    scratch.resize(lz4_flex::block::get_maximum_output_size(len), 0);
    match lz4_flex::block::compress_into(&out[start..], scratch) {
        Ok(n) if n < len - len / 8 => {
            out.truncate(start);
            out.extend_from_slice(&scratch[..n]);
            true
        }
        _ => false,
    }
}

/// Figures of what was encoded.
#[derive(Debug, Default, Clone, Copy)]
pub struct EncodeStats {
    /// Bytes of the dirty pages (4 KiB each, zero pages included), and what they became (a zero
    /// page counts its 8-byte number).
    pub raw: u64,
    pub encoded: u64,
    pub cpu: std::time::Duration,
}

/// The primary's encoder: one per standby (its cache mirrors that standby's memory).
pub struct Encoder {
    mode: Compression,
    cache: Option<PageCache>,
    scratch: Vec<u8>,
}

impl Encoder {
    pub fn new(mode: Compression, cache_bytes: u64) -> Encoder {
        let cache = (mode == Compression::Delta).then(|| PageCache::new(cache_bytes));
        Encoder { mode, cache, scratch: Vec::new() }
    }

    /// Encodes the pages of one checkpoint or pre-copy round.
    pub fn encode(&mut self, m: MemoryPages) -> (EncodedPages, EncodeStats) {
        let started = std::time::Instant::now();
        let zero = m.zero_pages.len() as u64;
        let raw = m.data.len() as u64 + zero * PAGE_SIZE;
        if self.mode == Compression::None {
            let encoded = m.data.len() as u64 + zero * 8;
            let e = EncodedPages::plain(m);
            return (e, EncodeStats { raw, encoded, cpu: started.elapsed() });
        }
        let n = m.pages.len();
        let mut e = EncodedPages {
            pages: m.pages,
            kinds: Vec::with_capacity(n),
            lens: Vec::with_capacity(n),
            data: Vec::with_capacity(m.data.len() / 2),
            zero_pages: m.zero_pages,
        };
        for (&page, new) in e.pages.iter().zip(m.data.chunks_exact(PAGE)) {
            let start = e.data.len();
            let mut kind = PLAIN;
            if let Some(old) = self.cache.as_mut().and_then(|c| c.get(page)) {
                if delta(old, new, &mut e.data).is_some() {
                    kind = DELTA;
                }
            }
            if kind == PLAIN {
                e.data.extend_from_slice(new);
            }
            if e.data.len() - start > 64 && lz4_in_place(&mut e.data, start, &mut self.scratch) {
                kind = if kind == DELTA { DELTA_LZ4 } else { LZ4 };
            }
            e.kinds.push(kind);
            e.lens.push((e.data.len() - start) as u32);
            if let Some(c) = self.cache.as_mut() {
                c.put(page, new);
            }
        }
        if let Some(c) = self.cache.as_mut() {
            e.zero_pages.iter().for_each(|&p| c.remove(p));
        }
        let stats = EncodeStats { raw, encoded: e.data.len() as u64 + zero * 8, cpu: started.elapsed() };
        (e, stats)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("{pages} pages but {kinds} encodings and {lens} lengths")]
    Shape { pages: usize, kinds: usize, lens: usize },
    #[error("page lengths add up to {sum} bytes, the data has {data}")]
    Length { sum: u64, data: usize },
    #[error("page {page} is beyond the {mib} MiB of memory")]
    Beyond { page: u64, mib: u64 },
    #[error("page {page}: {why}")]
    Page { page: u64, why: String },
}

/// A checkpoint's pages, decoded and checked: whole pages and patches (each either still in the
/// received bytes or, when it came LZ4-compressed, unpacked here), and zero pages. Pages sent
/// plain or as plain deltas are not copied again: they are applied from the received bytes.
#[derive(Debug, Default)]
pub struct Decoded {
    /// (page, whole page or patch runs, where its bytes are).
    pages: Vec<(u64, Form, Bytes)>,
    unpacked: Vec<u8>,
    zero: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Whole,
    Patch,
}

/// A range of the received page data, or of [`Decoded::unpacked`].
#[derive(Debug, Clone)]
enum Bytes {
    Sent(std::ops::Range<usize>),
    Unpacked(std::ops::Range<usize>),
}

/// Checks that `runs` are well formed: increasing, non-empty, inside the page.
fn check_runs(runs: &[u8]) -> Result<(), String> {
    let mut at = 0usize;
    let mut next_free = 0usize;
    while at < runs.len() {
        let head = runs.get(at..at + 4).ok_or("a run header is cut short")?;
        let off = u16::from_le_bytes([head[0], head[1]]) as usize;
        let len = u16::from_le_bytes([head[2], head[3]]) as usize;
        if len == 0 || off < next_free || off + len > PAGE {
            return Err(format!("run {off}+{len} is empty, out of order or past the page"));
        }
        if runs.len() < at + 4 + len {
            return Err("a run's bytes are cut short".into());
        }
        next_free = off + len;
        at += 4 + len;
    }
    Ok(())
}

impl ArchivedEncodedPages {
    /// Decodes and checks everything against a VM of `mem_size` bytes.
    pub fn decode(&self, mem_size: u64) -> Result<Decoded, DecodeError> {
        let (pages, kinds, lens) = (self.pages.len(), self.kinds.len(), self.lens.len());
        if pages != kinds || pages != lens {
            return Err(DecodeError::Shape { pages, kinds, lens });
        }
        let sum: u64 = self.lens.iter().map(|l| u64::from(l.to_native())).sum();
        if sum != self.data.len() as u64 {
            return Err(DecodeError::Length { sum, data: self.data.len() });
        }
        let limit = mem_size / PAGE_SIZE;
        let numbers = self.pages.iter().chain(self.zero_pages.iter()).map(|p| p.to_native());
        if let Some(page) = numbers.clone().find(|&p| p >= limit) {
            return Err(DecodeError::Beyond { page, mib: mem_size >> 20 });
        }
        let mut d = Decoded { zero: self.zero_pages.iter().map(|p| p.to_native()).collect(), ..Decoded::default() };
        let mut at = 0usize;
        for ((page, kind), len) in self.pages.iter().zip(self.kinds.iter()).zip(self.lens.iter()) {
            let page = page.to_native();
            let sent = at..at + len.to_native() as usize;
            at = sent.end;
            let bad = |why: String| DecodeError::Page { page, why };
            let form = match *kind {
                PLAIN | LZ4 => Form::Whole,
                DELTA | DELTA_LZ4 => Form::Patch,
                k => return Err(bad(format!("unknown encoding {k}"))),
            };
            let bytes = if matches!(*kind, LZ4 | DELTA_LZ4) {
                let start = d.unpacked.len();
                d.unpacked.resize(start + PAGE, 0);
                let n = lz4_flex::block::decompress_into(&self.data[sent], &mut d.unpacked[start..])
                    .map_err(|e| bad(e.to_string()))?;
                d.unpacked.truncate(start + n);
                Bytes::Unpacked(start..start + n)
            } else {
                Bytes::Sent(sent)
            };
            let content = d.bytes(&bytes, self.data.as_slice());
            match form {
                Form::Whole if content.len() != PAGE => {
                    return Err(bad(format!("{} bytes for a whole page", content.len())));
                }
                Form::Whole => {}
                Form::Patch => check_runs(content).map_err(bad)?,
            }
            d.pages.push((page, form, bytes));
        }
        Ok(d)
    }
}

impl Decoded {
    pub fn count(&self) -> usize {
        self.pages.len() + self.zero.len()
    }

    fn bytes<'a>(&'a self, b: &Bytes, sent: &'a [u8]) -> &'a [u8] {
        match b {
            Bytes::Sent(r) => &sent[r.clone()],
            Bytes::Unpacked(r) => &self.unpacked[r.clone()],
        }
    }

    /// Writes the pages into `mem`: whole pages, patches on the version `mem` holds, zeroes.
    /// `sent` is the page data these pages were decoded from.
    pub fn apply(&self, mem: &GuestMemory, sent: &[u8]) -> Result<(), MemoryError> {
        for (page, form, bytes) in &self.pages {
            let bytes = self.bytes(bytes, sent);
            if *form == Form::Whole {
                mem.write(page * PAGE_SIZE, bytes)?;
                continue;
            }
            let mut at = 0;
            while at < bytes.len() {
                let off = u16::from_le_bytes([bytes[at], bytes[at + 1]]) as u64;
                let len = u16::from_le_bytes([bytes[at + 2], bytes[at + 3]]) as usize;
                mem.write(page * PAGE_SIZE + off, &bytes[at + 4..at + 4 + len])?;
                at += 4 + len;
            }
        }
        for page in &self.zero {
            mem.fill(page * PAGE_SIZE, PAGE_SIZE, 0)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
