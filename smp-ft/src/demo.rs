//! `smpft demo`: protection and failover on this machine. It starts a standby and a protected
//! primary (two `smpft` processes, talking QUIC, with a tie-breaker file), drives the guest's
//! service with a client that checks every reply while the guest writes its disk (mirrored to
//! the standby's own image), kills the primary with SIGKILL, and shows the standby taking over
//! with nothing lost: every reply, and a disk that matches the guest's memory.
//!
//! As root, the two "hosts" and the client are network namespaces (`smp_ft::lan`): each copy
//! has a NIC on a tap in its host, the FT channel has a link of its own, and the client holds
//! one TCP connection to the guest across the failover. Otherwise the client uses the serial
//! line and the copies talk over loopback.

use serde_json::Value;
use smp_ft::lan::{Lan, FT_B, GUEST_MAC, GUEST_NET};
use smpft_client::{qmp, FailoverClient};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct DemoOptions {
    pub vcpus: u32,
    /// Requests before the failover (and as many after).
    pub requests: u64,
    /// The smpft binary to run the VMs with.
    pub smpft: PathBuf,
}

fn step(what: &str) {
    println!("\n== {what}");
}

/// A child process killed (SIGKILL) if the demo ends early.
struct Proc(Option<Child>, &'static str);

impl Proc {
    fn kill(&mut self) -> Result<(), String> {
        if let Some(mut c) = self.0.take() {
            c.kill().map_err(|e| format!("cannot kill the {}: {e}", self.1))?;
            c.wait().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn wait(&mut self, within: Duration) -> Result<std::process::ExitStatus, String> {
        let deadline = Instant::now() + within;
        let c = self.0.as_mut().ok_or("already gone")?;
        loop {
            if let Some(s) = c.try_wait().map_err(|e| e.to_string())? {
                self.0 = None;
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(format!("the {} did not exit within {within:?}", self.1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

struct Files {
    dir: PathBuf,
}

impl Files {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn free_port() -> Result<u16, String> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("no free UDP port: {e}"))?;
    s.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

fn wait_state(qmp_path: &Path, want: &str, within: Duration) -> Result<Value, String> {
    let deadline = Instant::now() + within;
    loop {
        let q = qmp(qmp_path, "x-smpft-query-ft", None)?;
        if q["state"] == want {
            return Ok(q);
        }
        if Instant::now() > deadline {
            return Err(format!("never reached state {want}: {q}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The guest's service as the demo's client sees it: checks that each INCR's value is exactly
/// one above the last acknowledged one.
trait Client {
    fn incr(&mut self) -> Result<u64, String>;
    fn exit(&mut self) -> Result<u64, String>;
    fn replies(&self) -> u64;
    fn last(&self) -> Option<u64>;
}

impl Client for FailoverClient {
    fn incr(&mut self) -> Result<u64, String> {
        FailoverClient::incr(self, Duration::from_secs(20)).map_err(|e| e.to_string())
    }
    fn exit(&mut self) -> Result<u64, String> {
        FailoverClient::exit(self).map_err(|e| e.to_string())
    }
    fn replies(&self) -> u64 {
        self.replies
    }
    fn last(&self) -> Option<u64> {
        self.last
    }
}

/// One TCP connection to the guest's line service, kept across the failover.
struct TcpClient {
    r: BufReader<TcpStream>,
    w: TcpStream,
    next_id: u64,
    replies: u64,
    last: Option<u64>,
}

impl TcpClient {
    fn connect(lan: &Lan) -> Result<TcpClient, String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            match lan.connect(7000, Duration::from_secs(2)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(format!("cannot reach the guest: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        let _ = s.set_nodelay(true);
        let r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        Ok(TcpClient { r, w: s, next_id: 1, replies: 0, last: None })
    }

    fn call(&mut self, req: &str) -> Result<String, String> {
        self.w.write_all(format!("{req}\n").as_bytes()).map_err(|e| format!("{req}: {e}"))?;
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) => Err(format!("{req}: the guest closed the connection")),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(e) => Err(format!("{req}: the connection failed: {e}")),
        }
    }

    fn local(&self) -> String {
        self.w.local_addr().map(|a| a.to_string()).unwrap_or_default()
    }
}

impl Client for TcpClient {
    fn incr(&mut self) -> Result<u64, String> {
        let id = self.next_id;
        self.next_id += 1;
        let reply = self.call(&format!("INCR {id}"))?;
        let v: u64 = reply
            .strip_prefix(&format!("OK {id} "))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("INCR {id}: unexpected reply '{reply}'"))?;
        if v != self.last.unwrap_or(0) + 1 {
            return Err(format!("INCR {id} gave {v} after {:?}: lost, duplicated or rolled back", self.last));
        }
        self.replies += 1;
        self.last = Some(v);
        Ok(v)
    }
    fn exit(&mut self) -> Result<u64, String> {
        let id = self.next_id;
        let reply = self.call(&format!("EXIT {id}"))?;
        reply
            .strip_prefix(&format!("BYE {id} "))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("EXIT: unexpected reply '{reply}'"))
    }
    fn replies(&self) -> u64 {
        self.replies
    }
    fn last(&self) -> Option<u64> {
        self.last
    }
}

/// `smpft ARGS` with the demo's files for `name`, in network namespace `ns` if given.
fn spawn(opts: &DemoOptions, f: &Files, ns: Option<&str>, name: &str, args: &[String]) -> Result<Child, String> {
    let mut cmd = match ns {
        None => Command::new(&opts.smpft),
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&opts.smpft);
            c
        }
    };
    cmd.args(args)
        .arg("--serial")
        .arg(format!("unix:{}", f.path(&format!("{name}.serial")).display()))
        .arg("--qmp")
        .arg(format!("unix:{}", f.path(&format!("{name}.qmp")).display()))
        .arg("--console")
        .arg(f.path(&format!("{name}.console")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(f.path(&format!("{name}.log"))).map_err(|e| e.to_string())?)
        .env("SMPFT_LOG", std::env::var("SMPFT_LOG").unwrap_or_else(|_| "info".into()))
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", opts.smpft.display()))
}

/// Runs the demo; `Err` says what went wrong.
pub fn run(opts: &DemoOptions) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("smpft-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let f = Files { dir };
    let r = demo(opts, &f);
    if r.is_err() {
        println!("\n(logs kept in {})", f.dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&f.dir);
    }
    r
}

fn identities(opts: &DemoOptions, f: &Files) -> Result<(), String> {
    step("Two FT identities (host A runs the VM, host B the standby) and a tie-breaker file");
    for host in ["host-a", "host-b"] {
        let o = Command::new(&opts.smpft)
            .args(["keygen", "--name", host, "--out"])
            .arg(f.path(host))
            .output()
            .map_err(|e| e.to_string())?;
        if !o.status.success() {
            return Err(format!("keygen failed: {}", String::from_utf8_lossy(&o.stderr)));
        }
        println!("  {host}: {}", String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or_default());
    }
    Ok(())
}

/// The guest network, if this host can make one (root, iproute2).
fn network() -> Option<Lan> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("\n(not root: no guest network; the client uses the guest's serial line)");
        return None;
    }
    match Lan::new("demo") {
        Ok(lan) => Some(lan),
        Err(e) => {
            println!("\n(no guest network: {e}; the client uses the guest's serial line)");
            None
        }
    }
}

struct Pair {
    standby: Proc,
    primary: Proc,
}

/// Starts the standby on host B and the protected primary on host A; returns when protected.
fn start_pair(opts: &DemoOptions, f: &Files, lan: Option<&Lan>) -> Result<Pair, String> {
    let s = |x: &str| x.to_string();
    let tiebreak = f.path("tiebreak");
    let ft = |me: &str, peer: &str| {
        let (id, cert) = (f.path(me).display().to_string(), f.path(peer).join("cert.pem").display().to_string());
        vec![s("--identity"), id, s("--peer-cert"), cert, s("--tiebreak"), tiebreak.display().to_string()]
    };
    let host = if lan.is_some() { FT_B } else { "127.0.0.1" };
    let addr = format!("{host}:{}", free_port()?);
    let vcpus = opts.vcpus.to_string();
    let mut guest =
        s("counter churn churn-rate=2000 churn-ws=16M service disk disk-ws=8M flush-every=16 duration=3600s");
    if lan.is_some() {
        guest = format!("{guest} {GUEST_NET}");
    }
    for host in ["host-a", "host-b"] {
        let file = std::fs::File::create(f.path(&format!("{host}.disk"))).map_err(|e| e.to_string())?;
        file.set_len(64 << 20).map_err(|e| e.to_string())?;
    }
    let disk = |host: &str| [s("--disk"), f.path(&format!("{host}.disk")).display().to_string()];
    let nic = |mac: bool| match (lan, mac) {
        (None, _) => vec![],
        (Some(_), false) => vec![s("--net"), s("tap=tap0")],
        (Some(_), true) => vec![s("--net"), format!("tap=tap0,mac={GUEST_MAC}")],
    };
    let (ns_a, ns_b) = (lan.map(|l| l.a.as_str()), lan.map(|l| l.b.as_str()));

    let nic_note = if lan.is_some() { " --net tap=tap0" } else { "" };
    step(&format!(
        "Host B: smpft standby --listen {addr} --disk host-b.disk{nic_note} (waits; runs no vCPU until it must; its own 64 MiB image)"
    ));
    let mut args =
        vec![s("standby"), s("--listen"), addr.clone(), s("--vcpus"), vcpus.clone(), s("--memory"), s("256M")];
    args.extend(disk("host-b"));
    args.extend(nic(false));
    args.extend(ft("host-b", "host-a"));
    let standby = Proc(Some(spawn(opts, f, ns_b, "standby", &args)?), "standby");
    wait_state(&f.path("standby.qmp"), "waiting", Duration::from_secs(10))?;

    step(&format!("Host A: smpft run --vcpus {vcpus} --disk host-a.disk{nic_note} --ft-peer {addr} (guest: {guest})"));
    let mut args = vec![s("run"), s("--vcpus"), vcpus, s("--memory"), s("256M"), s("--guest-args"), guest];
    args.extend(disk("host-a"));
    args.extend(nic(true));
    args.extend([s("--ft-peer"), addr]);
    args.extend(ft("host-a", "host-b"));
    let t0 = Instant::now();
    let primary = Proc(Some(spawn(opts, f, ns_a, "primary", &args)?), "primary");
    wait_state(&f.path("primary.qmp"), "protected", Duration::from_secs(30))?;
    println!(
        "  protected {:.0} ms after start (live pre-copy, then one short pause)",
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(Pair { standby, primary })
}

fn report_primary(f: &Files) -> Result<(), String> {
    let q = qmp(&f.path("primary.qmp"), "x-smpft-query-ft", None)?;
    println!(
        "  primary: state {}, epoch {}, {} checkpoints, pause p50 {} µs / p99 {} µs, output held p50 {} µs, log {:.1} MB/s",
        q["state"],
        q["epoch"],
        q["checkpoints"],
        q["pause-p50-us"],
        q["pause-p99-us"],
        q["output-hold-p50-us"],
        q["log-bandwidth-bytes-per-s"].as_f64().unwrap_or(0.0) / 1e6
    );
    println!(
        "  disk: {:.1} MB of guest writes mirrored so far, each sent as it completed and written on the standby once its epoch's checkpoint was acknowledged",
        q["disk-write-bytes-mirrored"].as_f64().unwrap_or(0.0) / 1e6
    );
    if let Some(nic) = q["nics"].get(0) {
        println!(
            "  network: {} frames sent by the guest, each released only after the standby acknowledged its checkpoint",
            nic["tx-frames"]
        );
    }
    Ok(())
}

fn demo(opts: &DemoOptions, f: &Files) -> Result<(), String> {
    identities(opts, f)?;
    let lan = network();
    let mut pair = start_pair(opts, f, lan.as_ref())?;
    let (mut client, tcp): (Box<dyn Client>, Option<String>) = match &lan {
        Some(lan) => {
            step("A client (192.0.2.1) opens one TCP connection to the guest (192.0.2.2:7000) and sends INCR on it");
            let c = TcpClient::connect(lan)?;
            let local = c.local();
            (Box::new(c), Some(local))
        }
        None => {
            step("A client uses the guest's service (INCR <id>, retried by id on failure), checking every reply");
            (Box::new(FailoverClient::new(vec![f.path("primary.serial"), f.path("standby.serial")], 1)), None)
        }
    };
    for i in 1..=opts.requests {
        let v = client.incr()?;
        if i <= 3 {
            println!("  > INCR {i}   < OK {i} {v}");
        }
    }
    println!("  ... {} replies, each exactly one above the last", client.replies());
    report_primary(f)?;
    let before = client.last().unwrap_or(0);

    step("Host A dies: SIGKILL to the primary, with the client in the middle of its work");
    let killed = Instant::now();
    pair.primary.kill()?;
    let v = client.incr()?;
    let failover = killed.elapsed();
    println!(
        "  first reply from host B {:.0} ms after the SIGKILL: value {v} (the last before was {before})",
        failover.as_secs_f64() * 1e3
    );
    let q = qmp(&f.path("standby.qmp"), "x-smpft-query-ft", None)?;
    if q["state"] != "live-after-failover" {
        return Err(format!("host B is {}, not live", q["state"]));
    }
    println!("  host B: state {}, tie-breaker generation {}", q["state"], q["generation"]);
    if let Ok(t) = std::fs::read_to_string(f.path("tiebreak")) {
        println!("  tie-breaker record: {}", t.trim());
    }
    finish(opts, f, client, pair, failover, tcp)
}

/// After the failover: more requests, EXIT, the guest's own checks, and the summary.
fn finish(
    opts: &DemoOptions,
    f: &Files,
    mut client: Box<dyn Client>,
    mut pair: Pair,
    failover: Duration,
    tcp: Option<String>,
) -> Result<(), String> {
    step("The client carries on against host B");
    for _ in 0..opts.requests {
        client.incr()?;
    }
    let bye = client.exit()?;
    println!("  {} replies in all; EXIT: the guest checks its invariants and stops (value {bye})", client.replies());
    let status = pair.standby.wait(Duration::from_secs(20))?;
    if !status.success() {
        return Err(format!("the guest on host B failed its invariant checks ({status})"));
    }
    if Some(bye) != client.last() {
        return Err(format!("the guest's final value {bye} is not the last acknowledged {:?}", client.last()));
    }
    let console = std::fs::read_to_string(f.path("standby.console")).unwrap_or_default();
    let verified: u64 =
        console.lines().filter_map(|l| l.split(" verified ").nth(1)?.split(' ').next()?.parse::<u64>().ok()).sum();
    let writes = console.lines().rev().find(|l| l.starts_with("disk: writes=")).unwrap_or_default().to_string();
    if verified == 0 {
        return Err("the guest on host B did not read its disk back".into());
    }

    step("Summary");
    println!("  failover: {:.0} ms from SIGKILL to the first reply from the standby", failover.as_secs_f64() * 1e3);
    if let Some(local) = tcp {
        println!(
            "  network: the client's TCP connection ({local} → 192.0.2.2:7000) survived the failover: same socket, never reset; host B announced the guest's MAC and address"
        );
    }
    println!(
        "  values checked: {} replies, every one exactly one above the previous: none lost, none duplicated, none rolled back",
        client.replies()
    );
    println!("  guest invariants (shared counters, churn pages) held after the takeover; the standby's smpft exited 0");
    println!(
        "  disk: after the takeover the guest read back all {verified} blocks it had written to host B's own image, each at the generation its memory records (nothing missing, nothing extra); {}",
        writes.trim_start_matches("disk: ")
    );
    Ok(())
}
