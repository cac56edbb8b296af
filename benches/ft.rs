//! SMP-FT benchmark: real `smpft run` and `smpft standby` processes over loopback; prints tables
//! (run: `cargo bench -p smp-ft --bench ft`).
//!
//! For 1, 2 and 4 vCPUs, churn rates aimed at ~100, ~1k and ~4k dirty pages per epoch, and 20 ms
//! and 50 ms epochs, each configuration runs unprotected and then protected, back to back in the
//! same run, under the same load (a client sending a service request every 10 ms). Reported:
//! - pause per checkpoint p50/p99 (from `x-smpft-query-ft`), and the dirty pages per checkpoint
//!   actually seen;
//! - guest work rate protected ÷ unprotected: `counter` runs flat out, so its increments per
//!   second measure the CPU time the guest got (with more vCPUs than host cores its spinlock makes
//!   it erratic); `churn` pages per second show whether the guest kept its set dirtying rate;
//! - serial service round trip p50/p99 in both modes, and the added latency (protected minus
//!   unprotected);
//! - log bandwidth (MB/s) over the protected run.
//!
//! Then failover: SIGKILL the primary while the client runs, and time until the first reply
//! from the standby, p50/p99 over 20 trials.
//!
//! `SMPFT_BENCH_QUICK=1` runs one configuration and 5 failovers (a smoke test);
//! `SMPFT_BENCH_ONLY=VCPUS,PAGES,MS` runs one configuration and no failovers.

use smpft_client::ServiceClient;
use std::time::{Duration, Instant};

fn quick() -> bool {
    std::env::var_os("SMPFT_BENCH_QUICK").is_some()
}

#[path = "common.rs"]
mod common;
use common::{pct, qmp, wait_state, Env};

const MEMORY: &str = "256M";

/// (counter, churn) totals from the service.
fn stat(c: &mut ServiceClient, id: u64) -> (u64, u64) {
    let s = common::stat(c, id);
    (s.counter, s.churn)
}

struct Run {
    counter_rate: f64,
    churn_rate: f64,
    rtt_p50: Duration,
    rtt_p99: Duration,
    ft: Option<serde_json::Value>,
    seconds: f64,
}

/// The guest: `churn` at `rate` pages/s per vCPU over a 16 MiB working set, `counter` flat out,
/// and the service.
fn guest_args(rate: u64) -> String {
    format!("counter churn service churn-rate={rate} churn-ws=16M duration=600s")
}

/// One window of load on a running VM, through its serial socket.
fn load(env: &Env, name: &str, window: Duration) -> (f64, f64, Vec<Duration>, f64) {
    let mut c = ServiceClient::connect(&env.path(name, "serial"), Duration::from_secs(10)).unwrap();
    // Warm up, then measure.
    for i in 0..20 {
        c.call(&format!("INCR {i}")).unwrap();
    }
    let (c0, h0) = stat(&mut c, 1_000_000);
    let t0 = Instant::now();
    let rtts = common::paced_incrs(&mut c, window);
    let secs = t0.elapsed().as_secs_f64();
    let (c1, h1) = stat(&mut c, 1_000_001);
    ((c1 - c0) as f64 / secs, (h1 - h0) as f64 / secs, rtts, secs)
}

fn run(env: &Env, vcpus: u32, rate: u64, interval: Duration, protected: bool, window: Duration) -> Run {
    let tb = env.dir.join("tiebreak");
    let _ = std::fs::remove_file(&tb);
    let mut args: Vec<String> = ["run", "--vcpus", &vcpus.to_string(), "--memory", MEMORY, "--guest-args"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(guest_args(rate));
    let _standby = protected.then(|| {
        let mut a: Vec<String> =
            ["standby", "--listen", "127.0.0.1:7499", "--vcpus", &vcpus.to_string(), "--memory", MEMORY]
                .iter()
                .map(|s| s.to_string())
                .collect();
        a.extend(env.ft_args(&env.b, &env.a, &tb, interval));
        let s = env.spawn("s", &a);
        wait_state(&env.path("s", "qmp"), "waiting");
        s
    });
    if protected {
        args.extend(["--ft-peer".to_string(), "127.0.0.1:7499".to_string()]);
        args.extend(env.ft_args(&env.a, &env.b, &tb, interval));
    }
    let _primary = env.spawn("p", &args);
    if protected {
        wait_state(&env.path("p", "qmp"), "protected");
    }
    let (counter_rate, churn_rate, mut rtts, seconds) = load(env, "p", window);
    let ft = protected.then(|| qmp(&env.path("p", "qmp"), "x-smpft-query-ft"));
    Run { counter_rate, churn_rate, rtt_p50: pct(&mut rtts, 0.5), rtt_p99: pct(&mut rtts, 0.99), ft, seconds }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn steady_state(env: &Env) {
    let window = Duration::from_secs(if quick() { 2 } else { 4 });
    let mut configs = Vec::new();
    for vcpus in [1u32, 2, 4] {
        for target in [100u64, 1000, 4000] {
            for interval in [20u64, 50] {
                configs.push((vcpus, target, interval));
            }
        }
    }
    if quick() {
        configs = vec![(4, 1000, 20)];
    }
    // SMPFT_BENCH_ONLY=VCPUS,PAGES,MS runs one configuration.
    if let Ok(only) = std::env::var("SMPFT_BENCH_ONLY") {
        let v: Vec<u64> = only.split(',').filter_map(|x| x.parse().ok()).collect();
        assert_eq!(v.len(), 3, "SMPFT_BENCH_ONLY=VCPUS,PAGES,MS");
        configs = vec![(v[0] as u32, v[1], v[2])];
    }
    println!(
        "\nSMP-FT steady state ({} s per run; unprotected then protected, same load; 256 MiB guest)",
        window.as_secs()
    );
    println!(
        "{:>5} {:>6} {:>5} | {:>7} | {:>8} {:>8} | {:>7} {:>7} | {:>7} {:>7} {:>7} {:>7} | {:>7} {:>7} | {:>8}",
        "vCPUs",
        "target",
        "epoch",
        "pages",
        "pause50",
        "pause99",
        "counter",
        "churn",
        "rtt50u",
        "rtt99u",
        "rtt50p",
        "rtt99p",
        "add50",
        "add99",
        "log MB/s"
    );
    println!(
        "{:>5} {:>6} {:>5} | {:>7} | {:>8} {:>8} | {:>7} {:>7} | {:>7} {:>7} {:>7} {:>7} | {:>7} {:>7} | {:>8}",
        "", "pg/ep", "ms", "/ckpt", "ms", "ms", "ratio", "ratio", "ms", "ms", "ms", "ms", "ms", "ms", ""
    );
    for (vcpus, target, interval) in configs {
        let epoch = Duration::from_millis(interval);
        // Pages per second per vCPU that dirty `target` pages per epoch in all.
        let rate = (target * 1000 / interval / u64::from(vcpus)).max(1);
        let u = run(env, vcpus, rate, epoch, false, window);
        let p = run(env, vcpus, rate, epoch, true, window);
        let ft = p.ft.clone().unwrap_or_default();
        if std::env::var_os("SMPFT_BENCH_ONLY").is_some() {
            println!("{ft}");
        }
        let us = |k: &str| Duration::from_micros(ft[k].as_u64().unwrap_or(0));
        let checkpoints = ft["checkpoints"].as_u64().unwrap_or(1).max(1);
        let pages = ft["log-bytes-total"].as_u64().unwrap_or(0) as f64 / 4096.0 / checkpoints as f64;
        let mb_s = ft["log-bytes-total"].as_u64().unwrap_or(0) as f64
            / 1e6
            / (ft["protected-for-ms"].as_u64().unwrap_or(1).max(1) as f64 / 1e3);
        let add = |a: Duration, b: Duration| format!("{:.2}", (a.as_secs_f64() - b.as_secs_f64()) * 1e3);
        println!(
            "{:>5} {:>6} {:>5} | {:>7.0} | {:>8} {:>8} | {:>7.3} {:>7.3} | {:>7} {:>7} {:>7} {:>7} | {:>7} {:>7} | {:>8.1}",
            vcpus,
            target,
            interval,
            pages,
            ms(us("pause-p50-us")),
            ms(us("pause-p99-us")),
            p.counter_rate / u.counter_rate.max(1.0),
            p.churn_rate / u.churn_rate.max(1.0),
            ms(u.rtt_p50),
            ms(u.rtt_p99),
            ms(p.rtt_p50),
            ms(p.rtt_p99),
            add(p.rtt_p50, u.rtt_p50),
            add(p.rtt_p99, u.rtt_p99),
            mb_s
        );
        let _ = (p.seconds, u.seconds);
    }
    println!("pages/ckpt: dirty pages per checkpoint seen (log bytes / checkpoints / 4 KiB; checkpoints taken early");
    println!("for output make it smaller than the target). counter, churn: guest work protected ÷ unprotected");
    println!("(shared-counter increments/s, erratic with more vCPUs than host cores because of its spinlock; churn");
    println!("pages written/s against the set rate).");
    println!("rtt u/p: serial request round trip unprotected/protected; add: protected minus unprotected.");
}

fn failover(env: &Env) {
    if std::env::var_os("SMPFT_BENCH_ONLY").is_some() {
        return;
    }
    let trials = if quick() { 5 } else { 20 };
    let mut times = Vec::new();
    for t in 0..trials {
        let tb = env.dir.join(format!("tiebreak-f{t}"));
        let interval = Duration::from_millis(20);
        let mut sa: Vec<String> = ["standby", "--listen", "127.0.0.1:7498", "--vcpus", "4", "--memory", MEMORY]
            .iter()
            .map(|s| s.to_string())
            .collect();
        sa.extend(env.ft_args(&env.b, &env.a, &tb, interval));
        let _standby = env.spawn("fs", &sa);
        wait_state(&env.path("fs", "qmp"), "waiting");
        let mut pa: Vec<String> =
            ["run", "--vcpus", "4", "--memory", MEMORY, "--ft-peer", "127.0.0.1:7498", "--guest-args"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        pa.push(guest_args(12_500));
        pa.extend(env.ft_args(&env.a, &env.b, &tb, interval));
        let mut primary = env.spawn("fp", &pa);
        wait_state(&env.path("fp", "qmp"), "protected");
        let (p, s) = (env.path("fp", "serial"), env.path("fs", "serial"));
        times.push(common::time_failover(p, s, &mut primary, Duration::from_millis(200 + 37 * t)));
    }
    let (p50, p99) = (pct(&mut times, 0.5), pct(&mut times, 0.99));
    println!("\nFailover: SIGKILL of the primary to the first reply from the standby (4 vCPUs, 20 ms epochs, ~1k pages/epoch)");
    println!("{:>7} | {:>8} {:>8} {:>8} {:>8}", "trials", "p50 ms", "p99 ms", "min ms", "max ms");
    println!("{:>7} | {:>8} {:>8} {:>8} {:>8}", trials, ms(p50), ms(p99), ms(times[0]), ms(*times.last().unwrap()));
    println!("(detection is the --ft-timeout of 150 ms; the rest is the tie-breaker, building the VM and the client's reconnect)");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let env = Env::new("ft");
    steady_state(&env);
    failover(&env);
    let _ = std::fs::remove_dir_all(&env.dir);
}
