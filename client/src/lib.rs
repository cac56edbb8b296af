//! A client for the test guest's `service` (see `guest/src/service.rs`) over the serial unix
//! socket, as used by the demo, the tests and the benchmarks.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}")]
    Connect { path: String, source: std::io::Error },
    #[error("service connection failed")]
    Io(#[from] std::io::Error),
    #[error("service closed the connection")]
    Closed,
    #[error("unexpected reply {0:?}")]
    Reply(String),
}

pub struct ServiceClient {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl ServiceClient {
    /// Connects, retrying for up to `within` while the VM starts.
    pub fn connect(path: &Path, within: Duration) -> Result<ServiceClient, ClientError> {
        let deadline = Instant::now() + within;
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(30)))?;
                    let reader = BufReader::new(s.try_clone()?);
                    return Ok(ServiceClient { writer: s, reader });
                }
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(source) => return Err(ClientError::Connect { path: path.display().to_string(), source }),
            }
        }
    }

    pub fn send(&mut self, line: &str) -> Result<(), ClientError> {
        self.writer.write_all(format!("{line}\n").as_bytes())?;
        Ok(())
    }

    pub fn recv(&mut self) -> Result<String, ClientError> {
        let mut l = String::new();
        // A line cut short by the end of the connection is no reply: output is a byte stream,
        // and the rest of the line may never have been released (or sent).
        if self.reader.read_line(&mut l)? == 0 || !l.ends_with('\n') {
            return Err(ClientError::Closed);
        }
        Ok(l.trim_end().to_string())
    }

    pub fn call(&mut self, line: &str) -> Result<String, ClientError> {
        self.send(line)?;
        self.recv()
    }
}

/// Runs one QMP command on the server at `path` (negotiating first) and returns its `return`
/// value, or the error's description.
pub fn qmp(path: &Path, cmd: &str, args: Option<serde_json::Value>) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let s = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => return Err(format!("QMP {}: {e}", path.display())),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let io = |e: std::io::Error| format!("QMP {}: {e}", path.display());
    s.set_read_timeout(Some(Duration::from_secs(30))).map_err(io)?;
    let mut r = BufReader::new(s.try_clone().map_err(io)?);
    let mut w = s;
    let mut line = String::new();
    let mut next = |r: &mut BufReader<UnixStream>| -> Result<serde_json::Value, String> {
        loop {
            line.clear();
            if r.read_line(&mut line).map_err(io)? == 0 {
                return Err(format!("QMP {}: connection closed", path.display()));
            }
            let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| format!("QMP sent bad JSON: {e}"))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    };
    next(&mut r)?;
    let mut call = |req: serde_json::Value| -> Result<serde_json::Value, String> {
        w.write_all(format!("{req}\n").as_bytes()).map_err(io)?;
        let v = next(&mut r)?;
        match v.get("error") {
            Some(e) => Err(format!("{}: {}", req["execute"], e["desc"].as_str().unwrap_or("error"))),
            None => Ok(v["return"].clone()),
        }
    };
    call(serde_json::json!({"execute": "qmp_capabilities"}))?;
    let mut req = serde_json::json!({"execute": cmd});
    if let Some(a) = args {
        req["arguments"] = a;
    }
    call(req)
}

/// Parses `<kind> <id> <value>` (`OK`, `VAL`, `BYE` replies) into `(id, value)`.
pub fn parse_reply(line: &str, kind: &str) -> Result<(u64, u64), ClientError> {
    let bad = || ClientError::Reply(line.to_string());
    let mut w = line.split(' ');
    if w.next() != Some(kind) {
        return Err(bad());
    }
    let id = w.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let value = w.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    Ok((id, value))
}

/// A client of a protected service, as a real one with timeouts would behave: it sends requests
/// one at a time (`INCR`, or any `<cmd> <id>` through [`FailoverClient::call`]), and whenever
/// the connection breaks or a reply is late it reconnects to whichever copy answers and retries
/// the same request id. It checks every `INCR` reply: the service's value must go up by exactly
/// one per request (nothing lost, nothing duplicated, nothing rolled back).
pub struct FailoverClient {
    paths: Vec<std::path::PathBuf>,
    conn: Option<ServiceClient>,
    /// Which of `paths` the connection is to.
    pub connected_to: Option<usize>,
    next_id: u64,
    /// The last value acknowledged to this client.
    pub last: Option<u64>,
    pub replies: u64,
    /// Outages seen: from the first failed attempt to the next good reply.
    pub outages: Vec<Duration>,
    reply_timeout: Duration,
    /// The last lines sent and received, with the copy they went to, for error reports.
    recent: std::collections::VecDeque<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error("no copy of the service answered within {0:?}")]
    Unreachable(Duration),
    #[error("request {id}: value {got} after {last:?}: acknowledged output was lost, duplicated or rolled back; recent traffic: {recent:?}")]
    Inconsistent { id: u64, got: u64, last: Option<u64>, recent: Vec<String> },
}

/// The process on the other end of a unix socket.
fn peer_pid(s: &UnixStream) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes a `ucred` of at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.pid)
}

impl FailoverClient {
    /// Ids start at `first_id` (keep them unique per service lifetime).
    pub fn new(paths: Vec<std::path::PathBuf>, first_id: u64) -> FailoverClient {
        FailoverClient {
            paths,
            conn: None,
            connected_to: None,
            next_id: first_id,
            last: None,
            replies: 0,
            outages: Vec::new(),
            reply_timeout: Duration::from_millis(500),
            recent: Default::default(),
        }
    }

    /// How long it waits for a reply before it reconnects and retries (default 500 ms). A guest
    /// short of CPU answers late; a client that retries sooner than it answers never hears back.
    pub fn reply_timeout(mut self, t: Duration) -> FailoverClient {
        self.reply_timeout = t;
        self
    }

    fn connect_any(&mut self, deadline: Instant) -> Result<(), FailoverError> {
        loop {
            for (i, p) in self.paths.iter().enumerate() {
                if let Ok(s) = UnixStream::connect(p) {
                    let _ = s.set_read_timeout(Some(self.reply_timeout));
                    let pid = peer_pid(&s);
                    if self.recent.len() == 16 {
                        self.recent.pop_front();
                    }
                    self.recent
                        .push_back(format!("connected to {i} (pid {pid:?}) at {:?}", std::time::SystemTime::now()));
                    if let Ok(r) = s.try_clone() {
                        self.conn = Some(ServiceClient { writer: s, reader: BufReader::new(r) });
                        self.connected_to = Some(i);
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(FailoverError::Unreachable(self.reply_timeout * 20));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// One `INCR`, retried until some copy answers (for at most `give_up`). Returns the value.
    pub fn incr(&mut self, give_up: Duration) -> Result<u64, FailoverError> {
        let id = self.next_id;
        self.next_id += 1;
        let v = self.call("INCR", id, "OK", give_up)?;
        if self.last.is_some_and(|l| v != l + 1) {
            return Err(FailoverError::Inconsistent {
                id,
                got: v,
                last: self.last,
                recent: self.recent.iter().cloned().collect(),
            });
        }
        self.last = Some(v);
        Ok(v)
    }

    /// `<cmd> <id>`, sent again with the same id on whichever copy answers until one replies
    /// `<kind> <id> <value>` (for at most `give_up`); returns the value. A reply of `kind` to
    /// another id is a late answer to an earlier try and is skipped; any other reply counts as
    /// no answer. The caller keeps ids unique per request (a retry of a request reuses its id).
    pub fn call(&mut self, cmd: &str, id: u64, kind: &str, give_up: Duration) -> Result<u64, FailoverError> {
        let start = Instant::now();
        let deadline = start + give_up;
        let mut failed_at: Option<Instant> = None;
        loop {
            if self.conn.is_none() {
                self.connect_any(deadline)?;
            }
            let c = self.conn.as_mut().expect("connected");
            let at = self.connected_to.unwrap_or(0);
            let recent = &mut self.recent;
            let mut note = |s: String| {
                if recent.len() == 16 {
                    recent.pop_front();
                }
                recent.push_back(s);
            };
            note(format!("{at}> {cmd} {id}"));
            let got = c.send(&format!("{cmd} {id}")).and_then(|()| loop {
                let line = c.recv().inspect_err(|e| note(format!("{at}! {e}")))?;
                note(format!("{at}< {line}"));
                match parse_reply(&line, kind) {
                    Ok((rid, v)) if rid == id => break Ok(v),
                    Ok(_) => continue,
                    _ => break Err(ClientError::Reply(line)),
                }
            });
            match got {
                Ok(v) => {
                    if let Some(t) = failed_at {
                        self.outages.push(t.elapsed());
                    }
                    self.replies += 1;
                    return Ok(v);
                }
                Err(_) => {
                    failed_at.get_or_insert_with(Instant::now);
                    self.conn = None;
                    self.connected_to = None;
                    if Instant::now() > deadline {
                        return Err(FailoverError::Unreachable(give_up));
                    }
                }
            }
        }
    }

    /// The last lines sent and received, with the copy each went to.
    pub fn recent(&self) -> Vec<String> {
        self.recent.iter().cloned().collect()
    }

    /// Sends `EXIT` to the copy it is connected to (the guest then checks its invariants and
    /// exits); returns the value it reports.
    pub fn exit(&mut self) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let line = self.once(&format!("EXIT {id}"))?;
        parse_reply(&line, "BYE").map(|(_, v)| v)
    }

    /// Sends `line` to the copy it is connected to, once, and returns the reply as it is.
    pub fn once(&mut self, line: &str) -> Result<String, ClientError> {
        self.conn.as_mut().ok_or(ClientError::Closed)?.call(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_cut_off_by_the_end_of_the_connection_is_not_a_reply() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let reader = BufReader::new(a.try_clone().unwrap());
        let mut c = ServiceClient { writer: a, reader };
        b.write_all(b"OK 1 1\nOK 2 1").unwrap();
        drop(b);
        assert_eq!(c.recv().unwrap(), "OK 1 1");
        assert!(matches!(c.recv(), Err(ClientError::Closed)), "\"OK 2 1\" was only the start of \"OK 2 17\"");
    }

    #[test]
    fn parses_replies() {
        assert_eq!(parse_reply("OK 7 3", "OK").unwrap(), (7, 3));
        assert_eq!(parse_reply("BYE 9 12", "BYE").unwrap(), (9, 12));
        assert!(parse_reply("OK 7", "OK").is_err());
        assert!(parse_reply("VAL 7 3", "OK").is_err());
        assert!(parse_reply("ERR 7 unknown command", "OK").is_err());
    }
}
