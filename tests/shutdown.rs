//! Whatever ends the VM ends the process promptly, whatever its QMP clients are doing: several
//! poll as fast as they can (as libvirt does) and one sends commands but never reads. Checked for
//! a guest that exits, a guest that rejects its arguments, `quit`, SIGTERM, a standby that is
//! stopped, and a primary that loses the tie-breaker, 20 runs each. An orderly stop removes the
//! QMP socket; the emergency exit a signal falls back to does not, so the tests tell them apart.

mod common;
use common::ft::{free_port, log, wait_state, FtSetup};
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RUNS: usize = 20;
/// The bound a stop must meet: well under the 10 s after which a signal ends smpft regardless.
const BOUND: Duration = Duration::from_secs(5);

/// QMP clients hammering one socket until dropped.
struct Pollers {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Pollers {
    fn start(qmp: &Path, fast: usize) -> Pollers {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for _ in 0..fast {
            let (qmp, stop, answered) = (qmp.to_path_buf(), stop.clone(), answered.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if poll_once(&qmp).is_some() {
                        answered.fetch_add(1, Ordering::SeqCst);
                    } else {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }));
        }
        let (qmp, stop2) = (qmp.to_path_buf(), stop.clone());
        threads.push(std::thread::spawn(move || mute_client(&qmp, &stop2)));
        Pollers { stop, answered, threads }
    }

    /// Waits until the pollers have had `n` answers (the QMP server is up and serving).
    fn wait_answers(&self, n: u64) {
        wait_until("QMP never answered the pollers", Duration::from_secs(30), || {
            self.answered.load(Ordering::SeqCst) >= n
        });
    }
}

impl Drop for Pollers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Connect, negotiate, ask `x-smpft-query-ft`, read both replies, close.
fn poll_once(qmp: &Path) -> Option<()> {
    let s = UnixStream::connect(qmp).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut w = s.try_clone().ok()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"x-smpft-query-ft\",\"id\":1}\n").ok()?;
    let mut replies = 0;
    while replies < 2 {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if !line.contains("\"event\"") {
            replies += 1;
        }
    }
    Some(())
}

/// A client that negotiates and then sends commands without ever reading a reply.
fn mute_client(qmp: &Path, stop: &AtomicBool) {
    let mut held = Vec::new();
    while !stop.load(Ordering::SeqCst) && held.len() < 3 {
        if let Ok(s) = UnixStream::connect(qmp) {
            let _ = s.set_nonblocking(true);
            let mut w = &s;
            let _ = w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n");
            for _ in 0..2000 {
                if w.write_all(b"{\"execute\":\"query-status\"}\n").is_err() {
                    break;
                }
            }
            held.push(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for `p` to exit within [`BOUND`] of `since`; returns the exit code and the time taken.
fn exit_within(p: &mut Proc, since: Instant, what: &str) -> (Option<i32>, Duration) {
    loop {
        if let Some(s) = p.try_wait() {
            return (s.code(), since.elapsed());
        }
        if since.elapsed() > BOUND {
            let pid = p.pid();
            let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|d| {
                    d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                        .map(|c| c.trim().to_string())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            p.sigkill();
            panic!("{what}: smpft did not exit within {BOUND:?}; its threads: {threads:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn sigterm(p: &Proc) {
    signal(p, libc::SIGTERM);
}

fn run_vm(qmp: &Path, guest_args: &str) -> Proc {
    let q = format!("unix:{}", qmp.display());
    let args = ["run", "--vcpus", "2", "--memory", "32M", "--serial", "null", "--qmp", &q, "--guest-args", guest_args];
    Proc::new(smpft().args(args).stderr(std::process::Stdio::null()).spawn().unwrap())
}

fn report(what: &str, times: &mut [Duration]) {
    times.sort();
    eprintln!(
        "{what}: {} runs, exit after p50 {:?}, max {:?}",
        times.len(),
        times[times.len() / 2],
        times.last().unwrap()
    );
}

/// Runs `RUNS` VMs with pollers; `end` ends each one and returns when it started to.
fn vm_runs(name: &str, guest_args: &str, expect: Option<i32>, end: impl Fn(&Proc, &Path) -> Instant) {
    require_kvm();
    let _one = one_at_a_time();
    let dir = scratch(name);
    let mut times = Vec::new();
    for run in 0..RUNS {
        let qmp = dir.join(format!("{run}.qmp"));
        let mut vm = run_vm(&qmp, guest_args);
        let pollers = Pollers::start(&qmp, 6);
        let since = end(&vm, &qmp);
        let (code, took) = exit_within(&mut vm, since, &format!("{name} run {run}"));
        drop(pollers);
        assert_eq!(code, expect, "{name} run {run}: exit status");
        assert!(!qmp.exists(), "{name} run {run}: the QMP socket is removed (an orderly stop)");
        times.push(took);
    }
    report(name, &mut times);
}

#[test]
fn guest_exit_ends_the_process_while_clients_poll() {
    // Measured from the start: the guest runs 300 ms.
    vm_runs("guest-exit", "counter duration=300ms", Some(0), |_, _| Instant::now());
}

#[test]
fn rejected_guest_arguments_end_the_process_while_clients_poll() {
    vm_runs("guest-rejects", "counter bogus-setting=1", Some(2), |_, _| Instant::now());
}

#[test]
fn quit_ends_the_process_while_clients_poll() {
    vm_runs("quit", "counter duration=600s", Some(0), |_, qmp| {
        let mut q = Qmp::negotiated(qmp);
        let t = Instant::now();
        assert_eq!(q.execute("quit", None), serde_json::json!({"return": {}}));
        t
    });
}

#[test]
fn sigterm_ends_the_process_while_clients_poll() {
    vm_runs("sigterm", "counter duration=600s", Some(128 + libc::SIGTERM), |vm, qmp| {
        Qmp::negotiated(qmp);
        // The time is the point: the signal comes while the pollers are at work.
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        sigterm(vm);
        t
    });
}

#[test]
fn a_standby_stops_on_sigterm_while_clients_poll() {
    require_kvm();
    let _one = one_at_a_time();
    let setup = FtSetup::new("shutdown-standby");
    let mut times = Vec::new();
    for run in 0..RUNS {
        let sp = setup.paths(&format!("s{run}"));
        let addr = format!("127.0.0.1:{}", free_port());
        let mut standby = setup.standby(&sp, &addr, &setup.b, &setup.a, 2, &[]);
        let pollers = Pollers::start(&sp.qmp, 6);
        pollers.wait_answers(20);
        let t = Instant::now();
        sigterm(&standby);
        let (code, took) = exit_within(&mut standby, t, &format!("standby run {run}"));
        drop(pollers);
        assert_eq!(code, Some(128 + libc::SIGTERM), "standby run {run}\n{}", log(&sp));
        assert!(!sp.qmp.exists(), "standby run {run}: the QMP socket is removed");
        times.push(took);
    }
    report("standby sigterm", &mut times);
}

#[test]
fn a_primary_that_loses_the_tie_breaker_halts_while_clients_poll() {
    require_kvm();
    let _one = one_at_a_time();
    let setup = FtSetup::new("shutdown-halt");
    let mut times = Vec::new();
    for run in 0..RUNS {
        let (pp, sp) = (setup.paths(&format!("p{run}")), setup.paths(&format!("s{run}")));
        let addr = format!("127.0.0.1:{}", free_port());
        let mut standby = setup.standby(&sp, &addr, &setup.b, &setup.a, 4, &[]);
        let mut primary = setup.primary(&pp, &addr, &[], &[]);
        wait_state(&pp, "protected", Duration::from_secs(30));
        let pollers = Pollers::start(&pp.qmp, 6);
        pollers.wait_answers(20);
        // The other side has already won a later generation (as after a partition in which the
        // standby went live); losing the standby sends the primary to the tie-breaker, where it
        // loses and must halt.
        let generation = setup.record().map_or(0, |(g, _)| g) + 5;
        std::fs::write(&setup.tiebreak, format!("smpft-tiebreak v1 {generation} elsewhere\n")).unwrap();
        standby.sigkill();
        let t = Instant::now();
        let (code, took) = exit_within(&mut primary, t, &format!("halt run {run}"));
        drop(pollers);
        assert_eq!(code, Some(75), "halt run {run}: a primary that lost the tie-breaker\n{}", log(&pp));
        assert!(!pp.qmp.exists(), "halt run {run}: the QMP socket is removed");
        times.push(took);
    }
    report("primary halted (includes the 150 ms silence timeout)", &mut times);
}

/// A serial client that sends requests and never reads the replies: the guest's output backs
/// up behind it, and still SIGTERM ends the process (the reader gets a bounded grace).
#[test]
fn a_serial_client_that_never_reads_does_not_hold_up_the_stop() {
    require_kvm();
    let _one = one_at_a_time();
    let dir = scratch("serial-mute");
    let p = VmPaths::new(&dir, "vm");
    let mut times = Vec::new();
    for run in 0..3 {
        let mut vm = p.spawn(&["--vcpus", "1", "--memory", "32M", "--guest-args", "service"]);
        let mut c = ServiceClient::connect(&p.serial, Duration::from_secs(10));
        c.send("");
        c.recv();
        let s = UnixStream::connect(&p.serial).unwrap();
        let mut w = &s;
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut sent = 0u64;
        while Instant::now() < deadline {
            w.write_all(format!("INCR {sent}\n").as_bytes()).unwrap();
            sent += 1;
        }
        let t = Instant::now();
        sigterm(&vm);
        let (code, took) = exit_within(&mut vm, t, &format!("serial run {run}"));
        assert_eq!(code, Some(128 + libc::SIGTERM), "serial run {run}");
        assert!(!p.serial.exists() && !p.qmp.exists(), "serial run {run}: an orderly stop");
        eprintln!("serial run {run}: {sent} requests sent, none read");
        times.push(took);
    }
    report("serial reader that never reads", &mut times);
}
