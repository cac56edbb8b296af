//! A soak of protected pairs on a busy host (run: `cargo bench -p smp-ft --bench soak`): K
//! pairs (a 2-vCPU guest with memory churn and a paced client on each) share this machine with
//! a CPU hog, one spinning thread per core, for a given time; then each primary is SIGKILLed.
//! The table says how many times a copy declared its live peer failed (false claims), how long
//! the VMs ran unprotected, and how long each failover took from SIGKILL to the standby live.
//!
//! The soak runs once per failure detector, side by side on the same load: `fixed` (the plain
//! `--ft-timeout`) and then `adaptive` (the default; see `transport::detector`).
//!
//! Besides the hog, the host itself stalls now and then: every copy stopped at once for 100 to
//! 400 ms every 3 to 8 s ([`stalls`]), the way a host whose CPUs a hypervisor takes away, or that
//! memory pressure freezes, stops scheduling everything on it.
//!
//! `SMPFT_SOAK_PAIRS` (default 2), `SMPFT_SOAK_SECONDS` per detector (default 300),
//! `SMPFT_SOAK_HOG=0` (no hog), `SMPFT_SOAK_STALLS=0` (no host stalls), `SMPFT_SOAK_DETECTORS` (default `fixed,adaptive`);
//! `SMPFT_BENCH_BIN` runs another build.
//! `SMPFT_BENCH_QUICK=1` runs one pair for 5 s (a smoke test).

#[path = "common.rs"]
mod common;

use common::{pct, qmp, wait_state, Env, Killed};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GUEST: &str = "counter churn service churn-rate=500 churn-ws=4M duration=3600s";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One spinning thread per core until `stop`.
fn hog(stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (0..cores)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect()
}

struct Pair {
    primary: Killed,
    standby: Killed,
    p: String,
    s: String,
}

fn start_pair(env: &Env, i: usize, detector: &str) -> Pair {
    let (p, s) = (format!("p{i}"), format!("s{i}"));
    let tb = env.dir.join(format!("tiebreak{i}"));
    let listen = format!("127.0.0.1:{}", port());
    let ft = |me, peer| {
        let mut a = env.ft_args(me, peer, &tb, Duration::from_millis(20));
        a.extend(args(&["--ft-detector", detector]));
        a
    };
    let mut sa = args(&["standby", "--listen", &listen, "--vcpus", "2", "--memory", "128M"]);
    sa.extend(ft(&env.b, &env.a));
    let standby = env.spawn(&s, &sa);
    wait_state(&env.path(&s, "qmp"), "waiting");
    let mut pa = args(&["run", "--vcpus", "2", "--memory", "128M", "--guest-args", GUEST, "--ft-peer", &listen]);
    pa.extend(ft(&env.a, &env.b));
    let primary = env.spawn(&p, &pa);
    wait_state(&env.path(&p, "qmp"), "protected");
    Pair { primary, standby, p, s }
}

/// Claims a copy made while its peer was alive: every tie-breaker claim in the soak is one
/// (nothing was killed yet).
fn claims(env: &Env, name: &str) -> usize {
    let log = std::fs::read_to_string(env.path(name, "log")).unwrap_or_default();
    log.matches("FT peer silent for").count()
}

/// Polls every primary's FT state for `for_`; the time each spent other than protected.
fn watch(env: &Env, pairs: &[Pair], for_: Duration, stop: &AtomicBool) -> Duration {
    let mut unprotected = Duration::ZERO;
    let t0 = Instant::now();
    let mut last = Instant::now();
    while t0.elapsed() < for_ && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        let step = last.elapsed();
        last = Instant::now();
        for p in pairs {
            let q = smpft_client::qmp(&env.path(&p.p, "qmp"), "x-smpft-query-ft", None);
            if !q.is_ok_and(|q| q["state"] == "protected") {
                unprotected += step;
            }
        }
    }
    unprotected
}

/// A client pacing INCRs on a pair's serial line (the guest's output is held and released as
/// in production), until `stop`.
fn client(env: &Env, pair: &Pair, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let paths = vec![env.path(&pair.p, "serial"), env.path(&pair.s, "serial")];
    std::thread::spawn(move || {
        let mut c = smpft_client::FailoverClient::new(paths, 1);
        while !stop.load(Ordering::Relaxed) {
            if c.incr(Duration::from_secs(30)).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        c.replies
    })
}

/// The host stops scheduling every copy at once now and then (as when a hypervisor steals the
/// host's CPUs, or memory pressure stalls it): every 3 to 8 s, all of `pids` are stopped for
/// 100 to 400 ms. Returns the number of stalls made.
fn stalls(pids: Vec<i32>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut x = 0x2545_f491_4f6c_dd1du64 ^ u64::from(std::process::id());
        let mut rand = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut made = 0;
        loop {
            let until = Instant::now() + Duration::from_millis(3_000 + rand(5_000));
            while Instant::now() < until {
                if stop.load(Ordering::Relaxed) {
                    return made;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            for &p in &pids {
                // SAFETY: kill(2) with the pid of a child this benchmark started.
                unsafe { libc::kill(p, libc::SIGSTOP) };
            }
            std::thread::sleep(Duration::from_millis(100 + rand(301)));
            for &p in &pids {
                // SAFETY: as above.
                unsafe { libc::kill(p, libc::SIGCONT) };
            }
            made += 1;
        }
    })
}

/// One soak's figures.
struct Row {
    detector: String,
    stalls: u64,
    false_claims: usize,
    unprotected: Duration,
    replies: u64,
    failovers: Vec<Duration>,
    /// Pairs whose standby could not take over at the kill (a false alarm had ended it).
    no_standby: usize,
    thresholds: Vec<Duration>,
    /// The silence each standby declared its killed primary failed after.
    declared: Vec<Duration>,
}

/// The silence the standby declared its primary failed after, from its log line "FT peer
/// silent for 152.3ms" (a `Duration`'s debug form).
fn declared_after(env: &Env, name: &str) -> Option<Duration> {
    let log = std::fs::read_to_string(env.path(name, "log")).ok()?;
    let tail = log.rsplit("FT peer silent for ").next().filter(|_| log.contains("FT peer silent for "))?;
    let word = tail.split_whitespace().next()?;
    let split = word.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (n, unit) = word.split_at(split);
    let n: f64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "ms" => n / 1e3,
        "µs" | "us" => n / 1e6,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// SIGKILLs the pair's primary; how long until its standby is live, if it was still a standby
/// and goes live.
fn fail_over(env: &Env, mut p: Pair) -> Option<Duration> {
    let q = smpft_client::qmp(&env.path(&p.s, "qmp"), "x-smpft-query-ft", None);
    if !q.is_ok_and(|q| q["role"] == "standby" && q["state"] == "standby") {
        eprintln!("pair {}: no standby to fail over to at the kill", p.p);
        return None;
    }
    let t = Instant::now();
    let _ = p.primary.0.kill();
    let _ = p.primary.0.wait();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let q = smpft_client::qmp(&env.path(&p.s, "qmp"), "x-smpft-query-ft", None);
        if q.is_ok_and(|q| q["state"] == "live-after-failover") {
            let took = t.elapsed();
            let _ = qmp(&env.path(&p.s, "qmp"), "x-smpft-query-ft");
            return Some(took);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    eprintln!("pair {}: the standby never went live", p.p);
    None
}

/// K pairs whose copies judge silence with `detector`, on the load, for `secs`; then the kills.
fn soak(detector: &str, n: usize, secs: u64, with_hog: bool, with_stalls: bool) -> Row {
    let env = Env::new(&format!("soak-{detector}"));
    let pairs: Vec<Pair> = (0..n).map(|i| start_pair(&env, i, detector)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = pairs.iter().map(|p| client(&env, p, stop.clone())).collect();
    let hogs = if with_hog { hog(stop.clone()) } else { Vec::new() };
    let pids = pairs.iter().flat_map(|p| [p.primary.0.id() as i32, p.standby.0.id() as i32]).collect();
    let stop_stalls = Arc::new(AtomicBool::new(false));
    let stalls = with_stalls.then(|| stalls(pids, stop_stalls.clone()));
    let unprotected = watch(&env, &pairs, Duration::from_secs(secs), &AtomicBool::new(false));
    stop_stalls.store(true, Ordering::SeqCst);
    let stalls = stalls.map_or(0, |s| s.join().unwrap_or(0));
    let false_claims: usize = pairs.iter().map(|p| claims(&env, &p.p) + claims(&env, &p.s)).sum();
    // Failovers under the same load: SIGKILL each primary, time until its standby is live.
    let (mut failovers, mut thresholds, mut declared, mut no_standby) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for p in pairs {
        // What the standby's failure detector allows the primary at that moment.
        if let Ok(q) = smpft_client::qmp(&env.path(&p.s, "qmp"), "x-smpft-query-ft", None) {
            if let Some(t) = q["detector"]["threshold-ms"].as_f64() {
                thresholds.push(Duration::from_secs_f64(t / 1e3));
            }
        }
        let standby = p.s.clone();
        match fail_over(&env, p) {
            Some(t) => {
                failovers.push(t);
                declared.extend(declared_after(&env, &standby));
            }
            None => no_standby += 1,
        }
    }
    stop.store(true, Ordering::SeqCst);
    hogs.into_iter().for_each(|h| h.join().unwrap());
    let replies: u64 = clients.into_iter().map(|c| c.join().unwrap_or(0)).sum();
    let _ = std::fs::remove_dir_all(&env.dir);
    Row {
        detector: detector.into(),
        stalls,
        false_claims,
        unprotected,
        replies,
        failovers,
        no_standby,
        thresholds,
        declared,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let quick = std::env::var_os("SMPFT_BENCH_QUICK").is_some();
    let n = if quick { 1 } else { env_u64("SMPFT_SOAK_PAIRS", 2) as usize };
    let secs = if quick { 5 } else { env_u64("SMPFT_SOAK_SECONDS", 300) };
    let with_hog = env_u64("SMPFT_SOAK_HOG", 1) != 0;
    let with_stalls = env_u64("SMPFT_SOAK_STALLS", 1) != 0;
    let all = if quick { "adaptive" } else { "fixed,adaptive" };
    let detectors = std::env::var("SMPFT_SOAK_DETECTORS").unwrap_or_else(|_| all.into());
    let rows: Vec<Row> = detectors.split(',').map(|d| soak(d.trim(), n, secs, with_hog, with_stalls)).collect();
    let ms = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1e3);
    println!(
        "\n| detector | pairs | hog | host stalls | seconds | false claims | unprotected (s) | replies | failovers | no standby at kill | failover p50 (ms) | p99 (ms) | detector threshold at kill, p50 (ms) | declared after, p50 (ms) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for mut r in rows {
        let threshold = if r.thresholds.is_empty() { "-".into() } else { ms(pct(&mut r.thresholds, 0.5)) };
        let declared = if r.declared.is_empty() { "-".into() } else { ms(pct(&mut r.declared, 0.5)) };
        let (p50, p99) = match r.failovers.is_empty() {
            true => ("-".into(), "-".into()),
            false => (ms(pct(&mut r.failovers, 0.5)), ms(pct(&mut r.failovers, 0.99))),
        };
        println!(
            "| {} | {n} | {} | {} | {secs} | {} | {:.1} | {} | {} | {} | {p50} | {p99} | {threshold} | {declared} |",
            r.detector,
            if with_hog { "yes" } else { "no" },
            r.stalls,
            r.false_claims,
            r.unprotected.as_secs_f64(),
            r.replies,
            r.failovers.len(),
            r.no_standby,
        );
    }
}
