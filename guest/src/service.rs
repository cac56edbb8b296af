//! `service`: a request/response service on the serial line, one request per line:
//!
//! | request        | reply                                   |
//! |----------------|-----------------------------------------|
//! | `INCR <id>`    | `OK <id> <value>` (value after the increment) |
//! | `GET <id>`     | `VAL <id> <value>`                      |
//! | `STAT <id>`    | `STAT <id> value=<v> requests=<n> counter=<c> churn=<p> kv=<k>` |
//! | `TIME <id>`    | `TIME <id> <ms>`: guest time since boot, from the TSC |
//! | `EXIT <id>`    | `BYE <id> <value>`, then the guest checks its invariants and exits |
//! | anything else  | `ERR <id or 0> <reason>`                |
//!
//! `INCR` is idempotent per request id: a retried id gets the value of its first execution back
//! and increments nothing (the last `TABLE` ids are remembered). The value never goes backwards.

use crate::io::serial;
use crate::params::number;
use crate::sync::Locked;

const LINE_MAX: usize = 128;
const TABLE: usize = 1 << 16;

pub struct Service {
    value: u64,
    requests: u64,
    line: [u8; LINE_MAX],
    len: usize,
    overflow: bool,
    /// Direct-mapped: slot `id % TABLE` holds `(id + 1, value)` of the last INCR that used it.
    done: [(u64, u64); TABLE],
}

static SERVICE: Locked<Service> =
    Locked::new(Service { value: 0, requests: 0, line: [0; LINE_MAX], len: 0, overflow: false, done: [(0, 0); TABLE] });

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
        let exit = SERVICE.with(|s| {
            if b == b'\r' {
                return false;
            }
            if b != b'\n' {
                if s.len < LINE_MAX {
                    s.line[s.len] = b;
                    s.len += 1;
                } else {
                    s.overflow = true;
                }
                return false;
            }
            let exit = s.handle_line();
            s.len = 0;
            s.overflow = false;
            exit
        });
        if exit {
            return Poll::Exit;
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

struct Reply {
    buf: [u8; 192],
    len: usize,
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

impl Service {
    fn handle_line(&mut self) -> bool {
        use core::fmt::Write as _;
        let line = self.line;
        let line = &line[..self.len];
        let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
        let cmd = words.next().unwrap_or(b"");
        let id = words.next().and_then(number);
        let extra = words.next().is_some();
        let mut r = Reply { buf: [0; 192], len: 0 };
        let mut exit = false;
        self.requests += 1;
        match (cmd, id) {
            _ if self.overflow => {
                let _ = write!(r, "ERR {} line too long", id.unwrap_or(0));
            }
            (_, Some(id)) if extra => {
                let _ = write!(r, "ERR {id} trailing words");
            }
            (b"INCR", Some(id)) => {
                let slot = &mut self.done[(id % TABLE as u64) as usize];
                if slot.0 != id + 1 {
                    self.value += 1;
                    *slot = (id + 1, self.value);
                }
                let _ = write!(r, "OK {id} {}", slot.1);
            }
            (b"GET", Some(id)) => {
                let _ = write!(r, "VAL {id} {}", self.value);
            }
            (b"STAT", Some(id)) => {
                let (counter, churn) = crate::totals();
                let _ = write!(
                    r,
                    "STAT {id} value={} requests={} counter={counter} churn={churn} kv={}",
                    self.value,
                    self.requests,
                    crate::kv_updates()
                );
            }
            (b"TIME", Some(id)) => {
                let _ = write!(r, "TIME {id} {}", crate::uptime_ms());
            }
            (b"EXIT", Some(id)) => {
                let _ = write!(r, "BYE {id} {}", self.value);
                exit = true;
            }
            (b"INCR" | b"GET" | b"STAT" | b"TIME" | b"EXIT", None) => {
                let _ = write!(r, "ERR 0 missing or bad request id");
            }
            _ => {
                let _ = write!(r, "ERR {} unknown command", id.unwrap_or(0));
            }
        }
        let _ = r.write_str("\n");
        serial::write(&r.buf[..r.len]);
        exit
    }
}
