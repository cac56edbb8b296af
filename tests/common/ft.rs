//! Helpers for the FT tests: identities, a tie-breaker, and primary/standby processes.

use super::{scratch, smpft, wait_for, wait_until, Proc, Qmp, Scratch, VmPaths};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

pub struct FtSetup {
    pub dir: Scratch,
    /// Identity directories of the two hosts.
    pub a: PathBuf,
    pub b: PathBuf,
    /// A path, or an etcd URL ([`FtSetup::on_etcd`]).
    pub tiebreak: PathBuf,
    /// The network namespace the copies run in (the etcd tests' hosts namespace).
    pub netns: Option<String>,
}

/// A UDP port free on loopback right now.
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub const GUEST: &str = "counter churn service churn-rate=2000 churn-ws=2M duration=600s";

impl FtSetup {
    pub fn new(name: &str) -> FtSetup {
        let dir = scratch(name);
        let (a, b) = (dir.join("id-a"), dir.join("id-b"));
        for (d, n) in [(&a, "a"), (&b, "b")] {
            let o = smpft().args(["keygen", "--name", n, "--out"]).arg(d).output().unwrap();
            assert!(o.status.success(), "keygen: {}", String::from_utf8_lossy(&o.stderr));
        }
        let tiebreak = dir.join("tiebreak");
        FtSetup { dir, a, b, tiebreak, netns: None }
    }

    /// As [`FtSetup::new`], with the tie-breaker in `etcd` under `key`; the copies run in its
    /// hosts' namespace.
    pub fn on_etcd(name: &str, etcd: &super::etcd::EtcdCluster, key: &str) -> FtSetup {
        let mut s = FtSetup::new(name);
        s.tiebreak = PathBuf::from(etcd.spec(key));
        s.netns = Some(etcd.hosts.clone());
        s
    }

    /// One side's settings: identity `me` trusting `peer`, with this setup's tie-breaker.
    pub fn side<'a>(&'a self, me: &'a Path, peer: &'a Path, env: &'a [(&'a str, &'a str)]) -> Side<'a> {
        Side { me, peer, tiebreak: &self.tiebreak, env, netns: self.netns.as_deref() }
    }

    pub fn paths(&self, name: &str) -> VmPaths {
        VmPaths::new(&self.dir, name)
    }

    /// `smpft standby` on `listen`, with identity `me` trusting `peer`'s certificate.
    pub fn standby(&self, p: &VmPaths, listen: &str, me: &Path, peer: &Path, vcpus: u32, env: &[(&str, &str)]) -> Proc {
        self.standby_side(p, listen, vcpus, &self.side(me, peer, env))
    }

    pub fn standby_side(&self, p: &VmPaths, listen: &str, vcpus: u32, side: &Side) -> Proc {
        let vcpus = vcpus.to_string();
        spawn(p, side, &["standby", "--listen", listen, "--vcpus", &vcpus, "--memory", "128M"])
    }

    /// `smpft run` (identity a) protected by the standby at `peer_addr`.
    pub fn primary(&self, p: &VmPaths, peer_addr: &str, env: &[(&str, &str)], extra: &[&str]) -> Proc {
        self.primary_side(p, peer_addr, &self.side(&self.a, &self.b, env), extra)
    }

    pub fn primary_side(&self, p: &VmPaths, peer_addr: &str, side: &Side, extra: &[&str]) -> Proc {
        let args = ["run", "--vcpus", "4", "--memory", "128M", "--guest-args", GUEST, "--ft-peer", peer_addr];
        spawn(p, side, &[&args[..], extra].concat())
    }

    /// The tie-breaker record: (generation, holder).
    pub fn record(&self) -> Option<(u64, String)> {
        let spec = self.tiebreak.to_string_lossy();
        if spec.starts_with("etcd://") {
            return self.etcd_record(&spec);
        }
        let t = std::fs::read_to_string(&self.tiebreak).ok()?;
        let mut w = t.trim_end().rsplitn(3, ' ');
        let holder = w.next()?.to_string();
        let generation = w.next()?.parse().ok()?;
        Some((generation, holder))
    }
}

impl FtSetup {
    /// The record in etcd, as `smpft tiebreak show --json` reads it (in the copies' namespace).
    fn etcd_record(&self, spec: &str) -> Option<(u64, String)> {
        let mut c = match &self.netns {
            None => smpft(),
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(super::smpft_bin());
                c
            }
        };
        let o = c.args(["tiebreak", "show", "--json", spec]).output().unwrap();
        assert!(o.status.success(), "tiebreak show: {}", super::stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        Some((v["generation"].as_u64()?, v["holder"].as_str()?.to_string()))
    }
}

/// One side's FT settings.
pub struct Side<'a> {
    pub me: &'a Path,
    pub peer: &'a Path,
    pub tiebreak: &'a Path,
    pub env: &'a [(&'a str, &'a str)],
    /// Run inside this network namespace.
    pub netns: Option<&'a str>,
}

/// `smpft ARGS` with `p`'s serial, QMP and console and `side`'s FT options; its log goes to
/// `p.console` with the extension `log`.
pub fn spawn(p: &VmPaths, side: &Side, args: &[&str]) -> Proc {
    spawn_with_serial(p, side, args, &format!("unix:{}", p.serial.display()))
}

/// As [`spawn`], with COM1 going to `serial` (an smpft `--serial` value).
pub fn spawn_with_serial(p: &VmPaths, side: &Side, args: &[&str], serial: &str) -> Proc {
    let log = std::fs::File::create(p.console.with_extension("log")).unwrap();
    let mut c = match side.netns {
        None => smpft(),
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns]).arg(super::smpft_bin());
            c
        }
    };
    c.env("SMPFT_LOG", std::env::var("SMPFT_TEST_LOG").unwrap_or_else(|_| "info".into()))
        .envs(side.env.iter().copied())
        .args(args)
        .arg("--serial")
        .arg(serial)
        .arg("--qmp")
        .arg(format!("unix:{}", p.qmp.display()))
        .arg("--console")
        .arg(&p.console)
        .arg("--identity")
        .arg(side.me)
        .arg("--peer-cert")
        .arg(side.peer.join("cert.pem"))
        .arg("--tiebreak")
        .arg(side.tiebreak)
        .stderr(log);
    Proc::new(c.spawn().unwrap())
}

/// The log (stderr) of the process whose console is `p.console`.
pub fn log(p: &VmPaths) -> String {
    std::fs::read_to_string(p.console.with_extension("log")).unwrap_or_default()
}

/// `x-smpft-query-ft` of the process at `p`.
pub fn query(p: &VmPaths) -> serde_json::Value {
    Qmp::negotiated(&p.qmp).ok("x-smpft-query-ft", None)
}

/// Waits until `x-smpft-query-ft` of `p` satisfies `ok`; panics with `what`, the last answer
/// and the log after `within`.
pub fn wait_query(
    p: &VmPaths,
    what: &str,
    within: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let last = std::cell::RefCell::new(serde_json::Value::Null);
    let shown = super::later(|| format!("{what}: {}\nlog:\n{}", last.borrow(), log(p)));
    wait_for(shown, within, || {
        let q = query(p);
        if ok(&q) {
            return Some(q);
        }
        *last.borrow_mut() = q;
        None
    })
}

/// Waits until `x-smpft-query-ft` reports `state`; panics with the last answer after `within`.
pub fn wait_state(p: &VmPaths, state: &str, within: Duration) -> serde_json::Value {
    wait_query(p, &format!("never reached state {state}"), within, |q| q["state"] == state)
}

/// Waits for the process to exit; panics after `within`.
pub fn wait_exit(p: Proc, within: Duration) -> std::process::ExitStatus {
    let what = format!("process {} did not exit within {within:?}", p.pid());
    let mut p = p;
    wait_for(what, within, || p.try_wait())
}

/// A client of the guest's service running in the background until stopped (INCRs on whichever
/// of its paths serves); returns itself, with its checks done.
pub struct Background {
    stop: Arc<AtomicBool>,
    /// Replies acknowledged so far.
    replies: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Result<smpft_client::FailoverClient, String>>,
}

pub fn background_client(paths: Vec<PathBuf>) -> Background {
    background_client_waiting(paths, Duration::from_millis(500))
}

/// As [`background_client`], waiting `reply_timeout` for each reply before it retries.
pub fn background_client_waiting(paths: Vec<PathBuf>, reply_timeout: Duration) -> Background {
    let stop = Arc::new(AtomicBool::new(false));
    let replies = Arc::new(AtomicU64::new(0));
    let (s, r) = (stop.clone(), replies.clone());
    let thread = std::thread::spawn(move || {
        let mut c = smpft_client::FailoverClient::new(paths, 1).reply_timeout(reply_timeout);
        while !s.load(SeqCst) {
            c.incr(Duration::from_secs(20)).map_err(|e| e.to_string())?;
            r.store(c.replies, SeqCst);
        }
        Ok(c)
    });
    Background { stop, replies, thread }
}

impl Background {
    /// Waits until the client has `n` more replies than now (it is getting answers); panics
    /// after `within`.
    pub fn wait_replies(&self, n: u64, within: Duration) {
        let want = self.replies.load(SeqCst) + n;
        let what = super::later(|| format!("the client got {} of {want} replies", self.replies.load(SeqCst)));
        wait_until(what, within, || self.replies.load(SeqCst) >= want || self.thread.is_finished());
    }

    pub fn finish(self) -> smpft_client::FailoverClient {
        self.finish_or(String::new)
    }

    /// As `finish`; on failure the panic message adds `context()` (e.g. the processes' logs).
    pub fn finish_or(self, context: impl FnOnce() -> String) -> smpft_client::FailoverClient {
        self.stop.store(true, SeqCst);
        self.thread.join().unwrap().unwrap_or_else(|e| panic!("client: {e}\n{}", context()))
    }
}

/// After a failover: a few more requests on the new copy, then EXIT; the guest checks its
/// invariants (counter, churn) and exits 0 only if they hold.
pub fn finish_on(
    client: smpft_client::FailoverClient,
    live: Proc,
    live_paths: &VmPaths,
    what: &str,
) -> smpft_client::FailoverClient {
    finish_at(client, 1, live, live_paths, what)
}

/// As [`finish_on`], for the copy at index `at` of the client's paths.
pub fn finish_at(
    mut client: smpft_client::FailoverClient,
    at: usize,
    live: Proc,
    live_paths: &VmPaths,
    what: &str,
) -> smpft_client::FailoverClient {
    for _ in 0..20 {
        client.incr(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    assert_eq!(client.connected_to, Some(at), "{what}: the client must be talking to the live copy");
    let bye = client.exit().unwrap_or_else(|e| panic!("{what}: EXIT: {e}"));
    assert_eq!(Some(bye), client.last, "{what}: the service's final value is the last one acknowledged");
    let status = wait_exit(live, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{what}: guest invariants failed after takeover\n{}", log(live_paths));
    client
}

/// Waits until `p`'s `x-smpft-query-ft` says protected by the standby at `port`.
pub fn wait_protected_by(p: &VmPaths, port: u16, what: &str) {
    let peer = format!("127.0.0.1:{port}");
    let what = format!("{what}: never protected by port {port}");
    wait_query(p, &what, Duration::from_secs(40), |q| q["state"] == "protected" && q["peer"] == peer.as_str());
}
