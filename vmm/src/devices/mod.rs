//! The platform's devices and the port/MMIO dispatch for vCPU exits.
//!
//! | port            | device                                                     |
//! |-----------------|------------------------------------------------------------|
//! | 0x3f8..=0x3ff   | COM1, a 16550 UART (`serial/`)                             |
//! | 0xe9            | debug console: the guest's log, one byte per write          |
//! | 0xf4            | exit: a 32-bit write ends the VM with that status          |
//! | 0xf5            | idle: a 32-bit write yields the host CPU for up to N µs    |
//! | 0xf6            | power button: reads 1 once a powerdown was requested        |
//! | 0xcf8..=0xcff   | PCI configuration (mechanism #1), `vmm::pci`                |
//! | 0x600, 0x601    | ACPI sleep control/status (a Linux guest's S5 power-off)    |
//! | 0x610           | the Generic Event Device's events (the ACPI power button)   |
//! | 0xcf9 (byte)    | reset control: bit 2 resets the machine (the FADT's reset)  |
//! | 0x80            | POST code / I/O delay: ignored                              |
//!
//! MMIO goes to the PCI bus, which decodes its devices' BARs.

pub mod channel;
pub mod gate;
pub mod observer;
pub mod serial;

use super::component::Component;
use super::irq::Irq;
use super::layout::{COM1_BASE, DEBUGCON_PORT, EXIT_PORT, IDLE_PORT, POWER_PORT};
use super::linux::acpi::{
    GED_IRQ, GED_PORT, GED_POWER_BUTTON, RESET_PORT, S5_SLP_TYP, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT, SLP_EN,
};
use super::memory::{GuestMemory, MemoryError};
use super::net::{tap::Tap, Mac, NetSpec};
use super::pci::PciBus;
use super::virtio::balloon::{Balloon, BalloonSpec};
use super::virtio::disk::DiskIo;
use super::virtio::scsi::{Scsi, ScsiDisk};
use super::virtio::{self, blk::Blk, console::Console as VirtioConsole, net::Net, rng::Rng, VirtioDevice, VirtioPci};
use block::spec::{Bus, DiskSpec};
use block::Backend;
pub use observer::DiskObserver;
use observer::ObserverSlot;
use parking_lot::Mutex;
use serial::SerialDevice;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The POST code / I/O delay port.
const POST_PORT: u16 = 0x80;

/// What a port write asks of the vCPU loop.
#[derive(Debug, PartialEq, Eq)]
pub enum PioAction {
    None,
    /// Nothing to do for up to this many microseconds.
    Idle(u32),
    /// The guest asked to end or reset the VM: its owner was told; the vCPU runs no more
    /// guest code until the owner has acted (paused, reset or stopped the VM).
    AwaitOwner,
}

/// Reset control register bit: reset the CPU (the FADT's reset value sets it).
const RESET_CPU: u8 = 1 << 2;

/// The longest a guest may idle in one call, so a stuck guest stays responsive to the VMM.
const IDLE_MAX_US: u32 = 1_000_000;

/// Where the guest's debug-console lines go.
pub enum Console {
    Stderr,
    File(std::fs::File),
    Discard,
}

struct DebugCon {
    line: Vec<u8>,
    out: Console,
}

impl DebugCon {
    fn byte(&mut self, b: u8) {
        if b != b'\n' && self.line.len() < 4096 {
            self.line.push(b);
            return;
        }
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        match &mut self.out {
            Console::Stderr => {
                let _ = writeln!(std::io::stderr().lock(), "[guest] {line}");
            }
            Console::File(f) => {
                let _ = writeln!(f, "{line}");
            }
            Console::Discard => {}
        }
        tracing::debug!(target: "guest", "{line}");
    }
}

/// Which optional devices the VM has (both copies of a protected VM must agree).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    /// A virtio-rng on the PCI bus.
    pub rng: bool,
    /// A virtio-blk on the PCI bus for each, or a LUN of the one virtio-scsi for those on that
    /// bus (the storage differs between the two copies: only the number of disks, their sizes
    /// and their buses must agree).
    pub disks: Vec<DiskSpec>,
    /// A virtio-net on the PCI bus for each (the taps differ between the two copies; the MAC
    /// travels with the VM's state).
    pub nets: Vec<NetSpec>,
    /// Where devices sit on the PCI bus, where that is given (libvirt's `addr=`); the others
    /// take the next free slots.
    pub slots: PciSlots,
    /// A VM generation ID (ACPI, not PCI): the GUID written at boot, or `auto` for a random
    /// one (see [`crate::vmgenid`]; the GUID lives in guest memory, so copies agree on the
    /// device only).
    pub vmgenid: Option<crate::vmgenid::VmGenId>,
    /// A virtio-balloon on the PCI bus, with its options.
    pub balloon: Option<BalloonSpec>,
    /// A virtio-serial (virtio-console with multiple ports) on the PCI bus, with these ports
    /// (the guest agent's channel). The ports' host sides differ between the two copies; their
    /// numbers and names must agree.
    pub virtio_serial: Option<Vec<channel::ChannelSpec>>,
}

/// PCI slots asked for: one entry per disk and per NIC, in order (`None`: the next free one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PciSlots {
    pub rng: Option<u8>,
    pub disks: Vec<Option<u8>>,
    pub nets: Vec<Option<u8>>,
    pub balloon: Option<u8>,
    pub virtio_serial: Option<u8>,
    /// The virtio-scsi controller (its disks' entries in `disks` do not apply).
    pub scsi: Option<u8>,
}

impl PciSlots {
    /// The slot asked for the device `kind` number `i`.
    fn get(&self, kind: &str, i: usize) -> Option<u8> {
        match kind {
            "rng" => self.rng,
            "balloon" => self.balloon,
            "disk" => self.disks.get(i).copied().flatten(),
            "virtio-serial" => self.virtio_serial,
            "virtio-scsi" => self.scsi,
            _ => self.nets.get(i).copied().flatten(),
        }
    }

    /// Every slot asked for, checked: within the bus, not the host bridge's, not twice.
    fn reserved(&self, names: impl Fn(&str, usize) -> String) -> Result<Vec<u8>, DeviceError> {
        let mut taken: Vec<(u8, String)> = Vec::new();
        let rng = std::iter::once(("rng", 0, &self.rng));
        let asked = rng.chain(self.disks.iter().enumerate().map(|(i, s)| ("disk", i, s)));
        let asked = asked.chain(self.nets.iter().enumerate().map(|(i, s)| ("net", i, s)));
        let asked = asked.chain(std::iter::once(("balloon", 0, &self.balloon)));
        let asked = asked.chain(std::iter::once(("virtio-scsi", 0, &self.scsi)));
        for (kind, i, slot) in asked.chain(std::iter::once(("virtio-serial", 0, &self.virtio_serial))) {
            let Some(slot) = *slot else { continue };
            let name = names(kind, i);
            if slot == 0 || usize::from(slot) >= crate::pci::SLOTS {
                return Err(DeviceError::BadSlot { slot, device: name });
            }
            if let Some((_, other)) = taken.iter().find(|(s, _)| *s == slot) {
                return Err(DeviceError::SlotClash { slot, first: other.clone(), second: name });
            }
            taken.push((slot, name));
        }
        Ok(taken.into_iter().map(|(s, _)| s).collect())
    }
}

impl DeviceConfig {
    /// The optional devices, for messages and for checking that two copies agree.
    pub fn summary(&self) -> String {
        // A slot asked for is part of what the guest sees, so both copies must agree on it.
        let at = |slot: Option<u8>| slot.map_or(String::new(), |s| format!("@{s:02x}"));
        let mut names: Vec<String> = Vec::new();
        if self.rng {
            names.push(format!("virtio-rng{}", at(self.slots.rng)));
        }
        let blk = self.disks.iter().enumerate().filter(|(_, d)| d.bus == Bus::VirtioBlk);
        names.extend(blk.map(|(i, _)| format!("virtio-blk{}", at(self.slots.get("disk", i)))));
        if let Some(luns) = scsi_luns(&self.disks) {
            // The LUNs, and each disk's place among all the disks (the write log numbers them so).
            let luns: Vec<String> = luns.iter().map(|(i, lun)| format!("{lun}:disk{i}")).collect();
            names.push(format!("virtio-scsi{}({})", at(self.slots.scsi), luns.join(",")));
        }
        names.extend((0..self.nets.len()).map(|i| format!("virtio-net{}", at(self.slots.get("net", i)))));
        if self.vmgenid.is_some() {
            names.push("vmgenid".into());
        }
        if let Some(b) = self.balloon {
            let options: String = b.options().iter().map(|o| format!("+{o}")).collect();
            names.push(format!("virtio-balloon{options}{}", at(self.slots.balloon)));
        }
        if let Some(ports) = &self.virtio_serial {
            let ports: Vec<String> = ports.iter().map(|p| format!("{}:{}", p.nr, p.name)).collect();
            names.push(format!("virtio-serial{}({})", at(self.slots.virtio_serial), ports.join(",")));
        }
        if names.is_empty() {
            "none".into()
        } else {
            names.join(",")
        }
    }
}

/// Disk names, in saved state and as the serial number GET_ID reports.
const DISK_NAMES: [&str; 8] = ["disk0", "disk1", "disk2", "disk3", "disk4", "disk5", "disk6", "disk7"];
/// NIC names, in saved state and logs.
const NET_NAMES: [&str; 4] = ["net0", "net1", "net2", "net3"];

pub struct Devices {
    pub serial: Arc<SerialDevice>,
    /// Where all externally visible output passes (held while the VM is protected).
    pub gate: Arc<gate::OutputGate>,
    pci: Arc<PciBus>,
    /// The disks, in order, whichever device serves them, and who watches their changes.
    disks: Vec<Arc<DiskIo>>,
    disk_observer: Arc<ObserverSlot>,
    /// The virtio-blk devices, and the virtio-scsi controller if a disk is on it.
    blks: Vec<Arc<VirtioPci<Blk>>>,
    scsi: Option<Arc<VirtioPci<Scsi>>>,
    /// The NICs, in order.
    nets: Vec<Arc<VirtioPci<Net>>>,
    balloon: Option<Arc<VirtioPci<Balloon>>>,
    /// The virtio-serial device and where each port's output goes.
    virtio_serial: Option<VirtioSerial>,
    /// Every device with replicated state, in pause order (see [`crate::component`]).
    components: Vec<Arc<dyn Component>>,
    debugcon: Mutex<DebugCon>,
    unhandled: AtomicU64,
    /// The power button was pressed (see [`Devices::press_power_button`]).
    power_button: std::sync::atomic::AtomicBool,
    /// Events the Generic Event Device has not yet reported (GED_* bits).
    ged_events: std::sync::atomic::AtomicU8,
    irq: Arc<Irq>,
    /// Where the guest's requests to end or reset the VM go (its owner's event channel, set
    /// when the VM starts).
    events: Mutex<Option<crossbeam_channel::Sender<crate::VmEvent>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Serial(#[from] serial::SerialError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("the PCI BAR window is full")]
    BarWindowFull,
    #[error("the PCI bus is full")]
    BusFull,
    #[error("{device}: PCI slot {slot:#x} does not exist on the bus (1 to 0x1f)")]
    BadSlot { slot: u8, device: String },
    #[error("{first} and {second} are both at PCI slot {slot:#x}")]
    SlotClash { slot: u8, first: String, second: String },
    #[error("at most {} disks", DISK_NAMES.len())]
    TooManyDisks,
    #[error("at most {} network devices", NET_NAMES.len())]
    TooManyNets,
    #[error("cannot set up a network device")]
    Net(#[source] std::io::Error),
    #[error("virtio-serial: {0}")]
    Ports(String),
    #[error("virtio-scsi: {0}")]
    Scsi(String),
    #[error("cannot set up the virtio-serial device")]
    VirtioSerial(#[source] std::io::Error),
}

/// Where a device goes on the bus: the slot asked for, or the next free one not asked for by
/// another device.
#[derive(Clone, Copy)]
struct Place<'a> {
    slot: Option<u8>,
    reserved: &'a [u8],
}

/// Puts a virtio device on the bus with a BAR of its own.
fn add_virtio<D: VirtioDevice + 'static>(
    pci: &mut PciBus,
    name: &'static str,
    device: D,
    place: Place,
    memory: &Arc<GuestMemory>,
    irq: &Arc<Irq>,
) -> Result<Arc<VirtioPci<D>>, DeviceError> {
    let bar = pci.allocate_bar(virtio::BAR_SIZE).ok_or(DeviceError::BarWindowFull)?;
    let dev = VirtioPci::new(name, device, bar, memory.device_view()?, Some(irq.clone()));
    match place.slot {
        Some(slot) if !pci.add_at(dev.clone(), slot) => {
            return Err(DeviceError::BadSlot { slot, device: name.to_string() })
        }
        Some(_) => {}
        None => {
            pci.add(dev.clone(), place.reserved).ok_or(DeviceError::BusFull)?;
        }
    }
    Ok(dev)
}

/// The VM's disks on their devices.
struct DiskDevices {
    /// Every disk, in order.
    all: Vec<Arc<DiskIo>>,
    blks: Vec<Arc<VirtioPci<Blk>>>,
    scsi: Option<Arc<VirtioPci<Scsi>>>,
}

/// The disks on virtio-scsi, as (number among all the disks, LUN): the LUN asked for, else the
/// lowest free one, in order. `None` if no disk is on that bus.
fn scsi_luns(disks: &[DiskSpec]) -> Option<Vec<(usize, u16)>> {
    let units: Vec<(usize, Option<u16>)> = disks
        .iter()
        .enumerate()
        .filter_map(|(i, d)| match &d.bus {
            Bus::Scsi(u) => Some((i, u.lun)),
            Bus::VirtioBlk => None,
        })
        .collect();
    if units.is_empty() {
        return None;
    }
    let mut taken: Vec<u16> = units.iter().filter_map(|(_, lun)| *lun).collect();
    let mut next_free = || {
        let lun = (0..=u16::MAX).find(|l| !taken.contains(l)).unwrap_or(u16::MAX);
        taken.push(lun);
        lun
    };
    Some(units.iter().map(|&(i, lun)| (i, lun.unwrap_or_else(&mut next_free))).collect())
}

/// Puts each disk (`specs` with the storage opened for them) on its device: a virtio-blk of
/// its own, or a LUN of the one virtio-scsi controller, made for the first such disk.
fn add_disks<'r>(
    pci: &mut PciBus,
    (specs, disks): (&[DiskSpec], Vec<Arc<dyn Backend>>),
    observer: &Arc<ObserverSlot>,
    place: &dyn Fn(&str, usize) -> Place<'r>,
    memory: &Arc<GuestMemory>,
    irq: &Arc<Irq>,
) -> Result<DiskDevices, DeviceError> {
    let luns = scsi_luns(specs).unwrap_or_default();
    let (mut all, mut blks, mut units) = (Vec::new(), Vec::new(), Vec::new());
    for (i, disk) in disks.into_iter().enumerate() {
        let name = DISK_NAMES.get(i).copied().ok_or(DeviceError::TooManyDisks)?;
        let Some(&(_, lun)) = luns.iter().find(|(d, _)| *d == i) else {
            let dev =
                add_virtio(pci, name, Blk::new(disk, i as u32, observer.clone(), name), place("disk", i), memory, irq)?;
            all.push(dev.device().io().clone());
            blks.push(dev);
            continue;
        };
        let unit = match specs.get(i).map(|s| &s.bus) {
            Some(Bus::Scsi(u)) => u.clone(),
            _ => Default::default(),
        };
        let io = Arc::new(DiskIo::new(disk, i as u32, name, observer.clone()));
        let serial = unit.device_id.unwrap_or_else(|| name.to_string());
        units.push(ScsiDisk { io: io.clone(), lun, serial, write_cache: unit.write_cache });
        all.push(io);
    }
    let scsi = match units.is_empty() {
        true => None,
        false => {
            let dev = Scsi::new(units, observer.clone()).map_err(DeviceError::Scsi)?;
            Some(add_virtio(pci, "virtio-scsi", dev, place("virtio-scsi", 0), memory, irq)?)
        }
    };
    Ok(DiskDevices { all, blks, scsi })
}

impl Devices {
    /// The platform's devices: COM1, the PCI bus, and the optional devices `config` asks for,
    /// with `disks` the storage opened for `config.disks` and `taps` the taps for `config.nets`.
    pub fn new(
        config: &DeviceConfig,
        disks: Vec<Arc<dyn Backend>>,
        taps: Vec<Arc<Tap>>,
        console: Console,
        memory: &Arc<GuestMemory>,
        irq: &Arc<Irq>,
    ) -> Result<Self, DeviceError> {
        let gate = gate::OutputGate::new();
        let serial = SerialDevice::new(Some(irq.clone()), gate.clone())?;
        let mut pci = PciBus::new();
        let mut on_pci: Vec<Arc<dyn Component>> = Vec::new();
        let name_of = |kind: &str, i: usize| match kind {
            "rng" => "virtio-rng".to_string(),
            "balloon" => "virtio-balloon".to_string(),
            "virtio-serial" => "virtio-serial".to_string(),
            "virtio-scsi" => "virtio-scsi".to_string(),
            "disk" => DISK_NAMES.get(i).map_or_else(|| format!("disk{i}"), |n| n.to_string()),
            _ => NET_NAMES.get(i).map_or_else(|| format!("net{i}"), |n| n.to_string()),
        };
        let reserved = config.slots.reserved(name_of)?;
        let place = |kind: &str, i: usize| Place { slot: config.slots.get(kind, i), reserved: &reserved };
        // The registration list: one line per optional device.
        if config.rng {
            on_pci.push(add_virtio(&mut pci, "virtio-rng", Rng, place("rng", 0), memory, irq)?);
        }
        let disk_observer = Arc::new(ObserverSlot::default());
        let DiskDevices { all: all_disks, blks, scsi } =
            add_disks(&mut pci, (&config.disks, disks), &disk_observer, &place, memory, irq)?;
        on_pci.extend(blks.iter().map(|b| b.clone() as Arc<dyn Component>));
        on_pci.extend(scsi.iter().map(|s| s.clone() as Arc<dyn Component>));
        let mut nets = Vec::new();
        for (i, (tap, spec)) in taps.into_iter().zip(&config.nets).enumerate() {
            let name = NET_NAMES.get(i).copied().ok_or(DeviceError::TooManyNets)?;
            let mac = spec.mac.unwrap_or_else(Mac::random);
            let dev = Net::new(name, tap, mac, gate.clone()).map_err(DeviceError::Net)?;
            let dev = add_virtio(&mut pci, name, dev, place("net", i), memory, irq)?;
            on_pci.push(dev.clone());
            nets.push(dev);
        }
        let balloon = match config.balloon {
            Some(spec) => {
                let dev = Balloon::new(spec, memory.clone());
                let dev = add_virtio(&mut pci, "virtio-balloon", dev, place("balloon", 0), memory, irq)?;
                on_pci.push(dev.clone());
                Some(dev)
            }
            None => None,
        };
        let virtio_serial = match &config.virtio_serial {
            Some(ports) => {
                let (dev, links) = VirtioSerial::create(ports, &gate)?;
                let dev = add_virtio(&mut pci, "virtio-serial", dev, place("virtio-serial", 0), memory, irq)?;
                on_pci.push(dev.clone());
                Some(VirtioSerial { dev, links, ids: ports.iter().map(|p| p.id.clone()).collect() })
            }
            None => None,
        };
        let pci = Arc::new(pci);
        let mut components: Vec<Arc<dyn Component>> = vec![serial.clone(), pci.clone()];
        components.extend(on_pci);
        if config.vmgenid.is_some() {
            components.push(Arc::new(crate::vmgenid::VmGenIdDevice));
        }
        Ok(Devices {
            serial,
            gate,
            pci,
            disks: all_disks,
            disk_observer,
            blks,
            scsi,
            nets,
            balloon,
            virtio_serial,
            components,
            debugcon: Mutex::new(DebugCon { line: Vec::new(), out: console }),
            unhandled: AtomicU64::new(0),
            power_button: std::sync::atomic::AtomicBool::new(false),
            ged_events: std::sync::atomic::AtomicU8::new(0),
            irq: irq.clone(),
            events: Mutex::new(None),
        })
    }

    /// The observer of the disks' changes (see [`DiskObserver`]), `make`'s if none is
    /// installed yet; `None` if one of another type is. Installed once, for the VM's life.
    pub fn disk_observer<O: DiskObserver>(&self, make: impl FnOnce() -> Arc<O>) -> Option<Arc<O>> {
        self.disk_observer.get_or_install(make)
    }

    /// The NICs, in order.
    pub fn nets(&self) -> &[Arc<VirtioPci<Net>>] {
        &self.nets
    }

    /// The balloon, if the VM has one.
    pub fn balloon(&self) -> Option<&Arc<VirtioPci<Balloon>>> {
        self.balloon.as_ref()
    }

    /// The virtio-serial device, if the VM has one.
    pub fn virtio_serial(&self) -> Option<&VirtioSerial> {
        self.virtio_serial.as_ref()
    }

    /// The functions on the PCI bus, as the guest sees them now.
    pub fn pci_functions(&self) -> Vec<crate::pci::PciFunction> {
        self.pci.functions()
    }

    /// What each disk has served, in order.
    pub fn disk_stats(&self) -> Vec<&super::virtio::blk::BlkStats> {
        self.disks.iter().map(|d| d.stats()).collect()
    }

    /// The disks' storage, in order.
    pub fn disk_backends(&self) -> Vec<Arc<dyn Backend>> {
        self.disks.iter().map(|d| d.backend().clone()).collect()
    }

    /// Serves requests a disk left waiting (held by the disks' observer, or restored with
    /// requests pending). The VM owner calls this after each checkpoint and now and then.
    pub fn kick_disks(&self) {
        if self.disk_observer.hold() {
            return;
        }
        for d in &self.blks {
            if d.device().take_deferred() {
                d.process_queue(0);
            }
        }
        if let Some(s) = self.scsi.as_ref().filter(|s| s.device().deferral().take()) {
            s.process_queue(virtio::scsi::REQUEST_QUEUE);
        }
    }

    /// Flushes every disk (the VM is ending), logging failures.
    pub fn flush_disks(&self) {
        for (i, d) in self.disks.iter().enumerate() {
            if let Err(e) = d.backend().flush() {
                tracing::error!("disk{i}: flushing at shutdown failed: {}", block::error_chain(&e));
            }
        }
    }

    /// After a restore: requests made available before the cut are served without waiting for
    /// a notification that already happened.
    pub fn disks_restored(&self) {
        for d in &self.blks {
            d.device().defer();
        }
        if let Some(s) = &self.scsi {
            s.device().deferral().set();
        }
    }

    /// Asks the guest to power down: the test guest reads the button at port 0xf6; a Linux
    /// guest gets the ACPI power button event through the Generic Event Device's interrupt.
    /// Not replicated: a standby that goes live has not had its button pressed.
    pub fn press_power_button(&self) {
        self.power_button.store(true, Ordering::SeqCst);
        self.ged_events.fetch_or(GED_POWER_BUTTON, Ordering::SeqCst);
        self.irq.pulse(GED_IRQ);
    }

    /// Where the guest's requests to end or reset the VM go.
    pub fn send_events_to(&self, events: crossbeam_channel::Sender<crate::VmEvent>) {
        *self.events.lock() = Some(events);
    }

    /// Tells the VM's owner what the guest asked for; the vCPU then waits for it.
    fn tell_owner(&self, event: crate::VmEvent) -> PioAction {
        if let Some(tx) = &*self.events.lock() {
            let _ = tx.send(event);
        }
        PioAction::AwaitOwner
    }

    /// The machine was reset: the buttons are released, no event is pending.
    pub fn reset(&self) {
        self.power_button.store(false, Ordering::SeqCst);
        self.ged_events.store(0, Ordering::SeqCst);
    }

    /// The VM's components, in pause order.
    pub fn components(&self) -> &[Arc<dyn Component>] {
        &self.components
    }

    fn note_unhandled(&self, what: &str, addr: u64) {
        // A guest can hit this in a loop: log the first few, then every 10,000th.
        let n = self.unhandled.fetch_add(1, Ordering::Relaxed);
        if n < 8 || n % 10_000 == 0 {
            tracing::warn!("guest accessed unhandled {what} {addr:#x} ({} such accesses so far)", n + 1);
        }
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if port == RESET_PORT && data.len() == 1 {
            data[0] = 0;
            return;
        }
        if self.pci.pio_read(port, data) {
            return;
        }
        match port {
            COM1_BASE..=0x3ff if data.len() == 1 => data[0] = self.serial.read((port - COM1_BASE) as u8),
            POWER_PORT => {
                data.fill(0);
                data[0] = u8::from(self.power_button.load(Ordering::SeqCst));
            }
            GED_PORT => {
                data.fill(0);
                data[0] = self.ged_events.swap(0, Ordering::SeqCst);
            }
            // The ACPI sleep registers read as zero (never woken); the POST port as nothing.
            SLEEP_CONTROL_PORT | SLEEP_STATUS_PORT | POST_PORT => data.fill(0),
            _ => {
                self.note_unhandled("port read", port.into());
                data.fill(0xff);
            }
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioAction {
        let word = || {
            let mut b = [0u8; 4];
            let n = data.len().min(4);
            b[..n].copy_from_slice(&data[..n]);
            u32::from_le_bytes(b)
        };
        // A byte at 0xcf9 is the reset control register, inside the PCI configuration ports.
        if port == RESET_PORT && data.len() == 1 {
            if data[0] & RESET_CPU == 0 {
                return PioAction::None;
            }
            tracing::info!("the guest asked for a reset");
            return self.tell_owner(crate::VmEvent::Reset);
        }
        if self.pci.pio_write(port, data) {
            return PioAction::None;
        }
        match port {
            COM1_BASE..=0x3ff if data.len() == 1 => self.serial.write((port - COM1_BASE) as u8, data[0]),
            DEBUGCON_PORT => {
                let mut con = self.debugcon.lock();
                for &b in data {
                    con.byte(b);
                }
            }
            EXIT_PORT => return self.tell_owner(crate::VmEvent::GuestExit(word())),
            // ACPI power-off (S5) from a Linux guest: a clean exit, as the test guest's 0.
            SLEEP_CONTROL_PORT if data[0] & SLP_EN != 0 && (data[0] >> 2) & 7 == S5_SLP_TYP => {
                tracing::info!("the guest powered off (ACPI S5)");
                return self.tell_owner(crate::VmEvent::GuestExit(0));
            }
            // Other sleep states are not offered (\_S5 is the only one the DSDT names); port
            // 0x80 is the POST/delay port kernels write to.
            SLEEP_CONTROL_PORT | SLEEP_STATUS_PORT | POST_PORT => {}
            IDLE_PORT => return PioAction::Idle(word().min(IDLE_MAX_US)),
            _ => self.note_unhandled("port write", port.into()),
        }
        PioAction::None
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.pci.mmio_read(addr, data) {
            self.note_unhandled("MMIO read", addr);
            data.fill(0xff);
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.pci.mmio_write(addr, data) {
            self.note_unhandled("MMIO write", addr);
        }
    }
}

/// The virtio-serial device, and where each of its ports' output goes (in port order).
pub struct VirtioSerial {
    pub dev: Arc<VirtioPci<VirtioConsole>>,
    pub links: Vec<Arc<channel::SocketLink>>,
    /// The ports' device ids, in port order.
    pub ids: Vec<String>,
}

impl VirtioSerial {
    fn create(
        ports: &[channel::ChannelSpec],
        gate: &Arc<gate::OutputGate>,
    ) -> Result<(VirtioConsole, Vec<Arc<channel::SocketLink>>), DeviceError> {
        channel::ChannelSpec::check_all(ports).map_err(DeviceError::Ports)?;
        let links: Vec<Arc<channel::SocketLink>> = ports.iter().map(|_| Arc::default()).collect();
        let dyn_links = links.iter().map(|l| l.clone() as Arc<dyn virtio::console::PortLink>).collect();
        let defs = ports.iter().map(channel::ChannelSpec::def).collect();
        let dev =
            VirtioConsole::new("virtio-serial", defs, dyn_links, gate.clone()).map_err(DeviceError::VirtioSerial)?;
        Ok((dev, links))
    }

    /// Each port a guest program opens or closes, as (port index, open): see
    /// [`VirtioConsole::port_events`].
    pub fn port_events(&self) -> crossbeam_channel::Receiver<(usize, bool)> {
        self.dev.device().port_events().clone()
    }

    /// Whether a guest program has port `i` open (QMP's `frontend-open`).
    pub fn guest_open(&self, i: usize) -> bool {
        self.dev.device().guest_open(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_slots_asked_for_are_checked_and_named_in_the_summary() {
        let name = |kind: &str, i: usize| format!("{kind}{i}");
        let slots = PciSlots {
            rng: Some(9),
            disks: vec![Some(7), None],
            nets: vec![Some(3)],
            balloon: Some(4),
            virtio_serial: Some(6),
            scsi: Some(8),
        };
        assert_eq!(slots.reserved(name).unwrap(), vec![9, 7, 3, 4, 8, 6]);
        let clash = PciSlots {
            rng: None,
            disks: vec![Some(5)],
            nets: vec![Some(5)],
            balloon: None,
            virtio_serial: None,
            scsi: None,
        };
        let e = clash.reserved(name).unwrap_err().to_string();
        assert_eq!(e, "disk0 and net0 are both at PCI slot 0x5");
        for bad in [0, 32] {
            let e = PciSlots { disks: vec![Some(bad)], ..Default::default() }.reserved(name).unwrap_err().to_string();
            assert!(e.contains("does not exist on the bus"), "{e}");
        }
        // Both copies of an FT pair must agree on the slots asked for; without any, the
        // summary is what it always was.
        let disk = || "/tmp/d.raw".parse::<DiskSpec>().unwrap();
        let mut c = DeviceConfig { rng: true, disks: vec![disk(), disk()], ..Default::default() };
        assert_eq!(c.summary(), "virtio-rng,virtio-blk,virtio-blk");
        c.slots.disks = vec![Some(7), None];
        c.slots.rng = Some(0x1e);
        assert_eq!(c.summary(), "virtio-rng@1e,virtio-blk@07,virtio-blk");
        // The VM generation ID device is there or not; its GUID is in guest memory.
        c.vmgenid = Some(crate::vmgenid::VmGenId::Auto);
        assert_eq!(c.summary(), "virtio-rng@1e,virtio-blk@07,virtio-blk,vmgenid");
        let other =
            DeviceConfig { vmgenid: Some(crate::vmgenid::VmGenId::Guid(crate::vmgenid::Guid([7; 16]))), ..c.clone() };
        assert_eq!(other.summary(), c.summary());
        c.balloon = Some(BalloonSpec { deflate_on_oom: false, free_page_reporting: true });
        c.slots.balloon = Some(7);
        let e = c.slots.reserved(name).unwrap_err().to_string();
        assert_eq!(e, "disk0 and balloon0 are both at PCI slot 0x7");
        c.slots.balloon = Some(3);
        assert_eq!(c.summary(), "virtio-rng@1e,virtio-blk@07,virtio-blk,vmgenid,virtio-balloon+free-page-reporting@03");
    }

    /// Disks on virtio-scsi share one controller: the LUN asked for, else the lowest free one;
    /// the summary (which both copies of a pair must agree on) names each LUN's disk.
    #[test]
    fn scsi_disks_take_luns_and_show_in_the_summary() {
        let disk = |s: &str| s.parse::<DiskSpec>().unwrap();
        let disks = vec![disk("/a,bus=scsi,lun=1"), disk("/b"), disk("/c,bus=scsi"), disk("/d,bus=scsi")];
        assert_eq!(scsi_luns(&disks), Some(vec![(0, 1), (2, 0), (3, 2)]));
        assert_eq!(scsi_luns(&disks[1..2]), None);
        let mut c = DeviceConfig { disks, ..Default::default() };
        assert_eq!(c.summary(), "virtio-blk,virtio-scsi(1:disk0,0:disk2,2:disk3)");
        c.slots.scsi = Some(5);
        c.slots.disks = vec![None, Some(4), None, None];
        assert_eq!(c.summary(), "virtio-blk@04,virtio-scsi@05(1:disk0,0:disk2,2:disk3)");
    }
}
