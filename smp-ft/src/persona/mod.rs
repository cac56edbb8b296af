//! The QEMU persona: smpft started as libvirt starts its emulator, with QEMU's command line.
//! It is chosen by the program name (a link named `qemu-system-x86_64`, `kvm` as Proxmox VE
//! runs it, `smpft-qemu` or anything ending in `-qemu`) or by `smpft qemu ARGS`.
//!
//! libvirt runs the emulator two ways (see `qemu_shim::argv` for the command line):
//! - **probe** (`-machine none ... -qmp unix:PATH -pidfile PATH -daemonize`): no VM; smpft
//!   answers libvirt's questions about itself (`qemu_shim::probe`) until libvirt kills it. The
//!   pidfile is written and the socket listens before the parent exits, and the daemon lets go
//!   of the standard streams, which libvirt reads to their end.
//! - **domain** (`-name guest=... -chardev socket,fd=N ... -mon ...`): a VM, run as `smpft run`
//!   would run it, with QMP on the listening socket libvirt passes, never forking (libvirt
//!   records this process's pid). See [`domain`].

mod block_info;
mod daemon;
mod domain;
pub mod libvirt_ft;
mod pci;
mod standby;
mod taps;

use qemu_shim::argv::{self, Launch, Monitor};
use qemu_shim::qmp::QmpServer;
use std::process::ExitCode;

/// The QMP greeting's and `query-version`'s package string.
pub const PACKAGE: &str = concat!("smpft ", env!("CARGO_PKG_VERSION"));

/// Whether smpft was started as the persona: by a program name, or as `smpft qemu`. Returns
/// QEMU's arguments (without the program name) if so.
pub fn invoked(args: &[String]) -> Option<Vec<String>> {
    let prog = args.first().map(std::path::Path::new).and_then(|p| p.file_name()).and_then(|n| n.to_str());
    let prog = prog.unwrap_or_default();
    // Proxmox VE runs its emulator as /usr/bin/kvm.
    if prog.starts_with("qemu-system") || prog.ends_with("-qemu") || prog == "kvm" {
        return Some(args[1..].to_vec());
    }
    if args.get(1).map(String::as_str) == Some("qemu") {
        let rest = &args[2..];
        return Some(rest.strip_prefix(&["--".to_string()]).unwrap_or(rest).to_vec());
    }
    None
}

/// Runs the persona with QEMU's arguments; errors go to standard error as one line, which
/// libvirt shows to the operator.
pub fn main(args: &[String]) -> ExitCode {
    let launch = match argv::parse(args) {
        Ok(l) => l,
        Err(e) => return refuse(&e.to_string()),
    };
    if launch.version {
        println!("QEMU emulator version 7.2.0 ({PACKAGE}: the QMP commands smpft implements behave as QEMU 7.2's)");
        return ExitCode::SUCCESS;
    }
    if let Err(e) =
        crate::init_logging(&std::env::var("SMPFT_LOG").unwrap_or_else(|_| "info".into()), crate::ops::LogFormat::Text)
    {
        eprintln!("smpft (QEMU persona): {e}");
        return ExitCode::from(1);
    }
    // SMPFT_SECCOMP (as `--seccomp`) over `-sandbox`; kill when neither is given.
    let seccomp = match std::env::var("SMPFT_SECCOMP") {
        Ok(v) => match v.parse() {
            Ok(m) => m,
            Err(e) => return refuse(&format!("smpft (QEMU persona): SMPFT_SECCOMP: {e}")),
        },
        Err(_) => launch.seccomp.unwrap_or(confine::Mode::Kill),
    };
    if let Err(e) = confine::enable(seccomp) {
        return refuse(&format!("smpft (QEMU persona): {e}"));
    }
    if let Err(e) = smp_ft::config::hooks::init() {
        return refuse(&format!("smpft (QEMU persona): {e}"));
    }
    for i in &launch.ignored {
        tracing::debug!("QEMU option with nothing to do in smpft: {i}");
    }
    // One line per device the stacks add by habit and smpft does not have.
    if !launch.probe {
        for l in &launch.left_out {
            tracing::warn!("{l}");
        }
    }
    let r = if launch.probe { probe(&launch) } else { domain::run(launch) };
    match r {
        Ok(code) => code,
        Err(e) => refuse(&format!("smpft (QEMU persona): {e}")),
    }
}

/// Reports why the persona cannot go on, on standard error, and gives up. libvirt collects that
/// line through virtlogd when it sees the process end; a short wait lets it arrive first, or
/// `virsh start` would say only that the emulator closed its monitor.
fn refuse(why: &str) -> ExitCode {
    eprintln!("{why}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    ExitCode::from(1)
}

/// Serves libvirt's capability probe until it ends the process.
fn probe(launch: &Launch) -> Result<ExitCode, String> {
    let path = match launch.monitors.first() {
        Some(Monitor::Path(p)) => p.clone(),
        Some(Monitor::Fd(fd)) => {
            return Err(format!("a probe monitor on fd {fd} is not supported; use -qmp unix:PATH"))
        }
        Some(other) => return Err(format!("a probe monitor must be -qmp unix:PATH,server=on,wait=off, not {other:?}")),
        None => return Err("a probe needs a monitor (-qmp unix:PATH)".into()),
    };
    // Forked before any thread starts; the parent exits once the child is ready.
    let mut daemon = match launch.daemonize {
        true => Some(daemon::daemonize().map_err(|e| format!("cannot daemonize: {e}"))?),
        false => None,
    };
    let (server, requests) = QmpServer::bind(&path, PACKAGE).map_err(|e| crate::error_chain(&e))?;
    if let Some(p) = &launch.pidfile {
        daemon::write_pidfile(p).map_err(|e| format!("cannot write pidfile {}: {e}", p.display()))?;
    }
    if let Some(d) = &mut daemon {
        d.ready();
    }
    let host_cpu = host_cpu();
    for req in requests {
        use qemu_shim::qmp::Command;
        let quit = req.command == Command::Quit;
        let reply = match &req.command {
            Command::Other { name, args } => cpu_answer(&host_cpu, name, args)
                .unwrap_or_else(|| qemu_shim::probe::answer_or_not_found(name, args, PACKAGE)),
            Command::QueryStatus => {
                Ok(serde_json::json!({"status": "prelaunch", "running": false, "singlestep": false}))
            }
            Command::Quit => Ok(serde_json::json!({})),
            _ => Err(qemu_shim::qmp::QmpError::generic(
                "this smpft process is answering a capability probe: it runs no VM",
            )),
        };
        req.reply.send(reply);
        if quit {
            break;
        }
    }
    server.stop();
    Ok(ExitCode::SUCCESS)
}

/// What the host's KVM offers a guest's CPU, or why it cannot be read.
fn host_cpu() -> Result<Vec<cpu_model::Leaf>, String> {
    let device = std::path::Path::new(smp_ft::vmm::DEFAULT_KVM_DEVICE);
    smp_ft::vmm::cpuid::host_at(device).map_err(|e| crate::error_chain(&e))
}

/// libvirt's questions about guest CPU models (`qemu_shim::cpu`).
fn cpu_answer(
    host: &Result<Vec<cpu_model::Leaf>, String>,
    name: &str,
    args: &serde_json::Map<String, serde_json::Value>,
) -> Option<Result<serde_json::Value, qemu_shim::qmp::QmpError>> {
    qemu_shim::cpu::answer(name, args, host.as_deref().map_err(String::as_str))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_persona_is_chosen_by_name_or_subcommand() {
        assert_eq!(invoked(&v(&["/usr/bin/qemu-system-x86_64", "-S"])), Some(v(&["-S"])));
        assert_eq!(invoked(&v(&["/usr/local/bin/smpft-qemu", "-S"])), Some(v(&["-S"])));
        assert_eq!(invoked(&v(&["smpft", "qemu", "--", "-S"])), Some(v(&["-S"])));
        assert_eq!(invoked(&v(&["smpft", "qemu", "-S"])), Some(v(&["-S"])));
        assert_eq!(invoked(&v(&["/usr/bin/kvm", "--version"])), Some(v(&["--version"])));
        assert_eq!(invoked(&v(&["smpft", "run"])), None);
        assert_eq!(invoked(&v(&["/opt/qemu-tools/smpft", "run"])), None);
    }
}
