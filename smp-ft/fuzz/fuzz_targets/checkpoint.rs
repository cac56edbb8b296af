//! A standby must refuse a bad checkpoint with an error, never panic or write outside guest
//! memory or its disks, whatever bytes arrive (encoded pages and disk ops included). Inputs are
//! either taken as a whole payload, or (first byte odd) as bit flips on a valid one, so the
//! fuzzer also reaches the checks behind the format's own.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use smp_ft::ft::encode::{Compression, Encoder};
use smp_ft::ft::wire::{encode, Meta, Outgoing, PayloadKind, Staged};
use smp_ft::vmm::memory::GuestMemory;
use smp_ft::vmm::pages::MemoryPages;
use std::sync::OnceLock;
use transport::CheckpointData;

const MEM: u64 = 64 << 10;
const SEQ: u64 = 7;
/// The VM's one disk.
const DISK: u64 = 64 << 10;

fn valid() -> &'static bytes::Bytes {
    static V: OnceLock<bytes::Bytes> = OnceLock::new();
    V.get_or_init(|| {
        // Encoded as the primary would: page 1 whole, then again with a few bytes changed (a
        // delta), page 3 compressible (LZ4), page 0 zero; and disk ops of every kind.
        let mut encoder = Encoder::new(Compression::Delta, 1 << 20);
        let page = |b: u8| (0..4096u32).map(|i| if i % 64 == 0 { b } else { (i % 7) as u8 }).collect::<Vec<u8>>();
        let first = MemoryPages { pages: vec![1], data: page(0xab), zero_pages: vec![] };
        let _ = encoder.encode(first);
        let mut changed = page(0xab);
        changed[100] = 1;
        let memory = MemoryPages { pages: vec![1, 3], data: [changed, page(0x11)].concat(), zero_pages: vec![0] };
        let disk = vec![
            (0, block::Op::Write { offset: 512, data: vec![0x5a; 1024] }),
            (0, block::Op::Zeroes { offset: 4096, len: 4096 }),
            (0, block::Op::Flush),
        ];
        let outgoing = Outgoing { seq: SEQ, kind: PayloadKind::Epoch, memory, state: Some(common::machine(1)), disk };
        let (payload, _) = outgoing.encode(&mut encoder);
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
    if let Ok(staged) = Staged::validate(&cp, SEQ, 1, MEM, &[DISK]) {
        let disk: std::sync::Arc<dyn block::Backend> = std::sync::Arc::new(MemDisk::default());
        staged.apply_disk(&[disk]).expect("validated disk ops apply");
        let mem = GuestMemory::new(MEM).expect("guest memory");
        if let Ok(Some(state)) = staged.apply(&mem) {
            common::restore_components(&state);
        }
    }
});

/// A disk in memory: a validated op never goes past its end.
#[derive(Default)]
struct MemDisk(std::sync::Mutex<Vec<u8>>);

impl block::Backend for MemDisk {
    fn size(&self) -> u64 {
        DISK
    }
    fn readonly(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), block::BackendError> {
        let d = self.0.lock().unwrap();
        buf.fill(0);
        let o = offset as usize;
        let n = d.len().saturating_sub(o).min(buf.len());
        buf[..n].copy_from_slice(&d[o.min(d.len())..o.min(d.len()) + n]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), block::BackendError> {
        let end = offset as usize + data.len();
        assert!(end as u64 <= DISK, "a write past the end of the disk got through");
        let mut d = self.0.lock().unwrap();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), block::BackendError> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), block::BackendError> {
        assert!(offset + len <= DISK, "zeroes past the end of the disk got through");
        self.write_at(&vec![0; len as usize], offset)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), block::BackendError> {
        self.write_zeroes(offset, len)
    }
}
