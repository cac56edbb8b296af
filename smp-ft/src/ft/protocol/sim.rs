//! A randomized simulation of a primary and the standbys it protects itself with, over lossy
//! links, with crashes, partitions, unreachable tie-breakers, replacements, switchovers, VMs
//! that end, and reconnects. The shell is modelled as the real ones are: claims, connects and
//! hand-overs answer later, in the background; the output gate holds, seals and releases
//! batches. Claims, hand-overs and the record of a VM that ended go to the in-memory model of
//! the tie-breaker trait (`ft::tiebreak::memory`), through the same requests the shells make.
//! Every schedule is checked against the invariants, and the schedules are run again with a
//! shell that drops one kind of action, which the invariants must catch.

use super::*;
use crate::ft::tiebreak::memory::{MemoryTieBreaker, Store};
use crate::ft::tiebreak::{Outcome, TieBreak};
use crate::ft::TestRng as Rng;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A fault planted in the simulated primary shell: one kind of action it never carries out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mutation {
    None,
    Drop(&'static str),
}

fn kind(a: &PrimaryAction) -> &'static str {
    use PrimaryAction as A;
    match a {
        A::Connect { .. } => "Connect",
        A::StartSync => "StartSync",
        A::CopyRound { .. } => "CopyRound",
        A::MeasureDirty => "MeasureDirty",
        A::CaptureSync { .. } => "CaptureSync",
        A::Capture { .. } => "Capture",
        A::Send { .. } => "Send",
        A::Release { .. } => "Release",
        A::StopProtecting => "StopProtecting",
        A::Arbitrate { .. } => "Arbitrate",
        A::Halt => "Halt",
        A::DropStandby => "DropStandby",
        A::CaptureFinal { .. } => "CaptureFinal",
        A::HandOver { .. } => "HandOver",
        A::ResumeVm => "ResumeVm",
        A::SwitchoverEnded { .. } => "SwitchoverEnded",
        A::Finished => "Finished",
    }
}

/// The claim timeout the model is given (it answers at once).
const CLAIM: Duration = Duration::from_secs(1);

/// A claim's answer as the generation won (`Ok`) or the one held by another (`Err`), and
/// whether the holder ended the VM on purpose.
fn answer(r: Outcome) -> (Result<u64, u64>, bool) {
    match r {
        Outcome::Won { generation } => (Ok(generation), false),
        Outcome::Lost { generation, holder } => (Err(generation), holder.ends_with(crate::ft::tiebreak::STOPPED)),
    }
}

/// A claim of `generation` by `tb`, as the shells make it.
fn claim(tb: &MemoryTieBreaker, generation: u64) -> (Result<u64, u64>, bool) {
    answer(tb.claim(generation, CLAIM).expect("the model always answers"))
}

/// One standby of the schedule (a new one for each connect).
struct Node {
    s: Standby,
    name: String,
    alive: bool,
    /// The link to the primary carries traffic (no partition, not dropped).
    link_up: bool,
    /// When the primary stopped being heard (link down, or primary gone).
    silent_since: Option<u64>,
    to_standby: VecDeque<(Epoch, bool)>,
    to_primary: VecDeque<Epoch>,
    tb: MemoryTieBreaker,
    live_at: Option<Epoch>,
    /// A claim under way: (step its answer comes, generation).
    claim: Option<(u64, u64)>,
    /// The primary told it the VM ended.
    ended: bool,
}

impl Node {
    fn new(k: usize, generation: u64, now: Instant, store: &Arc<Store>) -> Node {
        let name = format!("standby{k}");
        Node {
            s: Standby::new(generation, Duration::from_millis(100), now),
            tb: MemoryTieBreaker::new(store, &name),
            name,
            alive: true,
            link_up: true,
            silent_since: None,
            to_standby: VecDeque::new(),
            to_primary: VecDeque::new(),
            live_at: None,
            claim: None,
            ended: false,
        }
    }
}

/// Something the shell started that answers later.
enum Pending {
    Connect { at: u64 },
    Digests { at: u64 },
    Claim { at: u64, generation: u64, session: Option<usize> },
    HandOver { at: u64, epoch: Epoch, generation: u64, to: usize },
}

impl Pending {
    fn at(&self) -> u64 {
        match self {
            Pending::Connect { at }
            | Pending::Digests { at }
            | Pending::Claim { at, .. }
            | Pending::HandOver { at, .. } => *at,
        }
    }
}

struct Sim {
    rng: Rng,
    seed: u64,
    mutation: Mutation,
    now: Instant,
    step: u64,
    p: Primary,
    p_alive: bool,
    /// The tie-breaker's record, and the primary's claimant.
    store: Arc<Store>,
    p_tb: MemoryTieBreaker,
    nodes: Vec<Node>,
    /// The standby the primary's link goes to, if any.
    current: Option<usize>,
    pending: Vec<Pending>,
    /// The gate: holding output (a standby may hold a copy), the open batch, sealed batches.
    holding: bool,
    open: Vec<u64>,
    batches: HashMap<u64, (u64, Vec<u64>)>,
    next_id: u64,
    next_batch: u64,
    released: HashSet<u64>,
    /// Per session (standby index) and checkpoint: the last output id the checkpoint holds.
    watermark: HashMap<usize, BTreeMap<Epoch, u64>>,
    /// Sessions whose end the primary decided by winning the tie-breaker.
    won_against: HashSet<usize>,
    /// Faults stop at this step; the rest of the schedule lets everything settle.
    calm_from: u64,
    /// When the primary's link to its standby broke (it notices a few steps later).
    p_lost_at: Option<u64>,
}

const STEPS: u64 = 700;
const CALM: u64 = 250;

impl Sim {
    fn new(seed: u64, mutation: Mutation) -> Sim {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let store = Store::new();
        let now = Instant::now();
        let mut p = Primary::new(0, PrimaryConfig::default(), now);
        let spares = vec![SocketAddr::from(([127, 0, 0, 1], 7400))];
        let after = Duration::from_millis(rng.next() % 50);
        p.handle_at(now, PrimaryEvent::Protect { spares, after });
        Sim {
            rng,
            seed,
            mutation,
            now,
            step: 0,
            p,
            p_alive: true,
            p_tb: MemoryTieBreaker::new(&store, "primary"),
            store,
            nodes: Vec::new(),
            current: None,
            pending: Vec::new(),
            holding: false,
            open: Vec::new(),
            batches: HashMap::new(),
            next_id: 0,
            next_batch: 1 << 32,
            released: HashSet::new(),
            watermark: HashMap::new(),
            won_against: HashSet::new(),
            calm_from: STEPS - CALM,
            p_lost_at: None,
        }
    }

    fn calm(&self) -> bool {
        self.step >= self.calm_from
    }

    fn fail(&self, what: String) -> String {
        format!("seed {} ({:?}), step {}: {what}", self.seed, self.mutation, self.step)
    }

    /// Carries out the primary's actions (and those they lead to), as the shell does.
    fn primary_acts(&mut self, actions: Vec<PrimaryAction>) -> Result<(), String> {
        let mut work: VecDeque<PrimaryAction> = actions.into();
        while let Some(a) = work.pop_front() {
            if std::env::var_os("SMPFT_SIM_TRACE").is_some() {
                eprintln!(
                    "{} P {:?} {:?} gen {} -> {a:?}",
                    self.step,
                    self.p.state(),
                    self.current,
                    self.p.generation()
                );
            }
            if self.mutation == Mutation::Drop(kind(&a)) {
                continue;
            }
            let later = self.step + 1 + self.rng.next() % 6;
            match a {
                PrimaryAction::Connect { .. } => self.pending.push(Pending::Connect { at: later }),
                PrimaryAction::CopyRound { seq, .. } => self.send(seq, true),
                PrimaryAction::MeasureDirty => {
                    // The guest dirties less once calm: the copy converges.
                    let ev = PrimaryEvent::DirtyPending {
                        pages: self.rng.next() % if self.calm() { 300 } else { 1000 },
                        copying: self.rng.next() % 8 == 0,
                    };
                    work.extend(self.p.handle_at(self.now, ev));
                }
                PrimaryAction::CaptureSync { epoch } => {
                    self.holding = true;
                    if self.rng.chance(3) {
                        work.extend(self.p.handle_at(self.now, PrimaryEvent::SyncFailed));
                    } else {
                        self.seal(epoch);
                        self.send(epoch, false);
                        work.extend(self.p.handle_at(self.now, PrimaryEvent::SyncSent { epoch, at: self.now }));
                    }
                }
                PrimaryAction::Capture { epoch } | PrimaryAction::CaptureFinal { epoch } => {
                    let batch = self.seal(epoch);
                    if self.rng.chance(3) {
                        // The shell holds what it sealed under the epoch's next attempt.
                        if let Some(b) = batch {
                            work.extend(self.p.handle_at(self.now, PrimaryEvent::Output { id: b }));
                        }
                        if let Some(w) = self.current.and_then(|k| self.watermark.get_mut(&k)) {
                            w.remove(&epoch);
                        }
                        work.extend(self.p.handle_at(self.now, PrimaryEvent::CaptureFailed { epoch, at: self.now }));
                    } else {
                        let ev = PrimaryEvent::Captured { epoch, output: batch, at: self.now };
                        work.extend(self.p.handle_at(self.now, ev));
                    }
                }
                PrimaryAction::Send { epoch } => self.send(epoch, false),
                PrimaryAction::Release { ids } => {
                    for b in ids {
                        if let Some((_, out)) = self.batches.remove(&b) {
                            self.released.extend(out);
                        }
                    }
                }
                PrimaryAction::StopProtecting => {
                    // The gate opens: everything in it goes out.
                    self.holding = false;
                    self.released.extend(self.open.drain(..));
                    for (_, (_, out)) in self.batches.drain() {
                        self.released.extend(out);
                    }
                }
                PrimaryAction::Arbitrate { generation } => {
                    let session = self.current;
                    self.pending.push(Pending::Claim { at: later, generation, session });
                }
                PrimaryAction::HandOver { epoch, generation } => {
                    let to = self.current.ok_or_else(|| self.fail("a hand-over with no standby".into()))?;
                    self.pending.push(Pending::HandOver { at: later, epoch, generation, to });
                }
                PrimaryAction::Halt => {
                    self.open.clear();
                    self.batches.clear();
                }
                PrimaryAction::DropStandby => {
                    if let Some(k) = self.current.take() {
                        self.nodes[k].link_up = false;
                    }
                }
                PrimaryAction::Finished if self.p.state() == PrimaryState::SwitchedOver => self.p_alive = false,
                PrimaryAction::Finished => {
                    // The VM ended: the shell records so in the tie-breaker, and the standby is
                    // told, if the link carries it.
                    self.p_alive = false;
                    if self.current.is_some() {
                        let _ = self.p_tb.record_stop(self.p.generation(), CLAIM);
                    }
                    if let Some(k) = self.current {
                        if self.nodes[k].link_up {
                            self.nodes[k].ended = true;
                        }
                    }
                }
                PrimaryAction::StartSync | PrimaryAction::ResumeVm | PrimaryAction::SwitchoverEnded { .. } => {}
            }
        }
        Ok(())
    }

    /// The gate seals its open batch for checkpoint `epoch` (of the current session).
    fn seal(&mut self, epoch: Epoch) -> Option<u64> {
        if let Some(k) = self.current {
            self.watermark.entry(k).or_default().insert(epoch, self.next_id);
        }
        if self.open.is_empty() {
            return None;
        }
        self.next_batch += 1;
        self.batches.insert(self.next_batch, (self.step, std::mem::take(&mut self.open)));
        Some(self.next_batch)
    }

    fn send(&mut self, seq: Epoch, precopy: bool) {
        if let Some(k) = self.current {
            self.nodes[k].to_standby.push_back((seq, precopy));
        }
    }

    /// The guest produces output.
    fn output(&mut self) {
        self.next_id += 1;
        if self.holding {
            self.open.push(self.next_id);
        } else {
            self.released.insert(self.next_id);
        }
    }

    /// Answers that are due.
    fn answers(&mut self) -> Result<(), String> {
        let (due, rest): (Vec<_>, Vec<_>) = self.pending.drain(..).partition(|p| p.at() <= self.step);
        self.pending = rest;
        for p in due {
            if !self.p_alive {
                continue;
            }
            let actions = match p {
                Pending::Connect { .. } if self.calm() || self.rng.chance(80) => {
                    let k = self.nodes.len();
                    let recorded = self.store.record().map_or(0, |r| r.generation);
                    let generation = recorded.max(self.p.generation());
                    self.nodes.push(Node::new(k, generation, self.now, &self.store));
                    self.current = Some(k);
                    let digests = self.rng.chance(20);
                    if digests {
                        self.pending.push(Pending::Digests { at: self.step + 1 + self.rng.next() % 4 });
                    }
                    self.p.handle_at(self.now, PrimaryEvent::Connected { digests })
                }
                Pending::Connect { .. } => {
                    let refused = self.rng.chance(10);
                    self.p.handle_at(self.now, PrimaryEvent::ConnectFailed { refused })
                }
                Pending::Digests { .. } => {
                    let valid = self.calm() || self.rng.chance(95);
                    self.p.handle_at(self.now, PrimaryEvent::Digests { valid })
                }
                Pending::Claim { generation, session, .. } => {
                    if !self.calm() && self.rng.chance(10) {
                        self.p.handle_at(self.now, PrimaryEvent::TieBreakUnreachable)
                    } else {
                        match claim(&self.p_tb, generation).0 {
                            Ok(g) => {
                                self.won_against.extend(session);
                                self.p.handle_at(self.now, PrimaryEvent::TieBreakWon { generation: g })
                            }
                            Err(g) => self.p.handle_at(self.now, PrimaryEvent::TieBreakLost { generation: g }),
                        }
                    }
                }
                Pending::HandOver { epoch, generation, to, .. } => {
                    if !self.calm() && self.rng.chance(3) {
                        self.p.handle_at(self.now, PrimaryEvent::HandOverFailed)
                    } else if let (Err(g), _) =
                        answer(self.p_tb.hand_over(generation, &self.nodes[to].name, CLAIM).expect("the model answers"))
                    {
                        self.p.handle_at(self.now, PrimaryEvent::TieBreakLost { generation: g })
                    } else {
                        let n = &mut self.nodes[to];
                        if n.alive && n.link_up && self.rng.chance(80) {
                            let acts = n.s.handle_at(self.now, StandbyEvent::HandOver { epoch, generation });
                            self.standby_acts(to, acts)?;
                        }
                        let acts = self.p.handle_at(self.now, PrimaryEvent::HandedOver);
                        // The old primary stops: to the standby that is silence.
                        if self.p.state() == PrimaryState::SwitchedOver {
                            self.p_alive = false;
                        }
                        acts
                    }
                }
            };
            self.primary_acts(actions)?;
        }
        Ok(())
    }

    fn standby_acts(&mut self, k: usize, actions: Vec<StandbyAction>) -> Result<(), String> {
        let mut work: VecDeque<StandbyAction> = actions.into();
        while let Some(a) = work.pop_front() {
            if std::env::var_os("SMPFT_SIM_TRACE").is_some() {
                eprintln!("{} S{k} {:?} -> {a:?}", self.step, self.nodes[k].s.state());
            }
            let n = &mut self.nodes[k];
            match a {
                // Acks travel on a reliable channel: they are lost only with the link.
                StandbyAction::Ack { epoch } if n.link_up => n.to_primary.push_back(epoch),
                StandbyAction::Apply { epoch } => work.extend(n.s.handle_at(self.now, StandbyEvent::Applied { epoch })),
                StandbyAction::Arbitrate { generation } => {
                    n.claim = Some((self.step + 1 + self.rng.next() % 6, generation));
                }
                StandbyAction::GoLive { epoch } => n.live_at = Some(epoch),
                StandbyAction::Halt | StandbyAction::StandDown => n.alive = false,
                StandbyAction::Refuse { seq } => {
                    return Err(self.fail(format!("standby{k} refused pre-copy round {seq}")))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Each standby takes one event: a checkpoint, silence, or its claim's answer.
    fn standbys(&mut self) -> Result<(), String> {
        for k in 0..self.nodes.len() {
            let primary_heard = self.p_alive && self.nodes[k].link_up;
            let step = self.step;
            let n = &mut self.nodes[k];
            if !n.alive || n.live_at.is_some() {
                continue;
            }
            if n.ended {
                // Told the VM ended: the standby stands down.
                n.alive = false;
                continue;
            }
            if primary_heard {
                n.silent_since = None;
            } else {
                n.silent_since.get_or_insert(step);
            }
            let mut actions = n.s.handle_timeout(self.now);
            if let Some((_, generation)) = n.claim.filter(|(at, _)| *at <= step) {
                n.claim = None;
                let ev = if step < self.calm_from && self.rng.chance(10) {
                    StandbyEvent::TieBreakUnreachable
                } else {
                    match claim(&n.tb, generation) {
                        (Ok(g), _) => StandbyEvent::TieBreakWon { generation: g },
                        (Err(_), true) => {
                            // The VM ended on purpose, as the record says: the shell ends the
                            // standby without telling the core.
                            n.alive = false;
                            continue;
                        }
                        (Err(g), false) => StandbyEvent::TieBreakLost { generation: g },
                    }
                };
                actions.extend(n.s.handle_at(self.now, ev));
            } else if primary_heard && self.rng.chance(40) {
                if let Some((seq, precopy)) = n.to_standby.pop_front() {
                    let ev = if precopy {
                        StandbyEvent::PreCopy { seq }
                    } else {
                        StandbyEvent::Checkpoint { epoch: seq, valid: step >= self.calm_from || self.rng.chance(99) }
                    };
                    actions.extend(n.s.handle_at(self.now, ev));
                }
            } else if n.silent_since.is_some_and(|t| step > t + 5) {
                actions.extend(n.s.handle_at(self.now, StandbyEvent::PeerSilent));
            }
            self.standby_acts(k, actions)?;
            if self.nodes[k].live_at.is_some() && self.won_against.contains(&k) {
                return Err(self.fail(format!("standby{k} went live, but the primary won against it")));
            }
        }
        if self.nodes.iter().filter(|n| n.live_at.is_some()).count() > 1 {
            return Err(self.fail("two standbys went live".into()));
        }
        Ok(())
    }

    /// The primary takes one event.
    fn primary(&mut self) -> Result<(), String> {
        if !self.p_alive {
            return Ok(());
        }
        let state = self.p.state();
        if !self.calm() && state == PrimaryState::Protected && self.p.acked().is_some() {
            if self.rng.chance(1) {
                // Now and then, the operator asks for a planned switchover...
                let a = self.p.handle_at(self.now, PrimaryEvent::Switchover);
                return self.primary_acts(a);
            } else if self.rng.chance(1) {
                // ...or the lag policy replaces the standby.
                let a = self.p.handle_at(self.now, PrimaryEvent::Lagging);
                return self.primary_acts(a);
            }
        }
        if !self.calm() && self.rng.next() % 1000 < 2 {
            let a = self.p.handle_at(self.now, PrimaryEvent::Finish);
            return self.primary_acts(a);
        }
        let link = self.current.filter(|&k| self.nodes[k].link_up && self.nodes[k].alive);
        let broken = self.current.is_some_and(|k| !self.nodes[k].link_up || !self.nodes[k].alive);
        if !broken {
            self.p_lost_at = None;
        }
        let lost_at = *self.p_lost_at.get_or_insert(self.step);
        let silent = broken && self.step > lost_at + 5;
        let actions = match self.rng.next() % 4 {
            0 => self.p.handle_timeout(self.now),
            1 if !self.calm() || self.step < STEPS - 60 => {
                self.output();
                vec![]
            }
            2 => match link.and_then(|k| self.nodes[k].to_primary.pop_front()) {
                Some(epoch) => self.p.handle_at(self.now, PrimaryEvent::Acked { epoch }),
                None => vec![],
            },
            _ if silent => self.p.handle_at(self.now, PrimaryEvent::PeerSilent),
            _ => self.p.handle_timeout(self.now),
        };
        self.primary_acts(actions)
    }

    /// Crashes and partitions, before the calm.
    fn faults(&mut self) {
        if self.calm() || !self.rng.chance(1) {
            return;
        }
        match self.rng.next() % 4 {
            0 if self.nodes.len() < 6 => self.p_alive = false,
            1 => {
                if let Some(k) = self.current {
                    self.nodes[k].alive = false;
                }
            }
            _ => {
                if let Some(k) = self.current {
                    // A partition: what was in flight is lost with it.
                    let n = &mut self.nodes[k];
                    n.link_up = false;
                    n.to_primary.clear();
                    n.to_standby.clear();
                }
            }
        }
    }

    fn invariants(&self) -> Result<(), String> {
        let p = &self.p;
        if p.unacked() > p.config().window + 1 {
            return Err(self.fail(format!("{} checkpoints in flight", p.unacked())));
        }
        if self.p_alive && p.state() == PrimaryState::Unprotected && p.held() > 0 {
            return Err(self.fail("an unprotected primary holds output".into()));
        }
        // Every sealed batch is held by the machine until it is released: none is lost.
        let running = self.p_alive && !matches!(p.state(), PrimaryState::Halted | PrimaryState::SwitchedOver);
        if running && self.batches.len() != p.held() {
            return Err(self.fail(format!("the gate holds {} batches, the machine {}", self.batches.len(), p.held())));
        }
        // Every output a client saw is in the state that survived.
        for (k, n) in self.nodes.iter().enumerate() {
            let Some(live) = n.live_at else { continue };
            let mark = self.watermark.get(&k).and_then(|w| w.get(&live)).copied().unwrap_or(0);
            if let Some(id) = self.released.iter().find(|&&id| id > mark) {
                return Err(self.fail(format!(
                    "output {id} was released, but standby{k} went live from checkpoint {live} (outputs up to {mark})"
                )));
            }
        }
        Ok(())
    }

    /// Once everything has settled: nothing waits forever, and nobody is stuck deciding.
    fn settled(&self) -> Result<(), String> {
        if self.p_alive {
            let state = self.p.state();
            if !matches!(state, PrimaryState::Protected | PrimaryState::Halted | PrimaryState::SwitchedOver) {
                return Err(self.fail(format!("the primary is still {state:?} after the calm")));
            }
            if state == PrimaryState::Protected && self.p.acked().is_none() {
                return Err(self.fail("the primary never completed protecting the VM again".into()));
            }
            if let Some((b, (at, _))) = self.batches.iter().find(|(_, (at, _))| *at + 100 < self.step) {
                return Err(self.fail(format!("output batch {b}, sealed at step {at}, was never released")));
            }
            if !self.holding && !self.open.is_empty() {
                return Err(self.fail("output waits in an open gate".into()));
            }
            if state == PrimaryState::Protected && self.step > 100 && self.open.len() > 200 {
                return Err(self.fail("output piles up in the gate".into()));
            }
        }
        for (k, n) in self.nodes.iter().enumerate() {
            if !n.alive || n.live_at.is_some() {
                continue;
            }
            let attached = self.p_alive && self.current == Some(k) && n.link_up;
            if !attached {
                return Err(self.fail(format!("standby{k} is {:?}, with no primary, after the calm", n.s.state())));
            }
        }
        Ok(())
    }

    /// One step of the schedule.
    fn advance(&mut self, step: u64) -> Result<(), String> {
        self.step = step;
        // Calm steps are longer: every retry and backoff gets its turn.
        self.now += Duration::from_micros(self.rng.next() % 8000 + if self.calm() { 60_000 } else { 0 });
        self.faults();
        self.answers()?;
        self.primary()?;
        self.standbys()?;
        self.invariants()
    }

    fn run(mut self) -> Result<(), String> {
        for step in 0..STEPS {
            self.advance(step)?;
        }
        self.settled()
    }
}

fn seeds() -> u64 {
    std::env::var("SMPFT_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3000)
}

#[test]
fn random_schedules_keep_one_live_copy_and_lose_no_released_output() {
    let failures: Vec<String> = (1..=seeds()).filter_map(|seed| Sim::new(seed, Mutation::None).run().err()).collect();
    assert!(
        failures.is_empty(),
        "{} schedules broke an invariant, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
}

#[test]
fn the_schedules_cover_reconnects_replacements_switchovers_and_unreachable_claims() {
    // Measured over the same schedules: each kind of episode happens in many of them.
    let mut seen: HashMap<&'static str, u64> = HashMap::new();
    for seed in 1..=300 {
        let mut sim = Sim::new(seed, Mutation::None);
        let mut kinds = HashSet::new();
        for step in 0..STEPS {
            let _ = sim.advance(step);
            match sim.p.state() {
                PrimaryState::Replacing => kinds.insert("replacement"),
                PrimaryState::HandingOver => kinds.insert("switchover"),
                PrimaryState::Arbitrating => kinds.insert("arbitration"),
                _ => false,
            };
            if sim.nodes.len() > 1 {
                kinds.insert("reconnect");
            }
        }
        for k in kinds {
            *seen.entry(k).or_default() += 1;
        }
    }
    for k in ["reconnect", "replacement", "switchover", "arbitration"] {
        assert!(seen.get(k).copied().unwrap_or(0) >= 10, "{k} happened in too few schedules: {seen:?}");
    }
}

#[test]
fn a_shell_that_drops_an_action_is_caught() {
    // Each of these is a shell bug the invariants must find in some schedule.
    let kinds = [
        "Connect",
        "CopyRound",
        "MeasureDirty",
        "CaptureSync",
        "Capture",
        "Send",
        "Release",
        "StopProtecting",
        "Arbitrate",
        "DropStandby",
        "HandOver",
        "Finished",
    ];
    let n = seeds().min(1000);
    for k in kinds {
        let caught = (1..=n).find_map(|seed| Sim::new(seed, Mutation::Drop(k)).run().err());
        assert!(caught.is_some(), "a shell that never carries out {k} passed {n} schedules");
    }
}

/// `SMPFT_SIM_SEED=N` replays one schedule (with `SMPFT_SIM_TRACE=1`, every action is printed).
#[test]
fn replay_one_schedule() {
    if let Some(seed) = std::env::var("SMPFT_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        if let Err(e) = Sim::new(seed, Mutation::None).run() {
            panic!("{e}");
        }
    }
}
