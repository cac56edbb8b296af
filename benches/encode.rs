//! Checkpoint size and output latency: real `smpft run` and `smpft standby` processes over
//! loopback; prints tables (run: `cargo bench -p smp-ft --bench encode`).
//!
//! 1. For `kv` (small records at random), `churn` (whole pseudo-random pages) and `zero` (churn
//!    where every other generation of a page is all zeroes) at ~1k and ~4k
//!    dirty pages per 20 ms epoch, on 1, 2 and 4 vCPUs, each back to back in the same run:
//!    unprotected, protected with `--ft-compress none`, protected with `--ft-compress delta`.
//!    Reported: dirty pages per checkpoint, wire bytes ÷ dirty bytes, encoder CPU ms per 1k
//!    pages (the primary's sender thread), pause p50/p99, serial round trip and the latency
//!    protection adds (p50/p99), guest work protected ÷ unprotected (kv updates or churn pages).
//! 2. `churn` flat out, protected, with `--ft-max-latency` off, at 20 and at 50 ms: output hold p50/p99
//!    (time from the guest's output to its release), serial round trip, the throttle, and the
//!    guest's churn rate.
//!
//! `SMPFT_BENCH_QUICK=1` runs 2 vCPUs, one rate and short windows (a smoke test);
//! `SMPFT_BENCH_ONLY=encoding` or `=throttle` runs one table.

#[path = "common.rs"]
mod common;

use common::{pct, qmp, wait_state, Env, Killed};
use smpft_client::ServiceClient;
use std::time::{Duration, Instant};

fn quick() -> bool {
    std::env::var_os("SMPFT_BENCH_QUICK").is_some()
}

const INTERVAL: Duration = Duration::from_millis(20);

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The guest for `workload` at about `pages` dirty pages per epoch over all `vcpus`.
fn guest(workload: &str, pages: u64, vcpus: u64) -> String {
    let per_s = pages * 50 / vcpus;
    match workload {
        // Updates spread over 64 MiB land on distinct pages mostly: an update a dirty page.
        "kv" => format!("service kv kv-ws=64M kv-rate={} duration=600s", per_s * 5 / 4),
        "churn" => format!("service churn churn-ws=64M churn-rate={per_s} duration=600s"),
        "zero" => format!("service churn churn-zero churn-ws=64M churn-rate={per_s} duration=600s"),
        _ => "service churn churn-ws=64M churn-rate=0 duration=600s".to_string(),
    }
}

struct Pair {
    _standby: Option<Killed>,
    _primary: Killed,
}

fn start(env: &Env, vcpus: u64, guest: &str, protected: Option<&[&str]>) -> Pair {
    let tb = env.dir.join("tiebreak");
    let _ = std::fs::remove_file(&tb);
    let v = vcpus.to_string();
    let standby = protected.map(|_| {
        let mut a = strings(&["standby", "--listen", "127.0.0.1:7496", "--vcpus", &v, "--memory", "256M"]);
        a.extend(env.ft_args(&env.b, &env.a, &tb, INTERVAL));
        let s = env.spawn("s", &a);
        wait_state(&env.path("s", "qmp"), "waiting");
        s
    });
    let mut a = strings(&["run", "--vcpus", &v, "--memory", "256M", "--guest-args", guest]);
    if let Some(extra) = protected {
        a.extend(strings(&["--ft-peer", "127.0.0.1:7496"]));
        a.extend(env.ft_args(&env.a, &env.b, &tb, INTERVAL));
        a.extend(strings(extra));
    }
    let p = env.spawn("p", &a);
    if protected.is_some() {
        wait_state(&env.path("p", "qmp"), "protected");
    }
    Pair { _standby: standby, _primary: p }
}

struct Window {
    rtt: Vec<Duration>,
    /// The workload's own progress: kv updates or churn pages, per second.
    work_per_s: f64,
    churn_per_s: f64,
    /// `x-smpft-query-ft` at the start and the end (protected runs).
    ft: Option<(serde_json::Value, serde_json::Value)>,
}

/// (kv updates + churn pages, churn pages) so far.
fn stat(c: &mut ServiceClient, id: u64) -> (u64, u64) {
    let s = common::stat(c, id);
    (s.kv + s.churn, s.churn)
}

/// A paced client (a request every 10 ms) for `window`, after a second of warm-up.
fn measure(env: &Env, protected: bool, window: Duration) -> Window {
    let mut c = ServiceClient::connect(&env.path("p", "serial"), Duration::from_secs(10)).unwrap();
    for i in 0..20 {
        c.call(&format!("INCR {i}")).unwrap();
    }
    std::thread::sleep(Duration::from_secs(1));
    let q0 = protected.then(|| qmp(&env.path("p", "qmp"), "x-smpft-query-ft"));
    let (c0, h0) = stat(&mut c, 1_000_000);
    let t0 = Instant::now();
    let rtt = common::paced_incrs(&mut c, window);
    let secs = t0.elapsed().as_secs_f64();
    let (c1, h1) = stat(&mut c, 1_000_001);
    let ft = protected.then(|| (q0.unwrap(), qmp(&env.path("p", "qmp"), "x-smpft-query-ft")));
    Window { rtt, work_per_s: (c1 - c0) as f64 / secs, churn_per_s: (h1 - h0) as f64 / secs, ft }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn delta(ft: &(serde_json::Value, serde_json::Value), k: &str) -> f64 {
    ft.1[k].as_f64().unwrap_or(0.0) - ft.0[k].as_f64().unwrap_or(0.0)
}

fn encoding_table(env: &Env, window: Duration) {
    println!("\nCheckpoint encoding: unprotected, then protected with --ft-compress none and delta (20 ms epochs)");
    println!(
        "{:>5} {:>6} {:>5} {:>6} | {:>6} {:>6} {:>8} | {:>11} | {:>13} | {:>13} {:>13} | {:>6}",
        "load",
        "target",
        "vcpus",
        "mode",
        "pg/ck",
        "wire÷",
        "enc ms/k",
        "pause p50/99",
        "rtt p50/p99",
        "+p50 ms",
        "+p99 ms",
        "work"
    );
    let rates: &[u64] = if quick() { &[1000] } else { &[1000, 4000] };
    let vcpus: &[u64] = if quick() { &[2] } else { &[1, 2, 4] };
    for workload in ["kv", "churn", "zero"] {
        for &pages in rates {
            for &v in vcpus {
                let g = guest(workload, pages, v);
                let base = {
                    let _pair = start(env, v, &g, None);
                    measure(env, false, window)
                };
                let mut base_rtt = base.rtt.clone();
                let (u50, u99) = (pct(&mut base_rtt, 0.5), pct(&mut base_rtt, 0.99));
                for mode in ["none", "delta"] {
                    let w = {
                        let _pair = start(env, v, &g, Some(&["--ft-compress", mode, "--ft-max-latency", "0"]));
                        measure(env, true, window)
                    };
                    let ft = w.ft.as_ref().unwrap();
                    let raw = delta(ft, "page-bytes-captured");
                    let sent = delta(ft, "page-bytes-sent");
                    let ckpts = delta(ft, "checkpoints").max(1.0);
                    let enc_ms = delta(ft, "page-encode-ms");
                    let mut r = w.rtt.clone();
                    let (p50, p99) = (pct(&mut r, 0.5), pct(&mut r, 0.99));
                    let us = |k: &str| ft.1[k].as_u64().map_or("-".to_string(), |v| format!("{:.1}", v as f64 / 1e3));
                    println!(
                        "{:>5} {:>6} {:>5} {:>6} | {:>6.0} {:>6.3} {:>8.2} | {:>5}/{:<5} | {:>6}/{:<6} | {:>13.1} {:>13.1} | {:>6.2}",
                        workload,
                        pages,
                        v,
                        mode,
                        raw / 4096.0 / ckpts,
                        sent / raw.max(1.0),
                        enc_ms / (raw / 4096.0 / 1000.0).max(1e-9),
                        us("pause-p50-us"),
                        us("pause-p99-us"),
                        ms(p50),
                        ms(p99),
                        (p50.as_secs_f64() - u50.as_secs_f64()) * 1e3,
                        (p99.as_secs_f64() - u99.as_secs_f64()) * 1e3,
                        w.work_per_s / base.work_per_s.max(1.0)
                    );
                }
            }
        }
    }
    println!("pg/ck: dirty pages per checkpoint; wire÷: page bytes sent ÷ page bytes dirty (a zero page sends its");
    println!("8-byte number); enc ms/k:");
    println!("the primary's encoder CPU per 1000 pages; pause in ms; rtt: serial request round trip (ms), +: added");
    println!("over the unprotected run; work: the workload's updates (kv) or pages (churn) per second, protected ÷");
    println!("unprotected.");
}

fn throttle_table(env: &Env, window: Duration) {
    println!(
        "\nFlat-out churn (64 MiB), protected, --ft-compress delta: the output-latency bound off, at 20 and at 50 ms"
    );
    println!(
        "{:>5} {:>6} | {:>15} | {:>15} | {:>9} {:>11} | {:>10}",
        "vcpus", "bound", "hold p50/p99 ms", "rtt p50/p99 ms", "throttle", "throttled s", "churn pg/s"
    );
    let vcpus: &[u64] = if quick() { &[2] } else { &[2, 4] };
    for &v in vcpus {
        for bound in ["0", "20ms", "50ms"] {
            let w = {
                let _pair = start(env, v, &guest("flat", 0, v), Some(&["--ft-max-latency", bound]));
                measure(env, true, window)
            };
            let ft = w.ft.as_ref().unwrap();
            let mut r = w.rtt.clone();
            let us = |k: &str| ft.1[k].as_u64().map_or("-".to_string(), |v| format!("{:.1}", v as f64 / 1e3));
            println!(
                "{:>5} {:>6} | {:>7}/{:<7} | {:>7}/{:<7} | {:>8}% {:>11.1} | {:>10.0}",
                v,
                bound,
                us("output-hold-p50-us"),
                us("output-hold-p99-us"),
                ms(pct(&mut r, 0.5)),
                ms(pct(&mut r, 0.99)),
                ft.1["throttle-percent"],
                delta(ft, "throttled-ms") / 1e3,
                w.churn_per_s
            );
        }
    }
    println!("throttle: the brake when the window closed; throttled s: time with a brake on during the window.");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let env = Env::new("encode");
    let window = if quick() { Duration::from_secs(1) } else { Duration::from_secs(4) };
    let only = std::env::var("SMPFT_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "encoding" {
        encoding_table(&env, window);
    }
    if only.is_empty() || only == "throttle" {
        throttle_table(&env, window);
    }
    let _ = std::fs::remove_dir_all(&env.dir);
}
