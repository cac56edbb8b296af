//! Helpers shared by the integration tests: they boot real KVM guests in real processes.
#![allow(dead_code)]

pub mod disk_image;
pub mod disk_kills;
pub mod etcd;
pub mod ft;
pub mod libvirt;
pub mod linux;

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// These tests need KVM. Without it they fail, loudly, rather than pass vacuously.
pub fn require_kvm() {
    let kvm = Path::new("/dev/kvm");
    assert!(kvm.exists(), "/dev/kvm is missing: the smpft integration tests need KVM on this host");
    assert!(
        std::fs::OpenOptions::new().read(true).write(true).open(kvm).is_ok(),
        "/dev/kvm cannot be opened read-write: run the tests as root or as a member of the kvm group"
    );
}

pub fn smpft_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_smpft"))
}

pub fn smpft() -> Command {
    let mut c = Command::new(smpft_bin());
    c.env("SMPFT_LOG", "warn");
    c
}

/// A fresh directory for one test's sockets and files. It is removed when the test passes and
/// kept (logs, consoles) when it fails.
pub fn scratch(name: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("smpft-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// One per-vCPU line of the guest's final report: `cpuN: loops=.. counter=.. churn=..`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuReport {
    pub cpu: usize,
    pub loops: u64,
    pub counter: u64,
    pub churn: u64,
}

pub fn cpu_reports(log: &str) -> Vec<CpuReport> {
    let mut v: Vec<CpuReport> = log
        .lines()
        .filter_map(|l| {
            let l = l.strip_prefix("[guest] ").unwrap_or(l);
            let rest = l.strip_prefix("cpu")?;
            let (cpu, rest) = rest.split_once(": ")?;
            let mut vals = rest.split(' ').map(|kv| kv.split_once('=').and_then(|(_, v)| v.parse::<u64>().ok()));
            Some(CpuReport {
                cpu: cpu.parse().ok()?,
                loops: vals.next()??,
                counter: vals.next()??,
                churn: vals.next()??,
            })
        })
        .collect();
    v.sort_by_key(|r| r.cpu);
    v
}

/// Whether the unix socket at `path` takes connections. A standby's serial socket is bound from
/// its start (reserved) but refuses connections until that copy goes live.
pub fn accepts_connections(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub use smpft_client::ServiceClient as Client;

/// A client of the guest's `service` that fails the test on any error.
pub struct ServiceClient(Client);

impl ServiceClient {
    pub fn connect(path: &Path, within: Duration) -> ServiceClient {
        ServiceClient(Client::connect(path, within).unwrap_or_else(|e| panic!("{e}")))
    }
    pub fn send(&mut self, line: &str) {
        self.0.send(line).unwrap();
    }
    pub fn recv(&mut self) -> String {
        self.0.recv().expect("reply from the guest service")
    }
    pub fn call(&mut self, line: &str) -> String {
        self.send(line);
        self.recv()
    }
}

/// Parses `OK <id> <value>` / `VAL <id> <value>` / `BYE <id> <value>`.
pub fn reply(line: &str, kind: &str) -> (u64, u64) {
    smpft_client::parse_reply(line, kind).unwrap_or_else(|e| panic!("{e}"))
}

/// A QMP client for tests: negotiates, then sends commands and returns the replies (events are
/// collected on the side).
pub struct Qmp {
    writer: std::os::unix::net::UnixStream,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    pub events: Vec<serde_json::Value>,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let s = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() > deadline => panic!("QMP {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut q = Qmp { reader: std::io::BufReader::new(s.try_clone().unwrap()), writer: s, events: Vec::new() };
        assert!(q.read()["QMP"].is_object(), "QMP greeting expected");
        q
    }

    pub fn negotiated(path: &Path) -> Qmp {
        let mut q = Qmp::connect(path);
        assert_eq!(q.execute("qmp_capabilities", None), serde_json::json!({"return": {}}));
        q
    }

    fn read(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut line = String::new();
        assert!(self.reader.read_line(&mut line).unwrap() > 0, "QMP connection closed");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent bad JSON {line:?}: {e}"))
    }

    /// Sends a raw line and returns the next non-event reply.
    pub fn raw(&mut self, line: &str) -> serde_json::Value {
        use std::io::Write;
        // One write: the server takes a command as soon as its JSON is complete, and after
        // `quit` it may be gone before a second write.
        self.writer.write_all(format!("{line}\n").as_bytes()).unwrap();
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    pub fn execute(&mut self, cmd: &str, args: Option<serde_json::Value>) -> serde_json::Value {
        let mut v = serde_json::json!({"execute": cmd});
        if let Some(a) = args {
            v["arguments"] = a;
        }
        self.raw(&v.to_string())
    }

    /// Executes a command that must succeed; returns its `return` value.
    pub fn ok(&mut self, cmd: &str, args: Option<serde_json::Value>) -> serde_json::Value {
        let r = self.execute(cmd, args);
        r.get("return").cloned().unwrap_or_else(|| panic!("{cmd} failed: {r}"))
    }

    /// Whether the server has closed the connection (after what it had sent was read).
    pub fn closed(&mut self) -> bool {
        use std::io::BufRead;
        let mut line = String::new();
        self.reader.read_line(&mut line).map_or(true, |n| n == 0)
    }

    /// `stop` then a snapshot to `file`.
    pub fn stop_and_snapshot(&mut self, file: &Path, incremental: bool) {
        self.ok("stop", None);
        self.ok("x-smpft-snapshot", Some(serde_json::json!({"file": file, "incremental": incremental})));
    }
}

/// Paths of one smpft process's sockets and console in a scratch directory.
pub struct VmPaths {
    pub serial: PathBuf,
    pub qmp: PathBuf,
    pub console: PathBuf,
}

impl VmPaths {
    pub fn new(dir: &Path, name: &str) -> VmPaths {
        VmPaths {
            serial: dir.join(format!("{name}.serial")),
            qmp: dir.join(format!("{name}.qmp")),
            console: dir.join(format!("{name}.console")),
        }
    }

    /// `smpft run` with these paths, plus `extra` arguments.
    pub fn spawn(&self, extra: &[&str]) -> Proc {
        Proc::new(
            smpft()
                .arg("run")
                .arg("--serial")
                .arg(format!("unix:{}", self.serial.display()))
                .arg("--qmp")
                .arg(format!("unix:{}", self.qmp.display()))
                .arg("--console")
                .arg(&self.console)
                .args(extra)
                .spawn()
                .unwrap(),
        )
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
}

/// A child process that is SIGKILLed if the test ends (or panics) without waiting for it, so no
/// VM outlives its test.
pub struct Proc(Option<std::process::Child>, Option<std::process::ExitStatus>);

impl Proc {
    pub fn new(child: std::process::Child) -> Proc {
        Proc(Some(child), None)
    }

    pub fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, |c| c.id())
    }

    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            self.1 = c.wait().ok();
        }
    }

    pub fn wait_with_output(mut self) -> std::process::Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }

    /// The exit status if the process has ended (it is reaped then).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        if self.1.is_none() {
            self.1 = self.0.as_mut()?.try_wait().ok()?;
            if self.1.is_some() {
                self.0 = None;
            }
        }
        self.1
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    pub fn wait(mut self) -> std::process::ExitStatus {
        match self.0.take() {
            Some(mut c) => c.wait().unwrap(),
            None => self.1.unwrap(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// Sends `sig` to the process.
pub fn signal(p: &Proc, sig: i32) {
    // SAFETY: kill(2) with a live child's pid and a valid signal.
    assert_eq!(unsafe { libc::kill(p.pid() as i32, sig) }, 0);
}

pub fn sigkill(p: &mut Proc) {
    p.sigkill();
}

/// One test at a time in this test binary: each starts VMs (often two, of several vCPUs) and
/// the host has 2 cores. A test that panicked does not block the next.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `cond` every few milliseconds until it holds or `within` has passed; whether it held.
pub fn poll(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

const POLL: Duration = Duration::from_millis(20);

/// Waits until `cond` holds; fails the test with `what` and the time waited after `within`.
pub fn wait_until(what: impl Display, within: Duration, mut cond: impl FnMut() -> bool) {
    wait_for(what, within, || cond().then_some(()))
}

/// Waits until `get` gives a value and returns it; fails as [`wait_until`] does.
pub fn wait_for<T>(what: impl Display, within: Duration, mut get: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = get() {
            return v;
        }
        let waited = started.elapsed();
        assert!(waited < within, "{what} (waited {waited:.1?})");
        std::thread::sleep(POLL);
    }
}

/// A message made only when shown: `later(|| format!("..{}", log(&p)))` reads the log only
/// if the wait fails.
pub fn later<F: Fn() -> String>(f: F) -> Later<F> {
    Later(f)
}

pub struct Later<F>(F);

impl<F: Fn() -> String> Display for Later<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&(self.0)())
    }
}

/// The seed of a randomized test: `SMPFT_TEST_SEED` if set (to replay a run), else drawn from
/// the clock. Printed at the start, and again if the test fails.
pub struct Seed(pub u64);

/// The test's [`Seed`] (keep it alive to the end of the test: it prints the seed again on
/// failure) and a generator from it.
pub fn seeded_rng() -> (Seed, impl FnMut(u64) -> u64) {
    let seed = match std::env::var("SMPFT_TEST_SEED") {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("SMPFT_TEST_SEED={v:?} is not a number")),
        Err(_) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            now.as_nanos() as u64
        }
    };
    eprintln!("SMPFT_TEST_SEED={seed}");
    (Seed(seed), rng(seed))
}

impl Drop for Seed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("failed with SMPFT_TEST_SEED={}: set it to replay this run", self.0);
        }
    }
}

/// A small xorshift generator: `r(n)` is in `0..n`. Randomized tests take it from
/// [`seeded_rng`].
pub fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut x = seed | 1;
    move |n| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    }
}
