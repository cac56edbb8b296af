//! The guest network through a failover, end to end: a protected guest (smoltcp on virtio-net)
//! on a tap in "host A", its standby on a tap in "host B", both bridged onto one segment with a
//! client namespace, and the FT channel on a link of its own (see `common::lan`). Real `curl`,
//! `wrk` and `ping` in the client's namespace; real SIGKILL and SIGSTOP of the primary.
//!
//! The property: a TCP connection opened before the failover carries on after it, never reset;
//! every INCR reply on it is exactly one above the last (nothing lost, duplicated or rolled
//! back); an echo stream through it comes back byte for byte; and a copy that lost sends nothing.

mod common;

use common::ft::{log, query, spawn, wait_exit, wait_query, wait_state, FtSetup, Side};
use common::{accepts_connections, later, one_at_a_time, require_kvm, seeded_rng, wait_for, wait_until, Proc, VmPaths};
use smp_ft::lan::{Lan, FT_B, GUEST_MAC};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GUEST: &str = "counter service churn churn-rate=500 churn-ws=2M net ip=192.0.2.2/24 duration=600s";
const SERVICE_PORT: u16 = 7000;
const ECHO_PORT: u16 = 7;
const HALTED: i32 = 75;

struct Pair {
    primary: Proc,
    standby: Proc,
    pp: VmPaths,
    sp: VmPaths,
}

/// A protected pair on `lan`: the standby in host B, the primary in host A.
fn pair(setup: &FtSetup, lan: &Lan, name: &str) -> Pair {
    let (pp, sp) = (setup.paths(&format!("{name}-p")), setup.paths(&format!("{name}-s")));
    let listen = format!("{FT_B}:7400");
    let s_side = Side { me: &setup.b, peer: &setup.a, tiebreak: &setup.tiebreak, env: &[], netns: Some(&lan.b) };
    let standby =
        spawn(&sp, &s_side, &["standby", "--listen", &listen, "--vcpus", "2", "--memory", "128M", "--net", "tap=tap0"]);
    wait_state(&sp, "waiting", Duration::from_secs(10));
    let p_side = Side { me: &setup.a, peer: &setup.b, tiebreak: &setup.tiebreak, env: &[], netns: Some(&lan.a) };
    let net = format!("tap=tap0,mac={GUEST_MAC}");
    let args = ["run", "--vcpus", "2", "--memory", "128M", "--guest-args", GUEST, "--net", &net, "--ft-peer", &listen];
    let primary = spawn(&pp, &p_side, &args);
    wait_state(&pp, "protected", Duration::from_secs(30));
    Pair { primary, standby, pp, sp }
}

/// A client of the guest's TCP service and echo port, checking every reply.
struct NetClient {
    svc: BufReader<TcpStream>,
    echo: TcpStream,
    next_id: u64,
    last: u64,
    echoed: u64,
    /// Longest time one step took (the outage the client saw).
    longest: Duration,
}

/// The echo stream's byte at `offset`.
fn stream_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(2_654_435_761) >> 13) as u8
}

impl NetClient {
    fn connect(lan: &Lan) -> NetClient {
        let connect = |port| {
            let what = format!("cannot reach the guest's port {port}");
            wait_for(what, Duration::from_secs(20), || lan.connect(port, Duration::from_secs(2)).ok())
        };
        let svc = connect(SERVICE_PORT);
        let echo = connect(ECHO_PORT);
        for s in [&svc, &echo] {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s.set_nodelay(true).unwrap();
        }
        NetClient { svc: BufReader::new(svc), echo, next_id: 1, last: 0, echoed: 0, longest: Duration::ZERO }
    }

    fn call(&mut self, line: &str) -> Result<String, String> {
        self.svc.get_mut().write_all(format!("{line}\n").as_bytes()).map_err(|e| format!("send {line}: {e}"))?;
        let mut reply = String::new();
        match self.svc.read_line(&mut reply) {
            Ok(0) => Err(format!("{line}: the connection was closed")),
            Ok(_) => Ok(reply.trim_end().to_string()),
            Err(e) => Err(format!("{line}: {e}")),
        }
    }

    /// One INCR (its value must be exactly one above the last) and one echo round.
    fn step(&mut self) -> Result<(), String> {
        let t = Instant::now();
        let id = self.next_id;
        self.next_id += 1;
        let reply = self.call(&format!("INCR {id}"))?;
        let value: u64 = reply
            .strip_prefix(&format!("OK {id} "))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("INCR {id}: unexpected reply '{reply}'"))?;
        if value != self.last + 1 {
            return Err(format!("INCR {id} gave {value} after {}: lost, duplicated or rolled back", self.last));
        }
        self.last = value;
        let len = 1 + (id * 7919 % 3000);
        let chunk: Vec<u8> = (self.echoed..self.echoed + len).map(stream_byte).collect();
        self.echo.write_all(&chunk).map_err(|e| format!("echo send: {e}"))?;
        let mut back = vec![0u8; chunk.len()];
        self.echo.read_exact(&mut back).map_err(|e| format!("echo at byte {}: {e}", self.echoed))?;
        if back != chunk {
            let at = back.iter().zip(&chunk).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!("echo differs at byte {}", self.echoed + at as u64));
        }
        self.echoed += len;
        self.longest = self.longest.max(t.elapsed());
        Ok(())
    }

    /// EXIT: the final value must be the last acknowledged one.
    fn exit(&mut self) -> Result<(), String> {
        let id = self.next_id;
        let reply = self.call(&format!("EXIT {id}"))?;
        if reply != format!("BYE {id} {}", self.last) {
            return Err(format!("EXIT: '{reply}', the last acknowledged value was {}", self.last));
        }
        Ok(())
    }
}

/// Runs `client` in the background until told to stop.
fn background(mut client: NetClient) -> Background {
    let stop = Arc::new(AtomicBool::new(false));
    let steps = Arc::new(AtomicU64::new(0));
    let (s, n) = (stop.clone(), steps.clone());
    let thread = std::thread::spawn(move || {
        while !s.load(Ordering::SeqCst) {
            client.step()?;
            n.fetch_add(1, Ordering::SeqCst);
        }
        Ok(client)
    });
    Background { stop, steps, thread }
}

struct Background {
    stop: Arc<AtomicBool>,
    /// Steps done so far.
    steps: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Result<NetClient, String>>,
}

impl Background {
    /// Waits until the client has done `n` more steps than now (or has stopped on an error,
    /// which [`finish`] reports).
    fn wait_steps(&self, n: u64, within: Duration) {
        let want = self.steps.load(Ordering::SeqCst) + n;
        let what = later(|| format!("the client did {} of {want} steps", self.steps.load(Ordering::SeqCst)));
        wait_until(what, within, || self.steps.load(Ordering::SeqCst) >= want || self.thread.is_finished());
    }
}

/// A protected pair, and a client connected to the guest (a few steps done) running in the
/// background.
fn pair_with_client(setup: &FtSetup, lan: &Lan, name: &str) -> (Pair, Background) {
    let p = pair(setup, lan, name);
    let mut client = NetClient::connect(lan);
    for _ in 0..5 {
        client.step().unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let bg = background(client);
    bg.wait_steps(5, Duration::from_secs(20));
    (p, bg)
}

fn finish(bg: Background, context: impl FnOnce() -> String) -> NetClient {
    bg.stop.store(true, Ordering::SeqCst);
    bg.thread.join().unwrap().unwrap_or_else(|e| panic!("client: {e}\n{}", context()))
}

/// After a failover: more steps on the same connection, EXIT, and the live copy's guest checks
/// its invariants and exits 0.
fn finish_on_live(mut client: NetClient, live: Proc, paths: &VmPaths, what: &str) -> NetClient {
    for _ in 0..20 {
        client.step().unwrap_or_else(|e| panic!("{what}: {e}\n{}", log(paths)));
    }
    client.exit().unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = wait_exit(live, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{what}: guest invariants failed after takeover\n{}", log(paths));
    client
}

#[test]
fn curl_wrk_and_ping_reach_the_protected_guest() {
    require_kvm();
    let _one = one_at_a_time();
    let setup = FtSetup::new("net-http");
    let lan = Lan::new("t").expect("the network tests need root and iproute2");
    let mut p = pair(&setup, &lan, "http");
    let ping = lan.client_cmd("ping").args(["-c", "5", "-i", "0.2", "-W", "5", "192.0.2.2"]).output().unwrap();
    assert!(ping.status.success(), "ping: {}", String::from_utf8_lossy(&ping.stdout));
    let curl = |path: &str| {
        let o = lan.client_cmd("curl").args(["-sS", "--max-time", "20", &format!("http://192.0.2.2{path}")]).output();
        let o = o.unwrap();
        assert!(o.status.success(), "curl {path}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(curl("/incr/1"), "OK 1 1");
    assert_eq!(curl("/incr/1"), "OK 1 1", "a retried id increments nothing");
    assert_eq!(curl("/incr/2"), "OK 2 2");
    assert!(curl("/stat").contains("value=2"), "{}", curl("/stat"));
    let o =
        lan.client_cmd("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "http://192.0.2.2/nope"]).output();
    assert_eq!(String::from_utf8_lossy(&o.unwrap().stdout), "404");
    let wrk = lan.client_cmd("wrk").args(["-t1", "-c4", "-d2s", "--timeout", "10s", "http://192.0.2.2/stat"]).output();
    let wrk = wrk.unwrap();
    let out = String::from_utf8_lossy(&wrk.stdout).to_string();
    assert!(wrk.status.success(), "wrk: {out}{}", String::from_utf8_lossy(&wrk.stderr));
    let rps: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no request rate in wrk's output: {out}"));
    assert!(rps > 0.0, "{out}");
    assert!(!out.contains("Socket errors") && !out.contains("Non-2xx"), "wrk saw errors:\n{out}");
    let mut source = lan.connect(19, Duration::from_secs(5)).unwrap();
    source.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut bulk = vec![0u8; 1 << 20];
    source.read_exact(&mut bulk).unwrap();
    assert!(bulk.iter().all(u8::is_ascii_digit), "the source port sends its pattern");
    let q = query(&p.pp);
    eprintln!("protected: wrk {rps:.0} requests/s; output hold p50/p99 {} / {} µs", q["output-hold-p50-us"], {
        &q["output-hold-p99-us"]
    });
    p.primary.sigkill();
    p.standby.sigkill();
}

#[test]
fn a_tcp_connection_survives_primary_sigkill_at_random_moments() {
    require_kvm();
    let _one = one_at_a_time();
    let setup = FtSetup::new("net-kill");
    let (_seed, mut r) = seeded_rng();
    let mut outages = Vec::new();
    for trial in 0..10 {
        let lan = Lan::new("t").expect("the network tests need root and iproute2");
        let _ = std::fs::remove_file(&setup.tiebreak);
        let mut p = pair(&setup, &lan, &format!("t{trial}"));
        let mut client = NetClient::connect(&lan);
        for _ in 0..5 {
            client.step().unwrap_or_else(|e| panic!("trial {trial} before the kill: {e}"));
        }
        let bg = background(client);
        let wait = r(500);
        // The moment is the point: a random time into the connection.
        std::thread::sleep(Duration::from_millis(wait));
        p.primary.sigkill();
        let what = format!("trial {trial} (SIGKILL {wait} ms into the connection)");
        wait_state(&p.sp, "live-after-failover", Duration::from_secs(10));
        bg.wait_steps(5, Duration::from_secs(20));
        let client = finish(bg, || format!("{what}\nprimary:\n{}\nstandby:\n{}", log(&p.pp), log(&p.sp)));
        outages.push(client.longest);
        let client = finish_on_live(client, p.standby, &p.sp, &what);
        eprintln!("{what}: {} INCRs, {} echo bytes, longest step {:?}", client.last, client.echoed, client.longest);
    }
    outages.sort();
    eprintln!(
        "10 failovers, no connection reset; longest step per trial: median {:?}, max {:?}",
        outages[5], outages[9]
    );
}

#[test]
fn a_frozen_primary_sends_nothing_after_the_standby_took_over() {
    require_kvm();
    let _one = one_at_a_time();
    let setup = FtSetup::new("net-stop");
    let lan = Lan::new("t").expect("the network tests need root and iproute2");
    let (p, bg) = pair_with_client(&setup, &lan, "stop");
    let counted = lan.guest_frames_sent_by("pa");
    bg.wait_steps(3, Duration::from_secs(20));
    assert!(lan.guest_frames_sent_by("pa") > counted, "the counter sees the guest's frames from host A");
    // SAFETY: kill only sends a signal to the primary's process.
    unsafe { libc::kill(p.primary.pid() as i32, libc::SIGSTOP) };
    wait_state(&p.sp, "live-after-failover", Duration::from_secs(10));
    bg.wait_steps(5, Duration::from_secs(20));
    let before = lan.guest_frames_sent_by("pa");
    let before_all = lan.sent_by("pa");
    // SAFETY: as above.
    unsafe { libc::kill(p.primary.pid() as i32, libc::SIGCONT) };
    let status = wait_exit(p.primary, Duration::from_secs(20));
    assert_eq!(status.code(), Some(HALTED), "the thawed primary lost the tie-breaker and halts\n{}", log(&p.pp));
    // It knew it had been stopped: acknowledgements that waited in its socket released nothing.
    assert!(log(&p.pp).contains("did not run for a while"), "the stall was noticed\n{}", log(&p.pp));
    // The time is the point: a window in which a late frame from host A would be counted.
    std::thread::sleep(Duration::from_millis(300));
    let host_own = lan.sent_by("pa") - before_all - (lan.guest_frames_sent_by("pa") - before);
    eprintln!("host A's own packets meanwhile (not the guest's): {host_own}");
    assert_eq!(
        lan.guest_frames_sent_by("pa"),
        before,
        "the old primary sent guest frames after it lost\n{}",
        log(&p.pp)
    );
    let client = finish(bg, || log(&p.sp));
    finish_on_live(client, p.standby, &p.sp, "after SIGSTOP/SIGCONT");
}

#[test]
fn cutting_only_the_ft_link_leaves_exactly_one_copy_answering() {
    require_kvm();
    let _one = one_at_a_time();
    let setup = FtSetup::new("net-cut");
    let lan = Lan::new("t").expect("the network tests need root and iproute2");
    let (p, bg) = pair_with_client(&setup, &lan, "cut");
    lan.cut_ft_link().unwrap();
    let (mut primary, mut standby) = (p.primary, p.standby);
    // A primary that loses halts (it ran the VM); a standby that loses never ran it: it stands
    // down and waits for a primary again.
    let lost = wait_for("nobody lost after the FT link was cut", Duration::from_secs(15), || {
        if let Some(st) = primary.try_wait() {
            return Some((Some(st), "primary"));
        }
        if let Some(st) = standby.try_wait() {
            return Some((Some(st), "standby"));
        }
        log(&p.sp).contains("lost to a live primary").then_some((None, "standby"))
    });
    let (winner, paths, who) = match lost {
        (st, "primary") => {
            assert_eq!(st.and_then(|s| s.code()), Some(HALTED), "the primary ended otherwise\n{}", log(&p.pp));
            (standby, &p.sp, "standby")
        }
        (st, _) => {
            assert!(st.is_none(), "the standby must wait for a primary again, not end\n{}", log(&p.sp));
            assert!(!log(&p.sp).contains("goes live"), "{}", log(&p.sp));
            standby.sigkill();
            (primary, &p.pp, "primary")
        }
    };
    let mut winner = winner;
    let running_alone = |q: &serde_json::Value| q["state"] == "live-after-failover" || q["state"] == "unprotected";
    wait_query(paths, &format!("the {who} won"), Duration::from_secs(10), running_alone);
    assert!(winner.is_running(), "the {who} won and keeps running");
    let client = finish(bg, || log(paths));
    eprintln!("FT link cut: the {who} won; the connection carried on ({} INCRs)", client.last);
    finish_on_live(client, winner, paths, &format!("FT link cut, {who} won"));
}

#[test]
fn bad_network_arguments_are_refused_with_a_clear_error() {
    require_kvm();
    let run = |net: &str| {
        let o = common::smpft()
            .args(["run", "--guest-args", "counter duration=1s", "--serial", "null", "--net", net])
            .output()
            .unwrap();
        assert!(!o.status.success(), "--net {net} was accepted");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    assert!(run("tap=smpft-nosuch").contains("no network interface 'smpft-nosuch'"));
    assert!(run("tap=lo").contains("is not a tap"));
    assert!(run("tap=x,mac=52:54:00:00:00").contains("not a MAC address"));
    assert!(run("tap=x,mac=01:00:5e:00:00:01").contains("multicast"));
    assert!(run("tap-fd=0").contains("not an open tap descriptor"));
    assert!(run("bridge=br0").contains("unknown network spec option"));
    let _one = one_at_a_time();
    let lan = Lan::new("t").expect("the network tests need root and iproute2");
    let dir = common::scratch("net-busy");
    let qmp = dir.join("first.qmp");
    let qmp_arg = format!("unix:{}", qmp.display());
    let args =
        ["run", "--guest-args", "counter duration=20s", "--serial", "null", "--net", "tap=tap0", "--qmp", &qmp_arg];
    let first = in_ns_spawn(&lan.a, &args);
    // Its QMP socket is bound once the VM (with its tap) is built.
    wait_until("the first VM never answered on QMP", Duration::from_secs(20), || accepts_connections(&qmp));
    let o = smp_ft::lan::in_ns(
        &lan.a,
        &[
            common::smpft_bin().to_str().unwrap(),
            "run",
            "--guest-args",
            "counter",
            "--serial",
            "null",
            "--net",
            "tap=tap0",
        ],
    )
    .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("tap 'tap0' is in use by another process"), "{e}");
    let mut first = first;
    first.sigkill();
    assert!(first.try_wait().is_some_and(|s| s.signal() == Some(9)));
}

/// `smpft ARGS` started in namespace `ns`.
fn in_ns_spawn(ns: &str, args: &[&str]) -> Proc {
    let c = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(common::smpft_bin())
        .args(args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Proc::new(c)
}
