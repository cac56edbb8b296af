//! `smpft`: the command line (and the demo it runs, `demo.rs`).

mod demo;
mod lifecycle;
mod persona;

use block::spec::DiskSpec;
use clap::{Parser, Subcommand};
pub(crate) use lifecycle::{relay_signals, serve, standby_ended, Rejoin};
pub(crate) use smp_ft::error::error_chain;
use smp_ft::ft::disk::DiskSync;
use smp_ft::ft::primary::PrimaryFt;
use smp_ft::ft::standby::{StandbyOptions, StandbyRunner};
use smp_ft::ft::FtOptions;
use smp_ft::guest;
use smp_ft::runner::Runner;
use smp_ft::snapshot;
use smp_ft::units::{parse_duration, parse_size};
use smp_ft::vmm::devices::serial::SerialSpec;
use smp_ft::vmm::devices::DeviceConfig;
use smp_ft::vmm::net::NetSpec;
use smp_ft::vmm::{Payload, Vm, VmConfig, VmEvent};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Why a command failed; printed as one line with its causes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// Arguments that do not go together (clap checks each one alone).
    #[error("{0}")]
    Usage(String),
    #[error("cannot read {path}")]
    Guest { path: PathBuf, source: std::io::Error },
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
    #[error("--peer-cert")]
    PeerCert(#[source] transport::identity::IdentityError),
    #[error("--ft-peer")]
    FtPeer(#[source] smp_ft::ft::error::FtError),
    #[error("cannot find the smpft binary")]
    CurrentExe(#[source] std::io::Error),
    #[error("demo: {0}")]
    Demo(String),
}

/// Exit status of a copy that lost the tie-breaker (the other copy runs the VM).
pub(crate) const EXIT_HALTED: u8 = 75;

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
    /// Run a VM, protected by a standby when --ft-peer is given. Exits with the guest's exit
    /// status, 128+N after signal N, or 75 if this copy lost the FT tie-breaker.
    Run(RunArgs),
    /// Keep a live standby copy of a VM that `smpft run --ft-peer` protects, and take it over
    /// if that primary fails. Runs the VM (as `run` would) only after winning the tie-breaker.
    Standby(StandbyArgs),
    /// Show protection and failover on this machine: a standby and a protected VM (built-in
    /// test guest), a client checking every reply, SIGKILL of the primary, and the takeover.
    Demo(DemoArgs),
    /// Create this host's FT identity: a private key (key.pem, mode 0600) and a self-signed
    /// certificate (cert.pem). Give the certificate, or the fingerprint printed, to the peer.
    Keygen {
        /// Directory to write key.pem and cert.pem into (created if missing; never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Name in the certificate.
        #[arg(long, default_value = "smpft")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(i64).range(1..=36500))]
        days: i64,
    },
    /// libvirt's qemu hook (contrib/libvirt/hooks/qemu runs this): reads the FT settings in a
    /// domain's metadata from the XML on standard input and hands them to the smpft process
    /// libvirt starts next (see contrib/libvirt/README.md).
    #[command(hide = true)]
    LibvirtHook {
        /// DOMAIN OPERATION SUB-OPERATION EXTRA, as libvirt passes them.
        args: Vec<String>,
    },
    /// Check a chain of snapshot files (a full one, then its increments) and describe them.
    SnapshotInfo {
        /// Snapshot files, full snapshot first.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct DemoArgs {
    /// vCPUs for the demo VM.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=16))]
    vcpus: u32,
    /// INCR requests to send before the failover (and as many after it).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    requests: u64,
}

/// Fault tolerance: how the two copies find, trust and arbitrate between each other.
#[derive(clap::Args, Clone)]
pub(crate) struct FtArgs {
    /// This host's FT identity: a directory with key.pem and cert.pem (see `smpft keygen`).
    #[arg(long, value_name = "DIR")]
    identity: Option<PathBuf>,
    /// The peer's certificate (a PEM file) or its fingerprint (sha256:HEX). Only that peer is
    /// accepted, in both directions.
    #[arg(long, value_name = "FILE|sha256:HEX")]
    peer_cert: Option<String>,
    /// The tie-breaker: a file on storage both hosts share (a local or NFS path). Whichever
    /// copy wants to run alone must first win it; the loser halts.
    #[arg(long, value_name = "PATH")]
    tiebreak: Option<PathBuf>,
    /// Checkpoint interval.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    ft_interval: Duration,
    /// Shortest gap between checkpoints when output is waiting to be released.
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    ft_min_gap: Duration,
    /// Silence after which the peer is declared failed.
    #[arg(long, default_value = "150ms", value_parser = parse_duration)]
    ft_timeout: Duration,
    /// Heartbeat interval on the FT channel.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    ft_heartbeat: Duration,
    /// This copy's name in the tie-breaker record (default: host name and process id).
    #[arg(long)]
    ft_owner: Option<String>,
    /// How checkpoint pages travel (primary): `delta` sends a page sent before as the ranges that
    /// changed, then LZ4 where it pays; `lz4` compresses whole pages; `none` sends them as they
    /// are. Zero pages are always just their numbers.
    #[arg(long, value_enum, default_value = "delta")]
    ft_compress: smp_ft::ft::encode::Compression,
    /// Memory the primary keeps of pages last sent, for `delta` (pages not in it go whole).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    ft_compress_cache: u64,
    /// Output latency bound (primary): while the standby's acknowledgements lag more than this,
    /// the vCPUs are slowed in proportion (and released as the channel catches up), so a guest
    /// that dirties memory faster than the channel drains cannot hold its output back for
    /// longer. 0 turns the brake off.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    ft_max_latency: Duration,
    /// Lag policy (primary): a standby whose acknowledgements lag more than this for at least
    /// half of --ft-max-lag-for is replaced: the primary takes the tie-breaker at a new
    /// generation (so the standby can never go live), drops it and protects the VM with the
    /// next spare of --ft-peer. The throttle (--ft-max-latency) acts first; this is for a
    /// standby too slow for any brake on the guest to help. Set it above --ft-max-latency.
    /// 0 (the default) keeps a slow standby.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    ft_max_lag: Duration,
    /// The window --ft-max-lag looks at.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    ft_max_lag_for: Duration,
}

impl FtArgs {
    fn given(&self) -> bool {
        self.identity.is_some() || self.peer_cert.is_some() || self.tiebreak.is_some()
    }

    pub(crate) fn options(&self) -> Result<FtOptions, CliError> {
        let missing: Vec<&str> = [
            (self.identity.is_none(), "--identity"),
            (self.peer_cert.is_none(), "--peer-cert"),
            (self.tiebreak.is_none(), "--tiebreak"),
        ]
        .iter()
        .filter_map(|(m, n)| m.then_some(*n))
        .collect();
        if !missing.is_empty() {
            return Err(CliError::Usage(format!("fault tolerance needs {}", missing.join(", "))));
        }
        if self.ft_heartbeat.is_zero() || self.ft_timeout <= self.ft_heartbeat * 2 {
            return Err(CliError::Usage(format!(
                "--ft-timeout ({:?}) must exceed twice --ft-heartbeat ({:?}), which must be above zero",
                self.ft_timeout, self.ft_heartbeat
            )));
        }
        if self.ft_interval.is_zero() {
            return Err(CliError::Usage("--ft-interval must be above zero".into()));
        }
        if !self.ft_max_lag.is_zero() && (self.ft_max_lag_for.is_zero() || self.ft_max_lag <= self.ft_interval) {
            return Err(CliError::Usage(format!(
                "--ft-max-lag ({:?}) must exceed --ft-interval ({:?}), over a --ft-max-lag-for above zero",
                self.ft_max_lag, self.ft_interval
            )));
        }
        let identity = transport::Identity::load(self.identity.as_deref().unwrap_or_else(|| std::path::Path::new("")))?;
        let trust =
            transport::PeerTrust::parse(self.peer_cert.as_deref().unwrap_or_default()).map_err(CliError::PeerCert)?;
        let channel = transport::ChannelConfig {
            heartbeat: self.ft_heartbeat,
            silence_timeout: self.ft_timeout,
            ..Default::default()
        };
        Ok(FtOptions {
            identity,
            trust,
            tiebreak: self.tiebreak.clone().unwrap_or_default(),
            owner: self.ft_owner.clone().unwrap_or_else(smp_ft::ft::default_owner),
            interval: self.ft_interval,
            min_gap: self.ft_min_gap,
            claim_timeout: Duration::from_secs(2),
            compression: self.ft_compress,
            compression_cache: self.ft_compress_cache,
            max_latency: self.ft_max_latency,
            max_lag: self.ft_max_lag,
            max_lag_for: self.ft_max_lag_for,
            channel,
        })
    }
}

#[derive(clap::Args)]
struct StandbyArgs {
    /// Where to wait for the primary (UDP), e.g. 0.0.0.0:7400.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: std::net::SocketAddr,
    /// vCPUs of the protected VM (must match the primary's).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    vcpus: u32,
    /// Memory of the protected VM (must match the primary's).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// Where COM1 goes once this copy is live (as for `run`).
    #[arg(long, default_value = "stdio")]
    serial: SerialSpec,
    /// Write the guest's log to this file once live.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Serve QMP on this unix socket, before and after going live.
    #[arg(long, value_name = "unix:PATH")]
    qmp: Option<String>,
    /// The KVM device to use once live.
    #[arg(long, default_value = smp_ft::vmm::DEFAULT_KVM_DEVICE)]
    kvm_device: PathBuf,
    /// The protected VM has a virtio-rng (must match the primary's).
    #[arg(long)]
    rng: bool,
    /// This standby's own storage for the VM's disks, in the primary's order (same count and
    /// sizes): a raw image or block device path, nbd://HOST[:PORT]/EXPORT or
    /// nbd+unix:///EXPORT?socket=PATH. The initial copy writes it; checkpoints keep it current.
    #[arg(long = "disk", value_name = "SPEC")]
    disks: Vec<DiskSpec>,
    /// This standby's taps for the VM's network devices, in the primary's order (same count):
    /// tap=NAME or tap-fd=N. The tap is attached at start (so this copy can go live) but carries
    /// nothing until it does; the MAC comes with the VM's state. On the same L2 segment as the
    /// primary's.
    #[arg(long = "net", value_name = "SPEC")]
    nets: Vec<NetSpec>,
    /// How the initial copy treats this standby's disks: `full` copies every block; `compare`
    /// hashes them when a primary connects (they hold an earlier copy: a previous standby's, or
    /// an image copied by hand) and the primary sends only the blocks that differ.
    #[arg(long, value_enum, default_value = "full")]
    disk_sync: DiskSync,
    /// After a planned switchover (QMP x-smpft-switchover), wait here as the standby of the
    /// copy that took the VM over, listening on this address (as `smpft standby --listen`);
    /// the new primary protects the VM with it first. The command's `then-standby` argument
    /// overrides it. Without either, this copy exits after handing the VM over.
    #[arg(long, value_name = "HOST:PORT")]
    then_standby: Option<String>,
    /// Spares for after a failover: once this copy has gone live, it protects the VM with the
    /// first of these standbys (host:port, comma-separated) that answers, as `run --ft-peer`.
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]")]
    ft_peer: Option<String>,
    #[command(flatten)]
    ft: FtArgs,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Number of vCPUs (1 to 16, and at most what this host's KVM allows). Default 2, or the
    /// snapshot's with --restore.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=16))]
    vcpus: Option<u32>,
    /// Guest memory, e.g. 256M or 1G (binary units). At most 3G. Default 256M, or the
    /// snapshot's with --restore.
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Resume a VM from snapshot files instead of booting: a full snapshot, then any
    /// incremental snapshots taken after it, in order.
    #[arg(long, num_args = 1.., value_name = "FILE")]
    restore: Vec<PathBuf>,
    /// Serve QMP on this unix socket (unix:PATH; QEMU's ",server,nowait" is accepted).
    #[arg(long, value_name = "unix:PATH")]
    qmp: Option<String>,
    /// Guest image: a static x86-64 ELF started in ring 3 on every vCPU. Defaults to the
    /// built-in test guest.
    #[arg(long, conflicts_with = "kernel")]
    guest: Option<PathBuf>,
    /// Boot a Linux kernel instead of the test guest: an ELF vmlinux with a PVH entry note
    /// (entered directly in 32-bit mode, the fast path) or a bzImage (64-bit boot protocol).
    /// smpft gives it an e820 map, ACPI tables (one CPU per vCPU), COM1 on IRQ 4 and the PCI
    /// bus with the virtio devices asked for.
    #[arg(long, value_name = "PATH", conflicts_with = "restore")]
    kernel: Option<PathBuf>,
    /// An initrd (initramfs) for --kernel, placed at the top of guest memory.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// The kernel command line for --kernel, e.g. "console=ttyS0 earlyprintk=serial,ttyS0".
    #[arg(long, default_value = "console=ttyS0", requires = "kernel", allow_hyphen_values = true)]
    cmdline: String,
    /// Boot parameters for the guest. The built-in guest takes workloads `counter`, `churn`,
    /// `service`, `rng` (needs --rng), `disk` (needs --disk) and settings `churn-rate=PAGES_PER_S` (per vCPU, 0 = flat
    /// out), `churn-ws=SIZE`, `duration=5s|500ms`, `report=1s`, `fail=counter|churn`.
    #[arg(long, default_value = "counter churn duration=2s", allow_hyphen_values = true)]
    guest_args: String,
    /// Where the guest's serial port (COM1) goes: stdio, unix:PATH (smpft listens; one client
    /// at a time), file:PATH (output only), pty (a pseudo-terminal, its path in the log) or null.
    #[arg(long, default_value = "stdio")]
    serial: SerialSpec,
    /// Write the guest's log (debug console) to this file instead of standard error.
    #[arg(long)]
    console: Option<PathBuf>,
    /// The KVM device to use.
    #[arg(long, default_value = smp_ft::vmm::DEFAULT_KVM_DEVICE)]
    kvm_device: PathBuf,
    /// Give the VM a virtio-rng (PCI): entropy from this host's getrandom(2).
    #[arg(long)]
    rng: bool,
    /// Give the VM a virtio-blk disk (repeatable, up to 8): a raw image or block device path
    /// (io_uring, O_DIRECT where possible), or an NBD export, nbd://HOST[:PORT]/EXPORT or
    /// nbd+unix:///EXPORT?socket=PATH (qcow2, VMDK... through qemu-nbd; anything through
    /// nbdkit). Append ",readonly" for a read-only disk. Protected, every write is mirrored to
    /// the standby's own storage.
    #[arg(long = "disk", value_name = "SPEC")]
    disks: Vec<DiskSpec>,
    /// Give the VM a virtio-net NIC (repeatable, up to 4) on a tap: tap=NAME (an existing tap,
    /// e.g. made with `ip tuntap add NAME mode tap` and attached to a bridge) or tap-fd=N (an
    /// open tap handed over), optionally with ,mac=52:54:00:xx:xx:xx (default: random in
    /// 52:54:00). Protected, every frame the guest sends is held until the standby has
    /// acknowledged the checkpoint that produced it.
    #[arg(long = "net", value_name = "SPEC")]
    nets: Vec<NetSpec>,
    /// After a planned switchover (QMP x-smpft-switchover), wait here as the standby of the
    /// copy that took the VM over, listening on this address (as `smpft standby --listen`);
    /// the new primary protects the VM with it first. The command's `then-standby` argument
    /// overrides it. Without either, this copy exits after handing the VM over.
    #[arg(long, value_name = "HOST:PORT")]
    then_standby: Option<String>,
    /// Protect the VM with the standby (`smpft standby`) at this address (host:port), or with
    /// the first of several that answers (comma-separated spares, tried in turn). Until one
    /// answers, and whenever it is lost, the VM runs unprotected and smpft keeps trying the next.
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]")]
    ft_peer: Option<String>,
    #[command(flatten)]
    ft: FtArgs,
}

pub(crate) fn init_logging(filter: &str) -> Result<(), CliError> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| CliError::Usage(format!("--log '{filter}': {e}")))?;
    // Colours only on a terminal: a log written to a file or a journal stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .init();
    Ok(())
}

/// How long an orderly stop may take after a termination signal before smpft exits at once.
const SIGNAL_GRACE: Duration = Duration::from_secs(10);

/// Blocks the termination signals in every thread and forwards them to the VM as events, so the
/// VM stops in order. A signal always ends the process: if the orderly stop has not finished
/// [`SIGNAL_GRACE`] after the first signal, or a second SIGINT arrives, smpft exits at once
/// (a standby copies nothing then and a primary releases nothing, as after SIGKILL).
pub(crate) fn forward_signals(tx: crossbeam_channel::Sender<VmEvent>) {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut first: Option<i32> = None;
            loop {
                let set = termination_set();
                let mut sig = 0;
                // SAFETY: `set` is an initialised signal set and `sig` a valid out pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                if first.is_some() {
                    // A second Ctrl-C is someone who will not wait. Repeated SIGTERMs are a
                    // supervisor's (libvirt sends more than one): the stop already under way,
                    // bounded by SIGNAL_GRACE, finishes and flushes the disks.
                    if sig == libc::SIGINT {
                        tracing::warn!("signal {sig} while stopping: exiting now");
                        exit_now(sig);
                    }
                    continue;
                }
                first = Some(sig);
                let _ = tx.send(VmEvent::Signal(sig));
                let _ = std::thread::Builder::new().name("signal-grace".into()).spawn(move || {
                    std::thread::sleep(SIGNAL_GRACE);
                    tracing::error!("the VM did not stop within {SIGNAL_GRACE:?} of signal {sig}: exiting now");
                    exit_now(sig);
                });
            }
        })
        .expect("spawn signal thread");
}

/// Ends the process with status 128 + `sig` without running destructors or flushing anything
/// that could block.
fn exit_now(sig: i32) -> ! {
    // SAFETY: _exit(2) ends the process; nothing runs after it.
    unsafe { libc::_exit(128 + sig) }
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

pub(crate) fn block_termination_signals() {
    let set = termination_set();
    // SAFETY: blocks signals for this thread (inherited by all threads spawned after this).
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

fn run(args: RunArgs) -> Result<ExitCode, CliError> {
    let read = |p: &PathBuf| -> Result<Arc<[u8]>, CliError> {
        std::fs::read(p).map(Arc::from).map_err(|source| CliError::Guest { path: p.clone(), source })
    };
    let (payload, name) = match (&args.kernel, &args.guest) {
        (Some(k), _) => {
            let initrd = args.initrd.as_ref().map(read).transpose()?;
            let boot = smp_ft::vmm::linux::LinuxBoot { kernel: read(k)?, initrd, cmdline: args.cmdline.clone() };
            (Payload::Linux(boot), k.display().to_string())
        }
        (None, None) => (
            Payload::TestGuest { image: guest::BUILTIN.into(), args: args.guest_args.clone() },
            guest::BUILTIN_NAME.to_string(),
        ),
        (None, Some(p)) => {
            (Payload::TestGuest { image: read(p)?, args: args.guest_args.clone() }, p.display().to_string())
        }
    };
    let chain = if args.restore.is_empty() { None } else { Some(snapshot::read_chain(&args.restore)?) };
    let last = chain.as_ref().and_then(|c| c.last());
    let devices = DeviceConfig {
        // A snapshot with the device's state needs the device.
        rng: args.rng || last.is_some_and(|s| s.state.component("virtio-rng").is_some()),
        disks: args.disks,
        nets: args.nets,
    };
    let config = VmConfig {
        vcpus: args.vcpus.or(last.map(|s| s.vcpus)).unwrap_or(2),
        memory: args.memory.or(last.map(|s| s.mem_size)).unwrap_or(256 << 20),
        payload,
        guest_name: name,
        serial: args.serial,
        console: args.console,
        kvm_device: args.kvm_device,
        devices,
    };
    let qmp_path = args.qmp.as_deref().map(qemu_shim::qmp::parse_address).transpose()?;
    let ft = if args.ft.given() || args.ft_peer.is_some() { Some(args.ft.options()?) } else { None };
    let peer = match &args.ft_peer {
        None => None,
        Some(p) => Some(smp_ft::ft::error::resolve_all(p).map_err(CliError::FtPeer)?),
    };
    block_termination_signals();
    let standby_config = config.clone();
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
        config: VmConfig { payload: Payload::None, guest_name: "(standby)".into(), ..standby_config },
        qmp: qmp_path.clone(),
        listen: args.then_standby.clone(),
        spares: peer.clone().unwrap_or_default(),
    });
    let ft = match ft {
        Some(opts) => Some(PrimaryFt::new(opts, &running, peer.unwrap_or_default(), None)?),
        None => None,
    };
    serve(Runner::new(running, qmp, ft), rejoin)
}

pub(crate) type Qmp = Option<(qemu_shim::qmp::QmpServer, crossbeam_channel::Receiver<qemu_shim::qmp::Request>)>;

pub(crate) fn bind_qmp(path: Option<&std::path::Path>) -> Result<Qmp, CliError> {
    Ok(path.map(|p| qemu_shim::qmp::QmpServer::bind(p, concat!("smpft ", env!("CARGO_PKG_VERSION")))).transpose()?)
}

fn standby(args: StandbyArgs) -> Result<ExitCode, CliError> {
    let ft = args.ft.options()?;
    let spares = match &args.ft_peer {
        None => Vec::new(),
        Some(p) => smp_ft::ft::error::resolve_all(p).map_err(CliError::FtPeer)?,
    };
    let qmp_path = args.qmp.as_deref().map(qemu_shim::qmp::parse_address).transpose()?;
    let config = VmConfig {
        vcpus: args.vcpus,
        memory: args.memory,
        payload: Payload::None,
        guest_name: "(standby)".into(),
        serial: args.serial,
        console: args.console,
        kvm_device: args.kvm_device,
        devices: DeviceConfig { rng: args.rng, disks: args.disks, nets: args.nets },
    };
    let rejoin = Rejoin {
        ft: ft.clone(),
        config: config.clone(),
        qmp: qmp_path.clone(),
        listen: args.then_standby.clone(),
        spares: spares.clone(),
    };
    let opts = StandbyOptions { ft: ft.clone(), listen: args.listen, config, disk_sync: args.disk_sync };
    block_termination_signals();
    let qmp = bind_qmp(qmp_path.as_deref())?;
    let (sig_tx, sig_rx) = crossbeam_channel::unbounded();
    forward_signals(sig_tx);
    let end = StandbyRunner::new(&opts, qmp.as_ref().map(|(_, rx)| rx.clone()), sig_rx.clone())?.run()?;
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

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let Some(qemu_args) = persona::invoked(&args) {
        return persona::main(&qemu_args);
    }
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli.log) {
        eprintln!("smpft: error: {}", error_chain(&e));
        return ExitCode::from(2);
    }
    let r = match cli.command {
        Command::Run(args) => run(args),
        Command::Standby(args) => standby(args),
        Command::SnapshotInfo { files } => snapshot_info(&files),
        Command::LibvirtHook { args } => {
            let mut xml = String::new();
            let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut xml);
            persona::libvirt_ft::hook(&args, &xml, std::path::Path::new(persona::libvirt_ft::DIR))
                .map(|()| ExitCode::SUCCESS)
                .map_err(CliError::Usage)
        }
        Command::Keygen { out, name, days } => transport::identity::Identity::generate_into(&out, &name, days)
            .map(|fp| {
                println!("wrote {}/key.pem and {}/cert.pem", out.display(), out.display());
                println!("fingerprint: {fp}");
                ExitCode::SUCCESS
            })
            .map_err(CliError::from),
        Command::Demo(args) => std::env::current_exe()
            .map_err(CliError::CurrentExe)
            .and_then(|smpft| {
                demo::run(&demo::DemoOptions { vcpus: args.vcpus, requests: args.requests, smpft })
                    .map_err(CliError::Demo)
            })
            .map(|()| ExitCode::SUCCESS),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("smpft: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
