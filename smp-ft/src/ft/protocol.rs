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

use std::time::{Duration, Instant};

/// An epoch (checkpoint) number. The first is the synchronising checkpoint that ends the
/// initial copy.
pub type Epoch = u64;

/// The primary's policy: when checkpoints are taken and how many may be in flight. The machine
/// applies it through its timer ([`Primary::poll_timeout`], [`Primary::handle_timeout`]), in the
/// style of quinn-proto: the shell only sleeps until the deadline and carries out the actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryConfig {
    /// A checkpoint every `interval` while protected.
    pub interval: Duration,
    /// When output waits, a checkpoint comes early, but never sooner than this after the last.
    pub min_gap: Duration,
    /// Early means once the guest has paused its output this long (a reply is usually written in
    /// one burst, and splitting it across two checkpoints costs a whole extra round trip)...
    pub output_quiet: Duration,
    /// ...or once the oldest waiting output has waited this long.
    pub output_max_wait: Duration,
    /// At most this many checkpoints captured and not acknowledged; the next one waits for an
    /// acknowledgement (its dirty pages keep accumulating in the log meanwhile).
    pub window: u64,
    /// The initial copy stops iterating once this few dirty pages are left (the final pause
    /// copies them)...
    pub sync_done_pages: u64,
    /// ...or after this many pre-copy rounds (a guest dirtying faster than the link drains).
    pub sync_max_rounds: u32,
}

impl Default for PrimaryConfig {
    fn default() -> Self {
        PrimaryConfig {
            interval: Duration::from_millis(20),
            min_gap: Duration::from_millis(1),
            output_quiet: Duration::from_micros(150),
            output_max_wait: Duration::from_millis(2),
            window: 4,
            sync_done_pages: 256,
            sync_max_rounds: 30,
        }
    }
}

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
    /// A planned switchover: the VM is paused after its final checkpoint, which the standby is
    /// to acknowledge before the tie-breaker is handed to it. Output stays held.
    HandingOver,
    /// The standby lags too far behind for too long (`--ft-max-lag`): taking the tie-breaker
    /// at a new generation while it is still connected, so that once it is dropped no claim of
    /// its own can win. Output stays held.
    Replacing,
    /// The standby went silent; asking the tie-breaker. Output stays held.
    Arbitrating,
    /// Lost the tie-breaker (or was told to stop): the VM must not run.
    Halted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryEvent {
    /// A standby connected and wants the initial copy.
    StandbyAttached,
    /// How many pages are dirty now (the answer to [`PrimaryAction::MeasureDirty`]), disk
    /// blocks to copy counted as pages; `copying` while a disk's first pass is not done (those
    /// rounds do not count towards the limit: the final pause must not copy a whole disk).
    DirtyPending {
        pages: u64,
        copying: bool,
    },
    /// A pre-copy round or the final pause of the initial copy failed: the standby is dropped.
    SyncFailed,
    /// The synchronising checkpoint `epoch` (numbered after the pre-copy rounds; it holds the
    /// whole VM) was captured and is on its way. From here on the standby may hold a complete
    /// copy at any moment, so output is held and silence means arbitration.
    SyncSent {
        epoch: Epoch,
        /// When its pause began.
        at: Instant,
    },
    /// Time for a checkpoint (raised by [`Primary::handle_timeout`]; a shell may raise it too):
    /// taken if protected and the window allows.
    EpochTimer,
    /// The capture asked for by [`PrimaryAction::Capture`] is done; `output` is the output the
    /// guest produced in that epoch, sealed during the pause; `at` is when the pause began.
    Captured {
        epoch: Epoch,
        output: Option<u64>,
        at: Instant,
    },
    /// That capture failed; the epoch stays open and the next attempt comes a whole interval
    /// after `at`.
    CaptureFailed {
        epoch: Epoch,
        at: Instant,
    },
    /// The VM is ending: take a last checkpoint now, whatever the window (its output is the last
    /// to commit).
    Finish,
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
    /// The standby's acknowledgements have lagged beyond the bound for the configured time.
    Lagging,
    /// The operator asked for a planned switchover to the standby.
    Switchover,
    /// The tie-breaker now names the standby at the generation of [`PrimaryAction::HandOver`],
    /// and the standby was told to go live: this copy must never run the VM again.
    HandedOver,
    /// The hand-over could not be made (the tie-breaker unreachable, the message not sent):
    /// this copy keeps the VM, protected.
    HandOverFailed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryAction {
    /// A new standby: the initial copy starts (the shell sets up its progress report).
    StartSync,
    /// Copy memory while the VM runs (every non-zero page if `all`, else the pages dirtied
    /// since the previous round) and send it as pre-copy round `seq`.
    CopyRound { seq: Epoch, all: bool },
    /// Report [`PrimaryEvent::DirtyPending`]: the machine decides whether to copy again.
    MeasureDirty,
    /// The final pause of the initial copy: hold output from here, capture the remaining pages
    /// and the whole machine state as checkpoint `epoch`, send it, report
    /// [`PrimaryEvent::SyncSent`].
    CaptureSync { epoch: Epoch },
    /// Pause, seal the output of epoch `epoch`, capture, resume; report [`PrimaryEvent::Captured`].
    Capture { epoch: Epoch },
    /// Send the captured checkpoint `epoch` to the standby.
    Send { epoch: Epoch },
    /// Let these outputs out, in this order.
    Release { ids: Vec<u64> },
    /// Ask the tie-breaker for the lock, at a generation above any seen.
    Arbitrate { generation: u64 },
    /// Stop the VM now; release nothing more.
    Halt,
    /// Drop the channel to the standby (it is gone or lost).
    DropStandby,
    /// As [`PrimaryAction::Capture`], for the final checkpoint of a switchover: the VM stays
    /// paused after it (resumed, and [`PrimaryEvent::CaptureFailed`] reported, if it fails).
    CaptureFinal { epoch: Epoch },
    /// The standby holds the final checkpoint `epoch`: record the standby as the tie-breaker's
    /// holder at `generation` and tell it to go live; report [`PrimaryEvent::HandedOver`] or
    /// [`PrimaryEvent::HandOverFailed`].
    HandOver { epoch: Epoch, generation: u64 },
    /// Resume the VM paused for a switchover that did not happen.
    ResumeVm,
}

/// Where the initial copy is: the round last sent and the sequence number whose
/// acknowledgement the next step waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SyncProgress {
    round: u32,
    awaiting: Epoch,
    /// [`PrimaryAction::MeasureDirty`] was asked and not yet answered.
    measuring: bool,
}

/// The primary's side of the protocol.
#[derive(Debug, Clone)]
pub struct Primary {
    config: PrimaryConfig,
    state: PrimaryState,
    /// The epoch now running (its checkpoint not yet taken).
    epoch: Epoch,
    /// Highest acknowledged checkpoint.
    acked: Option<Epoch>,
    /// The synchronising checkpoint: the first this standby acknowledges.
    first: Epoch,
    /// A capture asked for and not yet reported.
    capturing: Option<Epoch>,
    /// When the last capture began (the cadence counts from there).
    last_capture: Option<Instant>,
    /// Output waiting to be committed: when its first and its latest byte came.
    output: Option<(Instant, Instant)>,
    /// The initial copy under way.
    sync: Option<SyncProgress>,
    /// Held output, oldest first: (epoch it belongs to, id).
    held: std::collections::VecDeque<(Epoch, u64)>,
    generation: u64,
    /// A switchover's final checkpoint, once asked for.
    final_epoch: Option<Epoch>,
    /// The generation before a claim that may fail without recording anything (a hand-over,
    /// a replacement): restored if it does, so that this side and its standby keep claiming
    /// the same generation on a failure (one ahead, both could win).
    claimed_from: Option<u64>,
}

impl Primary {
    /// A primary running unprotected, with the last tie-breaker generation it knows.
    pub fn new(generation: u64, config: PrimaryConfig) -> Primary {
        Primary {
            config,
            state: PrimaryState::Unprotected,
            epoch: 1,
            acked: None,
            first: 1,
            capturing: None,
            last_capture: None,
            output: None,
            sync: None,
            held: Default::default(),
            generation,
            final_epoch: None,
            claimed_from: None,
        }
    }

    /// Checkpoints captured for the standby (the synchronising one included) and not yet
    /// acknowledged; none without a standby.
    pub fn unacked(&self) -> u64 {
        use PrimaryState as S;
        if !matches!(self.state, S::Protected | S::HandingOver | S::Replacing | S::Arbitrating) {
            return 0;
        }
        let taken = self.epoch - self.first;
        let acked = self.acked.filter(|&a| a >= self.first).map_or(0, |a| a + 1 - self.first);
        taken.saturating_sub(acked)
    }

    /// Tells the machine whether output waits to be committed (first and latest byte).
    pub fn set_output_waiting(&mut self, times: Option<(Instant, Instant)>) {
        self.output = times;
    }

    /// When the next checkpoint is due, if one can be taken: none while not protected, while a
    /// capture is under way, or while the window is full (the next acknowledgement opens it).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state != PrimaryState::Protected || self.capturing.is_some() || self.unacked() >= self.config.window {
            return None;
        }
        let last = self.last_capture?;
        let c = &self.config;
        let mut at = last + c.interval;
        if let Some((first, latest)) = self.output {
            at = at.min((latest + c.output_quiet).min(first + c.output_max_wait).max(last + c.min_gap));
        }
        Some(at)
    }

    /// Fires the timer if it is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<PrimaryAction> {
        match self.poll_timeout() {
            Some(at) if now >= at => self.handle(PrimaryEvent::EpochTimer),
            _ => vec![],
        }
    }

    /// A switchover's final checkpoint, once nothing else is being captured and the window
    /// has room for it.
    fn next_final(&mut self) -> Option<PrimaryAction> {
        let due = self.state == PrimaryState::HandingOver
            && self.final_epoch.is_none()
            && self.capturing.is_none()
            && self.unacked() < self.config.window;
        due.then(|| {
            self.capturing = Some(self.epoch);
            self.final_epoch = Some(self.epoch);
            PrimaryAction::CaptureFinal { epoch: self.epoch }
        })
    }

    fn capture(&mut self) -> Vec<PrimaryAction> {
        self.capturing = Some(self.epoch);
        vec![PrimaryAction::Capture { epoch: self.epoch }]
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
                // Numbers restart with each standby: its first round is 1.
                self.sync = Some(SyncProgress { round: 1, awaiting: 1, measuring: false });
                vec![A::StartSync, A::CopyRound { seq: 1, all: true }]
            }
            (S::Syncing, E::Acked { epoch }) => match &mut self.sync {
                Some(s) if epoch == s.awaiting && self.capturing.is_none() => {
                    s.measuring = true;
                    vec![A::MeasureDirty]
                }
                _ => vec![],
            },
            (S::Syncing, E::DirtyPending { pages, copying }) => {
                let c = &self.config;
                let Some(s) = self.sync.as_mut().filter(|s| s.measuring) else { return vec![] };
                s.measuring = false;
                s.awaiting += 1;
                if copying {
                    vec![A::CopyRound { seq: s.awaiting, all: false }]
                } else if pages > c.sync_done_pages && s.round < c.sync_max_rounds {
                    s.round += 1;
                    vec![A::CopyRound { seq: s.awaiting, all: false }]
                } else {
                    self.capturing = Some(s.awaiting);
                    vec![A::CaptureSync { epoch: s.awaiting }]
                }
            }
            (S::Syncing, E::SyncFailed) => {
                self.state = S::Unprotected;
                self.sync = None;
                self.capturing = None;
                vec![A::DropStandby]
            }
            (S::Syncing, E::SyncSent { epoch, at }) if self.capturing.is_none_or(|c| c == epoch) => {
                self.sync = None;
                self.state = S::Protected;
                self.last_capture = Some(at);
                self.acked = None;
                self.first = epoch;
                self.epoch = epoch + 1;
                self.capturing = None;
                vec![]
            }
            (S::Unprotected | S::Syncing, E::Output { id }) => vec![A::Release { ids: vec![id] }],
            (S::Protected | S::HandingOver | S::Replacing | S::Arbitrating, E::Output { id }) => {
                self.held.push_back((self.epoch, id));
                vec![]
            }
            (S::Protected, E::EpochTimer) if self.capturing.is_none() && self.unacked() < self.config.window => {
                self.capture()
            }
            (S::Protected, E::Finish) if self.capturing.is_none() => self.capture(),
            (_, E::Captured { epoch, output, at }) if self.capturing == Some(epoch) => {
                self.capturing = None;
                self.last_capture = Some(at);
                if !matches!(self.state, S::Protected | S::HandingOver | S::Replacing | S::Arbitrating) {
                    // Protection ended during the capture: nothing to send, nothing to hold.
                    return output.map(|id| vec![A::Release { ids: vec![id] }]).unwrap_or_default();
                }
                if let Some(id) = output {
                    self.held.push_back((epoch, id));
                }
                self.epoch += 1;
                match self.state {
                    S::Protected => vec![A::Send { epoch }],
                    // An ordinary checkpoint was under way when the switchover was asked for:
                    // the final one follows it.
                    S::HandingOver => [A::Send { epoch }].into_iter().chain(self.next_final()).collect(),
                    _ => vec![],
                }
            }
            (_, E::CaptureFailed { epoch, at }) if self.capturing == Some(epoch) => {
                self.capturing = None;
                self.last_capture = Some(at);
                if self.state == S::HandingOver {
                    // The shell resumed the VM; the switchover is off.
                    self.state = S::Protected;
                    self.final_epoch = None;
                }
                vec![]
            }
            (S::Protected, E::Switchover) => {
                self.state = S::HandingOver;
                self.final_epoch = None;
                self.next_final().into_iter().collect()
            }
            (S::HandingOver, E::HandedOver) => {
                // The tie-breaker names the standby: nothing held may go out any more (the
                // standby re-runs from the final checkpoint, whose output is already out).
                self.state = S::Halted;
                self.claimed_from = None;
                self.held.clear();
                vec![]
            }
            (S::HandingOver, E::HandOverFailed) => {
                self.state = S::Protected;
                self.final_epoch = None;
                // Nothing was recorded: the standby still claims the generation this side had.
                self.generation = self.claimed_from.take().unwrap_or(self.generation);
                vec![A::ResumeVm]
            }
            (S::Protected | S::HandingOver | S::Replacing | S::Arbitrating, E::Acked { epoch }) => {
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
                let mut actions = if ids.is_empty() { vec![] } else { vec![A::Release { ids }] };
                actions.extend(self.next_final());
                if self.state == S::HandingOver && self.final_epoch.is_some_and(|f| epoch >= f) {
                    // The standby holds the final state and every output up to it is out.
                    self.claimed_from = Some(self.generation);
                    self.generation += 1;
                    actions.push(A::HandOver { epoch, generation: self.generation });
                }
                actions
            }
            (S::Syncing, E::PeerSilent) => {
                // The standby died before it held anything: nothing to arbitrate.
                self.state = S::Unprotected;
                self.sync = None;
                self.capturing = None;
                vec![A::DropStandby]
            }
            (S::Protected, E::PeerSilent) => {
                self.state = S::Arbitrating;
                self.generation += 1;
                vec![A::DropStandby, A::Arbitrate { generation: self.generation }]
            }
            (S::HandingOver, E::PeerSilent) => {
                // The standby died during the switchover: as in any failure, but the VM paused
                // for the hand-over runs again (its output stays held until the claim is won).
                self.state = S::Arbitrating;
                self.final_epoch = None;
                self.generation += 1;
                vec![A::DropStandby, A::ResumeVm, A::Arbitrate { generation: self.generation }]
            }
            (S::Protected, E::Lagging) => {
                self.state = S::Replacing;
                self.claimed_from = Some(self.generation);
                self.generation += 1;
                vec![A::Arbitrate { generation: self.generation }]
            }
            (S::Replacing, E::TieBreakWon { generation }) if generation == self.generation => {
                // The lagging standby can no longer win a claim: drop it, and what was held
                // for it goes out.
                self.state = S::Unprotected;
                self.claimed_from = None;
                self.acked = None;
                vec![A::DropStandby, self.release_all()]
            }
            (S::Replacing, E::TieBreakUnreachable) => {
                // Without the tie-breaker the standby cannot be dropped safely: keep it, and
                // claim what it would claim.
                self.state = S::Protected;
                self.generation = self.claimed_from.take().unwrap_or(self.generation);
                vec![]
            }
            (S::Replacing, E::PeerSilent) => {
                // It went silent meanwhile: the claim under way decides, as for any failure
                // (the standby's own claim is of the same generation).
                self.state = S::Arbitrating;
                self.claimed_from = None;
                vec![A::DropStandby]
            }
            (S::Arbitrating, E::TieBreakUnreachable) => vec![A::Arbitrate { generation: self.generation }],
            (S::Arbitrating, E::TieBreakWon { generation }) if generation == self.generation => {
                // The standby can no longer go live: what was held can go out.
                self.state = S::Unprotected;
                self.acked = None;
                vec![self.release_all()]
            }
            // A hand-over that finds a newer generation recorded: someone else runs the VM.
            (S::HandingOver | S::Replacing | S::Arbitrating, E::TieBreakLost { generation }) => {
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
    PeerSilent,
    TieBreakWon {
        generation: u64,
    },
    TieBreakLost {
        generation: u64,
    },
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
    /// The last pre-copy round received.
    precopy: Option<Epoch>,
    generation: u64,
}

impl Standby {
    pub fn new(generation: u64) -> Standby {
        Standby { state: StandbyState::Syncing, acked: None, applied: None, precopy: None, generation }
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
                self.state = S::Halted;
                vec![A::Halt]
            }
            (S::Standby, E::PeerSilent) => {
                self.state = S::Arbitrating;
                self.generation += 1;
                vec![A::Arbitrate { generation: self.generation }]
            }
            (S::Standby, E::HandOver { epoch, generation }) if self.acked.is_some_and(|a| a >= epoch) => {
                // No silence to wait for: confirm the hand-over with a claim of the generation
                // the primary recorded for this side (it wins without writing), then go live.
                self.state = S::Arbitrating;
                self.generation = self.generation.max(generation);
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
