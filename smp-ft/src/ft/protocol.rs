//! The SMP-FT protocol as two sans-I/O state machines, [`Primary`] and [`Standby`].
//!
//! Epoch `n` is the interval that checkpoint `n` closes: output the guest produces during it is
//! tagged `n` and held until the standby acknowledges checkpoint `n`, because only then does a
//! state that includes the output's cause survive the loss of the primary. The standby
//! acknowledges a checkpoint once it holds all of it (validated in staging), and from then on it
//! must never go live from an older state.
//!
//! A side that stops hearing from the other may act alone only after winning the tie-breaker
//! (a lock with a generation number on shared storage). The loser halts and releases nothing.
//! So exactly one copy runs live, and every output a client saw is reflected in its state.

/// An epoch (checkpoint) number. The first is the synchronising checkpoint that ends the
/// initial copy.
pub type Epoch = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryState {
    /// No standby: output flows at once.
    Unprotected,
    /// A standby is receiving the initial (pre-)copy; output still flows at once (nothing
    /// survives the primary yet).
    Syncing,
    /// The synchronising checkpoint was sent (not necessarily acknowledged yet: see
    /// [`Primary::acked`]) and checkpoints flow; output is held until acknowledged.
    Protected,
    /// The standby went silent; asking the tie-breaker. Output stays held.
    Arbitrating,
    /// Lost the tie-breaker (or was told to stop): the VM must not run.
    Halted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryEvent {
    /// A standby connected and wants the initial copy.
    StandbyAttached,
    /// The synchronising checkpoint `epoch` (numbered after the pre-copy rounds; it holds the
    /// whole VM) was captured and is on its way. From here on the standby may hold a complete
    /// copy at any moment, so output is held and silence means arbitration.
    SyncSent {
        epoch: Epoch,
    },
    /// Time for a checkpoint (the epoch timer, or early because output is waiting).
    EpochTimer,
    /// The guest produced `id` (an opaque handle to held bytes/frames) in the current epoch.
    Output {
        id: u64,
    },
    /// The standby acknowledged checkpoint `epoch` (acknowledgements are cumulative).
    Acked {
        epoch: Epoch,
    },
    /// Nothing heard from the standby for the configured timeout.
    PeerSilent,
    TieBreakWon {
        generation: u64,
    },
    TieBreakLost {
        generation: u64,
    },
    /// The tie-breaker could not be reached; try again later.
    TieBreakUnreachable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryAction {
    /// Start the live pre-copy to the new standby.
    StartSync,
    /// Pause, capture checkpoint `epoch`, resume, send it.
    TakeCheckpoint { epoch: Epoch },
    /// Let these outputs out, in this order.
    Release { ids: Vec<u64> },
    /// Ask the tie-breaker for the lock, at a generation above any seen.
    Arbitrate { generation: u64 },
    /// Stop the VM now; release nothing more.
    Halt,
    /// Drop the channel to the standby (it is gone or lost).
    DropStandby,
}

/// The primary's side of the protocol.
#[derive(Debug, Clone)]
pub struct Primary {
    state: PrimaryState,
    /// The epoch now running (its checkpoint not yet taken).
    epoch: Epoch,
    /// Highest acknowledged checkpoint.
    acked: Option<Epoch>,
    /// Held output, oldest first: (epoch it belongs to, id).
    held: std::collections::VecDeque<(Epoch, u64)>,
    generation: u64,
}

impl Primary {
    /// A primary running unprotected, with the last tie-breaker generation it knows.
    pub fn new(generation: u64) -> Primary {
        Primary { state: PrimaryState::Unprotected, epoch: 1, acked: None, held: Default::default(), generation }
    }

    pub fn state(&self) -> PrimaryState {
        self.state
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn acked(&self) -> Option<Epoch> {
        self.acked
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn release_all(&mut self) -> PrimaryAction {
        PrimaryAction::Release { ids: self.held.drain(..).map(|(_, id)| id).collect() }
    }

    pub fn handle(&mut self, event: PrimaryEvent) -> Vec<PrimaryAction> {
        use PrimaryAction as A;
        use PrimaryEvent as E;
        use PrimaryState as S;
        match (self.state, event) {
            (S::Halted, _) => vec![],
            (S::Unprotected, E::StandbyAttached) => {
                self.state = S::Syncing;
                vec![A::StartSync]
            }
            (S::Syncing, E::SyncSent { epoch }) => {
                self.state = S::Protected;
                self.acked = None;
                self.epoch = epoch + 1;
                vec![]
            }
            (S::Unprotected | S::Syncing, E::Output { id }) => vec![A::Release { ids: vec![id] }],
            (S::Protected | S::Arbitrating, E::Output { id }) => {
                self.held.push_back((self.epoch, id));
                vec![]
            }
            (S::Protected, E::EpochTimer) => {
                let epoch = self.epoch;
                self.epoch += 1;
                vec![A::TakeCheckpoint { epoch }]
            }
            (S::Protected | S::Arbitrating, E::Acked { epoch }) => {
                // Only checkpoints actually taken can be acknowledged; a late ack for an older
                // one changes nothing.
                if epoch >= self.epoch || self.acked.is_some_and(|a| epoch <= a) {
                    return vec![];
                }
                self.acked = Some(epoch);
                let mut ids = Vec::new();
                while self.held.front().is_some_and(|&(e, _)| e <= epoch) {
                    ids.extend(self.held.pop_front().map(|(_, id)| id));
                }
                if ids.is_empty() {
                    vec![]
                } else {
                    vec![A::Release { ids }]
                }
            }
            (S::Syncing, E::PeerSilent) => {
                // The standby died before it held anything: nothing to arbitrate.
                self.state = S::Unprotected;
                vec![A::DropStandby]
            }
            (S::Protected, E::PeerSilent) => {
                self.state = S::Arbitrating;
                self.generation += 1;
                vec![A::DropStandby, A::Arbitrate { generation: self.generation }]
            }
            (S::Arbitrating, E::TieBreakUnreachable) => vec![A::Arbitrate { generation: self.generation }],
            (S::Arbitrating, E::TieBreakWon { generation }) if generation == self.generation => {
                // The standby can no longer go live: what was held can go out.
                self.state = S::Unprotected;
                self.acked = None;
                vec![self.release_all()]
            }
            (S::Arbitrating, E::TieBreakLost { generation }) => {
                self.generation = self.generation.max(generation);
                self.state = S::Halted;
                self.held.clear();
                vec![A::Halt]
            }
            // Anything else is stale or does not apply in this state.
            _ => vec![],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandbyState {
    /// Receiving the initial copy; nothing can go live yet.
    Syncing,
    /// Holding the primary's state as of the last acknowledged checkpoint.
    Standby,
    Arbitrating,
    /// Won the tie-breaker and runs the VM.
    Live,
    /// Lost, or never had a complete state: must not run.
    Halted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StandbyEvent {
    /// Checkpoint `epoch` arrived whole; `valid` says whether it passed validation.
    Checkpoint {
        epoch: Epoch,
        valid: bool,
    },
    /// Checkpoint `epoch` was applied to the standby's copy.
    Applied {
        epoch: Epoch,
    },
    PeerSilent,
    TieBreakWon {
        generation: u64,
    },
    TieBreakLost {
        generation: u64,
    },
    TieBreakUnreachable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StandbyAction {
    Ack {
        epoch: Epoch,
    },
    /// Apply the staged checkpoint `epoch` to the standby's memory, vCPU and device state.
    Apply {
        epoch: Epoch,
    },
    /// Throw away a staged checkpoint that failed validation; the primary will time out.
    Discard {
        epoch: Epoch,
    },
    Arbitrate {
        generation: u64,
    },
    /// Run the VM from the state of checkpoint `epoch` (applying it first if it is still
    /// staged), with the guest TSC carried on, gratuitous ARP sent and outputs opened.
    GoLive {
        epoch: Epoch,
    },
    Halt,
}

/// The standby's side of the protocol.
#[derive(Debug, Clone)]
pub struct Standby {
    state: StandbyState,
    /// Highest checkpoint acknowledged: the state the standby is committed to.
    acked: Option<Epoch>,
    applied: Option<Epoch>,
    generation: u64,
}

impl Standby {
    pub fn new(generation: u64) -> Standby {
        Standby { state: StandbyState::Syncing, acked: None, applied: None, generation }
    }

    pub fn state(&self) -> StandbyState {
        self.state
    }

    pub fn acked(&self) -> Option<Epoch> {
        self.acked
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn handle(&mut self, event: StandbyEvent) -> Vec<StandbyAction> {
        use StandbyAction as A;
        use StandbyEvent as E;
        use StandbyState as S;
        match (self.state, event) {
            (S::Halted | S::Live, _) => vec![],
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
                self.state = S::Halted;
                vec![A::Halt]
            }
            (S::Standby, E::PeerSilent) => {
                self.state = S::Arbitrating;
                self.generation += 1;
                vec![A::Arbitrate { generation: self.generation }]
            }
            (S::Arbitrating, E::TieBreakUnreachable) => vec![A::Arbitrate { generation: self.generation }],
            (S::Arbitrating, E::TieBreakWon { generation }) if generation == self.generation => {
                self.state = S::Live;
                // Acknowledged means the primary may have released that epoch's output: go
                // live from exactly that state.
                vec![A::GoLive { epoch: self.acked.unwrap_or(0) }]
            }
            (S::Arbitrating, E::TieBreakLost { generation }) => {
                self.generation = self.generation.max(generation);
                self.state = S::Halted;
                vec![A::Halt]
            }
            _ => vec![],
        }
    }
}

#[cfg(test)]
mod tests;
