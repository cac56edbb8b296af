//! QMP on a standby: what it answers itself (its state, snapshots of its committed copy,
//! `quit`), what it refuses (anything that would run the VM here), and what the extension (the
//! QEMU persona) answers.

use super::{Session, StandbyEnd, StandbyRunner, STANDBY_REFUSES};
use crate::ft::protocol::StandbyState;
use qemu_shim::qmp::{Command, QmpError, Request};
use serde_json::{json, Value};

/// The standby's state name (as `x-smpft-query-ft` and the metrics say it).
pub(super) fn state_name(s: Option<&Session>) -> &'static str {
    match s.map(|s| s.proto.state()) {
        None => "waiting",
        Some(StandbyState::Syncing) => "syncing",
        Some(StandbyState::Standby) => "standby",
        Some(StandbyState::Arbitrating) => "arbitrating",
        Some(StandbyState::Live) => "live-after-failover",
        Some(StandbyState::Halted) => "halted",
        Some(StandbyState::StoodDown) => "waiting",
    }
}

impl StandbyRunner<'_> {
    /// Tells the observer (metrics, event hooks) the state now.
    pub(super) fn publish(&self, s: Option<&Session>, state: &'static str) {
        let peer = s.map(|s| s.peer.to_string());
        crate::observe::get().state(crate::observe::Role::Standby, state, self.generation, peer);
    }

    fn query(&self, s: Option<&Session>) -> Value {
        let state = state_name(s);
        let mut v = json!({
            "role": "standby",
            "state": state,
            "epoch": s.and_then(|s| s.proto.acked()),
            "generation": self.generation,
            "checkpoints": s.map_or(0, |s| s.checkpoints),
            "last-checkpoint-bytes": s.map_or(0, |s| s.last_bytes),
            "peer": s.map(|s| s.peer.to_string()),
            "disk-bytes-received": s.map_or(0, |s| s.disk_bytes),
            "disk-staged-peak-bytes": s.map_or(0, |s| s.disk_peak),
            "detector": s.map(|s| crate::ft::link::detector_json(&s.chan)),
            "tiebreak": self.tiebreak.status().to_json(),
        });
        crate::observe::get().query(&mut v);
        v
    }

    /// Answers QMP on a standby; `Some` when the request ends it (`quit`).
    pub(super) fn qmp_request(&self, req: Request, s: Option<&Session>) -> Option<StandbyEnd> {
        if let Command::Other { name, args } = &req.command {
            if let Some(Ok(crate::qmp::SmpftCommand::ReleaseSnapshot { file })) =
                crate::qmp::SmpftCommand::parse(name, args)
            {
                let released = self.release_exports(Some(&file));
                req.reply.send(Ok(json!({ "released": released })));
                return None;
            }
            if let Some(Ok(crate::qmp::SmpftCommand::Snapshot { file, incremental })) =
                crate::qmp::SmpftCommand::parse(name, args)
            {
                if incremental {
                    req.reply.send(Err(QmpError::generic("a standby writes full snapshots of its committed copy")));
                } else {
                    let reply = req.reply;
                    self.snapshot_committed(s, file, move |r| reply.send(r.map_err(QmpError::generic)));
                }
                return None;
            }
        }
        let quit = req.command == Command::Quit;
        let reply = match &req.command {
            Command::QueryStatus => Ok(json!({"status": "inmigrate", "running": false, "singlestep": false})),
            Command::Quit => Ok(json!({})),
            Command::Other { name, args } => match crate::qmp::SmpftCommand::parse(name, args) {
                Some(Ok(crate::qmp::SmpftCommand::QueryFt)) => Ok(self.query(s)),
                Some(Ok(_)) => Err(QmpError::generic(STANDBY_REFUSES)),
                Some(Err(e)) => Err(e),
                None => {
                    let pty = self.serial_pty();
                    let answer =
                        self.extension.lock().as_mut().and_then(|e| e.answer(None, pty.as_deref(), name, args));
                    answer.unwrap_or_else(|| Err(qemu_shim::qmp::not_found(name)))
                }
            },
            Command::Stop | Command::Cont => Err(QmpError::generic(STANDBY_REFUSES)),
        };
        req.reply.send(reply);
        quit.then_some(StandbyEnd::Quit)
    }
}
