//! virtio-net (device type 1): queue 0 receives, queue 1 transmits, one frame per buffer chain,
//! each preceded by the 12-byte `virtio_net_hdr` (virtio 1.2 §5.1.6). Only the MAC and link
//! status are offered: no checksum or segmentation offloads, no mergeable buffers, no control
//! queue, so every frame is a plain Ethernet frame of at most 1514 bytes (1518 tagged).
//!
//! - **Transmit**: each frame is completed to the guest at once (its ring never stalls) and goes
//!   out through the output gate as one item: while the VM is protected it is held until the
//!   checkpoint of its epoch is acknowledged, then written to the tap in order. Held frames are
//!   bounded by [`HOLD_MAX`]: beyond it a frame is dropped and counted, as a full NIC queue
//!   drops, and the guest's TCP retransmits it; the guest never blocks on the FT channel.
//! - **Receive**: the host's receive thread (`net::backend`) queues frames from the tap and
//!   puts them into buffers the driver made available, marking those pages dirty, so received
//!   frames are inputs carried by the next checkpoint. While the VM is paused (a checkpoint
//!   being captured) frames wait in a bounded queue ([`RX_QUEUE_MAX`]) instead of entering guest
//!   memory; beyond it they are dropped and counted. Frames lost at a failover (received by a
//!   primary after its last acknowledged checkpoint) are repaired by TCP retransmission.
//! - **State**: the MAC (so a standby that goes live keeps the guest's address) and the IPv4
//!   addresses the guest was seen using in its own ARP packets (what it announces on go-live).

use super::{serve_chains, serve_chains_upto, VirtioDevice, VirtioError};
use crate::devices::gate::{OutputGate, OutputPort};
use crate::memory::DeviceMemory;
use crate::net::tap::{Tap, FRAME_MAX};
use crate::net::{announce, Mac};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const F_MAC: u64 = 1 << 5;
pub const F_STATUS: u64 = 1 << 16;
const STATUS_LINK_UP: u16 = 1;
/// `struct virtio_net_hdr` with `num_buffers` (always present with VIRTIO_F_VERSION_1).
pub const HDR_LEN: usize = 12;
const QUEUE_SIZE: u16 = 256;
pub const RX: usize = 0;
pub const TX: usize = 1;
/// Received frames waiting for guest buffers (or for a pause to end), at most.
pub const RX_QUEUE_MAX: usize = 1024;
/// Bytes of output (all devices) the gate may hold before transmitted frames are dropped.
pub const HOLD_MAX: u64 = 16 << 20;
/// Addresses remembered for announcements.
const LEARNED_MAX: usize = 8;

/// Counters, for `query` and the logs.
#[derive(Debug, Default)]
pub struct NetStats {
    pub rx_frames: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub tx_frames: AtomicU64,
    /// Dropped because the gate already held [`HOLD_MAX`] bytes.
    pub tx_dropped_held: AtomicU64,
    /// Dropped because the tap's queue was full (or the tap failed).
    pub tx_dropped_tap: AtomicU64,
}

/// Where released frames go: the tap.
struct TapPort {
    tap: Arc<Tap>,
    stats: Arc<NetStats>,
}

impl OutputPort for TapPort {
    fn deliver(&self, frame: &[u8]) {
        match self.tap.write(frame) {
            Ok(true) => {}
            Ok(false) => {
                self.stats.tx_dropped_tap.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                let n = self.stats.tx_dropped_tap.fetch_add(1, Ordering::Relaxed);
                if n < 4 || n % 10_000 == 0 {
                    tracing::warn!("tap {}: cannot send a frame: {e} ({} dropped so far)", self.tap.name(), n + 1);
                }
            }
        }
    }

    fn is_stream(&self) -> bool {
        false
    }
}

struct Rx {
    pending: VecDeque<Vec<u8>>,
    paused: bool,
}

pub struct Net {
    name: &'static str,
    tap: Arc<Tap>,
    mac: Mutex<Mac>,
    gate: Arc<OutputGate>,
    port: Arc<dyn OutputPort>,
    rx: Mutex<Rx>,
    learned: Mutex<Vec<Ipv4Addr>>,
    stats: Arc<NetStats>,
    /// Tells the receive thread to deliver what waits (the pause ended).
    kick: EventFd,
}

impl Net {
    pub fn new(name: &'static str, tap: Arc<Tap>, mac: Mac, gate: Arc<OutputGate>) -> std::io::Result<Net> {
        let stats = Arc::new(NetStats::default());
        let port: Arc<dyn OutputPort> = Arc::new(TapPort { tap: tap.clone(), stats: stats.clone() });
        Ok(Net {
            name,
            tap,
            mac: Mutex::new(mac),
            gate,
            port,
            rx: Mutex::new(Rx { pending: VecDeque::new(), paused: false }),
            learned: Mutex::new(Vec::new()),
            stats,
            kick: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    pub fn tap(&self) -> &Arc<Tap> {
        &self.tap
    }

    pub fn mac(&self) -> Mac {
        *self.mac.lock()
    }

    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    pub fn kick_event(&self) -> &EventFd {
        &self.kick
    }

    /// A frame from the tap: queued for the guest (dropped and counted if the queue is full).
    pub fn receive(&self, frame: Vec<u8>) {
        let mut rx = self.rx.lock();
        if rx.pending.len() >= RX_QUEUE_MAX {
            drop(rx);
            self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        rx.pending.push_back(frame);
    }

    /// Whether queued frames could enter the guest now.
    pub fn can_deliver(&self) -> bool {
        let rx = self.rx.lock();
        !rx.paused && !rx.pending.is_empty()
    }

    /// Sends one round of go-live announcements straight to the tap (the gate is open by then).
    pub fn announce(&self) {
        let mac = self.mac();
        let mut frames = vec![announce::rarp(mac)];
        frames.extend(self.learned.lock().iter().map(|ip| announce::gratuitous_arp(mac, *ip)));
        for f in frames {
            self.port.deliver(&f);
        }
    }

    /// The addresses the guest was seen using.
    pub fn learned(&self) -> Vec<Ipv4Addr> {
        self.learned.lock().clone()
    }

    fn fill_rx(&self, queue: &mut Queue, mem: &DeviceMemory) -> Result<bool, VirtioError> {
        let mut rx = self.rx.lock();
        if rx.paused {
            return Ok(false);
        }
        let waiting = rx.pending.len();
        serve_chains_upto(queue, mem, waiting, |chain| {
            let head = chain.head_index();
            let frame = rx.pending.pop_front().unwrap_or_default();
            let mut w = chain.writer(&**mem).map_err(|e| VirtioError::Buffer { head, why: e.to_string() })?;
            if w.available_bytes() < HDR_LEN + frame.len() {
                // The driver's buffer cannot hold a whole frame: it is dropped, not cut.
                self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                return Ok(0);
            }
            let mut hdr = [0u8; HDR_LEN];
            hdr[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
            w.write_all(&hdr)
                .and_then(|()| w.write_all(&frame))
                .map_err(|e| VirtioError::Buffer { head, why: e.to_string() })?;
            self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
            Ok((HDR_LEN + frame.len()) as u32)
        })
    }

    fn send_tx(&self, queue: &mut Queue, mem: &DeviceMemory) -> Result<bool, VirtioError> {
        serve_chains(queue, mem, |chain| {
            let head = chain.head_index();
            let bad = |why: String| VirtioError::Buffer { head, why };
            let mut r = chain.reader(&**mem).map_err(|e| bad(e.to_string()))?;
            let len = r.available_bytes();
            if len > HDR_LEN + FRAME_MAX {
                return Err(bad(format!("a transmitted frame of {} bytes exceeds {FRAME_MAX}", len - HDR_LEN)));
            }
            let mut buf = vec![0u8; len];
            r.read_exact(&mut buf).map_err(|e| bad(e.to_string()))?;
            if len < HDR_LEN + 14 {
                // Not even an Ethernet header: nothing to send.
                self.stats.tx_dropped_tap.fetch_add(1, Ordering::Relaxed);
                return Ok(0);
            }
            let frame = &buf[HDR_LEN..];
            self.learn(frame);
            if self.gate.held_bytes() >= HOLD_MAX {
                self.stats.tx_dropped_held.fetch_add(1, Ordering::Relaxed);
                return Ok(0);
            }
            self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
            self.gate.emit(&self.port, frame);
            Ok(0)
        })
    }

    fn learn(&self, frame: &[u8]) {
        if let Some(ip) = announce::arp_sender(frame, self.mac()) {
            let mut l = self.learned.lock();
            if !l.contains(&ip) {
                if l.len() == LEARNED_MAX {
                    l.remove(0);
                }
                l.push(ip);
                tracing::info!("{}: the guest uses {ip}", self.name);
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        boot_abi::VIRTIO_TYPE_NET
    }

    fn features(&self) -> u64 {
        F_MAC | F_STATUS
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&self.mac().0);
        cfg[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn process(&self, index: usize, queue: &mut Queue, mem: &DeviceMemory) -> Result<bool, VirtioError> {
        match index {
            RX => self.fill_rx(queue, mem),
            TX => self.send_tx(queue, mem),
            _ => Ok(false),
        }
    }

    fn reset(&self) {
        self.rx.lock().pending.clear();
    }

    fn pause(&self) {
        // Taking the lock waits for a delivery in progress: nothing enters guest memory after.
        self.rx.lock().paused = true;
    }

    fn resume(&self) {
        self.rx.lock().paused = false;
        let _ = self.kick.write(1);
    }

    fn save(&self) -> Vec<u8> {
        let mut b = self.mac().0.to_vec();
        for ip in self.learned.lock().iter() {
            b.extend_from_slice(&ip.octets());
        }
        b
    }

    fn restore(&self, state: &[u8]) -> Result<(), String> {
        if state.len() < 6 || (state.len() - 6) % 4 != 0 || (state.len() - 6) / 4 > LEARNED_MAX {
            return Err(format!("{}: a state of {} bytes is not a MAC and addresses", self.name, state.len()));
        }
        let mac = Mac(state[..6].try_into().unwrap_or_default());
        let ips = state[6..].chunks(4).map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3])).collect();
        let mut mine = self.mac.lock();
        if *mine != mac {
            tracing::info!("{}: MAC {mac} (the VM's), not {}", self.name, *mine);
        }
        *mine = mac;
        *self.learned.lock() = ips;
        self.rx.lock().pending.clear();
        Ok(())
    }
}
