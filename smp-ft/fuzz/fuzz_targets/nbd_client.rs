//! What an NBD server sends, as smpft's NBD client reads it: the handshake (fixed newstyle,
//! NBD_OPT_STRUCTURED_REPLY, NBD_OPT_GO with its NBD_REP_INFO replies, or NBD_OPT_EXPORT_NAME)
//! and then the replies to a batch of requests of every kind, simple or structured (data,
//! hole and error chunks, in any order, matched by cookie). An export, a failed request or a
//! broken connection, never a panic, a hang or unbounded memory. Beyond that:
//! - an export's block sizes are ones the client can use (powers of two, the minimum at most
//!   64 KiB, the preferred and maximum not below it, the maximum a multiple of it);
//! - a failure names a request of the batch;
//! - a batch that succeeds filled every byte of every read from what the server sent (the
//!   batch runs twice, its read buffers filled with different bytes beforehand: they must
//!   come out the same).
//!
//! The input: a flags byte (bit 0: a well-formed handshake comes first, so the rest are
//! replies; bit 1: it negotiates structured replies; bit 2, with bit 0: the rest are bit flips
//! on well-formed replies to the whole batch), then the server's side of the connection.
#![no_main]

#[path = "common.rs"]
#[allow(dead_code)]
mod common;

use block::nbd::fuzzing::{negotiate, Conn, Failure, Request};
use libfuzzer_sys::fuzz_target;
use std::io::{Cursor, Read, Write};

/// The server's bytes to read, and what the client sent (discarded).
struct Server<'a>(Cursor<&'a Vec<u8>>);

impl Read for Server<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Server<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The reads of the batch: (offset, length).
const READS: [(u64, usize); 5] = [(0, 512), (4096, 4096), (0, 1), (65536, 100), (512, 1536)];

/// How a batch ended: its error's kind, request and message.
type Outcome = Result<(), (&'static str, usize, String)>;

/// Runs a batch of 18 requests (more than one window in flight) against `replies`; the read
/// buffers start as `fill`.
fn batch(replies: &[u8], structured: bool, fill: u8) -> (Outcome, Vec<Vec<u8>>) {
    let mut bufs: Vec<Vec<u8>> = READS.iter().map(|&(_, n)| vec![fill; n]).collect();
    let data = [0x5a; 512];
    let mut reqs = Vec::new();
    for (buf, &(offset, _)) in bufs.iter_mut().zip(&READS) {
        reqs.push(Request::Read { offset, buf });
        reqs.push(Request::Write { offset, data: &data });
        reqs.push(Request::Trim { offset, len: 4096 });
    }
    reqs.push(Request::Flush);
    reqs.push(Request::WriteZeroes { offset: 0, len: 512, no_hole: true });
    reqs.push(Request::WriteZeroes { offset: 1 << 20, len: 1 << 16, no_hole: false });
    let n = reqs.len();
    let mut conn = Conn { tx: std::io::sink(), rx: Cursor::new(replies), structured };
    let outcome = conn.run(&mut reqs).map_err(|f| match f {
        Failure::Request(i, e) => ("request", i, e.to_string()),
        Failure::Broken(i, e) => ("broken", i, e.to_string()),
    });
    if let Err((_, i, _)) = &outcome {
        assert!(*i < n, "a failure of request {i} in a batch of {n}");
    }
    drop(reqs);
    (outcome, bufs)
}

/// What a server says in a handshake that goes to transmission: the greeting, its answer to
/// NBD_OPT_STRUCTURED_REPLY (`structured`), and NBD_OPT_GO's NBD_INFO_EXPORT and ACK.
fn handshake(structured: bool) -> Vec<u8> {
    let reply = |option: u32, kind: u32, data: &[u8]| {
        let mut r = 0x0003_e889_0455_65a9_u64.to_be_bytes().to_vec();
        r.extend_from_slice(&option.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&(data.len() as u32).to_be_bytes());
        r.extend_from_slice(data);
        r
    };
    let mut h = b"NBDMAGICIHAVEOPT".to_vec();
    h.extend_from_slice(&3u16.to_be_bytes());
    h.extend(reply(8, if structured { 1 } else { (1 << 31) + 1 }, &[]));
    let mut info = 0u16.to_be_bytes().to_vec();
    info.extend_from_slice(&(4u64 << 20).to_be_bytes());
    info.extend_from_slice(&(1u16 | 4 | 32 | 64).to_be_bytes());
    h.extend(reply(7, 3, &info));
    h.extend(reply(7, 1, &[]));
    h
}

/// Well-formed replies to the whole batch, in order: simple ones, or structured chunks (a
/// read in a data chunk, the first in a data and a hole chunk).
fn replies(structured: bool) -> Vec<u8> {
    let mut r = Vec::new();
    let mut chunk = |flags: u16, kind: u16, cookie: u64, payload: &[u8]| {
        r.extend_from_slice(&0x668e_33ef_u32.to_be_bytes());
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        r.extend_from_slice(payload);
    };
    let mut simple = Vec::new();
    for cookie in 0..18u64 {
        let read = (cookie % 3 == 0 && cookie < 15).then(|| READS[cookie as usize / 3]);
        simple.extend_from_slice(&0x6744_6698_u32.to_be_bytes());
        simple.extend_from_slice(&[0; 4]);
        simple.extend_from_slice(&cookie.to_be_bytes());
        simple.extend(std::iter::repeat_n(0x77, read.map_or(0, |(_, n)| n)));
        match read {
            Some((offset, 512)) => {
                chunk(0, 1, cookie, &[&offset.to_be_bytes()[..], &[0x11; 256]].concat());
                chunk(1, 2, cookie, &[&(offset + 256).to_be_bytes()[..], &256u32.to_be_bytes()].concat());
            }
            Some((offset, n)) => chunk(1, 1, cookie, &[&offset.to_be_bytes()[..], &vec![0x22; n]].concat()),
            None => chunk(1, 0, cookie, &[]),
        }
    }
    if structured {
        r
    } else {
        simple
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let structured = flags & 2 != 0;
    let data = match flags & 5 {
        0 | 4 => rest.to_vec(),
        1 => [handshake(structured), rest.to_vec()].concat(),
        _ => [handshake(structured), common::flipped(&replies(structured), 0, rest)].concat(),
    };
    let mut server = Server(Cursor::new(&data));
    let Ok(export) = negotiate(&mut server, "vm1") else { return };
    let (min, preferred, max) = (export.min_block, export.preferred_block, export.max_block);
    assert!(min.is_power_of_two() && min <= 64 << 10, "{export:?}");
    assert!(preferred.is_power_of_two() && preferred >= min, "{export:?}");
    assert!(max >= min && (max % min == 0 || max == u32::MAX), "{export:?}");
    let replies = &data[server.0.position() as usize..];
    let (first, zeroes) = batch(replies, export.structured, 0);
    let (second, ones) = batch(replies, export.structured, 0xff);
    assert_eq!(first, second, "the same replies read twice");
    if first.is_ok() {
        for (i, (z, o)) in zeroes.iter().zip(&ones).enumerate() {
            let unfilled = z.iter().zip(o).position(|(a, b)| a != b);
            assert!(unfilled.is_none(), "read {i} completed without byte {unfilled:?} from the server");
        }
    }
});
