//! A standby must refuse a bad checkpoint with an error, never panic or write outside guest
//! memory, whatever bytes arrive. Inputs are either taken as a whole payload, or (first byte odd)
//! as bit flips on a valid one, so the fuzzer also reaches the checks behind the format's own.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use smp_ft::ft::wire::{encode, Meta, Payload, PayloadKind, Staged};
use smp_ft::vmm::memory::GuestMemory;
use smp_ft::vmm::pages::MemoryPages;
use std::sync::OnceLock;
use transport::CheckpointData;

const MEM: u64 = 64 << 10;
const SEQ: u64 = 7;

fn valid() -> &'static bytes::Bytes {
    static V: OnceLock<bytes::Bytes> = OnceLock::new();
    V.get_or_init(|| {
        let payload = Payload {
            seq: SEQ,
            kind: PayloadKind::Epoch,
            memory: MemoryPages { pages: vec![1, 3], data: vec![0xab; 2 * 4096], zero_pages: vec![0] },
            state: Some(common::machine(1)),
        };
        encode(&payload).expect("encode")
    })
}

fuzz_target!(|data: &[u8]| {
    let bytes = match data.split_first() {
        Some((&b, flips)) if b & 1 == 1 => common::flipped(valid(), 0, flips),
        _ => data.to_vec(),
    };
    let _ = Meta::decode(&bytes);
    // Split where the input says, as the channel delivers chunks.
    let cut = data.get(1).map_or(0, |&b| usize::from(b) * bytes.len() / 256);
    let b = bytes::Bytes::from(bytes);
    let cp = CheckpointData { segments: vec![b.slice(..cut), b.slice(cut..)] };
    if let Ok(staged) = Staged::validate(&cp, SEQ, 1, MEM) {
        let mem = GuestMemory::new(MEM).expect("guest memory");
        if let Ok(Some(state)) = staged.apply(&mem) {
            common::restore_components(&state);
        }
    }
});
