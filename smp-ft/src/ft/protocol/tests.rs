//! Interleavings of the FT protocol: directed cases first, then a randomized simulation that
//! checks the two invariants over many schedules.

use super::*;
use std::time::{Duration, Instant};

/// A fixed origin for the machine's clock in these tests.
fn t0() -> Instant {
    static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *T0.get_or_init(Instant::now)
}

fn ms(n: f64) -> Instant {
    t0() + Duration::from_secs_f64(n / 1000.0)
}

fn primary(generation: u64) -> Primary {
    Primary::new(generation, PrimaryConfig::default(), t0())
}

fn protected() -> Primary {
    let mut p = primary(0);
    assert_eq!(
        p.handle(PrimaryEvent::Connected { digests: false }),
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
    p.handle(PrimaryEvent::Connected { digests: false });
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
fn after_a_stall_only_the_ack_of_a_later_checkpoint_releases_output() {
    let mut p = protected();
    p.handle(PrimaryEvent::Output { id: 1 });
    cp(&mut p); // 1
    p.handle(PrimaryEvent::Output { id: 2 });
    cp(&mut p); // 2
                // This copy was stopped; the acknowledgements of 1 and 2 waited in its socket meanwhile.
    assert!(p.handle(PrimaryEvent::Stalled).is_empty());
    assert!(p.handle(PrimaryEvent::Acked { epoch: 1 }).is_empty(), "acked before the stall: may be stale");
    assert!(p.handle(PrimaryEvent::Acked { epoch: 2 }).is_empty(), "so is this one");
    assert_eq!(p.held(), 2);
    p.handle(PrimaryEvent::Output { id: 3 });
    cp(&mut p); // 3, taken after the stall
    assert_eq!(released(&p.handle(PrimaryEvent::Acked { epoch: 3 })), vec![1, 2, 3], "the standby is still ours");
    p.handle(PrimaryEvent::Output { id: 4 });
    cp(&mut p);
    assert_eq!(released(&p.handle(PrimaryEvent::Acked { epoch: 4 })), vec![4], "and acks count again");
}

#[test]
fn a_stall_with_a_full_window_still_takes_the_checkpoint_that_proves_the_standby() {
    let mut p = Primary::new(0, PrimaryConfig { window: 1, ..PrimaryConfig::default() }, t0());
    p.handle(PrimaryEvent::Connected { digests: false });
    p.handle(PrimaryEvent::SyncSent { epoch: 0, at: t0() });
    p.handle(PrimaryEvent::Acked { epoch: 0 });
    assert_eq!(p.state(), PrimaryState::Protected);
    p.handle(PrimaryEvent::Output { id: 1 });
    cp(&mut p); // 1: the window is full
    p.handle(PrimaryEvent::Stalled);
    assert!(p.handle(PrimaryEvent::Acked { epoch: 1 }).is_empty(), "stale: nothing released");
    assert_eq!(p.acked(), Some(1), "but the window opens");
    assert_eq!(cp(&mut p), vec![PrimaryAction::Send { epoch: 2 }], "so the next checkpoint is taken");
    assert_eq!(released(&p.handle(PrimaryEvent::Acked { epoch: 2 })), vec![1]);
}

#[test]
fn a_stall_then_silence_and_a_lost_tie_break_shows_nothing() {
    let mut p = protected();
    p.handle(PrimaryEvent::Output { id: 1 });
    cp(&mut p);
    p.handle(PrimaryEvent::Stalled);
    assert!(released(&p.handle(PrimaryEvent::Acked { epoch: 1 })).is_empty());
    p.handle(PrimaryEvent::PeerSilent);
    assert_eq!(p.handle(PrimaryEvent::TieBreakLost { generation: 1 }), vec![PrimaryAction::Halt]);
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
    assert_eq!(p.handle_at(ms(10.0), PrimaryEvent::TieBreakUnreachable), vec![], "asked again later");
    assert_eq!(p.poll_timeout(), Some(ms(110.0)), "after the configured retry");
    assert_eq!(p.handle_timeout(ms(109.0)), vec![]);
    assert_eq!(p.handle_timeout(ms(110.0)), vec![PrimaryAction::Arbitrate { generation: 1 }]);
    assert_eq!(p.poll_timeout(), None, "one claim at a time");
    assert_eq!(p.held(), 1);
    let mut s = standby_at(3);
    s.handle(StandbyEvent::PeerSilent);
    assert_eq!(s.handle_at(ms(10.0), StandbyEvent::TieBreakUnreachable), vec![]);
    assert_eq!(s.handle_timeout(ms(110.0)), vec![StandbyAction::Arbitrate { generation: 1 }]);
    assert_eq!(s.state(), StandbyState::Arbitrating, "never live without winning");
}

#[test]
fn standby_dying_during_sync_leaves_the_primary_unprotected() {
    let mut p = primary(0);
    p.handle(PrimaryEvent::Connected { digests: false });
    assert_eq!(
        p.handle(PrimaryEvent::PeerSilent),
        vec![PrimaryAction::DropStandby, PrimaryAction::Release { ids: vec![] }, PrimaryAction::StopProtecting]
    );
    assert_eq!(p.state(), PrimaryState::Unprotected);
    // Re-protect: a new standby can attach at once.
    assert_eq!(p.handle(PrimaryEvent::Connected { digests: false })[0], PrimaryAction::StartSync);
}

#[test]
fn silence_after_the_sync_checkpoint_left_means_arbitration_not_release() {
    // The standby may have acknowledged the synchronising checkpoint (and so could go live)
    // even though that ack never arrived: the primary must not act alone without the lock.
    let mut p = primary(0);
    p.handle(PrimaryEvent::Connected { digests: false });
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
    let mut s = Standby::new(0, Duration::from_millis(100), t0());
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
fn standby_that_never_finished_sync_stands_down_instead_of_going_live() {
    let mut s = Standby::new(0, Duration::from_millis(100), t0());
    assert_eq!(s.handle(StandbyEvent::PeerSilent), vec![StandbyAction::StandDown]);
    assert_eq!(s.state(), StandbyState::StoodDown);
    // Nor does one whose host can no longer run the VM.
    let mut s = standby_at(3);
    s.handle(StandbyEvent::PeerSilent);
    assert_eq!(s.handle(StandbyEvent::CannotGoLive), vec![StandbyAction::StandDown]);
    assert_eq!(s.handle(StandbyEvent::TieBreakWon { generation: 1 }), vec![], "a claim's late answer changes nothing");
}

#[test]
fn a_standby_losing_the_tie_break_to_a_live_primary_stands_down_to_wait_again() {
    // It never ran the VM: a false alarm costs it its copy, not its place as a standby.
    let mut s = standby_at(1);
    s.handle(StandbyEvent::PeerSilent);
    assert_eq!(s.handle(StandbyEvent::TieBreakLost { generation: 2 }), vec![StandbyAction::StandDown]);
    assert_eq!(s.state(), StandbyState::StoodDown);
    assert_eq!(s.generation(), 2, "it knows the generation the primary holds");
    assert_eq!(s.handle(StandbyEvent::TieBreakWon { generation: 2 }), vec![], "nothing after standing down");
    // Told to halt on a loss (--ft-halt-on-loss), it ends instead.
    let mut s = standby_at(1).halt_on_loss(true);
    s.handle(StandbyEvent::PeerSilent);
    assert_eq!(s.handle(StandbyEvent::TieBreakLost { generation: 2 }), vec![StandbyAction::Halt]);
    assert_eq!(s.state(), StandbyState::Halted);
}

#[test]
fn a_standby_that_went_live_can_be_protected_again() {
    // It runs as a primary with the generation it won at; a later failover needs a higher one.
    let mut p = primary(1);
    p.handle(PrimaryEvent::Connected { digests: false });
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
    p.handle(PrimaryEvent::Connected { digests: false });
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
        p.handle(PrimaryEvent::Connected { digests: false }),
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
    p.handle(PrimaryEvent::Connected { digests: false });
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
    p.handle(PrimaryEvent::Connected { digests: false });
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
    p.handle(PrimaryEvent::Connected { digests: false });
    p.handle(PrimaryEvent::Acked { epoch: 1 });
    assert_eq!(
        p.handle(PrimaryEvent::SyncFailed),
        vec![PrimaryAction::DropStandby, PrimaryAction::Release { ids: vec![] }, PrimaryAction::StopProtecting]
    );
    assert_eq!(p.state(), PrimaryState::Unprotected);
    assert_eq!(
        p.handle(PrimaryEvent::Connected { digests: false }),
        vec![PrimaryAction::StartSync, PrimaryAction::CopyRound { seq: 1, all: true }]
    );
}

#[test]
fn the_standby_takes_pre_copy_rounds_in_order_and_only_while_syncing() {
    let mut s = Standby::new(0, Duration::from_millis(100), t0());
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
    assert_eq!(p.handle(PrimaryEvent::HandedOver), vec![PrimaryAction::SwitchoverEnded { handed_over: true }]);
    assert_eq!(p.state(), PrimaryState::SwitchedOver);
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
    assert_eq!(
        p.handle(PrimaryEvent::HandOverFailed),
        vec![PrimaryAction::ResumeVm, PrimaryAction::SwitchoverEnded { handed_over: false }]
    );
    assert_eq!(p.state(), PrimaryState::Protected);
    assert_eq!(p.generation(), 0, "nothing was recorded: the standby would still claim generation 1");
    assert_eq!(cp(&mut p), vec![PrimaryAction::Send { epoch: e + 1 }], "checkpoints go on");
    // The final capture failed (the shell resumed the VM).
    let mut p = protected();
    let e = p.epoch();
    p.handle(PrimaryEvent::Switchover);
    assert_eq!(
        p.handle(PrimaryEvent::CaptureFailed { epoch: e, at: t0() }),
        vec![PrimaryAction::ResumeVm, PrimaryAction::SwitchoverEnded { handed_over: false }]
    );
    assert_eq!(p.state(), PrimaryState::Protected);
    // The standby died meanwhile: arbitrate as for any failure, with the VM running again.
    let mut p = protected();
    let e = p.epoch();
    p.handle(PrimaryEvent::Switchover);
    p.handle(PrimaryEvent::Captured { epoch: e, output: Some(9), at: t0() });
    assert_eq!(
        p.handle(PrimaryEvent::PeerSilent),
        vec![
            PrimaryAction::DropStandby,
            PrimaryAction::ResumeVm,
            PrimaryAction::SwitchoverEnded { handed_over: false },
            PrimaryAction::Arbitrate { generation: 1 }
        ]
    );
    assert_eq!(p.held(), 1, "output stays held until the claim is decided");
    // The standby went silent while the hand-over was being recorded: that decides first.
    let mut p = protected();
    let e = p.epoch();
    p.handle(PrimaryEvent::Switchover);
    p.handle(PrimaryEvent::Captured { epoch: e, output: None, at: t0() });
    p.handle(PrimaryEvent::Acked { epoch: e });
    assert_eq!(p.handle(PrimaryEvent::PeerSilent), vec![PrimaryAction::DropStandby], "no competing claim");
    assert_eq!(
        p.handle(PrimaryEvent::HandOverFailed),
        vec![
            PrimaryAction::ResumeVm,
            PrimaryAction::SwitchoverEnded { handed_over: false },
            PrimaryAction::Arbitrate { generation: 1 }
        ],
        "nothing recorded: claim what the standby would claim"
    );
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
        vec![PrimaryAction::DropStandby, PrimaryAction::Release { ids: vec![1] }, PrimaryAction::StopProtecting]
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
    assert_eq!(
        p.handle(PrimaryEvent::TieBreakWon { generation: 1 }),
        vec![PrimaryAction::Release { ids: vec![] }, PrimaryAction::StopProtecting]
    );
    assert_eq!(p.state(), PrimaryState::Unprotected);
}

#[test]
fn turning_protection_off_drops_the_standby_once_the_tie_breaker_is_taken_and_tries_no_spare() {
    let mut p = protected();
    p.handle(PrimaryEvent::Output { id: 1 });
    assert_eq!(p.handle(PrimaryEvent::Unprotect), vec![PrimaryAction::Arbitrate { generation: 1 }]);
    assert_eq!(p.state(), PrimaryState::Replacing);
    assert_eq!(
        p.handle(PrimaryEvent::TieBreakWon { generation: 1 }),
        vec![PrimaryAction::DropStandby, PrimaryAction::Release { ids: vec![1] }, PrimaryAction::StopProtecting]
    );
    assert_eq!((p.state(), p.spares().current(), p.poll_timeout()), (PrimaryState::Unprotected, None, None));
    assert!(p.may_protect(), "a new standby may be named later");
    // Without the tie-breaker the standby stays (dropping it could let it go live).
    let mut p = protected();
    p.handle(PrimaryEvent::Unprotect);
    p.handle(PrimaryEvent::TieBreakUnreachable);
    assert_eq!(p.state(), PrimaryState::Protected);
    // A standby still receiving the initial copy holds nothing: dropped at once.
    let mut p = primary(0);
    p.handle_at(ms(0.0), PrimaryEvent::Protect { spares: vec![spare(1), spare(2)], after: Duration::ZERO });
    p.handle_timeout(ms(0.0));
    p.handle_at(ms(1.0), PrimaryEvent::Connected { digests: false });
    assert_eq!(p.state(), PrimaryState::Syncing);
    assert_eq!(
        p.handle_at(ms(2.0), PrimaryEvent::Unprotect),
        vec![PrimaryAction::DropStandby, PrimaryAction::Release { ids: vec![] }, PrimaryAction::StopProtecting]
    );
    assert_eq!((p.state(), p.poll_timeout()), (PrimaryState::Unprotected, None), "no spare follows");
    // Spares still to be tried are forgotten.
    let mut p = primary(0);
    p.handle_at(ms(0.0), PrimaryEvent::Protect { spares: vec![spare(1)], after: Duration::from_secs(1) });
    assert_eq!(p.handle_at(ms(1.0), PrimaryEvent::Unprotect), vec![]);
    assert_eq!(p.poll_timeout(), None);
}

// ---- the machine's own timers and the VM's end ----

fn spare(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn spares_are_connected_in_turn_and_retried_after_the_backoff() {
    let mut p = primary(0);
    p.handle_at(ms(0.0), PrimaryEvent::Protect { spares: vec![spare(1), spare(2)], after: Duration::ZERO });
    assert_eq!(p.handle_timeout(ms(0.0)), vec![PrimaryAction::Connect { peer: spare(1) }]);
    assert_eq!(p.poll_timeout(), None, "one connect at a time");
    assert!(!p.may_protect(), "x-smpft-protect waits for the attempt under way");
    p.handle_at(ms(5.0), PrimaryEvent::ConnectFailed { refused: false });
    assert_eq!(p.poll_timeout(), Some(ms(1005.0)), "the next spare after a pause");
    assert_eq!(p.handle_timeout(ms(1005.0)), vec![PrimaryAction::Connect { peer: spare(2) }]);
    // A standby that answered but is not this VM's is tried again much later.
    p.handle_at(ms(1010.0), PrimaryEvent::ConnectFailed { refused: true });
    assert!(p.poll_timeout().unwrap() >= ms(6010.0));
    // Connected: the copy starts; lost during it, the next spare after the reconnect pause.
    p.handle_timeout(p.poll_timeout().unwrap());
    p.handle_at(ms(7000.0), PrimaryEvent::Connected { digests: false });
    assert_eq!(p.state(), PrimaryState::Syncing);
    p.handle_at(ms(7100.0), PrimaryEvent::PeerSilent);
    assert_eq!(p.poll_timeout(), Some(ms(8100.0)));
    assert_eq!(p.spares().current(), Some(spare(2)), "the lost one is not tried first");
}

#[test]
fn a_comparing_standby_is_copied_once_its_digests_come() {
    let mut p = primary(0);
    assert_eq!(p.handle(PrimaryEvent::Connected { digests: true }), vec![]);
    assert_eq!(p.link(), LinkState::Digests);
    assert_eq!(p.handle(PrimaryEvent::Digests { valid: true })[0], PrimaryAction::StartSync);
    let mut p = primary(0);
    p.handle(PrimaryEvent::Connected { digests: true });
    assert_eq!(p.handle(PrimaryEvent::Digests { valid: false }), vec![PrimaryAction::DropStandby]);
    assert_eq!(p.link(), LinkState::None);
}

#[test]
fn a_switchover_not_acknowledged_in_time_is_off() {
    let mut p = protected();
    let e = p.epoch();
    p.handle_at(ms(0.0), PrimaryEvent::Switchover);
    p.handle(PrimaryEvent::Captured { epoch: e, output: None, at: ms(0.0) });
    assert_eq!(p.poll_timeout(), Some(ms(300.0)), "the acknowledgement is awaited this long");
    assert_eq!(
        p.handle_timeout(ms(300.0))[..2],
        [PrimaryAction::ResumeVm, PrimaryAction::SwitchoverEnded { handed_over: false }]
    );
    assert_eq!(p.state(), PrimaryState::Protected);
}

#[test]
fn an_ending_vm_commits_its_last_output_first() {
    let mut p = protected();
    p.handle(PrimaryEvent::Output { id: 1 });
    let e = p.epoch();
    assert_eq!(p.handle_at(ms(0.0), PrimaryEvent::Finish), vec![PrimaryAction::Capture { epoch: e }]);
    p.handle(PrimaryEvent::Captured { epoch: e, output: Some(2), at: ms(0.0) });
    assert_eq!(
        p.handle(PrimaryEvent::Acked { epoch: e }),
        vec![PrimaryAction::Release { ids: vec![1, 2] }, PrimaryAction::StopProtecting, PrimaryAction::Finished]
    );
    // Unacknowledged, the tie-breaker decides whether the last output may be shown...
    let mut p = protected();
    p.handle(PrimaryEvent::Output { id: 1 });
    let e = p.epoch();
    p.handle_at(ms(0.0), PrimaryEvent::Finish);
    p.handle(PrimaryEvent::Captured { epoch: e, output: None, at: ms(0.0) });
    assert_eq!(
        p.handle_timeout(ms(300.0)),
        vec![PrimaryAction::DropStandby, PrimaryAction::Arbitrate { generation: 1 }]
    );
    assert_eq!(
        p.handle(PrimaryEvent::TieBreakWon { generation: 1 }),
        vec![PrimaryAction::Release { ids: vec![1] }, PrimaryAction::StopProtecting, PrimaryAction::Finished]
    );
    // ...and one that cannot be reached in time means it is never shown.
    let mut p = protected();
    p.handle(PrimaryEvent::Output { id: 1 });
    p.handle_at(ms(0.0), PrimaryEvent::Finish);
    p.handle(PrimaryEvent::Captured { epoch: p.epoch(), output: None, at: ms(0.0) });
    p.handle_timeout(ms(300.0));
    p.handle_at(ms(310.0), PrimaryEvent::TieBreakUnreachable);
    assert_eq!(p.handle_timeout(ms(410.0)), vec![PrimaryAction::Arbitrate { generation: 1 }]);
    p.handle_at(ms(420.0), PrimaryEvent::TieBreakUnreachable);
    assert_eq!(p.handle_timeout(ms(600.0)), vec![PrimaryAction::Halt]);
    assert_eq!(p.held(), 0);
    // Unprotected, the VM ends at once.
    assert_eq!(primary(0).handle(PrimaryEvent::Finish), vec![PrimaryAction::Finished]);
}
