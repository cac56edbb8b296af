//! virtio-balloon (device type 5, virtio 1.2 section 5.5): the host asks for guest memory back
//! by raising `num_pages`; the driver gives pages (inflateq) and takes them back (deflateq),
//! says how many it holds in `actual`, reports its memory figures (statsq) and, with
//! VIRTIO_BALLOON_F_REPORTING, hands over free pages it does not need (reporting_vq).
//!
//! Pages given back, inflated or reported, are discarded from guest memory
//! ([`GuestMemory::discard`]): the host frees them, they read as zero, and they are marked dirty
//! so the next checkpoint carries the zeroes to the standby.
//!
//! Queues are numbered as Linux numbers them: only the queues the negotiated features call for
//! get an index, in the order inflateq, deflateq, statsq, reporting_vq (without STATS_VQ the
//! reporting queue is 2). The device offers every queue its features may need.
//!
//! The statistics buffer the driver offers is held until the next polling interval and then
//! given back, which asks the driver to refill it ([`Balloon::tick`], driven by the VM's owner;
//! never while the VM is paused). The target, `actual`, the held buffer, the interval and the
//! last figures are the device's state, so they survive snapshots and failovers.

use super::{check_chain, VirtioDevice, VirtioError, VirtioPci};
use crate::component;
use crate::memory::{DeviceMemory, GuestMemory};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

pub const F_STATS_VQ: u64 = 1 << 1;
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
pub const F_REPORTING: u64 = 1 << 5;
/// Page frame numbers on the inflate and deflate queues are of 4 KiB pages.
const PFN_SHIFT: u32 = 12;
const PAGE: u64 = 1 << PFN_SHIFT;
const QUEUE_SIZE: u16 = 128;
/// One statistic: a le16 tag and a le64 value, packed.
const STAT_LEN: usize = 10;
/// The most one buffer may carry (a driver asking for more is breaking the rules).
const MAX_BUFFER: usize = 1 << 20;

/// The statistics by tag (virtio 1.2 5.5.6.3 and Linux's later tags), named as QEMU names
/// them in `guest-stats`.
pub const STAT_NAMES: [&str; 16] = [
    "stat-swap-in",
    "stat-swap-out",
    "stat-major-faults",
    "stat-minor-faults",
    "stat-free-memory",
    "stat-total-memory",
    "stat-available-memory",
    "stat-disk-caches",
    "stat-htlb-pgalloc",
    "stat-htlb-pgfail",
    "stat-oom-kills",
    "stat-alloc-stalls",
    "stat-async-scans",
    "stat-direct-scans",
    "stat-async-reclaims",
    "stat-direct-reclaims",
];

/// What the balloon offers beyond inflating and statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonSpec {
    /// VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may take pages back when it runs out.
    pub deflate_on_oom: bool,
    /// VIRTIO_BALLOON_F_REPORTING: the guest reports free pages, which the host releases.
    pub free_page_reporting: bool,
}

impl BalloonSpec {
    fn features(self) -> u64 {
        let on = |b: bool, f: u64| if b { f } else { 0 };
        F_STATS_VQ | on(self.deflate_on_oom, F_DEFLATE_ON_OOM) | on(self.free_page_reporting, F_REPORTING)
    }

    /// How the options read on smpft's command line and in the device summary.
    pub fn options(self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.deflate_on_oom {
            v.push("deflate-on-oom");
        }
        if self.free_page_reporting {
            v.push("free-page-reporting");
        }
        v
    }
}

impl std::str::FromStr for BalloonSpec {
    type Err = String;

    /// `deflate-on-oom`, `free-page-reporting`, comma-separated (empty: neither).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut spec = BalloonSpec::default();
        for word in s.split(',').filter(|w| !w.is_empty()) {
            match word {
                "deflate-on-oom" => spec.deflate_on_oom = true,
                "free-page-reporting" => spec.free_page_reporting = true,
                other => return Err(format!("unknown balloon option '{other}' (deflate-on-oom, free-page-reporting)")),
            }
        }
        Ok(spec)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// The statistics queue's index whenever it is negotiated (inflateq and deflateq come first).
const STATS_QUEUE: usize = 2;

/// The role of queue `index` under the negotiated `features` (present queues only, in order).
fn role(features: u64, index: usize) -> Option<Role> {
    let mut roles = vec![Role::Inflate, Role::Deflate];
    if features & F_STATS_VQ != 0 {
        roles.push(Role::Stats);
    }
    if features & F_REPORTING != 0 {
        roles.push(Role::Reporting);
    }
    roles.get(index).copied()
}

/// The device's replicated state.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Saved {
    /// The features offered (the VM's balloon options).
    features: u64,
    /// The host's target, in pages, and the driver's count.
    num_pages: u32,
    actual: u32,
    /// The statistics buffer held until the next poll.
    stats_head: Option<u16>,
    poll_interval: u32,
    /// Each statistic by tag (`None`: never reported), and when they last came (Unix seconds).
    stats: Vec<Option<u64>>,
    last_update: u64,
}

struct State {
    saved: Saved,
    negotiated: u64,
    /// Give the held statistics buffer back at the next processing of the stats queue.
    release: bool,
    paused: bool,
    next_poll: Option<Instant>,
}

pub struct Balloon {
    memory: Arc<GuestMemory>,
    s: Mutex<State>,
    /// A token each time `actual` changes (at most one waits).
    changed: (Sender<()>, Receiver<()>),
}

/// The statistics last reported: (name, value) for each one the guest gave, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub values: Vec<(&'static str, Option<u64>)>,
    pub last_update: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Balloon {
    pub fn new(spec: BalloonSpec, memory: Arc<GuestMemory>) -> Balloon {
        let saved = Saved {
            features: spec.features(),
            num_pages: 0,
            actual: 0,
            stats_head: None,
            poll_interval: 0,
            stats: vec![None; STAT_NAMES.len()],
            last_update: 0,
        };
        let state = State { saved, negotiated: 0, release: false, paused: false, next_poll: None };
        Balloon { memory, s: Mutex::new(state), changed: crossbeam_channel::bounded(1) }
    }

    fn ram(&self) -> u64 {
        self.memory.size()
    }

    /// Sets the host's target for the guest's memory (QMP `balloon`), capped at its size.
    pub fn set_target(&self, bytes: u64) {
        let pages = (self.ram() - bytes.min(self.ram())) >> PFN_SHIFT;
        self.s.lock().saved.num_pages = pages.min(u64::from(u32::MAX)) as u32;
    }

    /// The guest's memory as the host asked it to be, in bytes.
    pub fn target(&self) -> u64 {
        self.ram().saturating_sub(u64::from(self.s.lock().saved.num_pages) << PFN_SHIFT)
    }

    /// The guest's memory less what its balloon holds, in bytes (QMP `query-balloon`).
    pub fn actual(&self) -> u64 {
        self.ram().saturating_sub(u64::from(self.s.lock().saved.actual) << PFN_SHIFT)
    }

    /// Receives a token whenever `actual` changes.
    pub fn changes(&self) -> Receiver<()> {
        self.changed.1.clone()
    }

    pub fn poll_interval(&self) -> u32 {
        self.s.lock().saved.poll_interval
    }

    /// Asks for fresh statistics every `secs` seconds (0: no polling).
    pub fn set_poll_interval(&self, secs: u32) {
        let mut s = self.s.lock();
        s.saved.poll_interval = secs;
        s.next_poll = (secs > 0).then(|| Instant::now() + Duration::from_secs(secs.into()));
    }

    /// The statistics, or `None` if the guest never reported any.
    pub fn stats(&self) -> Option<Stats> {
        let s = self.s.lock();
        (s.saved.last_update != 0).then(|| Stats {
            values: STAT_NAMES.iter().copied().zip(s.saved.stats.iter().copied()).collect(),
            last_update: s.saved.last_update,
        })
    }

    /// When the held statistics buffer is next due back (`None`: nothing to do until the
    /// guest or the host changes something).
    pub fn due(&self) -> Option<Instant> {
        let s = self.s.lock();
        let polling = !s.paused && s.saved.poll_interval > 0 && s.saved.stats_head.is_some();
        s.next_poll.filter(|_| polling)
    }

    /// At `now`: whether the held buffer is due back (the caller then has the statistics
    /// queue processed, which gives it back).
    fn tick(&self, now: Instant) -> bool {
        let mut s = self.s.lock();
        let due = s.next_poll.is_some_and(|t| t <= now) && s.saved.poll_interval > 0;
        if s.paused || !due || s.saved.stats_head.is_none() || s.negotiated & F_STATS_VQ == 0 {
            return false;
        }
        s.release = true;
        s.next_poll = Some(now + Duration::from_secs(s.saved.poll_interval.into()));
        true
    }

    /// The bytes of a chain the device reads; a buffer the device is to write does not belong.
    fn read_chain(chain: &super::Chain, mem: &DeviceMemory, what: &str) -> Result<Vec<u8>, VirtioError> {
        let head = chain.head_index();
        let bad = |why: String| VirtioError::Buffer { head, why };
        if chain.clone().any(|d| d.is_write_only()) {
            return Err(bad(format!("a device-writable buffer on the {what} queue, which the device only reads")));
        }
        let mut r = chain.clone().reader(&**mem).map_err(|e| bad(e.to_string()))?;
        if r.available_bytes() > MAX_BUFFER {
            return Err(bad(format!("{} bytes on the {what} queue (at most {MAX_BUFFER})", r.available_bytes())));
        }
        let mut bytes = vec![0u8; r.available_bytes()];
        r.read_exact(&mut bytes).map_err(|e| bad(e.to_string()))?;
        Ok(bytes)
    }

    /// Inflate or deflate: a list of page frame numbers, each inside guest memory.
    fn pages(&self, chain: super::Chain, mem: &DeviceMemory, inflate: bool) -> Result<u32, VirtioError> {
        let head = chain.head_index();
        let what = if inflate { "inflate" } else { "deflate" };
        let bytes = Self::read_chain(&chain, mem, what)?;
        let bad = |why: String| VirtioError::Buffer { head, why };
        if bytes.len() % 4 != 0 {
            return Err(bad(format!("{} bytes on the {what} queue: not whole 32-bit page numbers", bytes.len())));
        }
        let pfns: Vec<u64> =
            bytes.chunks_exact(4).map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect();
        if let Some(pfn) = pfns.iter().find(|&&p| (p + 1) << PFN_SHIFT > self.ram()) {
            return Err(bad(format!("page {pfn:#x} on the {what} queue is outside guest memory")));
        }
        if !inflate {
            return Ok(0); // the pages read as zero already; the guest simply uses them again
        }
        // Runs of consecutive pages are discarded at once.
        let mut i = 0;
        while i < pfns.len() {
            let mut j = i + 1;
            while j < pfns.len() && pfns[j] == pfns[j - 1] + 1 {
                j += 1;
            }
            let (addr, len) = (pfns[i] << PFN_SHIFT, (j - i) as u64 * PAGE);
            self.memory.discard(addr, len).map_err(|e| bad(e.to_string()))?;
            i = j;
        }
        Ok(0)
    }

    /// Free page reporting: device-writable buffers, each a page-aligned range to release.
    fn report(&self, chain: super::Chain) -> Result<u32, VirtioError> {
        let head = chain.head_index();
        let bad = |why: String| VirtioError::Buffer { head, why };
        for d in chain.clone() {
            if !d.is_write_only() {
                return Err(bad("a device-readable buffer on the reporting queue".into()));
            }
            let (addr, len) = (d.addr().0, u64::from(d.len()));
            if addr % PAGE != 0 || len % PAGE != 0 {
                return Err(bad(format!("reported range {addr:#x}+{len:#x} is not whole pages")));
            }
            self.memory.discard(addr, len).map_err(|e| bad(format!("reported range {addr:#x}+{len:#x}: {e}")))?;
        }
        Ok(0)
    }

    /// The statistics queue: each buffer the driver offers is read and held; the one held
    /// before goes back (a driver keeps one there).
    fn stats_queue(&self, queue: &mut Queue, mem: &DeviceMemory) -> Result<bool, VirtioError> {
        let mut used = false;
        {
            let mut s = self.s.lock();
            if std::mem::take(&mut s.release) {
                if let Some(head) = s.saved.stats_head.take() {
                    queue.add_used(&**mem, head, 0)?;
                    used = true;
                }
            }
        }
        while let Some(chain) = QueueOwnedT::iter(queue, &**mem)?.next() {
            let head = chain.head_index();
            check_chain(&chain)?;
            let bytes = Self::read_chain(&chain, mem, "statistics")?;
            if bytes.len() % STAT_LEN != 0 {
                let why = format!("{} bytes on the statistics queue: not whole 10-byte statistics", bytes.len());
                return Err(VirtioError::Buffer { head, why });
            }
            let mut s = self.s.lock();
            for st in bytes.chunks_exact(STAT_LEN) {
                let tag = usize::from(u16::from_le_bytes([st[0], st[1]]));
                let value = u64::from_le_bytes(st[2..].try_into().unwrap_or_default());
                // Tags this device does not know are skipped (5.5.6.3).
                if let Some(slot) = s.saved.stats.get_mut(tag) {
                    *slot = Some(value);
                }
            }
            s.saved.last_update = unix_now();
            if let Some(old) = s.saved.stats_head.replace(head) {
                queue.add_used(&**mem, old, 0)?;
                used = true;
            }
            if s.next_poll.is_none() && s.saved.poll_interval > 0 {
                s.next_poll = Some(Instant::now() + Duration::from_secs(s.saved.poll_interval.into()));
            }
        }
        Ok(used)
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u16 {
        boot_abi::VIRTIO_TYPE_BALLOON
    }

    fn features(&self) -> u64 {
        self.s.lock().saved.features
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let queues = if self.features() & F_REPORTING != 0 { 4 } else { 3 };
        vec![QUEUE_SIZE; queues]
    }

    /// `num_pages` (le32) at 0, `actual` (le32) at 4; the free page hint and poison fields
    /// after them read as zero (those features are not offered).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let s = self.s.lock();
        let mut cfg = [0u8; 16];
        cfg[..4].copy_from_slice(&s.saved.num_pages.to_le_bytes());
        cfg[4..8].copy_from_slice(&s.saved.actual.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    /// The driver writes `actual`; anything else in the configuration is the device's.
    fn write_config(&self, offset: u64, data: &[u8]) {
        let mut s = self.s.lock();
        let mut actual = s.saved.actual.to_le_bytes();
        for (i, &b) in data.iter().enumerate() {
            if let Some(at) = (offset as usize + i).checked_sub(4).filter(|&at| at < 4) {
                actual[at] = b;
            }
        }
        let actual = u32::from_le_bytes(actual);
        if actual != s.saved.actual {
            s.saved.actual = actual;
            let _ = self.changed.0.try_send(());
        }
    }

    fn process(&self, index: usize, queue: &mut Queue, mem: &DeviceMemory) -> Result<bool, VirtioError> {
        let negotiated = self.s.lock().negotiated;
        match role(negotiated, index) {
            Some(Role::Inflate) => super::serve_chains(queue, mem, |c| self.pages(c, mem, true)),
            Some(Role::Deflate) => super::serve_chains(queue, mem, |c| self.pages(c, mem, false)),
            Some(Role::Reporting) => super::serve_chains(queue, mem, |c| self.report(c)),
            Some(Role::Stats) => self.stats_queue(queue, mem),
            None => Err(VirtioError::Request(format!(
                "queue {index} was used, but the negotiated features ({negotiated:#x}) give it no role"
            ))),
        }
    }

    fn negotiated(&self, features: u64) {
        self.s.lock().negotiated = features;
    }

    /// A driver that resets the device holds no pages and no statistics buffer any more.
    fn reset(&self) {
        let mut s = self.s.lock();
        s.negotiated = 0;
        s.release = false;
        s.saved.stats_head = None;
        if std::mem::take(&mut s.saved.actual) != 0 {
            let _ = self.changed.0.try_send(());
        }
    }

    fn pause(&self) {
        self.s.lock().paused = true;
    }

    fn resume(&self) {
        self.s.lock().paused = false;
    }

    fn save(&self) -> Vec<u8> {
        let saved = self.s.lock().saved.clone();
        component::encode("virtio-balloon", &saved).unwrap_or_default()
    }

    fn restore(&self, state: &[u8]) -> Result<(), String> {
        let saved: Saved = component::decode("virtio-balloon", state).map_err(|e| e.to_string())?;
        if saved.stats.len() != STAT_NAMES.len() {
            return Err(format!("{} statistics, the device has {}", saved.stats.len(), STAT_NAMES.len()));
        }
        let expected = self.queue_max_sizes().len();
        let mut s = self.s.lock();
        let had = s.saved.actual;
        // The VM's balloon options come with its state (a restored snapshot's were offered).
        s.saved = saved;
        let queues = if s.saved.features & F_REPORTING != 0 { 4 } else { 3 };
        if queues != expected {
            return Err("the snapshot's balloon has free page reporting set differently".into());
        }
        s.release = false;
        let secs = s.saved.poll_interval;
        s.next_poll = (secs > 0).then(|| Instant::now() + Duration::from_secs(secs.into()));
        if had != s.saved.actual {
            let _ = self.changed.0.try_send(());
        }
        Ok(())
    }
}

impl VirtioPci<Balloon> {
    /// QMP `balloon`: a new target, and the driver told of it.
    pub fn set_target(&self, bytes: u64) {
        self.device().set_target(bytes);
        self.config_changed();
    }

    /// Gives the held statistics buffer back if it is due (see [`Balloon::due`]).
    pub fn tick(&self, now: Instant) {
        if self.device().tick(now) {
            self.process_queue(STATS_QUEUE);
        }
    }
}
