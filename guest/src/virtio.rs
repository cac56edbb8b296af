//! Virtio 1.x over PCI, "modern" devices only (virtio 1.2 section 4.1), with split virtqueues
//! (section 2.7), polled. The guest runs in ring 3 with interrupts off, so it never asks for one: no
//! MSI-X vectors are programmed and every available ring carries `VIRTQ_AVAIL_F_NO_INTERRUPT`;
//! completions are found by reading the used ring. Device-specific drivers (rng; block and net
//! later) build on [`Device`] and [`Queue`] and keep their own knowledge to themselves.
//!
//! Registers are reached in the BARs directly (identity mapped, uncached, inside the PCI window)
//! with volatile accesses of exactly the field's width, as 4.1.3.1 requires: 8-, 16- and 32-bit
//! fields with accesses of their own width, 64-bit fields as two 32-bit halves, low half first.

use crate::abi::{virtio_pci_device_id, VIRTIO_PCI_VENDOR_ID};
use crate::pci::{self, Bar, BarError, Function};
use crate::{dma, io};
use core::fmt;
use core::sync::atomic::{fence, AtomicU16, Ordering};

// Device status bits (2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// Feature bit 32: the device follows virtio 1.x; a modern driver requires it (6.1).
pub const F_VERSION_1: u64 = 1 << 32;

/// Largest virtqueue this driver sets up (bounds the per-queue bookkeeping).
pub const MAX_QUEUE_SIZE: u16 = 256;

// Vendor-specific PCI capabilities that locate the virtio structures (4.1.4).
const CAP_ID_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
// struct virtio_pci_cap: cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2], offset, length.
const CAP_LEN: u8 = 2;
const CAP_CFG_TYPE: u8 = 3;
const CAP_BAR: u8 = 4;
const CAP_OFFSET: u8 = 8;
const CAP_LENGTH: u8 = 12;
const CAP_SIZE: u8 = 16;
// struct virtio_pci_notify_cap: the above, then notify_off_multiplier.
const CAP_NOTIFY_MULTIPLIER: u8 = 16;
const NOTIFY_CAP_SIZE: u8 = 20;

// struct virtio_pci_common_cfg (4.1.4.3).
const DEVICE_FEATURE_SELECT: u32 = 0x00;
const DEVICE_FEATURE: u32 = 0x04;
const DRIVER_FEATURE_SELECT: u32 = 0x08;
const DRIVER_FEATURE: u32 = 0x0c;
const NUM_QUEUES: u32 = 0x12;
const DEVICE_STATUS: u32 = 0x14;
const CONFIG_GENERATION: u32 = 0x15;
const QUEUE_SELECT: u32 = 0x16;
const QUEUE_SIZE: u32 = 0x18;
const QUEUE_ENABLE: u32 = 0x1c;
const QUEUE_NOTIFY_OFF: u32 = 0x1e;
const QUEUE_DESC: u32 = 0x20;
const QUEUE_DRIVER: u32 = 0x28;
const QUEUE_DEVICE: u32 = 0x30;
/// The fields up to and including `queue_device`: what the common structure must cover at least.
const COMMON_CFG_LEN: u32 = 0x38;

// Split virtqueue layout (2.7).
const DESC_SIZE: u64 = 16;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;
const RING_ALIGN: u64 = 4096;

/// How long a reset may take before the device is given up on.
const RESET_TIMEOUT_MS: u64 = 1000;
/// While polling, how often the device status is read (each read is an exit to the VMM).
const STATUS_EVERY_MS: u64 = 10;
/// Polls of the used ring before waiting starts to give the host CPU away.
const POLL_SPINS: u32 = 256;
const POLL_IDLE_US: u32 = 20;

#[derive(Clone, Copy, Debug)]
pub enum Error {
    /// No usable capability of this kind; `bar` is why the last candidate was refused, if a BAR was.
    Missing {
        structure: &'static str,
        bar: Option<(u8, BarError)>,
    },
    ResetTimeout {
        status: u8,
    },
    NoVersion1 {
        offered: u64,
    },
    FeaturesRejected {
        status: u8,
    },
    NoSuchQueue {
        index: u16,
        num_queues: u16,
    },
    QueueUnavailable {
        index: u16,
    },
    QueueAlreadyEnabled {
        index: u16,
    },
    NotifyOutside {
        index: u16,
        notify_off: u16,
    },
    OutOfMemory,
    BadChain,
    QueueFull,
    NeedsReset {
        status: u8,
    },
    NotLive {
        status: u8,
    },
    Timeout {
        ms: u64,
    },
    UnknownHead {
        id: u32,
    },
    UsedIndexJump {
        idx: u16,
        last: u16,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Missing { structure, bar: None } => write!(f, "no usable {structure} capability"),
            Error::Missing { structure, bar: Some((n, e)) } => {
                write!(f, "no usable {structure} capability (BAR{n}: {e})")
            }
            Error::ResetTimeout { status } => write!(f, "reset not finished (status {status:#x})"),
            Error::NoVersion1 { offered } => write!(f, "VIRTIO_F_VERSION_1 not offered (features {offered:#x})"),
            Error::FeaturesRejected { status } => write!(f, "FEATURES_OK not kept (status {status:#x})"),
            Error::NoSuchQueue { index, num_queues } => write!(f, "queue {index} of {num_queues}"),
            Error::QueueUnavailable { index } => write!(f, "queue {index} has size 0"),
            Error::QueueAlreadyEnabled { index } => write!(f, "queue {index} is enabled before setup"),
            Error::NotifyOutside { index, notify_off } => {
                write!(f, "queue {index} notify offset {notify_off} is outside the notify structure")
            }
            Error::OutOfMemory => write!(f, "device memory region exhausted"),
            Error::BadChain => write!(f, "empty buffer, or a readable buffer after a writable one"),
            Error::QueueFull => write!(f, "not enough free descriptors"),
            Error::NeedsReset { status } => write!(f, "device needs reset (status {status:#x})"),
            Error::NotLive { status } => write!(f, "device is no longer live (status {status:#x})"),
            Error::Timeout { ms } => write!(f, "no completion within {ms} ms"),
            Error::UnknownHead { id } => write!(f, "used ring returned id {id}, not a chain in flight"),
            Error::UsedIndexJump { idx, last } => write!(f, "used index jumped from {last} to {idx}"),
        }
    }
}

/// A register block: `len` bytes at `addr` in a BAR (found at `bar` + `offset`).
#[derive(Clone, Copy)]
pub struct Regs {
    addr: u64,
    len: u32,
    bar: u8,
    offset: u32,
}

impl Regs {
    fn at<T>(&self, off: u32) -> *mut T {
        let width = size_of::<T>() as u32;
        assert!(off.is_multiple_of(width) && off + width <= self.len, "virtio register {off:#x} outside its structure");
        (self.addr + u64::from(off)) as *mut T
    }

    pub fn read8(&self, off: u32) -> u8 {
        // SAFETY: `at` keeps the access inside a structure that lies in a memory BAR inside the PCI
        // window, which the VMM maps for the guest; the access is an exit to the VMM.
        unsafe { self.at::<u8>(off).read_volatile() }
    }

    pub fn read16(&self, off: u32) -> u16 {
        // SAFETY: as for `read8`; `at` checks the alignment.
        unsafe { self.at::<u16>(off).read_volatile() }
    }

    pub fn read32(&self, off: u32) -> u32 {
        // SAFETY: as for `read16`.
        unsafe { self.at::<u32>(off).read_volatile() }
    }

    pub fn write8(&self, off: u32, v: u8) {
        // SAFETY: as for `read8`.
        unsafe { self.at::<u8>(off).write_volatile(v) }
    }

    pub fn write16(&self, off: u32, v: u16) {
        // SAFETY: as for `read16`.
        unsafe { self.at::<u16>(off).write_volatile(v) }
    }

    pub fn write32(&self, off: u32, v: u32) {
        // SAFETY: as for `read16`.
        unsafe { self.at::<u32>(off).write_volatile(v) }
    }

    /// A 64-bit field as two 32-bit writes, low half first.
    fn write64(&self, off: u32, v: u64) {
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }
}

impl fmt::Display for Regs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BAR{}+{:#x} ({:#x} bytes)", self.bar, self.offset, self.len)
    }
}

/// Each BAR sized at most once while the capabilities are read.
struct Bars([Option<Result<Bar, BarError>>; 6]);

impl Bars {
    fn get(&mut self, pci: &Function, n: u8) -> Result<Bar, BarError> {
        *self.0[usize::from(n)].get_or_insert_with(|| pci.memory_bar(n))
    }
}

/// What a structure of one kind must satisfy.
struct Want {
    name: &'static str,
    cfg_type: u8,
    cap_len: u8,
    min_len: u32,
    align: u32,
}

/// The first capability of `want.cfg_type` that the driver can use (4.1.4: reserved BAR numbers
/// are ignored; the first usable instance of a kind is taken), and its offset in config space.
fn structure(pci: &Function, want: &Want, bars: &mut Bars) -> Result<(Regs, u8), Error> {
    let mut refused = None;
    for (at, _) in pci.capabilities().filter(|&(_, id)| id == CAP_ID_VENDOR) {
        if pci.read8(at + CAP_CFG_TYPE) != want.cfg_type || pci.read8(at + CAP_LEN) < want.cap_len {
            continue;
        }
        let bar = pci.read8(at + CAP_BAR);
        let (offset, len) = (pci.read32(at + CAP_OFFSET), pci.read32(at + CAP_LENGTH));
        if bar > 5 || len < want.min_len || !offset.is_multiple_of(want.align) {
            continue;
        }
        let need = u64::from(offset) + u64::from(len);
        match bars.get(pci, bar) {
            Ok(b) if need <= b.size => return Ok((Regs { addr: b.base + u64::from(offset), len, bar, offset }, at)),
            Ok(b) => refused = Some((bar, BarError::TooSmall { size: b.size, need })),
            Err(e) => refused = Some((bar, e)),
        }
    }
    Err(Error::Missing { structure: want.name, bar: refused })
}

/// A virtio device being driven: where its structures are, and its negotiated state.
pub struct Device {
    pub pci: Function,
    common: Regs,
    notify: Regs,
    notify_multiplier: u32,
    isr: Option<Regs>,
    config: Option<Regs>,
    tsc_khz: u64,
}

impl Device {
    /// The first function on bus 0 that is a modern virtio device of `device_type`.
    pub fn find(device_type: u16) -> Option<Function> {
        pci::find(VIRTIO_PCI_VENDOR_ID, virtio_pci_device_id(device_type))
    }

    /// Locates the common, notify, ISR and device-specific structures (the first two are
    /// required), lets the function decode its BARs and reach guest memory, and resets the device.
    pub fn new(pci: Function, tsc_khz: u64) -> Result<Device, Error> {
        let mut bars = Bars([None; 6]);
        let want = |name, cfg_type, min_len, align| Want { name, cfg_type, cap_len: CAP_SIZE, min_len, align };
        let (common, _) = structure(&pci, &want("common configuration", CFG_COMMON, COMMON_CFG_LEN, 4), &mut bars)?;
        let notify_want = Want { cap_len: NOTIFY_CAP_SIZE, ..want("notification", CFG_NOTIFY, 2, 2) };
        let (notify, at) = structure(&pci, &notify_want, &mut bars)?;
        let notify_multiplier = pci.read32(at + CAP_NOTIFY_MULTIPLIER);
        if !notify_multiplier.is_multiple_of(2) {
            return Err(Error::Missing { structure: "notification (odd notify_off_multiplier)", bar: None });
        }
        let isr = structure(&pci, &want("ISR", CFG_ISR, 1, 1), &mut bars).ok().map(|(r, _)| r);
        let config = structure(&pci, &want("device configuration", CFG_DEVICE, 0, 4), &mut bars).ok().map(|(r, _)| r);
        pci.enable_memory_and_dma();
        let device = Device { pci, common, notify, notify_multiplier, isr, config, tsc_khz };
        device.reset()?;
        Ok(device)
    }

    pub fn status(&self) -> u8 {
        self.common.read8(DEVICE_STATUS)
    }

    fn add_status(&self, bits: u8) {
        let status = self.status();
        self.common.write8(DEVICE_STATUS, status | bits);
    }

    /// Writes 0 to `device_status` and waits until it reads back 0 (4.1.4.3.2).
    pub fn reset(&self) -> Result<(), Error> {
        self.common.write8(DEVICE_STATUS, 0);
        let start = io::rdtsc();
        loop {
            let status = self.status();
            if status == 0 {
                return Ok(());
            }
            if io::rdtsc() - start > RESET_TIMEOUT_MS * self.tsc_khz {
                return Err(Error::ResetTimeout { status });
            }
            io::idle(POLL_IDLE_US);
        }
    }

    /// Steps 2 to 6 of device initialisation (3.1.1): ACKNOWLEDGE, DRIVER, feature negotiation,
    /// FEATURES_OK and the check that the device kept it. Accepts VIRTIO_F_VERSION_1 (required)
    /// and whichever of `wanted` the device offers; returns the accepted set.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, Error> {
        self.add_status(STATUS_ACKNOWLEDGE);
        self.add_status(STATUS_DRIVER);
        let mut offered = 0;
        for select in 0..2 {
            self.common.write32(DEVICE_FEATURE_SELECT, select);
            offered |= u64::from(self.common.read32(DEVICE_FEATURE)) << (32 * select);
        }
        if offered & F_VERSION_1 == 0 {
            return Err(Error::NoVersion1 { offered });
        }
        let accepted = offered & (wanted | F_VERSION_1);
        for select in 0..2 {
            self.common.write32(DRIVER_FEATURE_SELECT, select);
            self.common.write32(DRIVER_FEATURE, (accepted >> (32 * select)) as u32);
        }
        self.add_status(STATUS_FEATURES_OK);
        let status = self.status();
        if status & STATUS_FEATURES_OK == 0 {
            return Err(Error::FeaturesRejected { status });
        }
        Ok(accepted)
    }

    /// Sets up virtqueue `index` (4.1.5.1.3) with the largest power-of-two size that neither the
    /// device's maximum nor `max_size` exceeds, its rings taken from device memory.
    pub fn setup_queue(&self, index: u16, max_size: u16) -> Result<Queue, Error> {
        let num_queues = self.common.read16(NUM_QUEUES);
        if index >= num_queues {
            return Err(Error::NoSuchQueue { index, num_queues });
        }
        self.common.write16(QUEUE_SELECT, index);
        let device_max = self.common.read16(QUEUE_SIZE);
        let limit = device_max.min(max_size).min(MAX_QUEUE_SIZE);
        if limit == 0 {
            return Err(Error::QueueUnavailable { index });
        }
        if self.common.read16(QUEUE_ENABLE) != 0 {
            return Err(Error::QueueAlreadyEnabled { index });
        }
        let size = 1 << limit.ilog2();
        let notify_off = self.common.read16(QUEUE_NOTIFY_OFF);
        let notify_at = u64::from(notify_off) * u64::from(self.notify_multiplier);
        if notify_at + 2 > u64::from(self.notify.len) {
            return Err(Error::NotifyOutside { index, notify_off });
        }
        let queue = Queue::new(index, size, self.notify.addr + notify_at)?;
        self.common.write16(QUEUE_SIZE, size);
        self.common.write64(QUEUE_DESC, queue.desc);
        self.common.write64(QUEUE_DRIVER, queue.avail);
        self.common.write64(QUEUE_DEVICE, queue.used);
        self.common.write16(QUEUE_ENABLE, 1);
        Ok(queue)
    }

    /// The last step of initialisation: the driver is ready and the device may use its queues.
    pub fn driver_ok(&self) {
        self.add_status(STATUS_DRIVER_OK);
    }

    /// Tells the device the driver has given up on it (best effort).
    pub fn set_failed(&self) {
        self.add_status(STATUS_FAILED);
    }

    /// After [`Device::driver_ok`]: the device is still live and does not need a reset.
    pub fn check(&self) -> Result<(), Error> {
        let status = self.status();
        if status & STATUS_NEEDS_RESET != 0 {
            Err(Error::NeedsReset { status })
        } else if status & STATUS_DRIVER_OK == 0 || status & STATUS_FAILED != 0 {
            Err(Error::NotLive { status })
        } else {
            Ok(())
        }
    }

    /// Writes a 32-bit field of the device-specific configuration (if the device has one).
    pub fn write_config32(&self, off: u32, v: u32) {
        if let Some(c) = &self.config {
            c.write32(off, v);
        }
    }

    /// Reads the device-specific configuration consistently: `read` is repeated until
    /// `config_generation` is the same before and after it (4.1.4.3.1). `None` if the device has
    /// no such structure.
    #[allow(dead_code, reason = "used by the block and network drivers")]
    pub fn read_config<T>(&self, read: impl Fn(&Regs) -> T) -> Option<T> {
        let config = self.config.as_ref()?;
        loop {
            let before = self.common.read8(CONFIG_GENERATION);
            let v = read(config);
            if self.common.read8(CONFIG_GENERATION) == before {
                return Some(v);
            }
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: common {}, notify {} x{}", self.pci, self.common, self.notify, self.notify_multiplier)?;
        match &self.isr {
            Some(r) => write!(f, ", ISR {r}")?,
            None => write!(f, ", no ISR")?,
        }
        match &self.config {
            Some(r) => write!(f, ", device {r}"),
            None => write!(f, ", no device configuration"),
        }
    }
}

/// One buffer of a chain: guest-physical address, length, and whether the device writes it.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A completed chain: its head and the number of bytes the device wrote into it.
#[derive(Clone, Copy)]
pub struct Used {
    pub head: u16,
    pub len: u32,
}

/// A split virtqueue, driver side. Free descriptors form a list through their `next` fields.
pub struct Queue {
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    notify: u64,
    free_head: u16,
    num_free: u16,
    next_avail: u16,
    last_used: u16,
    /// Descriptors in the chain each in-flight head starts (0: not a head in flight).
    chain_len: [u16; MAX_QUEUE_SIZE as usize],
}

impl Queue {
    /// Rings for `size` entries, each on its own pages (2.7: the descriptor table needs 16-byte,
    /// the available ring 2-byte and the used ring 4-byte alignment).
    fn new(index: u16, size: u16, notify: u64) -> Result<Queue, Error> {
        let n = u64::from(size);
        let desc = dma::alloc(DESC_SIZE * n, RING_ALIGN).ok_or(Error::OutOfMemory)?;
        let avail = dma::alloc(6 + 2 * n, RING_ALIGN).ok_or(Error::OutOfMemory)?;
        let used = dma::alloc(6 + 8 * n, RING_ALIGN).ok_or(Error::OutOfMemory)?;
        let q = Queue {
            index,
            size,
            desc,
            avail,
            used,
            notify,
            free_head: 0,
            num_free: size,
            next_avail: 0,
            last_used: 0,
            chain_len: [0; MAX_QUEUE_SIZE as usize],
        };
        for i in 0..size {
            q.set_next(i, if i + 1 < size { i + 1 } else { 0 });
        }
        // SAFETY: `avail` starts with its 16-bit flags field, in memory this queue owns.
        unsafe { (avail as *mut u16).write_volatile(AVAIL_F_NO_INTERRUPT) };
        Ok(q)
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    fn desc_field<T>(&self, i: u16, off: u64) -> *mut T {
        assert!(i < self.size);
        (self.desc + u64::from(i) * DESC_SIZE + off) as *mut T
    }

    fn set_next(&self, i: u16, next: u16) {
        // SAFETY: `next` (offset 14) of descriptor `i` < size, in the table this queue owns.
        unsafe { self.desc_field::<u16>(i, 14).write_volatile(next) }
    }

    fn next(&self, i: u16) -> u16 {
        // SAFETY: as for `set_next`; the device never writes the descriptor table.
        unsafe { self.desc_field::<u16>(i, 14).read_volatile() }
    }

    fn set_desc(&self, i: u16, b: &Buf, flags: u16) {
        // SAFETY: `addr` (offset 0), `len` (8) and `flags` (12) of descriptor `i` < size, in the
        // table this queue owns; the descriptor is free, so the device is not reading it.
        unsafe {
            self.desc_field::<u64>(i, 0).write_volatile(b.addr);
            self.desc_field::<u32>(i, 8).write_volatile(b.len);
            self.desc_field::<u16>(i, 12).write_volatile(flags);
        }
    }

    fn avail_idx(&self) -> &AtomicU16 {
        // SAFETY: `idx` is the aligned 16-bit field at offset 2 of the available ring, which lives
        // as long as the guest; only this driver writes it, the device reads it.
        unsafe { AtomicU16::from_ptr((self.avail + 2) as *mut u16) }
    }

    fn used_idx(&self) -> &AtomicU16 {
        // SAFETY: `idx` is the aligned 16-bit field at offset 2 of the used ring, which lives as
        // long as the guest; only the device writes it.
        unsafe { AtomicU16::from_ptr((self.used + 2) as *mut u16) }
    }

    /// Places a chain (device-readable buffers first, then device-writable ones) in the available
    /// ring and returns its head. The device learns of it at the next [`Queue::notify`].
    pub fn submit(&mut self, chain: &[Buf]) -> Result<u16, Error> {
        let ordered = chain.windows(2).all(|w| !w[0].write || w[1].write);
        if chain.is_empty() || !ordered || chain.iter().any(|b| b.len == 0) {
            return Err(Error::BadChain);
        }
        let n = chain.len() as u16;
        if chain.len() > usize::from(self.num_free) {
            return Err(Error::QueueFull);
        }
        let head = self.free_head;
        let mut i = head;
        for (k, b) in chain.iter().enumerate() {
            let more = k + 1 < chain.len();
            let flags = if b.write { DESC_F_WRITE } else { 0 } | if more { DESC_F_NEXT } else { 0 };
            self.set_desc(i, b, flags);
            // Inside the chain `next` already links to the following free descriptor.
            i = self.next(i);
        }
        self.free_head = i;
        self.num_free -= n;
        self.chain_len[usize::from(head)] = n;
        let slot = u64::from(self.next_avail & (self.size - 1));
        // SAFETY: `ring[slot]` of the available ring (offset 4 + 2 * slot, slot < size), which
        // this queue owns; the device reads the slot only once `idx` covers it.
        unsafe { ((self.avail + 4 + 2 * slot) as *mut u16).write_volatile(head) };
        self.next_avail = self.next_avail.wrapping_add(1);
        // Release: the descriptors and the ring entry are visible before the index that publishes them.
        self.avail_idx().store(self.next_avail, Ordering::Release);
        Ok(head)
    }

    /// Notifies the device of new available buffers unless it asked not to be (2.7.10).
    pub fn notify(&self) {
        // The index store must be visible before the device's flags are read (store then load).
        fence(Ordering::SeqCst);
        // SAFETY: `flags` is the first field of the used ring, which this queue owns.
        let flags = unsafe { (self.used as *const u16).read_volatile() };
        if flags & USED_F_NO_NOTIFY == 0 {
            // SAFETY: `Device::setup_queue` checked that the 2 bytes at `notify` lie inside the
            // notification structure, in a memory BAR inside the mapped PCI window.
            unsafe { (self.notify as *mut u16).write_volatile(self.index) };
        }
    }

    /// The next completed chain, if the device has returned one; its descriptors are free again.
    pub fn try_used(&mut self) -> Result<Option<Used>, Error> {
        let idx = self.used_idx().load(Ordering::Acquire);
        let last = self.last_used;
        if idx == last {
            return Ok(None);
        }
        if idx.wrapping_sub(last) > self.size {
            return Err(Error::UsedIndexJump { idx, last });
        }
        let elem = self.used + 4 + 8 * u64::from(last & (self.size - 1));
        // SAFETY: `ring[slot]` of the used ring ({le32 id, le32 len}, slot < size), which this
        // queue owns; the Acquire load of `idx` ordered the device's writes of it before us.
        let (id, len) = unsafe { ((elem as *const u32).read_volatile(), ((elem + 4) as *const u32).read_volatile()) };
        let chain = match self.chain_len.get(id as usize) {
            Some(&n) if n != 0 => n,
            _ => return Err(Error::UnknownHead { id }),
        };
        self.last_used = last.wrapping_add(1);
        let head = id as u16;
        let mut tail = head;
        for _ in 1..chain {
            tail = self.next(tail);
        }
        self.set_next(tail, self.free_head);
        self.free_head = head;
        self.num_free += chain;
        self.chain_len[usize::from(head)] = 0;
        Ok(Some(Used { head, len }))
    }

    /// Waits up to `timeout_ms` for the next completed chain, reading the device status now and
    /// then so that a device that needs a reset (or was reset) is reported rather than waited on.
    pub fn poll_used(&mut self, device: &Device, timeout_ms: u64) -> Result<Used, Error> {
        let khz = device.tsc_khz;
        let start = io::rdtsc();
        let mut next_status = start + khz;
        let mut spins = 0u32;
        loop {
            if let Some(u) = self.try_used()? {
                return Ok(u);
            }
            let now = io::rdtsc();
            if now >= next_status {
                device.check()?;
                next_status = now + STATUS_EVERY_MS * khz;
            }
            if now - start >= timeout_ms * khz {
                return Err(Error::Timeout { ms: timeout_ms });
            }
            spins += 1;
            if spins < POLL_SPINS {
                io::cpu_relax();
            } else {
                io::idle(POLL_IDLE_US);
            }
        }
    }
}
