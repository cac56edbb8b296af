//! A planned switchover (QMP `x-smpft-switchover`): the VM moves to its standby on purpose, at
//! the cost of one checkpoint rather than a failure timeout and a tie-breaker race.
//!
//! 1. The VM pauses after a final checkpoint (output of every epoch stays held as always).
//! 2. The standby acknowledges it: everything up to it is released, and nothing runs after it.
//! 3. The tie-breaker is handed to the standby: this side records it as the holder at a new
//!    generation, so from here on this copy can never win a claim again.
//! 4. The standby is told (`APP_SWITCHOVER`); it confirms with a claim of that generation, which
//!    it holds already, and goes live from the final checkpoint.
//!
//! Each step's failure leaves one copy running: before step 3 this one (the VM resumes, still
//! protected); after it the standby, even if the message of step 4 is lost (it then claims
//! the generation when this side goes silent, and holds it).

use super::{Flow, Input, PrimaryFt};
use crate::error::error_chain;
use crate::ft::protocol::{Epoch, PrimaryEvent};
use crate::ft::tiebreak::{Outcome as Claim, TieBreakError};
use crate::ft::wire::{self, HandOver};
use crate::vmm::RunningVm;
use qemu_shim::qmp::{QmpError, Reply};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use transport::Message;

/// What a switchover did: the standby runs the VM from `epoch` at `generation`.
#[derive(Debug, Clone)]
pub struct Switched {
    pub epoch: Epoch,
    pub generation: u64,
    /// From the pause before the final checkpoint until the standby was told to go live.
    pub paused: Duration,
    pub standby: String,
}

impl Switched {
    pub fn to_json(&self) -> Value {
        json!({
            "epoch": self.epoch,
            "generation": self.generation,
            "pause-ms": self.paused.as_secs_f64() * 1000.0,
            "standby": self.standby,
        })
    }
}

/// A switchover under way: its QMP reply waits for the machine's verdict.
pub(super) struct PendingSwitchover {
    reply: Reply,
    started: Instant,
    standby: String,
    /// The hand-over being recorded: (final epoch, generation).
    handing: Option<(Epoch, u64)>,
}

impl PrimaryFt {
    /// Starts handing the VM over to the protecting standby; `reply` is answered once the
    /// standby has been told to go live (this copy must then stop without running the VM
    /// again, [`Flow::SwitchedOver`]), or with why not (the VM runs on here, protected).
    /// `return_to` is where this side will wait as a standby, for the new primary to protect
    /// the VM with first.
    pub fn switchover(&mut self, vm: &RunningVm, return_to: Option<String>, reply: Reply) -> Flow {
        if let Err(why) = self.may_switch_over() {
            reply.send(Err(QmpError::generic(why)));
            return Flow::Continue;
        }
        let standby = self.link.as_ref().map(|l| l.peer.to_string()).unwrap_or_default();
        tracing::info!(%standby, "FT: switchover: pausing for the final checkpoint");
        self.return_to = return_to;
        self.last_error = None;
        self.switchover = Some(PendingSwitchover { reply, started: Instant::now(), standby, handing: None });
        self.step(vm, PrimaryEvent::Switchover)
    }

    fn may_switch_over(&self) -> Result<(), String> {
        let Some(link) = &self.link else {
            return Err("the VM is not protected: there is no standby to switch over to".into());
        };
        if self.switchover.is_some() {
            return Err("a switchover is already under way".into());
        }
        if !self.proto.may_switch_over() || self.sync.is_some() {
            return Err(format!(
                "the VM is {}, not protected: a switchover needs a standby in step",
                self.state_name()
            ));
        }
        let version = link.chan.version();
        if version < wire::SWITCHOVER_VERSION {
            return Err(format!(
                "the standby {} speaks FT wire version {version}, which has no planned switchover (version {} \
                 brought it): upgrade the standby, then switch over",
                link.peer,
                wire::SWITCHOVER_VERSION
            ));
        }
        Ok(())
    }

    /// [`crate::ft::protocol::PrimaryAction::HandOver`]: names the standby in the tie-breaker,
    /// in the background; the answer comes back as [`Input::HandedOver`].
    pub(super) fn hand_over(&mut self, vm: &RunningVm, epoch: Epoch, generation: u64) -> Flow {
        let Some(holder) = self.peer_owner.clone() else {
            self.error("switchover: the standby did not say who it is".into());
            return self.step(vm, PrimaryEvent::HandOverFailed);
        };
        if let Some(p) = &mut self.switchover {
            p.handing = Some((epoch, generation));
        }
        let (tiebreak, timeout, tx) = (self.tiebreak.clone(), self.opts.claim_timeout, self.inputs.0.clone());
        let spawned = self.workers.spawn("ft-hand-over", move || {
            let _ = tx.send(Input::HandedOver(tiebreak.hand_over(generation, &holder, timeout)));
        });
        match spawned {
            Ok(()) => Flow::Continue,
            Err(e) => {
                self.error(format!("switchover: cannot start recording the hand-over: {e}"));
                self.step(vm, PrimaryEvent::HandOverFailed)
            }
        }
    }

    /// The hand-over was recorded, or why not.
    pub(super) fn hand_over_recorded(&mut self, vm: &RunningVm, r: Result<Claim, TieBreakError>) -> Flow {
        let event = match r {
            Ok(Claim::Won { .. }) => {
                let (epoch, generation) = self.switchover.as_ref().and_then(|p| p.handing).unwrap_or_default();
                let msg = HandOver { epoch, generation, return_to: self.return_to.clone() };
                if let Some(l) = &self.link {
                    // Lost or not, the hand-over stands: the standby holds the generation.
                    if let Err(e) = l.chan.send(&Message::App { kind: wire::APP_SWITCHOVER, data: msg.encode() }) {
                        tracing::warn!("FT: switchover: telling the standby failed ({e}); it takes over when it notices this side is gone");
                    }
                }
                PrimaryEvent::HandedOver
            }
            Ok(Claim::Lost { generation, holder }) => {
                // A newer generation than this side's: another copy runs the VM.
                self.error(format!("switchover: the tie-breaker is at generation {generation}, held by {holder}"));
                PrimaryEvent::TieBreakLost { generation }
            }
            Err(e) => {
                self.error(format!("switchover: {}", error_chain(&e)));
                PrimaryEvent::HandOverFailed
            }
        };
        self.step(vm, event)
    }

    /// [`crate::ft::protocol::PrimaryAction::SwitchoverEnded`]: the operator's answer.
    pub(super) fn switchover_ended(&mut self, handed_over: bool) -> Flow {
        let Some(p) = self.switchover.take() else {
            return if handed_over { Flow::SwitchedOver } else { Flow::Continue };
        };
        if !handed_over {
            let why = self.last_error.clone().unwrap_or_else(|| {
                "the standby did not acknowledge the final checkpoint in time; the VM runs on here".into()
            });
            p.reply.send(Err(QmpError::generic(why)));
            return Flow::Continue;
        }
        let (epoch, generation) = p.handing.unwrap_or_default();
        let switched = Switched { epoch, generation, paused: p.started.elapsed(), standby: p.standby };
        tracing::info!(
            epoch = switched.epoch,
            generation = switched.generation,
            pause_ms = switched.paused.as_millis() as u64,
            "FT: switched over: the standby {} runs the VM now",
            switched.standby
        );
        p.reply.send(Ok(switched.to_json()));
        Flow::SwitchedOver
    }
}
