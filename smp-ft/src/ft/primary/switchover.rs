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

use super::{Flow, PrimaryFt};
use crate::error::error_chain;
use crate::ft::protocol::{Epoch, PrimaryEvent, PrimaryState};
use crate::ft::tiebreak::Outcome as Claim;
use crate::ft::wire::{self, HandOver};
use crate::vmm::RunningVm;
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

impl PrimaryFt {
    /// Hands the VM over to the protecting standby and returns once it has been told to go live
    /// (this copy must then stop without running the VM again), or why not (the VM runs on here,
    /// protected). `return_to` is where this side will wait as a standby, for the new primary to
    /// protect the VM with first.
    pub fn switchover(&mut self, vm: &RunningVm, return_to: Option<String>) -> Result<Switched, String> {
        let Some(link) = &self.link else {
            return Err("the VM is not protected: there is no standby to switch over to".into());
        };
        if self.proto.state() != PrimaryState::Protected || self.sync.is_some() || self.proto.acked().is_none() {
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
        let standby = link.peer.to_string();
        let started = Instant::now();
        self.return_to = return_to;
        tracing::info!(%standby, "FT: switchover: pausing for the final checkpoint");
        let actions = self.proto.handle(PrimaryEvent::Switchover);
        if self.act(vm, actions) == Flow::Halt {
            return Err("this copy lost the tie-breaker".into());
        }
        // The standby's acknowledgement (it comes within a round trip) moves the machine on.
        let deadline = started + self.opts.channel.silence_timeout * 2;
        while self.proto.state() == PrimaryState::HandingOver && Instant::now() < deadline {
            let (events, _, _) = self.receivers();
            match events.recv_deadline(deadline) {
                Ok(ev) => {
                    if self.on_channel(vm, ev) == Flow::Halt {
                        return Err("this copy lost the tie-breaker".into());
                    }
                }
                Err(_) => break,
            }
        }
        match self.proto.state() {
            PrimaryState::Halted => {
                let switched = Switched {
                    epoch: self.proto.acked().unwrap_or(0),
                    generation: self.proto.generation(),
                    paused: started.elapsed(),
                    standby,
                };
                tracing::info!(
                    epoch = switched.epoch,
                    generation = switched.generation,
                    pause_ms = switched.paused.as_millis() as u64,
                    "FT: switched over: the standby {} runs the VM now",
                    switched.standby
                );
                Ok(switched)
            }
            PrimaryState::HandingOver => {
                let actions = self.proto.handle(PrimaryEvent::HandOverFailed);
                self.act(vm, actions);
                Err("the standby did not acknowledge the final checkpoint in time; the VM runs on here".into())
            }
            _ => Err(self.last_error.clone().unwrap_or_else(|| "the switchover did not complete".into())),
        }
    }

    /// [`crate::ft::protocol::PrimaryAction::CaptureFinal`]: the VM stays paused after it.
    pub(super) fn capture_final(&mut self, vm: &RunningVm, epoch: Epoch) -> Flow {
        if let Err(e) = vm.pause() {
            self.error(format!("switchover: cannot pause the VM: {e}"));
            let actions = self.proto.handle(PrimaryEvent::CaptureFailed { epoch, at: Instant::now() });
            return self.act(vm, actions);
        }
        let flow = self.capture(vm, epoch);
        if self.proto.state() != PrimaryState::HandingOver && self.proto.state() != PrimaryState::Halted {
            vm.resume();
        }
        flow
    }

    /// [`crate::ft::protocol::PrimaryAction::HandOver`]: names the standby in the tie-breaker
    /// and tells it to go live.
    pub(super) fn hand_over(&mut self, vm: &RunningVm, epoch: Epoch, generation: u64) -> Flow {
        let Some(holder) = self.peer_owner.clone() else {
            self.error("switchover: the standby did not say who it is".into());
            let actions = self.proto.handle(PrimaryEvent::HandOverFailed);
            return self.act(vm, actions);
        };
        let event = match self.tiebreak.hand_over(generation, &holder, self.opts.claim_timeout) {
            Ok(Claim::Won { .. }) => {
                let msg = HandOver { epoch, generation, return_to: self.return_to.clone() };
                if let Some(l) = &self.link {
                    // Lost or not, the hand-over stands: the standby holds the generation.
                    if let Err(e) = l.chan.send(&Message::App { kind: wire::APP_SWITCHOVER, data: msg.encode() }) {
                        tracing::warn!("FT: switchover: telling the standby failed ({e}); it takes over when it notices this side is gone");
                    }
                }
                self.switched = true;
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
        let actions = self.proto.handle(event);
        self.act(vm, actions)
    }
}
