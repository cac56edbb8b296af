//! A libvirt domain that is an FT standby (`<smpft:role>standby</smpft:role>`): it is started
//! with `virsh start --paused`, waits for its primary and runs no vCPU, so libvirt shows it
//! paused. `virsh resume` is refused with the reason. When it goes live after a failover it
//! emits RESUME, and libvirt shows it running.
//!
//! libvirt asks its start-up questions before any VM exists here; the persona's answers take
//! them with no VM (the serial port's reserved terminal, the devices), and the same answers
//! serve the running VM once live.

use super::domain::Answers;
use super::libvirt_ft::DomainFt;
use crate::error_chain;
use smp_ft::ft::standby::{StandbyOptions, StandbyRunner};
use smp_ft::vmm::VmConfig;
use std::process::ExitCode;

pub fn run(name: &str, ft: DomainFt, config: VmConfig, qmp: crate::Qmp, answers: Answers) -> Result<ExitCode, String> {
    let listen = ft.listen.ok_or("an FT standby domain needs <smpft:listen>")?;
    let opts = StandbyOptions { ft: ft.opts.clone(), listen, config, disk_sync: ft.disk_sync };
    let (server, requests) = qmp.ok_or("an FT standby domain needs a monitor")?;
    let (sig_tx, sig_rx) = crossbeam_channel::unbounded();
    crate::forward_signals(sig_tx);
    let mut runner = StandbyRunner::new(&opts, Some(requests.clone()), sig_rx.clone())
        .map_err(|e| error_chain(&e))?
        .with_extension(Box::new(answers));
    tracing::info!(domain = %name, listen = %opts.listen, "FT standby domain waiting for its primary");
    let end = runner.run().map_err(|e| error_chain(&e))?;
    let answers = runner.take_extension();
    drop(runner);
    // A standby's <peer> lists the spares it protects the VM with once it has gone live.
    crate::standby_ended(end, ft.opts, ft.peers, Some((server, requests)), sig_rx, answers, None)
        .map_err(|e| error_chain(&e))
}
