//! `service`: a request/response service, one request per line, on the serial line (`service`) and
//! on TCP port 7000 (`net`):
//!
//! | request        | reply                                   |
//! |----------------|-----------------------------------------|
//! | `INCR <id>`    | `OK <id> <value>` (value after the increment) |
//! | `GET <id>`     | `VAL <id> <value>`                      |
//! | `STAT <id>`    | `STAT <id> value=<v> requests=<n> counter=<c> churn=<p> kv=<k>` |
//! | `TIME <id>`    | `TIME <id> <ms>`: guest time since boot, from the TSC |
//! | `EXIT <id>`    | `BYE <id> <value>`, then the guest checks its invariants and exits |
//! | `CPUID <leaf>` | `CPUID <leaf> <eax> <ebx> <ecx> <edx>` (sub-leaf 0, in hex), as the guest reads it |
//! | `REBOOT <id>`  | `REBOOT <id>`, then (serial line only) the guest resets the machine and boots again |
//! | `DB <id>`      | `POS <id> <position>`: the place of `id`'s record in the log on the disk (`db`) |
//! | `DBCHECK <id>` | `DBOK <id> <records>`: the log read back agrees with the index in memory (`db`) |
//! | anything else  | `ERR <id or 0> <reason>`                |
//!
//! `INCR` is idempotent per request id: a retried id gets the value of its first execution back
//! and increments nothing (the last `TABLE` ids are remembered). The value never goes backwards.
//! `DB` is idempotent per id in the same way, for every id in the log (see `db`); `DB` and
//! `DBCHECK` answer `ERR <id> <what>` when the log is full, the check fails, or `db` is off.
//!
//! The state (value, request count, idempotency table) is one for the whole guest: the serial line
//! and the network's line service (TCP port 7000, see `net`) both assemble lines with [`Line`] and
//! answer them with [`answer`]; the network's HTTP service runs [`Request`]s through [`execute`].

use crate::io::serial;
use crate::params::number;
use crate::sync::Locked;

const LINE_MAX: usize = 128;
/// The longest reply, its `\n` included.
pub const REPLY_MAX: usize = 192;
const TABLE: usize = 1 << 16;

struct Service {
    value: u64,
    requests: u64,
    /// Direct-mapped: slot `id % TABLE` holds `(id + 1, value)` of the last INCR that used it.
    done: [(u64, u64); TABLE],
}

static SERVICE: Locked<Service> = Locked::new(Service { value: 0, requests: 0, done: [(0, 0); TABLE] });
/// The line being received on the serial line.
static SERIAL_LINE: Locked<Line> = Locked::new(Line::new());

pub enum Poll {
    Idle,
    Busy,
    Exit,
}

/// Reads what the serial line holds and answers every complete request.
pub fn poll() -> Poll {
    let mut state = Poll::Idle;
    while let Some(b) = serial::try_read() {
        state = Poll::Busy;
        let answered = SERIAL_LINE.with(|line| {
            if !line.push(b) {
                return None;
            }
            let r = answer(line);
            line.clear();
            Some(r)
        });
        if let Some((reply, exit)) = answered {
            serial::write(reply.bytes());
            if exit {
                return Poll::Exit;
            }
            if reply.bytes().starts_with(b"REBOOT ") {
                crate::log!("service: rebooting");
                serial::flush();
                crate::io::reboot();
            }
        }
    }
    state
}

pub fn value() -> u64 {
    SERVICE.with(|s| s.value)
}

pub fn requests() -> u64 {
    SERVICE.with(|s| s.requests)
}

/// A request line being assembled, byte by byte: `\r` is ignored, `\n` ends the line, and bytes
/// past [`LINE_MAX`] are dropped (the request is then answered with an error).
pub struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
    overflow: bool,
}

impl Line {
    pub const fn new() -> Line {
        Line { buf: [0; LINE_MAX], len: 0, overflow: false }
    }

    /// Adds `b`; true if it ended the line, which is then to be [`answer`]ed and cleared.
    pub fn push(&mut self, b: u8) -> bool {
        match b {
            b'\r' => false,
            b'\n' => true,
            _ if self.len < LINE_MAX => {
                self.buf[self.len] = b;
                self.len += 1;
                false
            }
            _ => {
                self.overflow = true;
                false
            }
        }
    }

    pub fn clear(&mut self) {
        self.len = 0;
        self.overflow = false;
    }
}

/// One request, parsed.
#[derive(Clone, Copy)]
pub enum Request {
    Incr(u64),
    Get(u64),
    Stat(u64),
    Time(u64),
    Exit(u64),
    Cpuid(u64),
    Reboot(u64),
    Db(u64),
    DbCheck(u64),
    /// Answered with `ERR <id> <why>`.
    Bad {
        id: u64,
        why: &'static str,
    },
}

impl Request {
    fn parse(line: &Line) -> Request {
        let mut words = line.buf[..line.len].split(|&b| b == b' ').filter(|w| !w.is_empty());
        let cmd = words.next().unwrap_or(b"");
        let id = words.next().and_then(number);
        let extra = words.next().is_some();
        match (cmd, id) {
            _ if line.overflow => Request::Bad { id: id.unwrap_or(0), why: "line too long" },
            (_, Some(id)) if extra => Request::Bad { id, why: "trailing words" },
            (b"INCR", Some(id)) => Request::Incr(id),
            (b"GET", Some(id)) => Request::Get(id),
            (b"STAT", Some(id)) => Request::Stat(id),
            (b"TIME", Some(id)) => Request::Time(id),
            (b"EXIT", Some(id)) => Request::Exit(id),
            (b"CPUID", Some(leaf)) => Request::Cpuid(leaf),
            (b"REBOOT", Some(id)) => Request::Reboot(id),
            (b"DB", Some(id)) => Request::Db(id),
            (b"DBCHECK", Some(id)) => Request::DbCheck(id),
            (b"INCR" | b"GET" | b"STAT" | b"TIME" | b"EXIT" | b"CPUID" | b"REBOOT" | b"DB" | b"DBCHECK", None) => {
                Request::Bad { id: 0, why: "missing or bad request id" }
            }
            _ => Request::Bad { id: id.unwrap_or(0), why: "unknown command" },
        }
    }
}

/// A reply line, `\n` included.
pub struct Reply {
    buf: [u8; REPLY_MAX],
    len: usize,
}

impl Reply {
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl core::fmt::Write for Reply {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let b = s.as_bytes();
        let n = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
        Ok(())
    }
}

/// Answers a complete line: the reply, and whether it was `EXIT` (the caller sends the reply,
/// then stops the guest).
pub fn answer(line: &Line) -> (Reply, bool) {
    execute(Request::parse(line))
}

/// Carries out `request` on the shared state: the reply, and whether it was `EXIT`.
pub fn execute(request: Request) -> (Reply, bool) {
    SERVICE.with(|s| s.execute(request))
}

impl Service {
    fn execute(&mut self, request: Request) -> (Reply, bool) {
        use core::fmt::Write as _;
        let mut r = Reply { buf: [0; REPLY_MAX], len: 0 };
        self.requests += 1;
        // Every reply fits with its newline: the longest, STAT with six 20-digit numbers, is 162 bytes.
        let _ = match request {
            Request::Bad { id, why } => write!(r, "ERR {id} {why}"),
            Request::Incr(id) => {
                let slot = &mut self.done[(id % TABLE as u64) as usize];
                if slot.0 != id + 1 {
                    self.value += 1;
                    *slot = (id + 1, self.value);
                }
                write!(r, "OK {id} {}", slot.1)
            }
            Request::Get(id) => write!(r, "VAL {id} {}", self.value),
            Request::Stat(id) => {
                let (counter, churn) = crate::totals();
                write!(
                    r,
                    "STAT {id} value={} requests={} counter={counter} churn={churn} kv={}",
                    self.value,
                    self.requests,
                    crate::kv_updates()
                )
            }
            Request::Time(id) => write!(r, "TIME {id} {}", crate::uptime_ms()),
            Request::Exit(id) => write!(r, "BYE {id} {}", self.value),
            Request::Reboot(id) => write!(r, "REBOOT {id}"),
            Request::Cpuid(leaf) => {
                // CPUID exists on every x86-64 processor.
                let c = core::arch::x86_64::__cpuid_count(leaf as u32, 0);
                write!(r, "CPUID {leaf} {:x} {:x} {:x} {:x}", c.eax, c.ebx, c.ecx, c.edx)
            }
            Request::Db(id) => match crate::db::append(id) {
                Ok(position) => write!(r, "POS {id} {position}"),
                Err(e) => write!(r, "ERR {id} {e}"),
            },
            Request::DbCheck(id) => match crate::db::check() {
                Ok(records) => write!(r, "DBOK {id} {records}"),
                Err(e) => write!(r, "ERR {id} {e}"),
            },
        };
        let _ = r.write_str("\n");
        (r, matches!(request, Request::Exit(_)))
    }
}
