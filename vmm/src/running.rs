//! Running a VM: its vCPU threads and device I/O threads, and the handle ([`RunningVm`]) that
//! pauses, resumes, captures and stops it.

use crate::control::{self, PauseError, VcpuControl};
use crate::devices::channel::ChannelBackend;
use crate::devices::serial::SerialBackend;
use crate::devices::{DeviceConfig, Devices};
use crate::dirty::DirtyLog;
use crate::memory::GuestMemory;
use crate::state::EarlyStates;
use crate::vcpu::{SignalKick, VcpuEnd};
use crate::{component, net, Vm, VmError};
use crossbeam_channel::{Receiver, Sender};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest wrote its exit status.
    GuestExit(u32),
    /// A vCPU failed; the message says how.
    VcpuFailed(String),
    /// The host asked smpft to stop (signal number).
    Signal(i32),
    /// The guest asked for a reset (the VM goes on: its owner resets it, or ends it if told
    /// not to reboot).
    Reset,
}

impl Vm {
    /// As [`Vm::start`], with every vCPU parked before it runs a single guest instruction (and
    /// every component paused), until [`RunningVm::resume`].
    pub fn start_paused(self) -> Result<RunningVm, VmError> {
        self.parts.control.pause_at_start();
        let running = self.start()?;
        running.pause()?;
        Ok(running)
    }

    /// Starts the serial backend and one thread per vCPU.
    pub fn start(self) -> Result<RunningVm, VmError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let Vm { config, parts, vcpus } = self;
        parts.devices.send_events_to(tx.clone());
        let control = parts.control.clone();
        let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(move || control.input_arrived());
        let serial = SerialBackend::start(parts.serial_host, parts.devices.serial.clone(), wake.clone())?;
        let nets = parts
            .devices
            .nets()
            .iter()
            .map(|n| net::backend::NetBackend::start(n.clone(), wake.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VmError::NetThread)?;
        let channels = match parts.devices.virtio_serial() {
            Some(v) => Some(
                ChannelBackend::start(v.dev.clone(), v.links.clone(), parts.channels, wake.clone())
                    .map_err(VmError::ChannelThread)?,
            ),
            None => None,
        };
        let mut threads = Vec::new();
        for mut v in vcpus {
            let tx: Sender<VmEvent> = tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{}", v.index))
                .spawn(move || {
                    confine::enter(confine::Kind::Vcpu);
                    v.run(|_, end| match end {
                        VcpuEnd::Requested => {}
                        VcpuEnd::Failed(e) => {
                            let _ = tx.send(VmEvent::VcpuFailed(e.to_string()));
                        }
                    })
                })
                .map_err(VmError::Thread)?;
            use std::os::unix::thread::JoinHandleExt;
            parts.kick.set_thread(threads.len(), Some(t.as_pthread_t()));
            threads.push(t);
        }
        Ok(RunningVm {
            threads,
            events: rx,
            sender: tx,
            serial: Some(serial),
            nets,
            channels,
            announcer: Mutex::new(None),
            control: parts.control,
            kick: parts.kick,
            devices: parts.devices,
            vcpu_fds: parts.vcpu_fds,
            early: parts.early,
            dirty: Mutex::new(parts.dirty),
            harvests: AtomicU64::new(0),
            vm: Some(parts.vm),
            memory: parts.memory,
            vcpus: config.vcpus,
            device_config: config.devices.clone(),
            cpuid: parts.cpuid,
            power_on: parts.power_on,
            boot_config: config,
            _kvm: parts._kvm,
        })
    }
}

/// A running VM. Dropping it without [`RunningVm::shutdown`] also stops it.
pub struct RunningVm {
    threads: Vec<JoinHandle<VcpuEnd>>,
    events: Receiver<VmEvent>,
    sender: Sender<VmEvent>,
    serial: Option<SerialBackend>,
    /// The NICs' receive threads.
    nets: Vec<net::backend::NetBackend>,
    /// The virtio-serial ports' host thread.
    channels: Option<ChannelBackend>,
    /// The go-live announcements being sent, and what stops them.
    announcer: Mutex<Option<(shutdown::Shutdown, JoinHandle<()>)>>,
    pub(crate) control: Arc<VcpuControl>,
    kick: Arc<SignalKick>,
    pub(crate) devices: Arc<Devices>,
    pub(crate) vcpu_fds: Vec<Arc<Mutex<VcpuFd>>>,
    pub(crate) early: Arc<EarlyStates>,
    pub(crate) dirty: Mutex<DirtyLog>,
    /// Times the dirty log was harvested (see [`RunningVm::harvests`]).
    pub(crate) harvests: AtomicU64,
    pub(crate) vm: Option<VmFd>,
    pub(crate) memory: Arc<GuestMemory>,
    vcpus: u32,
    device_config: DeviceConfig,
    cpuid: Vec<cpu_model::Leaf>,
    /// What a reset goes back to, and what it boots again.
    pub(crate) power_on: crate::reset::PowerOn,
    pub(crate) boot_config: crate::VmConfig,
    _kvm: Kvm,
}

/// How long a stop may take before smpft gives up on a vCPU thread.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long vCPUs may take to acknowledge a pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl RunningVm {
    pub fn control(&self) -> &Arc<VcpuControl> {
        &self.control
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    pub fn devices(&self) -> &Arc<Devices> {
        &self.devices
    }

    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    /// Whether a reset the guest asks for ends the VM (see [`crate::VmConfig::no_reboot`]).
    pub fn no_reboot(&self) -> bool {
        self.boot_config.no_reboot
    }

    /// Whether a guest that powers off leaves the VM stopped (see
    /// [`crate::VmConfig::no_shutdown`]).
    pub fn no_shutdown(&self) -> bool {
        self.boot_config.no_shutdown
    }

    /// The optional devices the VM was built with.
    pub fn device_config(&self) -> &DeviceConfig {
        &self.device_config
    }

    /// The guest's CPUID before per-vCPU details (its model applied to the host's).
    pub fn guest_cpuid(&self) -> &[cpu_model::Leaf] {
        &self.cpuid
    }

    pub fn vcpu_fds(&self) -> &[Arc<Mutex<VcpuFd>>] {
        &self.vcpu_fds
    }

    pub fn early_states(&self) -> &Arc<EarlyStates> {
        &self.early
    }

    /// Whether the VM is paused (by [`RunningVm::pause`]).
    pub fn is_paused(&self) -> bool {
        self.control.request() == control::Request::Pause
    }

    /// Pauses the VM's parts in order: every vCPU (blocking until all have acknowledged), then
    /// every component in list order (see [`component`]).
    pub fn pause(&self) -> Result<(), PauseError> {
        self.control.pause(PAUSE_TIMEOUT)?;
        for c in self.devices.components() {
            c.pause();
        }
        Ok(())
    }

    /// Resumes in the reverse order of [`RunningVm::pause`].
    pub fn resume(&self) {
        for c in self.devices.components().iter().rev() {
            c.resume();
        }
        self.control.resume();
    }

    /// A sender other parts (signal handling, control sockets) use to stop the VM.
    pub fn event_sender(&self) -> Sender<VmEvent> {
        self.sender.clone()
    }

    /// The events the VM reports (guest exit, vCPU failure, signals sent through
    /// [`RunningVm::event_sender`]).
    pub fn events(&self) -> &Receiver<VmEvent> {
        &self.events
    }

    /// Waits for the next event, up to `timeout` if given.
    pub fn wait_event(&self, timeout: Option<Duration>) -> Option<VmEvent> {
        match timeout {
            Some(t) => self.events.recv_timeout(t).ok(),
            None => self.events.recv().ok(),
        }
    }

    /// The pseudo-terminal COM1 is connected to, if it is one.
    pub fn serial_pty(&self) -> Option<PathBuf> {
        self.serial.as_ref().and_then(|s| s.pty_path()).map(|p| p.to_path_buf())
    }

    /// The vCPU threads' ids, in vCPU order.
    pub fn vcpu_tids(&self) -> Vec<i32> {
        self.control.tids()
    }

    /// Tells the network this VM's NICs are here now (after a failover): RARP and gratuitous
    /// ARP announcements, a round at once and four more over the next ~350 ms, on a thread of
    /// their own.
    pub fn announce_network(&self) {
        let nets: Vec<_> = self.devices.nets().to_vec();
        if nets.is_empty() {
            return;
        }
        for n in &nets {
            let (mac, ips) = (n.device().mac(), n.device().learned());
            tracing::info!(
                "{}: announcing MAC {mac} and {ips:?} on tap {}",
                component::Component::name(&**n),
                n.device().tap().name()
            );
        }
        let stop = match shutdown::Shutdown::new() {
            Ok(s) => s,
            Err(e) => return tracing::warn!("cannot announce the VM's network addresses: {e}"),
        };
        let until = stop.clone();
        let spawned = std::thread::Builder::new().name("net-announce".into()).spawn(move || {
            confine::enter(confine::Kind::Device);
            for delay in net::announce::SCHEDULE {
                if until.wait_timeout(delay) {
                    return;
                }
                nets.iter().for_each(|n| n.device().announce());
            }
        });
        match spawned {
            Ok(t) => *self.announcer.lock() = Some((stop, t)),
            Err(e) => tracing::warn!("cannot announce the VM's network addresses: {e}"),
        }
    }

    /// Stops every vCPU, joins every thread, and flushes serial output.
    pub fn shutdown(mut self) -> Result<(), VmError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), VmError> {
        for c in self.devices.components().iter().rev() {
            c.resume();
        }
        self.control.request_exit();
        let exited = self.control.wait_exited(STOP_TIMEOUT);
        if exited {
            for (i, t) in self.threads.drain(..).enumerate() {
                self.kick.set_thread(i, None);
                let _ = t.join();
            }
        }
        if let Some(s) = self.serial.take() {
            s.stop();
        }
        if let Some((stop, t)) = self.announcer.lock().take() {
            stop.fire();
            let _ = t.join();
        }
        self.nets.drain(..).for_each(net::backend::NetBackend::stop);
        if let Some(c) = self.channels.take() {
            c.stop();
        }
        if exited {
            // Whatever the guest wrote reaches stable storage before smpft reports the VM ended.
            self.devices.flush_disks();
        }
        self.vm.take();
        if exited {
            Ok(())
        } else {
            Err(VmError::ExitTimeout(STOP_TIMEOUT))
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if !self.threads.is_empty() || self.serial.is_some() {
            if let Err(e) = self.stop() {
                tracing::error!("stopping the VM: {e}");
            }
        }
    }
}
