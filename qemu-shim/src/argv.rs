//! QEMU's command line, as libvirt 9.0 writes it, read into a [`Launch`]: what smpft is asked to
//! run, in its own terms. Options come in QEMU's two spellings, `key=value,...` and JSON
//! (`-device {"driver":...}`), which libvirt uses for `-object`, `-device`, `-blockdev` and
//! `-netdev`.
//!
//! Every option is either understood, or accepted with nothing to do here (listed in
//! [`IGNORED`], each with the reason), or refused with a one-line message that names it:
//! libvirt shows that line to the operator when a domain fails to start. The PC around the
//! devices (`-machine`, `-global`, `-rtc`, `-no-hpet`, displays, and the devices smpft leaves
//! out) is read in [`crate::platform`].

use serde_json::{Map, Value};
use std::collections::HashMap;

mod chardev;
mod drive;
use chardev::{chardev_monitor, chardev_serial, qmp_address, serial_address};
mod scsi;
mod virtio_serial;
pub use scsi::{ScsiController, ScsiHd};
use std::path::PathBuf;
pub use virtio_serial::{Channel, ChannelSocket, VirtioSerial};

/// Options accepted with nothing to do, and why.
pub const IGNORED: &[(&str, &str)] = &[
    ("-no-user-config", "smpft reads no configuration files"),
    ("-nodefaults", "smpft creates no default devices"),
    ("-nographic", "smpft has no display"),
    ("-display", "smpft has no display (only 'none' is accepted)"),
    ("-no-acpi", "smpft's machine has no ACPI"),
    ("-boot", "without -kernel, smpft boots what a disk holds (its lowest bootindex, or the first with order=c)"),
    ("-msg", "log format only"),
    ("-overcommit", "guest memory is not locked"),
    ("-audiodev", "no audio devices"),
    ("-enable-kvm", "smpft always uses KVM"),
    ("-iscsi", "the iSCSI initiator's name applies to iscsi:// drives, which qemu-storage-daemon opens with its own"),
];

/// A QMP monitor: where it listens, or where smpft connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Monitor {
    Path(PathBuf),
    /// A listening socket inherited from the caller.
    Fd(i32),
    /// `server=off`: smpft connects to the socket at `path` (Proxmox VE's qmeventd listens
    /// there), and, with `reconnect` (`reconnect-ms=`, or `reconnect=` in seconds), again that
    /// often while it is absent or after it closes.
    Connect {
        path: PathBuf,
        reconnect: Option<std::time::Duration>,
    },
    /// `server=on` with `wait=on` (QEMU's default for a server socket): the VM starts only once
    /// a first client has connected to this monitor.
    Wait(Box<Monitor>),
}

/// Where the guest's serial port goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serial {
    /// A pseudo-terminal (what `virsh console` attaches to).
    Pty,
    /// A unix socket smpft listens on.
    Socket(PathBuf),
    File(PathBuf),
    Null,
}

/// A file that receives what the serial port releases (libvirt's `<log file=...>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialLog {
    /// `logfile=PATH`; `logappend=on` keeps what the file holds.
    File { path: PathBuf, append: bool },
    /// `logfile=/dev/fdset/N`: the descriptor passed with `-add-fd set=N`.
    Fd(i32),
}

/// A disk: where its blocks are (a path, or an NBD URI smpft understands) and whether read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub id: String,
    /// The block node the device uses (libvirt's format node), as statistics name it.
    pub node: String,
    pub source: String,
    pub readonly: bool,
    /// The PCI slot libvirt placed it in (`addr=SLOT`), if it did.
    pub slot: Option<u8>,
    /// A graph of QEMU block nodes qemu-storage-daemon opens (any format but raw, a throttle
    /// group, a node smpft does not serve itself); `source` is then its file, for messages.
    pub graph: Option<crate::blockdev::DiskGraph>,
}

/// A virtio-balloon (`-device virtio-balloon-pci`), as libvirt's `<memballoon>` writes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Balloon {
    pub id: String,
    pub slot: Option<u8>,
    /// `deflate-on-oom=on` (libvirt's `autodeflate`).
    pub deflate_on_oom: bool,
    /// `free-page-reporting=on` (libvirt's `freePageReporting`, Proxmox's default).
    pub free_page_reporting: bool,
}

/// Where a NIC's tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSpec {
    /// A descriptor the caller passed (libvirt's `fd=N`).
    Fd(i32),
    /// A tap by name (`ifname=`), created if it does not exist, with the programs QEMU runs on
    /// it (`script=` before the VM starts, `downscript=` after it ends; absent or `no`: none).
    Named { ifname: String, script: Option<PathBuf>, downscript: Option<PathBuf> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub id: String,
    pub tap: TapSpec,
    pub mac: Option<String>,
    /// The PCI slot libvirt placed it in (`addr=SLOT`), if it did.
    pub slot: Option<u8>,
}

/// What to run, in smpft's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Launch {
    /// `-machine none`: libvirt probing the emulator's capabilities; no VM.
    pub probe: bool,
    pub machine: Option<String>,
    pub name: Option<String>,
    /// `-id N` (Proxmox's VM id).
    pub id: Option<String>,
    pub uuid: Option<String>,
    /// `-smbios type=N,...` as given (what the SMBIOS tables say).
    pub smbios: Vec<String>,
    /// `-S`: the vCPUs wait for `cont`.
    pub start_paused: bool,
    pub memory_bytes: Option<u64>,
    pub vcpus: Option<u32>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    pub monitors: Vec<Monitor>,
    pub serial: Option<Serial>,
    /// The serial port's log (`logfile=` on its chardev): every byte it releases.
    pub serial_log: Option<SerialLog>,
    /// The serial port's chardev id (what `query-chardev` reports it as).
    pub serial_label: Option<String>,
    /// Every `-device` id with its driver, in order (QOM's `/machine/peripheral`).
    pub device_ids: Vec<(String, String)>,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    /// A virtio-rng (`-device virtio-rng-pci`), and its PCI slot if libvirt gave one.
    pub rng: bool,
    pub rng_slot: Option<u8>,
    /// A VM generation ID (`-device vmgenid,guid=GUID|auto`): its `guid=` as given (`auto`
    /// when there is none; the VMM checks it).
    pub vmgenid: Option<String>,
    pub balloon: Option<Balloon>,
    /// A virtio-serial (`-device virtio-serial-pci`) with its ports (`-device virtserialport`).
    pub virtio_serial: Option<VirtioSerial>,
    pub daemonize: bool,
    pub pidfile: Option<PathBuf>,
    /// `-version` / `-help`: print and exit.
    pub version: bool,
    /// `-no-reboot`: a reset the guest asks for ends the process (after a SHUTDOWN event with
    /// reason `guest-reset`) instead of restarting the VM in place; libvirt passes it for
    /// `<on_reboot>destroy</on_reboot>`.
    pub no_reboot: bool,
    /// `-no-shutdown`: a guest that powers off leaves the VM stopped (after the SHUTDOWN
    /// event) until `system_reset` and `cont` (libvirt's reboot through ACPI) or `quit`, or
    /// until libvirt ends the process.
    pub no_shutdown: bool,
    /// Options accepted and ignored, as given (for the log).
    pub ignored: Vec<String>,
    /// The disk (index in `disks`) with the lowest `bootindex=`, if any has one: without
    /// `-kernel`, the VM boots what that disk holds.
    pub boot_disk: Option<usize>,
    /// `-boot order=c` (or an order starting with the hard disk): boot the first disk.
    pub boot_order_disk: bool,
    /// Devices smpft does not have and leaves out of the VM: one warning line each (see
    /// [`crate::platform`]).
    pub left_out: Vec<String>,
    /// Each disk's block nodes, from the device's node down to its storage (parallel to
    /// `disks`).
    pub disk_nodes: Vec<Vec<crate::platform::BlockNode>>,
    /// `-cpu`: the guest's CPU model and features (`None`: the host's CPU).
    pub cpu: Option<cpu_model::CpuSpec>,
    /// `-sandbox on|off`: smpft's seccomp filters with `kill`, or none (`None`: not given).
    pub seccomp: Option<confine::Mode>,
    /// A virtio-scsi controller (`-device virtio-scsi-pci`) with its `scsi-hd` disks (their
    /// storage is in `disks`).
    pub scsi: Option<ScsiController>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("smpft (QEMU persona): {0}")]
pub struct ArgvError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ArgvError> {
    Err(ArgvError(msg.into()))
}

/// An option's value as key/value pairs: JSON objects as they are, `a=b,c=d` split (`,,` is a
/// literal comma), and a leading bare word under `implied` (e.g. `-machine pc,usb=off`).
pub(crate) fn props(value: &str, implied: &str) -> Result<Map<String, Value>, ArgvError> {
    if value.starts_with('{') {
        return match serde_json::from_str::<Value>(value) {
            Ok(Value::Object(m)) => Ok(m),
            _ => err(format!("'{value}' is not a JSON object")),
        };
    }
    let mut out = Map::new();
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for (i, p) in parts.into_iter().enumerate() {
        match p.split_once('=') {
            Some((k, v)) => {
                out.insert(k.to_string(), Value::String(v.to_string()));
            }
            None if i == 0 && !implied.is_empty() => {
                out.insert(implied.to_string(), Value::String(p));
            }
            None if !p.is_empty() => {
                out.insert(p, Value::String("on".into()));
            }
            None => {}
        }
    }
    Ok(out)
}

pub(crate) fn text(m: &Map<String, Value>, k: &str) -> Option<String> {
    match m.get(k)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub(crate) fn flag(m: &Map<String, Value>, k: &str) -> bool {
    matches!(m.get(k), Some(Value::Bool(true))) || matches!(text(m, k).as_deref(), Some("on" | "true" | "yes"))
}

/// A size as QEMU writes it: bytes, or a number with a k/M/G/T suffix; `default_unit` applies to
/// a bare number (`-m 128` is MiB).
fn size(v: &str, default_unit: u64) -> Option<u64> {
    let v = v.trim();
    let (num, unit) = match v.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&v[..i], &v[i..]),
        None => (v, ""),
    };
    let n: u64 = num.parse().ok()?;
    let mul = match unit.to_ascii_lowercase().as_str() {
        "" => default_unit,
        "b" => 1,
        "k" | "kb" => 1 << 10,
        "m" | "mb" => 1 << 20,
        "g" | "gb" => 1 << 30,
        "t" | "tb" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// Block nodes by node name, to resolve a `-device`'s drive to its file.
#[derive(Default)]
struct Parser {
    launch: Launch,
    chardevs: HashMap<String, Map<String, Value>>,
    blockdevs: HashMap<String, Map<String, Value>>,
    /// The same nodes as given, with the throttle groups, for qemu-storage-daemon.
    graph: crate::blockdev::Blockdevs,
    netdevs: HashMap<String, Map<String, Value>>,
    memory_backends: HashMap<String, u64>,
    devices: Vec<Map<String, Value>>,
    mons: Vec<String>,
    /// `-add-fd set=N,fd=M`: the descriptors of each fd set (`/dev/fdset/N`).
    fdsets: HashMap<u32, Vec<i32>>,
    /// The PCI slots devices were placed in, with their ids.
    pci_slots: Vec<(u8, String)>,
    /// The ids of the entropy sources (`-object rng-random|rng-builtin`).
    rng_backends: Vec<String>,
    /// The lowest `bootindex=` of a disk so far, with that disk's index.
    boot_index: Option<(u32, usize)>,
    /// The ids of the PCI bridges (`-device pci-bridge`): devices behind them go on bus 0.
    bridges: Vec<String>,
    /// The ids of `-drive`s with no medium.
    empty_drives: Vec<String>,
}

/// Reads QEMU's command line (without the program name).
pub fn parse(args: &[String]) -> Result<Launch, ArgvError> {
    let mut p = Parser::default();
    let mut it = args.iter();
    while let Some(opt) = it.next() {
        let opt = opt.strip_prefix('-').map(|o| format!("-{}", o.trim_start_matches('-'))).unwrap_or_default();
        if opt.is_empty() {
            return err("stray argument on the command line (options start with '-')");
        }
        if p.flag_option(&opt)? {
            continue;
        }
        let Some(value) = it.next() else {
            return err(format!("option {opt} needs a value"));
        };
        p.option(&opt, value)?;
    }
    p.finish()
}

impl Parser {
    /// Options without a value; true if `opt` was one.
    fn flag_option(&mut self, opt: &str) -> Result<bool, ArgvError> {
        if crate::platform::flag_option(&mut self.launch, opt) {
            return Ok(true);
        }
        match opt {
            "-S" => self.launch.start_paused = true,
            "-daemonize" => self.launch.daemonize = true,
            "-version" | "-help" | "-h" => self.launch.version = true,
            "-no-user-config" | "-nodefaults" | "-nographic" | "-no-acpi" | "-enable-kvm" => {
                self.launch.ignored.push(opt.to_string())
            }
            "-no-shutdown" => self.launch.no_shutdown = true,
            "-no-reboot" => self.launch.no_reboot = true,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// `-cpu MODEL[,+FEAT|,-FEAT|,FEAT=on|off]...`: checked against smpft's models and feature
    /// names here; whether the host can give it is checked when the VM is built.
    fn cpu(&mut self, value: &str) -> Result<(), ArgvError> {
        let spec = cpu_model::CpuSpec::parse(value).map_err(|e| ArgvError(format!("-cpu {value}: {e}")))?;
        self.launch.cpu = Some(spec);
        Ok(())
    }

    fn option(&mut self, opt: &str, value: &str) -> Result<(), ArgvError> {
        // The machine, its timers and power management, and the display smpft does not have.
        if crate::platform::option(&mut self.launch, opt, value)? {
            return Ok(());
        }
        match opt {
            "-name" => self.launch.name = text(&props(value, "guest")?, "guest"),
            "-id" => self.launch.id = Some(value.to_string()),
            "-readconfig" => {
                for (opt, value) in crate::readconfig::read(std::path::Path::new(value), &mut self.launch.left_out)? {
                    self.option(&opt, &value)?;
                }
            }
            "-uuid" => self.launch.uuid = Some(value.to_string()),
            "-smbios" => self.launch.smbios.push(value.to_string()),
            "-accel" => {
                let a = text(&props(value, "accel")?, "accel").unwrap_or_default();
                if a != "kvm" {
                    return err(format!("-accel {a}: smpft runs guests only with KVM"));
                }
            }
            "-cpu" => self.cpu(value)?,
            "-m" => {
                let m = props(value, "size")?;
                let s = text(&m, "size").and_then(|s| size(&s, 1 << 20));
                self.launch.memory_bytes = Some(s.ok_or_else(|| ArgvError(format!("-m {value}: not a size")))?);
            }
            "-smp" => {
                let m = props(value, "cpus")?;
                let n = text(&m, "cpus").and_then(|c| c.parse::<u32>().ok());
                self.launch.vcpus = Some(n.ok_or_else(|| ArgvError(format!("-smp {value}: no vCPU count")))?);
            }
            "-object" => self.object(value)?,
            "-chardev" => {
                let m = props(value, "backend")?;
                let id = text(&m, "id").ok_or_else(|| ArgvError(format!("-chardev {value}: no id")))?;
                self.chardevs.insert(id, m);
            }
            "-mon" => {
                let m = props(value, "chardev")?;
                if text(&m, "mode").as_deref().unwrap_or("readline") != "control" {
                    return err("-mon: only mode=control (QMP) monitors are supported");
                }
                self.mons.push(text(&m, "chardev").unwrap_or_default());
            }
            "-qmp" => self.launch.monitors.push(qmp_address(value)?),
            "-add-fd" => self.add_fd(value)?,
            "-serial" => {
                self.launch.serial = Some(serial_address(value)?);
                self.launch.serial_label = Some("serial0".into());
            }
            "-blockdev" => {
                let m = props(value, "driver")?;
                let name = self.graph.add(value, m.clone()).map_err(ArgvError)?;
                self.blockdevs.insert(name, m);
            }
            "-netdev" => {
                let m = props(value, "type")?;
                let id = text(&m, "id").ok_or_else(|| ArgvError(format!("-netdev {value}: no id")))?;
                self.netdevs.insert(id, m);
            }
            "-device" => self.devices.push(props(value, "driver")?),
            "-kernel" => self.launch.kernel = Some(PathBuf::from(value)),
            "-append" => self.launch.append = Some(value.to_string()),
            "-pidfile" => self.launch.pidfile = Some(PathBuf::from(value)),
            "-initrd" => self.launch.initrd = Some(PathBuf::from(value)),
            "-drive" => self.drive(value)?,
            "-netdev-legacy" | "-net" => return err("-net is not supported; smpft takes NICs as -netdev tap"),
            "-boot" if value.split(',').any(|o| o.starts_with("order=c") || o.starts_with('c')) => {
                self.launch.boot_order_disk = true;
                self.launch.ignored.push(format!("{opt} {value}"));
            }
            _ if IGNORED.iter().any(|(o, _)| *o == opt) => self.launch.ignored.push(format!("{opt} {value}")),
            _ => return err(format!("option {opt} is not supported")),
        }
        Ok(())
    }

    fn object(&mut self, value: &str) -> Result<(), ArgvError> {
        let m = props(value, "qom-type")?;
        let t = text(&m, "qom-type").unwrap_or_default();
        match t.as_str() {
            // libvirt's master key for encrypted secrets: smpft is given none to decrypt.
            "secret" => self.launch.ignored.push(format!("-object secret ({})", text(&m, "id").unwrap_or_default())),
            // Entropy for virtio-rng: smpft's device draws from getrandom(2), which is what
            // /dev/urandom (and, once seeded, /dev/random) gives.
            "rng-builtin" => {
                self.rng_backends.push(text(&m, "id").unwrap_or_default());
            }
            "rng-random" => {
                let file = text(&m, "filename").unwrap_or_else(|| "/dev/urandom".into());
                if file != "/dev/urandom" && file != "/dev/random" {
                    return err(format!(
                        "-object rng-random,filename={file}: smpft's virtio-rng draws from the host's getrandom(2) (/dev/urandom or /dev/random), not from another source"
                    ));
                }
                self.rng_backends.push(text(&m, "id").unwrap_or_default());
            }
            // I/O limits, for qemu-storage-daemon (the throttle nodes that name the group).
            "throttle-group" => {
                let id = text(&m, "id").ok_or_else(|| ArgvError(format!("-object {value}: no id")))?;
                self.graph.add_object(id, value);
            }
            "iothread" => self.launch.ignored.push(format!(
                "-object iothread ({}: smpft serves each disk from its own io_uring thread)",
                text(&m, "id").unwrap_or_default()
            )),
            "memory-backend-ram" | "memory-backend-memfd" => {
                let id = text(&m, "id").unwrap_or_default();
                let s = text(&m, "size").and_then(|s| size(&s, 1));
                let s = s.ok_or_else(|| ArgvError(format!("-object {t}: no size")))?;
                self.memory_backends.insert(id, s);
            }
            _ => return err(format!("-object {t} is not supported")),
        }
        Ok(())
    }

    /// The slot of a device on the PCI root (`bus=pci.0,addr=SLOT[.0]`), checked against the
    /// others placed so far.
    fn pci_slot(&mut self, id: &str, d: &Map<String, Value>) -> Result<Option<u8>, ArgvError> {
        let Some(addr) = text(d, "addr") else { return Ok(None) };
        if let Some(bus) = text(d, "bus").filter(|b| b != "pci.0" && b != "pcie.0") {
            if !self.bridges.contains(&bus) {
                return err(format!("{id}: bus={bus}: smpft has one PCI bus, pci.0"));
            }
            self.launch.left_out.push(format!(
                "{id}: placed on PCI bus 0 at a free slot, not behind bridge {bus} (smpft's machine has one PCI bus)"
            ));
            return Ok(None);
        }
        // QEMU reads a PCI address in hexadecimal, with or without 0x.
        let number = |v: &str| u8::from_str_radix(v.strip_prefix("0x").unwrap_or(v), 16).ok();
        let (slot, function) = addr.split_once('.').unwrap_or((&addr, "0"));
        let slot = match (number(slot), number(function)) {
            (Some(s), Some(0)) if (1..32).contains(&s) => s,
            (Some(_), Some(f)) if f != 0 => {
                return err(format!("{id}: addr={addr}: smpft's devices are function 0 of their slot"))
            }
            _ => return err(format!("{id}: addr={addr} is not a PCI slot (0x1 to 0x1f)")),
        };
        if let Some((_, other)) = self.pci_slots.iter().find(|(s, _)| *s == slot) {
            return err(format!("{other} and {id} are both at PCI slot {slot:#x}"));
        }
        self.pci_slots.push((slot, id.to_string()));
        Ok(Some(slot))
    }

    /// `-add-fd set=N,fd=M[,opaque=...]`: a descriptor the caller passed, in fd set N.
    fn add_fd(&mut self, value: &str) -> Result<(), ArgvError> {
        let m = props(value, "")?;
        let num =
            |k: &str| text(&m, k).and_then(|v| v.parse::<i64>().ok()).filter(|n| (0..=i64::from(i32::MAX)).contains(n));
        let (Some(set), Some(fd)) = (num("set"), num("fd")) else {
            return err(format!("-add-fd {value}: needs set=N,fd=M"));
        };
        // SAFETY: F_GETFD only reads the descriptor's flags; an fd this process does not hold
        // fails with EBADF.
        if unsafe { libc::fcntl(fd as i32, libc::F_GETFD) } < 0 {
            return err(format!("-add-fd {value}: descriptor {fd} is not open"));
        }
        self.fdsets.entry(set as u32).or_default().push(fd as i32);
        Ok(())
    }

    /// The log of chardev `id` (`logfile=PATH` or `/dev/fdset/N`, `logappend=`), if it has one.
    fn chardev_log(&self, id: &str, c: &Map<String, Value>) -> Result<Option<SerialLog>, ArgvError> {
        let Some(file) = text(c, "logfile") else { return Ok(None) };
        let Some(set) = file.strip_prefix("/dev/fdset/") else {
            return Ok(Some(SerialLog::File { path: PathBuf::from(&file), append: flag(c, "logappend") }));
        };
        let fds = set.parse::<u32>().ok().and_then(|s| self.fdsets.get(&s));
        match fds.map(Vec::as_slice) {
            Some([fd, ..]) => Ok(Some(SerialLog::Fd(*fd))),
            _ => err(format!("-chardev {id}: logfile={file} names no -add-fd set")),
        }
    }

    fn finish(mut self) -> Result<Launch, ArgvError> {
        if self.launch.memory_bytes.is_none() && self.memory_backends.len() == 1 {
            self.launch.memory_bytes = self.memory_backends.values().next().copied();
        }
        for id in std::mem::take(&mut self.mons) {
            let c = self.chardevs.remove(&id).ok_or_else(|| ArgvError(format!("-mon: no -chardev '{id}'")))?;
            self.launch.monitors.push(chardev_monitor(&id, &c)?);
        }
        for d in std::mem::take(&mut self.devices) {
            self.device(&d)?;
        }
        self.scsi_without_disks();
        crate::platform::finish(&mut self.launch);
        self.launch.disk_nodes =
            self.launch.disks.iter().map(|d| crate::platform::block_chain(&self.blockdevs, &d.node)).collect();
        Ok(self.launch)
    }

    fn device(&mut self, d: &Map<String, Value>) -> Result<(), ArgvError> {
        let driver = text(d, "driver").unwrap_or_default();
        let id = text(d, "id").unwrap_or_default();
        if !id.is_empty() && crate::probe::DEVICE_TYPES.contains(&driver.as_str()) {
            self.launch.device_ids.push((id.clone(), driver.clone()));
        }
        if crate::platform::left_out_device(&mut self.launch, &driver, &id) {
            return Ok(());
        }
        if crate::platform::BRIDGES.contains(&driver.as_str()) {
            self.launch.ignored.push(format!(
                "-device {driver},id={id} (smpft's machine has one PCI bus: devices behind it go on bus 0)"
            ));
            self.bridges.push(id);
            return Ok(());
        }
        match driver.as_str() {
            "isa-serial" => {
                let c = text(d, "chardev").unwrap_or_default();
                let dev = self.chardevs.get(&c).ok_or_else(|| ArgvError(format!("isa-serial: no -chardev '{c}'")))?;
                if self.launch.serial.is_some() {
                    return err("only one serial port is supported");
                }
                self.launch.serial = Some(chardev_serial(&c, dev)?);
                self.launch.serial_log = self.chardev_log(&c, dev)?;
                self.launch.serial_label = Some(c);
            }
            "virtio-rng-pci" => {
                let backend = text(d, "rng").unwrap_or_default();
                if !backend.is_empty() && !self.rng_backends.contains(&backend) {
                    return err(format!("{id}: no -object rng-random or rng-builtin '{backend}'"));
                }
                if self.launch.rng {
                    return err("only one virtio-rng device is supported");
                }
                self.launch.rng = true;
                self.launch.rng_slot = self.pci_slot(&id, d)?;
            }
            "vmgenid" => {
                if self.launch.vmgenid.is_some() {
                    return err("at most one vmgenid device is permitted");
                }
                self.launch.vmgenid = Some(text(d, "guid").unwrap_or_else(|| "auto".into()));
            }
            "virtio-balloon-pci" => {
                if self.launch.balloon.is_some() {
                    return err("only one virtio-balloon device is supported");
                }
                let on_off = |k: &str| match text(d, k).as_deref() {
                    None | Some("off" | "false") => Ok(false),
                    Some("on" | "true") => Ok(true),
                    Some(v) => err(format!("{id}: {k}={v}: expected on or off")),
                };
                let (deflate_on_oom, free_page_reporting) = (on_off("deflate-on-oom")?, on_off("free-page-reporting")?);
                if on_off("free-page-hint")? {
                    return err(format!("{id}: free-page-hint is not supported (free-page-reporting is)"));
                }
                let slot = self.pci_slot(&id, d)?;
                self.launch.balloon = Some(Balloon { id, slot, deflate_on_oom, free_page_reporting });
            }
            "virtio-serial-pci" => self.virtio_serial(&id, d)?,
            "virtserialport" => self.virtserialport(&id, d)?,
            "ide-cd" => self.cdrom(&id, d)?,
            "virtio-blk-pci" => {
                let drive = text(d, "drive").unwrap_or_default();
                let mut disk = self.disk(&id, &drive)?;
                disk.slot = self.pci_slot(&id, d)?;
                self.boot_index(d);
                self.launch.disks.push(disk);
            }
            "virtio-scsi-pci" => self.virtio_scsi(&id, d)?,
            "scsi-hd" => self.scsi_hd(&id, d)?,
            "virtio-net-pci" => {
                let netdev = text(d, "netdev").unwrap_or_default();
                let n = self.netdevs.get(&netdev).ok_or_else(|| ArgvError(format!("{id}: no -netdev '{netdev}'")))?;
                if text(n, "type").as_deref() != Some("tap") {
                    return err(format!("{id}: only tap network backends are supported"));
                }
                let tap = tap(&id, n)?;
                if flag(n, "vhost") && !n.contains_key("vhostfd") {
                    self.launch.ignored.push(format!("{id}: vhost=on (smpft's virtio-net moves the frames itself)"));
                }
                let slot = self.pci_slot(&id, d)?;
                self.launch.nics.push(Nic { id, tap, mac: text(d, "mac"), slot });
            }
            _ => {
                return err(format!(
                    "device '{driver}' is not supported (smpft has virtio-blk-pci, virtio-scsi-pci with scsi-hd, virtio-net-pci, virtio-rng-pci, virtio-balloon-pci, virtio-serial-pci with virtserialport, vmgenid and isa-serial)"
                ))
            }
        }
        Ok(())
    }

    /// An IDE CD-ROM: an empty one (the drive every Proxmox VM gets) is left out with a warning;
    /// smpft has no IDE controller to give one with a medium.
    fn cdrom(&mut self, id: &str, d: &Map<String, Value>) -> Result<(), ArgvError> {
        let drive = text(d, "drive");
        let empty = match &drive {
            None => true,
            Some(node) => self.empty_drives.contains(node),
        };
        if !empty {
            return err(format!("{id}: a CD-ROM with a medium is not supported (smpft has no IDE controller); remove the medium or give the image as a disk"));
        }
        self.launch.left_out.push(format!("no CD-ROM: the empty drive {id} (ide-cd) is left out of the VM"));
        Ok(())
    }

    /// Notes the disk being added as the boot disk if its `bootindex=` is the lowest yet.
    fn boot_index(&mut self, d: &Map<String, Value>) {
        let Some(mine) = text(d, "bootindex").and_then(|b| b.parse::<u32>().ok()) else { return };
        if self.boot_index.is_none_or(|(lowest, _)| mine < lowest) {
            self.boot_index = Some((mine, self.launch.disks.len()));
            self.launch.boot_disk = Some(self.launch.disks.len());
        }
    }

    /// A `-drive if=none`: the nodes QEMU would make of it, under its id.
    fn drive(&mut self, value: &str) -> Result<(), ArgvError> {
        match drive::parse(value, &props(value, "file")?)? {
            drive::Drive::Empty(id) => {
                self.launch.ignored.push(format!("-drive {value} (no medium)"));
                self.empty_drives.push(id);
            }
            drive::Drive::Node { id, node, throttle_group } => {
                if let Some((group, object)) = throttle_group {
                    self.graph.add_object(group, &object);
                }
                let m = props(&node, "driver")?;
                self.graph.add(&node, m.clone()).map_err(ArgvError)?;
                self.blockdevs.insert(id, m);
            }
        }
        Ok(())
    }

    /// A drive's storage: a raw file, block device or NBD export smpft serves itself, or else
    /// the graph of nodes qemu-storage-daemon opens.
    fn disk(&self, id: &str, node: &str) -> Result<Disk, ArgvError> {
        if let Some(disk) = self.own_disk(id, node)? {
            return Ok(disk);
        }
        let graph = self.graph.graph(id, node).map_err(ArgvError)?;
        let readonly = self.blockdevs.get(node).is_some_and(|b| flag(b, "read-only"));
        let source = graph.filename.clone().unwrap_or_else(|| node.to_string());
        Ok(Disk { id: id.into(), node: node.into(), source, readonly, slot: None, graph: Some(graph) })
    }

    /// A drive's storage if smpft serves it itself (see [`crate::blockdev::Blockdevs::own_storage`]);
    /// `None` for any other graph.
    fn own_disk(&self, id: &str, node: &str) -> Result<Option<Disk>, ArgvError> {
        let Some((b, readonly)) = self.graph.own_storage(node) else { return Ok(None) };
        let source = match text(&b, "driver").as_deref() {
            Some("nbd") => nbd_uri(id, &b)?,
            _ => text(&b, "filename").ok_or_else(|| ArgvError(format!("{id}: no filename")))?,
        };
        Ok(Some(Disk { id: id.into(), node: node.into(), source, readonly, slot: None, graph: None }))
    }
}

/// QEMU's option syntax, `key=value,...` (with `implied` the key of a first bare value) or a
/// JSON object, as a map.
pub fn parse_props(value: &str, implied: &str) -> Result<Map<String, Value>, ArgvError> {
    props(value, implied)
}

fn nbd_uri(id: &str, b: &Map<String, Value>) -> Result<String, ArgvError> {
    let export = text(b, "export").unwrap_or_default();
    let server =
        b.get("server").and_then(Value::as_object).ok_or_else(|| ArgvError(format!("{id}: NBD without a server")))?;
    match text(server, "type").as_deref() {
        Some("inet") => {
            let host = text(server, "host").unwrap_or_default();
            let port = text(server, "port").unwrap_or_else(|| "10809".into());
            Ok(if host.contains(':') {
                format!("nbd://[{host}]:{port}/{export}")
            } else {
                format!("nbd://{host}:{port}/{export}")
            })
        }
        Some("unix") => Ok(format!("nbd+unix:///{export}?socket={}", text(server, "path").unwrap_or_default())),
        _ => err(format!("{id}: NBD server type not supported")),
    }
}

/// A `-netdev tap`'s tap: a passed descriptor, or one by name with its scripts.
fn tap(id: &str, n: &Map<String, Value>) -> Result<TapSpec, ArgvError> {
    if let Some(fd) = text(n, "fd") {
        return fd.parse().map(TapSpec::Fd).map_err(|_| ArgvError(format!("{id}: fd={fd} is not a descriptor")));
    }
    let Some(ifname) = text(n, "ifname").filter(|i| !i.is_empty()) else {
        return err(format!("{id}: the tap must be passed as fd=N or named with ifname=NAME"));
    };
    if ifname.len() > 15 || ifname.contains('/') {
        return err(format!("{id}: ifname={ifname} is not an interface name (at most 15 characters)"));
    }
    let program = |k: &str| text(n, k).filter(|s| !s.is_empty() && s != "no").map(PathBuf::from);
    Ok(TapSpec::Named { ifname, script: program("script"), downscript: program("downscript") })
}

#[cfg(test)]
mod tests;
