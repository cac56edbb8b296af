//! A snapshot file's decoder must refuse anything malformed with an error, never panic. Inputs
//! are either taken as a whole file, or (first byte odd) as bit flips on the payload of a valid
//! one whose checksum is then fixed up, so the fuzzer reaches the archive's validation.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use smp_ft::snapshot::format::{decode, encode};
use smp_ft::snapshot::{MemoryPages, Snapshot};
use std::sync::OnceLock;

const HEADER: usize = 24;

fn valid() -> &'static [u8] {
    static V: OnceLock<Vec<u8>> = OnceLock::new();
    V.get_or_init(|| {
        encode(&Snapshot {
            id: 1,
            parent: None,
            seq: 0,
            vcpus: 2,
            mem_size: 1 << 20,
            state: common::machine(2),
            memory: MemoryPages { pages: vec![2], data: vec![0x5a; 4096], zero_pages: vec![0, 1] },
        })
        .expect("encode")
    })
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((&b, flips)) if b & 1 == 1 => {
            let mut v = common::flipped(valid(), HEADER, flips);
            let crc = crc32fast::hash(&v[HEADER..]);
            v[12..16].copy_from_slice(&crc.to_le_bytes());
            if let Ok(s) = decode(&v) {
                common::restore_components(&s.state);
            }
        }
        _ => {
            let _ = decode(data);
        }
    }
});
