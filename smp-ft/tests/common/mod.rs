//! Helpers shared by the integration tests: they boot real KVM guests in real processes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

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

/// A fresh directory for one test's sockets and files.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("smpft-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
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

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub use smp_ft::client::ServiceClient as Client;

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
    smp_ft::client::parse_reply(line, kind).unwrap_or_else(|e| panic!("{e}"))
}
