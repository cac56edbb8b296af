//! What the primary's machine is told and what it asks for: its settings, states, events and
//! actions.

use super::super::Epoch;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The primary's policy: when checkpoints are taken, how many may be in flight, and how long
/// each wait lasts. The machine applies it through its timer ([`Primary::poll_timeout`],
/// [`Primary::handle_timeout`]), in the style of quinn-proto: the shell only sleeps until the
/// deadline and carries out the actions.
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
    /// After a standby is lost or dropped, the next spare is tried this much later.
    pub reconnect_after: Duration,
    /// A standby that answered but was refused (another VM's, or an incompatible one) is tried
    /// again no sooner than this.
    pub refused_retry: Duration,
    /// A claim that could not reach the tie-breaker is made again this much later.
    pub arbitrate_retry: Duration,
    /// How long the final checkpoint of a switchover, or of a VM that ends, may wait for the
    /// standby's acknowledgement before the standby counts as silent.
    pub ack_timeout: Duration,
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
            reconnect_after: Duration::from_secs(1),
            refused_retry: Duration::from_secs(5),
            arbitrate_retry: Duration::from_millis(100),
            ack_timeout: Duration::from_millis(300),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryState {
    /// No standby: output flows at once. A spare may be connecting.
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
    /// Lost the tie-breaker: the VM must not run.
    Halted,
    /// Handed the VM over to the standby (a planned switchover): this copy must never run it
    /// again.
    SwitchedOver,
}

/// Where the connection to a standby is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    None,
    /// [`PrimaryAction::Connect`] is under way.
    Connecting,
    /// Connected; the standby is hashing its disks and the copy starts when the digests come.
    Digests,
    /// Connected and in use (syncing, protected, or being dropped).
    Attached,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryEvent {
    /// Protect the VM with these standbys, tried in turn, the first one `after` from now (none:
    /// stay unprotected). Ignored unless unprotected with no standby connecting.
    Protect {
        spares: Vec<SocketAddr>,
        after: Duration,
    },
    /// [`PrimaryAction::Connect`] reached a standby that was accepted; `digests` if it hashes
    /// its disks first (the copy then starts at [`PrimaryEvent::Digests`]).
    Connected {
        digests: bool,
    },
    /// [`PrimaryAction::Connect`] failed, or the standby was `refused` (not this VM's).
    ConnectFailed {
        refused: bool,
    },
    /// The standby's disk digests arrived (`valid`: they fit this VM's disks).
    Digests {
        valid: bool,
    },
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
    /// The VM is ending: a last checkpoint commits its last output, then
    /// [`PrimaryAction::Finished`].
    Finish,
    /// The guest produced `id` (an opaque handle to held bytes/frames) in the current epoch.
    Output {
        id: u64,
    },
    /// The standby acknowledged checkpoint `epoch` (acknowledgements are cumulative).
    Acked {
        epoch: Epoch,
    },
    /// The standby went silent, left, or its channel failed.
    PeerSilent,
    /// This copy was not running for longer than the standby's silence may last (the host
    /// stopped it): the standby may have declared it dead and taken the VM over meanwhile. An
    /// acknowledgement sent before that proves nothing now, so held output waits for the
    /// acknowledgement of a checkpoint taken after the stall (or is never shown, if the
    /// tie-breaker says the standby took over).
    Stalled,
    TieBreakWon {
        generation: u64,
    },
    TieBreakLost {
        generation: u64,
    },
    /// The tie-breaker could not be reached; the machine asks again later.
    TieBreakUnreachable,
    /// The standby's acknowledgements have lagged beyond the bound for the configured time.
    Lagging,
    /// The operator asked for a planned switchover to the standby.
    Switchover,
    /// The operator turned fault tolerance off: no spare is tried any more, and the standby is
    /// dropped (one that may hold a complete copy only once this side holds the tie-breaker
    /// above it, as a lagging one is replaced).
    Unprotect,
    /// The tie-breaker now names the standby at the generation of [`PrimaryAction::HandOver`],
    /// and the standby was told to go live: this copy must never run the VM again.
    HandedOver,
    /// The hand-over could not be made (the tie-breaker unreachable, the message not sent):
    /// nothing was recorded, and this copy keeps the VM.
    HandOverFailed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryAction {
    /// Connect to this standby; report [`PrimaryEvent::Connected`] or
    /// [`PrimaryEvent::ConnectFailed`].
    Connect { peer: SocketAddr },
    /// A new standby: the initial copy starts (the shell sets up its progress report and keeps
    /// every completed disk write from here).
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
    /// No standby any more: output flows without being held, and disk writes are no longer
    /// kept for one.
    StopProtecting,
    /// Ask the tie-breaker for the lock at `generation` (in the background); report
    /// [`PrimaryEvent::TieBreakWon`], [`PrimaryEvent::TieBreakLost`] or
    /// [`PrimaryEvent::TieBreakUnreachable`].
    Arbitrate { generation: u64 },
    /// Stop the VM now; release nothing more (what is held is never shown).
    Halt,
    /// Drop the channel to the standby (it is gone, failed the copy, or is replaced).
    DropStandby,
    /// As [`PrimaryAction::Capture`], for the final checkpoint of a switchover: the VM stays
    /// paused after it (resumed, and [`PrimaryEvent::CaptureFailed`] reported, if it fails).
    CaptureFinal { epoch: Epoch },
    /// The standby holds the final checkpoint `epoch`: record the standby as the tie-breaker's
    /// holder at `generation` and tell it to go live (in the background); report
    /// [`PrimaryEvent::HandedOver`], [`PrimaryEvent::HandOverFailed`] or
    /// [`PrimaryEvent::TieBreakLost`].
    HandOver { epoch: Epoch, generation: u64 },
    /// Resume the VM paused for a switchover that did not happen.
    ResumeVm,
    /// The switchover asked for is over: the VM was handed over, or it runs on here.
    SwitchoverEnded { handed_over: bool },
    /// The VM may end now ([`PrimaryEvent::Finish`]): its last output is out, or could not be
    /// committed and is never shown.
    Finished,
}
