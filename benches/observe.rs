//! The metrics endpoint's cost to the checkpoint path: a protected pair (4 vCPUs, ~1k dirty
//! pages per 20 ms epoch, a client on the guest service every 10 ms) with `--metrics`, its
//! endpoint not scraped, then a fresh pair scraped every 100 ms, alternating, in one run.
//! Reported: checkpoint pause p50/p99 (from `x-smpft-query-ft`, that pair's checkpoints only),
//! service round trip p50/p99, and the scrapes made with their own p50.
//! (run: `cargo bench -p smp-ft --bench observe`; `SMPFT_BENCH_QUICK=1`: one short round.)

use smpft_client::ServiceClient;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common.rs"]
mod common;
use common::{pct, qmp, wait_state, Env};

fn quick() -> bool {
    std::env::var_os("SMPFT_BENCH_QUICK").is_some()
}

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GETs /metrics every 100 ms until stopped; each scrape's time.
fn scraper(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Duration>> {
    std::thread::spawn(move || {
        let mut times = Vec::new();
        let mut next = Instant::now();
        while !stop.load(SeqCst) {
            let t = Instant::now();
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let req = "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text\r\n\r\n";
                let mut body = Vec::new();
                if s.write_all(req.as_bytes()).is_ok() && s.read_to_end(&mut body).is_ok() && !body.is_empty() {
                    times.push(t.elapsed());
                }
            }
            next += Duration::from_millis(100);
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        times
    })
}

struct Row {
    scraped: bool,
    pause: (u64, u64),
    rtt: (Duration, Duration),
    checkpoints: u64,
    scrapes: Vec<Duration>,
}

fn one(env: &Env, scraped: bool, window: Duration) -> Row {
    let tb = env.dir.join("tiebreak");
    let _ = std::fs::remove_file(&tb);
    let interval = Duration::from_millis(20);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let mut sa = s(&["standby", "--listen", "127.0.0.1:7498", "--vcpus", "4", "--memory", "256M"]);
    sa.extend(env.ft_args(&env.b, &env.a, &tb, interval));
    let _standby = env.spawn("s", &sa);
    wait_state(&env.path("s", "qmp"), "waiting");
    let mport = port();
    let guest = "counter churn service churn-rate=12500 churn-ws=16M duration=600s";
    let mut pa = s(&["run", "--vcpus", "4", "--memory", "256M", "--guest-args", guest, "--ft-peer", "127.0.0.1:7498"]);
    pa.extend(s(&["--metrics", &format!("127.0.0.1:{mport}")]));
    pa.extend(env.ft_args(&env.a, &env.b, &tb, interval));
    let _primary = env.spawn("p", &pa);
    wait_state(&env.path("p", "qmp"), "protected");
    let mut c = ServiceClient::connect(&env.path("p", "serial"), Duration::from_secs(10)).unwrap();
    for i in 0..20 {
        c.call(&format!("INCR {i}")).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = scraped.then(|| scraper(mport, stop.clone()));
    let mut rtts = common::paced_incrs(&mut c, window);
    stop.store(true, SeqCst);
    let scrapes = scrapes.map(|t| t.join().unwrap()).unwrap_or_default();
    let ft = qmp(&env.path("p", "qmp"), "x-smpft-query-ft");
    let us = |k: &str| ft[k].as_u64().unwrap_or(0);
    Row {
        scraped,
        pause: (us("pause-p50-us"), us("pause-p99-us")),
        rtt: (pct(&mut rtts, 0.5), pct(&mut rtts, 0.99)),
        checkpoints: us("checkpoints"),
        scrapes,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let env = Env::new("observe");
    let (rounds, window) = if quick() { (1, Duration::from_secs(2)) } else { (2, Duration::from_secs(6)) };
    println!("\nMetrics endpoint: checkpoint pause with /metrics scraped every 100 ms vs not ({} s per run, 4 vCPUs, ~1k dirty pages per 20 ms epoch)", window.as_secs());
    println!(
        "{:>11} | {:>9} {:>9} | {:>8} {:>8} | {:>11} | {:>7} {:>10}",
        "endpoint", "pause p50", "pause p99", "rtt p50", "rtt p99", "checkpoints", "scrapes", "scrape p50"
    );
    println!(
        "{:>11} | {:>9} {:>9} | {:>8} {:>8} | {:>11} | {:>7} {:>10}",
        "", "(µs)", "(µs)", "(ms)", "(ms)", "", "", "(ms)"
    );
    for _ in 0..rounds {
        for scraped in [false, true] {
            let mut r = one(&env, scraped, window);
            let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
            let sp = if r.scrapes.is_empty() { "-".into() } else { ms(pct(&mut r.scrapes, 0.5)) };
            println!(
                "{:>11} | {:>9} {:>9} | {:>8} {:>8} | {:>11} | {:>7} {:>10}",
                if r.scraped { "scraped" } else { "not scraped" },
                r.pause.0,
                r.pause.1,
                ms(r.rtt.0),
                ms(r.rtt.1),
                r.checkpoints,
                r.scrapes.len(),
                sp
            );
        }
    }
    let _ = std::fs::remove_dir_all(&env.dir);
}
