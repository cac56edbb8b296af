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
        if self.reader.read_line(&mut l)? == 0 {
            return Err(ClientError::Closed);
        }
        Ok(l.trim_end().to_string())
    }

    pub fn call(&mut self, line: &str) -> Result<String, ClientError> {
        self.send(line)?;
        self.recv()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies() {
        assert_eq!(parse_reply("OK 7 3", "OK").unwrap(), (7, 3));
        assert_eq!(parse_reply("BYE 9 12", "BYE").unwrap(), (9, 12));
        assert!(parse_reply("OK 7", "OK").is_err());
        assert!(parse_reply("VAL 7 3", "OK").is_err());
        assert!(parse_reply("ERR 7 unknown command", "OK").is_err());
    }
}
