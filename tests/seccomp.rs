//! Per-thread seccomp filters (`--seccomp`). On each kind of thread, a call its filter refuses
//! (made by the test-only probe, `SMPFT_SECCOMP_PROBE`) kills the process with `kill` and, with
//! `log`, is written to the kernel's audit log under that thread's name while the VM goes on. The
//! rest of the suite runs with the filters on (the default), which is what shows they allow all
//! that smpft does.

mod common;

use common::ft::{free_port, log, spawn, wait_exit, wait_state, FtSetup, Side, GUEST};
use common::{one_at_a_time, require_kvm, wait_for, Qmp, VmPaths};
use serde_json::json;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

/// The kinds a lone primary has, with the name (a prefix) its threads go by.
const ON_A_PRIMARY: [(&str, &str); 8] = [
    ("control", "smpft"),
    ("vcpu", "vcpu"),
    ("device", "serial-"),
    ("channel", "ft-"),
    ("qmp", "qmp-"),
    ("metrics", "metrics"),
    ("signals", "signal"),
    ("hook", "event-hook"),
];

/// The audit records of refused calls the kernel logged for `pid`: (thread name, call number).
fn audit_records(pid: u32) -> Vec<(String, u64)> {
    let out = std::process::Command::new("dmesg").output().expect("dmesg");
    let field = |l: &str, key: &str| l.split(key).nth(1).and_then(|r| r.split_whitespace().next()).map(str::to_string);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("type=1326") && field(l, " pid=").as_deref() == Some(&pid.to_string()))
        .filter_map(|l| Some((field(l, " comm=")?.trim_matches('"').to_string(), field(l, " syscall=")?.parse().ok()?)))
        .collect()
}

/// The kernel writes audit records to its log through a rate limit (10 per 5 s by default);
/// the test lifts it while it runs.
struct NoPrintkLimit(String);

impl NoPrintkLimit {
    fn new() -> NoPrintkLimit {
        let path = "/proc/sys/kernel/printk_ratelimit";
        let old = std::fs::read_to_string(path).expect("printk_ratelimit");
        std::fs::write(path, "0").expect("printk_ratelimit (root is needed)");
        NoPrintkLimit(old)
    }
}

impl Drop for NoPrintkLimit {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/printk_ratelimit", self.0.trim());
    }
}

/// A primary with every kind of thread a lone copy has: QMP, metrics, an event hook, a serial
/// port, and an FT peer it keeps trying to reach (nothing listens there).
fn lone_primary(setup: &FtSetup, p: &VmPaths, env: &[(&str, &str)], mode: &str) -> common::Proc {
    let side = Side { me: &setup.a, peer: &setup.b, tiebreak: &setup.tiebreak, env, netns: None };
    let nowhere = format!("127.0.0.1:{}", free_port());
    let args = ["run", "--vcpus", "2", "--memory", "128M", "--guest-args", GUEST, "--ft-peer", &nowhere];
    let extra = ["--metrics", "127.0.0.1:0", "--on-event", "/bin/true", "--seccomp", mode];
    spawn(p, &side, &[&args[..], &extra].concat())
}

fn assert_killed_by_sigsys(status: std::process::ExitStatus, what: &str, log: &str) {
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{what}: {status:?}\n{log}");
}

#[test]
fn a_refused_call_kills_the_process_on_every_kind_of_thread() {
    require_kvm();
    let _one = one_at_a_time();
    let setup = FtSetup::new("seccomp-kill");
    for (kind, _) in ON_A_PRIMARY {
        let p = setup.paths(kind);
        let proc = lone_primary(&setup, &p, &[("SMPFT_SECCOMP_PROBE", kind)], "kill");
        let status = wait_exit(proc, Duration::from_secs(30));
        assert_killed_by_sigsys(status, kind, &log(&p));
        assert!(log(&p).contains("seccomp probe"), "{kind}: the probe ran\n{}", log(&p));
    }
    // Storage: the storage daemon's watcher (a qcow2 disk).
    let image = setup.dir.join("disk.qcow2");
    let o = std::process::Command::new("qemu-img").args(["create", "-f", "qcow2"]).arg(&image).arg("16M").output();
    assert!(o.as_ref().is_ok_and(|o| o.status.success()), "qemu-img: {o:?}");
    let p = setup.paths("storage");
    let env = [("SMPFT_SECCOMP_PROBE", "storage")];
    let side = Side { me: &setup.a, peer: &setup.b, tiebreak: &setup.tiebreak, env: &env, netns: None };
    let disk = format!("{},format=qcow2", image.display());
    let proc = spawn(&p, &side, &["run", "--vcpus", "1", "--memory", "64M", "--disk", &disk, "--seccomp", "kill"]);
    assert_killed_by_sigsys(wait_exit(proc, Duration::from_secs(30)), "storage", &log(&p));
}

#[test]
fn a_refused_call_is_logged_under_its_thread_and_the_vm_goes_on() {
    require_kvm();
    let _one = one_at_a_time();
    let _limit = NoPrintkLimit::new();
    let setup = FtSetup::new("seccomp-log");
    let all: Vec<&str> = ON_A_PRIMARY.iter().map(|(k, _)| *k).collect();
    let probe = all.join(",");
    let p = setup.paths("a");
    let mut proc = lone_primary(&setup, &p, &[("SMPFT_SECCOMP_PROBE", &probe)], "log");
    wait_state(&p, "unprotected", Duration::from_secs(20));
    let pid = proc.pid();
    let records = wait_for(format!("audit records for all kinds\n{}", log(&p)), Duration::from_secs(20), || {
        let r = audit_records(pid);
        ON_A_PRIMARY.iter().all(|(_, thread)| r.iter().any(|(comm, _)| comm.starts_with(thread))).then_some(r)
    });
    let (execve, kexec_file_load) = (libc::SYS_execve as u64, libc::SYS_kexec_file_load as u64);
    for (kind, thread) in ON_A_PRIMARY {
        let want = if matches!(kind, "control" | "hook") { kexec_file_load } else { execve };
        assert!(records.iter().any(|(c, n)| c.starts_with(thread) && *n == want), "{kind}: {records:?}");
    }
    assert_eq!(log(&p).matches("seccomp probe: the call returned").count(), ON_A_PRIMARY.len(), "{}", log(&p));
    // The VM still answers.
    let r = Qmp::negotiated(&p.qmp).execute("query-status", None);
    assert_eq!(r["return"]["status"], "running", "{r}");
    proc.sigkill();
}

/// The snapshot writer runs on the standby: asked for a snapshot of the committed copy, a
/// standby whose writer makes a refused call dies of SIGSYS, and the primary goes on alone.
#[test]
fn the_snapshot_writer_is_confined() {
    require_kvm();
    let _one = one_at_a_time();
    let setup = FtSetup::new("seccomp-snapshot");
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths("p"), setup.paths("s"));
    let standby = setup.standby(&sp, &addr, &setup.b, &setup.a, 4, &[("SMPFT_SECCOMP_PROBE", "snapshot")]);
    wait_state(&sp, "waiting", Duration::from_secs(10));
    let _primary = setup.primary(&pp, &addr, &[], &[]);
    wait_state(&pp, "protected", Duration::from_secs(20));
    let file = setup.dir.join("committed.snap");
    let r = Qmp::negotiated(&pp.qmp).execute("x-smpft-snapshot", Some(json!({"file": file})));
    assert!(r.get("error").is_some(), "the standby died writing it: {r}");
    assert_killed_by_sigsys(wait_exit(standby, Duration::from_secs(30)), "snapshot", &log(&sp));
    wait_state(&pp, "unprotected", Duration::from_secs(20));
}
