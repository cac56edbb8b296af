//! Boot parameters: whitespace-separated words, e.g.
//! `counter churn churn-rate=2000 churn-ws=8M service rng disk disk-io=4K duration=5s`.

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
}

#[derive(Clone, Copy)]
pub struct Params {
    pub counter: bool,
    pub churn: bool,
    pub service: bool,
    /// vCPU 0 drives a virtio-rng device.
    pub rng: bool,
    /// Every vCPU writes and checks its region of a virtio-blk disk.
    pub disk: bool,
    pub disk_settings: crate::disk::Settings,
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
}

impl Params {
    pub const DEFAULT: Params = Params {
        counter: false,
        churn: false,
        service: false,
        rng: false,
        disk: false,
        disk_settings: crate::disk::Settings { io: 4096, ws: 0, sequential: false, check_every: 1, flush_every: 16 },
        churn_rate: 1000,
        churn_ws: 8 << 20,
        churn_zero: false,
        kv: false,
        kv_rate: 20_000,
        kv_ws: 16 << 20,
        duration_ms: 0,
        report_ms: 0,
        fail: Fail::None,
    };
}

pub fn parse(cmdline: &[u8]) -> Result<Params, &[u8]> {
    let mut p = Params::DEFAULT;
    for word in cmdline.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty()) {
        let (key, value) = match word.iter().position(|&b| b == b'=') {
            Some(i) => (&word[..i], Some(&word[i + 1..])),
            None => (word, None),
        };
        match (key, value) {
            (b"counter", None) => p.counter = true,
            (b"churn", None) => p.churn = true,
            (b"service", None) => p.service = true,
            (b"rng", None) => p.rng = true,
            (b"disk", None) => p.disk = true,
            (b"disk-io", Some(v)) => p.disk_settings.io = size(v).ok_or(word)?,
            (b"disk-ws", Some(v)) => p.disk_settings.ws = size(v).ok_or(word)?,
            (b"disk-seq", None) => p.disk_settings.sequential = true,
            (b"disk-check", Some(v)) => p.disk_settings.check_every = number(v).ok_or(word)?,
            (b"flush-every", Some(v)) => p.disk_settings.flush_every = number(v).ok_or(word)?,
            (b"churn-rate", Some(v)) => p.churn_rate = number(v).ok_or(word)?,
            (b"churn-ws", Some(v)) => p.churn_ws = size(v).ok_or(word)?,
            (b"churn-zero", None) => p.churn_zero = true,
            (b"kv", None) => p.kv = true,
            (b"kv-rate", Some(v)) => p.kv_rate = number(v).ok_or(word)?,
            (b"kv-ws", Some(v)) => p.kv_ws = size(v).ok_or(word)?,
            (b"duration", Some(v)) => p.duration_ms = millis(v).ok_or(word)?,
            (b"report", Some(v)) => p.report_ms = millis(v).ok_or(word)?,
            (b"fail", Some(b"counter")) => p.fail = Fail::Counter,
            (b"fail", Some(b"churn")) => p.fail = Fail::Churn,
            (b"fail", Some(b"disk")) => p.fail = Fail::Disk,
            (b"fail", Some(b"kv")) => p.fail = Fail::Kv,
            _ => return Err(word),
        }
    }
    Ok(p)
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
