//! The handshake: fixed newstyle negotiation with NBD_OPT_STRUCTURED_REPLY and NBD_OPT_GO (asking
//! for NBD_INFO_BLOCK_SIZE), and NBD_OPT_EXPORT_NAME for a server that does not know NBD_OPT_GO.
//! Pure over any `Read + Write`, so a scripted server in memory tests every branch.

use std::io::{Error, ErrorKind, Read, Write};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OLDSTYLE: u64 = 0x0000_4202_8186_1253;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (NBD_FLAG_*).
pub const HAS_FLAGS: u16 = 1 << 0;
pub const READ_ONLY: u16 = 1 << 1;
pub const SEND_FLUSH: u16 = 1 << 2;
pub const SEND_TRIM: u16 = 1 << 5;
pub const SEND_WRITE_ZEROES: u16 = 1 << 6;

/// The largest option reply read (an INFO reply with a description is at most 4 KiB and a bit).
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// What a request may move when the server gives no maximum (the protocol's default).
pub const DEFAULT_MAX_BLOCK: u32 = 32 << 20;

/// What the handshake learnt of the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Minimum, preferred and maximum block size.
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// NBD_OPT_GO was used (false: NBD_OPT_EXPORT_NAME).
    pub go: bool,
}

impl Export {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & HAS_FLAGS != 0 && self.flags & flag != 0
    }
}

fn protocol(what: String) -> Error {
    Error::new(ErrorKind::InvalidData, format!("NBD protocol error in the handshake: {what}"))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    (u64::from(u32_at(b, at)) << 32) | u64::from(u32_at(b, at + 4))
}

fn read_n(s: &mut impl Read, n: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof => Error::new(ErrorKind::UnexpectedEof, "the server closed the connection"),
        _ => e,
    })?;
    Ok(b)
}

fn send_option(s: &mut impl Write, option: u32, data: &[u8]) -> std::io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)?;
    s.flush()
}

/// One option reply: its type and data.
fn read_option_reply(s: &mut impl Read, option: u32) -> std::io::Result<(u32, Vec<u8>)> {
    let h = read_n(s, 20)?;
    let (magic, opt, kind, len) = (u64_at(&h, 0), u32_at(&h, 8), u32_at(&h, 12), u32_at(&h, 16));
    if magic != REPLY_MAGIC {
        return Err(protocol(format!("option reply magic {magic:#x}")));
    }
    if opt != option {
        return Err(protocol(format!("a reply to option {opt} while option {option} was asked")));
    }
    if len > MAX_OPTION_REPLY {
        return Err(protocol(format!("a {len}-byte option reply")));
    }
    Ok((kind, read_n(s, len as usize)?))
}

/// The operator's words for an option error reply, with the server's own message.
fn refusal(export: &str, kind: u32, data: &[u8]) -> Error {
    let why = match kind {
        REP_ERR_UNKNOWN => "the server has no such export (NBD_REP_ERR_UNKNOWN)".to_string(),
        REP_ERR_TLS_REQD => {
            "the server requires TLS, which smpft's NBD client does not speak (NBD_REP_ERR_TLS_REQD)".into()
        }
        REP_ERR_POLICY => "the server's policy forbids it (NBD_REP_ERR_POLICY)".into(),
        REP_ERR_INVALID => "the server calls the request invalid (NBD_REP_ERR_INVALID)".into(),
        REP_ERR_PLATFORM => "the server's platform cannot serve it (NBD_REP_ERR_PLATFORM)".into(),
        REP_ERR_SHUTDOWN => "the server is shutting down (NBD_REP_ERR_SHUTDOWN)".into(),
        REP_ERR_BLOCK_SIZE_REQD => "the server requires block size negotiation (NBD_REP_ERR_BLOCK_SIZE_REQD)".into(),
        REP_ERR_UNSUP => "the server does not support the option (NBD_REP_ERR_UNSUP)".into(),
        k => format!("the server refused it with error {k:#x}"),
    };
    let message = String::from_utf8_lossy(data);
    let message = message.trim();
    let said = if message.is_empty() { String::new() } else { format!("; it says: {message}") };
    let kind = if kind == REP_ERR_UNKNOWN { ErrorKind::NotFound } else { ErrorKind::Other };
    Error::new(kind, format!("export '{export}': {why}{said}"))
}

/// Negotiates `export` on a fresh connection.
pub fn negotiate(s: &mut (impl Read + Write), export: &str) -> std::io::Result<Export> {
    let h = read_n(s, 16)?;
    if u64_at(&h, 0) != NBDMAGIC {
        return Err(protocol("not an NBD server (no NBDMAGIC)".into()));
    }
    match u64_at(&h, 8) {
        IHAVEOPT => {}
        OLDSTYLE => return Err(protocol("an oldstyle server, which has no named exports: use newstyle".into())),
        m => return Err(protocol(format!("unknown handshake magic {m:#x}"))),
    }
    let server = u16_at(&read_n(s, 2)?, 0);
    let fixed = server & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = server & FLAG_NO_ZEROES != 0;
    let client = u32::from(server & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    s.write_all(&client.to_be_bytes())?;
    if export.len() > 4096 {
        return Err(Error::new(ErrorKind::InvalidInput, "the export name is longer than 4096 bytes"));
    }
    if !fixed {
        // Only NBD_OPT_EXPORT_NAME may be sent to a server that is not fixed newstyle.
        return export_name(s, export, no_zeroes, false);
    }
    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let (kind, _) = read_option_reply(s, OPT_STRUCTURED_REPLY)?;
    // Any refusal (unsupported, or TLS required, which NBD_OPT_GO reports again) means simple replies.
    let structured = kind == REP_ACK;
    match go(s, export)? {
        Some(mut e) => {
            e.structured = structured;
            Ok(e)
        }
        None => export_name(s, export, no_zeroes, structured),
    }
}

/// NBD_OPT_GO; `None` if the server does not know it.
fn go(s: &mut (impl Read + Write), export: &str) -> std::io::Result<Option<Export>> {
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &data)?;
    let mut found: Option<(u64, u16)> = None;
    let mut blocks = None;
    loop {
        let (kind, d) = read_option_reply(s, OPT_GO)?;
        match kind {
            REP_ACK => break,
            REP_INFO if d.len() < 2 => return Err(protocol("an empty NBD_REP_INFO".into())),
            REP_INFO => match (u16_at(&d, 0), d.len()) {
                (INFO_EXPORT, 12) => found = Some((u64_at(&d, 2), u16_at(&d, 10))),
                (INFO_BLOCK_SIZE, 14) => blocks = Some(block_sizes(u32_at(&d, 2), u32_at(&d, 6), u32_at(&d, 10))?),
                (INFO_EXPORT | INFO_BLOCK_SIZE, n) => return Err(protocol(format!("an NBD_REP_INFO of {n} bytes"))),
                _ => {} // NBD_INFO_NAME, NBD_INFO_DESCRIPTION, and what a later protocol adds.
            },
            REP_ERR_UNSUP => return Ok(None),
            k if k & (1 << 31) != 0 => return Err(refusal(export, k, &d)),
            k => return Err(protocol(format!("reply type {k} to NBD_OPT_GO"))),
        }
    }
    let Some((size, flags)) = found else {
        return Err(protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into()));
    };
    let (min_block, preferred_block, max_block) = blocks.unwrap_or((1, 4096, DEFAULT_MAX_BLOCK));
    Ok(Some(Export { size, flags, min_block, preferred_block, max_block, structured: false, go: true }))
}

/// Checks the server's block sizes (powers of two, the minimum at most 64 KiB, the maximum a
/// multiple of the minimum) and returns them.
fn block_sizes(min: u32, preferred: u32, max: u32) -> std::io::Result<(u32, u32, u32)> {
    let ok = min.is_power_of_two()
        && min <= 64 << 10
        && preferred.is_power_of_two()
        && preferred >= min
        && max >= min
        && (max % min == 0 || max == u32::MAX);
    if !ok {
        return Err(protocol(format!("invalid block sizes: minimum {min}, preferred {preferred}, maximum {max}")));
    }
    Ok((min, preferred, max))
}

/// NBD_OPT_EXPORT_NAME: the server answers with the export's size and flags, or closes the
/// connection when it has no such export.
fn export_name(
    s: &mut (impl Read + Write),
    export: &str,
    no_zeroes: bool,
    structured: bool,
) -> std::io::Result<Export> {
    send_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
    let d = read_n(s, if no_zeroes { 10 } else { 134 }).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof => Error::new(
            ErrorKind::NotFound,
            format!(
                "export '{export}': the server closed the connection (an old server does so for an unknown export)"
            ),
        ),
        _ => e,
    })?;
    let (min_block, preferred_block, max_block) = (1, 4096, DEFAULT_MAX_BLOCK);
    Ok(Export {
        size: u64_at(&d, 0),
        flags: u16_at(&d, 8),
        min_block,
        preferred_block,
        max_block,
        structured,
        go: false,
    })
}
