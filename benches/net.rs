//! The guest network, unprotected and protected side by side in one run: real `smpft run` and
//! `smpft standby` processes in network namespaces (host A, host B, a client, a switch; see
//! `smp_ft::lan`), the guest serving TCP with smoltcp on virtio-net. Needs root.
//! Prints tables (run: `cargo bench -p smp-ft --bench net`).
//!
//! 1. At a low dirty rate and at ~1000 dirty pages per 20 ms epoch (churn on 2 vCPUs): ping
//!    round trip, TCP request round trip (the line service, one request at a time) and what
//!    protection adds to it, `wrk` requests per second on `GET /stat`, and bulk TCP throughput
//!    from the guest to the client (the source port), each protected ÷ unprotected.
//! 2. Failover as a TCP client sees it: a client sends INCR after INCR on one connection, the
//!    primary is killed (SIGKILL) at a random moment, and the gap from the last reply before the
//!    kill to the first reply after it is measured (the connection itself never breaks).
//!
//! `SMPFT_BENCH_QUICK=1` runs short windows and 3 failovers (a smoke test).

#[path = "common.rs"]
mod common;

use common::{pct, qmp, wait_state, Env, Killed};
use smp_ft::lan::{Lan, FT_B, GUEST_MAC};
use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};

const INTERVAL: Duration = Duration::from_millis(20);

fn quick() -> bool {
    std::env::var_os("SMPFT_BENCH_QUICK").is_some()
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn guest(pages_per_epoch: u64) -> String {
    // 2 vCPUs, 50 epochs a second.
    let per_vcpu = (pages_per_epoch * 50 / 2).max(1);
    // A small working set keeps the guest's periodic self-check (on vCPU 0, which also serves the
    // network) short.
    format!("service net ip=192.0.2.2/24 churn churn-ws=16M churn-rate={per_vcpu} duration=600s")
}

/// The guest on host A, protected by a standby on host B if `protected`.
fn start(env: &Env, lan: &Lan, guest: &str, protected: bool) -> Vec<Killed> {
    let tb = env.dir.join("tiebreak");
    let _ = std::fs::remove_file(&tb);
    let listen = format!("{FT_B}:7400");
    let mut procs = Vec::new();
    if protected {
        let mut a = strings(&["standby", "--listen", &listen, "--vcpus", "2", "--memory", "256M", "--net", "tap=tap0"]);
        a.extend(env.ft_args(&env.b, &env.a, &tb, INTERVAL));
        procs.push(env.spawn_in(Some(&lan.b), "s", &a));
        wait_state(&env.path("s", "qmp"), "waiting");
    }
    let net = format!("tap=tap0,mac={GUEST_MAC}");
    let mut a = strings(&["run", "--vcpus", "2", "--memory", "256M", "--guest-args", guest, "--net", &net]);
    if protected {
        a.extend(strings(&["--ft-peer", &listen]));
        a.extend(env.ft_args(&env.a, &env.b, &tb, INTERVAL));
    }
    procs.push(env.spawn_in(Some(&lan.a), "p", &a));
    if protected {
        wait_state(&env.path("p", "qmp"), "protected");
    }
    procs
}

fn connect(lan: &Lan, port: u16) -> std::net::TcpStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match lan.connect(port, Duration::from_secs(2)) {
            Ok(s) => {
                s.set_nodelay(true).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                return s;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "the guest's port {port} never answered: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Ping round trips (from ping's own `time=` figures).
fn ping(lan: &Lan, count: u32) -> Vec<Duration> {
    let o = lan.client_cmd("ping").args(["-c", &count.to_string(), "-i", "0.01", "-W", "5", "192.0.2.2"]).output();
    let out = String::from_utf8_lossy(&o.unwrap().stdout).to_string();
    let v: Vec<Duration> = out
        .lines()
        .filter_map(|l| l.split("time=").nth(1)?.split(' ').next()?.parse::<f64>().ok())
        .map(|ms| Duration::from_secs_f64(ms / 1e3))
        .collect();
    assert!(!v.is_empty(), "no ping replies: {out}");
    v
}

/// Request round trips on one connection to the line service, a request every 5 ms.
fn requests(lan: &Lan, count: u64) -> Vec<Duration> {
    let s = connect(lan, 7000);
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut v = Vec::new();
    let mut line = String::new();
    for id in 0..count {
        std::thread::sleep(Duration::from_millis(5));
        let t = Instant::now();
        w.write_all(format!("GET {id}\n").as_bytes()).unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        v.push(t.elapsed());
        assert!(line.starts_with(&format!("VAL {id} ")), "{line}");
    }
    v
}

/// `wrk` on GET /stat: requests per second.
fn wrk(lan: &Lan, secs: u32) -> f64 {
    let mut cmd = lan.client_cmd("wrk");
    cmd.args(["-t1", "-c8", &format!("-d{secs}s"), "--timeout", "10s", "http://192.0.2.2/stat"]);
    let o = cmd.output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    out.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no request rate from wrk: {out}"))
}

/// Bytes per second read from the guest's source port for `window`.
fn bulk(lan: &Lan, window: Duration) -> f64 {
    let mut s = connect(lan, 19);
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    let t = Instant::now();
    while t.elapsed() < window {
        n += s.read(&mut buf).unwrap() as u64;
    }
    n as f64 / t.elapsed().as_secs_f64()
}

struct Row {
    ping: Vec<Duration>,
    tcp: Vec<Duration>,
    rps: f64,
    bulk: f64,
    pages_per_ckpt: Option<f64>,
}

fn measure(env: &Env, lan: &Lan, pages: u64, protected: bool) -> Row {
    let _procs = start(env, lan, &guest(pages), protected);
    let (n, secs) = if quick() { (50, 1) } else { (400, 3) };
    requests(lan, 20);
    let q0 = protected.then(|| qmp(&env.path("p", "qmp"), "x-smpft-query-ft"));
    let ping = ping(lan, n as u32);
    let tcp = requests(lan, n);
    let rps = wrk(lan, secs);
    let bulk = bulk(lan, Duration::from_secs(secs.into()));
    let pages_per_ckpt = q0.map(|q0| {
        let q1 = qmp(&env.path("p", "qmp"), "x-smpft-query-ft");
        let d = |k: &str| q1[k].as_f64().unwrap_or(0.0) - q0[k].as_f64().unwrap_or(0.0);
        d("page-bytes-captured") / 4096.0 / d("checkpoints").max(1.0)
    });
    Row { ping, tcp, rps, bulk, pages_per_ckpt }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn latency_table(env: &Env, lan: &Lan) {
    println!("\nGuest network, 2 vCPUs, unprotected and protected (20 ms epochs, same run)");
    println!(
        "{:>9} {:>11} | {:>15} | {:>15} | {:>15} | {:>8} {:>5} | {:>8} {:>5} | {:>6}",
        "dirty/ep", "mode", "ping p50/p99", "tcp p50/p99", "+tcp p50/p99", "wrk r/s", "÷", "bulk MB/s", "÷", "pg/ck"
    );
    for pages in [5, 1000] {
        let base = measure(env, lan, pages, false);
        let prot = measure(env, lan, pages, true);
        let mut bt = base.tcp.clone();
        let (b50, b99) = (pct(&mut bt, 0.5), pct(&mut bt, 0.99));
        for (mode, r) in [("unprotected", &base), ("protected", &prot)] {
            let (mut p, mut t) = (r.ping.clone(), r.tcp.clone());
            let (t50, t99) = (pct(&mut t, 0.5), pct(&mut t, 0.99));
            let added = if r.pages_per_ckpt.is_some() {
                format!("{}/{}", ms(t50.saturating_sub(b50)), ms(t99.saturating_sub(b99)))
            } else {
                "-".into()
            };
            println!(
                "{:>9} {:>11} | {:>15} | {:>15} | {:>15} | {:>8.0} {:>5.2} | {:>8.1} {:>5.2} | {:>6}",
                pages,
                mode,
                format!("{}/{}", ms(pct(&mut p, 0.5)), ms(pct(&mut p, 0.99))),
                format!("{}/{}", ms(t50), ms(t99)),
                added,
                r.rps,
                r.rps / base.rps,
                r.bulk / 1e6,
                r.bulk / base.bulk,
                r.pages_per_ckpt.map_or("-".into(), |p| format!("{p:.0}"))
            );
        }
    }
    println!("dirty/ep: churn pages per epoch asked of the guest; pg/ck: dirty pages per checkpoint measured;");
    println!("÷: protected ÷ unprotected; +tcp: what protection adds to a request's round trip (ms).");
}

/// Gap in INCR replies on one connection across a SIGKILL of the primary.
fn failover_gap(env: &Env, r: &mut impl FnMut(u64) -> u64) -> Duration {
    let lan = Lan::new("b").expect("network namespaces");
    let mut procs = start(env, &lan, &guest(5), true);
    let s = connect(&lan, 7000);
    let mut rd = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let killer = {
        let wait = Duration::from_millis(100 + r(300));
        let pid = procs[1].0.id() as i32;
        std::thread::spawn(move || {
            std::thread::sleep(wait);
            // SAFETY: kill only sends SIGKILL to the primary's process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            Instant::now()
        })
    };
    let mut replies = Vec::new();
    let mut line = String::new();
    let mut last = 0u64;
    let start = Instant::now();
    for id in 1.. {
        w.write_all(format!("INCR {id}\n").as_bytes()).unwrap();
        line.clear();
        rd.read_line(&mut line).unwrap();
        let v: u64 = line.trim_end().rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap();
        assert_eq!(v, last + 1, "a value was lost or repeated: {line}");
        last = v;
        replies.push(Instant::now());
        if killer.is_finished() && replies.len() > 20 && start.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    let killed = killer.join().unwrap();
    wait_state(&env.path("s", "qmp"), "live-after-failover");
    let before = replies.iter().rev().find(|&&t| t <= killed).copied().unwrap_or(start);
    let after = replies.iter().find(|&&t| t > killed).copied().unwrap();
    procs.clear();
    after - before
}

fn failover_table(env: &Env) {
    let trials = if quick() { 3 } else { 20 };
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut state = seed | 1;
    let mut r = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let mut gaps: Vec<Duration> = (0..trials).map(|_| failover_gap(env, &mut r)).collect();
    println!("\nFailover as a TCP client sees it ({trials} SIGKILLs of the primary, one connection each, never reset)");
    let (p50, p99) = (pct(&mut gaps, 0.5), pct(&mut gaps, 0.99));
    let max = *gaps.last().unwrap();
    println!(
        "last reply before the kill → first reply after: p50 {} ms, p99 {} ms, max {} ms",
        ms(p50),
        ms(p99),
        ms(max)
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("net benchmark: skipped, it needs root (network namespaces and taps)");
        return;
    }
    let env = Env::new("net");
    let only = std::env::var("SMPFT_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "latency" {
        let lan = Lan::new("b").expect("network namespaces");
        latency_table(&env, &lan);
    }
    if only.is_empty() || only == "failover" {
        failover_table(&env);
    }
    let _ = std::fs::remove_dir_all(&env.dir);
}
