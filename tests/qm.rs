//! Proxmox VE's `qm` driving a real smpft VM through the QEMU persona, over QMP as qm speaks it:
//! one connection per command (or per queue of commands), bare JSON with no newline, and
//! `qmp_capabilities` sent before the greeting is read. The `qm status --verbose` sequence,
//! `qm start`'s balloon setup, suspend/resume, reset, shutdown and stop, `qm monitor`'s HMP,
//! and the second monitor that connects out to a stand-in `qmeventd` and tells it of the VM's
//! end.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

const MEM: u64 = 128 << 20;

/// One of qm's queues, as `PVE::QMPClient` sends it: a new connection, `qmp_capabilities`
/// written at once, then each command once the reply to the last has come, with qm's ids; the
/// connection closed after the last reply. Returns each command's reply (the greeting and
/// events skipped, as qm does).
fn qm(sock: &Path, cmds: &[(&str, Value)]) -> Vec<Value> {
    let s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("qm: {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut replies = Vec::new();
    let caps = ("qmp_capabilities", json!({}));
    let all = std::iter::once(&caps).chain(cmds);
    for (i, (cmd, args)) in all.enumerate() {
        let id = format!("{}:{i}", std::process::id());
        w.write_all(json!({"execute": cmd, "arguments": args, "id": id}).to_string().as_bytes()).unwrap();
        let reply = loop {
            let mut line = String::new();
            assert!(r.read_line(&mut line).unwrap() > 0, "{cmd}: the connection closed");
            assert!(line.ends_with("}\r\n"), "qm takes replies that end in '}}\\r\\n': {line:?}");
            let v: Value = serde_json::from_str(&line).unwrap();
            if v.get("QMP").is_some() || v.get("event").is_some() {
                continue;
            }
            assert_eq!(v["id"], id, "{cmd}: {v}");
            break v;
        };
        if i > 0 {
            replies.push(reply);
        } else {
            assert_eq!(reply["return"], json!({}), "qmp_capabilities");
        }
    }
    replies
}

/// A single command in its own connection; its `return`, or the test fails.
fn qm_ok(sock: &Path, cmd: &str, args: Value) -> Value {
    let r = qm(sock, &[(cmd, args)]).remove(0);
    r.get("return").cloned().unwrap_or_else(|| panic!("{cmd}: {r}"))
}

/// A single command that must fail; its error's description.
fn qm_err(sock: &Path, cmd: &str, args: Value) -> String {
    let r = qm(sock, &[(cmd, args)]).remove(0);
    r["error"]["desc"].as_str().unwrap_or_else(|| panic!("{cmd} should fail: {r}")).to_string()
}

struct Vm {
    proc: Proc,
    qmp: PathBuf,
    qmeventd: PathBuf,
    out: PathBuf,
}

impl Vm {
    /// The persona with qm's two monitors (the second with `reconnect-ms=`), `-no-shutdown`,
    /// and a balloon where qm puts it, running the test guest with `guest_args`.
    fn start(dir: &Path, name: &str, guest_args: &str) -> Vm {
        let guest = dir.join("guest.elf");
        std::fs::write(&guest, smp_ft::guest::BUILTIN).unwrap();
        let (qmp, qmeventd, out) = (
            dir.join(format!("{name}.qmp")),
            dir.join(format!("{name}-qmeventd.sock")),
            dir.join(format!("{name}.out")),
        );
        let mon = format!("socket,id=qmp,path={},server=on,wait=off", qmp.display());
        let event = format!("socket,id=qmp-event,path={},reconnect-ms=100", qmeventd.display());
        let child = smpft()
            .env("SMPFT_LOG", "info")
            .args(["qemu", "--", "-name", name, "-no-shutdown", "-chardev", &mon, "-mon", "chardev=qmp,mode=control"])
            .args(["-chardev", &event, "-mon", "chardev=qmp-event,mode=control", "-nodefaults"])
            .args(["-smp", "2", "-m", "128", "-kernel", guest.to_str().unwrap(), "-append", guest_args])
            .args([
                "-serial",
                "null",
                "-device",
                "virtio-balloon-pci,id=balloon0,bus=pci.0,addr=0x3,free-page-reporting=on",
            ])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(out.with_extension("log")).unwrap())
            .spawn()
            .unwrap();
        let vm = Vm { proc: Proc::new(child), qmp, qmeventd, out };
        wait_until(later(|| format!("the monitor listens\n{}", vm.log())), Duration::from_secs(60), || {
            accepts_connections(&vm.qmp)
        });
        vm
    }

    fn log(&self) -> String {
        log_of(&self.out)
    }

    /// Waits for the process to end: its exit code and its log.
    fn wait(self) -> (Option<i32>, String) {
        let code = self.proc.wait().code();
        (code, log_of(&self.out))
    }
}

/// The persona's log and the guest's output.
fn log_of(out: &Path) -> String {
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    format!("{}{}", read(&out.with_extension("log")), read(out))
}

/// `qm status --verbose`: query-status, then query-blockstats, query-machines, query-version and
/// query-balloon on the same connection, then query-proxmox-support on another.
fn qm_status(sock: &Path) -> (Vec<Value>, Value) {
    let r = qm(
        sock,
        &[
            ("query-status", json!({})),
            ("query-blockstats", json!({})),
            ("query-machines", json!({})),
            ("query-version", json!({})),
            ("query-balloon", json!({})),
        ],
    );
    (r, qm_ok(sock, "query-proxmox-support", json!({})))
}

#[test]
fn qm_drives_a_vm_one_connection_per_command() {
    require_kvm();
    let dir = scratch("qm");
    let vm = Vm::start(&dir, "vm8006", "balloon counter");
    let sock = vm.qmp.clone();

    // qm start, once the VM runs: the balloon's statistics every 2 s, by a partial QOM path.
    let interval = json!({"path": "machine/peripheral/balloon0", "property": "guest-stats-polling-interval"});
    let mut set = interval.clone();
    set["value"] = json!(2);
    assert_eq!(qm_ok(&sock, "qom-set", set), json!({}));
    assert_eq!(qm_ok(&sock, "qom-get", interval), 2);

    let (r, support) = qm_status(&sock);
    assert_eq!(r[0]["return"]["status"], "running", "{r:?}");
    assert!(r[1]["return"].is_array(), "{}", r[1]);
    let machines = r[2]["return"].as_array().unwrap();
    let current: Vec<&Value> = machines.iter().filter(|m| m["is-current"] == true).collect();
    assert_eq!(current.len(), 1, "one machine runs: {machines:?}");
    assert_eq!(current[0]["is-default"], true);
    assert_eq!(r[3]["return"]["qemu"]["major"], 7, "{}", r[3]);
    assert_eq!((&r[4]["return"]["actual"], &r[4]["return"]["max_mem"]), (&json!(MEM), &json!(MEM)), "{}", r[4]);
    for flag in ["pbs-dirty-bitmap", "pbs-dirty-bitmap-savevm", "query-bitmap-info", "pbs-masterkey", "backup-fleecing"]
    {
        assert_eq!(support[flag], false, "{flag}: {support}");
    }
    // Once the guest has reported statistics, qm's memory figures come with query-balloon.
    let balloon = wait_for(later(|| format!("the guest's statistics\n{}", vm.log())), Duration::from_secs(30), || {
        let b = qm_ok(&sock, "query-balloon", json!({}));
        b.get("total_mem").is_some().then_some(b)
    });
    assert!(balloon["free_mem"].as_u64().unwrap() <= balloon["total_mem"].as_u64().unwrap(), "{balloon}");
    assert!(balloon["last_update"].as_u64().unwrap() > 0, "{balloon}");
    let stats = qm_ok(&sock, "qom-get", json!({"path": "machine/peripheral/balloon0", "property": "guest-stats"}));
    assert!(stats["stats"]["stat-total-memory"].as_u64().is_some(), "{stats}");

    // query-pci: the devices as the VMM laid them out, with their -device ids.
    let pci = qm_ok(&sock, "query-pci", json!({}));
    let devices = pci[0]["devices"].as_array().unwrap();
    let balloon = devices.iter().find(|d| d["qdev_id"] == "balloon0").unwrap_or_else(|| panic!("{pci}"));
    assert_eq!((&balloon["bus"], &balloon["slot"], &balloon["id"]["vendor"]), (&json!(0), &json!(3), &json!(0x1af4)));
    assert_eq!(devices.iter().find(|d| d["slot"] == 0).unwrap()["class_info"]["desc"], "Host bridge");

    // qm monitor: HMP for what smpft implements, an error naming anything else.
    let hmp = |line: &str| qm(&sock, &[("human-monitor-command", json!({"command-line": line}))]).remove(0);
    assert_eq!(hmp("info status")["return"], "VM status: running\r\n");
    let info = hmp("info balloon")["return"].as_str().unwrap().to_string();
    assert!(info.starts_with("balloon: actual=128 max_mem=128 total_mem="), "{info}");
    let e = hmp("savevm before-upgrade");
    assert!(e["error"]["desc"].as_str().unwrap().contains("'savevm before-upgrade'"), "{e}");
    assert!(qm_err(&sock, "set_password", json!({"protocol": "vnc", "password": "x"})).contains("no VNC"));

    // qm suspend / resume / reset.
    qm_ok(&sock, "stop", json!({}));
    assert_eq!(qm_ok(&sock, "query-status", json!({}))["status"], "paused");
    qm_ok(&sock, "cont", json!({}));
    assert_eq!(qm_ok(&sock, "query-status", json!({}))["status"], "running");
    qm_ok(&sock, "system_reset", json!({}));
    assert_eq!(qm_ok(&sock, "query-status", json!({}))["status"], "running");

    // qm shutdown: the power button; with -no-shutdown the VM stays, powered off, until qm
    // (or qmeventd) ends it.
    qm_ok(&sock, "system_powerdown", json!({}));
    wait_until(later(|| format!("the guest powers off\n{}", vm.log())), Duration::from_secs(30), || {
        qm_ok(&sock, "query-status", json!({}))["status"] == "shutdown"
    });
    assert!(vm.log().contains("power button pressed"), "{}", vm.log());
    // qm stop.
    assert_eq!(qm_ok(&sock, "quit", json!({})), json!({}));
    let (code, log) = vm.wait();
    assert_eq!(code, Some(0), "{log}");
    assert!(!sock.exists(), "the monitor socket is removed");
}

/// A stand-in for qmeventd's side of one VM: accepts the VM's connection, reads the greeting,
/// negotiates as qmeventd does, and then reads events and replies.
struct Qmeventd {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmeventd {
    fn accept(listener: &UnixListener) -> Qmeventd {
        listener.set_nonblocking(true).unwrap();
        let s = wait_for("the VM connects to qmeventd", Duration::from_secs(30), || listener.accept().ok());
        let s = s.0;
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut q = Qmeventd { r: BufReader::new(s.try_clone().unwrap()), w: s };
        assert!(q.next().unwrap().get("QMP").is_some(), "the greeting first");
        q.w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").unwrap();
        assert_eq!(q.next(), Some(json!({"return": {}})));
        q
    }

    /// The next line from the VM; `None` once it closed the connection.
    fn next(&mut self) -> Option<Value> {
        let mut line = String::new();
        (self.r.read_line(&mut line).unwrap_or(0) > 0).then(|| serde_json::from_str(&line).unwrap())
    }

    /// The next event's name and data.
    fn event(&mut self) -> (String, Value) {
        loop {
            let v = self.next().expect("an event before the connection closed");
            if let Some(e) = v["event"].as_str() {
                return (e.to_string(), v["data"].clone());
            }
        }
    }
}

#[test]
fn qmeventd_hears_of_the_vm_and_of_its_end() {
    require_kvm();
    let dir = scratch("qmeventd");

    // qmeventd is not there when the VM starts: the VM runs, and connects once it is.
    let vm = Vm::start(&dir, "vm8007", "counter");
    assert_eq!(qm_ok(&vm.qmp, "query-status", json!({}))["status"], "running");
    let listener = UnixListener::bind(&vm.qmeventd).unwrap();
    let mut ev = Qmeventd::accept(&listener);
    qm_ok(&vm.qmp, "stop", json!({}));
    assert_eq!(ev.event().0, "STOP");
    qm_ok(&vm.qmp, "cont", json!({}));
    assert_eq!(ev.event().0, "RESUME");
    qm_ok(&vm.qmp, "system_reset", json!({}));
    assert_eq!(ev.event(), ("RESET".to_string(), json!({"guest": false, "reason": "host-qmp-system-reset"})));
    // qmeventd goes away and comes back: the VM connects again.
    drop(ev);
    let mut ev = Qmeventd::accept(&listener);
    // The guest powers off: SHUTDOWN from the guest; qmeventd asks the status, finds the VM
    // neither running nor paused, and ends it with SIGTERM as qmeventd does; the connection
    // closes, which is when qmeventd runs `qm cleanup`.
    qm_ok(&vm.qmp, "system_powerdown", json!({}));
    assert_eq!(ev.event(), ("SHUTDOWN".to_string(), json!({"guest": true, "reason": "guest-shutdown"})));
    ev.w.write_all(b"{\"execute\":\"query-status\"}\n").unwrap();
    let status = loop {
        let v = ev.next().expect("the status");
        if v.get("return").is_some() {
            break v["return"]["status"].clone();
        }
    };
    assert_eq!(status, "shutdown");
    signal(&vm.proc, libc::SIGTERM);
    while let Some(v) = ev.next() {
        assert!(v.get("event").is_some(), "{v}");
    }
    let (code, log) = vm.wait();
    assert_eq!(code, Some(128 + libc::SIGTERM), "{log}");

    // qm stop (quit) with qmeventd there from the start.
    let vm = Vm::start(&dir, "vm8008", "counter");
    let listener = UnixListener::bind(&vm.qmeventd).unwrap();
    let mut ev = Qmeventd::accept(&listener);
    qm_ok(&vm.qmp, "quit", json!({}));
    assert_eq!(ev.event(), ("SHUTDOWN".to_string(), json!({"guest": false, "reason": "host-qmp-quit"})));
    assert_eq!(ev.next(), None, "the connection closes as the VM ends");
    let (code, log) = vm.wait();
    assert_eq!(code, Some(0), "{log}");
}

/// `server=on` without `wait=off`: the VM starts only once the monitor has had a client, as
/// QEMU waits.
#[test]
fn a_monitor_with_wait_on_holds_the_vm_until_its_first_client() {
    require_kvm();
    let dir = scratch("qm-wait");
    let guest = dir.join("guest.elf");
    std::fs::write(&guest, smp_ft::guest::BUILTIN).unwrap();
    let (qmp, out) = (dir.join("w.qmp"), dir.join("w.out"));
    let mon = format!("socket,id=qmp,path={},server=on", qmp.display());
    let child = smpft()
        .env("SMPFT_LOG", "info")
        .args(["qemu", "--", "-chardev", &mon, "-mon", "chardev=qmp,mode=control", "-m", "64"])
        .args(["-kernel", guest.to_str().unwrap(), "-append", "counter report=10ms", "-serial", "null"])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(out.with_extension("log")).unwrap())
        .spawn()
        .unwrap();
    let proc = Proc::new(child);
    wait_until(later(|| log_of(&out)), Duration::from_secs(60), || log_of(&out).contains("waiting for a client"));
    assert!(std::fs::read_to_string(&out).unwrap().is_empty(), "the guest ran before a client came: {}", log_of(&out));
    let mut q = Qmp::negotiated(&qmp);
    wait_until(later(|| log_of(&out)), Duration::from_secs(60), || log_of(&out).contains("progress:"));
    q.ok("quit", None);
    assert_eq!(proc.wait().code(), Some(0), "{}", log_of(&out));
}
