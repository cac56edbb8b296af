//! What the seccomp filters cost: a protected pair with `--seccomp off` and with `--seccomp kill`
//! (the default), side by side in one run (`cargo bench -p smp-ft --bench seccomp`).
//!
//! The two modes alternate round by round, so the host's noise falls on both alike. Each round
//! runs a protected pair (4 vCPUs, 20 ms epochs, ~1k dirty pages per epoch, a client sending a
//! service request every 10 ms) and reports the checkpoint pause p50/p99 (`x-smpft-query-ft`)
//! and the request round trip; then SIGKILLs the primary and times the first reply from the
//! standby. The table gives the median over the rounds of each figure, per mode, and the ratio.
//!
//! `SMPFT_BENCH_QUICK=1`: 1 round of 2 s. `SMPFT_BENCH_ROUNDS=N`: N rounds (default 6).

use std::time::Duration;

#[path = "common.rs"]
mod common;
use common::{pct, qmp, wait_state, Env};

const MEMORY: &str = "256M";
const MODES: [&str; 2] = ["off", "kill"];

#[derive(Default)]
struct Figures {
    pause_p50: Vec<Duration>,
    pause_p99: Vec<Duration>,
    rtt_p50: Vec<Duration>,
    rtt_p99: Vec<Duration>,
    failover: Vec<Duration>,
}

/// A protected pair with `mode` on both copies: the standby `s` and the primary `p`.
fn pair(env: &Env, mode: &str, tb: &std::path::Path) -> (common::Killed, common::Killed) {
    let interval = Duration::from_millis(20);
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut sa = strings(&["standby", "--listen", "127.0.0.1:7497", "--vcpus", "4", "--memory", MEMORY]);
    sa.extend(env.ft_args(&env.b, &env.a, tb, interval));
    sa.extend(strings(&["--seccomp", mode]));
    let standby = env.spawn("s", &sa);
    wait_state(&env.path("s", "qmp"), "waiting");
    let mut pa = strings(&["run", "--vcpus", "4", "--memory", MEMORY, "--ft-peer", "127.0.0.1:7497"]);
    // ~1k pages per 20 ms epoch over 4 vCPUs.
    pa.extend(strings(&["--guest-args", "counter churn service churn-rate=12500 churn-ws=16M duration=600s"]));
    pa.extend(env.ft_args(&env.a, &env.b, tb, interval));
    pa.extend(strings(&["--seccomp", mode]));
    let primary = env.spawn("p", &pa);
    wait_state(&env.path("p", "qmp"), "protected");
    (standby, primary)
}

fn round(env: &Env, mode: &str, n: usize, window: Duration, f: &mut Figures) {
    let (_standby, _primary) = pair(env, mode, &env.dir.join(format!("tiebreak-{mode}-{n}")));
    let mut c = smpft_client::ServiceClient::connect(&env.path("p", "serial"), Duration::from_secs(10)).unwrap();
    for i in 0..20 {
        c.call(&format!("INCR {i}")).unwrap();
    }
    let mut rtts = common::paced_incrs(&mut c, window);
    drop(c);
    let ft = qmp(&env.path("p", "qmp"), "x-smpft-query-ft");
    let us = |k: &str| Duration::from_micros(ft[k].as_u64().unwrap_or(0));
    f.pause_p50.push(us("pause-p50-us"));
    f.pause_p99.push(us("pause-p99-us"));
    f.rtt_p50.push(pct(&mut rtts, 0.5));
    f.rtt_p99.push(pct(&mut rtts, 0.99));
    drop((_standby, _primary));
    // The failover on a fresh pair, whose service's values this client's alone.
    let (_standby, mut primary) = pair(env, mode, &env.dir.join(format!("tiebreak-{mode}-{n}-f")));
    let (p, s) = (env.path("p", "serial"), env.path("s", "serial"));
    f.failover.push(common::time_failover(p, s, &mut primary, Duration::from_millis(300)));
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let quick = std::env::var_os("SMPFT_BENCH_QUICK").is_some();
    let rounds: usize = match quick {
        true => 1,
        false => std::env::var("SMPFT_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(6),
    };
    let window = Duration::from_secs(if quick { 2 } else { 5 });
    let env = Env::new("seccomp");
    let mut figures = [Figures::default(), Figures::default()];
    for n in 0..rounds {
        for (mode, f) in MODES.iter().zip(figures.iter_mut()) {
            round(&env, mode, n, window, f);
        }
    }
    println!(
        "\nseccomp filters off and on (kill), {rounds} alternating rounds of {} s each; medians over the rounds",
        window.as_secs()
    );
    println!(
        "(4 vCPUs, 20 ms epochs, ~1k dirty pages per epoch, a request every 10 ms; then one SIGKILL failover a round)"
    );
    println!(
        "| {:<8} | {:>13} | {:>13} | {:>11} | {:>11} | {:>15} |",
        "seccomp", "pause p50 ms", "pause p99 ms", "rtt p50 ms", "rtt p99 ms", "failover ms"
    );
    let mut medians = Vec::new();
    for (mode, f) in MODES.iter().zip(figures.iter_mut()) {
        let m = [
            pct(&mut f.pause_p50, 0.5),
            pct(&mut f.pause_p99, 0.5),
            pct(&mut f.rtt_p50, 0.5),
            pct(&mut f.rtt_p99, 0.5),
            pct(&mut f.failover, 0.5),
        ];
        println!(
            "| {:<8} | {:>13} | {:>13} | {:>11} | {:>11} | {:>15} |",
            mode,
            ms(m[0]),
            ms(m[1]),
            ms(m[2]),
            ms(m[3]),
            ms(m[4])
        );
        medians.push(m);
    }
    let ratio = |i: usize| medians[1][i].as_secs_f64() / medians[0][i].as_secs_f64().max(1e-9);
    println!(
        "| {:<8} | {:>13.2} | {:>13.2} | {:>11.2} | {:>11.2} | {:>15.2} |",
        "on ÷ off",
        ratio(0),
        ratio(1),
        ratio(2),
        ratio(3),
        ratio(4)
    );
    let _ = std::fs::remove_dir_all(&env.dir);
}
