//! The thread that owns a running VM: it takes VM events (guest exit, vCPU failure, signals) and
//! QMP requests, one at a time, and decides what happens. Nothing else touches the VM.

use crate::snapshot::Kind;
use crate::vmm::{RunningVm, VmEvent};
use qemu_shim::qmp::{Command, QmpError, QmpServer, Request};
use serde_json::{json, Value};

/// How a VM's life ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest reported this exit status.
    GuestExit(u32),
    /// A QMP client asked to quit.
    Quit,
    /// The host sent this signal.
    Signal(i32),
}

pub struct Runner {
    vm: RunningVm,
    qmp: Option<(QmpServer, crossbeam_channel::Receiver<Request>)>,
}

impl Runner {
    pub fn new(vm: RunningVm, qmp: Option<(QmpServer, crossbeam_channel::Receiver<Request>)>) -> Self {
        Runner { vm, qmp }
    }

    fn emit(&self, event: &str, data: Option<Value>) {
        if let Some((server, _)) = &self.qmp {
            server.emit(event, data);
        }
    }

    /// Runs until the VM ends; then stops it, joins its threads and closes the QMP server.
    pub fn run(self) -> Result<Outcome, String> {
        let never = crossbeam_channel::never();
        let requests = self.qmp.as_ref().map_or(&never, |(_, rx)| rx).clone();
        let outcome = loop {
            crossbeam_channel::select! {
                recv(self.vm.events()) -> ev => match ev {
                    Ok(VmEvent::GuestExit(status)) => {
                        tracing::info!(status, "guest exited");
                        self.emit("SHUTDOWN", Some(json!({"guest": true, "reason": "guest-shutdown"})));
                        break Ok(Outcome::GuestExit(status));
                    }
                    Ok(VmEvent::Signal(sig)) => {
                        tracing::info!("stopping on signal {sig}");
                        self.emit("SHUTDOWN", Some(json!({"guest": false, "reason": "host-signal"})));
                        break Ok(Outcome::Signal(sig));
                    }
                    Ok(VmEvent::VcpuFailed(msg)) => break Err(msg),
                    Err(_) => break Err("VM event channel closed".to_string()),
                },
                recv(requests) -> req => {
                    let Ok(req) = req else { continue };
                    let quit = req.command == Command::Quit;
                    let reply = self.execute(&req.command);
                    let _ = req.reply.send(reply);
                    if quit {
                        self.emit("SHUTDOWN", Some(json!({"guest": false, "reason": "host-qmp-quit"})));
                        break Ok(Outcome::Quit);
                    }
                }
            }
        };
        let Runner { vm, qmp } = self;
        let stopped = vm.shutdown().map_err(|e| e.to_string());
        if let Some((server, _)) = qmp {
            server.stop();
        }
        stopped?;
        outcome
    }

    fn execute(&self, command: &Command) -> Result<Value, QmpError> {
        match command {
            Command::QueryStatus => {
                let paused = self.vm.is_paused();
                Ok(
                    json!({"status": if paused { "paused" } else { "running" }, "running": !paused, "singlestep": false}),
                )
            }
            Command::Stop => {
                if !self.vm.is_paused() {
                    self.vm.pause().map_err(|e| QmpError::generic(e.to_string()))?;
                    self.emit("STOP", None);
                }
                Ok(json!({}))
            }
            Command::Cont => {
                if self.vm.is_paused() {
                    self.vm.resume();
                    self.emit("RESUME", None);
                }
                Ok(json!({}))
            }
            Command::Quit => Ok(json!({})),
            Command::Snapshot { file, incremental } => {
                let kind = if *incremental { Kind::Incremental } else { Kind::Full };
                let (bytes, t) =
                    self.vm.snapshot_to_file(kind, file).map_err(|e| QmpError::generic(error_chain(&e)))?;
                Ok(json!({
                    "bytes": bytes,
                    "pages": t.pages,
                    "pause-us": t.total().as_micros() as u64,
                }))
            }
        }
    }
}

/// `outer: inner: innermost`, one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
