//! The command line: what `smpft` takes (clap), mapped onto the configuration builders
//! (`smp_ft::config`) by the commands in `main.rs`.

use block::spec::DiskSpec;
use clap::{Parser, Subcommand};
use smp_ft::config::ft::{parse_detector, parse_listen, shown};
use smp_ft::config::vm::MAX_VCPUS;
use smp_ft::config::{FtBuilder, Names};
use smp_ft::ft::disk::DiskSync;
use smp_ft::units::{parse_duration, parse_size};
use smp_ft::vmm::devices::channel::ChannelSpec;
use smp_ft::vmm::devices::serial::SerialSpec;
use smp_ft::vmm::net::NetSpec;
use smp_ft::vmm::virtio::balloon::BalloonSpec;
use std::path::PathBuf;
use std::time::Duration;

/// smpft keeps a KVM virtual machine running through the loss of its host: it is the VMM for
/// one VM and protects it with a live standby copy on a second host.
#[derive(Parser)]
#[command(name = "smpft", version, propagate_version = true)]
pub(crate) struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. "info", "smp_ft=debug". Also SMPFT_LOG.
    #[arg(long, global = true, default_value = "info", env = "SMPFT_LOG")]
    pub(crate) log: String,
    /// Log lines as text, or as JSON objects (one a line, for log shippers).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub(crate) log_format: crate::ops::LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run a VM, protected by a standby when --ft-peer is given. Exits with the guest's exit
    /// status, 128+N after signal N, or 75 if this copy lost the FT tie-breaker.
    Run(RunArgs),
    /// Keep a live standby copy of a VM that `smpft run --ft-peer` protects, and take it over
    /// if that primary fails. Runs the VM (as `run` would) only after winning the tie-breaker.
    Standby(StandbyArgs),
    /// Show protection and failover on this machine: a standby and a protected VM (built-in
    /// test guest), a client checking every reply, SIGKILL of the primary, and the takeover.
    Demo(DemoArgs),
    /// Create this host's FT identity: a private key (key.pem, mode 0600) and a certificate
    /// (cert.pem). Self-signed: give the certificate, or the fingerprint printed, to the peer
    /// (--peer-cert). Signed by the site CA (--ca-sign): give every host the CA's certificate
    /// (written beside as ca.pem; --ca) and nothing else.
    Keygen {
        /// Directory to write key.pem and cert.pem into (created if missing; never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Name in the certificate: with a CA, the host name its peers expect (--peer-name).
        #[arg(long, default_value = "smpft")]
        name: String,
        /// Sign the certificate with the site CA in this directory (its cert.pem and key.pem).
        #[arg(long, value_name = "CA_DIR", conflicts_with = "new_ca")]
        ca_sign: Option<PathBuf>,
        /// Create the site CA itself (its key signs the hosts' certificates; keep it off them).
        #[arg(long)]
        new_ca: bool,
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
    /// One line per VM copy on this host (role, FT state, peer, generation, lag, last
    /// checkpoint, time protected, output hold p99), from the QMP sockets copies register in
    /// the runtime directory ($SMPFT_RUNTIME_DIR, else /run/smpft/qmp), or those named.
    Status(crate::ops::StatusArgs),
    /// Fault tolerance for libvirt domains in one command: protect a running domain onto
    /// another host, unprotect it, list the protected domains.
    #[command(subcommand)]
    Libvirt(crate::libvirt::LibvirtCommand),
    /// Read or reset a VM's tie-breaker record (a path, or etcd://..., as --tiebreak takes it).
    Tiebreak {
        #[command(subcommand)]
        action: crate::tiebreak_cmd::Action,
    },
    /// Check a chain of snapshot files (a full one, then its increments) and describe them.
    SnapshotInfo {
        /// Snapshot files, full snapshot first.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
pub(crate) struct DemoArgs {
    /// vCPUs for the demo VM.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_VCPUS)))]
    pub(crate) vcpus: u32,
    /// INCR requests to send before the failover (and as many after it).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) requests: u64,
}

/// Fault tolerance: how the two copies find, trust and arbitrate between each other.
#[derive(clap::Args, Clone)]
pub(crate) struct FtArgs {
    /// This host's FT identity: a directory with key.pem and cert.pem (see `smpft keygen`).
    #[arg(long, value_name = "DIR")]
    pub(crate) identity: Option<PathBuf>,
    /// The peer's certificate (a PEM file) or its fingerprint (sha256:HEX). Only that peer is
    /// accepted, in both directions.
    #[arg(long, value_name = "FILE|sha256:HEX")]
    pub(crate) peer_cert: Option<String>,
    /// Instead of --peer-cert: the site CA's certificate (a PEM file). A peer is accepted when
    /// its certificate chains to it and names the host --peer-name gives (`smpft keygen
    /// --ca-sign` makes such certificates, or any CA).
    #[arg(long, value_name = "FILE", conflicts_with = "peer_cert", requires = "peer_name")]
    pub(crate) ca: Option<PathBuf>,
    /// With --ca: the host name the peer's certificate must carry.
    #[arg(long, value_name = "NAME", requires = "ca")]
    pub(crate) peer_name: Option<String>,
    /// The tie-breaker: a file on storage both hosts share (a local or NFS path), or a key in
    /// etcd: etcd://HOST:PORT[,HOST:PORT...]/KEY-PREFIX/VM, over TLS with
    /// ?cacert=CA.pem[&cert=CERT.pem&key=KEY.pem]. Whichever copy wants to run alone must
    /// first win it; the loser halts. A copy that cannot reach it (no etcd quorum) cannot win.
    #[arg(long, value_name = "PATH|etcd://...")]
    pub(crate) tiebreak: Option<PathBuf>,
    /// Checkpoint interval.
    #[arg(long, default_value = shown::INTERVAL, value_parser = parse_duration)]
    pub(crate) ft_interval: Duration,
    /// Shortest gap between checkpoints when output is waiting to be released.
    #[arg(long, default_value = shown::MIN_GAP, value_parser = parse_duration)]
    pub(crate) ft_min_gap: Duration,
    /// Silence after which the peer may be declared failed: the failure detector's floor. A
    /// peer whose messages have come in bursts (a busy host) is given the room its bursts took,
    /// up to --ft-timeout-max; this copy's own scheduling stalls never count as the peer's
    /// silence.
    #[arg(long, default_value = shown::TIMEOUT, value_parser = parse_duration)]
    pub(crate) ft_timeout: Duration,
    /// The most silence the failure detector ever allows (default: 4 times --ft-timeout).
    #[arg(long, value_parser = parse_duration)]
    pub(crate) ft_timeout_max: Option<Duration>,
    /// How the failure detector judges silence: `adaptive` weighs it against the peer's recent
    /// rhythm, this copy's own scheduling stalls and the peer's packets still arriving; `fixed`
    /// declares the peer failed after --ft-timeout of silence whatever else is seen (kept to
    /// measure the adaptive one against).
    #[arg(long, default_value = "adaptive", value_parser = parse_detector)]
    pub(crate) ft_detector: transport::detector::Mode,
    /// Heartbeat interval on the FT channel.
    #[arg(long, default_value = shown::HEARTBEAT, value_parser = parse_duration)]
    pub(crate) ft_heartbeat: Duration,
    /// This copy's name in the tie-breaker record (default: host name and process id).
    #[arg(long)]
    pub(crate) ft_owner: Option<String>,
    /// How checkpoint pages travel (primary): `delta` sends a page sent before as the ranges that
    /// changed, then LZ4 where it pays; `lz4` compresses whole pages; `none` sends them as they
    /// are. Zero pages are always just their numbers.
    #[arg(long, value_enum, default_value = "delta")]
    pub(crate) ft_compress: smp_ft::ft::encode::Compression,
    /// Memory the primary keeps of pages last sent, for `delta` (pages not in it go whole).
    #[arg(long, default_value = shown::COMPRESS_CACHE, value_parser = parse_size)]
    pub(crate) ft_compress_cache: u64,
    /// Output latency bound (primary): while the standby's acknowledgements lag more than this,
    /// the vCPUs are slowed in proportion (and released as the channel catches up), so a guest
    /// that dirties memory faster than the channel drains cannot hold its output back for
    /// longer. 0 turns the brake off.
    #[arg(long, default_value = shown::MAX_LATENCY, value_parser = parse_duration)]
    pub(crate) ft_max_latency: Duration,
    /// Lag policy (primary): a standby whose acknowledgements lag more than this for at least
    /// half of --ft-max-lag-for is replaced: the primary takes the tie-breaker at a new
    /// generation (so the standby can never go live), drops it and protects the VM with the
    /// next spare of --ft-peer. The throttle (--ft-max-latency) acts first; this is for a
    /// standby too slow for any brake on the guest to help. Set it above --ft-max-latency.
    /// 0 (the default) keeps a slow standby.
    #[arg(long, default_value = shown::MAX_LAG, value_parser = parse_duration)]
    pub(crate) ft_max_lag: Duration,
    /// The window --ft-max-lag looks at.
    #[arg(long, default_value = shown::MAX_LAG_FOR, value_parser = parse_duration)]
    pub(crate) ft_max_lag_for: Duration,
    /// A standby that loses the tie-breaker ends with exit status 75. Without it, a standby
    /// that lost to a live primary (a false alarm: it never ran the VM) discards its copy and
    /// waits for a primary again, and the primary protects the VM with it again by itself. A
    /// copy that ran the VM and lost always halts.
    #[arg(long)]
    pub(crate) ft_halt_on_loss: bool,
}

impl FtArgs {
    /// The settings on the fault tolerance builder, named as flags in its errors.
    pub(crate) fn builder(&self) -> FtBuilder {
        FtBuilder::new(Names::Cli)
            .identity(self.identity.clone())
            .peer_cert(self.peer_cert.clone())
            .ca(self.ca.clone())
            .peer_name(self.peer_name.clone())
            .tiebreak(self.tiebreak.clone())
            .owner(self.ft_owner.clone())
            .interval(self.ft_interval)
            .min_gap(self.ft_min_gap)
            .timeout(self.ft_timeout)
            .timeout_max(self.ft_timeout_max)
            .detector(self.ft_detector)
            .heartbeat(self.ft_heartbeat)
            .compression(self.ft_compress)
            .compression_cache(self.ft_compress_cache)
            .max_latency(self.ft_max_latency)
            .max_lag(self.ft_max_lag)
            .max_lag_for(self.ft_max_lag_for)
            .halt_on_loss(self.ft_halt_on_loss)
    }
}

/// Running without root.
#[derive(clap::Args)]
pub(crate) struct PrivilegeArgs {
    /// Run as this user (its group and supplementary groups) once everything that needs root
    /// is open: the KVM device and the VM, taps, disks, sockets, the FT listener. No
    /// capabilities are kept, and no_new_privs is set, so event hooks cannot regain any. What
    /// the copy opens later must be open to the user, and is checked at start: the KVM device
    /// (the user in its group), image files, the directories of the file tie-breaker, the QMP
    /// and serial sockets, log files, and taps given by name (persistent, owned by the user).
    #[arg(long, value_name = "NAME")]
    pub(crate) user: Option<String>,
    /// What a thread's seccomp filter does with a system call its kind of thread never makes
    /// (each thread has the filter of its kind: vCPU, device I/O, FT channel, QMP, storage,
    /// snapshot writer, event hooks, metrics, signals; the main thread's refuses only the calls
    /// that administer the kernel). kill: the process dies of SIGSYS (the default); log: the
    /// kernel logs the call (audit type 1326, under the thread's name) and lets it proceed;
    /// off: no filters.
    #[arg(long, value_name = "kill|log|off", default_value = "kill", env = "SMPFT_SECCOMP", value_parser = parse_seccomp)]
    pub(crate) seccomp: confine::Mode,
}

fn parse_seccomp(s: &str) -> Result<confine::Mode, String> {
    s.parse()
}

impl PrivilegeArgs {
    /// Looks the user up and sets no_new_privs: called before any thread starts.
    pub(crate) fn prepare(&self) -> Result<Option<smp_ft::privileges::User>, smp_ft::privileges::PrivilegeError> {
        let Some(name) = &self.user else { return Ok(None) };
        let user = smp_ft::privileges::User::lookup(name)?;
        user.check()?;
        smp_ft::privileges::no_new_privs().map_err(|source| smp_ft::privileges::PrivilegeError::Drop {
            user: name.clone(),
            step: "setting no_new_privs",
            source,
        })?;
        Ok(Some(user))
    }
}

#[derive(clap::Args)]
pub(crate) struct StandbyArgs {
    /// Where to wait for the primary (UDP), e.g. 0.0.0.0:7400.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen)]
    pub(crate) listen: std::net::SocketAddr,
    /// vCPUs of the protected VM (must match the primary's). Default 2.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_VCPUS)))]
    pub(crate) vcpus: Option<u32>,
    /// Memory of the protected VM (must match the primary's). Default 256M.
    #[arg(long, value_parser = parse_size)]
    pub(crate) memory: Option<u64>,
    /// Where COM1 goes once this copy is live (as for `run`).
    #[arg(long, default_value = "stdio")]
    pub(crate) serial: SerialSpec,
    /// Append every byte the serial port releases once this copy is live to this file (as for
    /// `run`: after a failover it continues where the primary's log stopped).
    #[arg(long, value_name = "FILE")]
    pub(crate) serial_log: Option<PathBuf>,
    /// Write the guest's log to this file once live.
    #[arg(long)]
    pub(crate) console: Option<PathBuf>,
    /// Serve QMP on this unix socket, before and after going live.
    #[arg(long, value_name = "unix:PATH")]
    pub(crate) qmp: Option<String>,
    /// The KVM device to use once live.
    #[arg(long, default_value = smp_ft::vmm::DEFAULT_KVM_DEVICE)]
    pub(crate) kvm_device: PathBuf,
    /// The guest's CPU, as QEMU's -cpu: MODEL[,+FEAT|,-FEAT]... (must give the same CPUID as
    /// the primary's).
    #[arg(long, default_value = "host", value_name = "MODEL[,+FEAT|,-FEAT]...")]
    pub(crate) cpu: cpu_model::CpuSpec,
    /// The protected VM has a virtio-rng (must match the primary's).
    #[arg(long)]
    pub(crate) rng: bool,
    /// Once live, a reboot the guest asks for ends the VM (as for `run`).
    #[arg(long)]
    pub(crate) no_reboot: bool,
    /// Once live, a guest that powers off leaves the VM stopped (as for `run`).
    #[arg(long)]
    pub(crate) no_shutdown: bool,
    /// The protected VM has a VM generation ID (must match the primary's; its GUID comes with
    /// the VM's memory and stays the same when this copy goes live).
    #[arg(long)]
    pub(crate) vmgenid: bool,
    /// The protected VM has a virtio-balloon, with the same options as the primary's.
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "OPTIONS")]
    pub(crate) balloon: Option<BalloonSpec>,
    /// The protected VM's virtio-serial ports, as for `run` (the same names and numbers as the
    /// primary's); this copy's own sockets, listened on once it is live.
    #[arg(long = "channel", value_name = "name=NAME,path=PATH|fd=N[,nr=N]")]
    pub(crate) channels: Vec<ChannelSpec>,
    /// This standby's own storage for the VM's disks, in the primary's order (same count and
    /// sizes): a raw image or block device path, nbd://HOST[:PORT]/EXPORT or
    /// nbd+unix:///EXPORT?socket=PATH. The initial copy writes it; checkpoints keep it current.
    /// A disk the primary has on virtio-scsi is given here with the same ",bus=scsi[,lun=N]".
    #[arg(long = "disk", value_name = "SPEC")]
    pub(crate) disks: Vec<DiskSpec>,
    /// A disk as a graph of QEMU block nodes, as QEMU's -blockdev takes them (JSON or
    /// key=value; repeatable): nodes name others by node-name or nest them inline. Each node no
    /// other names is one disk, after the --disk ones; qemu-storage-daemon opens them.
    #[arg(long = "blockdev", value_name = "JSON|key=value")]
    pub(crate) blockdevs: Vec<String>,
    /// An object the --blockdev nodes use (a throttle-group), as QEMU's -object takes it.
    #[arg(long = "object", value_name = "JSON|key=value")]
    pub(crate) objects: Vec<String>,
    /// This standby's taps for the VM's network devices, in the primary's order (same count):
    /// tap=NAME or tap-fd=N. The tap is attached at start (so this copy can go live) but carries
    /// nothing until it does; the MAC comes with the VM's state. On the same L2 segment as the
    /// primary's.
    #[arg(long = "net", value_name = "SPEC")]
    pub(crate) nets: Vec<NetSpec>,
    /// How the initial copy treats this standby's disks: `full` copies every block; `compare`
    /// hashes them when a primary connects (they hold an earlier copy: a previous standby's, or
    /// an image copied by hand) and the primary sends only the blocks that differ.
    #[arg(long, value_enum, default_value = "full")]
    pub(crate) disk_sync: DiskSync,
    /// After a planned switchover (QMP x-smpft-switchover), wait here as the standby of the
    /// copy that took the VM over, listening on this address (as `smpft standby --listen`);
    /// the new primary protects the VM with it first. The command's `then-standby` argument
    /// overrides it. Without either, this copy exits after handing the VM over.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) then_standby: Option<String>,
    /// Spares for after a failover: once this copy has gone live, it protects the VM with the
    /// first of these standbys (host:port, comma-separated) that answers, as `run --ft-peer`.
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]")]
    pub(crate) ft_peer: Option<String>,
    #[command(flatten)]
    pub(crate) ft: FtArgs,
    #[command(flatten)]
    pub(crate) observe: crate::ops::ObserveArgs,
    #[command(flatten)]
    pub(crate) privileges: PrivilegeArgs,
}

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// Number of vCPUs (1 to 16, and at most what this host's KVM allows). Default 2, or the
    /// snapshot's with --restore.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_VCPUS)))]
    pub(crate) vcpus: Option<u32>,
    /// Guest memory, e.g. 256M or 1G (binary units). At most 3G. Default 256M, or the
    /// snapshot's with --restore.
    #[arg(long, value_parser = parse_size)]
    pub(crate) memory: Option<u64>,
    /// Resume a VM from snapshot files instead of booting: a full snapshot, then any
    /// incremental snapshots taken after it, in order.
    #[arg(long, num_args = 1.., value_name = "FILE")]
    pub(crate) restore: Vec<PathBuf>,
    /// Serve QMP on this unix socket (unix:PATH; QEMU's ",server,nowait" is accepted).
    #[arg(long, value_name = "unix:PATH")]
    pub(crate) qmp: Option<String>,
    /// Guest image: a static x86-64 ELF started in ring 3 on every vCPU. Defaults to the
    /// built-in test guest.
    #[arg(long, conflicts_with = "kernel")]
    pub(crate) guest: Option<PathBuf>,
    /// Boot a Linux kernel instead of the test guest: an ELF vmlinux with a PVH entry note
    /// (entered directly in 32-bit mode, the fast path) or a bzImage (64-bit boot protocol).
    /// smpft gives it an e820 map, ACPI tables (one CPU per vCPU), COM1 on IRQ 4 and the PCI
    /// bus with the virtio devices asked for.
    #[arg(long, value_name = "PATH", conflicts_with = "restore")]
    pub(crate) kernel: Option<PathBuf>,
    /// `disk`: boot what the VM's first disk (--disk) holds, as a boot loader would: the
    /// default entry of its Boot Loader Specification entries (loader/entries) or of its GRUB
    /// grub.cfg, on an ext2/3/4 file system of a GPT or MBR partition (or of the whole disk);
    /// its kernel, initrds and command line. The disk is read in a confined child process; a
    /// reset in place reads it again (a kernel updated in the guest boots), a standby never does.
    #[arg(long, value_name = "disk", value_parser = ["disk"], conflicts_with_all = ["kernel", "guest", "restore"])]
    pub(crate) boot: Option<String>,
    /// Appended to the command line of the entry --boot disk boots, e.g. "console=ttyS0".
    #[arg(long, value_name = "ARGS", requires = "boot", allow_hyphen_values = true)]
    pub(crate) cmdline_extra: Option<String>,
    /// An initrd (initramfs) for --kernel, placed at the top of guest memory.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    pub(crate) initrd: Option<PathBuf>,
    /// The kernel command line for --kernel, e.g. "console=ttyS0 earlyprintk=serial,ttyS0".
    #[arg(long, default_value = "console=ttyS0", requires = "kernel", allow_hyphen_values = true)]
    pub(crate) cmdline: String,
    /// Boot parameters for the guest. The built-in guest takes workloads `counter`, `churn`,
    /// `service`, `rng` (needs --rng), `disk` (needs --disk), `vmgenid`, `balloon` (needs --balloon), `agent` (answers the QEMU guest agent's basic
    /// commands on the port named org.qemu.guest_agent.0, needs --channel) and settings `churn-rate=PAGES_PER_S` (per vCPU, 0 = flat
    /// out), `churn-ws=SIZE`, `duration=5s|500ms`, `report=1s`, `fail=counter|churn`.
    #[arg(long, default_value = "counter churn duration=2s", allow_hyphen_values = true)]
    pub(crate) guest_args: String,
    /// Where the guest's serial port (COM1) goes: stdio, unix:PATH (smpft listens; one client
    /// at a time), file:PATH (output only), pty (a pseudo-terminal, its path in the log) or null.
    #[arg(long, default_value = "stdio")]
    pub(crate) serial: SerialSpec,
    /// Append every byte the serial port releases to this file, wherever --serial sends it (a
    /// console log: protected, only output the standby holds the state of reaches it).
    #[arg(long, value_name = "FILE")]
    pub(crate) serial_log: Option<PathBuf>,
    /// What the SMBIOS tables tell the guest the machine is, in QEMU's syntax (repeatable):
    /// type=0 (vendor, version, date), type=1 (manufacturer, product, version, serial, uuid,
    /// sku, family), type=2 (board), type=3 (chassis), type=11 (value=OEM string). Unset
    /// fields are smpft's; e.g. --smbios "type=1,product=OpenStack Compute".
    #[arg(long = "smbios", value_name = "type=N,KEY=VALUE,...")]
    pub(crate) smbios: Vec<String>,
    /// Write the guest's log (debug console) to this file instead of standard error.
    #[arg(long)]
    pub(crate) console: Option<PathBuf>,
    /// The KVM device to use.
    #[arg(long, default_value = smp_ft::vmm::DEFAULT_KVM_DEVICE)]
    pub(crate) kvm_device: PathBuf,
    /// The guest's CPU, as QEMU's -cpu: `host` (what this host's KVM offers) or a model
    /// (qemu64, kvm64, Skylake-Client, Skylake-Server, Cascadelake-Server, EPYC, EPYC-Rome) with
    /// features added or removed; a feature the host lacks is refused.
    #[arg(long, default_value = "host", value_name = "MODEL[,+FEAT|,-FEAT]...")]
    pub(crate) cpu: cpu_model::CpuSpec,
    /// Give the VM a virtio-rng (PCI): entropy from this host's getrandom(2).
    #[arg(long)]
    pub(crate) rng: bool,
    /// A reboot the guest asks for (the ACPI reset register) ends the VM instead of booting
    /// it again in place (QEMU's -no-reboot). QMP system_reset still resets it.
    #[arg(long)]
    pub(crate) no_reboot: bool,
    /// A guest that powers off leaves the VM stopped (QMP status "shutdown") instead of
    /// ending it, until QMP system_reset and cont boot it again, or quit (QEMU's -no-shutdown).
    #[arg(long)]
    pub(crate) no_shutdown: bool,
    /// Give the VM a VM generation ID (ACPI, as QEMU's -device vmgenid): a GUID in guest
    /// memory, this one or a random one (`auto`), that Windows and Linux read to notice they
    /// were restored from a snapshot. It stays the same across a failover or switchover (the
    /// same VM goes on); --restore writes a new one (this GUID if given, else a random one).
    /// The test guest logs it with its `vmgenid` parameter; QMP query-vm-generation-id reports it.
    #[arg(long, value_name = "GUID|auto")]
    pub(crate) vmgenid: Option<smp_ft::vmm::vmgenid::VmGenId>,
    /// Give the VM a virtio-balloon (PCI). QMP `balloon` sets the guest's memory target and
    /// `query-balloon` shows how far the guest followed; pages the guest gives back are released
    /// on this host (and read as zero on both copies); its memory statistics are polled every
    /// `guest-stats-polling-interval` seconds (qom-set on /machine/peripheral/balloon0).
    /// OPTIONS, comma-separated: deflate-on-oom (the guest may take pages back when it runs
    /// out), free-page-reporting (the guest hands over free pages, released here too).
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "OPTIONS")]
    pub(crate) balloon: Option<BalloonSpec>,
    /// Give the VM a virtio-serial port (repeatable; all on one virtio-serial PCI device), e.g.
    /// the guest agent's channel: name=org.qemu.guest_agent.0,path=/run/vm-agent.sock. smpft
    /// listens on the unix socket PATH (or on the listening socket passed as fd=N) and serves
    /// one client at a time; the guest sees the port named NAME (number nr=N, default 1, 2, ...
    /// in order) and whether a client is connected. Protected, what the guest sends on the
    /// port is held until the standby has acknowledged the checkpoint that produced it.
    #[arg(long = "channel", value_name = "name=NAME,path=PATH|fd=N[,nr=N]")]
    pub(crate) channels: Vec<ChannelSpec>,
    /// Give the VM a virtio-blk disk (repeatable, up to 8): a raw image or block device path
    /// (io_uring, O_DIRECT where possible), an image in a format of QEMU's block layer
    /// (PATH,format=qcow2[,cache=none|writeback|unsafe|directsync][,discard=unmap], opened by
    /// qemu-storage-daemon), or an NBD export, nbd://HOST[:PORT]/EXPORT or
    /// nbd+unix:///EXPORT?socket=PATH (qcow2, VMDK... through qemu-nbd; anything through
    /// nbdkit). Append ",readonly" for a read-only disk. Append ",bus=scsi" to put it on the
    /// VM's virtio-scsi controller (made for the first such disk; one target, the disks its
    /// LUNs) instead of a virtio-blk of its own, at the lowest free LUN or ",lun=N" (0-255),
    /// with ",write-cache=off" to flush every write before it completes. Protected, every write
    /// is mirrored to the standby's own storage, whichever the bus.
    #[arg(long = "disk", value_name = "SPEC")]
    pub(crate) disks: Vec<DiskSpec>,
    /// A disk as a graph of QEMU block nodes, as QEMU's -blockdev takes them (JSON or
    /// key=value; repeatable): nodes name others by node-name or nest them inline. Each node no
    /// other names is one disk, after the --disk ones; qemu-storage-daemon opens them.
    #[arg(long = "blockdev", value_name = "JSON|key=value")]
    pub(crate) blockdevs: Vec<String>,
    /// An object the --blockdev nodes use (a throttle-group), as QEMU's -object takes it.
    #[arg(long = "object", value_name = "JSON|key=value")]
    pub(crate) objects: Vec<String>,
    /// Give the VM a virtio-net NIC (repeatable, up to 4) on a tap: tap=NAME (an existing tap,
    /// e.g. made with `ip tuntap add NAME mode tap` and attached to a bridge) or tap-fd=N (an
    /// open tap handed over), optionally with ,mac=52:54:00:xx:xx:xx (default: random in
    /// 52:54:00). Protected, every frame the guest sends is held until the standby has
    /// acknowledged the checkpoint that produced it.
    #[arg(long = "net", value_name = "SPEC")]
    pub(crate) nets: Vec<NetSpec>,
    /// After a planned switchover (QMP x-smpft-switchover), wait here as the standby of the
    /// copy that took the VM over, listening on this address (as `smpft standby --listen`);
    /// the new primary protects the VM with it first. The command's `then-standby` argument
    /// overrides it. Without either, this copy exits after handing the VM over.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) then_standby: Option<String>,
    /// Protect the VM with the standby (`smpft standby`) at this address (host:port), or with
    /// the first of several that answers (comma-separated spares, tried in turn). Until one
    /// answers, and whenever it is lost, the VM runs unprotected and smpft keeps trying the next.
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]")]
    pub(crate) ft_peer: Option<String>,
    #[command(flatten)]
    pub(crate) ft: FtArgs,
    #[command(flatten)]
    pub(crate) observe: crate::ops::ObserveArgs,
    #[command(flatten)]
    pub(crate) privileges: PrivilegeArgs,
}

/// The disks `--disk` names, then one for each `--blockdev` node no other names.
pub(crate) fn with_blockdevs(
    mut disks: Vec<DiskSpec>,
    blockdevs: &[String],
    objects: &[String],
) -> Result<Vec<DiskSpec>, String> {
    use qemu_shim::argv::parse_props;
    let mut graph = qemu_shim::blockdev::Blockdevs::default();
    for b in blockdevs {
        let m = parse_props(b, "driver").map_err(|e| format!("--blockdev {b}: {}", e.0))?;
        graph.add(b, m).map_err(|e| e.replacen("-blockdev", "--blockdev", 1))?;
    }
    for o in objects {
        let m = parse_props(o, "qom-type").map_err(|e| format!("--object {o}: {}", e.0))?;
        let id = m.get("id").and_then(|v| v.as_str()).ok_or_else(|| format!("--object {o}: no id"))?;
        graph.add_object(id.to_string(), o);
    }
    let roots = graph.roots();
    let graphs = roots.iter().map(|r| graph.graph(r, r)).collect::<Result<Vec<_>, _>>()?;
    // A node no disk reaches is in a cycle (every node of it is named by another).
    for (b, m) in blockdevs.iter().zip(blockdevs.iter().map(|b| parse_props(b, "driver"))) {
        let name = m.ok().and_then(|m| m.get("node-name")?.as_str().map(str::to_string)).unwrap_or_default();
        if !graphs.iter().any(|g| g.blockdevs.contains(b)) {
            graph.graph(&name, &name)?;
            return Err(format!("--blockdev {b}: no disk uses it"));
        }
    }
    for (root, g) in roots.into_iter().zip(graphs) {
        let readonly = graph.get(&root).and_then(|m| m.get("read-only")).is_some_and(|v| v == true || v == "on");
        disks.push(DiskSpec {
            location: block::spec::Location::Path(g.filename.clone().unwrap_or_else(|| root.clone()).into()),
            readonly,
            graph: Some(block::spec::Graph { name: root, node: g.node, blockdevs: g.blockdevs, objects: g.objects }),
            bus: Default::default(),
        });
    }
    Ok(disks)
}
