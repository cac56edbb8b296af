//! The standby's side of the protocol: what to acknowledge and apply, when to claim the
//! tie-breaker (and claim again), and whether to go live, halt, or stand down and wait for a
//! primary again.

use super::Epoch;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandbyState {
    /// Receiving the initial copy; nothing can go live yet.
    Syncing,
    /// Holding the primary's state as of the last acknowledged checkpoint.
    Standby,
    Arbitrating,
    /// Won the tie-breaker and runs the VM.
    Live,
    /// Lost the tie-breaker and told to halt on a loss (`--ft-halt-on-loss`): the primary runs
    /// the VM, and this copy ends.
    Halted,
    /// The session ended without a state to go live from (or with one this host cannot run):
    /// the copy is discarded, and this standby waits for a primary again.
    StoodDown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StandbyEvent {
    /// Pre-copy round `seq` of the initial copy arrived whole (memory only, valid).
    PreCopy {
        seq: Epoch,
    },
    /// Checkpoint `epoch` arrived whole; `valid` says whether it passed validation.
    Checkpoint {
        epoch: Epoch,
        valid: bool,
    },
    /// Checkpoint `epoch` was applied to the standby's copy.
    Applied {
        epoch: Epoch,
    },
    /// The primary went silent, left, or its channel failed.
    PeerSilent,
    /// This host can no longer run the VM (a resource it needs is gone): it must not claim.
    CannotGoLive,
    TieBreakWon {
        generation: u64,
    },
    TieBreakLost {
        generation: u64,
    },
    /// The tie-breaker could not be reached; the machine asks again later.
    TieBreakUnreachable,
    /// The primary handed the VM over (a planned switchover): it paused after checkpoint
    /// `epoch` and recorded this standby as the tie-breaker's holder at `generation`.
    HandOver {
        epoch: Epoch,
        generation: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StandbyAction {
    Ack {
        epoch: Epoch,
    },
    /// Write pre-copy round `seq`'s memory and disk data into the standby's copy (it was
    /// acknowledged on receipt).
    ApplyPreCopy {
        seq: Epoch,
    },
    /// A pre-copy round where none may come (after the copy was complete, or out of order):
    /// the primary is broken; stand down.
    Refuse {
        seq: Epoch,
    },
    /// Apply the staged checkpoint `epoch` to the standby's memory, vCPU and device state.
    Apply {
        epoch: Epoch,
    },
    /// Throw away a staged checkpoint that failed validation; the primary will time out.
    Discard {
        epoch: Epoch,
    },
    /// Check that this host can still run the VM (report [`StandbyEvent::CannotGoLive`] if
    /// not), then ask the tie-breaker for the lock at `generation` (in the background).
    Arbitrate {
        generation: u64,
    },
    /// Run the VM from the state of checkpoint `epoch` (applying it first if it is still
    /// staged), with the guest TSC carried on, gratuitous ARP sent and outputs opened.
    GoLive {
        epoch: Epoch,
    },
    /// Lost the tie-breaker, told to halt on a loss: end without running the VM.
    Halt,
    /// Discard the copy and wait for a primary again (also after losing the tie-breaker to a
    /// live primary: this copy never ran the VM, and the primary protects it again with it).
    StandDown,
}

/// The standby's side of the protocol.
#[derive(Debug, Clone)]
pub struct Standby {
    state: StandbyState,
    /// The time of the last event or timeout.
    clock: Instant,
    /// Highest checkpoint acknowledged: the state the standby is committed to.
    acked: Option<Epoch>,
    /// Highest checkpoint applied to the copy.
    applied: Option<Epoch>,
    /// The last pre-copy round received.
    precopy: Option<Epoch>,
    generation: u64,
    /// A claim is under way.
    claiming: bool,
    /// When an unreachable tie-breaker is asked again.
    retry_at: Option<Instant>,
    arbitrate_retry: Duration,
    /// A lost claim ends this copy (exit 75) instead of standing it down.
    halt_on_loss: bool,
}

impl Standby {
    /// A standby receiving a new primary's initial copy at `now`, knowing `generation`; an
    /// unreachable tie-breaker is asked again every `arbitrate_retry`.
    pub fn new(generation: u64, arbitrate_retry: Duration, now: Instant) -> Standby {
        Standby {
            state: StandbyState::Syncing,
            clock: now,
            acked: None,
            applied: None,
            precopy: None,
            generation,
            claiming: false,
            retry_at: None,
            arbitrate_retry,
            halt_on_loss: false,
        }
    }

    /// A lost claim halts this copy instead of standing it down to wait for a primary again.
    pub fn halt_on_loss(mut self, halt: bool) -> Standby {
        self.halt_on_loss = halt;
        self
    }

    pub fn state(&self) -> StandbyState {
        self.state
    }

    pub fn acked(&self) -> Option<Epoch> {
        self.acked
    }

    pub fn applied(&self) -> Option<Epoch> {
        self.applied
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// When [`Standby::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.retry_at.filter(|_| self.state == StandbyState::Arbitrating)
    }

    /// Fires the claim's retry if it is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<StandbyAction> {
        self.clock = self.clock.max(now);
        match self.poll_timeout() {
            Some(at) if now >= at => {
                self.retry_at = None;
                self.claim()
            }
            _ => vec![],
        }
    }

    /// As [`Standby::handle`], at `now`.
    pub fn handle_at(&mut self, now: Instant, event: StandbyEvent) -> Vec<StandbyAction> {
        self.clock = self.clock.max(now);
        self.handle(event)
    }

    fn claim(&mut self) -> Vec<StandbyAction> {
        if self.claiming {
            return vec![];
        }
        self.claiming = true;
        vec![StandbyAction::Arbitrate { generation: self.generation }]
    }

    pub fn handle(&mut self, event: StandbyEvent) -> Vec<StandbyAction> {
        use StandbyAction as A;
        use StandbyEvent as E;
        use StandbyState as S;
        match (self.state, event) {
            (S::Halted | S::Live | S::StoodDown, _) => vec![],
            (S::Syncing, E::PreCopy { seq }) if self.precopy.is_none_or(|p| seq > p) => {
                self.precopy = Some(seq);
                // Acknowledged on receipt: the primary reads and sends the next round while this
                // one is written here (nothing can go live from a pre-copy round).
                vec![A::Ack { epoch: seq }, A::ApplyPreCopy { seq }]
            }
            (_, E::PreCopy { seq }) => vec![A::Refuse { seq }],
            (S::Syncing | S::Standby, E::Checkpoint { epoch, valid }) => {
                if !valid || self.acked.is_some_and(|a| epoch <= a) {
                    return vec![A::Discard { epoch }];
                }
                self.acked = Some(epoch);
                // The first complete checkpoint (the synchronising one) makes a whole VM.
                self.state = S::Standby;
                vec![A::Ack { epoch }, A::Apply { epoch }]
            }
            (_, E::Applied { epoch }) => {
                self.applied = Some(self.applied.map_or(epoch, |a| a.max(epoch)));
                vec![]
            }
            (S::Syncing, E::PeerSilent) => {
                // No complete state was ever acknowledged: there is nothing to go live from.
                self.state = S::StoodDown;
                vec![A::StandDown]
            }
            (S::Standby, E::PeerSilent) => {
                self.state = S::Arbitrating;
                self.generation += 1;
                self.claim()
            }
            (S::Standby, E::HandOver { epoch, generation }) if self.acked.is_some_and(|a| a >= epoch) => {
                // No silence to wait for: confirm the hand-over with a claim of the generation
                // the primary recorded for this side (it wins without writing), then go live.
                self.state = S::Arbitrating;
                self.generation = self.generation.max(generation);
                self.claim()
            }
            (_, E::CannotGoLive) => {
                // A copy that cannot go live never claims (its claim could win while the VM
                // then runs nowhere).
                self.state = S::StoodDown;
                vec![A::StandDown]
            }
            (S::Arbitrating, E::TieBreakUnreachable) => {
                self.claiming = false;
                self.retry_at = Some(self.clock + self.arbitrate_retry);
                vec![]
            }
            (S::Arbitrating, E::TieBreakWon { generation }) if generation == self.generation => {
                self.claiming = false;
                self.state = S::Live;
                // Acknowledged means the primary may have released that epoch's output: go
                // live from exactly that state.
                vec![A::GoLive { epoch: self.acked.unwrap_or(0) }]
            }
            (S::Arbitrating, E::TieBreakLost { generation }) => {
                self.claiming = false;
                self.generation = self.generation.max(generation);
                // The primary holds the tie-breaker and runs the VM: this copy never ran it, so
                // a false alarm costs it only its copy; it waits to be protecting again.
                if self.halt_on_loss {
                    self.state = S::Halted;
                    vec![A::Halt]
                } else {
                    self.state = S::StoodDown;
                    vec![A::StandDown]
                }
            }
            _ => vec![],
        }
    }
}
