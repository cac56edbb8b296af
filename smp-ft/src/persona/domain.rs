//! A domain libvirt starts: its launch description made into a VM, run as `smpft run` runs one,
//! with QMP on the monitor socket libvirt passes and the answers libvirt's qemu driver needs
//! while starting, watching, reconnecting to and stopping a domain.
//!
//! What libvirt relies on (measured with libvirt 9.0):
//! - the state is followed from the `STOP`/`RESUME` events (the runner emits them on `stop` and
//!   `cont`), and `-S` means the vCPUs wait for `cont`;
//! - `query-chardev` names the serial port's pseudo-terminal (`pty:/dev/pts/N`): `virsh console`
//!   attaches there;
//! - after a libvirtd restart, `query-status`, `qom-get` and `query-jobs` must answer, or libvirt
//!   kills the domain;
//! - a guest that powers off ends the process after a `SHUTDOWN` event; `system_powerdown`
//!   presses the power button the guest polls (port 0xf6).

use super::block_info::{self, BlockDisk, Size};
use super::libvirt_ft::DomainFt;
use super::taps::NamedTaps;
use super::PACKAGE;
use block::spec::DiskSpec;
use qemu_shim::argv::{ChannelSocket, Launch, Monitor, Serial};
use qemu_shim::qmp::{QmpError, QmpServer};
use serde_json::{json, Map, Value};
use smp_ft::config::{Names, VmBuilder};
use smp_ft::ft::primary::PrimaryFt;
use smp_ft::runner::{Extension, Runner};
use smp_ft::vmm::devices::channel::{ChannelHost, ChannelListener, ChannelSpec};
use smp_ft::vmm::devices::serial::{SerialLog, SerialSpec};
use smp_ft::vmm::devices::{DeviceConfig, PciSlots};
use smp_ft::vmm::net::NetSpec;
use smp_ft::vmm::smbios::Smbios;
use smp_ft::vmm::virtio::balloon::BalloonSpec;
use smp_ft::vmm::{RunningVm, Vm, VmConfig};
use std::process::ExitCode;

/// The VM `launch` describes, on the configuration builder (its errors name QEMU's options).
fn config(launch: &Launch, standby: bool, taps: &mut NamedTaps) -> Result<VmConfig, String> {
    // Without -kernel, the disk with the lowest bootindex (or the first, with -boot order=c).
    let boot_disk = launch.boot_disk.or((launch.boot_order_disk && !launch.disks.is_empty()).then_some(0));
    if launch.kernel.is_none() && boot_disk.is_none() {
        return Err("the domain has no kernel and no boot disk: smpft boots a Linux kernel or a static x86-64 ELF guest given as <kernel>, or what a disk with <boot dev='hd'/> or <boot order='N'/> holds".into());
    }
    let serial = match &launch.serial {
        Some(Serial::Pty) => SerialSpec::Pty,
        Some(Serial::Socket(p)) => SerialSpec::Unix(p.clone()),
        Some(Serial::File(p)) => SerialSpec::File(p.clone()),
        Some(Serial::Null) | None => SerialSpec::Null,
    };
    let disks = launch
        .disks
        .iter()
        .map(|d| {
            if let Some(g) = &d.graph {
                return Ok(super::block_info::daemon_disk(d, g));
            }
            DiskSpec::of_storage(&d.source, d.readonly).map_err(|e| format!("disk {}: {e}", d.id))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let disks = on_scsi(disks, launch.scsi.as_ref());
    let nets = launch
        .nics
        .iter()
        .map(|n| {
            let mac = n.mac.as_deref().map(str::parse).transpose().map_err(|e| format!("NIC {}: {e}", n.id))?;
            Ok(NetSpec { tap: taps.source(&n.id, &n.tap)?, mac })
        })
        .collect::<Result<Vec<_>, String>>()?;
    // A Linux kernel (bzImage, or vmlinux with a PVH note) boots with -initrd and -append as
    // its command line; anything else is a freestanding guest and -append its parameters.
    let vm = VmBuilder::new(Names::Qemu).vcpus(launch.vcpus).memory(launch.memory_bytes);
    let append = launch.append.clone().unwrap_or_default();
    let vm = match (&launch.kernel, boot_disk) {
        (Some(kernel), _) => vm.kernel(kernel.clone(), launch.initrd.clone(), append),
        // A standby receives the booted VM: it never reads the disk (its own copy of it).
        (None, Some(disk)) if standby => vm.boot_disk_later(disk, append),
        (None, Some(disk)) => vm.boot_disk(disk, append),
        (None, None) => unreachable!("refused above"),
    };
    vm.serial(serial)
        .serial_log(launch.serial_log.as_ref().map(|l| match l {
            qemu_shim::argv::SerialLog::File { path, append } => {
                SerialLog::File { path: path.clone(), append: *append }
            }
            qemu_shim::argv::SerialLog::Fd(fd) => SerialLog::Fd(*fd),
        }))
        .smbios(smbios(launch)?)
        .devices(DeviceConfig {
            rng: launch.rng,
            disks,
            nets,
            slots: PciSlots {
                rng: launch.rng_slot,
                disks: launch.disks.iter().map(|d| d.slot).collect(),
                nets: launch.nics.iter().map(|n| n.slot).collect(),
                balloon: launch.balloon.as_ref().and_then(|b| b.slot),
                virtio_serial: launch.virtio_serial.as_ref().and_then(|v| v.slot),
                scsi: launch.scsi.as_ref().and_then(|c| c.slot),
            },
            vmgenid: launch
                .vmgenid
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(|e| format!("-device vmgenid,guid=: {e}"))?,
            balloon: launch
                .balloon
                .as_ref()
                .map(|b| BalloonSpec { deflate_on_oom: b.deflate_on_oom, free_page_reporting: b.free_page_reporting }),
            virtio_serial: None,
        })
        .virtio_serial(launch.virtio_serial.as_ref().map(channels))
        .cpu(launch.cpu.clone().unwrap_or_default())
        .no_reboot(launch.no_reboot)
        .no_shutdown(launch.no_shutdown)
        .build()
        .map_err(|e| crate::error_chain(&e))
}

/// The disks with those of the virtio-scsi controller (`scsi-hd`) put on its bus.
fn on_scsi(mut disks: Vec<DiskSpec>, scsi: Option<&qemu_shim::argv::ScsiController>) -> Vec<DiskSpec> {
    for u in scsi.map(|c| c.units.as_slice()).unwrap_or_default() {
        if let Some(d) = disks.get_mut(u.disk) {
            let unit = block::spec::ScsiUnit { lun: u.lun, write_cache: u.write_cache, device_id: u.device_id.clone() };
            d.bus = block::spec::Bus::Scsi(unit);
        }
    }
    disks
}

/// The virtio-serial ports, with their host sides (libvirt's listening sockets).
fn channels(v: &qemu_shim::argv::VirtioSerial) -> Vec<ChannelSpec> {
    v.ports
        .iter()
        .map(|p| ChannelSpec {
            nr: p.nr.unwrap_or(0),
            name: p.name.clone(),
            id: p.id.clone(),
            chardev: p.chardev.clone(),
            host: match &p.socket {
                ChannelSocket::Path(path) => ChannelHost::Path(path.clone()),
                ChannelSocket::Fd(fd) => ChannelHost::Fd(*fd),
            },
        })
        .collect()
}

/// The SMBIOS tables `-smbios` and `-uuid` describe (smpft's defaults for the rest).
fn smbios(launch: &Launch) -> Result<Smbios, String> {
    let mut m = Smbios::default();
    for spec in &launch.smbios {
        m.apply(spec).map_err(|e| format!("-smbios {spec}: {e}"))?;
    }
    if let (None, Some(uuid)) = (m.uuid, &launch.uuid) {
        m.uuid = Some(smp_ft::vmm::smbios::parse_uuid(uuid).map_err(|e| format!("-uuid: {e}"))?);
    }
    Ok(m)
}

/// The QMP server on every monitor the command line gives: libvirt's (a listening socket it
/// passes), Proxmox VE's two (a socket smpft listens on, and qmeventd's, which smpft connects
/// to and reconnects to). Those with `wait=on` are returned: the VM starts once each has had a
/// client.
fn monitor(launch: &Launch) -> Result<(crate::Qmp, Vec<usize>), String> {
    if launch.monitors.is_empty() {
        return Ok((None, Vec::new()));
    }
    let err = |e: qemu_shim::qmp::ServerError| crate::error_chain(&e);
    let (mut server, requests) = QmpServer::new(PACKAGE).map_err(err)?;
    let mut waits = Vec::new();
    for m in &launch.monitors {
        let (m, wait) = match m {
            Monitor::Wait(inner) => (&**inner, true),
            m => (m, false),
        };
        let endpoint = match m {
            Monitor::Fd(fd) => server.listen_fd(*fd),
            Monitor::Path(p) => server.listen(p),
            Monitor::Connect { path, reconnect } => server.connect(path, *reconnect),
            Monitor::Wait(_) => return Err("a monitor nested in a monitor".into()),
        }
        .map_err(err)?;
        if wait {
            waits.push(endpoint);
        }
    }
    Ok((Some((server, requests)), waits))
}

/// Waits until each monitor with `wait=on` has had a client, as QEMU does before it runs the
/// VM; a termination signal ends the wait (and the start).
fn wait_for_monitors(qmp: &crate::Qmp, waits: &[usize]) -> Result<(), String> {
    let Some((server, _)) = qmp else { return Ok(()) };
    for &endpoint in waits {
        tracing::info!("waiting for a client on a monitor with wait=on before the VM starts");
        while !server.wait_for_client(endpoint, std::time::Duration::from_millis(200)) {
            if let Some(sig) = crate::signals::pending_termination() {
                return Err(format!("signal {sig} while waiting for a monitor client (wait=on)"));
            }
        }
    }
    Ok(())
}

/// Runs the domain until it ends: as an FT standby or primary if the hook left FT settings for
/// it (see `libvirt_ft`), unprotected otherwise.
pub fn run(launch: Launch) -> Result<ExitCode, String> {
    // Before any thread exists (the monitor's, the FT transport's): a termination signal must
    // reach the VM as an event, never end the process where it lands (libvirt sends SIGTERM to
    // end a domain; an FT primary that vanished would look failed to its standby).
    crate::block_termination_signals();
    // -daemonize (Proxmox's qm): forked before any thread; the parent exits once the VM is
    // built, the monitor listens and the pidfile names this process.
    let mut daemon = match launch.daemonize {
        true => Some(super::daemon::daemonize().map_err(|e| format!("cannot daemonize: {e}"))?),
        false => None,
    };
    let name = launch.name.clone().unwrap_or_else(|| "(unnamed)".into());
    // FT settings are checked before the monitor listens: an error then ends the start with
    // smpft's reason, which libvirt shows (later, libvirt would see only a closed monitor).
    // libvirt's hook leaves them by the domain's name, Proxmox's hookscript by the VM's id.
    let key = super::libvirt_ft::key(&launch, &name);
    let ft = super::libvirt_ft::for_domain(&key)
        .map(|s| DomainFt::new(&s))
        .transpose()
        .map_err(|e| crate::error_chain(&e))?;
    // A standby's disk is its own copy, and what it boots comes from its primary.
    let mut taps = NamedTaps::default();
    let config = config(&launch, ft.as_ref().is_some_and(|ft| ft.standby), &mut taps)?;
    // So is the CPU: a model or feature this host cannot give is refused with its name.
    smp_ft::vmm::cpuid::check(&config.kvm_device, &config.cpu).map_err(|e| crate::error_chain(&e))?;
    // So is an agent channel whose socket cannot be listened on (claimed again with the VM).
    for port in config.devices.virtio_serial.iter().flatten() {
        ChannelListener::reserve(port).map_err(|e| crate::error_chain(&e))?;
    }
    // And the VM itself (a standby's is built from its primary's state later): what cannot be
    // opened (a disk qemu-storage-daemon refuses, a kernel) ends the start with smpft's reason
    // before libvirt talks to the monitor.
    let vm = match ft.as_ref().is_some_and(|ft| ft.standby) {
        true => None,
        false => Some(Vm::create(config.clone()).map_err(|e| crate::error_chain(&e))?),
    };
    let (qmp, waits) = monitor(&launch)?;
    let _registered = crate::ops::from_libvirt(&launch, &name, &qmp)?;
    if let Some(p) = &launch.pidfile {
        super::daemon::write_pidfile(p).map_err(|e| format!("cannot write pidfile {}: {e}", p.display()))?;
    }
    wait_for_monitors(&qmp, &waits)?;
    if let Some(d) = &mut daemon {
        d.ready_logging_to(&super::daemon::log_path(&key));
    }
    let answers = Answers {
        serial_label: launch.serial_label.clone(),
        devices: launch.device_ids.clone(),
        disks: launch.disks.iter().enumerate().map(|(i, d)| (qdev(&launch, i), d.node.clone())).collect(),
        block: launch
            .disks
            .iter()
            .zip(launch.disk_nodes.iter().chain(std::iter::repeat(&Vec::new())))
            .map(|(d, n)| BlockDisk { disk: d.clone(), nodes: n.clone() })
            .collect(),
        host_cpu: super::host_cpu(),
        balloon_path: launch.balloon.as_ref().map(|b| format!("/machine/peripheral/{}", b.id)),
        channels: launch.virtio_serial.iter().flat_map(|v| &v.ports).map(|p| p.chardev.clone()).collect(),
        pci_ids: super::pci::device_ids(&launch),
        machine: launch.machine.clone(),
    };
    let ended = match (ft, vm) {
        (Some(ft), None) => super::standby::run(&name, ft, config, qmp, answers),
        (ft, Some(vm)) => primary(&launch, &name, ft, vm, qmp, answers),
        (None, None) => Err("no VM was built for an unprotected domain".into()),
    };
    // The taps' downscripts run once the VM is gone.
    drop(taps);
    if let Some(p) = launch.pidfile.as_ref().filter(|_| launch.daemonize) {
        let _ = std::fs::remove_file(p);
    }
    ended
}

fn primary(
    launch: &Launch,
    name: &str,
    ft: Option<DomainFt>,
    vm: Vm,
    qmp: crate::Qmp,
    answers: Answers,
) -> Result<ExitCode, String> {
    let err = |e: &dyn std::error::Error| crate::error_chain(e);
    let running = if launch.start_paused { vm.start_paused() } else { vm.start() }.map_err(|e| err(&e))?;
    tracing::info!(domain = %name, paused = launch.start_paused, protected = ft.is_some(), "domain started");
    let (sig_tx, sig_rx) = crossbeam_channel::unbounded();
    crate::forward_signals(sig_tx);
    crate::relay_signals(sig_rx, running.event_sender());
    let ft = match ft {
        None => None,
        Some(ft) => Some(PrimaryFt::new(ft.opts, &running, ft.peers, None).map_err(|e| err(&e))?),
    };
    crate::serve(Runner::new(running, qmp, ft).with_extension(Box::new(answers)), None).map_err(|e| err(&e))
}

/// Disk `i`'s device as QOM names it: a virtio-blk's backend, or the `scsi-hd` itself (qm maps
/// either back to its drive).
fn qdev(launch: &Launch, i: usize) -> String {
    let id = &launch.disks[i].id;
    match launch.scsi.as_ref().is_some_and(|c| c.units.iter().any(|u| u.disk == i)) {
        true => format!("/machine/peripheral/{id}"),
        false => format!("/machine/peripheral/{id}/virtio-backend"),
    }
}

/// libvirt's questions about a domain.
pub struct Answers {
    serial_label: Option<String>,
    devices: Vec<(String, String)>,
    /// Each disk's device (its QOM path, as `query-blockstats` names it) and block node, in order.
    disks: Vec<(String, String)>,
    /// Each disk with its block nodes, in order (`query-block`, `query-named-block-nodes`).
    block: Vec<BlockDisk>,
    /// What the host's KVM offers a guest's CPU (for libvirt's CPU model questions).
    host_cpu: Result<Vec<cpu_model::Leaf>, String>,
    /// The balloon's QOM path (`/machine/peripheral/ID`), if the domain has one.
    balloon_path: Option<String>,
    /// The virtio-serial ports' chardev ids, in port order.
    channels: Vec<String>,
    /// The `-device` id of each PCI function the VMM names (`query-pci`).
    pci_ids: Vec<(String, String)>,
    /// The machine type the command line asked for (`query-machines` marks it current).
    machine: Option<String>,
}

impl Answers {
    /// The answers that need no running VM (a standby's, too): the serial port's terminal
    /// `pty`, the devices, the emulator's own description.
    fn without_vm(
        &self,
        pty: Option<&std::path::Path>,
        name: &str,
        args: &Map<String, Value>,
    ) -> Option<Result<Value, QmpError>> {
        let arg = |k: &str| args.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        if self.is_balloon(name, args) {
            return Some(smp_ft::balloon::qom(None, name, args));
        }
        Some(Ok(match name {
            // A standby's balloon is its primary's until it goes live (the state comes with the
            // VM): libvirt takes this error as "no balloon to set" and carries on.
            "balloon" | "query-balloon" if self.balloon_path.is_some() => return Some(Err(QmpError {
                class: qemu_shim::qmp::ErrorClass::DeviceNotActive,
                desc: "No balloon device has been activated: this copy is a standby, its primary's balloon runs the VM"
                    .into(),
            })),
            "query-chardev" => self.chardevs(pty, &[]),
            "query-pci" => {
                return Some(Err(QmpError::generic(
                    "this copy is a standby: the VM's PCI devices are its primary's until it goes live",
                )))
            }
            "query-machines" => self.machines(args),
            "qom-list" if arg("path") == "/machine/peripheral" => Value::Array(
                self.devices
                    .iter()
                    .map(|(id, driver)| json!({"name": id, "type": format!("child<{driver}>")}))
                    .collect(),
            ),
            "qom-list" => json!([]),
            "qom-get" => return Some(Err(QmpError::generic(format!("Property '{}' not found", arg("property"))))),
            // No VM yet (a standby): the sizes of the disks' local files.
            "query-block" | "query-named-block-nodes" => {
                let sizes: Vec<_> = self.block.iter().map(|d| Size::of(&d.disk.source, None)).collect();
                self.block_answer(name, &sizes)
            }
            _ => {
                return super::cpu_answer(&self.host_cpu, name, args)
                    .or_else(|| qemu_shim::probe::answer(name, args, PACKAGE))
            }
        }))
    }
}

impl Answers {
    /// Each disk's counters, named as libvirt looks them up: by the device's QOM path and by
    /// its block node.
    fn blockstats(&self, vm: &RunningVm) -> Value {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = vm.devices().disk_stats();
        Value::Array(
            self.disks
                .iter()
                .zip(stats)
                .map(|((id, node), s)| {
                    json!({
                        "device": "",
                        "qdev": id,
                        "node-name": node,
                        "stats": {
                            "rd_bytes": s.rd_bytes.load(Relaxed), "wr_bytes": s.wr_bytes.load(Relaxed),
                            "rd_operations": s.rd_ops.load(Relaxed), "wr_operations": s.wr_ops.load(Relaxed),
                            "flush_operations": s.flush_ops.load(Relaxed),
                            "rd_total_time_ns": s.rd_ns.load(Relaxed), "wr_total_time_ns": s.wr_ns.load(Relaxed),
                            "flush_total_time_ns": s.flush_ns.load(Relaxed),
                        },
                    })
                })
                .collect(),
        )
    }
}

impl Answers {
    /// `query-machines`, with the machine this VM runs marked `is-current` (Proxmox VE's
    /// QEMU adds the flag, and `qm` reads the running machine from it): the entry the command
    /// line named, else the default one, which is what any other PC name runs as.
    fn machines(&self, args: &Map<String, Value>) -> Value {
        let mut all =
            qemu_shim::probe::answer("query-machines", args, PACKAGE).and_then(Result::ok).unwrap_or_else(|| json!([]));
        let list = all.as_array_mut().map(std::mem::take).unwrap_or_default();
        let asked = self.machine.as_deref().unwrap_or_default();
        let named = |m: &Value| !asked.is_empty() && (m["name"] == asked || m["alias"] == asked);
        let current = list.iter().position(named).or_else(|| list.iter().position(|m| m["is-default"] == true));
        let marked = list.into_iter().enumerate().map(|(i, mut m)| {
            m["is-current"] = json!(Some(i) == current);
            m
        });
        Value::Array(marked.collect())
    }

    /// Whether `name` is a QOM command on the balloon.
    fn is_balloon(&self, name: &str, args: &Map<String, Value>) -> bool {
        let (Some(path), Some(balloon)) = (smp_ft::balloon::qom_path(name, args), &self.balloon_path) else {
            return false;
        };
        smp_ft::balloon::names(&path, balloon)
    }

    /// `query-chardev`: the serial port's terminal, the monitor, and each virtio-serial port
    /// with whether the guest has it open (`open`, in port order; closed if not given), which
    /// libvirt shows as the channel's state.
    fn chardevs(&self, pty: Option<&std::path::Path>, open: &[bool]) -> Value {
        let mut v = vec![json!({"label": "charmonitor", "filename": "disconnected:unix:fd", "frontend-open": true})];
        if let (Some(label), Some(pty)) = (&self.serial_label, pty) {
            let filename = format!("pty:{}", pty.display());
            v.insert(0, json!({"label": label, "filename": filename, "frontend-open": false}));
        }
        for (i, label) in self.channels.iter().enumerate() {
            let open = open.get(i).copied().unwrap_or(false);
            v.push(json!({"label": label, "filename": "unix:,server=on", "frontend-open": open}));
        }
        Value::Array(v)
    }

    fn block_answer(&self, name: &str, sizes: &[Size]) -> Value {
        match name {
            "query-block" => block_info::query_block(&self.block, sizes),
            _ => block_info::named_nodes(&self.block, sizes),
        }
    }
}

impl Extension for Answers {
    fn answer(
        &mut self,
        vm: Option<&RunningVm>,
        pty: Option<&std::path::Path>,
        name: &str,
        args: &Map<String, Value>,
    ) -> Option<Result<Value, QmpError>> {
        let Some(vm) = vm else { return self.without_vm(pty, name, args) };
        if self.is_balloon(name, args) {
            return Some(smp_ft::balloon::qom(Some(vm), name, args));
        }
        Some(Ok(match name {
            "query-cpus-fast" => Value::Array(
                vm.vcpu_tids()
                    .iter()
                    .enumerate()
                    .map(|(i, tid)| {
                        json!({"cpu-index": i, "qom-path": format!("/machine/unattached/device[{i}]"), "thread-id": tid,
                               "props": {"core-id": 0, "thread-id": 0, "socket-id": i}, "target": "x86_64"})
                    })
                    .collect(),
            ),
            "system_powerdown" => {
                vm.devices().press_power_button();
                json!({})
            }
            "query-blockstats" => self.blockstats(vm),
            "query-pci" => super::pci::query_pci(&vm.devices().pci_functions(), &self.pci_ids),
            "query-chardev" => {
                let open: Vec<bool> = match vm.devices().virtio_serial() {
                    Some(v) => (0..self.channels.len()).map(|i| v.guest_open(i)).collect(),
                    None => Vec::new(),
                };
                self.chardevs(pty, &open)
            }
            "query-block" | "query-named-block-nodes" => {
                let backends = vm.devices().disk_backends();
                let sizes: Vec<_> = self
                    .block
                    .iter()
                    .enumerate()
                    .map(|(i, d)| Size::of(&d.disk.source, backends.get(i).map(|b| b.size())))
                    .collect();
                self.block_answer(name, &sizes)
            }
            _ => return self.without_vm(pty, name, args),
        }))
    }
}
