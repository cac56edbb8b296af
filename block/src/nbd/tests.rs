//! The handshake and the replies against scripted servers in memory: every branch and every
//! malformed reply.

use super::handshake::*;
use super::wire::*;
use std::io::{Cursor, Read, Write};

/// A connection whose server side is a script: what the server says, in order, and what the
/// client sent.
struct Script {
    said: Cursor<Vec<u8>>,
    sent: Vec<u8>,
}

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.said.read(buf)
    }
}

impl Write for Script {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sent.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn greeting(flags: u16) -> Vec<u8> {
    let mut v = NBDMAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    option_reply(OPT_GO, REP_INFO, &d)
}

fn info_blocks(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, preferred, max] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    option_reply(OPT_GO, REP_INFO, &d)
}

fn negotiate_with(parts: &[Vec<u8>]) -> (std::io::Result<Export>, Vec<u8>) {
    let mut s = Script { said: Cursor::new(parts.concat()), sent: Vec::new() };
    let r = negotiate(&mut s, "vm1");
    (r, s.sent)
}

const FIXED: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

#[test]
fn go_learns_size_flags_and_block_sizes_and_structured_replies() {
    let flags = HAS_FLAGS | SEND_FLUSH | SEND_TRIM | SEND_WRITE_ZEROES;
    let (r, sent) = negotiate_with(&[
        greeting(FIXED),
        option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]),
        info_export(1 << 30, flags),
        info_blocks(4096, 4096, 1 << 20),
        option_reply(OPT_GO, REP_INFO, &[0, 1, b'v']), // NBD_INFO_NAME: ignored
        option_reply(OPT_GO, REP_ACK, &[]),
    ]);
    let e = r.unwrap();
    assert_eq!((e.size, e.flags, e.min_block, e.preferred_block, e.max_block), (1 << 30, flags, 4096, 4096, 1 << 20));
    assert!(e.structured && e.go && e.has(SEND_TRIM) && !e.has(READ_ONLY));
    // Client flags, NBD_OPT_STRUCTURED_REPLY, then NBD_OPT_GO for "vm1" asking for block sizes.
    assert_eq!(&sent[..4], &u32::from(FIXED).to_be_bytes());
    let go = &sent[4 + 16..];
    assert_eq!(&go[8..12], &OPT_GO.to_be_bytes());
    assert_eq!(&go[16..], &[0, 0, 0, 3, b'v', b'm', b'1', 0, 1, 0, 3]);
}

#[test]
fn an_old_server_without_go_gets_export_name() {
    let mut answer = (5u64 << 20).to_be_bytes().to_vec();
    answer.extend_from_slice(&(HAS_FLAGS | READ_ONLY).to_be_bytes());
    answer.extend_from_slice(&[0u8; 124]);
    let (r, sent) = negotiate_with(&[
        greeting(FLAG_FIXED_NEWSTYLE),
        option_reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]),
        option_reply(OPT_GO, REP_ERR_UNSUP, b"unknown option"),
        answer.clone(),
    ]);
    let e = r.unwrap();
    assert_eq!((e.size, e.structured, e.go, e.min_block), (5 << 20, false, false, 1));
    assert!(e.has(READ_ONLY));
    assert!(sent.ends_with(&[0, 0, 0, 1, 0, 0, 0, 3, b'v', b'm', b'1']), "NBD_OPT_EXPORT_NAME last");

    // Not fixed newstyle: NBD_OPT_EXPORT_NAME at once, and no zeroes when the server says so.
    let (r, sent) = negotiate_with(&[greeting(FLAG_NO_ZEROES), answer[..10].to_vec()]);
    assert_eq!(r.unwrap().size, 5 << 20);
    assert_eq!(sent.len(), 4 + 16 + 3, "only the client flags and NBD_OPT_EXPORT_NAME");
}

#[test]
fn refusals_name_the_export_and_quote_the_server() {
    let (r, _) = negotiate_with(&[
        greeting(FIXED),
        option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]),
        option_reply(OPT_GO, REP_ERR_UNKNOWN, b"export 'vm1' not present"),
    ]);
    let e = r.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    assert!(
        e.to_string().contains("export 'vm1'") && e.to_string().contains("it says: export 'vm1' not present"),
        "{e}"
    );

    let (r, _) = negotiate_with(&[
        greeting(FIXED),
        option_reply(OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD, b"TLS required"),
        option_reply(OPT_GO, REP_ERR_TLS_REQD, b"TLS required"),
    ]);
    let e = r.unwrap_err().to_string();
    assert!(e.contains("export 'vm1'") && e.contains("requires TLS"), "{e}");

    let (r, _) = negotiate_with(&[
        greeting(FIXED),
        option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]),
        option_reply(OPT_GO, REP_ERR_POLICY, &[]),
    ]);
    assert!(r.unwrap_err().to_string().contains("policy"));

    // An old server closes the connection on an unknown export.
    let (r, _) = negotiate_with(&[greeting(0)]);
    let e = r.unwrap_err();
    assert!(e.to_string().contains("export 'vm1'") && e.to_string().contains("closed"), "{e}");
}

#[test]
fn malformed_handshakes_are_protocol_errors() {
    let ack = option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    let mut bad_magic = option_reply(OPT_GO, REP_ACK, &[]);
    bad_magic[0] ^= 1;
    let cases: Vec<(Vec<Vec<u8>>, &str)> = vec![
        (vec![b"HTTP/1.1 400 Bad Request\r\n".to_vec()], "not an NBD server"),
        (vec![[NBDMAGIC.to_be_bytes(), OLDSTYLE.to_be_bytes()].concat()], "oldstyle"),
        (vec![greeting(FIXED), ack.clone(), bad_magic], "option reply magic"),
        (
            vec![greeting(FIXED), ack.clone(), option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])],
            "option 8 while option 7",
        ),
        (vec![greeting(FIXED), ack.clone(), option_reply(OPT_GO, REP_ACK, &[])], "without NBD_INFO_EXPORT"),
        (vec![greeting(FIXED), ack.clone(), info_export(1, 1), info_blocks(3, 4096, 1 << 20)], "invalid block sizes"),
        (vec![greeting(FIXED), ack.clone(), info_export(1, 1), info_blocks(512, 4096, 1000)], "invalid block sizes"),
        (vec![greeting(FIXED), ack.clone(), option_reply(OPT_GO, REP_INFO, &[0, 0, 1])], "NBD_REP_INFO of 3 bytes"),
        (vec![greeting(FIXED), ack.clone(), option_reply(OPT_GO, 2, &[])], "reply type 2"),
        (
            vec![greeting(FIXED), ack, REPLY_MAGIC.to_be_bytes().to_vec(), vec![0, 0, 0, 7, 0, 0, 0, 3, 0, 1, 0, 1]],
            "65537-byte option reply",
        ),
    ];
    for (parts, want) in cases {
        let (r, _) = negotiate_with(&parts);
        let e = r.unwrap_err().to_string();
        assert!(e.contains(want), "want {want:?}, got {e}");
    }
}

// --- Transmission ---

fn conn(replies: Vec<u8>, structured: bool) -> Conn<Cursor<Vec<u8>>, Vec<u8>> {
    Conn { tx: Vec::new(), rx: Cursor::new(replies), structured }
}

fn simple(error: u32, cookie: u64, data: &[u8]) -> Vec<u8> {
    let mut v = SIMPLE_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = STRUCTURED_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn data(offset: u64, bytes: &[u8]) -> Vec<u8> {
    [offset.to_be_bytes().as_slice(), bytes].concat()
}

fn hole(offset: u64, len: u32) -> Vec<u8> {
    [offset.to_be_bytes().as_slice(), &len.to_be_bytes()].concat()
}

fn error(value: u32, message: &str) -> Vec<u8> {
    [&value.to_be_bytes()[..], &(message.len() as u16).to_be_bytes(), message.as_bytes()].concat()
}

const DONE: u16 = REPLY_FLAG_DONE;

#[test]
fn requests_are_framed_with_their_flags() {
    let mut c = conn([simple(0, 0, &[]), simple(0, 1, &[]), simple(0, 2, &[]), simple(0, 3, &[])].concat(), false);
    let mut reqs = [
        Request::Write { offset: 512, data: b"ab" },
        Request::Trim { offset: 4096, len: 8192 },
        Request::WriteZeroes { offset: 0, len: 512, no_hole: true },
        Request::WriteZeroes { offset: 0, len: 512, no_hole: false },
    ];
    c.run(&mut reqs).unwrap();
    let head = |i: usize| &c.tx[i..i + 8];
    assert_eq!(head(0), &[0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1], "write");
    assert_eq!(&c.tx[28..30], b"ab");
    assert_eq!(head(30), &[0x25, 0x60, 0x95, 0x13, 0, 0, 0, 4], "trim");
    assert_eq!(&c.tx[30 + 16..30 + 28], &[0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x20, 0]);
    assert_eq!(head(58), &[0x25, 0x60, 0x95, 0x13, 0, 2, 0, 6], "write-zeroes with NO_HOLE");
    assert_eq!(head(86), &[0x25, 0x60, 0x95, 0x13, 0, 0, 0, 6], "write-zeroes that may punch holes");
}

#[test]
fn simple_replies_in_any_order_and_errors_fail_only_their_request() {
    let replies = [simple(0, 1, b"BB"), simple(5, 2, &[]), simple(0, 0, b"AA")].concat();
    let mut c = conn([replies, simple(0, 0, b"CC")].concat(), false);
    let (mut a, mut b) = ([0u8; 2], [0u8; 2]);
    let mut reqs = [Request::Read { offset: 0, buf: &mut a }, Request::Read { offset: 2, buf: &mut b }, Request::Flush];
    match c.run(&mut reqs) {
        Err(Failure::Request(2, e)) => assert_eq!(e.raw_os_error(), Some(5)),
        other => panic!("{other:?}"),
    }
    assert_eq!((&a, &b), (b"AA", b"BB"));
    // The connection goes on.
    c.run(&mut [Request::Read { offset: 0, buf: &mut a }]).unwrap();
    assert_eq!(&a, b"CC");
}

#[test]
fn structured_reads_assemble_data_and_holes() {
    let replies = [
        chunk(0, CHUNK_OFFSET_HOLE, 0, &hole(0x1002, 2)),
        chunk(0, CHUNK_OFFSET_DATA, 0, &data(0x1000, b"ab")),
        chunk(0, CHUNK_OFFSET_DATA, 0, &data(0x1004, b"cd")),
        chunk(DONE, CHUNK_NONE, 0, &[]),
        chunk(DONE, CHUNK_OFFSET_DATA, 1, &data(0, b"z")),
        simple(0, 2, &[]), // a simple reply to a write is allowed
        chunk(DONE, CHUNK_NONE, 3, &[]),
    ]
    .concat();
    let mut c = conn(replies, true);
    let (mut a, mut b) = ([9u8; 6], [0u8; 1]);
    let mut reqs = [
        Request::Read { offset: 0x1000, buf: &mut a },
        Request::Read { offset: 0, buf: &mut b },
        Request::Write { offset: 0, data: b"x" },
        Request::Flush,
    ];
    c.run(&mut reqs).unwrap();
    assert_eq!((&a, &b), (b"ab\0\0cd", b"z"));
}

#[test]
fn structured_error_chunks_fail_the_request_with_the_servers_message() {
    let replies = [
        chunk(0, CHUNK_OFFSET_DATA, 0, &data(0, b"ab")),
        chunk(0, CHUNK_ERROR_OFFSET, 0, &[error(5, "bad sector").as_slice(), &2u64.to_be_bytes()].concat()),
        chunk(DONE, CHUNK_NONE, 0, &[]),
        chunk(DONE, CHUNK_ERROR, 1, &error(28, "")),
        chunk(DONE, CHUNK_NONE, 0, &[]),
    ]
    .concat();
    let mut c = conn(replies, true);
    let mut a = [0u8; 4];
    let mut reqs = [Request::Read { offset: 0, buf: &mut a }, Request::Flush];
    match c.run(&mut reqs) {
        Err(Failure::Request(0, e)) => {
            assert_eq!(e.kind(), std::io::Error::from_raw_os_error(5).kind());
            assert!(e.to_string().contains("Input/output error") && e.to_string().contains("bad sector"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    c.run(&mut [Request::Flush]).expect("the connection goes on");
}

#[test]
fn malformed_replies_break_the_connection() {
    let long = "x".repeat(5000);
    let cases: Vec<(Vec<u8>, bool, &str)> = vec![
        (simple(0, 7, &[]), false, "cookie 7"),
        (simple(0, 0, &[]), true, "simple reply with data to a read"),
        (chunk(DONE, CHUNK_NONE, 0, &[]), false, "not negotiated"),
        (b"\x12\x34\x56\x78".to_vec(), false, "reply magic 0x12345678"),
        (chunk(DONE, CHUNK_OFFSET_DATA, 0, &data(2, b"abc")), true, "beyond its request"),
        (chunk(DONE, CHUNK_OFFSET_DATA, 0, &data(u64::MAX, b"a")), true, "beyond its request"),
        (chunk(DONE, CHUNK_OFFSET_HOLE, 0, &hole(3, 2)), true, "beyond its request"),
        (chunk(DONE, CHUNK_OFFSET_DATA, 0, &data(0, &[0; 64])), true, "OFFSET_DATA chunk of 72 bytes"),
        (chunk(DONE, CHUNK_OFFSET_DATA, 0, &data(0, b"ab")), true, "ended with 0x2 bytes"),
        (chunk(DONE, CHUNK_NONE, 0, b"x"), true, "NONE chunk of 1 bytes"),
        (chunk(0, CHUNK_NONE, 0, &[]), true, "NONE chunk of 0 bytes"),
        (chunk(DONE, 5, 0, &[0; 8]), true, "type 5"),
        (chunk(DONE, CHUNK_ERROR, 0, &[&5u32.to_be_bytes()[..], &[0, 200], b"short"].concat()), true, "200 bytes"),
        (chunk(DONE, CHUNK_ERROR, 0, &error(5, &long)), true, "error chunk of 5006 bytes"),
        (
            chunk(DONE, CHUNK_ERROR_OFFSET, 0, &[error(5, "m").as_slice(), &9u64.to_be_bytes()].concat()),
            true,
            "outside its request",
        ),
        (chunk(DONE, CHUNK_ERROR, 0, &[0, 0]), true, "error chunk of 2 bytes"),
        (chunk(0, CHUNK_OFFSET_DATA, 0, &data(0, b"ab")), true, "the server closed the connection"),
        // Found by the `nbd_client` fuzz target: two chunks for the same bytes added up to a
        // whole read, which completed with bytes no chunk sent.
        (
            [chunk(0, CHUNK_OFFSET_DATA, 0, &data(0, b"ab")), chunk(DONE, CHUNK_OFFSET_DATA, 0, &data(0, b"ab"))]
                .concat(),
            true,
            "a chunk at 0x0+0x2 overlaps another at 0x0+0x2",
        ),
        (
            [chunk(0, CHUNK_OFFSET_HOLE, 0, &hole(1, 2)), chunk(DONE, CHUNK_OFFSET_DATA, 0, &data(0, b"ab"))].concat(),
            true,
            "overlaps another at 0x1+0x2",
        ),
        (Vec::new(), true, "the server closed the connection"),
    ];
    for (replies, structured, want) in cases {
        let mut c = conn(replies, structured);
        let mut a = [0u8; 4];
        match c.run(&mut [Request::Read { offset: 0, buf: &mut a }]) {
            Err(Failure::Broken(0, e)) => assert!(e.to_string().contains(want), "want {want:?}, got {e}"),
            other => panic!("want {want:?}, got {other:?}"),
        }
    }
}
