//! What the system benchmarks share: the smpft binary, identities, processes killed on drop.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The smpft binary the benchmark runs: this build's, or `SMPFT_BENCH_BIN` (another build, to
/// compare two side by side on one machine).
pub fn bin() -> String {
    std::env::var("SMPFT_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_smpft").to_string())
}

pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Env {
    pub dir: PathBuf,
    pub a: PathBuf,
    pub b: PathBuf,
}

impl Env {
    pub fn new(name: &str) -> Env {
        let dir = std::env::temp_dir().join(format!("smpft-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        for d in [&a, &b] {
            let o = Command::new(bin()).args(["keygen", "--out"]).arg(d).output().unwrap();
            assert!(o.status.success(), "keygen failed (is the smpft binary built?)");
        }
        Env { dir, a, b }
    }

    pub fn ft_args(&self, me: &Path, peer: &Path, tb: &Path, interval: Duration) -> Vec<String> {
        vec![
            "--identity".into(),
            me.display().to_string(),
            "--peer-cert".into(),
            peer.join("cert.pem").display().to_string(),
            "--tiebreak".into(),
            tb.display().to_string(),
            "--ft-interval".into(),
            format!("{}ms", interval.as_millis()),
        ]
    }

    pub fn spawn(&self, name: &str, args: &[String]) -> Killed {
        self.spawn_in(None, name, args)
    }

    /// As [`Env::spawn`], inside network namespace `ns` if given.
    pub fn spawn_in(&self, ns: Option<&str>, name: &str, args: &[String]) -> Killed {
        self.spawn_with(ns, name, args, &[])
    }

    /// As [`Env::spawn_in`], with environment variables `env` set for the process.
    pub fn spawn_with(&self, ns: Option<&str>, name: &str, args: &[String], env: &[(&str, &str)]) -> Killed {
        let s = |x: &str| self.dir.join(format!("{name}.{x}")).display().to_string();
        let mut cmd = match ns {
            None => Command::new(bin()),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, &bin()]);
                c
            }
        };
        let child = cmd
            .env("SMPFT_LOG", "warn")
            .envs(env.iter().copied())
            .args(args)
            .args(["--serial", &format!("unix:{}", s("serial")), "--qmp", &format!("unix:{}", s("qmp"))])
            .args(["--console", &s("console")])
            .stderr(std::fs::File::create(s("log")).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Killed(child)
    }

    pub fn path(&self, name: &str, x: &str) -> PathBuf {
        self.dir.join(format!("{name}.{x}"))
    }
}

pub fn qmp(path: &Path, cmd: &str) -> serde_json::Value {
    smpft_client::qmp(path, cmd, None).unwrap_or_else(|e| panic!("{e}"))
}

/// Waits for the process serving QMP at `path` to report FT state `state`. A process just
/// started may take a while to answer at all on a loaded host (its VM is created before its
/// monitor listens, and KVM may still be tearing down the VM of a process killed a moment ago).
pub fn wait_state(path: &Path, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = match smpft_client::qmp(path, "x-smpft-query-ft", None) {
            Ok(v) if v["state"] == state => return,
            Ok(v) => v["state"].to_string(),
            Err(e) => e,
        };
        assert!(Instant::now() < deadline, "never reached {state} (last: {seen})");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The guest service's STAT figures.
pub struct Stat {
    pub counter: u64,
    pub churn: u64,
    pub kv: u64,
}

/// Asks the guest service for its figures (request id `id`).
pub fn stat(c: &mut smpft_client::ServiceClient, id: u64) -> Stat {
    let line = c.call(&format!("STAT {id}")).unwrap();
    let field = |k: &str| {
        line.split(' ')
            .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad STAT reply {line:?}"))
    };
    Stat { counter: field("counter"), churn: field("churn"), kv: field("kv") }
}

/// The `p` quantile of `v` (which it sorts).
pub fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// A paced client on the guest service (an INCR every 10 ms, ids from 100), for `window`, so
/// that the modes compared carry the same load: each request's round trip.
pub fn paced_incrs(c: &mut smpft_client::ServiceClient, window: Duration) -> Vec<Duration> {
    let t0 = Instant::now();
    let mut rtts = Vec::new();
    let mut next = Instant::now();
    let mut id = 100;
    while t0.elapsed() < window {
        next += Duration::from_millis(10);
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        let t = Instant::now();
        let line = c.call(&format!("INCR {id}")).unwrap();
        rtts.push(t.elapsed());
        smpft_client::parse_reply(&line, "OK").unwrap();
        id += 1;
    }
    rtts
}

/// A client of the protected VM served at `primary`'s serial (then the standby's, `standby`)
/// sends requests for `warm`, `victim` is SIGKILLed, and the time to the first reply from the
/// standby is returned.
pub fn time_failover(primary: PathBuf, standby: PathBuf, victim: &mut Killed, warm: Duration) -> Duration {
    let mut c = smpft_client::FailoverClient::new(vec![primary, standby], 1);
    let until = Instant::now() + warm;
    while Instant::now() < until {
        c.incr(Duration::from_secs(10)).unwrap();
    }
    let killed = Instant::now();
    let _ = victim.0.kill();
    let _ = victim.0.wait();
    loop {
        c.incr(Duration::from_secs(10)).unwrap();
        if c.connected_to == Some(1) {
            return killed.elapsed();
        }
    }
}

/// The guest's disk progress reports: (guest ms, writes, p50 µs, p99 µs).
pub fn reports(console: &Path) -> Vec<(u64, u64, u64, u64)> {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let field = |l: &str, k: &str| -> Option<u64> {
        l.split_whitespace().find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.trim_end_matches("ms").parse().ok())
    };
    text.lines()
        .filter(|l| l.starts_with("progress:") && l.contains(" disk: "))
        .filter_map(|l| Some((field(l, "t")?, field(l, "writes")?, field(l, "p50-us")?, field(l, "p99-us")?)))
        .collect()
}

/// Guest disk I/O over some reports: requests per second, latency p50 and p99 (µs).
pub struct Io {
    pub per_s: f64,
    pub p50: u64,
    pub p99: u64,
}

/// Waits for `n` more reports after the next one (which is warm-up) and sums them up.
pub fn measure(console: &Path, n: usize) -> Io {
    let have = reports(console).len();
    let deadline = Instant::now() + Duration::from_secs(60);
    let r = loop {
        let r = reports(console);
        if r.len() >= have + 1 + n {
            break r[have..=have + n].to_vec();
        }
        assert!(
            Instant::now() < deadline,
            "the guest stopped reporting:\n{}",
            std::fs::read_to_string(console).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let (first, last) = (r[0], r[n]);
    let per_s = (last.1 - first.1) as f64 * 1000.0 / (last.0 - first.0).max(1) as f64;
    let mut p50s: Vec<u64> = r[1..].iter().map(|x| x.2).collect();
    p50s.sort_unstable();
    Io { per_s, p50: p50s[p50s.len() / 2], p99: r[1..].iter().map(|x| x.3).max().unwrap_or(0) }
}
