//! The control-stream decoder must never panic, whatever bytes arrive and however they are split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transport::frame::{decode_body, Decoder};

fuzz_target!(|data: &[u8]| {
    let _ = decode_body(data);
    // Split the input at a point it chooses itself, like a network would.
    let cut = data.first().map_or(0, |&b| b as usize % (data.len().max(1)));
    let mut d = Decoder::new(1 << 16);
    for part in [&data[..cut], &data[cut..]] {
        d.push(part);
        loop {
            match d.next_frame() {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }
});
