//! `smpft`: the command line.

use clap::{Parser, Subcommand};
use smp_ft::guest;
use smp_ft::units::parse_size;
use smp_ft::vmm::devices::serial::SerialSpec;
use smp_ft::vmm::{Vm, VmConfig, VmEvent};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// smpft keeps a KVM virtual machine running through the loss of its host: it is the VMM for
/// one VM and protects it with a live standby copy on a second host.
#[derive(Parser)]
#[command(name = "smpft", version, propagate_version = true)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. "info", "smp_ft=debug". Also SMPFT_LOG.
    #[arg(long, global = true, default_value = "info", env = "SMPFT_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a VM (unprotected). Exits with the guest's exit status.
    Run(RunArgs),
    /// Run the built-in test guest and a short scripted session with its service.
    Demo(DemoArgs),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// vCPUs for the demo VM.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=16))]
    vcpus: u32,
    /// INCR requests to send.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    requests: u64,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Number of vCPUs (1 to 16, and at most what this host's KVM allows).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    vcpus: u32,
    /// Guest memory, e.g. 256M or 1G (binary units). At most 3G.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// Guest image: a static x86-64 ELF started in ring 3 on every vCPU. Defaults to the
    /// built-in test guest.
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Boot parameters for the guest. The built-in guest takes workloads `counter`, `churn`,
    /// `service` and settings `churn-rate=PAGES_PER_S` (per vCPU, 0 = flat out),
    /// `churn-ws=SIZE`, `duration=5s|500ms`, `report=1s`, `fail=counter|churn`.
    #[arg(long, default_value = "counter churn duration=2s", allow_hyphen_values = true)]
    guest_args: String,
    /// Where the guest's serial port (COM1) goes: stdio, unix:PATH (smpft listens; one client
    /// at a time), file:PATH (output only) or null.
    #[arg(long, default_value = "stdio")]
    serial: SerialSpec,
    /// Write the guest's log (debug console) to this file instead of standard error.
    #[arg(long)]
    console: Option<PathBuf>,
    /// The KVM device to use.
    #[arg(long, default_value = smp_ft::vmm::DEFAULT_KVM_DEVICE)]
    kvm_device: PathBuf,
}

fn init_logging(filter: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| format!("--log '{filter}': {e}"))?;
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    Ok(())
}

/// Blocks the termination signals in every thread and forwards them to the VM as events.
fn forward_signals(tx: crossbeam_channel::Sender<VmEvent>) {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let set = termination_set();
            let mut sig = 0;
            // SAFETY: `set` is an initialised signal set and `sig` a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 && tx.send(VmEvent::Signal(sig)).is_err() {
                return;
            }
        })
        .expect("spawn signal thread");
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn block_termination_signals() {
    let set = termination_set();
    // SAFETY: blocks signals for this thread (inherited by all threads spawned after this).
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

fn run(args: RunArgs) -> Result<ExitCode, String> {
    let (image, name): (Arc<[u8]>, String) = match &args.guest {
        None => (guest::BUILTIN.into(), guest::BUILTIN_NAME.to_string()),
        Some(p) => {
            let bytes = std::fs::read(p).map_err(|e| format!("cannot read guest {}: {e}", p.display()))?;
            (bytes.into(), p.display().to_string())
        }
    };
    let config = VmConfig {
        vcpus: args.vcpus,
        memory: args.memory,
        guest: image,
        guest_name: name,
        guest_args: args.guest_args,
        serial: args.serial,
        console: args.console,
        kvm_device: args.kvm_device,
    };
    block_termination_signals();
    let vm = Vm::create(config).map_err(|e| error_chain(&e))?;
    let running = vm.start().map_err(|e| error_chain(&e))?;
    forward_signals(running.event_sender());
    let code = match running.wait_event(None) {
        Some(VmEvent::GuestExit(status)) => {
            tracing::info!(status, "guest exited");
            Ok(ExitCode::from(status.min(255) as u8))
        }
        Some(VmEvent::Signal(sig)) => {
            tracing::info!("stopping on signal {sig}");
            Ok(ExitCode::from(128 + sig as u8))
        }
        Some(VmEvent::VcpuFailed(msg)) => Err(msg),
        None => Err("VM event channel closed".into()),
    };
    running.shutdown().map_err(|e| error_chain(&e))?;
    code
}

/// `error: outer: inner: innermost`, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli.log) {
        eprintln!("smpft: error: {e}");
        return ExitCode::from(2);
    }
    let r = match cli.command {
        Command::Run(args) => run(args),
        Command::Demo(args) => std::env::current_exe()
            .map_err(|e| format!("cannot find the smpft binary: {e}"))
            .and_then(|smpft| {
                smp_ft::demo::run(&smp_ft::demo::DemoOptions { vcpus: args.vcpus, requests: args.requests, smpft })
            })
            .map(|()| ExitCode::SUCCESS),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("smpft: error: {e}");
            ExitCode::FAILURE
        }
    }
}
