//! The primary's side of the protocol: when to connect a standby, copy, checkpoint, release
//! output, claim the tie-breaker, hand the VM over and finish. Every timer is the machine's
//! ([`Primary::poll_timeout`], [`Primary::handle_timeout`]); every side effect is an action.

mod events;

pub use events::{LinkState, PrimaryAction, PrimaryConfig, PrimaryEvent, PrimaryState};

use super::Epoch;
use crate::ft::spares::Spares;
use std::time::Instant;

/// Where the initial copy is: the round last sent and the sequence number whose
/// acknowledgement the next step waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SyncProgress {
    round: u32,
    awaiting: Epoch,
    /// [`PrimaryAction::MeasureDirty`] was asked and not yet answered.
    measuring: bool,
}

/// A tie-breaker operation (a claim, or a switchover's hand-over) under way, and whether
/// another claim waits for its answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Claims {
    running: bool,
    /// A claim asked for while one ran: it is made once that one answers, if still wanted.
    queued: bool,
    /// When an unreachable tie-breaker is asked again.
    retry_at: Option<Instant>,
}

/// The VM is ending ([`PrimaryEvent::Finish`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Finishing {
    /// The last checkpoint, once captured; its acknowledgement ends the wait.
    epoch: Option<Epoch>,
    /// When the standby counts as silent if it has not acknowledged it.
    ack_by: Instant,
    /// When an undecided claim gives up (the last output is then never shown).
    give_up_at: Instant,
}

/// The primary's side of the protocol.
#[derive(Debug, Clone)]
pub struct Primary {
    config: PrimaryConfig,
    state: PrimaryState,
    /// The time of the last event or timeout (timers count from it).
    clock: Instant,
    spares: Spares,
    link: LinkState,
    /// When the next standby is tried (while unprotected with no link).
    connect_at: Option<Instant>,
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
    claims: Claims,
    /// A switchover's final checkpoint, once asked for.
    final_epoch: Option<Epoch>,
    /// When a switchover's final checkpoint must be acknowledged by.
    handover_by: Option<Instant>,
    /// The standby went silent while the hand-over was being recorded: arbitrate if it fails.
    silent_during_handover: bool,
    /// The generation before a claim that may fail without recording anything (a hand-over,
    /// a replacement): restored if it does, so that this side and its standby keep claiming
    /// the same generation on a failure (one ahead, both could win).
    claimed_from: Option<u64>,
    finishing: Option<Finishing>,
    /// After a stall ([`PrimaryEvent::Stalled`]): the first checkpoint whose acknowledgement
    /// releases output again.
    release_from: Option<Epoch>,
}

impl Primary {
    /// A primary running unprotected at `now`, with the last tie-breaker generation it knows.
    pub fn new(generation: u64, config: PrimaryConfig, now: Instant) -> Primary {
        Primary {
            config,
            state: PrimaryState::Unprotected,
            clock: now,
            spares: Spares::default(),
            link: LinkState::None,
            connect_at: None,
            epoch: 1,
            acked: None,
            release_from: None,
            first: 1,
            capturing: None,
            last_capture: None,
            output: None,
            sync: None,
            held: Default::default(),
            generation,
            claims: Claims::default(),
            final_epoch: None,
            handover_by: None,
            silent_during_handover: false,
            claimed_from: None,
            finishing: None,
        }
    }

    pub fn config(&self) -> &PrimaryConfig {
        &self.config
    }

    pub fn state(&self) -> PrimaryState {
        self.state
    }

    pub fn link(&self) -> LinkState {
        self.link
    }

    pub fn spares(&self) -> &Spares {
        &self.spares
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

    /// Whether the initial copy is still under way (its checkpoint not yet acknowledged).
    pub fn syncing(&self) -> bool {
        self.state == PrimaryState::Syncing || (self.state == PrimaryState::Protected && self.acked.is_none())
    }

    /// Whether QMP `x-smpft-protect` may name new standbys now.
    pub fn may_protect(&self) -> bool {
        self.state == PrimaryState::Unprotected && self.link == LinkState::None
    }

    /// Whether a switchover may start: protected, in step, with nothing else under way.
    pub fn may_switch_over(&self) -> bool {
        self.state == PrimaryState::Protected && self.acked.is_some() && self.finishing.is_none()
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
    fn checkpoint_due(&self) -> Option<Instant> {
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

    /// When the next spare is tried, if one is to be.
    fn connect_due(&self) -> Option<Instant> {
        let idle = self.state == PrimaryState::Unprotected && self.link == LinkState::None;
        self.connect_at.filter(|_| idle && self.finishing.is_none() && self.spares.current().is_some())
    }

    /// When the switchover's or the ending VM's final acknowledgement is overdue.
    fn ack_due(&self) -> Option<Instant> {
        let handover = self.handover_by.filter(|_| self.state == PrimaryState::HandingOver && !self.claims.running);
        let finish = self.finishing.and_then(|f| match self.state {
            PrimaryState::Protected | PrimaryState::Syncing => Some(f.ack_by),
            PrimaryState::Arbitrating | PrimaryState::Replacing => Some(f.give_up_at),
            _ => None,
        });
        [handover, finish].into_iter().flatten().min()
    }

    /// When [`Primary::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.checkpoint_due(), self.connect_due(), self.claims.retry_at, self.ack_due()].into_iter().flatten().min()
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<PrimaryAction> {
        self.clock = self.clock.max(now);
        let due = |t: Option<Instant>| t.is_some_and(|t| now >= t);
        let mut actions = Vec::new();
        if due(self.connect_due()) {
            actions.extend(self.connect());
        }
        if due(self.ack_due()) {
            actions.extend(self.ack_overdue());
        }
        if due(self.claims.retry_at) {
            self.claims.retry_at = None;
            actions.extend(self.claim());
        }
        if due(self.checkpoint_due()) {
            actions.extend(self.handle(PrimaryEvent::EpochTimer));
        }
        actions
    }

    /// As [`Primary::handle`], at `now`.
    pub fn handle_at(&mut self, now: Instant, event: PrimaryEvent) -> Vec<PrimaryAction> {
        self.clock = self.clock.max(now);
        self.handle(event)
    }

    fn connect(&mut self) -> Vec<PrimaryAction> {
        let Some(peer) = self.spares.current() else { return vec![] };
        self.connect_at = None;
        self.link = LinkState::Connecting;
        vec![PrimaryAction::Connect { peer }]
    }

    /// Asks the tie-breaker, unless a claim is under way (then once it answers).
    fn claim(&mut self) -> Vec<PrimaryAction> {
        if !matches!(self.state, PrimaryState::Arbitrating | PrimaryState::Replacing) {
            return vec![];
        }
        if self.claims.running {
            self.claims.queued = true;
            return vec![];
        }
        self.claims = Claims { running: true, queued: false, retry_at: None };
        vec![PrimaryAction::Arbitrate { generation: self.generation }]
    }

    /// A tie-breaker operation answered: the next one may run.
    fn claim_answered(&mut self) {
        self.claims.running = false;
    }

    /// A claim queued behind the one that answered, if still wanted.
    fn queued_claim(&mut self) -> Vec<PrimaryAction> {
        if std::mem::take(&mut self.claims.queued) {
            self.claim()
        } else {
            vec![]
        }
    }

    /// The standby is gone for good: the next spare is tried after the configured pause.
    fn unlink(&mut self) {
        self.link = LinkState::None;
        self.connect_at = Some(self.clock + self.config.reconnect_after);
    }

    /// No standby any more: what was held goes out, and output flows.
    fn unprotect(&mut self) -> Vec<PrimaryAction> {
        self.state = PrimaryState::Unprotected;
        self.sync = None;
        self.capturing = None;
        self.acked = None;
        self.claimed_from = None;
        let mut actions = vec![self.release_all(), PrimaryAction::StopProtecting];
        actions.extend(self.finished_if_ending());
        actions
    }

    /// [`PrimaryAction::Finished`] if the VM is ending and nothing remains to commit.
    fn finished_if_ending(&mut self) -> Vec<PrimaryAction> {
        match self.finishing {
            Some(_) if !matches!(self.state, PrimaryState::Protected | PrimaryState::HandingOver) => {
                self.finishing = None;
                vec![PrimaryAction::Finished]
            }
            _ => vec![],
        }
    }

    fn ack_overdue(&mut self) -> Vec<PrimaryAction> {
        match self.state {
            PrimaryState::HandingOver => self.handover_failed(),
            // The standby did not confirm the last checkpoint: it may still go live, so only
            // the tie-breaker decides whether the last output may be shown.
            PrimaryState::Protected | PrimaryState::Syncing => self.handle(PrimaryEvent::PeerSilent),
            // No decision in time: the last output is never shown.
            PrimaryState::Arbitrating | PrimaryState::Replacing => self.halt(),
            _ => vec![],
        }
    }

    fn halt(&mut self) -> Vec<PrimaryAction> {
        self.state = PrimaryState::Halted;
        self.held.clear();
        self.claims = Claims::default();
        self.finishing = None;
        vec![PrimaryAction::Halt]
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

    /// The ending VM's last checkpoint, once nothing else is being captured (whatever the
    /// window: its output is the last to commit).
    fn next_last(&mut self) -> Vec<PrimaryAction> {
        match &mut self.finishing {
            Some(f) if f.epoch.is_none() && self.capturing.is_none() && self.state == PrimaryState::Protected => {
                f.epoch = Some(self.epoch);
                self.capture()
            }
            _ => vec![],
        }
    }

    fn capture(&mut self) -> Vec<PrimaryAction> {
        self.capturing = Some(self.epoch);
        vec![PrimaryAction::Capture { epoch: self.epoch }]
    }

    fn release_all(&mut self) -> PrimaryAction {
        self.release_from = None;
        PrimaryAction::Release { ids: self.held.drain(..).map(|(_, id)| id).collect() }
    }

    /// The switchover cannot complete: the VM runs on here, protected.
    fn handover_failed(&mut self) -> Vec<PrimaryAction> {
        self.state = PrimaryState::Protected;
        self.final_epoch = None;
        self.handover_by = None;
        // Nothing was recorded: the standby still claims the generation this side had.
        self.generation = self.claimed_from.take().unwrap_or(self.generation);
        let mut actions = vec![PrimaryAction::ResumeVm, PrimaryAction::SwitchoverEnded { handed_over: false }];
        if std::mem::take(&mut self.silent_during_handover) {
            // The standby went silent meanwhile (already dropped): decide as for any failure.
            self.state = PrimaryState::Arbitrating;
            self.generation += 1;
            actions.extend(self.claim());
        }
        actions.extend(self.next_last());
        actions
    }

    pub fn handle(&mut self, event: PrimaryEvent) -> Vec<PrimaryAction> {
        use PrimaryEvent as E;
        use PrimaryState as S;
        match (self.state, event) {
            (S::Halted | S::SwitchedOver, E::Finish) => vec![PrimaryAction::Finished],
            (S::Halted | S::SwitchedOver, _) => vec![],
            (_, E::Protect { spares, after }) => {
                if self.may_protect() {
                    self.spares.set(spares);
                    self.connect_at = Some(self.clock + after);
                }
                vec![]
            }
            (_, E::Finish) => self.finish(),
            (
                _,
                e @ (E::Connected { .. }
                | E::ConnectFailed { .. }
                | E::Digests { .. }
                | E::DirtyPending { .. }
                | E::SyncFailed
                | E::SyncSent { .. }),
            ) => self.handle_sync(e),
            (_, e @ (E::TieBreakWon { .. } | E::TieBreakLost { .. } | E::TieBreakUnreachable)) => {
                self.claim_answered();
                let mut actions = self.handle_claim(e);
                actions.extend(self.queued_claim());
                actions
            }
            (_, e @ (E::Switchover | E::HandedOver | E::HandOverFailed)) => self.handle_switchover(e),
            (_, E::Unprotect) => self.turn_off(),
            (_, e) => self.handle_running(e),
        }
    }

    /// The operator turned fault tolerance off ([`PrimaryEvent::Unprotect`]).
    fn turn_off(&mut self) -> Vec<PrimaryAction> {
        self.spares.set(Vec::new());
        self.connect_at = None;
        match self.state {
            // Connecting, or a standby that has received nothing yet: dropped at once.
            S::Unprotected | S::Syncing if self.link != LinkState::None => {
                self.unlink();
                let mut actions = vec![PrimaryAction::DropStandby];
                if self.state == S::Syncing {
                    actions.extend(self.unprotect());
                }
                actions
            }
            // It may hold a complete copy: take the tie-breaker above it first (its answer
            // drops it, as for a lagging standby).
            S::Protected if self.finishing.is_none() => {
                self.state = S::Replacing;
                self.claimed_from = Some(self.generation);
                self.generation += 1;
                self.claim()
            }
            // Unprotected already, or a decision under way (arbitration, a replacement, a
            // switchover, the VM ending): it ends as it would, and no spare follows.
            _ => vec![],
        }
    }

    /// The VM is ending.
    fn finish(&mut self) -> Vec<PrimaryAction> {
        let c = &self.config;
        let ack_by = self.clock + c.ack_timeout;
        self.finishing = Some(Finishing { epoch: None, ack_by, give_up_at: ack_by + c.ack_timeout });
        match self.state {
            S::Unprotected => self.finished_if_ending(),
            // Nothing survives this copy yet: its output flows, and the standby is told the VM
            // ended.
            S::Syncing => [PrimaryAction::StopProtecting].into_iter().chain(self.finished_if_ending()).collect(),
            S::Protected => self.next_last(),
            // A claim or a hand-over under way decides first.
            _ => vec![],
        }
    }

    /// Connecting a standby and the initial copy.
    fn handle_sync(&mut self, event: PrimaryEvent) -> Vec<PrimaryAction> {
        use PrimaryAction as A;
        use PrimaryEvent as E;
        match (self.state, event) {
            (S::Unprotected, E::Connected { digests }) if self.link != LinkState::Attached => {
                self.spares.succeeded();
                if digests {
                    self.link = LinkState::Digests;
                    return vec![];
                }
                self.attach()
            }
            (S::Unprotected, E::Digests { valid: true }) if self.link == LinkState::Digests => self.attach(),
            (S::Unprotected, E::Digests { valid: false }) if self.link == LinkState::Digests => {
                self.unlink();
                vec![A::DropStandby]
            }
            (_, E::ConnectFailed { refused }) if self.link == LinkState::Connecting => {
                let backoff = self.spares.failed();
                let wait = if refused { backoff.max(self.config.refused_retry) } else { backoff };
                self.link = LinkState::None;
                self.connect_at = Some(self.clock + wait);
                vec![]
            }
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
                self.unlink();
                let mut actions = vec![A::DropStandby];
                actions.extend(self.unprotect());
                actions
            }
            (S::Syncing, E::SyncSent { epoch, at }) if self.capturing.is_none_or(|c| c == epoch) => {
                self.sync = None;
                self.state = S::Protected;
                self.last_capture = Some(at);
                self.acked = None;
                self.first = epoch;
                self.epoch = epoch + 1;
                self.capturing = None;
                self.next_last()
            }
            _ => vec![],
        }
    }

    /// A standby is ready for the initial copy.
    fn attach(&mut self) -> Vec<PrimaryAction> {
        self.link = LinkState::Attached;
        self.state = S::Syncing;
        // Numbers restart with each standby: its first round is 1.
        self.sync = Some(SyncProgress { round: 1, awaiting: 1, measuring: false });
        vec![PrimaryAction::StartSync, PrimaryAction::CopyRound { seq: 1, all: true }]
    }

    /// A tie-breaker claim answered.
    fn handle_claim(&mut self, event: PrimaryEvent) -> Vec<PrimaryAction> {
        use PrimaryAction as A;
        use PrimaryEvent as E;
        match (self.state, event) {
            (S::Replacing, E::TieBreakWon { generation }) if generation == self.generation => {
                // The lagging standby can no longer win a claim: drop it, and what was held
                // for it goes out.
                self.unlink();
                let mut actions = vec![A::DropStandby];
                actions.extend(self.unprotect());
                actions
            }
            (S::Replacing, E::TieBreakUnreachable) => {
                // Without the tie-breaker the standby cannot be dropped safely: keep it, and
                // claim what it would claim.
                self.state = S::Protected;
                self.generation = self.claimed_from.take().unwrap_or(self.generation);
                self.next_last()
            }
            (S::Arbitrating, E::TieBreakUnreachable) => {
                self.claims.retry_at = Some(self.clock + self.config.arbitrate_retry);
                vec![]
            }
            // The standby can no longer go live: what was held can go out.
            (S::Arbitrating, E::TieBreakWon { generation }) if generation == self.generation => self.unprotect(),
            // A newer generation is recorded: someone else runs the VM.
            (S::HandingOver | S::Replacing | S::Arbitrating, E::TieBreakLost { generation }) => {
                let switching = self.state == S::HandingOver;
                self.generation = self.generation.max(generation);
                let mut actions = self.halt();
                if switching {
                    actions.push(A::SwitchoverEnded { handed_over: false });
                }
                actions
            }
            // Anything else is stale or does not apply in this state.
            _ => vec![],
        }
    }

    /// A planned switchover.
    fn handle_switchover(&mut self, event: PrimaryEvent) -> Vec<PrimaryAction> {
        use PrimaryEvent as E;
        match (self.state, event) {
            (S::Protected, E::Switchover) if self.may_switch_over() => {
                self.state = S::HandingOver;
                self.final_epoch = None;
                self.handover_by = Some(self.clock + self.config.ack_timeout);
                self.next_final().into_iter().collect()
            }
            (_, E::Switchover) => vec![PrimaryAction::SwitchoverEnded { handed_over: false }],
            (S::HandingOver, E::HandedOver) if self.claims.running => {
                // The tie-breaker names the standby: nothing held may go out any more (the
                // standby re-runs from the final checkpoint, whose output is already out).
                self.claim_answered();
                self.state = S::SwitchedOver;
                self.claimed_from = None;
                self.held.clear();
                let mut actions = vec![PrimaryAction::SwitchoverEnded { handed_over: true }];
                if self.finishing.take().is_some() {
                    actions.push(PrimaryAction::Finished);
                }
                actions
            }
            (S::HandingOver, E::HandOverFailed) if self.claims.running => {
                self.claim_answered();
                self.handover_failed()
            }
            _ => vec![],
        }
    }

    /// Checkpoints, output, acknowledgements and silence.
    fn handle_running(&mut self, event: PrimaryEvent) -> Vec<PrimaryAction> {
        use PrimaryAction as A;
        use PrimaryEvent as E;
        match (self.state, event) {
            (S::Unprotected | S::Syncing, E::Output { id }) => vec![A::Release { ids: vec![id] }],
            (S::Protected | S::HandingOver | S::Replacing | S::Arbitrating, E::Output { id }) => {
                self.held.push_back((self.epoch, id));
                vec![]
            }
            (S::Protected, E::EpochTimer) if self.capturing.is_none() && self.unacked() < self.config.window => {
                self.capture()
            }
            (_, E::Captured { epoch, output, at }) if self.capturing == Some(epoch) => self.captured(epoch, output, at),
            (_, E::CaptureFailed { epoch, at }) if self.capturing == Some(epoch) => {
                self.capturing = None;
                self.last_capture = Some(at);
                if self.state == S::HandingOver {
                    // The shell resumed the VM; the switchover is off.
                    self.state = S::Protected;
                    self.final_epoch = None;
                    self.handover_by = None;
                    self.generation = self.claimed_from.take().unwrap_or(self.generation);
                    return vec![A::ResumeVm, A::SwitchoverEnded { handed_over: false }];
                }
                if self.finishing.is_some_and(|f| f.epoch == Some(epoch)) {
                    // Try the last checkpoint again.
                    if let Some(f) = &mut self.finishing {
                        f.epoch = None;
                    }
                    return self.next_last();
                }
                vec![]
            }
            (S::Syncing, E::Acked { epoch }) => match &mut self.sync {
                Some(s) if epoch == s.awaiting && self.capturing.is_none() => {
                    s.measuring = true;
                    vec![A::MeasureDirty]
                }
                _ => vec![],
            },
            (S::Protected | S::HandingOver | S::Replacing | S::Arbitrating, E::Acked { epoch }) => self.on_ack(epoch),
            (S::Protected | S::HandingOver | S::Replacing | S::Arbitrating, E::Stalled) => {
                // The checkpoint after the one under way: captured once this copy runs again.
                self.release_from = Some(self.epoch + u64::from(self.capturing.is_some()));
                vec![]
            }
            (S::Unprotected, E::PeerSilent) if self.link != LinkState::None => {
                // A standby that connected but never got anything.
                self.spares.lost();
                self.unlink();
                vec![A::DropStandby]
            }
            (S::Syncing, E::PeerSilent) => {
                // The standby died before it held anything: nothing to arbitrate.
                self.spares.lost();
                self.unlink();
                let mut actions = vec![A::DropStandby];
                actions.extend(self.unprotect());
                actions
            }
            (S::Protected, E::PeerSilent) => {
                self.spares.lost();
                self.unlink();
                self.state = S::Arbitrating;
                self.generation += 1;
                let mut actions = vec![A::DropStandby];
                actions.extend(self.claim());
                actions
            }
            (S::HandingOver, E::PeerSilent) if self.claims.running => {
                // The hand-over being recorded decides: if it fails, this side arbitrates.
                self.spares.lost();
                self.unlink();
                self.silent_during_handover = true;
                vec![A::DropStandby]
            }
            (S::HandingOver, E::PeerSilent) => {
                // The standby died during the switchover: as in any failure, but the VM paused
                // for the hand-over runs again (its output stays held until the claim is won).
                self.spares.lost();
                self.unlink();
                self.state = S::Arbitrating;
                self.final_epoch = None;
                self.handover_by = None;
                self.generation = self.claimed_from.take().unwrap_or(self.generation) + 1;
                let mut actions = vec![A::DropStandby, A::ResumeVm, A::SwitchoverEnded { handed_over: false }];
                actions.extend(self.claim());
                actions
            }
            (S::Protected, E::Lagging) if self.finishing.is_none() => {
                self.state = S::Replacing;
                self.claimed_from = Some(self.generation);
                self.generation += 1;
                self.spares.lost();
                self.claim()
            }
            (S::Replacing, E::PeerSilent) => {
                // It went silent meanwhile: the claim under way decides, as for any failure
                // (the standby's own claim is of the same generation).
                self.unlink();
                self.state = S::Arbitrating;
                self.claimed_from = None;
                vec![A::DropStandby]
            }
            _ => vec![],
        }
    }

    fn captured(&mut self, epoch: Epoch, output: Option<u64>, at: Instant) -> Vec<PrimaryAction> {
        use PrimaryAction as A;
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
            S::Protected => [A::Send { epoch }].into_iter().chain(self.next_last()).collect(),
            // An ordinary checkpoint was under way when the switchover was asked for: the
            // final one follows it.
            S::HandingOver => [A::Send { epoch }].into_iter().chain(self.next_final()).collect(),
            _ => vec![],
        }
    }

    fn on_ack(&mut self, epoch: Epoch) -> Vec<PrimaryAction> {
        use PrimaryAction as A;
        // Only checkpoints actually taken can be acknowledged; a late ack for an older one
        // changes nothing.
        if epoch >= self.epoch || self.acked.is_some_and(|a| epoch <= a) {
            return vec![];
        }
        self.acked = Some(epoch);
        // Sent before this copy stalled: the standby may have taken the VM over since. It
        // still counts for the window (the next checkpoint, whose acknowledgement will prove
        // the standby serves this copy, must not wait on it), but it releases nothing and
        // completes no switchover or ending.
        if self.release_from.is_some_and(|from| epoch < from) {
            return vec![];
        }
        self.release_from = None;
        let mut ids = Vec::new();
        while self.held.front().is_some_and(|&(e, _)| e <= epoch) {
            ids.extend(self.held.pop_front().map(|(_, id)| id));
        }
        let mut actions = if ids.is_empty() { vec![] } else { vec![A::Release { ids }] };
        actions.extend(self.next_final());
        if self.state == S::HandingOver && !self.claims.running && self.final_epoch.is_some_and(|f| epoch >= f) {
            // The standby holds the final state and every output up to it is out.
            self.claimed_from = Some(self.generation);
            self.generation += 1;
            self.claims.running = true;
            actions.push(A::HandOver { epoch, generation: self.generation });
        }
        if self.state == S::Protected && self.finishing.is_some_and(|f| f.epoch.is_some_and(|e| epoch >= e)) {
            // The standby holds the last state and the VM ends: nothing more to hold.
            self.finishing = None;
            actions.extend([A::StopProtecting, A::Finished]);
        }
        actions
    }
}

use PrimaryState as S;
