//! A database client's view of protection, unprotected and protected side by side in one run:
//! real `smpft run` and `smpft standby` processes in network namespaces (host A, host B, a
//! client, a switch; see `smp_ft::lan`), the test guest serving its `db` workload on TCP port
//! 7000 (`DB <id>` writes a record to the guest's log on its virtio-blk disk, flushes, and only
//! then replies `POS <id> <position>`). Needs root and /dev/kvm. Prints tables (run:
//! `cargo bench -p smp-ft --bench db`).
//!
//! 1. For 4 KiB and 64 KiB records and 1 and 8 client connections (each sending its next `DB`
//!    as soon as the last is answered): requests per second and protected ÷ unprotected, reply
//!    latency p50/p99 and what protection adds to it, MB/s of records written. The protected
//!    rows come twice: streaming off (the primary announces FT wire version 3, through the test
//!    hook `wire-version=3`, so disk writes travel inside the checkpoints, as before streaming)
//!    and on (each completed write leaves for the standby at once).
//! 2. The FT channel's own throughput (QUIC, the transport crate in this process, between the
//!    two hosts' namespaces over the FT link), and beside it a bulk writer's: the guest writing
//!    its disk sequentially in 1 MiB requests, back to back, unprotected and protected with
//!    streaming off and on.
//! 3. SIGKILL failovers of the primary under one connection's load, on a chain: the promoted
//!    copy is protected again by a new standby on the dead primary's host (its disk compared,
//!    not copied), then killed in turn. Per kill the client-side gap (the longest silence between
//!    two replies, from the last one before the kill to the first one from the promoted copy; the
//!    connection never breaks); at the end the promoted copy's log is checked (`DBCHECK`), and
//!    every acknowledged id is asked again and must keep its position.
//!
//! `SMPFT_BENCH_SECS` (default 5): seconds of load per cell. `SMPFT_BENCH_KILLS` (default 20):
//! failovers. `SMPFT_BENCH_QUICK=1` makes those 1 and 2 (a smoke test).
//! `SMPFT_BENCH_ONLY=table|channel|failover` runs one part. Goals are printed beside
//! the figures, never asserted.

#[path = "common.rs"]
mod common;

use common::{pct, wait_state, Env, Killed};
use smp_ft::lan::{Lan, FT_A, FT_B, GUEST_MAC, GUEST_NET};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const INTERVAL: Duration = Duration::from_millis(20);
const MACHINE: [&str; 4] = ["--vcpus", "2", "--memory", "64M"];
const FT_PORT: u16 = 7400;
/// The guest's log holds at most this many records (guest/src/db.rs).
const MAX_RECORDS: u64 = 16384;

/// A whole number from the environment, or `default`; a bad value ends the run with one line.
fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("db benchmark: {name}={v:?} is not a whole number");
            std::process::exit(2)
        }),
    }
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Unprotected,
    Protected { stream: bool },
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Unprotected => "unprotected",
            Mode::Protected { stream: false } => "protected, streaming off",
            Mode::Protected { stream: true } => "protected, streaming on",
        }
    }
}

/// A record size as the guest's parameter and in bytes.
#[derive(Clone, Copy)]
struct Record(&'static str, u64);

const RECORDS: [Record; 2] = [Record("4K", 4 << 10), Record("64K", 64 << 10)];

/// A VM: its processes (killed first when dropped) and its disk images (removed after).
struct Vm {
    procs: Vec<Killed>,
    images: Vec<PathBuf>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.procs.clear();
        for i in &self.images {
            let _ = std::fs::remove_file(i);
        }
    }
}

/// A fresh sparse raw image of `size` bytes (removed after each cell).
fn image(env: &Env, name: &str, size: u64) -> PathBuf {
    let path = env.dir.join(format!("{name}.raw"));
    let f = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.set_len(size).unwrap();
    path
}

/// `smpft standby` arguments for a copy listening on `ft` with identity `me`.
fn standby_args(env: &Env, ft: &str, me: &Path, peer: &Path, disk: &Path) -> Vec<String> {
    let listen = format!("{ft}:{FT_PORT}");
    let mut a = strings(&["standby", "--listen", &listen, "--net", "tap=tap0", "--disk"]);
    a.push(disk.display().to_string());
    a.extend(strings(&MACHINE));
    a.extend(env.ft_args(me, peer, &env.dir.join("tiebreak"), INTERVAL));
    a
}

/// `smpft run` arguments for the guest running `guest` on `disk`.
fn run_args(disk: &Path, guest: &str) -> Vec<String> {
    let net = format!("tap=tap0,mac={GUEST_MAC}");
    let mut a = strings(&["run", "--guest-args", guest, "--net", &net, "--disk"]);
    a.push(disk.display().to_string());
    a.extend(strings(&MACHINE));
    a
}

/// The guest on host A, protected by a standby on host B unless `mode` is unprotected.
fn start(env: &Env, lan: &Lan, record: Record, mode: Mode) -> Vm {
    start_guest(env, lan, &db_guest(record), record.1 * MAX_RECORDS, mode)
}

/// The guest's parameters for the `db` workload with `record`-byte records.
fn db_guest(record: Record) -> String {
    format!("service db db-record={} {GUEST_NET}", record.0)
}

/// The guest running `guest` on host A with a fresh disk of `size` bytes, protected by a
/// standby on host B unless `mode` is unprotected.
fn start_guest(env: &Env, lan: &Lan, guest: &str, size: u64, mode: Mode) -> Vm {
    let _ = std::fs::remove_file(env.dir.join("tiebreak"));
    let mut vm = Vm { procs: Vec::new(), images: vec![image(env, "p", size)] };
    let mut a = run_args(&vm.images[0], guest);
    let mut penv = Vec::new();
    if let Mode::Protected { stream } = mode {
        vm.images.push(image(env, "s", size));
        let s = standby_args(env, FT_B, &env.b, &env.a, &vm.images[1]);
        vm.procs.push(env.spawn_in(Some(&lan.b), "s", &s));
        wait_state(&env.path("s", "qmp"), "waiting");
        a.extend(strings(&["--ft-peer", &format!("{FT_B}:{FT_PORT}")]));
        a.extend(env.ft_args(&env.a, &env.b, &env.dir.join("tiebreak"), INTERVAL));
        if !stream {
            penv.push(("SMPFT_TEST_HOOKS", "wire-version=3"));
        }
    }
    vm.procs.push(env.spawn_with(Some(&lan.a), "p", &a, &penv));
    if mode != Mode::Unprotected {
        wait_state(&env.path("p", "qmp"), "protected");
    }
    vm
}

/// A TCP connection to the guest's line service, one request at a time.
struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
    line: String,
}

impl Conn {
    fn new(lan: &Lan) -> Conn {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match lan.connect(7000, Duration::from_secs(2)) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "the guest's port 7000 never answered: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Conn { r: BufReader::new(s.try_clone().unwrap()), w: s, line: String::new() }
    }

    fn send(&mut self, req: &str) {
        self.w.write_all(req.as_bytes()).unwrap_or_else(|e| panic!("sending {req:?}: {e}"));
    }

    fn read(&mut self) -> &str {
        self.line.clear();
        match self.r.read_line(&mut self.line) {
            Ok(0) => panic!("the guest closed the connection"),
            Ok(_) => self.line.trim_end(),
            Err(e) => panic!("no reply from the guest: {e}"),
        }
    }

    fn call(&mut self, req: &str) -> String {
        self.send(&format!("{req}\n"));
        self.read().to_string()
    }

    /// `DB <id>`: the record's position, or `None` if the log is full.
    fn db(&mut self, id: u64) -> Option<u64> {
        let line = self.call(&format!("DB {id}"));
        if line == format!("ERR {id} log full ({MAX_RECORDS} records)") || line.contains("log full") {
            return None;
        }
        let pos = line.strip_prefix(&format!("POS {id} ")).and_then(|p| p.parse().ok());
        Some(pos.unwrap_or_else(|| panic!("DB {id}: unexpected reply {line:?}")))
    }
}

/// What one cell's load saw.
struct Load {
    lat: Vec<Duration>,
    secs: f64,
    full: bool,
}

/// `conns` connections, each sending `DB` after `DB` (ids of its own) for `window`, or until the
/// log is full.
fn load(lan: &Lan, conns: u64, window: Duration) -> Load {
    let mut cs: Vec<Conn> = (0..conns).map(|_| Conn::new(lan)).collect();
    for (k, c) in cs.iter_mut().enumerate() {
        for i in 0..5 {
            c.db(k as u64 * 100 + i + 1).expect("room in a fresh log");
        }
    }
    let (stop, t0) = (AtomicBool::new(false), Instant::now());
    let per: Vec<(Vec<Duration>, bool, Instant)> = std::thread::scope(|s| {
        let stop = &stop;
        let hs: Vec<_> = (cs.iter_mut().enumerate())
            .map(|(k, c)| {
                s.spawn(move || {
                    let (mut lat, mut full, mut id) = (Vec::new(), false, (k as u64 + 1) << 32);
                    while !stop.load(SeqCst) && t0.elapsed() < window {
                        let t = Instant::now();
                        match c.db(id) {
                            Some(_) => lat.push(t.elapsed()),
                            None => {
                                full = true;
                                stop.store(true, SeqCst);
                            }
                        }
                        id += 1;
                    }
                    (lat, full, Instant::now())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let end = per.iter().map(|p| p.2).max().unwrap_or(t0);
    let full = per.iter().any(|p| p.1);
    let lat = per.into_iter().flat_map(|p| p.0).collect();
    Load { lat, secs: (end - t0).as_secs_f64(), full }
}

/// One cell's figures.
#[derive(Clone, Copy)]
struct Cell {
    rps: f64,
    p50: Duration,
    p99: Duration,
    mbs: f64,
    full: bool,
    /// Protected: where each checkpoint's wait went, p50 and p99 in µs, in the order of
    /// `smp_ft::ft::timeline::PHASES` (the primary's `x-smpft-query-ft` after the load).
    phases: Option<[(u64, u64); 6]>,
}

fn cell(env: &Env, lan: &Lan, record: Record, conns: u64, mode: Mode, window: Duration) -> Cell {
    let _vm = start(env, lan, record, mode);
    let mut l = load(lan, conns, window);
    assert!(!l.lat.is_empty(), "no request was answered ({} {conns} {})", record.0, mode.label());
    let n = l.lat.len() as f64;
    let (p50, p99) = (pct(&mut l.lat, 0.5), pct(&mut l.lat, 0.99));
    let phases = (mode != Mode::Unprotected).then(|| {
        let q = common::qmp(&env.path("p", "qmp"), "x-smpft-query-ft");
        let p = &q["reply-phases-p50-p99-us"];
        smp_ft::ft::timeline::PHASES.map(|name| (p[name][0].as_u64().unwrap_or(0), p[name][1].as_u64().unwrap_or(0)))
    });
    Cell { rps: n / l.secs, p50, p99, mbs: n * record.1 as f64 / l.secs / 1e6, full: l.full, phases }
}

/// Where a protected reply's wait went, per cell: each phase's p50/p99 per checkpoint.
fn phases_table(cells: &Cells) {
    println!(
        "\nWhere the wait went (the primary's reply-phases, p50/p99 ms per checkpoint; see smp-ft/src/ft/timeline.rs)"
    );
    print!("{:>6} {:>5} {:<26} |", "record", "conns", "mode");
    for name in smp_ft::ft::timeline::PHASES {
        print!(" {name:>11}");
    }
    println!();
    for (record, conns, mode, c) in cells {
        let Some(p) = c.phases else { continue };
        print!("{:>6} {:>5} {:<26} |", record.0, conns, mode.label());
        for (p50, p99) in p {
            print!(" {:>11}", format!("{:.1}/{:.1}", p50 as f64 / 1e3, p99 as f64 / 1e3));
        }
        println!();
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// Signed milliseconds `a - b`.
fn added(a: Duration, b: Duration) -> f64 {
    (a.as_secs_f64() - b.as_secs_f64()) * 1e3
}

const MODES: [Mode; 3] = [Mode::Unprotected, Mode::Protected { stream: false }, Mode::Protected { stream: true }];

/// Every cell of table 1: (record, conns, mode, figures).
type Cells = Vec<(Record, u64, Mode, Cell)>;

fn db_table(env: &Env, lan: &Lan, window: Duration) -> Cells {
    println!("\nDB requests (write a record, flush, reply), 2 vCPUs, 20 ms epochs, {} s per cell, same run", {
        window.as_secs_f64()
    });
    println!(
        "{:>6} {:>5} {:<26} | {:>8} {:>5} | {:>15} | {:>15} | {:>8}",
        "record", "conns", "mode", "req/s", "÷", "p50/p99 ms", "+p50/+p99 ms", "MB/s"
    );
    let mut cells = Cells::new();
    for record in RECORDS {
        for conns in [1, 8] {
            let base = cell(env, lan, record, conns, Mode::Unprotected, window);
            for mode in MODES {
                let c = if mode == Mode::Unprotected { base } else { cell(env, lan, record, conns, mode, window) };
                let plus = if mode == Mode::Unprotected {
                    "-".to_string()
                } else {
                    format!("{:.2}/{:.2}", added(c.p50, base.p50), added(c.p99, base.p99))
                };
                println!(
                    "{:>6} {:>5} {:<26} | {:>8.0} {:>5.2} | {:>15} | {:>15} | {:>8.1}{}",
                    record.0,
                    conns,
                    mode.label(),
                    c.rps,
                    c.rps / base.rps,
                    format!("{}/{}", ms(c.p50), ms(c.p99)),
                    plus,
                    c.mbs,
                    if c.full { "  (log full: cell ended early)" } else { "" }
                );
                cells.push((record, conns, mode, c));
            }
        }
    }
    println!("÷: protected ÷ unprotected; +p50/+p99: what protection adds to a reply (ms);");
    println!("MB/s: records written (records × record size ÷ s). Streaming off: the primary speaks FT wire version 3.");
    cells
}

/// Goals beside the figures: added latency at one connection, per record size and mode.
fn latency_goals(cells: &Cells) {
    println!("\nGoals at 1 connection: added p50 ≤ 3 ms, added p99 ≤ 15 ms");
    for record in RECORDS {
        let find = |m: Mode| cells.iter().find(|c| c.0 .0 == record.0 && c.1 == 1 && c.2 == m).map(|c| &c.3);
        let Some(base) = find(Mode::Unprotected) else { continue };
        for mode in &MODES[1..] {
            let Some(c) = find(*mode) else { continue };
            let (a50, a99) = (added(c.p50, base.p50), added(c.p99, base.p99));
            let met = |ok: bool| if ok { "met" } else { "not met" };
            println!(
                "{:>6} {:<26}: +p50 {a50:.2} ms ({}), +p99 {a99:.2} ms ({})",
                record.0,
                mode.label(),
                met(a50 <= 3.0),
                met(a99 <= 15.0)
            );
        }
    }
}

/// Moves this thread into network namespace `ns`.
fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap_or_else(|e| panic!("netns {ns}: {e}"));
    // SAFETY: setns only moves the calling thread into the namespace of the open descriptor.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// The FT channel's own throughput (MB/s): 8 MiB checkpoints sent back to back for `window` from
/// host A's namespace to a standby end in host B's over the FT link, until the last one is
/// acknowledged (the channel's default settings, as smpft uses them).
fn channel_mbs(env: &Env, lan: &Lan, window: Duration) -> f64 {
    use transport::{Channel, ChannelConfig, Event, Identity, Listener, Message, PeerTrust};
    const CKPT: usize = 8 << 20;
    let (a, b) = (Identity::load(&env.a).unwrap(), Identity::load(&env.b).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let standby = s.spawn(|| {
            enter(&lan.b);
            let addr = format!("{FT_B}:0").parse().unwrap();
            let l = Listener::bind(addr, &b, &PeerTrust::Cert(a.cert.to_vec()), ChannelConfig::default()).unwrap();
            tx.send(l.local_addr()).unwrap();
            let ch = l.accept(Some(Duration::from_secs(10)), 2, vec![]).unwrap();
            loop {
                match ch.events().recv_timeout(Duration::from_millis(200)) {
                    Ok(Event::Checkpoint { epoch, .. }) => ch.send(&Message::Ack { epoch }).unwrap(),
                    Ok(Event::Message(_)) => {}
                    Ok(_) => break,
                    Err(_) if done.load(SeqCst) => break,
                    Err(_) => {}
                }
            }
        });
        let (a, b, done) = (&a, &b, &done);
        let primary = s.spawn(move || {
            enter(&lan.a);
            let addr = rx.recv().unwrap();
            let trust = PeerTrust::Cert(b.cert.to_vec());
            let ch = Channel::connect(addr, a, &trust, ChannelConfig::default(), 1, vec![]).unwrap();
            let data = bytes::Bytes::from(vec![0x5au8; CKPT]);
            let (t, mut n) = (Instant::now(), 0);
            while n == 0 || t.elapsed() < window {
                n += 1;
                ch.send_checkpoint(n, data.clone()).unwrap();
            }
            while !matches!(ch.events().recv().unwrap(), Event::Message(Message::Ack { epoch }) if epoch == n) {}
            let mbs = n as f64 * CKPT as f64 / t.elapsed().as_secs_f64() / 1e6;
            done.store(true, SeqCst);
            ch.close(0, "benchmark done");
            mbs
        });
        let mbs = primary.join().unwrap();
        standby.join().unwrap();
        mbs
    })
}

/// A bulk writer: the guest writing its disk sequentially in 1 MiB requests, back to back (no
/// flushes), for `reports` of its one-a-second progress reports after protection. MB/s.
fn bulk_mbs(env: &Env, lan: &Lan, mode: Mode, reports: usize) -> f64 {
    let guest = "disk disk-io=1M disk-seq disk-check=0 flush-every=0 report=1s duration=600s";
    let vm = start_guest(env, lan, guest, 256 << 20, mode);
    let io = common::measure(&env.path("p", "console"), reports);
    drop(vm);
    io.per_s * 1.048576
}

fn channel_table(env: &Env, lan: &Lan, window: Duration) {
    let mbs = channel_mbs(env, lan, window.min(Duration::from_secs(3)));
    println!("\nFT channel (QUIC, 8 MiB checkpoints over the FT link, same run): {mbs:.1} MB/s");
    let reports = (window.as_secs() as usize).clamp(2, 10);
    println!("Bulk sequential writes (the guest's disk workload, 1 MiB requests back to back, {reports} s):");
    let mut base = None;
    for mode in MODES {
        let w = bulk_mbs(env, lan, mode, reports);
        let base = *base.get_or_insert(w);
        let goal = match mode {
            Mode::Unprotected => String::new(),
            _ => format!(
                "; {:.3} × the channel (goal ≥ 0.9: {})",
                w / mbs,
                if w >= 0.9 * mbs { "met" } else { "not met" }
            ),
        };
        println!("  {:<26} {w:>7.1} MB/s = {:.2} × unprotected{goal}", mode.label(), w / base);
    }
}

/// One host of the failover chain: its namespace, FT address, identity and disk image.
struct Host<'a> {
    ns: &'a str,
    ft: &'static str,
    me: &'a Path,
    peer: &'a Path,
    img: PathBuf,
}

/// A copy of the chain's VM: its process, its name (files), the host it runs on.
struct Member(Killed, String, usize);

/// The failover chain's client: `DB 1`, `DB 2`, ... on one connection, held while the chain is
/// protected again (so that the log grows only under protection).
#[derive(Default)]
struct Appender {
    /// (id, position, when the reply came).
    acked: Mutex<Vec<(u64, u64, Instant)>>,
    /// Replies that were not the next position (a record lost or given twice).
    wrong: Mutex<Vec<String>>,
    hold: AtomicBool,
    held: AtomicBool,
    stop: AtomicBool,
}

impl Appender {
    fn run(&self, mut c: Conn) -> Conn {
        while !self.stop.load(SeqCst) {
            if self.hold.load(SeqCst) {
                self.held.store(true, SeqCst);
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let n = self.acked.lock().unwrap().len() as u64;
            let id = n + 1;
            let Some(pos) = c.db(id) else {
                self.wrong.lock().unwrap().push(format!("DB {id}: log full"));
                break;
            };
            if pos != n {
                self.wrong.lock().unwrap().push(format!("DB {id}: position {pos}, the next one is {n}"));
            }
            self.acked.lock().unwrap().push((id, pos, Instant::now()));
        }
        c
    }

    /// Waits (a minute at most) until the replies so far satisfy `cond`.
    fn wait(&self, what: &str, cond: impl Fn(&[(u64, u64, Instant)]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cond(&self.acked.lock().unwrap()) {
            assert!(Instant::now() < deadline, "failover chain: never saw {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Holds the client between requests (until `release`).
    fn hold(&self) {
        self.hold.store(true, SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.held.load(SeqCst) {
            assert!(Instant::now() < deadline, "failover chain: the client never paused");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn release(&self) {
        self.held.store(false, SeqCst);
        self.hold.store(false, SeqCst);
    }

    /// The longest silence between two consecutive replies, from the last reply at or before
    /// `killed` to the first after `live` (when the standby was seen live): a reply already on
    /// its way when the primary died does not hide the outage after it.
    fn gap(&self, killed: Instant, live: Instant) -> Duration {
        let v = self.acked.lock().unwrap();
        let first = v.iter().rposition(|a| a.2 <= killed).unwrap_or(0);
        let last = v.iter().position(|a| a.2 > live).unwrap();
        let gaps = v[first..=last].windows(2).map(|w| w[1].2 - w[0].2);
        gaps.max().unwrap_or_default()
    }
}

/// A new standby on the host that is not `live`'s (the dead primary's, its disk compared rather
/// than copied), and `live` protected by it.
fn reprotect(env: &Env, hosts: &[Host; 2], live: &Member, k: usize) -> Member {
    let (h, name) = (1 - live.2, format!("f{}", k + 2));
    let host = &hosts[h];
    let mut a = standby_args(env, host.ft, host.me, host.peer, &host.img);
    a.extend(strings(&["--disk-sync", "compare"]));
    let p = env.spawn_in(Some(host.ns), &name, &a);
    wait_state(&env.path(&name, "qmp"), "waiting");
    let peer = serde_json::json!({ "peer": format!("{}:{FT_PORT}", host.ft) });
    smpft_client::qmp(&env.path(&live.1, "qmp"), "x-smpft-protect", Some(peer))
        .unwrap_or_else(|e| panic!("x-smpft-protect: {e}"));
    wait_state(&env.path(&live.1, "qmp"), "protected");
    Member(p, name, h)
}

/// Asks every acknowledged id again, 500 requests at a time: how many got another position.
fn moved(c: &mut Conn, acked: &[(u64, u64)]) -> usize {
    let mut moved = 0;
    for chunk in acked.chunks(500) {
        let req: String = chunk.iter().map(|(id, _)| format!("DB {id}\n")).collect();
        c.send(&req);
        for (id, pos) in chunk {
            if c.read() != format!("POS {id} {pos}") {
                moved += 1;
            }
        }
    }
    moved
}

/// A number below `n` from the clock's nanoseconds: where in a request the kill falls.
fn jitter(n: u64) -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::from(t.subsec_micros()) % n
}

/// What the chain leaves: the gaps, the client's connection and the last promoted copy.
type Chain = (Vec<Duration>, Conn, Member);

/// SIGKILLs the primary `kills` times under one connection's load.
fn kill_chain(env: &Env, lan: &Lan, hosts: &[Host; 2], kills: usize, app: &Appender) -> Chain {
    let s = standby_args(env, FT_B, &env.b, &env.a, &hosts[1].img);
    let mut standby = Some(Member(env.spawn_in(Some(&lan.b), "f0", &s), "f0".into(), 1));
    wait_state(&env.path("f0", "qmp"), "waiting");
    let mut a = run_args(&hosts[0].img, &db_guest(RECORDS[0]));
    a.extend(strings(&["--ft-peer", &format!("{FT_B}:{FT_PORT}")]));
    a.extend(env.ft_args(&env.a, &env.b, &env.dir.join("tiebreak"), INTERVAL));
    let mut live = Member(env.spawn_in(Some(&lan.a), "f1", &a), "f1".into(), 0);
    wait_state(&env.path("f1", "qmp"), "protected");
    let mut gaps = Vec::new();
    let (gaps, conn) = std::thread::scope(|s| {
        let client = s.spawn(|| app.run(Conn::new(lan)));
        for k in 0..kills {
            let sb = standby.take().unwrap();
            let n0 = app.acked.lock().unwrap().len();
            app.wait("replies under protection", |v| v.len() >= n0 + 5);
            std::thread::sleep(Duration::from_millis(100 + jitter(400)));
            let killed = Instant::now();
            let _ = live.0 .0.kill();
            let _ = live.0 .0.wait();
            wait_state(&env.path(&sb.1, "qmp"), "live-after-failover");
            let live_seen = Instant::now();
            app.wait("a reply from the promoted copy", |v| v.last().is_some_and(|a| a.2 > live_seen));
            gaps.push(app.gap(killed, live_seen));
            live = sb;
            if k + 1 < kills {
                app.hold();
                standby = Some(reprotect(env, hosts, &live, k));
                app.release();
            }
        }
        app.stop.store(true, SeqCst);
        app.release();
        (gaps, client.join().unwrap())
    });
    (gaps, conn, live)
}

fn failover_table(env: &Env, lan: &Lan, kills: usize) {
    let _ = std::fs::remove_file(env.dir.join("tiebreak"));
    let img = |n: &str| image(env, n, RECORDS[0].1 * MAX_RECORDS);
    let hosts = [
        Host { ns: &lan.a, ft: FT_A, me: &env.a, peer: &env.b, img: img("fa") },
        Host { ns: &lan.b, ft: FT_B, me: &env.b, peer: &env.a, img: img("fb") },
    ];
    let app = Appender::default();
    let (mut gaps, mut c, _live) = kill_chain(env, lan, &hosts, kills, &app);
    let acked: Vec<(u64, u64)> = app.acked.lock().unwrap().iter().map(|a| (a.0, a.1)).collect();
    let wrong = app.wrong.lock().unwrap().clone();
    let check = c.call("DBCHECK 0");
    let on_disk: Option<usize> = check.strip_prefix("DBOK 0 ").and_then(|n| n.parse().ok());
    let moved = moved(&mut c, &acked);
    let lost = wrong.len() + moved + on_disk.map_or(acked.len(), |n| acked.len().saturating_sub(n));
    println!(
        "\nFailover under load: {kills} SIGKILLs of the primary on a chain (each promoted copy protected again by a new"
    );
    println!("standby on the dead primary's host), one connection sending DB after DB (4K records), never reset");
    let list: Vec<String> = gaps.iter().map(|g| format!("{:.0}", g.as_secs_f64() * 1e3)).collect();
    println!("gap per kill (ms, the longest silence between replies across the kill): {}", list.join(" "));
    let (p50, max) = (pct(&mut gaps, 0.5), *gaps.iter().max().unwrap());
    println!("gap p50 {} ms, max {} ms", ms(p50), ms(max));
    println!(
        "records acknowledged {}; the promoted copy's DBCHECK: {check:?} ({}); asked again: {} kept their position, {moved} did not",
        acked.len(),
        match on_disk {
            Some(n) if n == acked.len() => "exactly the acknowledged count",
            Some(n) if n > acked.len() => "more than acknowledged",
            _ => "FEWER than acknowledged",
        },
        acked.len() - moved
    );
    for w in &wrong {
        println!("  wrong reply: {w}");
    }
    println!("lost: {lost}");
    for h in &hosts {
        let _ = std::fs::remove_file(&h.img);
    }
}

/// Why this host cannot run the benchmark, if it cannot.
fn unable() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    match (root, Path::new("/dev/kvm").exists()) {
        (false, _) => Some("it needs root (network namespaces and taps)"),
        (true, false) => Some("/dev/kvm is missing (it runs KVM virtual machines)"),
        (true, true) => None,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Some(why) = unable() {
        println!("db benchmark: skipped, {why}");
        return;
    }
    let t0 = Instant::now();
    let quick = std::env::var_os("SMPFT_BENCH_QUICK").is_some();
    let window = Duration::from_secs(env_num("SMPFT_BENCH_SECS", if quick { 1 } else { 5 }).max(1));
    let kills = env_num("SMPFT_BENCH_KILLS", if quick { 2 } else { 20 }) as usize;
    let only = std::env::var("SMPFT_BENCH_ONLY").unwrap_or_default();
    let env = Env::new("db");
    let lan = Lan::new("d").unwrap_or_else(|e| panic!("network namespaces: {e}"));
    if only.is_empty() || only == "table" {
        let cells = db_table(&env, &lan, window);
        latency_goals(&cells);
        phases_table(&cells);
    }
    if only.is_empty() || only == "channel" {
        channel_table(&env, &lan, window);
    }
    if (only.is_empty() || only == "failover") && kills > 0 {
        failover_table(&env, &lan, kills);
    }
    drop(lan);
    let _ = std::fs::remove_dir_all(&env.dir);
    println!("\n(the whole run: {:.0} s)", t0.elapsed().as_secs_f64());
}
