//! Boot parameters: whitespace-separated words, e.g.
//! `counter churn churn-rate=2000 churn-ws=8M service rng disk disk-io=4K duration=5s`.
//!
//! Networking (see `net`): `net` turns it on and needs `ip=A.B.C.D/PREFIX`, the guest's IPv4
//! address and prefix length (0 to 32); `gw=A.B.C.D` optionally adds a default route through a
//! gateway on that subnet. For example `net ip=10.0.2.15/24 gw=10.0.2.2`. Both addresses must be
//! unicast (not 0.0.0.0, not 255.255.255.255, not multicast) and differ; `ip=` and `gw=` without
//! `net` are refused. A bad parameter is logged and the guest exits with `EXIT_BAD_PARAMS`.

use core::fmt;
use core::net::Ipv4Addr;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fail {
    None,
    /// Break the counter invariant on purpose (to show the checker can fail).
    Counter,
    /// Corrupt a churn page on purpose.
    Churn,
    /// Claim a disk write in memory that never reached the disk.
    Disk,
    /// Raise a record's version without writing it.
    Kv,
    /// Claim a database record in memory that never reached the disk.
    Db,
}

/// The network's address settings (`net ip=... gw=...`).
#[derive(Clone, Copy)]
pub struct Net {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gw: Option<Ipv4Addr>,
}

#[derive(Clone, Copy)]
pub struct Params {
    pub counter: bool,
    pub churn: bool,
    pub service: bool,
    /// vCPU 0 drives a virtio-rng device.
    pub rng: bool,
    /// vCPU 0 drives a virtio-balloon over the free memory the other workloads leave.
    pub balloon: bool,
    /// vCPU 0 answers the QEMU guest agent on a virtio-serial port (`agent`).
    pub agent: bool,
    /// List the PCI functions found at boot (`pci`), as `pci 00:SS.F [vendor:device]` lines.
    pub pci: bool,
    /// Log what the SMBIOS tables say (`smbios`), as `smbios: ...` lines.
    pub smbios: bool,
    /// Log the VM generation ID at start and whenever it changes (`vmgenid`), as `vmgenid: ...`.
    pub vmgenid: bool,
    /// Every vCPU writes and checks its region of a virtio-blk disk (`disk-bus=scsi`: of the
    /// first disk of a virtio-scsi controller).
    pub disk: bool,
    pub disk_settings: crate::disk::Settings,
    /// vCPU 0 drives a virtio-net device and serves TCP ports 7000, 80 and 7 (`net`).
    pub net: Option<Net>,
    /// Pages per second per vCPU; 0 = as fast as possible.
    pub churn_rate: u64,
    /// Bytes in the whole churn working set (split between vCPUs).
    pub churn_ws: u64,
    /// Every other generation of a churn page is all zeroes.
    pub churn_zero: bool,
    /// Small records updated at random (`kv`): updates per second per vCPU (0: flat out) and
    /// the bytes of the working set.
    pub kv: bool,
    pub kv_rate: u64,
    pub kv_ws: u64,
    /// Run time in milliseconds; 0 = until the service is told `EXIT` (or forever).
    pub duration_ms: u64,
    /// Progress report interval in milliseconds; 0 = only the final report.
    pub report_ms: u64,
    pub fail: Fail,
    /// `DB`/`DBCHECK` requests of the service keep a log of records on the first virtio-blk
    /// disk (`db`), of `db-record=` bytes each.
    pub db: bool,
    pub db_record: u64,
}

impl Params {
    pub const DEFAULT: Params = Params {
        counter: false,
        churn: false,
        service: false,
        rng: false,
        balloon: false,
        agent: false,
        pci: false,
        smbios: false,
        vmgenid: false,
        disk: false,
        disk_settings: crate::disk::Settings {
            io: 4096,
            ws: 0,
            sequential: false,
            check_every: 1,
            flush_every: 16,
            scsi: false,
        },
        net: None,
        churn_rate: 1000,
        churn_ws: 8 << 20,
        churn_zero: false,
        kv: false,
        kv_rate: 20_000,
        kv_ws: 16 << 20,
        duration_ms: 0,
        report_ms: 0,
        fail: Fail::None,
        db: false,
        db_record: 4096,
    };
}

/// Why the parameters were refused.
pub enum Bad<'a> {
    /// A word that is unknown or whose value does not parse; the `&str` says what was expected
    /// (empty: nothing more to say).
    Word(&'a [u8], &'static str),
    /// The words parse but do not go together.
    Combination(&'static str),
}

impl fmt::Display for Bad<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Bad::Word(word, why) => {
                write!(f, "bad boot parameter: {:?}", core::str::from_utf8(word).unwrap_or("<not UTF-8>"))?;
                if !why.is_empty() {
                    write!(f, " ({why})")?;
                }
                Ok(())
            }
            Bad::Combination(why) => write!(f, "bad boot parameters: {why}"),
        }
    }
}

const IP_FORMAT: &str = "expected ip=A.B.C.D/PREFIX: a unicast IPv4 address and a prefix length of 0 to 32";
const GW_FORMAT: &str = "expected gw=A.B.C.D: a unicast IPv4 address";

pub fn parse(cmdline: &[u8]) -> Result<Params, Bad<'_>> {
    let mut p = Params::DEFAULT;
    let (mut net, mut ip, mut gw) = (false, None, None);
    for word in cmdline.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty()) {
        let (key, value) = match word.iter().position(|&b| b == b'=') {
            Some(i) => (&word[..i], Some(&word[i + 1..])),
            None => (word, None),
        };
        let bad = Bad::Word(word, "");
        match (key, value) {
            (b"counter", None) => p.counter = true,
            (b"churn", None) => p.churn = true,
            (b"service", None) => p.service = true,
            (b"rng", None) => p.rng = true,
            (b"balloon", None) => p.balloon = true,
            (b"agent", None) => p.agent = true,
            (b"pci", None) => p.pci = true,
            (b"smbios", None) => p.smbios = true,
            (b"vmgenid", None) => p.vmgenid = true,
            (b"disk", None) => p.disk = true,
            (b"disk-io", Some(v)) => p.disk_settings.io = size(v).ok_or(bad)?,
            (b"disk-ws", Some(v)) => p.disk_settings.ws = size(v).ok_or(bad)?,
            (b"disk-seq", None) => p.disk_settings.sequential = true,
            (b"disk-bus", Some(b"scsi")) => p.disk_settings.scsi = true,
            (b"disk-bus", Some(b"virtio")) => p.disk_settings.scsi = false,
            (b"disk-check", Some(v)) => p.disk_settings.check_every = number(v).ok_or(bad)?,
            (b"flush-every", Some(v)) => p.disk_settings.flush_every = number(v).ok_or(bad)?,
            (b"churn-rate", Some(v)) => p.churn_rate = number(v).ok_or(bad)?,
            (b"churn-ws", Some(v)) => p.churn_ws = size(v).ok_or(bad)?,
            (b"churn-zero", None) => p.churn_zero = true,
            (b"kv", None) => p.kv = true,
            (b"kv-rate", Some(v)) => p.kv_rate = number(v).ok_or(bad)?,
            (b"kv-ws", Some(v)) => p.kv_ws = size(v).ok_or(bad)?,
            (b"net", None) => net = true,
            (b"ip", Some(v)) => ip = Some(cidr(v).ok_or(Bad::Word(word, IP_FORMAT))?),
            (b"gw", Some(v)) => gw = Some(unicast(v).ok_or(Bad::Word(word, GW_FORMAT))?),
            (b"duration", Some(v)) => p.duration_ms = millis(v).ok_or(bad)?,
            (b"report", Some(v)) => p.report_ms = millis(v).ok_or(bad)?,
            (b"fail", Some(b"counter")) => p.fail = Fail::Counter,
            (b"fail", Some(b"churn")) => p.fail = Fail::Churn,
            (b"fail", Some(b"disk")) => p.fail = Fail::Disk,
            (b"fail", Some(b"kv")) => p.fail = Fail::Kv,
            (b"fail", Some(b"db")) => p.fail = Fail::Db,
            (b"db", None) => p.db = true,
            (b"db-record", Some(v)) => p.db_record = size(v).ok_or(bad)?,
            _ => return Err(bad),
        }
    }
    p.net = net_settings(net, ip, gw)?;
    if p.db && p.disk {
        return Err(Bad::Combination("db and disk both want the first disk"));
    }
    if p.db && !p.service && p.net.is_none() {
        return Err(Bad::Combination("db answers the service's requests: it needs service or net"));
    }
    Ok(p)
}

/// Checks that `net`, `ip=` and `gw=` go together.
fn net_settings(net: bool, ip: Option<(Ipv4Addr, u8)>, gw: Option<Ipv4Addr>) -> Result<Option<Net>, Bad<'static>> {
    if !net && (ip.is_some() || gw.is_some()) {
        return Err(Bad::Combination("ip= and gw= need the word net"));
    }
    if !net {
        return Ok(None);
    }
    let Some((ip, prefix)) = ip else {
        return Err(Bad::Combination("net needs the guest's address: ip=A.B.C.D/PREFIX"));
    };
    if let Some(gw) = gw {
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        if gw == ip || (u32::from(gw) ^ u32::from(ip)) & mask != 0 {
            return Err(Bad::Combination("gw= must be another address on the subnet of ip="));
        }
    }
    Ok(Some(Net { ip, prefix, gw }))
}

/// `A.B.C.D/PREFIX`.
fn cidr(v: &[u8]) -> Option<(Ipv4Addr, u8)> {
    let slash = v.iter().position(|&b| b == b'/')?;
    let prefix = number(&v[slash + 1..]).filter(|&p| p <= 32)?;
    Some((unicast(&v[..slash])?, prefix as u8))
}

/// `A.B.C.D`, each part a decimal number of at most three digits up to 255, and a unicast address.
fn unicast(v: &[u8]) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = v.split(|&b| b == b'.');
    for o in &mut octets {
        let part = parts.next().filter(|p| p.len() <= 3)?;
        *o = u8::try_from(number(part)?).ok()?;
    }
    let a = Ipv4Addr::from(octets);
    let usable = !(a.is_unspecified() || a.is_broadcast() || a.is_multicast());
    (parts.next().is_none() && usable).then_some(a)
}

pub fn number(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    v.iter().try_fold(0u64, |acc, &b| b.is_ascii_digit().then(|| acc * 10 + u64::from(b - b'0')))
}

fn size(v: &[u8]) -> Option<u64> {
    let (digits, shift) = match v.last()? {
        b'K' | b'k' => (&v[..v.len() - 1], 10),
        b'M' | b'm' => (&v[..v.len() - 1], 20),
        b'G' | b'g' => (&v[..v.len() - 1], 30),
        _ => (v, 0),
    };
    number(digits)?.checked_mul(1 << shift)
}

fn millis(v: &[u8]) -> Option<u64> {
    if let Some(d) = v.strip_suffix(b"ms") {
        number(d)
    } else if let Some(d) = v.strip_suffix(b"s") {
        number(d)?.checked_mul(1000)
    } else {
        number(v)?.checked_mul(1000)
    }
}
