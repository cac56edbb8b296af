//! What the command line adds for operators: the metrics endpoint, the event program, the VM's
//! name in both, JSON logs and `smpft status` (see `smp_ft::observe`).

use crate::CliError;
use smp_ft::observe;
use smp_ft::units::parse_duration;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    /// One JSON object a line: timestamp, level, message and the event's fields.
    Json,
}

/// Operators' view of a copy: its name, metrics and event program.
#[derive(clap::Args, Clone)]
pub(crate) struct ObserveArgs {
    /// The VM's name in metrics labels, event hooks and `smpft status` (both copies of a pair
    /// give the same).
    #[arg(long, default_value = "vm")]
    pub(crate) name: String,
    /// The VM's UUID, for the same.
    #[arg(long)]
    pub(crate) uuid: Option<String>,
    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics, e.g. 127.0.0.1:9740.
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) metrics: Option<SocketAddr>,
    /// Run PROGRAM (directly, not through a shell) on each FT state change, in the background,
    /// with SMPFT_EVENT (protected, unprotected, live-after-failover, standby-replaced,
    /// switched-over, lost-tie-breaker, stood-down), SMPFT_VM, SMPFT_UUID, SMPFT_ROLE,
    /// SMPFT_STATE, SMPFT_PREVIOUS_STATE, SMPFT_PEER, SMPFT_GENERATION and SMPFT_EPOCH set.
    #[arg(long, value_name = "PROGRAM")]
    pub(crate) on_event: Option<PathBuf>,
    /// How long the event program may run before it is killed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) on_event_timeout: Duration,
}

impl ObserveArgs {
    /// Starts what was asked; `qmp`: the copy's QMP socket, registered for `smpft status`
    /// (until the returned registration is dropped).
    pub(crate) fn start(&self, qmp: Option<&Path>) -> Result<Option<observe::status::Registration>, CliError> {
        start(&self.name, self.uuid.as_deref(), self.metrics, self.on_event.clone(), self.on_event_timeout, qmp)
    }
}

/// The observer's settings, from the command line or a libvirt domain's metadata.
pub(crate) fn start(
    name: &str,
    uuid: Option<&str>,
    metrics: Option<SocketAddr>,
    on_event: Option<PathBuf>,
    timeout: Duration,
    qmp: Option<&Path>,
) -> Result<Option<observe::status::Registration>, CliError> {
    observe::get().set_vm(name, uuid);
    if let Some(addr) = metrics {
        observe::metrics::serve(addr).map_err(|e| CliError::Usage(format!("--metrics {addr}: {e}")))?;
    }
    if let Some(program) = on_event {
        DRAIN.get_or_init(|| timeout);
        observe::hook::install(program.clone(), timeout)
            .map_err(|e| CliError::Usage(format!("--on-event {}: {e}", program.display())))?;
    }
    Ok(qmp.and_then(|q| observe::status::register(name, q)))
}

/// A libvirt domain's: its name and UUID, and the metadata's elements (errors name them).
pub(crate) fn from_libvirt(
    launch: &qemu_shim::argv::Launch,
    name: &str,
    qmp: &crate::Qmp,
) -> Result<Option<observe::status::Registration>, String> {
    if let Some((server, _)) = qmp {
        observe::get().set_qmp(server);
    }
    let key = crate::persona::libvirt_ft::key(launch, name);
    let s = crate::persona::libvirt_ft::for_domain(&key).unwrap_or_default();
    let metrics = s
        .get("metrics")
        .map(|m| m.parse().map_err(|e| format!("smpft metadata <metrics>{m}</metrics>: {e}")))
        .transpose()?;
    let timeout = s
        .get("on-event-timeout")
        .map(|t| parse_duration(t).map_err(|e| format!("smpft metadata <on-event-timeout>: {e}")))
        .transpose()?
        .unwrap_or(Duration::from_secs(10));
    let path = launch.monitors.iter().find_map(|m| match m {
        qemu_shim::argv::Monitor::Wait(w) => match &**w {
            qemu_shim::argv::Monitor::Path(p) => Some(p.clone()),
            _ => None,
        },
        qemu_shim::argv::Monitor::Path(p) => Some(p.clone()),
        _ => None,
    });
    start(name, launch.uuid.as_deref(), metrics, s.get("on-event").map(PathBuf::from), timeout, path.as_deref())
        .map_err(|e| crate::error_chain(&e))
}

/// How long the process waits at its end for event hooks still queued.
static DRAIN: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// At the end of the process: the event hooks still queued run (bounded by their timeout).
pub(crate) fn finish() {
    if let Some(t) = DRAIN.get() {
        observe::hook::drain(*t + Duration::from_secs(1));
    }
}

#[derive(clap::Args)]
pub(crate) struct StatusArgs {
    /// Ask these QMP sockets instead of those registered (repeatable).
    #[arg(long, value_name = "PATH")]
    qmp: Vec<PathBuf>,
    /// The runtime directory to look in (default $SMPFT_RUNTIME_DIR, else /run/smpft/qmp).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// One JSON array of objects instead of lines.
    #[arg(long)]
    json: bool,
}

/// `smpft status`.
pub(crate) fn status(args: &StatusArgs) -> Result<ExitCode, CliError> {
    let sockets = if args.qmp.is_empty() {
        let dir = args.dir.clone().unwrap_or_else(observe::status::runtime_dir);
        match observe::status::registered(&dir) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(CliError::Usage(format!("cannot read {}: {e}", dir.display()))),
        }
    } else {
        args.qmp.clone()
    };
    let found: Vec<serde_json::Value> = sockets.iter().map(|s| observe::status::describe(s)).collect();
    if args.json {
        println!("{}", serde_json::Value::Array(found));
    } else {
        for v in &found {
            println!("{}", observe::status::line(v));
        }
    }
    Ok(ExitCode::SUCCESS)
}
