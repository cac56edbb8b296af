use super::*;

const PAGES: u64 = 64;

use crate::ft::TestRng as Rng;

/// Changes some pages of `mem` in the ways guests do (a few bytes, everything, zeroed, left as
/// they were though dirty) and returns the dirty page numbers.
fn mutate(mem: &mut [u8], r: &mut Rng) -> Vec<u64> {
    let mut dirty: Vec<u64> = (0..1 + r.next() % 20).map(|_| r.next() % PAGES).collect();
    dirty.sort_unstable();
    dirty.dedup();
    for &p in &dirty {
        let page = &mut mem[p as usize * PAGE..(p as usize + 1) * PAGE];
        match r.next() % 5 {
            0 => page.iter_mut().for_each(|b| *b = r.next() as u8),
            1 => page.fill(0),
            2 => {}
            _ => {
                for _ in 0..1 + r.next() % 8 {
                    let at = (r.next() % PAGE as u64) as usize;
                    page[at] = r.next() as u8;
                }
            }
        }
    }
    dirty
}

/// What the capture makes of dirty pages: data for pages with data, numbers for zero pages.
fn capture(mem: &[u8], dirty: &[u64]) -> MemoryPages {
    let mut m = MemoryPages::default();
    for &p in dirty {
        let page = &mem[p as usize * PAGE..(p as usize + 1) * PAGE];
        if page.iter().all(|&b| b == 0) {
            m.zero_pages.push(p);
        } else {
            m.pages.push(p);
            m.data.extend_from_slice(page);
        }
    }
    m
}

fn decode(e: &EncodedPages) -> Result<Decoded, DecodeError> {
    let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(e).unwrap();
    let a = rkyv::access::<ArchivedEncodedPages, rkyv::rancor::Error>(&bytes).unwrap();
    a.decode(PAGES * PAGE_SIZE)
}

/// Sends `e` as the channel would and applies it to `mem`.
fn apply(e: &EncodedPages, mem: &GuestMemory) {
    let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(e).unwrap();
    let a = rkyv::access::<ArchivedEncodedPages, rkyv::rancor::Error>(&bytes).unwrap();
    a.decode(PAGES * PAGE_SIZE).unwrap().apply(mem, a.data.as_slice()).unwrap();
}

/// Every mode, with a cache of 4 pages (eviction all the time) and one of all pages: after each
/// round the standby's memory equals the primary's, and deltas and LZ4 make rounds smaller.
#[test]
fn the_standby_ends_with_the_primarys_memory_in_every_mode() {
    for (mode, cache) in [
        (Compression::None, 0),
        (Compression::Lz4, 0),
        (Compression::Delta, 4 * PAGE_SIZE),
        (Compression::Delta, PAGES * PAGE_SIZE),
    ] {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let mut primary = vec![0u8; (PAGES * PAGE_SIZE) as usize];
        let standby = GuestMemory::new(PAGES * PAGE_SIZE).unwrap();
        let mut enc = Encoder::new(mode, cache);
        let (mut raw, mut wire) = (0, 0);
        for round in 0..300 {
            let dirty = mutate(&mut primary, &mut r);
            let (e, stats) = enc.encode(capture(&primary, &dirty));
            raw += stats.raw;
            wire += stats.encoded;
            apply(&e, &standby);
            let mut got = vec![0u8; primary.len()];
            standby.read(0, &mut got).unwrap();
            assert!(got == primary, "{mode:?} (cache {cache}): memories differ after round {round}");
        }
        // A fifth of the changes rewrite whole pages with noise: nothing shrinks those.
        match (mode, cache) {
            (Compression::None, _) => assert!(wire <= raw, "zero pages travel as their numbers"),
            (Compression::Delta, c) if c == PAGES * PAGE_SIZE => {
                assert!(wire < raw / 3, "{mode:?} (cache {cache}): {wire} of {raw} bytes")
            }
            _ => assert!(wire < raw * 3 / 4, "{mode:?} (cache {cache}): {wire} of {raw} bytes"),
        }
    }
}

#[test]
fn small_changes_travel_as_small_deltas() {
    let mut enc = Encoder::new(Compression::Delta, 16 * PAGE_SIZE);
    let mut page: Vec<u8> = (0..PAGE).map(|i| (i * 7 + i / 13) as u8).collect();
    let m = |p: &[u8]| MemoryPages { pages: vec![3], data: p.to_vec(), zero_pages: vec![] };
    let (first, _) = enc.encode(m(&page));
    assert_ne!(first.kinds[0], DELTA, "the first time a page goes whole");
    page[100] ^= 1;
    page[2000..2016].fill(9);
    let (second, _) = enc.encode(m(&page));
    assert_eq!(second.kinds[0], DELTA);
    assert_eq!(second.data.len(), 2 * 4 + 8 + 16, "two runs, one word and two words");
    let (third, _) = enc.encode(m(&page));
    assert_eq!((third.kinds[0], third.lens[0]), (DELTA, 0), "dirty but unchanged: nothing to send");
}

/// Malformed pages are errors, never panics, whatever the bytes.
#[test]
fn malformed_pages_are_refused() {
    let page = vec![5u8; PAGE];
    let one = |kind: u8, data: Vec<u8>| EncodedPages {
        pages: vec![1],
        kinds: vec![kind],
        lens: vec![data.len() as u32],
        data,
        zero_pages: vec![],
    };
    assert!(decode(&one(PLAIN, page.clone())).is_ok());
    let e = |p: EncodedPages| decode(&p).unwrap_err().to_string();
    assert!(e(one(PLAIN, page[..100].to_vec())).contains("100 bytes for a whole page"));
    assert!(e(one(LZ4, vec![0xff; 40])).contains("page 1"));
    assert!(e(one(9, page.clone())).contains("unknown encoding 9"));
    let run = |off: u16, len: u16, n: usize| {
        [off.to_le_bytes(), len.to_le_bytes()].concat().into_iter().chain(vec![1u8; n]).collect::<Vec<u8>>()
    };
    assert!(decode(&one(DELTA, run(8, 8, 8))).is_ok());
    assert!(e(one(DELTA, run(4090, 8, 8))).contains("past the page"));
    assert!(e(one(DELTA, run(8, 0, 0))).contains("empty"));
    assert!(e(one(DELTA, [run(16, 8, 8), run(8, 8, 8)].concat())).contains("out of order"));
    assert!(e(one(DELTA, run(8, 8, 3))).contains("cut short"));
    assert!(e(one(DELTA, vec![1, 2])).contains("cut short"));
    let mut p = one(PLAIN, page.clone());
    p.lens[0] = 10;
    assert!(e(p).contains("add up to 10"));
    let mut p = one(PLAIN, page.clone());
    p.kinds.clear();
    assert!(e(p).contains("encodings"));
    let mut p = one(PLAIN, page);
    p.pages[0] = PAGES;
    assert!(e(p).contains("beyond"));
}

#[test]
fn the_cache_evicts_and_forgets_zeroed_pages() {
    let mut c = PageCache::new(2 * PAGE_SIZE);
    c.put(1, &[1; PAGE]);
    c.put(2, &[2; PAGE]);
    c.put(3, &[3; PAGE]);
    assert_eq!([c.get(1).is_some(), c.get(2).is_some(), c.get(3).is_some()].iter().filter(|&&x| x).count(), 2);
    assert_eq!(c.get(3).map(|p| p[0]), Some(3), "the newest stays");
    c.remove(3);
    assert!(c.get(3).is_none());
    c.put(4, &[4; PAGE]);
    assert_eq!(c.get(4).map(|p| p[0]), Some(4));
}
