//! The test guest's database-shaped workload (`db`): `DB <id>` appends a record to a log on a
//! virtio-blk disk (written, then flushed) before it answers with the record's position, once per
//! id; `DBCHECK` reads the log back and checks it against the index in the guest's memory. Alone,
//! and protected by a standby whose primary is SIGKILLed while a client appends: every record the
//! client was told about is on the promoted copy's disk at its position, and none is there twice.
//! The log is also read from the disk images on the host, independently of the guest.

mod common;

use common::disk_kills::{self, console_tail, Kill};
use common::ft::{free_port, log, spawn, wait_exit, wait_state, FtSetup};
use common::{
    later, one_at_a_time, require_kvm, scratch, seeded_rng, stderr, wait_until, Proc, Scratch, ServiceClient, VmPaths,
};
use smp_ft::lan::{Lan, GUEST_MAC, GUEST_NET};
use smpft_client::FailoverClient;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MAGIC: &[u8; 8] = b"smpft-db";

fn raw_image(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// The log as the disk image at `path` holds it, read on the host: the (id, position) of each
/// record of `record` bytes from position 0 up to the first position without one. Every record
/// must carry the first one's log tag and its own position.
fn log_on_disk(path: &Path, record: usize) -> Vec<(u64, u64)> {
    let image = std::fs::read(path).unwrap();
    let word = |r: &[u8], i: usize| u64::from_le_bytes(r[i * 8..i * 8 + 8].try_into().unwrap());
    let mut log = Vec::new();
    let mut tag = None;
    for (p, r) in image.chunks_exact(record).enumerate() {
        if &r[..8] != MAGIC || tag.is_some_and(|t| t != word(r, 1)) {
            break;
        }
        tag = Some(word(r, 1));
        assert_eq!(word(r, 3), p as u64, "the record at position {p} says it is at {}", word(r, 3));
        assert_eq!(word(r, 4), record as u64, "the record at position {p} has the wrong size");
        log.push((word(r, 2), p as u64));
    }
    log
}

/// A VM of its own (`smpft run`) with a fresh raw disk of `size` bytes, running `guest`; its
/// directory goes when this is dropped (keep `dir` bound).
struct Alone {
    dir: Scratch,
    img: PathBuf,
    p: VmPaths,
    vm: Proc,
}

fn alone(name: &str, size: u64, vcpus: &str, guest: &str) -> Alone {
    let dir = scratch(name);
    let img = dir.join("disk.raw");
    raw_image(&img, size);
    let p = VmPaths::new(&dir, "vm");
    let disk = img.display().to_string();
    let vm = p.spawn(&["--vcpus", vcpus, "--memory", "64M", "--disk", &disk, "--guest-args", guest]);
    Alone { dir, img, p, vm }
}

/// `POS <id> <position>` to `DB <id>`.
fn position(c: &mut ServiceClient, id: u64) -> u64 {
    let line = c.call(&format!("DB {id}"));
    let (got, pos) = common::reply(&line, "POS");
    assert_eq!(got, id, "{line}");
    pos
}

/// Appends, retries and a check on one VM; then the guest's log is read from its disk image.
#[test]
fn records_are_appended_once_per_id_and_read_back() {
    require_kvm();
    let Alone { dir: _dir, img, p, vm } = alone("db", 8 << 20, "2", "service db db-record=8K");
    let mut c = ServiceClient::connect(&p.serial, Duration::from_secs(10));
    const N: u64 = 300;
    // Ids that are not positions, so a reply that mixed them up would show.
    let ids: Vec<u64> = (0..N).map(|i| 1_000_000 + i * 7919).collect();
    for (i, &id) in ids.iter().enumerate() {
        assert_eq!(position(&mut c, id), i as u64, "each new id gets the next position");
        if i % 50 == 49 {
            // A retry of an earlier id: its first position, and nothing appended.
            let earlier = ids[i / 2];
            assert_eq!(position(&mut c, earlier), (i / 2) as u64, "id {earlier} asked again");
        }
    }
    assert_eq!(c.call("DBCHECK 7"), format!("DBOK 7 {N}"));
    assert_eq!(c.call("DB"), "ERR 0 missing or bad request id");
    assert_eq!(c.call("DB 1 2"), "ERR 1 trailing words");
    c.call("EXIT 8");
    assert_eq!(vm.wait().code(), Some(0), "{}", p.console());
    assert!(p.console().contains(&format!("db: records={N} repeats=6")), "{}", p.console());
    let on_disk = log_on_disk(&img, 8192);
    let want: Vec<(u64, u64)> = ids.iter().enumerate().map(|(i, &id)| (id, i as u64)).collect();
    assert_eq!(on_disk, want, "the log on the disk: each id once, at the position it was given");
}

/// A reboot starts a new log at position 0: the records of the boot before carry another tag and
/// are not this log's, and the new records overwrite them.
#[test]
fn a_reboot_starts_a_new_log() {
    require_kvm();
    let Alone { dir: _dir, img, p, vm } = alone("db-reboot", 1 << 20, "1", "service db");
    let mut c = ServiceClient::connect(&p.serial, Duration::from_secs(10));
    for id in 1..=3 {
        assert_eq!(position(&mut c, id), id - 1);
    }
    assert_eq!(c.call("REBOOT 4"), "REBOOT 4");
    let boots = || p.console().matches("smpft-guest: ").count();
    wait_until(later(|| format!("a second boot\n{}", p.console())), Duration::from_secs(20), || boots() == 2);
    assert_eq!(c.call("DBCHECK 5"), "DBOK 5 0", "the first boot's records are not the new log's");
    assert_eq!(position(&mut c, 3), 0);
    assert_eq!(position(&mut c, 6), 1);
    assert_eq!(c.call("DBCHECK 7"), "DBOK 7 2");
    c.call("EXIT 8");
    assert_eq!(vm.wait().code(), Some(0), "{}", p.console());
    assert_eq!(log_on_disk(&img, 4096), [(3, 0), (6, 1)], "the new log, up to the first boot's third record");
}

/// `DB` and `DBCHECK` on TCP port 7000 (smoltcp on virtio-net, a client in its own namespace) go
/// to the same log as on the serial line.
#[test]
fn tcp_port_7000_and_the_serial_line_share_one_log() {
    require_kvm();
    let _serial = one_at_a_time();
    let lan = Lan::new("db").expect("this test needs root and iproute2");
    let d = scratch("db-tcp");
    let img = d.join("disk.raw");
    raw_image(&img, 1 << 20);
    let p = VmPaths::new(&d, "vm");
    let guest = format!("service db {GUEST_NET}");
    let vm = Proc::new(
        std::process::Command::new("ip")
            .args(["netns", "exec", &lan.a])
            .arg(common::smpft_bin())
            .env("SMPFT_LOG", "warn")
            .args(["run", "--vcpus", "1", "--memory", "64M", "--guest-args", &guest, "--disk"])
            .arg(&img)
            .args(["--net", &format!("tap=tap0,mac={GUEST_MAC}"), "--serial"])
            .arg(format!("unix:{}", p.serial.display()))
            .arg("--console")
            .arg(&p.console)
            .spawn()
            .unwrap(),
    );
    let mut serial = ServiceClient::connect(&p.serial, Duration::from_secs(10));
    let tcp = common::wait_for("a connection to port 7000", Duration::from_secs(20), || {
        lan.connect(7000, Duration::from_secs(2)).ok()
    });
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut reader = BufReader::new(tcp.try_clone().unwrap());
    let mut call = |line: &str| {
        (&tcp).write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        reply.trim_end().to_string()
    };
    assert_eq!(call("DB 10"), "POS 10 0");
    assert_eq!(position(&mut serial, 20), 1);
    assert_eq!(call("DB 20"), "POS 20 1", "an id appended on the serial line is known on TCP");
    assert_eq!(position(&mut serial, 10), 0);
    assert_eq!(call("DB 30"), "POS 30 2");
    assert_eq!(call("DBCHECK 1"), "DBOK 1 3");
    serial.call("EXIT 2");
    assert_eq!(vm.wait().code(), Some(0), "{}", p.console());
    let on_disk = log_on_disk(&img, 4096);
    assert_eq!(on_disk, [(10, 0), (20, 1), (30, 2)]);
}

/// `fail=db` makes the guest claim a record in memory that it never wrote: `DBCHECK` finds it.
#[test]
fn dbcheck_finds_a_record_that_never_reached_the_disk() {
    require_kvm();
    let Alone { dir: _dir, p, vm, .. } = alone("db-fail", 1 << 20, "1", "service db fail=db");
    let mut c = ServiceClient::connect(&p.serial, Duration::from_secs(10));
    // The guest breaks its log 200 ms into its run (by its own clock): the next record.
    let uptime = |c: &mut ServiceClient| common::reply(&c.call("TIME 3"), "TIME").1;
    wait_until("the guest's clock passes 500 ms", Duration::from_secs(20), || uptime(&mut c) > 500);
    assert_eq!(position(&mut c, 4), 0);
    assert_eq!(position(&mut c, 5), 1);
    let check = c.call("DBCHECK 6");
    assert!(check.starts_with("ERR 6 position 0 of 2: no record of this log"), "{check}");
    c.call("EXIT 7");
    assert_eq!(vm.wait().code(), Some(0), "{}", p.console());
    assert!(p.console().contains("db: sabotaged: id 4 at position 0 is not written"), "{}", p.console());
}

/// A full log, a bad record size, `db` beside `disk`, and no disk at all: one clear answer each.
#[test]
fn a_full_log_and_bad_parameters_are_refused() {
    require_kvm();
    let Alone { dir: _dir, img, p, vm } = alone("db-bad", 8192, "1", "service db");
    let disk = img.display().to_string();
    let mut c = ServiceClient::connect(&p.serial, Duration::from_secs(10));
    assert_eq!(position(&mut c, 1), 0);
    assert_eq!(position(&mut c, 2), 1);
    assert_eq!(c.call("DB 3"), "ERR 3 log full (2 records)");
    assert_eq!(position(&mut c, 1), 0, "a known id is answered from the index when the log is full");
    assert_eq!(c.call("DBCHECK 4"), "DBOK 4 2");
    c.call("EXIT 5");
    assert_eq!(vm.wait().code(), Some(0), "{}", p.console());

    let run = |disk: Option<&str>, guest: &str| {
        let mut cmd = common::smpft();
        cmd.args(["run", "--vcpus", "1", "--memory", "64M", "--serial", "null", "--guest-args", guest]);
        if let Some(disk) = disk {
            cmd.args(["--disk", disk]);
        }
        cmd.output().unwrap()
    };
    let disk = Some(disk.as_str());
    let cases = [
        (disk, "service db db-record=1000", 2, "db: db-record=1000 must be a multiple of 512 up to 65536"),
        (disk, "service db db-record=128K", 2, "db: db-record=131072 must be a multiple of 512"),
        (disk, "service db disk", 2, "bad boot parameters: db and disk both want the first disk"),
        (disk, "db", 2, "bad boot parameters: db answers the service's requests"),
        (None, "service db", 5, "db: no virtio-blk device"),
    ];
    for (disk, guest, code, needle) in cases {
        let out = run(disk, guest);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{guest:?}:\n{err}");
        assert!(err.contains(needle), "{guest:?}: expected {needle:?} in:\n{err}");
    }
}

/// The client of the failover trials: `DB 1`, `DB 2`, ... through whichever copy answers, each
/// retried until some copy acknowledges it, until told to stop. `acked` collects (id, position).
fn appending_client(
    paths: Vec<std::path::PathBuf>,
    acked: Arc<Mutex<Vec<(u64, u64)>>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<FailoverClient, String>> {
    std::thread::spawn(move || {
        let mut c = FailoverClient::new(paths, 1);
        let mut id = 1;
        while !stop.load(SeqCst) {
            let pos = c.call("DB", id, "POS", Duration::from_secs(20)).map_err(|e| format!("DB {id}: {e}"))?;
            acked.lock().unwrap().push((id, pos));
            id += 1;
        }
        Ok(c)
    })
}

/// A protected pair with a fresh 16 MiB raw disk each, number `n` in `setup`, the guest running
/// `guest`; each side's environment as given. The standby is waiting before the primary starts.
struct Pair {
    p_img: PathBuf,
    s_img: PathBuf,
    pp: VmPaths,
    sp: VmPaths,
    primary: Proc,
    standby: Proc,
}

fn pair(setup: &FtSetup, n: u64, guest: &str, p_env: &[(&str, &str)], s_env: &[(&str, &str)]) -> Pair {
    let (p_img, s_img) = (setup.dir.join(format!("p{n}.raw")), setup.dir.join(format!("s{n}.raw")));
    raw_image(&p_img, 16 << 20);
    raw_image(&s_img, 16 << 20);
    let (p_disk, s_disk) = (p_img.display().to_string(), s_img.display().to_string());
    let addr = format!("127.0.0.1:{}", free_port());
    let (pp, sp) = (setup.paths(&format!("p{n}")), setup.paths(&format!("s{n}")));
    let machine = ["--vcpus", "2", "--memory", "64M"];
    let standby_args = [&["standby", "--listen", &addr, "--disk", &s_disk][..], &machine[..]].concat();
    let standby = spawn(&sp, &setup.side(&setup.b, &setup.a, s_env), &standby_args);
    wait_state(&sp, "waiting", Duration::from_secs(10));
    let primary_args = ["run", "--ft-peer", &addr, "--disk", &p_disk, "--guest-args", guest];
    let primary = spawn(&pp, &setup.side(&setup.a, &setup.b, p_env), &[&primary_args[..], &machine[..]].concat());
    Pair { p_img, s_img, pp, sp, primary, standby }
}

/// One trial: a protected pair with a disk each, the client appending from the start, the
/// primary killed as `kill` says. Returns the records acknowledged, how many of them before the
/// kill, and the tries the promoted copy answered from its index (the primary had appended them).
fn failover_trial(setup: &FtSetup, n: u64, kill: &Kill) -> (usize, usize, u64) {
    let what = &kill.what;
    let (p_hooks, s_hooks) = (disk_kills::hooks(&kill.primary), disk_kills::hooks(&kill.standby));
    let p_env: Vec<(&str, &str)> = p_hooks.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s_env: Vec<(&str, &str)> = s_hooks.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let Pair { p_img, s_img, pp, sp, mut primary, standby } = pair(setup, n, "service db", &p_env, &s_env);

    let acked: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let client = appending_client(vec![pp.serial.clone(), sp.serial.clone()], acked.clone(), stop.clone());
    let acks = || acked.lock().unwrap().len();
    if kill.primary.is_none() {
        // (With a fault armed the primary may be gone before anyone asks it.)
        wait_state(&pp, "protected", Duration::from_secs(30));
        let running = later(|| format!("{what}: the client got {} acknowledgements\n{}", acks(), log(&pp)));
        wait_until(running, Duration::from_secs(20), || acks() >= 10 || client.is_finished());
        std::thread::sleep(Duration::from_millis(kill.after_ms));
        primary.sigkill();
    }
    let status = wait_exit(primary, Duration::from_secs(30));
    let before = acks();
    assert_eq!(status.signal(), Some(9), "{what}: primary ended otherwise\n{}", log(&pp));
    wait_state(&sp, "live-after-failover", Duration::from_secs(15));
    let more = later(|| format!("{what}: {} acknowledgements after the failover\n{}", acks(), log(&sp)));
    wait_until(more, Duration::from_secs(20), || acks() >= before + 20 || client.is_finished());
    stop.store(true, SeqCst);
    let mut c = client.join().unwrap().unwrap_or_else(|e| panic!("{what}: {e}\nstandby:\n{}", log(&sp)));
    let acked = acked.lock().unwrap().clone();

    let positions: Vec<u64> = acked.iter().map(|&(_, p)| p).collect();
    let want: Vec<u64> = (0..acked.len() as u64).collect();
    assert_eq!(positions, want, "{what}: acknowledged positions: each id its own, in order, none lost or twice");
    for &(id, pos) in &acked {
        let again = c.call("DB", id, "POS", Duration::from_secs(20)).unwrap();
        assert_eq!(again, pos, "{what}: DB {id} asked again of the promoted copy");
    }
    assert_eq!(c.connected_to, Some(1), "{what}: the client talks to the promoted copy");
    // Every id the client sent was acknowledged (it retried each until it was), so the log holds
    // exactly those records.
    let n = acked.len();
    assert_eq!(c.once("DBCHECK 0").unwrap(), format!("DBOK 0 {n}"), "{what}\n{}", log(&sp));
    c.exit().unwrap();
    let status = wait_exit(standby, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{what}: the promoted guest exits cleanly\n{}\n{}", console_tail(&sp), log(&sp));
    // Repeats: the n asked again above, and any try the primary carried out (its checkpoint made
    // it to the standby) but whose answer died with it.
    let console = sp.console();
    let repeats = console.lines().find_map(|l| l.strip_prefix(&format!("db: records={n} repeats=")));
    let repeats: u64 = repeats.and_then(|r| r.parse().ok()).unwrap_or_else(|| panic!("{what}: {console}"));
    assert!(repeats >= n as u64, "{what}: {console}");
    assert_eq!(log_on_disk(&s_img, 4096), acked, "{what}: the promoted copy's disk holds the log");
    std::fs::remove_file(&p_img).ok();
    std::fs::remove_file(&s_img).ok();
    (n, before, repeats - n as u64)
}

/// A client appends through whichever copy answers, retrying an id until some copy acknowledges
/// it, while the primary is killed: right after a send, right after an acknowledgement, while the
/// standby writes a committed epoch to its disk, and at a random moment. In every trial the
/// acknowledged positions are 0, 1, 2, ... in order (a record lost in the failover would see its
/// position given again to a later id), the promoted copy answers every acknowledged id with the
/// same position and appends nothing, its `DBCHECK` agrees, and its disk image holds the log.
#[test]
fn primary_killed_while_a_client_appends_loses_no_acknowledged_record() {
    require_kvm();
    let _serial = one_at_a_time();
    let (_seed, mut r) = seeded_rng();
    let setup = FtSetup::new("db-failover");
    for n in 0..6 {
        let kill = Kill::nth(n, &mut r);
        let (acked, before, known) = failover_trial(&setup, n, &kill);
        eprintln!(
            "{}: {acked} records acknowledged, {before} before the primary died; {known} tries found appended",
            kill.what
        );
    }
}

/// Protected, the primary streams each completed write to the standby at once (the checkpoint
/// then names how many it covers); with a standby of an older wire version the writes travel
/// inside checkpoints as before. Either way the acknowledged records are on the standby's disk
/// when the VM ends, and the primary reports where each reply's wait went.
#[test]
fn writes_stream_to_the_standby_and_an_older_wire_version_carries_them_in_checkpoints() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("db-stream");
    for (n, hooks) in [(0, None), (1, Some("wire-version=3"))] {
        let what = if hooks.is_some() { "wire version 3" } else { "streaming" };
        let p_env: Vec<(&str, &str)> = hooks.iter().map(|h| ("SMPFT_TEST_HOOKS", *h)).collect();
        let Pair { p_img, s_img, pp, sp, primary, standby } = pair(&setup, n, "service db db-record=8K", &p_env, &[]);
        wait_state(&pp, "protected", Duration::from_secs(30));
        let mut c = FailoverClient::new(vec![pp.serial.clone()], 1);
        let acked: Vec<(u64, u64)> =
            (1..=150).map(|id| (id, c.call("DB", id, "POS", Duration::from_secs(20)).unwrap())).collect();
        let q = common::ft::query(&pp);
        let streamed = q["disk-write-bytes-streamed"].as_u64().unwrap();
        let mirrored = q["disk-write-bytes-mirrored"].as_u64().unwrap();
        assert!(mirrored >= 150 * 8192, "{what}: {mirrored} bytes mirrored for 150 records of 8 KiB: {q}");
        match hooks {
            None => assert!(streamed >= 150 * 8192, "{what}: {streamed} bytes streamed for 150 records of 8 KiB: {q}"),
            Some(_) => assert_eq!(streamed, 0, "{what}: nothing streamed to an older standby: {q}"),
        }
        let phases = &q["reply-phases-p50-p99-us"];
        eprintln!("{what}: reply phases (p50, p99 µs): {phases}");
        for phase in smp_ft::ft::timeline::PHASES {
            assert!(phases[phase].is_array(), "{what}: no {phase} in the reply phases: {q}");
        }
        assert_eq!(phases["validate"][1].as_u64().unwrap() > 0, hooks.is_none(), "{what}: the standby's report: {q}");
        c.exit().unwrap();
        assert_eq!(wait_exit(primary, Duration::from_secs(20)).code(), Some(0), "{what}\n{}", log(&pp));
        assert_eq!(wait_exit(standby, Duration::from_secs(20)).code(), Some(0), "{what}\n{}", log(&sp));
        assert_eq!(log_on_disk(&s_img, 8192), acked, "{what}: the standby's disk holds the log");
        assert!(std::fs::read(&p_img).unwrap() == std::fs::read(&s_img).unwrap(), "{what}: the disks differ");
    }
}

/// The disk write log's budget bounds what is streamed and not yet acknowledged: with a budget
/// of four 64 KiB requests and a standby that stalls, a guest writing flat out waits at the bound
/// (never past it by more than the request taken before it was reached), and nothing is dropped
/// or reordered: the guest's own check of its disk passes, and the two disks are identical.
#[test]
fn a_slow_standby_holds_the_guests_disk_at_the_budget_and_loses_nothing() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("db-budget");
    let budget = 4 * 65536;
    let p_hooks = format!("disk-log-budget={budget}");
    let p_env = [("SMPFT_TEST_HOOKS", p_hooks.as_str())];
    let s_env = [("SMPFT_TEST_HOOKS", "fault=stall-apply:20:400")];
    let guest = "disk disk-io=64K flush-every=8 duration=3s report=1s";
    let Pair { p_img, s_img, pp, sp, primary, standby } = pair(&setup, 0, guest, &p_env, &s_env);
    wait_state(&pp, "protected", Duration::from_secs(30));
    let q = common::ft::wait_query(&pp, "the stall never filled the log", Duration::from_secs(10), |q| {
        q["disk-log-peak-bytes"].as_u64() >= Some(budget)
    });
    let peak = q["disk-log-peak-bytes"].as_u64().unwrap();
    assert_eq!(q["disk-log-budget-bytes"].as_u64(), Some(budget), "{q}");
    assert!(peak <= budget + 65536, "{peak} bytes held, past the budget by more than one request: {q}");
    let status = wait_exit(primary, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "the guest's check of its disk\n{}\n{}", console_tail(&pp), log(&pp));
    assert_eq!(wait_exit(standby, Duration::from_secs(20)).code(), Some(0), "{}", log(&sp));
    assert!(std::fs::read(&p_img).unwrap() == std::fs::read(&s_img).unwrap(), "the disks differ");
}
