//! Per-thread seccomp filters.
//!
//! Every thread smpft starts says what kind of thread it is ([`Kind`]) before it takes any
//! input, and [`enter`] installs that kind's filter on it: the system calls the kind makes and
//! nothing else. A vCPU thread, which runs the guest and its device emulation, may issue KVM
//! ioctls and read and write the descriptors it was given, but cannot open a file, create a
//! socket or start a program; a QMP client thread may only read its socket and hand requests on.
//!
//! The main thread (the VM's owner: it builds VMs, starts threads, runs failovers and claims the
//! tie-breaker) takes the [`Kind::Control`] filter first thing, before any other thread exists,
//! so every thread inherits it: a deny list of the calls that administer the kernel rather than
//! run a VM (loading modules, kexec, mounting, tracing other processes, BPF, ...). A filter only
//! ever narrows what a thread may do: the threads a kind starts have its filter and their own.
//!
//! [`Mode`] is the action on a call a filter does not allow: kill the process (the default), log
//! it to the kernel's audit log (type 1326) and let it proceed, or install no filter at all.

mod table;

pub use table::{Call, Rule};

use seccompiler::{BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};

/// What happens to a system call a thread's filter does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The whole process is killed (SIGSYS): the default.
    Kill,
    /// The call is logged to the kernel's audit log (`dmesg`: `audit: type=1326`, with the
    /// thread's name as `comm` and the call's number) and proceeds.
    Log,
    /// No filters.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "kill" => Ok(Mode::Kill),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            other => Err(format!("'{other}' is not one of kill, log, off")),
        }
    }
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Kill => "kill",
            Mode::Log => "log",
            Mode::Off => "off",
        }
    }
}

/// The kinds of thread, each with its own filter (see [`table`] for what each may call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The main thread and the threads that act for it (tie-breaker claims, connects, closes).
    Control,
    /// A vCPU: runs the guest and emulates its devices' registers and queues.
    Vcpu,
    /// A device's I/O thread: frames from a tap, bytes from a serial or console socket.
    Device,
    /// The FT channel: its QUIC runtime's threads, the checkpoint sender, the listener.
    Channel,
    /// The QMP server: accepts monitor clients and reads their commands.
    Qmp,
    /// Storage: an NBD export's server and its clients, the storage daemon's watcher.
    Storage,
    /// Writes a snapshot's pages to its file.
    Snapshot,
    /// Runs the operator's event hook programs (which inherit this filter).
    Hook,
    /// Serves the Prometheus metrics over HTTP.
    Metrics,
    /// Waits for signals and relays them to the owner.
    Signals,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Control,
        Kind::Vcpu,
        Kind::Device,
        Kind::Channel,
        Kind::Qmp,
        Kind::Storage,
        Kind::Snapshot,
        Kind::Hook,
        Kind::Metrics,
        Kind::Signals,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Control => "control",
            Kind::Vcpu => "vcpu",
            Kind::Device => "device",
            Kind::Channel => "channel",
            Kind::Qmp => "qmp",
            Kind::Storage => "storage",
            Kind::Snapshot => "snapshot",
            Kind::Hook => "hook",
            Kind::Metrics => "metrics",
            Kind::Signals => "signals",
        }
    }

    /// Calls the kind's threads do not make themselves, but glibc may on any thread, and copes
    /// with their failing: they fail with EACCES instead of ending the process. `openat`:
    /// glibc's malloc reads `/proc/sys/vm/overcommit_memory` once, on whichever thread first
    /// gives memory back to the system. A thread of an allow-list kind opens no file.
    pub fn quiet_refusals(self) -> Vec<Call> {
        match self {
            Kind::Control | Kind::Hook | Kind::Snapshot => Vec::new(),
            _ => table::quiet_refusals(),
        }
    }

    /// The threads of this kind, by name.
    pub fn threads(self) -> &'static str {
        match self {
            Kind::Control => "main, ft-claim, ft-hand-over",
            Kind::Vcpu => "vcpuN",
            Kind::Device => "serial-in, serial-out, virtio-serial, net-rx-TAP, net-announce",
            Kind::Channel => "ft-channel, ft-connect, ft-accept, ft-send, ft-close",
            Kind::Qmp => "qmp-accept, qmp-client, qmp-connect",
            Kind::Storage => "qsd-watch, nbd-export, nbd-client",
            Kind::Snapshot => "snapshot-write",
            Kind::Hook => "event-hook, event-hook-wait, and the programs they start",
            Kind::Metrics => "metrics",
            Kind::Signals => "signals, signal-relay",
        }
    }

    /// Whether the kind's filter lists what it may not call (the rest allowed) rather than
    /// what it may.
    pub fn denies(self) -> bool {
        matches!(self, Kind::Control | Kind::Hook)
    }

    /// The calls on the kind's list: those it may make, or for a deny list those it may not.
    pub fn calls(self) -> Vec<Call> {
        table::calls(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("the {kind} thread's seccomp filter cannot be built: {why}")]
    Build { kind: &'static str, why: String },
    #[error("the {kind} thread's seccomp filter cannot be installed: {why}")]
    Install { kind: &'static str, why: String },
}

/// The process's mode; 0 while [`enable`] was not called (library use, unit tests: no filters).
static MODE: AtomicU8 = AtomicU8::new(0);

fn mode() -> Option<Mode> {
    match MODE.load(Ordering::Relaxed) {
        1 => Some(Mode::Kill),
        2 => Some(Mode::Log),
        _ => None,
    }
}

/// Turns filters on for this process with `mode`, and installs the [`Kind::Control`] filter on
/// the calling thread, which must be the main thread before it starts any other.
pub fn enable(mode: Mode) -> Result<(), ConfineError> {
    let v = match mode {
        Mode::Kill => 1,
        Mode::Log => 2,
        Mode::Off => return Ok(()),
    };
    MODE.store(v, Ordering::Relaxed);
    install(Kind::Control, mode)?;
    probe::after_enter(Kind::Control);
    Ok(())
}

/// Installs `kind`'s filter on the calling thread, if filters are on. A thread calls this
/// first thing, before it takes input. Failing to install is fatal with `--seccomp kill` (the
/// thread would run unconfined): the process exits with a line naming the kind.
pub fn enter(kind: Kind) {
    let Some(mode) = mode() else { return };
    if let Err(e) = install(kind, mode) {
        tracing::error!("{e}");
        if mode == Mode::Kill {
            eprintln!("smpft: error: {e}");
            std::process::exit(70);
        }
    }
    probe::after_enter(kind);
}

fn install(kind: Kind, mode: Mode) -> Result<(), ConfineError> {
    let apply = |p: &BpfProgram| {
        seccompiler::apply_filter(p).map_err(|e| ConfineError::Install { kind: kind.name(), why: e.to_string() })
    };
    // The quiet refusals first: a filter stacked on it cannot undo its errno (the kernel takes
    // the strictest answer of all the filters).
    if let Some(p) = quiet_program(kind)? {
        apply(&p)?;
    }
    apply(&program(kind, mode)?)
}

/// The filter that answers `kind`'s [`Kind::quiet_refusals`] with EACCES, if it has any.
pub fn quiet_program(kind: Kind) -> Result<Option<BpfProgram>, ConfineError> {
    let build = |why: String| ConfineError::Build { kind: kind.name(), why };
    let calls = kind.quiet_refusals();
    if calls.is_empty() {
        return Ok(None);
    }
    let rules = calls.iter().map(|c| (c.nr, Vec::new())).collect();
    let refuse = SeccompAction::Errno(libc::EACCES as u32);
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, refuse, seccompiler::TargetArch::x86_64)
        .map_err(|e| build(e.to_string()))?;
    filter.try_into().map(Some).map_err(|e: seccompiler::BackendError| build(e.to_string()))
}

/// An argument condition: (argument, comparison, value).
type Condition = (u8, SeccompCmpOp, u64);

/// The BPF program of `kind`'s filter with `mode`'s action.
pub fn program(kind: Kind, mode: Mode) -> Result<BpfProgram, ConfineError> {
    let build = |why: String| ConfineError::Build { kind: kind.name(), why };
    let refuse = match mode {
        Mode::Kill => SeccompAction::KillProcess,
        Mode::Log | Mode::Off => SeccompAction::Log,
    };
    // Per call, the argument conditions under which it matches (any one of them); an
    // unconditional entry (None) wins over conditional ones.
    let mut by_call: BTreeMap<i64, Option<Vec<Condition>>> = BTreeMap::new();
    // The quiet refusals pass this filter: the one stacked under it answers them.
    let quiet = kind.quiet_refusals();
    for call in kind.calls().into_iter().chain(quiet.into_iter().filter(|_| !kind.denies())) {
        let entry = by_call.entry(call.nr).or_insert_with(|| Some(Vec::new()));
        let condition = match call.rule {
            Rule::Any => None,
            Rule::ArgMasked { arg, mask, value } => Some((arg, SeccompCmpOp::MaskedEq(mask), value)),
            Rule::ArgEq { arg, value } => Some((arg, SeccompCmpOp::Eq, value)),
            // SAFETY: getpid has no preconditions.
            Rule::OwnPid { arg } => Some((arg, SeccompCmpOp::Eq, unsafe { libc::getpid() } as u64)),
        };
        match (condition, entry.as_mut()) {
            (None, _) => *entry = None,
            (Some(c), Some(list)) => list.push(c),
            (Some(_), None) => {}
        }
    }
    // Every argument filtered is a C int (ioctl's request too, to the kernel): its low 32 bits.
    let mut rules = BTreeMap::new();
    for (nr, conditions) in by_call {
        let mut list = Vec::new();
        for (arg, op, value) in conditions.unwrap_or_default() {
            let c = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(|e| build(e.to_string()))?;
            list.push(seccompiler::SeccompRule::new(vec![c]).map_err(|e| build(e.to_string()))?);
        }
        rules.insert(nr, list);
    }
    let (mismatch, matched) =
        if kind.denies() { (SeccompAction::Allow, refuse) } else { (refuse, SeccompAction::Allow) };
    let filter = SeccompFilter::new(rules, mismatch, matched, seccompiler::TargetArch::x86_64)
        .map_err(|e| build(e.to_string()))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| build(e.to_string()))
}

pub mod probe;

/// The filter table as Markdown (the README's table is this text): each kind, the threads that
/// have it, and its list; what every allow list has is given once, first.
pub fn table_markdown() -> String {
    let common = table::base();
    let mut out = String::from("| thread kind | threads | system calls |\n|---|---|---|\n");
    out.push_str(&format!("| (every allow list) | all but control and hook | {} |\n", describe(&common)));
    for kind in Kind::ALL {
        let calls = kind.calls();
        let mut list = match kind.denies() {
            true => format!("all but: {}", describe(&calls)),
            false => {
                let own: Vec<Call> = calls.into_iter().filter(|c| !common.contains(c)).collect();
                format!("the common list, and: {}", describe(&own))
            }
        };
        let quiet: Vec<&str> = kind.quiet_refusals().iter().map(|c| c.name).collect();
        if !quiet.is_empty() {
            list.push_str(&format!("; {} fail with EACCES", quiet.join(", ")));
        }
        out.push_str(&format!("| {} | {} | {} |\n", kind.name(), kind.threads(), list));
    }
    out
}

/// The calls, with their argument conditions, comma-separated.
fn describe(calls: &[Call]) -> String {
    let mut names: Vec<String> = Vec::new();
    for c in calls {
        let text = match c.rule {
            Rule::Any => c.name.to_string(),
            Rule::ArgMasked { mask: 0xff00, value, .. } if c.nr == libc::SYS_ioctl => {
                format!("ioctl (KVM's, type 0x{:02x})", value >> 8)
            }
            Rule::ArgMasked { .. } => format!("{} (on a descriptor only)", c.name),
            Rule::ArgEq { value, .. } => format!("{} ({})", c.name, table::arg_name(c.nr, value)),
            Rule::OwnPid { .. } => format!("{} (its own process)", c.name),
        };
        if !names.contains(&text) {
            names.push(text);
        }
    }
    names.join(", ")
}

#[cfg(test)]
mod tests;
