//! Disks QEMU's block layer opens, through qemu-storage-daemon: Nova's qcow2 overlays on raw
//! backing files, mirrored and failed over with SIGKILL; Proxmox's throttle → qcow2 → file graph
//! and its `-drive` form; a throttle limit; VMDK and a loop device; raw files that bypass the
//! daemon; the daemon killed under load; bad graphs. Real qemu-storage-daemon and qemu-img.

mod common;

use common::ft::{free_port, log, spawn, wait_exit, wait_state, FtSetup, Side};
use common::{later, one_at_a_time, require_kvm, seeded_rng, wait_until, Proc, VmPaths};
use smpft_client::FailoverClient;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// As tests/disk.rs: the guest writes its disk flat out and checks it, churns memory, serves
/// the failover client; it exits when told.
const GUEST: &str = "counter churn churn-rate=2000 churn-ws=2M service disk flush-every=8 duration=600s";

fn run_ok(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{c:?}: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn qemu_img(args: &[&str]) -> String {
    run_ok(Command::new("qemu-img").args(args))
}

/// A raw image full of a pattern (what Nova's `_base` holds).
fn base(path: &Path) {
    let data: Vec<u8> = (0..32u32 << 20).map(|i| (i / 4096 % 251) as u8).collect();
    std::fs::write(path, data).unwrap();
}

fn overlay(path: &Path, backing: &Path) {
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", backing.to_str().unwrap(), "-F", "raw", path.to_str().unwrap()]);
}

fn sha256(path: &Path) -> String {
    run_ok(Command::new("sha256sum").arg(path)).split_whitespace().next().unwrap().to_string()
}

/// `qemu-img check` finds nothing wrong (retried while a daemon that is ending still holds the
/// image's lock).
fn check_clean(image: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = Command::new("qemu-img").arg("check").arg(image).output().unwrap();
        let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        if o.status.success() && out.contains("No errors were found") {
            return;
        }
        assert!(out.contains("lock") && Instant::now() < deadline, "qemu-img check {}: {out}", image.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn side<'a>(setup: &'a FtSetup, primary: bool, env: &'a [(&'a str, &'a str)]) -> Side<'a> {
    let (me, peer) = if primary { (&setup.a, &setup.b) } else { (&setup.b, &setup.a) };
    Side { me, peer, tiebreak: &setup.tiebreak, env, netns: None }
}

/// `smpft run` of the test guest with `args` (disks), its log and console in `p`.
fn run(p: &VmPaths, guest: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
    let c = common::smpft()
        .env("SMPFT_LOG", "info")
        .envs(env.iter().copied())
        .args(["run", "--vcpus", "2", "--memory", "128M", "--guest-args", guest, "--serial", "null", "--console"])
        .arg(&p.console)
        .args(args)
        .stderr(std::fs::File::create(p.console.with_extension("log")).unwrap())
        .spawn()
        .unwrap();
    Proc::new(c)
}

/// The guest's write rate (bytes/s) from its progress reports, over the reports after `skip_ms`.
fn write_rate(console: &str, io: u64, skip_ms: u64) -> Option<f64> {
    let points: Vec<(u64, u64)> = console
        .lines()
        .filter_map(|l| {
            let t = l.split("progress: t=").nth(1)?.split("ms").next()?.parse().ok()?;
            let w = l.split(" writes=").nth(1)?.split(' ').next()?.parse().ok()?;
            Some((t, w))
        })
        .filter(|(t, _)| *t >= skip_ms)
        .collect();
    let (first, last) = (points.first()?, points.last()?);
    (last.0 > first.0).then(|| (last.1 - first.1) as f64 * io as f64 / ((last.0 - first.0) as f64 / 1000.0))
}

/// Nova's shape on each of two hosts: a qcow2 overlay on a raw backing file of its own. The
/// primary is SIGKILLed while its guest writes (as tests/disk.rs does); the standby goes live
/// with nothing lost and the guest's whole-disk check passes; both overlays are clean for
/// `qemu-img check` and the backing files are unchanged. Then a clean shutdown of a protected
/// pair leaves two overlays `qemu-img compare` finds identical. The initial copy runs `full`
/// and `compare` over the daemon's exports.
#[test]
fn nova_qcow2_overlays_fail_over_and_stay_clean() {
    require_kvm();
    let _serial = one_at_a_time();
    let setup = FtSetup::new("qsd-nova");
    let dir = setup.dir.to_path_buf();
    let run_dir = dir.to_str().unwrap().to_string();
    let env = [("SMPFT_RUN_DIR", run_dir.as_str())];
    let (_seed, mut r) = seeded_rng();
    for trial in 0..5u64 {
        let (pb, sb_) = (dir.join(format!("pbase{trial}.raw")), dir.join(format!("sbase{trial}.raw")));
        let (po, so) = (dir.join(format!("p{trial}.qcow2")), dir.join(format!("s{trial}.qcow2")));
        base(&pb);
        base(&sb_);
        let sums = (sha256(&pb), sha256(&sb_));
        overlay(&po, &pb);
        overlay(&so, &sb_);
        let (p_disk, s_disk) =
            (format!("{},format=qcow2,cache=none", po.display()), format!("{},format=qcow2,cache=none", so.display()));
        let sync = if trial % 2 == 0 { "full" } else { "compare" };
        let addr = format!("127.0.0.1:{}", free_port());
        let (pp, sp) = (setup.paths(&format!("p{trial}")), setup.paths(&format!("s{trial}")));
        let last = trial == 4;
        let (guest, fault) = match trial {
            0 | 1 => (GUEST, Some(format!("fault=kill-after-send:{}", 3 + r(30)))),
            2 => (GUEST, Some(format!("fault=kill-after-ack:{}", 3 + r(30)))),
            3 => (GUEST, None),
            _ => ("disk flush-every=8 duration=4s report=1s", None),
        };
        let what = format!("trial {trial} ({fault:?}, --disk-sync {sync})");
        let sb = spawn(
            &sp,
            &side(&setup, false, &env),
            &["standby", "--listen", &addr, "--vcpus", "2", "--memory", "128M", "--disk", &s_disk, "--disk-sync", sync],
        );
        wait_state(&sp, "waiting", Duration::from_secs(20));
        let p_env: Vec<(&str, &str)> =
            env.iter().copied().chain(fault.iter().map(|f| ("SMPFT_TEST_HOOKS", f.as_str()))).collect();
        let p_args =
            ["run", "--vcpus", "2", "--memory", "128M", "--guest-args", guest, "--ft-peer", &addr, "--disk", &p_disk];
        let mut pr = spawn(&pp, &side(&setup, true, &p_env), &p_args);
        if last {
            wait_state(&pp, "protected", Duration::from_secs(60));
            let status = wait_exit(pr, Duration::from_secs(60));
            assert_eq!(status.code(), Some(0), "{what}: the guest's disk check\n{}", log(&pp));
            assert_eq!(wait_exit(sb, Duration::from_secs(30)).code(), Some(0), "{what}\n{}", log(&sp));
        } else {
            let mut client = FailoverClient::new(vec![pp.serial.clone(), sp.serial.clone()], 1);
            if fault.is_none() {
                wait_state(&pp, "protected", Duration::from_secs(60));
                let until = Instant::now() + Duration::from_millis(r(500));
                while Instant::now() < until {
                    client.incr(Duration::from_secs(20)).unwrap();
                }
                pr.sigkill();
            }
            let status = wait_exit(pr, Duration::from_secs(90));
            assert_eq!(status.signal(), Some(9), "{what}: primary ended otherwise\n{}", log(&pp));
            wait_state(&sp, "live-after-failover", Duration::from_secs(20));
            for _ in 0..20 {
                client.incr(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{what}: {e}\n{}", log(&sp)));
            }
            let bye = client.exit().unwrap_or_else(|e| panic!("{what}: EXIT: {e}"));
            assert_eq!(Some(bye), client.last, "{what}: nothing acknowledged was lost or rolled back");
            let status = wait_exit(sb, Duration::from_secs(60));
            assert_eq!(status.code(), Some(0), "{what}: the guest's disk check on the promoted copy\n{}", log(&sp));
        }
        assert!(log(&pp).contains("qemu-storage-daemon serves the disks"), "{what}\n{}", log(&pp));
        check_clean(&po);
        check_clean(&so);
        assert_eq!((sha256(&pb), sha256(&sb_)), sums, "{what}: the backing files were never written");
        if last {
            let o = Command::new("qemu-img")
                .args(["compare", "-f", "qcow2", "-F", "qcow2"])
                .arg(&po)
                .arg(&so)
                .output()
                .unwrap();
            assert!(o.status.success(), "{what}: qemu-img compare: {}", String::from_utf8_lossy(&o.stdout));
        }
        eprintln!("{what}: passed");
        for f in [&pb, &sb_, &po, &so] {
            std::fs::remove_file(f).ok();
        }
    }
}

/// Proxmox VE 9's graph (a throttle node over a qcow2 node over a file node, nested inline, with
/// its throttle group) on `smpft run --blockdev --object`, and Proxmox VE 8's `-drive if=none`
/// with a `-device virtio-blk-pci,drive=` through the QEMU persona: the guest's disk check passes
/// on both, and the image is clean after.
#[test]
fn proxmox_graph_and_drive_forms() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = common::scratch("qsd-proxmox");
    let img = dir.join("vm-8006-disk-0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "32M"]);
    let node = format!(
        r#"{{"detect-zeroes":"unmap","discard":"unmap","driver":"throttle","file":{{"cache":{{"direct":true,"no-flush":false}},"detect-zeroes":"unmap","discard":"unmap","driver":"qcow2","file":{{"aio":"io_uring","cache":{{"direct":true,"no-flush":false}},"detect-zeroes":"unmap","discard":"unmap","driver":"file","filename":"{}","node-name":"edd19f6c1b3a6d5a6248c3376a91a16","read-only":false}},"node-name":"fdd19f6c1b3a6d5a6248c3376a91a16","read-only":false}},"node-name":"drive-virtio0","read-only":false,"throttle-group":"throttle-drive-virtio0"}}"#,
        img.display()
    );
    let group = r#"{"id":"throttle-drive-virtio0","limits":{},"qom-type":"throttle-group"}"#;
    let p = VmPaths::new(&dir, "pve9");
    let vm = run(&p, "disk flush-every=8 duration=3s", &["--blockdev", &node, "--object", group], &[]);
    let status = wait_exit(vm, Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "the guest's disk check\n{}", log(&p));
    assert!(log(&p).contains("qemu-storage-daemon serves the disks"), "{}", log(&p));
    check_clean(&img);

    let guest = dir.join("guest.elf");
    std::fs::write(&guest, smp_ft::guest::BUILTIN).unwrap();
    let drive = format!(
        "file={},if=none,id=drive-virtio0,discard=on,format=qcow2,cache=none,aio=io_uring,detect-zeroes=unmap",
        img.display()
    );
    let p8 = VmPaths::new(&dir, "pve8");
    let c = common::smpft()
        .env("SMPFT_LOG", "info")
        .args(["qemu", "--", "-m", "128", "-smp", "2", "-kernel", guest.to_str().unwrap()])
        .args(["-append", "disk flush-every=8 duration=3s", "-drive", &drive])
        .args(["-device", "virtio-blk-pci,drive=drive-virtio0,id=virtio0,bus=pci.0,addr=0xa"])
        .args(["-serial", "null"])
        .stderr(std::fs::File::create(p8.console.with_extension("log")).unwrap())
        .stdout(std::fs::File::create(&p8.console).unwrap())
        .spawn()
        .unwrap();
    let status = wait_exit(Proc::new(c), Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "the persona's -drive disk\n{}", log(&p8));
    assert!(log(&p8).contains("qemu-storage-daemon serves the disks"), "{}", log(&p8));
    check_clean(&img);
}

/// A throttle group's write limit holds: the guest's write rate, measured from its own progress
/// reports, is not above the limit by more than 10% (reported, not asserted from below: a noisy
/// machine may write slower).
#[test]
fn a_throttle_limit_is_honoured() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = common::scratch("qsd-throttle");
    let img = dir.join("t.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    let limit: u64 = 4 << 20;
    let node = format!(
        "driver=throttle,node-name=t0,throttle-group=tg0,file.driver=qcow2,file.file.driver=file,file.file.filename={}",
        img.display()
    );
    let group = format!("throttle-group,id=tg0,limits.bps-write={limit}");
    let p = VmPaths::new(&dir, "t");
    let guest = "disk disk-io=64K disk-check=1000000 flush-every=0 duration=8s report=1s";
    let vm = run(&p, guest, &["--blockdev", &node, "--object", &group], &[]);
    let status = wait_exit(vm, Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", log(&p));
    let rate = write_rate(&p.console(), 64 << 10, 2000).unwrap_or_else(|| panic!("no progress\n{}", p.console()));
    eprintln!(
        "throttle: limit {limit} B/s, guest wrote {rate:.0} B/s ({:.1}% of the limit)",
        rate * 100.0 / limit as f64
    );
    assert!(rate <= limit as f64 * 1.1, "the guest wrote {rate:.0} B/s through a {limit} B/s limit");
    assert!(rate > 0.0);
}

/// VMDK and a loop device go through the daemon; a raw file with nothing else asked does not.
#[test]
fn vmdk_and_a_loop_device_through_the_daemon_raw_files_bypass_it() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = common::scratch("qsd-formats");
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let env = [("SMPFT_RUN_DIR", run_dir.to_str().unwrap())];
    let vmdk = dir.join("d.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", vmdk.to_str().unwrap(), "32M"]);
    let backing = dir.join("loop.raw");
    std::fs::File::create(&backing).unwrap().set_len(32 << 20).unwrap();
    let dev = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&backing)).trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(dev.clone());
    let raw = dir.join("plain.raw");
    std::fs::File::create(&raw).unwrap().set_len(32 << 20).unwrap();
    let cases = [
        ("vmdk", format!("{},format=vmdk", vmdk.display()), true),
        ("loop", format!("{dev},format=raw,cache=none"), true),
        ("raw", raw.display().to_string(), false),
    ];
    for (what, disk, daemon) in cases {
        let p = VmPaths::new(&dir, what);
        let vm = run(&p, "disk flush-every=8 duration=3s", &["--disk", &disk], &env);
        let status = wait_exit(vm, Duration::from_secs(60));
        assert_eq!(status.code(), Some(0), "{what}: the guest's disk check\n{}", log(&p));
        assert_eq!(log(&p).contains("qemu-storage-daemon serves the disks"), daemon, "{what}\n{}", log(&p));
        let left: Vec<PathBuf> = std::fs::read_dir(&run_dir).unwrap().map(|e| e.unwrap().path()).collect();
        assert!(left.is_empty(), "{what}: the daemon's runtime directory is removed when it stops: {left:?}");
    }
    check_clean(&vmdk);
}

/// The daemon SIGKILLed while the guest writes: the guest gets I/O errors (the test guest then
/// exits with status 3), smpft neither hangs nor panics, and one log line names the daemon.
#[test]
fn the_daemon_killed_under_load() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = common::scratch("qsd-killed");
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let env = [("SMPFT_RUN_DIR", run_dir.to_str().unwrap())];
    let img = dir.join("k.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "32M"]);
    let p = VmPaths::new(&dir, "k");
    let vm = run(&p, "disk duration=60s report=1s", &["--disk", &format!("{},format=qcow2", img.display())], &env);
    let started = || p.console().contains("disk: writes=");
    wait_until(later(|| format!("the guest never wrote\n{}", log(&p))), Duration::from_secs(30), started);
    let pidfile = std::fs::read_dir(&run_dir).unwrap().next().unwrap().unwrap().path().join("qsd.pid");
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    // SAFETY: kill(2) on the daemon this test's VM started (its pidfile names it).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let status = wait_exit(vm, Duration::from_secs(30));
    assert_eq!(status.code(), Some(3), "the guest fails its disk workload\n{}", log(&p));
    let l = log(&p);
    let named: Vec<&str> = l.lines().filter(|l| l.contains(&format!("qemu-storage-daemon (pid {pid})"))).collect();
    assert_eq!(named.len(), 1, "one line names the daemon\n{l}");
    assert!(named[0].contains("died") && named[0].contains("signal: 9"), "{}", named[0]);
    assert!(!l.contains("panicked"), "{l}");
}

/// Bad graphs and a missing daemon: one line each, naming the disk, and a non-zero exit.
#[test]
fn bad_graphs_are_one_line_each() {
    let dir = common::scratch("qsd-bad");
    let img = dir.join("ok.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    let missing = dir.join("nobacking.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/nonexistent/_base/x",
        "-F",
        "raw",
        missing.to_str().unwrap(),
        "8M",
    ]);
    let guest = dir.join("guest.elf");
    std::fs::write(&guest, smp_ft::guest::BUILTIN).unwrap();
    let fails = |args: &[&str], env: &[(&str, &str)], want: &[&str]| {
        let o = common::smpft().envs(env.iter().copied()).args(args).output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "{args:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{args:?}: one line\n{e}");
        for w in want {
            assert!(e.contains(w), "{args:?}: wanted {w:?} in: {e}");
        }
    };
    let ok = img.to_str().unwrap();
    fails(&["run", "--serial", "null", "--disk", &format!("{ok},format=nosuch")], &[], &[ok, "'nosuch'"]);
    let m = missing.to_str().unwrap();
    fails(&["run", "--serial", "null", "--disk", &format!("{m},format=qcow2")], &[], &[m, "/nonexistent/_base/x"]);
    let cycle = [
        "run",
        "--serial",
        "null",
        "--blockdev",
        "driver=qcow2,node-name=a,file=b",
        "--blockdev",
        "driver=raw,node-name=b,file=a",
    ];
    fails(&cycle, &[], &["cycle (a -> b -> a)"]);
    let unknown = r#"{"driver":"nosuch","node-name":"vda"}"#;
    fails(&["run", "--serial", "null", "--blockdev", unknown], &[], &["disk vda", "'nosuch'"]);
    let g = guest.to_str().unwrap();
    fails(
        &["qemu", "--", "-m", "64", "-kernel", g, "-device", "virtio-blk-pci,drive=nope,id=vdb"],
        &[],
        &["vdb: no -blockdev 'nope'"],
    );
    let qsd = [("SMPFT_QEMU_STORAGE_DAEMON", "/nonexistent/qemu-storage-daemon")];
    fails(&["run", "--serial", "null", "--disk", &format!("{ok},format=qcow2")], &qsd, &[ok, "qemu-system-common"]);
}
