//! The virtio-net driver (virtio 1.2 section 5.1), polled like every device of this guest, and the
//! `smoltcp::phy::Device` the network stack runs on.
//!
//! Features: VIRTIO_NET_F_MAC and VIRTIO_NET_F_STATUS if offered (and VIRTIO_F_VERSION_1), nothing
//! else: no checksum offload, no segmentation offload, no mergeable receive buffers, no control
//! queue, one queue pair. Every frame in either direction is preceded by the 12-byte
//! `struct virtio_net_hdr` (5.1.6), all zero on transmit and ignored on receive.
//!
//! - receiveq (0): every descriptor holds one device-writable buffer of header + 1514 bytes (the
//!   size 5.1.6.3.1 asks for without offloads or mergeable buffers), posted when the device starts
//!   and reposted as soon as the stack has consumed the frame in it.
//! - transmitq (1): one device-readable buffer per frame (header and frame together); a buffer is
//!   free again once the device has returned it in the used ring. When every buffer is in flight,
//!   the driver tells the device of what it queued and waits a few microseconds for completions
//!   before it refuses a frame.
//!
//! Notifications are deferred: new buffers go into the available rings at once, and
//! [`Nic::flush`] (once per poll, and before waiting for transmit buffers) notifies each queue that
//! has new ones. Errors of the device's own making (a used ring that names no buffer in flight, a
//! length past the buffer, a device that needs a reset) fail the run like the other drivers do;
//! nothing a frame contains can. A receive buffer returned empty (a frame the device could not fit)
//! is counted and reposted.

use crate::abi::{virtio_pci_device_id, EXIT_DEVICE_FAILED, EXIT_NO_DEVICE, VIRTIO_PCI_VENDOR_ID, VIRTIO_TYPE_NET};
use crate::sync::TakeOnce;
use crate::virtio::{self, Buf, Device, Queue, MAX_QUEUE_SIZE};
use crate::{dma, fail, io, log};
use core::sync::atomic::{AtomicU64, Ordering};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// The device has a MAC address in its configuration (5.1.3).
const F_MAC: u64 = 1 << 5;
/// The device reports link status in its configuration.
const F_STATUS: u64 = 1 << 16;
const RECEIVEQ: u16 = 0;
const TRANSMITQ: u16 = 1;
/// Receive buffers: as many as the device allows, up to the largest queue the core sets up.
const RX_QUEUE_SIZE: u16 = MAX_QUEUE_SIZE;
/// Transmit buffers. Half the receive side: frames leave as soon as the stack makes them, and the
/// device memory region is shared with the other devices.
const TX_QUEUE_SIZE: u16 = 128;
/// `struct virtio_net_hdr` with VIRTIO_F_VERSION_1: flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers.
const HDR_LEN: usize = 12;
/// The largest Ethernet frame without its FCS: 1500 bytes of payload and a 14-byte header.
pub const FRAME_MAX: usize = 1514;
const BUF_LEN: usize = HDR_LEN + FRAME_MAX;
/// Buffers are laid out this far apart in device memory (cache-line aligned).
const SLOT: u64 = 1536;
/// `status` in the device configuration, and its link-up bit.
const CONFIG_MAC: u32 = 0;
const CONFIG_STATUS: u32 = 6;
const STATUS_LINK_UP: u16 = 1;
/// How long a transmit waits for a buffer to come back when all are in flight.
const TX_WAIT_US: u64 = 50;
/// How often the device status is read (each read is an exit to the VMM).
const STATUS_EVERY_MS: u64 = 100;

/// Frames received, receive buffers returned without a frame, frames sent, frames dropped because
/// no transmit buffer came back in time, and transmits the stack was told to retry later for the
/// same reason (TCP keeps the data).
pub static RX_FRAMES: AtomicU64 = AtomicU64::new(0);
pub static RX_EMPTY: AtomicU64 = AtomicU64::new(0);
pub static TX_FRAMES: AtomicU64 = AtomicU64::new(0);
pub static TX_DROPS: AtomicU64 = AtomicU64::new(0);
pub static TX_DEFERRED: AtomicU64 = AtomicU64::new(0);

/// Where the stack builds a frame that has no transmit buffer: it is then dropped.
static SCRATCH: TakeOnce<[u8; FRAME_MAX]> = TakeOnce::new([0; FRAME_MAX]);

/// The receive side: buffers `0..queue.size()` at `bufs + i * SLOT`, and which buffer each
/// descriptor head holds.
struct Rx {
    queue: Queue,
    bufs: u64,
    buf_of: [u16; MAX_QUEUE_SIZE as usize],
    notify: bool,
}

/// The transmit side: buffers `0..queue.size()` at `bufs + i * SLOT`, the free ones on a stack,
/// and which buffer each head in flight holds.
struct Tx {
    queue: Queue,
    bufs: u64,
    buf_of: [u16; MAX_QUEUE_SIZE as usize],
    free: [u16; MAX_QUEUE_SIZE as usize],
    nfree: usize,
    notify: bool,
    /// No buffer came back in time since the last flush: do not wait again until then.
    starved: bool,
    tsc_khz: u64,
    scratch: &'static mut [u8; FRAME_MAX],
}

/// A started virtio-net device.
pub struct Nic {
    device: Device,
    rx: Rx,
    tx: Tx,
    pub mac: [u8; 6],
    /// Whether the MAC came from the device (not made up here).
    pub mac_from_device: bool,
    /// Link status, if the device reports it.
    pub link_up: Option<bool>,
    next_status: u64,
    tsc_khz: u64,
}

/// Finds and starts the device (run once, by vCPU 0); on failure, the exit status to report.
/// Not inlined, so that its locals are off the stack before the caller builds its own.
#[inline(never)]
pub fn start(tsc_khz: u64) -> Result<Nic, u32> {
    let Some(pci) = Device::find(VIRTIO_TYPE_NET) else {
        log!(
            "net: no virtio-net device (PCI ID {:04x}:{:04x}) on bus 0",
            VIRTIO_PCI_VENDOR_ID,
            virtio_pci_device_id(VIRTIO_TYPE_NET)
        );
        return Err(EXIT_NO_DEVICE);
    };
    let failed = |e: virtio::Error| {
        log!("net: {pci}: {e}");
        EXIT_DEVICE_FAILED
    };
    let device = Device::new(pci, tsc_khz).map_err(failed)?;
    // Steps 2 to 8 of device initialisation (3.1.1) once the device is reset.
    let (rx, tx, features) = match queues(&device, tsc_khz) {
        Ok(v) => v,
        Err(e) => {
            device.set_failed();
            return Err(failed(e));
        }
    };
    let mut nic = Nic::new(device, rx, tx, features, tsc_khz);
    if nic.mac[0] & 1 != 0 {
        log!("net: {pci}: the device's MAC address {} is a multicast address", Mac(nic.mac));
        nic.device.set_failed();
        return Err(EXIT_DEVICE_FAILED);
    }
    nic.device.driver_ok();
    if let Err(e) = nic.device.check() {
        nic.device.set_failed();
        return Err(failed(e));
    }
    // The device may be told of buffers only once DRIVER_OK is set (3.1.1).
    nic.flush();
    Ok(nic)
}

/// Negotiates features, sets up both queues and their buffers, and places every receive buffer in
/// the receive queue (the device is told at the first flush): the two sides and the accepted
/// features.
fn queues(device: &Device, tsc_khz: u64) -> Result<(Rx, Tx, u64), virtio::Error> {
    let features = device.negotiate(F_MAC | F_STATUS)?;
    let rxq = device.setup_queue(RECEIVEQ, RX_QUEUE_SIZE)?;
    let txq = device.setup_queue(TRANSMITQ, TX_QUEUE_SIZE)?;
    let rx_bufs = dma::alloc(u64::from(rxq.size()) * SLOT, 64).ok_or(virtio::Error::OutOfMemory)?;
    let tx_bufs = dma::alloc(u64::from(txq.size()) * SLOT, 64).ok_or(virtio::Error::OutOfMemory)?;
    let scratch = SCRATCH.take().ok_or(virtio::Error::OutOfMemory)?;
    let mut rx = Rx { queue: rxq, bufs: rx_bufs, buf_of: [0; MAX_QUEUE_SIZE as usize], notify: false };
    for b in 0..rx.queue.size() {
        rx.post(b);
    }
    let tx = Tx {
        nfree: usize::from(txq.size()),
        queue: txq,
        bufs: tx_bufs,
        buf_of: [0; MAX_QUEUE_SIZE as usize],
        free: core::array::from_fn(|i| i as u16),
        notify: false,
        starved: false,
        tsc_khz,
        scratch,
    };
    Ok((rx, tx, features))
}

impl Nic {
    /// Reads the device configuration the features allow: the MAC address (without one, a
    /// locally administered address is made up from the TSC) and the link status.
    fn new(device: Device, rx: Rx, tx: Tx, features: u64, tsc_khz: u64) -> Nic {
        let config_mac = if features & F_MAC != 0 {
            device.read_config(|r| core::array::from_fn(|i| r.read8(CONFIG_MAC + i as u32)))
        } else {
            None
        };
        let link_up = if features & F_STATUS != 0 {
            device.read_config(|r| r.read16(CONFIG_STATUS) & STATUS_LINK_UP != 0)
        } else {
            None
        };
        let made_up = |t: u64| [0x02, 0x53, (t >> 24) as u8, (t >> 16) as u8, (t >> 8) as u8, t as u8];
        let mac = config_mac.unwrap_or_else(|| made_up(io::rdtsc()));
        Nic { device, rx, tx, mac, mac_from_device: config_mac.is_some(), link_up, next_status: 0, tsc_khz }
    }

    /// (receive, transmit) queue sizes.
    pub fn queue_sizes(&self) -> (u16, u16) {
        (self.rx.queue.size(), self.tx.queue.size())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Notifies the device of the buffers placed since the last call, and now and then checks
    /// that it is still live.
    pub fn flush(&mut self) {
        self.rx.flush();
        self.tx.flush();
        let now = io::rdtsc();
        if now >= self.next_status {
            self.next_status = now + STATUS_EVERY_MS * self.tsc_khz;
            if let Err(e) = self.device.check() {
                fail(format_args!("net: {}: {e}", self.device.pci));
            }
        }
    }
}

impl Rx {
    /// Places buffer `b` in the receive queue (the device learns of it at `flush`).
    fn post(&mut self, b: u16) {
        let buf = Buf { addr: self.addr(b), len: BUF_LEN as u32, write: true };
        match self.queue.submit(&[buf]) {
            Ok(head) => self.buf_of[usize::from(head)] = b,
            // There are as many buffers as descriptors, and this one was just returned.
            Err(e) => fail(format_args!("net: receive queue: {e}")),
        }
        self.notify = true;
    }

    fn addr(&self, b: u16) -> u64 {
        self.bufs + u64::from(b) * SLOT
    }

    /// The next frame the device returned: its buffer and the frame's length (header excluded).
    /// A buffer returned with less than a header in it (smpft's device returns a buffer empty when
    /// the frame it had did not fit, e.g. a VLAN-tagged one) is counted and reposted at once.
    fn next(&mut self) -> Option<(u16, usize)> {
        loop {
            let used = match self.queue.try_used() {
                Ok(u) => u?,
                Err(e) => fail(format_args!("net: receive queue: {e}")),
            };
            let (b, len) = (self.buf_of[usize::from(used.head)], used.len as usize);
            if len > BUF_LEN {
                fail(format_args!("net: receive queue: the device wrote {len} bytes into a {BUF_LEN}-byte buffer"));
            }
            if len < HDR_LEN {
                RX_EMPTY.fetch_add(1, Ordering::Relaxed);
                self.post(b);
                continue;
            }
            RX_FRAMES.fetch_add(1, Ordering::Relaxed);
            return Some((b, len - HDR_LEN));
        }
    }

    fn flush(&mut self) {
        if self.notify {
            self.notify = false;
            self.queue.notify();
        }
    }
}

impl Tx {
    /// Takes back every buffer the device has finished with.
    fn reclaim(&mut self) {
        loop {
            match self.queue.try_used() {
                Ok(Some(used)) => {
                    self.free[self.nfree] = self.buf_of[usize::from(used.head)];
                    self.nfree += 1;
                }
                Ok(None) => return,
                Err(e) => fail(format_args!("net: transmit queue: {e}")),
            }
        }
    }

    /// Whether a buffer is free, after reclaiming and, if none is, announcing what is queued and
    /// waiting up to [`TX_WAIT_US`] for the device to return one (once per poll: after a wait in
    /// vain, later calls until the next flush only reclaim).
    fn make_room(&mut self) -> bool {
        if self.nfree == 0 {
            self.reclaim();
        }
        if self.nfree == 0 && !self.starved {
            self.announce();
            let start = io::rdtsc();
            while self.nfree == 0 && io::rdtsc() - start < TX_WAIT_US * self.tsc_khz / 1000 {
                io::cpu_relax();
                self.reclaim();
            }
            self.starved = self.nfree == 0;
        }
        self.nfree != 0
    }

    /// Lets `f` build a `len`-byte frame in a free buffer and queues it; without a free buffer
    /// (or for a frame too long, which the stack never makes) `f` builds it in scratch memory
    /// and the frame is dropped.
    fn send<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        if len > FRAME_MAX || !self.make_room() {
            TX_DROPS.fetch_add(1, Ordering::Relaxed);
            return f(&mut self.scratch[..len.min(FRAME_MAX)]);
        }
        self.nfree -= 1;
        let b = self.free[self.nfree];
        let addr = self.bufs + u64::from(b) * SLOT;
        // SAFETY: buffer `b` is `SLOT` >= HDR_LEN + len bytes of device memory owned by this queue,
        // and free: the device returned it (or never had it), so nothing else reads or writes it.
        let buf = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, HDR_LEN + len) };
        buf[..HDR_LEN].fill(0);
        let r = f(&mut buf[HDR_LEN..]);
        let desc = Buf { addr, len: (HDR_LEN + len) as u32, write: false };
        match self.queue.submit(&[desc]) {
            Ok(head) => self.buf_of[usize::from(head)] = b,
            // There are as many buffers as descriptors, and this one was free.
            Err(e) => fail(format_args!("net: transmit queue: {e}")),
        }
        self.notify = true;
        TX_FRAMES.fetch_add(1, Ordering::Relaxed);
        r
    }

    fn announce(&mut self) {
        if self.notify {
            self.notify = false;
            self.queue.notify();
        }
    }

    fn flush(&mut self) {
        self.announce();
        self.starved = false;
    }
}

/// A received frame, lent to the stack; its buffer goes back to the device when the token is
/// dropped (consumed or not).
pub struct RxToken<'a> {
    rx: &'a mut Rx,
    buf: u16,
    len: usize,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let at = self.rx.addr(self.buf) + HDR_LEN as u64;
        // SAFETY: the device returned this buffer through the used ring (whose index was read with
        // Acquire, after the device's writes) having written HDR_LEN + len <= BUF_LEN bytes; it
        // is reposted only when this token is dropped, after `f`, which cannot keep the slice.
        let frame = unsafe { core::slice::from_raw_parts(at as *const u8, self.len) };
        f(frame)
    }
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        self.rx.post(self.buf);
    }
}

/// Permission to send one frame; the buffer is taken when the frame is built.
pub struct TxToken<'a> {
    tx: &'a mut Tx,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.tx.send(len, f)
    }
}

impl phy::Device for Nic {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    /// The next received frame, and a token for a reply to it (dropped if no transmit buffer is
    /// free by then).
    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let (buf, len) = self.rx.next()?;
        Some((RxToken { rx: &mut self.rx, buf, len }, TxToken { tx: &mut self.tx }))
    }

    /// A token only while a transmit buffer is free: otherwise the stack keeps what it wanted to
    /// send (TCP data stays in the socket) and tries again at the next poll.
    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.tx.make_room() {
            Some(TxToken { tx: &mut self.tx })
        } else {
            TX_DEFERRED.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = FRAME_MAX;
        // Checksums are computed and checked in software: no offload is negotiated.
        caps
    }
}

/// A MAC address, as `52:54:00:12:34:56`.
pub struct Mac(pub [u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}
