//! Day-2 operations of an FT pair, measured on real processes (a 4-vCPU guest under load, a
//! client on its serial line); prints tables (run: `cargo bench -p smp-ft --bench day2`).
//!
//! - Planned switchover back and forth (`x-smpft-switchover`, `--then-standby`): the primary's
//!   pause (final checkpoint, acknowledgement, tie-breaker hand-over) and the gap a client sees
//!   (the longest wait for a reply around the switchover, which adds the standby's go-live),
//!   and how long the new primary takes to be protected again by the copy that handed over.
//! - A snapshot of the protected VM, written by the standby from its committed copy: the
//!   client's round trips with and without one under way, and the standby's copy and write.
//!
//! `SMPFT_BENCH_QUICK=1` runs 4 switchovers (a smoke test).

#[path = "common.rs"]
mod common;

use common::{pct, qmp, wait_state, Env, Killed};
use smpft_client::{FailoverClient, ServiceClient};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MEMORY: &str = "256M";
const GUEST: &str = "counter churn service churn-rate=2500 churn-ws=16M duration=3600s";

fn quick() -> bool {
    std::env::var_os("SMPFT_BENCH_QUICK").is_some()
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A pair of copies that switch the VM between them; `a` starts as the primary.
fn pair(env: &Env, tb: &std::path::Path) -> (Killed, Killed, String, String) {
    let interval = Duration::from_millis(20);
    let (pa, pb) = (format!("127.0.0.1:{}", port()), format!("127.0.0.1:{}", port()));
    let mut b = args(&["standby", "--listen", &pb, "--vcpus", "4", "--memory", MEMORY]);
    b.extend(args(&["--then-standby", &pb, "--ft-peer", &pa]));
    b.extend(env.ft_args(&env.b, &env.a, tb, interval));
    let kb = env.spawn("b", &b);
    wait_state(&env.path("b", "qmp"), "waiting");
    let mut a = args(&["run", "--vcpus", "4", "--memory", MEMORY, "--guest-args", GUEST]);
    a.extend(args(&["--ft-peer", &pb, "--then-standby", &pa]));
    a.extend(env.ft_args(&env.a, &env.b, tb, interval));
    let ka = env.spawn("a", &a);
    wait_state(&env.path("a", "qmp"), "protected");
    (ka, kb, pa, pb)
}

/// Replies' arrival times, and which copy answered (0: a, 1: b), from a client doing
/// back-to-back INCRs on whichever copy serves.
type Replies = Arc<Mutex<Vec<(Instant, usize)>>>;

fn background_client(env: &Env, stop: Arc<AtomicBool>) -> (std::thread::JoinHandle<u64>, Replies) {
    let times = Arc::new(Mutex::new(Vec::new()));
    let (t, paths) = (times.clone(), vec![env.path("a", "serial"), env.path("b", "serial")]);
    let h = std::thread::spawn(move || {
        let mut c = FailoverClient::new(paths, 1);
        while !stop.load(Ordering::SeqCst) {
            c.incr(Duration::from_secs(20)).expect("no value lost through a switchover");
            t.lock().unwrap().push((Instant::now(), c.connected_to.unwrap_or(0)));
        }
        c.replies
    });
    (h, times)
}

fn switchovers(env: &Env) {
    let n = if quick() { 4 } else { 24 };
    let tb = env.dir.join("tiebreak-switchover");
    let (_a, _b, _, _) = pair(env, &tb);
    let stop = Arc::new(AtomicBool::new(false));
    let (client, replies) = background_client(env, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let (mut pauses, mut gaps, mut reprotect) = (Vec::new(), Vec::new(), Vec::new());
    let (mut from, mut to) = ("a", "b");
    for _ in 0..n {
        wait_state(&env.path(from, "qmp"), "protected");
        std::thread::sleep(Duration::from_millis(300));
        let asked = Instant::now();
        let r = smpft_client::qmp(&env.path(from, "qmp"), "x-smpft-switchover", None).expect("switchover");
        pauses.push(Duration::from_secs_f64(r["pause-ms"].as_f64().unwrap() / 1000.0));
        let replied = Instant::now();
        wait_state(&env.path(to, "qmp"), "protected");
        reprotect.push(replied.elapsed());
        std::thread::sleep(Duration::from_millis(200));
        // From the old copy's last reply to the new copy's first.
        let times = replies.lock().unwrap().clone();
        let (old, new) = if from == "a" { (0, 1) } else { (1, 0) };
        let first_new = times.iter().find(|(t, c)| *c == new && *t >= asked).map(|r| r.0);
        let last_old = times.iter().rev().find(|(t, c)| *c == old && first_new.is_none_or(|f| *t < f)).map(|r| r.0);
        if let (Some(l), Some(f)) = (last_old, first_new) {
            gaps.push(f - l);
        }
        (from, to) = (to, from);
    }
    stop.store(true, Ordering::SeqCst);
    let replies = client.join().unwrap();
    println!("\nPlanned switchover, back and forth ({n} switchovers; 4 vCPUs, 256 MiB, churn 2,500 pages/s/vCPU, 20 ms epochs)");
    println!("{:<34} | {:>8} {:>8} {:>8}", "", "p50 ms", "p99 ms", "max ms");
    for (what, v) in [
        ("primary pause (final checkpoint..)", &mut pauses),
        ("client gap (last reply old→new)", &mut gaps),
        ("re-protected by the old primary", &mut reprotect),
    ] {
        let max = *v.iter().max().unwrap();
        println!("{what:<34} | {:>8} {:>8} {:>8}", ms(pct(v, 0.5)), ms(pct(v, 0.99)), ms(max));
    }
    println!("({replies} requests answered, none lost; client gap: from the last reply of the copy that handed the");
    println!(
        " VM over to the first reply of the one that took it, serial client reconnecting; a failover's is ~170 ms,"
    );
    println!(" see the ft benchmark)");
    println!("(re-protection: from the switchover's reply until the new primary reports `protected`, including");
    println!(" the old primary becoming a standby and the whole initial copy of memory)");
}

/// Round trips of a paced client (an INCR every 10 ms) over `window`.
fn rtts(c: &mut ServiceClient, window: Duration) -> Vec<Duration> {
    common::paced_incrs(c, window)
}

fn snapshot(env: &Env) {
    let tb = env.dir.join("tiebreak-snapshot");
    let (_a, _b, _, _) = pair(env, &tb);
    let mut c = ServiceClient::connect(&env.path("a", "serial"), Duration::from_secs(10)).unwrap();
    let window = Duration::from_secs(if quick() { 2 } else { 5 });
    let mut without = rtts(&mut c, window);
    let file = env.dir.join("protected.snap");
    let qmp_path = env.path("a", "qmp");
    let asker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let r = smpft_client::qmp(&qmp_path, "x-smpft-snapshot", Some(serde_json::json!({"file": file}))).unwrap();
        (r, t.elapsed())
    });
    let mut with = rtts(&mut c, window);
    let (r, took) = asker.join().unwrap();
    println!("\nSnapshot of a protected VM, written by the standby from its committed copy (4 vCPUs, 256 MiB)");
    println!("{:<30} | {:>8} {:>8} {:>8}", "client round trip", "p50 ms", "p99 ms", "max ms");
    for (what, v) in [("without a snapshot", &mut without), ("with one under way", &mut with)] {
        let max = *v.iter().max().unwrap();
        println!("{what:<30} | {:>8} {:>8} {:>8}", ms(pct(v, 0.5)), ms(pct(v, 0.99)), ms(max));
    }
    println!(
        "snapshot: {} MiB written in {} ms (the standby's memory copy {:.0} ms, its write {:.0} ms); the primary does not pause for it",
        r["bytes"].as_u64().unwrap_or(0) >> 20,
        took.as_millis(),
        r["copy-ms"].as_f64().unwrap_or(0.0),
        r["write-ms"].as_f64().unwrap_or(0.0)
    );
    let _ = qmp(&env.path("a", "qmp"), "x-smpft-query-ft");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let env = Env::new("day2");
    switchovers(&env);
    snapshot(&env);
    let _ = std::fs::remove_dir_all(&env.dir);
}
