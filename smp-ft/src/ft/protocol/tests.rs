//! Interleavings of the FT protocol: directed cases first, then a randomized simulation that
//! checks the two invariants over many schedules.

use super::*;

/// A fixed origin for the machine's clock in these tests.
fn t0() -> Instant {
    static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *T0.get_or_init(Instant::now)
}

fn ms(n: f64) -> Instant {
    t0() + Duration::from_secs_f64(n / 1000.0)
}

fn primary(generation: u64) -> Primary {
    Primary::new(generation, PrimaryConfig::default())
}

fn protected() -> Primary {
    let mut p = primary(0);
    assert_eq!(
        p.handle(PrimaryEvent::StandbyAttached),
        vec![PrimaryAction::StartSync, PrimaryAction::CopyRound { seq: 1, all: true }]
    );
    p.handle(PrimaryEvent::SyncSent { epoch: 0, at: t0() });
    p.handle(PrimaryEvent::Acked { epoch: 0 });
    assert_eq!(p.state(), PrimaryState::Protected);
    p
}

/// A checkpoint as the shell takes it: the timer fires, the capture is done (at `at`), and
/// what the machine says then.
fn cp_at(p: &mut Primary, at: Instant) -> Vec<PrimaryAction> {
    let epoch = p.epoch();
    assert_eq!(p.handle(PrimaryEvent::EpochTimer), vec![PrimaryAction::Capture { epoch }]);
    p.handle(PrimaryEvent::Captured { epoch, output: None, at })
}

fn cp(p: &mut Primary) -> Vec<PrimaryAction> {
    cp_at(p, t0())
}

fn released(actions: &[PrimaryAction]) -> Vec<u64> {
    actions.iter().flat_map(|a| if let PrimaryAction::Release { ids } = a { ids.clone() } else { vec![] }).collect()
}

#[test]
fn output_is_held_until_its_checkpoint_is_acked() {
    let mut p = protected();
    assert!(p.handle(PrimaryEvent::Output { id: 1 }).is_empty());
    assert_eq!(cp(&mut p), vec![PrimaryAction::Send { epoch: 1 }]);
    assert!(p.handle(PrimaryEvent::Output { id: 2 }).is_empty(), "output of epoch 2");
    assert_eq!(p.handle(PrimaryEvent::Acked { epoch: 1 }), vec![PrimaryAction::Release { ids: vec![1] }]);
    assert_eq!(p.held(), 1);
    cp(&mut p);
    assert_eq!(released(&p.handle(PrimaryEvent::Acked { epoch: 2 })), vec![2]);
}

#[test]
fn unprotected_and_syncing_output_flows_at_once() {
    let mut p = primary(0);
    assert_eq!(released(&p.handle(PrimaryEvent::Output { id: 7 })), vec![7]);
    p.handle(PrimaryEvent::StandbyAttached);
    assert_eq!(released(&p.handle(PrimaryEvent::Output { id: 8 })), vec![8]);
}

#[test]
fn late_and_duplicate_acks_change_nothing_and_acks_are_cumulative() {
    let mut p = protected();
    p.handle(PrimaryEvent::Output { id: 1 });
    cp(&mut p); // 1
    p.handle(PrimaryEvent::Output { id: 2 });
    cp(&mut p); // 2
                // The ack for 1 was lost; the ack for 2 covers both.
    assert_eq!(released(&p.handle(PrimaryEvent::Acked { epoch: 2 })), vec![1, 2]);
    assert!(p.handle(PrimaryEvent::Acked { epoch: 1 }).is_empty(), "late ack");
    assert!(p.handle(PrimaryEvent::Acked { epoch: 2 }).is_empty(), "duplicate ack");
    assert!(p.handle(PrimaryEvent::Acked { epoch: 9 }).is_empty(), "ack for a checkpoint never taken");
    assert_eq!(p.acked(), Some(2));
}

#[test]
fn lost_ack_then_silence_then_won_tie_break_releases_held_output() {
    let mut p = protected();
    p.handle(PrimaryEvent::Output { id: 1 });
    cp(&mut p);
    let a = p.handle(PrimaryEvent::PeerSilent);
    assert_eq!(a, vec![PrimaryAction::DropStandby, PrimaryAction::Arbitrate { generation: 1 }]);
    assert!(p.handle(PrimaryEvent::Output { id: 2 }).is_empty(), "still held while arbitrating");
    assert!(p.handle(PrimaryEvent::TieBreakWon { generation: 0 }).is_empty(), "a stale generation wins nothing");
    assert_eq!(released(&p.handle(PrimaryEvent::TieBreakWon { generation: 1 })), vec![1, 2]);
    assert_eq!(p.state(), PrimaryState::Unprotected);
}

#[test]
fn lost_tie_break_halts_and_releases_nothing() {
    let mut p = protected();
    p.handle(PrimaryEvent::Output { id: 1 });
    p.handle(PrimaryEvent::PeerSilent);
    assert_eq!(p.handle(PrimaryEvent::TieBreakLost { generation: 5 }), vec![PrimaryAction::Halt]);
    assert_eq!(p.state(), PrimaryState::Halted);
    assert!(p.handle(PrimaryEvent::Acked { epoch: 1 }).is_empty());
    assert!(p.handle(PrimaryEvent::Output { id: 2 }).is_empty());
    assert_eq!(p.generation(), 5);
}

#[test]
fn unreachable_tie_breaker_keeps_asking_and_keeps_output_held() {
    let mut p = protected();
    p.handle(PrimaryEvent::Output { id: 1 });
    p.handle(PrimaryEvent::PeerSilent);
    assert_eq!(p.handle(PrimaryEvent::TieBreakUnreachable), vec![PrimaryAction::Arbitrate { generation: 1 }]);
    assert_eq!(p.held(), 1);
    let mut s = standby_at(3);
    s.handle(StandbyEvent::PeerSilent);
    assert_eq!(s.handle(StandbyEvent::TieBreakUnreachable), vec![StandbyAction::Arbitrate { generation: 1 }]);
    assert_eq!(s.state(), StandbyState::Arbitrating, "never live without winning");
}

#[test]
fn standby_dying_during_sync_leaves_the_primary_unprotected() {
    let mut p = primary(0);
    p.handle(PrimaryEvent::StandbyAttached);
    assert_eq!(p.handle(PrimaryEvent::PeerSilent), vec![PrimaryAction::DropStandby]);
    assert_eq!(p.state(), PrimaryState::Unprotected);
    // Re-protect: a new standby can attach at once.
    assert_eq!(p.handle(PrimaryEvent::StandbyAttached)[0], PrimaryAction::StartSync);
}

#[test]
fn silence_after_the_sync_checkpoint_left_means_arbitration_not_release() {
    // The standby may have acknowledged the synchronising checkpoint (and so could go live)
    // even though that ack never arrived: the primary must not act alone without the lock.
    let mut p = primary(0);
    p.handle(PrimaryEvent::StandbyAttached);
    assert!(p.handle(PrimaryEvent::SyncSent { epoch: 5, at: t0() }).is_empty());
    assert!(p.handle(PrimaryEvent::Output { id: 1 }).is_empty(), "output after the sync pause is held");
    assert_eq!(cp(&mut p), vec![PrimaryAction::Send { epoch: 6 }]);
    assert_eq!(
        p.handle(PrimaryEvent::PeerSilent),
        vec![PrimaryAction::DropStandby, PrimaryAction::Arbitrate { generation: 1 }]
    );
    assert_eq!(p.held(), 1);
    assert_eq!(p.handle(PrimaryEvent::TieBreakLost { generation: 1 }), vec![PrimaryAction::Halt]);
}

fn standby_at(epoch: Epoch) -> Standby {
    let mut s = Standby::new(0);
    for e in 0..=epoch {
        assert_eq!(
            s.handle(StandbyEvent::Checkpoint { epoch: e, valid: true }),
            vec![StandbyAction::Ack { epoch: e }, StandbyAction::Apply { epoch: e }]
        );
    }
    s
}

#[test]
fn standby_acks_whole_valid_checkpoints_in_order_and_discards_the_rest() {
    let mut s = standby_at(2);
    assert_eq!(
        s.handle(StandbyEvent::Checkpoint { epoch: 3, valid: false }),
        vec![StandbyAction::Discard { epoch: 3 }]
    );
    assert_eq!(s.handle(StandbyEvent::Checkpoint { epoch: 2, valid: true }), vec![StandbyAction::Discard { epoch: 2 }]);
    assert_eq!(s.acked(), Some(2));
}

#[test]
fn primary_dying_mid_checkpoint_the_standby_goes_live_from_the_last_acked() {
    let mut s = standby_at(4);
    // Checkpoint 5 was arriving when the primary died: the channel never delivers it.
    assert_eq!(s.handle(StandbyEvent::PeerSilent), vec![StandbyAction::Arbitrate { generation: 1 }]);
    assert_eq!(s.handle(StandbyEvent::TieBreakWon { generation: 1 }), vec![StandbyAction::GoLive { epoch: 4 }]);
    assert_eq!(s.state(), StandbyState::Live);
}

#[test]
fn acked_but_not_yet_applied_checkpoint_is_the_one_that_goes_live() {
    let mut s = standby_at(3);
    s.handle(StandbyEvent::Applied { epoch: 2 });
    s.handle(StandbyEvent::PeerSilent);
    assert_eq!(s.handle(StandbyEvent::TieBreakWon { generation: 1 }), vec![StandbyAction::GoLive { epoch: 3 }]);
}

#[test]
fn standby_that_never_finished_sync_halts_instead_of_going_live() {
    let mut s = Standby::new(0);
    assert_eq!(s.handle(StandbyEvent::PeerSilent), vec![StandbyAction::Halt]);
    assert_eq!(s.state(), StandbyState::Halted);
}

#[test]
fn standby_losing_the_tie_break_halts() {
    let mut s = standby_at(1);
    s.handle(StandbyEvent::PeerSilent);
    assert_eq!(s.handle(StandbyEvent::TieBreakLost { generation: 1 }), vec![StandbyAction::Halt]);
}

#[test]
fn a_standby_that_went_live_can_be_protected_again() {
    // It runs as a primary with the generation it won at; a later failover needs a higher one.
    let mut p = primary(1);
    p.handle(PrimaryEvent::StandbyAttached);
    p.handle(PrimaryEvent::SyncSent { epoch: 0, at: t0() });
    p.handle(PrimaryEvent::PeerSilent);
    assert_eq!(p.generation(), 2);
}

// ---- the checkpoint timer ----

#[test]
fn checkpoints_come_every_interval_from_the_last_capture() {
    let mut p = protected();
    assert_eq!(p.poll_timeout(), Some(ms(20.0)));
    assert!(p.handle_timeout(ms(19.9)).is_empty());
    assert_eq!(p.handle_timeout(ms(20.0)), vec![PrimaryAction::Capture { epoch: 1 }]);
    assert_eq!(p.poll_timeout(), None, "no second capture while one is under way");
    assert!(p.handle(PrimaryEvent::EpochTimer).is_empty());
    p.handle(PrimaryEvent::Captured { epoch: 1, output: None, at: ms(20.0) });
    assert_eq!(p.poll_timeout(), Some(ms(40.0)));
}

#[test]
fn waiting_output_brings_the_checkpoint_forward() {
    let mut p = protected();
    // A burst at 5 ms: once quiet for 150 us.
    p.set_output_waiting(Some((ms(5.0), ms(5.0))));
    assert_eq!(p.poll_timeout(), Some(ms(5.15)));
    // Output that keeps coming: at most 2 ms after its first byte.
    p.set_output_waiting(Some((ms(5.0), ms(6.95))));
    assert_eq!(p.poll_timeout(), Some(ms(7.0)));
    // Never sooner than the minimum gap after the last capture.
    p.set_output_waiting(Some((ms(0.01), ms(0.01))));
    assert_eq!(p.poll_timeout(), Some(ms(1.0)));
    p.set_output_waiting(None);
    assert_eq!(p.poll_timeout(), Some(ms(20.0)));
}

#[test]
fn a_full_window_waits_for_an_acknowledgement_but_a_final_checkpoint_does_not() {
    let mut p = protected();
    for _ in 0..4 {
        cp(&mut p);
    }
    assert_eq!(p.unacked(), 4);
    assert_eq!(p.poll_timeout(), None, "the window is full");
    assert!(p.handle_timeout(ms(1000.0)).is_empty());
    assert!(p.handle(PrimaryEvent::EpochTimer).is_empty());
    p.handle(PrimaryEvent::Acked { epoch: 2 });
    assert_eq!(p.unacked(), 2);
    assert!(p.poll_timeout().is_some(), "an acknowledgement opens it");
    for _ in 0..2 {
        cp(&mut p);
    }
    assert_eq!(p.poll_timeout(), None);
    assert_eq!(p.handle(PrimaryEvent::Finish), vec![PrimaryAction::Capture { epoch: 7 }]);
}

#[test]
fn the_sync_checkpoint_counts_in_the_window_and_precopy_acks_do_not_open_it() {
    let mut p = primary(0);
    p.handle(PrimaryEvent::StandbyAttached);
    p.handle(PrimaryEvent::SyncSent { epoch: 5, at: t0() });
    assert_eq!(p.unacked(), 1, "the sync checkpoint is in flight");
    p.handle(PrimaryEvent::Acked { epoch: 3 });
    assert_eq!(p.unacked(), 1, "a late pre-copy ack changes nothing");
    p.handle(PrimaryEvent::Acked { epoch: 5 });
    assert_eq!(p.unacked(), 0);
}

#[test]
fn a_failed_capture_keeps_the_epoch_and_retries_an_interval_later() {
    let mut p = protected();
    assert_eq!(p.handle_timeout(ms(20.0)), vec![PrimaryAction::Capture { epoch: 1 }]);
    assert!(p.handle(PrimaryEvent::CaptureFailed { epoch: 1, at: ms(20.0) }).is_empty());
    assert_eq!(p.epoch(), 1);
    assert_eq!(p.poll_timeout(), Some(ms(40.0)));
    assert!(
        p.handle(PrimaryEvent::Captured { epoch: 1, output: Some(9), at: ms(20.0) }).is_empty(),
        "a report for no capture is ignored"
    );
    assert_eq!(p.handle_timeout(ms(40.0)), vec![PrimaryAction::Capture { epoch: 1 }]);
    assert_eq!(
        p.handle(PrimaryEvent::Captured { epoch: 1, output: Some(9), at: ms(40.0) }),
        vec![PrimaryAction::Send { epoch: 1 }]
    );
    assert_eq!(
        released(&p.handle(PrimaryEvent::Acked { epoch: 1 })),
        vec![9],
        "the sealed output is held under its epoch"
    );
}

// ---- the initial copy ----

#[test]
fn the_initial_copy_iterates_until_few_pages_are_dirty_then_pauses_once() {
    let mut p = primary(0);
    assert_eq!(
        p.handle(PrimaryEvent::StandbyAttached),
        vec![PrimaryAction::StartSync, PrimaryAction::CopyRound { seq: 1, all: true }]
    );
    assert!(p.handle(PrimaryEvent::DirtyPending { pages: 5, copying: false }).is_empty(), "not asked for");
    assert_eq!(p.handle(PrimaryEvent::Acked { epoch: 1 }), vec![PrimaryAction::MeasureDirty]);
    assert_eq!(
        p.handle(PrimaryEvent::DirtyPending { pages: 10_000, copying: false }),
        vec![PrimaryAction::CopyRound { seq: 2, all: false }]
    );
    assert!(p.handle(PrimaryEvent::Acked { epoch: 1 }).is_empty(), "a stale ack");
    assert_eq!(p.handle(PrimaryEvent::Acked { epoch: 2 }), vec![PrimaryAction::MeasureDirty]);
    assert_eq!(
        p.handle(PrimaryEvent::DirtyPending { pages: 100, copying: false }),
        vec![PrimaryAction::CaptureSync { epoch: 3 }]
    );
    assert_eq!(p.state(), PrimaryState::Syncing);
    assert!(p.handle(PrimaryEvent::SyncSent { epoch: 3, at: t0() }).is_empty());
    assert_eq!(p.state(), PrimaryState::Protected);
    assert_eq!((p.epoch(), p.unacked()), (4, 1));
}

#[test]
fn the_initial_copy_gives_up_iterating_after_the_last_round() {
    let mut p = primary(0);
    p.handle(PrimaryEvent::StandbyAttached);
    let max = PrimaryConfig::default().sync_max_rounds as u64;
    for seq in 1..max {
        assert_eq!(p.handle(PrimaryEvent::Acked { epoch: seq }), vec![PrimaryAction::MeasureDirty]);
        assert_eq!(
            p.handle(PrimaryEvent::DirtyPending { pages: u64::MAX, copying: false }),
            vec![PrimaryAction::CopyRound { seq: seq + 1, all: false }]
        );
    }
    p.handle(PrimaryEvent::Acked { epoch: max });
    assert_eq!(
        p.handle(PrimaryEvent::DirtyPending { pages: u64::MAX, copying: false }),
        vec![PrimaryAction::CaptureSync { epoch: max + 1 }],
        "a guest dirtying faster than the link drains still gets protected"
    );
}

#[test]
fn rounds_that_copy_a_disk_for_the_first_time_do_not_count() {
    let mut p = primary(0);
    p.handle(PrimaryEvent::StandbyAttached);
    let max = PrimaryConfig::default().sync_max_rounds as u64;
    for seq in 1..=max + 5 {
        assert_eq!(p.handle(PrimaryEvent::Acked { epoch: seq }), vec![PrimaryAction::MeasureDirty]);
        assert_eq!(
            p.handle(PrimaryEvent::DirtyPending { pages: 0, copying: true }),
            vec![PrimaryAction::CopyRound { seq: seq + 1, all: false }],
            "a disk's first pass goes on, however many rounds it takes"
        );
    }
    p.handle(PrimaryEvent::Acked { epoch: max + 6 });
    assert_eq!(
        p.handle(PrimaryEvent::DirtyPending { pages: 10, copying: false }),
        vec![PrimaryAction::CaptureSync { epoch: max + 7 }]
    );
}

#[test]
fn a_failed_initial_copy_drops_the_standby_and_a_new_one_starts_over() {
    let mut p = primary(0);
    p.handle(PrimaryEvent::StandbyAttached);
    p.handle(PrimaryEvent::Acked { epoch: 1 });
    assert_eq!(p.handle(PrimaryEvent::SyncFailed), vec![PrimaryAction::DropStandby]);
    assert_eq!(p.state(), PrimaryState::Unprotected);
    assert_eq!(
        p.handle(PrimaryEvent::StandbyAttached),
        vec![PrimaryAction::StartSync, PrimaryAction::CopyRound { seq: 1, all: true }]
    );
}

#[test]
fn the_standby_takes_pre_copy_rounds_in_order_and_only_while_syncing() {
    let mut s = Standby::new(0);
    assert_eq!(
        s.handle(StandbyEvent::PreCopy { seq: 1 }),
        vec![StandbyAction::Ack { epoch: 1 }, StandbyAction::ApplyPreCopy { seq: 1 }]
    );
    assert_eq!(
        s.handle(StandbyEvent::PreCopy { seq: 2 }),
        vec![StandbyAction::Ack { epoch: 2 }, StandbyAction::ApplyPreCopy { seq: 2 }]
    );
    assert_eq!(s.handle(StandbyEvent::PreCopy { seq: 2 }), vec![StandbyAction::Refuse { seq: 2 }], "again");
    assert_eq!(s.state(), StandbyState::Syncing, "pre-copy alone is no copy");
    s.handle(StandbyEvent::Checkpoint { epoch: 3, valid: true });
    assert_eq!(s.handle(StandbyEvent::PreCopy { seq: 4 }), vec![StandbyAction::Refuse { seq: 4 }], "after the sync");
}

// ---- planned switchover ----

#[test]
fn switchover_hands_over_once_the_final_checkpoint_is_acked() {
    let mut p = protected();
    p.handle(PrimaryEvent::Output { id: 1 });
    let e = p.epoch();
    assert_eq!(p.handle(PrimaryEvent::Switchover), vec![PrimaryAction::CaptureFinal { epoch: e }]);
    assert_eq!(p.state(), PrimaryState::HandingOver);
    assert_eq!(p.handle(PrimaryEvent::EpochTimer), vec![], "no ordinary checkpoint now");
    assert_eq!(
        p.handle(PrimaryEvent::Captured { epoch: e, output: Some(2), at: t0() }),
        vec![PrimaryAction::Send { epoch: e }]
    );
    assert_eq!(
        p.handle(PrimaryEvent::Acked { epoch: e }),
        vec![PrimaryAction::Release { ids: vec![1, 2] }, PrimaryAction::HandOver { epoch: e, generation: 1 }]
    );
    assert_eq!(p.handle(PrimaryEvent::HandedOver), vec![]);
    assert_eq!(p.state(), PrimaryState::Halted);
    assert_eq!(p.handle(PrimaryEvent::Output { id: 3 }), vec![], "nothing more goes out from here");
}

#[test]
fn switchover_follows_a_checkpoint_under_way() {
    let mut p = protected();
    let e = p.epoch();
    assert_eq!(p.handle(PrimaryEvent::EpochTimer), vec![PrimaryAction::Capture { epoch: e }]);
    assert_eq!(p.handle(PrimaryEvent::Switchover), vec![]);
    assert_eq!(
        p.handle(PrimaryEvent::Captured { epoch: e, output: None, at: t0() }),
        vec![PrimaryAction::Send { epoch: e }, PrimaryAction::CaptureFinal { epoch: e + 1 }]
    );
    assert_eq!(p.handle(PrimaryEvent::Acked { epoch: e }), vec![], "not the final one yet");
}

#[test]
fn switchover_waits_for_room_in_the_window() {
    let mut p = protected();
    let first = p.epoch();
    for _ in 0..PrimaryConfig::default().window {
        cp(&mut p);
    }
    assert_eq!(p.handle(PrimaryEvent::Switchover), vec![], "the window is full");
    let e = p.epoch();
    assert_eq!(p.handle(PrimaryEvent::Acked { epoch: first }), vec![PrimaryAction::CaptureFinal { epoch: e }]);
}

#[test]
fn a_failed_switchover_leaves_the_vm_running_protected_here() {
    // The hand-over could not be recorded.
    let mut p = protected();
    let e = p.epoch();
    p.handle(PrimaryEvent::Switchover);
    p.handle(PrimaryEvent::Captured { epoch: e, output: None, at: t0() });
    p.handle(PrimaryEvent::Acked { epoch: e });
    assert_eq!(p.handle(PrimaryEvent::HandOverFailed), vec![PrimaryAction::ResumeVm]);
    assert_eq!(p.state(), PrimaryState::Protected);
    assert_eq!(p.generation(), 0, "nothing was recorded: the standby would still claim generation 1");
    assert_eq!(cp(&mut p), vec![PrimaryAction::Send { epoch: e + 1 }], "checkpoints go on");
    // The final capture failed (the shell resumed the VM).
    let mut p = protected();
    let e = p.epoch();
    p.handle(PrimaryEvent::Switchover);
    assert_eq!(p.handle(PrimaryEvent::CaptureFailed { epoch: e, at: t0() }), vec![]);
    assert_eq!(p.state(), PrimaryState::Protected);
    // The standby died meanwhile: arbitrate as for any failure, with the VM running again.
    let mut p = protected();
    let e = p.epoch();
    p.handle(PrimaryEvent::Switchover);
    p.handle(PrimaryEvent::Captured { epoch: e, output: Some(9), at: t0() });
    assert_eq!(
        p.handle(PrimaryEvent::PeerSilent),
        vec![PrimaryAction::DropStandby, PrimaryAction::ResumeVm, PrimaryAction::Arbitrate { generation: 1 }]
    );
    assert_eq!(p.held(), 1, "output stays held until the claim is decided");
}

#[test]
fn standby_takes_a_hand_over_only_for_a_state_it_holds() {
    let mut s = standby_at(5);
    assert_eq!(s.handle(StandbyEvent::HandOver { epoch: 6, generation: 3 }), vec![], "a checkpoint it lacks");
    assert_eq!(s.state(), StandbyState::Standby);
    assert_eq!(
        s.handle(StandbyEvent::HandOver { epoch: 5, generation: 3 }),
        vec![StandbyAction::Arbitrate { generation: 3 }]
    );
    assert_eq!(s.handle(StandbyEvent::TieBreakWon { generation: 3 }), vec![StandbyAction::GoLive { epoch: 5 }]);
}

// ---- lag policy ----

#[test]
fn a_lagging_standby_is_dropped_only_once_the_tie_breaker_is_taken() {
    let mut p = protected();
    p.handle(PrimaryEvent::Output { id: 1 });
    assert_eq!(p.handle(PrimaryEvent::Lagging), vec![PrimaryAction::Arbitrate { generation: 1 }]);
    assert_eq!(p.state(), PrimaryState::Replacing);
    assert_eq!(p.handle(PrimaryEvent::EpochTimer), vec![], "no checkpoints for a standby on its way out");
    assert_eq!(
        p.handle(PrimaryEvent::TieBreakWon { generation: 1 }),
        vec![PrimaryAction::DropStandby, PrimaryAction::Release { ids: vec![1] }]
    );
    assert_eq!(p.state(), PrimaryState::Unprotected);
    // Without the tie-breaker the standby stays: dropping it could let it go live.
    let mut p = protected();
    p.handle(PrimaryEvent::Lagging);
    assert_eq!(p.handle(PrimaryEvent::TieBreakUnreachable), vec![]);
    assert_eq!(p.state(), PrimaryState::Protected);
    assert_eq!(p.generation(), 0, "in step with the standby again");
    // If the standby holds a newer generation, it runs the VM: halt.
    let mut p = protected();
    p.handle(PrimaryEvent::Lagging);
    assert_eq!(p.handle(PrimaryEvent::TieBreakLost { generation: 5 }), vec![PrimaryAction::Halt]);
    // Silent meanwhile: the claim under way decides, as for any failure.
    let mut p = protected();
    p.handle(PrimaryEvent::Lagging);
    assert_eq!(p.handle(PrimaryEvent::PeerSilent), vec![PrimaryAction::DropStandby]);
    assert_eq!(p.handle(PrimaryEvent::TieBreakWon { generation: 1 }), vec![PrimaryAction::Release { ids: vec![] }]);
    assert_eq!(p.state(), PrimaryState::Unprotected);
}

// ---- randomized simulation ----

/// The shared lock: a generation and its holder. `try_lock` succeeds for a higher generation
/// than any before, or for the holder again.
#[derive(Default)]
struct TieBreaker {
    generation: u64,
    holder: Option<&'static str>,
}

impl TieBreaker {
    fn try_lock(&mut self, who: &'static str, generation: u64) -> Result<u64, u64> {
        if generation > self.generation || self.holder == Some(who) && generation == self.generation {
            self.generation = generation;
            self.holder = Some(who);
            Ok(generation)
        } else {
            Err(self.generation)
        }
    }
}

use crate::ft::TestRng as Rng;

/// One schedule: a protected pair exchanging checkpoints and acks over a lossy link, with a
/// crash or partition at a random moment. Returns a description of any invariant broken.
fn simulate(seed: u64) -> Result<(), String> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    // Half the schedules start with the initial copy over the same lossy link.
    let from_scratch = seed % 2 == 0;
    let (mut p, mut s) = if from_scratch { (primary(0), Standby::new(0)) } else { (protected(), standby_at(0)) };
    let mut first_actions = if from_scratch { p.handle(PrimaryEvent::StandbyAttached) } else { vec![] };
    let mut tb = TieBreaker::default();
    let (mut p_alive, mut s_alive, mut link_up) = (true, true, true);
    let mut next_id = 0;
    let mut output_epoch = std::collections::HashMap::new();
    let mut released_ids = Vec::new();
    // Checkpoints and acks in flight on the link.
    // (sequence number, pre-copy round?)
    let mut to_standby: std::collections::VecDeque<(Epoch, bool)> = Default::default();
    let mut to_primary: std::collections::VecDeque<Epoch> = Default::default();
    let mut standby_live_at: Option<Epoch> = None;
    let mut primary_ran_alone = false;
    let mut fault_at = rng.next() % 200;
    let mut now = t0();
    let window = PrimaryConfig::default().window;
    for step in 0..400u64 {
        now += Duration::from_micros(rng.next() % 8000);
        if step == fault_at {
            match rng.next() % 3 {
                0 => p_alive = false,
                1 => s_alive = false,
                _ => link_up = false,
            }
        }
        // Silence is noticed by whoever is alive once the link or the peer is gone.
        let silent = step > fault_at + 5;
        let mut s_actions = Vec::new();
        if p_alive && p.state() == PrimaryState::Protected && rng.chance(1) {
            // Now and then, the operator asks for a planned switchover...
            first_actions.extend(p.handle(PrimaryEvent::Switchover));
        } else if p_alive && p.state() == PrimaryState::Protected && rng.chance(1) {
            // ...or the lag policy replaces the standby.
            first_actions.extend(p.handle(PrimaryEvent::Lagging));
        }
        let mut p_actions = std::mem::take(&mut first_actions);
        if p_alive {
            let ev = match rng.next() % 4 {
                0 => {
                    p_actions = p.handle_timeout(now);
                    None
                }
                1 => {
                    next_id += 1;
                    output_epoch.insert(next_id, p.epoch());
                    Some(PrimaryEvent::Output { id: next_id })
                }
                2 if link_up && s_alive => to_primary.pop_front().map(|epoch| PrimaryEvent::Acked { epoch }),
                _ if silent && (!link_up || !s_alive) => Some(PrimaryEvent::PeerSilent),
                _ => None,
            };
            if let Some(ev) = ev {
                p_actions = p.handle(ev);
            }
        }
        if s_alive {
            let ev = match rng.next() % 3 {
                0 if link_up && p_alive => to_standby.pop_front().map(|(seq, precopy)| {
                    if precopy {
                        StandbyEvent::PreCopy { seq }
                    } else {
                        StandbyEvent::Checkpoint { epoch: seq, valid: rng.chance(97) }
                    }
                }),
                _ if silent && (!link_up || !p_alive) => Some(StandbyEvent::PeerSilent),
                _ => None,
            };
            if let Some(ev) = ev {
                s_actions = s.handle(ev);
            }
        }
        let mut work: std::collections::VecDeque<PrimaryAction> = p_actions.into();
        while let Some(a) = work.pop_front() {
            match a {
                PrimaryAction::Capture { epoch } | PrimaryAction::CaptureFinal { epoch } => {
                    if rng.chance(3) {
                        work.extend(p.handle(PrimaryEvent::CaptureFailed { epoch, at: now }));
                    } else {
                        work.extend(p.handle(PrimaryEvent::Captured { epoch, output: None, at: now }));
                    }
                }
                PrimaryAction::Send { epoch } => to_standby.push_back((epoch, false)),
                PrimaryAction::CopyRound { seq, .. } => to_standby.push_back((seq, true)),
                PrimaryAction::MeasureDirty => work.extend(
                    p.handle(PrimaryEvent::DirtyPending { pages: rng.next() % 1000, copying: rng.next() % 8 == 0 }),
                ),
                PrimaryAction::CaptureSync { epoch } => {
                    if rng.chance(3) {
                        work.extend(p.handle(PrimaryEvent::SyncFailed));
                    } else {
                        to_standby.push_back((epoch, false));
                        work.extend(p.handle(PrimaryEvent::SyncSent { epoch, at: now }));
                    }
                }
                PrimaryAction::Release { ids } => released_ids.extend(ids),
                PrimaryAction::Arbitrate { generation } => {
                    let r = tb.try_lock("primary", generation);
                    let outcome = p.handle(match r {
                        Ok(g) => PrimaryEvent::TieBreakWon { generation: g },
                        Err(g) => PrimaryEvent::TieBreakLost { generation: g },
                    });
                    released_ids.extend(released(&outcome));
                    primary_ran_alone |= r.is_ok();
                }
                PrimaryAction::DropStandby if link_up && s_alive => {
                    // The primary dropped a standby that still runs (a failed sync): it hears
                    // nothing more, which is a fault like any other.
                    link_up = false;
                    fault_at = fault_at.min(step);
                }
                PrimaryAction::HandOver { epoch, generation } => {
                    // The primary records the standby as the holder; the message may be lost
                    // (the standby then claims the generation once the primary is silent).
                    if rng.chance(3) {
                        // The tie-breaker could not be reached: nothing was recorded.
                        work.extend(p.handle(PrimaryEvent::HandOverFailed));
                        continue;
                    }
                    if let Err(g) = tb.try_lock("standby", generation) {
                        work.extend(p.handle(PrimaryEvent::TieBreakLost { generation: g }));
                        continue;
                    }
                    work.extend(p.handle(PrimaryEvent::HandedOver));
                    if link_up && s_alive && rng.chance(80) {
                        s_actions.extend(s.handle(StandbyEvent::HandOver { epoch, generation }));
                    }
                    // The old primary stops: to the standby that is silence.
                    p_alive = false;
                    fault_at = fault_at.min(step);
                }
                PrimaryAction::Halt
                | PrimaryAction::DropStandby
                | PrimaryAction::StartSync
                | PrimaryAction::ResumeVm => {}
            }
        }
        if p.unacked() > window {
            return Err(format!("seed {seed}: {} checkpoints in flight, beyond the window of {window}", p.unacked()));
        }
        // A won tie-break releases everything still held: collect those releases too.
        if p.state() == PrimaryState::Unprotected && p.held() > 0 {
            return Err(format!("seed {seed}: unprotected primary still holds output"));
        }
        for a in s_actions {
            match a {
                // Acks may be lost on the way.
                StandbyAction::Ack { epoch } if rng.chance(90) => to_primary.push_back(epoch),
                StandbyAction::Arbitrate { generation } => {
                    let ev = match tb.try_lock("standby", generation) {
                        Ok(g) => StandbyEvent::TieBreakWon { generation: g },
                        Err(g) => StandbyEvent::TieBreakLost { generation: g },
                    };
                    for a in s.handle(ev) {
                        if let StandbyAction::GoLive { epoch } = a {
                            standby_live_at = Some(epoch);
                        }
                    }
                }
                StandbyAction::GoLive { epoch } => standby_live_at = Some(epoch),
                StandbyAction::Refuse { seq } => {
                    return Err(format!("seed {seed}: the standby refused pre-copy round {seq}"))
                }
                _ => {}
            }
        }
        if standby_live_at.is_some() && primary_ran_alone {
            return Err(format!("seed {seed}: both copies won the tie-breaker by step {step}"));
        }
    }
    // Every output a client saw must be in the state that survived: if the standby went live,
    // nothing the primary released may be newer than the checkpoint it went live from.
    if let Some(live) = standby_live_at {
        for id in &released_ids {
            let e = output_epoch[id];
            if e > live {
                return Err(format!(
                    "seed {seed}: output {id} of epoch {e} was released but the standby went live at {live}"
                ));
            }
        }
    }
    // And the schedule did exercise something: a fault happened and someone noticed.
    if p_alive && s_alive && link_up {
        return Err(format!("seed {seed}: no fault was injected"));
    }
    Ok(())
}

#[test]
fn random_schedules_keep_one_live_copy_and_lose_no_released_output() {
    let seeds = std::env::var("SMPFT_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3000u64);
    let failures: Vec<String> = (1..=seeds).filter_map(|seed| simulate(seed).err()).collect();
    assert!(
        failures.is_empty(),
        "{} schedules broke an invariant, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
}
