//! `smpft demo`: runs the built-in guest in a child `smpft run` and drives a short scripted
//! session with its service, checking every reply, then shows the guest's own report.

use crate::client::{parse_reply, ServiceClient};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct DemoOptions {
    pub vcpus: u32,
    pub requests: u64,
    /// The smpft binary to run the VM with.
    pub smpft: PathBuf,
}

fn step(what: &str) {
    println!("\n== {what}");
}

/// Runs the demo; `Err` says what went wrong.
pub fn run(opts: &DemoOptions) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("smpft-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let sock = dir.join("serial.sock");
    let console = dir.join("console.log");
    let args = "counter churn churn-rate=2000 churn-ws=16M service";
    step(&format!("Starting a VM: {} vCPUs, built-in test guest, workloads: {args}", opts.vcpus));
    let mut child = Command::new(&opts.smpft)
        .args(["run", "--vcpus", &opts.vcpus.to_string(), "--memory", "256M"])
        .arg("--serial")
        .arg(format!("unix:{}", sock.display()))
        .arg("--console")
        .arg(&console)
        .args(["--guest-args", args])
        .stdin(Stdio::null())
        // Keep the transcript readable; SMPFT_LOG set by the caller still wins.
        .env("SMPFT_LOG", std::env::var("SMPFT_LOG").unwrap_or_else(|_| "warn".into()))
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", opts.smpft.display()))?;
    let result = session(opts, &sock);
    let status = if result.is_ok() {
        child.wait().map_err(|e| e.to_string())?
    } else {
        let _ = child.kill();
        child.wait().map_err(|e| e.to_string())?
    };
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    step("The guest's own report (debug console)");
    for l in log.lines() {
        println!("  {l}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let summary = result?;
    if !status.success() || !log.contains("RESULT: PASS") {
        return Err(format!("the guest did not pass its invariant checks (smpft exited with {status})"));
    }
    step("Summary");
    println!(
        "  {} vCPUs ran; {} service replies checked (values counted up by one, the retried",
        opts.vcpus, summary.replies
    );
    println!("  request id was answered without a second increment); final value {}; median", summary.value);
    println!(
        "  round trip {:.0} µs; guest invariants held (counter, churn pages); smpft exited 0.",
        summary.median_rtt.as_secs_f64() * 1e6
    );
    Ok(())
}

struct Summary {
    replies: u64,
    value: u64,
    median_rtt: Duration,
}

fn session(opts: &DemoOptions, sock: &std::path::Path) -> Result<Summary, String> {
    let e = |e: crate::client::ClientError| e.to_string();
    let mut c = ServiceClient::connect(sock, Duration::from_secs(10)).map_err(e)?;
    step(&format!("Talking to the guest's service over its serial port ({})", sock.display()));
    let mut rtts = Vec::new();
    let mut call = |c: &mut ServiceClient, req: &str, show: bool| -> Result<String, String> {
        let t = Instant::now();
        let r = c.call(req).map_err(e)?;
        rtts.push(t.elapsed());
        if show {
            println!("  > {req:<12} < {r}");
        }
        Ok(r)
    };
    let mut value = 0;
    for id in 1..=opts.requests {
        let show = id <= 5 || id == opts.requests;
        if id == 6 && opts.requests > 6 {
            println!("  ... ({} more INCR requests, each reply checked)", opts.requests - 6);
        }
        let (rid, v) = parse_reply(&call(&mut c, &format!("INCR {id}"), show)?, "OK").map_err(e)?;
        if rid != id || v != value + 1 {
            return Err(format!("INCR {id} answered id {rid} value {v}; expected value {}", value + 1));
        }
        value = v;
    }
    let retry = opts.requests.max(1);
    let (_, v) = parse_reply(&call(&mut c, &format!("INCR {retry}"), true)?, "OK").map_err(e)?;
    if v != value {
        return Err(format!("retried INCR {retry} returned {v}, expected the original {value}"));
    }
    println!("    (a retried request id returns its first answer: nothing is counted twice)");
    let (_, v) = parse_reply(&call(&mut c, "GET 100000", true)?, "VAL").map_err(e)?;
    if v != value {
        return Err(format!("GET returned {v}, expected {value}"));
    }
    call(&mut c, "STAT 100001", true)?;
    let (_, v) = parse_reply(&call(&mut c, "EXIT 100002", true)?, "BYE").map_err(e)?;
    if v != value {
        return Err(format!("EXIT reported {v}, expected {value}"));
    }
    rtts.sort();
    Ok(Summary { replies: rtts.len() as u64, value, median_rtt: rtts[rtts.len() / 2] })
}
