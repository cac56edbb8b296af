//! virtio 1.x devices over PCI ("modern" transport, virtio 1.2 §4.1).
//!
//! A device is its queues and its configuration ([`VirtioDevice`]); [`VirtioPci`] is everything
//! else: the PCI function, the registers of the common configuration, ISR, notification and
//! device configuration structures, MSI-X, feature negotiation and the device status, and
//! replication of all of it as one component. Queues are `virtio-queue`'s split virtqueues on
//! guest memory's device view, through which every write marks its page dirty.
//!
//! One 32 KiB memory BAR (BAR 0) holds, at fixed offsets: the common configuration (0x0000),
//! the ISR status byte (0x1000), the device configuration (0x2000), the notification area
//! (0x3000; queue `n` is notified by a write at `0x3000 + 4n`), the MSI-X table (0x4000) and its
//! pending bits (0x6000). Each offset is described by a vendor capability in configuration
//! space, so drivers find them the standard way.
//!
//! A guest that breaks the rules (descriptors outside memory, loops, an available index ahead
//! of the ring, an inconsistent queue) gets the device marked DEVICE_NEEDS_RESET with a config
//! interrupt, and nothing more is processed until it resets the device: no panic, no hang.

pub mod balloon;
pub mod blk;
pub mod console;
pub mod disk;
pub mod net;
pub mod rng;
pub mod scsi;

use super::component::{self, Component, ComponentError};
use super::irq::Irq;
use super::memory::DeviceMemory;
use super::pci::config::{ConfigSpace, Ids};
use super::pci::msix::{self, Msix, MsixState, NO_VECTOR};
use super::pci::PciDevice;
use parking_lot::Mutex;
use std::sync::Arc;
use virtio_queue::{Queue, QueueState, QueueT};

pub use boot_abi::VIRTIO_PCI_VENDOR_ID as VENDOR;
pub const F_VERSION_1: u64 = 1 << 32;

const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
const NEEDS_RESET: u8 = 0x40;

/// ISR bits.
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x3c;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;
pub const BAR_SIZE: u64 = 0x8000;

/// Vendor capability types (virtio_pci_cap.cfg_type).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_VENDOR: u8 = 0x09;

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("descriptor chain at {head} is broken (a loop, or a next index outside the table)")]
    BrokenChain { head: u16 },
    #[error("buffer of chain {head}: {why}")]
    Buffer { head: u16, why: String },
    /// A request the device cannot make sense of beyond one buffer (a queue the negotiated
    /// features leave unused, say).
    #[error("{0}")]
    Request(String),
}

/// What a device is, beside the transport.
pub trait VirtioDevice: Send + Sync {
    /// The virtio device type (4: entropy source).
    fn device_type(&self) -> u16;
    /// Device-specific feature bits offered (the transport adds VIRTIO_F_VERSION_1).
    fn features(&self) -> u64 {
        0
    }
    /// The largest size of each queue.
    fn queue_max_sizes(&self) -> Vec<u16>;
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = offset;
        data.fill(0);
    }
    fn write_config(&self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// Handles what the driver made available on queue `index`; true if used entries were
    /// added (the driver is then interrupted).
    fn process(&self, index: usize, queue: &mut Queue, mem: &DeviceMemory) -> Result<bool, VirtioError>;
    /// The driver accepted these features (FEATURES_OK), or a restored device had them.
    fn negotiated(&self, features: u64) {
        let _ = features;
    }

    /// Queues to serve right after queue `index` was (a device whose requests on one queue are
    /// answered on another, as virtio-console's control queues).
    fn then_serve(&self, index: usize) -> Vec<usize> {
        let _ = index;
        Vec::new()
    }
    /// The driver reset the device.
    fn reset(&self) {}
    /// The VM is pausing: stop writing guest memory from host threads (see `Component::pause`).
    fn pause(&self) {}
    fn resume(&self) {}
    /// Device state beyond the transport's, as bytes.
    fn save(&self) -> Vec<u8> {
        Vec::new()
    }
    fn restore(&self, state: &[u8]) -> Result<(), String> {
        let _ = state;
        Ok(())
    }
}

/// Reads `data.len()` bytes at `offset` of a device configuration `cfg` (zeroes past its end).
pub fn read_config_bytes(cfg: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset).ok().and_then(|o| cfg.get(o.checked_add(i)?)).copied().unwrap_or(0);
    }
}

/// Checks that a chain ends properly: walking it must not stop on a descriptor that still
/// says "next" (virtio-queue ends a looping or out-of-range chain quietly).
pub fn check_chain<M>(chain: &virtio_queue::DescriptorChain<M>) -> Result<(), VirtioError>
where
    M: Clone + std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut last_has_next = false;
    let mut any = false;
    for d in chain.clone() {
        any = true;
        last_has_next = d.has_next();
    }
    if last_has_next || !any {
        return Err(VirtioError::BrokenChain { head: chain.head_index() });
    }
    Ok(())
}

/// A chain as devices get it.
pub type Chain<'a> = virtio_queue::DescriptorChain<&'a vm_memory::GuestMemoryMmap<crate::memory::DirtyPages>>;

/// Serves every chain the driver made available, in order: `serve` gets each chain (checked
/// with [`check_chain`]) and returns how many bytes it wrote for the driver, and the chain goes
/// back as used. True if any did (the driver is then interrupted).
pub fn serve_chains<'a>(
    queue: &mut Queue,
    mem: &'a DeviceMemory,
    serve: impl FnMut(Chain<'a>) -> Result<u32, VirtioError>,
) -> Result<bool, VirtioError> {
    serve_chains_while(queue, mem, || true, serve)
}

/// [`serve_chains`], taking each next chain only while `more` says so: the rest stay available
/// for a later call.
pub fn serve_chains_while<'a>(
    queue: &mut Queue,
    mem: &'a DeviceMemory,
    more: impl Fn() -> bool,
    mut serve: impl FnMut(Chain<'a>) -> Result<u32, VirtioError>,
) -> Result<bool, VirtioError> {
    let mut used = false;
    while more() {
        // One chain at a time (the iterator takes the chain off the ring as it yields it), with
        // a broken ring index reported rather than skipped.
        let Some(chain) = virtio_queue::QueueOwnedT::iter(queue, &**mem)?.next() else { break };
        let head = chain.head_index();
        check_chain(&chain)?;
        let written = serve(chain)?;
        queue.add_used(&**mem, head, written)?;
        used = true;
    }
    Ok(used)
}

/// [`serve_chains`] for at most `n` chains (one per item waiting for the driver).
pub fn serve_chains_upto<'a>(
    queue: &mut Queue,
    mem: &'a DeviceMemory,
    n: usize,
    mut serve: impl FnMut(Chain<'a>) -> Result<u32, VirtioError>,
) -> Result<bool, VirtioError> {
    let taken = std::cell::Cell::new(0usize);
    serve_chains_while(
        queue,
        mem,
        || taken.get() < n,
        |chain| {
            taken.set(taken.get() + 1);
            serve(chain)
        },
    )
}

struct Slot {
    queue: Queue,
    vector: u16,
}

struct Transport {
    config: ConfigSpace,
    msix_cap: usize,
    msix: Msix,
    r: Registers,
    queues: Vec<Slot>,
}

/// The transport's own registers, saved as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Registers {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_vector: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    isr: u8,
}

impl Default for Registers {
    fn default() -> Self {
        Registers {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_vector: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            isr: 0,
        }
    }
}

/// What the transport saves (with the device's own bytes).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct TransportState {
    config: Vec<u8>,
    msix: MsixState,
    registers: Registers,
    queues: Vec<SavedQueue>,
    device: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct SavedQueue {
    max_size: u16,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_avail: u16,
    next_used: u16,
    vector: u16,
}

/// A virtio device on the PCI bus.
pub struct VirtioPci<D> {
    name: &'static str,
    device: D,
    mem: DeviceMemory,
    t: Mutex<Transport>,
}

impl<D: VirtioDevice> VirtioPci<D> {
    /// `device` at BAR address `bar` (from the bus's window), named `name` in saved state.
    pub fn new(name: &'static str, device: D, bar: u64, mem: DeviceMemory, irq: Option<Arc<Irq>>) -> Arc<Self> {
        let sizes = device.queue_max_sizes();
        let vectors = sizes.len() as u16 + 1;
        let mut config = ConfigSpace::new(Ids {
            vendor: VENDOR,
            device: boot_abi::virtio_pci_device_id(device.device_type()),
            revision: 1,
            class: [0xff, 0x00, 0x00],
            subsystem_vendor: VENDOR,
            subsystem: 0x40,
        });
        config.add_bar(0, BAR_SIZE, bar);
        let cap = |cfg_type: u8, offset: u64, length: u64, extra: &[u8]| {
            let mut body = vec![0u8; 14];
            body[0] = 16 + extra.len() as u8; // cap_len, counting ID and next
            body[1] = cfg_type;
            body[2] = 0; // BAR 0
            body[6..10].copy_from_slice(&(offset as u32).to_le_bytes());
            body[10..14].copy_from_slice(&(length as u32).to_le_bytes());
            body.extend_from_slice(extra);
            body
        };
        for (t, off, len, extra) in [
            (CAP_COMMON, COMMON, COMMON_LEN, vec![]),
            (
                CAP_NOTIFY,
                NOTIFY,
                u64::from(NOTIFY_MULTIPLIER) * sizes.len() as u64,
                NOTIFY_MULTIPLIER.to_le_bytes().to_vec(),
            ),
            (CAP_ISR, ISR, 1, vec![]),
            (CAP_DEVICE, DEVICE_CFG, DEVICE_CFG_LEN, vec![]),
        ] {
            let body = cap(t, off, len, &extra);
            let writable = vec![0; body.len()];
            config.add_capability(CAP_VENDOR, &body, &writable);
        }
        let (body, writable) = Msix::capability(vectors, 0, MSIX_TABLE as u32, MSIX_PBA as u32);
        let msix_cap = config.add_capability(msix::CAP_ID, &body, &writable);
        let queues = sizes
            .iter()
            .map(|&max| Slot { queue: Queue::new(max).expect("a valid queue size"), vector: NO_VECTOR })
            .collect();
        Arc::new(VirtioPci {
            name,
            device,
            mem,
            t: Mutex::new(Transport {
                config,
                msix_cap,
                msix: Msix::new(vectors, irq),
                r: Registers::default(),
                queues,
            }),
        })
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// Serves queue `index` as if the driver had notified it (for requests a device left
    /// waiting, and after a restore).
    pub fn process_queue(&self, index: usize) {
        let mut t = self.t.lock();
        self.notify(&mut t, index);
    }

    fn offered(&self) -> u64 {
        self.device.features() | F_VERSION_1
    }

    /// Tells the driver the device configuration changed (a new generation and a configuration
    /// interrupt), once it is driving the device.
    pub fn config_changed(&self) {
        let mut t = self.t.lock();
        if t.r.status & DRIVER_OK == 0 || t.r.status & NEEDS_RESET != 0 {
            return;
        }
        t.r.config_generation = t.r.config_generation.wrapping_add(1);
        t.r.isr |= ISR_CONFIG;
        let v = t.r.config_vector;
        t.interrupt(v);
    }
}

impl Transport {
    fn msix_active(&self) -> bool {
        let control = self.config.u16_at(self.msix_cap + 2);
        control & msix::ENABLE != 0 && control & msix::FUNCTION_MASK == 0
    }

    fn interrupt(&mut self, vector: u16) {
        if vector != NO_VECTOR {
            let active = self.msix_active();
            self.msix.signal(vector, active);
        }
    }

    fn reset(&mut self) {
        // The configuration generation counts on across resets.
        self.r = Registers { config_generation: self.r.config_generation, ..Registers::default() };
        for s in &mut self.queues {
            s.queue.reset();
            s.vector = NO_VECTOR;
        }
    }

    /// The device broke the rules or was broken by the driver: flag it and tell the driver.
    fn needs_reset(&mut self, name: &str, why: &dyn std::fmt::Display) {
        if self.r.status & NEEDS_RESET == 0 {
            tracing::warn!("{name}: the guest driver broke the virtio rules ({why}); the device needs a reset");
            self.r.status |= NEEDS_RESET;
            self.r.isr |= ISR_CONFIG;
            let v = self.r.config_vector;
            self.interrupt(v);
        }
    }

    fn selected(&mut self) -> Option<&mut Slot> {
        self.queues.get_mut(usize::from(self.r.queue_select))
    }

    fn common_bytes(&self, offered: u64) -> [u8; COMMON_LEN as usize] {
        let mut b = [0u8; COMMON_LEN as usize];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(0x00, &self.r.device_feature_select.to_le_bytes());
        let feature = match self.r.device_feature_select {
            0 => offered as u32,
            1 => (offered >> 32) as u32,
            _ => 0,
        };
        put(0x04, &feature.to_le_bytes());
        put(0x08, &self.r.driver_feature_select.to_le_bytes());
        let driver = match self.r.driver_feature_select {
            0 => self.r.driver_features as u32,
            1 => (self.r.driver_features >> 32) as u32,
            _ => 0,
        };
        put(0x0c, &driver.to_le_bytes());
        put(0x10, &self.r.config_vector.to_le_bytes());
        put(0x12, &(self.queues.len() as u16).to_le_bytes());
        put(0x14, &[self.r.status, self.r.config_generation]);
        put(0x16, &self.r.queue_select.to_le_bytes());
        if let Some(s) = self.queues.get(usize::from(self.r.queue_select)) {
            let q = &s.queue;
            put(0x18, &q.size().to_le_bytes());
            put(0x1a, &s.vector.to_le_bytes());
            put(0x1c, &u16::from(q.ready()).to_le_bytes());
            put(0x1e, &self.r.queue_select.to_le_bytes());
            put(0x20, &q.desc_table().to_le_bytes());
            put(0x28, &q.avail_ring().to_le_bytes());
            put(0x30, &q.used_ring().to_le_bytes());
        }
        b
    }
}

fn word(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl<D: VirtioDevice> VirtioPci<D> {
    fn common_write(&self, t: &mut Transport, offset: u64, data: &[u8]) {
        let v = word(data);
        match (offset, data.len()) {
            (0x00, 4) => t.r.device_feature_select = v as u32,
            (0x08, 4) => t.r.driver_feature_select = v as u32,
            (0x0c, 4) if t.r.status & FEATURES_OK == 0 => match t.r.driver_feature_select {
                0 => t.r.driver_features = (t.r.driver_features & !0xffff_ffff) | v,
                1 => t.r.driver_features = (t.r.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            },
            (0x10, 2) => t.r.config_vector = v as u16,
            (0x14, 1) => self.status_write(t, v as u8),
            (0x16, 2) => t.r.queue_select = v as u16,
            (0x18, 2) | (0x1a, 2) | (0x1c, 2) | (0x20..=0x37, 4 | 8) => {
                let Some(s) = t.selected() else { return };
                if offset == 0x1a {
                    s.vector = v as u16;
                    return;
                }
                if s.queue.ready() {
                    return; // an enabled queue's layout is fixed until reset
                }
                match offset {
                    0x18 if s.queue.try_set_size(v as u16).is_err() => {
                        tracing::debug!("{}: queue size {v} refused", self.name);
                    }
                    0x1c if v == 1 => s.queue.set_ready(true),
                    0x20..=0x37 => {
                        let (lo, hi) = match (offset % 8, data.len()) {
                            (0, 8) => (Some(v as u32), Some((v >> 32) as u32)),
                            (0, _) => (Some(v as u32), None),
                            (_, _) => (None, Some(v as u32)),
                        };
                        match offset & !7 {
                            0x20 => s.queue.set_desc_table_address(lo, hi),
                            0x28 => s.queue.set_avail_ring_address(lo, hi),
                            _ => s.queue.set_used_ring_address(lo, hi),
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn status_write(&self, t: &mut Transport, v: u8) {
        if v == 0 {
            t.reset();
            self.device.reset();
            return;
        }
        let mut new = (v & !NEEDS_RESET) | (t.r.status & NEEDS_RESET);
        if new & FEATURES_OK != 0 && t.r.status & FEATURES_OK == 0 {
            let f = t.r.driver_features;
            if f & !self.offered() != 0 || f & F_VERSION_1 == 0 {
                tracing::debug!("{}: features {f:#x} refused (offered {:#x})", self.name, self.offered());
                new &= !FEATURES_OK;
            } else {
                self.device.negotiated(f);
            }
        }
        t.r.status = new;
        if new & DRIVER_OK != 0 {
            let broken = t.queues.iter().position(|s| s.queue.ready() && !s.queue.is_valid(&*self.mem));
            if let Some(i) = broken {
                t.needs_reset(self.name, &format_args!("queue {i} is enabled with an invalid layout"));
            }
        }
    }

    fn notify(&self, t: &mut Transport, index: usize) {
        self.serve(t, index);
        for next in self.device.then_serve(index) {
            if next != index {
                self.serve(t, next);
            }
        }
    }

    fn serve(&self, t: &mut Transport, index: usize) {
        if t.r.status & DRIVER_OK == 0 || t.r.status & NEEDS_RESET != 0 {
            return;
        }
        let Some(s) = t.queues.get_mut(index) else { return };
        if !s.queue.ready() {
            return;
        }
        match self.device.process(index, &mut s.queue, &self.mem) {
            Ok(false) => {}
            Ok(true) => {
                let v = s.vector;
                t.r.isr |= ISR_QUEUE;
                t.interrupt(v);
            }
            Err(e) => t.needs_reset(self.name, &e),
        }
    }
}

impl<D: VirtioDevice> PciDevice for VirtioPci<D> {
    fn config_read(&self, offset: usize, data: &mut [u8]) {
        self.t.lock().config.read(offset, data);
    }

    fn config_write(&self, offset: usize, data: &[u8]) {
        let mut t = self.t.lock();
        let was = t.msix_active();
        t.config.write(offset, data);
        if !was && t.msix_active() {
            t.msix.deliver_pending();
        }
    }

    fn decode(&self, addr: u64, len: usize) -> Option<(usize, u64)> {
        self.t.lock().config.decode(addr, len)
    }

    fn name(&self) -> Option<&'static str> {
        Some(self.name)
    }

    fn bars(&self) -> Vec<crate::pci::config::Bar> {
        self.t.lock().config.bars().to_vec()
    }

    fn bar_read(&self, _bar: usize, offset: u64, data: &mut [u8]) {
        let mut t = self.t.lock();
        let end = offset + data.len() as u64;
        if end <= COMMON + COMMON_LEN {
            let b = t.common_bytes(self.offered());
            data.copy_from_slice(&b[offset as usize..end as usize]);
        } else if offset == ISR && data.len() == 1 {
            data[0] = std::mem::take(&mut t.r.isr);
        } else if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&offset) {
            self.device.read_config(offset - DEVICE_CFG, data);
        } else if (MSIX_TABLE..MSIX_PBA).contains(&offset) {
            t.msix.read_table((offset - MSIX_TABLE) as usize, data);
        } else if (MSIX_PBA..BAR_SIZE).contains(&offset) {
            t.msix.read_pba((offset - MSIX_PBA) as usize, data);
        } else {
            data.fill(0);
        }
    }

    fn bar_write(&self, _bar: usize, offset: u64, data: &[u8]) {
        let mut t = self.t.lock();
        if offset + data.len() as u64 <= COMMON + COMMON_LEN {
            self.common_write(&mut t, offset, data);
        } else if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&offset) {
            self.device.write_config(offset - DEVICE_CFG, data);
        } else if (NOTIFY..MSIX_TABLE).contains(&offset) {
            let index = ((offset - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as usize;
            self.notify(&mut t, index);
        } else if (MSIX_TABLE..MSIX_PBA).contains(&offset) {
            let active = t.msix_active();
            t.msix.write_table((offset - MSIX_TABLE) as usize, data, active);
        }
    }
}

impl<D: VirtioDevice> Component for VirtioPci<D> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn pause(&self) {
        self.device.pause();
    }

    fn resume(&self) {
        self.device.resume();
    }

    fn save(&self) -> Result<Vec<u8>, ComponentError> {
        let t = self.t.lock();
        let queues = t
            .queues
            .iter()
            .map(|s| {
                let q: QueueState = s.queue.state();
                SavedQueue {
                    max_size: q.max_size,
                    size: q.size,
                    ready: q.ready,
                    desc_table: q.desc_table,
                    avail_ring: q.avail_ring,
                    used_ring: q.used_ring,
                    next_avail: q.next_avail,
                    next_used: q.next_used,
                    vector: s.vector,
                }
            })
            .collect();
        let state = TransportState {
            config: t.config.bytes().to_vec(),
            msix: t.msix.save(),
            registers: t.r,
            queues,
            device: self.device.save(),
        };
        component::encode(self.name, &state)
    }

    fn restore(&self, version: u32, state: &[u8]) -> Result<(), ComponentError> {
        component::expect_version(self.name, version, self.version())?;
        let s: TransportState = component::decode(self.name, state)?;
        let bad = |why: String| ComponentError::Malformed { component: self.name, why };
        let mut t = self.t.lock();
        if s.queues.len() != t.queues.len() {
            return Err(bad(format!("{} queues, the device has {}", s.queues.len(), t.queues.len())));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (saved, slot) in s.queues.iter().zip(&t.queues) {
            if saved.max_size != slot.queue.max_size() {
                return Err(bad(format!(
                    "queue of {} entries, the device's has {}",
                    saved.max_size,
                    slot.queue.max_size()
                )));
            }
            let q = Queue::try_from(QueueState {
                max_size: saved.max_size,
                next_avail: saved.next_avail,
                next_used: saved.next_used,
                event_idx_enabled: false,
                size: saved.size,
                ready: saved.ready,
                desc_table: saved.desc_table,
                avail_ring: saved.avail_ring,
                used_ring: saved.used_ring,
            })
            .map_err(|e| bad(format!("queue: {e}")))?;
            queues.push(Slot { queue: q, vector: saved.vector });
        }
        t.config.load(&s.config).map_err(bad)?;
        t.msix.restore(&s.msix).map_err(bad)?;
        self.device.restore(&s.device).map_err(bad)?;
        self.device.negotiated(if s.registers.status & FEATURES_OK != 0 { s.registers.driver_features } else { 0 });
        t.r = s.registers;
        t.queues = queues;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
