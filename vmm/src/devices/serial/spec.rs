//! `--serial SPEC`: where COM1 is connected on the host.

use std::path::PathBuf;

/// Where COM1 is connected on the host.
/// A file that receives every byte the serial port releases (QEMU's `logfile=`, libvirt's
/// `<log file=...>`: Nova's `console.log`), whatever the serial port is connected to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialLog {
    /// A file, created if missing; `append` keeps what it holds (otherwise it is truncated).
    File { path: PathBuf, append: bool },
    /// A descriptor this process was given (libvirt's, through `-add-fd`: a file or virtlogd's
    /// pipe). It is duplicated, never closed: the VM may be built more than once.
    Fd(i32),
}

impl SerialLog {
    pub(super) fn open(&self) -> std::io::Result<std::fs::File> {
        match self {
            SerialLog::File { path, append } => {
                let mut o = std::fs::OpenOptions::new();
                o.create(true);
                if *append {
                    o.append(true);
                } else {
                    o.write(true).truncate(true);
                }
                o.open(path)
            }
            SerialLog::Fd(fd) => {
                // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor from `fd` (it fails with EBADF
                // if `fd` is not open); the original is left alone.
                let new = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 0) };
                if new < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: `new` was just created and nothing else owns it.
                Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(new) })
            }
        }
    }

    /// How the log is named in messages.
    pub fn describe(&self) -> String {
        match self {
            SerialLog::File { path, .. } => path.display().to_string(),
            SerialLog::Fd(fd) => format!("descriptor {fd}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialSpec {
    /// Standard input and output of smpft.
    Stdio,
    /// A unix socket smpft listens on; one client at a time, a new client replaces the old.
    Unix(PathBuf),
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Output discarded; no input.
    Null,
    /// A pseudo-terminal smpft creates (what `virsh console` attaches to); its path is logged
    /// and reported by [`super::SerialBackend::pty_path`]. Output nobody reads is dropped, as on a
    /// serial line with nothing plugged in.
    Pty,
}

impl std::str::FromStr for SerialSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let path = |p: &str, kind: &str| {
            if p.is_empty() {
                Err(format!("'{kind}:' needs a path, e.g. {kind}:/run/vm.sock"))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        match s.split_once(':') {
            None if s == "stdio" => Ok(SerialSpec::Stdio),
            None if s == "null" || s == "none" => Ok(SerialSpec::Null),
            None if s == "pty" => Ok(SerialSpec::Pty),
            Some(("unix", p)) => path(p, "unix").map(SerialSpec::Unix),
            Some(("file", p)) => path(p, "file").map(SerialSpec::File),
            _ => Err(format!("'{s}' is not a serial backend; use stdio, unix:PATH, file:PATH, pty or null")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot listen on serial socket {path}")]
    Listen { path: PathBuf, source: std::io::Error },
    #[error("cannot open serial output file {path}")]
    File { path: PathBuf, source: std::io::Error },
    #[error("cannot open serial log {what}")]
    Log { what: String, source: std::io::Error },
    #[error("cannot create serial event")]
    Event(#[source] std::io::Error),
    #[error("bad serial state: {0}")]
    State(String),
    #[error("cannot create a pseudo-terminal for the serial port")]
    Pty(#[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_serial_specs() {
        assert_eq!("stdio".parse(), Ok(SerialSpec::Stdio));
        assert_eq!("null".parse(), Ok(SerialSpec::Null));
        assert_eq!("unix:/tmp/a.sock".parse(), Ok(SerialSpec::Unix("/tmp/a.sock".into())));
        assert_eq!("file:/tmp/out".parse(), Ok(SerialSpec::File("/tmp/out".into())));
        assert_eq!("pty".parse(), Ok(SerialSpec::Pty));
        assert!("unix:".parse::<SerialSpec>().unwrap_err().contains("needs a path"));
        assert!("tcp:1234".parse::<SerialSpec>().unwrap_err().contains("not a serial backend"));
        assert!("".parse::<SerialSpec>().is_err());
    }
}
