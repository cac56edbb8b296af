//! The thread that owns a running VM: it takes VM events (guest exit, vCPU failure, signals) and
//! QMP requests, one at a time, and decides what happens. Nothing else touches the VM.

use crate::error::error_chain;
use crate::ft::primary::{Flow, PrimaryFt};
use crate::qmp::SmpftCommand;
use crate::snapshot::{self, Kind};
use crate::vmm::{RunningVm, VmEvent};
use qemu_shim::qmp::{Command, QmpError, QmpServer, Request};
use serde_json::{json, Map, Value};
use std::time::Instant;

/// Why a VM stopped other than as asked.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("vCPU failed: {0}")]
    Vcpu(String),
    #[error("the VM's event channel closed")]
    EventsClosed,
    #[error("stopping the VM")]
    Stop(#[from] crate::vmm::VmError),
}

/// How a VM's life ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest reported this exit status.
    GuestExit(u32),
    /// A QMP client asked to quit.
    Quit,
    /// The host sent this signal.
    Signal(i32),
    /// This copy lost the FT tie-breaker: the other copy runs the VM.
    Halted,
    /// This copy handed the VM over to its standby (QMP `x-smpft-switchover`); it waits as a
    /// standby at `then_standby` if the command named one.
    SwitchedOver { then_standby: Option<String> },
}

/// Answers QMP commands the runner or the standby does not implement itself (the QEMU
/// persona's: libvirt's questions about the emulator and the VM).
pub trait Extension: Send {
    /// `vm`: the running VM (none on a standby); `pty`: the serial port's terminal, if any.
    /// `None`: not a command this extension knows either.
    fn answer(
        &mut self,
        vm: Option<&RunningVm>,
        pty: Option<&std::path::Path>,
        name: &str,
        args: &Map<String, Value>,
    ) -> Option<Result<Value, QmpError>>;
}

pub struct Runner {
    vm: RunningVm,
    extension: Option<Box<dyn Extension>>,
    /// The snapshots taken through QMP, for increments.
    snapshots: snapshot::Chain,
    qmp: Option<(QmpServer, crossbeam_channel::Receiver<Request>)>,
    ft: Option<PrimaryFt>,
    /// After a switchover, this copy can wait as a standby: by default at this address.
    rejoin: Option<Option<String>>,
    /// The guest powered off and the VM stays stopped until it is reset (`-no-shutdown`).
    powered_off: bool,
}

impl Runner {
    pub fn new(
        vm: RunningVm,
        qmp: Option<(QmpServer, crossbeam_channel::Receiver<Request>)>,
        ft: Option<PrimaryFt>,
    ) -> Self {
        Runner { vm, extension: None, snapshots: snapshot::Chain::default(), qmp, ft, rejoin: None, powered_off: false }
    }

    /// Adds answers for commands the runner does not implement.
    pub fn with_extension(mut self, extension: Box<dyn Extension>) -> Self {
        self.extension = Some(extension);
        self
    }

    fn emit(&self, event: &str, data: Option<Value>) {
        if let Some((server, _)) = &self.qmp {
            server.emit(event, data);
        }
    }

    /// After a switchover this copy can wait as a standby, at `default` unless the command
    /// names an address.
    pub fn can_rejoin(mut self, default: Option<String>) -> Self {
        self.rejoin = Some(default);
        self
    }

    /// Runs until the VM ends; then closes the QMP server, stops the VM and joins its threads.
    /// One event loop serves everything: VM events, QMP, the FT channel and the FT engine's
    /// timers, and, once the VM is ending, the FT engine until its last output is committed.
    pub fn run(mut self) -> Result<Outcome, RunError> {
        let never = crossbeam_channel::never();
        let mut requests = self.qmp.as_ref().map_or(&never, |(_, rx)| rx).clone();
        let mut vm_events = self.vm.events().clone();
        // Set once the VM is ending: the loop serves the FT engine until it has finished.
        let mut ending: Option<Result<Outcome, RunError>> = None;
        // This copy lost the tie-breaker (even while ending): it shows nothing more.
        let mut halted = false;
        let outcome = loop {
            // Disk requests left waiting (the write log was full, or the VM was just restored).
            self.vm.devices().kick_disks();
            // The balloon's statistics buffer goes back each polling interval.
            let balloon = self.vm.devices().balloon().cloned();
            if let Some(b) = &balloon {
                b.tick(Instant::now());
            }
            let balloon_changes = balloon.as_ref().map_or_else(crossbeam_channel::never, |b| b.device().changes());
            let (ft_events, ft_inputs, ft_wake) = match &self.ft {
                Some(ft) => ft.receivers(),
                None => (crossbeam_channel::never(), crossbeam_channel::never(), crossbeam_channel::never()),
            };
            let timeout = self.ft.as_mut().map_or(std::time::Duration::from_secs(3600), |ft| {
                ft.next_deadline().saturating_duration_since(Instant::now())
            });
            let balloon_due = balloon.as_ref().and_then(|b| b.device().due());
            let timeout = balloon_due.map_or(timeout, |t| timeout.min(t.saturating_duration_since(Instant::now())));
            let ports = self.vm.devices().virtio_serial().map_or_else(crossbeam_channel::never, |v| v.port_events());
            let mut flow: Flow;
            let mut ended = None;
            crossbeam_channel::select! {
                recv(ports) -> ev => {
                    flow = self.ft_woke();
                    if let Ok((i, open)) = ev {
                        self.port_changed(i, open);
                    }
                }
                recv(ft_events) -> ev => {
                    flow = self.ft_woke();
                    if let (Ok(ev), Some(ft)) = (ev, &mut self.ft) {
                        flow = flow.and(ft.on_channel(&self.vm, ev));
                    }
                }
                recv(ft_inputs) -> input => {
                    flow = self.ft_woke();
                    if let (Ok(input), Some(ft)) = (input, &mut self.ft) {
                        flow = flow.and(ft.on_input(&self.vm, input));
                    }
                }
                recv(ft_wake) -> _ => flow = self.ft_woke(),
                recv(balloon_changes) -> _ => {
                    flow = self.ft_woke();
                    if let Some(b) = &balloon {
                        self.emit("BALLOON_CHANGE", Some(json!({"actual": b.device().actual()})));
                    }
                }
                default(timeout) => flow = self.ft_woke(),
                recv(vm_events) -> ev => {
                    flow = self.ft_woke();
                    ended = self.vm_event(ev);
                }
                recv(requests) -> req => {
                    flow = self.ft_woke();
                    let Ok(req) = req else { continue };
                    let (f, end) = self.request(req);
                    flow = flow.and(f);
                    ended = end;
                }
            }
            if flow == Flow::Continue {
                if let Some(ft) = &mut self.ft {
                    flow = ft.tick(&self.vm);
                }
            }
            if let Some(end) = ended {
                // The QMP server stops first, whatever ends the VM: a command still waiting
                // gets an error, every client gets its last replies and events (a bounded
                // grace) and is disconnected, and no client can hold up what follows.
                self.stop_qmp();
                requests = crossbeam_channel::never();
                vm_events = crossbeam_channel::never();
                // Protected, the VM's last output is committed first (the loop goes on serving
                // the FT engine until it says so).
                flow = flow.and(self.ft.as_mut().map_or(Flow::Finished, |ft| ft.finish(&self.vm)));
                ending = Some(end);
            }
            match flow {
                Flow::Continue => {}
                Flow::Finished => break ending.take().unwrap_or(Ok(Outcome::Quit)),
                Flow::Halt => {
                    self.emit("SHUTDOWN", Some(json!({"guest": false, "reason": "ft-tie-breaker-lost"})));
                    halted = true;
                    break ending.take().unwrap_or(Ok(Outcome::Halted));
                }
                Flow::SwitchedOver => {
                    self.emit("SHUTDOWN", Some(json!({"guest": false, "reason": "ft-switchover"})));
                    let then_standby = self.ft.as_ref().and_then(|ft| ft.return_to());
                    break Ok(Outcome::SwitchedOver { then_standby });
                }
            }
        };
        self.stop_qmp();
        if let Some(ft) = &mut self.ft {
            match &outcome {
                _ if halted => ft.halt(),
                Ok(Outcome::SwitchedOver { .. }) => ft.switched_over(),
                Ok(o) => ft.finished(&format!("{o:?}")),
                Err(e) => ft.finished(&e.to_string()),
            }
        }
        let Runner { vm, ft, extension, .. } = self;
        drop(extension);
        drop(ft);
        vm.shutdown()?;
        outcome
    }

    /// A guest program opened or closed a virtio-serial port (QEMU's event, which libvirt waits
    /// for before it connects to the guest agent).
    /// The event loop woke: before the handler runs, the FT engine checks whether this copy was
    /// stopped (see `PrimaryFt::woke`), so that the handler's own time is not taken for a stall.
    fn ft_woke(&mut self) -> Flow {
        match &mut self.ft {
            Some(ft) => ft.woke(&self.vm),
            None => Flow::Continue,
        }
    }

    fn port_changed(&self, port: usize, open: bool) {
        let id = self.vm.devices().virtio_serial().and_then(|v| v.ids.get(port).cloned()).unwrap_or_default();
        self.emit("VSERPORT_CHANGE", Some(json!({"id": id, "open": open})));
    }

    fn stop_qmp(&mut self) {
        if let Some((server, rx)) = self.qmp.take() {
            server.stop();
            drop(rx);
        }
    }

    /// An event from the VM: how its life ends, if it does.
    fn vm_event(&mut self, ev: Result<VmEvent, crossbeam_channel::RecvError>) -> Option<Result<Outcome, RunError>> {
        Some(match ev {
            // The exit port may be written again before the VM has stopped.
            Ok(VmEvent::GuestExit(_)) if self.powered_off => return None,
            Ok(VmEvent::GuestExit(status)) if self.vm.no_shutdown() => {
                tracing::info!(status, "the guest powered off; the VM stays stopped until it is reset or ended");
                self.emit("SHUTDOWN", Some(json!({"guest": true, "reason": "guest-shutdown"})));
                if let Err(e) = self.vm.pause() {
                    return Some(Err(RunError::Vcpu(format!("cannot stop the powered-off VM: {e}"))));
                }
                self.emit("STOP", None);
                self.powered_off = true;
                return None;
            }
            Ok(VmEvent::GuestExit(status)) => {
                tracing::info!(status, "guest exited");
                self.emit("SHUTDOWN", Some(json!({"guest": true, "reason": "guest-shutdown"})));
                Ok(Outcome::GuestExit(status))
            }
            Ok(VmEvent::Signal(sig)) => {
                tracing::info!("stopping on signal {sig}");
                self.emit("SHUTDOWN", Some(json!({"guest": false, "reason": "host-signal"})));
                Ok(Outcome::Signal(sig))
            }
            Ok(VmEvent::Reset) if self.vm.no_reboot() => {
                tracing::info!("the guest asked for a reset, and the VM does not reboot (-no-reboot): it ends");
                self.emit("SHUTDOWN", Some(json!({"guest": true, "reason": "guest-reset"})));
                Ok(Outcome::GuestExit(0))
            }
            Ok(VmEvent::Reset) => return self.reset("guest-reset").err().map(Err),
            Ok(VmEvent::VcpuFailed(msg)) => Err(RunError::Vcpu(msg)),
            Err(_) => Err(RunError::EventsClosed),
        })
    }

    /// Resets the VM in place and says so (QMP `RESET`). A VM that cannot be reset (it has
    /// nothing to boot) ends.
    fn reset(&mut self, reason: &str) -> Result<(), RunError> {
        self.vm.reset()?;
        self.powered_off = false;
        self.emit("RESET", Some(json!({"guest": reason == "guest-reset", "reason": reason})));
        Ok(())
    }

    /// A QMP request: answered here, or handed to the FT engine (which answers it later).
    fn request(&mut self, req: Request) -> (Flow, Option<Result<Outcome, RunError>>) {
        let Some(req) = self.forward(req) else { return (Flow::Continue, None) };
        let req = match self.switchover(req) {
            Ok(flow) => return (flow, None),
            Err(req) => req,
        };
        let quit = req.command == Command::Quit;
        let reply = self.execute(&req.command);
        req.reply.send(reply);
        if quit {
            self.emit("SHUTDOWN", Some(json!({"guest": false, "reason": "host-qmp-quit"})));
            return (Flow::Continue, Some(Ok(Outcome::Quit)));
        }
        (Flow::Continue, None)
    }

    /// QMP `x-smpft-switchover`: handed to the FT engine, which answers it when the switchover
    /// is over. Any other request comes back.
    fn switchover(&mut self, req: Request) -> Result<Flow, Request> {
        let Command::Other { name, args } = &req.command else { return Err(req) };
        let Some(Ok(SmpftCommand::Switchover { then_standby })) = SmpftCommand::parse(name, args) else {
            return Err(req);
        };
        let Some(ft) = &mut self.ft else {
            req.reply.send(Err(QmpError::generic(
                "FT is not configured for this VM: there is no standby to switch over to",
            )));
            return Ok(Flow::Continue);
        };
        let then_standby = match (&self.rejoin, then_standby) {
            (None, Some(_)) => {
                req.reply.send(Err(QmpError::generic("this copy cannot wait as a standby after a switchover")));
                return Ok(Flow::Continue);
            }
            (Some(default), asked) => asked.or(default.clone()),
            (None, None) => None,
        };
        Ok(ft.switchover(&self.vm, then_standby, req.reply))
    }

    /// A snapshot of a protected VM is the standby's to write: handed to the FT engine, which
    /// answers it when the standby reports. Anything else comes back to be executed here.
    fn forward(&mut self, req: Request) -> Option<Request> {
        let Some(ft) = self.ft.as_mut().filter(|ft| ft.is_active()) else { return Some(req) };
        let Command::Other { name, args } = &req.command else { return Some(req) };
        match SmpftCommand::parse(name, args) {
            Some(Ok(SmpftCommand::Snapshot { file, incremental })) => {
                ft.forward_snapshot(&file, incremental, req.reply);
                None
            }
            Some(Ok(SmpftCommand::ReleaseSnapshot { file })) => {
                ft.forward_release(&file, req.reply);
                None
            }
            _ => Some(req),
        }
    }

    fn execute(&mut self, command: &Command) -> Result<Value, QmpError> {
        let ft_active = self.ft.as_ref().is_some_and(|ft| ft.is_active());
        match command {
            Command::QueryStatus => {
                let paused = self.vm.is_paused();
                let status = match paused {
                    _ if self.powered_off => "shutdown",
                    true => "paused",
                    false => "running",
                };
                Ok(json!({"status": status, "running": !paused, "singlestep": false}))
            }
            Command::Stop => {
                if !self.vm.is_paused() {
                    self.vm.pause().map_err(|e| QmpError::generic(e.to_string()))?;
                    self.emit("STOP", None);
                }
                Ok(json!({}))
            }
            Command::Cont if self.powered_off => Err(QmpError::generic("Resetting the Virtual Machine is required")),
            Command::Cont => {
                if self.vm.is_paused() {
                    self.vm.resume();
                    self.emit("RESUME", None);
                }
                Ok(json!({}))
            }
            Command::Quit => Ok(json!({})),
            Command::Other { name, .. } if name == "system_reset" => {
                self.reset("host-qmp-system-reset").map(|()| json!({})).map_err(|e| QmpError::generic(error_chain(&e)))
            }
            Command::Other { name, .. } if name == "query-vm-generation-id" => vm_generation_id(&self.vm),
            Command::Other { name, args } => match SmpftCommand::parse(name, args) {
                Some(Ok(c)) => self.smpft(c, ft_active),
                Some(Err(e)) => Err(e),
                None => {
                    if let Some(r) = crate::balloon::answer(&self.vm, name, args) {
                        return r;
                    }
                    let pty = self.vm.serial_pty();
                    let answered =
                        self.extension.as_mut().and_then(|e| e.answer(Some(&self.vm), pty.as_deref(), name, args));
                    // smpft's own monitor names the balloon's QOM path itself.
                    let own_balloon = self.vm.devices().balloon().is_some()
                        && crate::balloon::qom_path(name, args)
                            .is_some_and(|p| crate::balloon::names(&p, crate::balloon::DEFAULT_PATH));
                    match answered {
                        Some(r) => r,
                        None if own_balloon => crate::balloon::qom(Some(&self.vm), name, args),
                        None => Err(qemu_shim::qmp::not_found(name)),
                    }
                }
            },
        }
    }

    /// smpft's own commands, on a VM that runs here.
    fn smpft(&mut self, command: SmpftCommand, ft_active: bool) -> Result<Value, QmpError> {
        match command {
            // Protected, snapshots go to the standby (`forward`); one arriving here raced a
            // standby that just attached, and the VM's own capture would take the dirty log
            // from the checkpoints.
            SmpftCommand::Snapshot { .. } if ft_active => {
                Err(QmpError::generic("a standby is attaching; ask for the snapshot again once the VM is protected"))
            }
            SmpftCommand::Snapshot { file, incremental } => {
                let kind = if incremental { Kind::Incremental } else { Kind::Full };
                let (bytes, t) = self
                    .snapshots
                    .take_to_file(&self.vm, kind, &file)
                    .map_err(|e| QmpError::generic(error_chain(&e)))?;
                Ok(json!({
                    "bytes": bytes,
                    "pages": t.pages,
                    "pause-us": t.total().as_micros() as u64,
                }))
            }
            SmpftCommand::ReleaseSnapshot { .. } => Err(QmpError::generic(
                "the VM is not protected: point-in-time disk exports are made by its standby, and there is none",
            )),
            SmpftCommand::QueryFt => Ok(match &self.ft {
                Some(ft) => ft.query(&self.vm),
                None => json!({"role": "primary", "state": "unprotected", "configured": false}),
            }),
            // Answered by the FT engine once the switchover is over (see `switchover`).
            SmpftCommand::Switchover { .. } => Err(QmpError::generic("a switchover is asked of the FT engine")),
            SmpftCommand::Protect { peer, settings } => {
                if !settings.is_empty() {
                    self.configure_ft(&settings)?;
                }
                match &mut self.ft {
                    Some(ft) => ft
                        .protect(&self.vm, &peer)
                        .map(|()| json!({}))
                        .map_err(|e| QmpError::generic(error_chain(&e))),
                    None => Err(QmpError::generic(
                        "FT is not configured for this VM: start it with --identity, --peer-cert and --tiebreak, or give x-smpft-protect its settings",
                    )),
                }
            }
            SmpftCommand::Unprotect => {
                if let Some(ft) = &mut self.ft {
                    ft.unprotect(&self.vm);
                }
                Ok(json!({}))
            }
        }
    }
}

impl Runner {
    /// Fault tolerance for a VM that runs here, from `settings` (named as in a libvirt domain's
    /// metadata): a new FT engine, with no standby yet. Refused while a standby is attached or
    /// being connected (the settings it was accepted with hold until it is dropped).
    fn configure_ft(&mut self, settings: &std::collections::BTreeMap<String, String>) -> Result<(), QmpError> {
        use crate::config::{FtBuilder, Names, Setting};
        if self.ft.as_ref().is_some_and(|ft| !ft.may_protect()) {
            return Err(QmpError::generic(
                "the VM has a standby or is connecting one: turn protection off (x-smpft-unprotect) before giving new settings",
            ));
        }
        let mut b = FtBuilder::new(Names::Libvirt);
        for (k, v) in settings {
            let setting = Setting::from_libvirt(k)
                .filter(|s| !matches!(s, Setting::Peer | Setting::Listen))
                .ok_or_else(|| QmpError::generic(format!("settings: '{k}' is not a fault tolerance setting")))?;
            b = b.parse(setting, v).map_err(|e| QmpError::generic(error_chain(&e)))?;
        }
        let opts = b.build().map_err(|e| QmpError::generic(error_chain(&e)))?;
        let ft = PrimaryFt::new(opts, &self.vm, Vec::new(), None).map_err(|e| QmpError::generic(error_chain(&e)))?;
        tracing::info!("FT configured through QMP; the VM runs on while a standby is attached");
        self.ft = Some(ft);
        Ok(())
    }
}

/// QMP `query-vm-generation-id`: the GUID the guest sees now, read from its memory (QEMU's
/// answer and error).
fn vm_generation_id(vm: &RunningVm) -> Result<Value, QmpError> {
    if vm.device_config().vmgenid.is_none() {
        return Err(QmpError::generic("VM Generation ID device not found"));
    }
    let guid = crate::vmm::vmgenid::read(vm.memory()).map_err(|e| QmpError::generic(e.to_string()))?;
    Ok(json!({"guid": guid.to_string()}))
}
