//! `--disk SPEC`: a path to a raw image or block device, or an NBD URI in the syntax qemu and
//! libnbd use, optionally followed by `,readonly`; an image in a format of QEMU's block layer
//! names it with `,format=` (and may ask for `,cache=` and `,discard=` as QEMU's `-drive` spells
//! them): qemu-storage-daemon opens it ([`crate::qsd`]). `,bus=scsi` puts the disk on the VM's
//! virtio-scsi controller instead of a virtio-blk of its own, at the next free LUN or at
//! `,lun=N`, with its write cache (`,write-cache=off`: every write is flushed before it
//! completes); see [`Bus`].
//!
//! ```text
//! /var/lib/vm1/disk.raw
//! /dev/vg0/vm1,readonly
//! /var/lib/nova/instances/x/disk,format=qcow2,cache=none
//! nbd://storage.example:10809/vm1
//! nbd://[fd00::1]/vm1
//! nbd+unix:///vm1?socket=/run/qemu-nbd.sock
//! ```

use std::path::{Path, PathBuf};

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
    /// A graph of QEMU block nodes qemu-storage-daemon opens and exports (`location` is then
    /// what the operator named, for messages, until the daemon serves it).
    pub graph: Option<Graph>,
    /// The device the guest finds the disk on.
    pub bus: Bus,
}

/// The device a disk is on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Bus {
    /// A virtio-blk device of its own.
    #[default]
    VirtioBlk,
    /// A logical unit of the VM's virtio-scsi controller (one target, the disks its LUNs).
    Scsi(ScsiUnit),
}

/// A disk as a SCSI logical unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiUnit {
    /// Its LUN (`None`: the lowest one free).
    pub lun: Option<u16>,
    /// The write cache the guest sees (MODE SENSE's WCE) and flushes; without it every write
    /// is on stable storage before it completes.
    pub write_cache: bool,
    /// Its identifier (INQUIRY's serial number and device identification pages); `None`: the
    /// disk's name in the VM.
    pub device_id: Option<String>,
}

impl Default for ScsiUnit {
    fn default() -> Self {
        ScsiUnit { lun: None, write_cache: true, device_id: None }
    }
}

/// A disk QEMU's block layer opens: its nodes as QEMU's `--blockdev` takes them, served by
/// qemu-storage-daemon over NBD ([`crate::qsd`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    /// What the operator calls the disk (messages name it).
    pub name: String,
    /// The node the guest's disk is (the top of the graph, exported).
    pub node: String,
    /// `--blockdev` values, verbatim, in the order they are opened (a node after those it names).
    pub blockdevs: Vec<String>,
    /// `--object` values (throttle groups), verbatim.
    pub objects: Vec<String>,
}

impl std::fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(g) = &self.graph {
            return write!(f, "{}", g.name);
        }
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
        if let Bus::Scsi(u) = &self.bus {
            write!(f, ",bus=scsi")?;
            if let Some(lun) = u.lun {
                write!(f, ",lun={lun}")?;
            }
            if !u.write_cache {
                write!(f, ",write-cache=off")?;
            }
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
    #[error("'{0}' is not a disk option (readonly, format=, cache=, discard=, bus=, lun=, write-cache=)")]
    Option(String),
    #[error("'{0}': {1}")]
    Value(String, &'static str),
    #[error("'{uri}': {why}")]
    Uri { uri: String, why: &'static str },
}

impl std::str::FromStr for DiskSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<DiskSpec, SpecError> {
        // Options follow the target, each after a comma; a piece with a '/' belongs to the
        // target (a path or a URI's query).
        let mut target = s;
        let mut options = Options::default();
        while let Some((t, o)) = target.rsplit_once(',').filter(|(_, o)| !o.contains('/')) {
            options.take(o)?;
            target = t;
        }
        if target.is_empty() {
            return Err(SpecError::Empty);
        }
        let readonly = options.readonly;
        let bus = options.bus()?;
        if target.starts_with("nbd") && target.contains("://") {
            if options.format.is_some() || options.cache.is_some() || options.discard.is_some() {
                return Err(SpecError::Value(s.into(), "format=, cache= and discard= apply to a file or block device"));
            }
            return Ok(DiskSpec { location: parse_nbd(target)?, readonly, graph: None, bus });
        }
        let graph = options.graph(Path::new(target))?;
        Ok(DiskSpec { location: Location::Path(PathBuf::from(target)), readonly, graph, bus })
    }
}

impl DiskSpec {
    /// The storage a QEMU command line names for a disk, taken whole: an NBD URI (what the
    /// persona makes of a `driver: nbd` node) or a path, commas and all (no `--disk` options
    /// follow it: a file named `disk,readonly` is that file, writable).
    pub fn of_storage(target: &str, readonly: bool) -> Result<DiskSpec, SpecError> {
        let location = match target {
            "" => return Err(SpecError::Empty),
            t if t.starts_with("nbd") && t.contains("://") => parse_nbd(t)?,
            t => Location::Path(PathBuf::from(t)),
        };
        Ok(DiskSpec { location, readonly, graph: None, bus: Bus::VirtioBlk })
    }
}

/// The options after a disk's target.
#[derive(Default)]
struct Options {
    readonly: bool,
    format: Option<String>,
    cache: Option<String>,
    discard: Option<String>,
    bus: Option<String>,
    lun: Option<String>,
    write_cache: Option<String>,
}

impl Options {
    fn take(&mut self, o: &str) -> Result<(), SpecError> {
        let slot = match o.split_once('=') {
            None if o == "readonly" => {
                self.readonly = true;
                return Ok(());
            }
            Some(("format", _)) => &mut self.format,
            Some(("cache", _)) => &mut self.cache,
            Some(("discard", _)) => &mut self.discard,
            Some(("bus", _)) => &mut self.bus,
            Some(("lun", _)) => &mut self.lun,
            Some(("write-cache", _)) => &mut self.write_cache,
            _ => return Err(SpecError::Option(o.into())),
        };
        let value = o.split_once('=').map(|(_, v)| v).unwrap_or_default();
        if value.is_empty() || !value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(SpecError::Value(o.into(), "not a value QEMU takes"));
        }
        *slot = Some(value.into());
        Ok(())
    }

    /// The device the disk is on: `bus=scsi` (with `lun=` and `write-cache=`) or `bus=virtio`.
    fn bus(&self) -> Result<Bus, SpecError> {
        let scsi = match self.bus.as_deref() {
            None | Some("virtio") => false,
            Some("scsi") => true,
            Some(other) => return Err(SpecError::Value(format!("bus={other}"), "bus is virtio or scsi")),
        };
        if !scsi {
            return match (&self.lun, &self.write_cache) {
                (Some(l), _) => Err(SpecError::Value(format!("lun={l}"), "applies only to a disk with bus=scsi")),
                (_, Some(w)) => {
                    Err(SpecError::Value(format!("write-cache={w}"), "applies only to a disk with bus=scsi"))
                }
                (None, None) => Ok(Bus::VirtioBlk),
            };
        }
        let lun = match self.lun.as_deref() {
            None => None,
            Some(l) => Some(
                l.parse::<u16>()
                    .ok()
                    .filter(|&n| n <= 255)
                    .ok_or_else(|| SpecError::Value(format!("lun={l}"), "a LUN is 0 to 255"))?,
            ),
        };
        let write_cache = match self.write_cache.as_deref() {
            None | Some("on") => true,
            Some("off") => false,
            Some(other) => return Err(SpecError::Value(format!("write-cache={other}"), "write-cache is on or off")),
        };
        Ok(Bus::Scsi(ScsiUnit { lun, write_cache, device_id: None }))
    }

    /// The graph a file in `format` (with the cache and discard modes asked) is: a format node
    /// over a protocol node. `None` for a raw file with nothing else asked (served through
    /// io_uring as it is).
    fn graph(&self, path: &Path) -> Result<Option<Graph>, SpecError> {
        let format = self.format.as_deref().unwrap_or("raw");
        if format == "raw" && self.cache.is_none() && self.discard.is_none() {
            return Ok(None);
        }
        let (direct, no_flush) = match self.cache.as_deref().unwrap_or("writeback") {
            "none" => (true, false),
            "writeback" | "writethrough" => (false, false),
            "directsync" => (true, false),
            "unsafe" => (false, true),
            _ => {
                return Err(SpecError::Value(
                    format!("cache={}", self.cache.as_deref().unwrap_or_default()),
                    "cache is none, writeback, writethrough, directsync or unsafe",
                ))
            }
        };
        let discard = match self.discard.as_deref().unwrap_or("ignore") {
            "on" | "unmap" => "unmap",
            "off" | "ignore" => "ignore",
            _ => {
                return Err(SpecError::Value(
                    format!("discard={}", self.discard.as_deref().unwrap_or_default()),
                    "discard is unmap or ignore",
                ))
            }
        };
        use std::os::unix::fs::FileTypeExt;
        let block_device = std::fs::metadata(path).map(|m| m.file_type().is_block_device()).unwrap_or(false);
        let n = NODES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (top, file) = (format!("smpft-disk{n}"), format!("smpft-disk{n}-file"));
        let cache = serde_json::json!({"direct": direct, "no-flush": no_flush});
        let protocol = serde_json::json!({
            "driver": if block_device { "host_device" } else { "file" }, "node-name": file,
            "filename": path, "cache": cache, "discard": discard, "read-only": self.readonly,
        });
        let format_node = serde_json::json!({
            "driver": format, "node-name": top, "file": file, "cache": cache, "discard": discard,
            "read-only": self.readonly,
        });
        Ok(Some(Graph {
            name: path.display().to_string(),
            node: top,
            blockdevs: vec![protocol.to_string(), format_node.to_string()],
            objects: Vec::new(),
        }))
    }
}

/// Numbers the block nodes of disks given as `PATH,format=...` (node names are unique in a VM).
static NODES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

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
            DiskSpec {
                location: Location::Path("/a/disk.raw".into()),
                readonly: false,
                graph: None,
                bus: Bus::VirtioBlk
            }
        );
        assert_eq!(
            p("/dev/vg/x,readonly").unwrap(),
            DiskSpec { location: Location::Path("/dev/vg/x".into()), readonly: true, graph: None, bus: Bus::VirtioBlk }
        );
        assert_eq!(p("/a,b/disk").unwrap().location, Location::Path("/a,b/disk".into()), "a comma inside a path");
        assert_eq!(p("/a/d,rw"), Err(SpecError::Option("rw".into())));
        assert_eq!(p(""), Err(SpecError::Empty));
        assert_eq!(p(",readonly"), Err(SpecError::Empty));
    }

    /// The `qemu_argv` fuzz target checks this: the persona made a command line's disk file into
    /// a `--disk` spec, so a file name with a comma was read as a file and options.
    #[test]
    fn a_command_lines_storage_is_taken_whole() {
        let s = DiskSpec::of_storage("/img/b,readonly", false).unwrap();
        assert_eq!((s.location, s.readonly), (Location::Path("/img/b,readonly".into()), false));
        let s = DiskSpec::of_storage("/img/c,bus=scsi", true).unwrap();
        assert_eq!((s.location, s.readonly, s.bus), (Location::Path("/img/c,bus=scsi".into()), true, Bus::VirtioBlk));
        let tcp = Location::NbdTcp { host: "h".into(), port: 99, export: "a,readonly".into() };
        assert_eq!(DiskSpec::of_storage("nbd://h:99/a,readonly", false).unwrap().location, tcp);
        assert_eq!(DiskSpec::of_storage("", false), Err(SpecError::Empty));
        assert!(matches!(DiskSpec::of_storage("nbd://:1/x", false), Err(SpecError::Uri { .. })));
    }

    #[test]
    fn disks_on_the_scsi_bus() {
        let unit = |lun, write_cache| Bus::Scsi(ScsiUnit { lun, write_cache, device_id: None });
        assert_eq!(p("/a/d.raw,bus=scsi").unwrap().bus, unit(None, true));
        assert_eq!(p("/a/d.raw,bus=scsi,lun=3,write-cache=off").unwrap().bus, unit(Some(3), false));
        assert_eq!(p("/a/d.raw,bus=virtio").unwrap().bus, Bus::VirtioBlk);
        let d = p("nbd://h/x,readonly,bus=scsi,lun=2").unwrap();
        assert_eq!((d.readonly, d.bus.clone()), (true, unit(Some(2), true)));
        assert_eq!(d.to_string(), "nbd://h:10809/x,readonly,bus=scsi,lun=2", "shown as it is written");
        assert_eq!(p("/a/d,bus=scsi,write-cache=off").unwrap().to_string(), "/a/d,bus=scsi,write-cache=off");
        for (bad, why) in [
            ("/a/d,bus=ide", "bus is virtio or scsi"),
            ("/a/d,bus=scsi,lun=256", "a LUN is 0 to 255"),
            ("/a/d,bus=scsi,lun=x", "a LUN is 0 to 255"),
            ("/a/d,lun=1", "applies only to a disk with bus=scsi"),
            ("/a/d,write-cache=off", "applies only to a disk with bus=scsi"),
            ("/a/d,bus=scsi,write-cache=maybe", "write-cache is on or off"),
        ] {
            assert!(matches!(p(bad), Err(SpecError::Value(_, w)) if w == why), "{bad}: {:?}", p(bad));
        }
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
            DiskSpec { location: tcp("127.0.0.1", NBD_PORT, "x"), readonly: true, graph: None, bus: Bus::VirtioBlk }
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
