//! `--disk SPEC`: a path to a raw image or block device, or an NBD URI in the syntax qemu and
//! libnbd use, optionally followed by `,readonly`.
//!
//! ```text
//! /var/lib/vm1/disk.raw
//! /dev/vg0/vm1,readonly
//! nbd://storage.example:10809/vm1
//! nbd://[fd00::1]/vm1
//! nbd+unix:///vm1?socket=/run/qemu-nbd.sock
//! ```

use std::path::PathBuf;

/// Where a disk's blocks live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A raw image file or a block device.
    Path(PathBuf),
    /// An NBD export over TCP.
    NbdTcp { host: String, port: u16, export: String },
    /// An NBD export over a unix socket.
    NbdUnix { socket: PathBuf, export: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub location: Location,
    pub readonly: bool,
}

impl std::fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.location {
            Location::Path(p) => write!(f, "{}", p.display())?,
            Location::NbdTcp { host, port, export } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{export}")?
            }
            Location::NbdTcp { host, port, export } => write!(f, "nbd://{host}:{port}/{export}")?,
            Location::NbdUnix { socket, export } => write!(f, "nbd+unix:///{export}?socket={}", socket.display())?,
        }
        if self.readonly {
            write!(f, ",readonly")?;
        }
        Ok(())
    }
}

/// The default NBD port.
pub const NBD_PORT: u16 = 10809;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("a disk needs a path or an NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH)")]
    Empty,
    #[error("'{0}' is not a disk option; the only option is readonly")]
    Option(String),
    #[error("'{uri}': {why}")]
    Uri { uri: String, why: &'static str },
}

impl std::str::FromStr for DiskSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<DiskSpec, SpecError> {
        // Options follow the last comma that is not part of the URI's query.
        let (target, options) = match s.rsplit_once(',') {
            Some((t, o)) if !o.contains('/') && !o.contains('=') => (t, Some(o)),
            _ => (s, None),
        };
        let readonly = match options {
            None => false,
            Some("readonly") => true,
            Some(o) => return Err(SpecError::Option(o.into())),
        };
        if target.is_empty() {
            return Err(SpecError::Empty);
        }
        let location = if target.starts_with("nbd") && target.contains("://") {
            parse_nbd(target)?
        } else {
            Location::Path(PathBuf::from(target))
        };
        Ok(DiskSpec { location, readonly })
    }
}

fn parse_nbd(uri: &str) -> Result<Location, SpecError> {
    let bad = |why| SpecError::Uri { uri: uri.into(), why };
    let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("not a URI"))?;
    // authority, then an optional /EXPORT, then an optional ?QUERY
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = before_query.split_once('/').unwrap_or((before_query, ""));
    let export = path.to_string();
    match scheme {
        "nbd" => {
            if !query.is_empty() {
                return Err(bad("nbd:// takes no query"));
            }
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed [ in the host"))?;
                (h, after.strip_prefix(':'))
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (authority, None),
                }
            };
            if host.is_empty() {
                return Err(bad("no host"));
            }
            let port = match port {
                None => NBD_PORT,
                Some(p) => p.parse().ok().filter(|&p| p > 0).ok_or_else(|| bad("bad port"))?,
            };
            Ok(Location::NbdTcp { host: host.into(), port, export })
        }
        "nbd+unix" => {
            if !authority.is_empty() {
                return Err(bad("nbd+unix:// takes no host (nbd+unix:///EXPORT?socket=PATH)"));
            }
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|p| !p.is_empty())
                .ok_or_else(|| bad("no socket=PATH"))?;
            Ok(Location::NbdUnix { socket: PathBuf::from(socket), export })
        }
        _ => Err(bad("not an NBD scheme (nbd, nbd+unix)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<DiskSpec, SpecError> {
        s.parse()
    }

    #[test]
    fn paths_and_options() {
        assert_eq!(
            p("/a/disk.raw").unwrap(),
            DiskSpec { location: Location::Path("/a/disk.raw".into()), readonly: false }
        );
        assert_eq!(
            p("/dev/vg/x,readonly").unwrap(),
            DiskSpec { location: Location::Path("/dev/vg/x".into()), readonly: true }
        );
        assert_eq!(p("/a,b/disk").unwrap().location, Location::Path("/a,b/disk".into()), "a comma inside a path");
        assert_eq!(p("/a/d,rw"), Err(SpecError::Option("rw".into())));
        assert_eq!(p(""), Err(SpecError::Empty));
        assert_eq!(p(",readonly"), Err(SpecError::Empty));
    }

    #[test]
    fn nbd_uris_as_qemu_and_libnbd_write_them() {
        let tcp = |host: &str, port, export: &str| Location::NbdTcp { host: host.into(), port, export: export.into() };
        assert_eq!(p("nbd://storage:10810/vm1").unwrap().location, tcp("storage", 10810, "vm1"));
        assert_eq!(p("nbd://storage/vm1").unwrap().location, tcp("storage", NBD_PORT, "vm1"));
        assert_eq!(p("nbd://storage").unwrap().location, tcp("storage", NBD_PORT, ""));
        assert_eq!(p("nbd://[fd00::1]:99/x").unwrap().location, tcp("fd00::1", 99, "x"));
        assert_eq!(
            p("nbd://127.0.0.1/x,readonly").unwrap(),
            DiskSpec { location: tcp("127.0.0.1", NBD_PORT, "x"), readonly: true }
        );
        assert_eq!(
            p("nbd+unix:///vm1?socket=/run/nbd.sock").unwrap().location,
            Location::NbdUnix { socket: "/run/nbd.sock".into(), export: "vm1".into() }
        );
        assert_eq!(
            p("nbd+unix://?socket=/s").unwrap().location,
            Location::NbdUnix { socket: "/s".into(), export: "".into() }
        );
        for bad in [
            "nbd://:1/x",
            "nbd://h:0/x",
            "nbd://h:port/x",
            "nbd://[::1/x",
            "nbd+unix:///x",
            "nbd+unix://h/x?socket=/s",
            "nbds://h/x",
            "nbd://h/x?tls=1",
        ] {
            assert!(matches!(p(bad), Err(SpecError::Uri { .. })), "{bad}: {:?}", p(bad));
        }
    }
}
