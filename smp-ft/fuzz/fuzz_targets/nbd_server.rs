//! What an NBD client sends to smpft's read-only exports (the point-in-time views backup tools
//! read, `block::export`): the fixed-newstyle handshake (any option, any length), then requests
//! of any kind, served from an image in memory. The connection ends with the client's bytes or
//! with an error, never a panic, a hang or unbounded memory. Beyond that:
//! - the server never reads outside its image, whatever offsets and lengths are asked for;
//! - what it sends is bounded by what it was asked: at most two option replies per option,
//!   and per request a reply header and at most the image's size in data.
//!
//! The input: a flags byte (bit 0: a well-formed handshake that goes to transmission comes
//! first, so the rest are requests), then the client's bytes.
#![no_main]

use block::export::{serve_client, Image};
use libfuzzer_sys::fuzz_target;
use std::io::{Cursor, Read, Write};

const SIZE: u64 = 64 << 10;

/// The image: byte `o` is `o % 251`; reads outside it are caught.
#[derive(Clone)]
struct Pattern;

impl Image for Pattern {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        assert!(offset.checked_add(buf.len() as u64).is_some_and(|e| e <= SIZE), "a read outside the image");
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((offset + i as u64) % 251) as u8;
        }
        Ok(())
    }
}

/// The client's bytes to read, and what the server sent.
struct Client<'a> {
    said: Cursor<&'a [u8]>,
    sent: Vec<u8>,
}

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.said.read(buf)
    }
}

impl Write for Client<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sent.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Client flags (fixed newstyle, no zeroes), then NBD_OPT_GO for the unnamed export.
fn handshake() -> Vec<u8> {
    let mut h = 3u32.to_be_bytes().to_vec();
    h.extend_from_slice(b"IHAVEOPT");
    h.extend_from_slice(&7u32.to_be_bytes());
    h.extend_from_slice(&6u32.to_be_bytes());
    h.extend_from_slice(&[0; 6]); // name length 0, no information requests
    h
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let input = match flags & 1 {
        0 => rest.to_vec(),
        _ => [handshake(), rest.to_vec()].concat(),
    };
    let mut c = Client { said: Cursor::new(&input), sent: Vec::new() };
    let _ = serve_client(&mut c, Pattern);
    // Greeting 18 bytes; an option is at least 16 bytes and gets at most two replies of 20
    // bytes and 14 of information (or the 134-byte NBD_OPT_EXPORT_NAME answer); a request is
    // 28 bytes and gets 16 and at most the image.
    let bound = 18 + 134 + (input.len() / 16 + 1) * 54 + (input.len() / 28 + 1) * (16 + SIZE as usize);
    assert!(c.sent.len() <= bound, "{} bytes sent for {} received", c.sent.len(), input.len());
});
