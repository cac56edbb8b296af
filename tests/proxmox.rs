//! Proxmox VE's qm running smpft as its `/usr/bin/kvm`: the exact command lines qm builds for
//! three of its own regression configs (tests/data/proxmox), started as qm starts them (the
//! program named `kvm`, `-daemonize`, the guest given with `args: -kernel ...`), then driven
//! over QMP as qm drives it: one connection per command, each sent as bare JSON before the
//! greeting is read. A stand-in qmeventd listens for the VM's events, and stand-in
//! `pve-bridge`/`pve-bridgedown` scripts attach the tap qm names to a bridge.

mod common;

use common::libvirt::Bridge;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PVE: [(&str, &str); 3] = [
    ("pve9-simple1", include_str!("data/proxmox/pve9-simple1.conf.cmd")),
    ("pve9-simple-virtio-blk", include_str!("data/proxmox/pve9-simple-virtio-blk.conf.cmd")),
    ("pve8-simple1-drive", include_str!("data/proxmox/pve8-simple1-drive.conf.cmd")),
];

/// A command line as `qm showcmd --pretty` prints it, split into words (single quotes group).
pub fn qm_words(cmd: &str) -> Vec<String> {
    let (mut words, mut cur, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
    for c in cmd.replace("\\\n", " ").chars() {
        match c {
            '\'' => (quoted, any) = (!quoted, true),
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(cur);
    }
    words
}

/// One node's view: where qm's paths point here, the `kvm` program, the bridge and scripts.
struct Node {
    dir: Scratch,
    kvm: PathBuf,
    net: Bridge,
    /// What the stand-in scripts were called with, one line each (`up NAME`, `down NAME`).
    calls: PathBuf,
}

impl Node {
    fn new(name: &str) -> Node {
        let dir = scratch(name);
        let kvm = dir.join("kvm");
        std::os::unix::fs::symlink(smpft_bin(), &kvm).unwrap();
        std::fs::write(dir.join("guest.elf"), smp_ft::guest::BUILTIN).unwrap();
        let net = Bridge::new();
        let calls = dir.join("script-calls");
        for (script, body) in [
            (
                "pve-bridge",
                format!(
                    "echo \"up $1\" >> {calls}\nip link set dev \"$1\" master {br} up\n",
                    calls = calls.display(),
                    br = net.bridge
                ),
            ),
            ("pve-bridgedown", format!("echo \"down $1\" >> {}\n", calls.display())),
            ("pve-bridge-fails", "echo \"no such bridge vmbr7 for $1\" >&2\nexit 2\n".to_string()),
        ] {
            let p = dir.join(script);
            std::fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        Node { dir, kvm, net, calls }
    }

    fn qmp(&self) -> PathBuf {
        self.dir.join("8006.qmp")
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("8006.pid")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("8006.log")
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(&self.calls).unwrap_or_default()
    }

    /// qm's command line with this node's paths, the VM's tap `tap`, its disk, and the guest
    /// appended as a VM's `args:` would.
    fn line(&self, cmd: &str, tap: &str, disk: &Path, guest: &str) -> Vec<String> {
        let d = |f: &str| self.dir.join(f).display().to_string();
        let mut words = qm_words(cmd);
        words.remove(0);
        for w in &mut words {
            *w = w
                .replace("/var/run/qemu-server/8006.qmp", &d("8006.qmp"))
                .replace("/var/run/qmeventd.sock", &d("qmeventd.sock"))
                .replace("/var/run/qemu-server/8006.pid", &d("8006.pid"))
                .replace("/var/lib/vz/images/8006/vm-8006-disk-0.qcow2", &disk.display().to_string())
                .replace("/usr/libexec/qemu-server/", &format!("{}/", self.dir.display()))
                .replace("tap8006i0", tap)
                // What qm writes for `cpu: host`: this host's KVM does not offer kvm64's pni, and
                // qm's `enforce` makes that a refusal, as it is in QEMU.
                .replace("kvm64,enforce,+kvm_pv_eoi,+kvm_pv_unhalt,+lahf_lm,+sep", "host,+kvm_pv_eoi,+kvm_pv_unhalt");
        }
        let kernel = d("guest.elf");
        words.extend(["-kernel".into(), kernel, "-append".into(), guest.into()]);
        words
    }

    /// Starts the line as qm does: `kvm ARGS` with `-daemonize`, waiting for the parent.
    fn start(&self, args: &[String]) -> std::process::Output {
        self.start_with(args, &[])
    }

    /// As [`Node::start`], with more environment (where the hookscript left FT settings).
    fn start_with(&self, args: &[String], env: &[(&str, String)]) -> std::process::Output {
        Command::new(&self.kvm)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("SMPFT_LOG", "info")
            .env("SMPFT_DAEMON_LOG", self.log())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pidfile()).ok()?.trim().parse().ok()
    }

    fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }
}

impl Drop for Node {
    /// A daemonized VM is no child of the test: one a failed test left running is ended here.
    fn drop(&mut self) {
        if let Some(pid) = self.pid().filter(|p| alive(*p)) {
            // SAFETY: SIGKILL to the VM this node's pidfile names, which this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// One QMP command as qm sends it: a new connection, `qmp_capabilities` and the command written
/// at once as bare JSON (no newline) before the greeting is read; the command's reply.
fn qm(path: &Path, cmd: &str, args: Option<Value>) -> Value {
    let mut s = UnixStream::connect(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut c = json!({"execute": cmd});
    if let Some(a) = args {
        c["arguments"] = a;
    }
    s.write_all(format!("{}{}", json!({"execute": "qmp_capabilities"}), c).as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut replies = Vec::new();
    while replies.len() < 3 {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "{cmd}: the monitor closed after {replies:?}");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{cmd}: bad JSON {line:?}: {e}"));
        if v.get("event").is_none() {
            replies.push(v);
        }
    }
    assert!(replies[0]["QMP"].is_object(), "{cmd}: no greeting first: {replies:?}");
    assert_eq!(replies[1], json!({"return": {}}), "{cmd}: qmp_capabilities");
    replies.remove(2)
}

fn qm_ok(path: &Path, cmd: &str, args: Option<Value>) -> Value {
    let r = qm(path, cmd, args);
    r.get("return").cloned().unwrap_or_else(|| panic!("{cmd} failed: {r}"))
}

/// A stand-in qmeventd: accepts the VMs' event monitors, negotiates, records every event, and
/// on SHUTDOWN sends `quit` (as qmeventd ends a VM that was shut down inside).
struct Qmeventd {
    events: Arc<Mutex<Vec<Value>>>,
}

impl Qmeventd {
    fn listen(path: &Path) -> Qmeventd {
        let listener = UnixListener::bind(path).unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let ev = ev.clone();
                std::thread::spawn(move || Qmeventd::serve(conn, ev));
            }
        });
        Qmeventd { events }
    }

    fn serve(conn: UnixStream, events: Arc<Mutex<Vec<Value>>>) {
        let mut w = conn.try_clone().unwrap();
        let mut r = BufReader::new(conn);
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        events.lock().unwrap().push(json!({"greeting": serde_json::from_str::<Value>(&line).ok()}));
        let _ = w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n");
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
            if v["event"] == "SHUTDOWN" {
                let _ = w.write_all(b"{\"execute\":\"quit\"}\n");
            }
            if v.get("event").is_some() {
                events.lock().unwrap().push(v);
            }
        }
    }

    fn names(&self) -> Vec<String> {
        self.events.lock().unwrap().iter().filter_map(|e| e["event"].as_str().map(String::from)).collect()
    }

    fn has(&self, name: &str) -> Option<Value> {
        self.events.lock().unwrap().iter().find(|e| e["event"] == name).cloned()
    }
}

fn qcow2(dir: &Path) -> PathBuf {
    let disk = dir.join("vm-8006-disk-0.qcow2");
    let o = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&disk).arg("64M").output();
    let o = o.expect("qemu-img is missing: run scripts/setup");
    assert!(o.status.success(), "qemu-img: {}", stderr(&o));
    disk
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// The guest: the counter, its HTTP service on the tap, and the disk workload.
const GUEST: &str = "counter service disk disk-ws=4M net ip=203.0.113.2/24 duration=600s";

/// Each of qm's three command lines: the VM starts as qm starts it, answers qm's QMP calls,
/// suspends, resumes, resets, and shuts down through the guest, with qmeventd told.
#[test]
fn qms_command_lines_start_and_are_driven_as_qm_drives_them() {
    require_kvm();
    let _one = one_at_a_time();
    for (name, cmd) in PVE {
        let node = Node::new(&format!("pve-{name}"));
        let eventd = Qmeventd::listen(&node.dir.join("qmeventd.sock"));
        let tap = format!("tap{}i0", std::process::id() % 100_000);
        let disk = qcow2(&node.dir);
        // The disk workload runs on the disk qm gave: virtio-scsi (qm's default) or virtio-blk.
        let guest = if cmd.contains("scsi-hd") { format!("{GUEST} disk-bus=scsi") } else { GUEST.to_string() };
        let out = node.start(&node.line(cmd, &tap, &disk, &guest));
        let context = || format!("{name}:\n{}\n{}", stderr(&out), node.daemon_log());
        assert!(out.status.success(), "the parent exits 0 once the VM runs: {}", context());
        assert!(out.stdout.is_empty(), "{name}: nothing on stdout: {:?}", String::from_utf8_lossy(&out.stdout));
        let pid = node.pid().unwrap_or_else(|| panic!("no pidfile: {}", context()));
        assert!(alive(pid), "the pidfile names the running VM: {}", context());
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(cmdline.contains(&node.pidfile().display().to_string()), "qm finds the VM by -pidfile in its cmdline");
        assert_eq!(node.calls(), format!("up {tap}\n"), "{name}: pve-bridge ran with the tap's name");
        // The guest answers on the tap qm named, through the bridge pve-bridge attached it to.
        let never = later(|| format!("the guest's HTTP service never answered on {tap}: {}", context()));
        let body = wait_for(never, Duration::from_secs(30), || {
            let o = node.net.client(&["curl", "-sS", "--max-time", "5", "http://203.0.113.2/incr/1"]);
            o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
        });
        assert_eq!(body, "OK 1 1", "{name}");
        qm_status_verbose(&node.qmp(), name);
        // qm suspend / resume / reset.
        qm_ok(&node.qmp(), "stop", None);
        assert_eq!(qm_ok(&node.qmp(), "query-status", None)["status"], "paused", "{name}");
        qm_ok(&node.qmp(), "cont", None);
        assert_eq!(qm_ok(&node.qmp(), "query-status", None)["status"], "running", "{name}");
        qm_ok(&node.qmp(), "system_reset", None);
        wait_until(later(|| format!("qmeventd heard no RESET: {:?}", eventd.names())), Duration::from_secs(10), || {
            eventd.has("RESET").is_some()
        });
        // qm shutdown: the power button; the guest powers off, qmeventd hears SHUTDOWN (from the
        // guest) and ends the VM (-no-shutdown left it stopped); the downscript runs.
        qm_ok(&node.qmp(), "system_powerdown", None);
        wait_until(later(|| format!("the VM never ended: {}", context())), Duration::from_secs(30), || !alive(pid));
        let shutdown = eventd.has("SHUTDOWN").unwrap_or_else(|| panic!("no SHUTDOWN event: {:?}", eventd.names()));
        assert_eq!(shutdown["data"]["guest"], true, "{name}: {shutdown}");
        assert!(eventd.events.lock().unwrap()[0]["greeting"]["QMP"].is_object(), "{name}: qmeventd was greeted");
        assert_eq!(node.calls(), format!("up {tap}\ndown {tap}\n"), "{name}: pve-bridgedown ran after the VM ended");
        assert!(!node.pidfile().exists(), "{name}: the pidfile is removed");
        let log = node.daemon_log();
        assert!(log.contains("RESULT: PASS"), "{name}: the guest's workload passed:\n{log}");
    }
}

/// `qm status --verbose` (and `qm start`'s checks), each call on its own connection.
fn qm_status_verbose(qmp: &Path, name: &str) {
    let version = qm_ok(qmp, "query-version", None);
    assert!(version["qemu"]["major"].as_u64().is_some(), "{name}: {version}");
    assert_eq!(qm_ok(qmp, "query-status", None)["status"], "running", "{name}");
    let support = qm_ok(qmp, "query-proxmox-support", None);
    assert_eq!(support["pbs-dirty-bitmap"], false, "{name}: no PBS dirty bitmaps: {support}");
    let machines = qm_ok(qmp, "query-machines", None);
    assert!(machines.as_array().is_some_and(|m| !m.is_empty()), "{name}: {machines}");
    // qm maps each entry's qdev back to its drive (scsi0, virtio0).
    let stats = qm_ok(qmp, "query-blockstats", None);
    let qdev = stats[0]["qdev"].as_str().unwrap_or_default().to_string();
    let drive = qdev.trim_start_matches("/machine/peripheral/").trim_end_matches("/virtio-backend");
    let want = if name.contains("virtio-blk") { "virtio0" } else { "scsi0" };
    assert_eq!(drive, want, "{name}: {stats}");
    let cpus = qm_ok(qmp, "query-cpus-fast", None);
    assert_eq!(cpus.as_array().map(Vec::len), Some(3), "{name}: {cpus}");
    let balloon = qm_ok(qmp, "query-balloon", None);
    assert_eq!(balloon["actual"], json!(768u64 << 20), "{name}: {balloon}");
    let pci = qm_ok(qmp, "query-pci", None);
    assert!(pci.to_string().contains("\"net0\""), "{name}: query-pci names the NIC: {pci}");
    let controller = if name.contains("virtio-blk") { "\"virtio0\"" } else { "\"scsihw0\"" };
    assert!(pci.to_string().contains(controller), "{name}: query-pci names the disk's device: {pci}");
    qm_ok(
        qmp,
        "qom-set",
        Some(json!({"path": "/machine/peripheral/balloon0", "property": "guest-stats-polling-interval", "value": 2})),
    );
    let hmp = qm(qmp, "human-monitor-command", Some(json!({"command-line": "frobnicate now"})));
    assert!(hmp.to_string().contains("frobnicate"), "{name}: an unknown HMP command is named: {hmp}");
}

/// A tap script that fails ends the start with its words; the parent exits non-zero and no
/// process is left behind. A UEFI VM is refused with the reason.
#[test]
fn a_failing_tap_script_and_a_uefi_vm_are_refused_with_the_reason() {
    require_kvm();
    let _one = one_at_a_time();
    let node = Node::new("pve-bad");
    let tap = format!("tapb{}i0", std::process::id() % 100_000);
    let disk = qcow2(&node.dir);
    let (_, cmd) = PVE[1];
    let mut line = node.line(cmd, &tap, &disk, GUEST);
    for w in &mut line {
        *w = w.replace("pve-bridge,", "pve-bridge-fails,");
    }
    let out = node.start(&line);
    let e = stderr(&out);
    assert!(!out.status.success(), "a failing pve-bridge fails the start");
    assert!(e.contains("pve-bridge-fails") && e.contains("no such bridge vmbr7"), "{e}");
    assert!(node.pid().is_none_or(|p| !alive(p)), "no VM is left running");
    let mut uefi = node.line(cmd, &tap, &disk, GUEST);
    uefi.extend([
        "-drive".into(),
        "if=pflash,unit=0,format=raw,readonly=on,file=/usr/share/pve-edk2-firmware//OVMF_CODE_4M.fd".into(),
    ]);
    let out = node.start(&uefi);
    assert!(!out.status.success() && stderr(&out).contains("UEFI"), "{}", stderr(&out));
}

/// `kvm --version` answers as QEMU does, in the form qm parses.
#[test]
fn kvm_version_is_a_qemu_version_qm_accepts() {
    let node_dir = scratch("pve-version");
    let kvm = node_dir.join("kvm");
    std::os::unix::fs::symlink(smpft_bin(), &kvm).unwrap();
    let out = Command::new(&kvm).arg("--version").output().unwrap();
    let mut text = String::new();
    out.stdout.as_slice().read_to_string(&mut text).unwrap();
    let v = text.strip_prefix("QEMU emulator version ").unwrap_or_else(|| panic!("{text}"));
    let ver: Vec<u32> = v.split([' ', ',']).next().unwrap().split('.').map(|n| n.parse().unwrap()).collect();
    assert!(ver.len() == 3 && ver[0] >= 7, "{text}");
}

/// The FT pair the Proxmox way: node A runs the VM as qm would, after the hookscript; node B
/// (a network namespace, with its own files mounted over node A's paths, as another host has
/// them) runs the standby unit's command. Node A's copy is killed; the standby goes live, its
/// event hook moves the VM's config to node B and writes the pidfile, and nothing is lost.
#[test]
fn an_ft_pair_set_up_the_proxmox_way_fails_over() {
    require_kvm();
    let _one = one_at_a_time();
    let a = Node::new("pve-ft-a");
    let b = scratch("pve-ft-b");
    let shared = scratch("pve-ft-shared");
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/proxmox/smpft-pve");
    let id = std::process::id() % 100_000;
    let (ns, subnet) = (format!("smpft-pveb{id}"), format!("10.{}.{}", 100 + id % 100, id % 250));
    let link = NodeB::new(&ns, &subnet, &a.net.bridge);
    // Each node's identity at the same path (node B's under its own files), certificates on the
    // cluster filesystem.
    let pve = shared.join("pve");
    for (dir, node) in [(&a.dir as &Path, "nodeA"), (&b as &Path, "nodeB")] {
        let o = smpft().args(["keygen", "--name", node, "--out"]).arg(dir.join("identity")).output().unwrap();
        assert!(o.status.success(), "keygen: {}", stderr(&o));
        std::fs::create_dir_all(pve.join("smpft/certs")).unwrap();
        std::fs::copy(dir.join("identity/cert.pem"), pve.join(format!("smpft/certs/{node}.pem"))).unwrap();
        std::fs::create_dir_all(dir.join("ft")).unwrap();
    }
    std::fs::create_dir_all(pve.join("nodes/nodeA/qemu-server")).unwrap();
    let conf = include_str!("data/proxmox/pve9-simple-virtio-blk.conf").replace("vmbr0", &a.net.bridge);
    std::fs::write(pve.join("nodes/nodeA/qemu-server/8006.conf"), conf).unwrap();
    let port = common::ft::free_port();
    std::fs::write(
        pve.join("smpft/8006.conf"),
        format!(
            "# FT for VM 8006\nnode.nodeA = {subnet}.1:{port}\nnode.nodeB = {subnet}.2:{port}\ntiebreak = {}\nidentity = {}\ncerts = {}\nstandby-start = manual\nft-timeout = 1s\n",
            shared.join("8006.tiebreak").display(),
            a.dir.join("identity").display(),
            pve.join("smpft/certs").display()
        ),
    )
    .unwrap();
    // qm's command line (node A's paths, which node B has as its own), with a serial port.
    // The tap qm names for VM 8006's net0: node B's standby finds the bridge by it.
    let tap = "tap8006i0".to_string();
    let disk = qcow2(&a.dir);
    qcow2(&b);
    std::fs::write(b.join("guest.elf"), smp_ft::guest::BUILTIN).unwrap();
    std::os::unix::fs::symlink(smpft_bin(), b.join("kvm")).unwrap();
    let serial = a.dir.join("serial.sock");
    let mut line = a.line(PVE[1].1, &tap, &disk, common::ft::GUEST);
    line.extend(["-serial".into(), format!("unix:{},server=on,wait=off", serial.display())]);
    let qm_program = shared.join("qm");
    let quoted: Vec<String> = line.iter().map(|w| format!("'{w}'")).collect();
    std::fs::write(shared.join("showcmd"), format!("/usr/bin/kvm {}\n", quoted.join(" "))).unwrap();
    std::fs::write(&qm_program, format!("#!/bin/sh\ncat {}\n", shared.join("showcmd").display())).unwrap();
    std::fs::set_permissions(&qm_program, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let env = |node: &str| {
        [
            ("PVE_ETC", pve.display().to_string()),
            ("SMPFT_FT_DIR", a.dir.join("ft").display().to_string()),
            ("SMPFT_NODE", node.to_string()),
            ("KVM", a.kvm.display().to_string()),
            ("QM", qm_program.display().to_string()),
            ("SMPFT_DAEMON_LOG", a.log().display().to_string()),
            ("SMPFT_LOG", "info".to_string()),
        ]
    };
    // The hookscript's pre-start on node A, then the standby unit's command on node B.
    let o = Command::new(&contrib).args(["8006", "pre-start"]).envs(env("nodeA")).output().unwrap();
    assert!(o.status.success(), "hookscript pre-start: {}", stderr(&o));
    let ft_file = std::fs::read_to_string(a.dir.join("ft/pve-8006.ft")).unwrap();
    assert!(ft_file.contains("role=primary") && ft_file.contains(&format!("peer={subnet}.2:{port}")), "{ft_file}");
    let standby_log = std::fs::File::create(shared.join("standby.log")).unwrap();
    let script = format!(
        "mount --bind {b} {a} && exec {contrib} standby 8006",
        b = b.display(),
        a = a.dir.display(),
        contrib = contrib.display()
    );
    let mut standby = Proc::new(
        Command::new("ip")
            .args(["netns", "exec", &ns, "sh", "-c", &script])
            .envs(env("nodeB"))
            .stderr(standby_log)
            .spawn()
            .unwrap(),
    );
    let standby_qmp = b.join("8006.qmp");
    let context = || {
        format!(
            "node A:\n{}\nnode B:\n{}",
            a.daemon_log(),
            std::fs::read_to_string(shared.join("standby.log")).unwrap_or_default()
        )
    };
    wait_until(later(|| format!("the standby never listened: {}", context())), Duration::from_secs(20), || {
        accepts_connections(&standby_qmp)
    });
    let out = a.start_with(&line, &env("nodeA"));
    assert!(out.status.success(), "node A's VM starts: {}\n{}", stderr(&out), context());
    let primary = a.pid().unwrap();
    wait_until(later(|| format!("never protected: {}", context())), Duration::from_secs(30), || {
        qm(&a.qmp(), "x-smpft-query-ft", None)["return"]["state"] == "protected"
    });
    let client = common::ft::background_client(vec![serial.clone(), b.join("serial.sock")]);
    client.wait_replies(30, Duration::from_secs(30));
    // SAFETY: SIGKILL to the primary's process, which this test started.
    assert_eq!(unsafe { libc::kill(primary, libc::SIGKILL) }, 0);
    let moved = pve.join("nodes/nodeB/qemu-server/8006.conf");
    wait_until(later(|| format!("the config never moved to node B: {}", context())), Duration::from_secs(30), || {
        moved.exists()
    });
    assert!(!pve.join("nodes/nodeA/qemu-server/8006.conf").exists(), "the config left node A");
    let pid = std::fs::read_to_string(b.join("8006.pid")).unwrap_or_default();
    assert_eq!(pid.trim(), standby.pid().to_string(), "node B's pidfile names the live VM: {}", context());
    client.wait_replies(30, Duration::from_secs(30));
    let c = client.finish_or(context);
    assert_eq!(c.connected_to, Some(1), "the client went over to node B");
    qm_ok(&standby_qmp, "quit", None);
    let gone = later(|| format!("node B's VM did not end on quit: {}", context()));
    wait_for(gone, Duration::from_secs(20), || standby.try_wait());
    drop(link);
}

/// Node B's network: a namespace with a link to node A (SUBNET.1 here, SUBNET.2 there) and a
/// bridge named as node A's, which the VM's config names.
struct NodeB {
    ns: String,
}

impl NodeB {
    fn new(ns: &str, subnet: &str, bridge: &str) -> NodeB {
        let ip = |a: &[&str]| smp_ft::lan::ip(a).unwrap();
        let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        ip(&["netns", "add", ns]);
        let (here, there) = (format!("{}a", &ns[..ns.len().min(12)]), format!("{}b", &ns[..ns.len().min(12)]));
        let _ = Command::new("ip").args(["link", "del", &here]).stderr(Stdio::null()).status();
        ip(&["link", "add", &here, "type", "veth", "peer", "name", &there, "netns", ns]);
        ip(&["addr", "add", &format!("{subnet}.1/24"), "dev", &here]);
        ip(&["link", "set", "dev", &here, "up"]);
        ip(&["-n", ns, "addr", "add", &format!("{subnet}.2/24"), "dev", &there]);
        ip(&["-n", ns, "link", "set", "dev", &there, "up"]);
        ip(&["-n", ns, "link", "set", "dev", "lo", "up"]);
        ip(&["-n", ns, "link", "add", "name", bridge, "type", "bridge"]);
        ip(&["-n", ns, "link", "set", "dev", bridge, "up"]);
        NodeB { ns: ns.to_string() }
    }
}

impl Drop for NodeB {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}
