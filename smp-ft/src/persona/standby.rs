//! A libvirt domain that is an FT standby (`<smpft:role>standby</smpft:role>`): it is started
//! with `virsh start --paused`, waits for its primary and runs no vCPU, so libvirt shows it
//! paused. `virsh resume` is refused with the reason. When it goes live after a failover it
//! emits RESUME, and libvirt shows it running.
//!
//! libvirt asks its start-up questions before any VM exists here; the persona's answers take
//! them with no VM (the serial port's reserved terminal, the devices), and the same answers
//! serve the running VM once live.

use super::domain::Answers;
use super::libvirt_ft::Settings;
use crate::{error_chain, FtArgs};
use clap::Parser;
use smp_ft::ft::disk::DiskSync;
use smp_ft::ft::standby::{StandbyOptions, StandbyRunner};
use smp_ft::ft::FtOptions;
use smp_ft::vmm::VmConfig;
use std::process::ExitCode;

/// The FT options the settings name, through `smpft run`'s own option parser and checks.
pub fn ft_options(s: &Settings) -> Result<FtOptions, String> {
    #[derive(Parser)]
    struct Ft {
        #[command(flatten)]
        ft: FtArgs,
    }
    let mut argv = vec!["smpft".to_string()];
    for (key, opt) in [
        ("identity", "--identity"),
        ("peer-cert", "--peer-cert"),
        ("tiebreak", "--tiebreak"),
        ("interval", "--ft-interval"),
        ("timeout", "--ft-timeout"),
        ("heartbeat", "--ft-heartbeat"),
    ] {
        if let Some(v) = s.get(key) {
            argv.extend([opt.to_string(), v.to_string()]);
        }
    }
    let ft = Ft::try_parse_from(argv).map_err(|e| format!("FT metadata: {}", e.kind()))?;
    ft.ft.options().map_err(|e| format!("FT metadata: {}", error_chain(&e)))
}

pub fn run(name: &str, s: &Settings, config: VmConfig, qmp: crate::Qmp, answers: Answers) -> Result<ExitCode, String> {
    let ft = ft_options(s)?;
    let listen = s.get("listen").unwrap_or_default();
    let listen = listen.parse().map_err(|_| format!("FT metadata: <listen>{listen}</listen> is not ADDRESS:PORT"))?;
    // A standby's <peer> lists the spares it protects the VM with once it has gone live.
    let spares = match s.get("peer") {
        Some(p) => smp_ft::ft::error::resolve_all(p).map_err(|e| format!("FT peer {p}: {}", error_chain(&e)))?,
        None => Vec::new(),
    };
    let opts = StandbyOptions { ft: ft.clone(), listen, config, disk_sync: DiskSync::Full };
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
    crate::standby_ended(end, ft, spares, Some((server, requests)), sig_rx, answers, None).map_err(|e| error_chain(&e))
}
