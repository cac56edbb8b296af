//! What the FT peer says first and its FT-layer messages, as the other copy reads them off the
//! control stream: frames (however the stream is cut), the Hello's metadata (the VM's shape,
//! disks, devices and CPUID, `Meta::from_hello`) compared with this side's, and the `App`
//! messages: a standby's disk digests checked against this side's disks, a switchover's
//! hand-over, a snapshot request and its outcome. Each is used or refused with an error,
//! never a panic or unbounded memory. Beyond that:
//! - whatever decodes encodes back to bytes that decode the same;
//! - accepted digests describe exactly this side's disks (one hash per block);
//! - two copies agree on whether they can pair: `a.mismatch(b)` and `b.mismatch(a)` are both
//!   none or both some.
//!
//! Inputs are either taken as a whole stream, or (first byte odd) as bit flips on a valid one
//! (a Hello and one message of each kind), so the fuzzer also reaches the checks behind the
//! archives' own.
#![no_main]

#[path = "common.rs"]
#[allow(dead_code)]
mod common;

use disk_mirror::digest::Digest;
use libfuzzer_sys::fuzz_target;
use smp_ft::ft::wire::{self, HandOver, Meta, SnapshotDone, SnapshotRequest};
use std::sync::OnceLock;
use transport::frame::{encode, Decoder};
use transport::message::{Message, Role, PROTOCOL_VERSION};

const DISKS: [u64; 2] = [1 << 20, (3 << 20) + 512];

fn ours() -> Meta {
    Meta {
        vcpus: 2,
        mem_size: 64 << 20,
        generation: 3,
        owner: "host-a/vm1".into(),
        devices: "virtio-rng".into(),
        disks: DISKS.to_vec(),
        digests: true,
        cpuid: vec![[0, 0, 0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69], [1, 0, 0x506e3, 0, 0x7ffa_3223, 0x178b_fbff]],
    }
}

fn digests() -> Vec<Digest> {
    DISKS
        .iter()
        .map(|&size| Digest { size, block: 64 << 10, hashes: vec![[7; 16]; size.div_ceil(64 << 10) as usize] })
        .collect()
}

fn valid() -> &'static [u8] {
    static V: OnceLock<Vec<u8>> = OnceLock::new();
    V.get_or_init(|| {
        let app = |kind, data| Message::App { kind, data };
        [
            Message::Hello { version: PROTOCOL_VERSION, role: Role::Standby, session: 9, meta: ours().encode() },
            app(wire::APP_DIGESTS, wire::encode_digests(&digests()).expect("digests encode")),
            app(wire::APP_SWITCHOVER, HandOver { epoch: 5, generation: 4, return_to: Some("b:7400".into()) }.encode()),
            app(wire::APP_SNAPSHOT, wire::encode_app(&SnapshotRequest { id: 1, file: "/s/a".into(), release: false })),
            app(wire::APP_SNAPSHOT_DONE, wire::encode_app(&SnapshotDone { id: 1, result: Ok("{}".into()) })),
        ]
        .iter()
        .flat_map(encode)
        .collect()
    })
}

fn hello(version: u32, meta: &[u8]) {
    let Ok(theirs) = Meta::from_hello(version, meta) else { return };
    assert_eq!(Meta::decode(&theirs.encode()).as_ref(), Ok(&theirs), "Hello metadata round trip");
    let mine = ours();
    assert_eq!(mine.mismatch(&theirs).is_none(), theirs.mismatch(&mine).is_none(), "{theirs:?}");
}

fn app(kind: u16, data: &[u8]) {
    match kind {
        wire::APP_DIGESTS => {
            if let Ok(d) = wire::decode_digests(data, &DISKS) {
                let again = wire::encode_digests(&d).expect("digests encode");
                assert_eq!(wire::decode_digests(&again, &DISKS).as_ref(), Ok(&d), "digests round trip");
                for (d, size) in d.iter().zip(DISKS) {
                    assert_eq!(d.hashes.len() as u64, size.div_ceil(d.block), "a hash per block");
                }
            }
        }
        wire::APP_SWITCHOVER => {
            if let Ok(h) = HandOver::decode(data) {
                assert_eq!(HandOver::decode(&h.encode()), Ok(h), "hand-over round trip");
            }
        }
        wire::APP_SNAPSHOT => {
            if let Ok(r) = wire::decode_app::<SnapshotRequest>(data, "snapshot request") {
                assert_eq!(wire::decode_app(&wire::encode_app(&r), "again"), Ok(r), "snapshot request round trip");
            }
        }
        wire::APP_SNAPSHOT_DONE => {
            if let Ok(r) = wire::decode_app::<SnapshotDone>(data, "snapshot report") {
                assert_eq!(wire::decode_app(&wire::encode_app(&r), "again"), Ok(r), "snapshot report round trip");
            }
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let bytes = match data.split_first() {
        Some((&b, flips)) if b & 1 == 1 => common::flipped(valid(), 0, flips),
        _ => data.to_vec(),
    };
    let cut = data.get(1).map_or(0, |&b| usize::from(b) * bytes.len() / 256);
    let mut d = Decoder::new(1 << 20);
    for part in [&bytes[..cut], &bytes[cut..]] {
        d.push(part);
        while let Ok(Some(m)) = d.next_message() {
            match m {
                Message::Hello { version, meta, .. } => hello(version, &meta),
                Message::App { kind, data } => app(kind, &data),
                _ => {}
            }
        }
    }
});
