//! A copy's life after it starts: serving the running VM until it ends, a standby's watch
//! ending (going live, or why not), and, after a planned switchover, waiting again as the
//! standby of the copy it handed the VM to (`--then-standby`).

use crate::{bind_qmp, CliError, Qmp, EXIT_HALTED};
use smp_ft::error::error_chain;
use smp_ft::ft::disk::DiskSync;
use smp_ft::ft::primary::PrimaryFt;
use smp_ft::ft::standby::{StandbyEnd, StandbyOptions, StandbyRunner};
use smp_ft::ft::FtOptions;
use smp_ft::runner::{Outcome, Runner};
use smp_ft::vmm::{VmConfig, VmEvent};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

/// Where the signals go now: the running VM's events, or a standby's. One relay thread for
/// the process, whatever role it moves through.
static SIGNAL_TARGET: Mutex<Option<crossbeam_channel::Sender<VmEvent>>> = Mutex::new(None);
static RELAY: std::sync::Once = std::sync::Once::new();

/// After a switchover, when the new primary first tries the copy that handed the VM over.
const RETURN_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// Passes the signals `forward_signals` catches on to `to` (from now on, instead of wherever
/// they went before).
pub(crate) fn relay_signals(from: crossbeam_channel::Receiver<VmEvent>, to: crossbeam_channel::Sender<VmEvent>) {
    retarget_signals(to);
    RELAY.call_once(|| {
        std::thread::Builder::new()
            .name("signal-relay".into())
            .spawn(move || {
                confine::enter(confine::Kind::Signals);
                for ev in from {
                    if let Some(to) = &*SIGNAL_TARGET.lock().unwrap_or_else(|e| e.into_inner()) {
                        let _ = to.send(ev);
                    }
                }
            })
            .expect("spawn signal relay thread");
    });
}

/// Sends the signals the relay passes on to `to` from now on.
fn retarget_signals(to: crossbeam_channel::Sender<VmEvent>) {
    *SIGNAL_TARGET.lock().unwrap_or_else(|e| e.into_inner()) = Some(to);
}

/// What a copy needs to wait as a standby again after handing its VM over: its FT settings,
/// the VM's shape and host resources, its QMP socket, and its spares for when it goes live.
pub(crate) struct Rejoin {
    pub ft: FtOptions,
    /// The VM as a standby builds it (no payload).
    pub config: VmConfig,
    pub qmp: Option<PathBuf>,
    /// `--then-standby`: where to listen unless the switchover names another address.
    pub listen: Option<String>,
    pub spares: Vec<SocketAddr>,
}

/// Serves the VM until it ends; after a switchover, stands by again if `rejoin` says where.
pub(crate) fn serve(runner: Runner, rejoin: Option<Rejoin>) -> Result<ExitCode, CliError> {
    let runner = match &rejoin {
        Some(r) => runner.can_rejoin(r.listen.clone()),
        None => runner,
    };
    match runner.run()? {
        Outcome::GuestExit(status) => Ok(ExitCode::from(status.min(255) as u8)),
        Outcome::Quit => Ok(ExitCode::SUCCESS),
        Outcome::Signal(sig) => Ok(ExitCode::from(128 + sig as u8)),
        Outcome::Halted => Ok(ExitCode::from(EXIT_HALTED)),
        Outcome::SwitchedOver { then_standby } => match (then_standby, rejoin) {
            (Some(listen), Some(rejoin)) => stand_by_again(&listen, rejoin),
            _ => {
                tracing::info!("switched over; this copy is done");
                Ok(ExitCode::SUCCESS)
            }
        },
    }
}

/// After a switchover: the same VM shape, the same disks (they hold the state as of the
/// hand-over, so the new primary sends only what changed since) and taps, as a standby.
fn stand_by_again(listen: &str, rejoin: Rejoin) -> Result<ExitCode, CliError> {
    let addr = smp_ft::ft::error::resolve(listen)?;
    let disk_sync = if rejoin.config.devices.disks.is_empty() { DiskSync::Full } else { DiskSync::Compare };
    let opts = StandbyOptions { ft: rejoin.ft.clone(), listen: addr, config: rejoin.config.clone(), disk_sync };
    let qmp = bind_qmp(rejoin.qmp.as_deref())?;
    let (tx, rx) = crossbeam_channel::unbounded();
    retarget_signals(tx);
    tracing::info!(%addr, "switched over; waiting as the standby of the new primary");
    let end = StandbyRunner::new(&opts, qmp.as_ref().map(|(_, rx)| rx.clone()), rx.clone())?.run()?;
    standby_ended(end, rejoin.ft.clone(), rejoin.spares.clone(), qmp, rx, None, Some(rejoin))
}

/// What a standby does when its watch ends: run the VM if it won (with `extension` answering
/// what the runner does not), or exit with the status that says why not.
pub(crate) fn standby_ended(
    end: StandbyEnd,
    ft: FtOptions,
    spares: Vec<SocketAddr>,
    qmp: Qmp,
    sig_rx: crossbeam_channel::Receiver<VmEvent>,
    extension: Option<Box<dyn smp_ft::runner::Extension>>,
    rejoin: Option<Rejoin>,
) -> Result<ExitCode, CliError> {
    match end {
        StandbyEnd::Live { vm, generation, epoch, handover, background } => {
            let running = (*vm).start()?;
            running.announce_network();
            relay_signals(sig_rx, running.event_sender());
            // After a switchover, the copy that handed over waits as a standby: first in line.
            let mut spares = spares;
            let back = handover.as_ref().and_then(|h| h.return_to.as_deref());
            if let Some(back) = back {
                match smp_ft::ft::error::resolve(back) {
                    Ok(a) => {
                        spares.retain(|s| *s != a);
                        spares.insert(0, a);
                    }
                    Err(e) => tracing::warn!("the previous primary's standby address {back}: {}", error_chain(&e)),
                }
            }
            let how = if handover.is_some() { "after a switchover" } else { "after failover" };
            tracing::info!(epoch, generation, "VM running (live {how}); protect it again with QMP x-smpft-protect");
            if let Some((server, _)) = &qmp {
                // The VM runs here now (libvirt shows the domain running on this event).
                server.emit("RESUME", None);
            }
            let mut ft = PrimaryFt::new(ft, &running, spares, Some(generation))?;
            if back.is_some() {
                // The copy that handed over stops its VM and listens again within ~100 ms.
                ft.first_attempt_after(RETURN_WAIT);
            }
            let runner = Runner::new(running, qmp, Some(ft));
            let served = serve(
                match extension {
                    Some(e) => runner.with_extension(e),
                    None => runner,
                },
                rejoin,
            );
            // What the watch left ending (its channel closing, a snapshot being written).
            drop(background);
            served
        }
        end => {
            // The copy ends without having run: say why on QMP as QEMU would (a supervisor such
            // as libvirt records a process that exits without SHUTDOWN as crashed).
            let (reason, guest, code) = match end {
                StandbyEnd::PrimaryEnded(_) => ("guest-shutdown", true, ExitCode::SUCCESS),
                StandbyEnd::Quit => ("host-qmp-quit", false, ExitCode::SUCCESS),
                StandbyEnd::Halted => ("ft-tie-breaker-lost", false, ExitCode::from(EXIT_HALTED)),
                StandbyEnd::Signal(sig) => ("host-signal", false, ExitCode::from(128 + sig as u8)),
                StandbyEnd::Live { .. } => unreachable!("handled above"),
            };
            if let Some((server, _)) = qmp {
                server.emit("SHUTDOWN", Some(serde_json::json!({"guest": guest, "reason": reason})));
                server.stop();
            }
            Ok(code)
        }
    }
}
