//! A soak of protected pairs on a busy host (run: `cargo bench -p smp-ft --bench soak`): K
//! pairs (a 2-vCPU guest with memory churn and a paced client on each) share this machine with
//! a CPU hog, one spinning thread per core, for a given time; then each primary is SIGKILLed.
//! The table says how many times a copy declared its live peer failed (false claims), how long
//! the VMs ran unprotected, and how long each failover took from SIGKILL to the standby live.
//!
//! The soak runs once per failure detector, side by side on the same load: `fixed` (the plain
//! `--ft-timeout`) and then `adaptive` (the default; see `transport::detector`).
//!
//! `SMPFT_SOAK_PAIRS` (default 2), `SMPFT_SOAK_SECONDS` per detector (default 300),
//! `SMPFT_SOAK_HOG=0` (no hog), `SMPFT_SOAK_DETECTORS` (default `fixed,adaptive`);
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
    _standby: Killed,
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
    Pair { primary, _standby: standby, p, s }
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

/// One soak's figures.
struct Row {
    detector: String,
    false_claims: usize,
    unprotected: Duration,
    replies: u64,
    failovers: Vec<Duration>,
    /// Pairs whose standby could not take over at the kill (a false alarm had ended it).
    no_standby: usize,
    thresholds: Vec<Duration>,
}

/// SIGKILLs the pair's primary; how long until its standby is live, if it goes live.
fn fail_over(env: &Env, mut p: Pair) -> Option<Duration> {
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
fn soak(detector: &str, n: usize, secs: u64, with_hog: bool) -> Row {
    let env = Env::new(&format!("soak-{detector}"));
    let pairs: Vec<Pair> = (0..n).map(|i| start_pair(&env, i, detector)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = pairs.iter().map(|p| client(&env, p, stop.clone())).collect();
    let hogs = if with_hog { hog(stop.clone()) } else { Vec::new() };
    let unprotected = watch(&env, &pairs, Duration::from_secs(secs), &AtomicBool::new(false));
    let false_claims: usize = pairs.iter().map(|p| claims(&env, &p.p) + claims(&env, &p.s)).sum();
    // Failovers under the same load: SIGKILL each primary, time until its standby is live.
    let (mut failovers, mut thresholds, mut no_standby) = (Vec::new(), Vec::new(), 0);
    for p in pairs {
        // What the standby's failure detector allows the primary at that moment.
        if let Ok(q) = smpft_client::qmp(&env.path(&p.s, "qmp"), "x-smpft-query-ft", None) {
            if let Some(t) = q["detector"]["threshold-ms"].as_f64() {
                thresholds.push(Duration::from_secs_f64(t / 1e3));
            }
        }
        match fail_over(&env, p) {
            Some(t) => failovers.push(t),
            None => no_standby += 1,
        }
    }
    stop.store(true, Ordering::SeqCst);
    hogs.into_iter().for_each(|h| h.join().unwrap());
    let replies: u64 = clients.into_iter().map(|c| c.join().unwrap_or(0)).sum();
    let _ = std::fs::remove_dir_all(&env.dir);
    Row { detector: detector.into(), false_claims, unprotected, replies, failovers, no_standby, thresholds }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let quick = std::env::var_os("SMPFT_BENCH_QUICK").is_some();
    let n = if quick { 1 } else { env_u64("SMPFT_SOAK_PAIRS", 2) as usize };
    let secs = if quick { 5 } else { env_u64("SMPFT_SOAK_SECONDS", 300) };
    let with_hog = env_u64("SMPFT_SOAK_HOG", 1) != 0;
    let all = if quick { "adaptive" } else { "fixed,adaptive" };
    let detectors = std::env::var("SMPFT_SOAK_DETECTORS").unwrap_or_else(|_| all.into());
    let rows: Vec<Row> = detectors.split(',').map(|d| soak(d.trim(), n, secs, with_hog)).collect();
    let ms = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1e3);
    println!(
        "\n| detector | pairs | hog | seconds | false claims | unprotected (s) | replies | failovers | no standby at kill | failover p50 (ms) | p99 (ms) | detector threshold at kill, p50 (ms) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for mut r in rows {
        let threshold = if r.thresholds.is_empty() { "-".into() } else { ms(pct(&mut r.thresholds, 0.5)) };
        let (p50, p99) = match r.failovers.is_empty() {
            true => ("-".into(), "-".into()),
            false => (ms(pct(&mut r.failovers, 0.5)), ms(pct(&mut r.failovers, 0.99))),
        };
        println!(
            "| {} | {n} | {} | {secs} | {} | {:.1} | {} | {} | {} | {p50} | {p99} | {threshold} |",
            r.detector,
            if with_hog { "yes" } else { "no" },
            r.false_claims,
            r.unprotected.as_secs_f64(),
            r.replies,
            r.failovers.len(),
            r.no_standby,
        );
    }
}
