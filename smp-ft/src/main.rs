//! `smpft`: the command line (and the demo it runs, `demo.rs`).

mod cli;
mod demo;
mod libvirt;
mod lifecycle;
mod ops;
mod persona;
mod signals;
mod tiebreak_cmd;

use clap::Parser;
use cli::{Cli, Command, RunArgs, StandbyArgs};
pub(crate) use lifecycle::{relay_signals, serve, standby_ended, Rejoin};
pub(crate) use signals::{block_termination_signals, forward_signals};
use smp_ft::config::{self, Names, VmBuilder};
pub(crate) use smp_ft::error::error_chain;
use smp_ft::ft::primary::PrimaryFt;
use smp_ft::ft::standby::{StandbyOptions, StandbyRunner};
use smp_ft::runner::Runner;
use smp_ft::snapshot;
use smp_ft::vmm::devices::serial::SerialLog;
use smp_ft::vmm::devices::DeviceConfig;
use smp_ft::vmm::Vm;
use std::path::PathBuf;
use std::process::ExitCode;

/// Why a command failed; printed as one line with its causes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// Arguments that do not go together (clap checks each one alone).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    TestHooks(#[from] config::hooks::HookError),
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error(transparent)]
    Vm(#[from] smp_ft::vmm::VmError),
    #[error(transparent)]
    Qmp(#[from] qemu_shim::qmp::ServerError),
    #[error(transparent)]
    Ft(#[from] smp_ft::ft::error::FtError),
    #[error(transparent)]
    Run(#[from] smp_ft::runner::RunError),
    #[error(transparent)]
    Identity(#[from] transport::identity::IdentityError),
    #[error("cannot find the smpft binary")]
    CurrentExe(#[source] std::io::Error),
    #[error("demo: {0}")]
    Demo(String),
    #[error(transparent)]
    Privilege(#[from] smp_ft::privileges::PrivilegeError),
    #[error(transparent)]
    Confine(#[from] confine::ConfineError),
}

/// Exit status of a copy that lost the tie-breaker (the other copy runs the VM).
pub(crate) const EXIT_HALTED: u8 = 75;

pub(crate) fn init_logging(filter: &str, format: ops::LogFormat) -> Result<(), CliError> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| CliError::Usage(format!("--log '{filter}': {e}")))?;
    // Colours only on a terminal: a log written to a file or a journal stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match format {
        ops::LogFormat::Text => fmt.with_ansi(ansi).init(),
        // One object a line: timestamp, level, fields (the message among them), current span.
        ops::LogFormat::Json => fmt.json().flatten_event(true).init(),
    }
    Ok(())
}

/// With `--user`: becomes the user, then checks what the copy opens later is open to it.
fn drop_root(user: Option<smp_ft::privileges::User>, needs: &[smp_ft::privileges::Need]) -> Result<(), CliError> {
    if let Some(u) = user {
        smp_ft::privileges::hand_over_files(&u, needs)?;
        smp_ft::privileges::become_user(&u)?;
        smp_ft::privileges::check_access(&u, needs)?;
    }
    Ok(())
}

fn run(args: RunArgs) -> Result<ExitCode, CliError> {
    let user = args.privileges.prepare()?;
    let chain = if args.restore.is_empty() { None } else { Some(snapshot::read_chain(&args.restore)?) };
    let last = chain.as_ref().and_then(|c| c.last());
    let mut vm = VmBuilder::new(Names::Cli).vcpus(args.vcpus).memory(args.memory);
    if let Some(s) = last {
        vm = vm.snapshot_shape(s.vcpus, s.mem_size);
    }
    vm = match (args.kernel, args.guest, args.boot) {
        (Some(kernel), _, _) => vm.linux(kernel, args.initrd, args.cmdline),
        (None, None, Some(_)) => vm.boot_disk(0, args.cmdline_extra.unwrap_or_default()),
        (None, guest, _) => vm.test_guest(guest, args.guest_args),
    };
    let mut smbios = smp_ft::vmm::smbios::Smbios::default();
    for spec in &args.smbios {
        smbios.apply(spec).map_err(|e| CliError::Usage(format!("--smbios {spec}: {e}")))?;
    }
    // A snapshot of a VM with a generation ID needs the device (and its restore writes a new
    // ID); one without cannot gain it (a Linux guest's ACPI tables were written at its boot).
    let had_vmgenid = last.map(|s| s.state.component("vmgenid").is_some());
    if had_vmgenid == Some(false) && args.vmgenid.is_some() {
        return Err(CliError::Usage(
            "--vmgenid: the snapshot's VM has no VM generation ID device, and a restored VM keeps its devices".into(),
        ));
    }
    let vmgenid = args.vmgenid.or((had_vmgenid == Some(true)).then_some(smp_ft::vmm::vmgenid::VmGenId::Auto));
    let config = vm
        .smbios(smbios)
        .serial(args.serial)
        .serial_log(args.serial_log.map(|path| SerialLog::File { path, append: true }))
        .console(args.console)
        .kvm_device(args.kvm_device)
        .cpu(args.cpu)
        .no_reboot(args.no_reboot)
        .no_shutdown(args.no_shutdown)
        .devices(DeviceConfig {
            // A snapshot with the device's state needs the device.
            rng: args.rng || last.is_some_and(|s| s.state.component("virtio-rng").is_some()),
            disks: cli::with_blockdevs(args.disks, &args.blockdevs, &args.objects).map_err(CliError::Usage)?,
            nets: args.nets,
            vmgenid,
            // So does the balloon (the snapshot's options come with its state).
            balloon: args
                .balloon
                .or_else(|| last.and_then(|s| s.state.component("virtio-balloon")).map(|_| Default::default())),
            ..Default::default()
        })
        .virtio_serial((!args.channels.is_empty()).then_some(args.channels))
        .build()?;
    let qmp_path = args.qmp.as_deref().map(qemu_shim::qmp::parse_address).transpose()?;
    let ft = args.ft.builder();
    let ft = if ft.given() || args.ft_peer.is_some() { Some(ft.build()?) } else { None };
    let peer = args.ft_peer.as_deref().map(|p| config::ft::peers(Names::Cli, p)).transpose()?;
    let needs = smp_ft::privileges::needs(&config, ft.as_ref(), qmp_path.as_deref());
    block_termination_signals();
    let _registered = args.observe.start(qmp_path.as_deref())?;
    let standby_config = config::vm::as_standby(config.clone());
    let vm = match &chain {
        None => Vm::create(config)?,
        Some(chain) => snapshot::restore(config, chain)?,
    };
    let qmp = bind_qmp(qmp_path.as_deref())?;
    let running = vm.start()?;
    let (sig_tx, sig_rx) = crossbeam_channel::unbounded();
    forward_signals(sig_tx);
    relay_signals(sig_rx, running.event_sender());
    let rejoin = ft.clone().map(|ft| Rejoin {
        ft,
        config: standby_config,
        qmp: qmp_path.clone(),
        listen: args.then_standby.clone(),
        spares: peer.clone().unwrap_or_default(),
    });
    let ft = match ft {
        Some(opts) => Some(PrimaryFt::new(opts, &running, peer.unwrap_or_default(), None)?),
        None => None,
    };
    drop_root(user, &needs)?;
    serve(Runner::new(running, qmp, ft), rejoin)
}

pub(crate) type Qmp = Option<(qemu_shim::qmp::QmpServer, crossbeam_channel::Receiver<qemu_shim::qmp::Request>)>;

pub(crate) fn bind_qmp(path: Option<&std::path::Path>) -> Result<Qmp, CliError> {
    let qmp =
        path.map(|p| qemu_shim::qmp::QmpServer::bind(p, concat!("smpft ", env!("CARGO_PKG_VERSION")))).transpose()?;
    if let Some((server, _)) = &qmp {
        smp_ft::observe::get().set_qmp(server);
    }
    Ok(qmp)
}

fn standby(args: StandbyArgs) -> Result<ExitCode, CliError> {
    let user = args.privileges.prepare()?;
    let ft = args.ft.builder().build()?;
    let spares = args.ft_peer.as_deref().map(|p| config::ft::peers(Names::Cli, p)).transpose()?.unwrap_or_default();
    let qmp_path = args.qmp.as_deref().map(qemu_shim::qmp::parse_address).transpose()?;
    let config = VmBuilder::new(Names::Cli)
        .vcpus(args.vcpus)
        .memory(args.memory)
        .serial(args.serial)
        .serial_log(args.serial_log.map(|path| SerialLog::File { path, append: true }))
        .console(args.console)
        .kvm_device(args.kvm_device)
        .cpu(args.cpu)
        .no_reboot(args.no_reboot)
        .no_shutdown(args.no_shutdown)
        .devices(DeviceConfig {
            rng: args.rng,
            disks: cli::with_blockdevs(args.disks, &args.blockdevs, &args.objects).map_err(CliError::Usage)?,
            nets: args.nets,
            vmgenid: args.vmgenid.then_some(smp_ft::vmm::vmgenid::VmGenId::Auto),
            balloon: args.balloon,
            ..Default::default()
        })
        .virtio_serial((!args.channels.is_empty()).then_some(args.channels))
        .build()?;
    let rejoin = Rejoin {
        ft: ft.clone(),
        config: config.clone(),
        qmp: qmp_path.clone(),
        listen: args.then_standby.clone(),
        spares: spares.clone(),
    };
    let needs = smp_ft::privileges::needs(&config, Some(&ft), qmp_path.as_deref());
    let opts = StandbyOptions { ft: ft.clone(), listen: args.listen, config, disk_sync: args.disk_sync };
    block_termination_signals();
    let qmp = bind_qmp(qmp_path.as_deref())?;
    let _registered = args.observe.start(qmp_path.as_deref())?;
    let (sig_tx, sig_rx) = crossbeam_channel::unbounded();
    forward_signals(sig_tx);
    let mut runner = StandbyRunner::new(&opts, qmp.as_ref().map(|(_, rx)| rx.clone()), sig_rx.clone())?;
    drop_root(user, &needs)?;
    let end = runner.run()?;
    standby_ended(end, ft, spares, qmp, sig_rx, None, Some(rejoin))
}

fn snapshot_info(files: &[PathBuf]) -> Result<ExitCode, CliError> {
    let chain = snapshot::read_chain(files)?;
    for (f, s) in files.iter().zip(&chain) {
        println!(
            "{}: id {:016x} parent {} seq {} vcpus {} memory {} MiB pages {} zero-pages {}",
            f.display(),
            s.id,
            s.parent.map_or("-".to_string(), |p| format!("{p:016x}")),
            s.seq,
            s.vcpus,
            s.mem_size >> 20,
            s.memory.pages.len(),
            s.memory.zero_pages.len()
        );
    }
    let hash = snapshot::memory_hash(&chain)?;
    println!("memory-hash: {hash:016x}");
    Ok(ExitCode::SUCCESS)
}

/// `smpft keygen`: a self-signed identity, the site CA, or an identity the site CA signs.
fn keygen(
    out: &std::path::Path,
    name: &str,
    days: i64,
    ca: Option<&std::path::Path>,
    new_ca: bool,
) -> Result<ExitCode, CliError> {
    use transport::identity::{Identity, Issuer};
    let issuer = match (ca, new_ca) {
        (Some(dir), _) => Issuer::ca_dir(dir)?,
        (None, true) => Issuer::NewCa,
        (None, false) => Issuer::SelfSigned,
    };
    let fp = Identity::generate_into_as(out, name, days, &issuer)?;
    println!("wrote {}/key.pem and {}/cert.pem", out.display(), out.display());
    match issuer {
        Issuer::Ca { .. } => println!(
            "signed by the CA in {}; its certificate: {}/ca.pem (--ca)",
            ca.unwrap_or(out).display(),
            out.display()
        ),
        Issuer::NewCa => println!("a new site CA: sign hosts with smpft keygen --ca-sign {}", out.display()),
        Issuer::SelfSigned => {}
    }
    println!("fingerprint: {fp}");
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(bootdisk::sandbox::SUBCOMMAND) {
        bootdisk::sandbox::child_main();
    }
    if let Some(qemu_args) = persona::invoked(&args) {
        let code = persona::main(&qemu_args);
        ops::finish();
        return code;
    }
    let cli = Cli::parse();
    // The filters go on before any thread starts (the event hook's is the first).
    let seccomp = match &cli.command {
        Command::Run(a) => a.privileges.seccomp,
        Command::Standby(a) => a.privileges.seccomp,
        _ => confine::Mode::Off,
    };
    let started = init_logging(&cli.log, cli.log_format)
        .and_then(|()| confine::enable(seccomp).map_err(CliError::from))
        .and_then(|()| config::hooks::init().map(drop).map_err(CliError::from));
    if let Err(e) = started {
        eprintln!("smpft: error: {}", error_chain(&e));
        return ExitCode::from(2);
    }
    let r = match cli.command {
        Command::Run(args) => run(args),
        Command::Standby(args) => standby(args),
        Command::SnapshotInfo { files } => snapshot_info(&files),
        Command::Status(args) => ops::status(&args),
        Command::Libvirt(cmd) => libvirt::run(&cmd).map(|()| ExitCode::SUCCESS).map_err(CliError::Usage),
        Command::Tiebreak { action } => tiebreak_cmd::run(action),
        Command::LibvirtHook { args } => {
            let mut xml = String::new();
            let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut xml);
            persona::libvirt_ft::hook(&args, &xml, std::path::Path::new(persona::libvirt_ft::DIR))
                .map(|()| ExitCode::SUCCESS)
                .map_err(CliError::Usage)
        }
        Command::Keygen { out, name, days, ca_sign, new_ca } => keygen(&out, &name, days, ca_sign.as_deref(), new_ca),
        Command::Demo(args) => std::env::current_exe()
            .map_err(CliError::CurrentExe)
            .and_then(|smpft| {
                demo::run(&demo::DemoOptions { vcpus: args.vcpus, requests: args.requests, smpft })
                    .map_err(CliError::Demo)
            })
            .map(|()| ExitCode::SUCCESS),
    };
    ops::finish();
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("smpft: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
