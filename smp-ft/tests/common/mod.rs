//! Helpers shared by the integration tests: they boot real KVM guests in real processes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// These tests need KVM. Without it they fail, loudly, rather than pass vacuously.
pub fn require_kvm() {
    let kvm = Path::new("/dev/kvm");
    assert!(
        kvm.exists(),
        "/dev/kvm is missing: the smpft integration tests need KVM on this host"
    );
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
            let mut vals = rest
                .split(' ')
                .map(|kv| kv.split_once('=').and_then(|(_, v)| v.parse::<u64>().ok()));
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

/// A client of the guest's `service` over the serial unix socket.
pub struct ServiceClient {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl ServiceClient {
    /// Connects, retrying while smpft starts up.
    pub fn connect(path: &Path, within: Duration) -> ServiceClient {
        let deadline = Instant::now() + within;
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let reader = BufReader::new(s.try_clone().unwrap());
                    return ServiceClient { writer: s, reader };
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot connect to {}: {e}", path.display()),
            }
        }
    }

    pub fn send(&mut self, line: &str) {
        self.writer.write_all(line.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
    }

    pub fn recv(&mut self) -> String {
        let mut l = String::new();
        let n = self
            .reader
            .read_line(&mut l)
            .expect("reply from the guest service");
        assert!(n > 0, "service closed the connection");
        l.trim_end().to_string()
    }

    pub fn call(&mut self, line: &str) -> String {
        self.send(line);
        self.recv()
    }
}

/// Parses `OK <id> <value>` / `VAL <id> <value>` / `BYE <id> <value>`.
pub fn reply(line: &str, kind: &str) -> (u64, u64) {
    let mut w = line.split(' ');
    assert_eq!(w.next(), Some(kind), "unexpected reply {line:?}");
    let id = w
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad id in {line:?}"));
    let value = w
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad value in {line:?}"));
    (id, value)
}
